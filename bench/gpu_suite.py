"""Every GPU measurement the project claims, in one call, in order of value; each result written at once.

    python bench/gpu_suite.py --quick            # one H100/H200: under 4 minutes
    python bench/gpu_suite.py                    # the full run: under 9 minutes
    python bench/gpu_suite.py --device cpu --tiny   # the same code paths at toy sizes (CI)

Sections, in this order: environment; correctness of every kernel against its reference (three shapes,
bf16 and fp32); the sync-free step (``torch.cuda.set_sync_debug_mode("error")``; on CPU the synchronising
calls are counted); masked CE at N=16384, H=4096, V=151552, labelled fraction 0.3 and 1.0, forward +
backward, frozen and trainable head: the FLOP floor (cuBLAS GEMMs of the labelled rows), ours, the
full-logits reference, torch's chunked ``linear_cross_entropy``, Liger and Cut Cross-Entropy where
importable (time, peak memory); attention backends (the project's Triton kernel, torch varlen, flash-attn);
an end-to-end LoRA step on Qwen2.5-1.5B- and Llama-3-8B-shaped random models with layers cut: ours,
padded HF, HF padding-free, HF + Liger (tokens/s, MFU, peak memory); a short bf16 training run whose loss
must fall. Each section runs in its own try/except: a failure is recorded and the suite moves on. Results
go to ``<out>/gpu_suite.md`` and ``<out>/gpu_suite.json``, rewritten after every result. Installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

# ----------------------------------------------------------------------------------------------- report


class Report:
    """Markdown and JSON of every result so far, rewritten after each one (a killed run keeps its table)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.md, self.json = out_dir / "gpu_suite.md", out_dir / "gpu_suite.json"
        self.sections: list[dict] = []
        self.t0 = time.perf_counter()

    def _write(self):
        lines = []
        for s in self.sections:
            lines += [f"## {s['name']} ({s['status']}, {s['seconds']:.1f} s)", ""]
            if s["rows"]:
                cols = list(dict.fromkeys(k for r in s["rows"] for k in r))
                lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in s["rows"]]
            lines += [f"- {n}" for n in s["notes"]] + [""]
        self.md.write_text("\n".join(lines))
        self.json.write_text(json.dumps(self.sections, indent=1, default=str))

    @contextlib.contextmanager
    def section(self, name: str):
        s = dict(name=name, status="running", seconds=0.0, rows=[], notes=[])
        self.sections.append(s)
        self._write()
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield s
            s["status"] = "ok" if not any(r.get("pass") is False for r in s["rows"]) else "FAILED CHECKS"
        except Exception as e:  # recorded, and the suite goes on with the next section
            s["status"] = "error"
            s["notes"].append(f"error: {type(e).__name__}: {' '.join(str(e).split())[:500]}")
            s["notes"].append("at " + " <- ".join(traceback.format_exc().strip().splitlines()[-3:-1]))
            print(traceback.format_exc(), flush=True)
        finally:
            s["seconds"] = time.perf_counter() - start
            _empty_cache()
            self._write()

    def row(self, s: dict, **fields):
        s["rows"].append(fields)
        print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)
        self._write()

    def note(self, s: dict, text: str):
        s["notes"].append(text)
        print("  " + text, flush=True)
        self._write()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, warmup=1, reps=3) -> float:
    """Median wall time of ``fn()`` in ms, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mib(fn, device) -> float:
    """Peak memory ``fn()`` allocates beyond what was live before, MiB (CUDA allocator; CPU: live tensors)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from bench_masked_ce import _PeakLive

    with _PeakLive() as mode:
        fn()
    return mode.peak / 2**20


def measure(fn, device, reps, warmup=1) -> dict:
    """ms and peak MiB of ``fn``; an out-of-memory becomes a result, not an error. On CUDA the peak is
    read from the timed runs themselves; on CPU one more run is traced for it."""
    try:
        if device.type != "cuda":
            return dict(ms=time_ms(fn, device, warmup=warmup, reps=reps), peak_MiB=peak_mib(fn, device))
        for _ in range(warmup):
            fn()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        ms = time_ms(fn, device, warmup=0, reps=reps)
        return dict(ms=ms, peak_MiB=(torch.cuda.max_memory_allocated(device) - base) / 2**20)
    except torch.OutOfMemoryError:
        _empty_cache()
        return dict(ms=float("nan"), peak_MiB=float("nan"), note="out of memory")


def rel_err(got, want) -> float:
    scale = want.abs().max().item()
    return (got.double() - want.double()).abs().max().item() / max(scale, 1e-30)


# ------------------------------------------------------------------------------------------- sections


def environment(report, args, device):
    from benchutil import git_commit

    with report.section("environment") as s:
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        for mod in ("triton", "transformers", "peft", "flash_attn", "liger_kernel", "cut_cross_entropy"):
            try:
                versions[mod] = getattr(importlib.import_module(mod), "__version__", "installed")
            except Exception:
                versions[mod] = "absent"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        report.row(s, device=name, mode=mode, date=date, commit=git_commit(), **versions)


