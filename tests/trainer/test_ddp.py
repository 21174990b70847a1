"""torchrun with 2 CPU processes (gloo) against one process over the same rows: same losses, gradients
(their norm, every step), validation losses and adapter; rank 0 alone writes; resume works."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load_config
from trainer.data import DEMO_TRAIN_FILE, DEMO_VAL_FILE
from trainer.train import TrainingError, train

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data: Path, out: Path, grad_accum: int) -> list[str]:
    # 16 conversations pack into 5 rows: with 2 ranks x 1 row a step, the last step of each epoch has
    # one row, so rank 1 has none; 3 validation rows do not split evenly either
    return ["--device", "cpu", "--max-tokens", "256", "--max-length", "256", "--lr", "5e-3",
            "--lora-dropout", "0", "--max-steps", "0", "--epochs", "2", "--warmup", "2", "--log-every", "1",
            "--eval-every", "3", "--save-every", "3", "--train-file", str(data / "train.jsonl"),
            "--val-file", str(data / "val.jsonl"), "--grad-accum", str(grad_accum),
            "--output-dir", str(out)]  # fmt: skip


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", port, "-m", "trainer", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=1e-5, atol=0)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(DEMO_TRAIN_FILE.read_text().splitlines()[:16]) + "\n")
    (data / "val.jsonl").write_text("\n".join(DEMO_VAL_FILE.read_text().splitlines()[:6]) + "\n")
    # one process with 2 rows a step sees the same rows per step as 2 processes with 1 row each
    single = train(load_config(_args(data, tmp / "single", grad_accum=2)))
    ddp = _torchrun(_args(data, tmp / "ddp", grad_accum=1))
    return tmp, data, single, ddp


def test_two_processes_match_one(runs):
    tmp, _, single, ddp = runs
    one, two = _metrics(tmp / "single"), _metrics(tmp / "ddp")
    assert "5 packed rows per epoch, 6 steps of 1 rows on each of 2 processes" in ddp.stdout
    assert single["steps"] == 6 and len(single["losses"]) == 6
    assert [sorted(r) for r in one] == [sorted(r) for r in two]  # same records, each written once
    for key in ("loss", "grad_norm", "val_loss"):  # grad_norm: of the summed gradients, before clipping
        _close([r[key] for r in two if key in r], [r[key] for r in one if key in r])
    assert [r["lr"] for r in two if "lr" in r] == [r["lr"] for r in one if "lr" in r]
    for name in ("final", "best", "checkpoint-000003", "checkpoint-000006"):
        a = load_file(tmp / "single" / name / "adapter_model.safetensors")
        b = load_file(tmp / "ddp" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:  # AdamW turns 1e-7 gradient noise on near-zero entries into ~1% of lr
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-4, msg=f"{name} {key}")


def test_only_rank_0_writes(runs):
    tmp, _, _, ddp = runs
    names = {run: sorted(p.name for p in (tmp / run).iterdir()) for run in ("single", "ddp")}
    assert names["ddp"] == names["single"]
    lines = ddp.stdout.splitlines()
    assert sum(line.startswith("step 1/6: loss") for line in lines) == 1, ddp.stdout
    assert sum(line.startswith("model ") for line in lines) == 1, ddp.stdout


def test_resume_with_two_processes(runs):
    tmp, data, _, _ = runs
    out = tmp / "resumed"
    shutil.copytree(tmp / "ddp", out)
    for name in ("checkpoint-000006", "final"):
        shutil.rmtree(out / name)
    _torchrun([*_args(data, out, grad_accum=1), "--resume", "auto"])
    full, resumed = _metrics(tmp / "ddp"), _metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    _close([r["loss"] for r in resumed if "loss" in r], [r["loss"] for r in full if "loss" in r])
    with pytest.raises(TrainingError, match="made with 2 processes, this run has 1"):
        train(load_config([*_args(data, out, grad_accum=1), "--resume", "auto"]))
