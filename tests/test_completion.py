"""The static completions in completions/ (review 5, finding 10): an option with fixed values
completes to them (read from the command tree's params), never to local files, and an
option's value is never taken for a subcommand. Driven through the real shells where they
are installed: bash's function with COMP_WORDS/COMP_CWORD, fish's `complete -C`, and zsh's
function with _arguments/_describe stubs that print what they would offer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPLETIONS = os.path.join(ROOT, "completions")


def _tree():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import cmdtree
        return list(cmdtree.walk(cmdtree.tree()))
    finally:
        sys.path.pop(0)


@pytest.fixture
def cwd(tmp_path):
    """A directory with a file in it: a completion that offers files would offer this one."""
    (tmp_path / "decoy-file").write_text("")
    return tmp_path


def bash_complete(cwd, *words: str) -> list[str]:
    arr = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    prog = (f"source {COMPLETIONS}/katactl.bash; COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; "
            'COMPREPLY=(); _katactl; printf "%s\\n" "${COMPREPLY[@]}"')
    p = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return [x for x in p.stdout.splitlines() if x]


@pytest.mark.parametrize("words, expect", [
    (("katactl", "--via", ""), ["ssh", "kube"]),
    (("katactl", "--via", "=", ""), ["ssh", "kube"]),       # --via=<TAB>: bash splits at '='
    (("katactl", "--via", "=", "k"), ["kube"]),
    (("katactl", "--context", "lab", "sandbox", ""), ["list", "inspect"]),
    (("katactl", "--context", "=", "lab", "sandbox", ""), ["list", "inspect"]),
    (("katactl", "-n", "top", "sandbox", ""), ["list", "inspect"]),
    (("katactl", "-o", "json", "-N", "node", "la"), ["lab"]),
    (("katactl", "-N", "lab", "lab", ""), ["up", "status", "down"]),
    (("katactl", "top", "--sort", ""), ["cpu", "mem", "rss", "id", "pod"]),
    (("katactl", "balloon", "get", "--via", ""), ["auto", "extension", "hypervisor-api", "extra-monitor", "qmp"]),
    (("katactl", "top", "--interval", ""), []),
])
def test_bash(cwd, words, expect):
    assert bash_complete(cwd, *words) == expect


def test_bash_file_options_still_complete_files(cwd):
    assert bash_complete(cwd, "katactl", "--kubeconfig", "dec") == ["decoy-file"]
    assert bash_complete(cwd, "katactl", "pprof", "x", "heap", "-f", "dec") == ["decoy-file"]


def test_every_choice_list_in_the_params_is_offered(cwd):
    """Every option whose Click/Typer param names fixed values (a Choice, or an a|b|c metavar)
    completes to exactly those values at its own command, in bash."""
    seen = 0
    for node in _tree():
        for o in node.options:
            choices = o.choices or (o.metavar.split("|") if o.metavar and "|" in o.metavar
                                    and o.metavar.replace("|", "").replace("-", "").isalpha()
                                    and o.metavar.islower() else None)
            if not choices or "--output" in o.names:
                continue
            seen += 1
            assert bash_complete(cwd, *node.path, o.names[0], "") == choices, (node.name, o.names)
    assert seen >= 5  # --via, --sort, --component, --state, --on-failure at least


def test_top_sort_metavar_is_the_accepted_list():
    from katactl import metrics

    top = next(n for n in _tree() if n.name == "katactl top")
    assert next(o for o in top.options if "--sort" in o.names).metavar == "|".join(metrics.TOP_SORTS)


def test_balloon_via_and_lab_hypervisor_metavars_are_the_accepted_lists():
    from katactl import balloon
    from katactl.lab import control

    tree = {n.name: n for n in _tree()}
    for name in ("katactl balloon get", "katactl balloon set"):
        via = next(o for o in tree[name].options if "--via" in o.names)
        assert via.metavar == "|".join(("auto", *balloon.PATHS))
    hv = next(o for o in tree["katactl lab up"].options if "--hypervisor" in o.names)
    assert hv.metavar == "|".join(control.HYPERVISORS)


@pytest.mark.skipif(not shutil.which("fish"), reason="fish not installed")
@pytest.mark.parametrize("line, expect", [
    ("katactl --via ", ["kube", "ssh"]),
    ("katactl --context lab sandbox ", ["inspect", "list"]),
    ("katactl --context=lab sandbox ", ["inspect", "list"]),
    ("katactl -n top sandbox ", ["inspect", "list"]),
    ("katactl top --sort ", ["cpu", "id", "mem", "pod", "rss"]),
    ("katactl balloon get x --via ", ["auto", "extension", "extra-monitor", "hypervisor-api", "qmp"]),
    ("katactl --kubeconfig dec", ["decoy-file"]),
])
def test_fish(cwd, line, expect):
    p = subprocess.run(["fish", "--no-config", "-c", f"source {COMPLETIONS}/katactl.fish; complete -C '{line}'"],
                       capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 0, p.stderr
    assert sorted(x.split("\t")[0] for x in p.stdout.splitlines()) == expect


ZSH_DRIVER = """
_arguments() { state=cmd; print -r -- "VIA ${${@[(r)--via\\[*]}:-none}" }
_describe() { print -r -- "CMDS ${(j: :)${(@)${(P)4}%%:*}}" }
_files() { :; }
words=("$@"); CURRENT=$#
source COMPLETIONS/_katactl
"""


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh not installed")
def test_zsh_walk_skips_option_values(cwd):
    def run(*words):
        p = subprocess.run(["zsh", "-f", "-c", ZSH_DRIVER.replace("COMPLETIONS", COMPLETIONS), "zsh", *words],
                           capture_output=True, text=True, cwd=cwd)
        assert p.returncode == 0, p.stderr
        return p.stdout
    assert "CMDS list inspect\n" in run("katactl", "--context", "lab", "sandbox", "")
    assert "CMDS list inspect\n" in run("katactl", "-n", "top", "sandbox", "")


def test_zsh_and_fish_text():
    z = open(os.path.join(COMPLETIONS, "_katactl")).read()
    assert ":ssh or kube:(ssh kube)'" in z and ":cpu or mem or rss or id or pod:(cpu mem rss id pod)'" in z
    balloon_via = [ln for ln in z.splitlines() if "'--via[Force one path" in ln]
    assert balloon_via and all("(auto extension hypervisor-api extra-monitor qmp)'" in ln for ln in balloon_via)
    f = open(os.path.join(COMPLETIONS, "katactl.fish")).read()
    assert "-l via -x -a 'ssh kube'" in f
    assert not [ln for ln in f.splitlines() if "-l via" in ln and " -F" in ln]
