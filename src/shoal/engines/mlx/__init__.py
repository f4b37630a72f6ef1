"""The MLX engine: mlx-lm's Llama-family model files, one shard of them, on Metal or CPU."""
