"""EMA of the weights (issue 17): the decay schedule and the update against diffusers' EMAModel, update every N
steps, the exact swap used for evaluation and saving, refusals, and the flags."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from sdxl_trainer.training import ema as ema_mod
from sdxl_trainer.training import train_args

SCHEDULES = [
    ema_mod.EmaSchedule(),
    ema_mod.EmaSchedule(decay=0.9, min_decay=0.2, update_after_step=3),
    ema_mod.EmaSchedule(decay=0.999, warmup=True, inv_gamma=2.0, power=0.75),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_decay_follows_diffusers_ema_model(schedule):
    reference = EMAModel(
        [torch.nn.Parameter(torch.zeros(1))], decay=schedule.decay, min_decay=schedule.min_decay,
        update_after_step=schedule.update_after_step, use_ema_warmup=schedule.warmup, inv_gamma=schedule.inv_gamma,
        power=schedule.power,
    )  # fmt: skip
    for n in [0, 1, 2, 3, 4, 5, 10, 100, 10_000, 10**7]:
        assert schedule.decay_at(n) == pytest.approx(reference.get_decay(n), rel=1e-12, abs=1e-15), n


def _trajectory(steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, 3, generator=g), torch.randn(7, generator=g)] for _ in range(steps)]


@pytest.mark.parametrize("every", [1, 3])
def test_updates_equal_diffusers_ema_model_stepped_at_the_same_steps(every):
    weights = [torch.zeros(5, 3), torch.zeros(7)]
    schedule = ema_mod.EmaSchedule(decay=0.8, update_every_steps=every)
    mine = ema_mod.EmaWeights(weights, schedule, torch.device("cpu"))
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    reference = EMAModel(params, decay=0.8)
    for step, values in enumerate(_trajectory(10), start=1):
        for w, p, v in zip(weights, params, values, strict=True):
            w.copy_(v)
            p.data.copy_(v)
        used = mine.update(step)
        assert (used is None) == (step % every != 0)
        if step % every == 0:
            reference.step(params)
    for shadow, ref in zip(mine.shadows, reference.shadow_params, strict=True):
        torch.testing.assert_close(shadow, ref, rtol=1e-6, atol=1e-7)


def test_swap_exposes_the_ema_weights_and_restores_the_trained_ones_exactly(monkeypatch):
    monkeypatch.setattr(ema_mod, "SWAP_CHUNK_ELEMENTS", 4)  # several chunks per tensor
    trained = [torch.randn(5, 3), torch.randn(11)]
    ema = ema_mod.EmaWeights(trained, ema_mod.EmaSchedule(decay=0.5), torch.device("cpu"))
    originals = [t.clone() for t in trained]
    ema.shadows[0].mul_(2)
    expected_ema = [s.clone() for s in ema.shadows]
    with ema.swapped():
        assert all(torch.equal(t, e) for t, e in zip(trained, expected_ema, strict=True))
    assert all(torch.equal(t, o) for t, o in zip(trained, originals, strict=True))
    assert all(torch.equal(s, e) for s, e in zip(ema.shadows, expected_ema, strict=True))


def test_bf16_weights_get_an_fp32_ema_and_are_restored_exactly():
    """--master_weights bf16_stochastic: the EMA is the only fp32 copy; the swap rounds it into the bf16 weights
    for the gather and puts the trained bf16 values back bit for bit."""
    weights = [torch.zeros(6, dtype=torch.bfloat16)]
    ema = ema_mod.EmaWeights(weights, ema_mod.EmaSchedule(decay=0.999), torch.device("cpu"))
    assert ema.shadows[0].dtype == torch.float32
    ema.update(1)
    weights[0].fill_(1.0)
    for step in range(2, 30):
        ema.update(step)
    reference = EMAModel([torch.nn.Parameter(torch.zeros(6))], decay=0.999)
    p = torch.nn.Parameter(torch.zeros(6))
    reference.shadow_params[0].zero_()
    for step in range(1, 30):
        p.data.fill_(0.0 if step == 1 else 1.0)
        reference.step([p])
    torch.testing.assert_close(ema.shadows[0], reference.shadow_params[0])  # fp32 precision, not bf16 steps
    before = weights[0].clone()
    with ema.swapped():
        assert torch.equal(weights[0], ema.shadows[0].to(torch.bfloat16))
    assert torch.equal(weights[0], before)
    torch.testing.assert_close(ema.shadows[0], reference.shadow_params[0])


def test_refusals_name_the_flag():
    with pytest.raises(ema_mod.EmaError, match="--use_ema"):
        ema_mod.EmaWeights([torch.zeros(3, dtype=torch.int64)], ema_mod.EmaSchedule(), torch.device("cpu"))
    ema = ema_mod.EmaWeights([torch.zeros(3)], ema_mod.EmaSchedule(), torch.device("cpu"))
    with pytest.raises(ema_mod.EmaError, match="--resume_from_checkpoint.*--sharding"):
        ema.load_state_dict({"layout": [[4]], "shadows": [torch.zeros(4)]})


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--use_ema", "--ema_decay", "1.5"], "--ema_decay"),
        (["--use_ema", "--ema_power", "0"], "--ema_power"),
        (["--save_both_weights"], "--save_both_weights"),
        (["--use_ema", "--ema_update_every_steps", "0"], "--ema_update_every_steps"),
    ],
)
def test_bad_ema_flags_fail_at_start_naming_the_flag(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit):
        train_args.parse_args(["--cached_dataset_dirs", str(tmp_path), *extra])
    assert flag in capsys.readouterr().err


def test_full_state_dict_holds_the_ema_even_when_the_gather_returns_live_tensors():
    """FSDP2 in one CPU process returns the parameters themselves from its full-state-dict gather: the EMA
    weights must be copied before they are swapped back out."""
    live = [torch.ones(4), torch.ones(2, 2)]

    class LiveGather:
        def full_model_state_dict(self, _unet):
            return {"a": live[0], "b": live[1]}

    ema = ema_mod.EmaWeights(live, ema_mod.EmaSchedule(), torch.device("cpu"))
    for s in ema.shadows:
        s.fill_(3.0)
    full = ema_mod.full_state_dict(LiveGather(), None, ema, use_ema=True)
    assert torch.equal(full["a"], torch.full((4,), 3.0)) and torch.equal(full["b"], torch.full((2, 2), 3.0))
    assert torch.equal(live[0], torch.ones(4))  # the trained weights are back
    raw = ema_mod.full_state_dict(LiveGather(), None, ema, use_ema=False)
    assert torch.equal(raw["a"], torch.ones(4))
