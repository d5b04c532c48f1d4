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
--at REV times katactl as of a commit (not the working tree other engineers are editing),
--baseline REV also times every leaf's --help as of that commit in the same rounds (before/after).
Prints its section; with --write also puts it into bench/RESULTS.md.
Usage: bench_startup.py [--runs N] [--at REV] [--baseline REV] [--write] [--smoke]
(--smoke: one run, nothing written)
"""
from __future__ import annotations

import atexit
import os
import platform
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import (  # noqa: E402
    ROOT, add_rev_options, bench_parser, context, interleaved, katactl_revs, median_ms, precompile, publish)

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


def installed_katactl(tmp: str, src: str = ROOT) -> list[str]:
    """argv of katactl as a non-editable install runs it: a venv (no pip) of the same base
    interpreter whose site-packages lists src (this checkout, or a commit's katactl/ unpacked
    by --at) and .venv's site-packages as plain paths, and the console script pip writes
    (.venv/bin/katactl's text), under tmp."""
    import subprocess
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp], check=True)
    py = os.path.join(tmp, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "katactl-checkout.pth"), "w") as f:
        f.write(f"{src}\n{sysconfig.get_paths()['purelib']}\n")
    script = os.path.join(tmp, "bin", "katactl")
    with open(script, "w") as f:
        f.write(f"#!{py}\nimport sys\nfrom katactl.cli import main\nif __name__ == '__main__':\n"
                "    sys.exit(main())\n")
    os.chmod(script, 0o755)
    return [script]


COMPLETE = {"_KATACTL_COMPLETE": "complete_bash", "COMP_WORDS": "katactl con", "COMP_CWORD": "1"}


