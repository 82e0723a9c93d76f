"""`python -m ollama_distributed.cli ...` runs the same app as the `ollama-distributed` console script."""

from . import main

main()
