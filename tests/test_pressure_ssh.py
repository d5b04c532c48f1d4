"""inspect pressure fanned out over real sshd nodes (tests/conftest_sshd.py): a v2 fixture
node, this machine's real /proc and cgroupfs, and an unreachable node (exit 4, a per-node
error, the others reported)."""
from __future__ import annotations

import os
import shutil

import pytest

from tests import fixtures_isolation as fx
from tests.conftest_sshd import SSH_KEYGEN, SSHD, SshLab


@pytest.fixture(scope="module")
def plab(tmp_path_factory):
    if not (os.path.exists(SSHD) and SSH_KEYGEN and shutil.which("ssh")):
        pytest.skip("OpenSSH (openssh-server, openssh-client) is not installed")
    lab = SshLab(tmp_path_factory.mktemp("psilab"))
    lab.add_node("v2node")
    lab.add_node("real", tree=False)
    lab.add_unreachable("down")
    root = str(lab.nodes["v2node"].root)
    built = fx.build_node(root, mode="v2", online_pods=1, sandboxes=1, resctrl=False)
    fx.write_block_devices(root)
    fx.write_v2_signals(root, f"/kubepods/burstable/pod{built['online'][0]}", 0, io_bytes={"8:16": 1})
    fx.write_node_signals(root, 0)
    lab.write_config()
    lab.wait_ready()
    try:
        yield lab, root
    finally:
        lab.stop()


def test_pressure_over_ssh_equals_host_root(cli, plab):
    lab, root = plab
    r = cli(["--ssh-config", str(lab.config), "-N", "v2node", "inspect", "pressure", "-o", "json",
             "--interval", "200ms"])
    assert r.exit_code == 0, r.stderr
    loc = cli(["--host-root", root, "inspect", "pressure", "-o", "json", "--interval", "200ms"])
    assert loc.exit_code == 0, loc.stderr

    def shape(d):
        return [(i["role"], i["path"], i["class"], sorted(i["unsupported"]),
                 sorted((i["psi"] or {}).keys()), [x["device"] for x in (i["io"] or {}).get("devices", [])])
                for i in d["items"]]
    assert shape(r.json()) == shape(loc.json())
    pod = next(i for i in r.json()["items"] if i["class"] == "online")
    assert pod["psi"]["cpu"]["some"]["stallPercent"] == 0.0 and pod["io"]["devices"][0]["name"] == "sdb"


def test_pressure_fleet_partial_failure(cli, plab):
    lab, _ = plab
    r = cli(["--ssh-config", str(lab.config), "-N", "v2node,real,down", "inspect", "pressure", "node",
             "-o", "json", "--interval", "200ms"])
    assert r.exit_code == 4, r.stderr
    d = r.json()
    assert {i["node"] for i in d["items"]} == {"v2node", "real"}
    real = next(i for i in d["items"] if i["node"] == "real")
    assert isinstance(real["psi"]["cpu"]["some"]["avg10"], float)  # this machine's /proc/pressure
    assert set(d["nodes"]) == {"v2node", "real"}
    assert [e["node"] for e in d["errors"]] == ["down"]
