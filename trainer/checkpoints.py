"""Checkpoints and adapters on disk: what reads and writes the run's directories.

Every directory is published atomically (written under a temporary name, then renamed), so a crash
mid-save leaves the previous one or none. ``checkpoint-<step>/`` holds the strategy's model and optimizer
state (sharded under FSDP), the scheduler, each rank's random state, ``state.json`` and the config;
``best/``, ``final/`` (and ``merged/``) are standard PEFT adapter directories. Finding the checkpoint to
resume from and checking it against the run's settings (trainer/resume.py) happen here too.

``save_checkpoint``, ``load_checkpoint`` and ``save_final_adapter`` take the run (``trainer.train.Run``)
they save or restore; every rank calls them, rank 0 alone writes what is not per rank.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import yaml

from trainer.config import TrainConfig, save_config
from trainer.distributed import World
from trainer.parallel import load_cpu
from trainer.resume import apply_overrides, compare_with_checkpoint


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite steps, ...); the CLI prints it as one line. Defined here,
    the lowest module that raises it; ``trainer.train`` re-exports it."""


# ------------------------------------------------------------------------------- atomic directories


def _atomic_dir(final: Path, write) -> None:
    """write(tmp) into a temporary directory, then rename it to ``final``: a crash mid-save leaves the
    previous ``final`` (or none), never a half-written one."""
    tmp = _tmp_dir(final)
    write(tmp)
    _publish(tmp, final)


def _tmp_dir(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _sharded_save(world: World, final: Path, write) -> None:
    """Every rank calls write(tmp) into one temporary directory; once all have, rank 0 renames it to
    ``final``, so a crash of any rank mid-save leaves the previous ``final`` (or none). Each part ends
    with the ranks agreeing (``World.all_or_none``): a rank whose part fails (a full disk, rank 0's
    rename) stops every rank with its error instead of leaving them in the next collective."""
    tmp = final.with_name(f".tmp-{final.name}")
    with world.all_or_none():
        if world.is_main:
            _tmp_dir(final)
    with world.all_or_none():
        write(tmp)
    with world.all_or_none():
        if world.is_main:
            _publish(tmp, final)


def save_adapter(model, tokenizer, cfg: TrainConfig, path: Path, state_dict: dict | None = None) -> None:
    """A standard PEFT adapter directory (rank 0 only); ``state_dict``: the adapter gathered whole."""

    def write(tmp: Path) -> None:
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(tmp, save_embedding_layers=False, **extra)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "train_config.yaml")

    _atomic_dir(path, write)


def save_final_adapter(run, path: Path) -> None:
    """A standard PEFT adapter (gathered whole under FSDP; every rank calls this, rank 0 writes; its
    failure stops every rank)."""
    with run.world.all_or_none():
        adapter = run.strategy.adapter_state(run.model)
        if run.world.is_main:
            save_adapter(run.model, run.tokenizer, run.cfg, path, adapter)


# ----------------------------------------------------------------------------------- random state


def rng_state(device: torch.device) -> dict:
    """This process's random state: CPU, Python, and only its own GPU (not one per visible GPU)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore ``rng_state``'s result; the GPU state goes to this process's GPU, whatever its index was."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------- checkpoints


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


def check_output_dir(cfg: TrainConfig, out: Path) -> None:
    """The checkpoint to resume from was made with these settings (else ConfigError), or, for a fresh
    run, ``out`` holds no checkpoint that the run would overwrite (else TrainingError)."""
    if (checkpoint := find_checkpoint(cfg)) is not None:
        saved = yaml.safe_load((checkpoint / "train_config.yaml").read_text())
        compare_with_checkpoint(saved, cfg, checkpoint)
    elif not cfg.resume and (stale := sorted(out.glob("checkpoint-*"))):
        raise TrainingError(
            f"output_dir {out} already holds checkpoints (newest {stale[-1].name}): continue that run with "
            "--resume auto, or choose another --output-dir"
        )


def save_checkpoint(run) -> Path:
    """checkpoint-<step>/: the strategy's model and optimizer state (sharded under FSDP), the scheduler,
    each rank's random state, state.json and the config; written atomically (every rank calls this; a
    failure on any rank stops every rank, see ``_sharded_save``)."""
    path = run.out / f"checkpoint-{run.state['step']:06d}"

    def write(tmp: Path) -> None:
        run.strategy.save_state(run.model, run.optimizer, tmp)
        torch.save(rng_state(run.device), tmp / f"rng-rank{run.world.rank}.pt")
        if run.world.is_main:
            torch.save({"scheduler": run.scheduler.state_dict()}, tmp / "scheduler.pt")
            save_config(run.cfg, tmp / "train_config.yaml")
            (tmp / "state.json").write_text(json.dumps(run.state, indent=1))

    _sharded_save(run.world, path, write)
    return path


def load_checkpoint(run, path: Path) -> None:
    """Every rank loads the same checkpoint and its own random state. Each rank reads its own files
    first; the ranks agree on that (``World.all_or_none``) before the load, which is collective under
    FSDP: a rank missing its file stops every rank with its one-line error."""
    rank = run.world.rank
    with run.world.all_or_none():
        saved_cfg = yaml.safe_load((path / "train_config.yaml").read_text())
        changed = compare_with_checkpoint(saved_cfg, run.cfg, path)  # trainer/resume.py
        state = json.loads((path / "state.json").read_text())
        saved_world = state.setdefault("world_size", 1)  # checkpoints from before multi-process runs: one
        if saved_world != run.world.size:  # a step is grad_accum rows per process: other steps and schedule
            raise TrainingError(
                f"resume: {path} was made with {saved_world} processes, this run has {run.world.size}; "
                "use the same number of processes or start a fresh output_dir"
            )
        if not (path / f"rng-rank{rank}.pt").is_file():
            raise TrainingError(f"resume: {path} has no rng-rank{rank}.pt (made by an older version of "
                                "the trainer, or incomplete); start a fresh output_dir")  # fmt: skip
        rng = load_cpu(path / f"rng-rank{rank}.pt")
    with run.world.all_or_none():  # every rank reaches the load; what fails after it stops every rank
        run.strategy.load_state(run.model, run.optimizer, path)
        run.scheduler.load_state_dict(load_cpu(path / "scheduler.pt")["scheduler"])
        set_rng_state(rng, run.device)
    if overrides := apply_overrides(changed, run.cfg, run.optimizer, run.scheduler):
        run.say(overrides)
    run.state = state


def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Records of a previous run up to the checkpoint we resume from (later ones are redone)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]
