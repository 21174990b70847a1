"""The training loop: packed micro-batches, fused masked loss, AdamW, eval, resume.

One optimizer step = ``grad_accum`` packed rows per process. Its loss is the sum of the per-token losses
of every target token of those rows on every process divided by their total number (DESIGN.md, loss
normalization), so the gradients do not depend on how conversations were packed or split across
micro-batches and processes. How the processes share the work (one process, data parallel, FSDP) is
the strategy's business (trainer/parallel.py); rank 0 alone prints, logs and saves.

A step never waits for the device: the non-finite skip is decided on the device (AdamW's ``found_inf``,
as GradScaler does), and the step's loss and gradient norm stay there until a logging step reads all
the pending ones at once. With several processes, reading the all-reduced Ctrl-C flag is the step's one
synchronisation.

Reading order: the step, evaluation, throughput, then the run: ``setup`` (the one pipeline from settings
to optimizer), ``resume``, the loop in ``_train`` (``train_step``, ``Progress``, ``run_eval``,
``save_checkpoint``), ``finish``. Checkpoint and adapter directories are trainer/checkpoints.py's, the loss
plot and the other reporters trainer/reporting.py's; their names stay importable from here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import random
import signal
import sys
import threading
import time
import types
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from trainer import evalgen  # generation-based validation
from trainer.checkpoints import (  # noqa: F401  (re-exported: trainer.train's names before checkpoints.py)
    TrainingError,
    _atomic_dir,
    _read_metrics,
    _sharded_save,
    check_output_dir,
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_adapter,
    save_checkpoint,
    save_final_adapter,
    set_rng_state,
)
from trainer.config import TrainConfig, config_to_dict, save_config, validate
from trainer.data import DEMO_TRAIN_FILE, DEMO_VAL_FILE, encode_file, load_tokenizer
from trainer.distributed import ONE_PROCESS, World, close_world, init_world
from trainer.lock import output_dir_lock
from trainer.model import (
    _check_model_path,
    decoder_hidden_states,
    prepare_model,
    resolve_device,
    resolve_dtype,
)
from trainer.packing import PackedBatch, collate_packed, epoch_rows, make_packed_batches, pack
from trainer.parallel import Single, make_strategy
from trainer.preference import (
    PreferenceLoss,
    collate_pairs,
    demo_pairs,
    encode_pairs,
    pack_pairs,
    pair_lengths,
)
from trainer.reporting import Reporters, TokenAccuracy, ZLoss, plot_losses
from trainer.sharded_load import fill_shards, load_skeleton
from trainer.templates import describe_template, resolve_template
from tritrain_kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_ref

# ----------------------------------------------------------------------------------------- the step


@dataclass
class LiveHead:
    """The lm_head as the fused loss needs it, read when the loss is computed: under FSDP the module's
    weight is a shard except inside ``strategy.unsharded(module)``, so no reference is kept."""

    module: torch.nn.Module  # the model's output embeddings (an nn.Linear)
    softcap: float | None
    strategy: Single = field(default_factory=Single)

    @contextmanager
    def weights(self):
        with self.strategy.unsharded(self.module):
            yield self.module.weight, self.module.bias, self.softcap


def _head_weights(head):
    """``head``: a LiveHead, or a (weight, bias, softcap) tuple taken from a model that is not wrapped."""
    return head.weights() if isinstance(head, LiveHead) else nullcontext(head)


def micro_batch_loss_sum(model, batch: PackedBatch, head, loss_fn) -> torch.Tensor:
    """Sum of the per-token cross-entropies of one packed row; the model never computes logits."""
    hidden = decoder_hidden_states(model, batch)[0].index_select(0, batch.loss_index)
    with _head_weights(head) as (weight, bias, softcap):
        return loss_fn(hidden, weight, batch.loss_targets, bias=bias, reduction="sum", softcap=softcap)


def forward_backward(
    model, micro_batches: list[PackedBatch], head, loss_fn, device, autocast, *, num_loss_tokens: int = 0,
    weights: list[float] | None = None,
):  # fmt: skip
    """Accumulate the gradients of one optimizer step; return its loss (a 0-dim tensor, no sync).
    ``num_loss_tokens``: target tokens of the whole step (all ranks); 0: those of ``micro_batches``.
    ``weights``: per micro-batch factor of its loss (0: a pass that only keeps FSDP's collectives in
    step); None: all 1."""
    num_loss_tokens = max(1, num_loss_tokens or sum(b.num_loss_tokens for b in micro_batches))
    weights = weights or [1.0] * len(micro_batches)
    total = torch.zeros((), device=device)
    for batch, weight in zip(micro_batches, weights, strict=True):
        with autocast:
            loss_sum = micro_batch_loss_sum(model, batch.to(device), head, loss_fn) * weight
        (loss_sum / num_loss_tokens).backward()
        total += loss_sum.detach().float()
    return total / num_loss_tokens


def parallel_step(
    model, group: list[PackedBatch], head, loss_fn, device, autocast, strategy, interrupt=False
):
    """One optimizer step's gradients over the rows of ``group`` (the step's rows of every rank): this rank
    trains on its share (``strategy.share``) with the loss divided by the target tokens of the whole
    group, then the strategy sums the gradients over the ranks. Returns (the step's loss, whether any
    rank asked to stop); every rank ends with the same loss and answer."""
    mine = strategy.share(group)
    if isinstance(loss_fn, PreferenceLoss):  # normalised by the step's pairs (trainer/preference.py)
        loss = loss_fn.forward_backward(model, mine, group, head, device, autocast)
    else:
        num_loss_tokens = sum(b.num_loss_tokens for b in group)  # of every rank, known on the host: no sync
        loss = forward_backward(model, [b for b, _ in mine], head, loss_fn, device, autocast,
                                num_loss_tokens=num_loss_tokens, weights=[w for _, w in mine])  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    return strategy.reduce(params, loss, interrupt)


def data_parallel_step(model, group, head, loss_fn, device, autocast, world, interrupt=False):
    """``parallel_step`` under plain data parallel over ``world`` (kept for callers of the old name)."""
    return parallel_step(
        model, group, head, loss_fn, device, autocast, make_strategy("ddp", world), interrupt
    )


def fused_loss(backend: str):
    """The masked loss ``backend`` names. The trainer hands it compacted rows with labels checked on the
    host, so the fused kernel may skip its own check (and its host sync) where it offers that."""
    if backend != "fused":
        return masked_linear_cross_entropy_ref
    if "assume_valid" in inspect.signature(masked_linear_cross_entropy).parameters:
        return partial(masked_linear_cross_entropy, assume_valid=True)
    return masked_linear_cross_entropy


@torch.no_grad()
def evaluate(model, batches: list[PackedBatch], head, loss_fn, device, autocast, strategy=None) -> float:
    """Mean per-token loss over all target tokens of ``batches``; each rank computes its share of the
    rows and the sums are added up, so every rank returns the same number. A preference objective
    returns its mean loss per pair."""
    strategy = strategy or Single()
    if isinstance(loss_fn, PreferenceLoss):
        return loss_fn.evaluate(model, batches, head, device, autocast, strategy)
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for batch, weight in strategy.share(batches):
        with autocast:
            total += micro_batch_loss_sum(model, batch.to(device), head, loss_fn).double() * weight
    model.train()
    return strategy.sum(total).item() / max(1, sum(b.num_loss_tokens for b in batches))


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


def _numel(p: torch.Tensor) -> int:
    """Elements of the whole weight: a DTensor's numel is global already; a 4-bit weight is packed."""
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else p.numel()


