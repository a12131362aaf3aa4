"""Full training-state checkpoints: `<output_dir>/checkpoints/step-<N>/`, written atomically, keep-last-K,
resumable with `--resume_from_checkpoint auto|PATH`.

    model/                 the sharded UNet (torch.distributed.checkpoint, safetensors shards; reshardable)
    optimizer/rank<R>.*    each rank's local-shard optimizer state (safetensors + JSON), incl. 8-bit state
    rng/rank<R>.*          every rank's RNG states (torch CPU/CUDA, python, numpy, the stochastic rounding's)
    extra/<name>/rank<R>.* further per-rank state objects (`extra=` of save/load_checkpoint: EMA, ...)
    config.json            the resolved flags of the run that wrote it (compared on resume: resume_check.py)
    train_state.json       step, epoch, sampler position and carried items, LR scheduler, grad scaler,
                           counters, validation split, run id; its presence marks a complete checkpoint
    manifest.json          size and sha256 of every file above, written last (checkpoint_integrity.py)

All ranks write into `.tmp-step-<N>/`; after a barrier rank 0 hashes it and swaps it in as `step-<N>/`, replacing
any earlier folder of that step whole. Nothing is pickled.
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
from sdxl_trainer.training import checkpoint_integrity as integrity
from sdxl_trainer.training import stochastic_rounding

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


def step_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `step-<N>` folder, complete or not, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(p.name[len(PREFIX) :]), p) for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX) :].isdigit()]  # fmt: skip
    return sorted(found)


def choose_resume_checkpoint(resume: str | None, output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, verified against its manifest, and notes naming each damaged or incomplete
    checkpoint that was passed over. 'auto' falls back to the newest intact one (None: none at all, start
    fresh); a damaged explicit path, or a folder whose every checkpoint is damaged, is an error."""
    path = find_resume_checkpoint(resume, output_dir)
    if path is None:
        return None, []
    if resume != "auto":
        problems = integrity.verify_checkpoint(path)
        if problems:
            raise CheckpointError(
                f"--resume_from_checkpoint {path} is damaged:\n  " + "\n  ".join(problems) + "\nResume from an "
                "earlier checkpoint (or --resume_from_checkpoint auto, which skips damaged ones)."
            )
        return path, []
    notes = []
    complete = dict(list_checkpoints(output_dir))
    for step, folder in reversed(step_folders(output_dir)):
        if step not in complete:
            notes.append(f"checkpoint {folder} is incomplete ({TRAIN_STATE} missing) and was skipped")
            continue
        problems = integrity.verify_checkpoint(folder)
        if not problems:
            return folder, notes
        notes.append(f"checkpoint {folder} is damaged and was skipped: " + "; ".join(problems))
    raise CheckpointError(
        "--resume_from_checkpoint auto: every checkpoint in "
        f"{checkpoints_root(output_dir)} is damaged or incomplete:\n  " + "\n  ".join(notes)
    )


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
    state["stochastic_rounding"] = stochastic_rounding.generator_states()  # bf16 weights' rounding stream
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))
    stochastic_rounding.set_generator_states(state.get("stochastic_rounding") or {})


# ------------------------------------------------------------------------------ save / load


