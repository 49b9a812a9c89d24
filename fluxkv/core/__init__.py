"""The node's data and its rules, with no gRPC, files or brokers: the sharded store, change records,
error kinds, expiry, the watch hub, scan cursors, and the backoff every retry loop uses."""
