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
    WRITING_SUFFIX,
    BadItemError,
    CacheError,
    CacheItem,
    _read_index_part,
    check_item_tensors,
    fingerprint_parts,
    read_meta,
    short,
)


class DatasetCache:
    """One dataset's cache folder, opened for reading (items sorted by key, identical on every rank)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        meta = read_meta(self.root)
        self.name: str = meta["name"]
        self.fingerprint: dict = meta["fingerprint"]
        records = self._read_index(meta)
        self.items: list[CacheItem] = [CacheItem.from_record(r) for r in records]
        # What each item file must hold, as the index (not the file) says: a file rewritten by a later,
        # unfinished caching run fails this check instead of being read with the old captions and time ids.
        self.records: dict[str, dict] = {r["key"]: r for r in records}

    def _read_index(self, meta: dict) -> list[dict]:
        writing = sorted((self.root / INDEX_DIR).glob(f"*{WRITING_SUFFIX}"))
        if writing:
            raise CacheError(
                f"{self.root}: a caching run was interrupted while rewriting it ({writing[0].name}), so its index no "
                "longer matches the item files; re-run sdxl_process_data_dir.py with the same flags to complete it"
            )
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
        time). Stored in the caching run's --cache_dtype (float16 by default): cast as needed. Every read checks
        the index's checksum and the values (bench/bench_cache_checks.py: a small fraction of a step) and raises
        BadItemError naming the item when they fail."""
        path = self.root / item.tensor_file
        try:
            tensors = load_file(str(path), device="cpu")
        except FileNotFoundError:
            raise BadItemError(f"{item.image_relpath} ({path}): missing item file") from None
        except Exception as exc:  # noqa: BLE001 - a damaged header can make safetensors print megabytes
            raise BadItemError(f"{item.image_relpath} ({path}): damaged item file ({short(exc)})") from None
        check_item_tensors(self.records[item.key], tensors, path)
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
