"""The on-disk cache of VAE latents and text embeddings: one format, written by caching, read by training.

Layout of one dataset's cache folder (`<cache_dir>/<basename>/`), every path inside it relative:

    cache.json                          format version, dataset name, settings fingerprint
    empty_embeddings.safetensors        prompt_embeds / pooled_prompt_embeds of the empty caption ""
    items/<k[:2]>/<key>.safetensors     one file per item (256 sub-folders: a million items stay listable)
    index/shard-SSSSS-of-NNNNN.jsonl    one index part per --shard_index; the reader takes the union
    report.json                         what the last caching run cached and skipped (not read here)

Every item file holds four tensors (and those of OPTIONAL_ITEM_TENSORS it has) and, in its safetensors
header, the item's full JSON record, so a killed run can be resumed from the item files alone (the index parts
are written at the end of a run). Files are written to a temporary name in the same folder and moved into place
with `os.replace`, so a reader never sees half a file. Nothing is pickled; reading needs neither a GPU nor code
execution.

Integrity (format 2): each record holds `tensor_sha256`, a checksum over all of the item's tensors (names,
dtypes, shapes, bytes) computed when it is written, and the reader checks it, with the values (finite and
inside fp16's range), on every read: a flipped byte, a NaN or a saturated item is named and refused, never
trained. A caching run marks each index part it is about to change with `index/<part>.writing` before it
writes its first item file and removes the mark after the new index part is in place, so a run killed
half-way leaves a cache the trainer refuses (re-running caching completes it) rather than item files of the
new run read with captions and hashes of the old index; the checksum in the index also refuses any item
file that does not belong to it.

Latents: we store the VAE posterior's mean and standard deviation, both multiplied by the VAE scaling
factor, instead of one sample. The trainer draws `latent_mean + latent_std * randn` afresh every epoch
(the seed reused a single sample for all epochs, B41), and the cache itself stays deterministic: the same
data and settings give the same bytes, whatever the number of processes.

Freshness: each record carries the sha256 of the image bytes and of the caption text, plus hashes of the
two halves of the settings fingerprint (`fingerprint["image"]`: VAE, resolutions, upscaler...;
`fingerprint["text"]`: tokenizers and text encoders). The caching step re-encodes only what changed.

Writer API (`data.cache_writer`, also for tests that need a synthetic cache; the reader is `data.cache_reader`):

    writer = CacheWriter(tmp / "cache" / "mydata", fingerprint={"image": {...}, "text": {...}})
    writer.write_empty_embeddings(prompt_embeds, pooled_prompt_embeds)
    writer.write_item("a/b.png", "a caption", bucket_wh=(64, 96), original_size_hw=(96, 64),
                      crop_top_left=(0, 0), tensors={"latent_mean": ..., "latent_std": ...,
                      "prompt_embeds": ..., "pooled_prompt_embeds": ...})
    writer.finalize()          # writes the index part (and cache.json); then open_dataset_cache() reads it
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open

from sdxl_trainer.atomic_files import _atomic_write_bytes, atomic_save_safetensors, atomic_write_json

CACHE_FORMAT_VERSION = 2  # 2: per-item tensor checksums, in-progress marks


META_FILE = "cache.json"


EMPTY_FILE = "empty_embeddings.safetensors"


INDEX_DIR = "index"


ITEMS_DIR = "items"


ITEM_TENSORS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")


# Present in some items only; a reader returns those an item has. loss_mask: (1, H/8, W/8) weights in [0, 1]
# at latent resolution (`data.masks`); the record's `loss_mask` field says whether the item has one.
OPTIONAL_ITEM_TENSORS = ("loss_mask",)


# prompt_embeds has one or more CLIP chunks of this many rows (`caching.text_chunks`, --max_token_length).
TEXT_CHUNK_ROWS = 77


EMPTY_TENSORS = ("prompt_embeds", "pooled_prompt_embeds")


_RECORD_KEY = "sdxl_trainer.record"


WRITING_SUFFIX = ".writing"


# A cached value at or beyond fp16's largest finite number means an overflow somewhere (encoder in fp16,
# saturating cast): such an item would train on garbage, so it is refused like a NaN.
MAX_ABS_VALUE = 65504.0


class CacheError(RuntimeError):
    """The cache is missing, stale, incomplete or damaged; the message names the path and what to do."""


class BadItemError(CacheError):
    """One item's file is damaged, does not match its index record or holds unusable values."""


