"""Every runtime dependency in pyproject.toml is imported by the katactl package (issue 20):
a dependency that stops being used is removed, not shipped to every user's machine."""
from __future__ import annotations

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "katactl")

#: distribution name (normalised) -> import name, where the two differ
IMPORT_NAMES = {"pyyaml": "yaml"}


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def runtime_dependencies() -> dict[str, str]:
    """{distribution name: its requirement line} of [project].dependencies."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the CI Python is 3.11+
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    out = {}
    for req in deps:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        assert m, f"unreadable requirement {req!r}"
        out[m.group(1)] = req
    return out


def import_name(dist: str) -> str:
    """The top-level module a distribution provides: the installed metadata says so when
    the distribution is installed (a marker may exclude it here: tomli on 3.11+)."""
    from importlib.metadata import packages_distributions

    norm = _normalise(dist)
    found = sorted(mod for mod, dists in packages_distributions().items()
                   if norm in {_normalise(d) for d in dists} and not mod.startswith("_"))
    if len(found) == 1:
        return found[0]
    return IMPORT_NAMES.get(norm, norm.replace("-", "_"))


def imported_modules(package_dir: str = PACKAGE) -> set[str]:
    """Top-level names of every import anywhere in the package (lazy ones inside functions too)."""
    out: set[str] = set()
    for dirpath, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=name)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    out.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    out.add(node.module.split(".")[0])
    return out


def test_every_runtime_dependency_is_imported_by_the_package():
    deps = runtime_dependencies()
    assert "psutil" in deps and "tabulate" in deps and "PyYAML" in deps  # the file was read
    used = imported_modules()
    unused = {d: req for d, req in deps.items() if import_name(d) not in used}
    assert not unused, (f"declared in pyproject.toml [project].dependencies but never imported by katactl: "
                        f"{sorted(unused.values())}: remove them, or use them")


def test_import_names_of_the_declared_distributions():
    """The distribution -> import name mapping the check relies on."""
    assert import_name("PyYAML") == "yaml"
    assert import_name("prometheus_client") == "prometheus_client"
    assert import_name("psutil") == "psutil" and import_name("tabulate") == "tabulate"
    assert import_name("tomli") == "tomli"  # not installed on 3.11+: by its name


def test_the_check_sees_lazy_imports_and_would_catch_an_unused_dependency(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    import yaml\n    from tabulate import tabulate\n")
    (tmp_path / "b.py").write_text("from . import a\nfrom katactl.output import Column\n")
    assert imported_modules(str(tmp_path)) == {"yaml", "tabulate", "katactl"}
    assert import_name("psutil") not in imported_modules(str(tmp_path))
