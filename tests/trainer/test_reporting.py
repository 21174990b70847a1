"""report_to (TensorBoard, W&B), trained-token accuracy in the log, the Python API train(TrainConfig(...))."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import trainer.train as train_module
from trainer import ConfigError, TrainConfig, load_config
from trainer.distributed import ONE_PROCESS
from trainer.reporting import Reporters, TokenAccuracy
from tritrain_kernels import masked_linear_cross_entropy_ref

ROOT = Path(__file__).resolve().parents[2]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_receives_every_record(tmp_path):
    reporters = Reporters(TrainConfig(report_to=["tensorboard"]), tmp_path)
    reporters.log({"step": 1, "loss": 2.5, "lr": 1e-3})
    reporters.log({"step": 2, "loss": 2.0, "lr": 1e-3, "acc": 0.25})
    reporters.log({"step": 2, "val_loss": 1.5})
    reporters.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["train/acc"] == [(2, 0.25)] and scalars["val/loss"] == [(2, 1.5)]


def test_nothing_is_written_by_default_or_on_other_ranks(tmp_path):
    Reporters(TrainConfig(), tmp_path).log({"step": 1, "loss": 1.0})
    Reporters(TrainConfig(report_to=["tensorboard"]), tmp_path, enabled=False).log({"step": 1, "loss": 1.0})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("env, mode", [({}, "offline"), ({"WANDB_API_KEY": "k"}, "online"),
                                       ({"WANDB_MODE": "disabled"}, "disabled")])  # fmt: skip
def test_wandb_is_offline_unless_configured(tmp_path, monkeypatch, env, mode):
    calls = {}

    class Run:
        def log(self, values, step):
            calls.setdefault("log", []).append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reporters = Reporters(TrainConfig(report_to=["wandb"], lr=1e-3), tmp_path)
    reporters.log({"step": 3, "loss": 1.0})
    reporters.close()
    assert calls["init"]["mode"] == mode and calls["init"]["config"]["lr"] == 1e-3
    assert calls["log"] == [(3, {"train/loss": 1.0})] and calls["finished"]


def test_a_reporter_that_is_not_installed_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"report_to: wandb is not installed \(pip install wandb\)"):
        load_config(["--report-to", "wandb"])


def _loss_that_counts(hidden, weight, labels, *, correct=None, **kwargs):
    """The reference loss, plus the accuracy count the fused kernel makes (argmax of the logits)."""
    if correct is not None:
        logits = hidden.float() @ weight.float().T
        valid = labels != -100
        correct += (logits.argmax(-1) == labels)[valid].sum()
        COUNTED.append(
            (int((logits.argmax(-1) == labels)[valid].sum()), int(valid.sum()), torch.is_grad_enabled())
        )
    return masked_linear_cross_entropy_ref(hidden, weight, labels, **kwargs)


COUNTED = []


def test_token_accuracy_only_with_a_loss_that_counts():
    assert TokenAccuracy(masked_linear_cross_entropy_ref, torch.device("cpu")).take(ONE_PROCESS) == {}
    accuracy = TokenAccuracy(_loss_that_counts, torch.device("cpu"))
    loss_fn = accuracy.wrap(_loss_that_counts)
    weight = torch.eye(4)
    hidden = torch.eye(4)[[0, 1, 2, 3, 0]]
    loss_fn(hidden, weight, torch.tensor([0, 1, 3, -100, 2]), reduction="sum")  # rows 0 and 1 right
    with torch.no_grad():
        loss_fn(hidden, weight, torch.tensor([0, -100, -100, -100, -100]), reduction="sum")
    assert accuracy.take(ONE_PROCESS) == {"acc": 2 / 4}
    assert accuracy.take(ONE_PROCESS) == {"acc": 0.0}  # counted afresh after each take
    assert accuracy.take(ONE_PROCESS, "val") == {"val_acc": 1.0}


def test_python_api_trains_and_logs_accuracy_and_tensorboard(tmp_path, monkeypatch, capsys):
    from trainer import train  # the function, or the module trainer.train once imported: both callable

    monkeypatch.setattr(train_module, "masked_linear_cross_entropy", _loss_that_counts)
    COUNTED.clear()
    cfg = TrainConfig(device="cpu", max_tokens=256, max_length=256, max_steps=4, log_every=2, eval_every=4,
                      lr=5e-3, output_dir=str(tmp_path), report_to=["tensorboard"])  # fmt: skip
    result = train(cfg)
    assert result["steps"] == 4
    assert not (tmp_path / ".lock").exists()  # the output-dir lock is released at the end
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_counts = [c for c in COUNTED if c[2]]
    assert len(train_counts) == 4  # one packed row per step
    expected = [
        sum(c[0] for c in pair) / sum(c[1] for c in pair) for pair in (train_counts[:2], train_counts[2:])
    ]
    assert [r["acc"] for r in records if "acc" in r] == pytest.approx(expected)
    val = [c for c in COUNTED if not c[2]]
    assert [r["val_acc"] for r in records if "val_acc" in r] == [
        sum(c[0] for c in val) / sum(c[1] for c in val)
    ]
    assert f"acc {expected[-1]:.3f}" in capsys.readouterr().out
    assert [step for step, _ in _scalars(tmp_path / "tensorboard")["train/acc"]] == [2, 4]


def test_python_api_checks_the_config_without_importing_torch():
    code = (
        "import sys\nfrom trainer import TrainConfig, train, ConfigError\nloaded = 'torch' in sys.modules\n"
        "try:\n    train(TrainConfig(lr='fast'))\nexcept ConfigError as e:\n    print(e)\n"
        "print(loaded, 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.splitlines() == ["lr: expected float, got 'fast' (str)", "False False"]
