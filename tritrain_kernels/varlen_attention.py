"""Variable-length (packed, cu_seqlens) attention with per-layer backend dispatch.

Many conversations share one row of T tokens; ``cu_seqlens`` marks where each one starts, and every
token attends only inside its own conversation. No pad token is ever computed.

Each call states what it needs (:class:`AttentionNeeds`: causal, sliding window, logit softcap, sinks,
head dim, dtype, device, grouped-query heads) and the dispatcher picks the fastest installed backend that
supports all of it: flash-attn (FA2), flash-attn-4 (``flash_attn.cute``), torch's ``varlen_attn``, the
project's Triton kernel (``tritrain_kernels.flash_varlen``) and the plain-torch reference. A feature is never
dropped: a forced backend that cannot run a layer is an error naming what is missing.

Reads top to bottom: the layer's needs, the backends and what each supports, selection, the public
function, then the plain-torch reference. Every backend is differentiable on its own.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_VAR = "TRITRAIN_ATTN_BACKEND"
# fastest first: auto takes the first one that is installed and supports the layer
BACKENDS = ("flash_attn", "flash_attn_cute", "torch_varlen", "triton", "reference")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionNeeds:
    """What one attention call needs from a backend."""

    head_dim: int
    dtype: torch.dtype
    device: str  # device type: "cuda", "cpu", ...
    causal: bool = True
    window: int | None = None  # W keys including the query's own (j > i - W); None: no window
    softcap: float | None = None  # scores become c * tanh(s / c); None: off
    sinks: bool = False  # one learned logit per head as an extra softmax column (gpt-oss)
    gqa: bool = False  # fewer key/value heads than query heads

    def features(self) -> str:
        parts = ["causal" if self.causal else "bidirectional"]
        parts += [f"window {self.window}"] if self.window is not None else []
        parts += [f"softcap {self.softcap:g}"] if self.softcap is not None else []
        return ", ".join(parts + (["sinks"] if self.sinks else []))


def needs_of(q, k, *, causal=True, window=None, softcap=None, sinks=None) -> AttentionNeeds:
    """The needs of a call with these tensors and options."""
    return AttentionNeeds(
        head_dim=q.shape[-1], dtype=q.dtype, device=q.device.type, causal=causal, window=window,
        softcap=softcap, sinks=sinks is not None, gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- backends


def _import_flash_attn():
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _import_flash_attn_cute():
    from flash_attn.cute import flash_attn_varlen_func

    return flash_attn_varlen_func


def _import_torch_varlen():
    return importlib.import_module("torch.nn.attention.varlen").varlen_attn


def _import_triton():
    return importlib.import_module("tritrain_kernels.flash_varlen").flash_varlen_attention


def _left_right(causal, window):
    """flash-attn's window_size: W keys including the query's own are W - 1 to its left."""
    left = -1 if window is None else window - 1
    return (left, 0 if causal else left)


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, sinks):
    # FA2 handles GQA natively (Hq % Hkv == 0) and has its own autograd.Function.
    fn = _import_flash_attn()
    extra = {"softcap": softcap} if softcap else {}
    if window is not None:
        extra["window_size"] = _left_right(causal, window)
    return fn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, **extra,
    )  # fmt: skip


def _flash_attn_cute(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, sinks):
    # flash-attn-4 takes keyword arguments only and returns (out, lse) in some releases.
    fn = _import_flash_attn_cute()
    extra = {} if window is None else {"window_size": _left_right(causal, window)}
    out = fn(
        q, k, v,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        softmax_scale=softmax_scale, causal=causal, **extra,
    )  # fmt: skip
    return out[0] if isinstance(out, tuple) else out


def torch_varlen_call(fn, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window=None):
    """Call a ``torch.nn.attention.varlen.varlen_attn``-like ``fn`` whatever its release's signature.

    torch 2.10 takes ``is_causal=``; 2.11 replaced it with ``window_size=(-1, 0)`` for causal; 2.12 added
    ``enable_gqa=`` and documents ``(W, 0)`` windows. ``scale=`` is passed when accepted, otherwise folded
    into q. Without ``enable_gqa`` k and v are expanded to q's heads (a copy per layer: auto avoids that).
    """
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = _left_right(causal, window) if causal or window else (-1, -1)
    elif window is not None:
        raise RuntimeError("this torch varlen_attn takes no window_size=; use another backend")
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


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, sinks):
    fn = _import_torch_varlen()
    return torch_varlen_call(fn, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window)


def _triton(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, sinks):
    fn = _import_triton()
    sinks = None if sinks is None else sinks.float()  # its interface takes fp32 sinks; the grad flows back
    return fn(
        q, k, v, cu_seqlens, max_seqlen,
        causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap, sinks=sinks,
    )  # fmt: skip


def _reference(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, sinks):
    return varlen_attention_ref(
        q, k, v, cu_seqlens, max_seqlen,
        causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap, sinks=sinks,
    )  # fmt: skip


_IMPLS = {
    "flash_attn": _flash_attn,
    "flash_attn_cute": _flash_attn_cute,
    "torch_varlen": _torch_varlen,
    "triton": _triton,
    "reference": _reference,
}
_IMPORTS = {
    "flash_attn": _import_flash_attn,
    "flash_attn_cute": _import_flash_attn_cute,
    "torch_varlen": _import_torch_varlen,
    "triton": _import_triton,
}


# ---------------------------------------------------------------------------- what each backend supports


def _params(name: str):
    return inspect.signature(_IMPORTS[name]()).parameters


def _capability(needs: AttentionNeeds) -> tuple[int, int]:
    return torch.cuda.get_device_capability() if needs.device == "cuda" else (0, 0)


def _flash_attn_lacks(needs: AttentionNeeds) -> list[str]:
    lacks = ["sinks"] if needs.sinks else []
    if needs.window is not None and "window_size" not in _params("flash_attn"):
        lacks.append("window (flash-attn < 2.3)")
    if needs.softcap and "softcap" not in _params("flash_attn"):
        lacks.append("softcap (flash-attn < 2.6)")
    if needs.head_dim > 256 or needs.head_dim % 8:
        lacks.append(f"head dim {needs.head_dim}")
    if _capability(needs) < (8, 0):
        lacks.append("this GPU (needs sm80+)")
    return lacks


def _flash_attn_cute_lacks(needs: AttentionNeeds) -> list[str]:
    lacks = [f for f, on in (("softcap", needs.softcap), ("sinks", needs.sinks)) if on]
    if needs.window is not None and "window_size" not in _params("flash_attn_cute"):
        lacks.append("window")
    if needs.head_dim not in (64, 96, 128):
        lacks.append(f"head dim {needs.head_dim}")
    if _capability(needs) < (9, 0):
        lacks.append("this GPU (needs sm90+)")
    return lacks


def _torch_varlen_lacks(needs: AttentionNeeds) -> list[str]:
    lacks = [f for f, on in (("softcap", needs.softcap), ("sinks", needs.sinks)) if on]
    modern = "enable_gqa" in _params("torch_varlen")  # torch >= 2.12
    if needs.window is not None and not modern:
        lacks.append("window (torch < 2.12)")
    if needs.gqa and not modern:
        lacks.append("GQA without copying k and v per layer (torch < 2.12)")
    if needs.head_dim > 256 or needs.head_dim % 8:
        lacks.append(f"head dim {needs.head_dim}")
    return lacks


def _triton_lacks(needs: AttentionNeeds) -> list[str]:
    lacks = [] if needs.head_dim <= 256 and needs.head_dim % 16 == 0 else [f"head dim {needs.head_dim}"]
    lacks += ["a window without causal"] if needs.window is not None and not needs.causal else []
    if needs.device == "cuda" and needs.dtype not in (torch.bfloat16, torch.float16):
        lacks.append(f"{str(needs.dtype).removeprefix('torch.')} (compiled for bf16 and fp16 only)")
    if needs.device != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return lacks  # Triton's interpreter runs it on CPU (tests)
    return lacks + ([] if _capability(needs) >= (8, 0) else ["this GPU (needs sm80+)"])


_LACKS = {
    "flash_attn": _flash_attn_lacks,
    "flash_attn_cute": _flash_attn_cute_lacks,
    "torch_varlen": _torch_varlen_lacks,
    "triton": _triton_lacks,
}
_unavailable_cache: dict[str, str | None] = {}


def _unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all, or None when it can."""
    if name == "reference":
        return None
    if name not in _unavailable_cache:
        try:
            _IMPORTS[name]()
            reason = None
        except Exception as exc:  # ImportError, or a broken CUDA extension raising anything else
            reason = f"it cannot be imported ({type(exc).__name__}: {exc})"
        if reason is None and not torch.cuda.is_available():
            if not (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
                reason = "it needs a CUDA device and none is available"
        _unavailable_cache[name] = reason
    return _unavailable_cache[name]


def why_not(name: str, needs: AttentionNeeds) -> str | None:
    """Why backend ``name`` cannot run a call with ``needs``, or None when it can."""
    if name == "reference":
        return None
    reason = _unavailable_reason(name)
    if reason is not None:
        return reason
    if name != "triton" or needs.device == "cuda":
        if needs.device != "cuda" or needs.dtype not in _HALF:
            return f"it needs fp16/bf16 CUDA tensors, not {str(needs.dtype).removeprefix('torch.')} on {needs.device}"
    lacks = _LACKS[name](needs)
    return f"it does not support {', '.join(lacks)}" if lacks else None


# ---------------------------------------------------------------------------------------- selection

_selected: str | None = None  # "auto" or a forced backend name
_choices: dict[AttentionNeeds, str] = {}  # needs -> backend, decided once each


def select_backend(name: str | None = None) -> str:
    """Set how backends are chosen; return ``"auto"`` or the forced name.

    ``name`` is ``"auto"`` (per call, the first of :data:`BACKENDS` installed that supports it), one of
    :data:`BACKENDS` to force it, or None to read ``TRITRAIN_ATTN_BACKEND`` (default ``"auto"``). A forced
    backend that cannot run on this machine is an error.
    """
    global _selected
    requested = name if name is not None else os.environ.get(ENV_VAR, "auto")
    requested = requested.strip().lower() or "auto"
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {requested!r}; choose one of auto, {', '.join(BACKENDS)} "
            f"(argument or {ENV_VAR})"
        )
    if requested != "auto" and (reason := _unavailable_reason(requested)) is not None:
        raise ValueError(
            f"attention backend {requested!r} was requested but {reason}; "
            f"install it or choose another backend (argument or {ENV_VAR}=auto)"
        )
    _selected = requested
    _choices.clear()
    return requested


