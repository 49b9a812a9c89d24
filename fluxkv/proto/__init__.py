"""Generated protobuf and gRPC modules; regenerate with `python proto/generate.py`."""
