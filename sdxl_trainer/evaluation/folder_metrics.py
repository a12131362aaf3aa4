"""Score a folder of generated images against a reference folder and captions (the logic of metrics.py).

Pairing is by path without extension: `gen/sub/a.png` pairs with `ref/sub/a.jpg` (LPIPS, and FID/KID with
--paired_reference_only) and with the caption `sub/a.txt` (HPS) in --captions, or next to the generated
image. The trainer's --save_validation_images folders follow this layout, captions included.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from sdxl_trainer.arg_types import HelpFormatter
from sdxl_trainer.atomic_files import give_umask_mode

DEFAULT_OUTPUT = "metrics.json"


def _directions_epilog() -> str:
    from sdxl_trainer.evaluation.score_math import DIRECTIONS, DISPLAY_NAMES

    lines = ["what the numbers mean:"] + [f"  {DISPLAY_NAMES[k]:6} {v}" for k, v in DIRECTIONS.items()]
    lines.append("  FID/KID need many images: FID below ~2048 images is biased high (compare equal-size sets only).")
    return "\n".join(lines)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=_directions_epilog(), formatter_class=HelpFormatter)
    p.add_argument("--generated", required=True, type=Path, help="folder of generated images (searched recursively)")
    p.add_argument("--reference", type=Path, default=None, help="folder of reference images (FID, KID, LPIPS)")
    p.add_argument("--captions", type=Path, default=None, help="folder of <name>.txt captions for HPS (default: "
                   "the .txt next to each generated image)")  # fmt: skip
    p.add_argument("--metrics", default="fid,kid,is,lpips,hps", help="comma list of fid,kid,is,lpips,hps")
    p.add_argument("--metrics_inception_weights", default=None, help="FID/KID/IS: torch-fidelity's Inception file")
    p.add_argument("--metrics_lpips_backbone", default=None, help="LPIPS: torchvision alexnet (or vgg16) weights")
    p.add_argument("--metrics_hps_checkpoint", default=None, help="HPSv2: HPS_v2.1_compressed.pt")
    p.add_argument("--metrics_hps_model", default="ViT-H-14", help="open_clip architecture of the HPS checkpoint")
    p.add_argument(
        "--paired_reference_only",
        action="store_true",
        help="FID/KID against only the reference images that pair with a generated one, fitted to its size "
        "(as the trainer scores); default: the whole reference folder",
    )
    p.add_argument("--batch_size", type=int, default=16, help="images per scorer forward")
    p.add_argument("--kid_subsets", type=int, default=100, help="KID: number of subsets")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="KID: images per subset (clamped to the sets)")
    p.add_argument("--is_splits", type=int, default=10, help="IS: number of splits (clamped to the image count)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file to write the results to (default: <generated folder>.metrics.json beside the scored folder; "
        "never inside the folders that are read)",
    )
    return p


def list_images(folder: Path) -> dict[str, Path]:
    """{relative path without extension: file}, recursive, hidden entries skipped, sorted."""
    from sdxl_trainer.data.images import IMAGE_EXTENSIONS

    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return dict(sorted(found.items()))


def _chunks(seq: Sequence, size: int):
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def score_folders(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Compute the requested scores; returns the JSON payload (scores, counts, skipped lines, meanings)."""
    import numpy as np
    import torch

    from sdxl_trainer.data.images import ImageSkip, load_image
    from sdxl_trainer.evaluation import score_math, support
    from sdxl_trainer.evaluation.scorers import pil_to_uint8_chw

    metrics = score_math.parse_metrics(args.metrics)
    generated = list_images(args.generated)
    if not generated:
        raise ValueError(f"--generated: no images found in {args.generated}")
    reference = list_images(args.reference) if args.reference else {}
    if args.reference and not reference:
        raise ValueError(f"--reference: no images found in {args.reference}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = support.plan_scorers(
        metrics,
        inception_weights=args.metrics_inception_weights,
        lpips_backbone=args.metrics_lpips_backbone,
        hps_checkpoint=args.metrics_hps_checkpoint,
        reference_missing_reason=None if reference else "no --reference folder given",
    )
    notes = dict(plan.skipped)
    scorers = support.build_scorers(plan, device, args.batch_size, args.metrics_hps_model)

    def load(path: Path, size_wh=None):
        try:
            image = load_image(path)
        except ImageSkip as exc:
            notes.setdefault(f"unreadable:{path}", f"{path}: {exc} (left out)")
            return None
        return support.fit_to_size(image, size_wh) if size_wh else image

    captions_dir = args.captions or args.generated
    gen_pool, gen_logits, lpips_values, hps_values, paired_refs = [], [], [], [], []
    for names in _chunks(list(generated), args.batch_size):
        loaded = [(n, im) for n in names if (im := load(generated[n])) is not None]
        tensors = [pil_to_uint8_chw(im) for _, im in loaded]
        if scorers.inception is not None and tensors:
            pool, logits = scorers.inception.features(tensors)
            gen_pool.append(pool)
            gen_logits.append(logits)
        refs = {n: load(reference[n], im.size) for n, im in loaded if n in reference and (scorers.lpips or
                (args.paired_reference_only and scorers.inception))}  # fmt: skip
        refs = {n: pil_to_uint8_chw(r) for n, r in refs.items() if r is not None}
        paired = [(t, refs[n]) for (n, _), t in zip(loaded, tensors, strict=True) if n in refs]
        if scorers.lpips is not None and paired:
            lpips_values += scorers.lpips.distances([a for a, _ in paired], [b for _, b in paired])
        if args.paired_reference_only and scorers.inception is not None and refs:
            paired_refs.append(scorers.inception.features(list(refs.values()))[0])
        if scorers.hps is not None:
            with_caption = [(im, c) for n, im in loaded if (c := _caption(captions_dir, n)) is not None]
            if with_caption:
                hps_values += scorers.hps.scores([im for im, _ in with_caption], [c for _, c in with_caption])

    result: dict[str, float] = {}
    n_gen = sum(p.shape[0] for p in gen_pool)
    if "is" in plan.enabled and n_gen:
        splits = max(1, min(args.is_splits, n_gen))
        result["is"], result["is_std"] = score_math.compute_inception_score(np.concatenate(gen_logits), splits)
    ref_pool = None
    if {"fid", "kid"} & plan.enabled:
        if args.paired_reference_only:
            ref_pool = np.concatenate(paired_refs) if paired_refs else None
        else:
            ref_pool = _reference_features(scorers.inception, reference, load, args.batch_size)
    if ref_pool is not None and ref_pool.shape[0] >= 2 and n_gen >= 2:
        gen = np.concatenate(gen_pool)
        if "fid" in plan.enabled:
            if warning := score_math.fid_sample_size_warning(n_gen, ref_pool.shape[0], gen.shape[1]):
                notes["fid_n"] = warning
            result["fid"] = score_math.compute_fid_from_features(gen, ref_pool)
        if "kid" in plan.enabled:
            size = min(args.kid_subset_size, n_gen, ref_pool.shape[0])
            result["kid"], result["kid_std"] = score_math.compute_kid(gen, ref_pool, args.kid_subsets, size)
    elif {"fid", "kid"} & plan.enabled:
        notes["fid_kid_n"] = "FID/KID not scored: fewer than 2 generated or reference images"
    if "lpips" in plan.enabled:
        if lpips_values:
            result["lpips"] = float(np.mean(lpips_values))
        else:
            notes["lpips_pairs"] = "LPIPS not scored: no generated image has a reference of the same name"
    if "hps" in plan.enabled:
        if hps_values:
            result["hps"] = float(np.mean(hps_values))
        else:
            notes["hps_captions"] = f"HPSv2 not scored: no <name>.txt captions found in {captions_dir}"
    counts = {
        "generated": n_gen or len(generated),
        "reference": 0 if ref_pool is None else int(ref_pool.shape[0]),
        "lpips_pairs": len(lpips_values),
        "hps_captioned": len(hps_values),
    }
    return {
        "scores": result,
        "counts": counts,
        "notes": list(notes.values()),
        "directions": {k: score_math.DIRECTIONS[k] for k in metrics},
        "generated": str(args.generated),
        "reference": str(args.reference) if args.reference else None,
    }


