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
   The row kernel also counts, when asked (``correct=``), the rows whose argmax is the label: trained-token
   accuracy from the pass that reads the logits anyway, added in place on the device.
3. Backward only scales the stored ``dh`` by ``grad_output`` (and ``dW``/``db`` when trainable).

Why this and not fully fused tiles (Cut Cross-Entropy): with a frozen head the chunk-scratch path
does 2fNHV FLOPs in forward (logits) and 2fNHV for ``dh``, exactly the 4fNHV floor, both in
cuBLAS GEMMs at near-peak rate; the fused-tile approach must recompute logits in backward (6fNHV)
because it keeps no scratch. The price is a ``C x V`` scratch, bounded by ``scratch_bytes``
(256 MiB default: 442 rows of fp32 logits at GLM-4's V=151552, 295 rows with a bf16 grad buffer
beside them), and ``dh`` stored from forward to backward, the size of the valid hidden rows.
``reduction="none"`` with a trainable head cannot pre-scale dW by per-row grad_outputs, so it
recomputes the chunks in backward; that case does not arise in LoRA training.

On CPU the same chunked algorithm runs in plain torch (fp32 compute), which is what the trainer
uses there; the Triton kernels also run on CPU under ``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import contextlib
import math

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
    labels_ptr,  # [C] int64, all valid
    row_scale_ptr,  # [C] fp32 or dummy
    loss_ptr,  # [C] fp32 out
    lse_ptr,  # [C] fp32 out
    correct_ptr,  # [] int64, incremented in place, or dummy
    # sizes
    V,
    # strides
    stride_lm,
    stride_gm,
    # scalars
    softcap,
    label_smoothing,
    # meta
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    COUNT_CORRECT: tl.constexpr,
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

    # Pass 1: online max / sum-exp over the vocabulary, in fp32; with COUNT_CORRECT, how many logits beat
    # the label's (greater, or equal at a lower index: torch.argmax's first-maximum rule).
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    beaten = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs, mask=mask, other=0.0)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        if COUNT_CORRECT:
            beats = (z > z_y) | ((z == z_y) & (offs < y))
            beaten += tl.sum(beats.to(tl.int32), axis=0)
    lse = m + tl.log(s)

    loss = lse - z_y
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / V)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if COUNT_CORRECT:
        tl.atomic_add(correct_ptr, (beaten == 0).to(tl.int64), sem="relaxed")

    # Pass 2: dlogits = softmax - (1 - eps) * onehot - eps / V, through the softcap's derivative.
    if COMPUTE_GRAD:
        scale = 1.0
        if HAS_ROW_SCALE:
            scale = tl.load(row_scale_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs, mask=mask, other=0.0)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse)
            g -= tl.where(offs == y, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                g -= label_smoothing / V
            if HAS_SOFTCAP:
                g *= 1.0 - t * t
            g *= scale
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


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
    logits, bias, labels, row_scale, *, softcap, label_smoothing, compute_grad, grad_dtype, correct=None
):  # fmt: skip
    """Loss, LSE and (optionally) dlogits for a chunk of fp32 logits; dlogits in ``grad_dtype``.
    ``correct`` (0-d int64), when given, is incremented by the rows whose argmax is the label."""
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
    dummy = loss
    block_v, num_warps = _row_config(V)
    with _device_guard(logits):
        _ce_rows_kernel[(C,)](
            logits, grad, bias if bias is not None else dummy, labels,
            row_scale if row_scale is not None else dummy, loss, lse,
            correct if correct is not None else labels,
            V,
            logits.stride(0), grad.stride(0),
            float(softcap or 1.0), float(label_smoothing),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_ROW_SCALE=row_scale is not None,
            COMPUTE_GRAD=compute_grad,
            COUNT_CORRECT=correct is not None,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )  # fmt: skip
    return loss, lse, (grad if compute_grad else None)


