"""Memory plans on one H200 (issue 14): what trains inside a 24 GiB and a 16 GiB card, how fast, and what one rank of
a world of 2 or 8 needs under 24 GiB (simulated), against the original recipe measured uncapped in the same run.

Every row is the project's trainer end to end (`bench_train.run_trainer`: cache reader, DataLoader, the real step,
logging) on a full-size random-weight SDXL UNet at 1024 px (the model and cache of bench_train.py), each in its own
process so that an out-of-memory configuration cannot take the others down. The final checkpoint of each run is
not written (memory and speed of training steps are measured, not a 15 GB write).

  cap24_lean_B8       --memory_plan lean under a 24 GiB cap (set_per_process_memory_fraction), batch 8: the target
                      is >= 1.4x the original recipe's uncapped images/s (kohya's 24 GB recipe: 1.13x)
  cap24_auto_B16      the automatic plan under the same cap at kohya's batch (expected: lean_release)
  cap16_auto_B1       the automatic plan under a 16 GiB cap, batch 1 (expected: lean_release)
  default_B12         the automatic plan uncapped (fast on an H200), batch 12: the target is >= 1.8x
  fake2_balanced_B8   one rank of a world of 2 (fake process group: collectives do nothing), 24 GiB cap, FULL_SHARD,
                      fp32 masters, AdamW8bit, checkpointing, batch 8 per rank
  fake2_lean_B16      same world, the lean plan, batch 16 per rank
  fake8_lean_B16      the lean plan in a world of 8 (fake8_balanced_B8 with --only)
With --only also: fake8_balanced_B8, cap24_lean_B16 (kohya's batch under the same cap), cap24_lean_release_B16 (the
flat layout's step in backward), cap24_lean_release_fused_B16 and _B20 (with --adamw_kernel fused),
cap24_lean_release_fsdp_B16 (the step in backward under FSDP2 on one GPU),
cap24_auto_B8, cap16_auto_B8 (the optimizer state in CPU RAM), cap24_lean_B12, lean_B8 and lean_B16 (uncapped: what
the cap costs), lean_frac50_B8 and
cap24_lean_frac95_B8 (--gradient_checkpointing_fraction), cap24_lean_fused_B8 (--adamw_kernel fused),
cap24_lean_stages_B8 and cap24_lean_blocks_B8 (--compile), cap24_lean_fused_B12, fake2_balanced_blocks_B8
(--fsdp_units blocks).
Simulated ranks (fake*) are MEMORY figures: their images/s means nothing (no communication happens) and is left out.

    python bench/bench_memory.py                       # the rows above, < 8 minutes
    python bench/bench_memory.py --only cap24_lean_B8,fake2_lean_B16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402

EAGER = ["--compile", "none"]
# name -> batch per rank, trainer flags, memory cap (GiB, None = uncapped), simulated world size (1 = real).
CONFIGS = {
    "cap24_lean_B8": dict(batch=8, flags=["--memory_plan", "lean"], cap=24.0, world=1),
    # kohya's batch under the cap, the plan chosen from the card (lean does not fit: the estimate picks lean_release)
    "cap24_auto_B16": dict(batch=16, flags=[], cap=24.0, world=1),
    "cap16_auto_B1": dict(batch=1, flags=[], cap=16.0, world=1),
    "default_B12": dict(batch=12, flags=[], cap=None, world=1),
    "fake2_balanced_B8": dict(batch=8, flags=["--memory_plan", "balanced", *EAGER], cap=24.0, world=2),
    "fake2_lean_B16": dict(batch=16, flags=["--memory_plan", "lean", *EAGER], cap=24.0, world=2),
    "fake8_lean_B16": dict(batch=16, flags=["--memory_plan", "lean", *EAGER], cap=24.0, world=8),
}
# Not in the default run (time): with --only.
EXTRA = {
    "fake8_balanced_B8": dict(batch=8, flags=["--memory_plan", "balanced", *EAGER], cap=24.0, world=8),
    "cap24_lean_B16": dict(batch=16, flags=["--memory_plan", "lean"], cap=24.0, world=1),
    "cap24_lean_release_B16": dict(batch=16, flags=["--memory_plan", "lean_release"], cap=24.0, world=1),
    # The step in backward on FSDP2 (one GPU), as lean_release ran before the flat layout could release gradients.
    "cap24_lean_release_fsdp_B16": dict(
        batch=16, flags=["--memory_plan", "lean_release", "--sharding", "full_shard"], cap=24.0, world=1
    ),  # fmt: skip
    "cap24_lean_release_fused_B16": dict(
        batch=16, flags=["--memory_plan", "lean_release", "--adamw_kernel", "fused"], cap=24.0, world=1
    ),  # fmt: skip
    "cap24_lean_release_fused_B20": dict(
        batch=20, flags=["--memory_plan", "lean_release", "--adamw_kernel", "fused"], cap=24.0, world=1
    ),  # fmt: skip
    "cap24_auto_B8": dict(batch=8, flags=[], cap=24.0, world=1),
    "cap16_auto_B8": dict(batch=8, flags=[], cap=16.0, world=1),  # expected: lean_state_offload (state in CPU RAM)
    "cap24_lean_B12": dict(batch=12, flags=["--memory_plan", "lean"], cap=24.0, world=1),
    "lean_B8": dict(batch=8, flags=["--memory_plan", "lean"], cap=None, world=1),  # what the cap costs
    "lean_B16": dict(batch=16, flags=["--memory_plan", "lean"], cap=None, world=1),  # per-step costs amortized
    # The fused 8-bit step over bf16 weights (torchao's compiled kernel) against bitsandbytes' (cap24_lean_B8).
    "cap24_lean_fused_B8": dict(
        batch=8, flags=["--memory_plan", "lean", "--adamw_kernel", "fused"], cap=24.0, world=1
    ),  # fmt: skip
    # Fewer, larger compiled regions (whole attention stages, resnets, resamplers): the host launches fewer graphs,
    # which at batch 8 with checkpointing takes about as long as running them (README, Memory).
    "cap24_lean_stages_B8": dict(batch=8, flags=["--memory_plan", "lean", "--compile", "stages"], cap=24.0, world=1),
    "cap24_lean_blocks_B8": dict(batch=8, flags=["--memory_plan", "lean", "--compile", "blocks"], cap=24.0, world=1),
    # Without the fp32 chunk copies of the bitsandbytes step, and with expandable segments: does batch 12 fit?
    "cap24_lean_fused_B12": dict(
        batch=12, flags=["--memory_plan", "lean", "--adamw_kernel", "fused"], cap=24.0, world=1
    ),  # fmt: skip
    # --gradient_checkpointing_fraction: what keeping some blocks' activations costs in memory and gives in speed.
    "lean_frac50_B8": dict(
        batch=8, flags=["--memory_plan", "lean", "--gradient_checkpointing_fraction", "0.5"], cap=None, world=1
    ),
    "cap24_lean_frac95_B8": dict(
        batch=8, flags=["--memory_plan", "lean", "--gradient_checkpointing_fraction", "0.95"], cap=24.0, world=1
    ),
    # Block-sized FSDP units (what --fsdp_units auto picks on big cards) against per-layer ones (fake2_balanced_B8).
    "fake2_balanced_blocks_B8": dict(
        batch=8, flags=["--memory_plan", "balanced", "--fsdp_units", "blocks", *EAGER], cap=24.0, world=2
    ),  # fmt: skip
}


def run_config(work: Path, name: str, warmup_steps: int, timed_steps: int, smoke: bool = False) -> dict:
    """Child process: one configuration through bench_train's timed trainer run (`smoke`: tiny model on CPU,
    batch 2, no cap: checks that the script runs)."""
    import torch

    from sdxl_trainer.training import loop, memory_plan

    cfg = dict({**CONFIGS, **EXTRA}[name])
    if smoke:
        cfg.update(batch=2, cap=None, flags=[*cfg["flags"], "--mixed_precision", "bf16", "--compile", "none"])
    if cfg["world"] > 1:
        # One rank of a larger world: PyTorch's fake process group (as torchtitan's memory estimation does).
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(cfg["world"]), LOCAL_WORLD_SIZE=str(cfg["world"]))
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cfg["world"])
    flags = list(cfg["flags"])
    if cfg["cap"]:
        flags += ["--gpu_memory_gib", str(cfg["cap"])]  # the plan plans for the cap, not the H200's 141 GiB
    bench_train.CONFIGS[name] = dict(batch=cfg["batch"], flags=flags)
    loop.save_checkpoint = lambda tr: None  # no final 2.6 B-parameter checkpoint: steps are what is measured
    if cfg["world"] > 1:
        # The fake group's collectives leave their outputs unwritten, so losses and norms may be nan; every step is
        # still taken (a skipped step would never allocate the optimizer state, under-reporting the peak).
        import math
        import types

        from sdxl_trainer.training import step

        step.math = types.SimpleNamespace(isfinite=lambda _v: True, inf=math.inf, sqrt=math.sqrt)
    result = bench_train.run_trainer(work, name, warmup_steps, timed_steps, cfg["cap"], smoke)
    gpu_gib = cfg["cap"] or (torch.cuda.get_device_properties(0).total_memory / memory_plan.GIB if not smoke else None)
    plan = cfg["flags"][cfg["flags"].index("--memory_plan") + 1] if "--memory_plan" in cfg["flags"] else "auto"
    chosen, _, estimate = memory_plan.choose(plan, gpu_gib, cfg["batch"], cfg["world"])
    result.update(world=cfg["world"], simulated=cfg["world"] > 1, plan=chosen, plan_estimate_gib=estimate)
    if cfg["world"] > 1:
        result["gpus"] = 1
        for key in ("images_per_s", "share_of_ceiling"):
            result.pop(key, None)  # no communication happened: not a throughput
        result["note"] = "memory of one rank of a simulated world (fake process group); not a throughput"
    return result


def run_child(name: str, work: Path, warmup_steps: int, timed_steps: int, smoke: bool = False) -> dict:
    argv = ["--child", name, "--work_dir", str(work), "--warmup_steps", str(warmup_steps),
            "--timed_steps", str(timed_steps), *(["--smoke"] if smoke else [])]  # fmt: skip
    return bench_train.run_child(argv, script=__file__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--timed_steps", type=int, default=6)
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "sdxl_bench_train"))
    parser.add_argument("--no_baseline", action="store_true", help="skip the original recipe (ratios left out)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and cache on CPU: checks the script runs")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.child:
        print(json.dumps(run_config(work, args.child, args.warmup_steps, args.timed_steps, args.smoke)), flush=True)
        return

    import torch

    if args.smoke:
        from sdxl_trainer.models.tiny import TE2_PROJECTION, save_tiny_sdxl_pipeline

        if not (work / "model").exists():
            save_tiny_sdxl_pipeline(work / "model")
        bench_train.write_cache(work / "cache" / "tiny", 16, [(64, 64), (64, 96)], 80, TE2_PROJECTION)
        for name in [n for n in {**CONFIGS, **EXTRA} if not args.only or n in args.only.split(",")]:
            print(json.dumps(run_child(name, work, 1, 1, smoke=True)), flush=True)
        return

    bench_train.write_model(work / "model")
    # 128 items per bucket: a simulated world of 8 at batch 16 per rank needs 128 per global batch.
    bench_train.write_cache(work / "cache" / "random1024", items_per_bucket=64)
    bench_train.write_cache(work / "cache" / "random1024_more", items_per_bucket=64)
    print(json.dumps(dict(torch=torch.__version__, gpu=torch.cuda.get_device_name())), flush=True)
    base_rate = None
    if not args.no_baseline:
        baseline = bench_train.run_child_levers("original_recipe_fp32w_fp16amp_ckpt_bnb8bit")
        print(json.dumps(baseline), flush=True)
        base_rate = baseline.get("images_per_s")
    wanted = [w for w in args.only.split(",") if w]
    for name, cfg in {**CONFIGS, **EXTRA}.items():
        if (wanted and name not in wanted) or (not wanted and name in EXTRA):
            continue
        steps = (1, 2) if cfg["world"] > 1 else (args.warmup_steps, args.timed_steps)  # memory only: short
        r = run_child(name, work, *steps)
        if base_rate and "images_per_s" in r:
            r["ratio_to_original_recipe"] = round(r["images_per_s"] / base_rate, 2)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
