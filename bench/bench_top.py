"""Bench: `katactl top -o json` over 200 live lab shim servers vs a shell loop of
`curl --unix-socket ... /metrics` over the same sockets. Prints a markdown section.
Run: .venv/bin/python bench/bench_top.py
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._util import timed  # noqa: E402
from katactl.lab import layout  # noqa: E402
from katactl.lab.shimserver import ShimServer, ShimState  # noqa: E402

N = int(os.environ.get("BENCH_SHIMS", "200"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
INTERVAL = 0.1


def median(argv) -> float:
    """Median seconds of RUNS runs of argv, after one warm-up run."""
    return statistics.median(timed(argv, runs=RUNS, warmup=1))


def main() -> None:
    if not shutil.which("curl"):
        raise SystemExit("curl is needed for the baseline")
    root = tempfile.mkdtemp(prefix="kt", dir="/tmp")
    os.symlink("/proc", f"{root}/proc")
    servers = []
    try:
        socks = []
        for i in range(N):
            sid = f"top{i:04d}"
            p = layout.write_go_sandbox(root, sid, pid=os.getpid(), pod_name=f"p{i}", pod_namespace="bench")
            servers.append(ShimServer(p.shim_socket, flavour="go",
                                      state=ShimState(sandbox_id=sid, hypervisor_cpu_percent=i % 100)).start())
            socks.append(p.shim_socket)
        listfile = f"{root}/socks"
        with open(listfile, "w") as f:
            f.write("\n".join(socks) + "\n")
        top = [sys.executable, "-m", "katactl", "--host-root", root, "top", "-o", "json",
               "--interval", f"{INTERVAL}s"]
        curl1 = f'while read s; do curl -s --unix-socket "$s" http://localhost/metrics; done < {listfile}'
        curl2 = f"({curl1}); sleep {INTERVAL}; ({curl1})"
        t_top = median(top)
        t_c1 = median(["sh", "-c", curl1])
        t_c2 = median(["sh", "-c", curl2])
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"## top over {N} live shim servers\n")
    print(f"Median of {RUNS} runs (after one warm-up). `top -o json` discovers the sandboxes, checks "
          f"liveness, scrapes every shim twice {INTERVAL:g}s apart (CPU % needs a delta), parses the "
          "families it needs with prometheus_client, and prints JSON. The baseline only fetches the text. "
          "Servers: lab shim servers (threaded, one Python process).\n")
    print("| what | seconds | ratio to curl loop with the same work |")
    print("|---|---:|---:|")
    print(f"| `katactl top -o json --interval {INTERVAL:g}s` (2 x {N} scrapes) | {t_top:.3f} | {t_top / t_c2:.2f} |")
    print(f"| shell: `curl --unix-socket` loop, 2 passes + sleep {INTERVAL:g}s (2 x {N} scrapes) "
          f"| {t_c2:.3f} | 1.00 |")
    print(f"| shell: `curl --unix-socket` loop, 1 pass ({N} scrapes) | {t_c1:.3f} | {t_c1 / t_c2:.2f} |")
    print()


if __name__ == "__main__":
    main()
