"""The distribution as users install it: import names that are its own, floors that CI has tested.

Every top-level import name this project installs is its own: no other installed distribution provides it.

transformers 5.25 made Hugging Face's ``kernels`` distribution a hard requirement; the project's Triton
package was called ``kernels`` too, so whichever came first on ``sys.path`` shadowed the other and both the
trainer and transformers failed to import. This test runs in CI with every extra installed, so a new
dependency (or a new release of one) that claims one of our names fails here before it fails in a user's first
hour. Each ``>=`` floor in ``pyproject.toml`` is pinned in ``.ci/floors.txt``, which CI's third leg installs
and runs the suite on, so a declared floor is a version a test run has passed on.
"""

import importlib.metadata as metadata
import importlib.util
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "tritrain"


def declared_packages() -> set[str]:
    """Top-level packages ``pyproject.toml`` ships: the tree's packages its ``include`` patterns match."""
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.packages.find]")[1]
    include = re.findall(r'"([^"]+)"', re.search(r"include\s*=\s*\[([^\]]*)\]", section).group(1))
    return {
        path.parent.name
        for path in ROOT.glob("*/__init__.py")
        if any(fnmatch(path.parent.name, pattern) for pattern in include)
    }


def installed_packages() -> set[str]:
    """Top-level names the installed distribution records (empty when it is not installed)."""
    try:
        top_level = metadata.distribution(DIST).read_text("top_level.txt") or ""
    except metadata.PackageNotFoundError:
        return set()
    return set(top_level.split())


def test_the_project_ships_the_two_packages_users_import():
    assert declared_packages() == {"trainer", "tritrain_kernels"}
    assert installed_packages() <= declared_packages() | {""}


@pytest.mark.parametrize("name", sorted(declared_packages()))
def test_no_other_distribution_provides_our_import_names(name):
    providers = set(metadata.packages_distributions().get(name, [])) - {DIST}
    assert not providers, f"the import name {name!r} is also installed by {sorted(providers)}: rename ours"


@pytest.mark.parametrize("name", sorted(declared_packages()))
def test_our_import_names_resolve_to_this_tree(name):
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is not importable"
    assert Path(spec.origin).resolve().is_relative_to(ROOT / name), f"{name} imports from {spec.origin}"


def test_no_package_or_module_named_kernels_remains():
    """The old name is not kept as an alias: an alias under ``kernels`` is exactly the clash."""
    assert not (ROOT / "kernels").exists()
    assert not (ROOT / "kernels.py").exists()
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # Hugging Face's kernels (transformers >= 5.25 installs it), from site-packages
        assert "site-packages" in Path(spec.origin).parts, f"kernels imports from {spec.origin}"


def declared_floors() -> dict[str, str]:
    """``{distribution: version}`` for each ``name>=version`` in ``pyproject.toml``'s dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([^;",]+)', block))


def ci_floor_pins() -> dict[str, str]:
    lines = (ROOT / ".ci" / "floors.txt").read_text().splitlines()
    return dict(line.split("==") for line in map(str.strip, lines) if line and not line.startswith("#"))


def _release(version: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in version.split("."))
    return parts + (0,) * (3 - len(parts))


def test_every_declared_floor_is_pinned_in_the_ci_floors_leg():
    floors, pins = declared_floors(), ci_floor_pins()
    assert set(floors) == set(pins), f"pyproject floors {sorted(floors)} vs .ci/floors.txt {sorted(pins)}"
    for name, floor in floors.items():
        want = _release(pins[name])
        assert _release(floor) == want, f"{name}: pyproject says >={floor}, CI tests {pins[name]}"
