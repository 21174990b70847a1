"""Every setting of a training run, in one dataclass.

Precedence, lowest first: the defaults below, the demo settings (``DEMO``, only when ``model`` is
``demo``), the YAML file given with ``--config``, then ``--key value`` on the command line.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad setting; the CLI prints it as one line and exits with status 2."""


@dataclass
class TrainConfig:
    # model
    model: str = "demo"  # Hugging Face model directory or hub id; "demo": a small random GLM-4
    tokenizer: str = ""  # tokenizer directory; empty: the model's ("demo": the built-in one)
    trust_remote_code: bool = False  # run code the model repository ships (glm-4-9b-chat needs it)
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32": frozen weights and autocast
    device: str = "auto"  # "auto" (cuda if available), "cuda", "cuda:1" or "cpu"
    attn_backend: str = "auto"  # varlen attention backend; "auto": per layer, the fastest that supports it
    # a model whose config asks for attention dropout: "off" trains without it (said once at start), "refuse"
    attn_dropout: str = "off"
    loss_backend: str = "fused"  # "fused": masked_linear_cross_entropy; "reference": plain torch, to compare
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    parallel: str = "ddp"  # under torchrun: "ddp" (a full copy per GPU) or "fsdp" (weights sharded, FSDP2)
    fsdp_cpu_offload: bool = False  # fsdp: keep the sharded weights and optimizer state in CPU memory
    quantize: str = "none"  # "nf4": frozen base weights in 4 bits through bitsandbytes (QLoRA); "none"

    # data
    train_file: str = "demo"  # JSONL of {"messages": [...]}; "demo": the built-in sample conversations
    val_file: str = "demo"  # validation JSONL; "demo": the built-in one; empty: no validation
    # "auto": glm4 for a GLM-4 tokenizer, else chat_template; "glm4": GLM-4's per-message labels;
    # "chat_template": the tokenizer's own chat template
    template: str = "auto"
    loss_on: str = "all"  # assistant turns trained on: "all" or "last" (the last one only)
    max_length: int = 2048  # longest conversation in tokens
    overlong: str = "drop"  # a longer one: "drop" or "truncate" (cut on the right; a pair: oldest turns out)
    max_tokens: int = 8192  # token budget of one packed row (one micro-batch)

    # optimisation
    grad_accum: int = 1  # packed rows per optimizer step
    epochs: int = 1  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps to run; 0: as many as `epochs` gives
    lr: float = 2e-4  # peak learning rate
    warmup: float = 0.03  # warmup length: a fraction of all steps if < 1, else a number of steps
    schedule: str = "cosine"  # after warmup: "cosine", "linear" or "constant"
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    max_bad_steps: int = 5  # non-finite loss or gradient: skip the step; stop after this many in a row
    # z-loss coefficient (PaLM: 1e-4): adds z_loss * logsumexp(logits)^2 per trained token; 0: off
    z_loss: float = 0.0

    # preference fine-tuning
    # "sft": learn the assistant turns of conversations; "dpo", "simpo" or "orpo": learn from preference
    # pairs, records {"prompt": [...], "chosen": [...], "rejected": [...]} (strings or messages)
    objective: str = "sft"
    beta: float = 0.1  # dpo: tie to the reference (TRL's beta); simpo: reward scale; orpo: lambda
    label_smoothing: float = 0.0  # dpo, simpo: chance that a pair's preference is flipped (conservative DPO)
    simpo_gamma: float = 0.5  # simpo: the reward margin a chosen answer must win by
    ref_logps: str = "step"  # dpo: reference log-probs (adapter off): "step": each step; "cached": once

    # LoRA
    lora_r: int = 8  # rank of the adapter
    lora_alpha: float = 32.0  # scaling numerator: the update is scaled by alpha / r
    lora_dropout: float = 0.1  # dropout on the adapter's input
    # module names to adapt; "all-linear": every attention and MLP projection (not the lm_head)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # MoE models: also adapt the routed experts' stacked weights (PEFT target_parameters, without dropout)
    lora_target_experts: bool = False

    # evaluation, logging and checkpoints
    log_every: int = 10  # one progress line every this many steps
    eval_every: int = 500  # validation loss every this many steps (and at the end); 0: only at the end
    patience: int = 0  # stop after this many evaluations without improvement; 0: never stop early
    eval_generate: int = 0  # each evaluation answers the last turn of this many val conversations; 0: off
    eval_max_new_tokens: int = 256  # most tokens of one such answer
    # best/ and patience follow this: "val_loss", or a generation metric (trainer/evalgen.py): "exact_match",
    # "similarity", "stop_rate" (higher is better), "repetition" (lower), "length_ratio" (closest to 1)
    metric_for_best: str = "val_loss"
    save_every: int = 500  # checkpoint every this many steps (and at the end); 0: only at the end
    save_merged: bool = False  # at the end, also save the adapter merged into the base weights (merged/)
    output_dir: str = "outputs"  # where checkpoints, best/, final/, metrics.jsonl and loss.png go
    resume: str = ""  # "auto": the newest checkpoint in output_dir, or a checkpoint directory; empty: fresh
    # on resume, settings that may differ from the checkpoint's (e.g. lr,warmup), applied from the next step
    resume_override: list[str] = field(default_factory=list)
    # "none", or also log to "tensorboard" and/or "wandb" (offline unless WANDB_MODE or WANDB_API_KEY is set)
    report_to: list[str] = field(default_factory=lambda: ["none"])
    seed: int = 42  # seeds weights of the demo model, LoRA init, dropout and data order


