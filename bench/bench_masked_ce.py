"""Masked linear cross-entropy, forward + backward with a frozen head: ours against the peers.

Providers, compared in one run: ``ours`` (tritrain_kernels.masked_linear_cross_entropy), ``reference``
(tritrain_kernels.masked_linear_cross_entropy_ref: full logits), ``torch_chunked`` (torch's
``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, when the installed torch has it),
``liger`` (liger-kernel's fused linear CE) and ``cce`` (Apple's cut-cross-entropy), when installed
and on CUDA.

Reports median time, peak extra memory (bytes of tensors the call allocates, beyond its inputs)
and TFLOP/s over the valid-row FLOP floor 4·f·N·H·V (frozen head: logits + dh for valid rows).

    python -m pytest bench/bench_masked_ce.py --benchmark-only       # pytest-benchmark
    python bench/bench_masked_ce.py --n 4096 --h 512 --v 32000        # a markdown table
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchutil import git_commit
from tritrain_kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_ref

CUDA = torch.cuda.is_available()
FRACTIONS = [0.0, 0.5, 0.7, 0.9]
# DESIGN.md's reference shapes on CUDA; a small shape on CPU.
SHAPES = [(16384, 4096, 151552, None), (8192, 2304, 256000, 30.0), (16384, 2048, 248320, None)]
CPU_SHAPES = [(4096, 512, 32000, None)]


# ----------------------------------------------------------------------------- providers


def liger_options(V: int, device) -> dict:
    """Liger's extra keywords at typical settings (``--liger-options``): class weights, PaLM's z-loss
    (1e-4), the z-loss and token accuracy returned. Same keywords for ours, the reference and Liger."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    ce_weight = (torch.rand(V, generator=gen) + 0.5).to(device)
    return dict(ce_weight=ce_weight, lse_square_scale=1e-4, return_z_loss=True, return_token_accuracy=True)


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss  # CrossEntropyOutput when extras are asked


def _ours(opts):
    return lambda h, w, y, softcap: _loss(masked_linear_cross_entropy(h, w, y, softcap=softcap, **opts))


def _reference(opts):
    return lambda h, w, y, softcap: _loss(masked_linear_cross_entropy_ref(h, w, y, softcap=softcap, **opts))


def _torch_chunked(h, w, y, softcap):
    return F.linear_cross_entropy(h, w, y, ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions())


def _liger(opts):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, **opts)

    def run(h, w, y, softcap):
        if softcap is not None:
            loss.softcap = softcap
        return _loss(loss(w, h, y))

    return run


def _cce(opts):
    from cut_cross_entropy import linear_cross_entropy

    def run(h, w, y, softcap):
        return linear_cross_entropy(h, w, y, ignore_index=-100, softcap=softcap, shift=False)

    return run


def providers(opts: dict | None = None) -> dict:
    """Name -> callable(h, w, y, softcap) for every provider that runs here; with Liger's keywords
    (``opts``), only those that take them."""
    opts = opts or {}
    out = {"ours": _ours(opts), "reference": _reference(opts)}
    if not opts and hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        out["torch_chunked"] = _torch_chunked
    if CUDA:
        makers = (("liger", _liger),) + ((("cce", _cce),) if not opts else ())
        for name, make in makers:
            try:
                out[name] = make(opts)
            except Exception:  # not installed, or an install that fails to import: no such provider
                pass
    return out


# ----------------------------------------------------------------------------- measurement


