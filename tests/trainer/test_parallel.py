"""One process: a training step does not wait for the device, and checkpoints load onto the CPU."""

import inspect
import sys
from contextlib import contextmanager

import pytest
import torch

import trainer.parallel as parallel
import trainer.train as train_module
from trainer.config import load_config
from trainer.train import train
from tritrain_kernels import masked_linear_cross_entropy

# Tensor methods that make the host wait for the device (on CUDA); on CPU they are counted instead.
SYNCING = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")


def _in_attention_reference() -> bool:
    """The CPU attention reference reads cu_seqlens on the host by design; the GPU backends do not."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith("varlen_attention.py"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def counting_syncs(monkeypatch):
    """Yields (calls, active): while active[0], every syncing call is appended to calls."""
    calls, active, busy = [], [False], [False]

    def counted(name, original):
        def call(self, *args, **kwargs):
            if active[0] and not busy[0] and not _in_attention_reference():
                caller = sys._getframe(1)
                calls.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            busy[0], was = True, busy[0]
            try:
                return original(self, *args, **kwargs)
            finally:
                busy[0] = was

        return call

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counted("torch.nonzero", torch.nonzero))
    yield calls, active


LOSSES = ["reference", "fused"]


@pytest.mark.parametrize("loss_backend", LOSSES)
def test_a_step_does_not_sync(tmp_path, monkeypatch, loss_backend):
    if (
        loss_backend == "fused"
        and "assume_valid" not in inspect.signature(masked_linear_cross_entropy).parameters
    ):
        pytest.skip("this masked CE has no assume_valid: it checks the labels itself, with one sync per call")
    steps = 3
    with counting_syncs(monkeypatch) as (calls, active):
        real_step = train_module.train_step
        per_step = []

        def step(*args, **kwargs):
            active[0], before = True, len(calls)
            try:
                return real_step(*args, **kwargs)
            finally:
                active[0] = False
                per_step.append(calls[before:])

        monkeypatch.setattr(train_module, "train_step", step)
        args = ["--device", "cpu", "--max-tokens", "256", "--max-length", "256", "--grad-accum", "2",
                "--max-steps", str(steps), "--log-every", "100", "--eval-every", "0", "--save-every", "0",
                "--val-file", "", "--loss-backend", loss_backend, "--output-dir", str(tmp_path)]  # fmt: skip
        result = train(load_config(args))
    assert len(per_step) == steps and result["steps"] == steps
    assert all(len(syncs) <= 1 for syncs in per_step), per_step
    assert all(len(syncs) == 0 for syncs in per_step), per_step  # one process: nothing to read back


def test_the_counter_sees_a_sync(monkeypatch):
    with counting_syncs(monkeypatch) as (calls, active):
        active[0] = True
        x = torch.ones(3)
        x.sum().item()
        bool(x.any())
        active[0] = False
    assert [c.split(" ")[0] for c in calls] == ["item", "__bool__"]


def test_checkpoints_load_onto_the_cpu(tmp_path, monkeypatch):
    torch.save({"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}, tmp_path / "state.pt")
    seen = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real_load(*a, **k)
    )
    loaded = parallel.load_cpu(tmp_path / "state.pt")
    assert seen == ["cpu"] and loaded["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"


def test_rng_state_is_this_process_own(monkeypatch):
    """Only this process's GPU is saved and restored, onto the GPU it uses now (CPU: no GPU state)."""
    device = torch.device("cpu")
    torch.manual_seed(5)
    saved = train_module.rng_state(device)
    first = torch.rand(4)
    torch.manual_seed(6)
    train_module.set_rng_state(saved, device)
    assert torch.equal(torch.rand(4), first) and "cuda" not in saved
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", d)))
    gpu = torch.device("cuda", 1)
    state = train_module.rng_state(gpu)
    train_module.set_rng_state(state, torch.device("cuda", 0))  # resumed with fewer GPUs: its own one
    assert calls == [("get", gpu), ("set", torch.device("cuda", 0))]
