"""Masked linear cross-entropy: the loss straight from hidden states, valid rows only.

``masked_linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy(softcap(hidden @ weight.T + bias), labels, ignore_index, reduction, label_smoothing)``
computed in fp32, without ever materialising the ``[N, V]`` logits, and without spending a single
FLOP on rows whose label is ``ignore_index``.

Strategy: gradient in forward with a bounded chunk scratch (DESIGN.md, option 1).

1. Compact the valid rows (one host sync for the count and the label range check together), or, with
   ``assume_valid=True`` (the trainer hands over rows it compacted and checked on the host), nothing:
   no sync, no gather, no check.
2. Per chunk of ``C`` valid rows: ``logits = h_c @ W.T`` with fp32 accumulation and output (cuBLAS),
   then one Triton program per row turns its logits into loss, log-sum-exp and
   ``dlogits = softmax - (1 - eps) * onehot - eps / V`` (bias, softcap and its derivative folded in),
   written in place for fp32 inputs or into a scratch of the input dtype for bf16/fp16 so that
   ``dh_c = dlogits @ W`` and ``dW += dlogits.T @ h_c`` run on tensor cores.
   The row kernel also finds, when asked, each row's argmax (the first maximum): the rows whose argmax is
   the label are counted in place on the device (``correct=``: trained-token accuracy from the pass that
   reads the logits anyway), and the argmax is Liger's ``predicted_tokens``.
3. Backward only scales the stored ``dh`` by ``grad_output`` (and ``dW``/``db`` when trainable).

Why this and not fully fused tiles (Cut Cross-Entropy): with a frozen head the chunk-scratch path
does 2fNHV FLOPs in forward (logits) and 2fNHV for ``dh``, exactly the 4fNHV floor, both in
cuBLAS GEMMs at near-peak rate; the fused-tile approach must recompute logits in backward (6fNHV)
because it keeps no scratch. The price is a ``C x V`` scratch, bounded by ``scratch_bytes``
(256 MiB default: 442 rows of fp32 logits at GLM-4's V=151552, 295 rows with a bf16 grad buffer
beside them), and ``dh`` stored from forward to backward, the size of the valid hidden rows.
``reduction="none"`` with a trainable head cannot pre-scale dW by per-row grad_outputs, so it
recomputes the chunks in backward; that case does not arise in LoRA training.

Liger-Kernel's keywords (``LigerFusedLinearCrossEntropyLoss``: ``ce_weight``, ``lse_square_scale``,
``use_token_scaling``, ``return_z_loss`` / ``return_token_accuracy`` / ``return_predicted_tokens``,
``accum_dtype``) take Liger's semantics (``src/liger_kernel/ops/cross_entropy.py``: class weights as
``F.cross_entropy(weight=)``, the z-loss never class-weighted and divided by the valid row count under
``mean``, token scaling by the detached p(label) of the row's whole loss and gradient) and cost no extra
pass: the z-loss is the squared LSE of the row pass, class weights and p(label) are per-row factors of
dlogits. ``masked_linear_logprob_sums`` gives per-sequence sums of labelled-token log-probs over packed rows
(``cu_seqlens``), the building block of DPO / SimPO / ORPO, from the same per-row pass.

On CPU the same chunked algorithm runs in plain torch (fp32 compute), which is what the trainer
uses there; the Triton kernels also run on CPU under ``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Scratch budget for one chunk: fp32 logits (+ a bf16/fp16 grad buffer for half inputs).
SCRATCH_BYTES = 256 * 2**20
# On CPU a chunk that stays near the last-level cache is faster than one big chunk.
CPU_SCRATCH_BYTES = 32 * 2**20

_REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _tanh(x):
    # tanh through exp, stable at both ends: exp(-2|x|) never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _ce_rows_kernel(
    # pointers
    logits_ptr,  # [C, V] fp32 chunk of h @ W.T (bias not yet added)
    grad_ptr,  # [C, V] dlogits out; may alias logits_ptr (fp32 inputs)
    bias_ptr,  # [V] fp32 or dummy
    class_weight_ptr,  # [V] fp32 per-class weights (F.cross_entropy's ``weight``) or dummy
    labels_ptr,  # [C] int64, all valid
    row_scale_ptr,  # [C] fp32 or dummy
    loss_ptr,  # [C] fp32 out: the row's cross-entropy (class-weighted, smoothed; no z-loss, no token scale)
    lse_ptr,  # [C] fp32 out
    prob_ptr,  # [C] fp32 out with TOKEN_SCALING: p(label), the detached token scale
    pred_ptr,  # [C] int64 out with ARGMAX: the first maximum's index
    correct_ptr,  # [] int64, incremented in place with ARGMAX (a dummy counter when nobody reads it)
    # sizes
    V,
    # strides
    stride_lm,
    stride_gm,
    # scalars
    softcap,
    label_smoothing,
    z_coef,  # gradient of the z-loss: 2 * z_coef * lse * softmax (0.0: no z-loss)
    # meta
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    TOKEN_SCALING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_lm
    grad_row = grad_ptr + row * stride_gm
    y = tl.load(labels_ptr + row)

    # The label's logit is read first, before pass 1. With fp32 inputs pass 2 overwrites the row in
    # place, and logits[y] is the one element a thread reads that another thread of this program writes:
    # every other element is read and written by the same thread (same offsets, same layout). Pass 1
    # ends in cross-warp reductions (tl.max / tl.sum through shared memory behind a CTA barrier, which
    # orders all earlier memory accesses of the program), so this load is performed before any store
    # of pass 2. Loaded after pass 1, nothing would order it before another warp's store to logits[y].
    z_y = tl.load(logits_row + y).to(tl.float32)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)

    # Pass 1: online max / sum-exp over the vocabulary, in fp32; with smoothing, the (class-weighted) sum
    # of the logits; with ARGMAX, the index of the first maximum (torch.argmax's rule on ties).
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    w_sum = tl.zeros((), tl.float32)
    best = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs, mask=mask, other=0.0)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        z_max = tl.max(z, axis=0)
        if ARGMAX:
            # A later block takes over only with a strictly larger maximum: the first maximum wins.
            first = tl.min(tl.where(z == z_max, offs, V), axis=0)
            best = tl.where(z_max > m, first, best)
        m_new = tl.maximum(m, z_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            if HAS_CLASS_WEIGHT:
                cw = tl.load(class_weight_ptr + offs, mask=mask, other=0.0)
                z_sum += tl.sum(tl.where(mask, z, 0.0) * cw, axis=0)  # where first: -inf * 0 is NaN
                w_sum += tl.sum(cw, axis=0)
            else:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)

    # loss = (1 - eps) * w_y * (lse - z_y) + eps / V * sum_i w_i * (lse - z_i)   (w = 1 without class weights)
    # dloss/dz_j = a * softmax_j - (1 - eps) * w_y * [j == y] - eps / V * w_j,
    #   a = (1 - eps) * w_y + eps / V * sum_i w_i  (1 without class weights), plus 2 * z_coef * lse (z-loss)
    nll = lse - z_y
    onehot = 1.0 - label_smoothing
    a = 1.0
    if HAS_CLASS_WEIGHT:
        w_y = tl.load(class_weight_ptr + y)
        nll *= w_y
        onehot *= w_y
        a = onehot + label_smoothing * w_sum / V
    loss = nll
    if HAS_SMOOTHING:
        if HAS_CLASS_WEIGHT:
            loss = (1.0 - label_smoothing) * nll + label_smoothing * (w_sum * lse - z_sum) / V
        else:
            loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z_sum / V)
    a += 2.0 * z_coef * lse
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if ARGMAX:
        tl.store(pred_ptr + row, best.to(tl.int64))
        tl.atomic_add(correct_ptr, (best == y).to(tl.int64), sem="relaxed")

    # Pass 2: dlogits, through the softcap's derivative, times the row's scale.
    if COMPUTE_GRAD:
        scale = 1.0
        if HAS_ROW_SCALE:
            scale = tl.load(row_scale_ptr + row).to(tl.float32)
        if TOKEN_SCALING:
            p_y = tl.exp(z_y - lse)  # detached: a constant factor of the row's loss and gradient
            tl.store(prob_ptr + row, p_y)
            scale *= p_y
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs, mask=mask, other=0.0)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse) * a
            g -= tl.where(offs == y, onehot, 0.0)
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    g -= (label_smoothing / V) * tl.load(class_weight_ptr + offs, mask=mask, other=0.0)
                else:
                    g -= label_smoothing / V
            if HAS_SOFTCAP:
                g *= 1.0 - t * t
            g *= scale
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    elif TOKEN_SCALING:
        tl.store(prob_ptr + row, tl.exp(z_y - lse))


# ----------------------------------------------------------------------------- launchers


# (BLOCK_V, num_warps) of the row kernel, wide vocabularies first: two, so that the compile test covers all.
# 8 fp32 values per thread per block: 4096-wide blocks with 8 warps spilled a few registers (ptxas, sm_80-100).
ROW_CONFIGS = ((2048, 8), (1024, 4))


def _row_config(V: int) -> tuple[int, int]:
    # The wide block only where Triton sees 16-divisible sizes and strides (every real vocabulary): with
    # unaligned ones, softcap and smoothing, ptxas spilled 4 bytes on sm_90/sm_100 (full compile sweep).
    return ROW_CONFIGS[0] if V >= 8192 and V % 16 == 0 else ROW_CONFIGS[1]


def _is_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _device_guard(t: torch.Tensor):
    """Launch on ``t``'s device, not the current one (``cuda:1`` tensors while ``cuda:0`` is current)."""
    return torch.cuda.device(t.device) if _is_gpu(t) else contextlib.nullcontext()


