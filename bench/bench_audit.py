"""Bench: `katactl audit -o json` on a node tree with 500 pods (300 online runc pods, 200 Kata
sandbox pods) and 200 sandboxes, against a shell `find | xargs cat` of the same files, same run.

The tree is a fixture (tests/fixtures_isolation.py): cgroup v1 with the Alinux knobs,
resctrl with LS/BE groups, /proc/<pid>/task/<tid> for every hypervisor thread, Go
persist.json + containerd bundles per sandbox. Prints a markdown section to stdout.

    .venv/bin/python bench/bench_audit.py [--runs N] [--write] [--smoke]

katactl and the reference are timed as whole processes, interleaved (one of each per round).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench._util import KATACTL, context, precompile, require, write_section  # noqa: E402
from tests.fixtures_isolation import build_node  # noqa: E402


def timed(argv, **kw) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, **kw)
    return time.perf_counter() - t0, p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--online", type=int, default=300)
    ap.add_argument("--sandboxes", type=int, default=200)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="5 pods, one run, nothing written")
    a = ap.parse_args()
    require("find", "xargs", "cat")
    if a.smoke:
        a.runs, a.online, a.sandboxes = 1, 3, 2
    pre = None if a.smoke else precompile()
    root = tempfile.mkdtemp(prefix="katactl-bench-audit-")
    try:
        t0 = time.perf_counter()
        build_node(root, online_pods=a.online, sandboxes=a.sandboxes, vcpus=2)
        build_s = time.perf_counter() - t0
        dirs = [os.path.join(root, d) for d in ("sys/fs/cgroup", "sys/fs/resctrl", "proc", "run/vc",
                                                "run/containerd")]
        nfiles = int(subprocess.run(f"find {' '.join(dirs)} -type f | wc -l", shell=True, capture_output=True,
                                    text=True).stdout)
        shell = f"find {' '.join(dirs)} -type f -print0 | xargs -0 cat > /dev/null"
        env = dict(os.environ, NO_COLOR="1")
        kat, ref, inproc = [], [], []
        findings = None
        for _ in range(a.runs):
            dt, p = timed([*KATACTL, "--host-root", root, "audit", "-o", "json",
                           "--fail-on", "critical"], env=env)
            if p.returncode not in (0, 8):
                sys.exit(f"audit failed: {p.stderr.decode()}")
            kat.append(dt)
            if findings is None:
                import json

                findings = len(json.loads(p.stdout)["items"])
            dt, p = timed(["sh", "-c", shell])
            ref.append(dt)
            from katactl.backends.local import LocalTransport
            from katactl.isolation import audit, policy

            t1 = time.perf_counter()
            audit.run(LocalTransport(root), policy.Policy())
            inproc.append(time.perf_counter() - t1)
        k, r, i = statistics.median(kat), statistics.median(ref), statistics.median(inproc)
        if a.smoke:
            print(f"bench_audit smoke ok: {nfiles} files, {findings} findings")
            return
        text = "\n".join([
            "## audit (isolation policy check) — bench/bench_audit.py", "",
            f"Node tree: {a.online + a.sandboxes} pods ({a.online} online runc pods with one container each, "
            f"{a.sandboxes} Kata sandbox pods), {a.sandboxes} sandboxes (QEMU, 2 vCPUs, sandbox_cgroup_only=false), "
            f"cgroup v1 + Alinux knobs + resctrl; {nfiles} files (built in {build_s:.1f}s). "
            f"Median of {a.runs} interleaved runs, whole processes; {context(pre)}. Findings reported: {findings}. "
            "The reference reads every file of the tree (more than audit reads) and parses nothing.", "",
            "| what | median s | ratio vs find\\|xargs cat |",
            "|---|---:|---:|",
            f"| `katactl --host-root T audit -o json` (new process, incl. Python start-up) | {k:.3f} | {k / r:.2f}x |",
            f"| `isolation.audit.run()` in-process (library only, for reference) | {i:.3f} | {i / r:.2f}x |",
            f"| `find T/... -type f -print0 \\| xargs -0 cat >/dev/null` (all {nfiles} files, no parsing) | {r:.3f} | 1.00x |",
        ]) + "\n"
        print(text)
        if a.write:
            write_section(text, "bench/bench_audit.py")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
