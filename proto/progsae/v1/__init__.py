"""The wire contract, package progsae.v1: `progsae.proto`, its generated stubs (`progsae_pb2`,
`progsae_pb2_grpc`; regenerate with `make stubs`) and numpy <-> message conversion (`convert`)."""
