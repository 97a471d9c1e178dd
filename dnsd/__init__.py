"""dnsd: authoritative round-robin DNS served from the live service registry (see README.md)."""
