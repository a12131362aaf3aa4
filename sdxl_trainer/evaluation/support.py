"""Evaluation plumbing: which scorers can run (and one line per score that cannot), building them once,
reading reference images, caching their features per validation set, and loading the handed-off UNet."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdxl_trainer.evaluation import score_math, scorers

# The original trainer's TensorBoard tags (seed_reference §3.11), plus the spread of KID and IS.
METRIC_TAGS = {
    "is": "Validation/Inception Score per epoch",
    "is_std": "Validation/Inception Score std per epoch",
    "lpips": "Validation/LPIPS Score per epoch",
    "fid": "Validation/FID Score per epoch",
    "kid": "Validation/KID Score per epoch",
    "kid_std": "Validation/KID Score std per epoch",
    "hps": "Validation/HPSv2 Score per epoch",
}
REFERENCE_CACHE_VERSION = 1


class EvaluationError(RuntimeError):
    """Evaluation cannot go on; the message names the file or flag."""


@dataclass
class ScorerPlan:
    enabled: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # score -> the one line telling the user why
    inception_weights: Path | None = None
    lpips_backbone: Path | None = None
    hps_checkpoint: Path | None = None

    @property
    def wants_reference_features(self) -> bool:
        return bool({"fid", "kid"} & self.enabled)


def _given_path(value: str | None, flag: str) -> Path | None:
    """A path the user gave must exist (a clear error now, not a skip: they asked for it)."""
    if value is None or value == "":
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise score_math.ScoreError(f"{flag}: {path} is not a file")
    return path


def plan_scorers(
    metrics: Iterable[str],
    *,
    inception_weights: str | None,
    lpips_backbone: str | None,
    hps_checkpoint: str | None,
    reference_missing_reason: str | None = None,
    have_custom_inception: bool = False,
) -> ScorerPlan:
    """Decide which requested scores can run. A score whose weights are missing is skipped with one line."""
    wanted = list(metrics)
    plan = ScorerPlan()
    plan.inception_weights = _given_path(inception_weights, "--metrics_inception_weights")
    plan.lpips_backbone = _given_path(lpips_backbone, "--metrics_lpips_backbone")
    plan.hps_checkpoint = _given_path(hps_checkpoint, "--metrics_hps_checkpoint")
    if plan.inception_weights is None and not have_custom_inception:
        plan.inception_weights = scorers.default_inception_weights()
    has_inception = plan.inception_weights is not None or have_custom_inception
    for name in wanted:
        label = score_math.DISPLAY_NAMES[name]
        if name in ("fid", "kid", "is") and not has_inception:
            plan.skipped[name] = (
                f"{label} skipped: no Inception weights; give --metrics_inception_weights PATH to "
                f"{scorers.INCEPTION_FILE_NAME} ({scorers.INCEPTION_URL})"
            )
        elif name == "lpips" and plan.lpips_backbone is None:
            plan.skipped[name] = (
                f"{label} skipped: no backbone weights; give --metrics_lpips_backbone PATH to "
                f"{scorers.LPIPS_BACKBONE_HINT}"
            )
        elif name == "hps" and plan.hps_checkpoint is None:
            plan.skipped[name] = (
                f"{label} skipped: no checkpoint; give --metrics_hps_checkpoint PATH to HPS_v2.1_compressed.pt "
                f"({scorers.HPS_URL})"
            )
        elif name in ("fid", "kid", "lpips") and reference_missing_reason:
            plan.skipped[name] = f"{label} skipped: {reference_missing_reason}"
        else:
            plan.enabled.add(name)
    return plan


@dataclass
class Scorers:
    inception: scorers.InceptionScorer | None = None
    lpips: scorers.LpipsScorer | None = None
    hps: scorers.HpsScorer | None = None

    def to(self, device: torch.device | str) -> Scorers:
        for scorer in (self.inception, self.lpips, self.hps):
            if scorer is not None:
                scorer.to(device)
        return self


def build_scorers(
    plan: ScorerPlan,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    hps_model: str = "ViT-H-14",
    inception_extractor: torch.nn.Module | None = None,
    half_hps: bool | None = None,
) -> Scorers:
    """Load the networks the plan needs (once per process: the caller keeps the result). Build on the CPU
    with `half_hps` set for the GPU they will run on, to keep GPU memory free until they score."""
    out = Scorers()
    if {"fid", "kid", "is"} & plan.enabled:
        out.inception = scorers.InceptionScorer(
            plan.inception_weights, device, batch_size, extractor=inception_extractor
        )
    if "lpips" in plan.enabled:
        out.lpips = scorers.LpipsScorer(plan.lpips_backbone, device, max(1, batch_size // 2))
    if "hps" in plan.enabled:
        out.hps = scorers.HpsScorer(plan.hps_checkpoint, device, hps_model, max(1, batch_size // 2), half=half_hps)
    return out


def fit_to_size(image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    """Cover-resize then centre-crop to exactly size_wh (what the cache does to a training image)."""
    if image.size == tuple(size_wh):
        return image
    return ImageOps.fit(image, tuple(size_wh), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def load_reference_image(data_root: Path, item) -> tuple[Image.Image | None, str | None]:
    """The item's original image at its bucket size, or (None, reason). Read-only on the data folder."""
    from sdxl_trainer.data.images import ImageSkip, load_image  # EXIF, alpha, 16-bit and ICC handling

    path = Path(data_root) / item.image_relpath
    if not path.is_file():
        return None, f"{item.image_relpath}: not found under {data_root}"
    try:
        image = load_image(path)
    except ImageSkip as exc:
        return None, f"{item.image_relpath}: {exc}"
    return fit_to_size(image, tuple(item.bucket_wh)), None


