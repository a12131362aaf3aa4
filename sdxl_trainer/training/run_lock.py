"""One trainer per output folder: an exclusive `fcntl.flock` on `<output_dir>/.trainer.lock`, held by rank 0.

flock is released by the kernel when the holding process dies (kill -9 included), so a lock left by a dead
trainer never blocks the next one: its file is simply taken over. The file records who holds it (pid, host,
run id, start time) for the message a second trainer prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".trainer.lock"


class RunLockError(RuntimeError):
    """Another trainer is writing into this output folder."""


class RunLock:
    def __init__(self, run_dir: Path, run_id: str):
        self.path = Path(run_dir) / LOCK_FILE
        self.run_id = run_id
        self.fd: int | None = None
        self.previous_holder: dict | None = None  # a dead trainer's record, when its lock was taken over

    def acquire(self) -> RunLock:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunLockError(
                    f"another trainer is writing into {self.path.parent} ({_describe(holder)}; lock {self.path}); "
                    "wait for it to end, stop it, or choose another --output_dir"
                ) from None
            # The holder may have unlinked the file between our open and our lock: then we locked an orphan.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.previous_holder = _read(fd) or None
            record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id, "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            self.fd = fd
            return self
        raise RunLockError(f"could not take the lock {self.path} (it keeps being replaced)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then re-checks the inode (see acquire)
        finally:
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, run {holder.get('run_id')}, since {since}"
