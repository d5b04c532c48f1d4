"""The fan-out keeps the original exception of an unexpected per-node failure."""
from __future__ import annotations

import io
import logging

import pytest

from katactl import config, fleet


def test_unexpected_node_failure_keeps_its_traceback_for_verbose(tmp_path):
    s = config.resolve({"host_root": str(tmp_path), "nodes": ("localhost",)})

    def boom(transport):
        raise ValueError("bad byte in a node file")

    fo = fleet.run_on_nodes(s, boom)
    err = fo.errors["localhost"]
    assert "ValueError: bad byte" in err.message  # the one line stays as it was
    assert isinstance(err.__cause__, ValueError)

    # with -v the routed library log prints the traceback of the original
    from katactl.context import AppContext

    s = config.resolve({"host_root": str(tmp_path), "verbose": 1})
    ctx = AppContext.create(s)
    buf = io.StringIO()
    ctx.out.stderr = buf
    fleet.run_on_nodes(s, boom)
    text = buf.getvalue()
    assert "Traceback" in text and "in boom" in text and "ValueError: bad byte" in text
    for h in list(logging.getLogger("katactl").handlers):
        logging.getLogger("katactl").removeHandler(h)


def test_host_root_that_is_a_symlink_loop_says_so(cli, tmp_path):
    """A symlink loop as --host-root is named as one, not "no such directory" (issue 16,
    finding 17); exit 2 as for the other unusable roots."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    chain = tmp_path / "a"
    chain.symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for root in (loop, chain, tmp_path / "loop" / "x"):
        r = cli(["--host-root", str(root), "sandbox", "list"])
        assert r.exit_code == 2 and r.stderr == f"katactl: error: --host-root {root}: symlink loop\n", r.stderr
    r = cli(["--host-root", str(tmp_path / "missing"), "sandbox", "list"])
    assert r.exit_code == 2 and r.stderr.endswith(": no such directory\n")
    (tmp_path / "file").write_text("")
    r = cli(["--host-root", str(tmp_path / "file"), "sandbox", "list"])
    assert r.exit_code == 2 and r.stderr.endswith(": not a directory\n")


# -- the shape of -o json does not depend on how many nodes were selected (review 7, finding 4)
_LIST_COMMANDS = [(["sandbox", "list"], "SandboxList"), (["version"], "NodeVersionList"),
                  (["vmcore", "list"], "VmcoreList"), (["upgrade", "status"], "UpgradeStatusList"),
                  (["top", "--once"], "SandboxTopList"), (["metrics", "--all"], "MetricSampleList"),
                  (["audit"], "AuditReport"), (["overhead"], "OverheadReport")]


def _down_node() -> str:
    from tests.conftest_sshd import free_port

    return f"127.0.0.1:{free_port()}"  # connection refused: a real socket, nothing listening


@pytest.mark.parametrize("cmd,kind", _LIST_COMMANDS)
@pytest.mark.parametrize("fmt", ["json", "yaml", "jsonl"])
def test_one_selected_node_that_failed_is_in_the_lists_errors(cli, cmd, kind, fmt):
    """`-N one-node -o json` printed kind Error (no items, no errors) where two nodes print
    the <Kind>List with items and errors: an Ansible task reading `.items` broke when its
    group shrank to one host. docs/output.md: "-N, --nodes-from, -l, even for one node"."""
    import json

    import yaml

    node = _down_node()
    r = cli(["--ssh-config", "/dev/null", "--request-timeout", "2s", "-N", node, "-o", fmt, *cmd])
    assert r.exit_code == 7, (r.stdout, r.stderr)  # errors.outcome_exit_code: as before
    doc = yaml.safe_load(r.stdout) if fmt == "yaml" else json.loads(r.stdout.splitlines()[-1] if fmt == "jsonl"
                                                                   else r.stdout)
    assert doc["kind"] == kind and doc["items"] == [], doc
    assert [e["node"] for e in doc["errors"]] == [node]
    assert doc["errors"][0]["error"]["code"] == "Unreachable" and doc["errors"][0]["error"]["exitCode"] == 7


@pytest.mark.parametrize("how", ["nodes-from", "group"])
def test_one_node_from_a_file_or_group_is_a_list_too(cli, _isolated_home, tmp_path, how):
    node = _down_node()
    if how == "nodes-from":
        (tmp_path / "nodes").write_text(node + "\n")
        sel = ["--nodes-from", str(tmp_path / "nodes")]
    else:
        (_isolated_home / "config" / "katactl").mkdir(parents=True)
        (_isolated_home / "config" / "katactl" / "config.toml").write_text(f'[node_groups]\none = ["{node}"]\n')
        sel = ["-N", "@one"]
    r = cli(["--ssh-config", "/dev/null", "--request-timeout", "2s", *sel, "-o", "json", "sandbox", "list"])
    assert r.exit_code == 7
    assert r.json()["kind"] == "SandboxList" and r.json()["errors"][0]["node"] == node


@pytest.mark.parametrize("cmd,kind", _LIST_COMMANDS[:3])
def test_one_selected_node_that_failed_is_one_line_in_human_formats(cli, cmd, kind):
    """On a terminal or in a pipe the one node's failure is the command's: one line naming
    the node on stderr, nothing on stdout (no "No sandboxes found ...")."""
    node = _down_node()
    r = cli(["--ssh-config", "/dev/null", "--request-timeout", "2s", "-N", node, *cmd])
    assert r.exit_code == 7 and r.stdout == "", r.stdout
    assert r.stderr.splitlines()[0].startswith(f"katactl: error: {node}: cannot connect to {node}"), r.stderr


def test_this_host_failing_is_still_the_error_object(cli, tmp_path):
    """Without a node selection (this host) a list command's failure stays the Error object."""
    r = cli(["--host-root", str(tmp_path / "missing"), "-o", "json", "sandbox", "list"])
    assert r.exit_code == 2 and r.json()["kind"] == "Error"


def test_library_callers_keep_the_single_node_error(tmp_path):
    """The list shape is the CLI's machine formats' choice (fleet.configure): a library
    caller's FanOut of one failed node still raises it, named after the node."""
    from katactl.errors import KatactlError

    fo = fleet.FanOut(["n1"], {}, {"n1": KatactlError("boom")})
    with pytest.raises(KatactlError, match="^n1: boom$"):
        fo.raise_if_single_failure()