def make_inputs(N, H, V, frac, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(N, H, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * (1.0 / H**0.5)).to(device, dtype)  # frozen head
    y = torch.randint(0, V, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < frac] = -100
    return h, w, y.to(device)


def flop_floor(N, H, V, frac) -> float:
    """4·f·N·H·V: logits and dh for the valid rows only (frozen head)."""
    return 4.0 * (1.0 - frac) * N * H * V


def _step(fn, h, w, y, softcap):
    h.grad = None
    loss = fn(h, w, y, softcap)
    loss.backward()
    if h.is_cuda:
        torch.cuda.synchronize()
    return loss


class _PeakLive(TorchDispatchMode):
    """Peak bytes of live tensors created while active (storages counted once)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _track(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key, st.nbytes())

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results of the arguments (e.g. w.t() of the input weight) allocate nothing.
        flat = list(args) + list((kwargs or {}).values())
        arg_storages = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                if t.untyped_storage().data_ptr() not in arg_storages:
                    self._track(t)
        return out


def peak_extra_bytes(fn, h, w, y, softcap) -> int:
    if h.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, h, w, y, softcap)
        return torch.cuda.max_memory_allocated() - base
    mode = _PeakLive()
    with mode:
        _step(fn, h, w, y, softcap)
    return mode.peak


def time_ms(fn, h, w, y, softcap, *, warmup=2, reps=5) -> float:
    for _ in range(warmup):
        _step(fn, h, w, y, softcap)
    times = []
    for _ in range(reps):
        if h.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, h, w, y, softcap)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _step(fn, h, w, y, softcap)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- pytest-benchmark


def _cases():
    shapes = SHAPES if CUDA else CPU_SHAPES
    for N, H, V, softcap in shapes:
        for frac in FRACTIONS:
            for name in providers():
                yield pytest.param(name, N, H, V, softcap, frac, id=f"{name}-N{N}-H{H}-V{V}-masked{frac}")


@pytest.mark.parametrize("provider,N,H,V,softcap,frac", list(_cases()))
def test_masked_ce_fwd_bwd(benchmark, provider, N, H, V, softcap, frac):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    fn = providers()[provider]
    h, w, y = make_inputs(N, H, V, frac, dtype, device)
    benchmark.extra_info["peak_extra_MiB"] = peak_extra_bytes(fn, h, w, y, softcap) / 2**20
    benchmark.pedantic(_step, args=(fn, h, w, y, softcap), rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    secs = benchmark.stats.stats.median
    benchmark.extra_info["floor_TFLOPs"] = flop_floor(N, H, V, frac) / 1e12
    benchmark.extra_info["TFLOP/s_over_floor"] = flop_floor(N, H, V, frac) / secs / 1e12


# ----------------------------------------------------------------------------- table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if CUDA else "fp32")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--providers", nargs="+", default=None)
    p.add_argument(
        "--liger-options",
        action="store_true",
        help="class weights, z-loss 1e-4, z-loss and token accuracy returned (ours, reference, Liger)",
    )
    args = p.parse_args(argv)
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    provs = providers(liger_options(args.v, device) if args.liger_options else None)
    if args.providers:
        provs = {k: v for k, v in provs.items() if k in args.providers}
    dev_name = (
        torch.cuda.get_device_name()
        if CUDA
        else f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    )
    extra = " liger-options (ce_weight, z-loss 1e-4, z-loss and accuracy out)" if args.liger_options else ""
    print(
        f"# {dev_name}; torch {torch.__version__}; date {datetime.date.today()}; commit {git_commit()}\n"
        f"# N={args.n} H={args.h} V={args.v} {args.dtype} softcap={args.softcap}"
        f"{extra}; "
        f"forward+backward, frozen head; median of {args.reps}\n"
    )
    print("| masked | provider | ms | vs ours | peak extra MiB | TFLOP/s over floor |")
    print("|---:|---|---:|---:|---:|---:|")
    for frac in args.fractions:
        h, w, y = make_inputs(args.n, args.h, args.v, frac, dtype, device)
        rows = {}
        for name, fn in provs.items():
            ms = time_ms(fn, h, w, y, args.softcap, reps=args.reps)
            mem = peak_extra_bytes(fn, h, w, y, args.softcap) / 2**20
            rows[name] = (ms, mem)
        ours = rows["ours"][0] if "ours" in rows else float("nan")
        for name, (ms, mem) in rows.items():
            tflops = flop_floor(args.n, args.h, args.v, frac) / (ms / 1e3) / 1e12
            print(f"| {frac:.1f} | {name} | {ms:.1f} | {ms / ours:.2f}x | {mem:.0f} | {tflops:.3f} |")


if __name__ == "__main__":
    main()
