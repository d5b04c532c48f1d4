"""Bench: `katactl sandbox list -o json` on a 1,000-sandbox node tree vs a shell
baseline reading the same files (`ls` + `cat` of every persist.json and bundle
config.json). Prints a markdown section. Run: .venv/bin/python bench/bench_sandbox.py
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._util import timed  # noqa: E402
from katactl.lab import layout  # noqa: E402

N = int(os.environ.get("BENCH_SANDBOXES", "1000"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))


def median(argv) -> float:
    """Median seconds of RUNS runs of argv, after one warm-up run (page cache, bytecode cache)."""
    return statistics.median(timed(argv, runs=RUNS, warmup=1))


def main() -> None:
    root = tempfile.mkdtemp(prefix="kb", dir="/tmp")
    try:
        layout.write_many(root, N)
        sbs = f"{root}/run/vc/sbs"
        bundles = f"{root}/run/containerd/io.containerd.runtime.v2.task/k8s.io"
        kata = [sys.executable, "-m", "katactl", "--host-root", root, "sandbox", "list", "-o", "json"]
        loop = (f'cd {sbs} && for d in $(ls); do cat "$d/persist.json" "{bundles}/$d/config.json"; done')
        one = f'cd {sbs} && ls | while read d; do echo "$d/persist.json {bundles}/$d/config.json"; done | xargs cat'
        t_kata = median(kata)
        t_kata_nc = median(kata + ["--no-check"])
        t_loop = median(["sh", "-c", loop])
        t_xargs = median(["sh", "-c", one])
        t_help = median([sys.executable, "-m", "katactl", "--help"])
        from katactl import sandbox
        from katactl.backends.local import LocalTransport

        def lib():
            t = time.perf_counter()
            assert len(sandbox.discover(LocalTransport(root))) == N
            return time.perf_counter() - t

        lib()  # warm-up
        t_lib = statistics.median(lib() for _ in range(RUNS))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"## sandbox list on a {N:,}-sandbox node tree\n")
    print(f"Median of {RUNS} runs (after one warm-up), Go-runtime layout: persist.json + containerd "
          "bundle config.json per sandbox, no live shims (liveness: one stat/connect each).\n")
    print("| what | seconds | ratio to `ls`+`cat` loop |")
    print("|---|---:|---:|")
    for name, t in [("`katactl sandbox list -o json` (process, incl. liveness)", t_kata),
                    ("`katactl sandbox list -o json --no-check`", t_kata_nc),
                    ("`sandbox.discover()` in-process (library only)", t_lib),
                    ("shell: `ls` + `cat` loop (one cat per sandbox)", t_loop),
                    ("shell: `ls` + one `xargs cat` of all files", t_xargs),
                    ("`katactl --help` (interpreter start-up floor)", t_help)]:
        print(f"| {name} | {t:.3f} | {t / t_loop:.2f} |")
    print()


if __name__ == "__main__":
    main()
