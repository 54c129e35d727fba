"""The language model side, shared by trainer and server: load a real causal LM offline, read
its residual stream at a layer and run it on from there (`models`), splice a stand-in for that
stream in and score the next tokens (`splice`), and where converted models are cached (`cache`)."""
