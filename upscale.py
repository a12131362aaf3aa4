"""Upscale images with any ESRGAN-family model (Real-ESRGAN x4plus, 4x_foolhardy_Remacri, Real-ESRGAN Compact,
...) and optionally restore faces with GFPGAN v1.3/v1.4. Weights are local .pth/.safetensors files, loaded once
through spandrel; the network runs tiled at its native scale and the result is resampled (Lanczos) to exactly
--scale times the input size. Writes PNGs (or --format) under --output with the input's relative paths.

Example: python upscale.py --input photos/ --output photos_x2/ --model RealESRGAN_x4plus.pth --scale 2
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from sdxl_trainer.arg_types import HelpFormatter
from sdxl_trainer.upscaling.folders import MAX_OUTPUT_PIXELS, MAX_SCALE, OUTPUT_FORMATS, upscale_files
from sdxl_trainer.upscaling.model_files import UpscalerError
from sdxl_trainer.upscaling.upscaler import Upscaler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, help="an image file or a folder (searched recursively)")
    parser.add_argument("--output", required=True, help="output folder (must not be inside --input)")
    parser.add_argument("--model", required=True, help="super-resolution weights (.pth/.safetensors), e.g. x4plus")
    parser.add_argument("--scale", type=float, default=None, help="output size / input size (default: the model's)")
    parser.add_argument("--face_restore_model", default=None, help="GFPGANv1.3.pth / GFPGANv1.4.pth: restore faces")
    parser.add_argument("--tile", type=int, default=512, help="largest input tile in pixels, 0 = whole image")
    parser.add_argument("--tile_overlap", type=int, default=16, help="context pixels per tile side, cropped away")
    parser.add_argument("--batch_size", type=int, default=4, help="tiles or equal-size images per network call")
    parser.add_argument("--half", action="store_true", help="fp16 inference (CUDA only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--format", choices=sorted(OUTPUT_FORMATS), default="png", help="output file type")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    args = parser.parse_args(argv)
    if args.scale is not None and not 0 < args.scale <= MAX_SCALE:
        parser.error(
            f"--scale {args.scale}: must be in (0, {MAX_SCALE:g}] (outputs over {MAX_OUTPUT_PIXELS} px are refused)"
        )
    if args.half and not args.device.startswith("cuda"):
        parser.error(f"--half needs a CUDA --device (got --device {args.device})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        upscaler = Upscaler(
            args.model,
            args.face_restore_model,
            device=args.device,
            tile_px=args.tile,
            half=args.half,
            tile_overlap_px=args.tile_overlap,
            batch_size=args.batch_size,
        )
        report = upscale_files(upscaler, args.input, args.output, args.scale, args.format, args.overwrite)
    except UpscalerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(report.written)} written, {len(report.skipped_existing)} already there (--overwrite to redo), "
        f"{len(report.failed)} failed; {upscaler.faces_restored} face(s) restored"
    )
    for path, reason in report.failed:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