def _rows_triton(
    logits, bias, labels, row_scale, *, softcap, label_smoothing, compute_grad, grad_dtype, correct=None,
    class_weight=None, z_coef=0.0, pred=None, prob=None,
):  # fmt: skip
    """Loss, LSE and (optionally) dlogits for a chunk of fp32 logits; dlogits in ``grad_dtype``.

    ``correct`` (0-d int64), when given, is incremented by the rows whose argmax is the label; ``pred``
    ([C] int64), when given, receives each row's argmax. ``class_weight`` ([V] fp32) weights the classes as
    F.cross_entropy's ``weight``; ``z_coef`` adds ``2 * z_coef * lse * softmax`` to dlogits (the z-loss).
    ``prob`` ([C] fp32), when given, turns token scaling on: it receives p(label) and scales dlogits by it.
    """
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    if not compute_grad:
        grad = logits  # unused
    elif grad_dtype == torch.float32:
        grad = logits  # in place: see the kernel's comment on why reading logits[y] first makes it safe
    else:
        grad = torch.empty(C, V, dtype=grad_dtype, device=logits.device)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()  # [V]: one small copy, and one bias dtype for the kernel to specialise on
    argmax = correct is not None or pred is not None
    if argmax and correct is None:
        correct = torch.zeros((), dtype=torch.int64, device=logits.device)  # a counter nobody reads
    if argmax and pred is None:
        pred = torch.empty(C, dtype=torch.int64, device=logits.device)
    dummy = loss
    block_v, num_warps = _row_config(V)
    with _device_guard(logits):
        _ce_rows_kernel[(C,)](
            logits, grad, bias if bias is not None else dummy,
            class_weight if class_weight is not None else dummy, labels,
            row_scale if row_scale is not None else dummy, loss, lse,
            prob if prob is not None else dummy,
            pred if pred is not None else labels,
            correct if correct is not None else labels,
            V,
            logits.stride(0), grad.stride(0),
            float(softcap or 1.0), float(label_smoothing), float(z_coef),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_CLASS_WEIGHT=class_weight is not None,
            HAS_ROW_SCALE=row_scale is not None,
            TOKEN_SCALING=prob is not None,
            COMPUTE_GRAD=compute_grad,
            ARGMAX=argmax,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )  # fmt: skip
    return loss, lse, (grad if compute_grad else None)


