"""The training loop: packed micro-batches, fused masked loss, AdamW, eval, checkpoints, resume.

One optimizer step = ``grad_accum`` packed rows per process. Its loss is the sum of the per-token losses
of every target token of those rows on every process divided by their total number (DESIGN.md, loss
normalization), so the gradients do not depend on how conversations were packed or split across
micro-batches and processes. Under torchrun every process trains on its share of each step's rows
(trainer/distributed.py); rank 0 alone prints, logs and saves.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_ref
from trainer import make_callable
from trainer.config import TrainConfig, config_to_dict, save_config
from trainer.distributed import ONE_PROCESS, World, close_world, init_world
from trainer.lock import output_dir_lock
from trainer.model import (
    apply_lora,
    decoder_hidden_states,
    enable_varlen_attention,
    lm_head_spec,
    load_model,
    resolve_dtype,
)
from trainer.packing import PackedBatch, collate_packed, epoch_rows, make_packed_batches, pack
from trainer.reporting import Reporters, TokenAccuracy
from trainer.resume import apply_overrides, compare_with_checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, ...); the CLI prints it as one line."""


# ----------------------------------------------------------------------------------------- the step


def micro_batch_loss_sum(model, batch: PackedBatch, head, loss_fn) -> torch.Tensor:
    """Sum of the per-token cross-entropies of one packed row; the model never computes logits."""
    weight, bias, softcap = head
    hidden = decoder_hidden_states(model, batch)[0].index_select(0, batch.loss_index)
    return loss_fn(hidden, weight, batch.loss_targets, bias=bias, reduction="sum", softcap=softcap)


def forward_backward(
    model, micro_batches: list[PackedBatch], head, loss_fn, device, autocast, *, num_loss_tokens: int = 0
):
    """Accumulate the gradients of one optimizer step; return its loss (a 0-dim tensor, no sync).
    ``num_loss_tokens``: target tokens of the whole step (all ranks); 0: those of ``micro_batches``."""
    num_loss_tokens = max(1, num_loss_tokens or sum(b.num_loss_tokens for b in micro_batches))
    total = torch.zeros((), device=device)
    for batch in micro_batches:
        with autocast:
            loss_sum = micro_batch_loss_sum(model, batch.to(device), head, loss_fn)
        (loss_sum / num_loss_tokens).backward()
        total += loss_sum.detach().float()
    return total / num_loss_tokens


def data_parallel_step(
    model, group: list[PackedBatch], head, loss_fn, device, autocast, world=ONE_PROCESS, interrupt=False
):
    """One optimizer step's gradients over the rows of ``group`` (the step's rows of every rank): this rank
    trains on rows rank, rank + size, ... with the loss divided by the target tokens of the whole group,
    then the gradients are summed over the ranks. Returns (the step's loss, whether any rank asked to
    stop); every rank ends with the same gradients, loss and answer."""
    num_loss_tokens = sum(b.num_loss_tokens for b in group)  # of every rank, known on the host: no sync
    mine = group[world.rank :: world.size]
    loss = forward_backward(model, mine, head, loss_fn, device, autocast, num_loss_tokens=num_loss_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    return world.all_reduce_step(params, loss, interrupt)


@torch.no_grad()
def evaluate(model, batches: list[PackedBatch], head, loss_fn, device, autocast, world=ONE_PROCESS) -> float:
    """Mean per-token loss over all target tokens of ``batches``; each rank computes every
    ``world.size``-th row and the sums are added up, so every rank returns the same number."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for batch in batches[world.rank :: world.size]:
        with autocast:
            total += micro_batch_loss_sum(model, batch.to(device), head, loss_fn).double()
    model.train()
    return world.sum(total).item() / max(1, sum(b.num_loss_tokens for b in batches))


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of cfg.lr at a step: linear warmup, then cosine/linear decay to min_lr_ratio, or flat."""
    warmup = round(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return factor


# ------------------------------------------------------------------------------------ throughput, MFU

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}  # fmt: skip


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def step_flops(model, micro_batches: list[PackedBatch]) -> float:
    """Model FLOPs of one LoRA step: 4 per frozen matmul weight per token (forward and input gradient,
    no weight gradient) plus causal attention (forward + 2x backward); the head only on target rows."""
    base = model.get_base_model()
    config = base.config
    head = base.get_output_embeddings().weight.numel()
    embed = base.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in base.parameters()) - head - embed
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    flops = 0.0
    for b in micro_batches:
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        attention = 3 * 2 * 2 * width * sum(n * n / 2 for n in lengths) * config.num_hidden_layers
        flops += 4 * body * b.num_tokens + 4 * head * b.num_loss_tokens + attention
    return flops


