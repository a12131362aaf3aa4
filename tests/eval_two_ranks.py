"""Run one evaluation epoch as one rank of a torchrun group (or alone) and record what this rank generated.

Used by tests/test_evaluation.py: `torchrun --nproc_per_node 2 tests/eval_two_ranks.py CONFIG.json` and the
same function called in-process with world_size 1 must give the same images and scores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(config: dict, rank: int, world_size: int) -> dict:
    import open_clip
    import torch
    from eval_fixtures import TinyFeatures, eval_args

    from sdxl_trainer.data.cache_format import CacheItem
    from sdxl_trainer.evaluation import sampling
    from sdxl_trainer.evaluation.evaluator import Evaluator

    open_clip.add_model_config(Path(config["hps_config"]))
    items = [CacheItem.from_record(r) for r in config["items"]]
    out = Path(config["run_dir"])
    generated: list[str] = []
    original = sampling.generate_images

    def recording(pipe, prompts, *args, **kwargs):
        generated.extend(prompts)
        return original(pipe, prompts, *args, **kwargs)

    sampling.generate_images = recording  # the Evaluator calls it through the module
    try:
        args = eval_args(
            "--save_samples",
            "--num_sample_images", "2",
            "--sample_width_px", "64",
            "--sample_height_px", "64",
            "--sample_steps", "1",
            "--sample_guidance_scale", "1",
            "--validation_image",
            "--save_validation_images",
            "--metrics", "is,fid,kid,hps",
            "--metrics_hps_checkpoint", config["hps_checkpoint"],
            "--metrics_hps_model", "tiny-hps-test",
        )  # fmt: skip
        evaluator = Evaluator(
            args, out, config["model_dir"], ["a caption"], items, Path(config["data_dir"]), rank, world_size,
            torch.device("cpu"), weight_dtype=torch.float32, inception_extractor=TinyFeatures(),
            log=lambda line: None,
        )  # fmt: skip
        result = evaluator.run(0, Path(config["handoff"]))
    finally:
        sampling.generate_images = original
    return {"rank": rank, "generated": generated, "scores": result}


def main() -> None:
    import torch.distributed as dist

    config = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    record = run(config, rank, world_size)
    Path(config["run_dir"], f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
