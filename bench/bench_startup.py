#!/usr/bin/env python3
"""`katactl --help`, a TAB completion request and `katactl version` vs `python3 -c pass`
and `kubectl version --client`, same run, runs interleaved round-robin.

Goal (issue 2): katactl --help median <= 2.0x kubectl version --client.
Writes its section into bench/RESULTS.md (and prints it). Usage: bench_startup.py [RUNS]
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import KATACTL, interleaved, median_ms, write_section  # noqa: E402

COMPLETE = {"_KATACTL_COMPLETE": "complete_bash", "COMP_WORDS": "katactl con", "COMP_CWORD": "1"}


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    cmds = {}
    if shutil.which("kubectl"):
        cmds["kubectl version --client (reference)"] = (["kubectl", "version", "--client"], None)
    cmds["python3 -c pass"] = ([sys.executable, "-c", "pass"], None)
    cmds["katactl --help"] = (KATACTL + ["--help"], None)
    cmds["TAB: complete `katactl con`"] = (KATACTL, COMPLETE)
    cmds["katactl version"] = (KATACTL + ["version"], None)
    cmds["katactl version -o json"] = (KATACTL + ["version", "-o", "json"], None)
    samples = interleaved(cmds, runs)
    med = {name: median_ms(s) for name, s in samples.items()}
    ref = med.get("kubectl version --client (reference)")
    load = os.getloadavg()[0]
    lines = ["## Start-up (`--help`, completion, `version`) — bench/bench_startup.py", "",
             f"{runs} runs each, taken round-robin, median wall-clock, {platform.python_implementation()} "
             f"{platform.python_version()}, same run ({time.strftime('%Y-%m-%d')}, load average {load:.1f}).", "",
             "| command | median ms | ratio to kubectl |", "|---|---:|---:|"]
    for name, ms in med.items():
        lines.append(f"| {name} | {ms:.0f} | {f'{ms / ref:.2f}x' if ref else '-'} |")
    lines += ["", "Static completion scripts (`completions/`) complete command and option names in the shell "
              "itself, without starting Python; the TAB row is the cost of the dynamic fallback. `version` "
              "imports the dependency metadata it reports (importlib.metadata), which `--help` does not."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, "bench/bench_startup.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
