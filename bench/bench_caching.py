"""Measure the caching step's images/s against the encode-only rate of the same models, in one run.

Writes N random-content JPEGs at 1024x1024 into a temporary folder, builds a full-size random-weight SDXL
VAE and both SDXL text encoders (CLIP ViT-L/14 text tower; OpenCLIP bigG text tower with its 1280-d
projection) as a diffusers folder, with a tokenizer built locally from CLIP's real BPE merges (nothing is
downloaded), then for each configuration:
  * runs the real caching function (sdxl_trainer.caching.run.run_caching: decode in DataLoader workers, batched
    GPU encoding, atomic writes) over the folder into a fresh cache, and
  * times the same models on pre-made GPU tensors (VAE encode of a (B, 3, 1024, 1024) batch + both text
    encoders on B captions), which is the ceiling for the caching step.
Prints one JSON line per configuration: caching images/s (steady: after the first batch, i.e. without model
loading; and whole run), encode-only images/s, their ratio (target >= 0.9, performance.md) and peak GiB.

    python bench/bench_caching.py [--num_images 512] [--batch_sizes 8,16] [--num_workers 8]
    python bench/bench_caching.py --smoke          # tiny sizes, runs on CPU in seconds (checks the script)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_trainer.caching.caching_args import CachingArgs  # noqa: E402
from sdxl_trainer.caching.run import run_caching  # noqa: E402
from sdxl_trainer.models import loading  # noqa: E402
from sdxl_trainer.models.tiny import _clip_bpe_merges, write_clip_tokenizer_files  # noqa: E402

CLIP_MERGES = 48894  # CLIP's BPE: 256 bytes x2 + 48894 merges + 2 special tokens = 49408 tokens

# SDXL base 1.0 shapes (configs of stabilityai/stable-diffusion-xl-base-1.0, written out here).
SDXL_TE1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
SDXL_TE2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280)  # fmt: skip
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024)
SMOKE_TE1 = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu", projection_dim=32)  # fmt: skip
SMOKE_TE2 = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="gelu", projection_dim=40)  # fmt: skip
SMOKE_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=128)


def build_models(folder: Path, smoke: bool, device: torch.device) -> Path:
    """Random-weight VAE + text encoders + tokenizers in diffusers' folder layout (what caching loads)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    merges = _clip_bpe_merges(2000 if smoke else CLIP_MERGES)
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_clip_tokenizer_files(folder / name, merges)
        tokenizer = CLIPTokenizer(str(folder / name / "vocab.json"), str(folder / name / "merges.txt"), pad_token=pad)
        tokenizer.model_max_length = 77
        tokenizer.save_pretrained(folder / name)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, layer_norm_eps=1e-5,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute for bigG
        te1 = CLIPTextModel(CLIPTextConfig(**common, **(SMOKE_TE1 if smoke else SDXL_TE1)))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **(SMOKE_TE2 if smoke else SDXL_TE2)))
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.13025,
            force_upcast=False,
            **(SMOKE_VAE if smoke else SDXL_VAE),
        )
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    vae.save_pretrained(folder / "vae")
    return folder


def write_images(folder: Path, count: int, size_px: int) -> None:
    """Random content (smooth colour fields plus noise, so JPEG sizes are realistic) with short captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px
    for i in range(count):
        c = rng.uniform(0, 255, (3, 3))
        field = c[0] * xx[..., None] + c[1] * yy[..., None] + c[2] * (1 - xx[..., None])
        pixels = np.clip(field / 2 + rng.normal(0, 12, (size_px, size_px, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", quality=90)
        (folder / f"img_{i:05d}.txt").write_text(f"a random picture number {i}, colourful gradient with noise")


@torch.inference_mode()
def encode_only_rate(model_dir: Path, device: torch.device, batch: int, size_px: int, steps: int, dtype) -> float:
    """Images/s of VAE encode + both text encoders on pre-made device tensors (no data loading, no writing)."""
    vae = loading.load_vae(str(model_dir)).to(device).eval()
    text = loading.load_text_encoders(str(model_dir))
    te1, te2 = text.text_encoder.to(device).eval(), text.text_encoder_2.to(device).eval()
    x = torch.rand(batch, 3, size_px, size_px, device=device) * 2 - 1
    ids = text.tokenizer(["a random picture, colourful gradient with noise"] * batch, padding="max_length",
                         max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def step():
        with autocast:
            posterior = vae.encode(x).latent_dist
            _ = (posterior.mean, posterior.std)
            te1(ids, output_hidden_states=True)
            te2(ids, output_hidden_states=True)

    step()  # warm-up (cudnn autotuning, allocator)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--size_px", type=int, default=1024)
    parser.add_argument("--batch_sizes", default="8,16", help="comma-separated VAE batch sizes to measure")
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--mixed_precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--encode_steps", type=int, default=20, help="timed batches for the encode-only rate")
    parser.add_argument("--work_dir", default=None, help="where the temporary images/models/caches go")
    parser.add_argument("--smoke", action="store_true", help="tiny models and images: checks the script on CPU")
    parser.add_argument("--profile", default=None, help="write a cProfile table of the caching run's main thread here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.size_px, args.batch_sizes, args.num_workers, args.encode_steps = 6, 128, "2", 0, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="bench_caching_") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        model_dir = build_models(work / "model", args.smoke, device)
        write_images(work / "data", args.num_images, args.size_px)
        setup_s = time.perf_counter() - started
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            caching_args = CachingArgs(
                data_dir=str(work / "data"), cache_dir=str(work / f"cache_b{batch}"), basename="bench",
                pretrained_model_name_or_path=str(model_dir), min_resolution=256 if not args.smoke else 64,
                max_resolution=args.size_px, batch_size=batch, num_workers=args.num_workers,
                mixed_precision=args.mixed_precision,
            )  # fmt: skip
            run_started = time.perf_counter()
            if args.profile:
                import cProfile
                import io
                import pstats

                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")  # every host-device sync warns, with where it was
                profiler = cProfile.Profile()
                report = profiler.runcall(run_caching, caching_args)
                table = io.StringIO()
                pstats.Stats(profiler, stream=table).sort_stats("cumulative").print_stats(45)
                Path(args.profile).write_text(table.getvalue())
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            else:
                report = run_caching(caching_args)
            wall_s = time.perf_counter() - run_started
            peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            encode_rate = encode_only_rate(model_dir, device, batch, args.size_px, args.encode_steps, dtype)
            steady = report.get("steady_images_per_second") or report["images_per_second"]
            print(json.dumps({
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "batch_size": batch, "num_workers": args.num_workers, "size_px": args.size_px,
                "num_images": args.num_images, "mixed_precision": args.mixed_precision, "smoke": args.smoke,
                "cached": report["cached"],
                "caching_images_per_s": round(steady, 2),
                "caching_images_per_s_whole_run": round(args.num_images / wall_s, 2),
                "encode_only_images_per_s": round(encode_rate, 2),
                "ratio": round(steady / encode_rate, 3),
                "peak_gib": None if peak_gib is None else round(peak_gib, 2),
                "setup_s": round(setup_s, 1), "wall_s": round(wall_s, 1),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
