"""`ollama-distributed` commands: run_cmd (to be written)."""