class FlopCounter:
    """Model FLOPs of LoRA steps, from the whole model's size (taken once, whatever the sharding or
    quantisation): 4 per frozen matmul weight per token (forward and input gradient, no weight gradient)
    plus causal attention (forward + 2x backward); the head only on target rows."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        self.head = _numel(base.get_output_embeddings().weight)
        embed = _numel(base.get_input_embeddings().weight)
        self.total = sum(_numel(p) for p in base.parameters())
        self.body = self.total - self.head - embed
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention = 3 * 2 * 2 * config.num_attention_heads * head_dim * config.num_hidden_layers

    def step(self, lengths: list[list[int]], num_loss_tokens: int, reference: bool = False) -> float:
        """FLOPs of one step over rows of conversations with these ``lengths`` (host ints, no sync);
        ``reference``: plus a forward pass without the adapter (DPO's reference in the step)."""
        tokens = sum(sum(row) for row in lengths)
        attention = self.attention * sum(n * n / 2 for row in lengths for n in row)
        flops = 4 * self.body * tokens + 4 * self.head * num_loss_tokens + attention
        return flops * 1.5 if reference else flops  # forward: 2 of the 4 per weight, 1 of attention's 3


def step_flops(model, micro_batches: list[PackedBatch]) -> float:
    """FLOPs of one step over packed rows (reads their boundaries; the loop uses FlopCounter)."""
    lengths = [(b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist() for b in micro_batches]
    return FlopCounter(model).step(lengths, sum(b.num_loss_tokens for b in micro_batches))


# ---------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the loop works with, built once by ``setup``."""

    cfg: TrainConfig
    world: World
    strategy: Single
    model: torch.nn.Module
    tokenizer: object
    head: LiveHead
    loss_fn: object
    device: torch.device
    dtype: torch.dtype
    autocast: object
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    flops: FlopCounter
    train_data: list
    bins: list
    val_batches: list
    rows_per_step: int
    total_steps: int
    out: Path
    # what a checkpoint carries: step = optimizer steps done, (epoch, row) = next packed row
    state: dict = field(default_factory=dict)
    records: list = field(default_factory=list)  # metrics.jsonl, this run's and the resumed run's
    losses: list = field(default_factory=list)  # every step of this run, in order
    updating: bool = False  # inside an optimizer update: an interrupt now cannot save a checkpoint
    accuracy: TokenAccuracy | None = None  # trained-token accuracy, counted by the loss
    z_loss: ZLoss | None = None  # the z-loss term, added and summed by the loss
    reporters: Reporters | None = None  # report_to: TensorBoard, W&B (rank 0)
    generation: evalgen.GenerationEval | None = None  # eval_generate: answers at each evaluation
    preference: PreferenceLoss | None = None  # objective dpo/simpo/orpo: rows are pairs, rewards logged
    collate: object = collate_packed  # (train_data, row) -> one packed micro-batch
    row_lengths: object = None  # (train_data, row) -> the lengths of its conversations

    def lengths(self, row: list[int]) -> list[int]:
        if self.row_lengths is not None:
            return self.row_lengths(self.train_data, row)
        return [len(self.train_data[i].input_ids) for i in row]

    def stats(self, mode: str = "train") -> dict:
        """The objective's own metrics since the last call: token accuracy, z-loss, or rewards."""
        if self.preference is not None:
            return self.preference.take(self.strategy, mode)
        if mode == "val":
            return self.accuracy.take(self.strategy, "val")
        return {
            **self.accuracy.take(self.strategy),
            **(self.z_loss.take(self.strategy) if self.z_loss else {}),
        }

    def say(self, line: str) -> None:
        if self.world.is_main:
            tqdm.write(line)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.world.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.reporters is not None:
                self.reporters.log(record)


def setup(cfg: TrainConfig, world: World) -> Run:
    """The run, set up in one pass, one call a step: settings -> tokenizer (and the template it resolves)
    -> checkpoint compatibility -> data -> model (trainer/model.py; trainer/sharded_load.py's skeleton
    under FSDP) -> strategy (trainer/parallel.py) -> rows -> optimizer -> loss. Settings, output directory
    and data are read and checked with the tokenizer alone, before the model loads (minutes on a real
    model): a bad record or a clash with an old run is answered at once."""
    out, say = setup_settings(cfg, world)
    tokenizer, cfg = setup_tokenizer(cfg, say)
    check_output_dir(cfg, out)  # settings changed since the checkpoint, or an old run in the way
    train_data, val_data = read_data(cfg, tokenizer, say)
    model, tokenizer, softcap, host = setup_model(cfg, say=say, tokenizer=tokenizer, world=world)
    flops = FlopCounter(model)  # the whole model, before any sharding
    check_labels(model, cfg, train_data, val_data)
    model, strategy, head, device, dtype = setup_strategy(cfg, world, model, softcap, host)
    bins, rows_per_step, total_steps = plan_rows(cfg, world, train_data)
    params, optimizer, scheduler = setup_optimizer(cfg, model, total_steps)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    state = dict(step=0, epoch=0, row=0, first_loss=None, best_val=None, evals_since_best=0, skipped=0,
                 bad_in_row=0, world_size=world.size)  # fmt: skip
    loss_fn = fused_loss(cfg.loss_backend)
    accuracy = TokenAccuracy(loss_fn, device)  # counted by the loss in the same pass, when it can
    z_loss = ZLoss(cfg.z_loss, loss_fn, device)
    preference = cfg.objective != "sft"
    run = Run(
        cfg=cfg, world=world, strategy=strategy, model=model, tokenizer=tokenizer, head=head,
        loss_fn=accuracy.wrap(z_loss.wrap(loss_fn)), accuracy=accuracy, z_loss=z_loss, device=device,
        dtype=dtype, autocast=autocast, params=params, optimizer=optimizer, scheduler=scheduler, flops=flops,
        train_data=train_data, bins=bins, rows_per_step=rows_per_step, total_steps=total_steps, out=out,
        state=state, val_batches=make_packed_batches(val_data, cfg.max_tokens) if not preference else [],
    )  # fmt: skip
    if preference:
        setup_preference(run, loss_fn, val_data)
    return run


def setup_settings(cfg: TrainConfig, world: World):
    """(output directory, rank 0's ``say``): the seed set, the directory made, unsupported mixes refused."""
    # same seed on every rank: the demo's weights and the LoRA init must be identical everywhere
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.parallel == "fsdp" and world.size > 1 and (cfg.save_merged or cfg.quantize != "none"):
        setting = "save_merged" if cfg.save_merged else f"quantize: {cfg.quantize}"
        raise TrainingError(f"{setting} with parallel: fsdp is not supported; use parallel: ddp "
                            "(or merge final/ afterwards on one process)")  # fmt: skip

    def say(line: str) -> None:
        if world.is_main:
            tqdm.write(line)

    return out, say


def setup_tokenizer(cfg: TrainConfig, say):
    """(tokenizer, cfg with its template resolved): the tokenizer ``cfg`` names (``tokenizer``, else the
    model's), loaded without the model. The resolved template is what runs, is saved with every
    checkpoint and is compared on resume."""
    try:
        _check_model_path(cfg.model)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, OSError) as e:  # no tokenizer files, remote code not trusted, missing path
        raise TrainingError(f"model {cfg.model}: {' '.join(str(e).split())}") from e
    asked, cfg = cfg.template, dataclasses.replace(cfg, template=resolve_template(cfg.template, tokenizer))
    say(describe_template(asked, cfg.template))
    return tokenizer, cfg


def read_data(cfg: TrainConfig, tokenizer, say) -> tuple[list, list]:
    """(training, validation) data: conversations encoded by trainer/data.py, or for a preference
    objective the pairs' chosen and rejected conversations by trainer/preference.py."""
    preference = cfg.objective != "sft"

    def encode(name: str, demo: Path):
        path = demo if name == "demo" else name
        if preference:
            data, summary = encode_pairs(path, tokenizer, template=cfg.template, max_length=cfg.max_length,
                                         overlong=cfg.overlong,
                                         records=demo_pairs(demo) if name == "demo" else None)  # fmt: skip
        else:
            data, summary = encode_file(path, tokenizer, template=cfg.template, loss_on=cfg.loss_on,
                                        max_length=cfg.max_length, overlong=cfg.overlong)  # fmt: skip
        say(summary.format())
        return data

    train_data = encode(cfg.train_file, DEMO_TRAIN_FILE)
    if len(train_data) == 0:
        what = "preference pair" if preference else "conversation"
        raise TrainingError(f"train_file {cfg.train_file}: no {what} left to train on (see above)")
    return train_data, encode(cfg.val_file, DEMO_VAL_FILE) if cfg.val_file else []


def setup_model(cfg: TrainConfig, say=print, tokenizer=None, world: World = ONE_PROCESS):
    """(model, tokenizer, the head's softcap, rank 0's host copy or None): the model loaded (and
    quantised), attention planned per layer, LoRA, the head's spec (trainer/model.py); ``tokenizer``: the
    one the data was read with (None: loaded here). Under FSDP with several ranks the model is a
    meta-device skeleton (trainer/sharded_load.py) that :func:`fill_shards` fills after sharding."""
    try:
        if cfg.parallel == "fsdp" and world.size > 1:
            model, tokenizer, head, host = load_skeleton(cfg, world, tokenizer, say)
            return model, tokenizer, head.softcap, host
        model, tokenizer, head = prepare_model(cfg, log=say, tokenizer=tokenizer)
    except (ValueError, OSError) as e:  # unsupported model or head, missing path, bad LoRA target
        raise TrainingError(f"model {cfg.model}: {' '.join(str(e).split())}") from e
    return model, tokenizer, head.softcap, None


def check_labels(model, cfg: TrainConfig, train_data, val_data) -> None:
    """The loss trusts the labels to lie in [0, V): check them once here, on the host."""
    vocab_size = model.get_base_model().get_output_embeddings().out_features
    for name, data in ((cfg.train_file, train_data), (cfg.val_file, val_data)):
        top = max((max(e.labels) for e in data if e.labels), default=-1)
        if top >= vocab_size:
            raise TrainingError(f"{name}: label {top} is outside the model's vocabulary of "
                                f"{vocab_size} tokens")  # fmt: skip


def setup_strategy(cfg: TrainConfig, world: World, model, softcap, host):
    """(model as the strategy wraps it, strategy, its LiveHead, device, compute dtype): one process, data
    parallel or FSDP (trainer/parallel.py); a skeleton's shards get storage and rank 0's weights."""
    base = model.get_base_model()
    device = base.get_output_embeddings().weight.device if host is None else resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    strategy = make_strategy(cfg.parallel, world, compute_dtype=dtype, cpu_offload=cfg.fsdp_cpu_offload,
                             device=device)  # fmt: skip
    model = strategy.wrap(model)
    if host is not None:
        fill_shards(model, host, world, device, offload=cfg.fsdp_cpu_offload)
    model.train()
    return model, strategy, LiveHead(base.get_output_embeddings(), softcap, strategy), device, dtype


def plan_rows(cfg: TrainConfig, world: World, train_data):
    """(packed rows, rows per step, steps). Every rank packs the same rows (deterministic for seed and
    epoch), the same every epoch in another order; a preference row holds whole pairs. A step takes the
    next rows_per_step of them and each rank trains on its share: one step covers the same rows however
    many ranks share it. The last step of an epoch may be short. No row is dropped."""
    preference = cfg.objective != "sft"
    bins = pack_pairs(train_data, cfg.max_tokens) if preference else pack(train_data, cfg.max_tokens)
    rows_per_step = cfg.grad_accum * world.size
    return bins, rows_per_step, cfg.max_steps or cfg.epochs * math.ceil(len(bins) / rows_per_step)


def setup_optimizer(cfg: TrainConfig, model, total_steps: int):
    """(trainable parameters, AdamW, its schedule). Fused: the update takes found_inf, so a non-finite
    step is skipped without a host sync."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


def setup_preference(run: Run, loss_fn, val_data) -> None:
    """Rows of pairs and the preference loss in place of the token loss; ``ref_logps: cached``: the
    reference log-probs of every pair, computed here once."""
    cfg = run.cfg
    run.preference = run.loss_fn = PreferenceLoss(
        cfg.objective, loss_fn, run.device, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
    )  # fmt: skip
    run.collate, run.row_lengths = collate_pairs, pair_lengths
    val_rows = pack_pairs(val_data, cfg.max_tokens) if val_data else []
    run.val_batches = [collate_pairs(val_data, row) for row in val_rows]
    if cfg.objective == "dpo" and cfg.ref_logps == "cached":
        for mode, data, rows in (("train", run.train_data, run.bins), ("val", val_data, val_rows)):
            run.preference.cache_reference(run.model, data, rows, run.head, run.strategy, run.autocast, mode)


def resume(run: Run) -> None:
    """Load the checkpoint ``cfg.resume`` names (every rank the same one; ``setup`` has compared its
    settings, or refused a fresh run over an old one's checkpoints); then rewrite metrics.jsonl up to
    the step resumed from."""
    cfg, out = run.cfg, run.out
    with run.world.all_or_none():  # what each rank reads alone, before the collective load: agreed on
        path = find_checkpoint(cfg)
    if path is not None:
        load_checkpoint(run, path)
        run.say(f"resumed from {path} at step {run.state['step']}")
    elif cfg.resume == "auto":
        run.say(f"resume auto: no checkpoint in {out}, starting fresh")
    with run.world.all_or_none():  # every rank reads the previous run's metrics before rank 0 rewrites them
        run.records = _read_metrics(out / "metrics.jsonl", run.state["step"])
    with run.world.all_or_none():  # rank 0's writes and the reporters: a failure stops every rank
        if run.world.is_main:
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.records))
            save_config(cfg, out / "train_config.yaml")
        run.reporters = Reporters(cfg, out, enabled=run.world.is_main)
        # the validation prompts answered at each evaluation (None when eval_generate is 0); under FSDP
        # every rank answers every prompt, since each forward pass needs all ranks
        run.generation = evalgen.GenerationEval.setup(
            cfg,
            run.tokenizer,
            run.model,
            run.world,
            run.autocast,
            out,
            run.state["step"],
            split=run.strategy.name != "fsdp",
        )


def train_step(run: Run, group: list[PackedBatch], interrupt: bool):
    """One optimizer step over ``group`` without a host sync of its own. Returns (loss, grad norm, stop):
    loss and norm as 0-dim device tensors; a non-finite one makes AdamW skip the update on the device."""
    loss, stop = parallel_step(run.model, group, run.head, run.loss_fn, run.device, run.autocast,
                               run.strategy, interrupt)  # fmt: skip
    max_norm = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else math.inf
    norm = run.strategy.grad_norm(run.params, max_norm)
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    run.optimizer.found_inf = (~finite).float().to(run.params[0].device)  # read by the fused AdamW step
    run.updating = True  # until the loop has counted this step, the weights and the state disagree
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return loss, norm, stop


class Progress:
    """The steps' losses and gradient norms wait on the device; ``flush`` reads all of them in one sync,
    counts the skipped steps and stops the run after ``max_bad_steps`` non-finite steps in a row."""

    def __init__(self, run: Run):
        self.run = run
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.window = dict(loss=0.0, steps=0, tokens=0, flops=0.0, t0=time.perf_counter(), norm=math.nan)

    def add(self, step: int, loss, norm, tokens: int, flops: float) -> None:
        self.pending.append((step, loss, norm))
        self.window["tokens"] += tokens
        self.window["flops"] += flops

    def flush(self) -> None:
        if not self.pending:
            return
        run, state, window = self.run, self.run.state, self.window
        values = torch.stack([t.float() for _, loss, norm in self.pending for t in (loss, norm)]).tolist()
        steps = [step for step, _, _ in self.pending]
        self.pending = []
        for step, loss, norm in zip(steps, values[0::2], values[1::2], strict=True):
            run.losses.append(loss)
            window["norm"] = norm
            if math.isfinite(loss) and math.isfinite(norm):
                state["bad_in_row"] = 0
                state["first_loss"] = state["first_loss"] or loss
                window["loss"] += loss
                window["steps"] += 1
                continue
            state["skipped"] += 1
            state["bad_in_row"] += 1
            run.say(f"step {step}: non-finite loss {loss} or grad norm {norm}, step skipped "
                    f"({state['bad_in_row']} in a row)")  # fmt: skip
            if state["bad_in_row"] >= run.cfg.max_bad_steps:
                raise TrainingError(
                    f"{state['bad_in_row']} non-finite steps in a row at step {step}: lower lr, check the "
                    "data, or try dtype fp32; the last good checkpoint is kept"
                )

    def log(self, bar) -> None:
        """One metrics record and progress line for the steps since the last one."""
        self.flush()
        run, window, step = self.run, self.window, self.run.state["step"]
        seconds = time.perf_counter() - window["t0"]
        record = {
            "step": step, "epoch": run.state["epoch"], "loss": window["loss"] / max(1, window["steps"]),
            "lr": run.scheduler.get_last_lr()[0], "grad_norm": window["norm"],
            "tokens_per_s": window["tokens"] / seconds, "skipped": run.state["skipped"],
            **run.stats(),
        }  # fmt: skip
        line = (f"step {step}/{run.total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                f"grad norm {window['norm']:.3f}, {record['tokens_per_s']:.0f} tokens/s")  # fmt: skip
        if "acc" in record:
            line += f", acc {record['acc']:.3f}"
        if "z_loss" in record:
            line += f", z {record['z_loss']:.3g}"
        if "rewards/margins" in record:
            line += f", margin {record['rewards/margins']:.3f}, reward acc {record['rewards/accuracies']:.2f}"
        peak = peak_flops(run.device)
        if peak:  # global FLOPs over the peak of every process
            record["mfu"] = window["flops"] / seconds / (peak * run.world.size)
            line += f", mfu {100 * record['mfu']:.1f}%"
        run.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        run.say(line)
        window.update(loss=0.0, steps=0, tokens=0, flops=0.0, t0=time.perf_counter())


def run_eval(run: Run) -> bool:
    """Validation loss (and answers), best/ adapter, early stopping; True when patience is exhausted."""
    state = run.state
    val = evaluate(run.model, run.val_batches, run.head, run.loss_fn, run.device, run.autocast, run.strategy)
    record = {"step": state["step"], "val_loss": val, **run.stats("val")}
    if run.generation is not None:
        record |= run.generation.run(run.model, state["step"])
    # every rank logs and judges rank 0's numbers: the generation metrics are each rank's own (an argmax
    # tie may differ), and saving best/ is a collective under FSDP, so the verdict must be one
    record = run.world.from_main(record)
    run.log(record)
    # best/ and patience follow cfg.metric_for_best; the over-fitting guard (trainer/evalgen.py)
    verdict = evalgen.judge(
        state, record, run.records, metric=run.cfg.metric_for_best, patience=run.cfg.patience
    )
    if verdict.improved:
        save_final_adapter(run, run.out / "best")
    for line in verdict.lines:
        run.say(line)
    return verdict.stop


def next_steps(run: Run):
    """The rows of each remaining step, in order, epoch after epoch; the caller advances state."""
    state = run.state
    while state["step"] < run.total_steps:
        rows = epoch_rows(run.bins, seed=run.cfg.seed, epoch=state["epoch"])
        while state["row"] < len(rows) and state["step"] < run.total_steps:
            yield rows[state["row"] : state["row"] + run.rows_per_step]
        if state["row"] >= len(rows):
            state["epoch"] += 1
            state["row"] = 0


def train(cfg: TrainConfig) -> dict:
    """Train a LoRA adapter as ``cfg`` says; return the final metrics (the same on every rank). Under
    torchrun, join the process group first and leave it at the end, also on errors."""
    try:
        world = init_world(cfg.device)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    try:
        with ExitStack() as lock:
            with world.all_or_none():  # rank 0 takes the lock (trainer/lock.py); busy: every rank stops
                lock.enter_context(output_dir_lock(cfg.output_dir, enabled=world.is_main, say=tqdm.write))
            return _train(cfg, world)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world: World) -> dict:
    run = setup(cfg, world)
    resume(run)
    state = run.state
    run.say(_summary(run))
    if run.generation is not None:
        run.say(run.generation.describe())
    progress = Progress(run)
    # a run resumed at its last step may have evaluated there already
    evaluated = [r["step"] for r in run.records if "val_loss" in r]
    last_saved, last_eval, stop_reason = state["step"], (evaluated or [None])[-1], "done"
    bar = tqdm(total=run.total_steps, initial=state["step"], desc="train", dynamic_ncols=True,
               disable=not world.is_main)  # fmt: skip
    interrupt = _GracefulInterrupt()
    reference = run.preference is not None and run.preference.steps_reference  # one more forward a step
    try:
        for step_rows in next_steps(run):
            # collated step by step: the epoch's rows are never all held as tensors at once
            group = [run.collate(run.train_data, r) for r in step_rows]
            lengths = [run.lengths(r) for r in step_rows]
            loss, norm, stop = train_step(run, group, interrupt.requested)
            state["step"] += 1
            state["row"] += len(group)
            run.updating = False
            bar.update(1)
            flops = run.flops.step(lengths, sum(b.num_loss_tokens for b in group), reference)
            progress.add(state["step"], loss, norm, sum(b.num_tokens for b in group), flops)

            step = state["step"]
            if step % cfg.log_every == 0 or step == run.total_steps:
                progress.log(bar)
            paused = time.perf_counter()  # evaluation and saving do not count towards tokens/s
            if run.val_batches and cfg.eval_every and step % cfg.eval_every == 0:
                last_eval = step
                if run_eval(run):
                    stop_reason = f"early stop: no improvement in {cfg.patience} evaluations"
                    break
            if cfg.save_every and step % cfg.save_every == 0:
                progress.flush()  # the saved state counts every step up to here
                save_checkpoint(run)
                last_saved = step
            progress.window["t0"] += time.perf_counter() - paused
            # Ctrl-C on any rank before this step's reduction: every rank stops here
            if stop or (world.size == 1 and interrupt.requested):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        run.optimizer.zero_grad(set_to_none=True)
        if run.updating:
            run.say("interrupted during an update: the last checkpoint is kept; use --resume auto")
        elif state["step"] > last_saved:
            progress.flush()
            path = save_checkpoint(run)
            run.say(f"interrupted: saved {path}; continue with --resume auto")
        raise
    finally:
        interrupt.restore()
    bar.close()
    progress.flush()
    return finish(run, stop_reason, last_eval, last_saved)


def _summary(run: Run) -> str:
    cfg, world = run.cfg, run.world
    quantized = " (base weights frozen in 4-bit NF4: QLoRA)" if cfg.quantize == "nf4" else ""
    return (
        f"model {cfg.model}: {run.flops.total / 1e6:.1f}M parameters{quantized}, "
        f"{sum(p.numel() for p in run.params) / 1e6:.2f}M trainable (LoRA r={cfg.lora_r}), {run.dtype} on "
        f"{run.device}; {len(run.bins)} packed rows per epoch, {run.total_steps} steps of {cfg.grad_accum} "
        f"rows"
        + (f" on each of {world.size} processes ({run.strategy.name})" if world.size > 1 else "")
        + (f"; objective {cfg.objective} (beta {cfg.beta:g})" if run.preference is not None else "")
    )


def finish(run: Run, stop_reason: str, last_eval: int | None, last_saved: int) -> dict:
    """Last evaluation and checkpoint, final/ (and merged/), the loss plot; the run's summary."""
    cfg, state, out, world = run.cfg, run.state, run.out, run.world
    if run.val_batches and last_eval != state["step"]:
        run_eval(run)
    if state["step"] > last_saved:
        save_checkpoint(run)
    save_final_adapter(run, out / "final")
    with world.all_or_none():
        if world.is_main:
            plot_losses(run.records, out / "loss.png")
        if run.reporters is not None:
            run.reporters.close()
    if cfg.save_merged:
        # rank 0 merges after every rank has left the process group: nobody waits in a collective
        # (under NCCL its 10-minute timeout is shorter than a large model's merge and save)
        close_world(world)
        if world.is_main:
            merged = run.model.merge_and_unload()
            _atomic_dir(
                out / "merged", lambda t: (merged.save_pretrained(t), run.tokenizer.save_pretrained(t))
            )

    logged = [r["loss"] for r in run.records if "loss" in r]
    result = {
        "steps": state["step"],
        "first_loss": state["first_loss"],  # of the first step
        "last_loss": logged[-1],  # mean of the last logging window
        "best_val_loss": state["best_val"],  # of the evaluation in best/
        "best_step": state.get("best_step"),  # the evaluation in best/
        "skipped_steps": state["skipped"],
        "stop_reason": stop_reason,
        "losses": run.losses,
        "output_dir": str(out),
    }
    run.say(
        f"{stop_reason} after {state['step']} steps: train loss {result['first_loss']:.4f} (first step) -> "
        f"{result['last_loss']:.4f} (last {cfg.log_every} steps)"
        + (f", best val loss {state['best_val']:.4f}" if state["best_val"] is not None else "")
        + evalgen.best_summary(state, cfg.metric_for_best)
        + f"; adapter in {out / 'final'}"
    )
    return result


# ------------------------------------------------------------------------------------------- Ctrl-C


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


class _CallableModule(types.ModuleType):
    """Importing this submodule rebinds the package attribute ``trainer.train`` to it; calling the module
    then runs its ``train`` on the checked config, as the package's ``train`` does, so ``from trainer
    import train; train(cfg)`` works whether or not this module was imported first."""

    def __call__(self, cfg: TrainConfig) -> dict:
        return self.train(validate(cfg))


__all__ = ["TrainConfig", "TrainingError", "config_to_dict", "train"]

sys.modules[__name__].__class__ = _CallableModule  # `from trainer import train`: this module or its train()
