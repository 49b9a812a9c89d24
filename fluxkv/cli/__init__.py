"""The `fluxkv` command: reads and writes, cluster views, and offline append-only file tools."""
