"""progsae server."""
