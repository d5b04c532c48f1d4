"""Rollout steps are parsed by the real katactl commands' definitions (issue 13): every
parameter of a step's command is either used by the step or refused in one line, never
ignored; the commands' environment defaults do not leak into steps; parsing stays light."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from katactl.cli import command_at
from katactl.errors import UsageError
from katactl.rollout.steps import REGISTRY, parse_step

#: a value each option accepts (by its longest name), for typing every option in a step
SAMPLE = {
    "--as": "3.10.0-x", "--sha256": "ab" * 32, "--reserve": "1Gi", "--kata-root": "/srv/kata",
    "--lock-timeout": "5s", "--component": "agent", "--fail-on": "critical", "--compress": "gzip",
    "--compress-on": "local", "--dump-level": "3", "--bwlimit": "50Mi", "--dump-path": "/var/crash/x",
    "--kata-config": "/etc/kata/c.toml", "--grace-period": "7", "--timeout": "10m",
    "--pod-selector": "app=web", "--skip-wait-for-delete-timeout": "9", "--reason": "kernel",
    "--parallel": "3",
}
#: what a step needs to parse at all (its required arguments and options)
BASE = {"upgrade stage": "upgrade stage /srv/kata/k.tar.zst", "upgrade switch": "upgrade switch 3.10.0",
        "vmcore collect": "vmcore collect --to {tmp}"}
#: options that only parse with another one (click checks each option alone, the library the mix)
WITH = {"--compress-on": "--compress gzip"}


def _typed(p, tmp) -> list[str]:
    """Words that give parameter ``p`` a value other than its default."""
    if p.param_type_name == "argument":
        return {"names": ["n1"], "refs": ["3f2a"], "timeout": ["20s"]}[p.name]
    if p.is_flag:
        return [p.secondary_opts[0] if p.default is True else p.opts[0]]
    name = max(p.opts, key=len)
    if name == "--policy":
        f = tmp / "policy.toml"
        f.write_text("")
        return [name, str(f)]
    return [*WITH.get(name, "").split(), name, SAMPLE[name]]


#: each step and the katactl command that defines it (issue 13)
COMMANDS = {"upgrade stage": ("upgrade", "stage"), "upgrade switch": ("upgrade", "switch"),
            "upgrade rollback": ("upgrade", "rollback"), "upgrade gc": ("upgrade", "gc"), "audit": ("audit",),
            "vmcore collect": ("vmcore", "collect"), "cordon": ("node", "cordon"),
            "uncordon": ("node", "uncordon"), "drain": ("node", "drain"), "recycle-stale": ("node", "drain"),
            "check": ("node", "check")}


def _params():
    for name, path in COMMANDS.items():
        for p in command_at(path).params:
            yield pytest.param(name, p, id=f"{name}:{p.name}")


@pytest.mark.parametrize("step,param", list(_params()))
def test_every_option_of_a_step_command_is_used_or_refused(step, param, tmp_path):
    """Each parameter the CLI command has, typed in the step: either it reaches the step's
    arguments with the value typed, or it is refused in one line naming it. Before, the
    steps' own parsers rejected vmcore collect's --makedumpfile, --dump-level, --bwlimit
    and upgrade gc's --keep-previous as unknown, and never knew node drain's --reason."""
    base = BASE.get(step, step).format(tmp=tmp_path / "to")
    words = [] if param.required else _typed(param, tmp_path)  # the base has the required ones
    text = " ".join([base, *words])
    try:
        s = parse_step(text)
    except UsageError as e:
        spelled = param.metavar if param.param_type_name == "argument" else max(param.opts, key=len)
        msg = e.message
        assert spelled in msg and "\n" not in msg and "unrecognized" not in msg, msg
        assert param.name in REGISTRY[step].refuses
        return
    value = getattr(s.args, param.name)
    assert value != param.default and value not in ((), None), (param.name, value)
    assert param.name in REGISTRY[step].uses


def test_no_parameter_is_left_out():
    """The mapping is the commands' parameters exactly: a new option of a command fails
    here until its step uses or refuses it (and meanwhile a step refuses it when typed)."""
    assert {n for n, d in REGISTRY.items() if d.command} == set(COMMANDS)
    for name, d in REGISTRY.items():
        if d.command is None:
            continue
        assert d.command == COMMANDS[name]
        names = {p.name for p in command_at(d.command).params}
        assert d.uses | set(d.refuses) == names, name
        assert not d.uses & set(d.refuses), name


def test_the_drifted_options_reach_the_library_call(tmp_path):
    s = parse_step(f"vmcore collect --to {tmp_path} --makedumpfile --dump-level 3 --bwlimit 50Mi")
    assert (s.args.opts.makedumpfile, s.args.opts.dump_level, s.args.opts.bwlimit) == (True, 3, 50 << 20)
    assert parse_step("upgrade gc --keep-previous").args.keep_previous is True
    assert parse_step("upgrade gc --no-keep-previous").args.keep_previous is False
    s = parse_step("drain --reason 'kernel 6.1' --timeout 10m")
    assert (s.args.reason, s.args.deadline) == ("kernel 6.1", 600.0)
    assert parse_step("drain").args.deadline is None  # the policy's --step-timeout then


def test_a_rollout_runs_a_drifted_option(cli, tmp_path):
    """--makedumpfile reaches vmcore.collect on the node: makedumpfile really runs there (and
    refuses this dump, which has no usable VMCOREINFO), where a collect without it succeeds."""
    import shutil

    from tests.test_vmcore import add_dump, node_tree

    if not shutil.which("makedumpfile"):
        pytest.skip("makedumpfile not installed")
    root = node_tree(tmp_path / "node")
    add_dump(root, data=os.urandom(4096))
    base = ["--host-root", root, "rollout", "run", "-N", "localhost", "--state", "file", "-o", "json"]
    plain = cli([*base[:4], "r1", *base[4:], "--step", f"vmcore collect --to {tmp_path / 'a'}"])
    assert plain.exit_code == 0, plain.stderr
    r = cli([*base[:4], "r2", *base[4:], "--step", f"vmcore collect --to {tmp_path / 'b'} --makedumpfile"])
    # its one node failed under --on-failure stop: Stopped, exit 1 (not "within the budget")
    assert r.exit_code == 1 and "makedumpfile failed" in r.stderr, r.stderr


@pytest.mark.parametrize("text,want", [
    ("upgrade switch 3.10.0 --dry-run", "--dry-run is the rollout's own"),
    ("audit --list-checks", "--list-checks is not for a step"),
    ("drain --parallel 3", "--parallel is not for a step"),
    ("drain --keep-cordoned", "--keep-cordoned is not for a step"),
    ("uncordon --force", "--force is not for a step"),
    ("cordon n1", "NODE... is not for a step"),
    ("upgrade switch 3.10.0 -o json", "-o is one of katactl's global options"),
    ("upgrade switch 3.10.0 -ojson", "-o is one of katactl's global options"),
    ("check -N n1", "-N is one of katactl's global options"),
    ("upgrade switch 3.10.0 --help", "--help is not a step option"),
    ("drain --bogus", "unrecognized arguments: --bogus"),
    ("drain --forc", "did you mean --force?"),
    ("drain --pod-selector 'a in (b'", "must be a valid label selector"),
    ("drain --grace-period 9223372036854775808", "invalid --grace-period"),
    ("drain --skip-wait-for-delete-timeout 9223372036854775808", "invalid --skip-wait-for-delete-timeout"),
    ("upgrade switch 3.10.0 3.11.0", "unrecognized arguments: 3.11.0"),
    ("wait-ready 1s 2s", "unrecognized arguments: 2s"),
    ("upgrade switch", "missing argument 'VERSION'"),
    ("vmcore collect", "missing option '--to'"),
    ("vmcore collect --to /tmp/x --dump-level lots", "invalid value for '--dump-level'"),
    ("vmcore collect --to /tmp/x --dump-level 40", "invalid --dump-level 40"),
    ("vmcore collect --to /tmp/x --bwlimit fast", "--bwlimit"),
    ("vmcore collect --to /tmp/x --dump-path relative", "--dump-path"),
    ("upgrade gc --kata-root", "'--kata-root' requires an argument"),
    ("upgrade switch 3.10.0 --component kernel", "invalid --component"),
    ("upgrade stage x --lock-timeout soon", "--lock-timeout"),
    # the node's own syntax checks, at plan time: before, the run cordoned the node first
    ("upgrade stage x --sha256 nothex", "invalid --sha256 'nothex': expected 64 hex digits"),
    ("upgrade stage x --as ../../etc", "invalid --as '../../etc'"),
])
def test_plan_refuses_a_bad_step_in_one_line_before_touching_a_node(cli, text, want):
    """Through the CLI: exit 2, one error line naming the step and the reason, nothing on
    stdout (the --help inside a step is refused, not printed)."""
    r = cli(["rollout", "plan", "r1", "-N", "ghost-a,ghost-b", "--state", "file", "--step", text])
    assert r.exit_code == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("katactl: error:")]
    assert len(err) == 1 and f"step {text!r}" in err[0] and want in err[0], r.stderr
    assert r.stdout == ""


def test_environment_defaults_do_not_leak_into_steps(monkeypatch):
    """KATACTL_KATA_ROOT sets `katactl upgrade ...`'s --kata-root, on the operator's machine;
    a step means what its text says on whichever machine plans or resumes the rollout."""
    monkeypatch.setenv("KATACTL_KATA_ROOT", "/elsewhere")
    [root] = [p for p in command_at(("upgrade", "switch")).params if p.name == "kata_root"]
    assert root.envvar == "KATACTL_KATA_ROOT"  # the command itself still honours it
    for text in ("upgrade switch 3.10.0", "upgrade stage /srv/k.tar.zst", "upgrade rollback", "upgrade gc"):
        assert parse_step(text).args.kata_root == "/opt/kata", text
    assert parse_step("upgrade gc --kata-root /srv/kata").args.kata_root == "/srv/kata"


def test_parsing_every_step_imports_no_heavy_module():
    code = ("import sys\nfrom katactl.rollout.steps import REGISTRY, parse_step\n"
            "for t in ['upgrade stage /srv/k.tar.zst', 'upgrade switch 3.10.0', 'upgrade rollback', 'upgrade gc',"
            " 'audit --fail-on high', 'vmcore collect --to /tmp/x --bwlimit 1Mi', 'cordon', 'uncordon',"
            " 'drain --timeout 1m', 'recycle-stale', 'check', 'wait-ready 10s']:\n"
            "    parse_step(t)\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('kubernetes', 'paramiko', 'httpx', 'yaml', 'psutil'))))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == ""


def test_a_plan_on_stdin_over_the_input_limit_is_refused_not_cut(katactl_bin, tmp_path):
    """`rollout plan -f -` read at most 1 MiB of standard input and parsed what it got: a
    longer plan was silently cut (here, the cut would fall inside a comment and leave a valid
    plan). Now it is exit 2 naming the cap, as for a file."""
    plan = "name: big\nsteps: [audit]\nnodes: [n1]\n#" + "x" * (1 << 20) + "\n"
    ok = katactl_bin(["rollout", "plan", "-f", "-", "--state", "file"], input=plan[:4096] + "\n")
    assert ok.exit_code == 0, ok.stderr  # the same plan, short: valid
    r = katactl_bin(["rollout", "plan", "-f", "-", "--state", "file"], input=plan)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert "more than 1 MiB" in r.stderr and r.stderr.count("\n") == 1, r.stderr
