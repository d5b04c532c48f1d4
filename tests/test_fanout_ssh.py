"""Fan-out over real sshd nodes through the CLI, and the security contract:
hostile node names, sandbox ids and paths never reach a shell."""
from __future__ import annotations

import os

import pytest

from katactl import config


@pytest.fixture(scope="module")
def fleet(sshd_lab):
    """node1..node3 get three sandboxes each; node1's first one has a live shim."""
    from katactl.lab import layout
    from katactl.lab.shimserver import ShimServer

    paths = {}
    for n in ("node1", "node2", "node3"):
        paths[n] = layout.write_many(str(sshd_lab.nodes[n].root), 3)
    srv = ShimServer(paths["node1"][0].shim_socket).start()
    yield sshd_lab, paths
    srv.stop()


def ssh_args(lab, *args):
    return ["--ssh-config", str(lab.config), *args]


def test_version_across_nodes(cli, sshd_lab):
    r = cli(ssh_args(sshd_lab, "-N", "node1,node2", "-N", "node3,node4", "version", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    items = r.json()["items"]
    assert [i["node"] for i in items] == ["node1", "node2", "node3", "node4"]
    assert all(i["runtime"] == "present at /opt/kata/bin/kata-runtime" for i in items)


def test_sandbox_list_across_nodes(cli, fleet):
    lab, paths = fleet
    r = cli(ssh_args(lab, "-N", "node1,node2,node3", "sandbox", "list", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    items = r.json()["items"]
    assert sorted({i["node"] for i in items}) == ["node1", "node2", "node3"]
    assert len(items) == 9
    by_node = {(i["node"], i["id"]): i for i in items}
    # the shim socket on node1 answered through the SSH socket relay
    assert by_node[("node1", paths["node1"][0].sandbox_id)]["state"] == "running"
    assert by_node[("node2", paths["node2"][0].sandbox_id)]["state"] == "stale"
    table = cli(ssh_args(lab, "-N", "node1,node2", "sandbox", "list"))
    assert table.stdout.splitlines()[0].split()[0] == "NODE"


def test_partial_failure_exit_4(cli, sshd_lab):
    r = cli(ssh_args(sshd_lab, "-N", "node1,unreachable,changed", "version", "-o", "json"))
    assert r.exit_code == 4
    doc = r.json()
    assert [i["node"] for i in doc["items"]] == ["node1"]
    errs = {e["node"]: e["error"] for e in doc["errors"]}
    assert errs["unreachable"]["exitCode"] == 7
    assert errs["changed"]["code"] == "HostKeyRejected"


def test_all_unreachable_exit_7(cli, sshd_lab):
    r = cli(ssh_args(sshd_lab, "--request-timeout", "0.5s", "-N", "unreachable,slow", "version"))
    assert r.exit_code == 7
    assert "no SSH handshake" in r.stderr and "cannot connect" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_empty_list_names_only_the_nodes_that_answered(cli, sshd_lab, tmp_path):
    """'No sandboxes found.' must not be said of nodes that failed: with one node answering
    an empty list it says so of that one; with none answering, only the errors are shown."""
    empty = tmp_path / "empty-node"
    empty.mkdir()
    r = cli(ssh_args(sshd_lab, "--host-root", str(empty), "-N", "node1,unreachable", "sandbox", "list"))
    assert r.exit_code == 4, r.stderr
    assert "No sandboxes found on the 1 node(s) that answered." in r.stderr
    r = cli(ssh_args(sshd_lab, "--host-root", str(empty), "-N", "unreachable,changed", "sandbox", "list"))
    assert r.exit_code == 7, r.stderr
    assert "No sandboxes found" not in r.stderr and "unreachable" in r.stderr


def test_changed_host_key_cli_exit_7_names_line(cli, sshd_lab):
    port = sshd_lab.nodes["changed"].port
    lines = sshd_lab.known_hosts.read_text().splitlines()
    n = next(i for i, line in enumerate(lines, 1) if line.startswith(f"[127.0.0.1]:{port} "))
    r = cli(ssh_args(sshd_lab, "-N", "changed", "version"))
    assert r.exit_code == 7
    assert f"{sshd_lab.known_hosts}:{n}" in r.stderr
    assert "ssh-keygen -R" in r.stderr
    r = cli(ssh_args(sshd_lab, "-N", "changed", "--ssh-accept-new", "version", "-o", "json"))
    assert r.exit_code == 7
    doc = r.json()  # one selected node: the list, its error in errors (docs/output.md)
    assert doc["kind"] == "NodeVersionList" and doc["errors"][0]["node"] == "changed"
    assert doc["errors"][0]["error"]["details"]["line"] == n


def test_nodes_from_and_groups(cli, sshd_lab, tmp_path, _isolated_home):
    f = tmp_path / "nodes"
    f.write_text("# fleet\nnode1\n\nnode2  # comment\n")
    r = cli(ssh_args(sshd_lab, "--nodes-from", str(f), "version", "-o", "json"))
    assert [i["node"] for i in r.json()["items"]] == ["node1", "node2"]
    cfgdir = _isolated_home / "config" / "katactl"
    cfgdir.mkdir(parents=True, exist_ok=True)
    (cfgdir / "config.toml").write_text(
        f'ssh_config = "{sshd_lab.config}"\nparallel = 2\n[node_groups]\nrack1 = ["node3", "node4", "node1"]\n')
    r = cli(["-N", "@rack1", "version", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert [i["node"] for i in r.json()["items"]] == ["node3", "node4", "node1"]


def test_jump_host_setting(cli, sshd_lab, monkeypatch):
    monkeypatch.setenv("KATACTL_JUMP_HOST", "jump1")
    port = sshd_lab.nodes["node2"].port
    before = sshd_lab.nodes["jump1"].log.read_text().count(f"port {port}")
    from katactl.backends import ssh

    ssh.close_pool()  # node2 may be pooled as a direct connection
    r = cli(ssh_args(sshd_lab, "-N", "node2", "version", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert sshd_lab.nodes["jump1"].log.read_text().count(f"port {port}") > before


def test_fan_out_parallel_one_same_result(cli, sshd_lab):
    a = cli(ssh_args(sshd_lab, "--parallel", "1", "-N", "node1,node2,node3", "version", "-o", "json"))
    b = cli(ssh_args(sshd_lab, "--parallel", "3", "-N", "node1,node2,node3", "version", "-o", "json"))
    assert a.json()["items"] == b.json()["items"]


# -- security --------------------------------------------------------------------------
def hostile(canary: str) -> list[str]:
    return [f"; touch {canary}", f"$(touch {canary})", f"`touch {canary}`", f"x\ntouch {canary}",
            f"x' ; touch {canary} ; '", f'x" ; touch {canary} ; "', f"ü€ && touch {canary}",
            f"|touch {canary}", f"x > {canary}", f"-oProxyCommand=touch {canary}"]


BAD_NODE_NAMES = ["node1; rm -rf /", "$(touch /tmp/x)", "`id`", "node1\nnode2", "nöde",
                  "-oProxyCommand=sh", "node 1", "a'b", "user@@host", "host:99999x", "[::1", "../x",
                  # issue 16, findings 4 and 14: a trailing newline, an empty or overlong DNS label
                  "node1\n", "\tnode1", "a..b", "u@a..b:22", "x." + "a" * 64,
                  # review 10: a user ssh would take for an option (misc.c valid_ruser)
                  "-x@node1"]


@pytest.mark.parametrize("name", BAD_NODE_NAMES)
def test_hostile_node_names_rejected(cli, sshd_lab, name):
    r = cli(ssh_args(sshd_lab, "-N", name, "version"))
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert "invalid node name" in r.stderr


@pytest.mark.parametrize("bad", ["node2:99999", "node2:0", "node2:65536"])
def test_an_out_of_range_port_refuses_the_whole_selection_up_front(cli, sshd_lab, bad):
    """Exit 2 before any node is contacted (review 10 finding 3): not node1 listed, then
    a per-node usage error and exit 4, which for a mutating command means node1 changed."""
    from katactl.backends import ssh

    ssh.close_pool()
    r = cli(ssh_args(sshd_lab, "-N", f"node1,{bad}", "-o", "json", "sandbox", "list"))
    assert r.exit_code == 2, (r.stdout, r.stderr)
    doc = r.json()
    assert (doc["kind"], doc["exitCode"]) == ("Error", 2), doc
    assert doc["message"] == f"invalid port in node name {bad!r}: expected 1-65535"
    assert not ssh.POOL._conns  # node1 was never connected to


@pytest.mark.parametrize("source", ["flag", "env", "profile"])
def test_a_hostile_ssh_user_never_reaches_a_proxycommand(cli, sshd_lab, tmp_path, monkeypatch, source):
    """%r is the command line's user (--ssh-user, KATACTL_SSH_USER, a profile's ssh_user):
    quotes in it once became more words of the proxy's argv, an -oProxyCommand the proxy
    ssh ran (review 10 finding 1). Refused as ssh refuses it (valid_ruser): exit 2, before
    any connection, nothing run."""
    canary = tmp_path / "PWNED"
    cfg = tmp_path / "pc_config"
    cfg.write_text(f"Host pcr\n  HostName 127.0.0.1\n  Port {sshd_lab.nodes['node1'].port}\n"
                   f"  ProxyCommand ssh -F {sshd_lab.config} -l %r -W %h:%p jump1\nInclude {sshd_lab.config}\n")
    user = f"{sshd_lab.user} '-oProxyCommand=touch {canary}'"
    args = ["--ssh-config", str(cfg), "-N", "pcr", "version", "-o", "json"]
    if source == "flag":
        args[:0] = ["--ssh-user", user]
    elif source == "env":
        monkeypatch.setenv("KATACTL_SSH_USER", user)
    else:
        toml = tmp_path / "config.toml"
        toml.write_text(f'profile = "p"\n[profiles.p]\nssh_user = """{user}"""\n')
        monkeypatch.setenv("KATACTL_CONFIG", str(toml))
    r = cli(args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.json()["message"].startswith(f"invalid SSH user {user!r} (from "), r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not canary.exists()


def test_hostile_paths_and_args_never_reach_a_shell(sshd_lab, tmp_path):
    from katactl.backends.ssh import SSHTransport

    canary = str(tmp_path / "CANARY")
    t = SSHTransport.from_settings("node1", config.resolve({"ssh_config": str(sshd_lab.config)}))
    root = sshd_lab.nodes["node1"].root
    (root / "hostile").mkdir(exist_ok=True)
    for i, evil in enumerate(hostile(canary)):
        # as an argument: echoed back byte for byte
        r = t.run(["printf", "%s", evil])
        assert r.stdout == evil.encode()
        # as a file name that exists: read, streamed, listed, renamed, removed literally
        node_path = f"/hostile/{i}{evil}".replace("/", "_").replace("_hostile_", "/hostile/", 1)
        real = root / node_path.lstrip("/")
        real.write_bytes(evil.encode())
        assert t.read_bytes(node_path) == evil.encode()
        assert b"".join(t.open_stream(node_path)) == evil.encode()
        assert t.statvfs_free(node_path) > 0
        assert os.path.basename(node_path) in t.listdir("/hostile")
        t.rename(node_path, node_path + ".moved")
        t.symlink(evil, node_path + ".link")
        assert t.readlink(node_path + ".link") == evil
        t.mkdir(node_path + ".d/sub")
        t.remove(node_path + ".d", recursive=True)
        t.write_bytes_atomic(node_path + ".w", b"w")
        # as a path that does not exist
        with pytest.raises(FileNotFoundError):
            t.read_bytes("/nope/" + evil.replace("/", "_"))
        with pytest.raises(FileNotFoundError):
            t.open_stream("/nope/" + evil.replace("/", "_"))
        from katactl.errors import UnreachableError

        with pytest.raises(UnreachableError, match="does not exist"):
            t.connect_unix("/nope/" + evil.replace("/", "_"), timeout=5)
    assert not os.path.exists(canary), "a shell interpreted a hostile argument"
    assert not os.path.exists(root / "hostile" / "CANARY")


def test_hostile_sandbox_ids_via_cli(cli, fleet, tmp_path):
    lab, _ = fleet
    canary = str(tmp_path / "CANARY")
    for evil in hostile(canary):
        r = cli(ssh_args(lab, "-N", "node1", "sandbox", "inspect", evil))
        assert r.exit_code in (2, 3), (evil, r.stdout, r.stderr)
        r = cli(ssh_args(lab, "-N", "node1", "metrics", evil))
        assert r.exit_code in (2, 3), (evil, r.stdout, r.stderr)
    assert not os.path.exists(canary)


def test_socket_commands_work_remotely(cli, fleet):
    """metrics and top talk HTTP to the shim socket on the node through the SSH relay."""
    lab, paths = fleet
    sid = paths["node1"][0].sandbox_id
    r = cli(ssh_args(lab, "-N", "node1", "metrics", sid[:12], "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert any(i["family"].startswith("kata_") for i in r.json()["items"])
    r = cli(ssh_args(lab, "-N", "node1,node2", "top", "-o", "json", "--interval", "0.1s"))
    assert r.exit_code == 0, r.stderr
    assert sid in [i["id"] for i in r.json()["items"] if i["node"] == "node1"]


def test_run_on_nodes_progress_in_completion_order(sshd_lab):
    """A slow node does not hold the progress counter back; results stay in node order."""
    import threading

    from katactl import fleet

    s = config.resolve({"ssh_config": str(sshd_lab.config), "nodes": ("node1", "node2", "node3", "node4")})
    release = threading.Event()
    finished: list[str] = []
    progress: list[tuple[int, int]] = []

    def fn(t):
        if t.node == "node1":
            release.wait(30)  # until the other three are reported
        finished.append(t.node)
        return t.read_text("/etc/hostname").strip()

    def on_progress(done, total):
        progress.append((done, total))
        if done == 3:
            release.set()

    fo = fleet.run_on_nodes(s, fn, progress=on_progress)
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert finished[-1] == "node1"
    assert list(fo.values) == ["node1", "node2", "node3", "node4"]
    assert fo.values["node3"] == "node3" and not fo.errors


def test_fan_out_progress_line_on_a_terminal_only(sshd_lab, katactl_bin):
    """A fan-out counts finished nodes on a terminal's stderr ("\\r3/3 nodes"); stdout piped
    stays pure JSON; with stderr piped there is no counter."""
    import json
    import sys

    from tests._pty import run_stderr_on_pty

    args = ssh_args(sshd_lab, "-N", "node1,node2,node3", "version", "-o", "json")
    code, out, screen = run_stderr_on_pty([sys.executable, "-m", "katactl", *args])
    assert code == 0, (out, screen)
    counts = [screen.find(f"\r{k}/3 nodes") for k in (1, 2, 3)]
    assert -1 not in counts and counts == sorted(counts), screen
    assert [i["node"] for i in json.loads(out)["items"]] == ["node1", "node2", "node3"]
    r = katactl_bin(args)
    assert r.exit_code == 0, r.stderr
    assert "nodes" not in r.stderr and "\r" not in r.stderr
    assert [i["node"] for i in r.json()["items"]] == ["node1", "node2", "node3"]


@pytest.mark.parametrize("cmd", [["version"], ["sandbox", "list"]])
def test_single_node_error_names_the_node(cli, sshd_lab, cmd):
    r = cli(ssh_args(sshd_lab, "--request-timeout", "0.5s", "-N", "unreachable", *cmd))
    assert r.exit_code == 7
    assert r.stderr.strip().splitlines()[-1].startswith("katactl: error: unreachable: cannot connect to 127.0.0.1:")
    # -o json: the list of a node selection, even of one node (docs/output.md), the node in its errors
    doc = cli(ssh_args(sshd_lab, "--request-timeout", "0.5s", "-N", "unreachable", *cmd, "-o", "json")).json()
    assert doc["kind"].endswith("List") and doc["items"] == []
    assert [e["node"] for e in doc["errors"]] == ["unreachable"]
    assert doc["errors"][0]["error"]["message"].startswith("cannot connect to 127.0.0.1:")


def test_ipv6_address_in_brackets(cli, sshd_lab):
    from tests.conftest_sshd import free_port

    r = cli(ssh_args(sshd_lab, "--request-timeout", "0.5s", "-N", f"[::1]:{free_port()}", "version"))
    assert r.exit_code == 7
    assert "cannot connect to [::1]:" in r.stderr, r.stderr