def _rows_torch(
    logits, bias, labels, row_scale, *, softcap, label_smoothing, compute_grad, correct=None,
    class_weight=None, z_coef=0.0, pred=None, prob=None,
):  # fmt: skip
    """The same row step as ``_ce_rows_kernel`` in plain torch, in place on fp32 logits."""
    z = logits
    V = z.shape[1]
    if bias is not None:
        z += bias.to(z.dtype)
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()
        z = t * softcap
    if correct is not None or pred is not None:
        best = z.argmax(dim=1)
        if correct is not None:
            correct.add_((best == labels).sum())
        if pred is not None:
            pred.copy_(best)
    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, labels[:, None]).squeeze(1)
    nll = lse - z_y
    onehot = 1.0 - label_smoothing  # the one-hot's coefficient in dlogits, per row with class weights
    a = None  # softmax's coefficient in dlogits, when not 1
    if class_weight is not None:
        cw = class_weight.to(z.dtype)
        w_y = cw.index_select(0, labels)
        nll = nll * w_y
        onehot = onehot * w_y
        a = onehot + label_smoothing * cw.sum() / V if label_smoothing > 0 else w_y
    loss = nll
    if label_smoothing > 0:
        smooth = (cw.sum() * lse - z @ cw) / V if class_weight is not None else lse - z.mean(dim=1)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if z_coef:
        a = (1.0 if a is None else a) + 2.0 * z_coef * lse
    if prob is not None:
        prob.copy_((z_y - lse).exp_())
    if not compute_grad:
        return loss, lse, None
    g = z.sub_(lse[:, None]).exp_()
    if a is not None:
        g.mul_(a[:, None])
    if label_smoothing > 0:
        g.sub_(cw * (label_smoothing / V) if class_weight is not None else label_smoothing / V)
    if class_weight is None:
        g.scatter_add_(1, labels[:, None], g.new_full((g.shape[0], 1), label_smoothing - 1.0))
    else:
        g.scatter_add_(1, labels[:, None], -onehot[:, None].to(g.dtype))
    if t is not None:
        g.mul_(t.mul_(t).neg_().add_(1.0))
    if row_scale is not None or prob is not None:
        scale = row_scale if prob is None else prob if row_scale is None else row_scale * prob
        g.mul_(scale[:, None].to(g.dtype))
    return loss, lse, g


# torch >= 2.8 has ``mm(a, b, out_dtype=float32)`` for bf16/fp16 on CUDA: cuBLAS on tensor cores with fp32
# output, no fp32 copy of W. Detected from the operator's schema, never by catching a failed call.
MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _mm_fp32(a, b):
    """``a @ b`` with fp32 output: fp32 accumulation in one bf16/fp16 GEMM on CUDA, an upcast elsewhere."""
    if a.dtype == torch.float32:
        return a @ b
    if _is_gpu(a) and MM_HAS_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    # CPU (Triton interpreter tests) or a torch older than the project supports: fp32 copies, fp32 GEMM.
    return a.float() @ b.float()