def _write_json_atomic(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _swap_in(tmp: Path, final: Path) -> None:
    """`tmp` becomes `final`; an existing `final` (another trajectory's step, or this run's older write of the
    step) is replaced whole, never merged. A crash between the two renames leaves `.replaced-step-N` and no
    `step-N`: never a mix of two writes; `recover_interrupted_swaps` puts the old copy back."""
    old = final.with_name(f".replaced-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swaps(output_dir: str | Path) -> list[str]:
    """Rank 0, before choosing a checkpoint: a `.replaced-step-N` without `step-N` (a crash in `_swap_in`) is the
    complete earlier copy of that step; it becomes `step-N` again (its manifest is verified like any other)."""
    root, notes = checkpoints_root(output_dir), []
    for old in sorted(root.glob(f".replaced-{PREFIX}*")) if root.is_dir() else []:
        final = root / old.name[len(".replaced-") :]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            notes.append(f"{final.name}: restored the copy left by a write interrupted while replacing it")
    return notes


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_finite_weights(optimizer, model: torch.nn.Module, what: str) -> None:
    """Collective: refuse to save (or resume from) non-finite master weights, loudly."""
    bad = integrity.count_nonfinite(integrity.master_tensors(optimizer, model))
    if bad:
        raise CheckpointError(
            f"{what}: the weights hold {bad if bad > 0 else 'an uncountable number of'} non-finite values; nothing "
            "was saved from them. Resume from an earlier checkpoint with a lower --learning_rate."
        )


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
    refresh_only: bool = False,
    extra: dict | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder.

    Everything is written into `.tmp-step-<N>/`, hashed into `manifest.json`, then swapped in whole.
    `refresh_only`: the step's folder holds this very model and optimizer state (written or loaded by this
    process at this step): its tensor files are hard-linked and only the train state and config are new.
    `extra`: named objects with `state_dict()`/`load_state_dict()` (e.g. EMA weights), saved per rank under
    `extra/<name>/rank<R>` the way the optimizer state is.
    """
    root = checkpoints_root(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    refresh_only = refresh_only and (final / integrity.MANIFEST).is_file()
    if not refresh_only:
        _check_finite_weights(optimizer, model, f"checkpoint at step {step}")
    if info.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "optimizer").mkdir(parents=True)
        (tmp / "rng").mkdir()
    barrier()
    if refresh_only:
        # The tensor files' hashes carry over; the train state and config are new (their old hashes would vouch
        # for the old bytes whenever the new file happens to have the same size).
        renewed = (TRAIN_STATE, "config.json")
        known = {rel: meta for rel, meta in (integrity.read_manifest(final) or {}).get("files", {}).items()
                 if rel not in renewed}  # fmt: skip
        if info.is_main_process:
            for rel in known:
                _link_or_copy(final / rel, tmp / rel)
    else:
        known = None
        writer = dcp.HuggingFaceStorageWriter(str(tmp / "model"), save_distributed=True)
        dcp.save(optimizer.model_state_dict(model), storage_writer=writer)
        opt_state = {"layout": optimizer.layout(), "name": optimizer.name, "state": optimizer.state_dict()}
        save_structured(tmp / "optimizer" / f"rank{info.rank}", opt_state)
        save_structured(tmp / "rng" / f"rank{info.rank}", rng_state())
        for name, obj in (extra or {}).items():
            (tmp / "extra" / name).mkdir(parents=True, exist_ok=True)
            save_structured(tmp / "extra" / name / f"rank{info.rank}", obj.state_dict())
    barrier()
    if info.is_main_process:
        state = dict(train_state)
        state["world_size"] = info.world_size
        state["lr_scheduler"] = lr_scheduler.state_dict()
        state["scaler"] = scaler.state_dict() if scaler is not None else None
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
        _write_json_atomic(tmp / TRAIN_STATE, state)
        integrity.write_manifest(tmp, known)  # last: its presence and content vouch for every other file
        _swap_in(tmp, final)
        if total_limit:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path, info: DistInfo, model: torch.nn.Module, optimizer, lr_scheduler, scaler, extra: dict | None = None
) -> dict:
    """Collective: restores everything saved above into freshly built objects; returns the train state.

    Optimizer state is read onto the CPU and placed by the optimizer's own `load_state_dict` (torch and
    bitsandbytes move each state tensor to its parameter's device; torch keeps `step` counters on the CPU),
    so `--cpu_offload` state stays beside its CPU parameters and GPU runs keep `step` on the host (a CUDA `step`
    cost one host sync per tensor at every optimizer step)."""
    state = json.loads((path / TRAIN_STATE).read_text(encoding="utf-8"))
    model_sd = optimizer.model_state_dict(model)  # the fp32 master weights, whichever layout holds them
    dcp.load(model_sd, storage_reader=dcp.HuggingFaceStorageReader(str(path / "model")))
    optimizer.load_model_state_dict(model, model_sd)
    _check_finite_weights(optimizer, model, f"--resume_from_checkpoint {path}")
    opt_stem = path / "optimizer" / f"rank{info.rank}"
    if state["world_size"] != info.world_size or not opt_stem.with_suffix(".json").is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: written by {state['world_size']} processes, this run has "
            f"{info.world_size}; the optimizer state is per rank: resume with the same number of processes"
        )
    opt = load_structured(opt_stem, "cpu")
    if opt["name"] != optimizer.name or opt["layout"] != optimizer.layout():
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: optimizer {opt['name']} with another shard layout (this run: "
            f"{optimizer.name}); resume with the same --optimizer, --sharding and number of processes (and, for "
            "adamw8bit over bf16 weights, the same --adamw_kernel: the fused kernel keeps its own state)"
        )
    optimizer.load_state_dict(opt["state"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(load_structured(path / "rng" / f"rank{info.rank}"))
    for name, obj in (extra or {}).items():
        stem = path / "extra" / name / f"rank{info.rank}"
        if not stem.with_suffix(".json").is_file():
            raise CheckpointError(f"--resume_from_checkpoint {path}: it holds no {name} state (extra/{name}/)")
        obj.load_state_dict(load_structured(stem, "cpu"))
    if dist.is_initialized():
        dist.barrier()
    return state
