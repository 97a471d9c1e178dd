"""The network-namespace failover lab: namespace plumbing and the `netns_lab` script."""
