"""Start-up, exit-code, output and configuration contracts (design.md)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from katactl.cli import REGISTRY, hoist_global_options

HEAVY = ("kubernetes", "paramiko", "httpx", "h11", "psutil", "tabulate", "orjson")
ANSI = re.compile(r"\x1b\[")


def _run_and_list_heavy(argvs, env_extra=None) -> tuple[str, str]:
    """Run katactl's main for each argv in one fresh interpreter; (heavy modules
    loaded by then, comma-joined; what they printed on stdout)."""
    code = (
        "import sys, io, contextlib\n"
        "from katactl.cli import main\n"
        "buf = io.StringIO()\n"
        f"for argv in {argvs!r}:\n"
        "    sys.argv = ['katactl'] + argv\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf): main()\n"
        "    except SystemExit: pass\n"
        "sys.stdout.write(buf.getvalue())\n"
        f"print(','.join(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}), file=sys.stderr)\n"
    )
    env = dict(os.environ, **(env_extra or {}))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return (p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""), p.stdout


def _leaf_paths() -> list[list[str]]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import cmdtree

    return [n.path[1:] for n in cmdtree.walk(cmdtree.tree()) if not n.children]


@pytest.mark.parametrize("argv", [["--help"]] + [[n, "--help"] for n in REGISTRY])
def test_help_imports_no_heavy_module(argv):
    heavy, out = _run_and_list_heavy([argv])
    assert heavy == "" and "Usage:" in out


def test_every_leaf_help_imports_no_heavy_module():
    leaves = _leaf_paths()
    assert len(leaves) > 25  # the walk found the tree
    heavy, out = _run_and_list_heavy([[*p, "--help"] for p in leaves])
    assert heavy == "" and out.count("Usage:") == len(leaves)


def test_no_leaf_help_imports_katactl_beyond_its_command_module():
    """A leaf's --help loads its command module and nothing else of katactl but cli, errors and
    interrupt (main's signal handling, from its start: contextlib and threading only): no backend
    (the command modules name NodeTransport for annotations only), no output module (config
    view imported it at the top: 2-4 ms of its help). Start-up, issue 17."""
    leaves = _leaf_paths()
    code = ("import io, contextlib, sys\nfrom katactl.cli import main\n"
            f"for argv in {[[*p, '--help'] for p in leaves]!r}:\n"
            "    try:\n        with contextlib.redirect_stdout(io.StringIO()): main(argv)\n"
            "    except SystemExit: pass\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('katactl.')\n"
            "                      and not m.startswith('katactl.commands'))))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "katactl.cli,katactl.errors,katactl.interrupt"


@pytest.mark.parametrize("argv,built", [
    (["node", "cordon", "--help"], ["cordon"]),
    (["node", "agent", "status", "--help"], ["status"]),
    (["rollout", "run", "-o", "json", "--help"], ["run"]),  # a global option after the leaf: hoisted
    (["node", "drain", "--dry-run=server", "--help"], ["drain"]),  # the leaf's own options read once
    (["upgrade", "gc", "x", "y"], ["gc"]),  # a usage error: the leaf only, too
])
def test_a_leaf_run_builds_only_that_leaf_of_its_group(argv, built):
    """Typer builds every command of a group from its signature (~1 ms each): the option
    hoisting and Click's dispatch build only the leaf run (node cordon --help built the
    node and node agent groups' 9 commands; start-up, issue 17)."""
    code = ("import io, contextlib, sys, typer.main as tm\n"
            "made = []\n"
            "real = tm.get_command_from_info\n"
            "def spy(command_info, **kw):\n"
            "    cmd = real(command_info, **kw)\n"
            "    made.append(cmd.name)\n"
            "    return cmd\n"
            "tm.get_command_from_info = spy\n"
            "from katactl.cli import main\n"
            "try:\n"
            f"    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()): main({argv!r})\n"
            "except SystemExit: pass\n"
            "print(','.join(made))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().split(",") == built


def test_a_lazily_built_group_is_typers_own_build():
    """Every group built a subcommand at a time has what Typer's whole build has: the same
    commands in the same order, with the same parameters and help."""
    import importlib

    import typer.main

    from katactl.cli import command_at

    def shape(cmd):
        subs = getattr(cmd, "commands", None)
        return (cmd.name, cmd.help, [(p.name, getattr(p, "opts", None), p.envvar) for p in cmd.params],
                [(n, shape(subs[n])) for n in subs] if subs is not None else None)

    for name, entry in REGISTRY.items():
        module_app = importlib.import_module(entry.module).app
        whole = typer.main.get_command(module_app)
        whole.name = name
        assert shape(command_at((name,))) == shape(whole), name


@pytest.mark.parametrize("words,cword,expect", [
    ("katactl sa", 1, "sandbox"),
    ("katactl balloon ", 2, "set"),
    ("katactl balloon set x --t", 4, "--target"),
    ("katactl vmcore collect --comp", 3, "--compress"),
])
def test_completion_answers_without_heavy_modules(words, cword, expect):
    env = {"_KATACTL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    heavy, out = _run_and_list_heavy([[]], env)
    assert heavy == ""
    assert expect in out.split(), out


def test_completion_of_every_group_imports_no_heavy_module():
    for name in REGISTRY:
        env = {"_KATACTL_COMPLETE": "complete_bash", "COMP_WORDS": f"katactl {name} ", "COMP_CWORD": "2"}
        heavy, out = _run_and_list_heavy([[]], env)
        assert heavy == "", name


def test_click_is_not_installed():
    """With click present, importing httpx also loads httpx's CLI (+50 ms start-up)."""
    import importlib.util

    assert importlib.util.find_spec("click") is None


def test_installed_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "katactl")
    p = subprocess.run([exe, "version", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kind"] == "Version"


@pytest.mark.parametrize("args,code", [
    (["no-such"], 2), (["--no-such-flag"], 2), (["version", "--bogus"], 2), (["-o", "xml", "version"], 2),
    (["--request-timeout", "abc", "version"], 2), (["--parallel", "0", "version"], 2), (["--parallel", "x", "version"], 2),
    (["-N", "bad;name", "version"], 2), (["-N", "$(reboot)", "version"], 2), (["--profile", "nope", "version"], 2),
    # an empty value (an unset shell variable) never means "this host"
    (["-N", "", "version"], 2), (["-N", ",", "version"], 2), (["--host-root", "", "sandbox", "list"], 2),
    (["--nodes-from", "", "version"], 2), (["-l", "", "version"], 2), (["--profile", "", "version"], 2),
    (["-o", "", "version"], 2), (["-J", "", "-N", "n1", "version"], 2),
    # --host-root must be a directory (it reported an empty node)
    (["--host-root", "/nonexistent-katactl-root", "sandbox", "list"], 2),
    (["--host-root", "/etc/passwd", "version"], 2),
    # pprof -f is checked before the download
    (["pprof", "x", "heap", "-f", ""], 2), (["pprof", "x", "heap", "-f", "/tmp"], 2),
    (["pprof", "x", "heap", "-f", "/tmp/"], 2),
    # sizes
    (["balloon", "set", "x", "--target", "10Zi"], 2), (["balloon", "set", "x", "--target", "-1G"], 2),
    (["balloon", "set", "x", "--target", "12Q"], 2),
])
def test_usage_errors_exit_2_in_one_line(katactl_bin, args, code):
    r = katactl_bin(args)
    assert r.exit_code == code, r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr


def test_json_error_object_on_stdout(cli):
    r = cli(["-o", "json", "--request-timeout", "nope", "version"])
    assert r.exit_code == 2
    d = json.loads(r.stdout)
    assert d["kind"] == "Error" and d["exitCode"] == 2 and d["apiVersion"] == "katactl/v1"


def test_global_options_after_subcommand(cli):
    r = cli(["version", "-o", "json"])
    assert r.exit_code == 0 and r.json()["kind"] == "Version"
    r = cli(["config", "view", "--request-timeout", "5m", "-o", "json"])
    timeout = [s for s in r.json()["settings"] if s["name"] == "request_timeout"][0]
    assert timeout == {"name": "request_timeout", "value": 300.0, "source": "flag"}


def test_hoist_keeps_leaf_options_and_positionals():
    assert hoist_global_options(["version", "-o", "json"]) == ["-o", "json", "version"]
    assert hoist_global_options(["-q", "config", "view", "-v"]) == ["-q", "-v", "config", "view"]
    assert hoist_global_options(["config", "view", "--", "-o"]) == ["config", "view", "--", "-o"]
    # every root option hoists (read from the root command, not a hand-kept list)
    assert hoist_global_options(["version", "-J", "bastion", "--known-hosts=kh", "--ssh-accept-new"]) == \
        ["-J", "bastion", "--known-hosts=kh", "--ssh-accept-new", "version"]
    # a command's own --timeout (its wait deadline) is not a global option
    assert hoist_global_options(["balloon", "set", "x", "--timeout", "5s"])[-2:] == ["--timeout", "5s"]
    assert hoist_global_options(["balloon", "set", "x", "--request-timeout", "5s"])[:2] == \
        ["--request-timeout", "5s"]


def test_hoist_short_clusters_and_attached_values():
    """-vv, -qy, -o=json and -ojson after the subcommand hoist like their long forms
    (issue 16, finding 16)."""
    assert hoist_global_options(["sandbox", "list", "-vv"]) == ["-v", "-v", "sandbox", "list"]
    assert hoist_global_options(["sandbox", "list", "-qy"]) == ["-q", "-y", "sandbox", "list"]
    for spelling in (["-o=json"], ["-ojson"], ["-o", "json"]):
        assert hoist_global_options(["sandbox", "list", *spelling]) == ["-o", "json", "sandbox", "list"]
    assert hoist_global_options(["-o=json", "version"]) == ["-o", "json", "version"]
    assert hoist_global_options(["version", "-qojson"]) == ["-q", "-o", "json", "version"]


@pytest.mark.parametrize("args,needle", [
    (["sandbox", "list", "-N"], "option -N needs a value"),
    (["sandbox", "list", "--node"], "option --node needs a value"),
    (["version", "-qo"], "option -o needs a value"),
])
def test_global_option_without_value_at_the_end(cli, args, needle):
    """`sandbox list -N` said "No such command 'list'" (-N took 'sandbox' as its value)."""
    r = cli(args)
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_short_clusters_and_attached_values_work_end_to_end(cli, tmp_path):
    r = cli(["--host-root", str(tmp_path), "sandbox", "list", "-o=json"])
    assert r.exit_code == 0 and r.json()["kind"] == "SandboxList", r.stderr
    r = cli(["--host-root", str(tmp_path), "sandbox", "list", "-qy", "-ojson"])
    assert r.exit_code == 0 and r.json()["kind"] == "SandboxList", r.stderr


def test_renamed_timeout_setting_is_named_in_the_error(cli, _isolated_home, monkeypatch):
    """--timeout became --request-timeout (kubectl's name): an old config key or
    variable stops with the new name instead of silently doing nothing."""
    monkeypatch.setenv("KATACTL_TIMEOUT", "10s")
    r = cli(["config", "view"])
    assert r.exit_code == 2 and "KATACTL_REQUEST_TIMEOUT" in r.stderr
    monkeypatch.delenv("KATACTL_TIMEOUT")
    cfg = _isolated_home / "config" / "katactl"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('timeout = "40s"\n')
    r = cli(["config", "view"])
    assert r.exit_code == 2 and "timeout is now request_timeout" in r.stderr
    r = cli(["--timeout", "5s", "version"])
    assert r.exit_code == 2


def test_piped_output_has_no_ansi_and_no_wrapping(katactl_bin):
    r = katactl_bin(["config", "view"], env={"COLUMNS": "20", "TERM": "xterm-256color"})
    assert r.exit_code == 0
    assert not ANSI.search(r.stdout)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SETTING", "VALUE", "SOURCE"]
    # one record per line, whatever the width: every setting on exactly one line, then the
    # Kubernetes context's rows (kube.*: one, "none", without a kubeconfig)
    from katactl.config import SETTINGS
    kube = [line for line in lines if line.startswith("kube.")]
    assert kube and len(lines) == 1 + len(SETTINGS) + len(kube)


def test_config_precedence(cli, tmp_path, monkeypatch, _isolated_home):
    cfg = _isolated_home / "config" / "katactl"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text(
        'request_timeout = "40s"\nparallel = 8\nssh_user = "top"\nprofile = "prod"\n'
        '[node_groups]\nall = ["a", "b"]\n'
        '[profiles.prod]\nssh_user = "sre"\n[profiles.prod.node_groups]\nbatch = ["n1", "n2"]\n')
    monkeypatch.setenv("KATACTL_PARALLEL", "4")
    r = cli(["config", "view", "--request-timeout", "1m", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    s = {x["name"]: x for x in d["settings"]}
    assert s["request_timeout"]["value"] == 60 and s["request_timeout"]["source"] == "flag"
    assert s["parallel"]["value"] == 4 and s["parallel"]["source"] == "env KATACTL_PARALLEL"
    assert s["ssh_user"]["value"] == "sre" and "profiles.prod" in s["ssh_user"]["source"]
    assert s["host_root"]["source"] == "default"
    assert d["profile"] == "prod" and d["nodeGroups"] == {"all": ["a", "b"], "batch": ["n1", "n2"]}


@pytest.mark.parametrize("content,needle", [
    ("request_timeout = [1]", "request_timeout"), ("bogus = 1", "bogus"), ("this is not toml", "invalid TOML"),
    ("profile = 'x'\n[profiles.x]\nwat = 1", "wat"), ("parallel = -3", "parallel"),
    ("[node_groups]\ng = 'a'", "node group"),
    (b"\xff\xferequest_timeout = 1", "not UTF-8"), ("request_timeout = 1e400", "request_timeout"), ("request_timeout = nan", "request_timeout"),
    ("request_timeout = 99999999999", "request_timeout"), ("request_timeout = true", "request_timeout"), ("parallel = 1.5", "parallel"),
    # issue 16, finding 13: wrong types where a name or a table belongs
    ("profile = ['a']", "profile must be a profile name"), ("profile = ''", "profile must be a profile name"),
    ("[profiles]\nprod = 5", "profiles.prod must be a table"),
    ("profile = 'prod'\n[profiles]\nprod = 'x'", "profiles.prod must be a table"),
])
def test_bad_config_file_is_usage_error(cli, _isolated_home, content, needle):
    cfg = _isolated_home / "config" / "katactl"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_bytes(content if isinstance(content, bytes) else content.encode())
    r = cli(["config", "view"])
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("env,needle", [
    ({"KATACTL_HOST_ROOT": ""}, "KATACTL_HOST_ROOT is set but empty"),
    ({"KATACTL_HOST_ROOT": "  "}, "KATACTL_HOST_ROOT is set but empty"),
    ({"KATACTL_NODES": ","}, "KATACTL_NODES=',' names no node"),
    ({"KATACTL_NODES": ""}, "KATACTL_NODES='' names no node"),
    ({"KATACTL_NODES_FROM": ""}, "KATACTL_NODES_FROM is set but empty"),
    ({"KATACTL_SELECTOR": ""}, "KATACTL_SELECTOR is set but empty"),
    ({"KATACTL_PROFILE": ""}, "KATACTL_PROFILE is set but empty"),
    ({"KATACTL_OUTPUT": ""}, "KATACTL_OUTPUT is set but empty"),
])
def test_empty_environment_values_are_refused_like_empty_flags(cli, monkeypatch, env, needle):
    """KATACTL_HOST_ROOT="$ROOT" with ROOT unset must not act on this host, no more than
    --host-root "" does (issue 16, finding 12)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = cli(["sandbox", "list"])
    assert r.exit_code == 2, r.stderr
    assert needle in r.stderr and r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr


def test_node_group_selection(_isolated_home):
    from katactl import config, fleet
    from katactl.errors import UsageError

    cfg = _isolated_home / "config" / "katactl"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.toml").write_text('[node_groups]\nbatch = ["n1", "n2"]\n')
    s = config.resolve({"nodes": ("@batch,n3", "n1")})
    assert fleet.select_nodes(s) == ["n1", "n2", "n3"]
    with pytest.raises(UsageError):
        fleet.select_nodes(config.resolve({"nodes": ("@nope",)}))
    # an empty group is an error, not "no nodes" (which would mean this host)
    (cfg / "config.toml").write_text('[node_groups]\nnone = []\n')
    with pytest.raises(UsageError, match="empty"):
        fleet.select_nodes(config.resolve({"nodes": ("@none",)}))


def test_nodes_from_file(tmp_path, _isolated_home):
    from katactl import config, fleet
    from katactl.errors import UsageError

    f = tmp_path / "nodes"
    f.write_text("# fleet\nn1\n\nn2  # comment\n")
    assert fleet.select_nodes(config.resolve({"nodes_from": str(f)})) == ["n1", "n2"]
    # a file with no names (only comments) is an error, not "this host"
    f.write_text("# nothing yet\n\n")
    with pytest.raises(UsageError, match="no node names"):
        fleet.select_nodes(config.resolve({"nodes_from": str(f)}))


def test_broken_pipe_from_a_peer_is_an_error_not_a_closed_stdout(cli, monkeypatch):
    """Only our own stdout's reader leaving is quiet; a relay or socket that breaks is
    a node we could not reach (exit 7, the error object)."""
    import katactl.versions as v

    def broken():
        raise BrokenPipeError("relay closed")

    monkeypatch.setattr(v, "client_versions", broken)
    r = cli(["-o", "json", "version"])
    assert r.exit_code == 7, r.stderr
    assert r.json()["code"] == "Unreachable" and "relay closed" in r.stderr


def test_unexpected_exception_is_one_line(cli, monkeypatch):
    import katactl.versions as v

    monkeypatch.setattr(v, "client_versions", lambda: 1 / 0)
    r = cli(["version"])
    assert r.exit_code == 1
    assert "re-run with -v" in r.stderr and "Traceback" not in r.stderr
    r = cli(["-v", "version"])
    assert "Traceback" in r.stderr


@pytest.mark.parametrize("exc,code", [
    (IsADirectoryError(21, "Is a directory", "/x/y"), 1), (OSError(36, "File name too long", "/x"), 1),
    (PermissionError(13, "Permission denied", "/x"), 1),
])
def test_os_error_is_one_line_not_unexpected(capsys, exc, code):
    from katactl.cli import _report

    assert _report(exc, "json", False) == code
    out, err = capsys.readouterr()
    assert "unexpected" not in err and len(err.splitlines()) == 1 and "/x" in err
    assert json.loads(out)["exitCode"] == code


def test_error_message_with_newlines_stays_one_line(capsys):
    from katactl.cli import _report
    from katactl.errors import OperationFailed

    # a shim's answer echoing a value with a newline in it
    _report(OperationFailed("volume /a\nb not found", hint="try\nagain"), None, False)
    err = capsys.readouterr().err
    assert err.splitlines() == ["katactl: error: volume /a\\nb not found", "hint: try\\nagain"]


def test_audit_log_appends_json_lines(_isolated_home):
    from katactl import audit

    audit.record("balloon.set", "sb1", params={"target": 1}, changed=True)
    audit.record("balloon.set", "sb1", params={"target": 1}, changed=False)
    lines = (_isolated_home / "state" / "katactl" / "audit.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["changed"] for e in entries] == [True, False]
    assert {"time", "user", "host", "command", "target", "action", "result"} <= set(entries[0])
    assert oct((_isolated_home / "state" / "katactl" / "audit.log").stat().st_mode & 0o777) == "0o600"


def test_audit_log_setting_is_honoured_by_mutating_commands(cli, _isolated_home, tmp_path):
    from tests import upgrade_fixtures as fx

    custom = tmp_path / "custom-audit.log"
    cfg = _isolated_home / "config" / "katactl" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f'audit_log = "{custom}"\n')
    node = tmp_path / "node"
    (node / "proc").mkdir(parents=True)
    src = fx.build_tree(str(tmp_path / "src"), "4.0.0", version_file=True)
    r = cli(["--host-root", str(node), "-o", "json", "upgrade", "stage", src])
    assert r.exit_code == 0, r.stderr
    entries = [json.loads(line) for line in custom.read_text().splitlines()]
    assert entries and entries[-1]["action"].startswith("upgrade")
    assert not (_isolated_home / "state" / "katactl" / "audit.log").exists()
    # the next invocation without the setting goes back to the default log
    cfg.unlink()
    r = cli(["--host-root", str(node), "-o", "json", "upgrade", "stage", src])
    assert r.exit_code == 0, r.stderr
    assert (_isolated_home / "state" / "katactl" / "audit.log").exists()


def test_audit_log_failure_is_a_warning_not_an_error(tmp_path, caplog):
    from katactl import audit

    blocker = tmp_path / "file"
    blocker.write_text("")
    entry = audit.record("upgrade.switch", "node", path=str(blocker / "audit.log"))
    assert entry["target"] == "node"
    assert any("cannot write audit log" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


@pytest.mark.parametrize("failures,succeeded,code", [
    ([], 3, 0),
    ([7], 2, 4),          # some failed, some succeeded: partial
    ([7, 7], 0, 7),       # every node unreachable
    ([3, 3], 0, 3),       # all failed the same way: that way
    ([7, 3], 0, 1),       # all failed differently: not "partial", nothing succeeded
])
def test_outcome_exit_code(failures, succeeded, code):
    from katactl.errors import outcome_exit_code

    assert outcome_exit_code(failures, succeeded) == code


def test_error_object_follows_output_from_the_config_file(cli, _isolated_home, tmp_path):
    cfg = _isolated_home / "config" / "katactl" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('output = "json"\n')
    r = cli(["--host-root", str(tmp_path), "sandbox", "inspect", "nope"])
    assert r.exit_code == 3
    d = json.loads(r.stdout)
    assert d["kind"] == "Error" and d["exitCode"] == 3


def test_jsonl_error_object_is_one_line(cli, tmp_path):
    r = cli(["--host-root", str(tmp_path), "-o", "jsonl", "sandbox", "inspect", "nope"])
    assert r.exit_code == 3
    [line] = r.stdout.splitlines()
    assert json.loads(line)["code"] == "NotFound"


def test_closed_stdout_pipe_is_no_traceback(tmp_path):
    """`katactl ... | head -c 1`: the reader leaves early; katactl must go quietly."""
    from katactl.lab import layout

    layout.write_many(str(tmp_path), 300)  # well over a pipe buffer of JSON
    p = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$0" -m katactl --host-root "$1" -o json sandbox list --no-check | head -c 1',
         sys.executable, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.stdout == "{"
    assert "Traceback" not in p.stderr and "error" not in p.stderr, p.stderr


@pytest.mark.parametrize("redirect,fmt,code,needle", [
    (">&-", "plain", 1, "cannot write to standard output: it is closed"),
    (">&-", "json", 1, "cannot write to standard output: it is closed"),
    (">/dev/full", "json", 1, "cannot write to standard output: No space left on device"),
    (">/dev/full", "yaml", 1, "cannot write to standard output: No space left on device"),
])
def test_closed_or_failing_stdout_is_one_line(tmp_path, redirect, fmt, code, needle):
    """`katactl ... >&-` and `> /dev/full`: one line on stderr, exit 1; no traceback,
    no AttributeError about None (issue 16, finding 11)."""
    from katactl.lab import layout

    layout.write_many(str(tmp_path), 3)
    p = subprocess.run(
        ["bash", "-c", f'exec "$0" -m katactl --host-root "$1" -o {fmt} sandbox list --no-check {redirect}',
         sys.executable, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (code, f"katactl: error: {needle}\n")


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full", "| true"])
def test_an_error_keeps_its_exit_code_when_stdout_fails(redirect):
    """The JSON error object cannot be written (closed, full, reader gone): the error's
    own exit code and line on stderr still (issue 16, finding 11)."""
    p = subprocess.run(
        ["bash", "-c", f'set -o pipefail; "$0" -m katactl --host-root /nonexistent -o json sandbox list {redirect}',
         sys.executable], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr == "katactl: error: --host-root /nonexistent: no such directory\n"


@pytest.mark.parametrize("args,env,needle", [
    (["--nodes-from", "/dev/zero", "sandbox", "list"], {}, "--nodes-from /dev/zero: more than 1 MiB"),
    (["sandbox", "list"], {"KATACTL_CONFIG": "/dev/zero"}, "config file /dev/zero: more than 1 MiB"),
    (["--host-root", "/nonexistent", "audit", "--policy", "/dev/zero"], {}, "policy file /dev/zero: more than 1 MiB"),
    (["--ssh-config", "/dev/zero", "-N", "n1", "sandbox", "list"], {}, "SSH config /dev/zero: more than 1 MiB"),
    (["--known-hosts", "/dev/zero", "-N", "n1", "sandbox", "list"], {}, "known_hosts file /dev/zero: more than 64 MiB"),
])
def test_endless_input_files_are_capped(cli, monkeypatch, args, env, needle):
    """/dev/zero (or a wrong, huge file) as an input file is refused at a cap, naming the
    file and the cap, instead of reading until memory runs out (issue 16, finding 15)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = cli(args)
    assert r.exit_code == 2, r.stderr
    assert needle in r.stderr and r.stderr.count("\n") == 1


def test_endless_nodes_from_stdin_is_capped(cli):
    r = cli(["--nodes-from", "-", "sandbox", "list"], stdin="n1\n" * (1 << 19))
    assert r.exit_code == 2 and "--nodes-from -: more than 1 MiB" in r.stderr


def test_leaf_help_builds_no_settings_and_a_help_value_still_runs(cli):
    """A subcommand's --help reads no config file (tomllib, katactl.config stay unloaded); a
    '--help' that is an option's value does not leave the command without its settings."""
    code = ("import sys; from katactl.cli import main\n"
            "try:\n    main(['sandbox', 'list', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e\n"
            "heavy = [m for m in ('tomllib', 'katactl.config', 'katactl.context') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Usage: katactl sandbox list" in p.stdout
    r = cli(["config", "view", "-o", "json", "--profile", "--help"])  # --help is the profile's name here
    assert r.exit_code == 2 and "unknown profile '--help'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_take_ctrl_c_path_in_every_command(sig):
    """Ansible's timeout and timeout(1) send SIGTERM, a dropped session SIGHUP: any command
    (here one blocked reading --nodes-from -) ends as Ctrl-C does: exit 130, the JSON error."""
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--nodes-from", "-", "-o", "json", "version"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_handler(p.pid, sig)  # a signal before the handler would be the default's death
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert json.loads(out)["code"] == "Interrupted" and "Traceback" not in err


def _wait_for_handler(pid: int, sig: int, timeout: float = 60) -> None:
    """Until the process catches sig (SigCgt in /proc/PID/status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never caught signal {sig}")


def test_python_m_exits_with_katactls_code_after_an_interrupt_inside_a_string_exec(tmp_path):
    """A Ctrl-C or SIGTERM that lands while a dataclass is being defined (an exec() of a
    string) made `python -m katactl` die by SIGINT (-2) after printing its 130: CPython
    keeps a flag for it. Here the interrupt inside exec() is made on purpose, then
    katactl runs as `python -m` would run it and must exit with its own code."""
    (tmp_path / "run_after_exec_interrupt.py").write_text(
        "import runpy, sys\n"
        "from katactl.cli import main\n"
        "try:  # a first run in-process imports what the command needs: no string exec after ours\n"
        "    main(['version', '-o', 'json'])\nexcept SystemExit:\n    pass\n"
        "try:\n    exec('raise KeyboardInterrupt', {})\nexcept KeyboardInterrupt:\n    pass\n"
        "sys.argv = ['katactl', 'version', '-o', 'json']\n"
        "runpy.run_module('katactl', run_name='__main__', alter_sys=True)\n")
    p = subprocess.run([sys.executable, "-m", "run_after_exec_interrupt"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert p.stdout.count('"kind": "Version"') == 2


def test_quiet_help_says_what_it_keeps(cli, tmp_path):
    """-q's help said "Only data and errors." while warnings still print (review 7,
    finding 10): they do, on purpose (a warning is not chatter), and the help says so."""
    r = cli(["--help"])
    line = " ".join(r.stdout.split("-q, --quiet", 1)[1].split("\n  -", 1)[0].split())
    assert "warnings and errors" in line, line
    r = cli(["-q", "--host-root", str(tmp_path), "balloon", "set", "abc", "--reclaim", "1G"])
    assert "warning: --reclaim is relative" in r.stderr, r.stderr


@pytest.mark.parametrize("how", ["env", "config"])
def test_verbose_from_env_or_config_gives_the_traceback(cli, monkeypatch, _isolated_home, how):
    """KATACTL_VERBOSE=1 and `verbose = 1` are -v's setting, yet only -v printed the
    traceback the error line asks for (review 7, finding 8)."""
    import katactl.versions as v

    monkeypatch.setattr(v, "client_versions", lambda: 1 / 0)
    if how == "env":
        monkeypatch.setenv("KATACTL_VERBOSE", "1")
    else:
        (_isolated_home / "config" / "katactl").mkdir(parents=True)
        (_isolated_home / "config" / "katactl" / "config.toml").write_text("verbose = 1\n")
    r = cli(["version"])
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and "re-run with -v" not in r.stderr, r.stderr


@pytest.mark.parametrize("body,args", [
    ('output = "json"\n', ["--parallel", "abc", "version"]),
    ('output = "json"\n', ["sandbox", "list", "--bogus"]),
    ('output = "json"\nparallel = 0\n', ["version"]),
    ('profile = "p"\n[profiles.p]\noutput = "json"\nparallel = 0\n', ["version"]),
    ('output = "yaml"\n[profiles.p]\noutput = "json"\nparallel = 0\n', ["--profile", "p", "version"]),
])
def test_config_file_output_json_gives_the_error_object_before_settings_resolve(cli, _isolated_home, body, args):
    """`output = "json"` in the config file printed no JSON error object for a failure before
    the settings resolved (a bad flag, a refused config value), where -o json and
    KATACTL_OUTPUT=json do (review 7, finding 7)."""
    (_isolated_home / "config" / "katactl").mkdir(parents=True)
    (_isolated_home / "config" / "katactl" / "config.toml").write_text(body)
    r = cli(args)
    assert r.exit_code == 2, r.stderr
    d = r.json()
    assert d["kind"] == "Error" and d["exitCode"] == 2, r.stdout


def test_unreadable_config_file_still_reports_one_line(cli, _isolated_home):
    (_isolated_home / "config" / "katactl").mkdir(parents=True)
    (_isolated_home / "config" / "katactl" / "config.toml").write_text('output = "json\n')
    r = cli(["--parallel", "abc", "version"])
    assert r.exit_code == 2 and r.stdout == "", r.stdout
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("katactl: error:")]) == 1, r.stderr


def test_audit_log_is_never_written_through_a_symlink(_isolated_home, tmp_path, caplog):
    """The log was opened without O_NOFOLLOW: a symlink planted where it goes (a shared,
    writable audit_log directory, katactl as root) made katactl append to any file (review 7,
    suspicion 1). A mutation is refused (exit 5) before it starts; a record is not written."""
    from katactl import audit
    from katactl.errors import Refused

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = _isolated_home / "state" / "katactl" / "audit.log"
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    with pytest.raises(Refused, match="symbolic link") as e:
        audit.require_writable()
    assert e.value.exit_code == 5
    audit.record("balloon.set", "sb1", params={"target": 1}, changed=True)
    assert victim.read_text() == "precious\n"
    assert any("symbolic link" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("args,env", [
    (["-o", "wide", "--request-timeout", "0", "version", "-o", "json"], {}),
    (["-o", "wide", "version", "-o", "json"], {"KATACTL_PARALLEL": "0"}),
    (["-o", "wide", "version", "--output=json"], {"KATACTL_PARALLEL": "0"}),
    (["--output", "yaml", "-ojson", "version"], {"KATACTL_PARALLEL": "0"}),
    (["-o", "wide", "version", "-qo=json"], {"KATACTL_PARALLEL": "0"}),
    # hoisting itself fails (-N lacks its value): argv as given, short cluster included
    (["-o", "wide", "version", "-qojson", "-N"], {}),
])
def test_error_object_follows_the_last_output_option(cli, monkeypatch, args, env):
    """An error raised before the settings resolved was rendered in the first -o while the
    run uses the last (Click keeps the last): a wrapper's `katactl -o wide "$@"` called with
    `-o json` printed no JSON Error object (review 11, finding 10)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = cli(args)
    assert r.exit_code == 2, r.stderr
    assert r.json()["kind"] == "Error" and r.json()["exitCode"] == 2, r.stdout