# What `python -m trainer` with no arguments runs: a random model learns the sample conversations in
# about a minute on two CPU cores. Applied only when model is "demo"; YAML and --key value still win.
DEMO = dict(
    max_length=1024,
    max_tokens=1024,
    max_steps=200,
    lr=5e-3,
    warmup=10,
    lora_r=16,
    lora_alpha=32.0,
    lora_dropout=0.0,
    log_every=10,
    eval_every=50,
    eval_generate=8,
    eval_max_new_tokens=32,
    save_every=100,
    output_dir="outputs/demo",
)

# The demo with a preference objective: pairs of a prompt, its answer and another conversation's answer
# (trainer/preference.py: demo_pairs), two conversations to a pair in a row.
DEMO_PREFERENCE = dict(max_tokens=2048, max_steps=60, lr=2e-3, eval_every=20, save_every=30)

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _valid_keys() -> str:
    return "valid keys: " + ", ".join(FIELDS)


def _coerce(key: str, value, from_cli: bool):
    """Return value converted to the field's type, or raise ConfigError."""
    hint = typing.get_type_hints(TrainConfig)[key]
    origin = typing.get_origin(hint)
    kind = "a list of strings" if origin is list else hint.__name__

    def bad():
        return ConfigError(f"{key}: expected {kind}, got {value!r} ({type(value).__name__})")

    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        if from_cli is False and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `model: 7` would be odd but unambiguous
        raise bad()
    if origin is list:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise bad()
    raise AssertionError(f"unhandled type {hint} for {key}")


def _apply(values: dict, settings: dict, source: str, from_cli: bool = False) -> None:
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{source}: unknown key {key!r}; {_valid_keys()}")
        values[name] = _coerce(name, value, from_cli)


