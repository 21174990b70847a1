"""Flash attention over packed rows (``cu_seqlens``) in Triton: causal, GQA, sliding window, softcap, sinks.

Many conversations share one row of T tokens; query i of a conversation attends to its keys j with
``i - W < j <= i`` (W = sliding window, the number of keys including itself; no window: ``j <= i``).
Semantics follow transformers' eager attention (DESIGN.md, "Attention per layer"):

- score ``s_ij = σ·q_i·k_j``, or with softcap c, ``s_ij = c·tanh(σ·q_i·k_j / c)``;
- sinks: per-head logit ``b_h``, an extra softmax column without value: ``L_i = log(Σ_j e^s_ij + e^b_h)``.

Reads top to bottom: the forward kernel (online softmax, saves L_i in log2 units), the two backward
kernels, block sizes and the compile specs, the launchers, one autograd.Function, the public function,
and the plain-torch reference.

The backward has no atomics: one kernel owns each key block (dk, dv, summed over the GQA group's query
heads inside the program) and one owns each query block (dq); the dq kernel also stores D_i = dO_i·O_i
for the other, and the sink gradient is one torch reduction over L_i and D_i. The backward is
deterministic by construction.
Every kernel loops only over the blocks that intersect the causal / window band; the mask is applied
only on blocks that cross the band's edges or the end of the conversation.

The grid is sized from ``max_seqlen`` (a host int) and the number of conversations; the per-conversation
bounds are read on the device, so a call never synchronises with the host.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# the stable tanh both kernels use for softcaps; the guard that launches on the tensors' GPU, not the current
from tritrain_kernels.masked_ce import _device_guard, _tanh

LOG2E = tl.constexpr(1.4426950408889634)
_NO_WINDOW = 1 << 30  # "unbounded" band edge; i ± 2^30 stays inside int32 for any row length
_NO_SINK = -1.0e30  # sink logit of "no sink": the online softmax starts at (m, l) = (b, 1), e^(b - m) -> 0
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------- kernels

# Offsets: every head and row index is cast to int64 before it meets a stride. Head-major q or k (stride_qh
# = T·D, e.g. GLM-4's partial-rotary cat) pass 2^31 elements at ~541k tokens with 32 heads of 128; row
# indices times stride_t do the same for any layout. Two exceptions stay int32: band edges (the launcher
# clamps windows) and the dk/dv kernel's head offsets into the [Hq, T] Lse and Delta (_check: Hq·T < 2^31).


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    # DOT_DTYPE is the input dtype (the casts vanish), except under Triton's interpreter, which multiplies
    # bf16 tiles as their raw uint16 bits: there fp32, which is exact (bf16 x bf16 fits in fp32).
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _scores(qk, sm_scale, softcap, SOFTCAP: tl.constexpr):
    """Raw q·k -> scores in log2 units, softcapped when SOFTCAP."""
    if SOFTCAP:
        s = (softcap * LOG2E) * _tanh(qk * (sm_scale / softcap))
    else:
        s = qk * (sm_scale * LOG2E)
    return s


@triton.jit
def _softcap_grad(s, softcap):
    """∂s/∂(σq·k) = 1 - (s/c)^2, from the softcapped score s in log2 units."""
    t = s / (softcap * LOG2E)
    return 1.0 - t * t


@triton.jit
def _tile_mask(ok, offs_d, head_dim, EVEN_D: tl.constexpr):
    """Load/store mask of a [rows, BLOCK_D] tile: rows in range and, when padded, columns < head_dim."""
    mask = ok[:, None]
    if not EVEN_D:
        mask = mask & (offs_d[None, :] < head_dim)
    return mask


@triton.jit
def _band_mask(rows, cols, seqlen, window_left, window_right):
    """[len(rows), len(cols)] mask of allowed (query, key) pairs: i - W_left < j <= i + W_right, j < L."""
    return (
        (cols[None, :] < seqlen)
        & (cols[None, :] <= rows[:, None] + window_right)
        & (cols[None, :] > rows[:, None] - window_left)
    )


@triton.jit
def _tile(base, rows, stride_t, offs_d):
    """Pointers of a [len(rows), BLOCK_D] tile. Rows start 16-byte aligned (the launcher checks base and
    strides), which lets loads and stores vectorise whatever the compiler knows of the arguments."""
    row_ptrs = tl.multiple_of(base + rows * stride_t, 16)
    return row_ptrs[:, None] + offs_d[None, :]


@triton.jit
def _fwd_kernel(
    # pointers
    Q, K, V, Sinks, Out, Lse, cu_seqlens,
    # strides (the last dim is contiguous); Lse is [Hq, T]
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    # sizes and options
    head_dim, group, sm_scale, softcap, window_left, window_right,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    # last query blocks first: under the causal band they carry the most keys (longest-first scheduling)
    pid_m, seq = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)  # int64: see the offsets note above
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (start + offs_m).to(tl.int64)
    q_mask = _tile_mask(offs_m < seqlen, offs_d, head_dim, EVEN_D)
    q = tl.load(_tile(Q + h * stride_qh, rows, stride_qt, offs_d), mask=q_mask, other=0.0)

    # the keys that intersect the band of rows [m0, m0 + BLOCK_M)
    lo = tl.maximum(m0 - window_left + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(seqlen, m0 + BLOCK_M + window_right)
    k_base = K + hk * stride_kh
    v_base = V + hk * stride_vh

    # online softmax in log2 units, started from the sink column (or from "no sink", which vanishes)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(Sinks + h) * LOG2E
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_rows = (start + cols).to(tl.int64)
        kv_mask = _tile_mask(cols < seqlen, offs_d, head_dim, EVEN_D)
        k = tl.load(_tile(k_base, kv_rows, stride_kt, offs_d), mask=kv_mask, other=0.0)
        s = _scores(_dot(q, tl.trans(k), DOT_DTYPE), sm_scale, softcap, SOFTCAP)
        edge = (n0 + BLOCK_N > seqlen) | (n0 + BLOCK_N - 1 > m0 + window_right)
        edge |= n0 <= m0 + BLOCK_M - 1 - window_left
        if edge:
            s = tl.where(_band_mask(offs_m, cols, seqlen, window_left, window_right), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile(v_base, kv_rows, stride_vt, offs_d), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_DTYPE)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(_tile(Out + h * stride_oh, rows, stride_ot, offs_d), out, mask=q_mask)
    tl.store(Lse + h * stride_lh + rows, m_i + tl.log2(l_i), mask=offs_m < seqlen)


@triton.jit
def _bwd_dq_kernel(
    # pointers
    Q, K, V, Out, dO, Lse, Delta, dQ, cu_seqlens,
    # strides (the last dim is contiguous); Lse and Delta are [Hq, T] with stride_lh
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
    # sizes and options
    head_dim, group, sm_scale, softcap, window_left, window_right,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    # last query blocks first: under the causal band they carry the most keys (longest-first scheduling)
    pid_m, seq = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)  # int64: see the offsets note above
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    hk = h // group
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (start + offs_m).to(tl.int64)
    q_mask = _tile_mask(offs_m < seqlen, offs_d, head_dim, EVEN_D)
    q = tl.load(_tile(Q + h * stride_qh, rows, stride_qt, offs_d), mask=q_mask, other=0.0)
    do = tl.load(_tile(dO + h * stride_doh, rows, stride_dot, offs_d), mask=q_mask, other=0.0)
    o = tl.load(_tile(Out + h * stride_oh, rows, stride_ot, offs_d), mask=q_mask, other=0.0)
    lse = tl.load(Lse + h * stride_lh + rows, mask=offs_m < seqlen, other=0.0)
    # D_i = dO_i·O_i, stored for the dk/dv kernel (launched after this one) and the sink gradient
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + h * stride_lh + rows, delta, mask=offs_m < seqlen)

    lo = tl.maximum(m0 - window_left + 1, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(seqlen, m0 + BLOCK_M + window_right)
    k_base = K + hk * stride_kh
    v_base = V + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_rows = (start + cols).to(tl.int64)
        kv_mask = _tile_mask(cols < seqlen, offs_d, head_dim, EVEN_D)
        k = tl.load(_tile(k_base, kv_rows, stride_kt, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_tile(v_base, kv_rows, stride_vt, offs_d), mask=kv_mask, other=0.0)
        s = _scores(_dot(q, tl.trans(k), DOT_DTYPE), sm_scale, softcap, SOFTCAP)
        p = tl.exp2(s - lse[:, None])
        edge = (n0 + BLOCK_N > seqlen) | (n0 + BLOCK_N - 1 > m0 + window_right)
        edge |= n0 <= m0 + BLOCK_M - 1 - window_left
        if edge:
            p = tl.where(_band_mask(offs_m, cols, seqlen, window_left, window_right), p, 0.0)
        ds = p * (_dot(do, tl.trans(v), DOT_DTYPE) - delta[:, None])
        if SOFTCAP:
            ds = ds * _softcap_grad(s, softcap)
        dq += _dot(ds.to(k.dtype), k, DOT_DTYPE)

    tl.store(_tile(dQ + h * stride_dqh, rows, stride_dqt, offs_d), dq * sm_scale, mask=q_mask)


@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    Q, K, V, dO, Lse, Delta, dK, dV, cu_seqlens,
    # strides (the last dim is contiguous); Lse and Delta are [Hq, T] with stride_lh
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    # sizes and options
    head_dim, group, sm_scale, softcap, window_left, window_right,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    pid_n, seq, hk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_seqlens + seq)
    seqlen = tl.load(cu_seqlens + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_rows = (start + offs_n).to(tl.int64)
    kv_mask = _tile_mask(offs_n < seqlen, offs_d, head_dim, EVEN_D)
    # head offsets in int64 (see the offsets note above); the head loop itself counts in int32
    k = tl.load(_tile(K + hk.to(tl.int64) * stride_kh, kv_rows, stride_kt, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_tile(V + hk.to(tl.int64) * stride_vh, kv_rows, stride_vt, offs_d), mask=kv_mask, other=0.0)

    # the queries whose band reaches keys [n0, n0 + BLOCK_N): i >= j - W_right and i < j + W_left
    lo = tl.maximum(n0 - window_right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(seqlen, n0 + BLOCK_N - 1 + window_left)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # q and dO of the group's first query head, advanced one head per iteration: recomputing h * stride in
    # int64 in the loop spilled (sm_90, sm_100), and the int32 product of the original wrapped; Lse and
    # Delta advance the same way (int32 offsets, see INT32_STRIDES: an int64 base spilled on sm_80 with
    # Triton 3.6, and h * stride_lh recomputed per iteration spilled on sm_90/sm_100 with Triton 3.6)
    q_base = Q + (hk * group).to(tl.int64) * stride_qh
    do_base = dO + (hk * group).to(tl.int64) * stride_doh
    lse_base = Lse + hk * group * stride_lh
    delta_base = Delta + hk * group * stride_lh
    for _ in range(group):
        for m0 in range(lo, hi, BLOCK_M):
            qi = m0 + offs_m
            rows = (start + qi).to(tl.int64)
            q_mask = _tile_mask(qi < seqlen, offs_d, head_dim, EVEN_D)
            q = tl.load(_tile(q_base, rows, stride_qt, offs_d), mask=q_mask, other=0.0)
            do = tl.load(_tile(do_base, rows, stride_dot, offs_d), mask=q_mask, other=0.0)
            lse = tl.load(lse_base + rows, mask=qi < seqlen, other=0.0)
            delta = tl.load(delta_base + rows, mask=qi < seqlen, other=0.0)
            # transposed scores [BLOCK_N, BLOCK_M]: keys along rows
            s = _scores(_dot(k, tl.trans(q), DOT_DTYPE), sm_scale, softcap, SOFTCAP)
            p = tl.exp2(s - lse[None, :])
            edge = (m0 + BLOCK_M > seqlen) | (n0 + BLOCK_N - 1 > m0 + window_right)
            edge |= n0 <= m0 + BLOCK_M - 1 - window_left
            if edge:
                allowed = tl.trans(_band_mask(qi, offs_n, seqlen, window_left, window_right))
                p = tl.where(allowed & (qi < seqlen)[None, :], p, 0.0)
            dv += _dot(p.to(do.dtype), do, DOT_DTYPE)
            ds = p * (_dot(v, tl.trans(do), DOT_DTYPE) - delta[None, :])
            if SOFTCAP:
                ds = ds * _softcap_grad(s, softcap)
            dk += _dot(ds.to(q.dtype), q, DOT_DTYPE)
        q_base += tl.cast(stride_qh, tl.int64)
        do_base += tl.cast(stride_doh, tl.int64)
        lse_base += stride_lh
        delta_base += stride_lh

    tl.store(
        _tile(dK + hk.to(tl.int64) * stride_dkh, kv_rows, stride_dkt, offs_d), dk * sm_scale, mask=kv_mask
    )
    tl.store(_tile(dV + hk.to(tl.int64) * stride_dvh, kv_rows, stride_dvt, offs_d), dv, mask=kv_mask)


# ---------------------------------------------------------------------------------- block sizes and specs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)  # head_dim is a multiple of 16 (see _check)


# sm_100 allots these kernels 128 registers a thread: configurations that fit sm_80/sm_90 spilled there
# (8-64 bytes, full compile sweep), so sm_100 gets its own for them. Each is spill-free under both the
# Triton of the declared torch floor (3.6) and the newest (3.9): ptxas allocates differently per release.
_SM100 = {
    ("fwd", 64): (128, 32, 8, 3),
    ("dkdv", 16): (32, 32, 4, 1),
    ("dkdv", 64): (32, 32, 8, 1),
    ("dkdv", 128): (32, 64, 8, 1),
}


def _arch(t: torch.Tensor) -> int:
    """The major compute capability of ``t``'s GPU (a cached host query, no sync); 9 off CUDA."""
    return torch.cuda.get_device_capability(t.device)[0] if t.is_cuda else 9


