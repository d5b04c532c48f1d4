"""inspect cgroup|bvt|memcg|rdt|threads and audit fanned out over real sshd nodes.

Each node is an OpenSSH sshd on loopback serving an isolation fixture tree
(tests/fixtures_isolation.py) as its root (``SetEnv KATACTL_HOST_ROOT``). What
a node reports over SSH must equal what the same command reports locally with
``--host-root`` on the same tree, apart from the ``node`` tag (and node-level
audit findings, whose target is the node's name: "localhost" locally).

The fleet (its own SshLab: the session lab's node1..3 trees carry the sandbox
fan-out fixtures, whose sandbox counts these trees would change):
  node1   hybrid v1+v2, Alinux knobs, resctrl, 2 QEMU sandboxes with
          sandbox_cgroup_only=false (a medium audit finding)
  node2   pure v2, Alinux knobs, resctrl with CDP, 1 Cloud Hypervisor sandbox; clean
  plain   v1, stock kernel: no BVT, no memcg QoS knobs, no resctrl (unsupported = info)
  broken  v1 with a directory where cpu.shares should be, a malformed memory.priority
          and a malformed resctrl schemata
  bare    no cgroup filesystem at all (per-node "not found")
  real    no host root: this machine's real /proc and cgroupfs, over SFTP
  down    nobody listens (unreachable)
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest_sshd import SSH_KEYGEN, SSHD, SshLab
from tests.fixtures_isolation import build_node, pod_uid


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    import shutil

    if not (os.path.exists(SSHD) and SSH_KEYGEN and shutil.which("ssh")):
        pytest.skip("OpenSSH (openssh-server, openssh-client) is not installed")
    lab = SshLab(tmp_path_factory.mktemp("isolab"))
    for name in ("node1", "node2", "plain", "broken", "bare"):
        lab.add_node(name)
    lab.add_node("real", tree=False)
    lab.add_unreachable("down")
    root = {n: str(lab.nodes[n].root) for n in ("node1", "node2", "plain", "broken", "bare")}
    info = {
        "node1": build_node(root["node1"], mode="hybrid", online_pods=2, sandboxes=2),
        "node2": build_node(root["node2"], mode="v2", online_pods=2, sandboxes=1, sandbox_cgroup_only=True,
                            hypervisor="clh", cdp=True),
        "plain": build_node(root["plain"], online_pods=1, sandboxes=1, alinux=False, resctrl=False,
                            sandbox_cgroup_only=True),
        "broken": build_node(root["broken"], online_pods=1, sandboxes=1, sandbox_cgroup_only=True),
    }
    uid = info["broken"]["online"][0]
    knob = os.path.join(root["broken"], f"sys/fs/cgroup/cpu/kubepods/burstable/pod{uid}/cpu.shares")
    os.remove(knob)
    os.mkdir(knob)  # reading it fails with EISDIR
    with open(os.path.join(root["broken"], f"sys/fs/cgroup/memory/kubepods/burstable/pod{uid}/memory.priority"),
              "w") as f:
        f.write("high\n")
    with open(os.path.join(root["broken"], "sys/fs/resctrl/LS/schemata"), "w") as f:
        f.write("L3:0=zz\n")
    lab.write_config()
    lab.wait_ready()
    yield lab, root, info
    from katactl.backends import ssh

    ssh.close_pool()
    lab.stop()


def remote(cli, lab, nodes, *args):
    return cli(["--ssh-config", str(lab.config), "-N", nodes, *args, "-o", "json"])


def local(cli, root, *args):
    return cli(["--host-root", root, *args, "-o", "json"])


def by_node(items):
    """{node: [item without its node tag]}; every item must carry one."""
    out: dict[str, list] = {}
    for i in items:
        assert i.get("node"), i
        out.setdefault(i["node"], []).append({k: v for k, v in i.items() if k != "node"})
    return out


def meta(doc):
    """A single-node document's metadata: everything but the envelope, the items and
    the node's name (localhost here, the node's name over SSH)."""
    return {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "items", "node")}


REPORTS = [["inspect", "bvt"], ["inspect", "memcg"], ["inspect", "rdt"], ["inspect", "threads", "batch/batch-0"]]


@pytest.mark.parametrize("cmd", REPORTS, ids=lambda c: "-".join(c[1:2]))
def test_reports_equal_local_host_root(cli, iso, cmd):
    lab, root, _ = iso
    r = remote(cli, lab, "node1,node2", *cmd)
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert "errors" not in doc or not doc["errors"]
    got = by_node(doc["items"])
    assert list(got) == ["node1", "node2"]
    for n in ("node1", "node2"):
        want = local(cli, root[n], *cmd)
        assert want.exit_code == 0, want.stderr
        assert got[n] == want.json()["items"], n
        assert doc["nodes"][n] == meta(want.json()), n
    if cmd[1] == "bvt":
        assert {i["class"] for i in doc["items"] if i["node"] == "node1"} >= {"online", "offline", "system"}
        assert all(i["ok"] is not False for i in doc["items"])
    if cmd[1] == "memcg":
        assert {i["priority"] for i in doc["items"] if i["level"] == "pod"} == {0, 12}
    if cmd[1] == "rdt":
        be = {i["node"]: i for i in doc["items"] if i["name"] == "BE"}
        assert [ln["resource"] for ln in be["node2"]["schemata"]][:2] == ["L3DATA", "L3CODE"]
        assert sum(s["vcpus"] for s in be["node1"]["sandboxes"]) == 4
    if cmd[1] == "threads":
        assert doc["nodes"]["node2"]["sandbox"]["hypervisor"] == "clh"
        assert [i["role"] for i in got["node1"]].count("vcpu") == 2


@pytest.mark.parametrize("target", ["batch/batch-0", pod_uid(0, "online"), f"pod/{pod_uid(1, 'online')}",
                                    "/kubepods/besteffort"])
def test_inspect_cgroup_equals_local(cli, iso, target):
    lab, root, _ = iso
    r = remote(cli, lab, "node1,node2", "inspect", "cgroup", target)
    assert r.exit_code == 0, r.stderr
    got = by_node(r.json()["items"])
    for n in ("node1", "node2"):
        want = local(cli, root[n], "inspect", "cgroup", target)
        assert want.exit_code == 0, want.stderr
        assert got[n] == [meta(want.json())], n
    assert got["node1"][0]["hierarchy"] == "hybrid" and got["node2"][0]["hierarchy"] == "v2"


def test_audit_equals_local_and_fail_on(cli, iso):
    lab, root, _ = iso
    r = remote(cli, lab, "node1,node2", "audit", "--fail-on", "critical")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    got = by_node(doc["items"])
    assert "node2" not in got  # a clean node: no findings
    for n in ("node1", "node2"):
        want = local(cli, root[n], "audit", "--fail-on", "critical")
        assert want.exit_code == 0, want.stderr
        w = want.json()
        assert got.get(n, []) == w["items"], n
        assert doc["nodes"][n] == {k: w[k] for k in ("hierarchy", "pods", "sandboxes", "counts")}
    assert {i["check"] for i in got["node1"]} == {"kata.sandbox-cgroup-only"}
    assert doc["counts"]["medium"] == 2 and doc["passed"] is True

    r = remote(cli, lab, "node2,node1", "audit")  # --fail-on medium: node1's findings fail the fleet
    assert r.exit_code == 8, r.stderr
    assert r.json()["passed"] is False and r.json()["failOn"] == "medium"
    assert remote(cli, lab, "node2", "audit", "--fail-on", "info").exit_code == 0
    table = cli(["--ssh-config", str(lab.config), "-N", "node1,node2", "audit"])
    assert table.exit_code == 8 and "audit FAILED (--fail-on medium)" in table.stderr


def test_unsupported_features_are_info_not_errors(cli, iso):
    lab, root, _ = iso
    r = remote(cli, lab, "node2,plain", "audit", "--fail-on", "low")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert not doc.get("errors")
    plain = by_node(doc["items"])["plain"]
    assert {i["check"]: i["severity"] for i in plain} == {"bvt.unsupported": "info", "memcg.unsupported": "info",
                                                          "rdt.unsupported": "info"}
    assert all(i["target"] == "plain" for i in plain)  # node-level findings name the node
    want = local(cli, root["plain"], "audit").json()["items"]
    assert plain == [{**i, "target": "plain" if i["target"] == "localhost" else i["target"]} for i in want]
    assert remote(cli, lab, "node2,plain", "audit", "--fail-on", "info").exit_code == 8
    for cmd in (["inspect", "bvt"], ["inspect", "rdt"]):
        r = remote(cli, lab, "node1,plain", *cmd)
        assert r.exit_code == 0, (cmd, r.stderr)
        d = r.json()
        assert d["nodes"]["plain"]["supported"] is False and d["nodes"]["node1"]["supported"] is True
        assert d["nodes"]["plain"] == meta(local(cli, root["plain"], *cmd).json())
        assert {i["node"] for i in d["items"]} == {"node1"}


@pytest.mark.parametrize("cmd", [["inspect", "bvt"], ["inspect", "memcg"], ["inspect", "rdt"],
                                 ["inspect", "cgroup", "batch/batch-0"], ["audit"]],
                         ids=lambda c: "-".join(c))
def test_one_bad_node_does_not_stop_the_others(cli, iso, cmd):
    """node1 answers; bare has no cgroup filesystem (not found, 3) and down is unreachable (7): exit 4."""
    lab, root, _ = iso
    r = remote(cli, lab, "bare,node1,down", *cmd)
    assert r.exit_code == 4, (r.stdout, r.stderr)
    doc = r.json()
    assert {i["node"] for i in doc["items"]} == {"node1"}
    errs = {e["node"]: e["error"] for e in doc["errors"]}
    assert errs["down"]["exitCode"] == 7
    if cmd[1:2] == ["rdt"]:
        # no resctrl on bare is a feature it lacks, not a failure
        assert "bare" not in errs and doc["nodes"]["bare"]["supported"] is False
    else:
        assert errs["bare"]["exitCode"] == 3 and "no cgroup filesystem" in errs["bare"]["message"]
    # node1's part is unchanged by its neighbours' failures
    ok = remote(cli, lab, "node1", *cmd)
    assert by_node(doc["items"])["node1"] == by_node(ok.json()["items"])["node1"]
    if cmd[0] == "audit":
        assert r.json()["passed"] is False  # node1's medium finding is still reported


def test_all_nodes_without_cgroups(cli, iso):
    lab, _, _ = iso
    r = remote(cli, lab, "bare", "inspect", "bvt")  # -N bare: a list, the node's failure in its errors
    assert r.exit_code == 3 and r.json()["kind"] == "BvtReport" and r.json()["errors"][0]["node"] == "bare"
    r = remote(cli, lab, "bare", "inspect", "rdt")
    assert r.exit_code == 0 and r.json()["nodes"]["bare"]["supported"] is False


def test_unreadable_knobs_and_bad_schemata_over_ssh(cli, iso):
    """Read errors are reported per knob / per group exactly as locally, and the exit code matches."""
    lab, root, info = iso
    uid = info["broken"]["online"][0]
    path = f"/kubepods/burstable/pod{uid}"
    r = remote(cli, lab, "broken", "inspect", "cgroup", path)
    want = local(cli, root["broken"], "inspect", "cgroup", path)
    assert r.exit_code == want.exit_code == 0, r.stderr
    e = by_node(r.json()["items"])["broken"][0]
    assert e == meta(want.json())
    bad = {u["file"].rsplit("/", 1)[1]: u["error"] for u in e["cgroups"][0]["unreadable"]}
    assert bad["cpu.shares"] == "Is a directory" and "unexpected content 'high'" in bad["memory.priority"]

    r = remote(cli, lab, "broken,node2", "inspect", "rdt")
    want = local(cli, root["broken"], "inspect", "rdt")
    assert want.exit_code == 1
    assert r.exit_code == want.exit_code, r.stderr
    assert "broken: /sys/fs/resctrl/LS/schemata: line 1 'L3:0=zz'" in r.stderr
    assert by_node(r.json()["items"])["broken"] == want.json()["items"]
    assert remote(cli, lab, "broken", "inspect", "rdt").exit_code == 1

    r = remote(cli, lab, "broken", "audit", "--fail-on", "critical")
    assert r.exit_code == 0
    assert "rdt.unreadable" in {i["check"] for i in r.json()["items"]}
    assert by_node(r.json()["items"])["broken"] == local(cli, root["broken"], "audit").json()["items"]


THREADS = textwrap.dedent("""
    import ctypes, sys, threading, time
    libc = ctypes.CDLL("libc.so.6")
    def vcpu(n):
        libc.prctl(15, n.encode(), 0, 0, 0)  # PR_SET_NAME: the thread's comm
        time.sleep(600)
    for i in range(2):
        threading.Thread(target=vcpu, args=(f"CPU {i}/KVM",), daemon=True).start()
    time.sleep(0.2)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    time.sleep(600)
