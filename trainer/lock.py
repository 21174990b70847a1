"""One run at a time per output directory.

The run holds ``<output_dir>/.lock``: a file naming its pid, host and start time, with an exclusive
``flock`` on it for as long as the run lives. The kernel drops the flock when the process ends, however
it ends, so a lock file whose flock can be taken is a stale one (a crash, kill -9): it is taken over with a
message. A second run into a busy directory is refused at once with one line naming the owner.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class OutputDirBusy(RuntimeError):
    """Another live run holds the output directory; the CLI prints it as one line."""


def _owner(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']} (started {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def _open_locked(path: Path, out: Path) -> int:
    """A descriptor of ``path`` holding its flock. Retried when the file was removed by its previous
    owner between our open and our flock (we would hold a lock on a file nobody else sees)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirBusy(
                f"output_dir {out} is in use by {_owner(path.read_text())}: wait for that run to end or "
                "choose another --output-dir"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def output_dir_lock(output_dir: str | Path, *, enabled: bool = True, say=print):
    """Create ``output_dir`` and hold its lock inside the ``with`` block; ``enabled=False``: do nothing
    (the other ranks of a multi-process run, whose rank 0 holds the lock)."""
    if not enabled:
        yield None
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = _open_locked(path, out)
    try:
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            say(
                f"output_dir {out}: taking over the lock of {_owner(previous)}, which ended without "
                "releasing it"
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield path
        finally:
            # remove before unlocking: a run waiting on the flock then finds no stale owner to report
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