def _config(kernel: str, block_d: int, arch: int = 9) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher uses: :func:`_gpu_config` on a GPU of
    compute capability ``arch``; under the interpreter small, unequal blocks, so that tests cross many
    block edges."""
    if _interpreting():
        return {"fwd": (32, 16, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)}[kernel]
    return _gpu_config(kernel, block_d, arch)


def _gpu_config(kernel: str, block_d: int, arch: int = 9) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a kernel at a padded head dim on a GPU.

    Chosen so that every spec compiles for sm_80, sm_90 and sm_100 with no register spill (the fp32
    accumulators, BLOCK x D / threads each, bound the tile: 8 warps past D = 128) and shared memory under
    sm_80's 163 KB (16-bit k/v tiles BLOCK_N x D x stages plus q/do and staging: at most 104 KB, the
    forward at D = 256).
    """
    if arch >= 10 and (kernel, block_d) in _SM100:
        return _SM100[(kernel, block_d)]
    small = {"fwd": (128, 64, 8, 3), "dq": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2)}[kernel]
    table = {
        "fwd": {128: (128, 64, 8, 2), 256: (64, 64, 8, 2)},
        "dq": {128: (64, 32, 4, 2), 256: (32, 32, 4, 2)},
        # D = 16 with 2 stages: Triton 3.6's ptxas spills 16 bytes on sm_80 (the floors' Triton)
        "dkdv": {16: (32, 32, 4, 1), 128: (32, 64, 8, 2), 256: (32, 32, 8, 1)},
    }[kernel]
    return table.get(block_d, small)


_KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}
# Strides whose products may stay int32 (the compile test checks that every other is widened to int64 first):
# the dk/dv kernel's head offsets into the [Hq, T] Lse and Delta, bounded by _check's Hq·T < 2^31.
INT32_STRIDES = ("stride_lh",)
# pointer arguments of each kernel (every other argument is an i32 or fp32 scalar, see _signature)
_POINTERS = {
    "fwd": ("Q", "K", "V", "Sinks", "Out", "Lse", "cu_seqlens"),
    "dq": ("Q", "K", "V", "Out", "dO", "Lse", "Delta", "dQ", "cu_seqlens"),
    "dkdv": ("Q", "K", "V", "dO", "Lse", "Delta", "dK", "dV", "cu_seqlens"),
}
_FP32_POINTERS = ("Sinks", "Lse", "Delta")
_FLOAT_ARGS = ("sm_scale", "softcap")
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _signature(kernel: str, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    """Triton type of each argument of a kernel: element pointers, i32/fp32 scalars, constexprs."""
    sig = {}
    for name in _KERNELS[kernel].arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS[kernel]:
            sig[name] = "*" + (
                "fp32" if name in _FP32_POINTERS else "i32" if name == "cu_seqlens" else _TL_NAMES[dtype]
            )
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def compile_specs() -> list[dict]:
    """Every specialisation the launchers can pick on a GPU, for the compile test.

    Per kernel: dtype (bf16, fp16) x padded head dim (16, 32, 64, 128, 256; the last three also padded from
    48, 80..112, 144..240) x SOFTCAP. Causal, window and sinks are runtime arguments: no specialisation.
    """
    specs = []
    for kernel, fn in _KERNELS.items():
        for dtype in (torch.bfloat16, torch.float16):
            for block_d in (16, 32, 64, 128, 256):
                for even_d in (True, False) if block_d > 32 else (True,):  # D is a multiple of 16
                    for softcap in (False, True):
                        # one spec for every target, or one for sm_80/sm_90 and one for sm_100 (_SM100)
                        split = (kernel, block_d) in _SM100
                        for arch, targets in ((9, (80, 90)), (10, (100,))) if split else ((9, None),):
                            block_m, block_n, warps, stages = _gpu_config(kernel, block_d, arch)
                            constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
                                          "EVEN_D": even_d, "SOFTCAP": softcap, "DOT_DTYPE": _TL_DTYPES[dtype]}  # fmt: skip
                            sig = _signature(kernel, dtype, constexprs)
                            specs.append({
                                "name": f"{kernel}_{_TL_NAMES[dtype]}_d{block_d}{'' if even_d else 'pad'}"
                                        f"{'_softcap' if softcap else ''}",
                                "fn": fn, "signature": sig, "constexprs": constexprs,
                                "num_warps": warps, "num_stages": stages,
                                **({"targets": targets} if targets else {}),
                            })  # fmt: skip
    return specs


