"""Files written whole or not at all: a temporary file in the same folder, then `os.replace`.

`tempfile` creates files 0600 and folders 0700; `give_umask_mode` gives them the mode a plain `open()` or
`mkdir()` would have had (0666 / 0777 less the umask), so a TensorBoard or web server run by another user can
read samples, pipelines and caches as the user's umask allows."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """chmod a file made by `tempfile` (0600) or a folder (0700) to what open()/mkdir() would have made."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def give_umask_mode_tree(folder: str | os.PathLike) -> None:
    """`give_umask_mode` for a folder and everything below it (libraries' save_pretrained write 0600 files too)."""
    give_umask_mode(folder, directory=True)
    for parent, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            give_umask_mode(os.path.join(parent, name), directory=True)
        for name in filenames:
            give_umask_mode(os.path.join(parent, name))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        give_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: object) -> None:
    _atomic_write_bytes(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        give_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
