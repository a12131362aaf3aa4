"""Upscaling throughput: images/s for 512 px -> 1024 px with a random-weight RealESRGAN_x4plus-shaped network.

The network is the real x4plus shape (RRDBNet, 64 filters, 23 blocks, 16.7 M parameters) with random weights,
saved as a .pth in the release key layout and loaded through sdxl_trainer.upscaling.upscaler.Upscaler, exactly as
caching and upscale.py load it. It runs at its native x4 (512 -> 2048), then PIL Lanczos shrinks to 1024: the
work caching does for a 512 px image headed for a 1024 bucket. Configurations: fp32 / fp16, whole image / tiled,
one or several images per network call. One JSON line per configuration:
images_per_s is end to end (PIL in, PIL out at 1024 px), network_images_per_s is the network alone.

    python bench/bench_upscale.py                 # on a CUDA GPU
    python bench/bench_upscale.py --smoke         # tiny network, tiny images, CPU: checks the script runs
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
from PIL import Image, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from upscale_fixtures import esrgan_state_dict, save_weights  # noqa: E402

from sdxl_trainer.upscaling.model_files import clear_model_cache  # noqa: E402
from sdxl_trainer.upscaling.tiles import pil_to_tensor  # noqa: E402
from sdxl_trainer.upscaling.upscaler import Upscaler  # noqa: E402

# (name, half, tile_px, batch_size)
GPU_CONFIGS = [
    ("fp32_whole_b1", False, 0, 1),
    ("fp32_tile256_b4", False, 256, 4),
    ("fp16_whole_b1", True, 0, 1),
    ("fp16_whole_b4", True, 0, 4),
    ("fp16_tile256_b4", True, 256, 4),
    ("fp16_tile256_b9", True, 256, 9),
    ("fp16_tile128_b16", True, 128, 16),
]
SMOKE_CONFIGS = [("fp32_whole_b1", False, 0, 1), ("fp32_tile16_b4", False, 16, 4), ("fp32_whole_b2", False, 0, 2)]


def test_images(count: int, side_px: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray((rng.random((side_px, side_px, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
        for _ in range(count)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(upscaler: Upscaler, images: list[Image.Image], out_px: int, device: torch.device) -> dict:
    batch = upscaler.batch_size
    sizes = [(out_px, out_px)] * len(images)
    upscaler.upscale_many(images[:batch], sizes[:batch])  # warm-up: kernels, allocator
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        upscaler.upscale_many(images[i : i + batch], sizes[i : i + batch])
    sync(device)
    end_to_end_s = time.perf_counter() - start
    tensors = [pil_to_tensor(image, 3) for image in images]
    start = time.perf_counter()
    for i in range(0, len(tensors), batch):
        upscaler.run_network(tensors[i : i + batch])
    sync(device)
    network_s = time.perf_counter() - start
    return {
        "images": len(images),
        "seconds": round(end_to_end_s, 3),
        "images_per_s": round(len(images) / end_to_end_s, 3),
        "network_images_per_s": round(len(images) / network_s, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny network and images on CPU (seconds)")
    parser.add_argument("--images", type=int, default=36, help="images per configuration (GPU)")
    parser.add_argument("--only", default=None, help="comma-separated configuration names")
    parser.add_argument("--cudnn_benchmark", action="store_true", help="let cuDNN pick convolution algorithms")
    args = parser.parse_args(argv)

    if args.smoke:
        device, in_px, out_px, count, configs = torch.device("cpu"), 24, 48, 4, SMOKE_CONFIGS
        shape = dict(num_blocks=1, num_filters=16)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (use --smoke to check the script on CPU)")
        device, in_px, out_px, count, configs = torch.device("cuda"), 512, 1024, args.images, GPU_CONFIGS
        shape = dict(num_blocks=23, num_filters=64)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in configs if c[0] in wanted]
    images = test_images(count, in_px)
    with tempfile.TemporaryDirectory() as folder:
        weights = save_weights(esrgan_state_dict(**shape, seed=0), Path(folder) / "RealESRGAN_x4plus_random.pth")
        for name, half, tile_px, batch_size in configs:
            upscaler = Upscaler(
                str(weights),
                device=device,
                tile_px=tile_px,
                half=half,
                batch_size=batch_size,
                tile_overlap_px=4 if args.smoke else 16,
            )
            row = {
                "config": name,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "model": f"RRDBNet x4 {shape['num_filters']}nf {shape['num_blocks']}nb (random weights)",
                "in_px": in_px,
                "out_px": out_px,
                "dtype": str(upscaler.dtype).removeprefix("torch."),
                "tile_px": tile_px,
                "tile_overlap_px": upscaler.tile_overlap_px,
                "batch_size": batch_size,
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),  # fp32 convolutions may use TF32
            }
            try:
                row.update(measure(upscaler, images, out_px, device))
            except torch.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            print(json.dumps(row), flush=True)
            del upscaler
            clear_model_cache()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
