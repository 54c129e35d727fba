"""Activation caches: the on-disk format and its outlier policy, the corpora, and how a cache is
filled from a language model (`progsae harvest`, locally or on Ray workers)."""
