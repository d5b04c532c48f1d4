"""rollout run upgrades a fleet of real sshd nodes (each its own root) from one A/B
release to another: node-local steps through the library over SSH, cordon/drain only
where asked; and an SSH-only fleet with the file state store survives kill -9."""
from __future__ import annotations

import json
import os
import secrets

import pytest

from tests import upgrade_fixtures as fx

A, B = "3.1.0", "3.2.0"


@pytest.fixture(scope="module")
def tbs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ro-tarballs")
    return {A: fx.make_tarball(str(d), A, str(d), compression="gz"),
            B: fx.make_tarball(str(d), B, str(d), compression="gz")}


def _current(lab, node, root):
    return os.readlink(lab.nodes[node].root / root.lstrip("/") / "current")


def test_upgrade_a_fleet_from_one_release_to_another(cli, kube, tmp_path, sshd_lab, tbs):
    root = f"/opt/kata-ro-{secrets.token_hex(3)}"
    kc = kube.kubeconfig(tmp_path / "kubeconfig")
    for n in ("node1", "node2"):
        kube.add_node(n, labels={"pool": "kata"})
    base = ["--kubeconfig", kc, "--ssh-config", str(sshd_lab.config)]
    r = cli([*base, "rollout", "run", "to-a", "-l", "pool=kata", "--poll", "0.1",
             "--step", f"upgrade stage {tbs[A]} --kata-root {root}",
             "--step", f"upgrade switch {A} --kata-root {root}", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert all(_current(sshd_lab, n, root) == f"releases/{A}" for n in ("node1", "node2"))
    # cordon/drain only where asked: no node was made unschedulable
    assert not [q for q in kube.requests if q["method"] == "PATCH" and "unschedulable" in json.dumps(q["body"])]
    kube.requests.clear()
    r = cli([*base, "rollout", "run", "to-b", "-l", "pool=kata", "--poll", "0.1",
             "--step", f"upgrade stage {tbs[B]} --kata-root {root}",
             "--step", "drain --ignore-daemonsets --timeout 30s",
             "--step", f"upgrade switch {B} --kata-root {root}",
             "--step", f"recycle-stale --kata-root {root}", "--step", "check", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["phase"] == "Succeeded" and d["counts"]["done"] == 2
    assert all(_current(sshd_lab, n, root) == f"releases/{B}" for n in ("node1", "node2"))
    assert not any(kube.get_obj("Node", n)["spec"].get("unschedulable") for n in ("node1", "node2"))
    cordons = [q for q in kube.requests if q["method"] == "PATCH" and (q["body"] or {}).get("spec", {}).get("unschedulable")]
    assert len(cordons) == 2  # drained (cordoned) once each, uncordoned afterwards
    hist = (sshd_lab.nodes["node1"].root / root.lstrip("/") / "releases/.katactl/history.jsonl").read_text()
    assert [json.loads(x)["to"]["runtime"] for x in hist.splitlines()] == [A, B]


def test_ssh_only_fleet_file_state_survives_kill_9(cli, katactl_bin, sshd_lab, tbs, _isolated_home):
    root = f"/opt/kata-ro-{secrets.token_hex(3)}"
    args = ["--ssh-config", str(sshd_lab.config), "rollout", "run", "ssh-only", "-N", "node3,node4",
            "--poll", "0.1", "--step", f"upgrade stage {tbs[A]} --kata-root {root}",
            "--step", f"upgrade switch {A} --kata-root {root}", "-o", "jsonl"]
    r = katactl_bin(args, env={"KATACTL_TEST_KILL_AT": "step:3"})
    assert r.exit_code == -9, r.stderr
    state = _isolated_home / "state/katactl/rollouts/ssh-only.json"
    assert json.loads(state.read_text())["plan"]["backend"] == "file"
    res = cli(["--ssh-config", str(sshd_lab.config), "rollout", "resume", "ssh-only", "-o", "json"])
    assert res.exit_code == 0, res.stderr
    assert res.json()["phase"] == "Succeeded"
    assert all(_current(sshd_lab, n, root) == f"releases/{A}" for n in ("node3", "node4"))
    lock = _isolated_home / "state/katactl/rollouts/rollout.lock"
    assert lock.read_text() == ""  # released: no holder
    lst = cli(["rollout", "list", "--state", "file", "-o", "json"]).json()
    assert [(i["name"], i["phase"]) for i in lst["items"]] == [("ssh-only", "Succeeded")]
