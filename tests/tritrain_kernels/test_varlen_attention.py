import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from tritrain_kernels import varlen_attention, varlen_attention_ref

# `tritrain_kernels.varlen_attention` the attribute is the function; the module is reached through importlib.
va = importlib.import_module("tritrain_kernels.varlen_attention")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    monkeypatch.delenv(va.ENV_VAR, raising=False)
    saved = (va._selected, dict(va._choices), dict(va._unavailable_cache))
    yield
    va._selected = saved[0]
    for cache, old in zip((va._choices, va._unavailable_cache), saved[1:], strict=True):
        cache.clear()
        cache.update(old)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lengths, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, hq, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(t, hkv, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(t, hkv, d, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v, _cu(lengths), max(lengths)


def _dense_block_attention(q, k, v, lengths, causal, scale=None, window=None, softcap=None, sinks=None):
    """Slow obvious version: one [T, T] score matrix in fp64, masked to same-segment (and causal, and
    within-window) pairs; softcap on the scores; sinks as an extra term of every row's softmax sum."""
    t, hq, d = q.shape
    groups = hq // k.shape[1]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(t)
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]).abs() < window
    q64, k64, v64 = (x.double() for x in (q, k, v))
    k64, v64 = k64.repeat_interleave(groups, 1), v64.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * (scale if scale is not None else 1 / math.sqrt(d))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    exp = (scores - top).exp()
    denominator = exp.sum(-1, keepdim=True)
    if sinks is not None:
        denominator = denominator + (sinks.double()[:, None, None] - top).exp()
    return torch.einsum("hqk,khd->qhd", exp / denominator, v64)


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


def _fake_212_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):  # fmt: skip
    """2.12's documented (W, 0): a causal window of W keys to the left of the query, plus its own."""
    left, right = window_size
    assert right == 0 and left >= 0
    return varlen_attention_ref(query, key, value, cu_seq_q, max_q, window=left + 1, softmax_scale=scale)


def test_torch_varlen_window():
    lengths = [6, 1, 9]
    q, k, v, cu, max_len = _inputs(lengths, 4, 2, 8, torch.float64, seed=8)
    got = _grads(lambda: va.torch_varlen_call(_fake_212_window, q, k, v, cu, max_len, True, None, 3), q, k, v)
    want = _grads(lambda: _dense_block_attention(q, k, v, lengths, True, window=3), q, k, v)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# --- window, softcap and sinks on the reference


FEATURES = [
    dict(window=1),
    dict(window=4),
    dict(window=100),  # longer than every segment: the same as no window
    dict(softcap=0.7),
    dict(sinks=True),
    dict(window=5, softcap=2.0, sinks=True),
]


@pytest.mark.parametrize("opts", FEATURES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("causal", [True, False])
def test_reference_features_match_dense(opts, causal):
    lengths = [9, 1, 14, 3]
    q, k, v, cu, max_len = _inputs(lengths, 4, 2, 8, torch.float64, seed=13)
    opts = dict(opts)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True) if opts.pop("sinks", False) else None
    inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def grads(fn):
        out = fn(q, k, v, cu, max_len, causal=causal, sinks=sinks, **opts)
        return (out, *torch.autograd.grad(out, inputs, g))

    got = grads(varlen_attention_ref)
    want = grads(lambda q, k, v, cu, m, **kw: _dense_block_attention(q, k, v, lengths, **kw))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("opts", [dict(window=3), dict(softcap=0.3), dict(sinks=True)], ids=str)
def test_each_feature_changes_the_result(opts):
    """The comparison above can fail: leaving a feature out gives a different answer."""
    q, k, v, cu, max_len = _inputs([12, 7], 2, 2, 8, torch.float64, seed=4)
    sinks = torch.full((2,), 1.5, dtype=torch.float64) if opts.pop("sinks", False) else None
    with_it = varlen_attention_ref(q, k, v, cu, max_len, sinks=sinks, **opts)
    without = varlen_attention_ref(q, k, v, cu, max_len)
    assert (with_it - without).abs().max() > 1e-2


# --- backend selection


