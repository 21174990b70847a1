"""Liger-Kernel's keywords on masked_linear_cross_entropy, against the float64 reference, on both paths.

ce_weight, lse_square_scale (z-loss), use_token_scaling, return_z_loss, return_token_accuracy,
return_predicted_tokens, accum_dtype: semantics as Liger's ``LigerFusedLinearCrossEntropyLoss``
(``src/liger_kernel/ops/cross_entropy.py``, ``ops/fused_linear_cross_entropy.py``), the reference written
from the definitions (F.cross_entropy per row, then Liger's reductions).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tritrain_kernels.masked_ce as mc
from tests.synccount import count_syncs
from tests.tritrain_kernels.test_gpu_compile import assert_launches_compiled, record_ce_launches
from tests.tritrain_kernels.test_masked_ce import IMPLS, TOL, _inputs
from tritrain_kernels import CrossEntropyOutput, masked_linear_cross_entropy, masked_linear_cross_entropy_ref
from tritrain_kernels.masked_ce import _masked_lce

EXTRAS = dict(return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)


def _class_weight(V, seed=5):
    # Weights from 0.1 to 2: a row's weight changes its loss several-fold, so a missing factor shows.
    return torch.rand(V, generator=torch.Generator().manual_seed(seed)) * 1.9 + 0.1


def _compare(out, ref, tol, what):
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    err = (out.double().cpu() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * scale, f"{what} error {err:.3g} (reference max {scale:.4g})"


def _check(h, w, b, y, *, impl, reduction, dtype, scratch_bytes=None, **opts):
    """Loss, extras and every gradient against the fp64 reference; returns the output."""
    out = _masked_lce(
        h, w, y, bias=b, reduction=reduction, impl=impl, scratch_bytes=scratch_bytes, **EXTRAS, **opts
    )
    assert isinstance(out, CrossEntropyOutput)
    assert out.loss.dtype == torch.float32
    g_out = (
        torch.randn(out.loss.shape, generator=torch.Generator().manual_seed(1))
        if reduction == "none"
        else torch.tensor(1.7)
    )
    named = [(n, t) for n, t in zip(["hidden", "weight", "bias"], (h, w, b), strict=True) if t is not None]
    names = [n for n, t in named if t.requires_grad]
    grads = torch.autograd.grad(out.loss, [t for _, t in named if t.requires_grad], g_out)

    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_(w.requires_grad)
    bd = None if b is None else b.detach().double().requires_grad_(b.requires_grad)
    ref = masked_linear_cross_entropy_ref(hd, wd, y, bias=bd, reduction=reduction, **EXTRAS, **opts)
    ref_grads = torch.autograd.grad(ref.loss, [t for t in (hd, wd, bd) if t is not None and t.requires_grad],
                                    g_out.double())  # fmt: skip

    tol = TOL[dtype]
    _compare(out.loss, ref.loss, tol["loss"], "loss")
    _compare(out.z_loss, ref.z_loss, tol["loss"], "z_loss")
    assert out.z_loss.dtype == torch.float32 and not out.z_loss.requires_grad
    assert out.token_accuracy.dtype == torch.float32 and out.token_accuracy.shape == ref.token_accuracy.shape
    assert out.predicted_tokens.dtype == torch.int64
    if dtype == torch.float32:  # bf16 inputs round differently from the fp64 logits: near-ties may flip
        assert torch.equal(out.predicted_tokens, ref.predicted_tokens)
        _compare(out.token_accuracy, ref.token_accuracy, 1e-6, "token_accuracy")
    assert (out.predicted_tokens[y == -100] == -1).all()
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert got.shape == want.shape and got.dtype == dtype
        gscale = want.abs().max().item()
        gerr = (got.double() - want).abs().max().item()
        if gscale == 0:
            assert gerr == 0, f"grad {name} should be exactly 0, max |got| {gerr:.3g}"
        else:
            assert gerr <= tol["grad"] * gscale, f"grad {name} error {gerr:.3g} vs max {gscale:.3g}"
    return out


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_reference_class_weights_are_f_cross_entropys(reduction, label_smoothing):
    # Liger's ce_weight is F.cross_entropy's weight=: mean divides by the valid targets' summed weight,
    # the smoothing term weights each class (cross_entropy.py: smooth_loss = eps * sum_i w_i (lse - x_i)).
    h, w, b, y = _inputs(40, 8, 23, 0.4, torch.float64, bias=True)
    cw = _class_weight(23).double()
    ref = masked_linear_cross_entropy_ref(
        h, w, y, bias=b, reduction=reduction, label_smoothing=label_smoothing, ce_weight=cw
    )
    logits = h @ w.t() + b
    want = F.cross_entropy(logits, y, weight=cw, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-12)


def test_reference_z_loss_and_token_scaling_are_liger_formulas():
    # Liger: loss = CE/n + s * lse^2 / n per valid row under mean (z-loss never class-weighted, divided by
    # the count), and with use_token_scaling every row's loss times softmax(logits)[y], detached
    # (test_fused_linear_cross_entropy.py: test_correctness_token_scaling).
    h, w, b, y = _inputs(30, 8, 17, 0.3, torch.float64, bias=True)
    cw = _class_weight(17).double()
    logits = h @ w.t() + b
    valid = y != -100
    ce = F.cross_entropy(logits, y, weight=cw, reduction="none")
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1).detach() * valid
    out = masked_linear_cross_entropy_ref(
        h, w, y, bias=b, ce_weight=cw, lse_square_scale=1e-2, use_token_scaling=True, return_z_loss=True
    )
    z = 1e-2 * lse.square() * valid
    want = (ce * p).sum() / cw[y[valid]].sum() + (z * p).sum() / valid.sum()
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.z_loss, (z * p).sum() / valid.sum(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- against the reference

OPTS = {
    "weight": {"ce_weight": True},
    "weight-smoothing": {"ce_weight": True, "label_smoothing": 0.2},
    "zloss": {"lse_square_scale": 0.05},
    "zloss-weight": {"lse_square_scale": 0.05, "ce_weight": True},  # mean: two divisors
    "scaling": {"use_token_scaling": True},
    "all": {
        "bias": True,
        "softcap": 3.0,
        "label_smoothing": 0.1,
        "ce_weight": True,
        "lse_square_scale": 0.02,
        "use_token_scaling": True,
    },  # fmt: skip
}


def _opts(name, V):
    opts = dict(OPTS[name])
    bias = opts.pop("bias", False)
    if opts.pop("ce_weight", False):
        opts["ce_weight"] = _class_weight(V)
    return bias, opts


# Every option in fp32; in bf16 (dlogits and dh rounded to bf16) the two that combine the most.
CASES = [(name, torch.float32) for name in OPTS] + [
    (name, torch.bfloat16) for name in ("zloss-weight", "all")
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opts,dtype", CASES, ids=[f"{n}-{'fp32' if d == torch.float32 else 'bf16'}" for n, d in CASES]
)
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_liger_options_match_reference(impl, dtype, reduction, opts, trainable):
    bias, opts = _opts(opts, 203)
    # Several chunks: the scratch budget holds 8 rows of V=203. Rows half masked.
    h, w, b, y = _inputs(45, 19, 203, 0.5, dtype, seed=3, bias=bias, trainable=trainable)
    _check(h, w, b, y, impl=impl, reduction=reduction, dtype=dtype, scratch_bytes=8 * 203 * 8, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "shape,frac",
    [((1, 16, 97), 0.0), ((64, 32, 4099), 0.6), ((300, 8, 33), 0.9)],
    ids=["one-row", "V4099-two-blocks", "many-rows"],
)
def test_awkward_shapes(impl, reduction, shape, frac):
    N, H, V = shape
    bias, opts = _opts("all", V)
    h, w, b, y = _inputs(N, H, V, frac, torch.float32, seed=11, bias=bias, trainable=True)
    _check(h, w, b, y, impl=impl, reduction=reduction, dtype=torch.float32, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_is_zero_with_zero_grads(impl, reduction):
    bias, opts = _opts("all", 50)
    h, w, b, y = _inputs(9, 16, 50, 1.0, torch.float32, bias=True, trainable=True)
    out = _masked_lce(h, w, y, bias=b, reduction=reduction, impl=impl, **EXTRAS, **opts)
    out.loss.sum().backward()
    assert (out.loss == 0).all() and (out.z_loss == 0).all() and (out.token_accuracy == 0).all()  # not NaN
    assert (out.predicted_tokens == -1).all() and out.predicted_tokens.shape == y.shape
    for t in (h, w, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_extras_shapes(impl):
    h, w, _, y = _inputs(0, 24, 131, 0.6, torch.float32, lead=(3, 7))
    out = _masked_lce(h, w, y, reduction="none", impl=impl, lse_square_scale=0.1, **EXTRAS)
    assert (
        out.loss.shape == out.z_loss.shape == out.token_accuracy.shape == out.predicted_tokens.shape == (3, 7)
    )
    ref = masked_linear_cross_entropy_ref(h.double(), w.double(), y, reduction="none", lse_square_scale=0.1,
                                          **EXTRAS)  # fmt: skip
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.predicted_tokens, ref.predicted_tokens)


# ----------------------------------------------------------------------------- return convention


def test_return_convention_follows_liger():
    h, w, b, y = _inputs(20, 8, 30, 0.3, torch.float32)
    plain = masked_linear_cross_entropy(h, w, y, ce_weight=_class_weight(30), lse_square_scale=1e-3,
                                        use_token_scaling=True)  # fmt: skip
    assert isinstance(plain, torch.Tensor)  # no return_* flag: the loss alone, as Liger
    for flag in EXTRAS:
        out = masked_linear_cross_entropy(h, w, y, **{flag: True})
        assert isinstance(out, CrossEntropyOutput) and isinstance(out, tuple)
        asked = {"return_z_loss": "z_loss", "return_token_accuracy": "token_accuracy",
                 "return_predicted_tokens": "predicted_tokens"}[flag]  # fmt: skip
        for field in ("z_loss", "token_accuracy", "predicted_tokens"):
            assert (getattr(out, field) is not None) == (field == asked)
        loss, z_loss, accuracy, predicted = out  # unpacks like Liger's four outputs
        torch.testing.assert_close(loss, masked_linear_cross_entropy(h, w, y), rtol=0, atol=0)
    # The z-loss is inside the loss and reported beside it; no gradient through the report.
    out = masked_linear_cross_entropy(h, w, y, lse_square_scale=0.1, return_z_loss=True)
    base = masked_linear_cross_entropy(h, w, y)
    torch.testing.assert_close(out.loss, base + out.z_loss, rtol=1e-6, atol=1e-6)
    assert out.loss.requires_grad and not out.z_loss.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_accuracy_is_a_mean_over_valid_rows(impl, reduction):
    # Liger: token_accuracy = correct / n_non_ignore for mean and sum; per token (0 at ignored) for none.
    h, w, b, y = _inputs(57, 12, 5, 0.4, torch.float32, seed=7)
    out = _masked_lce(h, w, y, reduction=reduction, impl=impl, return_token_accuracy=True)
    pred = (h.detach() @ w.detach().t()).argmax(-1)
    valid = y != -100
    hit = ((pred == y) & valid).float()
    want = hit if reduction == "none" else hit.sum() / valid.sum()
    assert 0 < hit.sum() < valid.sum()
    torch.testing.assert_close(out.token_accuracy, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("row_step", ["torch", "triton"])
def test_row_step_predicted_token_is_the_first_maximum(row_step):
    # As torch.argmax (and Liger's block scan): the first maximal index wins a tie, across blocks too.
    V = 2500  # three 1024-wide blocks: the tie at 2100 comes in a later block than the one at 5
    logits = torch.zeros(3, V)
    logits[0, [1, 3]] = 2.0
    logits[1, [5, 2100]] = 4.0
    logits[2, 2499] = 1.0
    labels = torch.tensor([3, 5, 0])
    pred = torch.empty(3, dtype=torch.long)
    correct = torch.zeros((), dtype=torch.long)
    kw = dict(softcap=None, label_smoothing=0.0, compute_grad=False, correct=correct, pred=pred)
    if row_step == "torch":
        mc._rows_torch(logits, None, labels, None, **kw)
    else:
        mc._rows_triton(logits, None, labels, None, grad_dtype=torch.float32, **kw)
    assert pred.tolist() == [1, 5, 2499]
    assert correct.item() == 1


# ----------------------------------------------------------------------------- syncs, masked rows, errors


@pytest.mark.parametrize("impl", IMPLS)
def test_assume_valid_stays_sync_free_except_weighted_z_loss_mean(impl):
    h, w, b, y = _inputs(40, 16, 203, 0.0, torch.float32, bias=True, trainable=True)
    cw = _class_weight(203)
    kw = dict(bias=b, assume_valid=True, impl=impl, scratch_bytes=4096, ce_weight=cw, use_token_scaling=True)
    with count_syncs() as syncs:
        out = _masked_lce(h, w, y, **kw, **EXTRAS)
        out.loss.backward()
    assert syncs.count == 0, syncs.report()
    # mean with class weights and a z-loss: the z-loss gradient is pre-scaled by sum(w_y) / n on the host.
    with count_syncs() as syncs:
        out = _masked_lce(h, w, y, lse_square_scale=0.05, **kw)
        out.backward()
    assert syncs.count == 1, syncs.report()
    ref = _masked_lce(h, w, y, bias=b, lse_square_scale=0.05, impl=impl, ce_weight=cw, use_token_scaling=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # Without assume_valid: still one sync, the weight sum read with the count and the label range.
    with count_syncs() as syncs:
        _masked_lce(h, w, y, bias=b, lse_square_scale=0.05, impl=impl, ce_weight=cw).backward()
    assert syncs.count == 1, syncs.report()


class _MatmulRows(TorchDispatchMode):
    """Rows of every matmul's left operand that has the hidden size as its inner dimension."""

    def __init__(self, H):
        super().__init__()
        self.H, self.rows = H, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("aten::mm", "aten::addmm"):
            a = args[-2]
            if a.shape[-1] == self.H:
                self.rows += a.shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_never_meet_the_head(impl):
    N, H, V = 90, 24, 61  # H != V, so the logits matmul is told apart from dh = dlogits @ W
    h, w, b, y = _inputs(N, H, V, 0.8, torch.float32, bias=True)
    n_valid = int((y != -100).sum())
    bias, opts = _opts("all", V)
    with _MatmulRows(H) as mode:
        out = _masked_lce(h, w, y, bias=b, impl=impl, **opts, **EXTRAS)
        out.loss.backward()
    assert mode.rows == n_valid, (mode.rows, n_valid, N)
    assert torch.count_nonzero(h.grad[y == -100]) == 0


