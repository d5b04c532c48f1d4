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
    """Wall-clock seconds of ``runs`` executions of argv (after warm-up runs); stdout is
    discarded, and a failing run ends the bench (SystemExit with the tail of its stderr)."""
    e = dict(os.environ, **(env or {}))
    out = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e, check=False)
        dt = time.perf_counter() - t
        if p.returncode != 0:
            raise SystemExit(f"{argv[:6]} failed: {p.stderr.decode()[-300:]}")
        if i >= warmup:
            out.append(dt)
    return out


def median_ms(samples) -> float:
    return statistics.median(samples) * 1000


def interleaved(cmds: dict[str, tuple[list[str], dict | None]], runs: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall-clock seconds per command, runs taken round-robin (one of each per round)
    so that a burst of load on the machine hits every command alike."""
    out: dict[str, list[float]] = {name: [] for name in cmds}
    for i in range(warmup + runs):
        for name, (argv, env) in cmds.items():
            e = dict(os.environ, **(env or {}))
            t = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=e, check=False)
            if i >= warmup:
                out[name].append(time.perf_counter() - t)
    return out


def write_section(markdown: str, script: str) -> None:
    """Replace the section of bench/RESULTS.md whose "## " heading names ``script``
    (e.g. "bench/bench_startup.py"), up to the next "## ", or append it."""
    path = os.path.join(ROOT, "bench", "RESULTS.md")
    with open(path) as f:
        text = f.read()
    start = next((i for i in _heading_offsets(text) if script in text[i:text.find("\n", i)]), -1)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + markdown.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + markdown.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(text)


def _heading_offsets(text: str):
    if text.startswith("## "):
        yield 0
    i = text.find("\n## ")
    while i >= 0:
        yield i + 1
        i = text.find("\n## ", i + 1)
