"""completions/ and man/ must match the code; man pages must render cleanly."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["gen_completions.py", "gen_man.py"])
def test_generated_files_are_current(script):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_every_command_has_a_man_page():
    from katactl.cli import REGISTRY

    pages = set(os.listdir(os.path.join(ROOT, "man")))
    assert {f"katactl-{n}.1" for n in REGISTRY} | {"katactl.1"} == pages


@pytest.mark.skipif(not shutil.which("man"), reason="man-db not installed")
def test_man_pages_render_without_warnings():
    for page in sorted(os.listdir(os.path.join(ROOT, "man"))):
        p = subprocess.run(["man", "--warnings", "-l", os.path.join(ROOT, "man", page)],
                           capture_output=True, text=True, env=dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat"))
        assert p.returncode == 0, page
        assert p.stderr.strip() == "", f"{page}: {p.stderr}"
        assert "EXIT STATUS" in p.stdout


def test_bash_completion_completes_commands():
    script = os.path.join(ROOT, "completions", "katactl.bash")
    prog = f'source {script}; COMP_WORDS=(katactl con); COMP_CWORD=1; _katactl; echo "${{COMPREPLY[@]}}"'
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True).stdout.split()
    assert out == ["config"]
    prog = f'source {script}; COMP_WORDS=(katactl -o ""); COMP_CWORD=2; _katactl; echo "${{COMPREPLY[@]}}"'
    assert "json" in subprocess.run(["bash", "-c", prog], capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize("shell,name", [("zsh", "_katactl"), ("fish", "katactl.fish")])
def test_other_shells_parse(shell, name):
    if not shutil.which(shell):
        pytest.skip(f"{shell} not installed")
    p = subprocess.run([shell, "-n", os.path.join(ROOT, "completions", name)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_help_examples_do_not_reach_the_lab_by_its_root_only_default():
    """/tmp/katactl-lab is the lab's default for root only (lab.control.default_root: a
    non-root user's is /tmp/katactl-lab-UID), so an example reaching a lab with --host-root
    names the --root it was started with (review 5, 11b's leftover in balloon get)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import cmdtree
        bad = [n.name for n in cmdtree.walk(cmdtree.tree()) if "--host-root /tmp/katactl-lab " in n.help]
    finally:
        sys.path.pop(0)
    assert bad == []


def test_man_exit_status_8_names_every_command_that_exits_8():
    """The man page said exit 8 came from audit only; node check, node agent status,
    overhead and inspect pressure --fail-on and rollout check steps exit 8 too (review 7,
    finding 13). Every module that can exit 8 must be named in EXIT STATUS."""
    import re

    text = open(os.path.join(ROOT, "man", "katactl.1")).read()
    line = text.split("\\fB8\\fR\n", 1)[1].split("\n", 1)[0].replace("\\-", "-")
    sources = {"audit": "commands/audit.py", "node check": "commands/node.py",
               "node agent status": "commands/node_agent.py", "overhead --fail-on": "commands/overhead.py",
               "inspect pressure --fail-on": "commands/inspect.py", "rollout": "rollout/steps.py"}
    exits_8 = re.compile(r"CHECK_FAILED|code = 8\b")
    for path in sorted(os.listdir(os.path.join(ROOT, "katactl", "commands"))):
        if path.endswith(".py") and exits_8.search(open(os.path.join(ROOT, "katactl", "commands", path)).read()):
            assert f"commands/{path}" in sources.values(), f"{path} can exit 8: name it in gen_man.py"
    for words, path in sources.items():
        assert exits_8.search(open(os.path.join(ROOT, "katactl", path)).read()), path
        assert words in line, (words, line)
