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
from sdxl_trainer.models import shapes  # noqa: E402

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
    fsdp: bool,
    checkpointing: bool,
    channels_last: bool,
    compile_blocks: str | bool,
    cpu_offload: bool = False,
    weights_dtype: torch.dtype = torch.float32,
    compile_dynamic: bool | None = False,
):
    from diffusers import UNet2DConditionModel

    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(weights_dtype)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if compile_blocks and compile_blocks != "whole":
        from sdxl_trainer.training.compiling import compile_regions

        compile_regions(unet, compile_blocks, dynamic=compile_dynamic)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if compile_blocks == "whole":
        unet = torch.compile(unet)
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


class MasterWeights:
    """fp32 master weights outside a bf16 compute model (no FSDP): the inner optimizer steps fp32 copies with
    fp32 gradients (cast from the bf16 ones), then the result is cast back into the compute weights."""

    def __init__(self, params, inner: str):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().contiguous().requires_grad_() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        if inner == "bnb8bit":
            import bitsandbytes as bnb

            self.inner = bnb.optim.AdamW8bit(self.master, lr=1e-6)
        else:
            self.inner = torch.optim.AdamW(self.master, lr=1e-6, fused=True)

    def step(self):
        torch._foreach_copy_([m.grad for m in self.master], [p.grad for p in self.params])
        self.inner.step()
        torch._foreach_copy_([p.data for p in self.params], self.master)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


class FlatMasterWeights:
    """Like MasterWeights, but every bf16 weight and gradient is a view into one flat buffer and the fp32 master
    is one flat buffer stepped in a few large chunks: the cast, the step, the clip and the cast back are a
    handful of kernels instead of thousands (bitsandbytes steps one tensor at a time)."""

    CHUNK = 2**29  # elements per optimizer tensor (bitsandbytes indexes with 32-bit ints)

    def __init__(self, params, inner: str, channels_last: bool = False):
        params = [p for p in params if p.requires_grad]
        total = sum(p.numel() for p in params)
        self.compute = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
        self.compute_grad = torch.zeros_like(self.compute)
        offset = 0
        for p in params:
            n = p.numel()

            def view_of(flat, p=p, n=n, offset=offset):
                if channels_last and p.dim() == 4:  # conv weights stored (O, kh, kw, I), seen as (O, I, kh, kw)
                    o, i, kh, kw = p.shape
                    return flat[offset : offset + n].view(o, kh, kw, i).permute(0, 3, 1, 2)
                return flat[offset : offset + n].view(p.shape)

            view = view_of(self.compute)
            view.copy_(p.data)
            p.data = view
            p.grad = view_of(self.compute_grad)
            offset += n
        self.flat_master = self.compute.float()
        self.flat_grad = torch.zeros_like(self.flat_master)
        self.master = []
        for start in range(0, total, self.CHUNK):
            chunk = torch.nn.Parameter(self.flat_master[start : start + self.CHUNK])
            chunk.grad = self.flat_grad[start : start + self.CHUNK]
            self.master.append(chunk)
        if inner == "bnb8bit":
            import bitsandbytes as bnb

            self.inner = bnb.optim.AdamW8bit(self.master, lr=1e-6)
        else:
            self.inner = torch.optim.AdamW(self.master, lr=1e-6, fused=True)

    def step(self):
        self.flat_grad.copy_(self.compute_grad)
        self.inner.step()
        self.compute.copy_(self.flat_master)

    def zero_grad(self, set_to_none: bool = True):
        self.compute_grad.zero_()


def build_optimizer(name: str, unet, channels_last: bool = False):
    if name.startswith("flat_"):
        return FlatMasterWeights(unet.parameters(), name.removeprefix("flat_"), channels_last)
    if name.startswith("master_"):
        return MasterWeights(unet.parameters(), name.removeprefix("master_"))
    if name == "bnb8bit_plain":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(unet.parameters(), lr=1e-6)
    if name == "bnb8bit_local":
        return LocalShardAdamW8bit(unet.parameters(), lr=1e-6)
    if name == "adamw_fused":
        return torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=True)
    return torch.optim.AdamW(unet.parameters(), lr=1e-6, foreach=True)


def sdpa_backends(name: str | None):
    """A context selecting scaled_dot_product_attention's kernel (None: PyTorch's own choice)."""
    import contextlib

    if name is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    return lambda: sdpa_kernel([backend])