def main() -> int:
    ap = bench_parser("one run, no warm-up, nothing written", runs=15)
    add_rev_options(ap)
    a = ap.parse_args()
    runs, warmup = (1, 0) if a.smoke else (a.runs, 2)
    pre = None if a.smoke else precompile()
    tmp = tempfile.mkdtemp(prefix="katactl-bench-startup-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # also when a revision or the venv fails
    revs = katactl_revs(a, os.path.join(tmp, "revs"))  # unpacked and precompiled
    kat, kat_env, label = revs["katactl"]
    base = revs.get("baseline")
    cmds: dict[str, tuple[list[str], dict | None]] = {}
    if shutil.which("kubectl"):
        cmds["kubectl version --client (reference)"] = (["kubectl", "version", "--client"], None)
    cmds["python3 -c pass"] = ([sys.executable, "-c", "pass"], None)
    cmds["katactl --help"] = (kat + ["--help"], kat_env)
    installed = installed_katactl(os.path.join(tmp, "venv"), os.path.join(tmp, "revs", "katactl") if a.at else ROOT)
    cmds["katactl --help, as installed"] = (installed + ["--help"], None)
    cmds["katactl sandbox list --help, as installed"] = (installed + ["sandbox", "list", "--help"], None)
    cmds["katactl vmcore collect --help, as installed"] = (installed + ["vmcore", "collect", "--help"], None)
    cmds["TAB: complete `katactl con`"] = (kat, {**COMPLETE, **(kat_env or {})})
    cmds["katactl version"] = (kat + ["version"], kat_env)
    cmds["katactl version -o json"] = (kat + ["version", "-o", "json"], kat_env)
    leaf_rows = {f"katactl {' '.join(leaf)} --help": leaf for leaf in leaves()}
    for name, leaf in leaf_rows.items():
        cmds[name] = (kat + [*leaf, "--help"], kat_env)
        if base:  # right after it: a burst of load hits both alike
            cmds["before: " + name] = (base[0] + [*leaf, "--help"], base[1])
    cpu: dict[str, list[float]] = {}
    samples = interleaved(cmds, runs, warmup=warmup, cpu=cpu)
    if a.smoke:
        print(f"bench_startup smoke ok: {len(samples)} commands, {len(leaf_rows)} leaves: "
              + ", ".join(" ".join(leaf) for leaf in leaf_rows.values()))
        return 0
    med = {name: median_ms(s) for name, s in samples.items()}
    cpu_ms = {name: median_ms(s) for name, s in cpu.items()}
    ref = med.get("kubectl version --client (reference)")

    def ratio(ms: float) -> str:
        return f"{ms / ref:.2f}x" if ref else "-"

    lines = ["## Start-up (`--help`, completion, `version`) — bench/bench_startup.py", "",
             f"{runs} runs each after {warmup} warm-up rounds, taken round-robin, median wall-clock of whole "
             f"processes, {platform.python_implementation()} {platform.python_version()}; {context(pre)}."
             + (f" katactl is {label}, run from its `git archive` (not the working tree)." if a.at else "")
             + (f" \"Before\" is {base[2]}, each leaf timed right after the same leaf of {label}." if base else ""),
             "", "| command | median ms | ratio to kubectl | CPU ms |", "|---|---:|---:|---:|"]
    for name, ms in med.items():
        if name not in leaf_rows and not name.startswith("before: "):
            lines.append(f"| {name} | {ms:.0f} | {ratio(ms)} | {cpu_ms[name]:.0f} |")
    lines += ["", f"Every leaf's `--help` ({len(leaf_rows)} leaves, same rounds), slowest first:", ""]
    lines += (["| command | median ms | ratio to kubectl | CPU ms | before ms | before ratio | before CPU ms |",
               "|---|---:|---:|---:|---:|---:|---:|"]
              if base else ["| command | median ms | ratio to kubectl | CPU ms |", "|---|---:|---:|---:|"])
    by_time = sorted(leaf_rows, key=lambda n: -med[n])
    for name in by_time:
        was = med.get("before: " + name)
        lines.append(f"| {name} | {med[name]:.0f} | {ratio(med[name])} | {cpu_ms[name]:.0f} |"
                     + (f" {was:.0f} | {ratio(was)} | {cpu_ms['before: ' + name]:.0f} |" if was is not None else ""))
    if ref:
        lines += ["", f"**Every leaf's --help <= {LEAF_GOAL}x kubectl:** {goal_summary(med, leaf_rows, ref)}."]
        if base:
            lines += ["", f"Before ({base[2]}), same rounds: "
                      f"{goal_summary({n: med['before: ' + n] for n in leaf_rows}, leaf_rows, ref)}."]
        lines += [f"The worst of {len(leaf_rows)} medians is the noisiest figure here: one burst of load moves it. "
                  "CPU ms is the median CPU time (user + system) of the same runs: the work, which other jobs' "
                  "load does not lengthen as it does the wall-clock."]
    lines += ["", "The rows marked \"as installed\" run the same console script and code without the editable "
              "install's import finder (which site runs at every start of .venv's interpreter): what a "
              "non-editable install (a wheel) starts; see installed_katactl() in the script."]
    lines += ["", "Static completion scripts (`completions/`) complete command and option names in the shell "
              "itself, without starting Python; the TAB row is the cost of the dynamic fallback. `version` "
              "imports the dependency metadata it reports (importlib.metadata), which `--help` does not."]
    publish("\n".join(lines) + "\n", "bench/bench_startup.py", a.write)
    return 0


def goal_summary(med: dict[str, float], leaf_rows, ref: float) -> str:
    """Whether every leaf's median is within LEAF_GOAL of kubectl's, the worst, fastest and median leaf."""
    by_time = sorted(leaf_rows, key=lambda n: -med[n])
    worst = by_time[0]
    over = [n for n in by_time if med[n] / ref > LEAF_GOAL]
    return ((f"not met: {len(over)} of {len(leaf_rows)} leaves above, the worst `{worst}` at "
             f"{med[worst] / ref:.2f}x" if over else f"met in this run: the worst, `{worst}`, at {med[worst] / ref:.2f}x")
            + f"; the fastest at {med[by_time[-1]] / ref:.2f}x, the median leaf at "
            f"{statistics.median(med[n] for n in by_time) / ref:.2f}x")

if __name__ == "__main__":
    sys.exit(main())