def _ce_case(N, H, V, frac_masked, dtype, device, *, bias, trainable, seed):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) * (1.0 / H**0.5)).to(device, dtype).requires_grad_(trainable)
    b = (torch.randn(V, generator=gen) * 0.1).to(device, dtype).requires_grad_(trainable) if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    y[torch.rand(N, generator=gen) < frac_masked] = -100
    return h, w, b, y.to(device)


CE_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-4, 2e-2)}  # loss, gradient: relative to max
ATTN_TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


def correctness(report, device, tiny):
    with report.section("correctness: masked CE vs reference (fp64)") as s:
        shapes = [(7, 16, 97), (33, 24, 1500), (64, 32, 8200)] if tiny else [
            (1, 64, 97), (1023, 512, 32003), (4096, 1024, 151552)]  # fmt: skip
        options = [{"softcap": 30.0}, {"bias": True}, {"label_smoothing": 0.1}]
        for (N, H, V), opts in zip(shapes, options, strict=True):
            for dtype in (torch.float32, torch.bfloat16):
                report.row(s, **_ce_correctness(N, H, V, dtype, device, dict(opts)))

    with report.section("correctness: attention vs reference") as s:
        from tritrain_kernels.varlen_attention import select_backend, varlen_attention, varlen_attention_ref

        impls = {f"varlen_attention ({select_backend()})": (varlen_attention, varlen_attention_ref, {})}
        try:
            fv = importlib.import_module("tritrain_kernels.flash_varlen")
            impls["flash_varlen (Triton)"] = (fv.flash_varlen_attention, fv.flash_varlen_attention_ref, {})
            impls["flash_varlen window+softcap"] = (
                fv.flash_varlen_attention,
                fv.flash_varlen_attention_ref,
                {"window": 64, "softcap": 30.0},
            )
        except ModuleNotFoundError:
            report.note(
                s,
                "tritrain_kernels.flash_varlen absent from this checkout",
            )
        lengths = (
            [[5, 17, 3], [64, 1, 100, 31], [700, 300, 1]] if not tiny else [[5, 17, 3], [9, 1, 20], [40, 2]]
        )
        for name, (fn, ref_fn, extra) in impls.items():
            for lens in lengths:
                for dtype in (torch.float32, torch.bfloat16):
                    if device.type == "cpu" and dtype == torch.bfloat16 and "varlen_attention" in name:
                        continue  # the CPU reference backend is the reference itself
                    err = _attn_error(fn, ref_fn, extra, lens, dtype, device)
                    report.row(s, kernel=name, lengths=str(lens), dtype=str(dtype)[6:], max_rel_err=err,
                               **{"pass": err <= ATTN_TOL[dtype]})  # fmt: skip
        if "flash_varlen (Triton)" in impls:
            other_gpu(report, s, device)


def _attn_error(fn, ref_fn, extra, lens, dtype, device) -> float:
    """Largest relative error of the output and of dq, dk, dv against the reference in fp64."""
    q, k, v, cu, mx = _attn_inputs(lens, 8, 2, 64, dtype, device, seed=sum(lens))
    out = fn(q, k, v, cu, mx, causal=True, **extra)
    g = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ref_fn(qd, kd, vd, cu, mx, causal=True, **extra)
    gr = torch.autograd.grad(ref, (qd, kd, vd), torch.ones_like(ref))
    return max([rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(g, gr, strict=True)])