def _chunk_rows(V: int, itemsize: int, use_triton: bool, scratch_bytes: int) -> int:
    # Per row of the chunk: V fp32 logits, plus V grad values when the input is bf16/fp16 (Triton path);
    # the CPU path holds up to two fp32 [C, V] temporaries (softcap's tanh beside the logits).
    per_row = V * (4 + (itemsize if use_triton and itemsize < 4 else 0)) if use_triton else V * 8
    return max(1, scratch_bytes // per_row)


def _chunked_loss_and_grads(
    h, weight, bias, y, *, softcap, label_smoothing, row_scale, need_dh, need_dw, need_db, use_triton,
    scratch_bytes, correct=None, class_weight=None, z_coef=0.0, lse=None, pred=None, prob=None,
    accum_dtype=torch.float32,
):  # fmt: skip
    """Loop over chunks of the compacted rows ``h [n, H]`` with all-valid labels ``y [n]``.

    Returns per-row loss (fp32), dh ([n, H], h's dtype) and dW, db in ``accum_dtype``, each unscaled
    (the gradient of the per-row loss sum) unless ``row_scale`` is given. Adds the rows whose argmax
    is the label to ``correct`` when given. Fills the given ``[n]`` outputs: ``lse``, ``pred`` (argmax),
    ``prob`` (p(label); giving it turns token scaling on). ``class_weight`` and ``z_coef`` as in the row step.
    """
    n, H = h.shape
    V = weight.shape[0]
    compute_grad = need_dh or need_dw or need_db
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dW = torch.zeros(V, H, dtype=accum_dtype, device=h.device) if need_dw else None
    db = torch.zeros(V, dtype=accum_dtype, device=h.device) if need_db else None
    if use_triton:
        w_mm = weight
    else:
        w_mm = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    chunk = _chunk_rows(V, h.element_size(), use_triton, scratch_bytes)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = h[s:e]
        yc = y[s:e]
        rc = row_scale[s:e] if row_scale is not None else None
        outs = dict(
            correct=correct, class_weight=class_weight, z_coef=z_coef,
            pred=pred[s:e] if pred is not None else None, prob=prob[s:e] if prob is not None else None,
        )  # fmt: skip
        if use_triton:
            logits = _mm_fp32(hc, w_mm.t())
            lc, lsec, g = _rows_triton(
                logits, bias, yc, rc, softcap=softcap, label_smoothing=label_smoothing,
                compute_grad=compute_grad, grad_dtype=h.dtype, **outs,
            )  # fmt: skip
        else:
            hc_mm = hc.to(w_mm.dtype)
            logits = hc_mm @ w_mm.t()
            lc, lsec, g = _rows_torch(
                logits, bias, yc, rc, softcap=softcap, label_smoothing=label_smoothing,
                compute_grad=compute_grad, **outs,
            )  # fmt: skip
        loss[s:e] = lc
        if lse is not None:
            lse[s:e] = lsec
        if g is None:
            continue
        if need_dh:
            if use_triton:
                dh[s:e] = g @ w_mm if g.dtype == w_mm.dtype else (g.float() @ w_mm.float()).to(h.dtype)
            else:
                dh[s:e] = (g @ w_mm).to(h.dtype)
        if need_dw:
            dW.add_(_mm_fp32(g.t(), hc if hc.dtype == g.dtype else hc.to(g.dtype)))
        if need_db:
            db.add_(g.sum(0))
    return loss, dh, dW, db


# ----------------------------------------------------------------------------- autograd


def _valid_rows(y_all, V, ignore_index, assume_valid, class_weight=None):
    """(number of valid rows, their index or None when every row is valid, sum of their class weights).

    With ``assume_valid`` the caller vouches that every row is labelled and in range: no host sync (the
    weight sum is then a device tensor). Otherwise one host sync reads the valid count, the label range
    and the weight sum together. The weight sum is None without ``class_weight``."""
    N = y_all.numel()
    if assume_valid:
        wsum = None if class_weight is None else class_weight.index_select(0, y_all).sum()
        return N, None, wsum
    valid = y_all != ignore_index
    y_lo, y_hi = torch.where(valid, y_all, 0).aminmax() if N else (y_all.new_zeros(()),) * 2
    if class_weight is None:
        n_valid, lo, hi = torch.stack([valid.sum(), y_lo, y_hi]).tolist()
        wsum = None
    else:
        # Clamped so that an out-of-range label reaches the range check below, not an indexing error.
        w = class_weight.index_select(0, torch.where(valid, y_all, 0).clamp_(0, V - 1))
        wsum_t = torch.where(valid, w, 0).sum()
        n_valid, lo, hi, wsum = torch.stack([t.double() for t in (valid.sum(), y_lo, y_hi, wsum_t)]).tolist()
        n_valid, lo, hi = int(n_valid), int(lo), int(hi)
    if n_valid and (lo < 0 or hi >= V):
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index={ignore_index}; found {bad}")
    # Rows already compacted by the caller are used as they are: idx None means every row is valid.
    idx = torch.nonzero_static(valid, size=n_valid).squeeze(1) if 0 < n_valid < N else None
    return n_valid, idx, wsum


class _Options(NamedTuple):
    ignore_index: int
    reduction: str
    label_smoothing: float
    softcap: float | None
    use_triton: bool
    scratch_bytes: int
    assume_valid: bool
    correct: torch.Tensor | None
    class_weight: torch.Tensor | None  # [V], fp32 (fp64 with fp64 inputs), contiguous
    lse_square_scale: float
    token_scaling: bool
    accum_dtype: torch.dtype  # of dW / db
    extras: dict | None  # keys asked for among z_loss, token_accuracy, predicted_tokens; filled in forward


def _scatter_rows(values, idx, N, fill=0):
    if idx is None:
        return values
    return torch.full((N,), fill, dtype=values.dtype, device=values.device).index_copy_(0, idx, values)


class _MaskedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options):
        # Logits are computed in fp32 (or from bf16/fp16 with fp32 output) whatever autocast is active
        # around the call: under autocast ``h @ W.T`` of fp32 inputs would return bf16 logits.
        with torch.autocast(hidden.device.type, enabled=False):
            return _MaskedLinearCE._forward(ctx, hidden, weight, bias, labels, options)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, o: _Options):
        # Shapes for zero gradients when no row is valid.
        ctx.w_spec = (weight.shape, weight.dtype, weight.device)
        ctx.b_spec = None if bias is None else (bias.shape, bias.dtype, bias.device)
        shape = labels.shape
        h_all = hidden.reshape(-1, hidden.shape[-1])
        y_all = labels.reshape(-1)
        N = y_all.numel()
        device = hidden.device
        n_valid, idx, wsum = _valid_rows(
            y_all, weight.shape[0], o.ignore_index, o.assume_valid, o.class_weight
        )
        extras = o.extras if o.extras is not None else {}
        # mean divides the cross-entropy by the valid rows' summed class weight (F.cross_entropy's rule)
        # but the z-loss by the valid row count (Liger's rule): the z-loss gradient, computed in forward
        # beside the cross-entropy's, is pre-scaled by their ratio. It needs the sum on the host: with
        # assume_valid, a class weight and a z-loss under mean, that is one sync.
        denom = wsum if wsum is not None else n_valid
        z_coef = o.lse_square_scale
        if z_coef and o.reduction == "mean" and wsum is not None and n_valid:
            z_coef = z_coef * float(wsum) / n_valid
        want_z = bool(o.lse_square_scale) or "z_loss" in extras
        want_pred = "token_accuracy" in extras or "predicted_tokens" in extras

        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        # Per-row grad_output is only known in backward: dW/db for "none" are recomputed there.
        defer_w = o.reduction == "none" and (need_dw or need_db)

        loss_rows = torch.zeros(N, dtype=torch.float32, device=device)
        z_rows = torch.zeros(N, dtype=torch.float32, device=device) if want_z else None
        pred_rows = torch.full((N,), -1, dtype=torch.int64, device=device) if want_pred else None
        dh = dW = db = None
        if n_valid:
            h = h_all if idx is None else h_all.index_select(0, idx)
            y = y_all if idx is None else y_all.index_select(0, idx)
            lse = torch.empty(n_valid, dtype=torch.float32, device=device) if want_z else None
            prob = torch.empty(n_valid, dtype=torch.float32, device=device) if o.token_scaling else None
            pred = torch.empty(n_valid, dtype=torch.int64, device=device) if want_pred else None
            lv, dh, dW, db = _chunked_loss_and_grads(
                h, weight, bias, y, softcap=o.softcap, label_smoothing=o.label_smoothing, row_scale=None,
                need_dh=need_dh, need_dw=need_dw and not defer_w, need_db=need_db and not defer_w,
                use_triton=o.use_triton, scratch_bytes=o.scratch_bytes, correct=o.correct,
                class_weight=o.class_weight, z_coef=z_coef, lse=lse, pred=pred, prob=prob,
                accum_dtype=o.accum_dtype,
            )  # fmt: skip
            zv = o.lse_square_scale * lse.square() if want_z else None
            if prob is not None:  # Liger scales the row's whole loss, z-loss included, by p(label)
                lv = lv * prob
                zv = zv * prob if zv is not None else None
            loss_rows = _scatter_rows(lv, idx, N)
            if want_z:
                z_rows = _scatter_rows(zv, idx, N)
            if want_pred:
                pred_rows = _scatter_rows(pred, idx, N, fill=-1)
            if defer_w:
                ctx.save_for_backward(idx, h, y, weight, bias)
            else:
                ctx.save_for_backward(idx)
        else:
            ctx.save_for_backward(None)

        ctx.dh, ctx.dW, ctx.db = dh, dW, db
        ctx.denom = denom if o.reduction == "mean" else 1
        ctx.meta = (n_valid, N, hidden.shape, hidden.dtype, weight.dtype, defer_w, o._replace(extras=None))
        ctx.mark_non_differentiable(labels)

        # What was asked for besides the loss: computed from this pass, no gradient.
        if "z_loss" in extras:
            extras["z_loss"] = _reduce(z_rows, None, n_valid, o.reduction, shape)
        if "token_accuracy" in extras:
            hit = (pred_rows == y_all).float()
            if n_valid < N:  # ignored rows hold -1, their label when ignore_index is -1
                hit = hit * (y_all != o.ignore_index)
            extras["token_accuracy"] = _reduce(hit, None, n_valid, o.reduction, shape, as_mean=True)
        if "predicted_tokens" in extras:
            extras["predicted_tokens"] = pred_rows.reshape(shape)

        if o.reduction == "none":
            return (loss_rows + z_rows if o.lse_square_scale else loss_rows).reshape(shape)
        total = _reduce(loss_rows, denom, n_valid, o.reduction, shape)
        if o.lse_square_scale:
            total = total + _reduce(z_rows, None, n_valid, o.reduction, shape)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _MaskedLinearCE._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        n_valid, N, h_shape, h_dtype, w_dtype, defer_w, o = ctx.meta
        saved = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = grad_w = grad_b = None
        device = grad_out.device

        if n_valid == 0:
            if need_dh:
                grad_h = torch.zeros(h_shape, dtype=h_dtype, device=device)
            # zero dW/db are built below from the saved shapes only when requested
            ctx.dh = ctx.dW = ctx.db = None
            return grad_h, _zeros_like_saved(ctx, "w"), _zeros_like_saved(ctx, "b"), None, None

        idx = saved[0]
        if o.reduction == "none":
            g_rows = grad_out.reshape(-1).float()
            g_rows = g_rows if idx is None else g_rows.index_select(0, idx)
            scale = None
        else:
            scale = grad_out.float() / ctx.denom

        if need_dh:
            dh = ctx.dh
            if scale is not None:
                dh = dh * scale.to(dh.dtype)
            else:
                dh = (dh.float() * g_rows[:, None]).to(dh.dtype)
            if idx is None:
                grad_h = dh.to(h_dtype).reshape(h_shape)
            else:
                grad_h = torch.zeros(N, h_shape[-1], dtype=h_dtype, device=device)
                grad_h.index_copy_(0, idx, dh.to(h_dtype))
                grad_h = grad_h.reshape(h_shape)

        if defer_w:
            _, h, y, weight, bias = saved
            prob = torch.empty(h.shape[0], dtype=torch.float32, device=device) if o.token_scaling else None
            _, _, dW, db = _chunked_loss_and_grads(
                h, weight, bias, y, softcap=o.softcap, label_smoothing=o.label_smoothing, row_scale=g_rows,
                need_dh=False, need_dw=need_dw, need_db=need_db, use_triton=o.use_triton,
                scratch_bytes=o.scratch_bytes, class_weight=o.class_weight, z_coef=o.lse_square_scale,
                prob=prob, accum_dtype=o.accum_dtype,
            )  # fmt: skip
            grad_w = dW.to(w_dtype) if need_dw else None
            grad_b = db.to(bias.dtype) if need_db else None
        else:
            if need_dw:
                grad_w = (ctx.dW * scale).to(w_dtype)
            if need_db and ctx.db is not None:
                grad_b = (ctx.db * scale).to(ctx.b_spec[1])
        ctx.dh = ctx.dW = ctx.db = None
        return grad_h, grad_w, grad_b, None, None


