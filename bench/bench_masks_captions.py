"""What long captions and the masked loss cost in the trainer, against plain 77-token captions in the same run.

Each row runs the real trainer (`bench_train.run_trainer`: cache reader, DataLoader, collate with caption
padding, the step, the optimizer) on a full-size random-weight SDXL UNet at 1024 px, batch 8, eager, on a
cache whose items differ only in what is measured:

    plain_77          every caption 77 tokens, no masks (the baseline)
    tokens_154/231    every caption 154 / 231 tokens (--max_token_length 154 / 231 with long captions)
    mixed_77_231      captions of 77, 154 and 231 tokens mixed: batches padded, cross-attention masked
    masked_loss       77 tokens, every item with a loss mask, --masked_loss

One JSON line per row (images/s over the steady steps, peak GiB, and the ratio to plain_77 of this run).

    python bench/bench_masks_captions.py                  # all rows (about 4 minutes on one H200)
    python bench/bench_masks_captions.py --with_compile   # also plain_77 and mixed_77_231 with --compile transformers
    python bench/bench_masks_captions.py --smoke          # tiny model on CPU: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402

EAGER = ["--compile", "none"]
ROWS = {  # name -> (caption rows per item, cycled; masks?; trainer flags)
    "plain_77": ((77,), False, EAGER),
    "tokens_154": ((154,), False, EAGER),
    "tokens_231": ((231,), False, EAGER),
    "mixed_77_231": ((77, 154, 231), False, EAGER),
    "masked_loss": ((77,), True, [*EAGER, "--masked_loss"]),
}
COMPILED_ROWS = {
    "plain_77_compiled": ((77,), False, ["--compile", "transformers"]),
    "mixed_77_231_compiled": ((77, 154, 231), False, ["--compile", "transformers"]),
}
BATCH = 8


def write_cache(folder: Path, rows: tuple[int, ...], masks: bool, items: int, smoke: bool) -> None:
    """Random items of one bucket; item i has rows[i % len(rows)] caption rows, and a random mask if asked."""
    from sdxl_trainer.data.cache_format import CacheError
    from sdxl_trainer.data.cache_reader import open_dataset_cache
    from sdxl_trainer.data.cache_writer import CacheWriter

    if (folder / "cache.json").exists():
        try:
            open_dataset_cache(folder)
            return
        except CacheError:  # left by an older version of the code in the same --work_dir: write it anew
            shutil.rmtree(folder)
    side, context, pooled = (64, 80, 40) if smoke else (1024, 2048, 1280)
    g = torch.Generator().manual_seed(0)
    writer = CacheWriter(folder, fingerprint={"image": {"bench": "masks"}, "text": {"bench": "captions"}})
    writer.write_empty_embeddings(torch.zeros(77, context).half(), torch.zeros(pooled).half())
    latent = (4, side // 8, side // 8)
    for i in range(items):
        tensors = {
            "latent_mean": torch.randn(latent, generator=g).half(),
            "latent_std": (0.05 * torch.rand(latent, generator=g)).half(),
            "prompt_embeds": torch.randn(rows[i % len(rows)], context, generator=g).half(),
            "pooled_prompt_embeds": torch.randn(pooled, generator=g).half(),
        }
        if masks:
            tensors["loss_mask"] = (torch.rand(1, *latent[1:], generator=g) > 0.3).half()
        writer.write_item(f"{i:05d}.png", f"caption {i}", bucket_wh=(side, side), original_size_hw=(side, side),
                          crop_top_left=(0, 0), tensors=tensors)  # fmt: skip
    writer.finalize()


def run_row(work: Path, name: str, spec, args) -> dict:
    """Child process: one row through bench_train's timed trainer run."""
    rows, masks, flags = spec
    row_dir = work / name
    row_dir.mkdir(parents=True, exist_ok=True)
    if not (row_dir / "model").exists():
        (row_dir / "model").symlink_to(work / "model", target_is_directory=True)
    write_cache(row_dir / "cache" / "ds", rows, masks, items=4 * BATCH, smoke=args.smoke)
    bench_train.CONFIGS[name] = dict(batch=BATCH, flags=flags)
    result = bench_train.run_trainer(row_dir, name, args.warmup_steps, args.timed_steps, None, smoke=args.smoke)
    result["caption_rows"] = list(rows)
    result["masks"] = masks
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup_steps", type=int, default=4)
    parser.add_argument("--timed_steps", type=int, default=10)
    parser.add_argument("--with_compile", action="store_true", help="also the compiled rows (about 2 min each)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and cache on CPU: checks the script runs")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "sdxl_bench_masks_captions"))
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    rows = {**ROWS, **(COMPILED_ROWS if args.with_compile else {})}
    if args.child:
        print(json.dumps(run_row(work, args.child, rows[args.child], args)), flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from sdxl_trainer.models.tiny import save_tiny_sdxl_pipeline

        if not (work / "model").exists():
            save_tiny_sdxl_pipeline(work / "model", seed=0)
    else:
        bench_train.write_model(work / "model")
    results = {}
    for name in rows:  # each row in its own process: a clean GPU, allocator and compile cache
        cmd = [sys.executable, __file__, "--child", name, "--work_dir", str(work), "--warmup_steps",
               str(args.warmup_steps), "--timed_steps", str(args.timed_steps)]  # fmt: skip
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--with_compile"] if args.with_compile else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        result = (
            json.loads(lines[-1]) if lines else dict(name=name, error=f"exit {proc.returncode}: {proc.stderr[-600:]}")
        )
        base = results.get("plain_77_compiled" if name.endswith("_compiled") else "plain_77", result)
        if result.get("images_per_s") and base.get("images_per_s"):
            result["images_per_s_vs_plain_77"] = round(result["images_per_s"] / base["images_per_s"], 3)
        results[name] = result
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
