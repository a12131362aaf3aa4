"""The caching step: image/caption folder -> latents and text embeddings per aspect bucket (sdxl_trainer.atomic_files).

Per process: discover the items, keep this process's share (by key: --shard_index of --num_shards, then
RANK of WORLD_SIZE), reuse every item whose image bytes, caption and settings are unchanged (no model is
loaded when nothing changed), decode and resize the rest in DataLoader workers, encode them in batches on
the GPU and write each item atomically. At the end one process per shard writes the index part and the
report. A killed run resumes from the item files already written.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.caching.encoders import resolve_device
from sdxl_trainer.caching.file_hashing import HASH_MEMO_FILE, FileHasher
from sdxl_trainer.caching.fingerprint import build_fingerprint
from sdxl_trainer.caching.pipeline import Pipeline, UpscalerFactory, Work
from sdxl_trainer.caching.report import finish_shard, print_report
from sdxl_trainer.data import cache_format, cache_writer, masks
from sdxl_trainer.data.buckets import extreme_aspect, plan_item
from sdxl_trainer.data.images import (
    DataItem,
    ImageSkip,
    as_rgb,
    discover_items,
    load_oriented,
    region_to_upscale,
    render_to_bucket,
    upscale_region_box,
)
from sdxl_trainer.models.loading import ModelLoadError


class CachingError(RuntimeError):
    """A user-facing failure (a model that does not load, an unusable cache folder); names the flag."""


class ImageJobs(Dataset):
    """DataLoader side: read, hash, decode, plan and resize one image (runs in worker processes)."""

    def __init__(self, works: list[Work], args: CachingArgs):
        self.works, self.args = works, args

    def __len__(self) -> int:
        return len(self.works)

    def __getitem__(self, index: int) -> dict:
        try:
            return self._load(index)
        except Exception as exc:  # noqa: BLE001 - one bad file must not end the run: skip it, say why
            return {"index": index, "skip": f"failed to prepare: {type(exc).__name__}: {exc}"}

    def _load(self, index: int) -> dict:
        work, args = self.works[index], self.args
        out: dict = {"index": index}
        try:
            data = work.item.image_path.read_bytes()
        except OSError as exc:
            return {**out, "skip": f"unreadable: {exc.strerror or exc}"}
        out["sha"] = hashlib.sha256(data).hexdigest()
        if out["sha"] == work.known_sha:
            return {**out, "unchanged": True}  # touched (mtime) but the same bytes: nothing to encode
        try:
            oriented = load_oriented(work.item.image_path, args.max_image_pixels, data=data)
            image = as_rgb(oriented)
        except ImageSkip as exc:
            return {**out, "skip": str(exc)}
        extreme = extreme_aspect(*image.size)
        if extreme:
            return {**out, "skip": extreme}
        plan = plan_item(*image.size, args.min_resolution, args.max_resolution, args.upscale_to_resolution,
                         args.upscale_min_factor)  # fmt: skip
        if plan is None:
            return {**out, "skip": f"too small: {image.width}x{image.height} (below --min_resolution "
                                   f"{args.min_resolution} after flooring to 64 px)"}  # fmt: skip
        try:
            weights = self._mask_weights(work, oriented)
        except (ImageSkip, ValueError) as exc:
            return {**out, "skip": str(exc)}
        if weights is not None:
            box = upscale_region_box(image.size, plan) if plan.use_upscaler else None  # the pixels' own box
            out["loss_mask"] = masks.mask_to_latent(weights, plan, box).to(torch.float16)
            out["mask_source"] = "file" if work.item.mask_path is not None else "alpha"
        pixels = region_to_upscale(image, plan) if plan.use_upscaler else render_to_bucket(image, plan)
        return {**out, "plan": plan, "pixels": torch.from_numpy(np.asarray(pixels, dtype=np.uint8).copy())}

    def _mask_weights(self, work: Work, oriented: Image.Image) -> Image.Image | None:
        """The item's loss weights at image size: its mask file, else (--alpha_mask) its alpha channel, else None."""
        if work.item.mask_path is not None:
            name = work.item.mask_path.name
            try:
                mask = load_oriented(work.item.mask_path, self.args.max_image_pixels)
            except ImageSkip as exc:
                raise ImageSkip(f"mask {name}: {exc}") from exc
            masks.check_mask_size(mask, oriented.size, name)
            return masks.mask_weights(mask)
        if self.args.alpha_mask:
            alpha = masks.alpha_channel(oriented)
            return None if alpha is None else masks.mask_weights(alpha)
        return None


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(resolve_device())
        # Ranks meet only at the end; a long caching run must not hit the default 30-minute timeout there.
        dist.init_process_group(backend, timeout=datetime.timedelta(days=7))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _mine(key: str, args: CachingArgs, rank: int, world: int) -> bool:
    # Shard by the first 8 hex digits, rank by the next 8: independent, so every rank of a shard gets work.
    return cache_format.shard_of_key(key, args.num_shards) == args.shard_index and int(key[8:16], 16) % world == rank


