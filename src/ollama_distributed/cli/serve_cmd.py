"""`ollama-distributed` commands: serve_cmd (to be written)."""
