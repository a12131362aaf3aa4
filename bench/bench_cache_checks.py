"""What the cache's integrity checks cost on every read (issue 16), against a training step.

Every `DatasetCache.load_item_tensors` checks the item's tensors against the checksum in the index (sha256 over
names, dtypes, shapes and bytes) and their values (finite, inside fp16's range). This measures, for SDXL-size
items (1024 px buckets: latents 4x128x128 mean and std, embeddings 77x2048, fp16 as cached), the CPU time per
item of reading without checks (safetensors load only, which maps the file without touching the data) and with
them, in one process on one thread (a DataLoader worker does exactly this). In the same run it times one
SDXL-base-shaped UNet forward+backward in bf16 on the GPU (random weights, batch 8, gradient checkpointing) to
express the checks as a share of the step time per image; without a GPU the performance.md ceiling (38.5
images/s on an H200) stands in. The checks run in DataLoader workers, beside the step, so this share is an
upper bound of what they can slow training (it is zero while the workers keep up).

    python bench/bench_cache_checks.py 2>&1 | grep '^{'
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import load_file  # noqa: E402

from sdxl_trainer.data import cache_reader  # noqa: E402
from sdxl_trainer.data.cache_writer import CacheWriter  # noqa: E402

CEILING_IMAGES_PER_S = 38.5  # performance.md: the H200 bf16 ceiling of an SDXL training step
ITEMS = 64


def write_items(root: Path, count: int) -> cache_reader.DatasetCache:
    g = torch.Generator().manual_seed(0)
    writer = CacheWriter(root, fingerprint={"image": {}, "text": {}})
    writer.write_empty_embeddings(torch.zeros(77, 2048).half(), torch.zeros(1280).half())
    for i in range(count):
        tensors = {
            "latent_mean": torch.randn(4, 128, 128, generator=g).half(),
            "latent_std": (0.1 * torch.rand(4, 128, 128, generator=g)).half(),
            "prompt_embeds": torch.randn(77, 2048, generator=g).half(),
            "pooled_prompt_embeds": torch.randn(1280, generator=g).half(),
        }
        writer.write_item(f"img_{i:05d}.png", f"caption {i}", (1024, 1024), (1024, 1024), (0, 0), tensors)
    writer.finalize()
    return cache_reader.open_dataset_cache(root)


def per_item_ms(fn, items, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - start) / len(items) * 1e3)
    return statistics.median(times)


def step_ms_per_image(batch: int = 8) -> tuple[float, str]:
    """One SDXL UNet forward+backward in bf16 per image, on the GPU; else the ceiling."""
    if not torch.cuda.is_available():
        return 1e3 / CEILING_IMAGES_PER_S, "performance.md ceiling (no GPU)"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_levers import SDXL_UNET_CONFIG, random_batch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).cuda().to(torch.bfloat16)
    unet.enable_gradient_checkpointing()
    b = random_batch(batch)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(
                b["latents"].bfloat16(), b["timesteps"], encoder_hidden_states=b["context"].bfloat16(),
                added_cond_kwargs={"text_embeds": b["pooled"].bfloat16(), "time_ids": b["time_ids"]},
            ).sample  # fmt: skip
        out.float().pow(2).mean().backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats / batch * 1e3, f"SDXL UNet fwd+bwd bf16, batch {batch}, measured"


def main() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets one thread there)
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_items(Path(tmp) / "ds", ITEMS)
        items = cache.items
        for item in items:  # warm the page cache: the comparison is CPU work, not disk
            load_file(str(cache.root / item.tensor_file))
        plain = per_item_ms(lambda it: load_file(str(cache.root / it.tensor_file)), items)
        checked = per_item_ms(cache.load_item_tensors, items)
    torch.set_num_threads(threads)
    step_ms, step_source = step_ms_per_image()
    check_ms = checked - plain
    print(
        json.dumps(
            {
                "bench": "cache_checks",
                "item": "1024x1024 bucket, fp16: latents 2x4x128x128, prompt 77x2048, pooled 1280",
                "read_ms_per_item": round(plain, 3),
                "read_and_check_ms_per_item": round(checked, 3),
                "check_ms_per_item": round(check_ms, 3),
                "step_ms_per_image": round(step_ms, 2),
                "step_source": step_source,
                "check_share_of_step_percent_one_worker": round(100 * check_ms / step_ms, 2),
                # the trainer's default --dataloader_num_workers 2 share the reads (and run beside the GPU step)
                "check_share_of_step_percent_two_workers": round(100 * check_ms / (2 * step_ms), 2),
                "verdict": "under 2% of a step: check on every read"
                if check_ms / (2 * step_ms) < 0.02
                else "above 2% of a step: check on first read only",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
