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

from katactl.output import FORMATS

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


def _q(w: str) -> str:
    return "'" + w.replace("'", "'\\''") + "'"


def bash_complete_many(cwd, lines: list[tuple[str, ...]]) -> list[list[str]]:
    """What bash's function offers for each list of words (the last one being completed),
    in one bash process."""
    prog = [f"source {COMPLETIONS}/katactl.bash"]
    for words in lines:
        prog.append(f"COMP_WORDS=({' '.join(map(_q, words))}); COMP_CWORD={len(words) - 1}; "
                    'COMPREPLY=(); _katactl; printf "%s\\n" "${COMPREPLY[@]}" "--end--"')
    p = subprocess.run(["bash", "-s"], input="\n".join(prog), capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 0, p.stderr
    out = [[x for x in chunk.split("\n") if x] for chunk in p.stdout.split("--end--\n")]
    assert len(out) == len(lines) + 1 and out[-1] == []
    return out[:-1]


def bash_complete(cwd, *words: str) -> list[str]:
    return bash_complete_many(cwd, [words])[0]


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
    (("katactl", "balloon", "get", "--path", ""), ["auto", "extension", "hypervisor-api", "extra-monitor", "qmp"]),
    (("katactl", "balloon", "get", "x", "--via", ""), ["ssh", "kube"]),  # the global one: balloon's is --path
    (("katactl", "top", "--interval", ""), []),
])
def test_bash(cwd, words, expect):
    assert bash_complete(cwd, *words) == expect


@pytest.mark.parametrize("words, expect", [
    # katactl takes the root's options after a subcommand too (cli.hoist_global_options)
    (("katactl", "sandbox", "list", "-o", ""), list(FORMATS)),
    (("katactl", "sandbox", "inspect", "x", "--output", ""), list(FORMATS)),
    (("katactl", "sandbox", "inspect", "x", "--output", "=", "j"), ["json", "jsonl"]),  # --output=j
    (("katactl", "node", "agent", "install", "--via", ""), ["ssh", "kube"]),
    (("katactl", "top", "--kubeconfig", "dec"), ["decoy-file"]),
    (("katactl", "sandbox", "list", "--nodes-from", "=", "dec"), ["decoy-file"]),
    (("katactl", "rollout", "plan", "--ssh-config", ""), ["decoy-file"]),
    (("katactl", "sandbox", "list", "-N", ""), []),                 # a node name: no files
    (("katactl", "sandbox", "-o", "json", ""), ["list", "inspect"]),
    (("katactl", "node", "-n", "agent", "a"), ["agent"]),           # -n's value is not a subcommand
    (("katactl", "sandbox", "list", "--no"), ["--no-check", "--node", "--nodes-from", "--no-color", "--no-audit"]),
    # a command's own option of a global's name wins, as in hoist_global_options
    (("katactl", "balloon", "set", "x", "--path", "e"), ["extension", "extra-monitor"]),
    (("katactl", "node", "drain", "n1", "--parallel", ""), []),
])
def test_bash_global_options_after_the_subcommand(cwd, words, expect):
    assert bash_complete(cwd, *words) == expect


def test_every_global_value_option_completes_at_every_depth(cwd):
    """Each of the root's value options completes as it does at the root after every command
    that has no option of that name (as `-o X` and `-o=X`), and its value is never taken for
    a subcommand."""
    nodes = _tree()
    valopts = [x for o in nodes[0].options if o.metavar for x in o.names]
    at_root = dict(zip(valopts, bash_complete_many(cwd, [("katactl", x, "") for x in valopts]), strict=True))
    assert at_root["-o"] == list(FORMATS) and at_root["--via"] == ["ssh", "kube"]
    assert at_root["--ssh-config"] == at_root["-i"] == ["decoy-file"] and at_root["--context"] == []
    cases, want = [], []
    for n in nodes[1:]:
        own = {x for o in n.options for x in o.names}
        for x in valopts:
            if x in own:
                continue
            cases += [(*n.path, x, ""), (*n.path, x, "=", "")]
            want += [at_root[x], at_root[x]]
            if n.children:
                cases.append((*n.path, x, n.children[-1].path[-1], ""))
                want.append([c.path[-1] for c in n.children])
    got = bash_complete_many(cwd, cases)
    assert len(cases) > 1000
    assert [(c, g) for c, g, w in zip(cases, got, want, strict=True) if g != w] == []


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


def test_balloon_path_and_lab_hypervisor_metavars_are_the_accepted_lists():
    from katactl import balloon
    from katactl.lab import control

    tree = {n.name: n for n in _tree()}
    for name in ("katactl balloon get", "katactl balloon set"):
        assert not [o for o in tree[name].options if "--via" in o.names]  # the global --via's name
        via = next(o for o in tree[name].options if "--path" in o.names)
        assert via.metavar == "|".join(("auto", *balloon.PATHS))
    hv = next(o for o in tree["katactl lab up"].options if "--hypervisor" in o.names)
    assert hv.metavar == "|".join(control.HYPERVISORS)