# ------------------------------------------------------------------------------------------------ launchers


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous last dim, 16-byte aligned base and row strides (the kernels' _tile promise)."""
    elems = 16 // x.element_size()
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % elems or x.stride(1) % elems:
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
    return x


def _options(block_d, head_dim, softcap, dtype):
    dot_dtype = tl.float32 if _interpreting() and dtype == torch.bfloat16 else _TL_DTYPES[dtype]
    return {
        "BLOCK_D": block_d,
        "EVEN_D": block_d == head_dim,
        "SOFTCAP": softcap is not None,
        "DOT_DTYPE": dot_dtype,
    }


def _forward(q, k, v, sinks, cu_seqlens, max_seqlen, scale, window_left, window_right, softcap):
    t, hq, d = q.shape
    block_d = _block_d(d)
    block_m, block_n, warps, stages = _config("fwd", block_d, _arch(q))
    out = torch.empty_like(q)
    lse = torch.empty(hq, t, device=q.device, dtype=torch.float32)  # log2 units
    grid = (triton.cdiv(max_seqlen, block_m), cu_seqlens.shape[0] - 1, hq)
    with _device_guard(q):
        _fwd_kernel[grid](
            q, k, v, sinks, out, lse, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            d, hq // k.shape[1], scale, softcap or 1.0, window_left, window_right,
            BLOCK_M=block_m, BLOCK_N=block_n, **_options(block_d, d, softcap, q.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out, lse


def _backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, window_left, window_right, softcap):
    t, hq, d = q.shape
    hkv = k.shape[1]
    block_d = _block_d(d)
    nseq = cu_seqlens.shape[0] - 1
    common = (d, hq // hkv, scale, softcap or 1.0, window_left, window_right)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)

    with _device_guard(q):
        block_m, block_n, warps, stages = _config("dq", block_d, _arch(q))
        _bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), nseq, hq)](
            q, k, v, out, do, lse, delta, dq, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            *common,
            BLOCK_M=block_m, BLOCK_N=block_n, **_options(block_d, d, softcap, q.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip
        # after the dq kernel, which writes delta
        block_m, block_n, warps, stages = _config("dkdv", block_d, _arch(q))
        _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), nseq, hkv)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            *common,
            BLOCK_M=block_m, BLOCK_N=block_n, **_options(block_d, d, softcap, q.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return dq, dk, dv, delta


# ------------------------------------------------------------------------------------------------- autograd


class _FlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_seqlens, max_seqlen, scale, window_left, window_right, softcap):
        q, k, v = _aligned(q), _aligned(k), _aligned(v)
        sink_logits = sinks.float() if sinks is not None else _no_sinks(q)
        out, lse = _forward(
            q, k, v, sink_logits, cu_seqlens, max_seqlen, scale, window_left, window_right, softcap
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, sinks)
        ctx.args = (max_seqlen, scale, window_left, window_right, softcap)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, sinks = ctx.saved_tensors
        dq, dk, dv, delta = _backward(_aligned(dout), q, k, v, out, lse, cu_seqlens, *ctx.args)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # ∂L/∂b_h = -Σ_i exp(b_h - L_i)·D_i; lse holds L_i in log2 units
            p_sink = torch.exp2(sinks.float()[:, None] * LOG2E.value - lse)
            dsinks = -(p_sink * delta).sum(1).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None


