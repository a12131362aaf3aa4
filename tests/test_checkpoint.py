"""Checkpoint folders: discovery, 'auto', keep-last-K, atomicity markers, structured state without pickles."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sdxl_trainer.training import checkpoint


def _fake(root, step: int, complete: bool = True):
    d = root / "checkpoints" / f"step-{step}"
    d.mkdir(parents=True)
    if complete:
        (d / checkpoint.TRAIN_STATE).write_text(json.dumps({"step": step}))
    return d


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert checkpoint.find_resume_checkpoint("auto", tmp_path) is None  # nothing yet: start fresh
    _fake(tmp_path, 5)
    newest = _fake(tmp_path, 20)
    _fake(tmp_path, 100, complete=False)  # killed while writing: no train_state.json
    (tmp_path / "checkpoints" / ".tmp-step-120").mkdir()
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [5, 20]
    assert checkpoint.find_resume_checkpoint("auto", tmp_path) == newest
    assert checkpoint.find_resume_checkpoint(None, tmp_path) is None
    assert checkpoint.find_resume_checkpoint(str(newest), tmp_path) == newest
    with pytest.raises(checkpoint.CheckpointError, match="--resume_from_checkpoint"):
        checkpoint.find_resume_checkpoint(str(tmp_path / "checkpoints" / "step-100"), tmp_path)


def test_numbers_sort_numerically_not_alphabetically(tmp_path):
    for step in (9, 10, 100):
        _fake(tmp_path, step)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [9, 10, 100]


def test_structured_state_round_trips_without_pickles(tmp_path):
    shared = torch.arange(5.0)
    state = {
        "state": {0: {"step": 3, "exp_avg": torch.randn(4, 2), "qmap": shared}, 7: {"qmap": shared}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 7], "name": None}],
        "flag": True,
    }
    checkpoint.save_structured(tmp_path / "opt", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opt.json", "opt.safetensors"]
    back = checkpoint.load_structured(tmp_path / "opt")
    assert list(back["state"]) == [0, 7]  # integer keys survive JSON
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["state"][0]["qmap"] is back["state"][7]["qmap"] or torch.equal(back["state"][7]["qmap"], shared)
    assert back["param_groups"][0]["betas"] == [0.9, 0.999] and back["flag"] is True
    with pytest.raises(checkpoint.CheckpointError, match="cannot store"):
        checkpoint.save_structured(tmp_path / "bad", {"x": object()})


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    checkpoint.save_structured(tmp_path / "rng", checkpoint.rng_state())
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    checkpoint.set_rng_state(checkpoint.load_structured(tmp_path / "rng"))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
