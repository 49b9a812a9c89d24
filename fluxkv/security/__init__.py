"""Who may call a node and how they reach it: TLS material from the settings' PEM files."""