def other_gpu(report, s, device):
    """The Triton kernels with their tensors on cuda:1 while cuda:0 is current: each launch must go to the
    tensors' GPU (issue 25, item 3). Needs two GPUs; skipped, with a note, otherwise."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2:
        where = f"{count} GPU" if device.type == "cuda" else "a CPU run"
        report.note(s, f"kernels on a GPU other than the current one: skipped ({where}; needs 2 GPUs)")
        return
    on_other_device(report, s, current=torch.device("cuda", 0), other=torch.device("cuda", 1))


def on_other_device(report, s, *, current, other):
    """flash_varlen forward + backward (window, softcap) and masked CE with every tensor on ``other`` while
    ``current`` is the current device, against their references; the current device must stay as it was.
    Where Triton shows its per-device kernel caches, the launches must have compiled for ``other``."""
    fv = importlib.import_module("tritrain_kernels.flash_varlen")
    gpu = other.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    lens, (N, H, V) = ([300, 1, 77], (64, 32, 8200)) if gpu else ([5, 40, 3], (7, 16, 97))  # CPU: interpreted
    guard = torch.cuda.device(current) if current.type == "cuda" else contextlib.nullcontext()
    with guard:
        extra = {"window": 64, "softcap": 30.0}
        fn, ref_fn = fv.flash_varlen_attention, fv.flash_varlen_attention_ref
        err = _attn_error(fn, ref_fn, extra, lens, dtype, other)
        ce = _ce_correctness(N, H, V, dtype, other, {})
        _sync(other)
        stayed = current.type != "cuda" or torch.cuda.current_device() == current.index
    what = f"tensors on {other}, {current} current"
    # the forward's cache is the evidence (autograd runs a backward on its tensors' device anyway)
    caches = [getattr(kernel, "device_caches", None) for kernel in (fv._fwd_kernel, fv._bwd_dq_kernel)]
    launched = (
        all(c.get(other.index) is not None for c in caches)
        if gpu and all(isinstance(c, dict) for c in caches)
        else "unknown"
    )
    report.row(s, kernel=f"flash_varlen window+softcap, {what}", lengths=str(lens), dtype=str(dtype)[6:],
               max_rel_err=err, compiled_for_tensors_gpu=launched, current_device_kept=stayed,
               **{"pass": err <= ATTN_TOL[dtype] and stayed and launched is not False})  # fmt: skip
    report.row(s, kernel=f"masked CE, {what}", lengths=ce["shape"], dtype=ce["dtype"],
               max_rel_err=max(ce["loss_rel_err"], ce["grad_rel_err"]), current_device_kept=stayed,
               **{"pass": ce["pass"] and stayed})  # fmt: skip


def _ce_correctness(N, H, V, dtype, device, opts) -> dict:
    from tritrain_kernels import masked_linear_cross_entropy_ref
    from tritrain_kernels.masked_ce import _masked_lce

    bias = opts.pop("bias", False)
    h, w, b, y = _ce_case(N, H, V, 0.5 if N > 1 else 0.0, dtype, device, bias=bias, trainable=True, seed=N)
    params = [t for t in (h, w, b) if t is not None]
    ref_params = [t.detach().double().requires_grad_() for t in params]
    hd, wd = ref_params[:2]
    bd = ref_params[2] if b is not None else None
    logits = hd.detach() @ wd.detach().t() + (bd.detach() if bd is not None else 0)
    if "softcap" in opts:
        logits = opts["softcap"] * torch.tanh(logits / opts["softcap"])
    # Half the labelled rows get their argmax as label, so that the accuracy count is informative.
    hit = (torch.rand(N, generator=torch.Generator().manual_seed(N)) < 0.5).to(device) & (y != -100)
    y = torch.where(hit, logits.argmax(-1), y)
    want_correct = int(((logits.argmax(-1) == y) & (y != -100)).sum())
    correct = torch.zeros((), dtype=torch.long, device=device)
    # The Triton path, also on CPU (through the interpreter): the kernel the GPU runs.
    out = _masked_lce(h, w, y, bias=b, correct=correct, impl="triton", **opts)
    grads = torch.autograd.grad(out, params)
    ref = masked_linear_cross_entropy_ref(hd, wd, y, bias=bd, **opts)
    ref_grads = torch.autograd.grad(ref, ref_params)
    loss_err = rel_err(out, ref)
    grad_err = max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True))
    tol_loss, tol_grad = CE_TOL[dtype]
    # fp32 logits from bf16 products may reorder a near-tie against the fp64 reference: one row of slack.
    slack = 0 if dtype == torch.float32 else max(1, N // 1000)
    ok = loss_err <= tol_loss and grad_err <= tol_grad and abs(int(correct) - want_correct) <= slack
    label = str(opts or ("bias" if bias else ""))
    return {"shape": f"N={N} H={H} V={V}", "dtype": str(dtype)[6:], "options": label,
            "loss_rel_err": loss_err, "grad_rel_err": grad_err, "correct": f"{int(correct)}/{want_correct}",
            "pass": ok}  # fmt: skip


def _attn_inputs(lens, hq, hkv, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(T, n, d, generator=gen).to(device, dtype).requires_grad_() for n in (hq, hkv, hkv))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu, max(lens)


def sync_free(report, device):
    from tritrain_kernels import masked_linear_cross_entropy

    with report.section("sync-free step") as s:
        h, w, b, y = _ce_case(512, 64, 1000, 0.0, torch.bfloat16 if device.type == "cuda" else torch.float32,
                              device, bias=False, trainable=False, seed=0)  # fmt: skip
        correct = torch.zeros((), dtype=torch.long, device=device)

        def step():
            loss = masked_linear_cross_entropy(h, w, y, assume_valid=True, correct=correct)
            loss.backward()

        step()  # warm up (Triton compiles, cuBLAS handles) outside the check
        report.row(s, what="masked CE fwd+bwd, assume_valid, correct=", **_sync_check(step, device))
        model_step = _tiny_train_step(device)
        model_step()
        result = _sync_check(model_step, device)
        if device.type == "cpu":
            # On CPU the reference attention reads its lengths on the host and the unfused AdamW its step
            # count: the count is listed, not judged; on CUDA (fused AdamW, cu_seqlens kernels) it must be 0.
            result.pop("pass")
        report.row(s, what="LoRA step: forward_backward + AdamW (tiny model)", **result)


def _sync_check(fn, device) -> dict:
    """Run ``fn`` with synchronisation forbidden (CUDA) or counted (CPU: tests.synccount)."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            torch.cuda.set_sync_debug_mode(0)
            _sync(device)
            return {"syncs": 0, "pass": True}
        except RuntimeError as e:
            return {"syncs": ">= 1", "first": " ".join(str(e).split())[:200], "pass": False}
        finally:
            torch.cuda.set_sync_debug_mode(0)
    from tests.synccount import count_syncs

    with count_syncs() as syncs:
        fn()
    where = "; ".join(f"{n} at {w}" for n, w in syncs.calls[:3])
    return {"syncs": syncs.count, "first": where, "pass": syncs.count == 0}


