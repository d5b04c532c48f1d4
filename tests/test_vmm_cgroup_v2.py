"""Where Kata's VMM runs on cgroup v2 with sandbox_cgroup_only = false (review 13 interf finding 1).

Kata's Go runtime moves each vCPU thread with ``LinuxCgroup.AddThread``, which on v2 is
``cgroupsv2.Manager.AddProc``: a write of the TID to ``cgroup.procs`` (kata-containers
``src/runtime/pkg/resourcecontrol/cgroups.go``; called for every vCPU by ``constrainHypervisor``
in ``src/runtime/virtcontainers/sandbox.go``). The kernel then migrates the whole thread group, so
the VMM (main loop, I/O threads, vCPUs) leaves ``kata_overhead/<id>`` for the sandbox cgroup;
only the shim and virtiofsd stay behind. On v1 ``AddTask`` writes ``tasks``: one thread moves.

The overhead test does exactly that on this host's real cgroup2 hierarchy."""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from katactl.lab import layout
from katactl.lab.shimserver import ShimState
from tests import fixtures_isolation as fx
from tests._katanode import node

MiB = 1 << 20


def _vmm_threads(root: str, pid: int) -> dict[int, str]:
    out = {}
    for tid in os.listdir(os.path.join(root, f"proc/{pid}/task")):
        with open(os.path.join(root, f"proc/{pid}/task/{tid}/cgroup")) as f:
            out[int(tid)] = f.read()
    return out


# -- the fixtures show only what the kernel can show --------------------------------------------
def test_v2_fixture_keeps_each_process_in_one_cgroup(tmp_path):
    """A v2 domain cgroup holds whole processes: the fixture puts every thread of the VMM in the
    sandbox cgroup (where AddThread's cgroup.procs write took it), none in kata_overhead, and
    refuses to write a process split across two cgroups."""
    root = str(tmp_path)
    built = fx.build_node(root, mode="v2", online_pods=0, sandboxes=1, resctrl=False)
    (sid,) = built["vcpu_tids"]
    sb_cg = f"/kubepods/besteffort/pod{fx.pod_uid(0, 'offline')}/kata_{sid}"
    assert set(_vmm_threads(root, 200000).values()) == {f"0::{sb_cg}\n"}
    with open(os.path.join(root, f"sys/fs/cgroup{sb_cg}/cgroup.procs")) as f:
        assert f.read().split() == ["200000"]
    with open(os.path.join(root, f"sys/fs/cgroup/kata_overhead/{sid}/cgroup.threads")) as f:
        assert f.read().split() == []
    # constrainHypervisor never ran: the whole VMM is still in kata_overhead
    fx.build_node(str(tmp_path / "n2"), mode="v2", online_pods=0, sandboxes=1, resctrl=False, vcpu_outside=True)
    assert set(_vmm_threads(str(tmp_path / "n2"), 200000).values()) == {f"0::/kata_overhead/{sid}\n"}
    # v1 keeps its per-thread placement (AddTask writes tasks)
    fx.build_node(str(tmp_path / "n1"), online_pods=0, sandboxes=1, resctrl=False)
    placed = _vmm_threads(str(tmp_path / "n1"), 200000)
    assert f"kata_{sid}" in placed[200001] and f"/kata_overhead/{sid}" in placed[200050]
    with pytest.raises(ValueError, match="whole processes"):
        fx.write_threads(str(tmp_path / "n3"), 7, [(7, "qemu", {"unified": "/a"}), (8, "CPU 0/KVM", {"unified": "/b"})],
                         mode="v2")


# -- threads: the sandbox cgroup names no vCPU on v2 ---------------------------------------------
def test_v2_sandbox_cgroup_names_no_vcpu(cli, tmp_path):
    """An unnamed QEMU (no debug-threads=on), no extra monitor, v2: every thread is in the sandbox
    cgroup, so being there says nothing; the I/O thread is never called a vCPU, the vCPUs are
    unknown and the note says why."""
    root = str(tmp_path)
    built = fx.build_node(root, mode="v2", online_pods=1, sandboxes=1, resctrl=False, named_vcpus=False)
    (sid,) = built["vcpu_tids"]
    r = cli(["--host-root", root, "inspect", "threads", sid[:12], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert [t["role"] for t in d["items"] if t["role"] == "vcpu"] == [], d["items"]
    assert d["vcpusBy"] is None and d["vcpuThreads"] is None
    assert "cgroup v2" in d["vcpuNote"] and "cgroup.procs" in d["vcpuNote"], d["vcpuNote"]
    # v1: the runtime moved exactly the vCPU threads (tasks), so those are the vCPUs
    root1 = str(tmp_path / "v1")
    built = fx.build_node(root1, online_pods=1, sandboxes=1, resctrl=False, named_vcpus=False)
    r = cli(["--host-root", root1, "inspect", "threads", sid[:12], "-o", "json"])
    d = r.json()
    assert d["vcpusBy"] == "cgroup" and [t["tid"] for t in d["items"] if t["role"] == "vcpu"] == built["vcpu_tids"][sid]


def test_v2_audit_says_where_the_vmm_runs(cli, tmp_path):
    """kata.sandbox-cgroup-only on v2: the VMM (I/O threads too) is in the sandbox cgroup, so what
    escapes the pod's limits in kata_overhead is the shim and virtiofsd, not the VMM's threads."""
    root = str(tmp_path)
    fx.build_node(root, mode="v2", online_pods=1, sandboxes=1, resctrl=False)
    r = cli(["--host-root", root, "audit", "-o", "json"])
    (f,) = [i for i in r.json()["items"] if i["check"] == "kata.sandbox-cgroup-only"]
    assert "shim" in f["message"] and "virtiofsd" in f["message"] and "cgroup v2" in f["message"], f
    assert "non-vCPU threads" not in f["message"] and "the whole VMM" in f["message"], f
    root1 = str(tmp_path / "v1")
    fx.build_node(root1, online_pods=1, sandboxes=1, resctrl=False)
    r = cli(["--host-root", root1, "audit", "-o", "json"])
    (f,) = [i for i in r.json()["items"] if i["check"] == "kata.sandbox-cgroup-only"]
    assert "the VMM's non-vCPU threads (I/O" in f["message"], f
