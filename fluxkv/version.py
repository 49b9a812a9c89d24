"""The package's version (as pyproject.toml's), in a module of its own so that
reading it imports nothing else of fluxkv."""

__version__ = "0.1.0"
