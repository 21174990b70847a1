"""Every Triton kernel of the project compiles for sm_80, sm_90 and sm_100 with no spill, on a CPU machine.

The kernels are found by scanning ``tritrain_kernels/*.py`` for ``@triton.jit`` functions, so a new kernel
without a ``compile_specs()`` entry fails here. Compilation runs in a subprocess
(``tests/tritrain_kernels/gpu_compile.py``) because these tests run under ``TRITON_INTERPRET=1``. The quick
set compiles the first spec of each kernel for each target; the full sweep (every specialisation the
launchers can pick) is marked slow.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tritrain_kernels.masked_ce as mc
from tests.tritrain_kernels import gpu_compile

SCRIPT = gpu_compile.__file__


def _compile(tmp_path_factory, everything):
    out = tmp_path_factory.mktemp("gpu_compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, SCRIPT, "--json", str(out)] + (["--all"] if everything else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def quick_rows(tmp_path_factory):
    return _compile(tmp_path_factory, everything=False)


def _check_rows(rows):
    bad = []
    for r in rows:
        if r.get("absent"):
            continue
        if "error" in r:
            bad.append(f"{r['kernel']} {r.get('config', '')} {r.get('target', '')}: {r['error']}")
        elif r["local"] != 0 or r.get("stack", 0) != 0:
            spill = f"stack frame {r.get('stack', 0)} B, local {r['local']} B"  # ptxas spills into the frame
            bad.append(f"{r['kernel']} {r['config']} {r['target']}: spills ({spill})")
        elif r["shared"] > r["shared_limit"]:
            bad.append(
                f"{r['kernel']} {r['config']} {r['target']}: shared {r['shared']} > {r['shared_limit']}"
            )
    assert not bad, "\n".join(bad)


def test_every_kernel_has_compile_specs():
    found = gpu_compile.project_kernels()
    assert "_ce_rows_kernel" in found["tritrain_kernels.masked_ce"]
    assert "_tanh" not in found["tritrain_kernels.masked_ce"]  # a device helper, compiled inside its callers
    for module_name, kernels in found.items():
        module = __import__(module_name, fromlist=["compile_specs"])
        assert hasattr(module, "compile_specs"), f"{module_name} has Triton kernels but no compile_specs()"
        named = {gpu_compile.kernel_of(s) for s in module.compile_specs()}
        missing = set(kernels) - named
        assert not missing, f"{module_name}: kernels without compile_specs() entries: {sorted(missing)}"


def test_scan_tells_kernels_from_device_helpers(tmp_path):
    src = textwrap.dedent(
        """
        import triton
        import triton.language as tl

        @triton.jit
        def helper(x):
            return x * 2

        @triton.jit
        def new_kernel(ptr, BLOCK: tl.constexpr):
            tl.store(ptr, helper(tl.load(ptr)))

        def not_jitted():
            pass
        """
    )
    (tmp_path / "k.py").write_text(src)
    assert gpu_compile.jit_functions(tmp_path / "k.py") == {"helper": False, "new_kernel": True}


@pytest.mark.parametrize("target", [f"sm_{cc}" for cc in gpu_compile.TARGETS])
def test_quick_compile_no_spills(quick_rows, target):
    if int(target[3:]) not in gpu_compile.supported_targets():
        pytest.skip(f"the installed Triton does not compile for {target}")
    rows = [r for r in quick_rows if r.get("target") in (target, None)]
    assert any("reg" in r for r in rows), rows
    _check_rows(rows)
    names = {r["kernel"] for r in rows if "kernel" in r}
    for module_name, kernels in gpu_compile.project_kernels().items():
        assert set(kernels) <= names, f"{module_name}: not compiled for {target}"


def _check_offsets(rows):
    bad = [
        f"{r['kernel']} {r['config']} {r['target']}: {line}"
        for r in rows
        for line in r.get("int32_stride_uses", [])
    ]
    assert not bad, "int32 offset products (cast the index to tl.int64 first):\n" + "\n".join(bad)


def test_quick_compile_offsets_are_int64(quick_rows):
    # Every kernel's TTIR widens each stride to i64 before any product: an i32 `h * stride_qh` wraps for a
    # head-major q past 541k tokens at 32 x 128 heads (issue 25, item 5). A module may declare strides whose
    # products its launcher bounds (INT32_STRIDES: flash_varlen's Lse stride, Hq·T < 2^31).
    compiled = [r for r in quick_rows if "reg" in r]
    assert compiled and all("int32_stride_uses" in r for r in compiled)
    assert {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"} <= {r["kernel"] for r in compiled}
    _check_offsets(compiled)


def test_narrow_stride_uses_reads_ttir():
    header = (
        'tt.func public @k(%X: !tt.ptr<bf16> loc("X"(#loc)), %stride_xh: i32 {tt.divisibility = 16 : i32}'
        ' loc("stride_xh"(#loc)), %stride_xt: i32 loc("stride_xt"(#loc))) attributes {noinline = false} {'
    )
    wide = "%1 = arith.extsi %stride_xh : i32 to i64 loc(#loc3)\n%2 = arith.extsi %stride_xt : i32 to i64"
    assert gpu_compile.narrow_stride_uses(f"{header}\n{wide}\n", []) == []
    narrow = "%3 = arith.muli %0, %stride_xh : i32 loc(#loc4)\n%4 = tt.addptr %X, %3 : !tt.ptr<bf16>, i32"
    got = gpu_compile.narrow_stride_uses(f"{header}\n{wide}\n{narrow}\n", [])
    assert got == ["%3 = arith.muli %0, %stride_xh : i32"]
    assert gpu_compile.narrow_stride_uses(f"{header}\n{narrow}\n", [], allowed=("stride_xh",)) == []
    numbered = header.replace("%stride_xh", "%arg1").replace('loc("stride_xh"(#loc))', "")
    got = gpu_compile.narrow_stride_uses(f"{numbered}\n%3 = arith.muli %0, %arg1 : i32\n", ["X", "stride_xh"])
    assert got == ["%3 = arith.muli %0, %arg1 : i32"]


@pytest.mark.slow
def test_every_spec_compiles_no_spills(tmp_path_factory):
    rows = _compile(tmp_path_factory, everything=True)
    _check_rows(rows)
    _check_offsets([r for r in rows if "reg" in r])


def _spec_key(constexprs, grad_dtype, num_warps):
    return tuple(sorted(constexprs.items())) + (grad_dtype, num_warps)


def record_ce_launches(monkeypatch) -> set:
    """masked_ce's row kernel replaced by one that records each launch's spec key, then launches it: the
    returned set fills as the launcher runs (through the interpreter)."""
    launched = set()
    real = mc._ce_rows_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                meta = {k: v for k, v in kwargs.items() if k != "num_warps"}
                dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[args[1].dtype]
                launched.add(_spec_key(meta, dt, kwargs["num_warps"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(mc, "_ce_rows_kernel", Recording())
    return launched


def assert_launches_compiled(launched: set) -> None:
    """Every recorded launch is one of masked_ce's compile specs."""
    specs = {
        _spec_key(s["constexprs"], s["signature"]["grad_ptr"][1:], s["num_warps"]) for s in mc.compile_specs()
    }
    assert launched and launched <= specs, sorted(launched - specs)


def test_masked_ce_launches_are_in_compile_specs(monkeypatch):
    # Record what the launcher really launches (through the interpreter) over forward and backward,
    # fp32 and bf16, each option, both row configurations; each must be a compile spec.
    launched = record_ce_launches(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    for V in (50, 8200, 8208):  # 8200 is not 16-divisible: the narrow block (see _row_config)
        for dtype in (torch.float32, torch.bfloat16):
            for opts in ({}, {"softcap": 5.0, "label_smoothing": 0.1}):
                h = torch.randn(3, 8, generator=gen).to(dtype).requires_grad_()
                w = torch.randn(V, 8, generator=gen).to(dtype).requires_grad_()
                b = torch.randn(V, generator=gen).to(dtype)
                y = torch.tensor([1, -100, 7])
                correct = torch.zeros((), dtype=torch.long)
                mc._masked_lce(h, w, y, bias=b, impl="triton", correct=correct, **opts).backward()
                mc._masked_lce(h, w, y, reduction="none", impl="triton", **opts).sum().backward()
                with torch.no_grad():
                    mc._masked_lce(h, w, y, impl="triton", **opts)
    assert_launches_compiled(launched)