def _reduce(rows, denom, n_valid, reduction, shape, as_mean=False):
    """Rows (0 at ignored rows) reduced: ``none`` -> ``shape``; ``sum``; ``mean`` over ``denom`` (the valid
    row count when None), 0 with no valid row. ``as_mean``: a mean under ``sum`` too (token accuracy)."""
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "mean" or as_mean:
        if not n_valid:
            return total * 0.0
        total = total / (n_valid if denom is None else denom)
    return total


def _zeros_like_saved(ctx, which):
    spec = ctx.w_spec if which == "w" else ctx.b_spec
    needs = ctx.needs_input_grad[1] if which == "w" else ctx.needs_input_grad[2]
    if spec is None or not needs:
        return None
    shape, dtype, device = spec
    return torch.zeros(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- public function


def _check_inputs(hidden, weight, labels, bias, reduction, label_smoothing, softcap):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("hidden and weight must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H]; got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's H: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape: labels {tuple(labels.shape)}, hidden {tuple(hidden.shape)}"
            " (labels are aligned with hidden; shift them before calling)"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    allowed = _DTYPES + ((torch.float64,) if hidden.device.type == "cpu" else ())
    if hidden.dtype not in allowed:
        raise ValueError(f"hidden must be one of {allowed}; got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share a dtype: hidden {hidden.dtype} {tuple(hidden.shape)}, "
            f"weight {weight.dtype} {tuple(weight.shape)}"
        )
    devices = {hidden.device, weight.device, labels.device}
    if bias is not None:
        devices.add(bias.device)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V]={weight.shape[0]}; got {tuple(bias.shape)}")
        if bias.dtype not in allowed:
            raise ValueError(f"bias dtype {bias.dtype} is not supported")
    if len(devices) != 1:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} on {hidden.device}, weight {tuple(weight.shape)} on "
            f"{weight.device}, labels {tuple(labels.shape)} on {labels.device} must share one device"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number or None; got {softcap}")