def _no_sinks(q):
    return torch.full((q.shape[1],), _NO_SINK, device=q.device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- public API


def _check(q, k, v, cu_seqlens, max_seqlen, causal, window, softcap, sinks, dtypes=_DTYPES):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    (t, hq, d), hkv = q.shape, k.shape[1]
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"q is {tuple(q.shape)} but k is {tuple(k.shape)}: T and D must match")
    if hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of k's {hkv} (GQA needs Hq % Hkv == 0)")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {dtypes}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > 256 or d % 16 or d == 0:
        raise ValueError(
            f"head dim {d} unsupported: a multiple of 16 up to 256 (64, 80, 96, 128, 192, 256...)"
        )
    if q.is_cuda and q.dtype == torch.float32 and dtypes == _DTYPES:
        raise ValueError("fp32 attention runs only under the Triton interpreter; use bf16 or fp16 on a GPU")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D int32 with >= 2 entries; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device or k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k, v and cu_seqlens must be on one device; got {q.device}, {k.device}, {v.device}, {cu_seqlens.device}"
        )
    if hq * t >= 2**31:  # the backward's int32 offsets into its [Hq, T] log-sum-exp (see _bwd_dkdv_kernel)
        raise ValueError(f"at most 2^31 - 1 query heads x tokens per call; got {hq} x {t}: split the batch")
    if cu_seqlens.shape[0] - 1 > 65535:
        raise ValueError(f"at most 65535 sequences per call; got {cu_seqlens.shape[0] - 1}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive Python int (no device sync); got {max_seqlen!r}")
    if window is not None and (not isinstance(window, int) or window < 1 or not causal):
        raise ValueError(f"window must be a positive int W (keys j > i - W) with causal=True; got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None; got {softcap!r}")
    if sinks is not None and (
        sinks.shape != (hq,) or not sinks.is_floating_point() or sinks.device != q.device
    ):
        raise ValueError(
            f"sinks must be a float tensor [{hq}] on {q.device}; got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}"
        )


