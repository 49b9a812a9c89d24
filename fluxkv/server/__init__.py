"""A node: its lifecycle and wiring (node.py), the API's handlers, the gRPC transport (pygrpc-native
or grpcio), worker processes, and the health check the Docker image runs."""
