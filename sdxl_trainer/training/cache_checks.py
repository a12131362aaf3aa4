"""Trainer flags and checks that make the data trustworthy (issue 16): the cache was built by the text encoders and
VAE this run uses (and every cache by the same ones), no write lands in a data folder or a cache, and `--vae`
(the VAE of samples, validation images and saved pipelines) defaults to the one the cache recorded.

Models are compared by content (the sha256 identities the caching step records, `caching.fingerprint`): a moved
model folder still matches, another fine-tune's text encoders do not. The hashes are memoised by path, size and
mtime in each cache's `.file_hashes.json` (read, never written here), so a model the caching step saw is not
re-read at start."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Issue 15's resume check reads this. --vae only decodes samples and validation images and goes into saved
# pipelines; the trained latents come from the cache, whose VAE is checked on every start.
RESUME_RULES = {"vae": "may_change"}


class CacheMismatchError(ValueError):
    """The caches were built with other models than this run uses, or with different ones; names both."""


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("the cache's models")
    g.add_argument(
        "--vae",
        default=None,
        help="VAE (a diffusers AutoencoderKL folder) for samples, validation images and saved pipelines; it must "
        "be the VAE the cache was built with (default: the one the cache recorded: the caching step's --vae, or "
        "the model's own)",
    )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _cache_metas(args: argparse.Namespace) -> list[tuple[Path, dict]]:
    """(dataset cache folder, cache.json) of every cache the flags name; unreadable ones are left to setup."""
    from sdxl_trainer.data import cache_format, cache_reader

    sources = [
        *args.cached_dataset_dirs,
        *(Path(p).parent if Path(p).is_file() else p for p in args.cached_dataset_lists),
    ]
    try:
        roots = cache_reader.find_dataset_caches(sources)
    except cache_format.CacheError:
        return []
    metas = []
    for root in roots:
        try:
            metas.append((root, json.loads((root / cache_format.META_FILE).read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return metas


def protected_folders(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(what, folder) pairs no run may write into: --data_dir, the data folders the caches were built from, and the
    caches themselves."""
    folders = [("--data_dir", Path(args.data_dir).resolve())] if getattr(args, "data_dir", None) else []
    for root, meta in _cache_metas(args):
        folders.append((f"the cache {root}", root))
        data_dir = ((meta.get("fingerprint") or {}).get("info") or {}).get("data_dir")
        if data_dir:
            folders.append((f"the data folder {data_dir} (cached in {root})", Path(data_dir)))
    return folders


def check_args(args: argparse.Namespace) -> None:
    """Before anything is written: output, log and handoff folders outside every data folder and cache, and
    --lr_step_rules well formed (else diffusers fails deep inside the schedule)."""
    outputs = [("--output_dir", args.output_dir or "output"), ("--log_dir", args.log_dir)]
    outputs.append(("--handoff_dir", getattr(args, "handoff_dir", None)))
    protected = protected_folders(args)
    for flag, value in outputs:
        if not value:
            continue
        path = Path(value).resolve()
        for what, folder in protected:
            if _inside(path, folder):
                raise ValueError(
                    f"{flag} {value} is inside {what}: nothing may be written there (the next caching run would "
                    "train on it); choose a folder outside it"
                )
    if args.lr_step_rules is not None:
        check_lr_step_rules(args.lr_step_rules)


def check_lr_step_rules(rules: str) -> None:
    """diffusers' piecewise-constant format: 'multiplier:step,...,final_multiplier' with increasing steps."""
    parts = [p.strip() for p in rules.split(",")]
    example = "e.g. '1:100,0.1:200,0.01' (x1 until step 100, x0.1 until 200, then x0.01)"
    try:
        float(parts[-1])
        steps = []
        for part in parts[:-1]:
            value, step = part.split(":")
            float(value)
            steps.append(int(step))
    except ValueError:
        raise ValueError(f"--lr_step_rules {rules!r}: not 'multiplier:step,...,final_multiplier', {example}") from None
    if steps != sorted(steps) or any(s < 0 for s in steps):
        raise ValueError(f"--lr_step_rules {rules!r}: the steps must be non-negative and increasing, {example}")