def _check_correct(correct, device):
    if correct is None:
        return
    if not isinstance(correct, torch.Tensor) or correct.dtype != torch.int64 or correct.dim() != 0:
        got = (
            f"{correct.dtype} of shape {tuple(correct.shape)}"
            if isinstance(correct, torch.Tensor)
            else correct
        )
        raise ValueError(f"correct must be a 0-d int64 tensor (torch.zeros((), dtype=torch.long)); got {got}")
    if correct.device != device:
        raise ValueError(f"correct is on {correct.device} but hidden is on {device}; put it on {device}")


def _check_liger_options(hidden, weight, ce_weight, lse_square_scale, accum_dtype, flags):
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
    if ce_weight is not None:
        V = weight.shape[0]
        if not isinstance(ce_weight, torch.Tensor) or tuple(ce_weight.shape) != (V,):
            got = tuple(ce_weight.shape) if isinstance(ce_weight, torch.Tensor) else ce_weight
            raise ValueError(f"ce_weight must be a [V]={V} tensor of per-class weights; got {got}")
        if not ce_weight.is_floating_point():
            raise ValueError(f"ce_weight must be a floating-point tensor; got {ce_weight.dtype}")
        if ce_weight.device != hidden.device:
            raise ValueError(f"ce_weight is on {ce_weight.device} but hidden is on {hidden.device}")
    if not (isinstance(lse_square_scale, (int, float)) and math.isfinite(lse_square_scale)):
        raise ValueError(f"lse_square_scale must be a finite number; got {lse_square_scale!r}")
    if accum_dtype is not None and not (
        isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point
    ):
        raise ValueError(f"accum_dtype must be None or a floating-point torch.dtype; got {accum_dtype!r}")


def _masked_lce(
    hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    softcap=None, assume_valid=False, correct=None, ce_weight=None, lse_square_scale=0.0,
    use_token_scaling=False, return_z_loss=False, return_token_accuracy=False, return_predicted_tokens=False,
    accum_dtype=None, impl="auto", scratch_bytes=None,
):  # fmt: skip
    """``masked_linear_cross_entropy`` with the implementation and scratch budget exposed for tests.

    impl: "auto" (Triton on CUDA, torch on CPU), "triton" (also on CPU under TRITON_INTERPRET=1), "torch".
    """
    _check_inputs(hidden, weight, labels, bias, reduction, label_smoothing, softcap)
    _check_correct(correct, hidden.device)
    flags = dict(
        use_token_scaling=use_token_scaling, return_z_loss=return_z_loss,
        return_token_accuracy=return_token_accuracy, return_predicted_tokens=return_predicted_tokens,
    )  # fmt: skip
    _check_liger_options(hidden, weight, ce_weight, lse_square_scale, accum_dtype, flags)
    if impl == "auto":
        use_triton = hidden.is_cuda
    elif impl in ("triton", "torch"):
        use_triton = impl == "triton"
    else:
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch'; got {impl!r}")
    if use_triton and hidden.dtype == torch.float64:
        raise ValueError("the Triton path supports fp32, bf16 and fp16; got float64")
    if scratch_bytes is None:
        scratch_bytes = SCRATCH_BYTES if use_triton else CPU_SCRATCH_BYTES
    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    labels = labels.long()
    # fp64 inputs (CPU reference runs) compute in fp64 throughout; otherwise class weights and accumulators
    # are fp32, never less: Liger's accum_dtype=None accumulates dW in the weight's dtype, ours in fp32.
    wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if ce_weight is not None:
        ce_weight = ce_weight.detach().to(wide).contiguous()
    accum = torch.float64 if torch.float64 in (accum_dtype, hidden.dtype) else torch.float32
    extras = {}
    if return_z_loss:
        extras["z_loss"] = None
    if return_token_accuracy:
        extras["token_accuracy"] = None
    if return_predicted_tokens:
        extras["predicted_tokens"] = None
    options = _Options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=float(label_smoothing), softcap=softcap,
        use_triton=use_triton, scratch_bytes=scratch_bytes, assume_valid=bool(assume_valid), correct=correct,
        class_weight=ce_weight, lse_square_scale=float(lse_square_scale), token_scaling=use_token_scaling,
        accum_dtype=accum, extras=extras,
    )  # fmt: skip
    loss = _MaskedLinearCE.apply(hidden, weight.contiguous(), bias, labels, options)
    if not extras:
        return loss
    return CrossEntropyOutput(loss=loss, **extras)


class CrossEntropyOutput(NamedTuple):
    """What ``masked_linear_cross_entropy`` returns when any ``return_*`` flag is set: Liger's
    ``CrossEntropyOutput`` fields (attribute access as Liger's dataclass, and tuple unpacking); the
    outputs not asked for are None. Only ``loss`` carries a gradient."""

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None


