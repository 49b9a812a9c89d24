"""The append-only file: its record format, the writer and replay (file.py), and rewrites.
It knows nothing of the transport or of who reads its changes."""
