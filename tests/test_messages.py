"""Messages you can trust (issue 16): one line per expected error (also under torchrun), every default in --help,
known third-party noise filtered, files readable by others as the umask allows, tools never write over their input."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdxl_trainer import atomic_files, cli
from sdxl_trainer.data.sampler import DataError

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def test_an_expected_error_is_one_line_and_status_1(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def fails():
        raise DataError("--cached_dataset_dirs: /x holds no dataset cache\nsecond line")

    assert cli.run_main(fails, cli.trainer_errors) == 1
    err = capsys.readouterr().err
    assert err == "error: --cached_dataset_dirs: /x holds no dataset cache second line\n"


def test_an_unexpected_error_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run_main(lambda: 1 / 0, cli.trainer_errors)


def test_known_third_party_noise_is_filtered_and_the_rest_is_not(caplog):
    cli.filter_known_noise()
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
        logging.getLogger("transformers.tokenization_utils_base").warning(
            "Token indices sequence length is longer than the specified maximum sequence length for this model"
        )
        noisy.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_help_shows_every_default(repo_root):
    from sdxl_trainer.caching.caching_args import build_parser as caching_parser
    from sdxl_trainer.training.train_args import build_parser

    for parser in (build_parser(), caching_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.help in (None, "==SUPPRESS==") or not action.option_strings or action.dest == "help":
                continue
            helped = parser._get_formatter()._get_help_string(action)
            assert "default" in helped.lower(), action.option_strings
    text = " ".join(build_parser().format_help().split())
    assert "images per GPU per micro-step (default: 10)" in text
    assert "micro-steps per optimizer step (default: 60)" in text


def test_files_written_atomically_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_files.atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_files.atomic_save_safetensors(tmp_path / "b.safetensors", {"t": torch.zeros(2)}, {})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_files.atomic_write_json(tmp_path / "c.json", {"x": 1})
        assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


@pytest.mark.slow
def test_saved_pipeline_single_file_and_samples_are_readable_by_others(tiny_model_dir, tmp_path):
    from PIL import Image

    from sdxl_trainer.evaluation.sampling import _save_png_atomic
    from sdxl_trainer.models.single_file import save_single_file
    from sdxl_trainer.training import saving

    old = os.umask(0o022)
    try:
        full = {k: v.float() for k, v in _unet_state(tiny_model_dir).items()}
        out = saving.save_pipeline(str(tiny_model_dir), full, tmp_path / "epoch-1", "float32")
        assert out.stat().st_mode & 0o777 == 0o755
        assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.rglob("*"))
        single = save_single_file(out, tmp_path / "epoch-1.safetensors")
        assert single.stat().st_mode & 0o777 == 0o644
        _save_png_atomic(Image.new("RGB", (8, 8)), tmp_path / "grid.png")
        assert (tmp_path / "grid.png").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def _unet_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((model_dir / "unet").glob("*.safetensors"))))


def test_the_converter_refuses_to_write_into_its_input(tiny_model_dir, tmp_path):
    from sdxl_trainer.models.single_file import save_single_file
    from sdxl_trainer.models.single_file_keys import ConversionError

    weights = next((tiny_model_dir / "unet").glob("*.safetensors"))
    before = weights.read_bytes()
    for target in (weights, tiny_model_dir / "model.safetensors"):
        with pytest.raises(ConversionError, match="--checkpoint_path.*inside --model_path"):
            save_single_file(tiny_model_dir, target, overwrite=True)
    assert weights.read_bytes() == before


@pytest.mark.slow
def test_a_data_error_under_torchrun_prints_one_line(repo_root, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(repo_root / "sdxl_fsdp_train.py"), "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--cached_dataset_dirs", str(empty), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    ours = _error_lines(done.stderr)
    assert ours == [
        f"error: --cached_dataset_dirs: {empty}: holds no dataset cache (cache.json); run "
        "sdxl_process_data_dir.py first"
    ], done.stderr[-3000:]
    # No traceback from our processes (torchrun's own ChildFailedError summary follows, which no child can stop).
    assert "sdxl_trainer/" not in done.stderr and 'sdxl_fsdp_train.py", line' not in done.stderr


def test_a_random_bytes_pth_gets_our_reason_not_torchs_weights_only_advice(tmp_path):
    from sdxl_trainer.safe_load import safe_torch_load

    bad = tmp_path / "random.pth"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="random.pth") as info:
        safe_torch_load(bad)
    assert "weights_only=False" not in str(info.value) and "set to `False`" not in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_upscale_refuses_an_absurd_scale_at_start(repo_root, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("upscale_script", repo_root / "upscale.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.parse_args(["--input", "a", "--output", "b", "--model", "m.pth", "--scale", "1000"])
    assert "--scale 1000" in capsys.readouterr().err


def test_metrics_json_goes_beside_the_scored_folder_not_into_the_current_one(tmp_path):
    from sdxl_trainer.evaluation.folder_metrics import default_output

    assert default_output(tmp_path / "gen") == tmp_path / "gen.metrics.json"
