"""Weights & Biases as a second (or only) destination of what goes to TensorBoard: the same scalars, the sample
grid rows and the run summary, with the run's resolved config.

`wandb` is optional (not in requirements.txt): `--report_to ...wandb` checks at start that it is installed and
says how to install it. Without network the run is logged offline (`--wandb_mode auto`), into
`<output_dir>/wandb/`, to be uploaded later with `wandb sync`. A resumed run continues the same W&B run (its id is
kept in `<output_dir>/wandb_run_id.txt`).

W&B wants one x-axis per metric: tags with "epoch" in their name (epoch loss, validation loss and scores, steps per
epoch) and images (sample grid rows, one per evaluated epoch) are plotted over `epoch`, every other scalar over
`step` (the optimizer step), as in TensorBoard.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import uuid
from pathlib import Path

import numpy as np

MODES = ("auto", "online", "offline")
INSTALL_HINT = "pip install wandb (an optional dependency, not in requirements.txt)"
RUN_ID_FILE = "wandb_run_id.txt"


class WandbUnavailable(RuntimeError):
    """--report_to wandb without the package; the message says how to install it."""


def check_installed() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise WandbUnavailable(f"--report_to wandb: the wandb package is not installed: {INSTALL_HINT}")


def resolve_mode(requested: str, timeout_s: float = 2.0) -> str:
    """online/offline as asked; auto: $WANDB_MODE if set, else online when the W&B server answers, else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = base.split("://", 1)[-1].split("/", 1)[0]
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout_s):
            return "online"
    except OSError:
        return "offline"


def _run_id(run_dir: Path) -> str:
    """The W&B run id of this output folder (kept across resumes), created once (atomically)."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    tmp.replace(path)
    return run_id


class WandbWriter:
    """The subset of TensorBoard's SummaryWriter the trainer uses, written to a W&B run."""

    def __init__(self, run_dir: Path, project: str, mode: str, config: dict | None = None):
        try:
            import wandb
        except ImportError as exc:
            raise WandbUnavailable(f"--report_to wandb: cannot import wandb ({exc}): {INSTALL_HINT}") from exc
        self._wandb = wandb
        self.mode = resolve_mode(mode)
        self.run = wandb.init(
            project=project, name=run_dir.name, id=_run_id(run_dir), resume="allow", dir=str(run_dir),
            config=config or {}, mode=self.mode,
        )  # fmt: skip
        self._axes: dict[str, str] = {}
        for axis in ("step", "epoch"):
            self.run.define_metric(axis)

    def _axis(self, tag: str, default: str) -> str:
        if tag not in self._axes:
            self._axes[tag] = "epoch" if "epoch" in tag.lower() else default
            self.run.define_metric(tag, step_metric=self._axes[tag])
        return self._axes[tag]

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: float(value), self._axis(tag, "step"): step})

    def add_image(self, tag: str, image, step: int, dataformats: str = "CHW") -> None:
        array = np.asarray(image)
        if dataformats == "CHW":
            array = array.transpose(1, 2, 0)
        self.run.log({tag: self._wandb.Image(array), self._axis(tag, "epoch"): step})

    def add_text(self, tag: str, text: str, step: int | None = None) -> None:
        self.run.summary[tag] = text

    def summary(self, values: dict) -> None:
        self.run.summary.update({k: v for k, v in values.items() if v is not None})

    def flush(self) -> None:
        """W&B streams by itself."""

    def close(self) -> None:
        self.run.finish()


class Writers:
    """Fans the SummaryWriter calls out to TensorBoard and/or W&B."""

    def __init__(self, writers: list):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "CHW") -> None:
        for w in self.writers:
            w.add_image(tag, image, step, dataformats=dataformats)

    def add_text(self, tag: str, text: str, step: int | None = None) -> None:
        for w in self.writers:
            w.add_text(tag, text, step)

    def summary(self, values: dict) -> None:
        """The run summary: a text in TensorBoard, the run's summary fields in W&B."""
        for w in self.writers:
            if isinstance(w, WandbWriter):
                w.summary(values)
            else:
                w.add_text("Run summary", "\n".join(f"    {k}: {v}" for k, v in values.items()))

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
