"""Checkpoint integrity: a manifest of every file's size and sha256, written last into the checkpoint folder and
verified before a resume, and a check that weights are finite before anything is saved.

A flipped byte in a model shard would otherwise load silently (every step NaN, a saved pipeline of `inf`), and
a truncated shard fails deep inside torch.distributed.checkpoint without naming a file. safetensors and DCP
keep no checksums of their own, so the manifest is ours; hashing uses hashlib (OpenSSL's sha256) in threads,
which release the GIL on large reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_READ_BYTES = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_all(folder: Path, rel_paths: list[str]) -> dict[str, str]:
    workers = max(1, min(8, os.cpu_count() or 1, len(rel_paths)))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(rel_paths, pool.map(lambda r: file_sha256(folder / r), rel_paths), strict=True))


def build_manifest(folder: Path, known: dict[str, dict] | None = None) -> dict:
    """Size and sha256 of every file below `folder`. `known` entries (relative path -> {bytes, sha256}) are
    reused for files whose size matches, e.g. files hard-linked from a verified checkpoint."""
    known = known or {}
    rel = [p.relative_to(folder).as_posix() for p in _files(folder)]
    sizes = {r: (folder / r).stat().st_size for r in rel}
    todo = [r for r in rel if known.get(r, {}).get("bytes") != sizes[r]]
    hashes = _hash_all(folder, todo)
    files = {r: {"bytes": sizes[r], "sha256": hashes[r] if r in hashes else known[r]["sha256"]} for r in rel}
    return {"version": MANIFEST_VERSION, "files": files}


def write_manifest(folder: Path, known: dict[str, dict] | None = None) -> dict:
    """Hash the folder's files and write `manifest.json` (atomically); call after every other file is written."""
    manifest = build_manifest(folder, known)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems found in a checkpoint folder (empty: intact). Sizes first (cheap, catches truncation), then
    hashes (catches changed bytes)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return [f"{folder / MANIFEST} is missing or unreadable (an incomplete or foreign checkpoint)"]
    problems = []
    expected: dict[str, dict] = manifest["files"]
    for rel, meta in expected.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {meta['bytes']} were written (truncated?)")
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    problems += [f"{folder / rel} is not in the manifest" for rel in sorted(present - set(expected))]
    if problems:
        return problems
    actual = _hash_all(folder, sorted(expected))
    return [f"{folder / rel} does not match its sha256 (changed on disk)" for rel in expected
            if actual[rel] != expected[rel]["sha256"]]  # fmt: skip


def master_tensors(optimizer, model: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's master weights: the optimizer's local tensors, or else the local parts of its model state."""
    tensors = getattr(optimizer, "locals", None)
    if tensors is None:
        tensors = [getattr(t, "_local_tensor", t) for t in optimizer.model_state_dict(model).values()]
    return list(tensors)


def count_nonfinite(tensors: list[torch.Tensor]) -> int:
    """Collective: non-finite elements in every rank's `tensors`, summed over all ranks (one all-reduce)."""
    counts = [(~torch.isfinite(t)).sum() for t in tensors if t.is_floating_point() and t.numel()]
    device = tensors[0].device if tensors else torch.device("cpu")
    total = torch.stack(counts).sum().to(torch.float64) if counts else torch.zeros((), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        total = total.to(device)
        dist.all_reduce(total)
    value = float(total.item())
    return int(value) if math.isfinite(value) else -1
