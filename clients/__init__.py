"""progsae clients."""
