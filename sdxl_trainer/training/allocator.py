"""The CUDA caching allocator's settings for training: expandable segments unless the user chose otherwise.

Why: near the memory cap of a 24 GB card, fragmentation decides what fits. With expandable segments the allocator
grows one mapping per stream instead of keeping fixed-size segments, so freed blocks merge: on an H200 capped at
24 GiB the lean plan at batch 8 reserved 20.4 GiB with them against 21.8 GiB without, for the same 20.0 GiB
allocated (bench/results/memory_lean_h200_2026-12-03.jsonl). PyTorch reads the setting when CUDA initialises, so
this must run before the first CUDA call; a `PYTORCH_CUDA_ALLOC_CONF` the user set is left alone.
"""

from __future__ import annotations

import os

import torch

ENV = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"


def prefer_expandable_segments() -> str | None:
    """Set `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` on a CUDA machine if the user set nothing and CUDA is
    not yet initialised; returns the setting in force for the log (None: the allocator keeps PyTorch's default)."""
    if ENV not in os.environ and torch.cuda.is_available() and not torch.cuda.is_initialized():
        os.environ[ENV] = EXPANDABLE
    return os.environ.get(ENV)