def masked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    assume_valid: bool = False,
    correct: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    use_token_scaling: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor | CrossEntropyOutput:
    """Cross-entropy of ``softcap(hidden @ weight.T + bias)`` against ``labels``, valid rows only.

    Args:
        hidden: ``[N, H]`` or ``[..., H]``, bf16 / fp16 / fp32: the decoder's final hidden states.
        weight: ``[V, H]``, same dtype and device as ``hidden``: the lm_head weight (frozen or trainable).
        labels: ``[N]`` or ``[...]`` (hidden's leading shape), integer, already aligned with ``hidden``
            (no shift inside); entries equal to ``ignore_index`` cost nothing.
        bias: optional ``[V]`` lm_head bias.
        ignore_index: label value of rows without a target.
        reduction: ``"mean"`` (over valid rows; 0 with zero gradients when there is none), ``"sum"``,
            or ``"none"`` (fp32, ``labels``' shape, 0 at ignored rows).
        label_smoothing: in ``[0, 1]``, as in ``F.cross_entropy``.
        softcap: ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2), or None.
        assume_valid: the caller guarantees that every row is labelled (already compacted) and every
            label is in ``[0, V)``: no host sync, no gather, no range check (a label out of range is
            then undefined behaviour). ``mean`` divides by the number of rows.
        correct: optional 0-d int64 tensor on ``hidden``'s device; incremented in place, without a
            sync, by the number of valid rows whose argmax logit (after bias and softcap; the first
            maximum on ties) is the label: trained-token accuracy at no extra matmul.

    Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` keywords, with its semantics:
        ce_weight: ``[V]`` floating per-class weights, as ``F.cross_entropy(weight=)``: a row's loss and
            gradient scale by its label's weight (the smoothing term by each class's), and ``mean``
            divides by the valid rows' summed label weight.
        lse_square_scale: z-loss ``lse_square_scale * logsumexp(logits)**2`` added per valid row; under
            ``mean`` divided by the valid row count (not the class-weight sum), never class-weighted.
        use_token_scaling: multiply each valid row's loss (z-loss included) and gradient by the model's
            probability of its label, ``softmax(logits)[label]``, detached.
        return_z_loss: also return the z-loss part, reduced as the loss (already inside ``loss``).
        return_token_accuracy: also return the fraction of valid rows whose argmax is the label (fp32;
            a per-row 0/1 tensor, 0 at ignored rows, under ``none``; 0 when no row is valid).
        return_predicted_tokens: also return each row's argmax (int64, ``labels``' shape, -1 at ignored rows).
        accum_dtype: dtype of the dW / db accumulators: fp32 whatever is asked (never less), fp64 when
            asked (or with fp64 inputs).

    Returns:
        fp32 scalar for ``mean``/``sum``; fp32 tensor of ``labels``' shape for ``none``. With any
        ``return_*`` flag, a ``CrossEntropyOutput(loss, z_loss, token_accuracy, predicted_tokens)``, the
        outputs not asked for None. Gradients flow to ``hidden`` always, to ``weight``/``bias`` only
        when they require grad, never to ``ce_weight`` or the extra outputs.

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, or a label outside ``[0, V)``
            that is not ``ignore_index``.
    """
    return _masked_lce(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, assume_valid=assume_valid, correct=correct,
        ce_weight=ce_weight, lse_square_scale=lse_square_scale, use_token_scaling=use_token_scaling,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        return_predicted_tokens=return_predicted_tokens, accum_dtype=accum_dtype,
    )  # fmt: skip


# ----------------------------------------------------------------------------- segment form


def _segment_ids(cu_seqlens, N, device):
    """(sequence index of each of the N rows, number of sequences S), after checking ``cu_seqlens``."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [S + 1] (S >= 1 sequences); got {got}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor; got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(
            f"cu_seqlens is on {cu_seqlens.device} but hidden is on {device}; put it on {device}"
        )
    cu = cu_seqlens.long()
    first, last, drops = torch.stack([cu[0], cu[-1], (cu.diff() < 0).sum()]).tolist()
    if first != 0 or last != N or drops:
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at the number of rows {N} "
            f"(hidden's rows, leading dims flattened); got start {first}, end {last}, {drops} decrease(s)"
        )
    # Row r belongs to sequence s where cu[s] <= r < cu[s + 1] (empty sequences own no row).
    rows = torch.arange(N, device=cu.device)
    return torch.searchsorted(cu[1:], rows, right=True), cu.numel() - 1


def _masked_logprob_sums(
    hidden, weight, labels, cu_seqlens, *, bias=None, ignore_index=-100, softcap=None, impl="auto",
    scratch_bytes=None,
):  # fmt: skip
    """``masked_linear_logprob_sums`` with the implementation and scratch budget exposed for tests."""
    _check_inputs(hidden, weight, labels, bias, "none", 0.0, softcap)
    seg, S = _segment_ids(cu_seqlens, labels.numel(), hidden.device)
    nll = _masked_lce(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction="none", softcap=softcap,
        impl=impl, scratch_bytes=scratch_bytes,
    ).reshape(-1)  # fmt: skip
    logp_sums = torch.zeros(S, dtype=torch.float32, device=hidden.device).index_add(0, seg, nll, alpha=-1.0)
    labelled = (labels.reshape(-1) != ignore_index).long()
    counts = torch.zeros(S, dtype=torch.int64, device=hidden.device).index_add_(0, seg, labelled)
    return logp_sums, counts


def masked_linear_logprob_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of the labelled tokens' log-probabilities, straight from hidden states.

    The building block of sequence-level preference losses on packed rows (DPO, IPO: ``logp_sums``;
    SimPO: ``logp_sums / counts``; ORPO: both), computed as ``masked_linear_cross_entropy`` computes the
    loss: labelled rows only, chunk by chunk, never the ``[N, V]`` logits, nothing spent on rows whose
    label is ``ignore_index``.

    Args:
        hidden: ``[N, H]`` or ``[..., H]``, bf16 / fp16 / fp32; leading dims are flattened in order into
            the ``N`` rows that ``cu_seqlens`` indexes (several sequences may share one packed row).
        weight: ``[V, H]``, hidden's dtype and device: the lm_head weight (frozen or trainable).
        labels: hidden's leading shape, integer, aligned with ``hidden`` (no shift inside).
        cu_seqlens: ``[S + 1]`` integer, on hidden's device: sequence ``s`` is rows
            ``cu_seqlens[s]:cu_seqlens[s + 1]``; starts at 0, never decreases, ends at ``N``.
        bias: optional ``[V]`` lm_head bias.
        ignore_index: label of rows that are not scored.
        softcap: ``softcap * tanh(logits / softcap)`` before the softmax, or None.

    Returns:
        ``(logp_sums, counts)``: fp32 ``[S]``, the sum over each sequence's labelled rows of
        ``log_softmax(logits)[label]`` (0 for a sequence with no labelled row), with gradients to
        ``hidden`` (and ``weight``/``bias`` when they require grad); int64 ``[S]``, the labelled rows
        per sequence. One host sync checks ``cu_seqlens`` and one the labels, as the loss does.

    Raises:
        ValueError: as ``masked_linear_cross_entropy``, and on a malformed ``cu_seqlens``.
    """
    return _masked_logprob_sums(
        hidden, weight, labels, cu_seqlens, bias=bias, ignore_index=ignore_index, softcap=softcap
    )


# ----------------------------------------------------------------------------- reference


