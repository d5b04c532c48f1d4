"""Bench: `katactl top -o json` over 200 live lab shim servers vs curl over the same sockets,
with the same concurrency (katactl scrapes 32 shims at a time: `xargs -P 32 curl`), two
passes 0.1 s apart as top takes them (CPU % needs a delta). Whole processes, runs interleaved.

Usage: .venv/bin/python bench/bench_top.py [--shims 200] [--runs 5] [--write] [--smoke]
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._util import add_rev_options, bench_parser, context, interleaved, katactl_revs, precompile, publish, require, shim_node  # noqa: E402

INTERVAL = 0.1
PAR = 32


def main() -> None:
    ap = bench_parser("5 shims, one run, nothing written")
    ap.add_argument("--shims", type=int, default=200)
    add_rev_options(ap)
    a = ap.parse_args()
    require("curl", "xargs")
    n = 5 if a.smoke else a.shims
    runs, warmup = (1, 0) if a.smoke else (a.runs, 1)
    pre = None if a.smoke else precompile()
    with shim_node(n, "top") as (root, shims):
        listfile = f"{root}/socks"
        with open(listfile, "w") as f:
            f.write("\n".join(s for _, s in shims) + "\n")
        revs = katactl_revs(a, f"{root}/revs")
        args = ["--host-root", root, "top", "-o", "json", "--interval", f"{INTERVAL}s"]
        top = [*revs["katactl"][0], *args]
        one = f"xargs -P {PAR} -I{{}} curl -sf --unix-socket {{}} http://localhost/metrics < {listfile}"
        two = f"{one} && sleep {INTERVAL} && {one}"
        serial = f'while read s; do curl -sf --unix-socket "$s" http://localhost/metrics || exit 1; done < {listfile}'
        cmds = {"top": (top, revs["katactl"][1]), "two": (["sh", "-c", two], None), "one": (["sh", "-c", one], None),
                "serial": (["sh", "-c", f"({serial}) && sleep {INTERVAL} && ({serial})"], None)}
        if "baseline" in revs:
            cmds["base"] = ([*revs["baseline"][0], *args], revs["baseline"][1])
        med = {k: statistics.median(v) for k, v in interleaved(cmds, runs, warmup=warmup).items()}
    if a.smoke:
        print(f"bench_top smoke ok: {n} shims, top {med['top']:.2f}s")
        return
    ref = med["two"]
    lines = [f"## top over {n} live shim servers — bench/bench_top.py", "",
             f"Median of {runs} interleaved runs after a warm-up, whole processes; {context(pre)}. "
             f"`top -o json` discovers the sandboxes, checks liveness, scrapes every shim twice {INTERVAL:g} s "
             f"apart ({PAR} at a time), parses the families it needs and prints JSON. The reference fetches "
             f"the same text with the same concurrency (`xargs -P {PAR} curl`), twice, and parses nothing. "
             "Servers: lab shim servers (threaded, one Python process, in the bench process).", "",
             "| what | seconds | ratio |", "|---|---:|---:|",
             f"| `{revs['katactl'][2]} top -o json --interval {INTERVAL:g}s` (2 x {n} scrapes) | {med['top']:.3f} | "
             f"{med['top'] / ref:.2f}x |",
             *([f"| `{revs['baseline'][2]} top ...` (before) | {med['base']:.3f} | {med['base'] / ref:.2f}x |"]
               if "base" in med else []),
             f"| `xargs -P {PAR} curl`, 2 passes + sleep {INTERVAL:g}s (reference) | {ref:.3f} | 1.00x |",
             f"| `xargs -P {PAR} curl`, 1 pass | {med['one']:.3f} | {med['one'] / ref:.2f}x |",
             f"| serial curl loop, 2 passes + sleep (the old reference) | {med['serial']:.3f} | "
             f"{med['serial'] / ref:.2f}x |"]
    publish("\n".join(lines) + "\n", "bench/bench_top.py", a.write)


if __name__ == "__main__":
    main()
