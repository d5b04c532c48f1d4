"""Bench: `katactl overhead -o json` on a node with 200 running sandboxes vs what a shell does
to get the same raw figures: `ps` of every process and thread (pid, ppid, rss, CPU time, name)
plus `cat` of each sandbox's kata_overhead/<id> cgroup files (memory.usage_in_bytes,
cpuacct.usage), twice, the sampling interval apart. Whole processes, runs interleaved.

Node: katactl.lab.layout sandboxes whose shim (<bundle>/shim.pid) and VMM (persist.json Pid)
are real processes (`sleep`, 400 in all), each VMM in a real cgroup v1 kata_overhead/<id>
(memory and cpuacct; created here, removed after), the host's /proc and /sys/fs/cgroup linked
into the node root, and a live lab shim server per sandbox: overhead also scrapes every shim
(guest memory figures), so an equal-work row adds `xargs -P 32 curl` of the same sockets.

Usage: .venv/bin/python bench/bench_overhead.py [--sandboxes 200] [--runs 5] [--write] [--smoke]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._util import add_rev_options, katactl_revs, bench_parser, context, interleaved, precompile, publish, require, shim_node  # noqa: E402
from katactl.lab import layout  # noqa: E402

INTERVAL = 0.1  # overhead's smallest --interval
PAR = 32
CG = "/sys/fs/cgroup"


def make_cgroups(sids, pids) -> list[str]:
    """kata_overhead/<id> in the memory and cpuacct v1 hierarchies, each with its VMM; the
    directories made (empty when this machine cannot: then overhead measures processes only)."""
    made = [f"{CG}/{ctl}/kata_overhead" for ctl in ("memory", "cpuacct")
            if not os.path.isdir(f"{CG}/{ctl}/kata_overhead")]  # removed after, when made here
    for sid, pid in zip(sids, pids, strict=True):
        for ctl in ("memory", "cpuacct"):
            d = f"{CG}/{ctl}/kata_overhead/{sid}"
            try:
                os.makedirs(d)
                made.append(d)  # after its parent: removed in reverse order
                with open(f"{d}/cgroup.procs", "w") as f:
                    f.write(str(pid))
            except OSError:
                return made
    return made


def main() -> None:
    ap = bench_parser("3 sandboxes, one run, nothing written")
    ap.add_argument("--sandboxes", type=int, default=200)
    add_rev_options(ap)
    a = ap.parse_args()
    require("ps", "cat", "curl", "xargs", "sleep")
    n = 3 if a.smoke else a.sandboxes
    runs, warmup = (1, 0) if a.smoke else (a.runs, 1)
    pre = None if a.smoke else precompile()
    procs = [subprocess.Popen(["sleep", "3600"], start_new_session=True) for _ in range(2 * n)]  # shim, VMM
    shims, vmms = procs[:n], procs[n:]
    cgroups: list[str] = []
    try:
        with shim_node(n, f"bo{os.getpid()}-", pids=[p.pid for p in vmms], host_views=True) as (root, sbs):
            for (p, _), shim in zip(sbs, shims, strict=True):
                layout.write_shim_pid(root, p.bundle_node, shim.pid)
            cgroups = make_cgroups([p.sandbox_id for p, _ in sbs], [p.pid for p in vmms])
            files = [f"{CG}/{c}/kata_overhead/{p.sandbox_id}/{f}" for p, _ in sbs
                     for c, f in (("memory", "memory.usage_in_bytes"), ("cpuacct", "cpuacct.usage"))]
            if not all(os.path.isdir(os.path.dirname(f)) for f in files):
                files = []
            with open(f"{root}/cgfiles", "w") as f:
                f.write("\n".join(files) + "\n")
            with open(f"{root}/socks", "w") as f:
                f.writelines(f"{s}\n" for _, s in sbs)
            revs = katactl_revs(a, f"{root}/revs")
            args = ["--host-root", root, "overhead", "-o", "json", "--interval", f"{INTERVAL}s",
                    "--runtime-class-overhead", "cpu=4,memory=8Gi"]
            kat = [*revs["katactl"][0], *args]
            one = f"ps -eLo pid,ppid,tid,rss,time,comm && xargs cat < {root}/cgfiles" if files else \
                "ps -eLo pid,ppid,tid,rss,time,comm"
            psref = f"{one} && sleep {INTERVAL} && {one}"
            curl = f"xargs -P {PAR} -I{{}} curl -sf --unix-socket {{}} http://localhost/metrics < {root}/socks"
            doc = json.loads(subprocess.run(kat, capture_output=True, text=True, check=True,
                                            env=dict(os.environ, **(revs["katactl"][1] or {}))).stdout)
            measured = {it["measured"]["source"] for it in doc["items"]}
            assert len(doc["items"]) == n and all(len(it["processes"]) == 2 for it in doc["items"]), doc["items"][:1]
            cmds = {"katactl": (kat, revs["katactl"][1]), "ps": (["sh", "-c", psref], None),
                    "eq": (["sh", "-c", f"{psref} && {curl}"], None)}
            if "baseline" in revs:
                cmds["base"] = ([*revs["baseline"][0], *args], revs["baseline"][1])
            med = {k: statistics.median(v) for k, v in interleaved(cmds, runs, warmup=warmup).items()}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for d in reversed(cgroups):
            try:
                os.rmdir(d)
            except OSError:
                pass
    if a.smoke:
        print(f"bench_overhead smoke ok: {n} sandboxes, measured from {sorted(measured)}")
        return
    ref = med["ps"]
    cg = (f"{len(files)} cgroup files (kata_overhead/<id> memory.usage_in_bytes and cpuacct.usage, real "
          "cgroup v1)") if files else "no cgroup files (kata_overhead cgroups could not be made here)"
    text = "\n".join([
        f"## overhead on a {n}-sandbox node — bench/bench_overhead.py", "",
        f"Median of {runs} interleaved runs after a warm-up, whole processes; {context(pre)}. "
        f"`overhead -o json --interval {INTERVAL:g}s` discovers the sandboxes, scrapes every shim ({PAR} at a "
        "time) for the guest memory figures, reads every process's /proc/<pid>/stat (the process tree), "
        "the VMMs' threads, then twice the members' stats and the kata_overhead cgroups, and prints "
        f"JSON. Node: {2 * n} real processes (a shim and a VMM per sandbox) and {cg}; measured from "
        f"{', '.join(sorted(measured))}. The reference: `ps -eLo pid,ppid,tid,rss,time,comm` and `cat` of "
        f"the same cgroup files, twice, {INTERVAL:g} s apart; the equal-work row also curls every shim.", "",
        "| what | seconds | ratio to ps + cat |", "|---|---:|---:|",
        f"| `{revs['katactl'][2]} overhead -o json --interval {INTERVAL:g}s` | {med['katactl']:.3f} | "
        f"{med['katactl'] / ref:.2f}x (target <= 2x) |",
        *([f"| `{revs['baseline'][2]} overhead ...` (before) | {med['base']:.3f} | {med['base'] / ref:.2f}x |"]
          if "base" in med else []),
        f"| `ps -eLo ...` + `cat` cgroup files, 2 samples + sleep {INTERVAL:g}s (reference) | {ref:.3f} | 1.00x |",
        f"| the same + `xargs -P {PAR} curl` of every shim (equal work) | {med['eq']:.3f} | "
        f"{med['eq'] / ref:.2f}x (katactl {med['katactl'] / med['eq']:.2f}x its time) |",
    ]) + "\n"
    publish(text, "bench/bench_overhead.py", a.write)


if __name__ == "__main__":
    main()
