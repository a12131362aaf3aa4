"""Reading a dataset's cache (format: `sdxl_trainer.data.dataset.cache_format`): items, tensors, empty-caption
embeddings, and finding caches below the folders the user names. CPU only, nothing unpickled."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdxl_trainer.data.cache_format import (
    EMPTY_FILE,
    EMPTY_TENSORS,
    INDEX_DIR,
    ITEM_TENSORS,
    META_FILE,
    OPTIONAL_ITEM_TENSORS,
    TEXT_CHUNK_ROWS,
    CacheError,
    CacheItem,
    _read_index_part,
    fingerprint_parts,
    read_meta,
)


class DatasetCache:
    """One dataset's cache folder, opened for reading (items sorted by key, identical on every rank)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        meta = read_meta(self.root)
        self.name: str = meta["name"]
        self.fingerprint: dict = meta["fingerprint"]
        self.items: list[CacheItem] = [CacheItem.from_record(r) for r in self._read_index(meta)]

    def _read_index(self, meta: dict) -> list[dict]:
        parts = sorted((self.root / INDEX_DIR).glob("shard-*-of-*.jsonl"))
        if not parts:
            raise CacheError(f"{self.root}: no index; the caching run did not finish: re-run sdxl_process_data_dir.py")
        expected = fingerprint_parts(self.fingerprint)
        found: dict[int, set[int]] = {}
        records: dict[str, dict] = {}
        for part in parts:
            header, rows = _read_index_part(part)
            found.setdefault(int(header["num_shards"]), set()).add(int(header["shard_index"]))
            if fingerprint_parts(header["fingerprint"]) != expected:
                raise CacheError(
                    f"{part}: written with other settings than {self.root / META_FILE} (a shard was cached with "
                    "different flags); re-run every shard with the same flags"
                )
            for r in rows:
                if (r.get("image_fingerprint"), r.get("text_fingerprint")) != expected:
                    raise CacheError(f"{part}: item {r.get('image_relpath')} is stale; re-run sdxl_process_data_dir.py")
                records[r["key"]] = r
        if len(found) > 1:
            raise CacheError(f"{self.root / INDEX_DIR}: parts from runs with different --num_shards {sorted(found)}")
        ((num_shards, have),) = found.items()
        missing = sorted(set(range(num_shards)) - have)
        if missing:
            raise CacheError(
                f"{self.root}: incomplete, the runs with --num_shards {num_shards} --shard_index {missing} "
                "have not finished"
            )
        return [records[k] for k in sorted(records)]

    def load_item_tensors(self, item: CacheItem) -> dict[str, torch.Tensor]:
        """CPU tensors: latent_mean (4, H/8, W/8), latent_std (same), prompt_embeds (k*77, D_ctx) for a caption
        of k CLIP chunks (k = 1 unless cached with --max_token_length 154/231), pooled_prompt_embeds (D_pool,),
        and loss_mask (1, H/8, W/8) when the item has a mask. Latents are already multiplied by the VAE's
        scaling factor, so a training latent is latent_mean + latent_std * randn (a fresh posterior sample each
        time). Stored in the caching run's --cache_dtype (float16 by default): cast as needed."""
        path = self.root / item.tensor_file
        try:
            tensors = load_file(str(path), device="cpu")
        except FileNotFoundError:
            raise CacheError(f"{path}: missing item file ({item.image_relpath}); re-run caching") from None
        except Exception as exc:  # noqa: BLE001
            raise CacheError(f"{path}: damaged item file ({exc}); re-run caching") from exc
        bw, bh = item.bucket_wh
        mean = tensors.get("latent_mean")
        if any(n not in tensors for n in ITEM_TENSORS) or mean is None or tuple(mean.shape[1:]) != (bh // 8, bw // 8):
            raise CacheError(f"{path}: tensors do not match the item's bucket {bw}x{bh}; re-run caching")
        mask = tensors.get("loss_mask")
        if mask is not None and tuple(mask.shape) != (1, bh // 8, bw // 8):
            raise CacheError(f"{path}: loss_mask does not match the item's bucket {bw}x{bh}; re-run caching")
        rows = tensors["prompt_embeds"].shape[0]
        if rows == 0 or rows % TEXT_CHUNK_ROWS:
            raise CacheError(f"{path}: prompt_embeds has {rows} rows, not whole 77-token chunks; re-run caching")
        return {n: tensors[n] for n in (*ITEM_TENSORS, *OPTIONAL_ITEM_TENSORS) if n in tensors}

    def load_empty_embeddings(self) -> dict[str, torch.Tensor]:
        """prompt_embeds (77, D_ctx) and pooled_prompt_embeds (D_pool,) of the empty caption "",
        computed by the caching step with the same encoders: used for caption dropout."""
        path = self.root / EMPTY_FILE
        try:
            tensors = load_file(str(path), device="cpu")
        except FileNotFoundError:
            raise CacheError(f"{path}: missing empty-caption embeddings; re-run sdxl_process_data_dir.py") from None
        except Exception as exc:  # noqa: BLE001
            raise CacheError(f"{path}: damaged ({exc}); re-run sdxl_process_data_dir.py") from exc
        return {n: tensors[n] for n in EMPTY_TENSORS}


def open_dataset_cache(path: str | Path) -> DatasetCache:
    return DatasetCache(path)


def _walk_for_caches(top: Path) -> list[Path]:
    """Dataset cache folders below `top`, without descending into one (its items/ may hold millions of files)."""
    found = []
    for folder, dirnames, filenames in os.walk(top):
        if META_FILE in filenames:
            found.append(Path(folder))
            dirnames.clear()
    return found


def find_dataset_caches(paths: Sequence[str | Path]) -> list[Path]:
    """Each path may be a cache root (every dataset cache below it, found recursively) or one dataset's
    cache folder. Sorted, de-duplicated. Raises CacheError naming the path when a path holds none."""
    found: set[Path] = set()
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise CacheError(f"{path}: no such cache folder")
        roots = [path] if (path / META_FILE).is_file() else _walk_for_caches(path)
        if not roots:
            raise CacheError(f"{path}: holds no dataset cache ({META_FILE}); run sdxl_process_data_dir.py first")
        found.update(r.resolve() for r in roots)
    return sorted(found)
