"""fluxkv-gateway: Flux-KV's HTTP API, and FluxKV's, in front of a FluxKV cluster (docs/gateway.md)."""
