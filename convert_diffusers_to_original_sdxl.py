"""Convert an SDXL diffusers pipeline folder to one .safetensors checkpoint in the original (SGM) layout.

The file holds the UNet, the VAE and both text encoders, as ComfyUI, Automatic1111/Forge and diffusers'
`from_single_file` expect; its header records the source folder's name, the dtype and this project's
version. It is written atomically and never replaces an existing file unless --overwrite is given.

    python convert_diffusers_to_original_sdxl.py --model_path runs/my-run/pipelines/epoch-0010 \\
        --checkpoint_path my-sdxl-finetune.safetensors --dtype fp16
"""

from __future__ import annotations

import argparse
import sys

from sdxl_trainer.arg_types import HelpFormatter
from sdxl_trainer.models.single_file import DTYPES, save_single_file
from sdxl_trainer.models.single_file_keys import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_path", required=True, help="diffusers SDXL pipeline folder (has model_index.json)")
    parser.add_argument("--checkpoint_path", required=True, help="output file, ending in .safetensors")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="dtype of every tensor (default fp16)")
    parser.add_argument("--half", action="store_true", help="same as --dtype fp16 (the original's flag)")
    parser.add_argument(
        "--use_safetensors",
        action="store_true",
        help="accepted for compatibility with the original script; does nothing (safetensors is always written)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --checkpoint_path if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.half and args.dtype not in (None, "fp16"):
        parser.error(f"--half means --dtype fp16 but --dtype {args.dtype} was given; pass only one")
    dtype = "fp16" if args.half or args.dtype is None else args.dtype
    try:
        out = save_single_file(args.model_path, args.checkpoint_path, dtype=dtype, overwrite=args.overwrite)
    except ConversionError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {out} ({dtype})")


if __name__ == "__main__":
    main()