def reference_set_key(items: Sequence, extractor_identity: str) -> str:
    """Content key of a validation set's reference features: item ids, image hashes, bucket sizes and the
    feature extractor. Any change (a resumed run with another hold-out, an edited image) gives a new key."""
    payload = {
        "version": REFERENCE_CACHE_VERSION,
        "extractor": extractor_identity,
        "items": [[it.key, it.image_sha256, list(it.bucket_wh)] for it in items],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def reference_cache_path(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / "eval_cache" / f"reference_inception_{key[:16]}.safetensors"


def read_reference_cache(path: Path, key: str) -> tuple[np.ndarray, list[bool]] | None:
    """(pool features of the readable references, readable flag per item) or None if absent or stale."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            pool = f.get_tensor("pool").numpy()
            ok = [bool(v) for v in f.get_tensor("ok").tolist()]
    except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
        return None
    return pool, ok


def write_reference_cache(path: Path, key: str, pool: np.ndarray, ok: Sequence[bool]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".reference-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        tensors = {
            "pool": torch.from_numpy(np.ascontiguousarray(pool, dtype=np.float32)),
            "ok": torch.tensor([1 if v else 0 for v in ok], dtype=torch.uint8),
        }
        save_file(tensors, tmp, metadata={"key": key})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")


def _strip_wrappers(key: str) -> str:
    return ".".join(part for part in key.split(".") if f"{part}." not in _WRAPPER_PREFIXES)


@torch.no_grad()
def load_unet_weights(unet: torch.nn.Module, path: Path) -> None:
    """Copy the handoff file's full state dict into `unet` tensor by tensor (cast to the UNet's dtype), so
    the peak extra memory is one tensor, not a second UNet."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise EvaluationError(f"UNet handoff file {path} does not exist")
    targets = unet.state_dict()  # tensors share storage with the module: copy_ updates it in place
    with safe_open(str(path), framework="pt", device="cpu") as f:
        # Wrappers (torch.compile, activation checkpointing, DDP) may prefix the trainer's key names.
        source_key = {_strip_wrappers(k): k for k in f.keys()}
        keys = set(source_key)
        missing, unexpected = sorted(set(targets) - keys), sorted(keys - set(targets))
        if missing or unexpected:
            raise EvaluationError(
                f"UNet handoff file {path} does not match the sampling UNet: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
            )
        for name, target in targets.items():
            source = f.get_tensor(source_key[name])
            if tuple(source.shape) != tuple(target.shape):
                raise EvaluationError(
                    f"UNet handoff file {path}: {name} has shape {tuple(source.shape)}, "
                    f"the sampling UNet expects {tuple(target.shape)}"
                )
            target.copy_(source)


def aggregate_scores(
    records: list[dict], reference_pool: np.ndarray | None, enabled: set[str], a: argparse.Namespace, note
) -> dict[str, float]:
    """Scores from the per-image records (Inception logits and pool features, LPIPS, HPS) and the reference
    pool; `note(line)` reports what could not be scored as asked."""
    out: dict[str, float] = {}
    n = len(records)
    if "is" in enabled:
        splits = min(a.metrics_is_splits, n)
        if splits < a.metrics_is_splits:
            note(f"IS: {n} validation images, so {splits} splits instead of {a.metrics_is_splits}")
        out["is"], out["is_std"] = score_math.compute_inception_score(np.stack([r["logits"] for r in records]), splits)
    if {"fid", "kid"} & enabled:
        gen = np.stack([r["pool"] for r in records])
        ref = reference_pool
        if ref is None or ref.shape[0] < 2 or n < 2:
            note("FID/KID: fewer than 2 reference or generated images; not scored")
        else:
            if "fid" in enabled:
                warning = score_math.fid_sample_size_warning(n, ref.shape[0], gen.shape[1])
                if warning:
                    note(warning)
                out["fid"] = score_math.compute_fid_from_features(gen, ref)
            if "kid" in enabled:
                size = min(a.metrics_kid_subset_size, n, ref.shape[0])
                if size < a.metrics_kid_subset_size:
                    note(f"KID: subsets of {size} images (fewer than --metrics_kid_subset_size)")
                out["kid"], out["kid_std"] = score_math.compute_kid(gen, ref, a.metrics_kid_subsets, size)
    for name in ("lpips", "hps"):
        values = [r[name] for r in records if name in r]
        if name in enabled and values:
            out[name] = float(np.mean(values))
    return out
