"""masked_linear_cross_entropy against the float64 reference, on both implementations."""

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tritrain_kernels.masked_ce as mc
from tests.synccount import count_syncs
from tritrain_kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_ref
from tritrain_kernels.masked_ce import _masked_lce

# The Triton implementation runs on CPU under TRITON_INTERPRET=1 (set in conftest) or on CUDA.
IMPLS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Max error relative to the reference's largest magnitude. fp32 computes everything in fp32;
# bf16 rounds dlogits and dh to bf16 (2^-8 relative) but keeps logits, LSE and loss in fp32.
# A wrong softmax, a missing one-hot or a wrong smoothing term gives errors of order 1e-1..1.
TOL = {
    torch.float32: {"loss": 2e-6, "grad": 2e-5},
    torch.bfloat16: {"loss": 2e-5, "grad": 1.6e-2},
}

SHAPES = [  # N, H, V
    (1, 16, 97),  # a single row
    (37, 19, 203),  # odd H, V not a multiple of any block
    (64, 32, 4099),  # V just above one 4096-wide block: the online softmax spans two blocks
]
FRACTIONS = [0.0, 0.5, 0.9, 1.0]


def _labels(N, V, frac, gen):
    y = torch.randint(0, V, (N,), generator=gen)
    if frac >= 1.0:
        y[:] = -100
    elif frac > 0:
        masked = torch.rand(N, generator=gen) < frac
        if N > 1 and masked.all():
            masked[0] = False
        y[masked] = -100
    return y


