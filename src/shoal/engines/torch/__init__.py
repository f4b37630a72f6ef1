"""The torch engine: Llama-family model files, a chunked KV cache, the Engine adapter."""
