"""metrics.py: scores over two folders and captions, a table, JSON, skips and clear errors."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys

import numpy as np
import pytest
from eval_fixtures import make_hps_checkpoint, make_lpips_backbone, shared_inception_weights
from PIL import Image

from sdxl_trainer.evaluation import scorers


@pytest.fixture(scope="session")
def inception_weights_file(tmp_path_factory):
    return shared_inception_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def metrics_main(repo_root):
    # Run the top-level script's own main() (importing `metrics` could pick another module of that name).
    return runpy.run_path(str(repo_root / "metrics.py"), run_name="metrics_script")["main"]


def _folders(tmp_path, same: bool):
    rng = np.random.default_rng(0)
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for i, name in enumerate(["a", "sub/b", "c"]):
        for folder in (gen, ref):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(gen / f"{name}.png")
        (gen / f"{name}.txt").write_text(f"caption {i}", encoding="utf-8")
        other = pixels if same else rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(other).save(ref / f"{name}.bmp")  # another extension pairs by name all the same
    return gen, ref


def test_help_states_each_scores_direction(repo_root):
    done = subprocess.run(
        [sys.executable, "metrics.py", "--help"], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "IS higher is better" in text and "FID lower is better" in text and "KID lower is better" in text
    assert "HPSv2 higher is better" in text and "LPIPS lower" in text


def test_scores_two_folders_prints_a_table_and_writes_json(metrics_main, inception_weights_file, tmp_path, capsys):
    gen, ref = _folders(tmp_path, same=True)
    hps_path, _ = make_hps_checkpoint(tmp_path)
    out = tmp_path / "res" / "m.json"
    code = metrics_main([
        "--generated", str(gen), "--reference", str(ref), "--metrics", "fid,kid,is,lpips,hps",
        "--metrics_inception_weights", str(inception_weights_file),
        "--metrics_lpips_backbone", str(make_lpips_backbone(tmp_path / "alexnet.pth")),
        "--metrics_hps_checkpoint", str(hps_path), "--metrics_hps_model", "tiny-hps-test",
        "--kid_subsets", "3", "--paired_reference_only", "--device", "cpu", "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    s = payload["scores"]
    assert set(s) == {"fid", "kid", "kid_std", "is", "is_std", "lpips", "hps"}
    assert s["lpips"] == pytest.approx(0.0, abs=1e-6)  # each image against an identical reference
    assert s["fid"] == pytest.approx(0.0, abs=1e-9)
    assert s["kid"] <= 1e-12  # the unbiased estimate of a zero distance: the cross term keeps the diagonal
    assert s["is"] >= 1.0
    assert payload["counts"] == {"generated": 3, "reference": 3, "lpips_pairs": 3, "hps_captioned": 3}
    assert "higher is better" in payload["directions"]["is"]
    printed = capsys.readouterr().out
    for label in ("FID", "KID", "IS", "LPIPS", "HPSv2"):
        assert f"\n{label} " in printed


def test_different_references_give_positive_distances(metrics_main, inception_weights_file, tmp_path):
    gen, ref = _folders(tmp_path, same=False)
    out = tmp_path / "m.json"
    code = metrics_main([
        "--generated", str(gen), "--reference", str(ref), "--metrics", "fid,kid,lpips",
        "--metrics_inception_weights", str(inception_weights_file),
        "--metrics_lpips_backbone", str(make_lpips_backbone(tmp_path / "alexnet.pth")),
        "--kid_subsets", "3", "--device", "cpu", "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    s = json.loads(out.read_text())["scores"]
    assert s["fid"] > 1e-3 and s["lpips"] > 1e-3 and np.isfinite(s["kid"])


def test_without_weights_every_score_is_skipped_with_one_line(metrics_main, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scorers, "default_inception_weights", lambda: None)
    gen, _ = _folders(tmp_path, same=False)
    assert metrics_main(["--generated", str(gen), "--device", "cpu", "--output", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    for label in ("FID", "KID", "IS", "LPIPS", "HPSv2"):
        assert sum(line.startswith(f"{label} skipped: ") for line in printed) == 1
    assert json.loads((tmp_path / "m.json").read_text())["scores"] == {}


def test_reference_free_scores_and_unpaired_lpips_are_reported(metrics_main, inception_weights_file, tmp_path, capsys):
    gen, ref = _folders(tmp_path, same=False)
    for p in ref.rglob("*.bmp"):
        p.rename(p.with_name("x_" + p.name))  # no generated image has a reference of its name any more
    code = metrics_main([
        "--generated", str(gen), "--reference", str(ref), "--metrics", "lpips,is",
        "--metrics_lpips_backbone", str(make_lpips_backbone(tmp_path / "alexnet.pth")),
        "--metrics_inception_weights", str(inception_weights_file),
        "--is_splits", "10", "--device", "cpu", "--output", str(tmp_path / "m.json"),
    ])  # fmt: skip
    assert code == 0
    payload = json.loads((tmp_path / "m.json").read_text())
    assert set(payload["scores"]) == {"is", "is_std"}
    assert any("LPIPS not scored" in line for line in payload["notes"])


def test_bad_folders_and_names_fail_naming_the_flag(metrics_main, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        metrics_main(["--generated", str(tmp_path / "nope")])
    assert exc.value.code == 2 and "--generated" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        metrics_main(["--generated", str(tmp_path / "empty")])
    assert "--generated: no images" in capsys.readouterr().err
    gen, _ = _folders(tmp_path, same=True)
    with pytest.raises(SystemExit):
        metrics_main(["--generated", str(gen), "--metrics", "fid,clip"])
    assert "--metrics: unknown score" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        metrics_main(["--generated", str(gen), "--metrics", "hps", "--metrics_hps_checkpoint", "/no/file.pt"])
    assert "--metrics_hps_checkpoint" in capsys.readouterr().err
