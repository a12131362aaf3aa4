"""Content hashes of model and upscaler files, memoised by (size, mtime) so a re-run does not re-read
gigabytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from sdxl_trainer.atomic_files import atomic_write_json

HASH_MEMO_FILE = ".file_hashes.json"


class FileHasher:
    """sha256 of files, memoised by (path, size, mtime) so an unchanged multi-GB model is hashed once."""

    def __init__(self, memo_path: Path | None = None):
        self.memo_path = memo_path
        self.memo: dict[str, str] = {}
        if memo_path and memo_path.is_file():
            with contextlib.suppress(OSError, ValueError):
                self.memo = json.loads(memo_path.read_text(encoding="utf-8"))
        self.changed = False

    def file(self, path: Path) -> str:
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in self.memo:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            self.memo[memo_key], self.changed = digest.hexdigest(), True
        return self.memo[memo_key]

    def folder(self, folder: Path) -> str:
        """One hash over every file below `folder` (relative names and contents)."""
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{path.relative_to(folder).as_posix()}={self.file(path)};".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if self.memo_path and self.changed:
            atomic_write_json(self.memo_path, self.memo)
