"""Compile the project's Triton kernels for real GPUs on a machine without one, and read their resources.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline down to a
cubin with the ptxas shipped in the Triton wheel; ``cuobjdump -res-usage`` beside it reads registers,
the stack frame and local memory (where ptxas puts spilled registers) and static shared memory from the
cubin. Used by ``test_gpu_compile.py`` in a subprocess (the tests run under ``TRITON_INTERPRET=1``,
where ``@triton.jit`` gives no compilable function), and on its own for the table in ``bench/RESULTS.md``:

    python tests/tritrain_kernels/gpu_compile.py --all --markdown      # every spec, every target
    python tests/tritrain_kernels/gpu_compile.py --json out.json       # the first spec of each kernel
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Kernel modules with compile_specs(); one absent from this checkout is skipped (reported as absent).
MODULES = ("tritrain_kernels.masked_ce", "tritrain_kernels.flash_varlen")
TARGETS = (80, 90, 100)
# Largest shared memory one block may use (opt-in), bytes: A100, H100/H200, B200.
SHARED_LIMIT = {80: 166912, 90: 232448, 100: 232448}


def jit_functions(path: Path) -> dict[str, bool]:
    """Every ``@triton.jit`` function of a source file -> True if it is a kernel (never called from another
    jit function of the file; those called are device helpers, compiled as part of their callers)."""
    tree = ast.parse(path.read_text())
    jitted = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if ast.unparse(target) in ("triton.jit", "jit", "triton.autotune", "triton.heuristics"):
                    jitted[node.name] = node
    called = {
        sub.func.id
        for node in jitted.values()
        for sub in ast.walk(node)
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in jitted
    }
    return {name: name not in called for name in jitted}


def project_kernels() -> dict[str, list[str]]:
    """module name -> its kernels, from scanning ``tritrain_kernels/*.py``."""
    out = {}
    for path in sorted((ROOT / "tritrain_kernels").glob("*.py")):
        kernels = [name for name, is_kernel in jit_functions(path).items() if is_kernel]
        if kernels:
            out[f"tritrain_kernels.{path.stem}"] = kernels
    return out


def supported_targets() -> tuple[int, ...]:
    """The targets of TARGETS the installed Triton compiles for (sm_100 from Triton 3.3)."""
    import triton

    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    return tuple(cc for cc in TARGETS if cc < 100 or version >= (3, 3))


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK (the frame ptxas spills registers into), LOCAL and static SHARED of the cubin's function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[1]))
    return {k.lower(): int(v) for k, v in fields.items()}


def describe(spec: dict) -> str:
    """A short config string: the constexprs that are on or numeric, dtypes of pointers, warps/stages."""
    flags = [k if v is True else f"{k}={v}" for k, v in spec["constexprs"].items() if v is not False]
    ptrs = sorted({t[1:] for t in spec["signature"].values() if t.startswith("*")})
    # flash_varlen's specs carry no attrs: its kernels state their alignment themselves
    aligned = ("aligned" if spec["attrs"] else "unaligned") if "attrs" in spec else ""
    launch = f"w{spec['num_warps']}s{spec['num_stages']}"
    return f"{' '.join(flags)} [{','.join(ptrs)}] {launch} {aligned}".rstrip()


def narrow_stride_uses(ttir: str, arg_names: list[str], allowed=()) -> list[str]:
    """The TTIR lines that use a ``stride*`` argument other than by sign-extending it to i64.

    The kernels' offsets are ``index.to(tl.int64) * stride``: Triton then widens the stride first
    (``arith.extsi %stride : i32 to i64``). Any other use is an int32 offset product, which wraps past
    2^31 elements (a head-major q of 541k tokens at 32 x 128 heads). ``arg_names``: the kernel's
    non-constexpr arguments in order, for TTIR whose arguments are numbered instead of named; ``allowed``:
    strides the module declares bounded (its ``INT32_STRIDES``).
    """
    header = re.search(r"tt\.func public @\w+\((.*)\)\s*(?:attributes|\{)", ttir)
    if header is None:
        return ["no tt.func header in the TTIR"]
    strides = []
    for i, arg in enumerate(re.split(r"(?=%[\w.$-]+: )", header.group(1))[1:]):
        ssa = re.match(r"%([\w.$-]+): ", arg).group(1)
        loc = re.search(r'loc\("([^"]+)"', arg)
        name = loc.group(1) if loc else arg_names[i] if i < len(arg_names) else ssa
        if name.startswith("stride") and name not in allowed:
            strides.append(ssa)
    body = ttir[header.end() :]
    bad = []
    for ssa in strides:
        used = re.compile(rf"%{re.escape(ssa)}(?![\w.$-])")
        widen = re.compile(rf"arith\.extsi %{re.escape(ssa)} : i32 to i64")
        for line in body.splitlines():
            if used.search(line) and not widen.search(line):
                bad.append(" ".join(line.split(" loc(")[0].split()))
    return bad


def compile_spec(spec: dict, capability: int, int32_strides=()) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    attrs = {(fn.arg_names.index(name),): value for name, value in (spec.get("attrs") or {}).items()}
    src = ASTSource(fn, dict(spec["signature"]), dict(spec["constexprs"]), attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    usage["shared"] = max(usage.get("shared", 0), int(compiled.metadata.shared))
    args = [name for name, ty in spec["signature"].items() if ty != "constexpr"]
    usage["int32_stride_uses"] = narrow_stride_uses(compiled.asm["ttir"], args, int32_strides)
    return usage


def kernel_of(spec: dict) -> str:
    """The ``@triton.jit`` function a spec compiles (its ``name`` may name the variant instead)."""
    return spec["fn"].fn.__name__


def run(modules: dict[str, list[str]], *, everything: bool, targets=None, on_row=None) -> list[dict]:
    """Compile each module's specs (all, or the first of each kernel) for each target; one row per
    (spec, target) with the resources, or ``error``; a module that cannot be imported gives one row."""
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    targets = targets or supported_targets()
    rows = []
    for module_name, kernels in modules.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                rows.append(dict(module=module_name, absent=True))
                continue
            raise
        specs = module.compile_specs() if hasattr(module, "compile_specs") else []
        named = {kernel_of(s) for s in specs}
        for kernel in kernels:
            if kernel not in named:
                rows.append(dict(module=module_name, kernel=kernel, error="no compile_specs() entry"))
        seen = set()
        for spec in specs:
            first = (kernel_of(spec), tuple(spec.get("targets") or ()))  # the first for each set of targets
            if not everything and first in seen:
                continue
            seen.add(first)
            for cc in targets:
                if spec.get("targets") and cc not in spec["targets"]:
                    continue  # a configuration the launcher picks only on other GPUs
                row = dict(
                    module=module_name, kernel=kernel_of(spec), config=describe(spec), target=f"sm_{cc}"
                )
                try:
                    row.update(compile_spec(spec, cc, getattr(module, "INT32_STRIDES", ())))
                except Exception as e:  # reported per row, so that one failure does not hide the others
                    row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
                row["shared_limit"] = SHARED_LIMIT[cc]
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | config | target | registers | shared memory (bytes) | spills (stack+local bytes) |",
             "|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if r.get("absent"):
            lines.append(f"| {r['module']} | (module absent) | | | | |")
        elif "error" in r:
            lines.append(
                f"| {r['kernel']} | {r.get('config', '')} | {r.get('target', '')} | error: {r['error']} | | |"
            )
        else:
            cells = (
                r["kernel"],
                r["config"],
                r["target"],
                r["reg"],
                r["shared"],
                r["local"] + r.get("stack", 0),
            )
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every spec, not only the first of each kernel")
    p.add_argument("--json", help="write the rows as JSON to this file")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    found = project_kernels()
    modules = {m: found.get(m, []) for m in MODULES} | found

    def save(rows):  # after every row: a killed sweep still leaves what it compiled
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))

    rows = run(modules, everything=args.all, on_row=save)
    save(rows)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
