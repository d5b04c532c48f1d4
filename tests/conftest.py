"""Shared test fixtures.

``cli`` runs katactl in-process through katactl.cli.main (the real entry
point: argv hoisting, error mapping and exit codes included) and returns
exit code, stdout, stderr and parsed JSON. ``katactl_bin`` runs it as a real
subprocess for start-up and exit-code contracts.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

pytest_plugins = ["tests.conftest_lab", "tests.conftest_sshd", "tests.conftest_kube"]


# A test that needs a tool skips with "<tool> not installed" (or "missing") when it
# is absent. CI installs every tool (scripts/setup) and sets KATACTL_REQUIRE_TOOLS=1:
# there such a skip means a missing install step, and fails the run.
_MISSING_TOOL_SKIPS: list[str] = []
_REQUIRE_TOOLS = bool(os.environ.get("KATACTL_REQUIRE_TOOLS"))


def pytest_runtest_logreport(report):
    if _REQUIRE_TOOLS and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if "not installed" in reason or "missing" in reason:
            _MISSING_TOOL_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_collection_modifyitems(config, items):
    # scripts/test runs pytest-xdist workers with --dist loadgroup (a group runs in one worker,
    # in order): every test on the booted lab is one group, so a run boots one lab; the other
    # tests are grouped by file, so a module-scoped fixture (test_bench_smoke's runs start
    # every bench at once) is set up once, not once per worker
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).get("lab")
        if defs and defs[-1].func.__module__ == "tests.conftest_lab":  # not a module's own "lab"
            item.add_marker(pytest.mark.xdist_group("lab"))
        else:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


def pytest_sessionfinish(session, exitstatus):
    if _MISSING_TOOL_SKIPS:
        print("\nKATACTL_REQUIRE_TOOLS: tests skipped for a missing tool (add it to scripts/setup):",
              *_MISSING_TOOL_SKIPS, sep="\n  ", file=sys.stderr)
        session.exitstatus = 1


@dataclasses.dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    def only_node_error(self) -> dict:
        """The error of the one selected node that failed: with a node selection, even of one
        node, -o json is the command's list with the node in ``errors`` (docs/output.md)."""
        doc = self.json()
        assert doc["kind"] != "Error" and doc.get("items", []) == [] and len(doc["errors"]) == 1, doc
        return doc["errors"][0]["error"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test reads the developer's config or writes their audit log."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("KATACTL_TEST_CACHE", str(home / "cache")))
    monkeypatch.delenv("KATACTL_CONFIG", raising=False)
    for k in list(os.environ):
        if k.startswith("KATACTL_") and k not in ("KATACTL_TEST_CACHE",):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "80")
    if "katactl.audit" in sys.modules:  # an in-process run's --no-audit or audit_log must not leak
        sys.modules["katactl.audit"].configure(None)
    yield home


def run_cli(args: list[str], stdin: str | None = None) -> CliResult:
    from katactl.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = old_stdin
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


def run_katactl_subprocess(args, env=None, timeout=120, input=None) -> CliResult:
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "katactl", *map(str, args)], capture_output=True,
                       text=True, env=e, timeout=timeout, input=input)
    return CliResult(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def katactl_bin():
    return run_katactl_subprocess
