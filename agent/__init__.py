"""The per-node agent: health-checks local services and registers them in etcd."""