def _inputs(N, H, V, frac, dtype, *, seed=0, bias=False, trainable=False, lead=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (N,) if lead is None else lead
    h = torch.randn(*shape, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * (2.0 / H**0.5)  # logits of order a few units
    b = torch.randn(V, generator=gen) if bias else None
    y = _labels(int(torch.tensor(shape).prod()), V, frac, gen).reshape(shape)
    h = h.to(dtype).to(DEVICE).requires_grad_()
    w = w.to(dtype).to(DEVICE).requires_grad_(trainable)
    if b is not None:
        b = b.to(dtype).to(DEVICE).requires_grad_(trainable)
    return h, w, b, y.to(DEVICE)


def _check(h, w, b, y, *, impl, reduction, dtype, scratch_bytes=None, **opts):
    out = _masked_lce(h, w, y, bias=b, reduction=reduction, impl=impl, scratch_bytes=scratch_bytes, **opts)
    assert out.dtype == torch.float32
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=gen).to(out.device) if reduction == "none" else torch.tensor(1.7)
    named = [(n, t) for n, t in zip(["hidden", "weight", "bias"], (h, w, b), strict=True) if t is not None]
    names = [n for n, t in named if t.requires_grad]
    params = [t for n, t in named if t.requires_grad]
    grads = torch.autograd.grad(out, params, g_out.to(out.device))

    hd = h.detach().double().cpu().requires_grad_()
    wd = w.detach().double().cpu().requires_grad_(w.requires_grad)
    bd = None if b is None else b.detach().double().cpu().requires_grad_(b.requires_grad)
    ref = masked_linear_cross_entropy_ref(hd, wd, y.cpu(), bias=bd, reduction=reduction, **opts)
    ref_params = [t for t in (hd, wd, bd) if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_params, g_out.double().cpu())

    tol = TOL[dtype]
    scale = max(ref.abs().max().item(), 1.0)
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= tol["loss"] * scale, f"loss error {err:.3g} (reference {ref.abs().max().item():.4g})"
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert got.shape == want.shape and got.dtype == dtype
        gscale = want.abs().max().item()
        gerr = (got.double().cpu() - want).abs().max().item()
        if gscale == 0:
            assert gerr == 0, f"grad {name} should be exactly 0, max |got| {gerr:.3g}"
        else:
            assert gerr <= tol["grad"] * gscale, f"grad {name} error {gerr:.3g} vs max {gscale:.3g}"
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("frac", FRACTIONS, ids=lambda f: f"masked{f}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
def test_matches_reference_frozen_head(impl, dtype, reduction, frac, shape):
    N, H, V = shape
    h, w, b, y = _inputs(N, H, V, frac, dtype)
    out = _check(h, w, b, y, impl=impl, reduction=reduction, dtype=dtype)
    if frac == 1.0 and reduction != "none":
        assert out.item() == 0.0  # not NaN


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opts",
    [
        {"bias": True},
        {"softcap": 3.0},
        {"label_smoothing": 0.1},
        {"bias": True, "softcap": 30.0, "label_smoothing": 0.2},
    ],
    ids=["bias", "softcap", "smoothing", "all"],
)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_options_and_trainable_head(impl, dtype, reduction, opts, trainable):
    opts = dict(opts)
    bias = opts.pop("bias", False)
    # Several chunks: the scratch budget holds 8 rows of V=203.
    h, w, b, y = _inputs(45, 19, 203, 0.5, dtype, seed=3, bias=bias, trainable=trainable)
    _check(h, w, b, y, impl=impl, reduction=reduction, dtype=dtype, scratch_bytes=8 * 203 * 8, **opts)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_mean_is_zero_with_zero_grads(impl):
    h, w, b, y = _inputs(9, 16, 50, 1.0, torch.float32, bias=True, trainable=True)
    out = _masked_lce(h, w, y, bias=b, impl=impl)
    out.backward()
    assert out.item() == 0.0
    for t in (h, w, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_ignore_index(impl):
    # [B, T, H] hidden with [B, T] labels, and a custom ignore_index.
    h, w, _, y = _inputs(0, 24, 131, 0.6, torch.float32, lead=(3, 7))
    y = torch.where(y == -100, torch.full_like(y, -1), y)
    out = _masked_lce(h, w, y, ignore_index=-1, reduction="none", impl=impl)
    assert out.shape == (3, 7)
    ref = masked_linear_cross_entropy_ref(h.double(), w.double(), y, ignore_index=-1, reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert (out[y == -1] == 0).all()


def test_public_function_matches_reference():
    h, w, b, y = _inputs(33, 20, 150, 0.7, torch.float32, bias=True, trainable=True)
    out = masked_linear_cross_entropy(h, w, y, bias=b, softcap=10.0, label_smoothing=0.05)
    ref = masked_linear_cross_entropy_ref(h, w, y, bias=b, softcap=10.0, label_smoothing=0.05)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_shapes():
    h = torch.randn(4095, 8)
    w = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"labels \(4096,\).*hidden \(4095, 8\)"):
        masked_linear_cross_entropy(h, w, torch.zeros(4096, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hidden \(4095, 8\), weight \(10, 9\)"):
        masked_linear_cross_entropy(h, torch.randn(10, 9), torch.zeros(4095, dtype=torch.long))
    with pytest.raises(ValueError, match="share a dtype"):
        masked_linear_cross_entropy(h, w.bfloat16(), torch.zeros(4095, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        masked_linear_cross_entropy(h, w, torch.zeros(4095))
    with pytest.raises(ValueError, match="reduction"):
        masked_linear_cross_entropy(h, w, torch.zeros(4095, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="bias"):
        masked_linear_cross_entropy(h, w, torch.zeros(4095, dtype=torch.long), bias=torch.zeros(11))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [10, 11, -5])
def test_label_out_of_range_raises(impl, bad):
    h = torch.randn(6, 8)
    w = torch.randn(10, 8)
    y = torch.tensor([1, -100, 3, bad, -100, 0])
    with pytest.raises(ValueError, match=rf"\[0, 10\).*found {bad}"):
        _masked_lce(h, w, y, impl=impl)


# ----------------------------------------------------------------------------- memory


class _LargestAllocation(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any aten op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_no_full_logits_tensor_is_allocated(impl):
    N, H, V = 512, 16, 1031
    h, w, _, y = _inputs(N, H, V, 0.7, torch.float32)
    budget = 16 * V * 8  # room for 16 (torch) or 32 (Triton) rows of logits
    with _LargestAllocation() as mode:
        loss = _masked_lce(h, w, y, impl=impl, scratch_bytes=budget)
        loss.backward()
    # Within the chunk budget (the fp32 [V, H] weight is the only other large tensor), far below N x V.
    assert mode.largest <= max(budget, V * H * 4), (mode.largest, N * V * 4)
    assert mode.largest * 8 < N * V * 4


def test_peak_memory_far_below_full_logits():
    # N x V x 4 bytes = 6.6 GB of fp32 logits; the chunked CPU path must stay within a few hundred MB.
    code = textwrap.dedent(
        """
        import resource, torch
        from tritrain_kernels import masked_linear_cross_entropy
        N, H, V = 32768, 64, 50000
        torch.manual_seed(0)
        h = torch.randn(N, H, requires_grad=True)
        w = torch.randn(V, H) * 0.1
        y = torch.randint(0, V, (N,))
        y[torch.rand(N) < 0.7] = -100
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = masked_linear_cross_entropy(h, w, y)
        loss.backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    extra = int(res.stdout.strip().splitlines()[-1])
    full_logits = 32768 * 50000 * 4
    assert extra < 400 * 2**20, (
        f"extra peak {extra / 2**20:.0f} MiB; full logits would be {full_logits / 2**30:.1f} GiB"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_triton_matches_reference(dtype):
    h, w, b, y = _inputs(300, 256, 5003, 0.7, dtype, bias=True, trainable=True)
    _check(h, w, b, y, impl="triton", reduction="mean", dtype=dtype, softcap=30.0)


# ----------------------------------------------------------------------------- assume_valid, correct


def _compacted(N, H, V, dtype, *, seed=0, bias=False, trainable=False):
    h, w, b, y = _inputs(N, H, V, 0.0, dtype, seed=seed, bias=bias, trainable=trainable)
    return h, w, b, y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_assume_valid_is_sync_free_and_matches(impl, trainable):
    h, w, b, y = _compacted(40, 16, 203, torch.float32, bias=True, trainable=trainable)
    correct = torch.zeros((), dtype=torch.long)
    with count_syncs() as syncs:
        out = _masked_lce(h, w, y, bias=b, assume_valid=True, correct=correct, impl=impl, scratch_bytes=4096)
        out.backward()
    assert syncs.count == 0, syncs.report()
    got = [t.grad.clone() for t in (h, w, b) if t.requires_grad]
    for t in (h, w, b):
        t.grad = None
    with count_syncs() as syncs:
        ref = _masked_lce(h, w, y, bias=b, impl=impl, scratch_bytes=4096)
        ref.backward()
    assert syncs.count == 1, syncs.report()  # the default path: one sync for the count and the range
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for g, t in zip(got, [t for t in (h, w, b) if t.requires_grad], strict=True):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=0)


def _argmax_correct_ref(h, w, b, y, softcap, ignore_index=-100):
    logits = h.detach().double() @ w.detach().double().t()
    if b is not None:
        logits = logits + b.detach().double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = y != ignore_index
    return int(((logits.argmax(-1) == y) & valid).sum())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", [{}, {"bias": True, "softcap": 3.0}], ids=["plain", "bias-softcap"])
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0], ids=lambda f: f"masked{f}")
def test_correct_counts_argmax_equals_label(impl, dtype, opts, frac):
    opts = dict(opts)
    softcap = opts.get("softcap")
    # Few classes and strong logits so that about half the rows are right: the count is informative.
    h, w, b, y = _inputs(57, 12, 5, frac, dtype, seed=7, bias=opts.get("bias", False))
    correct = torch.full((), 5, dtype=torch.long)  # added to in place, not overwritten
    _masked_lce(h, w, y, bias=b, softcap=softcap, correct=correct, impl=impl, scratch_bytes=4 * 5 * 8)
    want = _argmax_correct_ref(h, w, b, y, softcap)
    assert 0 < want < 57 or frac == 1.0
    assert correct.item() == 5 + want


@pytest.mark.parametrize("row_step", ["torch", "triton"])
def test_row_step_correct_first_maximum_wins_ties(row_step):
    # Row 0: the label (3) ties the maximum at 1, which comes first: not correct.
    # Row 1: the label (1) ties the maximum at 3, after it: correct. Row 2: a strict maximum elsewhere.
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [0.0, 2.0, 1.0, 2.0], [5.0, 2.0, 1.0, 2.0]])
    labels = torch.tensor([3, 1, 1])
    correct = torch.zeros((), dtype=torch.long)
    kw = dict(softcap=None, label_smoothing=0.0, compute_grad=True, correct=correct)
    if row_step == "torch":
        mc._rows_torch(logits, None, labels, None, **kw)
    else:
        mc._rows_triton(logits, None, labels, None, grad_dtype=torch.float32, **kw)
    assert correct.item() == 1


@pytest.mark.parametrize("V", [1500, 8208])  # one config of each: 4 warps x 1024, 8 warps x 2048
def test_row_kernel_in_place_reads_label_logit_first(V):
    # fp32 in place: the row becomes dlogits while the label's logit is still needed for the loss.
    # Labels at both ends and on each side of a block boundary.
    block = mc._row_config(V)[0]
    labels = torch.tensor([0, V - 1, block - 1, block, min(2 * block, V - 1)])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(labels.numel(), V, generator=gen, dtype=torch.float64) * 3
    logits[torch.arange(labels.numel()), labels] += 4.0  # the label's logit matters to the loss
    want_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    want_grad = torch.softmax(logits, -1) - torch.nn.functional.one_hot(labels, V)
    chunk = logits.float()
    loss, _, grad = mc._rows_triton(
        chunk,
        None,
        labels,
        None,
        softcap=None,
        label_smoothing=0.0,
        compute_grad=True,
        grad_dtype=torch.float32,
    )
    assert grad.data_ptr() == chunk.data_ptr()  # really in place
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=1e-6)


def test_correct_must_be_a_0d_int64_tensor():
    h, w, _, y = _inputs(4, 8, 10, 0.0, torch.float32)
    for bad in (torch.zeros(1, dtype=torch.long), torch.zeros((), dtype=torch.int32), 3):
        with pytest.raises(ValueError, match="correct must be a 0-d int64 tensor"):
            masked_linear_cross_entropy(h, w, y, correct=bad)


# ----------------------------------------------------------------------------- CUDA-only paths, on CPU


def test_launch_runs_inside_the_tensors_device(monkeypatch):
    state = {"inside": None, "launched_inside": None}

    @contextlib.contextmanager
    def fake_device(device):
        state["inside"] = device
        yield
        state["inside"] = None

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                state["launched_inside"] = state["inside"]

            return launch

    monkeypatch.setattr(mc, "_is_gpu", lambda t: True)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(mc, "_ce_rows_kernel", FakeKernel())
    logits = torch.zeros(3, 7)
    mc._rows_triton(
        logits, None, torch.zeros(3, dtype=torch.long), None, softcap=None, label_smoothing=0.0,
        compute_grad=True, grad_dtype=torch.float32,
    )  # fmt: skip
    assert state["launched_inside"] == logits.device


def test_mm_out_dtype_is_detected_on_supported_torch():
    # torch >= 2.8 has mm(..., out_dtype=); the project needs torch >= 2.10, so the upcast is never taken.
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 10)
    assert mc.MM_HAS_OUT_DTYPE


def test_mm_fp32_uses_out_dtype_gemm_and_lets_errors_through(monkeypatch):
    calls = []

    def fake_mm(a, b, *, out_dtype=None):
        calls.append(out_dtype)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)

    def no_upcast(self, *args, **kwargs):
        raise AssertionError("the bf16 operand was upcast to fp32")

    monkeypatch.setattr(mc, "_is_gpu", lambda t: True)
    monkeypatch.setattr(mc, "MM_HAS_OUT_DTYPE", True)
    monkeypatch.setattr(torch, "mm", fake_mm)
    a, b = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(8, 5, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "float", no_upcast)
    assert mc._mm_fp32(a, b).dtype == torch.float32
    with pytest.raises(torch.OutOfMemoryError):  # not swallowed into a permanent fp32 fallback
        mc._mm_fp32(a, b)
    assert mc._mm_fp32(a, b).dtype == torch.float32
    assert calls == [torch.float32] * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_does_not_reach_the_logits(impl):
    # fp32 hidden and weight under CPU autocast to bf16: the loss must still be computed in fp32.
    h, w, b, y = _inputs(37, 19, 203, 0.5, torch.float32, bias=True, trainable=True)
    seen = []

    class MatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.name in ("aten::mm", "aten::addmm"):
                seen.append(out.dtype)
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes():
        out = _masked_lce(h, w, y, bias=b, softcap=5.0, impl=impl, scratch_bytes=8 * 203 * 8)
    out.backward()
    assert seen and set(seen) == {torch.float32}
    hd, wd, bd = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref = masked_linear_cross_entropy_ref(hd, wd, y, bias=bd, softcap=5.0)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)
    for got, want in ((h.grad, hd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5 * want.abs().max().item())
