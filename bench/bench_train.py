"""Training throughput of the project's own trainer on one GPU, against the original trainer's recipe.

What runs: `sdxl_fsdp_train.py`'s own code path (`sdxl_trainer.training.loop.main`): the cache reader and DataLoader
over a cache of random full-size items (1024-px buckets of several aspect ratios), the sharding (--sharding auto:
the flat one-process layout on one GPU, FSDP2 on several), the real
step (noise, time ids, loss, clipping, optimizer, LR schedule), logging to TensorBoard and the progress bar.
The UNet is a full-size SDXL-base-shaped UNet with random weights, written once as a diffusers folder.
In the same run, the original trainer's recipe (fp32 weights, fp16 autocast, gradient checkpointing,
bitsandbytes AdamW8bit, batch 8) is timed on random inputs as the baseline (from bench_levers.py).

images/s is wall-clock over the steady-state steps (after --warmup_steps), measured between the ends of
optimizer steps, so data loading and logging between steps are included. Peak GiB is
torch.cuda.max_memory_allocated. One JSON line per configuration; each runs in its own process.

    python bench/bench_train.py                    # every configuration
    python bench/bench_train.py --only default_B8,memory_24GiB
    python bench/bench_train.py --memory_search    # largest batch that trains inside an emulated 24 GiB card
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_levers import CEILING_IMAGES_PER_S, SDXL_UNET_CONFIG  # noqa: E402

BUCKETS_WH = [(1024, 1024), (832, 1216), (1216, 832), (896, 1152)]
CEILING = CEILING_IMAGES_PER_S

EAGER = ["--compile", "none"]

# name -> extra trainer flags; every configuration also gets --train_batch_size from "batch". Rows are eager
# unless their name says compile; default_B8 is the trainer's defaults (--compile auto: transformers on one GPU).
CONFIGS = {
    "default_B8": dict(batch=8, flags=[]),
    "default_eager_B8": dict(batch=8, flags=EAGER),
    "adamw_B8": dict(batch=8, flags=["--optimizer", "adamw", *EAGER]),
    "adamw_nockpt_B8": dict(batch=8, flags=["--optimizer", "adamw", "--no_gradient_checkpointing", *EAGER]),
    "adamw8bit_nockpt_B8": dict(batch=8, flags=["--optimizer", "adamw8bit", "--no_gradient_checkpointing", *EAGER]),
    # One GPU through FSDP2 instead of the flat one-process layout (what --sharding auto chose before).
    "adamw_nockpt_fsdp_B8": dict(
        batch=8, flags=["--optimizer", "adamw", "--no_gradient_checkpointing", "--sharding", "full_shard", *EAGER]
    ),
    "adamw_nockpt_B12": dict(batch=12, flags=["--optimizer", "adamw", "--no_gradient_checkpointing", *EAGER]),
    "adamw8bit_nockpt_B12": dict(batch=12, flags=["--optimizer", "adamw8bit", "--no_gradient_checkpointing", *EAGER]),
    "adamw8bit_ckpt_B32": dict(batch=32, flags=["--optimizer", "adamw8bit", "--gradient_checkpointing", *EAGER]),
    # Regional torch.compile (the first step compiles; spatial sizes are dynamic, so the 4 buckets share graphs).
    "default_compile_transformers_B8": dict(batch=8, flags=["--compile", "transformers"]),
    "default_compile_B8": dict(batch=8, flags=["--compile", "blocks"]),
    "adamw_nockpt_compile_transformers_B12": dict(
        batch=12, flags=["--optimizer", "adamw", "--no_gradient_checkpointing", "--compile", "transformers"]
    ),
    "adamw_nockpt_compile_B12": dict(
        batch=12, flags=["--optimizer", "adamw", "--no_gradient_checkpointing", "--compile", "blocks"]
    ),
    "adamw8bit_nockpt_compile_B12": dict(
        batch=12, flags=["--optimizer", "adamw8bit", "--no_gradient_checkpointing", "--compile", "blocks"]
    ),
}


def write_model(folder: Path) -> None:
    """A diffusers folder with a full-size random SDXL UNet (fp16 on disk, upcast to fp32 master weights on
    load) and SDXL base's scheduler settings."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    if (folder / "unet" / "config.json").exists():
        return
    torch.manual_seed(0)  # the same random model in every call, so figures of different calls share a start
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).half()
    unet.save_pretrained(folder / "unet")
    del unet
    torch.cuda.empty_cache()  # else this parent process keeps ~10 GiB reserved while the trainers run
    EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
    ).save_pretrained(folder / "scheduler")  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))


