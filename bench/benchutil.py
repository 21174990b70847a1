"""What the benchmarks share: naming the code that was measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(paths=("tritrain_kernels", "trainer", "bench")) -> str:
    """Short HEAD, plus the files under ``paths`` with uncommitted changes; "unknown" outside git."""
    try:
        git = dict(cwd=ROOT, capture_output=True, text=True, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", *paths], **git).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = [line[3:] for line in status.splitlines()]
    return commit + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
