"""The llamacpp engine: whole GGUF models through llama-cpp-python (CPU, CUDA or Metal)."""
