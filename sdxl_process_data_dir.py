"""Cache an image/caption folder for SDXL training: VAE latents and text embeddings per aspect bucket.

Reads --data_dir recursively (png jpg jpeg bmp webp tif tiff, caption = same name .txt), never writes to
it, and writes <cache_dir>/<basename>/ (safetensors + JSON, see docs/caching.md). A second run re-encodes
only what changed. Examples:

    python sdxl_process_data_dir.py --data_dir sample_dataset --cache_dir cache \\
        --pretrained_model_name_or_path models/tiny-sdxl
    accelerate launch --num_processes 8 sdxl_process_data_dir.py --data_dir /data/set --cache_dir /cache \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0
    # two machines: add --num_shards 2 --shard_index 0 on one and --shard_index 1 on the other
"""

from __future__ import annotations

import sys

from sdxl_trainer.caching.caching_args import parse_args


def main(argv: list[str] | None = None) -> int:
    """An expected error (a model that does not load, an unusable folder) is one line and exit status 1."""
    from sdxl_trainer import cli

    def run() -> int:
        args = cli.parse_on_rank0(lambda: parse_args(argv, description=__doc__))
        from sdxl_trainer.caching.run import run_caching

        run_caching(args)
        return 0

    return cli.run_main(run, cli.caching_errors)


if __name__ == "__main__":
    sys.exit(main())
