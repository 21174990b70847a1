"""Packed (varlen, cu_seqlens) Gated DeltaNet: the two token mixers of Qwen3.5 / Qwen3-Next linear attention
layers, restarted at every conversation boundary of a packed row.

A Gated DeltaNet layer runs a causal depthwise short convolution (kernel 4) over its q/k/v projections, then
the gated delta rule, a recurrence whose state ``S`` ([Dk, Dv] per head) is decayed by ``exp(g_t)`` and
corrected towards ``v_t`` along ``k_t`` with step ``beta_t`` at each token. In a packed row both must
start afresh at each conversation: no convolution tap reads the previous conversation, and the state starts
from zero (or a given initial state) at each boundary. transformers' torch fallbacks ignore ``cu_seqlens``
and mix packed conversations; these functions take it.

- :func:`short_conv_varlen`: the convolution as K shifted multiply-adds, each tap masked by the token's
  position inside its sequence (sync-free, vectorised over the row).
- :func:`chunk_gated_delta_rule_varlen`: transformers' chunked algorithm (UT transform per chunk of 64,
  then a scan over chunks), with every sequence padded to whole chunks so that no chunk straddles a
  boundary; the scan runs all sequences side by side, one step per chunk of the longest one.
  On CUDA, flash-linear-attention's kernel (which takes ``cu_seqlens``) is used when it is installed.

Reads top to bottom: the packed layout, the two functions, then the plain-torch references
(``*_ref``: one sequence at a time, the recurrence token by token) that tests compare with.
Every function is differentiable (plain torch autograd).
"""

from __future__ import annotations

import importlib
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------- layout


class ChunkLayout(NamedTuple):
    """Where each token of a packed row goes when every sequence is padded to whole chunks."""

    dest: torch.Tensor  # [T] int64: a token's index in the padded row of num_chunks * chunk_size slots
    num_chunks: int
    first_chunk: list[int]  # per sequence, in cu_seqlens order
    chunks: list[int]  # per sequence: how many chunks it covers (0 for an empty sequence)


_LAYOUT_CACHE: list = [None, None, None]  # [weakref to the last cu_seqlens, chunk size, its ChunkLayout]


