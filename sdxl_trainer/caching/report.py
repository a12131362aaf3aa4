"""End of a caching run: gather every process's records, write the index part and report.json, print the table.

Processes of one launch hand their results over through files in `index/.parts/` (plain JSON, no pickled
objects) and one barrier; process 0 then writes this shard's index part and `reports/shard-S-of-N.json`,
and `report.json` as the union of the shard reports present (so independent launches with --num_shards
add up to one report).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from sdxl_trainer import atomic_files
from sdxl_trainer.caching.caching_args import CachingArgs
from sdxl_trainer.data import cache_format

PARTS_DIR = "index/.parts"
REPORTS_DIR = "reports"
REPORT_FILE = "report.json"


def _sorted_buckets(counts: Counter) -> dict[str, int]:
    """{"WxH": items}, smallest area first."""

    def area(name: str) -> int:
        w, h = name.split("x")
        return int(w) * int(h)

    return dict(sorted(counts.items(), key=lambda kv: (area(kv[0]), kv[0])))


def _bucket_counts(records: list[dict]) -> dict[str, int]:
    return _sorted_buckets(Counter(f"{r['bucket_wh'][0]}x{r['bucket_wh'][1]}" for r in records))


def _truncated(record: dict) -> bool:
    if "caption_truncated" in record:
        return bool(record["caption_truncated"])
    # Written before --max_token_length existed: 77 positions, and caption_tokens counted <BOS> and <EOS>.
    return (record.get("caption_tokens") or 0) > 77


def build_report(records: list[dict], skipped: list[dict], stats: dict, repaired: list[dict] | None = None) -> dict:
    notes = [{"path": r["image_relpath"], "note": n} for r in records for n in r.get("caption_notes", [])]
    return {
        "cached": len(records),
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "repaired": sorted(repaired or [], key=lambda s: s["path"]),
        "buckets": _bucket_counts(records),
        "notes": sorted(notes, key=lambda n: n["path"]),
        "truncated_captions": sum(_truncated(r) for r in records),
        **stats,
    }


def finish_shard(root: Path, args: CachingArgs, fingerprint: dict, summary: dict, rank: int, world: int):
    """Every process calls this; process 0 returns the shard's report (the others None)."""
    part_name = f"shard-{args.shard_index:05d}-of-{args.num_shards:05d}.rank-{rank:05d}-of-{world:05d}.json"
    parts = root / PARTS_DIR
    atomic_files.atomic_write_json(parts / part_name, summary)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    records, skipped, repaired = [], [], []
    stats = {"encoded": 0, "reused": 0, "seconds": 0.0, "images_per_second": 0.0, "encoded_per_process": []}
    for r in range(world):
        name = f"shard-{args.shard_index:05d}-of-{args.num_shards:05d}.rank-{r:05d}-of-{world:05d}.json"
        part = json.loads((parts / name).read_text(encoding="utf-8"))
        records += part["records"]
        skipped += part["skipped"]
        repaired += part.get("repaired", [])
        stats["encoded"] += part["encoded"]
        stats["encoded_per_process"].append(part["encoded"])
        stats["reused"] += part["reused"]
        stats["seconds"] = max(stats["seconds"], part["seconds"])
        stats["images_per_second"] += part["images_per_second"]
        if part.get("steady_images_per_second") is not None:
            stats["steady_images_per_second"] = (
                stats.get("steady_images_per_second", 0.0) + part["steady_images_per_second"]
            )
    cache_format.write_meta(root, args.basename, fingerprint)
    cache_format.write_index_part(root, args.shard_index, args.num_shards, fingerprint, records)
    shutil.rmtree(parts, ignore_errors=True)
    report = build_report(records, skipped, stats, repaired)
    report_dir = root / REPORTS_DIR
    atomic_files.atomic_write_json(report_dir / f"shard-{args.shard_index:05d}-of-{args.num_shards:05d}.json", report)
    for old in report_dir.glob("shard-*.json"):  # reports of an earlier --num_shards layout
        if not old.name.endswith(f"-of-{args.num_shards:05d}.json"):
            old.unlink(missing_ok=True)
    atomic_files.atomic_write_json(root / REPORT_FILE, merge_reports(sorted(report_dir.glob("shard-*.json"))))
    return report


def merge_reports(paths: list[Path]) -> dict:
    merged = {"cached": 0, "skipped": [], "repaired": [], "buckets": Counter(), "notes": [], "encoded": 0}
    merged["reused"] = 0
    merged["truncated_captions"] = 0
    merged["encoded_per_process"] = []
    for path in paths:
        part = json.loads(path.read_text(encoding="utf-8"))
        merged["cached"] += part["cached"]
        merged["skipped"] += part["skipped"]
        merged["repaired"] += part.get("repaired", [])
        merged["buckets"].update(part["buckets"])
        merged["notes"] += part["notes"]
        merged["encoded"] += part.get("encoded", 0)
        merged["reused"] += part.get("reused", 0)
        merged["truncated_captions"] += part.get("truncated_captions", 0)
        merged["encoded_per_process"] += part.get("encoded_per_process", [])
    merged["skipped"].sort(key=lambda s: s["path"])
    merged["notes"].sort(key=lambda n: n["path"])
    merged["buckets"] = _sorted_buckets(merged["buckets"])
    merged["shards"] = len(paths)
    return merged


def print_report(report: dict, root: Path) -> None:
    lines = [f"\nbuckets ({report['cached']} items cached in {root}):", f"  {'bucket WxH':>12}  items"]
    lines += [f"  {bucket:>12}  {count}" for bucket, count in report["buckets"].items()]
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} files:")
        lines += [f"  {s['path']}: {s['reason']}" for s in report["skipped"]]
    if report.get("repaired"):
        lines.append(f"re-encoded {len(report['repaired'])} damaged items:")
        lines += [f"  {s['path']}: {s['reason']}" for s in report["repaired"]]
    if report["notes"]:
        lines.append(f"caption notes ({len(report['notes'])}):")
        lines += [f"  {n['path']}: {n['note']}" for n in report["notes"]]
    if report.get("truncated_captions"):
        lines.append(
            f"truncated captions: {report['truncated_captions']} (longer than --max_token_length allows; see the notes)"
        )
    rate = report.get("images_per_second", 0.0)
    lines.append(
        f"encoded {report['encoded']}, reused {report['reused']} unchanged, skipped {len(report['skipped'])} "
        f"in {report['seconds']:.1f} s ({rate:.1f} images/s); report: {root / REPORT_FILE}"
    )
    print("\n".join(lines), flush=True)
