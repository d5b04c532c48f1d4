#!/usr/bin/env python3
"""`katactl --help`, a TAB completion request and `katactl version` vs `python3 -c pass`
and `kubectl version --client`, same run, runs interleaved round-robin.

Goals: katactl --help median <= 2.0x kubectl version --client (issue 2), every leaf's
--help (`sandbox list --help` is the one measured) <= 1.6x (issue 17).
Bytecode is precompiled first (python -m compileall), as an installed package has it.
The katactl rows run this checkout's editable install (.venv/bin/katactl), whose import finder
(a .pth that site runs at every start) an installed package does not have; the "as installed"
rows run the same entry point and code from an interpreter that sees this checkout and .venv's
site-packages as plain sys.path entries, as a wheel install puts them (installed_katactl()).
Writes its section into bench/RESULTS.md (and prints it).
Usage: bench_startup.py [RUNS] [--smoke] (--smoke: one run, nothing written)
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import KATACTL, ROOT, context, interleaved, median_ms, precompile, smoke_flag, write_section  # noqa: E402

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
    smoke = smoke_flag()
    runs = 1 if smoke else (int(sys.argv[1]) if len(sys.argv) > 1 else 21)
    pre = None if smoke else precompile()
    cmds = {}
    if shutil.which("kubectl"):
        cmds["kubectl version --client (reference)"] = (["kubectl", "version", "--client"], None)
    cmds["python3 -c pass"] = ([sys.executable, "-c", "pass"], None)
    cmds["katactl --help"] = (KATACTL + ["--help"], None)
    cmds["katactl sandbox list --help"] = (KATACTL + ["sandbox", "list", "--help"], None)
    cmds["katactl vmcore collect --help"] = (KATACTL + ["vmcore", "collect", "--help"], None)
    tmp = tempfile.mkdtemp(prefix="katactl-bench-startup-")
    installed = installed_katactl(tmp)
    cmds["katactl --help, as installed"] = (installed + ["--help"], None)
    cmds["katactl sandbox list --help, as installed"] = (installed + ["sandbox", "list", "--help"], None)
    cmds["katactl vmcore collect --help, as installed"] = (installed + ["vmcore", "collect", "--help"], None)
    cmds["TAB: complete `katactl con`"] = (KATACTL, COMPLETE)
    cmds["katactl version"] = (KATACTL + ["version"], None)
    cmds["katactl version -o json"] = (KATACTL + ["version", "-o", "json"], None)
    try:
        samples = interleaved(cmds, runs, warmup=0 if smoke else 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if smoke:
        print(f"bench_startup smoke ok: {len(samples)} commands")
        return 0
    med = {name: median_ms(s) for name, s in samples.items()}
    ref = med.get("kubectl version --client (reference)")
    lines = ["## Start-up (`--help`, completion, `version`) — bench/bench_startup.py", "",
             f"{runs} runs each, taken round-robin, median wall-clock of whole processes, "
             f"{platform.python_implementation()} {platform.python_version()}; {context(pre)}.", "",
             "| command | median ms | ratio to kubectl |", "|---|---:|---:|"]
    for name, ms in med.items():
        lines.append(f"| {name} | {ms:.0f} | {f'{ms / ref:.2f}x' if ref else '-'} |")
    lines += ["", "The rows marked \"as installed\" run the same console script and code without the editable "
              "install's import finder (which site runs at every start of .venv's interpreter): what a "
              "non-editable install (a wheel) starts; see installed_katactl() in the script."]
    lines += ["", "Static completion scripts (`completions/`) complete command and option names in the shell "
              "itself, without starting Python; the TAB row is the cost of the dynamic fallback. `version` "
              "imports the dependency metadata it reports (importlib.metadata), which `--help` does not."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text, "bench/bench_startup.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