# -------------------------------------------------------------------------------------- checkpoints


def _atomic_dir(final: Path, write) -> None:
    """write(tmp) into a temporary directory, then rename it to ``final``: a crash mid-save leaves the
    previous ``final`` (or none), never a half-written one."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, tokenizer, cfg: TrainConfig, path: Path) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "train_config.yaml")

    _atomic_dir(path, write)


def save_checkpoint(model, tokenizer, optimizer, scheduler, state: dict, cfg: TrainConfig, out: Path) -> Path:
    path = out / f"checkpoint-{state['step']:06d}"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, save_embedding_layers=False)
        save_config(cfg, tmp / "train_config.yaml")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
            tmp / "trainer_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    _atomic_dir(path, write)
    return path


def find_checkpoint(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / "state.json").is_file():
            raise TrainingError(f"resume: {path} is not a checkpoint directory (no state.json)")
        return path
    found = sorted(Path(cfg.output_dir).glob("checkpoint-*/state.json"))
    return found[-1].parent if found else None


def load_checkpoint(path: Path, cfg: TrainConfig, model, optimizer, scheduler, world_size: int = 1) -> dict:
    """Every rank loads the same checkpoint, so every rank resumes in the same state."""
    saved_cfg = yaml.safe_load((path / "train_config.yaml").read_text())
    changed = compare_with_checkpoint(saved_cfg, cfg, path)  # trainer/resume.py
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    saved = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    overrides = apply_overrides(changed, cfg, optimizer, scheduler)
    state = json.loads((path / "state.json").read_text())
    saved_world = state.setdefault("world_size", 1)  # checkpoints from before multi-process runs: one
    if saved_world != world_size:  # a step is grad_accum rows per process: other steps, other schedule
        raise TrainingError(
            f"resume: {path} was made with {saved_world} processes, this run has {world_size}; "
            "use the same number of processes or start a fresh output_dir"
        )
    state["overrides"] = overrides  # said by rank 0, then dropped
    return state


class _GracefulInterrupt:
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ---------------------------------------------------------------------------------------- reporting


def plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Records of a previous run up to the checkpoint we resume from (later ones are redone)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


# ------------------------------------------------------------------------------------------ the run


def train(cfg: TrainConfig) -> dict:
    """Train a LoRA adapter as ``cfg`` says; return the final metrics (the same on every rank). Under
    torchrun, join the process group first and leave it at the end, also on errors."""
    try:
        world = init_world(cfg.device)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    try:
        with output_dir_lock(cfg.output_dir, enabled=world.is_main, say=tqdm.write):  # trainer/lock.py
            return _train(cfg, world)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world: World) -> dict:
    from trainer.data import DEMO_TRAIN_FILE, DEMO_VAL_FILE, encode_file

    def say(line: str) -> None:
        if world.is_main:
            tqdm.write(line)

    def on_main(save, *args):
        """Rank 0 saves; the others wait, so that every rank leaves with the files in place."""
        result = save(*args) if world.is_main else None
        world.barrier()
        return result

    # same seed on every rank: the demo's weights and the LoRA init must be identical everywhere
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if (checkpoint := find_checkpoint(cfg)) is not None:  # changed settings: refused before loading anything
        compare_with_checkpoint(
            yaml.safe_load((checkpoint / "train_config.yaml").read_text()), cfg, checkpoint
        )

    # model: load, check the head, packed attention, LoRA
    try:
        model, tokenizer = load_model(cfg)
        head = lm_head_spec(model)
        enable_varlen_attention(model, None if cfg.attn_backend == "auto" else cfg.attn_backend)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = apply_lora(model, cfg)
    except (ValueError, OSError) as e:  # unsupported model or head, missing path, bad LoRA target
        raise TrainingError(f"model {cfg.model}: {' '.join(str(e).split())}") from e
    model.train()
    device = head[0].device
    dtype = resolve_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    loss_fn = masked_linear_cross_entropy if cfg.loss_backend == "fused" else masked_linear_cross_entropy_ref
    accuracy = TokenAccuracy(loss_fn, device)  # trainer/reporting.py: counted by the loss, when it can
    loss_fn = accuracy.wrap(loss_fn)

    # data
    def encode(name: str, demo: Path):
        data, summary = encode_file(
            demo if name == "demo" else name, tokenizer, template=cfg.template, loss_on=cfg.loss_on,
            max_length=cfg.max_length, overlong=cfg.overlong,
        )  # fmt: skip
        say(summary.format())
        return data

    train_data = encode(cfg.train_file, DEMO_TRAIN_FILE)
    if len(train_data) == 0:
        raise TrainingError(f"train_file {cfg.train_file}: no conversation left to train on (see above)")
    val_data = encode(cfg.val_file, DEMO_VAL_FILE) if cfg.val_file else []
    val_batches = make_packed_batches(val_data, cfg.max_tokens) if val_data else []
    bins = pack(train_data, cfg.max_tokens)  # the same rows every epoch; only their order changes
    rows_per_epoch = len(bins)
    # Every rank packs the same rows (deterministic for seed and epoch). A step takes the next
    # rows_per_step of them and rank r trains on rows r, r + size, ...: one step covers the same rows
    # however many ranks share it. The last step of an epoch may be short; a rank left without a row
    # contributes zero loss and zero gradients but still joins the all-reduce. No row is dropped.
    rows_per_step = cfg.grad_accum * world.size
    steps_per_epoch = math.ceil(rows_per_epoch / rows_per_step)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    # state that a checkpoint carries: step = optimizer steps done, (epoch, row) = next packed row
    state = dict(step=0, epoch=0, row=0, first_loss=None, best_val=None, evals_since_best=0, skipped=0,
                 bad_in_row=0, world_size=world.size)  # fmt: skip
    resume_from = find_checkpoint(cfg)
    if resume_from is not None:
        state = load_checkpoint(resume_from, cfg, model, optimizer, scheduler, world.size)
        say(f"resumed from {resume_from} at step {state['step']}")
        if overrides := state.pop("overrides"):
            say(overrides)
    elif cfg.resume == "auto":
        say(f"resume auto: no checkpoint in {out}, starting fresh")
    elif stale := sorted(out.glob("checkpoint-*")):
        raise TrainingError(
            f"output_dir {out} already holds checkpoints (newest {stale[-1].name}): continue that run with "
            "--resume auto, or choose another --output-dir"
        )
    records = _read_metrics(out / "metrics.jsonl", state["step"])
    world.barrier()  # every rank has read the previous run's metrics before rank 0 rewrites them
    if world.is_main:
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        save_config(cfg, out / "train_config.yaml")
    reporters = Reporters(cfg, out, enabled=world.is_main)

    trainable = sum(p.numel() for p in params)
    say(
        f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable (LoRA r={cfg.lora_r}), {dtype} on {device}; "
        f"{rows_per_epoch} packed rows per epoch, {total_steps} steps of {cfg.grad_accum} rows"
        + (f" on each of {world.size} processes" if world.size > 1 else "")
    )
    peak = peak_flops(device)

    def log(record: dict) -> None:
        records.append(record)
        if world.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            reporters.log(record)

    def run_eval() -> bool:
        """Validation loss, best/ adapter, early stopping; True when patience is exhausted."""
        val = evaluate(model, val_batches, head, loss_fn, device, autocast, world)
        log({"step": state["step"], "val_loss": val, **accuracy.take(world, "val")})
        improved = state["best_val"] is None or val < state["best_val"]
        if improved:
            state["best_val"], state["evals_since_best"] = val, 0
            on_main(save_adapter, model, tokenizer, cfg, out / "best")
        else:
            state["evals_since_best"] += 1
        say(f"step {state['step']}: val loss {val:.4f}{' (best)' if improved else ''}")
        return cfg.patience > 0 and state["evals_since_best"] >= cfg.patience

    losses: list[float] = []  # every step of this run, in order
    window = dict(loss=0.0, steps=0, tokens=0, flops=0.0, t0=time.perf_counter())
    last_saved, last_eval, stop_reason, updating = state["step"], None, "done", False
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True,
               disable=not world.is_main)  # fmt: skip
    interrupt = _GracefulInterrupt()
    try:
        while state["step"] < total_steps and stop_reason == "done":
            rows = epoch_rows(bins, seed=cfg.seed, epoch=state["epoch"])
            while state["row"] < len(rows) and state["step"] < total_steps:
                # collated step by step: the epoch's rows are never all held as tensors at once
                step_rows = rows[state["row"] : state["row"] + rows_per_step]
                group = [collate_packed(train_data, r) for r in step_rows]
                # every rank now holds the same gradients, loss and stop request, so the decisions
                # below (skip a non-finite step, stop) are the same on every rank
                loss, stop_requested = data_parallel_step(model, group, head, loss_fn, device, autocast,
                                                          world, interrupt.requested)  # fmt: skip
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                loss_value, norm_value = loss.item(), grad_norm.item()
                updating = True  # from here to the end of the step, the weights and the state disagree
                if math.isfinite(loss_value) and math.isfinite(norm_value):
                    optimizer.step()
                    state["bad_in_row"] = 0
                else:
                    state["skipped"] += 1
                    state["bad_in_row"] += 1
                    say(f"step {state['step'] + 1}: non-finite loss {loss_value} or grad norm "
                        f"{norm_value}, step skipped ({state['bad_in_row']} in a row)")  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] += 1
                state["row"] += len(group)
                updating = False
                if state["bad_in_row"] >= cfg.max_bad_steps:
                    raise TrainingError(
                        f"{state['bad_in_row']} non-finite steps in a row at step {state['step']}: lower lr, "
                        "check the data, or try dtype fp32; the last good checkpoint is kept"
                    )
                losses.append(loss_value)
                bar.update(1)
                if math.isfinite(loss_value):
                    state["first_loss"] = state["first_loss"] or loss_value
                    window["loss"] += loss_value
                    window["steps"] += 1
                window["tokens"] += sum(b.num_tokens for b in group)
                window["flops"] += step_flops(model, group) if peak else 0.0

                step = state["step"]
                if step % cfg.log_every == 0 or step == total_steps:
                    seconds = time.perf_counter() - window["t0"]
                    record = {
                        "step": step, "epoch": state["epoch"],
                        "loss": window["loss"] / max(1, window["steps"]),
                        "lr": scheduler.get_last_lr()[0], "grad_norm": norm_value,
                        "tokens_per_s": window["tokens"] / seconds, "skipped": state["skipped"],
                        **accuracy.take(world),
                    }  # fmt: skip
                    postfix = dict(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                   tok_s=f"{record['tokens_per_s']:.0f}")  # fmt: skip
                    if peak:
                        record["mfu"] = window["flops"] / seconds / (peak * world.size)
                        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                    log(record)
                    bar.set_postfix(postfix)
                    say(
                        f"step {step}/{total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                        f"grad norm {norm_value:.3f}, {record['tokens_per_s']:.0f} tokens/s"
                        + (f", acc {record['acc']:.3f}" if "acc" in record else "")
                        + (f", mfu {postfix['mfu']}" if peak else "")
                    )
                    window.update(loss=0.0, steps=0, tokens=0, flops=0.0, t0=time.perf_counter())
                paused = time.perf_counter()  # evaluation and saving do not count towards tokens/s
                if val_batches and cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = step
                    if run_eval():
                        stop_reason = f"early stop: no improvement in {cfg.patience} evaluations"
                        break
                if cfg.save_every and step % cfg.save_every == 0:
                    on_main(save_checkpoint, model, tokenizer, optimizer, scheduler, state, cfg, out)
                    last_saved = step
                window["t0"] += time.perf_counter() - paused
                # Ctrl-C on any rank before this step's all-reduce: every rank stops here
                if stop_requested or (world.size == 1 and interrupt.requested):
                    raise KeyboardInterrupt
            if state["row"] >= len(rows):
                state["epoch"] += 1
                state["row"] = 0
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        if updating:
            say("interrupted during an update: the last checkpoint is kept; use --resume auto")
        elif state["step"] > last_saved:
            path = on_main(save_checkpoint, model, tokenizer, optimizer, scheduler, state, cfg, out)
            say(f"interrupted: saved {path}; continue with --resume auto")
        raise
    finally:
        interrupt.restore()
    bar.close()

    if val_batches and last_eval != state["step"]:
        run_eval()
    if state["step"] > last_saved:
        on_main(save_checkpoint, model, tokenizer, optimizer, scheduler, state, cfg, out)
    on_main(save_adapter, model, tokenizer, cfg, out / "final")
    if cfg.save_merged and world.is_main:
        merged = model.merge_and_unload()
        _atomic_dir(out / "merged", lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    if world.is_main:
        plot_losses(records, out / "loss.png")
    reporters.close()
    world.barrier()

    logged = [r["loss"] for r in records if "loss" in r]
    result = {
        "steps": state["step"],
        "first_loss": state["first_loss"],  # of the first step
        "last_loss": logged[-1],  # mean of the last logging window
        "best_val_loss": state["best_val"],
        "skipped_steps": state["skipped"],
        "stop_reason": stop_reason,
        "losses": losses,
        "output_dir": str(out),
    }
    say(
        f"{stop_reason} after {state['step']} steps: train loss {result['first_loss']:.4f} (first step) -> "
        f"{result['last_loss']:.4f} (last {cfg.log_every} steps)"
        + (f", best val loss {state['best_val']:.4f}" if state["best_val"] is not None else "")
        + f"; adapter in {out / 'final'}"
    )
    return result


__all__ = ["TrainConfig", "TrainingError", "config_to_dict", "train"]

make_callable(sys.modules[__name__])  # `from trainer import train` is this module or its train(): both run
