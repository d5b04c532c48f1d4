"""inspect on the machine's REAL cgroup filesystem (hybrid here: v1 controllers + v2 at unified).

A dedicated subtree per controller (under this process's own cgroup), real
values written, a real sleeping process moved in and one of its threads moved
into a child cgroup; everything moved back and removed in the finalizer.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from katactl.isolation import cgroups as cg

from tests._cgroupfs import remove_cgroups

V1 = "/sys/fs/cgroup"
CHILD = r"""
import ctypes, os, sys, threading, time
def vcpu():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write("CPU 0/KVM")
    print(threading.get_native_id(), flush=True)
    time.sleep(600)
threading.Thread(target=vcpu, daemon=True).start()
time.sleep(600)
"""


def _own(controller: str) -> str:
    with open("/proc/self/cgroup") as f:
        return cg.parse_proc_cgroup(f.read()).get(controller, "/")


def _writable() -> bool:
    try:
        d = os.path.join(V1, "cpu", f"katactl-probe-{secrets.token_hex(3)}")
        os.mkdir(d)
        os.rmdir(d)
        return True
    except OSError:
        return False


def _w(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


@pytest.fixture(scope="module")
def real_tree():
    if not os.path.isdir(os.path.join(V1, "cpu")) or not _writable():
        pytest.skip("cgroup fs not writable here")
    name = f"katactl-test-{secrets.token_hex(4)}"
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    tid = int(proc.stdout.readline())
    made: list[str] = []
    paths = {}
    try:
        for c in ("cpu", "cpuset", "memory"):
            base = _own(c)
            cgp = cg.norm_cgpath(f"{base}/{name}")
            d = f"{V1}/{c}{'' if cgp == '/' else cgp}"
            os.mkdir(d)
            made.append(d)
            os.mkdir(d + "/kata_vcpu")
            made.append(d + "/kata_vcpu")
            paths[c] = cgp
        cpu_d = f"{V1}/cpu{paths['cpu']}"
        _w(cpu_d + "/cpu.shares", 512)
        _w(cpu_d + "/cpu.cfs_period_us", 100000)
        _w(cpu_d + "/cpu.cfs_quota_us", 50000)
        _w(cpu_d + "/kata_vcpu/cpu.shares", 2)
        cs_d = f"{V1}/cpuset{paths['cpuset']}"
        for sub in ("", "/kata_vcpu"):
            _w(cs_d + sub + "/cpuset.mems", open(f"{V1}/cpuset/cpuset.mems").read().strip())
            _w(cs_d + sub + "/cpuset.cpus", "0")
        mem_d = f"{V1}/memory{paths['memory']}"
        _w(mem_d + "/memory.limit_in_bytes", 256 << 20)
        for c in ("cpu", "cpuset", "memory"):
            _w(f"{V1}/{c}{paths[c]}/cgroup.procs", proc.pid)
        _w(cpu_d + "/kata_vcpu/tasks", tid)  # one thread only (v1 "tasks")
        uni = None
        if os.path.exists(f"{V1}/unified/cgroup.procs"):
            ubase = _own("unified")
            uni = cg.norm_cgpath(f"{ubase}/{name}")
            ud = f"{V1}/unified{'' if uni == '/' else uni}"
            try:
                os.mkdir(ud)
                made.append(ud)
                _w(ud + "/cgroup.procs", proc.pid)
            except OSError:
                uni = None
        yield {"pid": proc.pid, "tid": tid, "paths": paths, "unified": uni, "name": name}
    finally:
        for c in ("cpu", "cpuset", "memory"):  # move everything back to where it came from
            if c in paths:
                for tfile in (f"{V1}/{c}{paths[c]}/kata_vcpu/tasks", f"{V1}/{c}{paths[c]}/tasks"):
                    try:
                        for t in open(tfile).read().split():
                            own = _own(c)
                            _w(f"{V1}/{c}{'' if own == '/' else own}/tasks", t)
                    except OSError:
                        pass
        proc.kill()
        proc.wait()
        remove_cgroups(made, tries=50)


def test_inspect_cgroup_reports_real_values(cli, real_tree):
    p = real_tree["paths"]["cpu"]
    r = cli(["inspect", "cgroup", p, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "CgroupInspection" and d["hierarchy"] == "hybrid"
    (e,) = d["cgroups"]
    assert e["path"] == p
    assert e["cpu"]["shares"] == 512
    assert e["cpu"]["quotaUs"] == 50000 and e["cpu"]["periodUs"] == 100000 and e["cpu"]["limitCpus"] == 0.5
    assert e["cpu"]["weightFromShares"] == {"kubelet": 20, "runc": 59, "agree": False}
    assert real_tree["pid"] in e["members"]["cpu"]["procs"]
    # the vCPU-named thread was moved into the child: not in the parent's tasks any more
    assert real_tree["tid"] not in e["members"]["cpu"]["threads"]
    assert real_tree["pid"] in e["members"]["cpu"]["threads"]
    assert "cpu.bvt_warp_ns" in e["unsupported"]  # no Alinux kernel: reported, not an error
    assert e["files"]["cpu.shares"] == f"/sys/fs/cgroup/cpu{p}/cpu.shares"


def test_inspect_cgroup_by_cgroupfs_dir_and_child(cli, real_tree):
    p = real_tree["paths"]["cpu"]
    r = cli(["inspect", "cgroup", f"/sys/fs/cgroup/cpu{p}/kata_vcpu", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    (e,) = r.json()["cgroups"]
    assert e["path"] == f"{p}/kata_vcpu"
    assert e["cpu"]["shares"] == 2
    assert e["members"]["cpu"]["threads"] == [real_tree["tid"]]
    assert e["members"]["cpu"]["procs"] == [real_tree["pid"]]  # v1 cgroup.procs lists the thread group
    assert e["cpu"]["weightFromShares"]["kubelet"] == 1


def test_inspect_cgroup_by_pid_every_hierarchy(cli, real_tree):
    r = cli(["inspect", "cgroup", "--pid", real_tree["pid"], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    got = {e["path"]: e for e in r.json()["cgroups"]}
    pc = real_tree["paths"]
    assert got[pc["cpu"]]["cpu"]["shares"] == 512
    cs = got[pc["cpuset"]]["cpuset"]
    assert cs["cpus"] == "0" and cs["effectiveCpus"] == "0"
    assert got[pc["memory"]]["memory"]["limit"] == 256 << 20
    assert isinstance(got[pc["memory"]]["memory"]["usage"], int)
    if real_tree["unified"]:
        assert real_tree["pid"] in got[real_tree["unified"]]["members"]["unified"]["procs"]


def test_inspect_threads_real_process(cli, real_tree):
    r = cli(["inspect", "threads", "--pid", real_tree["pid"], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    rows = {t["tid"]: t for t in r.json()["items"]}
    v = rows[real_tree["tid"]]
    assert v["name"] == "CPU 0/KVM" and v["role"] == "vcpu" and v["vcpu"] == 0
    assert v["cgroups"]["cpu"] == real_tree["paths"]["cpu"] + "/kata_vcpu"
    assert v["affinity"] == "0"   # the cpuset we set
    assert v["policy"] == "SCHED_OTHER" and v["nice"] == 0
    assert rows[real_tree["pid"]]["role"] == "main"
    assert rows[real_tree["pid"]]["cgroups"]["cpu"] == real_tree["paths"]["cpu"]


def test_sandbox_on_real_cgroupfs_via_host_root(cli, real_tree, tmp_path):
    """A Go sandbox whose persist.json points at the real test cgroups; /proc and /sys
    of the host root are the real ones."""
    from katactl.lab import layout

    root = tmp_path / "node"
    root.mkdir()
    os.symlink("/proc", root / "proc")
    os.symlink("/sys", root / "sys")
    p = real_tree["paths"]["cpu"]
    sid = layout.sandbox_id_for(7, "real")
    layout.write_go_sandbox(str(root), sid, pid=real_tree["pid"], cgroup_path=f"{p}/kata_vcpu",
                            overhead_cgroup_path=p, pod_name="real-0", pod_namespace="batch")
    r = cli(["--host-root", root, "inspect", "cgroup", sid[:10], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    roles = {e["role"]: e for e in d["cgroups"]}
    assert roles["sandbox"]["cpu"]["shares"] == 2 and roles["overhead"]["cpu"]["shares"] == 512
    assert d["sandbox"]["id"] == sid
    r = cli(["--host-root", root, "inspect", "threads", "batch/real-0", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["vcpuThreads"] == 1 and d["sandbox"]["hypervisor"] == "qemu"
    # audit on the same node: the vCPU thread is inside the sandbox cgroup -> no kata.vcpu-cgroup finding
    r = cli(["--host-root", root, "audit", "-o", "json", "--fail-on", "critical"])
    assert r.exit_code == 0, r.stderr
    assert not [i for i in r.json()["items"] if i["check"] == "kata.vcpu-cgroup"]


@pytest.mark.parametrize("bad,code,needle", [
    ("/etc", 2, "outside the cgroup mounts"),
    ("/sys/fs/cgroup", 2, "outside the cgroup mounts"),
    ("/sys/fs/cgroup/cpu/../../../etc", 2, "outside the cgroup mounts"),
    ("/proc/self", 2, "outside the cgroup mounts"),
    ("/sys/fs/cgroup/cpu/no-such-cgroup-xyz", 3, "no such cgroup"),
    ("/no-such-cgroup-xyz", 3, "exists in no hierarchy"),
    ("kubepods", 3, ""),   # not absolute: taken as a sandbox reference, which does not exist
])
def test_cgroup_paths_outside_or_missing(cli, bad, code, needle):
    r = cli(["inspect", "cgroup", bad])
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") <= 2


def test_real_private_cgroup_namespace_is_unknown_not_a_path(tmp_path):
    """katactl in a cgroup namespace of its own (a node pod without the host's cgroupns):
    the kernel shows other processes' cgroups relative to that namespace's root ("1:cpu:/..",
    "0::/..", cgroup_namespaces(7)). Those are not cgroup paths: a thread's cgroup is then
    unknown (cgroupError), and inspect cgroup --pid fails saying why, never a wrong path."""
    import json
    import shutil

    if not shutil.which("unshare") or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1)")
    if not os.path.isdir(os.path.join(V1, "cpu")) or not _writable():
        pytest.skip("cgroup fs not writable here")
    name = f"katactl-ns-{secrets.token_hex(4)}"
    hier = [h for h in ("cpu", "unified") if os.path.isdir(os.path.join(V1, h))]
    dirs = [os.path.join(V1, h, _own(h).lstrip("/"), name) for h in hier]
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        int(proc.stdout.readline())
        for d in dirs:
            os.mkdir(d)
        joins = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in dirs)

        def run(*args):
            return subprocess.run(["sh", "-c", f'{joins}; exec unshare -C "$0" -m katactl "$@"', sys.executable,
                                   *args], capture_output=True, text=True, timeout=120)
        r = run("inspect", "threads", "--pid", str(proc.pid), "-o", "json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)["items"]
        assert rows and all(t["cgroups"] == {} and "cgroup namespace" in t["cgroupError"] for t in rows), rows
        r = run("inspect", "cgroup", "--pid", str(proc.pid))
        assert r.returncode == 1 and "relative to katactl's own cgroup namespace" in r.stderr, r.stderr
    finally:
        proc.kill()
        proc.wait()
        for d in dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
