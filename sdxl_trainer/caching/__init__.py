"""Stage 1: the caching script's machinery (image folder -> latents and text embeddings per bucket)."""
