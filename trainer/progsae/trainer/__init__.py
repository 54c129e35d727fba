"""progsae trainer."""
