#!/usr/bin/env python3
"""`katactl --help`, a TAB completion request and `katactl version` vs `python3 -c pass`
and `kubectl version --client`, same run, runs interleaved round-robin.

Goals: katactl --help median <= 2.0x kubectl version --client (issue 2), every leaf's
--help <= 1.6x (issue 17): every leaf command of the tree (leaves(): 50 today, rollout run,
node drain, balloon set and upgrade stage among them) is timed, and the summary names the worst.
Bytecode is precompiled first (python -m compileall), as an installed package has it.
The katactl rows run this checkout's editable install (.venv/bin/katactl), whose import finder
(a .pth that site runs at every start) an installed package does not have; the "as installed"
rows run the same entry point and code from an interpreter that sees this checkout and .venv's
site-packages as plain sys.path entries, as a wheel install puts them (installed_katactl()).
Prints its section; with --write also puts it into bench/RESULTS.md.
Usage: bench_startup.py [--runs N] [--write] [--smoke] (--smoke: one run, nothing written)
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import KATACTL, ROOT, bench_parser, context, interleaved, median_ms, precompile, publish  # noqa: E402

#: the goal for every leaf's --help, as a ratio to kubectl version --client (issue 17)
LEAF_GOAL = 1.6


def leaves() -> list[list[str]]:
    """Every leaf command of katactl's tree (``["rollout", "run"]``, ``["audit"]``), in
    REGISTRY order: imports every command module (untimed, in this process)."""
    from katactl.cli import REGISTRY, LazyGroup

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if not subs:
            return [path]
        return [leaf for name, sub in subs.items() for leaf in walk(sub, [*path, name])]

    return [leaf for name in REGISTRY for leaf in walk(LazyGroup().get_command(None, name), [name])]


def installed_katactl(tmp: str) -> list[str]:
    """argv of katactl as a non-editable install runs it: a venv (no pip) of the same base
    interpreter whose site-packages lists this checkout and .venv's site-packages as plain
    paths, and the console script pip writes (.venv/bin/katactl's text), under tmp."""
    import subprocess
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp], check=True)
    py = os.path.join(tmp, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "katactl-checkout.pth"), "w") as f:
        f.write(f"{ROOT}\n{sysconfig.get_paths()['purelib']}\n")
    script = os.path.join(tmp, "bin", "katactl")
    with open(script, "w") as f:
        f.write(f"#!{py}\nimport sys\nfrom katactl.cli import main\nif __name__ == '__main__':\n"
                "    sys.exit(main())\n")
    os.chmod(script, 0o755)
    return [script]


COMPLETE = {"_KATACTL_COMPLETE": "complete_bash", "COMP_WORDS": "katactl con", "COMP_CWORD": "1"}


def main() -> int:
    a = bench_parser("one run, no warm-up, nothing written", runs=15).parse_args()
    runs, warmup = (1, 0) if a.smoke else (a.runs, 2)
    pre = None if a.smoke else precompile()
    cmds = {}
    if shutil.which("kubectl"):
        cmds["kubectl version --client (reference)"] = (["kubectl", "version", "--client"], None)
    cmds["python3 -c pass"] = ([sys.executable, "-c", "pass"], None)
    cmds["katactl --help"] = (KATACTL + ["--help"], None)
    tmp = tempfile.mkdtemp(prefix="katactl-bench-startup-")
    installed = installed_katactl(tmp)
    cmds["katactl --help, as installed"] = (installed + ["--help"], None)
    cmds["katactl sandbox list --help, as installed"] = (installed + ["sandbox", "list", "--help"], None)
    cmds["katactl vmcore collect --help, as installed"] = (installed + ["vmcore", "collect", "--help"], None)
    cmds["TAB: complete `katactl con`"] = (KATACTL, COMPLETE)
    cmds["katactl version"] = (KATACTL + ["version"], None)
    cmds["katactl version -o json"] = (KATACTL + ["version", "-o", "json"], None)
    leaf_rows = {f"katactl {' '.join(leaf)} --help": leaf for leaf in leaves()}
    for name, leaf in leaf_rows.items():
        cmds[name] = (KATACTL + [*leaf, "--help"], None)
    try:
        samples = interleaved(cmds, runs, warmup=warmup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.smoke:
        print(f"bench_startup smoke ok: {len(samples)} commands, {len(leaf_rows)} leaves: "
              + ", ".join(" ".join(leaf) for leaf in leaf_rows.values()))
        return 0
    med = {name: median_ms(s) for name, s in samples.items()}
    ref = med.get("kubectl version --client (reference)")
    lines = ["## Start-up (`--help`, completion, `version`) — bench/bench_startup.py", "",
             f"{runs} runs each after {warmup} warm-up rounds, taken round-robin, median wall-clock of whole "
             f"processes, {platform.python_implementation()} {platform.python_version()}; {context(pre)}.", "",
             "| command | median ms | ratio to kubectl |", "|---|---:|---:|"]
    for name, ms in med.items():
        if name not in leaf_rows:
            lines.append(f"| {name} | {ms:.0f} | {f'{ms / ref:.2f}x' if ref else '-'} |")
    lines += ["", f"Every leaf's `--help` ({len(leaf_rows)} leaves, same rounds), slowest first:", "",
              "| command | median ms | ratio to kubectl |", "|---|---:|---:|"]
    by_time = sorted(leaf_rows, key=lambda n: -med[n])
    for name in by_time:
        lines.append(f"| {name} | {med[name]:.0f} | {f'{med[name] / ref:.2f}x' if ref else '-'} |")
    if ref:
        worst = by_time[0]
        over = [n for n in by_time if med[n] / ref > LEAF_GOAL]
        lines += ["", f"**Every leaf's --help <= {LEAF_GOAL}x kubectl:** "
                  + (f"not met: {len(over)} of {len(leaf_rows)} leaves above, the worst `{worst}` at "
                     f"{med[worst] / ref:.2f}x" if over else
                     f"met in this run: the worst, `{worst}`, at {med[worst] / ref:.2f}x")
                  + f"; the fastest at {med[by_time[-1]] / ref:.2f}x, the median leaf at "
                  f"{statistics.median(med[n] for n in by_time) / ref:.2f}x. The worst of {len(leaf_rows)} "
                  "medians is the noisiest figure here: one burst of load moves it."]
    lines += ["", "The rows marked \"as installed\" run the same console script and code without the editable "
              "install's import finder (which site runs at every start of .venv's interpreter): what a "
              "non-editable install (a wheel) starts; see installed_katactl() in the script."]
    lines += ["", "Static completion scripts (`completions/`) complete command and option names in the shell "
              "itself, without starting Python; the TAB row is the cost of the dynamic fallback. `version` "
              "imports the dependency metadata it reports (importlib.metadata), which `--help` does not."]
    publish("\n".join(lines) + "\n", "bench/bench_startup.py", a.write)
    return 0

if __name__ == "__main__":
    sys.exit(main())