def classify(items: list[DataItem], root: Path, fingerprint: dict, args: CachingArgs):
    """Split this process's items into (image work, caption-only work, reused records, skipped, repaired).

    An item file of another format version is re-encoded. With --verify_hashes every reused item file is checked
    (checksum and values) and re-encoded when it fails; a file whose caption half is about to be replaced is always
    checked, since its image half is copied into the new file. Failed files are listed in `repaired`."""
    image_fp, text_fp = cache_format.fingerprint_parts(fingerprint)
    image_work, text_work, reused, skipped, repaired = [], [], [], [], []
    for item in items:
        key = cache_format.item_key(item.relpath)
        try:
            stat = item.image_path.stat()
        except OSError as exc:  # vanished since discovery, or a broken symlink
            skipped.append((item.relpath, f"unreadable: {exc.strerror or exc}"))
            continue
        path = root / cache_format.item_tensor_relpath(key)
        old = cache_format.read_item_record(path)
        if old is not None and (
            old.get("key") != key
            or old.get("image_relpath") != item.relpath
            or old.get("format_version") != cache_format.CACHE_FORMAT_VERSION
        ):
            old = None
        image_ok = old is not None and old.get("image_fingerprint") == image_fp
        text_ok = old is not None and old.get("text_fingerprint") == text_fp
        text_ok = text_ok and old.get("caption_sha256") == cache_format.sha256_text(item.caption)
        if old is not None and (args.verify_hashes or (image_ok and not text_ok)):
            problem = cache_format.verify_item_file(path)
            if problem:
                repaired.append((item.relpath, problem))
                old, image_ok, text_ok = None, False, False
        file_stat = (stat.st_size, stat.st_mtime_ns)
        # Same size and mtime as when it was encoded: the bytes are taken as unchanged (as make and rsync
        # do); --verify_hashes re-hashes anyway. A changed stat is re-hashed in a worker before re-encoding.
        same_stat = image_ok and (old.get("image_size_bytes"), old.get("image_mtime_ns")) == file_stat
        # A mask file added, removed or touched re-encodes the item (its latents with it: simple and rare).
        mask_stat = _mask_stat(item)
        mask_ok = old is not None and old.get("mask_stat") == mask_stat
        image_ok = image_ok and mask_ok
        same_stat = same_stat and mask_ok
        work = Work(item, key, old, old["image_sha256"] if image_ok else None, text_ok, file_stat, mask_stat)
        if not same_stat or args.verify_hashes:
            image_work.append(work)
        elif text_ok:
            reused.append(old)
        else:
            text_work.append(work)
    return image_work, text_work, reused, skipped, repaired


def _mask_stat(item: DataItem) -> list[int] | None:
    """(size bytes, mtime ns) of the item's mask file, None without one (as stored in the record)."""
    if item.mask_path is None:
        return None
    try:
        stat = item.mask_path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _default_upscaler(args: CachingArgs, device: torch.device):
    from sdxl_trainer.upscaling.model_files import UpscalerError
    from sdxl_trainer.upscaling.upscaler import Upscaler

    try:
        return Upscaler(
            args.upscaler_model,
            face_restore_model_path=args.face_restore_model if args.upscale_use_GFPGAN else None,
            device=device,
            half=device.type == "cuda" and args.mixed_precision != "no",
            model_flag="--upscaler_model",  # our flag names in its error messages
            face_restore_flag="--face_restore_model",
        )
    except UpscalerError as exc:
        raise CachingError(str(exc)) from exc


def run_caching(
    args: CachingArgs,
    upscaler_factory: UpscalerFactory | None = None,
    stop_after: int | None = None,
    *,
    batch_on_cpu: bool = False,
):
    """Cache `args.data_dir`. Returns the shard's report on process 0 (this process's summary elsewhere);
    process 0 of each shard writes the index part and report.json. `upscaler_factory(args, device)` replaces
    the real upscaler (tests); `stop_after` interrupts after that many encoded items, as a kill would (tests);
    `batch_on_cpu` batches on CPU too, as on a GPU (tests of the batching path).
    Raises CachingArgsError for bad flags and CachingError for models or folders that cannot be used."""
    args.validate()
    try:
        return _run(args, upscaler_factory, stop_after, batch_on_cpu)
    except (ModelLoadError, cache_format.CacheError, OSError) as exc:
        raise CachingError(str(exc)) from exc


