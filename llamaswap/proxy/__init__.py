"""The streaming reverse proxy and the request filters."""
