"""Ollama Distributed: one LLM across a cluster of machines, behind the Ollama API."""

__version__ = "0.1.0"
