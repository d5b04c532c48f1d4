"""Bench: `katactl inspect pressure -o json` on a node with 500 pods (300 online runc pods, 200
Kata sandbox pods) and 200 sandboxes vs `cat` of the same signal files twice (two samples, the
same interval apart), same run. Whole processes, runs interleaved.

The node is a cgroup v2 fixture tree (tests/fixtures_isolation.py: build_node, and every
cgroup's signal files as the kernel prints them: <res>.pressure, cpu.stat, memory.events,
memory.stat, memory.current, io.stat; /proc/pressure, /proc/vmstat, /proc/diskstats). The
reference reads exactly the files katactl samples (listed with katactl's own target_files,
untimed) and parses nothing; katactl also discovers the sandboxes and walks kubepods.

Usage: .venv/bin/python bench/bench_pressure.py [--online 300] [--sandboxes 200] [--runs 5] [--write] [--smoke]
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._util import KATACTL, bench_parser, context, interleaved, precompile, publish, require  # noqa: E402
from tests import fixtures_isolation as fx  # noqa: E402

INTERVAL = 0.1  # the smallest --interval: the comparison is about the work, not the wait


def build(root: str, online: int, sandboxes: int) -> None:
    fx.build_node(root, mode="v2", online_pods=online, sandboxes=sandboxes, resctrl=False)
    fx.write_block_devices(root)
    fx.write_v2_root_io(root)
    fx.write_node_signals(root, 0)
    cgroot = os.path.join(root, "sys/fs/cgroup")
    for d, _, names in os.walk(cgroot):  # every cgroup of the tree gets its signal files
        if "cgroup.procs" in names and d != cgroot:
            fx.write_v2_signals(root, d[len(cgroot):], 0, io_bytes={"8:16": 1 << 20})


def sampled_files(root: str) -> list[str]:
    """The files one sample of `inspect pressure` reads that exist (node paths made real)."""
    from katactl.backends.local import LocalTransport
    from katactl.isolation import pressure
    from katactl.isolation.report import Node

    node = Node(LocalTransport(root))
    extras = pressure.kernel_extras(node.t, node.fs)
    tgs = pressure.default_targets(node)
    pressure.find_containers(node.t, node.fs, tgs)  # the online pods' container cgroups too
    paths = {p for tg in tgs for c in pressure.target_files(node.fs, tg, extras).values() for p, _ in c}
    real = [os.path.join(root, p.lstrip("/")) for p in sorted(paths)]
    return [p for p in real if os.path.isfile(p)]


def main() -> None:
    ap = bench_parser("5 pods, one run, nothing written")
    ap.add_argument("--online", type=int, default=300)
    ap.add_argument("--sandboxes", type=int, default=200)
    a = ap.parse_args()
    require("xargs", "cat", "sleep")
    if a.smoke:
        a.online, a.sandboxes = 3, 2
    runs, warmup = (1, 0) if a.smoke else (a.runs, 1)
    pre = None if a.smoke else precompile()
    root = tempfile.mkdtemp(prefix="katactl-bench-pressure-")
    try:
        t0 = time.perf_counter()
        build(root, a.online, a.sandboxes)
        build_s = time.perf_counter() - t0
        files = sampled_files(root)
        with open(os.path.join(root, "files"), "w") as f:
            f.write("\n".join(files) + "\n")
        kat = [*KATACTL, "--host-root", root, "inspect", "pressure", "-o", "json", "--interval", f"{INTERVAL}s"]
        one = f"xargs cat < {root}/files"
        ref = f"{one} && sleep {INTERVAL} && {one}"
        doc = json.loads(subprocess.run(kat, capture_output=True, text=True, check=True).stdout)
        meta = doc  # the meta fields sit beside the items
        assert meta.get("sandboxes") == a.sandboxes and meta.get("onlinePods") == a.online, meta
        med = {k: statistics.median(v) for k, v in
               interleaved({"katactl": (kat, None), "cat": (["sh", "-c", ref], None)}, runs, warmup=warmup).items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.smoke:
        print(f"bench_pressure smoke ok: {meta.get('targets')} targets, {len(files)} files per sample")
        return
    r = med["cat"]
    text = "\n".join([
        f"## inspect pressure, {a.online + a.sandboxes} pods and {a.sandboxes} sandboxes — bench/bench_pressure.py", "",
        f"cgroup v2 fixture node (tests/fixtures_isolation.py, built in {build_s:.1f}s): {a.online} online runc "
        f"pods, {a.sandboxes} Kata sandbox pods with their sandbox and kata_overhead cgroups; {meta.get('targets')} "
        f"targets, {len(files)} signal files per sample. Median of {runs} interleaved runs after a warm-up, whole "
        f"processes; {context(pre)}. `inspect pressure -o json --interval {INTERVAL:g}s` discovers the sandboxes, "
        f"walks kubepods, reads every target's files twice {INTERVAL:g} s apart, computes the rates and the "
        f"summary and prints JSON. The reference `cat`s the same {len(files)} files twice, {INTERVAL:g} s apart "
        "(`xargs cat`, parsing nothing).", "",
        "| what | seconds | ratio |", "|---|---:|---:|",
        f"| `katactl inspect pressure -o json --interval {INTERVAL:g}s` | {med['katactl']:.3f} | "
        f"{med['katactl'] / r:.2f}x (target <= 1.5x) |",
        f"| `xargs cat` of the same files, 2 samples + sleep {INTERVAL:g}s (reference) | {r:.3f} | 1.00x |",
    ]) + "\n"
    publish(text, "bench/bench_pressure.py", a.write)


if __name__ == "__main__":
    main()
