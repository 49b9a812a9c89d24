"""`python -m fluxkv.server`: run a node (how --workers starts each worker)."""

from fluxkv.server.node import main

main()