@dataclass(frozen=True)
class CacheItem:
    key: str
    image_relpath: str
    caption: str
    bucket_wh: tuple[int, int]
    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size_hw: tuple[int, int]
    upscaled: bool
    image_sha256: str
    caption_sha256: str
    tensor_file: str
    loss_mask: bool = False  # the item file holds a `loss_mask` tensor (absent from records of older caches)

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """(orig_h, orig_w, crop_top, crop_left, target_h, target_w): SDXL's order."""
        return (*self.original_size_hw, *self.crop_top_left, *self.target_size_hw)

    @classmethod
    def from_record(cls, record: dict) -> CacheItem:
        """Build from a JSON record (extra keys, such as fingerprint hashes, are ignored)."""
        values = {}
        for f in fields(cls):
            if f.name not in record and f.default is not MISSING:
                continue
            v = record[f.name]
            values[f.name] = tuple(int(x) for x in v) if isinstance(v, list) else v
        return cls(**values)


def item_key(image_relpath: str) -> str:
    """Stable id of an item: the first 32 hex digits of sha256 of its POSIX path relative to the data folder."""
    return hashlib.sha256(image_relpath.encode("utf-8")).hexdigest()[:32]


def item_tensor_relpath(key: str) -> str:
    return f"{ITEMS_DIR}/{key[:2]}/{key}.safetensors"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_hash(value: object) -> str:
    """Order-independent hash of a JSON-serialisable settings dict."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def fingerprint_parts(fingerprint: dict) -> tuple[str, str]:
    """(image_fingerprint, text_fingerprint) hashes; a flat dict counts as both halves."""
    image = fingerprint.get("image", fingerprint)
    text = fingerprint.get("text", fingerprint)
    return fingerprint_hash(image), fingerprint_hash(text)


def shard_of_key(key: str, num_shards: int) -> int:
    """Deterministic item -> shard assignment, the same on every machine and every run."""
    return int(key[:8], 16) % num_shards


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (names sorted): what the item file must hold."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def value_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """Why these tensors must not be trained (non-finite or saturated values), or None when they are fine.

    One max of |x| per tensor in fp32: NaN and inf propagate through it, so the common case costs one pass (fp16
    elementwise kernels, isfinite included, are ~100x slower on a CPU; bench/bench_cache_checks.py)."""
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point() or not t.numel():
            continue
        peak = float(t.float().abs().max())
        if not math.isfinite(peak):
            bad = int((~torch.isfinite(t)).sum())  # only on the error path: name how many
            return f"{name} has {bad} non-finite values (NaN/inf)"
        if peak >= MAX_ABS_VALUE:
            return f"{name} has values of {peak:g} (at or beyond fp16's limit {MAX_ABS_VALUE:g}: an overflow)"
    return None


def write_item_file(root: Path, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one item's tensors with its record in the header (atomically). Refuses unusable values (naming the
    item) and adds the tensors' checksum to `record` (the same dict goes into the index)."""
    missing = [n for n in ITEM_TENSORS if n not in tensors]
    if missing:
        raise ValueError(f"item {record.get('image_relpath')}: missing tensors {missing}")
    problem = value_problem(tensors)
    if problem:
        raise BadItemError(f"{record.get('image_relpath')}: {problem}; not cached")
    record["format_version"] = CACHE_FORMAT_VERSION
    record["tensor_sha256"] = tensor_checksum(tensors)
    atomic_save_safetensors(root / record["tensor_file"], tensors, {_RECORD_KEY: json.dumps(record)})


