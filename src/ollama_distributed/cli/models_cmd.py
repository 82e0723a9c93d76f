"""`ollama-distributed` commands: models_cmd (to be written)."""
