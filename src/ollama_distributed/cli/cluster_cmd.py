"""`ollama-distributed` commands: cluster_cmd (to be written)."""
