"""``python -m trainer check``: this project's training path against the plain Hugging Face path.

On the first packed rows of the configured training data, compute the loss and the LoRA gradients twice:

- ours: packed row, varlen attention, fused masked loss on the decoder's hidden states
  (``trainer.train.forward_backward``, exactly what training runs);
- Hugging Face: the same conversations right-padded (``pad_collate``), transformers' own attention (sdpa,
  or eager where a layer has a logit softcap or sinks) with an ``attention_mask``, the model's own
  logits and its ``labels=`` loss.

HF's loss is a mean over each padded batch's target tokens, so it is turned back into a sum (times that
batch's target count); both paths are divided by the same total count. LoRA's B matrices start at zero,
which would make every A gradient zero; the check gives them small random values first so that every
adapter gradient is exercised. Dropout is off (eval mode) so that both paths see the same function.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_ref
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.model import hf_reference_attention, prepare_model, resolve_dtype
from trainer.packing import collate_packed, epoch_rows, pack, pad_collate
from trainer.train import forward_backward

# Relative differences a correct path stays under, by compute dtype: fp32 differs only by summation
# order (~1e-6); bf16/fp16 round activations to 8/11 bits (~4e-3 per op, compounding over layers).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
USAGE = "python -m trainer check [--num-batches N] [--tolerance X] [--config file.yaml] [--key value ...]"


class CheckError(RuntimeError):
    """The check cannot run (no data, no target token, ...); the CLI prints it as one line."""


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _randomize_lora_b(model, seed: int) -> None:
    """Small random B matrices (PEFT initialises them to 0, which zeroes every A gradient)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator).to(p))


def _hf_forward_backward(model, padded_batches, device, autocast) -> torch.Tensor:
    """The plain HF path: sum over batches of (mean loss x target count), divided by the total count."""
    total_targets = max(1, sum(b.num_loss_tokens for b in padded_batches))
    total = torch.zeros((), device=device)
    for batch in padded_batches:
        batch = batch.to(device)
        with autocast:
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=batch.labels,
                use_cache=False,
            )
        loss_sum = out.loss.float() * batch.num_loss_tokens
        (loss_sum / total_targets).backward()
        total += loss_sum.detach()
    return total / total_targets


def run_check(cfg: TrainConfig, *, num_batches: int = 2, tolerance: float | None = None) -> dict:
    """Compare loss and LoRA gradients of the packed/fused path with the padded HF path on the first
    ``num_batches`` packed rows of ``cfg.train_file``. Returns a dict: ``loss_ours``, ``loss_hf`` (mean
    per target token), ``loss_rel_diff``, ``grad_rel_diff`` (max over adapter tensors of
    max|g_ours - g_hf| / max|g_hf|), ``worst_param``, ``num_batches``, ``conversations``, ``tokens``,
    ``loss_tokens``, ``tolerance`` and ``passed``."""
    from trainer.data import DEMO_TRAIN_FILE, encode_file

    if num_batches < 1:
        raise CheckError(f"num_batches must be at least 1, got {num_batches}")
    torch.manual_seed(cfg.seed)
    model, tokenizer, head = prepare_model(cfg)
    _randomize_lora_b(model, cfg.seed)
    model.eval()  # no dropout: both paths must compute the same function
    device = head[0].device
    dtype = resolve_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    loss_fn = masked_linear_cross_entropy if cfg.loss_backend == "fused" else masked_linear_cross_entropy_ref

    path = DEMO_TRAIN_FILE if cfg.train_file == "demo" else cfg.train_file
    data, _ = encode_file(
        path, tokenizer, template=cfg.template, loss_on=cfg.loss_on, max_length=cfg.max_length,
        overlong=cfg.overlong, progress=False,
    )  # fmt: skip
    if len(data) == 0:
        raise CheckError(f"{path}: no conversation left to check (all dropped or without targets)")
    rows = epoch_rows(pack(data, cfg.max_tokens), seed=cfg.seed)[:num_batches]  # training's first rows
    packed = [collate_packed(data, row) for row in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padded = [pad_collate([data[i] for i in row], pad_id) for row in rows]
    loss_tokens = sum(b.num_loss_tokens for b in packed)
    if loss_tokens == 0:
        raise CheckError(
            f"the first {len(rows)} packed rows of {path} have no target token; check the labels"
        )

    base = model.get_base_model()
    default_attn = hf_reference_attention(model)  # prepare_model installed varlen attention for ours
    loss_ours = forward_backward(model, packed, head, loss_fn, device, autocast).item()
    grads_ours = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    base.set_attn_implementation(default_attn)
    loss_hf = _hf_forward_backward(model, padded, device, autocast).item()
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
        conversations=sum(len(r) for r in rows),
        tokens=sum(b.num_tokens for b in packed),
        padded_slots=sum(b.input_ids.numel() for b in padded),
        loss_tokens=loss_tokens,
        hf_loss_tokens=sum(b.num_loss_tokens for b in padded),
        hf_attention=default_attn,
        tolerance=tolerance,
        passed=passed,
    )


def format_report(r: dict) -> str:
    lines = [
        f"check: {r['num_batches']} packed rows, {r['conversations']} conversations, {r['tokens']} tokens "
        f"({r['padded_slots']} padded slots)",
        "",
        "| path | loss (mean per target token) | target tokens |",
        "|---|---|---|",
        f"| ours: packed, varlen attention, fused masked loss | {r['loss_ours']:.6f} | {r['loss_tokens']} |",
        f"| Hugging Face: padded, {r['hf_attention']} attention, labels= loss | {r['loss_hf']:.6f} "
        f"| {r['hf_loss_tokens']} |",
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
    from trainer.data import DataError

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
