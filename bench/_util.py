"""Small helpers shared by bench scripts."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KATACTL = [os.path.join(ROOT, ".venv", "bin", "katactl")] if os.path.exists(
    os.path.join(ROOT, ".venv", "bin", "katactl")) else [sys.executable, "-m", "katactl"]


def timed(argv, runs: int = 15, env=None, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``runs`` executions of argv (after warm-up runs)."""
    e = dict(os.environ, **(env or {}))
    out = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=e, check=False)
        if i >= warmup:
            out.append(time.perf_counter() - t)
    return out


def median_ms(samples) -> float:
    return statistics.median(samples) * 1000
