"""`ollama-distributed` commands: plan_cmd (to be written)."""