def flash_varlen_attention(
    q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, window=None, softcap=None,
    sinks=None, deterministic=False,
):  # fmt: skip
    """Attention inside each packed sequence, in Triton; differentiable in q, k, v and sinks.

    Args:
        q: [T, Hq, D] bf16/fp16 (fp32 under the Triton interpreter only), D a multiple of 16 up to 256.
        k, v: [T, Hkv, D], same dtype; Hq % Hkv == 0 (GQA/MQA).
        cu_seqlens: [N + 1] int32 on q's device, sequence boundaries; cu_seqlens[-1] must be T.
        max_seqlen: Python int >= the longest sequence (sizes the grid; never read from the device).
        causal: query i attends to keys j <= i of its sequence (False: all keys of its sequence).
        softmax_scale: σ, default 1/sqrt(D).
        window: sliding window W, the number of keys including itself (j > i - W); needs causal.
        softcap: c, scores become c·tanh(σ·q·k / c).
        sinks: [Hq] per-head sink logits (any float dtype; an extra softmax column with no value).
        deterministic: accepted for interface parity; the backward has no atomics and is always
            deterministic.

    Returns:
        [T, Hq, D] in q's dtype.
    """
    del deterministic  # always deterministic (see the module docstring)
    _check(q, k, v, cu_seqlens, max_seqlen, causal, window, softcap, sinks)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # The kernels add band edges to int32 indices (n0 + BLOCK_N - 1 + W): a window near 2^31 wrapped and left
    # dk, dv zero. Past the longest sequence a window changes nothing, so it is clamped to that.
    window_left = min(window, max_seqlen, _NO_WINDOW) if window is not None else _NO_WINDOW
    window_right = 0 if causal else _NO_WINDOW
    softcap = float(softcap) if softcap is not None else None
    return _FlashVarlen.apply(
        q, k, v, sinks, cu_seqlens, max_seqlen, float(scale), window_left, window_right, softcap
    )


