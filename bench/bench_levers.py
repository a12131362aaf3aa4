"""Measure the speed levers of SDXL UNet training on one GPU, one at a time, in one run.

Full-size random-weight SDXL UNet, 1024 px (128x128 latents), random inputs, no data loading: this isolates
the step itself. Every configuration shards the UNet with FSDP2 on a 1-GPU mesh (fp32 master weights, bf16
compute through MixedPrecisionPolicy, fp32 reduction), as the trainer does, except the first, which is the
original trainer's recipe (fp32 weights, fp16 autocast, gradient checkpointing, bitsandbytes AdamW8bit).
Prints one JSON line per configuration (images/s, peak GiB, share of the 38.5 images/s ceiling, ratio to the
original's recipe measured in the same run).

    python bench/bench_levers.py [--only name1,name2] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdxl_trainer import sdxl_shapes as shapes  # noqa: E402

CEILING_IMAGES_PER_S = 38.5  # performance.md: 20.62 TFLOP per image at the measured 793 TFLOP/s bf16 matmul rate

SDXL_UNET_CONFIG = shapes.UNET


def random_batch(batch_size: int, resolution_px: int = 1024, channels_last: bool = False):
    side = resolution_px // 8
    latents = torch.randn(batch_size, 4, side, side, device="cuda")
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    return dict(
        latents=latents,
        timesteps=torch.randint(0, 1000, (batch_size,), device="cuda"),
        context=torch.randn(batch_size, 77, 2048, device="cuda"),
        pooled=torch.randn(batch_size, 1280, device="cuda"),
        time_ids=torch.tensor(
            [[resolution_px, resolution_px, 0, 0, resolution_px, resolution_px]] * batch_size,
            device="cuda",
            dtype=torch.float32,
        ),
    )


class LocalShardAdamW8bit:
    """bitsandbytes AdamW8bit over each rank's local shards (bnb cannot step DTensors)."""

    def __init__(self, params, lr: float):
        import bitsandbytes as bnb

        self.params = [p for p in params if p.requires_grad]
        self.local = [torch.nn.Parameter(p.to_local() if hasattr(p, "to_local") else p.data) for p in self.params]
        self.inner = bnb.optim.AdamW8bit(self.local, lr=lr)

    def step(self):
        for p, local in zip(self.params, self.local, strict=True):
            local.grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True):
        for p, local in zip(self.params, self.local, strict=True):
            p.grad = None
            local.grad = None


def init_single_gpu_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)


