"""Full training-state checkpoints: `<output_dir>/checkpoints/step-<N>/`, written atomically, keep-last-K,
resumable with `--resume_from_checkpoint auto|PATH`.

    model/                 the sharded UNet (torch.distributed.checkpoint, safetensors shards; reshardable)
    optimizer/rank<R>.*    each rank's local-shard optimizer state (safetensors + JSON), incl. 8-bit state
    rng/rank<R>.*          every rank's RNG states (torch CPU/CUDA, python, numpy)
    config.json            the resolved flags of the run that wrote it
    train_state.json       step, epoch, sampler position and carried items, LR scheduler, grad scaler,
                           counters, validation split; written last: its presence marks a complete checkpoint

All ranks write into `.tmp-step-<N>/`; after a barrier rank 0 renames it to `step-<N>/`. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from sdxl_trainer.distributed import DistInfo, barrier

TRAIN_STATE = "train_state.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the flag."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (train_state.json present), oldest first."""
    root = checkpoints_root(output_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
                if (p / TRAIN_STATE).is_file():
                    found.append((int(p.name[len(PREFIX) :]), p))
    return sorted(found)


def find_resume_checkpoint(resume: str | None, output_dir: str | Path) -> Path | None:
    """'auto': the newest complete checkpoint of this output dir (None: start fresh); a path: that one."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / TRAIN_STATE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint: {path} is not a complete checkpoint ({TRAIN_STATE} missing)")
    return path


# ------------------------------------------------------------------------------ JSON <-> tensors


def _flatten(obj: object, tensors: dict[str, torch.Tensor], prefix: str, seen: dict[int, str] | None = None) -> object:
    """JSON-able structure with tensors moved into `tensors` (names are paths); dict keys keep their types.

    A tensor object met twice (bitsandbytes shares one quantization map between parameters) is stored once.
    """
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            copy = obj.detach().to("cpu")
            # safetensors refuses tensors sharing memory: own every stored tensor.
            tensors[prefix] = (copy.clone() if copy.data_ptr() == obj.data_ptr() else copy).contiguous()
            seen[id(obj)] = prefix
        return {"__tensor__": seen[id(obj)]}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}/{k}", seen)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_flatten(v, tensors, f"{prefix}/{i}", seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj: object, tensors: dict[str, torch.Tensor], device: torch.device) -> object:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]].to(device)
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors, device) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors, device) for v in obj]
    return obj


def save_structured(path_stem: Path, obj: object) -> None:
    """`<stem>.json` + `<stem>.safetensors` (the latter only when there are tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, tensors, "t")
    if tensors:
        save_file(tensors, str(path_stem.with_suffix(".safetensors")))
    path_stem.with_suffix(".json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_structured(path_stem: Path, device: torch.device | str = "cpu") -> object:
    skeleton = json.loads(path_stem.with_suffix(".json").read_text(encoding="utf-8"))
    st = path_stem.with_suffix(".safetensors")
    tensors = load_file(str(st), device="cpu") if st.is_file() else {}
    return _unflatten(skeleton, tensors, device)


# ------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))


# ------------------------------------------------------------------------------ save / load


def _write_json_atomic(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    info: DistInfo,
    model: torch.nn.Module,
    optimizer,
    lr_scheduler,
    scaler,
    train_state: dict,
    config: dict,
    total_limit: int | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    root = checkpoints_root(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    if (final / TRAIN_STATE).is_file():
        # This step is already saved (e.g. the end of an epoch, then evaluation and saving, then the end of the
        # run): weights and optimizer are unchanged, only the counters moved on, so refresh the train state.
        if info.is_main_process:
            old = json.loads((final / TRAIN_STATE).read_text(encoding="utf-8"))
            _write_json_atomic(final / TRAIN_STATE, {**old, **train_state})
        barrier()
        return final
    if info.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "optimizer").mkdir(parents=True)
        (tmp / "rng").mkdir()
    barrier()
    writer = dcp.HuggingFaceStorageWriter(str(tmp / "model"), save_distributed=True)
    dcp.save(optimizer.model_state_dict(model), storage_writer=writer)
    opt_state = {"layout": optimizer.layout(), "name": optimizer.name, "state": optimizer.state_dict()}
    save_structured(tmp / "optimizer" / f"rank{info.rank}", opt_state)
    save_structured(tmp / "rng" / f"rank{info.rank}", rng_state())
    barrier()
    if info.is_main_process:
        state = dict(train_state)
        state["world_size"] = info.world_size
        state["lr_scheduler"] = lr_scheduler.state_dict()
        state["scaler"] = scaler.state_dict() if scaler is not None else None
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
        _write_json_atomic(tmp / TRAIN_STATE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, info: DistInfo, model: torch.nn.Module, optimizer, lr_scheduler, scaler) -> dict:
    """Collective: restores everything saved above into freshly built objects; returns the train state."""
    state = json.loads((path / TRAIN_STATE).read_text(encoding="utf-8"))
    model_sd = optimizer.model_state_dict(model)  # the fp32 master weights, whichever layout holds them
    dcp.load(model_sd, storage_reader=dcp.HuggingFaceStorageReader(str(path / "model")))
    optimizer.load_model_state_dict(model, model_sd)
    opt_stem = path / "optimizer" / f"rank{info.rank}"
    if state["world_size"] != info.world_size or not opt_stem.with_suffix(".json").is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: written by {state['world_size']} processes, this run has "
            f"{info.world_size}; the optimizer state is per rank: resume with the same number of processes"
        )
    opt = load_structured(opt_stem, info.device)
    if opt["name"] != optimizer.name or opt["layout"] != optimizer.layout():
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: optimizer {opt['name']} with another shard layout; resume with the "
            "same --optimizer, --sharding and number of processes"
        )
    optimizer.load_state_dict(opt["state"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(load_structured(path / "rng" / f"rank{info.rank}"))
    if dist.is_initialized():
        dist.barrier()
    return state
