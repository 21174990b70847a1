"""Resuming with other settings: every setting that changes the training trajectory is compared with the
checkpoint's ``train_config.yaml``. A difference is refused with one line naming each key, old -> new,
unless the key is listed in ``resume_override`` (``--resume-override lr,warmup``): then it applies from the
next step, and the run's ``train_config.yaml`` holds the new value, which is what actually runs.

Which keys may change is config vocabulary (``FREE``, ``OVERRIDABLE``, ``FIXED`` and the check of
``resume_override`` live in trainer/config.py, which validates them); this module compares and applies.
"""

from __future__ import annotations

import dataclasses

from trainer.config import (  # noqa: F401  (FIXED, OVERRIDABLE, check_override_keys: re-exported)
    FIELDS,
    FIXED,
    FREE,
    OVERRIDABLE,
    ConfigError,
    TrainConfig,
    check_override_keys,
    show_value,
)


def changed_settings(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """{key: (checkpoint's value, this run's value)} of every compared setting that differs. A key the
    checkpoint's config lacks (written before the key existed) counts as its default."""
    changed = {}
    for key in FIELDS:
        if key in FREE:
            continue
        old = saved[key] if key in saved else _default(key)
        new = getattr(cfg, key)
        if old != new:
            changed[key] = (old, new)
    return changed


def _default(key: str):
    f = FIELDS[key]
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _describe(changed: dict[str, tuple]) -> str:
    return ", ".join(f"{key} {show_value(old)} -> {show_value(new)}" for key, (old, new) in changed.items())


def compare_with_checkpoint(saved: dict, cfg: TrainConfig, checkpoint) -> dict[str, tuple]:
    """The changed settings, when every one of them is allowed by ``cfg.resume_override``; otherwise
    ConfigError, one line naming each changed key with its old and new value."""
    changed = changed_settings(saved, cfg)
    fixed = {k: v for k, v in changed.items() if k not in OVERRIDABLE}
    if fixed:
        raise ConfigError(
            f"resume: {checkpoint} was made with other settings: {_describe(fixed)}; these decide which "
            "rows a step sees or what the checkpoint holds: use the checkpoint's values or a fresh output_dir"
        )
    refused = {k: v for k, v in changed.items() if k not in cfg.resume_override}
    if refused:
        raise ConfigError(
            f"resume: {checkpoint} was made with other settings: {_describe(refused)}; use the checkpoint's "
            f"values, or apply the new ones from the next step with --resume-override {','.join(refused)}"
        )
    return changed


def apply_overrides(changed: dict[str, tuple], cfg: TrainConfig, optimizer, scheduler) -> str:
    """After the optimizer and scheduler states are loaded: make the next step use cfg's lr and
    weight_decay (the schedule's shape is already rebuilt from cfg). Returns the line to log, or ""."""
    if not changed:
        return ""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = cfg.lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return f"resume override from step {scheduler.last_epoch + 1}: {_describe(changed)}"
