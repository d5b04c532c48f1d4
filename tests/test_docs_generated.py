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
