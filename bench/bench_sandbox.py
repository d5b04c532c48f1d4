"""Bench: `katactl sandbox list -o json` on node trees of 1,000 and 10,000 sandboxes against
`find ... -type f -print0 | xargs -0 cat` of the same files (every persist.json and bundle
config.json: the bytes discovery has to read), same run, runs interleaved, whole processes
timed (start-up included) with their peak RSS (os.wait4).

RSS per sandbox = (peak RSS at N - peak RSS on an empty node) / N.

With --baseline REV, katactl as of git revision REV runs in the same rounds (before/after).

Usage: .venv/bin/python bench/bench_sandbox.py [--sizes 1000,10000] [--runs 5] [--baseline REV] [--write] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._util import KATACTL, context, katactl_at, precompile, require, run_rss, write_section  # noqa: E402
from katactl.lab import layout  # noqa: E402

BUNDLES = "run/containerd/io.containerd.runtime.v2.task"

# Where the ratio cannot go below with CPython: a plain loop (no katactl, no objects kept, no
# output) making discovery's system calls and parses for each sandbox: the sandbox directory
# listing with its stats, the bundle listing (names only), the four stats before reading (state
# file, bundle config.json, shim.pid, extra-monitor.sock), the two reads to EOF, the two parses
# (orjson.loads, as discovery), the liveness stats (/proc/<pid> when there is a pid, the shim
# socket).
FLOOR = r"""
import gc, os, sys
import orjson
gc.disable()
root = sys.argv[1]
sbs, bnd = root + "/run/vc/sbs", root + "/run/containerd/io.containerd.runtime.v2.task/k8s.io"
def stat(p):
    try:
        return os.stat(p)
    except OSError as e:
        return e
def read(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        parts = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                return b"".join(parts)
            parts.append(b)
    finally:
        os.close(fd)
names = [e.name for e in os.scandir(sbs) if e.stat()]
os.listdir(bnd)
for n in names:
    files = [f"{sbs}/{n}/persist.json", f"{bnd}/{n}/config.json"]
    for p in files + [f"{bnd}/{n}/shim.pid", f"{root}/run/vc/vm/{n}/extra-monitor.sock"]:
        stat(p)
    st = orjson.loads(read(files[0]))
    orjson.loads(read(files[1]))
    if st["HypervisorState"]["Pid"]:  # discovery probes /proc/<pid> only for a pid
        stat(f"{root}/proc/{st['HypervisorState']['Pid']}")
    stat(f"{sbs}/{n}/shim-monitor.sock")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", metavar="REV", help="also time katactl as of this git revision")
    ap.add_argument("--write", action="store_true", help="record the section in bench/RESULTS.md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run, nothing written")
    a = ap.parse_args()
    require("find", "xargs", "cat")
    sizes = [20] if a.smoke else [int(x) for x in a.sizes.split(",")]
    runs, warmup = (1, 0) if a.smoke else (a.runs, 1)
    pre = None if a.smoke else precompile()
    env = dict(os.environ, NO_COLOR="1")
    rows = []
    empty = tempfile.mkdtemp(prefix="kb0-", dir="/tmp")
    old = old_env = None
    if a.baseline:
        old, extra, rev = katactl_at(a.baseline, os.path.join(empty + "-old", "src"))
        old_env = dict(env, **extra)
    try:
        base_rss = min(run_rss([*KATACTL, "--host-root", empty, "sandbox", "list", "-o", "json"], env)[1]
                       for _ in range(max(1, runs)))
        for n in sizes:
            root = tempfile.mkdtemp(prefix="kb", dir="/tmp")
            try:
                layout.write_many(root, n)
                kat = [*KATACTL, "--host-root", root, "sandbox", "list", "-o", "json"]
                shell = (f"find {root}/run/vc/sbs {root}/{BUNDLES} -type f -print0 | xargs -0 cat")
                cmds = {"kat": kat, "nc": kat + ["--no-check"], "find": ["sh", "-c", shell],
                        "empty": [*KATACTL, "--host-root", empty, "sandbox", "list", "-o", "json"],
                        "floor": [sys.executable, "-c", FLOOR, root]}
                if old:
                    cmds["old"] = [*old, *kat[len(KATACTL):]]
                res: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
                for i in range(warmup + runs):
                    for k, argv in cmds.items():
                        r = run_rss(argv, old_env if k == "old" else env)
                        if i >= warmup:
                            res[k].append(r)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
            rss = {k: max(x[1] for x in v) for k, v in res.items()}
            rows.append((n, med, rss))
    finally:
        shutil.rmtree(empty, ignore_errors=True)
        shutil.rmtree(empty + "-old", ignore_errors=True)
    if a.smoke:
        print(f"bench_sandbox smoke ok: {rows[0][0]} sandboxes, katactl {rows[0][1]['kat']:.2f}s")
        return
    lines = ["## Sandbox discovery — bench/bench_sandbox.py", "",
             f"Go-runtime node trees (katactl.lab.layout: persist.json + containerd bundle config.json per "
             f"sandbox, no live shims: liveness is a stat of /proc/<pid> and of the shim socket). Median of "
             f"{runs} interleaved runs after a warm-up, whole processes (start-up included), peak RSS from "
             f"os.wait4; {context(pre)}. Reference: `find <sbs> <bundles> -type f -print0 | xargs -0 cat` "
             "(the same files, read once, nothing parsed). Both write to /dev/null. Start-up: the same "
             "command on an empty node. Python floor: a plain CPython loop making discovery's system calls "
             "and parses (orjson.loads) per sandbox, nothing kept, nothing written (FLOOR in the script). "
             "All in the same rounds.", "",
             "| sandboxes | katactl -o json s | --no-check s | find \\| xargs cat s | ratio | ratio --no-check "
             "| start-up s | Python floor s (ratio) | katactl peak RSS MiB | RSS per sandbox KiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, med, rss in rows:
        per = (rss["kat"] - base_rss) / n
        lines.append(f"| {n:,} | {med['kat']:.3f} | {med['nc']:.3f} | {med['find']:.3f} | "
                     f"{med['kat'] / med['find']:.2f}x | {med['nc'] / med['find']:.2f}x | {med['empty']:.3f} | "
                     f"{med['floor']:.3f} ({med['floor'] / med['find']:.2f}x) | {rss['kat'] / 1024:.0f} | {per:.1f} |")
    if old:
        lines += ["", f"Before/after in the same rounds: katactl as of {rev} (`--baseline {a.baseline}`), same "
                  "interpreter, bytecode precompiled too:", "",
                  f"| sandboxes | {rev} -o json s | ratio to find | {rev} peak RSS MiB | RSS per sandbox KiB | "
                  "now -o json s | speed-up |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for n, med, rss in rows:
            lines.append(f"| {n:,} | {med['old']:.3f} | {med['old'] / med['find']:.2f}x | {rss['old'] / 1024:.0f} | "
                         f"{(rss['old'] - base_rss) / n:.1f} | {med['kat']:.3f} | {med['old'] / med['kat']:.2f}x |")
    lines += ["", f"Peak RSS on an empty node (the interpreter and imports): {base_rss / 1024:.0f} MiB; "
              "RSS per sandbox = (peak RSS at N - that) / N."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        write_section(text, "bench/bench_sandbox.py")


if __name__ == "__main__":
    main()