def flash_varlen_attention_ref(
    q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, window=None, softcap=None,
    sinks=None, deterministic=False,
):  # fmt: skip
    """Plain-torch reference of :func:`flash_varlen_attention`: one softmax per sequence, in fp32 (fp64 for
    fp64 inputs), differentiable by autograd in q, k, v and sinks. Reads cu_seqlens on the host."""
    del deterministic
    _check(q, k, v, cu_seqlens, max_seqlen, causal, window, softcap, sinks, dtypes=(*_DTYPES, torch.float64))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    t, hq, d = q.shape
    group = hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    bounds = cu_seqlens.tolist()
    if bounds[-1] != t:
        raise ValueError(f"cu_seqlens covers {bounds[-1]} tokens but q has {t}; cu_seqlens[-1] must be T")
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs = q[s:e].to(compute).transpose(0, 1)  # [Hq, L, D]
        ks = k[s:e].to(compute).repeat_interleave(group, 1).transpose(0, 1)
        vs = v[s:e].to(compute).repeat_interleave(group, 1).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.arange(e - s)[:, None], torch.arange(e - s)[None, :]
        allowed = (j <= i) if causal else torch.ones(e - s, e - s, dtype=torch.bool)
        if window is not None:
            allowed &= j > i - window
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        if sinks is not None:
            sink_col = sinks.to(compute)[:, None, None].expand(hq, e - s, 1)
            scores = torch.cat([scores, sink_col], -1)
        p = scores.softmax(-1)
        p = p[..., : e - s]
        outs.append((p @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)
