"""Packed (varlen) attention vs padded SDPA, forward + backward, on a realistic conversation length mix.

    python -m pytest bench/bench_varlen_attention.py --benchmark-only

Lengths are log-normal (sigma 0.8, long right tail), as in chat SFT data. Providers, in one run:
``varlen`` (kernels.varlen_attention with the backend it selects: flash-attn, torch varlen_attn, or the
reference on CPU), ``varlen_ref`` (per-segment SDPA reference) and ``padded_sdpa`` (the batch right-padded
to its longest conversation, causal SDPA; the pad_collate baseline). ``extra_info`` holds real tokens/s and
TFLOP/s over the real-token causal FLOP floor. GPU: 64 conversations, mean ~700 tokens, Hq=32, Hkv=8,
D=128, bf16. CPU: a smaller mix, fp32.

``test_packing_efficiency`` packs the synthetic dataset (trainer.assets.synthetic, encoded with the demo
tokenizer) at max_tokens=16384 and records real tokens / slots for packing and for padded batches of 64.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import varlen_attention, varlen_attention_ref
from kernels.varlen_attention import AttentionNeeds, choose_backend
from trainer.packing import pack, packing_efficiency, pad_collate

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    N_CONV, MEAN_TOKENS, HQ, HKV, D, DTYPE = 64, 700, 32, 8, 128, torch.bfloat16
else:
    N_CONV, MEAN_TOKENS, HQ, HKV, D, DTYPE = 16, 160, 4, 2, 32, torch.float32


def lognormal_lengths(n, mean, *, sigma=0.8, seed=0, low=16, high=None):
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    return np.clip(rng.lognormal(mu, sigma, n), low, high or 16 * mean).astype(int).tolist()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _causal_flops(lengths):
    # forward 2 matmuls x 2 FLOP x L^2/2 (causal) x D x Hq; backward 2.5x forward
    return sum(3.5 * 2 * L * L * D * HQ for L in lengths)


def _make_inputs(lengths, provider):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q = torch.randn(t, HQ, D, generator=g)
    k = torch.randn(t, HKV, D, generator=g)
    v = torch.randn(t, HKV, D, generator=g)
    if provider != "padded_sdpa":
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=DEVICE)
        leaves = [x.to(DEVICE, DTYPE).requires_grad_() for x in (q, k, v)]
        fn = varlen_attention if provider == "varlen" else varlen_attention_ref
        return leaves, lambda: fn(*leaves, cu, max(lengths))
    # right-pad each conversation to the longest: [B, H, L, D]; causal SDPA is exact for the real rows
    width, starts = max(lengths), np.cumsum([0, *lengths[:-1]])
    padded = []
    for x in (q, k, v):
        p = x.new_zeros(len(lengths), width, x.shape[1], D)
        for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            p[b, :n] = x[s : s + n]
        padded.append(p.transpose(1, 2).to(DEVICE, DTYPE).requires_grad_())
    return padded, lambda: F.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=HKV != HQ)


@pytest.mark.parametrize("provider", ["varlen", "varlen_ref", "padded_sdpa"])
def test_attention_fwd_bwd(benchmark, provider):
    lengths = lognormal_lengths(N_CONV, MEAN_TOKENS)
    leaves, forward = _make_inputs(lengths, provider)
    grad = None

    def step():
        nonlocal grad
        for x in leaves:
            x.grad = None
        out = forward()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        _sync()

    benchmark.pedantic(step, rounds=10 if CUDA else 5, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    real = sum(lengths)
    slots = real if provider != "padded_sdpa" else len(lengths) * max(lengths)
    benchmark.extra_info.update(
        provider=provider,
        backend=choose_backend(AttentionNeeds(D, DTYPE, DEVICE, gqa=HQ != HKV))
        if provider == "varlen"
        else provider,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        shape=f"n={N_CONV} mean={MEAN_TOKENS} Hq={HQ} Hkv={HKV} D={D} {str(DTYPE).removeprefix('torch.')}",
        real_tokens=real,
        computed_slots=slots,
        real_tokens_per_s=round(real / seconds),
        tflops_over_real_floor=round(_causal_flops(lengths) / seconds / 1e12, 4),
    )


def _synthetic_encoded(n):
    """The synthetic benchmark dataset encoded with the demo tokenizer (GLM-4 labels)."""
    from trainer.assets.synthetic import generate_conversations
    from trainer.data import encode_conversation, load_tokenizer

    tok = load_tokenizer("demo")
    return [encode_conversation(c["messages"], tok) for c in generate_conversations(n, seed=0)]


def test_packing_efficiency(benchmark):
    n = int(os.environ.get("BENCH_PACK_CONVERSATIONS", "2000"))
    max_tokens = 16384
    try:
        encoded, source = _synthetic_encoded(n), "trainer.assets.synthetic + demo tokenizer"
    except ImportError:
        from types import SimpleNamespace

        lengths = lognormal_lengths(n, 700, high=max_tokens)
        encoded = [SimpleNamespace(input_ids=[0] * L, labels=[-100] * L) for L in lengths]
        source = "log-normal lengths generated in the bench"
    bins = benchmark(pack, encoded, max_tokens)
    eff = packing_efficiency(encoded, bins, max_tokens)
    # the baseline: the same conversations in shuffled batches of 64, each padded to its longest
    order = np.random.default_rng(0).permutation(len(encoded))
    real = slots = 0
    for s in range(0, len(order), 64):
        batch = pad_collate([encoded[i] for i in order[s : s + 64]], pad_id=0)
        real, slots = real + batch.num_tokens, slots + batch.input_ids.numel()
    lengths = [len(e.input_ids) for e in encoded]
    benchmark.extra_info.update(
        source=source,
        conversations=n,
        mean_tokens=round(float(np.mean(lengths)), 1),
        max_tokens=max_tokens,
        rows=len(bins),
        packing_efficiency=round(eff, 5),
        padded_efficiency_batch64=round(real / slots, 5),
    )
    assert eff >= 0.97, f"packing efficiency {eff:.4f} < 0.97"
