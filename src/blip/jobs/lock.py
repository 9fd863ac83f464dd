"""One job at a time per output folder: the coordinator (the process itself, torchrun rank 0, the Ray driver) holds an
exclusive `flock` on ``<out>/.blip.lock`` from before it looks at the folder until the job is finished; its workers
(ranks, actors) work under that lock.

The kernel drops a `flock` when its holder dies, so a lock left by a killed job never blocks a rerun. The file also
says who holds it (pid, host, command, since when), for the message a second job gets; that text is information
only, the lock is the `flock`. A finished job removes the file.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

LOCK = ".blip.lock"


class OutputBusyError(RuntimeError):
    """Another job holds the output folder."""


class OutputLock:
    """``with OutputLock(folder):`` the exclusive right to write `folder` (created if missing).

    Raises `OutputBusyError` naming the holder when another process has it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(f"{self.folder} is in use by another job ({self.holder()})") from None
            # The file may have been removed by a holder that finished while we opened it: then we hold a lock on
            # a file nobody else can see, so try again with the one at the path.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        self._fd = fd
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(sys.argv)[:300],
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as its file says (it may not have written it yet)."""
        try:
            info: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "its details are not written yet"
        return (
            f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: {info.get('command')}; wait for "
            f"it to finish, or stop it (a rerun of a stopped job resumes)"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # still holding the lock: whoever opened this file sees it gone and retries
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