def build_unet(
    fsdp: bool, checkpointing: bool, channels_last: bool, compile_blocks: str | bool, cpu_offload: bool = False
):
    from diffusers import UNet2DConditionModel

    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if compile_blocks:
        # Regional compilation: diffusers compiles every BasicTransformerBlock (one compiled graph serves all the
        # same-shaped layers); the resnets are compiled the same way so GroupNorm+SiLU fuse with their neighbours.
        unet.compile_repeated_blocks()
        if compile_blocks == "regional+resnets":
            for module in unet.modules():
                if type(module).__name__ == "ResnetBlock2D":
                    module.compile()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        init_single_gpu_group()
        mesh = init_device_mesh("cuda", (1,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(unet, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return unet


def build_optimizer(name: str, unet):
    if name == "bnb8bit_plain":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(unet.parameters(), lr=1e-6)
    if name == "bnb8bit_local":
        return LocalShardAdamW8bit(unet.parameters(), lr=1e-6)
    if name == "adamw_fused":
        return torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=True)
    return torch.optim.AdamW(unet.parameters(), lr=1e-6, foreach=True)


def run(cfg: dict, steps: int, baseline: float | None, memory_cap_gib: float | None = None) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_cap_gib * 2**30 / total)
    result = dict(name=cfg["name"], batch=cfg["batch"])
    unet = opt = None
    try:
        unet = build_unet(
            cfg["fsdp"],
            cfg["ckpt"],
            cfg.get("channels_last", False),
            cfg.get("compile", False),
            cfg.get("offload", False),
        )
        opt = build_optimizer(cfg["optim"], unet)
        autocast = cfg.get("autocast")

        def step():
            b = random_batch(cfg["batch"], channels_last=cfg.get("channels_last", False))
            with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
                out = unet(
                    b["latents"],
                    b["timesteps"],
                    b["context"],
                    added_cond_kwargs={"text_embeds": b["pooled"], "time_ids": b["time_ids"]},
                ).sample
            loss = torch.nn.functional.mse_loss(out.float(), b["latents"].float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_warm = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        result["warmup_s"] = round(time.perf_counter() - t_warm, 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        images_per_s = cfg["batch"] * steps / (time.perf_counter() - t0)
        result.update(
            images_per_s=round(images_per_s, 2),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
            share_of_ceiling=round(images_per_s / CEILING_IMAGES_PER_S, 3),
        )
        if baseline:
            result["ratio_to_original_recipe"] = round(images_per_s / baseline, 2)
    except Exception as exc:  # noqa: BLE001 - a failing lever is a result, not a crash of the whole bench
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        unet = opt = None  # noqa: F841 - drop the references before emptying the cache
        if memory_cap_gib:
            torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def cap_config(batch: int, offload: bool) -> dict:
    name = "cpu_offload_adamw" if offload else "bnb8bit_local"
    return dict(
        name=f"cap24GiB_fsdp2_bf16mp_{name}_ckpt_B{batch}",
        batch=batch,
        fsdp=True,
        ckpt=True,
        optim="adamw_foreach" if offload else "bnb8bit_local",
        offload=offload,
        cap_gib=24.0,
        steps=2,
    )


CONFIGS = {
    c["name"]: c
    for c in [
        dict(
            name="original_recipe_fp32w_fp16amp_ckpt_bnb8bit",
            batch=8,
            fsdp=False,
            ckpt=True,
            optim="bnb8bit_plain",
            autocast=torch.float16,
        ),
        dict(name="fsdp2_bf16mp_foreach", batch=8, fsdp=True, ckpt=False, optim="adamw_foreach"),
        dict(name="fsdp2_bf16mp_fused", batch=8, fsdp=True, ckpt=False, optim="adamw_fused"),
        dict(name="fsdp2_bf16mp_bnb8bit_local", batch=8, fsdp=True, ckpt=False, optim="bnb8bit_local"),
        dict(name="fsdp2_bf16mp_foreach_B12", batch=12, fsdp=True, ckpt=False, optim="adamw_foreach"),
        dict(name="fsdp2_bf16mp_fused_ckpt_B16", batch=16, fsdp=True, ckpt=True, optim="adamw_fused"),
        dict(name="fsdp2_bf16mp_bnb8bit_local_ckpt_B32", batch=32, fsdp=True, ckpt=True, optim="bnb8bit_local"),
        dict(
            name="fsdp2_bf16mp_foreach_compile_regional",
            batch=8,
            fsdp=True,
            ckpt=False,
            optim="adamw_foreach",
            compile="regional",
        ),
        dict(
            name="fsdp2_bf16mp_foreach_compile_regional_resnets",
            batch=8,
            fsdp=True,
            ckpt=False,
            optim="adamw_foreach",
            compile="regional+resnets",
        ),
        dict(
            name="fsdp2_bf16mp_foreach_compile_regional_resnets_B12",
            batch=12,
            fsdp=True,
            ckpt=False,
            optim="adamw_foreach",
            compile="regional+resnets",
        ),
        *[cap_config(b, offload) for b in (1, 2, 4, 8) for offload in (False, True)],
    ]
}


def run_in_subprocess(name: str, steps: int) -> dict:
    """Each configuration in its own process: a failed one (out of memory) cannot leak memory into the next."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--steps", str(steps)], capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return dict(name=name, error=f"exit {proc.returncode}: {proc.stderr[-300:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated configuration names or prefixes (default: all)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.child:
        cfg = CONFIGS[args.child]
        run(cfg, cfg.get("steps", args.steps), None, memory_cap_gib=cfg.get("cap_gib"))
        return
    print(json.dumps(dict(torch=torch.__version__, gpu=torch.cuda.get_device_name())), flush=True)
    wanted = [w for w in args.only.split(",") if w]
    baseline = None
    for name in CONFIGS:
        if not name.startswith("original") and wanted and not any(name.startswith(w) for w in wanted):
            continue
        result = run_in_subprocess(name, args.steps)
        if name.startswith("original"):
            baseline = result.get("images_per_s")
        elif baseline and "images_per_s" in result:
            result["ratio_to_original_recipe"] = round(result["images_per_s"] / baseline, 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
