"""FP8 matmuls (`--fp8`) in the real trainer on one GPU, against bf16 and the original trainer's recipe in the same run.

What runs: `bench_train.py`'s machinery (the trainer end to end from a cache of random full-size 1024-px items, a
full-size random-weight SDXL UNet, `--sharding auto` = the flat one-process layout), one child process per
configuration, images/s over steady-state optimizer steps; the original recipe (bench_levers.py) as the baseline.
The end-of-run checkpoint (15+ GB, never inside the timed steps) is skipped to keep the bench inside 8 minutes.

Sets (`--set all` runs them one after the other; split them with --only to fit a device call):
  speed   the default plan uncapped (fast: AdamW over fp32 masters, no checkpointing, batch 12, --compile
          transformers, --adamw_kernel auto = fused) against the same with the foreach AdamW step, and FP8
          tensorwise with either step
  levers  on top of FP8 tensorwise with the fused step: rowwise scaling, the 640-channel stages in FP8 too
          (--fp8_min_features 640), resnets compiled too (--compile blocks; also in bf16), batch 16
  gap     numerics: bf16, FP8 tensorwise and FP8 rowwise from the same start (same weights, data, noise and
          timesteps) for --gap_steps optimizer steps at batch 2, compiled; per-step loss and gradient-norm gaps
--profile NAMES adds one profiled step of each named configuration by kernel category (a separate child each).
Random weights: speed and numerics only, never image quality.

    python bench/bench_fp8.py --set speed 2>&1 | grep '^{'
    python bench/bench_fp8.py --set gap --gap_steps 300
    python bench/bench_fp8.py --smoke            # tiny model on CPU: checks the script runs (no speed meaning)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402

FAST = ["--optimizer", "adamw", "--no_gradient_checkpointing"]
COMPILE = ["--compile", "transformers"]
TENSORWISE = ["--fp8", "tensorwise"]
ROWWISE = ["--fp8", "rowwise"]
FOREACH = ["--adamw_kernel", "foreach"]  # torch's foreach AdamW: the step before --adamw_kernel auto chose fused
FUSED = ["--adamw_kernel", "fused"]
GAP = [*FAST, *COMPILE, *FOREACH, "--learning_rate", "3e-5"]

CONFIGS = {
    # speed: the default plan (uncapped on an H200: fast = AdamW over fp32 masters, no checkpointing, compiled
    # transformer blocks, --adamw_kernel auto = fused) against the same with the foreach step, and FP8 tensorwise
    "default_plan_B12": dict(batch=12, flags=[]),
    "fast_bf16_B12": dict(batch=12, flags=[*FAST, *COMPILE, *FOREACH]),
    "fast_fp8_tensorwise_B12": dict(batch=12, flags=[*FAST, *COMPILE, *TENSORWISE, *FOREACH]),
    "fast_fp8_tensorwise_fused_B12": dict(batch=12, flags=[*FAST, *COMPILE, *TENSORWISE, *FUSED]),
    # levers, each on top of FP8 tensorwise with the fused step: rowwise scaling, the 640-channel stages in FP8
    # too, resnets compiled too (--compile blocks; and the same in bf16), a larger batch (FP8 saves 12 GiB)
    "fast_fp8_rowwise_fused_B12": dict(batch=12, flags=[*FAST, *COMPILE, *ROWWISE, *FUSED]),
    "fast_fp8_tensorwise_fused_min640_B12": dict(
        batch=12, flags=[*FAST, *COMPILE, *TENSORWISE, *FUSED, "--fp8_min_features", "640"]
    ),
    "fast_fp8_tensorwise_fused_blocks_B12": dict(batch=12, flags=[*FAST, "--compile", "blocks", *TENSORWISE, *FUSED]),
    "fast_bf16_fused_blocks_B12": dict(batch=12, flags=[*FAST, "--compile", "blocks", *FUSED]),
    # batch 16 named as the fast plan: by its estimate (152 GiB in bf16, 136 with FP8) auto would not keep the fp32
    # masters on the GPU; the FP8 peak measured at batch 12 (103.6 GiB) says it fits in 141
    "fast_fp8_tensorwise_fused_B16": dict(
        batch=16, flags=[*FAST, *COMPILE, *TENSORWISE, *FUSED, "--memory_plan", "fast"]
    ),
    # gap: compiled as a user runs FP8 (eager FP8 is host-bound: torchao's float8 tensor dispatches in Python, 1.51
    # images/s at batch 2 against bf16's 7.18 on an H200); the same foreach step in all three
    "gap_bf16": dict(batch=2, flags=GAP),
    "gap_fp8_tensorwise": dict(batch=2, flags=[*GAP, *TENSORWISE]),
    "gap_fp8_rowwise": dict(batch=2, flags=[*GAP, *ROWWISE]),
}
SETS = {
    "speed": ["default_plan_B12", "fast_bf16_B12", "fast_fp8_tensorwise_B12", "fast_fp8_tensorwise_fused_B12"],
    "levers": [
        "fast_fp8_rowwise_fused_B12",
        "fast_fp8_tensorwise_fused_min640_B12",
        "fast_fp8_tensorwise_fused_blocks_B12",
        "fast_bf16_fused_blocks_B12",
        "fast_fp8_tensorwise_fused_B16",
    ],  # fmt: skip
    "gap": ["gap_bf16", "gap_fp8_tensorwise", "gap_fp8_rowwise"],
}


def _smoke_flags(flags: list[str]) -> list[str]:
    """The tiny model on CPU: eager (Inductor's C++ compile takes minutes) and every aligned layer in FP8."""
    out = ["none" if i and flags[i - 1] == "--compile" else f for i, f in enumerate(flags)]
    return [*out, "--fp8_min_features", "16"] if "--fp8" in out else out


def child(work: Path, name: str, warmup_steps: int, timed_steps: int, smoke: bool, profile: bool) -> dict:
    """In the child process: the trainer through bench_train.run_trainer, with every step's loss and gradient norm
    kept (for the gap set) and, with `profile`, one steady-state step's GPU time by kernel category."""
    from sdxl_trainer.training import loop

    configs = {n: dict(c, flags=_smoke_flags(c["flags"]) if smoke else c["flags"]) for n, c in CONFIGS.items()}
    bench_train.CONFIGS.update(configs)
    loop.save_checkpoint = lambda tr: None  # the end-of-run checkpoint: not timed, 15+ GB, ~30 s
    records: list[tuple[float, float]] = []
    inner = loop.train_step

    def recording_step(tr, micro_batches, *more):
        result = inner(tr, micro_batches, *more)
        records.append((result["loss"], result["grad_norm"]))
        return result

    loop.train_step = recording_step  # run_trainer wraps this one with its timer
    if profile and torch.cuda.is_available():  # bench_train profiles the last warm-up step into result["profile"]
        os.environ["BENCH_PROFILE"] = str(work / f"profile_{name}.txt")
    result = bench_train.run_trainer(work, name, warmup_steps, timed_steps, None, smoke)
    if name.startswith("gap_"):
        result["losses"] = [round(loss, 6) for loss, _ in records]
        result["grad_norms"] = [round(norm, 6) for _, norm in records]
    return result


def run_child(name: str, common: list[str], profile: bool = False) -> dict:
    return bench_train.run_child(["--child", name, *common, *(["--profile", name] if profile else [])], script=__file__)


def gap_figures(reference: dict, other: dict, window: int = 20) -> dict:
    """Per-step relative gaps of loss and gradient norm against the bf16 run, windowed means of both (curves readable
    in one line) and the steps where the gradient norms part most."""
    pairs = list(zip(other["losses"], reference["losses"], strict=False))
    norms = list(zip(other["grad_norms"], reference["grad_norms"], strict=False))
    loss_gaps = [abs(a - b) / abs(b) for a, b in pairs if math.isfinite(a) and b]
    norm_gaps = [abs(a - b) / abs(b) for a, b in norms if math.isfinite(a) and b]
    widest = sorted(range(len(norms)), key=lambda i: -abs(norms[i][0] - norms[i][1]) / abs(norms[i][1] or 1))

    def curve(values: list[float]) -> list[float]:
        return [
            round(sum(values[i : i + window]) / len(values[i : i + window]), 5) for i in range(0, len(values), window)
        ]

    return dict(
        name=f"gap_{other['name'][4:]}_vs_bf16",
        steps=len(pairs),
        nonfinite_steps=sum(not math.isfinite(a) for a, _ in pairs),
        mean_relative_loss_gap=round(sum(loss_gaps) / max(len(loss_gaps), 1), 5),
        max_relative_loss_gap=round(max(loss_gaps, default=0.0), 5),
        mean_relative_grad_norm_gap=round(sum(norm_gaps) / max(len(norm_gaps), 1), 5),
        max_relative_grad_norm_gap=round(max(norm_gaps, default=0.0), 5),
        last_window_mean_loss=dict(bf16=curve(reference["losses"])[-1], fp8=curve(other["losses"])[-1]),
        loss_curve_bf16=curve(reference["losses"]),
        loss_curve_fp8=curve(other["losses"]),
        grad_norm_curve_bf16=curve(reference["grad_norms"]),
        grad_norm_curve_fp8=curve(other["grad_norms"]),
        # where the gradient norms part most: (step, bf16 norm, FP8 norm), to tell one outlier from a drift
        widest_grad_norm_gaps=[(i + 1, round(norms[i][1], 4), round(norms[i][0], 4)) for i in widest[:5]],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="speed", choices=[*SETS, "all"], help="which configurations (default speed)")
    parser.add_argument("--only", default="", help="comma-separated configuration names instead of a set")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps (the first one compiles)")
    parser.add_argument("--timed_steps", type=int, default=8)
    parser.add_argument("--gap_steps", type=int, default=200, help="optimizer steps of each gap run")
    parser.add_argument("--no_baseline", action="store_true", help="skip the original recipe (ratios left out)")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "sdxl_bench_train"))
    parser.add_argument("--smoke", action="store_true", help="tiny model and cache on CPU: checks the script runs")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated configurations to profile (GPU time by kernel "
        "category of one steady step; a separate child each, after the timed ones)",
    )
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.child:
        warmup, timed = args.warmup_steps, args.timed_steps
        if args.child.startswith("gap_"):
            warmup, timed = 1, args.gap_steps - 1
        r = child(work, args.child, warmup, timed, args.smoke, bool(args.profile))
        print(json.dumps(r), flush=True)
        return

    names = [n for n in args.only.split(",") if n] or [
        n for s, ns in SETS.items() if args.set in (s, "all") for n in ns
    ]
    profiled = [n for n in args.profile.split(",") if n]
    unknown = [n for n in [*names, *profiled] if n not in CONFIGS]
    if unknown:
        parser.error(f"--only: unknown configurations {unknown}; known: {sorted(CONFIGS)}")
    common = ["--warmup_steps", str(args.warmup_steps), "--timed_steps", str(args.timed_steps), "--work_dir",
              str(work), "--gap_steps", str(args.gap_steps), *(["--smoke"] if args.smoke else [])]  # fmt: skip
    if args.smoke:
        from sdxl_trainer.models.tiny import TE2_PROJECTION, save_tiny_sdxl_pipeline

        if not (work / "model").exists():
            save_tiny_sdxl_pipeline(work / "model")
        bench_train.write_cache(work / "cache" / "tiny", 16, [(64, 64), (64, 96)], 80, TE2_PROJECTION)
        base_rate = None
    else:
        bench_train.write_model(work / "model")
        bench_train.write_cache(work / "cache" / "random1024", items_per_bucket=64)
        gpu = torch.cuda.get_device_name()
        print(json.dumps(dict(torch=torch.__version__, gpu=gpu, capability=torch.cuda.get_device_capability())))
        base_rate = None
        if not args.no_baseline and any(not n.startswith("gap_") for n in names):
            baseline = bench_train.run_child_levers("original_recipe_fp32w_fp16amp_ckpt_bnb8bit")
            print(json.dumps(baseline), flush=True)
            base_rate = baseline.get("images_per_s")
    gap_runs = {}
    for name in names:
        r = run_child(name, common)
        if base_rate and "images_per_s" in r:
            r["ratio_to_original_recipe"] = round(r["images_per_s"] / base_rate, 2)
        if name.startswith("gap_"):
            gap_runs[name] = r
            r = {k: v for k, v in r.items() if k not in ("losses", "grad_norms")}  # the curves go in the gap lines
        print(json.dumps(r), flush=True)
        # Each FP8 run's gap as soon as both runs exist (gap_bf16 runs first): a timeout keeps what finished.
        reference = gap_runs.get("gap_bf16", {})
        if name.startswith("gap_") and name != "gap_bf16" and "losses" in reference and "losses" in gap_runs[name]:
            print(json.dumps(gap_figures(reference, gap_runs[name])), flush=True)
    for name in profiled:
        r = run_child(name, common, profile=True)
        rate = dict(images_per_s=r.get("images_per_s"))
        print(
            json.dumps(dict(name=f"profile_{name}", **rate, profile=r.get("profile"), error=r.get("error"))), flush=True
        )


if __name__ == "__main__":
    main()