def _tiny_train_step(device):
    from bench_train import Bench

    from trainer.train import forward_backward
    from tritrain_kernels import masked_linear_cross_entropy

    bench = Bench("tiny", device)
    bench.use("ours")
    batch = bench.batches["ours"][0]
    loss_fn = partial(masked_linear_cross_entropy, assume_valid=True)

    def step():
        forward_backward(bench.model, [batch], bench.head, loss_fn, device, bench.autocast)
        bench.optimizer.step()
        bench.optimizer.zero_grad(set_to_none=True)

    return step


def masked_ce(report, device, tiny, quick):
    N, H, V = (128, 32, 2000) if tiny else (16384, 4096, 151552)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = 1 if tiny else 3 if quick else 5
    cases = [(0.3, False), (1.0, False), (0.3, True)] + ([] if quick else [(1.0, True)])
    cases = [(0.3, False), (1.0, True)] if tiny else cases
    with report.section(f"masked CE fwd+bwd, N={N} H={H} V={V}, {str(dtype)[6:]}") as s:
        for labelled, trainable in cases:
            _masked_ce_case(report, s, N, H, V, labelled, trainable, dtype, device, reps)
            _empty_cache()


def _masked_ce_case(report, s, N, H, V, labelled, trainable, dtype, device, reps):
    from bench_masked_ce import providers

    from tritrain_kernels import masked_linear_cross_entropy

    h, w, _, y = _ce_case(N, H, V, 1.0 - labelled, dtype, device, bias=False, trainable=trainable, seed=0)
    n_lab = int((y != -100).sum())
    idx = (y != -100).nonzero().squeeze(1)
    floor_flops = (6.0 if trainable else 4.0) * n_lab * H * V
    head = "trainable" if trainable else "frozen"

    def run(loss_fn):
        def go():
            h.grad = w.grad = None
            loss_fn().backward()

        return go

    fns = {"floor (cuBLAS GEMMs of the labelled rows)": _floor_gemms(h, w, n_lab, trainable)}
    fns["ours"] = run(lambda: masked_linear_cross_entropy(h, w, y))
    fns["ours, compacted (assume_valid, as the trainer)"] = run(
        lambda: masked_linear_cross_entropy(h.index_select(0, idx), w, y[idx], assume_valid=True)
    )
    for name, fn in providers().items():
        if name != "ours":
            fns["reference (full fp32 logits)" if name == "reference" else name] = run(
                partial(fn, h, w, y, None)
            )
    for name, fn in fns.items():
        try:
            m = measure(fn, device, reps)
        except Exception as e:  # one provider failing must not hide the others
            m = dict(ms=float("nan"), note=f"{type(e).__name__}: {' '.join(str(e).split())[:150]}")
        tflops = floor_flops / (m["ms"] / 1e3) / 1e12 if m["ms"] == m["ms"] else float("nan")
        report.row(s, labelled=labelled, head=head, provider=name, **m, TFLOPs_over_floor=tflops)


def _floor_gemms(h, w, n, trainable):
    """The GEMMs no implementation can avoid: logits and dh (and dW) of the n labelled rows, bf16 cuBLAS."""
    hv = h.detach()[:n]
    wd = w.detach()
    g = torch.empty(n, wd.shape[0], dtype=h.dtype, device=h.device).normal_()

    def go():
        hv @ wd.t()
        g @ wd
        if trainable:
            g.t() @ hv

    return go


def attention(report, device, tiny, quick):
    from tritrain_kernels.varlen_attention import _IMPORTS, torch_varlen_call, varlen_attention_ref

    hq, hkv, d = (4, 2, 32) if tiny else (32, 8, 128)
    total = 512 if tiny else 16384
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lens = _conversation_lengths(total, 100 if tiny else 700)
    with report.section(
        f"attention fwd+bwd, {len(lens)} conversations, T={sum(lens)}, Hq={hq} Hkv={hkv} D={d}"
    ) as s:
        backends = {}
        try:
            fv = importlib.import_module("tritrain_kernels.flash_varlen")
            backends["project Triton (flash_varlen)"] = fv.flash_varlen_attention
        except ModuleNotFoundError:
            report.note(s, "tritrain_kernels.flash_varlen absent")
        if device.type == "cuda":
            for name, label in (("torch_varlen", "torch varlen_attn"), ("flash_attn", "flash-attn")):
                try:
                    fn = _IMPORTS[name]()
                except Exception as e:
                    report.note(s, f"{label}: not available ({type(e).__name__})")
                    continue
                backends[label] = (
                    partial(_call_torch_varlen, torch_varlen_call, fn) if name == "torch_varlen"
                    else partial(_call_flash_attn, fn)
                )  # fmt: skip
        if device.type == "cpu" or tiny:
            backends["reference (per-conversation SDPA)"] = varlen_attention_ref
        flops = sum(3.5 * 2 * 2 * hq * d * n * n / 2 for n in lens)  # causal fwd (4·n²/2·D·H) + 2.5x bwd
        q, k, v, cu, mx = _attn_inputs(lens, hq, hkv, d, dtype, device, seed=0)
        for name, fn in backends.items():

            def go(fn=fn):
                q.grad = k.grad = v.grad = None
                fn(q, k, v, cu, mx, causal=True).sum().backward()

            try:
                m = measure(go, device, 1 if tiny else 3 if quick else 5)
            except Exception as e:
                m = dict(ms=float("nan"), note=f"{type(e).__name__}: {' '.join(str(e).split())[:150]}")
            report.row(s, backend=name, **m, TFLOPs=flops / (m["ms"] / 1e3) / 1e12)


