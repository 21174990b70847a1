"""One run per output directory: busy refused at once, released on exit, stale lock taken over."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.__main__ import main
from trainer.lock import LOCK_NAME, OutputDirBusy, output_dir_lock

ROOT = Path(__file__).resolve().parents[2]


def test_second_holder_is_refused_with_the_owner_named(tmp_path):
    out = tmp_path / "run"
    with output_dir_lock(out):
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        owner = rf"in use by process {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(OutputDirBusy, match=owner), output_dir_lock(out):
            pass
    assert not (out / LOCK_NAME).exists()  # released on exit
    with output_dir_lock(out, say=pytest.fail):  # and free again, with nothing stale to report
        pass


def test_second_run_into_a_busy_dir_is_refused_at_once_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    with output_dir_lock(out):
        start = time.perf_counter()
        rc = main(["--output-dir", str(out), "--max-steps", "1", "--device", "cpu"])
        seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"is in use by process {os.getpid()}" in err, err
    assert seconds < 30  # before the model and the data are loaded (torch's import included)
    assert not (out / "metrics.jsonl").exists()


def test_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path):
    out = tmp_path / "run"
    code = (
        "import os, sys\nfrom trainer.lock import output_dir_lock\n"
        f"with output_dir_lock({str(out)!r}):\n    print(os.getpid(), flush=True)\n    os._exit(9)\n"
    )  # dies holding the lock, as kill -9 would: no cleanup runs
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    dead_pid = int(run.stdout.split()[0])
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == dead_pid
    said = []
    with output_dir_lock(out, say=said.append):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"taking over the lock of process {dead_pid}" in said[0], said


def test_other_ranks_do_not_lock(tmp_path):
    with output_dir_lock(tmp_path / "run"), output_dir_lock(tmp_path / "run", enabled=False) as held:
        assert held is None