def test_accum_dtype():
    h, w, b, y = _inputs(30, 8, 40, 0.3, torch.float32, bias=True, trainable=True)
    seen = []

    class Zeros(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.name == "aten::zeros" and tuple(out.shape) == (40, 8):
                seen.append(out.dtype)
            return out

    for accum, want in (
        (None, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ):
        seen.clear()
        with Zeros():
            loss = _masked_lce(h, w, y, bias=b, impl="torch", accum_dtype=accum)
        loss.backward()
        assert seen == [want], (accum, seen)  # never below fp32
        assert w.grad.dtype == torch.float32
        w.grad = b.grad = h.grad = None


def test_liger_option_errors():
    h, w, _, y = _inputs(4, 8, 10, 0.0, torch.float32)
    with pytest.raises(ValueError, match=r"ce_weight must be a \[V\]=10 tensor.*\(9,\)"):
        masked_linear_cross_entropy(h, w, y, ce_weight=torch.ones(9))
    with pytest.raises(ValueError, match="ce_weight must be a floating-point tensor"):
        masked_linear_cross_entropy(h, w, y, ce_weight=torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="return_z_loss must be True or False"):
        masked_linear_cross_entropy(h, w, y, return_z_loss=1)
    with pytest.raises(ValueError, match="lse_square_scale must be a finite number"):
        masked_linear_cross_entropy(h, w, y, lse_square_scale=float("nan"))
    with pytest.raises(ValueError, match="accum_dtype"):
        masked_linear_cross_entropy(h, w, y, accum_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[0, 10\).*found 12"):  # Liger returns a wrong loss here
        masked_linear_cross_entropy(h, w, torch.tensor([1, 12, 3, -100]), ce_weight=torch.ones(10))


# ----------------------------------------------------------------------------- compile specifications


def test_liger_launches_are_in_compile_specs(monkeypatch):
    # What the launcher really launches with the new options (forward, backward's recompute for "none",
    # no_grad; fp32 and bf16; both row configurations) must each be a compile spec.
    launched = record_ce_launches(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    for V in (50, 8208):
        cw = _class_weight(V)
        for dtype in (torch.float32, torch.bfloat16):
            every = {"ce_weight": cw, "use_token_scaling": True, "softcap": 5.0, "label_smoothing": 0.1}
            for opts in ({"ce_weight": cw}, {"use_token_scaling": True, "lse_square_scale": 0.1}, every):
                h = torch.randn(3, 8, generator=gen).to(dtype).requires_grad_()
                w = torch.randn(V, 8, generator=gen).to(dtype).requires_grad_()
                y = torch.tensor([1, -100, 7])
                _masked_lce(h, w, y, impl="triton", return_predicted_tokens=True, **opts).loss.backward()
                _masked_lce(h, w, y, reduction="none", impl="triton", **opts).sum().backward()
                with torch.no_grad():
                    _masked_lce(h, w, y, impl="triton", **opts)
    assert_launches_compiled(launched)
    first = mc.compile_specs()[0]["constexprs"]  # the quick compile test's spec: the heaviest
    assert all(v for k, v in first.items() if k not in ("HAS_ROW_SCALE", "BLOCK_V")), first
