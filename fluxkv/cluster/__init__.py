"""Nodes that find each other: the etcd client, registration, discovery, the consistent-hash ring,
and forwarding a call to the node that owns its key."""
