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


# -- overhead on this host's real cgroup2 hierarchy ------------------------------------------------
#: a VMM stand-in: a named vCPU thread (debug-threads=on) and an I/O thread, both at work
_VMM = """import threading, time
def work(name):
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(name)
    while True:
        sum(range(20000))
        time.sleep(0.001)
for name in ("CPU 0/KVM", "IO iothread1"):
    threading.Thread(target=work, args=(name,), daemon=True).start()
time.sleep(600)
"""


def _threads_named(pid: int, names: set[str]) -> dict[str, int]:
    for _ in range(200):
        got = {}
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                got[open(f"/proc/{pid}/task/{t}/comm").read().strip()] = int(t)
            except OSError:
                pass
        if names <= set(got):
            return got
        time.sleep(0.05)
    raise AssertionError(f"threads {names} never appeared in {pid}")


@pytest.fixture
def v2_cgroups():
    """kata_overhead/<id> and the sandbox cgroup under this host's cgroup2 mount."""
    base = "/sys/fs/cgroup/unified"
    if not os.path.exists(f"{base}/cgroup.procs"):
        pytest.skip("no cgroup2 hierarchy at /sys/fs/cgroup/unified")
    name = f"katactl-test-v2vmm-{uuid.uuid4().hex[:8]}"
    dirs = [f"{base}/{name}", f"{base}/{name}/kata_overhead", f"{base}/{name}/kata_overhead/sb1",
            f"{base}/{name}/pod", f"{base}/{name}/pod/kata_sb1"]
    try:
        for d in dirs:
            os.mkdir(d)
    except OSError as e:
        pytest.skip(f"cannot create a cgroup2 group here: {e.strerror}")
    yield base, f"/{name}"
    for d in reversed(dirs):
        try:
            for pid in open(f"{d}/cgroup.procs").read().split():
                with open(f"{base}/cgroup.procs", "w") as f:
                    f.write(pid)
            os.rmdir(d)
        except OSError:
            pass


def test_v2_overhead_counts_the_vmm_the_runtime_moved_out_of_kata_overhead(cli, v2_cgroups):
    """The runtime starts in kata_overhead/<id> (shim and VMM), then writes the vCPU's TID to the
    sandbox cgroup's cgroup.procs, as AddThread does on v2: the kernel moves the whole VMM. The
    measured CPU is kata_overhead's (the shim) plus the VMM's own, its vCPU thread left out:
    before, kata_overhead's usage alone missed the VMM's I/O thread. A VMM still in kata_overhead
    (its vCPUs not moved yet) brings the guest's CPU into the cgroup's usage: taken out."""
    base, top = v2_cgroups
    with open("/proc/self/mountinfo") as f:
        v2_line = next(ln for ln in f if ln.split(" - ")[1].startswith("cgroup2 ") and ln.split()[4] == base)
    ov, sb_cg = f"{top}/kata_overhead/sb1", f"{top}/pod/kata_sb1"
    shim = subprocess.Popen(["python3", "-c", "import time; time.sleep(600)"])
    vmm = subprocess.Popen(["python3", "-c", _VMM])
    try:
        names = _threads_named(vmm.pid, {"CPU 0/KVM", "IO iothread1"})
        for p in (shim.pid, vmm.pid):  # setupResourceController: everything starts in kata_overhead
            with open(f"{base}{ov}/cgroup.procs", "w") as f:
                f.write(str(p))
        with open(f"{base}{sb_cg}/cgroup.procs", "w") as f:  # constrainHypervisor -> AddThread(vcpu)
            f.write(str(names["CPU 0/KVM"]))
        # the kernel moved every thread of the VMM, not only the vCPU
        for tid in os.listdir(f"/proc/{vmm.pid}/task"):
            assert f"0::{sb_cg}\n" in open(f"/proc/{vmm.pid}/task/{tid}/cgroup").read()
        assert open(f"{base}{ov}/cgroup.procs").read().split() == [str(shim.pid)]
        with node() as n:
            # a pure-v2 node: only this host's cgroup2 mount (as its mountinfo prints it), its real /proc
            # per pid
            os.unlink(os.path.join(n.root, "proc"))
            os.makedirs(os.path.join(n.root, "proc/self"))
            for p in (shim.pid, vmm.pid, "stat"):
                os.symlink(f"/proc/{p}", os.path.join(n.root, f"proc/{p}"))
            with open(os.path.join(n.root, "proc/self/mountinfo"), "w") as f:
                f.write("24 1 0:22 / / rw,relatime - ext4 /dev/vda1 rw\n" + v2_line)
            os.makedirs(os.path.join(n.root, "sys/fs/cgroup"))
            os.symlink(base, os.path.join(n.root, base.lstrip("/")))  # a link to itself: this host's view
            p = n.go("v2vmm01", pod_name="batch", pod_namespace="jobs", pid=vmm.pid, sandbox_cgroup_only=False,
                     cgroup_path=sb_cg, overhead_cgroup_path=ov,
                     flavour_kw={"state": ShimState(sandbox_id="v2vmm01", guest_mem_total=256 * MiB,
                                                    guest_mem_free=200 * MiB)})
            layout.write_shim_pid(n.root, p.bundle_node, shim.pid)
            args = ["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.5s",
                    "--runtime-class-overhead", "cpu=100000,memory=64Gi"]
            r = cli(args)
            with open(f"{base}{ov}/cgroup.procs", "w") as f:  # the whole VMM back in kata_overhead
                f.write(str(vmm.pid))
            r2 = cli(args)
    finally:
        for q in (shim, vmm):
            q.kill()
            q.wait()
    assert r.exit_code == 0, r.stdout + r.stderr
    (it,) = r.json()["items"]
    cg = it["cgroup"]
    assert cg["path"] == ov and cg.get("error") is None and cg["cpuMillis"] is not None, it
    by_role = {q["role"]: q for q in it["processes"]}
    assert set(by_role) == {"shim", "vmm"}, it["processes"]
    vmm_cpu = by_role["vmm"]["cpuMillis"]
    assert vmm_cpu is not None and vmm_cpu > 0, it["processes"]  # the I/O thread's work, the vCPU's left out
    assert it["measured"]["sources"]["cpuMillis"] == "cgroup+processes", it["measured"]
    assert it["measured"]["source"] == "cgroup+processes"
    assert abs(it["measured"]["cpuMillis"] - (cg["cpuMillis"] + vmm_cpu)) <= 1, it
    assert any("cgroup v2" in note and f"pid {vmm.pid}" in note for note in it["notes"]), it["notes"]
    (it,) = r2.json()["items"]
    # the cgroup's usage holds the busy vCPU thread's now: the measured CPU is below it
    assert it["cgroup"]["cpuMillis"] > 0 and it["measured"]["cpuMillis"] < it["cgroup"]["cpuMillis"], it
    assert it["measured"]["sources"]["cpuMillis"] == "cgroup+processes", it["measured"]
