"""katactl upgrade over SSH on several real sshd nodes (each serving its own node tree)."""
from __future__ import annotations

import json
import os
import secrets

import pytest

from tests import upgrade_fixtures as fx

A, B = "3.1.0", "3.2.0"


@pytest.fixture(scope="module")
def tbs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ssh-tarballs")
    return {A: fx.make_tarball(str(d), A, str(d), compression="gz"),
            B: fx.make_tarball(str(d), B, str(d), compression="xz")}


def test_stage_switch_status_rollback_gc_on_two_nodes(cli, sshd_lab, tbs):
    root = f"/opt/kata-ut-{secrets.token_hex(3)}"  # private to this test inside the shared trees

    def run(*args):
        r = cli(["--ssh-config", str(sshd_lab.config), "-N", "node1,node2", "upgrade", *args,
                 "--kata-root", root, "-o", "json"])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        return r.json()

    for v in (A, B):
        d = run("stage", tbs[v])
        assert d["kind"] == "UpgradeStageList" and d["changed"] is True
        assert sorted(i["node"] for i in d["items"]) == ["node1", "node2"]
    assert run("stage", tbs[A])["changed"] is False
    for n in ("node1", "node2"):
        tree = sshd_lab.nodes[n].root
        cfg = (tree / root.lstrip("/") / "releases" / B / "share/defaults/kata-containers/configuration-qemu.toml")
        assert f'kernel = "{root}/releases/{B}/share/kata-containers/vmlinux.container"' in cfg.read_text()
        shim = tree / root.lstrip("/") / "releases" / A / "bin/containerd-shim-kata-v2"
        assert shim.stat().st_mode & 0o111 and shim.stat().st_size > 1000
    assert run("switch", A)["changed"] is True
    d = run("switch", B, "--dry-run")
    assert d["dryRun"] is True and d["changed"] is True
    d = run("switch", B)
    assert all(i["to"] == {"runtime": B, "agent": B} for i in d["items"])
    for n in ("node1", "node2"):
        assert os.readlink(sshd_lab.nodes[n].root / root.lstrip("/") / "current") == f"releases/{B}"
    assert run("switch", B)["changed"] is False
    st = run("status")
    assert {i["node"]: i["current"]["runtime"] for i in st["items"]} == {"node1": B, "node2": B}
    d = run("rollback")
    assert all(i["to"]["runtime"] == A for i in d["items"])
    d = run("gc", "--force", "--no-keep-previous", "--yes")  # the lab trees have no /proc
    assert all(i["removed"] == [B] for i in d["items"])
    hist = (sshd_lab.nodes["node1"].root / root.lstrip("/") / "releases/.katactl/history.jsonl").read_text()
    assert [json.loads(x)["action"] for x in hist.splitlines()] == ["switch", "switch", "rollback"]


def test_concurrent_switches_and_stale_lock_over_ssh(sshd_lab, tbs, katactl_bin):
    import socket
    import threading

    root = f"/opt/kata-ut-{secrets.token_hex(3)}"
    tree = sshd_lab.nodes["node3"].root / root.lstrip("/")
    base = ["--ssh-config", str(sshd_lab.config), "-N", "node3", "upgrade"]

    def run(*args):
        return katactl_bin([*base, *args, "--kata-root", root, "-o", "json"])

    for v in (A, B):
        assert run("stage", tbs[v]).exit_code == 0
    results = {}
    ts = [threading.Thread(target=lambda v=v: results.__setitem__(v, run("switch", v))) for v in (A, B)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(r.exit_code == 0 for r in results.values()), {v: r.stderr for v, r in results.items()}
    final = os.readlink(tree / "current").split("/")[-1]
    hist = [json.loads(x) for x in (tree / "releases/.katactl/history.jsonl").read_text().splitlines()]
    assert hist[-1]["to"] == {"runtime": final, "agent": final} and len(hist) == 2
    assert not (tree / "releases/.katactl/lock.d").exists()
    # a lock left by a dead katactl of this host is broken; a live one's makes us wait, then time out
    (tree / "releases/.katactl/lock.d").mkdir()
    owner = tree / "releases/.katactl/lock.d/owner.json"
    owner.write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(), "user": "x"}))
    other = B if final == A else A
    r = run("switch", other)
    assert r.exit_code == 0, r.stderr
    (tree / "releases/.katactl/lock.d").mkdir()
    owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "user": "x"}))
    r = run("switch", final, "--lock-timeout", "0.5")
    assert r.exit_code == 6 and "holds the lock" in r.stderr
    assert os.readlink(tree / "current") == f"releases/{other}"


def test_an_interrupted_stage_over_ssh_is_audited_and_leaves_no_lock(sshd_lab, tbs, katactl_bin, tmp_path):
    """Ctrl-C (a real SIGINT) in the middle of the extraction to a real sshd node: exit 130,
    an ``interrupted`` audit record (nothing changed), and neither the node lock nor the
    staging tree left behind."""
    root = f"/opt/kata-ut-{secrets.token_hex(3)}"
    tree = sshd_lab.nodes["node2"].root / root.lstrip("/")
    log = tmp_path / "audit.log"
    r = katactl_bin(["--ssh-config", str(sshd_lab.config), "-N", "node2", "upgrade", "stage", tbs[A],
                     "--kata-root", root, "-o", "json"],
                    env={"KATACTL_FAULT": "stage:mid-extract", "KATACTL_FAULT_SIGNAL": "INT",
                         "KATACTL_AUDIT_LOG": str(log)})
    assert r.exit_code == 130, (r.stdout, r.stderr)
    entry = json.loads(log.read_text().splitlines()[-1])
    assert (entry["action"], entry["node"], entry["result"], entry["changed"]) == \
        ("upgrade.stage", "node2", "interrupted", False)
    assert sorted(os.listdir(tree / "releases")) == [".katactl"]
    assert [n for n in os.listdir(tree / "releases/.katactl") if n.startswith(("lock", ".lock-"))] == []


def test_stage_dry_run_fails_like_the_run_over_ssh_when_the_kata_root_is_a_file(cli, sshd_lab, tbs):
    """review5 diffA #5 over SFTP, whose stat reports a path under a file as 'no such file'
    (sftp-server maps ENOTDIR to SSH2_FX_NO_SUCH_FILE): the dry run still fails as the run
    does (exit 1, 'Not a directory'), not 0, and not 'not found' (exit 3)."""
    base = f"/opt/kata-ut-{secrets.token_hex(3)}"
    (sshd_lab.nodes["node1"].root / base.lstrip("/")).write_bytes(b"")
    try:
        out = []
        for extra in (["--dry-run"], []):
            r = cli(["--ssh-config", str(sshd_lab.config), "-N", "node1", "upgrade", "stage", tbs[A], *extra,
                     "--kata-root", f"{base}/kata", "-o", "json"])
            out.append((r.exit_code, "Not a directory" in r.stderr, r.stderr))
        assert out[0][:2] == out[1][:2] == (1, True), out
    finally:
        (sshd_lab.nodes["node1"].root / base.lstrip("/")).unlink()
