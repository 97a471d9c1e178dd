"""Carousel: DNS round-robin + reverse proxy cluster toolkit (shared core)."""

__version__ = "0.1.0"
