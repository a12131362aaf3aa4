"""A stand-in for the optional `wandb` package (not installed here or on the device): records what the trainer
logs, so tests can compare it with TensorBoard's event files."""

from __future__ import annotations

import importlib.machinery
import types


class FakeRun:
    def __init__(self, **init_kwargs):
        self.init_kwargs = init_kwargs
        self.id = init_kwargs["id"]
        self.logged: list[dict] = []
        self.axes: dict[str, str | None] = {}
        self.summary: dict = {}
        self.finished = False

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, values: dict):
        self.logged.append(dict(values))

    def finish(self):
        self.finished = True


class FakeImage:
    def __init__(self, array):
        self.array = array


def make_module() -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.runs = []

    def init(**kwargs):
        run = FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    module.Image = FakeImage
    return module
