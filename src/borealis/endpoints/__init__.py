"""Endpoints: the proxy process and the routing rules (who gets a new connection)."""
