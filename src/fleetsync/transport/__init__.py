"""Transport: the upstream HTTP API (server) and its client."""
