"""Writing a dataset's cache (format: `sdxl_trainer.data.dataset.cache_format`): item records and the writer used by
the caching step and by tests that need a synthetic cache."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from sdxl_trainer.atomic_files import atomic_save_safetensors
from sdxl_trainer.data.cache_format import (
    EMPTY_FILE,
    CacheItem,
    fingerprint_parts,
    item_key,
    item_tensor_relpath,
    sha256_text,
    write_index_part,
    write_item_file,
    write_meta,
)


def make_record(
    image_relpath: str,
    caption: str,
    bucket_wh: tuple[int, int],
    original_size_hw: tuple[int, int],
    crop_top_left: tuple[int, int],
    fingerprint: dict,
    upscaled: bool = False,
    image_sha256: str = "",
    extra: dict | None = None,
    loss_mask: bool = False,
) -> dict:
    """A complete JSON record for an item (CacheItem's fields, plus fingerprint hashes and `extra`)."""
    key = item_key(image_relpath)
    bw, bh = bucket_wh
    if min(crop_top_left) < 0:
        raise ValueError(f"{image_relpath}: negative crop offset {crop_top_left}")
    image_fp, text_fp = fingerprint_parts(fingerprint)
    item = CacheItem(
        key=key,
        image_relpath=image_relpath,
        caption=caption,
        bucket_wh=(int(bw), int(bh)),
        original_size_hw=(int(original_size_hw[0]), int(original_size_hw[1])),
        crop_top_left=(int(crop_top_left[0]), int(crop_top_left[1])),
        target_size_hw=(int(bh), int(bw)),
        upscaled=bool(upscaled),
        image_sha256=image_sha256,
        caption_sha256=sha256_text(caption),
        tensor_file=item_tensor_relpath(key),
        loss_mask=bool(loss_mask),
    )
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(item).items()}
    record.update(image_fingerprint=image_fp, text_fingerprint=text_fp)
    record.update(extra or {})
    return record


class CacheWriter:
    """Writes one dataset's cache (or one --shard_index of it); `finalize()` makes it readable."""

    def __init__(
        self,
        root: str | Path,
        fingerprint: dict,
        name: str | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
    ):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.name = name or self.root.name
        self.shard_index, self.num_shards = shard_index, num_shards
        self.records: dict[str, dict] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    def write_empty_embeddings(self, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> None:
        tensors = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
        meta = {"text_fingerprint": fingerprint_parts(self.fingerprint)[1]}
        atomic_save_safetensors(self.root / EMPTY_FILE, tensors, meta)

    def write_item(
        self,
        image_relpath: str,
        caption: str,
        bucket_wh: tuple[int, int],
        original_size_hw: tuple[int, int],
        crop_top_left: tuple[int, int],
        tensors: dict[str, torch.Tensor],
        upscaled: bool = False,
        image_sha256: str = "",
        extra: dict | None = None,
    ) -> CacheItem:
        record = make_record(
            image_relpath, caption, bucket_wh, original_size_hw, crop_top_left, self.fingerprint, upscaled,
            image_sha256, extra, loss_mask="loss_mask" in tensors,
        )  # fmt: skip
        write_item_file(self.root, record, tensors)
        self.add_record(record)
        return CacheItem.from_record(record)

    def add_record(self, record: dict) -> None:
        """Include an item whose file is already on disk (reused from an earlier run)."""
        self.records[record["key"]] = record

    def finalize(self) -> None:
        write_meta(self.root, self.name, self.fingerprint)
        write_index_part(self.root, self.shard_index, self.num_shards, self.fingerprint, self.records.values())
