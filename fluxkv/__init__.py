"""FluxKV: a sharded in-memory key-value node served over gRPC."""

__version__ = "0.1.0"