# --- at setup, on the opened caches -------------------------------------------------------------------------------


def _models(cache) -> tuple[object, object]:
    fp = cache.fingerprint
    return (fp.get("image") or {}).get("vae"), (fp.get("text") or {}).get("encoders")


def _described(cache) -> str:
    info = cache.fingerprint.get("info") or {}
    vae = f", --vae {info['vae']}" if info.get("vae") else ""
    return f"{cache.root} (cached from {info.get('model', 'an unknown model')}{vae})"


def check_same_models(caches) -> None:
    """Every cache built by the same VAE and text encoders: a mix would train on two latent/embedding spaces."""
    first = caches[0]
    for other in caches[1:]:
        for index, part in ((0, "VAE"), (1, "text encoders")):
            a, b = _models(first)[index], _models(other)[index]
            if _comparable(a, b) and not _same(a, b):
                raise CacheMismatchError(
                    f"--cached_dataset_dirs: the caches {_described(first)} and {_described(other)} were built with "
                    f"different {part}; re-cache one of them with the other's model"
                )


def _comparable(a: object, b: object) -> bool:
    """Both identities known and of the same kind (two folders, or two single files): else nothing to compare."""
    if not isinstance(a, dict) or not isinstance(b, dict) or "unresolved" in a or "unresolved" in b:
        return False
    return ("file" in a) == ("file" in b)


def _same(a: dict, b: dict) -> bool:
    """Folder identities compare by their content hashes only: a VAE given as its own folder (`{".": h}`) is the
    same as a model's `vae` subfolder (`{"vae": h}`) with the same files."""
    if "file" in a:
        return a == b
    return sorted(map(str, a.values())) == sorted(map(str, b.values()))


def check_models_and_resolve_vae(args: argparse.Namespace, caches, log=print) -> None:
    """Refuse caches built by other text encoders or another VAE than this run's model (and --vae); fill --vae
    from the cache when not given. Synthetic caches (no model identities) are not checked."""
    from sdxl_trainer.caching.file_hashing import HASH_MEMO_FILE, FileHasher
    from sdxl_trainer.caching.fingerprint import model_identity

    check_same_models(caches)
    cache = caches[0]
    cached_vae, cached_text = _models(cache)
    if cached_vae is None and cached_text is None:
        return
    info = cache.fingerprint.get("info") or {}
    if args.vae is None and info.get("vae_path"):
        args.vae = info["vae_path"]
        log(f"--vae {args.vae}: the VAE the cache {cache.root} was built with (samples, validation, saved pipelines)")
    hasher = FileHasher(cache.root / HASH_MEMO_FILE)  # read-only here: never saved
    model, config = args.pretrained_model_name_or_path, args.single_file_config
    text = model_identity(hasher, model, ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"], config)
    if _comparable(text, cached_text) and not _same(text, cached_text):
        raise CacheMismatchError(
            f"--pretrained_model_name_or_path {model}: its text encoders are not those that built the cache "
            f"{_described(cache)}; re-run sdxl_process_data_dir.py with this model, or train with that one"
        )
    if args.vae:
        if not Path(args.vae).exists():
            raise CacheMismatchError(f"--vae {args.vae}: no such folder (the cache {cache.root} recorded it)")
        vae = model_identity(hasher, args.vae, [None])
        flag = f"--vae {args.vae}"
    else:
        vae = model_identity(hasher, model, ["vae"], config)
        flag = f"--pretrained_model_name_or_path {model} (its VAE; no --vae given)"
    if _comparable(vae, cached_vae) and not _same(vae, cached_vae):
        raise CacheMismatchError(
            f"{flag}: not the VAE that built the cache {_described(cache)}; samples and saved pipelines would "
            "decode its latents wrongly: pass --vae with the caching VAE, or re-cache"
        )
