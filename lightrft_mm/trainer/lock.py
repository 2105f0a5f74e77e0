"""One run per folder: an exclusive lock on `<output_dir>/.lock`, taken before any other work.

The lock is an OS file lock (`flock`), so the kernel releases it when its process dies: the lock
of a dead run is stale by construction and the next run takes it over. The file records the
holder (pid, host, start time) so that a refused run can say who holds the folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from lightrft_mm.errors import ConfigError

log = logging.getLogger(__name__)
LOCK = ".lock"


class RunLock:
    """Holds `<folder>/.lock` from `acquire` until `release` (or the process ends)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise naming its holder.

        Raises:
            ConfigError: another live process holds the folder.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(f"trainer.output_dir: {self.path.parent} is in use by another run ({_who(holder)}). "
                              "Fix: wait for it to finish or stop it, or choose another output_dir.") from None
        previous = _read(fd)
        if previous:
            log.info("%s: taking over the lock of a run that is no longer running (%s)", self.path, _who(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _who(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
