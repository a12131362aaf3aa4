"""Helpers for the evaluation tests: random-weight scorer files in the real layouts, validation items, handoffs.

Every file is written the way the real one is shipped (torch-fidelity's Inception state dict, torchvision's
backbone state dict, an HPS `{"state_dict": ...}` checkpoint for open_clip), so the code under test loads
them through the same path as the real weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

TINY_HPS_MODEL = "tiny-hps-test"
TINY_HPS_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_inception_weights(path: Path) -> Path:
    """A random state dict in the exact layout of torch-fidelity's FID Inception file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # The class loads weights in its constructor; skip that once to read the fresh layout.
    with (
        mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    # Fresh BatchNorm statistics let activations fade to ~1e-8 over 90 layers; measured statistics on a
    # few random images keep the features O(1), so the scores in the tests are not trivially zero.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    torch.save(model.state_dict(), path)
    return path


_SHARED: dict[str, Path] = {}


def shared_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One random real-layout Inception file per test session, whichever module asks first."""
    if "inception" not in _SHARED:
        folder = tmp_path_factory.mktemp("inception")
        _SHARED["inception"] = make_inception_weights(folder / "weights-inception-2015-12-05-6726825d.pth")
    return _SHARED["inception"]


def make_lpips_backbone(path: Path, seed: int = 0) -> Path:
    """torchvision AlexNet `features.*` weights (the classifier is not needed by LPIPS)."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.alexnet(weights=None)
    torch.save({k: v for k, v in net.state_dict().items() if k.startswith("features.")}, path)
    return path


def register_tiny_hps_config(folder: Path) -> str:
    """Register a tiny ViT-H-14-shaped open_clip config (public open_clip.add_model_config)."""
    import open_clip

    path = folder / f"{TINY_HPS_MODEL}.json"
    path.write_text(json.dumps(TINY_HPS_CONFIG), encoding="utf-8")
    open_clip.add_model_config(path)
    return TINY_HPS_MODEL


def make_hps_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A random tiny model saved as HPS v2.1 is shipped: {"state_dict": ...}. Returns (path, model)."""
    import open_clip

    register_tiny_hps_config(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_HPS_MODEL)
    path = folder / f"hps_tiny_{seed}.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model.eval()


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net with the Inception scorer's interface: uint8 images -> (pool, logits)."""

    def __init__(self, pool_dim: int = 16, classes: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, pool_dim, 3, stride=2)
        self.fc = torch.nn.Linear(pool_dim, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear")
        pool = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return pool, self.fc(pool)


def make_validation_items(root: Path, count: int, buckets=((64, 64), (64, 48)), seed: int = 0) -> list:
    """Random images with captions in `root` and their CacheItems (bucket sizes alternate)."""
    from sdxl_trainer.data.cache_format import CacheItem

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        rel = f"sub/img_{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(root / rel)
        w, h = buckets[i % len(buckets)]
        items.append(
            CacheItem(
                key=hashlib.sha256(rel.encode()).hexdigest()[:32],
                image_relpath=rel,
                caption=f"validation caption number {i}",
                bucket_wh=(w, h),
                original_size_hw=(80, 72),
                crop_top_left=(0, 0),
                target_size_hw=(h, w),
                upscaled=False,
                image_sha256=hashlib.sha256((root / rel).read_bytes()).hexdigest(),
                caption_sha256="0" * 64,
                tensor_file=f"t/{i}.safetensors",
            )
        )
    return items


def write_handoff(model_dir: Path, path: Path, perturb: float = 0.0) -> Path:
    """The trainer's handoff: the full fp32 UNet state dict as safetensors (optionally perturbed)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    if perturb:
        g = torch.Generator().manual_seed(1)
        state = {k: v + perturb * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(state, path)
    return path


def eval_args(*argv: str) -> argparse.Namespace:
    from sdxl_trainer.evaluation import eval_args

    parser = argparse.ArgumentParser()
    eval_args.add_args(parser)
    return parser.parse_args(list(argv))