def current_backend() -> str:
    """``"auto"`` or the forced backend name, selecting it (from the environment) on first use."""
    return _selected if _selected is not None else select_backend()


def choose_backend(needs: AttentionNeeds, backend: str | None = None) -> str:
    """The backend for a call with ``needs``: the forced one (error if it cannot run it) or, under auto,
    the first of :data:`BACKENDS` that can. ``backend`` overrides the selected mode for this call."""
    mode = backend or current_backend()
    if backend is None and needs in _choices:
        return _choices[needs]
    if mode != "auto":
        reason = why_not(mode, needs)
        if reason is not None:
            raise ValueError(
                f"attention backend {mode!r} cannot run this layer ({needs.features()}, head dim "
                f"{needs.head_dim}): {reason}; choose attn_backend auto (or {ENV_VAR}=auto)"
            )
        chosen = mode
    else:
        # off CUDA the reference is the fast path (the Triton interpreter is for tests, forced only)
        candidates = BACKENDS if needs.device == "cuda" else ("reference",)
        chosen = next(name for name in candidates if why_not(name, needs) is None)
    if backend is None:
        _choices[needs] = chosen
    return chosen


# --------------------------------------------------------------------------------------- public function


def _check(q, k, v, cu_seqlens, max_seqlen, window, softcap, sinks):
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
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int (keys including the query's own); got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None; got {softcap!r}")
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(
            f"sinks must be [Hq] = [{q.shape[1]}] (one logit per query head); got {tuple(sinks.shape)}"
        )


def varlen_attention(
    q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, window=None, softcap=None,
    sinks=None, backend=None,
):  # fmt: skip
    """Attention over packed sequences: each token attends only within its own segment.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 (any float dtype on the reference backend).
        k, v: ``[T, Hkv, D]``, same dtype; ``Hq % Hkv == 0`` (grouped-query attention).
        cu_seqlens: ``[n+1]`` int32 on q's device, cumulative segment lengths from 0 to T.
        max_seqlen: Python int, the longest segment (an int so that no backend syncs the device).
        causal: causal mask inside each segment (default True).
        softmax_scale: scale of q·k; default ``1/sqrt(D)``.
        window: sliding window, W keys including the query's own (key j > i - W); None: no window.
        softcap: logit softcap c, scores become ``c * tanh(s / c)``; None: off.
        sinks: ``[Hq]`` per-head sink logits (an extra softmax column with no value), or None.
        backend: force a backend for this call; default: the one :func:`choose_backend` picks.

    Returns:
        ``[T, Hq, D]`` in q's dtype. Differentiable with respect to q, k, v (and sinks) on every backend.
    """
    _check(q, k, v, cu_seqlens, max_seqlen, window, softcap, sinks)
    needs = needs_of(q, k, causal=causal, window=window, softcap=softcap, sinks=sinks)
    name = choose_backend(needs, backend)
    return _IMPLS[name](q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window, softcap, sinks)


# --------------------------------------------------------------------------------------------- reference


def _allowed(n: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
    """[n, n] bool mask of the keys each query sees inside one segment; None when all of them."""
    if window is None and not causal:
        return None
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    allowed = j <= i if causal else torch.ones(n, n, dtype=torch.bool, device=device)
    if window is not None:
        allowed = allowed & (j > i - window) & (j < i + window)
    return allowed


def _segment_ref(qs, ks, vs, causal, scale, window, softcap, sinks):
    """One segment, [H, L, D] each, in the compute dtype: SDPA when it can, explicit scores otherwise."""
    mask = _allowed(qs.shape[1], causal, window, qs.device)
    if softcap is None and sinks is None:
        # 4-D inputs: on CPU, 3-D ones take SDPA's math path (a materialised mask), ~4x slower
        is_causal = causal and window is None
        o = F.scaled_dot_product_attention(
            qs[None],
            ks[None],
            vs[None],
            attn_mask=None if is_causal else mask,
            is_causal=is_causal,
            scale=scale,
        )
        return o[0]
    s = (qs @ ks.transpose(1, 2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        column = sinks.to(s.dtype)[:, None, None].expand(-1, s.shape[1], 1)
        p = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    return p @ vs


def varlen_attention_ref(
    q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, window=None, softcap=None,
    sinks=None,
):  # fmt: skip
    """Plain-torch reference: segment by segment, in fp32 or wider, with every option of
    :func:`varlen_attention`. Reads ``cu_seqlens`` on the host, so it syncs."""
    _check(q, k, v, cu_seqlens, max_seqlen, window, softcap, sinks)
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        qs = q[start:end].to(compute).transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].to(compute).transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].to(compute).transpose(0, 1).repeat_interleave(groups, dim=0)
        outs.append(_segment_ref(qs, ks, vs, causal, scale, window, softcap, sinks).transpose(0, 1))
    out = torch.cat(outs, dim=0) if outs else q.new_zeros((0, *q.shape[1:]), dtype=compute)
    if out.shape[0] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens covers {out.shape[0]} tokens but q has {q.shape[0]}; cu_seqlens[-1] must be T"
        )
    return out.to(q.dtype)
