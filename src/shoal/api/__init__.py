"""The HTTP API: a thin adapter from OpenAI's dialect to one internal GenerationRequest."""
