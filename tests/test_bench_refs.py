"""The bench scripts' references do katactl's work, and the scripts behave as documented
(bench/RESULTS.md rule 1; review 11's bench findings). Real files and processes; no timing
is asserted."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _opened_files(argv: list[str], root: str, tmp) -> set[str]:
    """Regular files under ``root`` that ``argv`` (and its children) opened, per strace: -y
    names the file each returned fd is (open, openat or openat2 under a host root). A stat
through an O_PATH fd is not a read."""
    log = str(tmp / "strace.log")
    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=open,openat,openat2", "-o", log, *argv], cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, NO_COLOR="1"))
    out = set()
    real_root = os.path.realpath(root)
    with open(log) as f:
        for line in f:
            m = re.search(r"= \d+<(.+)>$", line.rstrip())
            # O_PATH: an fd to stat or resolve through, not a read
            if m and m.group(1).startswith(real_root + "/") and "O_PATH" not in line and os.path.isfile(m.group(1)):
                out.add(m.group(1))
    return out


@pytest.mark.skipif(not shutil.which("strace"), reason="strace not installed")
def test_audit_reference_reads_exactly_the_files_audit_opens(tmp_path):
    from bench.bench_audit import audit_reads
    from tests.fixtures_isolation import build_node

    root = str(tmp_path / "node")
    build_node(root, online_pods=4, sandboxes=3, vcpus=2)
    files, dirs = audit_reads(root)
    kat = _opened_files([sys.executable, "-m", "katactl", "--host-root", root, "audit", "-o", "json"], root, tmp_path)
    assert kat, "strace saw no file of the tree"
    ours = {os.path.realpath(p) for p in files}
    assert ours == kat, (sorted(ours - kat)[:5], sorted(kat - ours)[:5])
    assert dirs and all(os.path.isdir(d) for d in dirs)
    every = {os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns}
    assert len(kat) < len(every)  # the whole tree is more than audit reads: not the reference


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, NO_COLOR="1"))


def test_startup_takes_runs_and_times_every_leaf():
    p = _bench("bench/bench_startup.py", "--smoke", "--runs", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "smoke ok" in p.stdout
    timed = p.stdout.split("leaves: ", 1)[1].strip().split(", ")
    for leaf in ("rollout run", "node drain", "balloon set", "upgrade stage", "vmcore collect", "sandbox list"):
        assert leaf in timed, timed


def test_startup_times_a_commit_and_a_baseline_in_the_same_rounds():
    """--at REV runs katactl from that commit's archive (not the working tree other engineers
    edit), --baseline REV adds every leaf's --help as of that commit to the same rounds."""
    p = _bench("bench/bench_startup.py", "--smoke", "--at", "HEAD", "--baseline", "HEAD~1")
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r"smoke ok: (\d+) commands, (\d+) leaves", p.stdout)
    assert m and int(m.group(1)) >= 2 * int(m.group(2)) > 50, p.stdout[:300]


def test_startup_without_write_leaves_results_md_alone():
    path = os.path.join(ROOT, "bench", "RESULTS.md")
    with open(path, "rb") as f:
        before = f.read()
    after = before
    try:
        p = _bench("bench/bench_startup.py", "--runs", "1")
        with open(path, "rb") as f:
            after = f.read()
    finally:
        if after != before:  # put the tracked file back before failing
            with open(path, "wb") as f:
                f.write(before)
    assert p.returncode == 0, p.stderr[-2000:]
    assert after == before, "bench_startup.py wrote bench/RESULTS.md without --write"
    assert "Every leaf's --help" in p.stdout and "| katactl rollout run --help |" in p.stdout


def test_metrics_goal_is_judged_against_the_concurrent_reference():
    from bench.bench_metrics import goal

    # 5x the serial loop, 2.5x `xargs -P 32 curl`: the goal (>= 4x) is not met
    assert goal({"katactl": 0.3, "loop": 1.5, "par": 0.75}) == (2.5, "not met")
    assert goal({"katactl": 0.1, "loop": 1.5, "par": 0.45})[1] == "met"


def test_vmcore_ssh_reference_writes_holes_like_katactl(sshd_lab, tmp_path):
    """bench_vmcore's equal-work SSH reference leaves zero blocks as holes, as katactl's copy
    does (RESULTS.md rule 1: the same sparse handling), and a failed ssh fails it."""
    from bench.bench_vmcore import ssh_sparse_copy

    src, dst = tmp_path / "vmcore.elf", tmp_path / "copy"
    data = os.urandom(1 << 20)
    with open(src, "wb") as f:  # fully allocated: 1 MiB of data, 7 MiB of written zeros
        f.write(data + bytes(7 << 20))
    sha = "openssl dgst -sha256" if shutil.which("openssl") else "sha256sum"
    p = subprocess.run(ssh_sparse_copy(str(sshd_lab.config), [], "node3", str(src), str(dst), sha),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(src).st_blocks * 512 >= 8 << 20
    assert os.stat(dst).st_blocks * 512 <= 2 << 20, os.stat(dst).st_blocks
    bad = subprocess.run(ssh_sparse_copy(str(sshd_lab.config), [], "unreachable", str(src), str(tmp_path / "x"),
                                         sha), capture_output=True, timeout=60)
    assert bad.returncode != 0


def test_write_section_keeps_the_hand_written_part(tmp_path):
    from bench._util import KEEP, write_section

    path = tmp_path / "RESULTS.md"
    path.write_text(f"# R\n\n## a — bench/bench_a.py\n\nold table\n\n{KEEP}\n\nnotes by hand\n\n"
                    "## b — bench/bench_b.py\n\nb's table\n")
    write_section("## a — bench/bench_a.py\n\nnew table\n", "bench/bench_a.py", str(path))
    assert path.read_text() == (f"# R\n\n## a — bench/bench_a.py\n\nnew table\n\n{KEEP}\n\nnotes by hand\n\n"
                                "## b — bench/bench_b.py\n\nb's table\n")
    write_section("## b — bench/bench_b.py\n\nnew b\n", "bench/bench_b.py", str(path))  # the last, no KEEP
    assert path.read_text().endswith("notes by hand\n\n## b — bench/bench_b.py\n\nnew b\n")