def _rows_torch(logits, bias, labels, row_scale, *, softcap, label_smoothing, compute_grad, correct=None):
    """The same row step as ``_ce_rows_kernel`` in plain torch, in place on fp32 logits."""
    z = logits
    V = z.shape[1]
    if bias is not None:
        z += bias.to(z.dtype)
    t = None
    if softcap is not None:
        t = z.div_(softcap).tanh_()
        z = t * softcap
    if correct is not None:
        correct.add_((z.argmax(dim=1) == labels).sum())
    lse = torch.logsumexp(z, dim=1)
    loss = lse - z.gather(1, labels[:, None]).squeeze(1)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=1))
    if not compute_grad:
        return loss, lse, None
    g = z.sub_(lse[:, None]).exp_()
    if label_smoothing > 0:
        g.sub_(label_smoothing / V)
    g.scatter_add_(1, labels[:, None], g.new_full((g.shape[0], 1), label_smoothing - 1.0))
    if t is not None:
        g.mul_(t.mul_(t).neg_().add_(1.0))
    if row_scale is not None:
        g.mul_(row_scale[:, None])
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
    scratch_bytes, correct=None,
):  # fmt: skip
    """Loop over chunks of the compacted rows ``h [n, H]`` with all-valid labels ``y [n]``.

    Returns per-row loss (fp32), dh ([n, H], h's dtype) and fp32 dW, db, each unscaled
    (the gradient of the per-row loss sum) unless ``row_scale`` is given. Adds the rows whose argmax
    is the label to ``correct`` when given.
    """
    n, H = h.shape
    V = weight.shape[0]
    compute_grad = need_dh or need_dw or need_db
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dW = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if need_db else None
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
        if use_triton:
            logits = _mm_fp32(hc, w_mm.t())
            lc, _, g = _rows_triton(
                logits, bias, yc, rc, softcap=softcap, label_smoothing=label_smoothing,
                compute_grad=compute_grad, grad_dtype=h.dtype, correct=correct,
            )  # fmt: skip
        else:
            hc_mm = hc.to(w_mm.dtype)
            logits = hc_mm @ w_mm.t()
            lc, _, g = _rows_torch(
                logits, bias, yc, rc, softcap=softcap, label_smoothing=label_smoothing,
                compute_grad=compute_grad, correct=correct,
            )  # fmt: skip
        loss[s:e] = lc
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


def _valid_rows(y_all, V, ignore_index, assume_valid):
    """(number of valid rows, their index or None when every row is valid).

    With ``assume_valid`` the caller vouches that every row is labelled and in range: no host sync.
    Otherwise one host sync reads the valid count and the label range together."""
    N = y_all.numel()
    if assume_valid:
        return N, None
    valid = y_all != ignore_index
    y_lo, y_hi = torch.where(valid, y_all, 0).aminmax() if N else (y_all.new_zeros(()),) * 2
    n_valid, lo, hi = torch.stack([valid.sum(), y_lo, y_hi]).tolist()
    if n_valid and (lo < 0 or hi >= V):
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index={ignore_index}; found {bad}")
    # Rows already compacted by the caller are used as they are: idx None means every row is valid.
    idx = torch.nonzero_static(valid, size=n_valid).squeeze(1) if 0 < n_valid < N else None
    return n_valid, idx