def _check(cfg: TrainConfig) -> None:
    choices = {
        "dtype": ("auto", "bf16", "fp32"),  # fp16 would need loss scaling: use bf16
        "loss_backend": ("fused", "reference"),
        "attn_dropout": ("off", "refuse"),
        "schedule": ("cosine", "linear", "constant"),
        "overlong": ("drop", "truncate"),  # as trainer/data.py accepts
        "loss_on": ("all", "last"),
        "template": ("auto", "glm4", "chat_template"),
        "parallel": ("ddp", "fsdp"),
        "quantize": ("none", "nf4"),
        "objective": ("sft", *PREFERENCE_OBJECTIVES),
        "ref_logps": ("step", "cached"),
    }
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    positive = ("max_length", "max_tokens", "grad_accum", "epochs", "lora_r", "log_every", "max_bad_steps")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {getattr(cfg, key)}")
    nonnegative = ("max_steps", "eval_every", "save_every", "patience", "warmup", "lr", "weight_decay")
    for key in (*nonnegative, "z_loss"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: must not be negative, got {getattr(cfg, key)}")
    if cfg.max_tokens < cfg.max_length:
        raise ConfigError(
            f"max_tokens={cfg.max_tokens} is less than max_length={cfg.max_length}: the longest "
            "conversations would not fit in a packed row; raise max_tokens or lower max_length"
        )
    _check_preference(cfg)
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.patience > 0 and not cfg.val_file:
        raise ConfigError(f"patience={cfg.patience} needs validation data, but val_file is empty")
    _check_output_dir(cfg.output_dir)
    _check_report_to(cfg.report_to)
    _check_eval_generate(cfg)
    if cfg.resume_override:
        check_override_keys(cfg)


PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")


def _check_preference(cfg: TrainConfig) -> None:
    if cfg.objective == "sft":
        return
    if cfg.beta <= 0 or not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"beta must be positive and label_smoothing in [0, 0.5), got {cfg.beta} and "
                          f"{cfg.label_smoothing}")  # fmt: skip
    if cfg.max_tokens < 2 * cfg.max_length:
        raise ConfigError(
            f"objective {cfg.objective}: max_tokens={cfg.max_tokens} is less than twice "
            f"max_length={cfg.max_length}: a pair's chosen and rejected conversations share a packed row; "
            "raise max_tokens or lower max_length"
        )
    if cfg.z_loss:
        raise ConfigError(f"z_loss applies to objective sft, not {cfg.objective}; set z_loss 0")


