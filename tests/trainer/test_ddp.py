"""torchrun with 2 CPU processes (gloo) against one process over the same rows: same losses, gradients
(their norm, every step), validation losses, generated answers and adapter; rank 0 alone writes; resume
works."""

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kernels import masked_linear_cross_entropy
from trainer.config import load_config
from trainer.data import DEMO_TRAIN_FILE, DEMO_VAL_FILE, encode_file
from trainer.distributed import close_world, init_world
from trainer.model import apply_lora, enable_varlen_attention, lm_head_spec, load_model
from trainer.packing import make_packed_batches
from trainer.train import TrainingError, data_parallel_step, forward_backward, train

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


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
            "--eval-generate", "3", "--eval-max-new-tokens", "6", "--output-dir", str(out)]  # fmt: skip


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
    # generation is split across the processes (3 prompts on 2 ranks) and gathered: the same answers
    answers = [(tmp / run / "eval_samples.jsonl").read_text().splitlines() for run in ("single", "ddp")]
    assert answers[0] == answers[1] and len(answers[0]) == 3 * len([r for r in one if "val_loss" in r])
    for key in ("exact_match", "similarity", "stop_rate", "repetition", "length_ratio"):
        assert [r[key] for r in two if key in r] == [r[key] for r in one if key in r]
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


@pytest.mark.slow  # one more torchrun launch (~20 s on 2 CPU cores)
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


# ------------------------------------------------------------------------------------ one step's gradients


def _model_and_rows():
    """The demo with LoRA (B nonzero, so every LoRA weight gets a gradient) and 5 packed rows."""
    cfg = load_config(["--device", "cpu", "--lora-dropout", "0"])
    model, tokenizer = load_model(cfg)
    head = lm_head_spec(model)
    enable_varlen_attention(model, "reference")
    torch.manual_seed(0)  # LoRA A's init: the same in every process, as train() seeds it
    model = apply_lora(model, cfg)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    data, _ = encode_file(DEMO_TRAIN_FILE, tokenizer, max_length=256, progress=False)
    return model, head, make_packed_batches(data[:7], 256)


def _grads(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _step_worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    world = init_world("cpu")
    try:
        model, head, rows = _model_and_rows()
        results = {}
        for case, group in (("5 rows", rows), ("1 row", rows[:1])):  # 1 row: rank 1 has none
            loss, stop = data_parallel_step(model, group, head, masked_linear_cross_entropy, CPU,
                                            nullcontext(), world, interrupt=rank == 1)  # fmt: skip
            results[case] = (loss.clone(), stop, _grads(model))
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        close_world(world)


def test_step_gradients_of_two_processes_equal_one(tmp_path):
    torch.multiprocessing.spawn(_step_worker, args=(_free_port(), tmp_path), nprocs=2, join=True)
    model, head, rows = _model_and_rows()
    assert len(rows) == 5
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for case, group in (("5 rows", rows), ("1 row", rows[:1])):
        loss = forward_backward(model, group, head, masked_linear_cross_entropy, CPU, nullcontext())
        reference = _grads(model)
        for rank, results in enumerate(ranks):
            got_loss, stop, grads = results[case]
            assert stop  # rank 1 asked: every rank stops
            torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=0, msg=f"{case} rank {rank}")
            assert grads.keys() == reference.keys()
            for name, grad in reference.items():
                assert grad.abs().max() > 0, name
                # fp32 sums in another order: entries near zero get an error relative to the largest
                atol = 1e-6 * grad.abs().max().item()
                torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=atol, msg=f"{case} {name}")
        for name in reference:  # the all-reduce leaves the same numbers on every rank
            assert torch.equal(ranks[0][case][2][name], ranks[1][case][2][name])
