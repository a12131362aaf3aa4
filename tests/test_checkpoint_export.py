"""export_checkpoint.py: a checkpoint's UNet as a pipeline, read in one process whatever layout wrote it; the
same weights as the trainer's own save at that step; refusals that name the flag, the checkpoint never written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_helpers import base_args, safetensors_in, write_synthetic_cache

import export_checkpoint
import sdxl_fsdp_train


def _unet(pipeline) -> dict[str, torch.Tensor]:
    return safetensors_in(pipeline / "unet")


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """2 steps on the flat layout, a checkpoint and the final pipeline at step 2 (the model beside, as `model`)."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_model_dir, root / "model")
    cache = write_synthetic_cache(root / "cache", {(64, 64): 4})
    out = root / "run"
    assert sdxl_fsdp_train.main(base_args(root / "model", cache, out, "--max_train_steps", "2",
                                          "--checkpointing_steps", "2")) == 0  # fmt: skip
    return out


def test_the_export_is_the_trainers_own_save_at_that_step(run, tmp_path):
    checkpoint = run / "checkpoints" / "step-2"
    before = sorted((p.relative_to(checkpoint), p.stat().st_mtime_ns) for p in checkpoint.rglob("*"))
    assert export_checkpoint.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "s2"),
                                   "--single_file"]) == 0  # fmt: skip
    final = run / "final"
    assert final.exists()
    ours, theirs = _unet(tmp_path / "s2"), _unet(final)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert {v.dtype for v in ours.values()} == {torch.float16}  # the run's --weight_dtype
    assert (tmp_path / "s2.safetensors").is_file() and (tmp_path / "s2" / "vae").is_dir()
    assert sorted((p.relative_to(checkpoint), p.stat().st_mtime_ns) for p in checkpoint.rglob("*")) == before
    assert export_checkpoint.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "bf"),
                                   "--weight_dtype", "bf16"]) == 0  # fmt: skip
    assert {v.dtype for v in _unet(tmp_path / "bf").values()} == {torch.bfloat16}


def test_refusals_name_the_flag(run, tmp_path, capsys):
    checkpoint = run / "checkpoints" / "step-2"

    def refused(*argv: str, says: str) -> None:
        assert export_checkpoint.main(list(argv)) == 2
        assert says in capsys.readouterr().err

    (tmp_path / "taken").mkdir()
    refused("--checkpoint", str(checkpoint), "--output", str(tmp_path / "taken"), says="--overwrite")
    (tmp_path / "file.safetensors").write_bytes(b"mine")  # the single file beside a new --output
    refused("--checkpoint", str(checkpoint), "--output", str(tmp_path / "file"), "--single_file", says="--overwrite")
    assert (tmp_path / "file.safetensors").read_bytes() == b"mine"
    refused("--checkpoint", str(checkpoint), "--output", str(checkpoint / "x"), says="never written to")
    refused("--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), says="not a checkpoint folder")
    refused("--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"), "--pretrained_model_name_or_path",
            str(tmp_path / "moved"), says="--pretrained_model_name_or_path")  # fmt: skip
    other = tmp_path / "other-model"  # the same pipeline with one more transformer layer: other UNet weights
    shutil.copytree(run.parent / "model", other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["transformer_layers_per_block"] = [1, 3]
    (other / "unet" / "config.json").write_text(json.dumps(config))
    refused("--checkpoint", str(checkpoint), "--output", str(tmp_path / "o"), "--pretrained_model_name_or_path",
            str(other), says="does not hold the weights")  # fmt: skip
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    next((damaged / "model").glob("*.safetensors")).write_bytes(b"")
    refused("--checkpoint", str(damaged), "--output", str(tmp_path / "o"), says="damaged or incomplete")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_two_rank_fsdp2_checkpoint_exports_in_one_process(tiny_model_dir, tmp_path):
    """FSDP2 on 2 gloo processes writes each rank's shards; read in one process they give the weights a
    one-process run with the same global batch reaches."""
    from test_fsdp_multiprocess import two_ranks_and_one_process

    flags = ["--checkpointing_steps", "3"]
    _, _, two = two_ranks_and_one_process(tiny_model_dir, tmp_path, flags, flags)
    assert len(list((two / "checkpoints" / "step-3" / "model").glob("*.safetensors"))) == 2  # one per rank
    for name in ("two", "one"):
        argv = ["--checkpoint", str(tmp_path / name / "checkpoints" / "step-3"), "--output", str(tmp_path / f"x{name}"),
                "--weight_dtype", "fp32"]  # fmt: skip
        assert export_checkpoint.main(argv) == 0
    a, b, base = _unet(tmp_path / "xtwo"), _unet(tmp_path / "xone"), _unet(tiny_model_dir)
    assert a.keys() == b.keys() == base.keys()
    # The update of 3 AdamW steps is the same to 1 % of its size (AdamW turns rounding differences of near-zero
    # gradients into step-sized differences of a few elements); a shard read wrongly or missed would be 100 %.
    update = sum((b[k] - base[k].float()).pow(2).sum() for k in a).sqrt()
    apart = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    assert update > 0.01 and apart < 0.01 * update