def test_auto_on_cpu_tensors_is_reference():
    assert va.select_backend("auto") == "auto"
    q, k, v, cu, max_len = _inputs([5, 3], 4, 2, 8, torch.float32)
    needs = va.needs_of(q, k, window=2, softcap=1.0, sinks=torch.zeros(4))
    assert va.choose_backend(needs) == "reference"
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, max_len, window=2), varlen_attention_ref(q, k, v, cu, max_len, window=2)
    )


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(va.ENV_VAR, "reference")
    assert va.select_backend() == "reference"
    assert va.current_backend() == "reference"


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_cute", "torch_varlen"])
def test_forced_unavailable_backend_is_a_clear_error(name):
    if va._unavailable_reason(name) is None:
        pytest.skip(f"{name} is available here")
    with pytest.raises(ValueError, match=f"{name}' was requested but"):
        va.select_backend(name)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        va.select_backend("flash3")
    monkeypatch.setenv(va.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="TRITRAIN_ATTN_BACKEND"):
        va.select_backend()


def test_forced_gpu_backend_on_cpu_tensors_is_a_clear_error():
    va._unavailable_cache["torch_varlen"] = None  # pretend it is installed with a GPU
    va.select_backend("torch_varlen")
    q, k, v, cu, max_len = _inputs([5, 3], 2, 2, 8, torch.float64)
    with pytest.raises(ValueError, match="cannot run this layer .*needs fp16/bf16 CUDA tensors"):
        varlen_attention(q, k, v, cu, max_len)


def _fake_gpu(monkeypatch, installed, *, capability=(9, 0), torch_gqa=False, fa2_softcap=True):
    """Every backend in ``installed`` importable, on a CUDA device of ``capability``; signatures faked."""
    for name in ("flash_attn", "flash_attn_cute", "torch_varlen", "triton"):
        va._unavailable_cache[name] = None if name in installed else "it cannot be imported (test)"
    params = {
        "flash_attn": {"window_size": 1, **({"softcap": 1} if fa2_softcap else {})},
        "flash_attn_cute": {"window_size": 1},
        "torch_varlen": {"window_size": 1, **({"enable_gqa": 1} if torch_gqa else {})},
    }
    monkeypatch.setattr(va, "_params", lambda name: params[name])
    monkeypatch.setattr(va, "_capability", lambda needs: capability)


def _cuda_needs(**kw):
    return va.AttentionNeeds(**{"head_dim": 128, "dtype": torch.bfloat16, "device": "cuda", **kw})


@pytest.mark.parametrize(
    "installed, needs, expected",
    [
        (BACKENDS := ("flash_attn", "flash_attn_cute", "torch_varlen", "triton"), {}, "flash_attn"),
        (BACKENDS, dict(window=4096, softcap=50.0), "flash_attn"),
        (BACKENDS, dict(sinks=True, window=128), "triton"),  # no installed flash backend has sinks
        (("flash_attn_cute", "torch_varlen", "triton"), dict(window=512), "flash_attn_cute"),
        (("flash_attn_cute", "torch_varlen", "triton"), dict(head_dim=256), "torch_varlen"),
        (("flash_attn_cute", "torch_varlen", "triton"), dict(softcap=30.0), "triton"),
        # torch < 2.12 has no enable_gqa: GQA would copy k and v per layer, so the Triton kernel runs it
        (("torch_varlen", "triton"), dict(gqa=True), "triton"),
        (("torch_varlen",), dict(gqa=True), "reference"),
        (("torch_varlen", "triton"), dict(), "torch_varlen"),
        ((), dict(window=8, sinks=True), "reference"),
        (("triton",), dict(dtype=torch.float32), "reference"),  # the kernel is compiled for bf16/fp16
    ],
)
def test_auto_picks_the_first_backend_supporting_the_layer(monkeypatch, installed, needs, expected):
    _fake_gpu(monkeypatch, installed)
    va.select_backend("auto")
    assert va.choose_backend(_cuda_needs(**needs)) == expected


