"""The numpy engine: the torch engine's Llama-family models with no framework but numpy."""
