"""Generated gRPC/protobuf code for the cispo.v1 wire contract (see training.proto)."""
