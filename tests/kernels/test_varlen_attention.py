import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import varlen_attention, varlen_attention_ref

# `kernels.varlen_attention` the attribute is the function; the module is reached through importlib.
va = importlib.import_module("kernels.varlen_attention")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    monkeypatch.delenv(va.ENV_VAR, raising=False)
    saved = (va._selected, va._forced)
    yield
    va._selected, va._forced = saved


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lengths, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, hq, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(t, hkv, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(t, hkv, d, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v, _cu(lengths), max(lengths)


def _dense_block_attention(q, k, v, lengths, causal, scale=None):
    """Slow obvious version: one [T, T] score matrix in fp64, masked to same-segment (and causal) pairs."""
    t, hq, d = q.shape
    groups = hq // k.shape[1]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(t)
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    q64, k64, v64 = (x.double() for x in (q, k, v))
    k64, v64 = k64.repeat_interleave(groups, 1), v64.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * (scale if scale is not None else 1 / math.sqrt(d))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64)


def _grads(out_fn, q, k, v, seed=1):
    out = out_fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (out, *torch.autograd.grad(out, (q, k, v), g.to(out.dtype)))


LENGTHS = [[1], [17], [5, 1, 12, 7], [3, 3, 3, 3], [40, 2]]
HEADS = [(4, 4), (4, 2), (6, 1)]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dense_block_mask(lengths, hq, hkv, causal, dtype):
    q, k, v, cu, max_len = _inputs(lengths, hq, hkv, 16, dtype)
    got = _grads(lambda: varlen_attention(q, k, v, cu, max_len, causal=causal), q, k, v)
    want = _grads(lambda: _dense_block_attention(q, k, v, lengths, causal), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(
            a.double(), b.double(), atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("hq,hkv", HEADS)
def test_single_sequence_equals_causal_sdpa(hq, hkv):
    q, k, v, cu, max_len = _inputs([23], hq, hkv, 8, torch.float64, seed=3)

    def sdpa():
        rep = hq // hkv
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
            v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True,
        )  # fmt: skip
        return o.transpose(0, 1)

    for fn in (varlen_attention, varlen_attention_ref):
        got = _grads(lambda fn=fn: fn(q, k, v, cu, max_len), q, k, v)
        want = _grads(sdpa, q, k, v)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_public_equals_reference_and_scale():
    q, k, v, cu, max_len = _inputs([9, 4, 11], 4, 2, 8, torch.float32, seed=5)
    for scale in (None, 0.05):
        got = _grads(lambda s=scale: varlen_attention(q, k, v, cu, max_len, softmax_scale=s), q, k, v)
        want = _grads(lambda s=scale: varlen_attention_ref(q, k, v, cu, max_len, softmax_scale=s), q, k, v)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    dense = _dense_block_attention(q, k, v, [9, 4, 11], True, scale=0.05)
    out = varlen_attention(q, k, v, cu, max_len, softmax_scale=0.05)
    torch.testing.assert_close(out.double(), dense, atol=2e-6, rtol=2e-6)


# --- torch.nn.attention.varlen.varlen_attn signatures of torch 2.10, 2.11 and 2.12+, emulated on CPU


def _fake_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "2.10 has no GQA"
    return varlen_attention_ref(query, key, value, cu_seq_q, max_q, causal=is_causal)


def _fake_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1)):  # fmt: skip
    assert query.shape[1] == key.shape[1], "2.11 has no GQA"
    assert window_size in ((-1, -1), (-1, 0))
    return varlen_attention_ref(
        query, key, value, cu_seq_q, max_q, causal=window_size == (-1, 0), softmax_scale=scale
    )


def _fake_212(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
              num_splits=None):  # fmt: skip
    assert enable_gqa or query.shape[1] == key.shape[1]
    assert window_size in ((-1, -1), (-1, 0))
    return varlen_attention_ref(
        query, key, value, cu_seq_q, max_q, causal=window_size == (-1, 0), softmax_scale=scale
    )


@pytest.mark.parametrize("fake", [_fake_210, _fake_211, _fake_212], ids=["2.10", "2.11", "2.12"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_torch_varlen_signatures(fake, causal, scale):
    lengths = [6, 1, 9]
    q, k, v, cu, max_len = _inputs(lengths, 4, 2, 8, torch.float64, seed=7)
    got = _grads(lambda: va.torch_varlen_call(fake, q, k, v, cu, max_len, causal, scale), q, k, v)
    want = _grads(lambda: _dense_block_attention(q, k, v, lengths, causal, scale), q, k, v)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# --- backend selection


def test_auto_on_cpu_machine_is_reference_or_gpu_backend():
    chosen = va.select_backend("auto")
    if not torch.cuda.is_available():
        assert chosen == "reference"
    assert va.current_backend() == chosen


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(va.ENV_VAR, "reference")
    assert va.select_backend() == "reference"
    assert va._forced


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_cute", "torch_varlen"])
def test_forced_unavailable_backend_is_a_clear_error(name):
    if va._unavailable_reason(name) is None:
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=f"{name}' was requested but"):
        va.select_backend(name)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        va.select_backend("flash3")
    monkeypatch.setenv(va.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="TRITRAIN_ATTN_BACKEND"):
        va.select_backend()


def test_auto_gpu_backend_on_cpu_tensors_falls_back_to_reference():
    va._selected, va._forced = "torch_varlen", False
    q, k, v, cu, max_len = _inputs([5, 3], 2, 2, 8, torch.float64)
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, max_len), varlen_attention_ref(q, k, v, cu, max_len)
    )
    va._forced = True
    with pytest.raises(RuntimeError, match="needs fp16/bf16 CUDA tensors"):
        varlen_attention(q, k, v, cu, max_len)


def test_bad_arguments_are_clear_errors():
    q, k, v, cu, max_len = _inputs([5, 3], 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, k, v, cu.long(), max_len)
    with pytest.raises(ValueError, match="Python int"):
        varlen_attention(q, k, v, cu, torch.tensor(5))
    with pytest.raises(ValueError, match="not a multiple"):
        varlen_attention(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, max_len)
    with pytest.raises(ValueError, match="cu_seqlens covers 7 tokens but q has 8"):
        varlen_attention_ref(q, k, v, _cu([5, 2]), max_len)


# --- GPU backends (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "flash_attn_cute", "torch_varlen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (32, 8, 128)])
def test_gpu_backend_matches_reference(backend, dtype, hq, hkv, d):
    if va._unavailable_reason(backend) is not None:
        pytest.skip(f"{backend}: {va._unavailable_reason(backend)}")
    va.select_backend(backend)
    lengths = [300, 1, 77, 512, 129]
    q, k, v, cu, max_len = _inputs(lengths, hq, hkv, d, torch.float32, seed=11)
    q, k, v = (x.detach().to("cuda", dtype).requires_grad_() for x in (q, k, v))
    cu = cu.cuda()
    got = _grads(lambda: varlen_attention(q, k, v, cu, max_len), q, k, v)
    want = _grads(lambda: varlen_attention_ref(q, k, v, cu, max_len), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(
            a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}"
        )
