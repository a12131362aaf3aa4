"""The device side of caching: upscale where planned, encode batches of one bucket, hand items to writers.

On a GPU one batch is in flight while the next is prepared: `submit()` queues the encoders' kernels and
non-blocking copies back to pinned host memory, then finishes the *previous* batch (whose results have
arrived meanwhile) by building its records and queueing its files on two writer threads. So the GPU is
not idle while the host stacks pixels, tokenizes captions and writes files. On CPU everything is
synchronous and, unless asked otherwise, one item per batch: results do not depend on batch composition.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from sdxl_trainer.caching import text_chunks
from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.caching.encoders import Encoders
from sdxl_trainer.data import cache_format, cache_writer
from sdxl_trainer.data.images import DataItem

UpscalerFactory = Callable[[CachingArgs, torch.device], object]


@dataclass
class Work:
    """One item this process is responsible for, and what must be (re)computed for it."""

    item: DataItem
    key: str
    old: dict | None  # the record of the existing item file, if any
    known_sha: str | None  # image sha256 that would make the old latents reusable
    text_ok: bool  # the old embeddings match the caption and the text settings
    stat: tuple[int, int]  # (size bytes, mtime ns) of the image file
    mask_stat: list[int] | None = None  # (size bytes, mtime ns) of its mask file, if any (`data.masks`)


@dataclass
class InFlight:
    batch: list[tuple[Work, dict]]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # host tensors, rows per image/text index
    image_rows: dict[int, int] = field(default_factory=dict)  # batch index -> row in latent outputs
    text_rows: dict[int, int] = field(default_factory=dict)  # batch index -> row in text outputs
    token_counts: dict[int, int] = field(default_factory=dict)
    chunk_counts: dict[int, int] = field(default_factory=dict)  # batch index -> text chunks (77 rows each)
    done: torch.cuda.Event | None = None


class Pipeline:
    def __init__(self, args, root: Path, fingerprint: dict, device: torch.device, upscaler_factory: UpscalerFactory,
                 batch_on_cpu: bool = False):  # fmt: skip
        self.args, self.root, self.fingerprint, self.device = args, root, fingerprint, device
        self.encoders = Encoders(args, device)
        self.upscaler_factory = upscaler_factory
        self._upscaler = None
        self.batch_size = args.batch_size if device.type == "cuda" or batch_on_cpu else 1
        self.writer = ThreadPoolExecutor(max_workers=2)
        self.pending_writes: list = []
        self.records: list[dict] = []
        self.skipped: list[tuple[str, str]] = []  # (relpath, reason): encoded to unusable values
        self._marked = False
        self.encoded_images = 0
        self.first_batch: tuple[float, int] | None = None  # (time, images) when the first batch was finished
        self.in_flight: InFlight | None = None

    def upscale(self, work: Work, region: Image.Image, plan) -> Image.Image:
        if self._upscaler is None:
            self._upscaler = self.upscaler_factory(self.args, self.device)
        result = self._upscaler.upscale(region, plan.bucket_wh)
        if result.size != plan.bucket_wh:
            result = result.resize(plan.bucket_wh, Image.Resampling.LANCZOS)
        if self.args.save_upscale_samples:
            folder = Path(self.args.save_upscale_samples)
            folder.mkdir(parents=True, exist_ok=True)
            stem = work.item.relpath.replace("/", "__")
            region.save(folder / f"{stem}_org.jpg", quality=92)
            result.save(folder / f"{stem}_upscaled.jpg", quality=92)
        return result.convert("RGB")

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    def submit(self, batch: list[tuple[Work, dict]]) -> None:
        """Start encoding `batch` (items of one bucket), then finish the batch submitted before it."""
        flight = InFlight(batch)
        # Text first: the encoders' many small kernels are launched while the GPU still runs the previous batch;
        # the VAE's few long kernels go last, so the GPU has work queued while the host gathers the next batch
        # (in the other order the host waited on a full launch queue behind the VAE, then the GPU waited for it).
        need_text = [i for i, (work, _) in enumerate(batch) if not work.text_ok]
        if need_text:
            captions = [batch[i][0].item.caption for i in need_text]
            prompt, pooled, counts, chunks = self.encoders.encode_texts(captions)
            flight.outputs.update(prompt_embeds=self._to_host(prompt), pooled_prompt_embeds=self._to_host(pooled))
            flight.text_rows = {i: row for row, i in enumerate(need_text)}
            flight.token_counts = {i: counts[row] for row, i in enumerate(need_text)}
            flight.chunk_counts = {i: chunks[row] for row, i in enumerate(need_text)}
        with_pixels = [i for i, (_, job) in enumerate(batch) if "pixels" in job]
        if with_pixels:
            images = [batch[i][1]["pixels"] for i in with_pixels]  # (H, W, 3) each
            pinned = self.device.type == "cuda"  # stacked straight into page-locked memory: one copy, not two
            pixels = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=pinned)
            torch.stack(images, out=pixels)
            mean, std = self.encoders.encode_images(pixels)
            flight.outputs.update(latent_mean=self._to_host(mean), latent_std=self._to_host(std))
            flight.image_rows = {i: row for row, i in enumerate(with_pixels)}
        if self.device.type == "cuda":
            flight.done = torch.cuda.Event()
            flight.done.record()
        previous, self.in_flight = self.in_flight, flight
        if previous is not None:
            self._complete(previous)
        if self.device.type != "cuda":
            self.drain()

    def drain(self) -> None:
        """Finish the batch in flight, if any."""
        if self.in_flight is not None:
            flight, self.in_flight = self.in_flight, None
            self._complete(flight)

    def _complete(self, flight: InFlight) -> None:
        if flight.done is not None:
            flight.done.synchronize()
        for i, (work, job) in enumerate(flight.batch):
            tensors = {}
            if i in flight.image_rows:
                tensors.update({n: flight.outputs[n][flight.image_rows[i]] for n in ("latent_mean", "latent_std")})
                if "loss_mask" in job:  # computed with the pixels, on the host
                    tensors["loss_mask"] = job["loss_mask"]
            if i in flight.text_rows:
                row = flight.text_rows[i]
                # Each caption keeps only its own chunks: the batch was padded to its longest caption.
                rows = flight.chunk_counts[i] * text_chunks.CHUNK_TOKENS
                tensors["prompt_embeds"] = flight.outputs["prompt_embeds"][row, :rows].clone()
                tensors["pooled_prompt_embeds"] = flight.outputs["pooled_prompt_embeds"][row]
            self._finish(work, job, tensors, flight.token_counts.get(i))
        self.encoded_images += len(flight.image_rows)
        if self.first_batch is None and flight.image_rows:
            self.first_batch = (time.perf_counter(), self.encoded_images)

    def _finish(self, work: Work, job: dict, tensors: dict, token_count: int | None) -> None:
        """Build the item's record, take the unchanged half from its old file, queue the write."""
        old = work.old
        plan = job.get("plan")
        missing = [n for n in cache_format.ITEM_TENSORS if n not in tensors]
        if missing:  # classify() checked this file (checksum and values) before reusing half of it
            previous = load_file(str(self.root / old["tensor_file"]))
            tensors.update({n: previous[n] for n in missing})
            if plan is None:  # caption-only update: the image side, its mask included, stays as it was
                tensors.update({n: previous[n] for n in cache_format.OPTIONAL_ITEM_TENSORS if n in previous})
        if plan is not None:
            geometry = {
                "bucket_wh": plan.bucket_wh,
                "original_size_hw": plan.original_size_hw,
                "crop_top_left": plan.crop_top_left,
                "upscaled": plan.use_upscaler,
            }
            extra = {"source_wh": list(plan.source_wh), "category_key": plan.category_key}
            extra.update(mask_stat=work.mask_stat, mask_source=job.get("mask_source"))
        else:  # caption-only update: the image side is unchanged
            geometry = {k: old[k] for k in ("bucket_wh", "original_size_hw", "crop_top_left", "upscaled")}
            extra = {k: old.get(k) for k in ("source_wh", "category_key", "mask_stat", "mask_source")}
        if token_count is None and old is not None:
            token_count = old.get("caption_tokens")
        notes = [work.item.caption_note] if work.item.caption_note else []
        limit = text_chunks.max_chunks(self.args.max_token_length)
        truncated = token_count is not None and text_chunks.is_truncated(token_count, limit)
        if truncated:
            notes.append(
                f"caption is {token_count} tokens: truncated to {limit * text_chunks.CONTENT_TOKENS} "
                f"(--max_token_length {self.args.max_token_length})"
            )
        extra.update(
            image_size_bytes=work.stat[0], image_mtime_ns=work.stat[1], caption_tokens=token_count,
            caption_truncated=truncated, caption_notes=notes, text_rows=int(tensors["prompt_embeds"].shape[0]),
        )  # fmt: skip
        problem = cache_format.value_problem(tensors)
        if problem:  # e.g. an fp16 overflow in an encoder: never cached, named in the report
            self.skipped.append((work.item.relpath, f"encoded to unusable values: {problem}"))
            return
        sha = job.get("sha") or old["image_sha256"]
        record = cache_writer.make_record(
            work.item.relpath,
            work.item.caption,
            fingerprint=self.fingerprint,
            image_sha256=sha,
            extra=extra,
            loss_mask="loss_mask" in tensors,
            **geometry,
        )
        self.records.append(record)
        self.mark_writing()
        self.pending_writes.append(self.writer.submit(cache_format.write_item_file, self.root, record, tensors))
        if len(self.pending_writes) > 64:
            self.pending_writes.pop(0).result()  # bound memory; surface write errors early

    def mark_writing(self) -> None:
        """Before this run's first write: the index part no longer matches the items until the run ends."""
        if not self._marked:
            cache_format.mark_writing(self.root, self.args.shard_index, self.args.num_shards)
            self._marked = True

    def close(self, finish_in_flight: bool = True) -> None:
        """Finish (or drop, after a failure) the batch in flight and wait for every queued write."""
        try:
            if finish_in_flight:
                self.drain()
        finally:
            for future in self.pending_writes:
                future.result()
            self.writer.shutdown()
