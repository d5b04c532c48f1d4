"""Every bench script runs in its smoke mode (tiny sizes, one run, nothing written), so a
bench can no longer rot unnoticed (bench_upgrade.py once stopped running when --host-root
of a missing directory became an error, and nobody saw it).

The scripts start together (they mostly wait: sshd start-up, a QEMU boot, servers) and each
test waits for its own. A bench that cannot run here exits 77 saying "TOOL not installed";
that is a skip, unless KATACTL_REQUIRE_TOOLS=1 (CI: scripts/setup installs them all).
Timings are never asserted.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "bench", "bench_*.py")))
SKIP = 77
TIMEOUT = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All smoke runs, started at once: {script: Popen}; results as they finish."""
    out = tmp_path_factory.mktemp("bench-smoke")
    env = dict(os.environ, NO_COLOR="1", XDG_CONFIG_HOME=str(out / "xdg"), XDG_STATE_HOME=str(out / "state"),
               KATACTL_AUDIT_LOG=str(out / "audit.log"))
    results = {"__results__": _results_digest()}
    for name in BENCHES:
        results[name] = subprocess.Popen([sys.executable, os.path.join("bench", name), "--smoke"], cwd=ROOT,
                                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         start_new_session=True)
    yield results
    for p in results.values():
        if isinstance(p, subprocess.Popen) and p.poll() is None:
            # the whole group: a bench's servers and children hold its pipes open after it
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=30)


def test_every_bench_is_covered():
    assert len(BENCHES) >= 9, BENCHES


@pytest.mark.parametrize("script", BENCHES)
def test_bench_smoke(runs, script):
    p = runs[script]
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        pytest.fail(f"{script} --smoke still running after {TIMEOUT}s: {err[-2000:]}")
    if p.returncode == SKIP and "not installed" in err:
        if os.environ.get("KATACTL_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{script}: {err.strip()} (KATACTL_REQUIRE_TOOLS=1)")
        pytest.skip(err.strip().splitlines()[-1])
    assert p.returncode == 0, f"{script} --smoke exited {p.returncode}:\n{out[-2000:]}\n{err[-4000:]}"
    assert "smoke ok" in out, out
    assert "|---" not in out, "smoke mode must not print figures"


def test_smoke_writes_no_figures(runs):
    """Once every smoke run has ended, bench/RESULTS.md is as it was before they started."""
    for p in runs.values():
        if not isinstance(p, subprocess.Popen):
            continue
        try:
            p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    assert _results_digest() == runs["__results__"], "a smoke run wrote bench/RESULTS.md"


def _results_digest() -> str:
    import hashlib

    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
