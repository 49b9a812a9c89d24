"""The append-only file: its record format, the writer and change log (file.py), replay at
start-up, rewrites, and the offline check and repair. It knows nothing of the transport or of
who reads its changes."""
