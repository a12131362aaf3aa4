"""Caching with N processes against one process: images/s of each, and whether the union of the N
processes' cache equals the one-process cache (item sets equal; tensors equal within a tolerance, since
on GPUs batch composition changes the last bits).

    python bench/multi_gpu_caching.py --nproc 8 [--num_images 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_caching import build_models, write_images  # noqa: E402

from sdxl_trainer.data.cache_reader import open_dataset_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cache_with(nproc: int, data: Path, model: Path, cache: Path) -> float:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run([*launcher, str(REPO / "sdxl_process_data_dir.py"), "--data_dir", str(data), "--cache_dir",
                    str(cache), "--pretrained_model_name_or_path", str(model)], check=True, cwd=REPO)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--size_px", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="tiny models and images on CPU")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mgcache_"))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    model = build_models(work / "model", args.smoke, device)
    write_images(work / "data", args.num_images, 128 if args.smoke else args.size_px)
    seconds_1 = cache_with(1, work / "data", model, work / "cache1")
    seconds_n = cache_with(args.nproc, work / "data", model, work / "cacheN")
    one, many = open_dataset_cache(work / "cache1" / "data"), open_dataset_cache(work / "cacheN" / "data")
    same_items = [i.key for i in one.items] == [i.key for i in many.items]
    max_diff = 0.0
    for a, b in zip(one.items, many.items, strict=False):
        ta, tb = one.load_item_tensors(a), many.load_item_tensors(b)
        max_diff = max(max_diff, *((ta[k].float() - tb[k].float()).abs().max().item() for k in ta))
    print(json.dumps(dict(what="caching_processes", nproc=args.nproc, images=args.num_images,
                          wall_s_1_process=round(seconds_1, 1), wall_s_n_processes=round(seconds_n, 1),
                          speedup=round(seconds_1 / seconds_n, 2), same_items=same_items,
                          max_abs_tensor_diff=max_diff)), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
