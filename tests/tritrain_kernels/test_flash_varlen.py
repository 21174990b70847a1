"""The Triton varlen flash-attention against its plain-torch reference (fp64 gold) under the interpreter."""

import contextlib
import itertools
from types import SimpleNamespace

import pytest
import torch

from tritrain_kernels import flash_varlen
from tritrain_kernels.flash_varlen import flash_varlen_attention, flash_varlen_attention_ref
from tritrain_kernels.varlen_attention import varlen_attention_ref

# max |kernel - gold| / max(max |gold|, 0.1), per input dtype (gold: the reference in fp64 on the same inputs)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lengths, hq, hkv, d, dtype, sinks, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    s = torch.randn(hq, generator=g).to(device) if sinks else None
    return q, k, v, s


def _run(fn, q, k, v, s, lengths, dtype, opts, seed=1):
    """(out, dq, dk, dv[, dsinks]) of fn on fresh leaves of the given dtype."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    if s is not None:
        sink_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        leaves.append(s.detach().to(sink_dtype).requires_grad_())
    cu = _cu(lengths).to(q.device)
    out = fn(*leaves[:3], cu, max(lengths), sinks=leaves[3] if s is not None else None, **opts)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, leaves, grad))


def _compare(lengths, hq, hkv, d, dtype, *, sinks=False, device="cpu", **opts):
    q, k, v, s = _inputs(lengths, hq, hkv, d, dtype, sinks, device=device)
    got = _run(flash_varlen_attention, q, k, v, s, lengths, dtype, opts)
    gold = _run(flash_varlen_attention_ref, q, k, v, s, lengths, torch.float64, opts)
    names = ["out", "dq", "dk", "dv", "dsinks"]
    for name, a, b in zip(names, got, gold, strict=False):
        assert a.dtype == (torch.float32 if name == "dsinks" else dtype), name
        err = (a.double() - b).abs().max().item() / b.abs().max().clamp_min(0.1).item()  # dq = 0 at W = 1
        assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


# lengths, (Hq, Hkv), D, options: each case crosses block edges of the interpreter's 16/32 blocks
CASES = [
    ([1, 19, 40], (2, 2), 64, {}),
    ([5, 1, 33], (4, 2), 80, {"window": 8, "softcap": 5.0, "sinks": True}),
    ([3, 3, 2, 3, 1, 3, 3, 2, 3], (4, 1), 64, {"window": 2, "sinks": True}),
    ([45], (2, 1), 96, {"window": 100, "softcap": 2.0}),
    ([36, 7], (2, 2), 64, {"window": 1}),
    ([17, 20], (2, 1), 64, {"causal": False, "softmax_scale": 0.3, "sinks": True}),
]


@pytest.mark.parametrize(("lengths", "heads", "d", "opts"), CASES)
def test_matches_reference_fp32(lengths, heads, d, opts):
    _compare(lengths, *heads, d, torch.float32, **opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype):
    _compare([7, 30, 2], 4, 2, 64, dtype, window=9, softcap=4.0, sinks=True)


def test_reference_matches_plain_causal_reference():
    q, k, v, _ = _inputs([4, 1, 9], 4, 2, 16, torch.float64, False)
    got = flash_varlen_attention_ref(q, k, v, _cu([4, 1, 9]), 9)
    torch.testing.assert_close(got, varlen_attention_ref(q, k, v, _cu([4, 1, 9]), 9), rtol=1e-12, atol=1e-12)


def test_reference_sink_gradient_is_the_design_formula():
    # DESIGN.md: dL/db_h = -sum_i exp(b_h - L_i) D_i with D_i = dO_i . O_i
    lengths, (q, k, v, s) = [6, 3], _inputs([6, 3], 2, 1, 16, torch.float64, True)
    s = s.double().requires_grad_()
    out = flash_varlen_attention_ref(q, k, v, _cu(lengths), 6, sinks=s, window=4)
    dout = torch.randn_like(out)
    (dsink,) = torch.autograd.grad(out, s, dout)
    scores = []  # L_i recomputed by hand
    for a, b in [(0, 6), (6, 9)]:
        x = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b].expand(-1, 2, -1)) / 16**0.5
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        x = x.masked_fill(~((j <= i) & (j > i - 4)), float("-inf"))
        scores.append(torch.logaddexp(x.logsumexp(-1), s.detach()[:, None]))
    lse = torch.cat(scores, 1)  # [H, T]
    delta = (dout * out).sum(-1).T
    torch.testing.assert_close(dsink, -(torch.exp(s.detach()[:, None] - lse) * delta).sum(1))


def test_backward_is_bit_identical_twice():
    q, k, v, s = _inputs([20, 9], 4, 2, 64, torch.float32, True)
    opts = {"window": 12, "softcap": 3.0, "deterministic": True}
    first = _run(flash_varlen_attention, q, k, v, s, [20, 9], torch.float32, opts)
    second = _run(flash_varlen_attention, q, k, v, s, [20, 9], torch.float32, opts)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_launch_does_not_synchronise(monkeypatch):
    q, k, v, s = _inputs([3, 17], 2, 1, 32, torch.float32, True)
    leaves = [x.requires_grad_() for x in (q, k, v, s)]
    cu = _cu([3, 17])

    def no_sync(*args, **kwargs):
        raise AssertionError("host synchronisation during the attention call")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    out = flash_varlen_attention(*leaves[:3], cu, 17, sinks=leaves[3])
    out.sum().backward()
    with pytest.raises(AssertionError, match="host synchronisation"):  # the patch does catch a sync
        flash_varlen_attention_ref(*leaves[:3], cu, 17)
    monkeypatch.undo()
    assert all(x.grad is not None for x in leaves)


@pytest.mark.parametrize("window", [2**31 - 2, 2**31 - 1])
def test_window_near_int32_max_is_no_window(window):
    # The kernels add the window to int32 block starts (n0 + BLOCK_N - 1 + W); unclamped, such a window
    # wrapped to a negative bound and dk, dv came out zero (issue 25, item 5).
    _compare([5, 40], 2, 1, 32, torch.float32, sinks=True, window=window)


def test_every_launch_is_inside_a_device_guard_of_q(monkeypatch):
    # Each kernel must launch on q's GPU, not the current one: inside _device_guard(q) (issue 25, item 3).
    # On CPU the guard is a no-op, so it is replaced by one that records the tensor it guards.
    guarded, launches = [], []

    @contextlib.contextmanager
    def guard(t):
        guarded.append(t)
        try:
            yield
        finally:
            guarded.pop()

    class Recording:
        def __init__(self, name):
            self.name, self.real = name, getattr(flash_varlen, name)

        def __getitem__(self, grid):
            def launch(q, *args, **kwargs):
                launches.append((self.name, bool(guarded) and guarded[-1] is q))
                return self.real[grid](q, *args, **kwargs)

            return launch

    monkeypatch.setattr(flash_varlen, "_device_guard", guard)
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        monkeypatch.setattr(flash_varlen, name, Recording(name))
    q, k, v, s = _inputs([3, 17], 2, 1, 32, torch.float32, True)
    _run(flash_varlen_attention, q, k, v, s, [3, 17], torch.float32, {"window": 5})
    assert launches == [("_fwd_kernel", True), ("_bwd_dq_kernel", True), ("_bwd_dkdv_kernel", True)]


def test_device_guard_selects_the_tensors_gpu():
    # what the launchers enter on a GPU: torch.cuda.device(cuda:1) for a tensor on cuda:1 (built, not entered)
    on_gpu1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert flash_varlen._device_guard(on_gpu1).idx == 1
    assert isinstance(flash_varlen._device_guard(torch.zeros(1)), contextlib.nullcontext)


CU = _cu([3, 17])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window must be a positive int"),
        ({"window": 4, "causal": False}, "with causal=True"),
        ({"softcap": -1.0}, "softcap must be a positive"),
        ({"sinks": torch.zeros(3)}, r"sinks must be a float tensor \[2\]"),
        ({"max_seqlen": torch.tensor(17)}, "max_seqlen must be a positive Python int"),
        ({"cu_seqlens": CU.long()}, "cu_seqlens must be 1-D int32"),
        ({"k": torch.zeros(20, 3, 32)}, "not a multiple of k's 3"),
        ({"q": torch.zeros(20, 2, 40), "k": torch.zeros(20, 1, 40)}, "head dim 40"),
        ({"q": torch.zeros(20, 2, 32, dtype=torch.float64)}, "must share one dtype"),
        (  # views, no memory: the backward's int32 Lse offsets need Hq x T < 2^31
            {"q": torch.zeros(1, 1, 32).expand(2**26, 32, 32), "k": torch.zeros(1, 32).expand(2**26, 1, 32)},
            "query heads x tokens",
        ),
    ],
)
def test_bad_inputs_are_refused(kwargs, match):
    args = {"q": torch.zeros(20, 2, 32), "k": torch.zeros(20, 1, 32), "v": torch.zeros(20, 1, 32)}
    args.update({"cu_seqlens": CU, "max_seqlen": 17} | kwargs)
    if "k" in kwargs and "v" not in kwargs:
        args["v"] = args["k"]
    q, k, v, cu, m = (args.pop(n) for n in ("q", "k", "v", "cu_seqlens", "max_seqlen"))
    with pytest.raises(ValueError, match=match):
        flash_varlen_attention(q, k, v, cu, m, **args)


def test_compile_specs_cover_the_launcher_choices():
    specs = flash_varlen.compile_specs()
    keys = [(s["name"], s.get("targets")) for s in specs]
    assert len(keys) == len(set(keys))
    for spec in specs:
        assert set(spec) - {"targets"} == {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}
        assert list(spec["signature"]) == spec["fn"].arg_names
        assert all(spec["signature"][n] == "constexpr" for n in spec["constexprs"])
    # every (kernel, padded head dim, exactness, softcap, dtype) the launcher can reach on each GPU is
    # listed for that GPU, with the blocks, warps and stages the launcher picks there
    dims = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256)
    for d, softcap, dtype, (arch, target) in itertools.product(
        dims, (False, True), ("bf16", "fp16"), ((8, 80), (9, 90), (10, 100))
    ):
        block_d = flash_varlen._block_d(d)
        suffix = ("" if block_d == d else "pad") + ("_softcap" if softcap else "")
        for kernel in ("fwd", "dq", "dkdv"):
            name = f"{kernel}_{dtype}_d{block_d}{suffix}"
            launched = flash_varlen._gpu_config(kernel, block_d, arch)
            listed = [
                (s["constexprs"]["BLOCK_M"], s["constexprs"]["BLOCK_N"], s["num_warps"], s["num_stages"])
                for s in specs
                if s["name"] == name and target in s.get("targets", (target,))
            ]
            assert listed == [launched], (name, target, listed, launched)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lengths", "heads", "d", "dtype"),
    list(
        itertools.product(
            [[1], [16, 32, 15], [2] * 12, [70, 1, 9]],
            [(1, 1), (3, 1), (4, 2)],
            [64, 80, 96, 128],
            [torch.float32],
        )
    )
    + [([33, 4], (4, 2), 64, torch.bfloat16), ([33, 4], (4, 2), 256, torch.float16)],
)
@pytest.mark.parametrize(
    "opts", [{}, {"window": 5, "softcap": 2.0, "sinks": True}, {"window": 50, "sinks": True}]
)
def test_sweep(lengths, heads, d, dtype, opts):
    _compare(lengths, *heads, d, dtype, **opts)


GPU_LENGTHS = [1, 700, 33, 2048, 129, 1, 900, 64, 3000, 17]  # mixed, none a multiple of the GPU blocks


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 128, 192, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [{}, {"window": 257, "softcap": 30.0, "sinks": True}])
def test_gpu_matches_reference(d, dtype, opts):
    _compare(GPU_LENGTHS, 8, 2, d, dtype, device="cuda", **opts)


@pytest.mark.gpu
def test_gpu_backward_is_bit_identical_twice():
    q, k, v, s = _inputs(GPU_LENGTHS, 8, 2, 128, torch.bfloat16, True, device="cuda")
    opts = {"window": 1000, "deterministic": True}
    first = _run(flash_varlen_attention, q, k, v, s, GPU_LENGTHS, torch.bfloat16, opts)
    second = _run(flash_varlen_attention, q, k, v, s, GPU_LENGTHS, torch.bfloat16, opts)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
