"""Install contract: pyproject.toml declares compatible ranges, constraints.txt pins our exact set.

A researcher's ``pip install -e .`` must keep the torch build already in their environment, so
the package may not pin torch/torchvision exactly; ``make install`` gets the exact, reproducible
versions from ``constraints.txt`` (``pip install -c``), whose pins must lie inside those ranges.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pytest depends on tomli there)
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"
EXACT_OPERATORS = {"==", "==="}


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _declared() -> dict[str, list[Requirement]]:
    """Every requirement of the package and its extras, by canonical name (source: pyproject.toml)."""
    project = _project()
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    out: dict[str, list[Requirement]] = {}
    for line in lines:
        req = Requirement(line)
        out.setdefault(canonicalize_name(req.name), []).append(req)
    return out


def _pins() -> dict[str, Version]:
    """``name==version`` lines of constraints.txt, by canonical name."""
    pins: dict[str, Version] = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt: not an exact pin: {raw!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt pins {req.name} twice"
        pins[name] = Version(specs[0].version)
    return pins


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_torch_requirement_is_a_range_satisfied_by_the_installed_version(name):
    reqs = [r for r in _project()["dependencies"] if canonicalize_name(Requirement(r).name) == name]
    assert len(reqs) == 1, f"pyproject.toml should declare {name} exactly once, found {reqs}"
    req = Requirement(reqs[0])
    assert req.specifier, f"{name}: declare a lower bound (the oldest release the code works with)"
    exact = [s for s in req.specifier if s.operator in EXACT_OPERATORS]
    assert not exact, (
        f"{name} is pinned exactly ({req}): that replaces the user's own build; "
        f"declare a range and pin the exact version in constraints.txt"
    )
    installed = md.version(name)
    assert req.specifier.contains(installed, prereleases=True), (
        f"installed {name} {installed} does not satisfy the declared {req}"
    )


def test_installed_metadata_is_a_range_when_installed_from_this_tree():
    """The installed distribution (what pip saw) agrees, once ``make install`` has refreshed it."""
    try:
        requires = md.requires("vlmsae-utils") or []
    except md.PackageNotFoundError:
        pytest.skip("vlmsae-utils is not installed (tests run from the source tree)")
    installed = {canonicalize_name(Requirement(r).name): Requirement(r) for r in requires if "extra" not in r}
    declared = {canonicalize_name(Requirement(r).name): Requirement(r) for r in _project()["dependencies"]}
    if {k: str(v.specifier) for k, v in installed.items()} != {k: str(v.specifier) for k, v in declared.items()}:
        pytest.skip("installed metadata predates pyproject.toml; `make install` refreshes it")
    for name in ("torch", "torchvision"):
        assert not [s for s in installed[name].specifier if s.operator in EXACT_OPERATORS]


def test_every_direct_dependency_is_pinned_inside_its_declared_range():
    declared, pins = _declared(), _pins()
    missing = sorted(set(declared) - set(pins))
    assert not missing, f"constraints.txt does not pin these direct dependencies: {missing}"
    outside = {
        name: (str(pins[name]), [str(r) for r in reqs])
        for name, reqs in declared.items()
        if not all(r.specifier.contains(pins[name], prereleases=True) for r in reqs)
    }
    assert not outside, f"constraints.txt pins outside the ranges pyproject.toml declares: {outside}"


def test_build_requirement_is_pinned_inside_its_range():
    """setuptools builds the package in pip's isolated env; `--build-constraint` pins it too."""
    pins = _pins()
    build = [Requirement(r) for r in tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]]
    for req in build:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin the build requirement {req.name}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req}"


def test_license_is_an_spdx_string():
    """A ``{ text = ... }`` table makes setuptools >= 77 print a deprecation warning on every install."""
    assert isinstance(_project()["license"], str)


def test_make_install_and_conda_use_the_constraints():
    recipe = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in recipe and "--build-constraint constraints.txt" in recipe
    assert "-c constraints.txt" in (ROOT / "environment.yml").read_text()
