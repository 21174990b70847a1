"""Packed Gated DeltaNet (tritrain_kernels.linear_attention) against transformers' own torch fallbacks run on
each packed sequence alone (fp32), and against the token-by-token recurrence (fp64): forward, every input
gradient, the final states, and lengths that are 1 or not multiples of the chunk size."""

import pytest
import torch

from tritrain_kernels.linear_attention import (
    chunk_gated_delta_rule_varlen,
    chunk_layout,
    gated_delta_rule_backend,
    gated_delta_rule_ref,
    short_conv_varlen,
    short_conv_varlen_ref,
)

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

LENGTHS = {
    "one": [1],
    "odd": [1, 63, 64, 65, 130, 7],
    "ones": [1, 1, 1],
    "long_and_short": [200, 3, 1, 64],
}
# fp32: the same algorithm in the same order per chunk (~1e-6); fp64 vs the token loop: rounding only.
TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lengths, dtype, heads_k=2, heads_v=4, dim_k=16, dim_v=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, total, heads_k, dim_k, generator=g, dtype=dtype)
    k = torch.randn(1, total, heads_k, dim_k, generator=g, dtype=dtype)
    v = torch.randn(1, total, heads_v, dim_v, generator=g, dtype=dtype)
    decay = -2 * torch.rand(1, total, heads_v, generator=g, dtype=dtype)
    beta = torch.rand(1, total, heads_v, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, decay, beta)]


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), inputs)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _transformers_rule(q, k, v, decay, beta):
    """transformers' torch fallback on one conversation, q/k repeated to the value heads first as its
    GatedDeltaNet forward does (transformers 5.21 repeats them in the forward; later releases inside)."""
    rep = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    return hf.torch_chunk_gated_delta_rule(q, k, v, decay, beta, use_qk_l2norm_in_kernel=True,
                                           output_final_state=True)  # fmt: skip


@pytest.mark.parametrize("name", LENGTHS)
def test_chunk_matches_transformers_per_sequence(name):
    lengths = LENGTHS[name]
    cu = _cu(lengths).tolist()
    inputs = _inputs(lengths, torch.float32)
    ours, final = chunk_gated_delta_rule_varlen(
        *inputs, cu_seqlens=_cu(lengths), use_qk_l2norm_in_kernel=True, output_final_state=True
    )
    parts = [_transformers_rule(*(x[:, a:b] for x in inputs)) for a, b in zip(cu[:-1], cu[1:], strict=True)]
    theirs = torch.cat([p[0] for p in parts], dim=1)
    assert _rel(ours, theirs) < TOL[torch.float32]
    assert _rel(final, torch.cat([p[1] for p in parts])) < TOL[torch.float32]
    for mine, ref in zip(_grads(ours, inputs), _grads(theirs, inputs), strict=True):
        assert _rel(mine, ref) < TOL[torch.float32]


@pytest.mark.parametrize("name", LENGTHS)
@pytest.mark.parametrize("chunk_size", [64, 16])
def test_chunk_matches_recurrence_fp64(name, chunk_size):
    lengths = LENGTHS[name]
    inputs = _inputs(lengths, torch.float64)
    init = torch.randn(len(lengths), 4, 16, 8, dtype=torch.float64, requires_grad=True)
    kwargs = dict(cu_seqlens=_cu(lengths), use_qk_l2norm_in_kernel=True, initial_state=init)
    ours, final = chunk_gated_delta_rule_varlen(
        *inputs, chunk_size=chunk_size, output_final_state=True, **kwargs
    )
    ref, ref_final = gated_delta_rule_ref(*inputs, **kwargs)
    assert ours.dtype == torch.float64
    assert _rel(ours, ref) < TOL[torch.float64]
    assert _rel(final, ref_final) < TOL[torch.float64]
    for mine, theirs in zip(_grads(ours, [*inputs, init]), _grads(ref, [*inputs, init]), strict=True):
        assert _rel(mine, theirs) < TOL[torch.float64]


def test_chunk_without_cu_seqlens_is_one_sequence_per_row():
    inputs = [x.detach().reshape(2, 40, *x.shape[2:]) for x in _inputs([80], torch.float64)]
    ours, _ = chunk_gated_delta_rule_varlen(*inputs)
    ref, _ = chunk_gated_delta_rule_varlen(
        *(x.reshape(1, 80, *x.shape[2:]) for x in inputs), cu_seqlens=_cu([40, 40])
    )
    assert torch.equal(ours.reshape(ref.shape), ref)


def test_boundaries_matter():
    """Run as one sequence, the second conversation differs: the reset is what the tests above check."""
    inputs = [x.detach() for x in _inputs([70, 30], torch.float64)]
    packed, _ = chunk_gated_delta_rule_varlen(*inputs, cu_seqlens=_cu([70, 30]))
    whole, _ = chunk_gated_delta_rule_varlen(*inputs, cu_seqlens=_cu([100]))
    assert _rel(packed[:, :70], whole[:, :70]) < TOL[torch.float64]
    assert _rel(packed[:, 70:], whole[:, 70:]) > 1e-2


@pytest.mark.parametrize("name", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_matches_transformers_per_sequence(name, dtype):
    lengths = LENGTHS[name]
    cu = _cu(lengths).tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, sum(lengths), generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(12, 4, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(12, generator=g, dtype=dtype, requires_grad=True)
    ours = short_conv_varlen(x, weight, bias, cu_seqlens=_cu(lengths), activation="silu")
    theirs = torch.cat(
        [
            hf.causal_conv1d_fn(x[..., a:b], weight, bias, activation="silu")
            for a, b in zip(cu[:-1], cu[1:], strict=True)
        ],
        -1,
    )
    ref = short_conv_varlen_ref(x, weight, bias, cu_seqlens=_cu(lengths), activation="silu")
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert _rel(ours, theirs) < tol and _rel(ours, ref) < tol
    for mine, their in zip(_grads(ours, [x, weight, bias]), _grads(theirs, [x, weight, bias]), strict=True):
        assert _rel(mine, their) < tol


def test_conv_taps_never_cross_a_boundary():
    """A spike at the last token of one sequence reaches no token of the next one."""
    x = torch.zeros(1, 3, 10)
    x[..., 4] = 1.0
    out = short_conv_varlen(x, torch.ones(3, 4), cu_seqlens=_cu([5, 5]))
    assert out[..., 4].eq(1).all() and out[..., 5:].eq(0).all()


def test_layout_pads_each_sequence_to_whole_chunks():
    layout = chunk_layout(_cu([1, 64, 65]), 64)
    assert layout.num_chunks == 4 and layout.first_chunk == [0, 1, 2] and layout.chunks == [1, 1, 2]
    assert layout.dest[:3].tolist() == [0, 64, 65] and layout.dest[-1].item() == 2 * 64 + 64


def test_errors_say_what_was_wrong():
    inputs = [x.detach().expand(2, *x.shape[1:]) for x in _inputs([8], torch.float32)]
    with pytest.raises(ValueError, match="has 2 rows"):
        chunk_gated_delta_rule_varlen(*inputs, cu_seqlens=_cu([8]))
    with pytest.raises(ValueError, match="only silu"):
        short_conv_varlen(torch.zeros(1, 2, 3), torch.zeros(2, 4), activation="gelu")
    assert gated_delta_rule_backend("cpu") == "torch"
    with pytest.raises(ValueError, match="needs CUDA"):
        gated_delta_rule_backend("cpu", "fla")