def _call_torch_varlen(call, fn, q, k, v, cu, mx, causal):
    return call(fn, q, k, v, cu, mx, causal, None)


def _call_flash_attn(fn, q, k, v, cu, mx, causal):
    return fn(q, k, v, cu, cu, mx, mx, causal=causal)


def _conversation_lengths(total, mean, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        n = int(torch.empty(()).log_normal_(math.log(mean) - 0.5, 1.0, generator=gen).clamp(8, 8192))
        lens.append(min(n, total - sum(lens)))
    return [n for n in lens if n > 0]


def end_to_end(report, device, tiny, quick):
    import bench_train

    if tiny:
        models = [("tiny", None, None)]
    elif quick:
        models = [("qwen2.5-1.5b", 8, 64), ("llama3-8b", 2, 48)]
    else:
        models = [("qwen2.5-1.5b", 28, 128), ("llama3-8b", 6, 96)]
    for shape, layers, conversations in models:
        with report.section(f"LoRA step, {shape} shape" + (f", {layers} layers" if layers else "")) as s:
            bench = bench_train.Bench(shape, device, num_layers=layers, conversations=conversations)
            rows, batches = len(bench.batches["ours"]), len(bench.batches["hf_padded"])
            report.note(s, f"{bench.tokens} real tokens, {rows} packed rows; hf_padded: "
                           f"{bench.slots('hf_padded')} slots in {batches} batches; "
                           "hf losses chunked (never [tokens, vocab] in fp32)")  # fmt: skip
            flops, peak = _step_flops(bench, device)
            for provider in ("ours", "hf_padded", "hf_padding_free", "hf_padded_liger"):
                try:
                    epoch = _provider_epoch(bench, provider, device)
                except _Skip as e:
                    report.note(s, f"{provider}: skipped ({e})")
                    continue
                try:
                    m = measure(epoch, device, reps=1)  # one warm-up pass, one timed
                except Exception as e:
                    m = dict(ms=float("nan"), note=f"{type(e).__name__}: {' '.join(str(e).split())[:150]}")
                secs = m["ms"] / 1e3
                mfu = flops / secs / peak if peak and flops and secs == secs else float("nan")
                report.row(
                    s,
                    provider=provider,
                    seconds=secs,
                    tokens_per_s=bench.tokens / secs,
                    MFU=mfu,
                    peak_MiB=m.get("peak_MiB", float("nan")),
                    **({"note": m["note"]} if "note" in m else {}),
                )
            del bench
            _empty_cache()


class _Skip(Exception):
    pass


def _step_flops(bench, device):
    try:
        from trainer.train import peak_flops, step_flops
    except ImportError:
        return None, None
    return step_flops(bench.model, bench.batches["ours"]), peak_flops(device)


def _provider_epoch(bench, provider, device):
    """A callable running every conversation of the bench's set once through ``provider``."""
    from trainer.check import padded_loss_sum

    if provider in ("ours", "hf_padded"):
        return lambda: (bench.use(provider), bench.epoch(provider))
    if provider == "hf_padding_free":
        # transformers' padding-free mode: packed rows, position_ids restarting per conversation, a
        # flash-attention implementation that reads the boundaries from them (sdpa would mix conversations).
        try:
            importlib.import_module("flash_attn")
        except Exception as e:
            raise _Skip("flash-attn is not installed: transformers has no padding-free sdpa") from e

        def run():
            bench.base.set_attn_implementation("flash_attention_2")
            for b in bench.batches["ours"]:
                (
                    padded_loss_sum(bench.model, b, bench.head, bench.autocast) / max(1, b.num_loss_tokens)
                ).backward()
                bench.optimizer.step()
                bench.optimizer.zero_grad(set_to_none=True)
            bench.sync()

        return run
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception as e:
        raise _Skip("liger-kernel is not installed") from e

    def run_liger():
        if not getattr(bench, "_liger", False):
            _apply_liger_kernel_to_instance(model=bench.base)  # last provider: it patches the model for good
            bench._liger = True
        bench.use("hf_padded")
        for b in bench.batches["hf_padded"]:
            with bench.autocast:
                loss = bench.model(
                    input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels
                ).loss
            loss.backward()
            bench.optimizer.step()
            bench.optimizer.zero_grad(set_to_none=True)
        bench.sync()

    return run_liger


def training_run(report, device, tiny, quick):
    import bench_train

    from trainer.train import forward_backward
    from tritrain_kernels import masked_linear_cross_entropy

    steps = 6 if tiny else 20 if quick else 40
    with report.section(f"short training run ({steps} steps, LoRA, ours)") as s:
        shape, layers = ("tiny", None) if tiny else ("qwen2.5-1.5b", 4)
        bench = bench_train.Bench(shape, device, num_layers=layers, conversations=None if tiny else 32)
        for group in bench.optimizer.param_groups:
            group["lr"] = 1e-2 if tiny else 2e-3
        bench.use("ours")
        loss_fn = partial(masked_linear_cross_entropy, assume_valid=True)
        batches = bench.batches["ours"]
        losses = []
        for i in range(steps):
            loss = forward_backward(bench.model, [batches[i % len(batches)]], bench.head, loss_fn, device,
                                    bench.autocast)  # fmt: skip
            bench.optimizer.step()
            bench.optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
        losses = [float(x) for x in torch.stack(losses).tolist()]  # one sync at the end
        n = len(batches)
        first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n  # the same rows at the start and the end
        report.row(
            s,
            dtype=str(bench.dtype)[6:],
            first_pass_loss=first,
            last_pass_loss=last,
            finite=all(map(math.isfinite, losses)),
            **{"pass": last < first and math.isfinite(last)},
        )
        report.note(s, "losses: " + " ".join(f"{x:.3f}" for x in losses))


def preference_step(report, device, tiny, quick):
    """Issue 28: our DPO loss and LoRA gradients against a float64 reference written out (the plain HF model
    on each conversation alone, the reference with ``disable_adapter()``); then our DPO step (packed pairs,
    varlen attention, fused loss on the answers' rows) against TRL's ``DPOTrainer`` on the same pairs
    (``bench/bench_preference.py``; ours alone, with a note, where TRL is not importable)."""
    import bench_preference as bp

    with report.section("DPO loss and LoRA gradients vs float64 unpacked reference (tiny model)") as s:
        _dpo_reference_check(report, s, device)

    shape, layers = ("tiny", None) if tiny else ("qwen2.5-1.5b", 8 if quick else 28)
    settings = dict(bp.SETTINGS[shape], **(bp.QUICK.get(shape, {}) if quick else {}))
    title = f"DPO step against TRL's DPOTrainer, {shape} shape" + (f", {layers} layers" if layers else "")
    with report.section(title) as s:
        results = [bp.run_ours(shape, settings, device, layers=layers)]
        _empty_cache()
        try:
            importlib.import_module("trl")
        except Exception as e:
            report.note(s, f"TRL not importable ({type(e).__name__}): ours alone")
            variants = []
        else:
            variants = ["trl"] if tiny else ["trl", "trl_no_gc", "trl_padding_free"]
        for variant in variants:
            try:
                results.append(bp.run_trl(shape, settings, device, variant, layers=layers))
            except torch.OutOfMemoryError:
                results.append(dict(provider=variant, note="out of memory"))
            except Exception as e:  # one provider failing must not hide the others
                results.append(
                    dict(provider=variant, note=f"{type(e).__name__}: {' '.join(str(e).split())[:150]}")
                )
            _empty_cache()
        ours = results[0]
        fp32 = bp._dtype(device) == torch.float32
        for r in results:
            row = dict(provider=r["provider"], **bp.summarise(r), real_tokens=r.get("tokens", ""),
                       token_slots=r.get("slots", ""), peak_MiB=r.get("peak_mib", float("nan")),
                       step0_loss=r.get("step0_loss", float("nan")))  # fmt: skip
            if r["provider"].startswith("trl") and "step0_loss" in r:
                # both score the same tokens once our end-of-turn token is dropped: the losses must agree
                diff = abs(r["step0_loss"] - ours["loss0_trl_tokens"]) / abs(ours["loss0_trl_tokens"])
                row["step0_rel_diff_same_tokens"] = diff
                row["pass"] = diff <= (1e-4 if fp32 else 5e-2)
            if "note" in r:
                row["note"] = r["note"]
            report.row(s, **row)
        peak = "CUDA allocator" if device.type == "cuda" else "RSS (VmHWM)"
        report.note(
            s,
            f"{settings['pairs_per_step']} pairs per step, {settings['steps']} timed steps after a warm-up; "
            f"ours step-0 loss {ours['loss0']:.6f} on its tokens, {ours['loss0_trl_tokens']:.6f} on TRL's "
            f"(each answer's end-of-turn token dropped); peak: {peak} from the warm-up step",
        )


def _dpo_reference_check(report, s, device):
    import bench_preference as bp
    import torch.nn.functional as F
    from bench_train import build_model
    from peft import get_peft_model

    from trainer.data import load_tokenizer
    from trainer.model import prepare_model
    from trainer.preference import PreferenceLoss, collate_pairs
    from tritrain_kernels import masked_linear_cross_entropy

    pairs = 3
    sequences, _ = bp.encode(bp.preference_records(pairs, 80, seed=1), load_tokenizer("demo"))
    model, _, head = prepare_model(
        bp.LORA, device=str(device), model=build_model("tiny", device, torch.float32)
    )
    bp.init_adapter(model)  # B != 0: the policy differs from the reference, A has gradients
    loss_fn = partial(masked_linear_cross_entropy, assume_valid=True)
    pref = PreferenceLoss("dpo", loss_fn, device, beta=bp.BETA)
    batch = collate_pairs(sequences, list(range(pairs))).to(device)  # all pairs in one packed row
    loss = pref.forward_backward(model, [(batch, 1.0)], [batch], head, device, contextlib.nullcontext())
    with torch.no_grad():
        policy = pref.logps(model, batch, head)[0]
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    # the same seeded weights (drawn in float32, as ours), then float64
    ref = get_peft_model(build_model("tiny", device, torch.float32).double(), bp.lora_config())
    ref_lora = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert set(ref_lora) == set(lora), sorted(set(ref_lora) ^ set(lora))[:4]
    with torch.no_grad():
        for n, p in ref_lora.items():
            p.copy_(lora[n].double())

    def sums(m):
        """[pairs, 2] log-prob sums of the labelled tokens, each conversation alone, float64 logits."""
        out = []
        for seq in sequences:
            ids = torch.tensor(seq.input_ids, device=device)
            target = torch.tensor(seq.labels, device=device)[1:]
            logp = torch.log_softmax(m(input_ids=ids[None]).logits[0, :-1].double(), -1)
            keep = target != -100
            out.append(logp[keep].gather(1, target[keep, None]).sum())
        return torch.stack(out).view(-1, 2)

    with torch.no_grad(), ref.disable_adapter():
        reference = sums(ref)
    want_policy = sums(ref)
    z = bp.BETA * ((want_policy[:, 0] - reference[:, 0]) - (want_policy[:, 1] - reference[:, 1]))
    want = -F.logsigmoid(z).mean()
    want.backward()
    loss_err = rel_err(loss, want)
    logps_err = rel_err(policy, want_policy.detach())
    got = torch.cat([lora[n].grad.flatten() for n in sorted(lora)])
    expected = torch.cat([ref_lora[n].grad.flatten() for n in sorted(lora)])
    grad_err = rel_err(got, expected)
    tol_loss, tol_grad = (
        (1e-4, 1e-3) if device.type == "cpu" else (2e-3, 2e-2)
    )  # CUDA: tf32 dots in attention
    ok = loss_err <= tol_loss and logps_err <= tol_loss and grad_err <= tol_grad
    report.row(s, pairs=pairs, scored_tokens=int(batch.counts.sum()), loss=loss.item(), loss_fp64=want.item(),
               loss_rel_err=loss_err, logps_rel_err=logps_err, lora_grad_rel_err=grad_err,
               **{"pass": ok})  # fmt: skip


def strategies(report, device, tiny, quick):
    """An FSDP2 step and a QLoRA step through the trainer's own code. One GPU, so FSDP runs as one rank
    (a one-process group): the sharding path (fully_shard per layer, the head read inside unshard, fp32
    gradient reduction) against the plain step on the same model and row."""
    import bench_train
    import torch.distributed as dist

    from trainer.distributed import World
    from trainer.parallel import FullySharded, Single
    from trainer.train import LiveHead, parallel_step
    from tritrain_kernels import masked_linear_cross_entropy

    loss_fn = partial(masked_linear_cross_entropy, assume_valid=True)
    steps = 3 if tiny else 5
    with report.section(f"FSDP2 step (one rank) against the single-process step, {steps} steps") as s:
        shape, layers = ("tiny", None) if tiny else ("qwen2.5-1.5b", 4)
        bench = bench_train.Bench(shape, device, num_layers=layers, conversations=None if tiny else 32)
        batch = bench.batches["ours"][0]
        base = bench.model.get_base_model()
        head_module, softcap = base.get_output_embeddings(), bench.head[2]
        single = Single()
        want, _ = parallel_step(bench.model, [batch], LiveHead(head_module, softcap, single), loss_fn, device,
                                bench.autocast, single)  # fmt: skip
        bench.model.zero_grad(set_to_none=True)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            address = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend, init_method=address, rank=0, world_size=1)
        try:
            strategy = FullySharded(World(), compute_dtype=bench.dtype)
            model = strategy.wrap(bench.model)
            head = LiveHead(head_module, softcap, strategy)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-3)
            losses = []

            def step():
                loss, _ = parallel_step(model, [batch], head, loss_fn, device, bench.autocast, strategy)
                strategy.grad_norm(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # the CPU peak tracker cannot follow FSDP's DTensor storages: peak memory on CUDA only
            m = dict(ms=time_ms(step, device, warmup=1, reps=steps - 1))
            if device.type == "cuda":
                m["peak_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
            values = [float(x) for x in torch.stack(losses).tolist()]
            err = abs(values[0] - float(want)) / max(abs(float(want)), 1e-30)
            report.row(s, first_loss_fsdp=values[0], loss_single=float(want), rel_diff=err,
                       last_loss=values[-1], step_ms=m["ms"], peak_MiB=m.get("peak_MiB", float("nan")),
                       **{"pass": err <= (2e-2 if bench.dtype != torch.float32 else 1e-4)
                          and all(map(math.isfinite, values))})  # fmt: skip
        finally:
            dist.destroy_process_group()
    with report.section("QLoRA step (NF4 base, demo model, the trainer's setup)") as s:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            report.note(s, f"skipped: bitsandbytes is not importable ({e})")
            return
        import tempfile

        from trainer.config import load_config
        from trainer.distributed import ONE_PROCESS
        from trainer.train import next_steps, setup, train_step

        losses = {}
        for quantize in ("none", "nf4"):
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config(["--device", device.type, "--quantize", quantize, "--max-steps", str(steps),
                                   "--val-file", "", "--output-dir", out])  # fmt: skip
                run = setup(cfg, ONE_PROCESS)
                got = []
                for rows in next_steps(run):
                    from trainer.packing import collate_packed

                    loss, _, _ = train_step(run, [collate_packed(run.train_data, r) for r in rows], False)
                    run.state["step"] += 1
                    run.state["row"] += len(rows)
                    got.append(loss.detach())
                losses[quantize] = [float(x) for x in torch.stack(got).tolist()]
        first = abs(losses["nf4"][0] - losses["none"][0]) / abs(losses["none"][0])
        ok = all(map(math.isfinite, losses["nf4"])) and first < 0.1
        report.row(s, loss_unquantized=losses["none"][-1], loss_nf4=losses["nf4"][-1],
                   first_step_rel_diff=first, **{"pass": ok})  # fmt: skip
        report.note(s, "NF4 rounds each weight by ~9% of its norm: the first losses differ a little")


def fsdp_two_gpus(report, device, quick):
    """torchrun with two ranks through the trainer's CLI (issue 25, items 1, 2 and 4): each rank's peak GPU
    memory over the sharded load against the model's size, a step with CPU offload (gloo beside nccl), and
    generation eval under FSDP ending on both ranks. Needs two GPUs; skipped, with a note, otherwise."""
    with report.section("FSDP on two GPUs (torchrun): sharded load, CPU offload, generation eval") as s:
        count = torch.cuda.device_count() if device.type == "cuda" else 0
        if count < 2:
            where = f"{count} GPU" if device.type == "cuda" else "a CPU run"
            report.note(s, f"skipped ({where}; needs 2 GPUs)")
            return
        import subprocess
        import tempfile

        from tests.trainer import test_sharded_load as worker

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            size = worker._tiny_model_dir(tmp / "model", layers=10 if quick else 24)
            for offload in ("false", "true"):
                out = tmp / f"out-{offload}"
                out.mkdir()
                args = [
                    "--model",
                    str(tmp / "model"),
                    "--device",
                    "cuda",
                    "--parallel",
                    "fsdp",
                    "--fsdp-cpu-offload",
                    offload,
                    "--max-steps",
                    "2",
                    "--eval-every",
                    "2",
                    "--eval-generate",
                    "2",
                    "--eval-max-new-tokens",
                    "8",
                    "--output-dir",
                    str(out / "run"),
                ]
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(_free_port()),
                    worker.__file__,
                    str(out),
                    *args,
                ]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)  # fmt: skip
                ranks = [json.loads((out / f"rss-rank{r}.json").read_text()) for r in (0, 1)
                         if (out / f"rss-rank{r}.json").is_file()]  # fmt: skip
                peaks = [r.get("device_peak", float("nan")) / size for r in ranks]
                report.row(s, cpu_offload=offload, model_MiB=size / 2**20, seconds=time.perf_counter() - t0,
                           gpu_peak_over_model=" / ".join(f"{p:.2f}" for p in peaks),
                           **{"pass": done.returncode == 0 and len(peaks) == 2
                              and all(p < 0.75 for p in peaks)})  # fmt: skip
                if done.returncode != 0:
                    report.note(s, f"offload {offload}: exit {done.returncode}: " + done.stderr[-400:])
        report.note(s, "gpu_peak_over_model: each rank's peak GPU memory over the load, in model sizes; the "
                       "old load (whole model on every GPU, then sharded) was >= 1")  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------- main

