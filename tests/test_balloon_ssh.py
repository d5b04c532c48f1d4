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
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "700Mi", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        j = r.json()
        assert j["node"] == NODE and j["changed"] is True and j["converged"] is True
        assert abs(j["actualBytes"] - 700 * MIB) <= TOL
        assert hv_balloon(srv) == 324 * MIB
        # again: already there, nothing asked of the hypervisor, nothing audited
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "700Mi", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        j = r.json()
        assert j["node"] == NODE and j["changed"] is False and j["converged"] is True
        entries = audit_entries("balloon.set", sid)
        assert len(entries) == 1, entries
        assert entries[0]["node"] == NODE and entries[0]["params"]["targetBytes"] == 700 * MIB
    finally:
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert hv_balloon(srv) == 0 and srv.guest.balloon_actual() == 0


def test_unknown_guest_usage_blind_floor(cli, bnode):
    """No guest statistics: the used+margin check cannot be made. A target below the
    blind floor (min(VM memory, 128Mi)) is refused without --force; at or above it, and
    with --force below it, the change is made with a warning that the check was skipped."""
    from katactl.balloon import BLIND_FLOOR

    assert BLIND_FLOOR == 128 * MIB
    r = cli(["balloon", "set", "--help"])  # the rule as documented
    assert "usage is unknown (no guest statistics), it refuses targets below 128Mi unless --force" in \
        " ".join(r.stdout.replace("│", " ").split()), r.stdout
    lab, sid, srv = bnode
    r = cli(over_ssh(lab, "balloon", "get", sid[:8], "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert r.json()["guest"] is None
    unknown = "guest memory usage unknown: the used+margin check was not made"
    try:
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "100Mi", "--wait", "-o", "json"))
        assert r.exit_code == 5, (r.stdout, r.stderr)
        j = r.json()
        assert j["code"] == "Refused" and "memory usage is unknown" in j["message"] and "128Mi" in j["message"]
        assert "--force" in j["hint"]
        assert hv_balloon(srv) == 0 and audit_entries("balloon.set", sid) == []

        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "200Mi", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        assert r.json()["warnings"] == [unknown] and f"warning: {unknown}" in r.stderr
        assert hv_balloon(srv) == 824 * MIB

        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--target", "100Mi", "--force", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        j = r.json()
        assert j["changed"] is True and j["converged"] is True and j["warnings"] == [unknown]
        assert hv_balloon(srv) == 924 * MIB
        assert [e["params"]["targetBytes"] for e in audit_entries("balloon.set", sid)] == [200 * MIB, 100 * MIB]
    finally:
        r = cli(over_ssh(lab, "balloon", "set", sid[:8], "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert hv_balloon(srv) == 0