def chunk_layout(cu_seqlens: torch.Tensor, chunk_size: int) -> ChunkLayout:
    """The padded-chunk layout of a packed row (:class:`ChunkLayout`). Reads ``cu_seqlens`` on the host once
    per tensor: every layer of a forward gets the same tensor, so a step syncs once, not once per layer."""
    ref, size, cached = _LAYOUT_CACHE
    if ref is not None and ref() is cu_seqlens and size == chunk_size:
        return cached
    cu = [int(c) for c in cu_seqlens.tolist()]
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    if any(n < 0 for n in lengths) or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu}")
    chunks = [-(-n // chunk_size) for n in lengths]
    first, dest, at = [], [], 0
    for n, c in zip(lengths, chunks, strict=True):
        first.append(at)
        dest.append(torch.arange(n) + at * chunk_size)
        at += c
    dest = torch.cat(dest) if dest else torch.zeros(0, dtype=torch.long)
    layout = ChunkLayout(dest.to(cu_seqlens.device), at, first, chunks)
    _LAYOUT_CACHE[:] = [weakref.ref(cu_seqlens), chunk_size, layout]
    return layout


def positions_in_sequence(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: each token's position inside its sequence (0 at every boundary), on the device."""
    cu = cu_seqlens.to(torch.long)
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    return t - cu[seq]


# ------------------------------------------------------------------------------------- convolution


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"short convolution activation {activation!r}: only silu (or None) is supported")


def short_conv_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution that restarts at every sequence boundary.

    Args:
        x: [B, C, T] (channels first, as transformers' ``causal_conv1d_fn``), any float dtype.
        weight: [C, K], tap K-1 multiplies the current token, tap K-1-j the token j steps back.
        bias: [C] or None.
        cu_seqlens: int [n+1] boundaries of the sequences packed in a row (B must be 1), or None: each
            row is one sequence.
        activation: None or "silu", applied after the bias.
    Returns:
        [B, C, T] in x's dtype, computed in weight's dtype (as transformers does).
    """
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"x must be [B, C, T] and weight [C, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    batch, _, total = x.shape
    taps = weight.shape[1]
    xs = x.to(weight.dtype)
    if cu_seqlens is None:
        pos = torch.arange(total, device=x.device)
    elif batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row, but x has {batch} rows")
    else:
        pos = positions_in_sequence(cu_seqlens, total)
    out = xs * weight[:, taps - 1, None]
    for j in range(1, taps):  # tap j steps back reads nothing before the token's own sequence start
        shifted = F.pad(xs[..., : total - j], (j, 0)) if j < total else torch.zeros_like(xs)
        out = out + shifted.masked_fill(pos < j, 0.0) * weight[:, taps - 1 - j, None]
    if bias is not None:
        out = out + bias[:, None]
    return _activate(out, activation).to(x.dtype)


# --------------------------------------------------------------------------------- gated delta rule


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # as transformers and fla


def _fla_chunk_gated_delta_rule():
    """flash-linear-attention's chunked kernel (takes cu_seqlens), or None when it is not installed."""
    try:
        return importlib.import_module("fla.ops.gated_delta_rule").chunk_gated_delta_rule
    except Exception:  # noqa: BLE001  not installed, or built for another torch: the torch path serves
        return None


def gated_delta_rule_backend(device: torch.device | str, backend: str = "auto") -> str:
    """Which runs the recurrence: "fla" (flash-linear-attention, CUDA only, when installed) or "torch".
    ``backend`` forces one."""
    if backend == "torch":
        return "torch"
    usable = torch.device(device).type == "cuda" and _fla_chunk_gated_delta_rule() is not None
    if backend == "fla" and not usable:
        raise ValueError("gated delta rule backend fla needs CUDA and the flash-linear-attention package")
    return "fla" if usable else "torch"


def chunk_gated_delta_rule_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule over packed sequences, chunked, with the state restarted at each boundary.

    Args:
        query, key: [B, T, Hk, Dk]; value: [B, T, Hv, Dv] with Hv a multiple of Hk (each q/k head serves
            Hv / Hk consecutive value heads).
        g: [B, T, Hv] log decay (<= 0); beta: [B, T, Hv] write strength.
        cu_seqlens: int [n+1] boundaries of the n sequences packed in a row (B must be 1), or None: each
            of the B rows is one sequence.
        chunk_size: tokens per chunk of the UT transform.
        initial_state: [n (or B), Hv, Dk, Dv] state each sequence starts from, or None (zeros).
        output_final_state: also return each sequence's final state [n (or B), Hv, Dk, Dv].
        use_qk_l2norm_in_kernel: L2-normalise q and k first (Qwen3.5 / Qwen3-Next set it).
        backend: "torch", or "fla" (flash-linear-attention on CUDA; see :func:`gated_delta_rule_backend`).
    Returns:
        (output [B, T, Hv, Dv] in query's dtype, final states or None). Computed in fp32 (fp64 for fp64
        inputs), queries scaled by Dk ** -0.5, exactly transformers' ``torch_chunk_gated_delta_rule`` run
        on each sequence alone.
    """
    batch, total, heads_k, dim_k = key.shape
    heads_v, dim_v = value.shape[-2:]
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row, but query has {batch} rows")
    if heads_v % heads_k:
        raise ValueError(f"{heads_v} value heads are not a multiple of {heads_k} query/key heads")
    if backend == "fla":
        fla = _fla_chunk_gated_delta_rule()
        return fla(
            query, key, value, g=g, beta=beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(torch.long),
        )  # fmt: skip
    if cu_seqlens is None:  # each row one sequence: the same thing with the rows laid end to end
        cu_seqlens = torch.arange(0, (batch + 1) * total, total, device=query.device, dtype=torch.int32)
    layout = chunk_layout(cu_seqlens, chunk_size)
    dtype = torch.promote_types(query.dtype, torch.float32)
    if heads_k != heads_v:
        query = query.repeat_interleave(heads_v // heads_k, dim=2)
        key = key.repeat_interleave(heads_v // heads_k, dim=2)
    q, k, v = (x.reshape(batch * total, heads_v, -1).to(dtype) for x in (query, key, value))
    b, decay = (x.reshape(batch * total, heads_v).to(dtype) for x in (beta, g))
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * dim_k**-0.5

    # every sequence padded to whole chunks: pads have k = v = beta = 0 and decay 0, so they write nothing
    slots, n, c = layout.num_chunks * chunk_size, layout.num_chunks, chunk_size

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [T, H, ...] -> [N, H, C, ...]
        padded = x.new_zeros(slots, *x.shape[1:]).index_copy(0, layout.dest, x)
        return padded.reshape(n, c, *x.shape[1:]).transpose(1, 2)

    q, k, v, b, decay = (chunked(x) for x in (q, k, v, b, decay))
    v_beta, k_beta = v * b[..., None], k * b[..., None]
    cum = decay.cumsum(-1)  # [N, H, C]: log of the decay from the chunk's start to each position
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    new_values = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(
        ut, k_beta * cum.exp()[..., None], upper=False, unitriangular=True
    )
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]

    # the scan: all sequences side by side, longest first, so the ones still running are a prefix
    order = sorted(range(len(layout.chunks)), key=lambda s: -layout.chunks[s])
    steps = layout.chunks[order[0]] if order else 0
    if initial_state is None:
        state = q.new_zeros(len(order), heads_v, dim_k, dim_v)
    else:
        state = initial_state.to(dtype)[torch.tensor(order, device=q.device)]
    outs, ids, finals = [], [], [None] * len(order)
    for step in range(steps):
        live = sum(layout.chunks[s] > step for s in order)
        for rank in range(live, state.shape[0]):  # sequences that ended at the previous step
            finals[order[rank]] = state[rank]
        state = state[:live]
        at = [layout.first_chunk[s] + step for s in order[:live]]
        idx = torch.tensor(at, device=q.device)
        v_new = new_values[idx] - k_cumdecay[idx] @ state
        outs.append(q[idx] @ state + intra[idx] @ v_new)
        ids += at
        state = state * chunk_decay[idx] + k[idx].transpose(-1, -2) @ v_new
    for rank in range(state.shape[0]):
        finals[order[rank]] = state[rank]
    if outs:
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(ids)] = torch.arange(n)
        out = torch.cat(outs)[inverse.to(q.device)]  # back to chunk order
    else:
        out = q.new_zeros(0, heads_v, c, dim_v)
    out = out.transpose(1, 2).reshape(slots, heads_v, dim_v).index_select(0, layout.dest)
    out = out.reshape(batch, total, heads_v, dim_v).to(query.dtype)
    final = None
    if output_final_state:
        zero = q.new_zeros(heads_v, dim_k, dim_v)  # an empty sequence without an initial state
        final = torch.stack([f if f is not None else zero for f in finals]) if finals else None
    return out, final


# -------------------------------------------------------------------------------------- references


def short_conv_varlen_ref(x, weight, bias=None, *, cu_seqlens=None, activation=None) -> torch.Tensor:
    """:func:`short_conv_varlen` by ``F.conv1d`` on each sequence alone (B = 1 with cu_seqlens)."""
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, x.shape[-1]])
    taps = weight.shape[1]
    cu = cu_seqlens.tolist()
    parts = [
        F.conv1d(
            x[..., a:b].to(weight.dtype), weight[:, None], bias, padding=taps - 1, groups=weight.shape[0]
        )[..., : b - a]
        for a, b in zip(cu[:-1], cu[1:], strict=True)
    ]
    return _activate(torch.cat(parts, dim=-1), activation).to(x.dtype)


def gated_delta_rule_ref(
    query, key, value, g, beta, *, cu_seqlens=None, initial_state=None, use_qk_l2norm_in_kernel=False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token, each sequence alone (B = 1 with cu_seqlens), in the inputs' dtype
    promoted to fp32: ``S = exp(g) S; S += k (beta (v - k^T S))^T; o = q^T S``. Returns (output, finals)."""
    batch, total, heads_k, dim_k = key.shape
    heads_v, dim_v = value.shape[-2:]
    dtype = torch.promote_types(query.dtype, torch.float32)
    rep = heads_v // heads_k
    q, k = (
        x.repeat_interleave(rep, dim=2).reshape(batch * total, heads_v, dim_k).to(dtype) for x in (query, key)
    )
    v = value.reshape(batch * total, heads_v, dim_v).to(dtype)
    b, decay = (x.reshape(batch * total, heads_v).to(dtype) for x in (beta, g))
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * dim_k**-0.5
    cu = cu_seqlens.tolist() if cu_seqlens is not None else list(range(0, (batch + 1) * total, total))
    outs, finals = [], []
    for s, (start, end) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        state = q.new_zeros(heads_v, dim_k, dim_v) if initial_state is None else initial_state[s].to(dtype)
        for t in range(start, end):
            state = state * decay[t].exp()[:, None, None]
            delta = (v[t] - (state * k[t][..., None]).sum(-2)) * b[t][:, None]
            state = state + k[t][..., None] * delta[:, None, :]
            outs.append((state * q[t][..., None]).sum(-2))
        finals.append(state)
    out = torch.stack(outs) if outs else q.new_zeros(0, heads_v, dim_v)
    return out.reshape(batch, total, heads_v, dim_v).to(query.dtype), torch.stack(finals)
