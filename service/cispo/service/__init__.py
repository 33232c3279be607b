"""The cispo gRPC front: decode + validate, the ordered pipeline, health, reflection, metrics."""
