"""Packed (varlen) attention, forward + backward: the project's Triton kernel against every installed backend.

    python -m pytest bench/bench_varlen_attention.py --benchmark-only

GPU: rows of 8k, 16k and 64k tokens packed with conversations of log-normal lengths (mean 700, sigma 0.8,
long right tail, as in chat SFT data), Hq=32, Hkv=8, D=128, bf16. Providers, in one run: ``triton``
(tritrain_kernels.flash_varlen), each installed backend of tritrain_kernels.varlen_attention (``flash_attn``,
``flash_attn_cute``, ``torch_varlen``, ``reference``) and ``padded_sdpa`` (the row's conversations
right-padded to the longest, causal SDPA; the pad_collate baseline). ``extra_info`` holds real tokens/s and
TFLOP/s over the real-token causal FLOP floor. Without a GPU the timed cases skip and
``test_triton_matches_reference`` checks the Triton kernel at a tiny size under the interpreter.

``test_packing_efficiency`` packs the synthetic dataset (trainer.assets.synthetic, encoded with the demo
tokenizer) at max_tokens=16384 and records real tokens / slots for packing and for padded batches of 64.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:  # the Triton kernel runs through the interpreter; set before kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchutil import git_commit  # noqa: E402
from trainer.packing import pack, packing_efficiency, pad_collate  # noqa: E402
from tritrain_kernels.flash_varlen import flash_varlen_attention, flash_varlen_attention_ref  # noqa: E402

va = importlib.import_module("tritrain_kernels.varlen_attention")  # the backends, by name
DEVICE = "cuda" if CUDA else "cpu"
HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
ROW_TOKENS = (8192, 16384, 65536)
PROVIDERS = (*va.BACKENDS, "padded_sdpa")  # "triton" is the project's kernel


def lognormal_lengths(n, mean, *, sigma=0.8, seed=0, low=16, high=None):
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma**2 / 2  # E[lognormal] = exp(mu + sigma^2 / 2)
    return np.clip(rng.lognormal(mu, sigma, n), low, high or 16 * mean).astype(int).tolist()


def row_lengths(row_tokens, mean=700, seed=0):
    """Conversation lengths filling one packed row of exactly row_tokens tokens (the last one cut)."""
    lengths = lognormal_lengths(4 * row_tokens // mean + 16, mean, seed=seed, high=row_tokens)
    cum = np.cumsum(lengths)
    n = int(np.searchsorted(cum, row_tokens))
    return [*lengths[:n], row_tokens - int(cum[n - 1] if n else 0)]


def _causal_flops(lengths):
    # forward 2 matmuls x 2 FLOP x L^2/2 (causal) x D x Hq; backward 2.5x forward
    return sum(3.5 * 2 * L * L * D * HQ for L in lengths)


def _packed_fn(provider):
    if provider == "triton":
        return lambda q, k, v, cu, m: flash_varlen_attention(q, k, v, cu, m)
    reason = va._unavailable_reason(provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    # causal, default scale, no window, softcap or sinks
    return lambda q, k, v, cu, m: va._IMPLS[provider](q, k, v, cu, m, True, None, None, None, None)


def _make_inputs(lengths, provider):
    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, D, generator=g) for h in (HQ, HKV, HKV))
    if provider != "padded_sdpa":
        fn = _packed_fn(provider)
        cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=DEVICE)
        leaves = [x.to(DEVICE, DTYPE).requires_grad_() for x in (q, k, v)]
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


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="times GPU kernels; on CPU only test_triton_matches_reference runs")
@pytest.mark.parametrize("row_tokens", ROW_TOKENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_fwd_bwd(benchmark, provider, row_tokens):
    if provider == "reference" and row_tokens > 16384:
        pytest.skip("the per-conversation reference is only timed on the smaller rows")
    lengths = row_lengths(row_tokens)
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
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    seconds = benchmark.stats.stats.mean
    real = sum(lengths)
    slots = real if provider != "padded_sdpa" else len(lengths) * max(lengths)
    benchmark.extra_info.update(
        provider=provider,
        device=torch.cuda.get_device_name(),
        commit=git_commit(),
        shape=f"row={row_tokens} n={len(lengths)} max={max(lengths)} Hq={HQ} Hkv={HKV} D={D} bf16",
        real_tokens=real,
        computed_slots=slots,
        real_tokens_per_s=round(real / seconds),
        tflops_over_real_floor=round(_causal_flops(lengths) / seconds / 1e12, 4),
    )


def test_triton_matches_reference():
    """Smoke check on any device: the Triton kernel and its reference agree, forward and backward."""
    lengths, hq, hkv, d = ([5, 40, 1, 19], 4, 2, 64) if not CUDA else (row_lengths(8192), HQ, HKV, D)
    dtype = torch.float32 if not CUDA else DTYPE
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=DEVICE)
    base = [torch.randn(sum(lengths), h, d, generator=g).to(DEVICE, dtype) for h in (hq, hkv, hkv)]
    results = []
    for fn in (flash_varlen_attention, flash_varlen_attention_ref):
        leaves = [x.clone().requires_grad_() for x in base]
        out = fn(*leaves, cu, max(lengths), window=33, softcap=20.0)
        out.backward(torch.ones_like(out))
        results.append([out.float(), *(x.grad.float() for x in leaves)])
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(0.1)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


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
