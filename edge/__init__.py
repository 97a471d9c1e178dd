"""The edge: an L7 reverse proxy that routes, serves static files, balances and buffers."""
