"""Helpers for the trainer's tests: a synthetic cache for the tiny model, and reading a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxl_trainer.data.cache_writer import CacheWriter

# The tiny model's text sizes (sdxl_trainer.models.tiny): context 32 + 48, pooled = te2 projection 40.
TINY_CONTEXT_DIM = 80
TINY_POOLED_DIM = 40


def write_synthetic_cache(
    root: Path, bucket_counts: dict[tuple[int, int], int], seed: int = 0, name: str | None = None
) -> Path:
    """A dataset cache with `count` items per bucket (width_px, height_px); tensors are random but fixed."""
    g = torch.Generator().manual_seed(seed)
    writer = CacheWriter(root, fingerprint={"image": {"synthetic": 1}, "text": {"synthetic": 1}}, name=name)
    writer.write_empty_embeddings(torch.zeros(77, TINY_CONTEXT_DIM), torch.zeros(TINY_POOLED_DIM))
    n = 0
    for (w, h), count in sorted(bucket_counts.items()):
        for _ in range(count):
            shape = (4, h // 8, w // 8)
            tensors = {
                "latent_mean": torch.randn(shape, generator=g).half(),
                "latent_std": (0.1 * torch.rand(shape, generator=g)).half(),
                "prompt_embeds": torch.randn(77, TINY_CONTEXT_DIM, generator=g).half(),
                "pooled_prompt_embeds": torch.randn(TINY_POOLED_DIM, generator=g).half(),
            }
            # Distinct micro-conditioning per item, so a scrambled time-ids layout would be visible.
            writer.write_item(
                f"img_{n:04d}.png",
                f"caption {n}",
                bucket_wh=(w, h),
                original_size_hw=(h + 3 * n, w + 5 * n),
                crop_top_left=(n % 7, n % 5),
                tensors=tensors,
            )
            n += 1
    writer.finalize()
    return root


def read_metrics(run_dir: Path, event: str = "step") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == event]


def base_args(model_dir: Path, cache_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """Flags of a small, fast, deterministic CPU run (fp32, torch AdamW, no checkpointing of activations)."""
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--cached_dataset_dirs", str(cache_dir),
        "--output_dir", str(out_dir),
        "--log_dir", str(out_dir / "tb"),
        "--train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--num_train_epochs", "1",
        "--mixed_precision", "no",
        "--optimizer", "adamw",
        "--learning_rate", "1e-3",
        "--no-gradient_checkpointing",
        "--dataloader_num_workers", "0",
        "--save_model_every_n_epochs", "1000",
        *extra,
    ]  # fmt: skip


def run_trainer_script(argv: list[str], out_dir: Path, timeout_s: int, nproc: int | None = None) -> list[dict]:
    """Run sdxl_fsdp_train.py in a child process (under torchrun with `nproc` processes if given), assert it
    succeeded, and return the step records of `out_dir`'s metrics. The child sees this repository ahead of the
    caller's PYTHONPATH (on the GPU machine that path holds the wheels installed for the run)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath)
    result = subprocess.run([*launcher, str(repo / "sdxl_fsdp_train.py"), *argv], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    return read_metrics(out_dir)


def optimizer_steps(model: torch.nn.Module, opt, batches, micro_batches: int = 1) -> list[float]:
    """One optimizer step per `micro_batches` consecutive (x, y) of `batches` on an MSE loss (computed in fp32,
    divided by `micro_batches`); the losses, one per micro-batch. Drives the trainer's optimizers as train_step does:
    arms those that step in backward (gradient_release.py) for the last micro-batch, calls `after_backward` where
    they have one (flat_master.py)."""
    losses = []
    for i, (x, y) in enumerate(batches):
        last = (i + 1) % micro_batches == 0
        if getattr(opt, "steps_in_backward", False):
            opt.arm(last_micro_batch=last)
        loss = torch.nn.functional.mse_loss(model(x).float(), y) / micro_batches
        loss.backward()
        if hasattr(opt, "after_backward"):
            opt.after_backward()
        if last:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return losses


def safetensors_in(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (a pipeline's unet/, a checkpoint's model/)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def checkpoint_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a checkpoint folder's model/ holds (every safetensors shard)."""
    return safetensors_in(step_dir / "model")


def assert_resume_is_exact(train, full: Path, resumed: Path, stop_step: int = 2) -> tuple[list[dict], dict]:
    """`train(out_dir, *extra_flags)` runs the trainer to its end (and asserts it succeeded): once in `full`, once in
    `resumed` from `full`'s checkpoint at `stop_step`. The resumed run has the same losses and gradient norms after
    the stop and the same final checkpoint's weights, bit for bit. Returns the full run's steps and final weights."""
    train(full)
    train(resumed, "--resume_from_checkpoint", str(full / "checkpoints" / f"step-{stop_step}"))
    a, b = read_metrics(full), read_metrics(resumed)
    assert [(r["loss"], r["grad_norm"]) for r in b] == [(r["loss"], r["grad_norm"]) for r in a[stop_step:]]
    last = f"step-{len(a)}"
    wa, wb = checkpoint_weights(full / "checkpoints" / last), checkpoint_weights(resumed / "checkpoints" / last)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return a, wa