""")


@pytest.fixture
def vmm_like():
    """A real process with QEMU-named vCPU threads on this machine."""
    p = subprocess.Popen([sys.executable, "-c", THREADS], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _stable(row):
    return {k: v for k, v in row.items() if k != "lastCpu"}  # the CPU it last ran on moves


def test_threads_over_ssh_read_the_nodes_real_proc(cli, iso, vmm_like):
    """'real' has no host root: SFTP reads this machine's /proc (size-0 files) and cgroupfs."""
    lab, _, _ = iso
    r = remote(cli, lab, "real", "inspect", "threads", "--pid", str(vmm_like))
    want = cli(["inspect", "threads", "--pid", str(vmm_like), "-o", "json"])
    assert r.exit_code == want.exit_code == 0, r.stderr
    got = by_node(r.json()["items"])["real"]
    assert [_stable(x) for x in got] == [_stable(x) for x in want.json()["items"]]
    assert [(x["role"], x["vcpu"]) for x in got] == [("main", None), ("vcpu", 0), ("vcpu", 1)]
    assert r.json()["nodes"]["real"] == meta(want.json())

    r = remote(cli, lab, "real", "inspect", "cgroup", "--pid", str(vmm_like))
    want = cli(["inspect", "cgroup", "--pid", str(vmm_like), "-o", "json"])
    assert r.exit_code == want.exit_code == 0, r.stderr
    g, w = by_node(r.json()["items"])["real"][0], meta(want.json())
    assert g["hierarchy"] == w["hierarchy"] and g["mounts"] == w["mounts"]
    for a, b in zip(g["cgroups"], w["cgroups"], strict=True):
        for e in (a, b):  # live counters and member lists change between the two reads
            e.pop("members")
            e["memory"].pop("usage", None)
        assert a == b
