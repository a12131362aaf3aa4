"""Weights & Biases logging (issue 17) with a fake `wandb` module: the same scalars, images and summary as
TensorBoard, the x-axis per metric, offline without network, the run id kept across resumes, and the error when
the package is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fake_wandb import FakeImage, make_module

from sdxl_trainer.training import run_log, train_args, wandb_log


@pytest.fixture
def fake_wandb(monkeypatch):
    module = make_module()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _tb_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_both_destinations_get_the_same_scalars_images_and_summary(fake_wandb, tmp_path):
    log = run_log.RunLogger(True, tmp_path, tmp_path / "tb", 3, 0, report_to=["tensorboard", "wandb"],
                            wandb_settings={"project": "p", "mode": "offline", "config": {"lr": 1e-3}})  # fmt: skip
    for step in (1, 2, 3):
        log.step(step, loss=0.5 / step, lr=1e-3, grad_norm=2.0, imgs_per_sec=10.0)
    log.scalar(run_log.TAG_EPOCH_LOSS, 0.3, 1)
    log.tb.add_image("Samples/grid row", np.zeros((8, 16, 3), dtype=np.uint8), 1, dataformats="HWC")
    log.tb.summary({"completed": True, "optimizer_steps": 3, "best_validation_loss": None})
    log.close()

    (run,) = fake_wandb.runs
    assert run.init_kwargs["mode"] == "offline" and run.init_kwargs["project"] == "p"
    assert run.init_kwargs["config"] == {"lr": 1e-3} and run.finished
    by_tag: dict[str, list[tuple[int, float]]] = {}
    for record in run.logged:
        for tag, value in record.items():
            if tag not in ("step", "epoch") and not isinstance(value, FakeImage):
                by_tag.setdefault(tag, []).append((record[run.axes[tag]], value))
    tb = _tb_scalars(tmp_path / "tb")
    assert by_tag.keys() == tb.keys() and run_log.TAG_LOSS in tb
    for tag in tb:
        assert [s for s, _ in by_tag[tag]] == [s for s, _ in tb[tag]], tag
        np.testing.assert_allclose([v for _, v in by_tag[tag]], [v for _, v in tb[tag]], rtol=1e-6)
    assert run.axes[run_log.TAG_LOSS] == "step" and run.axes[run_log.TAG_EPOCH_LOSS] == "epoch"
    images = [r for r in run.logged if "Samples/grid row" in r]
    assert len(images) == 1 and images[0]["epoch"] == 1 and images[0]["Samples/grid row"].array.shape == (8, 16, 3)
    assert run.summary == {"completed": True, "optimizer_steps": 3}


def test_a_resumed_run_continues_the_same_wandb_run(fake_wandb, tmp_path):
    for _ in range(2):
        settings = {"project": "p", "mode": "offline"}
        run_log.RunLogger(True, tmp_path, tmp_path / "tb", 1, 0, report_to=["wandb"], wandb_settings=settings).close()
    first, second = fake_wandb.runs
    assert first.id == second.id and second.init_kwargs["resume"] == "allow"
    assert not (tmp_path / "tb").exists()  # wandb only: no TensorBoard files


def test_auto_mode_is_offline_without_network(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: refused at once
    assert wandb_log.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_log.resolve_mode("auto") == "online"
    assert wandb_log.resolve_mode("offline") == "offline"


def test_missing_wandb_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails, as when it is not installed
    monkeypatch.setattr(wandb_log.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), "--report_to", "tensorboard,wandb"])
    err = capsys.readouterr().err
    assert "--report_to wandb" in err and "pip install wandb" in err
    with pytest.raises(wandb_log.WandbUnavailable, match="pip install wandb"):
        wandb_log.WandbWriter(tmp_path, "p", "offline")


def test_report_to_parses_a_list(tmp_path, capsys):
    args = train_args.parse_args(["--cached_dataset_dirs", str(tmp_path)])
    assert args.report_to == ["tensorboard"]
    with pytest.raises(SystemExit):
        train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), "--report_to", "tensorboard,mlflow"])
    assert "--report_to" in capsys.readouterr().err