SECTIONS = (
    "environment",
    "correctness",
    "sync",
    "masked_ce",
    "attention",
    "e2e",
    "train",
    "dpo",
    "strategies",
    "fsdp2",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--quick", action="store_true", help="the short run: under 4 minutes on an H100/H200")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the CPU dry run of CI)")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_suite_results"), help="output directory")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    args = p.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run through the interpreter
    torch.manual_seed(0)
    report = Report(Path(args.out))
    run = {
        "environment": lambda: environment(report, args, device),
        "correctness": lambda: correctness(report, device, args.tiny),
        "sync": lambda: sync_free(report, device),
        "masked_ce": lambda: masked_ce(report, device, args.tiny, args.quick),
        "attention": lambda: attention(report, device, args.tiny, args.quick),
        "e2e": lambda: end_to_end(report, device, args.tiny, args.quick),
        "train": lambda: training_run(report, device, args.tiny, args.quick),
        "dpo": lambda: preference_step(report, device, args.tiny, args.quick),
        "strategies": lambda: strategies(report, device, args.tiny, args.quick),
        "fsdp2": lambda: fsdp_two_gpus(report, device, args.quick),
    }
    for name in SECTIONS:
        if name in args.only:
            run[name]()
    failed = [s["name"] for s in report.sections if s["status"] != "ok"]
    print(f"\n{len(report.sections)} sections in {time.perf_counter() - report.t0:.0f} s; "
          f"results in {report.md}" + (f"; not ok: {failed}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
