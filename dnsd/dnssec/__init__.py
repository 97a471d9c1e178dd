"""DNSSEC online signing: keys, RRset signatures with a cache, compact denial of existence."""
