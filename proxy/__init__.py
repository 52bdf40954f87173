"""pyproxy: a user-space TCP/UDP port proxy, drop-in for Docker's docker-proxy."""

__version__ = "0.1.0"
