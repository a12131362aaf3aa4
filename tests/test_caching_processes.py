"""Caching through the real script in separate processes: two ranks (torchrun, gloo) and a killed run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_caching import GOOD, item_files, make_args, make_data

from sdxl_trainer.caching.run import run_caching
from sdxl_trainer.data import cache_reader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_args(data: Path, cache: Path, model: Path) -> list[str]:
    return [
        "sdxl_process_data_dir.py", "--data_dir", str(data), "--cache_dir", str(cache), "--basename", "ds",
        "--pretrained_model_name_or_path", str(model), "--min_resolution", "64", "--max_resolution", "128",
        "--num_workers", "0",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    # One thread per process in both runs: CPU convolutions change in the last bits with the thread count.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_two_processes_split_the_items_and_match_one_process(tmp_path, tiny_model_dir, repo_root):
    data = make_data(tmp_path / "data")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port())] + _script_args(data, tmp_path / "two", tiny_model_dir)  # fmt: skip
    result = subprocess.run(command, cwd=repo_root, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "ds" / "report.json").read_text())
    assert report["cached"] == len(GOOD) and report["encoded"] == len(GOOD)
    assert len(report["encoded_per_process"]) == 2 and min(report["encoded_per_process"]) > 0  # both worked

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_caching(make_args(data, tmp_path / "one", tiny_model_dir))
    finally:
        torch.set_num_threads(threads)
    two, one = item_files(tmp_path / "two" / "ds"), item_files(tmp_path / "one" / "ds")
    assert two == one  # byte-equal tensors and records: no item lost, none done twice
    assert [i.key for i in cache_reader.open_dataset_cache(tmp_path / "two" / "ds").items] == sorted(
        one_key for one_key in (Path(p).stem for p in one)
    )


@pytest.mark.slow
def test_killed_script_leaves_nothing_corrupt_and_resumes(tmp_path, tiny_model_dir, repo_root):
    data = make_data(tmp_path / "data")
    from test_caching import _gradient

    for i in range(16):  # enough work that the kill lands mid-run
        _gradient(128, 128, 100 + i).save(data / f"extra_{i:02d}.png")
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable] + _script_args(data, cache, tiny_model_dir), cwd=repo_root,
                               env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((cache / "ds" / "items").rglob("*.safetensors"))) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    written = len(list((cache / "ds" / "items").rglob("*.safetensors")))
    assert 3 <= written < len(GOOD) + 16
    report = run_caching(make_args(data, cache, tiny_model_dir))
    assert report["cached"] == len(GOOD) + 16
    assert report["reused"] >= written - 1 and report["encoded"] <= len(GOOD) + 16 - (written - 1)
    ds = cache_reader.open_dataset_cache(cache / "ds")
    for item in ds.items:  # every item file is whole and readable
        ds.load_item_tensors(item)
