"""SDXL's parts: loading (folder, hub cache or single file), the tiny test model, shapes, single-file keys."""
