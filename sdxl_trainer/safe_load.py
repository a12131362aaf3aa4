"""Reading `.pth` weights without ever executing code, with one clear message when a file is not plain weights."""

from __future__ import annotations

import os

import torch


def safe_torch_load(path: str | os.PathLike):
    """torch.load(weights_only=True), with one clear reason when the file is not plain weights: torch's own message
    ends by advising `weights_only=False`, which would run whatever code the file holds (never done here)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and runtime errors all mean "not readable as weights"
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            first = "not a plain PyTorch weights file (damaged, another format, or a pickle holding code)"
        raise ValueError(f"{path}: {first}; it is never loaded with code execution") from None
