"""vmcore over SSH: real OpenSSH sshd (tests/conftest_sshd.py), a node of our own."""
from __future__ import annotations

import os

import pytest

from katactl import config, vmcore
from tests.test_vmcore import SID, TS, add_dump, node_tree, sha


@pytest.fixture(scope="module")
def vnode(sshd_lab):
    """A node 'vmc' added to the shared SSH lab, with a dump in its tree."""
    if "vmc" not in sshd_lab.nodes:
        sshd_lab.add_node("vmc", known="plain")
        sshd_lab.write_config()
        sshd_lab.wait_ready()
    root = str(sshd_lab.nodes["vmc"].root)
    node_tree(root)
    src = add_dump(root, size_segments=((0, 16 << 20),), data=os.urandom(10 << 20))
    return {"lab": sshd_lab, "root": root, "src": src}


def _args(v, *a):
    return ["-N", "vmc", "--ssh-config", str(v["lab"].config), *a]


def test_list_and_collect_over_ssh(cli, vnode, tmp_path):
    r = cli(_args(vnode, "vmcore", "list", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["node"] == "vmc" and it["pod"] == "default/web-0"
    r = cli(_args(vnode, "vmcore", "collect", "--to", str(tmp_path / "o"), "--verify", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    [c] = r.json()["items"]
    assert c["to"] == str(tmp_path / "o" / "vmc" / SID / f"vmcore-{TS}.elf")
    assert c["verified"] and c["verification"] == "node-sha256sum" and sha(c["to"]) == sha(vnode["src"])
    r = cli(_args(vnode, "vmcore", "collect", "--to", str(tmp_path / "o"), "-o", "json"))
    assert r.json()["changed"] is False


def test_resume_over_ssh(vnode, tmp_path):
    from katactl.backends.ssh import SSHTransport

    settings = config.resolve({"ssh_config": str(vnode["lab"].config), "timeout": 10.0})
    idx = vmcore.CollectIndex(str(tmp_path / "idx"))

    def stop(dump, done, total):
        if done >= 6 << 20:
            raise KeyboardInterrupt

    with SSHTransport.from_settings("vmc", settings) as t:
        with pytest.raises(KeyboardInterrupt):
            vmcore.collect(t, [], vmcore.CollectOptions(to=str(tmp_path / "o"), progress=stop),
                           index=idx)
    with SSHTransport.from_settings("vmc", settings) as t:
        [res] = vmcore.collect(t, [], vmcore.CollectOptions(to=str(tmp_path / "o")), index=idx)
    assert res["resumed"] is True and res["verification"] == "node-sha256sum"   # sha256sum ran on the node
    assert sha(res["to"]) == sha(vnode["src"])
