"""Export a training checkpoint (`<output_dir>/checkpoints/step-<N>/`) as a diffusers SDXL pipeline folder, and
with --single_file also as one original-layout .safetensors next to it (for ComfyUI, A1111/Forge, kohya).

For a run stopped before its next pipeline save, or a checkpoint written by another number of processes: it is read
in one process, on the CPU, whatever layout wrote it. The base model, VAE, scheduler settings and dtype are the
run's (from the checkpoint's config.json) unless given. The trained weights are exported, not an EMA.

    python export_checkpoint.py --checkpoint runs/my-run/checkpoints/step-1200 --output runs/my-run/step-1200 \\
        --single_file
"""

from __future__ import annotations

import argparse
import sys

from sdxl_trainer.arg_types import HelpFormatter
from sdxl_trainer.training.checkpoint_export import ExportError, export
from sdxl_trainer.training.train_args import WEIGHT_DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (checkpoints/step-<N>)")
    parser.add_argument("--output", required=True, help="the pipeline folder to write")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="the run's base model (VAE, text encoders, UNet config; default: the one the checkpoint names)",
    )
    parser.add_argument("--vae", default=None, help="a VAE folder to save instead (default: the run's)")
    parser.add_argument(
        "--weight_dtype",
        choices=sorted(WEIGHT_DTYPES),
        default=None,
        help="dtype of the saved weights (default: the run's)",
    )
    parser.add_argument("--single_file", action="store_true", help="also write <output>.safetensors (original layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = WEIGHT_DTYPES[args.weight_dtype] if args.weight_dtype else None
    try:
        out = export(args.checkpoint, args.output, args.pretrained_model_name_or_path, args.vae, dtype,
                     args.single_file, args.overwrite)  # fmt: skip
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (f" and {out}.safetensors" if args.single_file else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