def fish_complete_many(cwd, lines: list[str]) -> list[list[str]]:
    """What fish's `complete -C` offers for each command line, in one fish process."""
    prog = [f"source {COMPLETIONS}/katactl.fish"]
    prog += [f"complete -C {_fq(line)}; echo --end--" for line in lines]
    p = subprocess.run(["fish", "--no-config"], input="\n".join(prog), capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 0, p.stderr
    out = [sorted(x.split("\t")[0] for x in chunk.split("\n") if x) for chunk in p.stdout.split("--end--\n")]
    assert len(out) == len(lines) + 1 and out[-1] == []
    return out[:-1]


def _fq(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


needs_fish = pytest.mark.skipif(not shutil.which("fish"), reason="fish not installed")


@needs_fish
@pytest.mark.parametrize("line, expect", [
    ("katactl --via ", ["kube", "ssh"]),
    ("katactl --context lab sandbox ", ["inspect", "list"]),
    ("katactl --context=lab sandbox ", ["inspect", "list"]),
    ("katactl -n top sandbox ", ["inspect", "list"]),
    ("katactl top --sort ", ["cpu", "id", "mem", "pod", "rss"]),
    ("katactl balloon get x --path ", ["auto", "extension", "extra-monitor", "hypervisor-api", "qmp"]),
    ("katactl --kubeconfig dec", ["decoy-file"]),
    # the root's options after a subcommand (cli.hoist_global_options)
    ("katactl sandbox list -o ", sorted(FORMATS)),
    ("katactl sandbox inspect x --output=j", ["--output=json", "--output=jsonl"]),
    ("katactl sandbox list --nodes-from dec", ["decoy-file"]),
    ("katactl top --kubeconfig=dec", ["--kubeconfig=decoy-file"]),
    ("katactl node agent install --via ", ["kube", "ssh"]),
    ("katactl sandbox list -N ", []),
    ("katactl sandbox -o json ", ["inspect", "list"]),
    ("katactl node -n agent a", ["agent"]),
    ("katactl balloon set x --path e", ["extension", "extra-monitor"]),
])
def test_fish(cwd, line, expect):
    assert fish_complete_many(cwd, [line]) == [expect]


@needs_fish
def test_fish_every_global_value_option_completes_at_every_depth(cwd):
    nodes = _tree()
    valopts = [x for o in nodes[0].options if o.metavar for x in o.names]
    at_root = dict(zip(valopts, fish_complete_many(cwd, [f"katactl {x} " for x in valopts]), strict=True))
    assert at_root["-o"] == sorted(FORMATS) and at_root["--kubeconfig"] == ["decoy-file"]
    cases, want = [], []
    for n in nodes[1:]:
        own = {x for o in n.options for x in o.names}
        for x in valopts:
            if x not in own:
                cases.append(f"{n.name} {x} ")
                want.append(at_root[x])
                if n.children:
                    cases.append(f"{n.name} {x} {n.children[-1].path[-1]} ")
                    want.append(sorted(c.path[-1] for c in n.children))
    got = fish_complete_many(cwd, cases)
    assert [(c, g) for c, g, w in zip(cases, got, want, strict=True) if g != w] == []


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


ZSH_ARGS_DRIVER = """
_arguments() { print -rl -- "WORDS ${words[*]} CURRENT $CURRENT" "$@" }
_describe() { :; }
words=("$@"); CURRENT=$#
source COMPLETIONS/_katactl || :
"""


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh not installed")
def test_zsh_global_options_after_the_subcommand(cwd):
    """_arguments gets the root's option specs at every depth (less those the command
    defines itself), and the line from the command's own word on."""
    def specs(*words):
        p = subprocess.run(["zsh", "-f", "-c", ZSH_ARGS_DRIVER.replace("COMPLETIONS", COMPLETIONS), "zsh", *words],
                           capture_output=True, text=True, cwd=cwd)
        assert p.returncode == 0, p.stderr
        return p.stdout.splitlines()
    out = specs("katactl", "-N", "n1", "sandbox", "list", "-o", "")
    assert out[0] == "WORDS list -o  CURRENT 3"
    assert any(x.startswith("-o[") and x.endswith(":format:(" + " ".join(FORMATS) + ")") for x in out)
    assert any(x.startswith("--kubeconfig=[") and x.endswith(":file:_files") for x in out)
    out = specs("katactl", "balloon", "get", "x", "--path", "")
    assert out[0] == "WORDS get x --path  CURRENT 4"
    assert [x for x in out if x.startswith("--path")] == [
        "--path=[Force one path\\: extension, hypervisor-api, extra-monitor, qm]:auto or extension or "
        "hypervisor-api or extra-monitor or qmp:(auto extension hypervisor-api extra-monitor qmp)"]
    assert len([x for x in out if x.startswith("-h[")]) == 1
    out = specs("katactl", "node", "-n", "agent", "")
    assert out[0] == "WORDS node -n agent  CURRENT 4"  # -n's value is not the subcommand


#: zsh's own completion system (compinit, _arguments, _describe) in a pseudo-terminal
#: (zsh/zpty): each line is typed with a TAB; a completer around _complete prints what
#: compadd was given (read up to its marker, so no sleeps and no typeahead), then ^E^U.
ZSH_PTY_DRIVER = r"""
zmodload zsh/zpty || exit 3
dir=$1 rec=$2; shift 2
zpty z 'zsh -f -i'
zpty -w z "PROMPT='%% '; fpath=($dir \$fpath); autoload -U compinit; compinit -u -D; source $rec; print SET''UP-DONE"
zpty -r z junk '*SETUP-DONE*'
for line in "$@"; do
  zpty -n -w z "$line"$'\t'
  zpty -r z out '*<<END>>*'
  print -r -- "${${out##*<<CANDS>>}%%<<END>>*}"
  zpty -n -w z $'\C-e\C-u'
done
zpty -d z
"""
ZSH_RECORDER = r"""
compadd() {  # record the matches added (not when compadd only reads them: -O/-A/-D)
  if (( ${@[(I)-[OAD]]} )); then builtin compadd "$@"; return; fi
  local -a m; builtin compadd -O m "$@"; _rec+=("${m[@]}"); builtin compadd "$@"
}
_rec_complete() { _rec=(); _complete; local r=$?; print -rn -- "<<CANDS>>${(j: :)_rec}<<END>>" >/dev/tty; return r }
zstyle ':completion:*' completer _rec_complete
"""


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh not installed")
def test_zsh_real_completion_after_the_subcommand(cwd, tmp_path):
    cases = {
        "katactl sandbox list -o ": list(FORMATS),
        "katactl sandbox inspect x --output=": list(FORMATS),
        "katactl sandbox inspect x --output j": ["json", "jsonl"],
        "katactl top --kubeconfig=dec": ["decoy-file"],
        "katactl rollout plan --ssh-config dec": ["decoy-file"],
        "katactl sandbox list -N ": [],                      # a node name: no files
        "katactl node agent install --via ": ["ssh", "kube"],
        "katactl balloon get x --path=": ["auto", "extension", "hypervisor-api", "extra-monitor", "qmp"],
        "katactl --context=lab sandbox ": ["list", "inspect"],
        "katactl -o json sandbox ": ["list", "inspect"],
        "katactl node -n agent a": ["agent"],
    }
    rec = tmp_path / "rec.zsh"
    rec.write_text(ZSH_RECORDER)
    p = subprocess.run(["zsh", "-f", "-c", ZSH_PTY_DRIVER, "zsh", COMPLETIONS, str(rec), *cases],
                       capture_output=True, text=True, cwd=cwd, timeout=120)
    assert p.returncode == 0, p.stderr
    got = [ln.split() for ln in p.stdout.splitlines()]
    assert dict(zip(cases, got, strict=True)) == cases


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh not installed")
def test_zsh_real_every_command_completes_global_options(cwd, tmp_path):
    """After every command, -o completes to the formats and --kubeconfig= to files in
    zsh's own completion system: a spec _arguments cannot parse loses the command's options."""
    nodes = _tree()[1:]
    lines = [f"{n.name} -o " for n in nodes] + [f"{n.name} --kubeconfig=dec" for n in nodes]
    rec = tmp_path / "rec.zsh"
    rec.write_text(ZSH_RECORDER)
    p = subprocess.run(["zsh", "-f", "-c", ZSH_PTY_DRIVER, "zsh", COMPLETIONS, str(rec), *lines],
                       capture_output=True, text=True, cwd=cwd, timeout=300)
    assert p.returncode == 0, p.stderr
    got = [ln.split() for ln in p.stdout.splitlines()]
    want = [list(FORMATS)] * len(nodes) + [["decoy-file"]] * len(nodes)
    assert [(line, g) for line, g, w in zip(lines, got, want, strict=True) if g != w] == []


def test_zsh_and_fish_text():
    z = open(os.path.join(COMPLETIONS, "_katactl")).read()
    assert ":ssh or kube:(ssh kube)'" in z and ":cpu or mem or rss or id or pod:(cpu mem rss id pod)'" in z
    balloon_via = [ln for ln in z.splitlines() if "'--path=[Force one path" in ln]
    assert balloon_via and all("(auto extension hypervisor-api extra-monitor qmp)'" in ln for ln in balloon_via)
    f = open(os.path.join(COMPLETIONS, "katactl.fish")).read()
    assert "-l via -x -a 'ssh kube'" in f
    assert not [ln for ln in f.splitlines() if "-l via" in ln and " -F" in ln]
