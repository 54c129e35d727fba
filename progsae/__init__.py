"""progsae: progressive sparse autoencoders, trained and served."""

__version__ = "0.1.0"
