"""The language model side, shared by trainer and server: load a real causal LM offline, read
and splice its residual stream (`models`), and where converted models are cached (`cache`)."""
