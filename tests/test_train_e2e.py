"""The trainer end to end in one process (the tiny model, a synthetic cache): logging, saving, checkpoints,
exact resume, per-sample time ids, non-finite steps, fp16 loss scaling, start-up checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import base_args, read_metrics, write_synthetic_cache

import sdxl_fsdp_train
from sdxl_trainer.data import dataset, sampler
from sdxl_trainer.distributed import cleanup
from sdxl_trainer.training import loop, loss, objective, setup, sharding, step, train_args
from sdxl_trainer.training.state import TrainingError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    write_synthetic_cache(root / "ds", {(64, 64): 9, (64, 96): 7})
    return root


def _model_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((checkpoint_dir / "model").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _optimizer_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((checkpoint_dir / "optimizer").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_logs_saves_evaluates_and_resumes_exactly(tiny_model_dir, cache_root, tmp_path):
    common = [
        "--num_train_epochs", "2", "--validation_loss", "--validation_loss_percent", "0.2",
        "--validation_loss_every_n_epochs", "1", "--learning_rate_scheduler", "linear", "--lr_warmup_steps", "2",
        "--checkpointing_steps", "3", "--optimizer", "adamw8bit", "--dataloader_num_workers", "1",
    ]  # fmt: skip
    run_a = tmp_path / "a"
    extra_a = ["--checkpoints_total_limit", "2", "--save_model_every_n_epochs", "1", "--save_single_file",
               "--save_samples", "--num_sample_images", "2", "--sample_steps", "2",
               "--save_samples_every_n_epochs", "2", "--handoff_dir", str(tmp_path / "handoff"),
               "--validation_image", "--validation_image_percent", "0.2", "--validation_image_every_n_epochs", "2",
               "--save_validation_images"]  # fmt: skip
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, run_a, *common, *extra_a)) == 0

    steps = read_metrics(run_a)
    config = json.loads((run_a / "config.json").read_text())
    planned = config["total_optimizer_steps"]
    assert [r["step"] for r in steps] == list(range(1, planned + 1)) and planned >= 6
    assert config["validation_items"] == 3 and config["train_items"] == 13
    # Linear schedule of exactly the run's length, stepped once per optimizer step: warm-up then decay to 0.
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3) and 0 < lrs[-1] < lrs[2]
    assert lrs[-1] == pytest.approx(1e-3 / (planned - 2))
    assert all(r["finite"] and r["grad_norm"] > 0 for r in steps)
    validations = read_metrics(run_a, "validation")
    assert [v["epoch"] for v in validations] == [0, 1, 2]  # epoch 0 is the base model
    # Keep-last-2 (every 3 steps plus the final one).
    kept = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    assert len(kept) == 2 and f"step-{planned}" in kept
    final_state = json.loads((run_a / "checkpoints" / f"step-{planned}" / "train_state.json").read_text())
    assert final_state["progress"]["finished_epoch"] == 2 and final_state["progress"]["evaluated_epoch"] == 2
    # Saved models: an fp16 pipeline per epoch and the final one, plus single files; the handoff is gone.
    for name in ("epoch-1", "epoch-2", "final"):
        assert (run_a / name / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (run_a / f"{name}.safetensors").is_file()
    assert (run_a / "final").resolve() == (run_a / "epoch-2").resolve()  # the same weights: a link, not a copy
    assert not (tmp_path / "handoff").exists()
    assert (run_a / "samples").is_dir()
    # Validation images come from the held-out items, at epoch 0 (base model) and epoch 2.
    folders = sorted((run_a / "validation_images").iterdir())
    assert [int(f.name.split("_")[-1]) for f in folders] == [0, 2]
    assert all(len(list(f.rglob("*.png"))) == 3 for f in folders)
    final_unet = load_file(str(run_a / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = {k.split(":", 1)[1]: v for k, v in _model_tensors(run_a / "checkpoints" / f"step-{planned}").items()}
    assert all(v.dtype == torch.float16 for v in final_unet.values())
    for k, v in final_unet.items():
        assert torch.equal(v, trained[k].half()), k
    # What a user looks at.
    assert "validation loss" in (run_a / "train.log").read_text()
    assert list((run_a / "tb").rglob("events.out.tfevents.*"))
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["completed"] and summary["optimizer_steps"] == planned

    # Resume from the older kept checkpoint into a fresh folder: identical losses, LRs and final state.
    run_c = tmp_path / "c"
    resume = ["--resume_from_checkpoint", str(run_a / "checkpoints" / kept[0]), "--no-save_final_model"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, run_c, *common, *resume)) == 0
    start = int(kept[0].split("-")[1])
    resumed = read_metrics(run_c)
    assert [r["step"] for r in resumed] == list(range(start + 1, planned + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in steps[start:]]
    assert [r["lr"] for r in resumed] == lrs[start:]
    assert (run_c / "validation_items.txt").read_text() == (run_a / "validation_items.txt").read_text()
    _assert_same_tensors(_model_tensors(run_a / "checkpoints" / f"step-{planned}"),
                         _model_tensors(run_c / "checkpoints" / f"step-{planned}"))  # fmt: skip
    _assert_same_tensors(_optimizer_tensors(run_a / "checkpoints" / f"step-{planned}"),
                         _optimizer_tensors(run_c / "checkpoints" / f"step-{planned}"))  # fmt: skip


def test_time_ids_reach_the_unet_per_sample_in_order(tiny_model_dir, cache_root, tmp_path):
    argv = base_args(tiny_model_dir, cache_root, tmp_path / "run", "--train_batch_size", "3")
    tr = setup.setup(train_args.parse_args(argv))
    try:
        seen = []
        tr.unet.register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
        )
        plan = sampler.plan_epoch([e.bucket_wh for e in tr.data.training], [], [], 3, 1, 123, 1)
        keys = [[(i, e, 1.0) for i, e in plan.batches[0]]]
        batch = next(iter(dataset.make_loader(tr.data.dataset, keys, 0, False)))
        step.train_step(tr, [batch])
        expected = [list(tr.data.dataset.entries[i].item.time_ids) for i in batch["index"].tolist()]
        assert seen[0].tolist() == expected and seen[0].shape == (3, 6)
        assert len({tuple(r) for r in expected}) == 3  # distinct rows, so a mix-up would show
    finally:
        tr.log.close()
        cleanup()


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    root = tmp_path / "nan_cache"
    write_synthetic_cache(root / "ds", {(64, 64): 4})
    # NaN in the cache is refused item by item (test_cache_integrity.py); a diverging loss is what remains.
    monkeypatch.setattr(loss, "per_sample_loss", lambda p, t, *a, **k: (p - t).float().flatten(1).mean(1) * torch.nan)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="--max_nonfinite_steps 2"):
        loop.main(train_args.parse_args(base_args(tiny_model_dir, root, out, "--max_nonfinite_steps", "2",
                                                   "--num_train_epochs", "3")))  # fmt: skip
    steps = read_metrics(out)
    assert [r["finite"] for r in steps] == [False, False]
    state = json.loads((out / "checkpoints" / "step-2" / "train_state.json").read_text())
    assert state["progress"]["skipped_steps"] == 2
    weights = _model_tensors(out / "checkpoints" / "step-2")
    assert all(torch.isfinite(v).all() for v in weights.values())  # skipped updates left the weights intact


def test_fp16_uses_loss_scaling_and_unscales_before_clipping(tiny_model_dir, cache_root, tmp_path):
    fp32, fp16 = tmp_path / "fp32", tmp_path / "fp16"
    common = ["--max_train_steps", "2", "--no-save_final_model", "--max_grad_norm", "0.5"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, fp32, *common)) == 0
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, fp16, *common, "--mixed_precision", "fp16")) == 0
    a, b = read_metrics(fp32), read_metrics(fp16)
    assert [r["loss_scale"] for r in b] == [65536.0, 65536.0] and a[0]["loss_scale"] is None
    # The norm is in true units (unscaled first), so it matches fp32 up to fp16 rounding, not 65536x.
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=0.05)
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=0.02)


@pytest.mark.parametrize("strategy", ["full_shard", "shard_grad_op", "no_shard", "hybrid_shard"])
def test_every_strategy_builds_its_mesh_and_trains(tiny_model_dir, cache_root, tmp_path, strategy):
    """One process: every FSDP2 strategy gives the losses of the default one-process flat layout (--sharding
    auto = none here; multi-process runs are in test_fsdp_multiprocess.py)."""
    reference, out = tmp_path / "auto", tmp_path / strategy
    common = ["--max_train_steps", "2", "--no-save_final_model"]
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, reference, *common)) == 0
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, out, *common, "--sharding", strategy)) == 0
    a, b = read_metrics(reference), read_metrics(out)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["sharding"] == strategy
    assert json.loads((reference / "config.json").read_text())["sharding"] == "none"


def test_start_up_checks_name_the_flag(tiny_model_dir, cache_root, tmp_path):
    with pytest.raises(dataset.DataError, match="--max_resolution 1024"):
        loop.main(train_args.parse_args(base_args(tiny_model_dir, cache_root, tmp_path / "r", "--max_resolution",
                                                   "1024")))  # fmt: skip


def test_sharding_check_refuses_an_unsharded_unet():
    with pytest.raises(sharding.ShardingError, match="--sharding full_shard"):
        sharding.verify_sharding(torch.nn.Linear(2, 2), None, "full_shard")


def test_diffusion_predict_passes_int_time_ids(tiny_model_dir):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model_dir), subfolder="unet")
    sched = DDPMScheduler.from_pretrained(str(tiny_model_dir), subfolder="scheduler")
    batch = {
        "latents": torch.randn(2, 4, 8, 8), "noise": torch.randn(2, 4, 8, 8), "timesteps": torch.tensor([1, 999]),
        "prompt_embeds": torch.randn(2, 77, 80), "pooled_prompt_embeds": torch.randn(2, 40),
        "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64], [80, 60, 2, 1, 64, 64]]),
    }  # fmt: skip
    prediction, target = objective.predict(unet, sched, batch)
    assert prediction.shape == target.shape == (2, 4, 8, 8)


def test_compiled_blocks_train_as_eager_does(tiny_model_dir, cache_root, tmp_path, monkeypatch):
    """--compile blocks through the real script, with Inductor: 6 steps over both buckets (latents 8x8 and 8x12)
    give eager's losses, and the validation loss runs the compiled blocks eager (it compiles nothing)."""
    from torch._dynamo.utils import counters

    from sdxl_trainer.training import validation

    graphs_during_validation = []
    validation_loss = validation.validation_loss

    def counting_validation_loss(tr):
        before = counters["stats"]["unique_graphs"]
        value = validation_loss(tr)
        graphs_during_validation.append(counters["stats"]["unique_graphs"] - before)
        return value

    monkeypatch.setattr(validation, "validation_loss", counting_validation_loss)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ["--no-save_final_model", "--validation_loss", "--validation_loss_percent", "0.2",
              "--validation_loss_every_n_epochs", "1"]  # fmt: skip
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, eager, *common)) == 0
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache_root, compiled, *common, "--compile", "blocks")) == 0
    a, b = read_metrics(eager), read_metrics(compiled)
    assert len(a) == len(b) == 7  # 13 items, global batch 2: the last epoch also trains the remainder (padded)
    # Inductor reorders fp32 sums: measured at most 6.5e-7 relative over the 6 steps (lr 1e-3).
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert graphs_during_validation == [0, 0, 0, 0]  # epochs 0 and 1 of each run
    logged = re.search(r"--compile blocks \((\d+) modules compiled\)", (compiled / "train.log").read_text())
    assert logged and int(logged.group(1)) > 0