KERNEL_CATEGORIES = [  # first match wins; lower-case substrings of CUDA kernel names
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("triton (compiled)", ("triton",)),
    ("conv", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "xmma")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "cublas")),
    ("norm", ("norm", "moments", "welford")),
    ("layout copy", ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "cat")),
    ("optimizer", ("adam", "multi_tensor", "optimizer", "kernel_optimizer")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "silu", "gelu")),
]


def kernel_summary(prof, top: int = 20) -> dict:
    """GPU time of one profiled step by kernel category, and the costliest kernels (what compile could fuse)."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    by_category: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        by_category[category] = by_category.get(category, 0.0) + e.self_device_time_total / 1e3
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return dict(
        gpu_ms=round(total_ms, 1),
        by_category_ms={c: round(ms, 1) for c, ms in sorted(by_category.items(), key=lambda kv: -kv[1])},
        top_kernels=[[e.key[:90], round(e.self_device_time_total / 1e3, 1), e.count] for e in ranked],
    )


def run(
    cfg: dict, steps: int, baseline: float | None, memory_cap_gib: float | None = None, profile: bool = False
) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_cap_gib * 2**30 / total)
    result = dict(name=cfg["name"], batch=cfg["batch"])
    unet = opt = None
    try:
        torch.backends.cudnn.benchmark = cfg.get("cudnn_benchmark", False)
        bf16_weights = cfg["optim"].startswith(("master_", "flat_")) or cfg.get("bf16_weights")
        weights_dtype = torch.bfloat16 if bf16_weights else None
        unet = build_unet(
            cfg["fsdp"],
            cfg["ckpt"],
            cfg.get("channels_last", False),
            cfg.get("compile", False),
            cfg.get("offload", False),
            weights_dtype or torch.float32,
            cfg.get("dynamic", False),
        )
        opt = build_optimizer(cfg["optim"], unet, cfg.get("channels_last", False))
        autocast = cfg.get("autocast")
        attention = sdpa_backends(cfg.get("attention"))

        def step():
            b = random_batch(cfg["batch"], channels_last=cfg.get("channels_last", False))
            if weights_dtype is not None:
                b = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in b.items()}
            with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None), attention():
                out = unet(
                    b["latents"],
                    b["timesteps"],
                    b["context"],
                    added_cond_kwargs={"text_embeds": b["pooled"], "time_ids": b["time_ids"]},
                ).sample
                loss = torch.nn.functional.mse_loss(out.float(), b["latents"].float())
                loss.backward()
            grads_of = opt.master if isinstance(opt, (MasterWeights, FlatMasterWeights)) else list(unet.parameters())
            torch.nn.utils.clip_grad_norm_(grads_of, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_warm = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        result["warmup_s"] = round(time.perf_counter() - t_warm, 1)
        if cfg.get("compile"):
            from torch._dynamo.utils import counters

            result["compiled_graphs"] = counters["stats"]["unique_graphs"]
            result["graph_breaks"] = sum(counters["graph_break"].values())
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
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            with profiler(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            result["profile"] = kernel_summary(prof)
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
            compile="transformers",
        ),
        dict(
            name="fsdp2_bf16mp_foreach_compile_regional_resnets",
            batch=8,
            fsdp=True,
            ckpt=False,
            optim="adamw_foreach",
            compile="blocks",
        ),
        dict(
            name="fsdp2_bf16mp_foreach_compile_regional_resnets_B12",
            batch=12,
            fsdp=True,
            ckpt=False,
            optim="adamw_foreach",
            compile="blocks",
        ),
        *[cap_config(b, offload) for b in (1, 2, 4, 8) for offload in (False, True)],
        dict(
            name="fsdp2_bf16mp_foreach_cudnnbench",
            batch=8,
            fsdp=True,
            ckpt=False,
            optim="adamw_foreach",
            cudnn_benchmark=True,
        ),  # fmt: skip
        dict(
            name="fsdp2_bf16mp_foreach_cudnnattn",
            batch=8,
            fsdp=True,
            ckpt=False,
            optim="adamw_foreach",
            attention="cudnn",
        ),  # fmt: skip
        # No FSDP (one GPU): bf16 compute weights, fp32 master weights held by the optimizer.
        dict(name="bf16_weights_only_fused", batch=8, fsdp=False, ckpt=False, optim="adamw_fused", bf16_weights=True),
        *[
            dict(
                name=f"master_{inner}{'_cl' if cl else ''}{'_bench' if bench else ''}{f'_{attn}' if attn else ''}"
                f"{'_ckpt' if ckpt else ''}{'_compile' if comp else ''}_B{batch}",
                batch=batch,
                fsdp=False,
                ckpt=ckpt,
                optim=f"master_{inner}",
                channels_last=cl,
                cudnn_benchmark=bench,
                attention=attn,
                compile="whole" if comp else False,
            )  # fmt: skip
            for inner, cl, bench, attn, ckpt, comp, batch in [
                ("fused", False, False, None, False, False, 8),
                ("fused", False, True, None, False, False, 8),
                ("fused", True, True, None, False, False, 8),
                ("fused", True, True, "cudnn", False, False, 8),
                ("fused", True, True, "flash", False, False, 8),
                ("bnb8bit", True, True, None, False, False, 8),
                ("fused", True, True, None, False, False, 16),
                ("fused", True, True, None, True, False, 16),
                ("bnb8bit", True, True, None, True, False, 32),
                ("fused", True, True, None, False, True, 8),
                ("fused", True, True, None, False, True, 16),
            ]
        ],
        *[
            dict(
                name=f"flat_{inner}{'_ckpt' if ckpt else ''}{f'_compile_{comp}' if comp else ''}"
                f"{'_dyn' if dyn else ''}{'_cl' if cl else ''}_B{batch}",
                batch=batch,
                fsdp=False,
                ckpt=ckpt,
                optim=f"flat_{inner}",
                compile=comp,
                dynamic=dyn,
                channels_last=cl,
            )  # fmt: skip
            for inner, ckpt, comp, dyn, batch, cl in [
                ("fused", False, None, False, 8, False),
                ("bnb8bit", False, None, False, 8, False),
                ("fused", False, None, False, 12, False),
                ("bnb8bit", True, None, False, 16, False),
                ("fused", False, "whole", False, 8, False),
                ("bnb8bit", False, "whole", False, 8, False),
                ("fused", False, "transformers", False, 8, False),
                ("fused", False, "blocks", False, 8, False),
                ("fused", False, "blocks", True, 8, False),
                ("fused", False, "blocks", False, 12, False),
                ("bnb8bit", False, "blocks", False, 8, False),
                ("bnb8bit", False, "blocks", False, 12, False),
                ("bnb8bit", True, "blocks", False, 16, False),
                ("fused", False, "blocks", False, 8, True),
                ("fused", False, "stages", False, 8, False),
                ("fused", False, "stages", False, 8, True),
                ("fused", False, "stages", True, 8, False),
                ("fused", False, "stages", True, 8, True),
                ("fused", False, "stages", False, 12, True),
                ("bnb8bit", False, "stages", False, 12, True),
            ]
        ],
    ]
}


def run_in_subprocess(name: str, steps: int, profile: bool) -> dict:
    """Each configuration in its own process: a failed one (out of memory) cannot leak memory into the next."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--steps", str(steps), *(["--profile"] if profile else [])],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return dict(name=name, error=f"exit {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(lines[-1])


def _matches(name: str, wanted: str) -> bool:
    return name.startswith(wanted[:-1]) if wanted.endswith("*") else name == wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated names; trailing * matches a prefix (default: all)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="add one profiled step's GPU time by kernel category")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if args.child:
        cfg = CONFIGS[args.child]
        run(cfg, cfg.get("steps", args.steps), None, memory_cap_gib=cfg.get("cap_gib"), profile=args.profile)
        return
    print(json.dumps(dict(torch=torch.__version__, gpu=torch.cuda.get_device_name())), flush=True)
    wanted = [w for w in args.only.split(",") if w]
    baseline = None
    for name in CONFIGS:
        if not name.startswith("original") and wanted and not any(_matches(name, w) for w in wanted):
            continue
        result = run_in_subprocess(name, args.steps, args.profile and not name.startswith("original"))
        if name.startswith("original"):
            baseline = result.get("images_per_s")
        elif baseline and "images_per_s" in result:
            result["ratio_to_original_recipe"] = round(result["images_per_s"] / baseline, 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
