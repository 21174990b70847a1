"""``python -m trainer check``: this project's training path against the plain Hugging Face path.

On the first packed rows of the configured training data, compute the loss and the LoRA gradients twice:

- ours: packed row, varlen attention, fused masked loss on the decoder's hidden states
  (``trainer.train.forward_backward``, exactly what training runs);
- Hugging Face: the same conversations right-padded (``pad_collate``), transformers' own attention (sdpa,
  or eager where a layer has a logit softcap or sinks) with an ``attention_mask``, the model's own
  ``lm_head`` module and its config's logit scale and softcap on every position, and an fp32
  cross-entropy with transformers' shift, in chunks of positions (``padded_loss_sum``: bounded memory,
  never the ``[tokens, vocab]`` logits that ``labels=`` would build).

Both paths sum their per-token losses and divide by the same total count. With a preference objective
(``--objective dpo``, ``simpo``, ``orpo``) the rows are packed pairs and the Hugging Face path scores each
conversation alone, unpadded, summing the log-probabilities of the answer's tokens from the same chunked
head (the reference with the adapter off); both paths then apply the same pair loss over the same pairs.

LoRA's B matrices start at zero,
which would make every A gradient zero; the check gives them small random values first so that every
adapter gradient is exercised. Dropout is off (eval mode) so that both paths see the same function.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import nullcontext

import torch
import torch.utils.checkpoint

from trainer.config import ConfigError, TrainConfig, load_config
from trainer.data import DEMO_TRAIN_FILE, DataError, encode_file, load_tokenizer
from trainer.model import decoder_of, head_scale, hf_reference_attention, prepare_model, resolve_dtype
from trainer.packing import collate_packed, epoch_rows, pack, pad_collate
from trainer.preference import (
    PreferenceLoss,
    collate_pairs,
    demo_pairs,
    encode_pairs,
    pack_pairs,
    pair_losses,
)
from trainer.templates import resolve_template
from trainer.train import forward_backward
from tritrain_kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_ref

# Relative differences a correct path stays under, by compute dtype: fp32 differs only by summation
# order (~1e-6); bf16/fp16 round activations to 8/11 bits (~4e-3 per op, compounding over layers).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
USAGE = "python -m trainer check [--num-batches N] [--tolerance X] [--config file.yaml] [--key value ...]"


class CheckError(RuntimeError):
    """The check cannot run (no data, no target token, ...); the CLI prints it as one line."""


def _lora_grads(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient; zeros where the batch never reached it (an expert no token
    was routed to), so both paths are compared on the same set of parameters."""
    return {
        n: p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _randomize_lora_b(model, seed: int) -> None:
    """Small random B matrices (PEFT initialises them to 0, which zeroes every A gradient)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator).to(p))


# fp32 logits one chunk of the Hugging Face path's loss may hold (x2 for the softmax in backward):
# 256 MiB is 220 positions at V=151936.
HF_LOSS_CHUNK_BYTES = 256 * 2**20
HF_LOSS_NOTE = (
    "loss over chunks of <= {chunk} positions (lm_head + fp32 cross-entropy, checkpointed), "
    "never [tokens, vocab]"
)


def _chunk_loss_sum(h, y, lm_head, scale, softcap):
    logits = lm_head(h).float()  # the model's own head module (in its dtype, as HF), not our head spec
    if scale != 1.0:
        logits = logits * scale  # Cohere's logit_scale, Granite's 1 / logits_scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")


def padded_loss_sum(model, batch, head, autocast, *, chunk_bytes: int = HF_LOSS_CHUNK_BYTES) -> torch.Tensor:
    """Summed next-token loss of a padded batch through the plain Hugging Face path, in bounded memory.

    The decoder runs on the right-padded batch with its ``attention_mask`` (the model's default attention);
    the labels are shifted as transformers shifts them. Its loss would build ``[B, L, V]`` logits and an
    fp32 copy (about 10 bytes per logit: 217 GB for 24 x 5943 positions at V=151936); here the head and an
    fp32 cross-entropy run over chunks of positions, each chunk recomputed in backward (activation
    checkpointing), so at most one chunk of ``chunk_bytes`` of fp32 logits exists at a time. Every
    position is computed, ignored or not, as transformers does.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    softcap = getattr(base.config, "final_logit_softcapping", None) or None  # read here, not from `head`
    # A padded batch has an attention_mask; a packed one (HF's padding-free mode) position_ids instead.
    inputs = {k: getattr(batch, k, None) for k in ("input_ids", "attention_mask", "position_ids")}
    with autocast:
        hidden = decoder_of(base)(**inputs, use_cache=False).last_hidden_state
    labels = torch.nn.functional.pad(batch.labels, (0, 1), value=-100)[:, 1:]  # position t predicts t + 1
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    rows = hf_loss_chunk_rows(head[0].shape[0], chunk_bytes)
    scale, lm_head = head_scale(base), base.get_output_embeddings()
    total = torch.zeros((), device=h.device)
    for s in range(0, h.shape[0], rows):
        with autocast:
            part = torch.utils.checkpoint.checkpoint(
                _chunk_loss_sum,
                h[s : s + rows],
                y[s : s + rows],
                lm_head,
                scale,
                softcap,
                use_reentrant=False,
            )
        total = total + part
    return total


def hf_loss_chunk_rows(vocab_size: int, chunk_bytes: int = HF_LOSS_CHUNK_BYTES) -> int:
    # Per position: V fp32 logits, plus their softmax in the cross-entropy's backward.
    return max(1, chunk_bytes // (vocab_size * 4 * 2))


def _hf_forward_backward(model, padded_batches, head, device, autocast) -> torch.Tensor:
    """The plain HF path: sum over batches of the summed loss, divided by the total target count."""
    total_targets = max(1, sum(b.num_loss_tokens for b in padded_batches))
    total = torch.zeros((), device=device)
    for batch in padded_batches:
        loss_sum = padded_loss_sum(model, batch.to(device), head, autocast)
        (loss_sum / total_targets).backward()
        total += loss_sum.detach()
    return total / total_targets


def _hf_logp_sums(model, sequences, head, device, autocast, pad_id: int = 0) -> torch.Tensor:
    """[len(sequences)] log-prob sums of each sequence's scored tokens: the plain HF path on each alone."""
    return torch.stack([-padded_loss_sum(model, pad_collate([s], pad_id).to(device), head, autocast)
                        for s in sequences])  # fmt: skip


def _hf_preference_forward_backward(model, objective, rows, packed, head, device, autocast) -> torch.Tensor:
    """The step's preference loss through the plain HF path, pair by pair, with our rows' denominators."""
    pairs, chosen_tokens = objective.totals(packed)
    total = torch.zeros((), device=device)
    for sequences, batch in zip(rows, packed, strict=True):
        for p in range(batch.num_pairs):
            pair = sequences[2 * p : 2 * p + 2]
            policy = _hf_logp_sums(model, pair, head, device, autocast).view(1, 2)
            reference = None
            if objective.kind == "dpo":
                with torch.no_grad(), model.disable_adapter():
                    reference = _hf_logp_sums(model, pair, head, device, autocast).view(1, 2)
            losses, _, _ = pair_losses(objective.kind, policy, batch.counts[p : p + 1].to(device), reference,
                                       beta=objective.beta, label_smoothing=objective.label_smoothing,
                                       simpo_gamma=objective.simpo_gamma)  # fmt: skip
            loss = losses.sum() / pairs
            if objective.kind == "orpo":
                loss = loss - policy[0, 0] / chosen_tokens
            loss.backward()
            total += loss.detach()
    return total


def run_check(cfg: TrainConfig, *, num_batches: int = 2, tolerance: float | None = None) -> dict:
    """Compare loss and LoRA gradients of the packed/fused path with the padded HF path on the first
    ``num_batches`` packed rows of ``cfg.train_file``. Returns a dict: ``loss_ours``, ``loss_hf`` (mean
    per target token), ``loss_rel_diff``, ``grad_rel_diff`` (max over adapter tensors of
    max|g_ours - g_hf| / max|g_hf|), ``worst_param``, ``num_batches``, ``conversations``, ``tokens``,
    ``loss_tokens``, ``tolerance``, ``passed``, the ``template`` that labelled the data and the ``data``
    summary (conversations kept, and those the template could not render)."""
    if num_batches < 1:
        raise CheckError(f"num_batches must be at least 1, got {num_batches}")
    # the data is read with the tokenizer alone, before the model loads: a bad record is answered at once
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    cfg = dataclasses.replace(cfg, template=resolve_template(cfg.template, tokenizer))
    path = DEMO_TRAIN_FILE if cfg.train_file == "demo" else cfg.train_file
    if cfg.objective != "sft":
        records = demo_pairs(path) if cfg.train_file == "demo" else None
        data, summary = encode_pairs(path, tokenizer, template=cfg.template, max_length=cfg.max_length,
                                     overlong=cfg.overlong, records=records)  # fmt: skip
    else:
        data, summary = encode_file(
            path, tokenizer, template=cfg.template, loss_on=cfg.loss_on, max_length=cfg.max_length,
            overlong=cfg.overlong, progress=False,
        )  # fmt: skip
    if len(data) == 0:
        raise CheckError(f"{path}: no conversation left to check (all dropped or without targets)")
    torch.manual_seed(cfg.seed)
    model, tokenizer, head = prepare_model(cfg, tokenizer=tokenizer)
    _randomize_lora_b(model, cfg.seed)
    model.eval()  # no dropout: both paths must compute the same function
    device = head[0].device
    dtype = resolve_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    loss_fn = masked_linear_cross_entropy if cfg.loss_backend == "fused" else masked_linear_cross_entropy_ref

    preference = cfg.objective != "sft"
    bins = pack_pairs(data, cfg.max_tokens) if preference else pack(data, cfg.max_tokens)
    rows = epoch_rows(bins, seed=cfg.seed)[:num_batches]  # training's first rows
    packed = [(collate_pairs if preference else collate_packed)(data, row) for row in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = [[data[s] for p in row for s in (2 * p, 2 * p + 1)] if preference else [data[i] for i in row]
                 for row in rows]  # fmt: skip
    padded = [pad_collate(row, pad_id) for row in sequences]
    loss_tokens = sum(b.num_loss_tokens for b in packed)
    if loss_tokens == 0:
        raise CheckError(
            f"the first {len(rows)} packed rows of {path} have no target token; check the labels"
        )

    base = model.get_base_model()
    default_attn = hf_reference_attention(model)  # prepare_model installed varlen attention for ours
    if preference:
        objective = PreferenceLoss(
            cfg.objective, loss_fn, device, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma,
        )  # fmt: skip
        loss_ours = objective.forward_backward(
            model, [(b, 1.0) for b in packed], packed, head, device, autocast
        )
    else:
        loss_ours = forward_backward(model, packed, head, loss_fn, device, autocast)
    loss_ours = loss_ours.item()
    grads_ours = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    base.set_attn_implementation(default_attn)
    if preference:
        loss_hf = _hf_preference_forward_backward(
            model, objective, sequences, packed, head, device, autocast
        ).item()
    else:
        loss_hf = _hf_forward_backward(model, padded, head, device, autocast).item()
    grads_hf = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    grad_rel, worst = 0.0, ""
    for name, g_hf in grads_hf.items():
        scale = g_hf.abs().max().clamp_min(1e-30)
        rel = ((grads_ours[name] - g_hf).abs().max() / scale).item()
        if not rel <= grad_rel:  # NaN counts as the worst
            grad_rel, worst = rel, name
    loss_rel = abs(loss_ours - loss_hf) / max(abs(loss_hf), 1e-30)
    passed = bool(loss_rel <= tolerance and grad_rel <= tolerance)
    return dict(
        loss_ours=loss_ours,
        loss_hf=loss_hf,
        loss_rel_diff=loss_rel,
        grad_rel_diff=grad_rel,
        worst_param=worst,
        num_batches=len(rows),
        conversations=sum(len(r) for r in sequences),
        tokens=sum(b.num_tokens for b in packed),
        padded_slots=sum(b.input_ids.numel() for b in padded),
        loss_tokens=loss_tokens,
        hf_loss_tokens=sum(b.num_loss_tokens for b in padded),
        hf_attention=default_attn,
        hf_loss=HF_LOSS_NOTE.format(chunk=hf_loss_chunk_rows(head[0].shape[0])),
        tolerance=tolerance,
        passed=passed,
        template=cfg.template,
        objective=cfg.objective,
        data=summary,
    )


def format_report(r: dict) -> str:
    summary = r["data"]
    lines = [f"template: {r['template']}", summary.format()]
    if summary.skipped_template:
        lines.append(f"the template rejected {summary.skipped_template} of {summary.conversations} "
                     f"{summary.unit}: they are neither trained nor checked")  # fmt: skip
    loss = (
        "loss (mean per target token)"
        if r["objective"] == "sft"
        else f"{r['objective']} loss (mean per pair)"
    )
    lines += [
        f"check: {r['num_batches']} packed rows, {r['conversations']} conversations, {r['tokens']} tokens "
        f"({r['padded_slots']} padded slots)",
        "",
        f"| path | {loss} | target tokens |",
        "|---|---|---|",
        f"| ours: packed, varlen attention, fused masked loss | {r['loss_ours']:.6f} | {r['loss_tokens']} |",
        f"| Hugging Face: {'padded' if r['objective'] == 'sft' else 'each conversation alone'}, "
        f"{r['hf_attention']} attention, its lm_head | {r['loss_hf']:.6f} "
        f"| {r['hf_loss_tokens']} |",
        "",
        f"Hugging Face {r['hf_loss']}",
        "",
        f"loss relative difference     {r['loss_rel_diff']:.3e}",
        f"max LoRA gradient rel. diff  {r['grad_rel_diff']:.3e}  ({r['worst_param'] or '-'})",
        f"tolerance                    {r['tolerance']:.1e}",
        "PASS" if r["passed"] else "FAIL: the training path does not match Hugging Face beyond tolerance",
    ]
    return "\n".join(lines)


def _pop_option(argv: list[str], name: str, cast):
    """Remove ``--name value`` / ``--name=value`` from argv; return the cast value or None."""
    for i, arg in enumerate(argv):
        if arg == name or arg.startswith(name + "="):
            if "=" in arg:
                value, used = arg.split("=", 1)[1], 1
            elif i + 1 < len(argv):
                value, used = argv[i + 1], 2
            else:
                raise ConfigError(f"{name} needs a value")
            del argv[i : i + used]
            try:
                return cast(value)
            except ValueError:
                raise ConfigError(f"{name}: expected {cast.__name__}, got {value!r}") from None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__.strip())
        return 0
    try:
        num_batches = _pop_option(argv, "--num-batches", int)
        tolerance = _pop_option(argv, "--tolerance", float)
        cfg = load_config(argv)
        result = run_check(cfg, num_batches=2 if num_batches is None else num_batches, tolerance=tolerance)
    except (ConfigError, DataError, CheckError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