def write_cache(
    folder: Path,
    items_per_bucket: int,
    buckets_wh: list[tuple[int, int]] = BUCKETS_WH,
    context_dim: int = 2048,
    pooled_dim: int = 1280,
) -> None:
    """Random items: latents (4, H/8, W/8), 77 x context_dim, pooled_dim, in fp16 like the real cache (SDXL:
    2048 and 1280)."""
    from sdxl_trainer.data.cache_writer import CacheWriter

    if (folder / "cache.json").exists():
        return
    g = torch.Generator().manual_seed(0)
    writer = CacheWriter(folder, fingerprint={"image": {"bench": "random"}, "text": {"bench": "random"}})
    writer.write_empty_embeddings(
        torch.zeros(77, context_dim, dtype=torch.float16), torch.zeros(pooled_dim, dtype=torch.float16)
    )
    for w, h in buckets_wh:
        for i in range(items_per_bucket):
            latent_shape = (4, h // 8, w // 8)
            tensors = {
                "latent_mean": torch.randn(latent_shape, generator=g).half(),
                "latent_std": (0.05 * torch.rand(latent_shape, generator=g)).half(),
                "prompt_embeds": torch.randn(77, context_dim, generator=g).half(),
                "pooled_prompt_embeds": torch.randn(pooled_dim, generator=g).half(),
            }
            writer.write_item(f"{w}x{h}/{i:05d}.png", f"caption {i}", bucket_wh=(w, h), original_size_hw=(h, w),
                              crop_top_left=(0, 0), tensors=tensors)  # fmt: skip
    writer.finalize()


def run_trainer(
    work: Path,
    name: str,
    warmup_steps: int,
    timed_steps: int,
    memory_cap_gib: float | None,
    smoke: bool = False,
    extra_flags: tuple[str, ...] = (),
) -> dict:
    """Child process: run the trainer and time its steady-state optimizer steps."""
    from sdxl_trainer.training import allocator, loop, step
    from sdxl_trainer.training.train_args import parse_args

    allocator.prefer_expandable_segments()  # as the trainer does, before the cap below initialises CUDA
    flags = OFFLOAD_FLAGS if name.startswith("offload") else MEMORY_FLAGS
    cfg = CONFIGS.get(name) or dict(batch=int(name.rsplit("_B", 1)[1]), flags=flags)
    if "--sharding" in cfg["flags"]:
        extra_flags = ()  # the configuration names its own
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: every rank runs this, rank 0 reports
    if memory_cap_gib:
        device = int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_cap_gib * 2**30 / total, device)
    step_end_times: list[float] = []
    original_step = loop.train_step  # the loop calls the name it imported (from ...step import train_step)

    # A file: profile the last warm-up step into it (host and GPU tables), and add its GPU time by kernel category to
    # the result. The last warm-up step, so that the timed steps are not slowed by the profiler.
    profile_out = os.environ.get("BENCH_PROFILE")
    profiled: dict = {}

    def timed_step(tr, micro_batches, *more):  # more: the loop's further arguments (weight_total)
        if not (profile_out and len(step_end_times) == warmup_steps - 1):
            result = original_step(tr, micro_batches, *more)
        else:
            from bench_levers import kernel_summary
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                result = original_step(tr, micro_batches, *more)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            table += "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            Path(profile_out).write_text(table)
            profiled.update(kernel_summary(prof))
        step_end_times.append(time.perf_counter())  # the step ends in a host sync, so this is wall-clock truth
        return result

    step.train_step = timed_step
    loop.train_step = timed_step  # loop.py imports train_step by name: patch the name it calls
    out = work / "runs" / name
    argv = [
        "--pretrained_model_name_or_path", str(work / "model"), "--cached_dataset_dirs", str(work / "cache"),
        "--output_dir", str(out), "--log_dir", str(work / "logs"), "--train_batch_size", str(cfg["batch"]),
        "--max_train_steps", str(warmup_steps + timed_steps), "--gradient_accumulation_steps", "1",
        "--mixed_precision", "no" if smoke else "bf16", "--dataloader_num_workers", "0" if smoke else "4",
        "--no-save_final_model",
        "--checkpointing_steps", "0", "--learning_rate", "1e-6",
        *cfg["flags"], *extra_flags,
    ]  # fmt: skip
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = dict(name=name, batch=cfg["batch"], gpus=world, flags=" ".join([*cfg["flags"], *extra_flags]))
    started = time.perf_counter()
    try:
        args = parse_args(argv)
        # What the plan and `auto` flags resolved to: a row is only read right with them (a batch the estimate does
        # not fit runs another rung).
        result.update(memory_plan=args.memory_plan_chosen, adamw_kernel=args.adamw_kernel)
        summary = loop.main(args)
        result["compile"] = args.compile  # resolved by the trainer's setup
        span = step_end_times[-1] - step_end_times[warmup_steps - 1]
        images_per_s = cfg["batch"] * world * (len(step_end_times) - warmup_steps) / span
        result.update(
            images_per_s=round(images_per_s, 2),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            share_of_ceiling=round(images_per_s / CEILING, 3),
            steps=summary["optimizer_steps"],
            skipped_steps=summary["skipped_steps"],
            seconds_to_first_step=round(step_end_times[0] - started, 1),  # model loading, and compiling
        )
        from torch._dynamo.utils import counters

        result["compiled_graphs"] = counters["stats"]["unique_graphs"]  # --compile (auto may pick none)
        if cuda:
            # Near a memory cap the caching allocator frees its cache and retries (a device sync each time).
            stats = torch.cuda.memory_stats()
            result.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 1),
                          alloc_retries=stats.get("num_alloc_retries", 0))  # fmt: skip
        if profiled:
            result["profile"] = profiled
    except Exception as exc:  # noqa: BLE001 - an out-of-memory configuration is a result
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(out, ignore_errors=True)  # the final checkpoint of a 2.6 B UNet: ~15 GB per configuration
    if memory_cap_gib:
        result["memory_cap_gib"] = memory_cap_gib
    return result


