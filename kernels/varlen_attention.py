"""Variable-length (packed, cu_seqlens) attention with backend dispatch.

Many conversations share one row of T tokens; ``cu_seqlens`` marks where each one starts, and every
token attends only inside its own conversation. No pad token is ever computed.

Reads top to bottom: the backends (flash-attn FA2, flash-attn-4, torch's ``varlen_attn``), backend
selection, one differentiable dispatch path, the public function, then the plain-torch reference.
Every backend is differentiable on its own (FA2 and torch's ``varlen_attn`` carry their own autograd
functions, the reference goes through SDPA's), so one dispatch serves forward and backward.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_VAR = "TRITRAIN_ATTN_BACKEND"
BACKENDS = ("flash_attn", "flash_attn_cute", "torch_varlen", "reference")
_CUDA_ONLY = ("flash_attn", "flash_attn_cute", "torch_varlen")


# ----------------------------------------------------------------------------------------------- backends


def _import_flash_attn():
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _import_flash_attn_cute():
    from flash_attn.cute import flash_attn_varlen_func

    return flash_attn_varlen_func


def _import_torch_varlen():
    return importlib.import_module("torch.nn.attention.varlen").varlen_attn


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    # FA2 handles GQA natively (Hq % Hkv == 0) and has its own autograd.Function.
    fn = _import_flash_attn()
    return fn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
    )  # fmt: skip


def _flash_attn_cute(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    # flash-attn-4 takes keyword arguments only and returns (out, lse) in some releases.
    fn = _import_flash_attn_cute()
    out = fn(
        q, k, v,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        softmax_scale=softmax_scale, causal=causal,
    )  # fmt: skip
    return out[0] if isinstance(out, tuple) else out


def torch_varlen_call(fn, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    """Call a ``torch.nn.attention.varlen.varlen_attn``-like ``fn`` whatever its release's signature.

    torch 2.10 takes ``is_causal=``; 2.11 replaced it with ``window_size=(-1, 0)`` for causal; 2.12 added
    ``enable_gqa=``. ``scale=`` is passed when accepted, otherwise folded into q.
    """
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        raise RuntimeError(
            "this torch varlen_attn takes neither window_size= nor is_causal=; use another backend"
        )
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if softmax_scale is not None:
        if "scale" in params:
            kwargs["scale"] = softmax_scale
        else:
            q = q * (softmax_scale * math.sqrt(q.shape[-1]))
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch_varlen_call(_import_torch_varlen(), q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


def _reference(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale)


_IMPLS = {
    "flash_attn": _flash_attn,
    "flash_attn_cute": _flash_attn_cute,
    "torch_varlen": _torch_varlen,
    "reference": _reference,
}
_IMPORTS = {
    "flash_attn": _import_flash_attn,
    "flash_attn_cute": _import_flash_attn_cute,
    "torch_varlen": _import_torch_varlen,
}


# ---------------------------------------------------------------------------------------- selection

_selected: str | None = None  # resolved backend name, chosen once
_forced: bool = False  # True when the name came from config or the environment, not "auto"


def _unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name == "reference":
        return None
    try:
        _IMPORTS[name]()
    except Exception as exc:  # ImportError, or a broken CUDA extension raising anything else
        return f"it cannot be imported ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "it needs a CUDA device and none is available"
    return None


def select_backend(name: str | None = None) -> str:
    """Choose the attention backend once and log it; return the chosen name.

    ``name`` is ``"auto"`` (first available of flash_attn, flash_attn_cute, torch_varlen, reference),
    one of those four names to force it, or None to read the ``TRITRAIN_ATTN_BACKEND`` environment
    variable (default ``"auto"``). A forced backend that cannot run here is an error.
    """
    global _selected, _forced
    requested = name if name is not None else os.environ.get(ENV_VAR, "auto")
    requested = requested.strip().lower() or "auto"
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {requested!r}; choose one of auto, {', '.join(BACKENDS)} "
            f"(argument or {ENV_VAR})"
        )
    if requested == "auto":
        reasons = {}
        for candidate in BACKENDS:
            reasons[candidate] = _unavailable_reason(candidate)
            if reasons[candidate] is None:
                break
        chosen = candidate
        skipped = "; ".join(f"{n}: {r}" for n, r in reasons.items() if r is not None)
        logger.info(
            "varlen attention backend: %s (auto%s)", chosen, f"; skipped {skipped}" if skipped else ""
        )
    else:
        reason = _unavailable_reason(requested)
        if reason is not None:
            raise RuntimeError(
                f"attention backend {requested!r} was requested but {reason}; "
                f"install it or choose another backend (argument or {ENV_VAR}=auto)"
            )
        chosen = requested
        logger.info("varlen attention backend: %s (forced)", chosen)
    _selected, _forced = chosen, requested != "auto"
    return chosen


def current_backend() -> str:
    """The selected backend, selecting it (from the environment) on first use."""
    return _selected if _selected is not None else select_backend()


# ----------------------------------------------------------------------------------- dispatch (autograd)


def _dispatch(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    backend = current_backend()
    if backend in _CUDA_ONLY and (q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16)):
        if _forced:
            raise RuntimeError(
                f"attention backend {backend!r} needs fp16/bf16 CUDA tensors but q is {q.dtype} on {q.device}; "
                f"cast the model to bf16 on CUDA or choose the reference backend ({ENV_VAR}=reference)"
            )
        # auto picked a GPU backend; CPU or fp32 tensors (tests, tools) take the reference
        backend = "reference"
    return _IMPLS[backend](q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


# --------------------------------------------------------------------------------------- public function


def _check(q, k, v, cu_seqlens, max_seqlen):
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(
            f"q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q is {tuple(q.shape)} but k is {tuple(k.shape)}: T and D must match")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q has {q.shape[1]} heads, not a multiple of k's {k.shape[1]} (GQA needs Hq % Hkv == 0)"
        )
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor [n+1] with n >= 1; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(
            f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; move it with .to(q.device)"
        )
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive Python int (no device sync); got {max_seqlen!r}")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None):
    """Attention over packed sequences: each token attends only within its own segment.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 (any float dtype on the reference backend).
        k, v: ``[T, Hkv, D]``, same dtype; ``Hq % Hkv == 0`` (grouped-query attention).
        cu_seqlens: ``[n+1]`` int32 on q's device, cumulative segment lengths from 0 to T.
        max_seqlen: Python int, the longest segment (an int so that no backend syncs the device).
        causal: causal mask inside each segment (default True).
        softmax_scale: scale of q·k; default ``1/sqrt(D)``.

    Returns:
        ``[T, Hq, D]`` in q's dtype. Differentiable with respect to q, k, v on every backend.

    The backend is the one :func:`select_backend` chose (on first use: ``TRITRAIN_ATTN_BACKEND`` or auto).
    CPU or fp32 tensors under an automatically chosen GPU backend take the reference; under a forced
    one they are an error.
    """
    _check(q, k, v, cu_seqlens, max_seqlen)
    return _dispatch(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


# --------------------------------------------------------------------------------------------- reference


def varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None):
    """Plain-torch reference: ``F.scaled_dot_product_attention`` segment by segment, in fp32 or wider.

    Same arguments and result as :func:`varlen_attention`. Reads ``cu_seqlens`` on the host, so it syncs.
    """
    _check(q, k, v, cu_seqlens, max_seqlen)
    compute = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        qs = q[start:end].to(compute).transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].to(compute).transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].to(compute).transpose(0, 1).repeat_interleave(groups, dim=0)
        # 4-D inputs: on CPU, 3-D ones take SDPA's math path (a materialised mask), ~4x slower
        o = F.scaled_dot_product_attention(
            qs[None], ks[None], vs[None], is_causal=causal, scale=softmax_scale
        )
        outs.append(o[0].transpose(0, 1))
    out = torch.cat(outs, dim=0) if outs else q.new_zeros((0, *q.shape[1:]), dtype=compute)
    if out.shape[0] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens covers {out.shape[0]} tokens but q has {q.shape[0]}; cu_seqlens[-1] must be T"
        )
    return out.to(q.dtype)