def _run(args: CachingArgs, upscaler_factory: UpscalerFactory | None, stop_after: int | None, batch_on_cpu: bool):
    started = time.perf_counter()
    rank, world = _dist_info()
    torch.manual_seed(args.seed)
    root = args.dataset_cache_dir
    root.mkdir(parents=True, exist_ok=True)
    hasher = FileHasher(root / HASH_MEMO_FILE)
    fingerprint = build_fingerprint(args, hasher)
    if rank == 0:
        hasher.save()
    items, skipped = discover_items(Path(args.data_dir))
    mine = [i for i in items if _mine(cache_format.item_key(i.relpath), args, rank, world)]
    skipped = [s for s in skipped if _mine(cache_format.item_key(s[0]), args, rank, world)]
    image_works, text_only, reused, unreadable, repaired = classify(mine, root, fingerprint, args)
    skipped += unreadable
    for relpath, problem in repaired:
        print(f"re-encoding {relpath}: {problem}", flush=True)
    device = resolve_device()
    pipe = Pipeline(args, root, fingerprint, device, upscaler_factory or _default_upscaler, batch_on_cpu)
    pipe.records.extend(reused)
    workers = args.resolved_num_workers(world)
    # Enough prefetched items that a whole batch is ready when the GPU finishes the previous one.
    prefetch = max(2, -(-2 * pipe.batch_size // workers)) if workers else None
    loader = DataLoader(ImageJobs(image_works, args), batch_size=None, shuffle=False, num_workers=workers,
                        prefetch_factor=prefetch, persistent_workers=False)  # fmt: skip
    pending: dict[tuple[int, int], list] = defaultdict(list)
    done = touched = 0
    progress = tqdm(total=len(image_works), unit="img", desc="caching", disable=rank != 0 or not image_works)
    try:
        for job in loader:
            work = image_works[job["index"]]
            progress.update(1)
            if "skip" in job:
                skipped.append((work.item.relpath, job["skip"]))
            elif job.get("unchanged"):
                if work.text_ok:
                    pipe.records.append(_touch(work))
                    touched += 1
                else:
                    text_only.append(work)
            else:
                if job["plan"].use_upscaler:
                    region = Image.fromarray(job["pixels"].numpy())
                    upscaled = pipe.upscale(work, region, job["plan"])
                    job["pixels"] = torch.from_numpy(np.asarray(upscaled, dtype=np.uint8).copy())
                bucket = pending[job["plan"].bucket_wh]
                bucket.append((work, job))
                if len(bucket) >= pipe.batch_size:
                    pipe.submit(list(bucket))
                    done += len(bucket)
                    bucket.clear()
            if stop_after is not None and done >= stop_after:
                raise KeyboardInterrupt(f"stopped after {done} items (test)")
        for bucket in pending.values():
            for start in range(0, len(bucket), pipe.batch_size):
                pipe.submit(bucket[start : start + pipe.batch_size])
        for start in range(0, len(text_only), pipe.batch_size):
            pipe.submit([(w, {}) for w in text_only[start : start + pipe.batch_size]])
        if rank == 0:
            _ensure_empty_embeddings(root, fingerprint, pipe)
    except BaseException as exc:
        progress.close()
        # Ctrl-C: finish the batch already encoded; any other failure: keep what is written, nothing more.
        pipe.close(finish_in_flight=isinstance(exc, KeyboardInterrupt))
        raise
    progress.close()
    pipe.close()
    skipped += pipe.skipped
    ended = time.perf_counter()
    seconds = ended - started
    steady = None
    if pipe.first_batch is not None and pipe.encoded_images > pipe.first_batch[1]:
        # Throughput after the first batch: model loading and warm-up excluded (what a long run sees).
        steady = (pipe.encoded_images - pipe.first_batch[1]) / (ended - pipe.first_batch[0])
    summary = {
        "records": pipe.records,
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "repaired": [{"path": p, "reason": r} for p, r in repaired],
        "encoded": len(pipe.records) - len(reused) - touched,
        "reused": len(reused) + touched,
        "seconds": seconds,
        "images_per_second": (len(pipe.records) - len(reused) - touched) / seconds,
        "steady_images_per_second": steady,
    }
    report = finish_shard(root, args, fingerprint, summary, rank, world)
    if report is not None:
        print_report(report, root)
    return report if report is not None else summary


def _touch(work: Work) -> dict:
    """An item whose mtime changed but whose bytes did not: same record, new file stat."""
    return dict(work.old, image_size_bytes=work.stat[0], image_mtime_ns=work.stat[1])


def _ensure_empty_embeddings(root: Path, fingerprint: dict, pipe: Pipeline) -> None:
    """The empty caption's embeddings (caption dropout), from the same encoders; only when missing or stale."""
    path = root / cache_format.EMPTY_FILE
    text_fp = cache_format.fingerprint_parts(fingerprint)[1]
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("text_fingerprint") == text_fp:
                return
    except Exception:  # noqa: BLE001 - missing or damaged: compute it
        pass
    prompt, pooled, _, _ = pipe.encoders.encode_texts([""])
    pipe.mark_writing()
    cache_writer.CacheWriter(root, fingerprint).write_empty_embeddings(prompt[0], pooled[0])