def test_auto_avoids_old_gpu_and_old_flash_attn(monkeypatch):
    _fake_gpu(monkeypatch, ("flash_attn", "flash_attn_cute", "triton"), capability=(8, 0), fa2_softcap=False)
    va.select_backend("auto")
    assert va.choose_backend(_cuda_needs()) == "flash_attn"
    assert va.choose_backend(_cuda_needs(softcap=30.0)) == "triton"  # flash-attn < 2.6, FA4 needs sm90


def test_torch_varlen_with_gqa_support_is_used_for_gqa(monkeypatch):
    _fake_gpu(monkeypatch, ("torch_varlen", "triton"), torch_gqa=True)
    va.select_backend("auto")
    assert va.choose_backend(_cuda_needs(gqa=True, window=64)) == "torch_varlen"


@pytest.mark.parametrize(
    "forced, needs, missing",
    [
        ("flash_attn", dict(sinks=True), "sinks"),
        ("flash_attn_cute", dict(softcap=30.0), "softcap"),
        ("flash_attn_cute", dict(head_dim=80), "head dim 80"),
        ("torch_varlen", dict(softcap=30.0, sinks=True), "softcap, sinks"),
        ("triton", dict(head_dim=72), "head dim 72"),
    ],
)
def test_forced_backend_without_a_feature_is_a_clear_error(monkeypatch, forced, needs, missing):
    _fake_gpu(monkeypatch, (forced,))
    va.select_backend(forced)
    with pytest.raises(ValueError, match=f"{forced}' cannot run this layer .*does not support {missing}"):
        va.choose_backend(_cuda_needs(**needs))


def test_choice_is_made_once_per_kind_of_layer(monkeypatch):
    va.select_backend("auto")
    calls = []
    real = va.why_not
    monkeypatch.setattr(va, "why_not", lambda name, needs: calls.append(name) or real(name, needs))
    q, k, v, cu, max_len = _inputs([4, 4], 2, 2, 8, torch.float32)
    for _ in range(3):
        varlen_attention(q, k, v, cu, max_len, window=2)
    assert calls == ["reference"]


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
    with pytest.raises(ValueError, match="window must be a positive int"):
        varlen_attention(q, k, v, cu, max_len, window=0)
    with pytest.raises(ValueError, match=r"sinks must be \[Hq\] = \[4\]"):
        varlen_attention(q, k, v, cu, max_len, sinks=torch.zeros(2))


# --- the project's Triton kernel through the dispatcher (Triton's interpreter on CPU)


def test_forced_triton_matches_reference_with_every_feature():
    if va._unavailable_reason("triton") is not None:
        pytest.skip(f"triton: {va._unavailable_reason('triton')}")
    va.select_backend("triton")
    lengths = [1, 19, 6]
    q, k, v, cu, max_len = _inputs(lengths, 4, 2, 16, torch.float32, seed=21)
    sinks = torch.randn(4, requires_grad=True)
    opts = dict(window=5, softcap=3.0, sinks=sinks)
    got = _grads(lambda: varlen_attention(q, k, v, cu, max_len, **opts), q, k, v)
    want = _grads(lambda: varlen_attention_ref(q, k, v, cu, max_len, **opts), q, k, v)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


# --- GPU backends (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "flash_attn_cute", "torch_varlen", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (32, 8, 128)])
@pytest.mark.parametrize("opts", [{}, dict(window=100), dict(softcap=20.0)], ids=str)
def test_gpu_backend_matches_reference(backend, dtype, hq, hkv, d, opts):
    if va._unavailable_reason(backend) is not None:
        pytest.skip(f"{backend}: {va._unavailable_reason(backend)}")
    lengths = [300, 1, 77, 512, 129]
    q, k, v, cu, max_len = _inputs(lengths, hq, hkv, d, torch.float32, seed=11)
    q, k, v = (x.detach().to("cuda", dtype).requires_grad_() for x in (q, k, v))
    cu = cu.cuda()
    if (reason := va.why_not(backend, va.needs_of(q, k, **opts))) is not None:
        pytest.skip(f"{backend}: {reason}")
    va.select_backend(backend)
    got = _grads(lambda: varlen_attention(q, k, v, cu, max_len, **opts), q, k, v)
    want = _grads(lambda: varlen_attention_ref(q, k, v, cu, max_len, **opts), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(
            a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}"
        )
