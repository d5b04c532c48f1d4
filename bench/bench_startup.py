#!/usr/bin/env python3
"""`katactl --help` and a TAB completion request vs `kubectl version --client`, same run.

Goal (issue 2): katactl --help median <= 2.0x kubectl version --client.
Prints a markdown section for bench/RESULTS.md.
"""
from __future__ import annotations

import platform
import shutil
import sys

from _util import KATACTL, median_ms, timed


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    rows = []
    ref = None
    if shutil.which("kubectl"):
        ref = median_ms(timed(["kubectl", "version", "--client"], runs))
        rows.append(("kubectl version --client (reference)", ref))
    rows.append(("python -c pass", median_ms(timed([sys.executable, "-c", "pass"], runs))))
    rows.append(("katactl --help", median_ms(timed(KATACTL + ["--help"], runs))))
    rows.append(("katactl config view -o json",
                 median_ms(timed(KATACTL + ["config", "view", "-o", "json"], runs))))
    rows.append(("TAB: complete `katactl con`", median_ms(timed(
        KATACTL, runs, env={"_KATACTL_COMPLETE": "complete_bash", "COMP_WORDS": "katactl con", "COMP_CWORD": "1"}))))
    print("## Start-up (`--help`, completion)\n")
    print(f"{runs} runs each, median wall-clock, {platform.python_implementation()} {platform.python_version()}, same run.\n")
    print("| command | median ms | ratio to kubectl |")
    print("|---|---:|---:|")
    for name, ms in rows:
        ratio = f"{ms / ref:.2f}x" if ref else "-"
        print(f"| {name} | {ms:.0f} | {ratio} |")
    print("\nStatic completion scripts (`completions/`) complete command and option names in the shell "
          "itself, without starting Python; the TAB row is the cost of the dynamic fallback.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