def masked_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    ce_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    use_token_scaling: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
) -> torch.Tensor | CrossEntropyOutput:
    """Plain-torch reference: full logits in fp32 (fp64 if the inputs are fp64), then F.cross_entropy.

    Same arguments and semantics as ``masked_linear_cross_entropy``, including ``mean`` over zero
    valid rows being 0 with zero gradients. Materialises ``[N, V]``: for tests and comparison only.
    Written from the definitions (F.cross_entropy per row, then Liger's reductions), not from the kernel.
    """
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.reshape(-1, hidden.shape[-1]).to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    n_valid = valid.sum().to(dt)  # a tensor: the reference stays free of host syncs, as the trainer's step
    cw = None if ce_weight is None else ce_weight.detach().to(dt)
    ce = F.cross_entropy(
        logits, y, weight=cw, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    lse = torch.logsumexp(logits, dim=-1)
    z = torch.where(valid, lse_square_scale * lse.square(), 0.0)
    if use_token_scaling:
        p = torch.softmax(logits.detach(), dim=-1).gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
        p = torch.where(valid, p, 0.0)
        ce, z = ce * p, z * p

    def reduce(rows, denom):
        if reduction == "none":
            return rows.reshape(labels.shape)
        if reduction == "sum":
            return rows.sum()
        # no valid row: every row is 0, so 0 with zero gradients
        return rows.sum() / torch.where(denom > 0, denom, torch.ones_like(denom))

    denom = n_valid if cw is None else torch.where(valid, cw[torch.where(valid, y, 0)], 0.0).sum()
    loss = reduce(ce, denom) + (reduce(z, n_valid) if lse_square_scale else 0.0)
    if not (return_z_loss or return_token_accuracy or return_predicted_tokens):
        return loss
    pred = torch.where(valid, logits.argmax(dim=-1), -1)
    hit = ((pred == y) & valid).to(dt)
    if reduction == "none":
        accuracy = hit.reshape(labels.shape)
    else:
        accuracy = hit.sum() / n_valid.clamp_min(1)
    return CrossEntropyOutput(
        loss=loss,
        z_loss=reduce(z, n_valid).detach() if return_z_loss else None,
        token_accuracy=accuracy if return_token_accuracy else None,
        predicted_tokens=pred.reshape(labels.shape) if return_predicted_tokens else None,
    )


def masked_linear_logprob_sums_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of ``masked_linear_logprob_sums``: full log-softmax, one slice per sequence."""
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.reshape(-1, hidden.shape[-1]).to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    y = labels.reshape(-1).long()
    sums, counts = [], []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        keep = y[a:b] != ignore_index
        rows = torch.arange(a, b, device=logp.device)[keep]
        sums.append(logp[rows, y[rows]].sum())
        counts.append(int(keep.sum()))
    return torch.stack(sums), torch.tensor(counts, dtype=torch.int64)


# ----------------------------------------------------------------------------- compile specifications


def compile_specs() -> list[dict]:
    """Every specialisation ``_rows_triton`` can launch, for the ahead-of-time GPU compile test.

    Each dict: ``name``, ``fn``, ``signature``, ``constexprs``, ``num_warps``, ``num_stages`` and ``attrs``
    (argument name -> Triton attributes: 16-divisible sizes and pointers, as Triton specialises them at
    launch when V is a multiple of 16, which every real vocabulary is). The first spec is the heaviest
    (every flag on, bf16 gradient, the wide block), the one a quick check compiles.
    """
    aligned = {n: [["tt.divisibility", 16]] for n in ("logits_ptr", "grad_ptr", "bias_ptr", "class_weight_ptr",
                                                       "loss_ptr", "lse_ptr", "V", "stride_lm", "stride_gm")}  # fmt: skip
    # (COMPUTE_GRAD, grad dtype, HAS_ROW_SCALE, ARGMAX): what forward and backward launch, each with or
    # without class weights and token scaling. ARGMAX: forward with correct= or an accuracy / prediction asked.
    launches = (
        [(True, dt, False, am) for dt in ("bf16", "fp16", "fp32") for am in (True, False)]
        + [(False, "fp32", False, am) for am in (True, False)]  # forward under no_grad
        + [(True, dt, True, False) for dt in ("bf16", "fp16", "fp32")]  # backward's recompute for "none"
    )
    variants = [(*launch, cw, ts) for launch in launches for cw in (True, False) for ts in (True, False)]
    specs = []
    launched = [(ROW_CONFIGS[0], True), (ROW_CONFIGS[1], True), (ROW_CONFIGS[1], False)]  # see _row_config
    for (block_v, num_warps), align in launched:
        for compute_grad, grad_dt, row_scale, argmax, class_weight, token_scaling in variants:
            for flags in range(8):
                constexprs = dict(
                    HAS_BIAS=not flags & 1, HAS_SOFTCAP=not flags & 2, HAS_SMOOTHING=not flags & 4,
                    HAS_CLASS_WEIGHT=class_weight, HAS_ROW_SCALE=row_scale, TOKEN_SCALING=token_scaling,
                    COMPUTE_GRAD=compute_grad, ARGMAX=argmax, BLOCK_V=block_v,
                )  # fmt: skip
                signature = {
                    "logits_ptr": "*fp32", "grad_ptr": f"*{grad_dt}", "bias_ptr": "*fp32",
                    "class_weight_ptr": "*fp32", "labels_ptr": "*i64", "row_scale_ptr": "*fp32",
                    "loss_ptr": "*fp32", "lse_ptr": "*fp32", "prob_ptr": "*fp32", "pred_ptr": "*i64",
                    "correct_ptr": "*i64", "V": "i32", "stride_lm": "i32", "stride_gm": "i32",
                    "softcap": "fp32", "label_smoothing": "fp32", "z_coef": "fp32",
                    **dict.fromkeys(constexprs, "constexpr"),
                }  # fmt: skip
                specs.append(dict(
                    name="_ce_rows_kernel", fn=_ce_rows_kernel, signature=signature, constexprs=constexprs,
                    num_warps=num_warps, num_stages=3, attrs=aligned if align else {},
                ))  # fmt: skip
    return specs
