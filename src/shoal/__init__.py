"""shoal: pool every machine you own into one LLM inference cluster."""

__version__ = "0.1.0"