class _MaskedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, options):
        # Logits are computed in fp32 (or from bf16/fp16 with fp32 output) whatever autocast is active
        # around the call: under autocast ``h @ W.T`` of fp32 inputs would return bf16 logits.
        with torch.autocast(hidden.device.type, enabled=False):
            return _MaskedLinearCE._forward(ctx, hidden, weight, bias, labels, options)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, options):
        (ignore_index, reduction, label_smoothing, softcap, use_triton, scratch_bytes, assume_valid,
         correct) = options  # fmt: skip
        # Shapes for zero gradients when no row is valid.
        ctx.w_spec = (weight.shape, weight.dtype, weight.device)
        ctx.b_spec = None if bias is None else (bias.shape, bias.dtype, bias.device)
        shape = labels.shape
        h_all = hidden.reshape(-1, hidden.shape[-1])
        y_all = labels.reshape(-1)
        N = y_all.numel()
        n_valid, idx = _valid_rows(y_all, weight.shape[0], ignore_index, assume_valid)

        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        # Per-row grad_output is only known in backward: dW/db for "none" are recomputed there.
        defer_w = reduction == "none" and (need_dw or need_db)

        loss_rows = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        dh = dW = db = None
        if n_valid:
            h = h_all if idx is None else h_all.index_select(0, idx)
            y = y_all if idx is None else y_all.index_select(0, idx)
            lv, dh, dW, db = _chunked_loss_and_grads(
                h, weight, bias, y, softcap=softcap, label_smoothing=label_smoothing, row_scale=None,
                need_dh=need_dh, need_dw=need_dw and not defer_w, need_db=need_db and not defer_w,
                use_triton=use_triton, scratch_bytes=scratch_bytes, correct=correct,
            )  # fmt: skip
            loss_rows = lv if idx is None else loss_rows.index_copy_(0, idx, lv)
            if defer_w:
                ctx.save_for_backward(idx, h, y, weight, bias)
            else:
                ctx.save_for_backward(idx)
        else:
            ctx.save_for_backward(None)

        ctx.dh, ctx.dW, ctx.db = dh, dW, db
        ctx.meta = (
            n_valid, N, hidden.shape, hidden.dtype, weight.dtype, reduction, defer_w,
            softcap, label_smoothing, use_triton, scratch_bytes,
        )  # fmt: skip
        ctx.mark_non_differentiable(labels)

        if reduction == "none":
            return loss_rows.reshape(shape)
        total = loss_rows.sum()
        if reduction == "mean":
            total = total / max(n_valid, 1)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _MaskedLinearCE._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        (n_valid, N, h_shape, h_dtype, w_dtype, reduction, defer_w,
         softcap, label_smoothing, use_triton, scratch_bytes) = ctx.meta  # fmt: skip
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
        if reduction == "none":
            g_rows = grad_out.reshape(-1).float()
            g_rows = g_rows if idx is None else g_rows.index_select(0, idx)
            scale = None
        else:
            scale = grad_out.float() / (n_valid if reduction == "mean" else 1)

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
            _, _, dW, db = _chunked_loss_and_grads(
                h, weight, bias, y, softcap=softcap, label_smoothing=label_smoothing, row_scale=g_rows,
                need_dh=False, need_dw=need_dw, need_db=need_db, use_triton=use_triton,
                scratch_bytes=scratch_bytes,
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


def _masked_lce(
    hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    softcap=None, assume_valid=False, correct=None, impl="auto", scratch_bytes=None,
):  # fmt: skip
    """``masked_linear_cross_entropy`` with the implementation and scratch budget exposed for tests.

    impl: "auto" (Triton on CUDA, torch on CPU), "triton" (also on CPU under TRITON_INTERPRET=1), "torch".
    """
    _check_inputs(hidden, weight, labels, bias, reduction, label_smoothing, softcap)
    _check_correct(correct, hidden.device)
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
    options = (
        ignore_index, reduction, float(label_smoothing), softcap, use_triton, scratch_bytes, bool(assume_valid),
        correct,
    )  # fmt: skip
    return _MaskedLinearCE.apply(hidden, weight.contiguous(), bias, labels, options)


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
) -> torch.Tensor:
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

    Returns:
        fp32 scalar for ``mean``/``sum``; fp32 tensor of ``labels``' shape for ``none``.
        Gradients flow to ``hidden`` always, to ``weight``/``bias`` only when they require grad.

    Raises:
        ValueError: on mismatched shapes, dtypes or devices, or a label outside ``[0, V)``
            that is not ``ignore_index``.
    """
    return _masked_lce(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, assume_valid=assume_valid, correct=correct,
    )  # fmt: skip


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
) -> torch.Tensor:
    """Plain-torch reference: full logits in fp32 (fp64 if the inputs are fp64), then F.cross_entropy.

    Same arguments and semantics as ``masked_linear_cross_entropy``, including ``mean`` over zero
    valid rows being 0 with zero gradients. Materialises ``[N, V]``: for tests and comparison only.
    """
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.reshape(-1, hidden.shape[-1]).to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    y = labels.reshape(-1).long()
    if reduction == "mean" and not bool((y != ignore_index).any()):
        return (logits.sum() * 0.0).to(dt)
    loss = F.cross_entropy(
        logits, y, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    return loss.reshape(labels.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------- compile specifications


def compile_specs() -> list[dict]:
    """Every specialisation ``_rows_triton`` can launch, for the ahead-of-time GPU compile test.

    Each dict: ``name``, ``fn``, ``signature``, ``constexprs``, ``num_warps``, ``num_stages`` and ``attrs``
    (argument name -> Triton attributes: 16-divisible sizes and pointers, as Triton specialises them at
    launch when V is a multiple of 16, which every real vocabulary is). The first spec is the heaviest
    (every flag on, bf16 gradient, the wide block), the one a quick check compiles.
    """
    aligned = {n: [["tt.divisibility", 16]] for n in ("logits_ptr", "grad_ptr", "bias_ptr", "loss_ptr",
                                                       "lse_ptr", "V", "stride_lm", "stride_gm")}  # fmt: skip
    variants = (
        [  # (COMPUTE_GRAD, grad dtype, HAS_ROW_SCALE, COUNT_CORRECT): what forward and backward launch
            (True, dt, False, cc) for dt in ("bf16", "fp16", "fp32") for cc in (True, False)
        ]
        + [(False, "fp32", False, cc) for cc in (True, False)]
        + [(True, dt, True, False) for dt in ("bf16", "fp16", "fp32")]
    )
    specs = []
    launched = [(ROW_CONFIGS[0], True), (ROW_CONFIGS[1], True), (ROW_CONFIGS[1], False)]  # see _row_config
    for (block_v, num_warps), align in launched:
        for compute_grad, grad_dt, row_scale, count_correct in variants:
            for flags in range(8):
                constexprs = dict(
                    HAS_BIAS=not flags & 1, HAS_SOFTCAP=not flags & 2, HAS_SMOOTHING=not flags & 4,
                    HAS_ROW_SCALE=row_scale, COMPUTE_GRAD=compute_grad, COUNT_CORRECT=count_correct,
                    BLOCK_V=block_v,
                )  # fmt: skip
                signature = {
                    "logits_ptr": "*fp32", "grad_ptr": f"*{grad_dt}", "bias_ptr": "*fp32", "labels_ptr": "*i64",
                    "row_scale_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "correct_ptr": "*i64",
                    "V": "i32", "stride_lm": "i32", "stride_gm": "i32", "softcap": "fp32", "label_smoothing": "fp32",
                    **dict.fromkeys(constexprs, "constexpr"),
                }  # fmt: skip
                specs.append(dict(
                    name="_ce_rows_kernel", fn=_ce_rows_kernel, signature=signature, constexprs=constexprs,
                    num_warps=num_warps, num_stages=3, attrs=aligned if align else {},
                ))  # fmt: skip
    return specs