# The settings documented for 24 GB cards (see README, "Memory").
MEMORY_FLAGS = ["--optimizer", "adamw8bit", "--gradient_checkpointing"]
OFFLOAD_FLAGS = ["--optimizer", "adamw", "--gradient_checkpointing", "--cpu_offload"]


def run_child(args: list[str], nproc: int = 1, script: str = __file__) -> dict:
    """Run `script` (this bench or another using its machinery) with `args` ("--child", name, ...) in a fresh process,
    so that an out-of-memory configuration cannot take the others down; returns its last JSON line."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]  # fmt: skip
    proc = subprocess.run([*launcher, script, *args], capture_output=True, text=True)
    if os.environ.get("BENCH_LOG_DIR"):  # the child's log (stderr), e.g. with TORCH_LOGS=recompiles
        (Path(os.environ["BENCH_LOG_DIR"]) / f"{args[1]}.log").write_text(proc.stderr[-2_000_000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return dict(args=" ".join(args), error=f"exit {proc.returncode}: {proc.stderr[-600:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--warmup_steps", type=int, default=4)
    parser.add_argument("--timed_steps", type=int, default=10)
    parser.add_argument("--memory_search", action="store_true", help="only the 24 GiB largest-batch search")
    parser.add_argument("--memory_cap_gib", type=float, default=24.0)
    parser.add_argument("--offload", action="store_true", help="the memory search with --cpu_offload")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "sdxl_bench_train"))
    parser.add_argument("--smoke", action="store_true", help="tiny model and cache on CPU: checks the script runs")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (processes under torchrun) per configuration")
    parser.add_argument("--sharding", default="auto", help="the trainer's --sharding for every configuration")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    if args.child:
        extra = ("--sharding", args.sharding)
        r = run_trainer(work, args.child, args.warmup_steps, args.timed_steps, args.cap or None, args.smoke, extra)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(r), flush=True)
        return

    torch.backends.cuda.matmul.allow_tf32 = True
    steps = args.warmup_steps + args.timed_steps
    common = ["--warmup_steps", str(args.warmup_steps), "--timed_steps", str(args.timed_steps), "--work_dir", str(work),
              "--sharding", args.sharding]  # fmt: skip
    if args.smoke:
        from sdxl_trainer.models.tiny import TE2_PROJECTION, save_tiny_sdxl_pipeline

        if not (work / "model").exists():
            save_tiny_sdxl_pipeline(work / "model")
        write_cache(work / "cache" / "tiny", 16, [(64, 64), (64, 96)], context_dim=80, pooled_dim=TE2_PROJECTION)
        for name in [n for n in CONFIGS if not args.only or n in args.only.split(",")]:
            print(json.dumps(run_child(["--child", name, "--smoke", *common], args.nproc)), flush=True)
        return
    write_model(work / "model")
    write_cache(work / "cache" / "random1024", items_per_bucket=max(8 * 32 // len(BUCKETS_WH), 16))
    print(json.dumps(dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), steps=steps)), flush=True)

    baseline = run_child_levers("original_recipe_fp32w_fp16amp_ckpt_bnb8bit")
    print(json.dumps(baseline), flush=True)
    base_rate = baseline.get("images_per_s")
    if not args.memory_search:
        wanted = [w for w in args.only.split(",") if w]
        for name in CONFIGS:
            if wanted and name not in wanted:
                continue
            r = run_child(["--child", name, *common], args.nproc)
            if base_rate and "images_per_s" in r:
                r["ratio_to_original_recipe"] = round(r["images_per_s"] / base_rate, 2)
            print(json.dumps(r), flush=True)
    if args.memory_search or not args.only:
        largest = 0
        for batch in (1, 2, 4, 6, 8, 10, 12, 16):
            name = f"{'offload' if args.offload else 'memory'}_B{batch}"
            r = run_child(["--child", name, "--cap", str(args.memory_cap_gib), *common], args.nproc)
            print(json.dumps(r), flush=True)
            if "error" in r:
                break
            largest = batch
        flags = OFFLOAD_FLAGS if args.offload else MEMORY_FLAGS
        summary = dict(name="memory_search", memory_cap_gib=args.memory_cap_gib, largest_batch=largest, flags=flags)
        print(json.dumps(summary), flush=True)


BASELINE_STEPS = 15  # timed steps of the original recipe (bench_levers' default 5 moved it 7.9-9.7 on one H200)


def run_child_levers(name: str, steps: int = BASELINE_STEPS) -> dict:
    script = Path(__file__).resolve().parent / "bench_levers.py"
    argv = [sys.executable, str(script), "--child", name, "--steps", str(steps)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else dict(name=name, error=proc.stderr[-300:])


if __name__ == "__main__":
    main()
