"""The trainer's evaluation step on the tiny pipeline: trained-UNet images, scores, grid, skips, two ranks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_fixtures import (
    TinyFeatures,
    eval_args,
    make_hps_checkpoint,
    make_lpips_backbone,
    make_validation_items,
    shared_inception_weights,
    write_handoff,
)
from PIL import Image

from sdxl_trainer.evaluation import evaluator, scorers, support
from sdxl_trainer.evaluation.eval_args import EvaluationArgsError

CPU = torch.device("cpu")
# One step without classifier-free guidance keeps CPU tests fast (CFG is covered in test_sampling.py).
FAST = ("--sample_steps", "1", "--sample_guidance_scale", "1", "--sample_width_px", "64", "--sample_height_px", "64")


@pytest.fixture(scope="session")
def inception_weights_file(tmp_path_factory):
    return shared_inception_weights(tmp_path_factory)


class Recorder:
    """Stands in for a TensorBoard SummaryWriter."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.images: list[tuple[str, tuple, int]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_image(self, tag, image, step, dataformats="CHW"):
        self.images.append((tag, image.shape, step))


def _evaluator(args, run_dir, model_dir, items, data_root, log, **kwargs):
    return evaluator.Evaluator(
        args, run_dir, str(model_dir), ["train caption"], items, data_root, 0, 1, CPU,
        weight_dtype=torch.float32, log=log.append, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def handoffs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("handoff")
    return {
        "base": write_handoff(tiny_model_dir, folder / "base.safetensors"),
        "trained": write_handoff(tiny_model_dir, folder / "trained.safetensors", perturb=0.05),
    }


def test_schedule_follows_the_original_rules(tiny_model_dir, tmp_path):
    args = eval_args(
        "--save_samples", "--save_samples_every_n_epochs", "3", "--start_save_samples_epoch", "5",
        "--validation_image", "--validation_image_every_n_epochs", "2",
    )  # fmt: skip
    ev = _evaluator(args, tmp_path, tiny_model_dir, make_validation_items(tmp_path / "d", 1), None, [])
    assert [e for e in range(10) if ev.wants_samples(e)] == [0, 6, 9]  # epoch 0 = the Base Model row
    assert [e for e in range(10) if ev.wants_validation(e)] == [0, 2, 4, 6, 8]
    assert ev.wants_to_run(6) and not ev.wants_to_run(1)
    with pytest.raises(EvaluationArgsError, match="--sample_grid_max_rows"):
        _evaluator(eval_args("--sample_grid_max_rows", "1"), tmp_path, tiny_model_dir, [], None, [])
    with pytest.raises(EvaluationArgsError, match="--sample_prompts"):
        _evaluator(eval_args("--save_samples", "--sample_prompts", "/no/file"), tmp_path, tiny_model_dir, [], None, [])
    # A weights file of the wrong kind stops the run at start, not at the first evaluation.
    torch.save({"w": torch.zeros(1)}, tmp_path / "wrong.pth")
    items = make_validation_items(tmp_path / "d", 1)
    with pytest.raises(EvaluationArgsError, match="--metrics_inception_weights"):
        _evaluator(eval_args("--validation_image", "--metrics_inception_weights", str(tmp_path / "wrong.pth")),
                   tmp_path, tiny_model_dir, items, None, [])  # fmt: skip


def test_all_scores_logged_grid_kept_and_reference_features_cached(
    tiny_model_dir, handoffs, inception_weights_file, tmp_path
):
    data = tmp_path / "data"
    items = make_validation_items(data, 3)
    hps_path, _ = make_hps_checkpoint(tmp_path)
    args = eval_args(
        "--save_samples", "--num_sample_images", "1", "--save_samples_every_n_epochs", "1", *FAST,
        "--sample_grid_max_rows", "2", "--validation_image", "--validation_image_every_n_epochs", "1",
        "--metrics_inception_weights", str(inception_weights_file),
        "--metrics_lpips_backbone", str(make_lpips_backbone(tmp_path / "alexnet.pth")),
        "--metrics_hps_checkpoint", str(hps_path), "--metrics_hps_model", "tiny-hps-test",
        "--metrics_kid_subsets", "5",
    )  # fmt: skip
    run_dir, tb, log = tmp_path / "run", Recorder(), []
    ev = _evaluator(args, run_dir, tiny_model_dir, items, data, log, tb_writer=tb)
    first = ev.run(0, handoffs["base"])
    assert set(first) == {"fid", "kid", "kid_std", "is", "is_std", "lpips", "hps"}
    assert all(math.isfinite(v) for v in first.values()) and first["lpips"] > 0
    assert not any("skipped" in line for line in log)
    assert any("FID on 3 images" in line for line in log)  # the small-n warning, once
    for name, tag in support.METRIC_TAGS.items():
        assert tb.scalars[tag] == [(0, first[name])]
    assert tb.scalars["Validation/Inception Score per epoch"] and tb.images[0][0] == "Samples/grid row"
    cache_files = list((run_dir / "eval_cache").glob("reference_inception_*.safetensors"))
    assert len(cache_files) == 1

    # Same weights and fixed seeds: the next epoch's scores and sample row repeat exactly.
    second = ev.run(1, handoffs["base"])
    assert second == pytest.approx(first, rel=1e-6, abs=1e-12)
    rows = run_dir / "samples" / "rows"
    np.testing.assert_array_equal(_pixels(rows / "epoch_00000.png"), _pixels(rows / "epoch_00001.png"))

    # A new process (resume): scorers rebuilt once, reference features read back from the cache file.
    log2 = []
    ev2 = _evaluator(args, run_dir, tiny_model_dir, items, data, log2)
    third = ev2.run(2, handoffs["trained"])
    assert any("reference features read from" in line for line in log2)
    assert third["fid"] != first["fid"]  # other weights (this random Inception gives tiny values)
    # Rows 0,1,2 with at most 2 image rows per file: the Base Model row heads both files.
    assert sorted(p.name for p in (run_dir / "samples").glob("sample_grid_*.png")) == [
        "sample_grid_001.png",
        "sample_grid_002.png",
    ]
    lines = (run_dir / "validation_scores.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_validation_images_come_from_the_handed_off_unet(tiny_model_dir, handoffs, tmp_path):
    items = make_validation_items(tmp_path / "data", 2)
    args = eval_args("--validation_image", "--validation_image_every_n_epochs", "1", "--save_validation_images",
                     "--metrics", "", *FAST)  # fmt: skip
    run_dir = tmp_path / "run"
    ev = _evaluator(args, run_dir, tiny_model_dir, items, tmp_path / "data", [])
    for epoch, handoff in ((0, "base"), (1, "trained"), (2, "base")):
        assert ev.run(epoch, handoffs[handoff]) == {}

    def images(epoch):
        folder = run_dir / "validation_images" / f"epoch_{epoch:05d}"
        return [_pixels(p) for p in sorted(folder.rglob("*.png"))]

    base, trained, base_again = images(0), images(1), images(2)
    assert len(base) == 2 and [im.shape for im in base] == [(64, 64, 3), (48, 64, 3)]  # bucket sizes (h, w)
    for b, t, b2 in zip(base, trained, base_again, strict=True):
        assert np.abs(b - t).mean() > 1.0  # other weights, other images
        np.testing.assert_array_equal(b, b2)  # weights back: the same images (fixed seeds)
    folder = run_dir / "validation_images" / "epoch_00000"
    for it in items:  # named after the data folder's path, for metrics.py to pair them
        assert (folder / it.image_relpath).with_suffix(".txt").read_text() == it.caption


def test_handoff_that_does_not_match_the_unet_is_refused(tiny_model_dir, handoffs, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(handoffs["base"])
    state.pop(next(iter(state)))
    save_file(state, tmp_path / "broken.safetensors")
    args = eval_args("--save_samples", "--num_sample_images", "1", *FAST)
    ev = _evaluator(args, tmp_path / "run", tiny_model_dir, [], None, [])
    with pytest.raises(support.EvaluationError, match="1 missing keys"):
        ev.run(0, tmp_path / "broken.safetensors")
    # Wrapper prefixes (torch.compile's _orig_mod.) are not a mismatch.
    full = load_file(handoffs["base"])
    save_file({k.replace("conv_in.", "_orig_mod.conv_in."): v for k, v in full.items()}, tmp_path / "c.safetensors")
    ev._pipe.unet.conv_in.weight.data.zero_()
    ev.run(0, tmp_path / "c.safetensors")
    assert torch.equal(ev._pipe.unet.conv_in.weight, full["conv_in.weight"])
    with pytest.raises(EvaluationArgsError, match="--metrics_lpips_backbone"):
        _evaluator(eval_args("--validation_image", "--metrics_lpips_backbone", str(tmp_path / "no.pth")),
                   tmp_path / "run", tiny_model_dir, [], None, [])  # fmt: skip


def test_without_metric_weights_the_run_works_and_each_skip_is_one_line(
    tiny_model_dir, handoffs, tmp_path, monkeypatch
):
    monkeypatch.setattr(scorers, "default_inception_weights", lambda: None)
    items = make_validation_items(tmp_path / "data", 1)
    args = eval_args("--validation_image", *FAST)
    log = []
    ev = _evaluator(args, tmp_path / "run", tiny_model_dir, items, tmp_path / "data", log)
    assert ev.run(0, handoffs["base"]) == {}
    skipped = [line for line in log if "skipped" in line]
    assert len(skipped) == 5 and all("\n" not in line for line in skipped)
    for name in ("FID", "KID", "IS", "LPIPS", "HPSv2"):
        assert sum(line.startswith(f"{name} skipped: ") for line in skipped) == 1
    assert any("validation at epoch 0: 1 images" in line for line in log)


def test_without_the_data_folder_only_reference_free_scores_run(tiny_model_dir, handoffs, tmp_path):
    items = make_validation_items(tmp_path / "data", 2)
    hps_path, _ = make_hps_checkpoint(tmp_path)
    args = eval_args("--validation_image", *FAST, "--metrics_hps_checkpoint", str(hps_path),
                     "--metrics_hps_model", "tiny-hps-test", "--metrics_lpips_backbone",
                     str(make_lpips_backbone(tmp_path / "alexnet.pth")))  # fmt: skip
    log = []
    ev = _evaluator(args, tmp_path / "run", tiny_model_dir, items, tmp_path / "gone", log,
                    inception_extractor=TinyFeatures())  # fmt: skip
    result = ev.run(0, handoffs["base"])
    assert set(result) == {"is", "is_std", "hps"}
    data_lines = [line for line in log if "data folder" in line]
    assert len(data_lines) == 3 and all(line.split()[0] in ("FID", "KID", "LPIPS") for line in data_lines)


def test_reference_key_follows_the_validation_set_content(tmp_path):
    items = make_validation_items(tmp_path / "d", 3)
    key = support.reference_set_key(items, "inception:x")
    assert support.reference_set_key(list(items), "inception:x") == key
    edited = [dataclasses.replace(items[0], image_sha256="f" * 64), *items[1:]]
    assert support.reference_set_key(edited, "inception:x") != key
    assert support.reference_set_key(items[:2], "inception:x") != key
    assert support.reference_set_key(items, "inception:y") != key
    path = support.reference_cache_path(tmp_path, key)
    support.write_reference_cache(path, key, np.ones((2, 4), np.float32), [True, False, True])
    pool, ok = support.read_reference_cache(path, key)
    assert pool.shape == (2, 4) and ok == [True, False, True]
    assert support.read_reference_cache(path, "other") is None


@pytest.mark.slow
def test_two_ranks_split_the_work_without_duplicates_and_match_one_rank(tiny_model_dir, handoffs, tmp_path):
    from eval_fixtures import TINY_HPS_CONFIG
    from eval_two_ranks import run

    items = make_validation_items(tmp_path / "data", 3)  # odd: the seed padded with duplicates here
    hps_path, _ = make_hps_checkpoint(tmp_path)
    (tmp_path / "tiny-hps-test.json").write_text(json.dumps(TINY_HPS_CONFIG))

    def config(run_dir):
        return {
            "items": [dataclasses.asdict(it) for it in items],
            "run_dir": str(run_dir),
            "model_dir": str(tiny_model_dir),
            "data_dir": str(tmp_path / "data"),
            "handoff": str(handoffs["base"]),
            "hps_checkpoint": str(hps_path),
            "hps_config": str(tmp_path / "tiny-hps-test.json"),
        }

    (tmp_path / "two.json").write_text(json.dumps(config(tmp_path / "two")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("eval_two_ranks.py")), str(tmp_path / "two.json")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]

    one = run(config(tmp_path / "one"), 0, 1)
    validation_captions = [it.caption for it in items]
    per_rank = [[p for p in r["generated"] if p in validation_captions] for r in ranks]
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == sorted(validation_captions)  # no duplicates
    samples = [[p for p in r["generated"] if p not in validation_captions] for r in ranks]
    assert all(samples) and len(samples[0]) + len(samples[1]) == 2
    assert ranks[0]["scores"] == ranks[1]["scores"]  # every rank returns the same scores
    assert ranks[0]["scores"] == pytest.approx(one["scores"], rel=1e-5)
    for sub in ("validation_images/epoch_00000", "samples/rows"):
        two_files = sorted((tmp_path / "two" / sub).rglob("*.png"))
        one_files = sorted((tmp_path / "one" / sub).rglob("*.png"))
        assert [p.name for p in two_files] == [p.name for p in one_files] and one_files
        for a, b in zip(two_files, one_files, strict=True):
            # Same seeds and weights; only the thread count differs (1 per rank vs 2), so float sums may
            # round one grey level apart in a rare pixel.
            assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


@pytest.mark.slow
def test_trainer_scores_its_own_unet_and_keeps_the_grid(tiny_model_dir, inception_weights_file, tmp_path):
    """The real training script with --save_samples --validation_image on the tiny model."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train_helpers import base_args, read_metrics, write_synthetic_cache

    import sdxl_fsdp_train

    cache = write_synthetic_cache(tmp_path / "cache" / "ds", {(64, 64): 6})
    data = tmp_path / "data"  # the images the synthetic cache names: img_0000.png ...
    data.mkdir()
    rng = np.random.default_rng(0)
    for n in range(6):
        Image.fromarray(rng.integers(0, 255, (70, 64, 3), dtype=np.uint8)).save(data / f"img_{n:04d}.png")
    hps_path, _ = make_hps_checkpoint(tmp_path)
    run = tmp_path / "run"
    extra = [
        "--num_train_epochs", "1", "--data_dir", str(data),
        "--save_samples", "--num_sample_images", "2", "--save_samples_every_n_epochs", "1", *FAST,
        "--validation_image", "--validation_image_percent", "0.34", "--validation_image_every_n_epochs", "1",
        "--metrics_inception_weights", str(inception_weights_file), "--metrics_kid_subsets", "3",
        "--metrics_lpips_backbone", str(make_lpips_backbone(tmp_path / "alexnet.pth")),
        "--metrics_hps_checkpoint", str(hps_path), "--metrics_hps_model", "tiny-hps-test",
    ]  # fmt: skip
    assert sdxl_fsdp_train.main(base_args(tiny_model_dir, cache.parent, run, *extra)) == 0
    assert "validation at epoch 1: 2 images" in (run / "train.log").read_text()

    epochs = [json.loads(line) for line in (run / "validation_scores.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["images"] == 2 for e in epochs)
    for e in epochs:
        assert {"fid", "kid", "is", "lpips", "hps"} <= set(e)
    assert epochs[0]["lpips"] != epochs[1]["lpips"]  # epoch 1 comes from the trained UNet, not the base model
    assert [r["epoch"] for r in read_metrics(run, "scores")] == [0, 1]
    with Image.open(run / "samples" / "sample_grid_001.png") as grid:
        assert grid.size == (64 * 3, 64 * 3)  # label + 2 prompts; prompts, Base Model, Epoch: 1
    (folder,) = {p.parent for p in (run / "tb").rglob("events.out.tfevents.*")}  # one writer: rank 0's
    events = EventAccumulator(str(folder)).Reload()
    for name in ("fid", "kid", "is", "lpips", "hps"):
        assert [s.step for s in events.Scalars(support.METRIC_TAGS[name])] == [0, 1], name
    assert [e.step for e in events.Images("Samples/grid row")] == [0, 1]


@pytest.mark.gpu
def test_on_a_gpu_fp16_sampling_runs_and_everything_waits_on_the_cpu_between_runs(tiny_model_dir, handoffs, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda = torch.device("cuda", torch.cuda.current_device())
    items = make_validation_items(tmp_path / "data", 3)
    hps_path, _ = make_hps_checkpoint(tmp_path)
    args = eval_args("--save_samples", "--num_sample_images", "2", "--validation_image", "--sample_steps", "4",
                     "--sample_width_px", "128", "--sample_height_px", "128", "--metrics_hps_checkpoint",
                     str(hps_path), "--metrics_hps_model", "tiny-hps-test", "--metrics_lpips_backbone",
                     str(make_lpips_backbone(tmp_path / "alexnet.pth")))  # fmt: skip
    log: list[str] = []
    ev = evaluator.Evaluator(args, tmp_path / "run", str(tiny_model_dir), ["c"], items, tmp_path / "data", 0, 1,
                              cuda, weight_dtype=torch.float16, log=log.append,
                              inception_extractor=TinyFeatures())  # fmt: skip
    before = torch.cuda.memory_allocated(cuda)
    first = ev.run(0, handoffs["base"])
    assert {"is", "fid", "kid", "lpips", "hps"} <= set(first) and all(math.isfinite(v) for v in first.values())
    assert ev._pipe.unet.dtype == torch.float16 and ev._pipe.unet.device.type == "cpu"
    assert next(ev._scorers.hps.model.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated(cuda) - before < 64 * 2**20  # nothing large left on the GPU
    assert ev.run(0, handoffs["base"]) == pytest.approx(first, rel=1e-4)  # moved back and forth: same numbers
