"""The wire contract (progsae.v1). Stubs are generated from the .proto files by `build`."""
