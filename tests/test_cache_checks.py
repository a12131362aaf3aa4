"""The trainer checks which models built its caches and never writes into data or caches (issue 16)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import base_args

from sdxl_trainer.caching.file_hashing import FileHasher
from sdxl_trainer.caching.fingerprint import model_identity
from sdxl_trainer.data import cache_reader
from sdxl_trainer.data.cache_writer import CacheWriter
from sdxl_trainer.training import cache_checks, train_args

TEXT_PARTS = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"]


def _cache(root: Path, model: Path, vae: Path | None = None, data_dir: Path | None = None) -> Path:
    """A one-item cache whose fingerprint names `model`'s text encoders and `vae` (or the model's VAE)."""
    hasher = FileHasher()
    vae_identity = model_identity(hasher, str(vae), [None]) if vae else model_identity(hasher, str(model), ["vae"])
    fingerprint = {
        "image": {"vae": vae_identity},
        "text": {"encoders": model_identity(hasher, str(model), TEXT_PARTS)},
        "info": {"model": str(model), "vae": str(vae) if vae else None, "vae_path": str(vae) if vae else None,
                 "data_dir": str(data_dir) if data_dir else None},
    }  # fmt: skip
    writer = CacheWriter(root, fingerprint)
    writer.write_empty_embeddings(torch.zeros(77, 80), torch.zeros(40))
    tensors = {"latent_mean": torch.zeros(4, 8, 8), "latent_std": torch.zeros(4, 8, 8),
               "prompt_embeds": torch.zeros(77, 80), "pooled_prompt_embeds": torch.zeros(40)}  # fmt: skip
    writer.write_item("a.png", "a", (64, 64), (64, 64), (0, 0), tensors)
    writer.finalize()
    return root


def _variant(model: Path, where: Path, part: str) -> Path:
    """A copy of the model with one part changed (another fine-tune's text encoder, another VAE)."""
    shutil.copytree(model, where)
    config = where / part / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_changed": 1}))
    return where


def _args(model: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(pretrained_model_name_or_path=str(model), single_file_config=None, vae=None, **kw)


def test_a_cache_from_the_same_models_passes_and_another_vae_or_text_encoder_is_refused(tiny_model_dir, tmp_path):
    same = cache_reader.open_dataset_cache(_cache(tmp_path / "c1", tiny_model_dir))
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved")  # a moved model folder still matches
    cache_checks.check_models_and_resolve_vae(_args(moved), [same], log=lambda _: None)

    other_text = _variant(tiny_model_dir, tmp_path / "other_text", "text_encoder_2")
    with pytest.raises(cache_checks.CacheMismatchError, match="text encoders are not those that built the cache"):
        cache_checks.check_models_and_resolve_vae(_args(other_text), [same], log=lambda _: None)
    other_vae = _variant(tiny_model_dir, tmp_path / "other_vae", "vae")
    with pytest.raises(cache_checks.CacheMismatchError, match="not the VAE that built the cache"):
        cache_checks.check_models_and_resolve_vae(_args(other_vae), [same], log=lambda _: None)
    # The model's own VAE given as --vae (its own folder) is the same VAE.
    same_vae = argparse.Namespace(**{**vars(_args(tiny_model_dir)), "vae": str(tiny_model_dir / "vae")})
    cache_checks.check_models_and_resolve_vae(same_vae, [same], log=lambda _: None)
    with pytest.raises(cache_checks.CacheMismatchError, match="--vae"):
        cache_checks.check_models_and_resolve_vae(
            argparse.Namespace(**{**vars(_args(tiny_model_dir)), "vae": str(other_vae / "vae")}), [same], print
        )


def test_the_cache_vae_becomes_the_default_vae(tiny_model_dir, tmp_path):
    vae = shutil.copytree(tiny_model_dir / "vae", tmp_path / "vae-fix")
    cache = cache_reader.open_dataset_cache(_cache(tmp_path / "c", tiny_model_dir, vae=vae))
    args = _args(tiny_model_dir)
    cache_checks.check_models_and_resolve_vae(args, [cache], log=lambda _: None)
    assert args.vae == str(vae)


def test_a_mix_of_caches_from_different_encoders_is_refused_naming_both(tiny_model_dir, tmp_path):
    other = _variant(tiny_model_dir, tmp_path / "other", "text_encoder")
    a = cache_reader.open_dataset_cache(_cache(tmp_path / "a", tiny_model_dir))
    b = cache_reader.open_dataset_cache(_cache(tmp_path / "b", other))
    with pytest.raises(cache_checks.CacheMismatchError, match="different text encoders") as info:
        cache_checks.check_same_models([a, b])
    assert str(a.root) in str(info.value) and str(b.root) in str(info.value)


def test_output_log_and_handoff_folders_inside_data_or_cache_are_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cache = _cache(tmp_path / "cache" / "ds", tiny_model_dir, data_dir=data)
    ok = base_args(tiny_model_dir, tmp_path / "cache", tmp_path / "out")
    train_args.validate_args(train_args.build_parser().parse_args(ok))
    cases = [
        (["--data_dir", str(data), "--output_dir", str(data / "run")], "--output_dir .* inside --data_dir"),
        (["--output_dir", str(data / "run")], "--output_dir .* inside the data folder"),  # recorded by the cache
        (["--log_dir", str(cache / "tb")], "--log_dir .* inside the cache"),
        (["--handoff_dir", str(data / "h")], "--handoff_dir .* inside"),
    ]
    for extra, message in cases:
        args = train_args.build_parser().parse_args([*ok, *extra])
        with pytest.raises(train_args.ArgsError, match=message):
            train_args.validate_args(args)
    assert list(data.iterdir()) == []


@pytest.mark.parametrize("rules", ["garbage", "1:x,0.1", "1:10,0.5:5,0.1", "1:10;0.1"])
def test_bad_lr_step_rules_are_refused_at_start(tiny_model_dir, tmp_path, rules):
    argv = base_args(tiny_model_dir, tmp_path, tmp_path / "out", "--lr_scheduler", "piecewise_constant",
                     "--lr_step_rules", rules)  # fmt: skip
    with pytest.raises(train_args.ArgsError, match="--lr_step_rules"):
        train_args.validate_args(train_args.build_parser().parse_args(argv))
    cache_checks.check_lr_step_rules("1:10,0.1:20,0.01")
