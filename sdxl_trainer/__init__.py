"""SDXL FSDP trainer: caching, training, sampling, metrics and export for Stable Diffusion XL."""

__version__ = "0.1.0"
