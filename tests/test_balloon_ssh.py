"""balloon get/set over SSH: a real sshd node serving a lab-like tree with one Cloud
Hypervisor sandbox (the lab's protocol-faithful API server, simulated guest).

The node runs no shim for the sandbox (its management socket does not exist), so
katactl reaches the balloon through Cloud Hypervisor's API over the SSH socket
relay, and has no guest statistics: the guest's memory usage is unknown there.
"""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest_sshd import SSH_KEYGEN, SSHD, SshLab
from tests._audit import audit_entries

MIB = 1 << 20
TOL = 4 * MIB
NODE = "bnode"


@pytest.fixture(scope="module")
def bnode(tmp_path_factory):
    if not (os.path.exists(SSHD) and SSH_KEYGEN and shutil.which("ssh")):
        pytest.skip("OpenSSH (openssh-server, openssh-client) is not installed")
    from katactl.lab import daemon, layout
    from katactl.lab.clh_server import ClhServer

    lab = SshLab(tmp_path_factory.mktemp("balloonssh"))
    lab.add_node(NODE)
    lab.write_config()
    lab.wait_ready()
    root = str(lab.nodes[NODE].root)
    # as `katactl lab up`: the longest id whose sockets fit in sun_path under this root
    sid = daemon.sandbox_id("train-0", daemon.id_length(root))
    sb = layout.write_go_sandbox(root, sid, hypervisor="clh", memory_mib=1024, pod_name="train-0",
                                 pod_namespace="batch", reclaim_guest_freed_memory=True)
    srv = ClhServer(sb.api_socket, 1024 * MIB)
    try:
        yield lab, sid, srv
    finally:
        srv.close()
        from katactl.backends import ssh

        ssh.close_pool()
        lab.stop()


def over_ssh(lab, *args) -> list[str]:
    return ["--ssh-config", str(lab.config), "-N", NODE, *args]


def hv_balloon(srv) -> int:
    """Cloud Hypervisor's own number: the balloon size it was asked for (bytes taken away)."""
    return srv.guest.balloon_target()


def test_get_and_set_wait_over_ssh(cli, bnode):
    lab, sid, srv = bnode
    r = cli(over_ssh(lab, "balloon", "get", "batch/train-0", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["kind"] == "Balloon" and j["node"] == NODE and j["sandbox"] == sid
    assert j["hypervisor"] == "clh" and j["path"] == "hypervisor-api" and j["memoryBytes"] == 1024 * MIB
    assert j["actualBytes"] == 1024 * MIB - srv.guest.balloon_actual()
    try:
        # no guest statistics here: a shrink needs --force (test_unknown_guest_usage_shrink_needs_force)
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "700Mi", "--force", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        j = r.json()
        assert j["node"] == NODE and j["changed"] is True and j["converged"] is True
        assert abs(j["actualBytes"] - 700 * MIB) <= TOL
        assert hv_balloon(srv) == 324 * MIB
        # again (without --force: nothing to shrink): already there, nothing asked of the
        # hypervisor, nothing audited
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "700Mi", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        j = r.json()
        assert j["node"] == NODE and j["changed"] is False and j["converged"] is True and j["warnings"] == []
        entries = [e for e in audit_entries("balloon.set", sid) if e["result"] != "requested"]
        assert len(entries) == 1, entries
        assert entries[0]["node"] == NODE and entries[0]["params"]["targetBytes"] == 700 * MIB
    finally:
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert hv_balloon(srv) == 0 and srv.guest.balloon_actual() == 0


def test_unknown_guest_usage_shrink_needs_force(cli, bnode):
    """No guest statistics: the used+margin check cannot be made, so any shrink is refused
    (exit 5) without --force, however small (the check must not skip itself); with --force
    it is made and says the check was not. Growing the guest needs no --force."""
    r = cli(["balloon", "set", "--help"])  # the rule as documented
    assert "it refuses to shrink the guest unless --force" in " ".join(r.stdout.replace("│", " ").split()), r.stdout
    lab, sid, srv = bnode
    r = cli(over_ssh(lab, "balloon", "get", sid[:8], "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert r.json()["guest"] is None
    try:
        for tgt in ("1000Mi", "200Mi", "100Mi"):
            r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", tgt, "--wait", "-o", "json"))
            assert r.exit_code == 5, (tgt, r.stdout, r.stderr)
            j = r.json()
            assert j["code"] == "Refused" and "shrinks the guest (it has 1Gi)" in j["message"]
            assert "memory usage is unknown (no guest statistics)" in j["message"] and "--force" in j["hint"]
        assert hv_balloon(srv) == 0 and audit_entries("balloon.set", sid) == []

        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "200Mi", "--force", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        j = r.json()
        assert j["changed"] is True and j["converged"] is True
        unknown = "guest memory usage unknown (no guest statistics): shrinking without the used+margin check (--force)"
        assert j["warnings"] == [unknown] and f"warning: {unknown}" in r.stderr
        assert hv_balloon(srv) == 824 * MIB

        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "600Mi", "--wait", "-o", "json"))  # grows
        assert r.exit_code == 0, r.stderr
        assert r.json()["changed"] is True and r.json()["warnings"] == []
        assert hv_balloon(srv) == 424 * MIB
        entries = [e for e in audit_entries("balloon.set", sid) if e["result"] != "requested"]
        assert [(e["params"]["targetBytes"], e["params"]["force"]) for e in entries] == \
            [(200 * MIB, True), (600 * MIB, False)]
    finally:
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert hv_balloon(srv) == 0