def _check_output_dir(output_dir: str) -> None:
    """The output directory, or its first existing parent, must be a directory (not a file)."""
    path = Path(output_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is inside {p}, which is a file"
                raise ConfigError(f"output_dir: {output_dir} {what}; choose a directory")
            return


REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> module it needs

# Every metric a run can choose ``best/`` by (metric_for_best), and which way is better: "min", "max", or
# "one" (closest to 1); trainer/evalgen.py computes them.
METRICS = {
    "val_loss": "min",
    "exact_match": "max",  # share of answers equal to the reference after whitespace normalisation
    "similarity": "max",  # mean of 1 - (character edit distance) / (length of the longer string)
    "stop_rate": "max",  # share of answers ended by an end-of-turn token within the token budget
    "repetition": "min",  # share of answers caught in a loop (a block repeated back to back, see has_loop)
    "length_ratio": "one",  # mean of (answer characters) / (reference characters)
}


def _check_report_to(names: list[str]) -> None:
    import importlib.util

    if names == ["none"]:
        return
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(f"report_to: {name!r} is not one of none, {', '.join(REPORTERS)}")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise ConfigError(f"report_to: {name} is not installed (pip install {REPORTERS[name]})")


def _check_eval_generate(cfg: TrainConfig) -> None:
    if cfg.eval_generate < 0 or cfg.eval_max_new_tokens < 1:
        raise ConfigError(f"eval_generate must not be negative and eval_max_new_tokens must be at least 1, "
                          f"got {cfg.eval_generate} and {cfg.eval_max_new_tokens}")  # fmt: skip
    if cfg.metric_for_best != "val_loss":
        if cfg.metric_for_best not in METRICS:
            raise ConfigError(f"metric_for_best: {cfg.metric_for_best!r} is not one of {', '.join(METRICS)}")
        if not cfg.eval_generate:
            raise ConfigError(f"metric_for_best: {cfg.metric_for_best} is a generation metric; set "
                              "eval_generate to how many validation conversations to answer")  # fmt: skip


# --------------------------------------------------------------------------- what may change on resume
# trainer/resume.py compares a checkpoint's settings with the run's by these lists.

# Settings that never change the weights a step produces: they may differ on resume without a word.
FREE = ("device", "attn_backend", "attn_dropout", "loss_backend", "gradient_checkpointing", "val_file",
        "log_every", "eval_every", "patience", "save_every", "save_merged", "output_dir", "resume",
        "resume_override", "report_to", "max_bad_steps", "eval_generate", "eval_max_new_tokens",
        "metric_for_best", "ref_logps")  # fmt: skip

# Settings that can take a new value from the next step on: the optimizer's hyper-parameters, the schedule
# (rebuilt from the config), the length of the run, the adapter's dropout and scaling, the compute dtype,
# the z-loss coefficient (the loss function is built from the config).
OVERRIDABLE = ("lr", "warmup", "schedule", "min_lr_ratio", "weight_decay", "max_grad_norm", "max_steps",
               "epochs", "grad_accum", "lora_dropout", "lora_alpha", "dtype", "z_loss")  # fmt: skip

# Every other setting (model, tokenizer, data, packing, seed, adapter shape) decides which rows a step
# sees or what the checkpoint's tensors mean: changing it needs a fresh output_dir.
FIXED = tuple(name for name in FIELDS if name not in FREE and name not in OVERRIDABLE)


def check_override_keys(cfg: TrainConfig) -> None:
    """resume_override names only keys that exist and can change on resume, and only with resume set."""
    if not cfg.resume:
        raise ConfigError("resume_override is set but resume is not: add --resume auto (or a checkpoint)")
    for key in cfg.resume_override:
        if key not in FIELDS:
            raise ConfigError(f"resume_override: unknown key {key!r}; keys that can change: {_can()}")
        if key not in OVERRIDABLE:
            raise ConfigError(f"resume_override: {key} cannot change on resume; keys that can: {_can()}")


def _can() -> str:
    return ", ".join(OVERRIDABLE)


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Build the config from ``[--config file.yaml] [--key value ...]`` (``--key=value`` works too)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file, cli = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}; {_valid_keys()}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_file = value
        else:
            cli[key] = value

    from_file = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {config_file}: no such file")
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{config_file}: expected a mapping of key: value at the top level")

    values: dict = {}
    _apply(values, from_file, str(config_file))
    _apply(values, cli, "command line", from_cli=True)
    if values.get("model", TrainConfig.model) == "demo":
        preference = values.get("objective", TrainConfig.objective) != "sft"
        values = {**DEMO, **(DEMO_PREFERENCE if preference else {}), **values}
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    """A config built in Python (``TrainConfig(lr=...)``) with each value converted to its field's type and
    checked as ``load_config`` checks the command line; raises ConfigError."""
    values = {name: _coerce(name, getattr(cfg, name), from_cli=False) for name in FIELDS}
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


# ------------------------------------------------------------------------------------- help text


def field_help() -> list[tuple[str, str, str]]:
    """(section, key, comment) of every field, in the order of the class: each field's comment (the one
    after it, or the lines of the one above it, joined), and the section comment (after a blank line) it
    falls under: the help text is the source's comments, so the two cannot drift apart."""
    import inspect

    lines = inspect.getsource(TrainConfig).splitlines()

    def is_section(i: int) -> bool:
        return lines[i].strip().startswith("#") and (not lines[i - 1].strip() or lines[i - 1].endswith(":"))

    found, section = [], ""
    for i, line in enumerate(lines):
        text = line.strip()
        if is_section(i):
            section = text.lstrip("# ")
        name = text.partition(":")[0]
        if name in FIELDS and not text.startswith("#"):
            code, _, comment = text.partition("  # ")
            if not comment:
                above = i - 1
                while lines[above - 1].strip().startswith("#") and not is_section(above - 1):
                    above -= 1
                comment = " ".join(lines[j].strip().lstrip("# ") for j in range(above, i))
            found.append((section, name, comment.strip()))
    return found


def show_value(value) -> str:
    """A value as one types it after --key: true/false, comma-separated lists, "" for empty."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value) or '""'
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else '""'


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
