"""The import layering of both packages, read from the source with ``ast`` (nothing is imported).

Every import counts: at the top of a module, inside a function (``import`` run late to break a circle is
still a circle), and ``importlib.import_module("constant")``. The implicit import of a parent package
(importing ``trainer.model`` runs ``trainer/__init__.py``) is not an edge.

Each module has a rank; a module imports only modules of its own rank or below, and no import circle exists
anywhere. A new module gets a rank here: where it sits is part of its design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tritrain_kernels", "trainer")

# Lowest first. A module may import those of its rank and below, never above.
LAYERS = [
    # 0 kernels: Triton kernels, their references and the Hugging Face patch; never the trainer
    ["tritrain_kernels", "tritrain_kernels.masked_ce", "tritrain_kernels.flash_varlen",
     "tritrain_kernels.varlen_attention", "tritrain_kernels.linear_attention", "tritrain_kernels.hf"],
    # 1 foundation: the settings and the vocabulary they are checked against, the output_dir lock, the
    #   process group; read by everything above, importing nothing of the project
    ["trainer.config", "trainer.lock", "trainer.distributed"],
    # 2 data: conversations, templates, tokenization, packing
    ["trainer.conversations", "trainer.fasttok", "trainer.templates", "trainer.data", "trainer.packing"],
    # 3 model: load (and quantise), attention plan, LoRA, the head; the FSDP skeleton built from it
    ["trainer.quantize", "trainer.model", "trainer.sharded_load"],
    # 4 what runs a set-up model: the strategy (one process, DDP, FSDP), generation with it, and the
    #   preference objectives' rows of pairs and losses
    ["trainer.parallel", "trainer.generate", "trainer.preference"],
    # 5 the loop: resume settings, checkpoints, evaluation by generation, reporters, setup and the loop
    ["trainer.resume", "trainer.checkpoints", "trainer.evalgen", "trainer.reporting", "trainer.train"],
    # 6 entry points: the package's train(), python -m trainer, the check command
    ["trainer", "trainer.__main__", "trainer.check"],
]  # fmt: skip
RANK = {module: rank for rank, modules in enumerate(LAYERS) for module in modules}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted name: file} of every module of the two packages (``__init__.py`` is the package's name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import node (or ``importlib.import_module("...")`` call) may refer to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the package this module is in (or is)
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, base] if base else parts)
        return [base, *(f"{base}.{alias.name}" for alias in node.names)]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the project modules it imports}, from every import anywhere in its source."""
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = _imported(node, module, path.stem == "__init__")
            if isinstance(node, ast.ImportFrom) and len(names) > 1:
                # `from trainer import evalgen` imports the submodule; `from trainer import train` the package
                # (where trainer.train is not a module) or the submodule
                subs = [n for n in names[1:] if n in modules]
                names = subs if len(subs) == len(names) - 1 else [names[0], *subs]
            edges |= {n for n in names if n in modules and n != module}
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected group of modules (Tarjan), each as a path a -> ... -> a."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_within(graph, group) for group in groups]


def _path_within(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A circle through the first module of ``group`` that stays inside it (breadth first)."""
    start = min(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & group):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    return [start, start]


def upward_imports(graph: dict[str, set[str]], rank: dict[str, int]) -> list[str]:
    """'a (rank i) imports b (rank j > i)' for every import of a module above the importer."""
    return [
        f"{a} (rank {rank[a]}) imports {b} (rank {rank[b]})"
        for a in sorted(graph)
        for b in sorted(graph[a])
        if rank[b] > rank[a]
    ]


# ------------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def graph():
    return import_graph(project_modules())


def test_every_module_has_a_rank():
    modules = set(project_modules())
    assert modules - set(RANK) == set(), "give each new module a rank in LAYERS"
    assert set(RANK) - modules == set(), "LAYERS names a module that no longer exists"


def test_no_import_circle(graph):
    assert cycles(graph) == []


def test_no_module_imports_one_above_it(graph):
    assert upward_imports(graph, RANK) == []


def test_the_kernels_never_import_the_trainer(graph):
    kernels = [m for m in graph if m.split(".")[0] == "tritrain_kernels"]
    assert {m: graph[m] for m in kernels if any(n.split(".")[0] == "trainer" for n in graph[m])} == {}


def test_the_checks_see_function_local_imports_and_report_them(tmp_path):
    """The checks above can fail: a late import inside a function closes a circle and climbs a layer."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "trainer" / "config.py").write_text("def f():\n    from trainer.evalgen import METRICS\n")
    (tmp_path / "trainer" / "evalgen.py").write_text("from trainer import config\n")
    (tmp_path / "trainer" / "train.py").write_text(
        "import importlib\nimportlib.import_module('trainer.check')\n"
    )
    (tmp_path / "trainer" / "check.py").write_text("from . import train\n")
    graph = import_graph(project_modules(tmp_path))
    assert graph["trainer.config"] == {"trainer.evalgen"} and graph["trainer.check"] == {"trainer.train"}
    assert sorted(cycles(graph)) == [
        ["trainer.check", "trainer.train", "trainer.check"],
        ["trainer.config", "trainer.evalgen", "trainer.config"],
    ]
    assert upward_imports(graph, RANK) == [
        "trainer.config (rank 1) imports trainer.evalgen (rank 5)",
        "trainer.train (rank 5) imports trainer.check (rank 6)",
    ]