def _caption(folder: Path, name: str) -> str | None:
    path = folder / f"{name}.txt"
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _reference_features(inception, reference: dict[str, Path], load, batch_size: int):
    import numpy as np

    from sdxl_trainer.evaluation.scorers import pil_to_uint8_chw

    pools = []
    for names in _chunks(list(reference), batch_size):
        images = [im for n in names if (im := load(reference[n])) is not None]
        if images:
            pools.append(inception.features([pil_to_uint8_chw(im) for im in images])[0])
    return np.concatenate(pools) if pools else None


def format_table(payload: dict) -> str:
    from sdxl_trainer.evaluation.score_math import DIRECTIONS, DISPLAY_NAMES

    s = payload["scores"]
    rows = [("score", "value", "meaning")]
    for name in ("fid", "kid", "is", "lpips", "hps"):
        if name in s:
            value = f"{s[name]:.4g}"
            if f"{name}_std" in s:
                value += f" ± {s[name + '_std']:.2g}"
            rows.append((DISPLAY_NAMES[name], value, DIRECTIONS[name].split(" (")[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    c = payload["counts"]
    lines.append(
        f"images: {c['generated']} generated, {c['reference']} reference for FID/KID, "
        f"{c['lpips_pairs']} LPIPS pairs, {c['hps_captioned']} with captions"
    )
    return "\n".join(lines)


def default_output(generated: Path) -> Path:
    """`<folder>.metrics.json` beside the generated folder (not the current folder, which may be anywhere)."""
    folder = Path(generated).resolve()
    return folder.with_name(f"{folder.name}.{DEFAULT_OUTPUT}")


def write_json_atomic(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    give_umask_mode(tmp)  # readable by others as the umask allows (mkstemp makes 0600)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    parser = build_parser(description)
    args = parser.parse_args(argv)
    for flag, folder in (
        ("--generated", args.generated),
        ("--reference", args.reference),
        ("--captions", args.captions),
    ):
        if folder is not None and not folder.is_dir():
            parser.error(f"{flag}: {folder} is not a folder")
    from sdxl_trainer.evaluation.score_math import ScoreError

    try:
        payload = score_folders(args)
    except (ValueError, ScoreError) as exc:
        parser.error(str(exc))
    for line in payload["notes"]:
        print(line)
    print(format_table(payload))
    output = args.output or default_output(args.generated)
    write_json_atomic(payload, output)
    print(f"wrote {output}")
    return 0