def check_item_tensors(record: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Raise BadItemError naming the item when the tensors are not those its record was written with, lack a
    required tensor, do not fit its bucket or hold unusable values."""
    name = f"{record.get('image_relpath')} ({path})"
    missing = [n for n in ITEM_TENSORS if n not in tensors]
    if missing:
        raise BadItemError(f"{name}: missing tensors {missing}")
    expected = record.get("tensor_sha256")
    if not expected or tensor_checksum(tensors) != expected:
        raise BadItemError(f"{name}: the tensors fail their checksum (damaged, or not the file the index lists)")
    bw, bh = record["bucket_wh"]
    if tuple(tensors["latent_mean"].shape[1:]) != (bh // 8, bw // 8):
        raise BadItemError(f"{name}: tensors do not match the item's bucket {bw}x{bh}")
    mask = tensors.get("loss_mask")
    if mask is not None and tuple(mask.shape) != (1, bh // 8, bw // 8):
        raise BadItemError(f"{name}: loss_mask does not match the item's bucket {bw}x{bh}")
    rows = tensors["prompt_embeds"].shape[0]
    if rows == 0 or rows % TEXT_CHUNK_ROWS:
        raise BadItemError(f"{name}: prompt_embeds has {rows} rows, not whole 77-token chunks")
    problem = value_problem(tensors)
    if problem:
        raise BadItemError(f"{name}: {problem}")


def short(exc: BaseException, limit: int = 160) -> str:
    """An exception's message cut to one short line (a damaged safetensors header can be megabytes)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def writing_mark(root: Path, shard_index: int, num_shards: int) -> Path:
    return Path(root) / INDEX_DIR / (index_part_name(shard_index, num_shards) + WRITING_SUFFIX)


def mark_writing(root: Path, shard_index: int, num_shards: int) -> None:
    """Say, before the first item file of a run changes, that this index part is being rewritten."""
    mark = writing_mark(root, shard_index, num_shards)
    if not mark.exists():
        mark.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(mark, b"a caching run is writing this part; the index does not match the items yet\n")


def read_item_record(path: Path) -> dict | None:
    """The JSON record stored in an item file's header, or None when the file is absent or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if not all(n in f.keys() for n in ITEM_TENSORS):
                return None
        return json.loads(meta[_RECORD_KEY])
    except Exception:  # noqa: BLE001 - a damaged file is simply recomputed
        return None


def verify_item_file(path: Path) -> str | None:
    """Why the item file at `path` fails its own record's checksum or value check (None when it passes)."""
    record = read_item_record(path)
    if record is None:
        return "unreadable item file or header"
    try:
        from safetensors.torch import load_file

        check_item_tensors(record, load_file(str(path)), path)
    except BadItemError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001
        return f"unreadable ({short(exc)})"
    return None


def read_meta(root: Path) -> dict:
    path = Path(root) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{root}: not a dataset cache ({META_FILE} missing); run sdxl_process_data_dir.py") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable ({exc}); delete it and re-run sdxl_process_data_dir.py") from exc
    version = meta.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"{root}: cache format version {version}, this code reads version {CACHE_FORMAT_VERSION}; "
            "re-run sdxl_process_data_dir.py on the data to rebuild it"
        )
    return meta


def write_meta(root: Path, name: str, fingerprint: dict) -> None:
    atomic_write_json(
        Path(root) / META_FILE, {"format_version": CACHE_FORMAT_VERSION, "name": name, "fingerprint": fingerprint}
    )


def index_part_name(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}.jsonl"


def write_index_part(root: Path, shard_index: int, num_shards: int, fingerprint: dict, records: Iterable[dict]):
    """Write this shard's index part and remove parts left by runs with a different --num_shards."""
    header = {"format_version": CACHE_FORMAT_VERSION, "shard_index": shard_index, "num_shards": num_shards}
    header["fingerprint"] = fingerprint
    lines = [json.dumps(header, ensure_ascii=False)]
    lines += [json.dumps(r, ensure_ascii=False) for r in sorted(records, key=lambda r: r["key"])]
    index_dir = Path(root) / INDEX_DIR
    _atomic_write_bytes(index_dir / index_part_name(shard_index, num_shards), ("\n".join(lines) + "\n").encode())
    for old in index_dir.glob("shard-*-of-*.jsonl*"):
        if f"-of-{num_shards:05d}.jsonl" not in old.name:
            old.unlink(missing_ok=True)
    writing_mark(root, shard_index, num_shards).unlink(missing_ok=True)


def _read_index_part(path: Path) -> tuple[dict, list[dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        return header, [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, ValueError, IndexError) as exc:
        raise CacheError(f"{path}: damaged index part ({exc}); re-run sdxl_process_data_dir.py") from exc


def load_index_records(root: Path) -> dict[str, dict]:
    """Every record in every index part present (any --num_shards), by key: used by the writer to reuse work."""
    records: dict[str, dict] = {}
    for part in sorted((Path(root) / INDEX_DIR).glob("shard-*-of-*.jsonl")):
        try:
            _, rows = _read_index_part(part)
        except CacheError:
            continue
        records.update({r["key"]: r for r in rows if "key" in r})
    return records
