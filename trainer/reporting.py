"""Where metrics go besides ``metrics.jsonl`` (``report_to``, and the loss plot), and trained-token accuracy.

- TensorBoard: event files in ``<output_dir>/tensorboard`` (``tensorboard --logdir <output_dir>``).
- Weights & Biases: a run in ``<output_dir>/wandb``, offline (``wandb sync`` later) unless ``WANDB_MODE``
  or ``WANDB_API_KEY`` is set.
- ``loss.png`` at the end of a run: training and validation loss by step, and a panel of the generation
  metrics (trainer/evalgen.py) when there are any.

Accuracy: the fraction of target tokens whose argmax logit is the label. The masked CE kernel counts it in
the same pass when it takes ``correct=`` (a 0-d int64 device tensor it adds to, without a sync); with a
loss function that does not, no accuracy is reported.
"""

from __future__ import annotations

import atexit
import inspect
import os
from pathlib import Path

import torch

from trainer import evalgen  # the generation metrics' panel of the loss plot
from trainer.config import TrainConfig, config_to_dict


class Reporters:
    """Sends every metrics record to the backends of ``cfg.report_to``; does nothing when disabled."""

    def __init__(self, cfg: TrainConfig, out: Path, enabled: bool = True):
        self.tensorboard = self.wandb = None
        names = set(cfg.report_to) - {"none"} if enabled else set()
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out / "tensorboard"))
        if "wandb" in names:
            import wandb

            configured = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
            mode = os.environ.get("WANDB_MODE") or ("online" if configured else "offline")
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "tritrain"), name=out.name, dir=str(out),
                config=config_to_dict(cfg), mode=mode,
            )  # fmt: skip
        atexit.register(self.close)  # a crashed run still flushes what it logged

    def log(self, record: dict) -> None:
        step = record["step"]
        values = {_tag(k): v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tag(key: str) -> str:
    """metrics.jsonl key -> dashboard tag: val_loss -> val/loss, loss -> train/loss."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def plot_losses(records: list[dict], path: Path) -> None:
    """``loss.png``: training and validation loss by step, and the generation metrics below when any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    generation = evalgen.has_generation_metrics(records)  # a second panel
    fig, axes = plt.subplots(2 if generation else 1, 1, figsize=(6, 7 if generation else 4), sharex=True,
                             squeeze=False)  # fmt: skip
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if generation:
        evalgen.plot_generation(axes[1, 0], records)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ZLoss:
    """The z-loss (PaLM's stability term, Liger's ``lse_square_scale``): ``coefficient * logsumexp^2`` of the
    logits per trained token, added to the training loss by the same pass of the fused loss (validation
    losses stay cross-entropy alone), summed on the device; ``take``: its mean per token since the last."""

    def __init__(self, coefficient: float, loss_fn, device: torch.device):
        if coefficient and "lse_square_scale" not in inspect.signature(loss_fn).parameters:
            raise ValueError("z_loss needs a loss function that takes lse_square_scale (loss_backend fused)")
        self.coefficient = coefficient
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    def wrap(self, loss_fn):
        """``loss_fn`` with the z term added in training steps (gradients on), when the coefficient is set."""
        if not self.coefficient:
            return loss_fn

        def with_z(hidden, weight, labels, **kwargs):
            if not torch.is_grad_enabled():
                return loss_fn(hidden, weight, labels, **kwargs)
            z = dict(lse_square_scale=self.coefficient, return_z_loss=True)
            out = loss_fn(hidden, weight, labels, **z, **kwargs)
            self.total += out.z_loss.detach().double()
            self.tokens += (labels != kwargs.get("ignore_index", -100)).sum()
            return out.loss

        return with_z

    def take(self, world) -> dict:
        """``{"z_loss": mean per trained token}`` since the last take, or {} when off. Every rank calls it."""
        if not self.coefficient:
            return {}
        total, tokens = world.sum(torch.stack([self.total, self.tokens.double()])).tolist()
        self.total.zero_()
        self.tokens.zero_()
        return {"z_loss": total / max(1, tokens)}


class TokenAccuracy:
    """Counts the target tokens and those predicted right, on the device, separately for training steps
    (gradients on) and evaluation (no_grad); ``take`` sums them over the ranks and starts over."""

    def __init__(self, loss_fn, device: torch.device):
        self.supported = "correct" in inspect.signature(loss_fn).parameters
        zero = lambda: torch.zeros((), dtype=torch.int64, device=device)
        self.counts = {kind: (zero(), zero()) for kind in ("train", "val")}  # (correct, tokens)

    def wrap(self, loss_fn):
        """``loss_fn`` that also counts, when it can."""
        if not self.supported:
            return loss_fn

        def counted(hidden, weight, labels, **kwargs):
            correct, tokens = self.counts["train" if torch.is_grad_enabled() else "val"]
            tokens += (labels != kwargs.get("ignore_index", -100)).sum()
            return loss_fn(hidden, weight, labels, correct=correct, **kwargs)

        return counted

    def take(self, world, kind: str = "train") -> dict:
        """``{"acc": correct / tokens}`` (``val_acc`` for kind "val") since the last take, or {} when the loss
        function cannot count. Every rank must call it (one all-reduce)."""
        if not self.supported:
            return {}
        correct, tokens = world.sum(torch.stack(self.counts[kind])).tolist()
        for count in self.counts[kind]:
            count.zero_()
        return {"acc" if kind == "train" else "val_acc": correct / max(1, tokens)}
