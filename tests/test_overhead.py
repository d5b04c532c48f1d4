"""katactl overhead (issue 15): declared Pod overhead vs measured, on node trees with real
processes, the machine's real cgroup v1 filesystem, the Kubernetes stand-in, the QEMU lab and sshd."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid

import pytest

from katactl import overhead as lib
from katactl.errors import UsageError
from katactl.lab.shimserver import ShimState
from tests._katanode import node

MiB = 1 << 20


#: a VMM stand-in: python holding some memory; named_vcpu: one idle thread named as QEMU names
#: its vCPU threads with debug-threads=on ("CPU 0/KVM"), else none (Kata's default QEMU)
_VMM = """import threading, time
def vcpu():
    if NAMED:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write("CPU 0/KVM")
    while SPIN:  # a busy guest
        pass
    time.sleep(600)
threading.Thread(target=vcpu, daemon=True).start()
b = bytearray(24 << 20)
time.sleep(600)
"""


def _proc(named_vcpu: bool = True, spin: bool = False):
    """A real process standing in for a VMM."""
    p = subprocess.Popen(["python3", "-c", f"NAMED = {named_vcpu}\nSPIN = {spin}\n" + _VMM])
    for _ in range(200):  # its vCPU thread named, its memory held: a loaded machine starts python slowly
        tids = [t for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid]
        with open(f"/proc/{p.pid}/status") as f:
            rss = [int(x.split()[1]) for x in f if x.startswith("VmRSS:")]
        if tids and rss and rss[0] >= 24 << 10 and (
                not named_vcpu or open(f"/proc/{p.pid}/task/{tids[0]}/comm").read().strip() == "CPU 0/KVM"):
            break
        time.sleep(0.05)
    return p


@pytest.fixture
def tree():
    procs = [_proc(), _proc()]
    with node() as n:
        n.go("ovh01", pod_name="web", pod_namespace="prod", pod_uid="uid-web", pid=procs[0].pid,
             flavour_kw={"state": ShimState(sandbox_id="ovh01", guest_mem_total=2048 * MiB,
                                            guest_mem_free=2040 * MiB)})
        n.go("ovh02", pod_name="batch", pod_namespace="jobs", pod_uid="uid-batch", pid=procs[1].pid,
             flavour_kw={"state": ShimState(sandbox_id="ovh02")})
        n.procs = procs
        yield n
    for p in procs:
        p.kill()
        p.wait()


# -- bad input, as a corpus -------------------------------------------------------------
@pytest.mark.parametrize("value", ["", "cpu", "cpu=", "cpu=abc", "mem=1Gi", "cpu=1,cpu=2", "cpu=-1",
                                   "cpu=250m;memory=1Gi", "memory=1.5.5Gi", "cpu=1e999", "memory=12XB",
                                   "cpu=250m,,memory=1Gi", "cpu=\n1", "memory=1Gi\n",
                                   # past decimal's Emax: decimal.Overflow, not ValueError
                                   "cpu=1e99999999", "memory=1e99999999", "memory=0e99999999"])
def test_bad_runtime_class_overhead(cli, value):
    r = cli(["overhead", "--runtime-class-overhead", value])
    assert r.exit_code == 2, (value, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--margin", "x"], ["--margin", "-5%"], ["--margin", "2000%"], ["--margin", ""],
                                  ["--margin", "10%%"], ["--interval", "0"], ["--interval", "abc"],
                                  ["--interval", "50ms"], ["--interval", "1h"], ["--interval", "-1s"],
                                  ["--fail-on", "bad"], ["--fail-on", ""], ["--fail-on", "HIGH"],
                                  ["../etc"], ["a/b/c/d"], ["-o", "prom"]])
def test_bad_args_exit_2_one_line(cli, tmp_path, args):
    r = cli(["--host-root", str(tmp_path), "overhead", *args])
    assert r.exit_code == 2, (args, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_quantities():
    assert lib.cpu_millis("250m") == 250 and lib.cpu_millis("0.5") == 500 and lib.cpu_millis("2") == 2000
    assert lib.cpu_millis("1u") == 1  # rounded up, as the scheduler does
    assert lib.memory_bytes("160Mi") == 160 * MiB and lib.memory_bytes("1G") == 10 ** 9
    assert lib.memory_bytes("1e3") == 1000 and lib.memory_bytes("128974848") == 128974848
    assert lib.parse_declared("cpu=250m,memory=160Mi") == {"cpuMillis": 250, "memoryBytes": 160 * MiB}
    assert lib.parse_declared(" memory = 1Gi ") == {"cpuMillis": None, "memoryBytes": 1 << 30}
    assert lib.parse_margin("10%") == pytest.approx(0.1) and lib.parse_margin("25") == pytest.approx(0.25)
    with pytest.raises(UsageError):
        lib.parse_quantity(True)
    for huge in ("1e99999999", "1E999999999999"):  # an API spec.overhead too: Declared.lookup catches UsageError
        with pytest.raises(UsageError):
            lib.cpu_millis(huge)
    assert lib.memory_bytes("1e-99999999") == 0  # underflows (not trapped): nothing


def test_percentiles_and_suggestion():
    assert lib.percentile([], 95) is None
    assert lib.percentile([1, 2, 3, 4], 50) == 2 and lib.percentile(list(range(1, 101)), 95) == 95
    items = [{"runtimeClass": "kata", "declared": {"cpuMillis": 250, "memoryBytes": 160 * MiB, "source": "pod"},
              "measured": {"cpuMillis": c, "memoryBytes": m * MiB}} for c, m in ((100, 100), (300, 200), (200, 150))]
    (s,) = lib.suggestions(items, 0.10)
    assert s["memory"]["p95"] == 200 * MiB and s["memory"]["max"] == 200 * MiB and s["cpu"]["p50"] == 200
    assert s["suggestedPodFixed"]["memory"] == "220Mi" and s["suggestedPodFixed"]["cpu"] == "330m"
    summ = lib.node_summary([{**it, "severity": None} for it in items])
    assert summ["underReserved"] == {"cpuMillis": 50, "memoryBytes": 40 * MiB}


def test_severity_ladder():
    assert [lib.severity_for(r) for r in (0.5, 1.0, 1.1, 1.3, 1.6, 2.5, None)] == \
        [None, None, "low", "medium", "high", "critical", None]


# -- on a node tree: real processes, live shim servers ---------------------------------------
def test_json_shape_and_exit_8(cli, tree):
    r = cli(["--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.3s",
             "--runtime-class-overhead", "cpu=1m,memory=1Ki"])
    assert r.exit_code == 8, r.stderr
    d = r.json()
    assert d["kind"] == "OverheadReport" and d["failed"] is True
    items = {i["id"]: i for i in d["items"]}
    assert set(items) == {"ovh01", "ovh02"}
    w = items["ovh01"]
    assert w["declared"] == {"cpuMillis": 1, "memoryBytes": 1024, "source": "flag"}
    assert isinstance(w["measured"]["memoryBytes"], int) and w["measured"]["memoryBytes"] > 0
    assert isinstance(w["measured"]["cpuMillis"], int)
    assert w["ratio"]["memory"] > 2 and w["severity"] == "critical"
    vmm = [p for p in w["processes"] if p["role"] == "vmm"][0]
    assert vmm["pid"] == tree.procs[0].pid and vmm["rssBytes"] > 20 * MiB
    # the guest uses 8 MiB (2048 - 2040): the VMM's own memory is its RSS without them
    assert vmm["ownBytes"] == vmm["rssBytes"] - vmm["shmemBytes"] - 8 * MiB
    assert w["guestMemoryBytes"] == 2048 * MiB and w["guestMemoryUsedBytes"] == 8 * MiB
    assert w["podRef"] == "prod/web"
    assert d["nodes"][0]["underReserved"]["memoryBytes"] > 0
    assert d["suggestions"][0]["suggestedPodFixed"]["memory"].endswith("Mi")


def test_within_declared_exit_0_and_plain_table(cli, tree):
    r = cli(["--host-root", tree.root, "overhead", "--interval", "0.2s",
             "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["POD", "RUNTIMECLASS", "DECL-CPU"]
    assert any(line.startswith("prod/web") for line in lines)
    assert "suggest RuntimeClass" in r.stderr and "0 over their declared overhead" in r.stderr


def test_fail_on_threshold(cli, tree):
    args = ["--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
            "--runtime-class-overhead", "cpu=64,memory=1Ki"]
    assert cli([*args, "--fail-on", "critical"]).exit_code == 8
    # memory way over, but only info and above fail with... every severity counts at 'info'
    r = cli([*args[:-1], "memory=64Gi", "--fail-on", "low"])
    assert r.exit_code == 0, r.stderr


def test_unknown_declared_is_info(cli, tree):
    r = cli(["--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s"])
    assert r.exit_code == 0, r.stderr
    it = r.json()["items"][0]
    assert it["declared"] == {"cpuMillis": None, "memoryBytes": None, "source": None}
    assert it["severity"] == "info" and it["ratio"]["max"] is None
    assert cli(["--host-root", tree.root, "overhead", "--interval", "0.2s", "--fail-on", "info"]).exit_code == 8


def test_config_file_declares(cli, tree, tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('runtime_class_overhead = "cpu=250m,memory=160Mi"\n')
    monkeypatch.setenv("KATACTL_CONFIG", str(cfg))
    r = cli(["--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s", "--fail-on", "critical"])
    assert r.json()["items"][0]["declared"]["source"] == "config"


def test_sandbox_filter_and_not_found(cli, tree):
    r = cli(["--host-root", tree.root, "overhead", "jobs/batch", "-o", "json", "--interval", "0.2s"])
    assert r.exit_code == 0, r.stderr
    assert [i["id"] for i in r.json()["items"]] == ["ovh02"]
    r = cli(["--host-root", tree.root, "overhead", "ovh01", "-o", "yaml", "--interval", "0.2s"])
    assert r.exit_code == 0 and "ovh01" in r.stdout and "ovh02" not in r.stdout
    r = cli(["--host-root", tree.root, "overhead", "nomatch", "--interval", "0.2s"])
    assert r.exit_code == 3 and len(r.stderr.strip().splitlines()) <= 2


def test_ambiguous_prefix_is_exit_3(cli, tree):
    """SANDBOX is a unique id prefix, as for metrics: 'ovh0' names ovh01 and ovh02."""
    r = cli(["--host-root", tree.root, "overhead", "ovh0", "--interval", "0.2s"])
    m = cli(["--host-root", tree.root, "metrics", "ovh0"])
    assert r.exit_code == m.exit_code == 3, (r.stdout, r.stderr)
    assert "ambiguous" in r.stderr and "ovh01" in r.stderr and "ovh02" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2
    r = cli(["--host-root", tree.root, "overhead", "ovh02", "-o", "json", "--interval", "0.2s"])
    assert r.exit_code == 0 and [i["id"] for i in r.json()["items"]] == ["ovh02"]


@pytest.mark.parametrize("fmt", ["wide", "markdown", "name", "jsonl"])
def test_every_output_format(cli, tree, fmt):
    r = cli(["--host-root", tree.root, "overhead", "-o", fmt, "--interval", "0.2s",
             "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    assert r.exit_code == 0, r.stderr
    assert "prod/web" in r.stdout


def test_vmm_exiting_while_measured_is_not_measured(cli, tree, monkeypatch):
    """The VMM exits between the two samples: its sandbox is being torn down (docs/overhead.md
    "Nothing measured"), so its first sample is no measurement of a running pod: measured
    null, severity info, out of the node sums and the suggestions (pods end all the time on a
    batch node: a gate must not judge them on half a sample)."""
    victim = tree.procs[1]
    real_sleep = time.sleep

    def sleep_and_kill(s):
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        real_sleep(s)

    monkeypatch.setattr(lib.time, "sleep", sleep_and_kill)
    r = cli(["--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
             "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    items = {i["id"]: i for i in d["items"]}
    it, live = items["ovh02"], items["ovh01"]
    assert any("vmm pid" in n and "exited while measured" in n for n in it["notes"]), it["notes"]
    assert [q["role"] for q in it["processes"] if q.get("gone")] == ["vmm"]
    assert it["measured"] is None and it["severity"] == "info" and it["message"].startswith("not measured")
    assert live["measured"] is not None and live["severity"] is None
    (nd,) = d["nodes"]
    assert nd["notMeasured"] == 1 and nd["measured"]["memoryBytes"] == live["measured"]["memoryBytes"]
    (s,) = d["suggestions"]
    assert s["memory"]["samples"] == 1


@pytest.mark.parametrize("mem_total_mib,balloon_mib", [(2048, 512), (1990, 48)])
def test_balloon_pages_are_not_guest_memory(cli, mem_total_mib, balloon_mib):
    """Kata's QEMU balloon is always deflate-on-oom=on (kata-containers
    src/runtime/virtcontainers/qemu.go: BalloonDev DeflateOnOOM true): its pages stay in the
    guest's MemTotal, are not MemFree, and are not resident in the VMM. The guest uses 60 MiB:
    60 MiB comes out of the VMM's RSS (as top and balloon get count it), not 60 MiB plus the
    balloon. Also when MemTotal is below the VM's memory (kernel image, struct pages: 1990 of
    2048 MiB) and the balloon is smaller than that gap."""
    p = subprocess.Popen(["python3", "-c", "b = bytearray(100 << 20)\nimport time; time.sleep(600)"])
    free = (mem_total_mib - 60 - balloon_mib) * MiB
    try:
        time.sleep(0.5)
        with node() as n:
            n.go("bal01", pod_name="web", pod_namespace="prod", pid=p.pid, memory_mib=2048,
                 flavour_kw={"state": ShimState(sandbox_id="bal01", guest_mem_total=mem_total_mib * MiB,
                                                guest_mem_free=free, guest_mem_available=free,
                                                balloon_inflate=(balloon_mib * MiB) // 4096)})
            r = cli(["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--runtime-class-overhead", "cpu=64,memory=64Gi"])
            t = cli(["--host-root", n.root, "top", "-o", "json", "--interval", "0.2s"])
    finally:
        p.kill()
        p.wait()
    assert r.exit_code == 0 and t.exit_code == 0, (r.stdout, t.stdout)
    (it,) = r.json()["items"]
    assert it["hypervisor"] == "qemu" and it["guestMemoryUsedBytes"] == 60 * MiB
    vmm = [q for q in it["processes"] if q["role"] == "vmm"][0]
    assert vmm["rssBytes"] > 100 * MiB and vmm["ownBytes"] == vmm["rssBytes"] - vmm["shmemBytes"] - 60 * MiB
    (row,) = t.json()["items"]
    assert row["guestMemUsed"] == 60 * MiB and row["balloonBytes"] == balloon_mib * MiB


def _status_with(root: str, pid: int, line: bytes) -> None:
    """The node's /proc (under ``root``) as this machine's, but ``pid``'s status with ``line``
    written where the kernel writes it (HugetlbPages after VmSwap: linux fs/proc/task_mmu.c
    task_mem). For what this machine cannot have: it has no hugepage pool, and a test must not
    reserve one on a shared machine."""
    proc = os.path.join(root, "proc")
    os.unlink(proc)
    os.makedirs(os.path.join(proc, str(pid)))
    for e in os.listdir("/proc"):
        if e != str(pid):
            os.symlink(f"/proc/{e}", os.path.join(proc, e))
    for e in os.listdir(f"/proc/{pid}"):
        if e != "status":
            os.symlink(f"/proc/{pid}/{e}", os.path.join(proc, str(pid), e))
    key = line.split(b":")[0]
    status = b"".join(ln for ln in open(f"/proc/{pid}/status", "rb").read().splitlines(True)
                      if not ln.startswith(key + b":"))
    with open(os.path.join(proc, str(pid), "status"), "wb") as f:
        for ln in status.splitlines(True):
            f.write(ln)
            if ln.startswith(b"VmSwap:"):
                f.write(line + b"\n")


def test_hugepage_backed_guest_is_not_taken_out_of_the_vmm(cli):
    """enable_hugepages: Kata backs the guest's RAM with memory-backend-file mem-path=/dev/hugepages
    (kata-containers src/runtime/pkg/govmm/qemu/qemu.go appendMemoryKnobs), preallocated. Those
    pages are HugetlbPages, not in VmRSS: the guest's 200 MiB in use are not resident in the
    VMM's RSS, so nothing of it comes out of the VMM's own memory (24 MiB of a python stand-in,
    not 0)."""
    vmm = _proc()
    try:
        with node() as n:
            n.go("hp01", pod_name="web", pod_namespace="prod", pid=vmm.pid, memory_mib=2048,
                 flavour_kw={"state": ShimState(sandbox_id="hp01", guest_mem_total=2048 * MiB,
                                                guest_mem_free=(2048 - 200) * MiB,
                                                guest_mem_available=(2048 - 200) * MiB)})
            _status_with(n.root, vmm.pid, b"HugetlbPages:\t 2097152 kB")
            r = cli(["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    finally:
        vmm.kill()
        vmm.wait()
    assert r.exit_code == 0, r.stdout
    (it,) = r.json()["items"]
    assert it["guestMemoryUsedBytes"] == 200 * MiB
    (q,) = [q for q in it["processes"] if q["role"] == "vmm"]
    assert q["hugetlbBytes"] == 2048 * MiB and q["rssBytes"] > 24 * MiB
    assert q["ownBytes"] == q["rssBytes"] - q["shmemBytes"] > 24 * MiB


_TOUCH = """import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
os.ftruncate(fd, 64 << 20)
m = mmap.mmap(fd, 64 << 20, mmap.MAP_SHARED)
for off in range(0, int(sys.argv[2]) << 20, 4096):
    m[off] = 1
print("ready", flush=True)
time.sleep(600)
"""


def test_shared_guest_backing_is_nobodys_overhead(cli):
    """virtio-fs: the guest's RAM is shared memory (/dev/shm), mapped by the VMM and by virtiofsd
    (vhost-user), and resident in both where touched. The VMM touched all 64 MiB (the guest uses
    them), virtiofsd 48 MiB (I/O buffers): neither is overhead, in any member."""
    shm = f"/dev/shm/katactl-test-{uuid.uuid4().hex[:8]}"
    vmm = subprocess.Popen(["python3", "-c", _TOUCH, shm, "64"], stdout=subprocess.PIPE, text=True)
    vfs = None
    try:
        assert vmm.stdout.readline() == "ready\n"
        vfs = subprocess.Popen(["python3", "-c", _TOUCH, shm, "48"], stdout=subprocess.PIPE, text=True)
        assert vfs.stdout.readline() == "ready\n"
        with node() as n:
            p = n.go("vfs01", pod_name="io", pod_namespace="prod", pid=vmm.pid,
                     flavour_kw={"state": ShimState(sandbox_id="vfs01", guest_mem_total=2048 * MiB,
                                                    guest_mem_free=(2048 - 64) * MiB)})
            st = os.path.join(n.root, p.state_file_node.lstrip("/"))
            with open(st) as f:
                d = json.load(f)
            d["HypervisorState"]["VirtiofsDaemonPid"] = vfs.pid
            with open(st, "w") as f:
                json.dump(d, f)
            r = cli(["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    finally:
        for q in (vmm, vfs):
            if q is not None:
                q.kill()
                q.wait()
        os.unlink(shm)
    assert r.exit_code == 0, r.stdout
    (it,) = r.json()["items"]
    procs = {q["role"]: q for q in it["processes"]}
    assert procs["virtiofsd"]["pid"] == vfs.pid and procs["virtiofsd"]["shmemBytes"] >= 48 * MiB
    assert procs["vmm"]["shmemBytes"] >= 64 * MiB
    for role in ("vmm", "virtiofsd"):  # a python interpreter's own memory, not the guest's
        assert procs[role]["ownBytes"] < 32 * MiB, procs[role]


def test_zombie_vmm_is_not_running(cli):
    """A VMM that has exited but is not reaped yet (state Z, its parent has not waited) is gone,
    not a live process with no memory and no CPU."""
    z = subprocess.Popen(["true"])
    try:
        for _ in range(100):  # exited, never waited for: a zombie
            if open(f"/proc/{z.pid}/stat").read().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.05)
        with node() as n:
            n.go("zom01", pod_name="web", pod_namespace="prod", pid=z.pid,
                 flavour_kw={"state": ShimState(sandbox_id="zom01")})
            r = cli(["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--runtime-class-overhead", "cpu=250m,memory=160Mi"])
    finally:
        z.wait()
    assert r.exit_code == 0, r.stdout
    (it,) = r.json()["items"]
    vmm = [q for q in it["processes"] if q["role"] == "vmm"][0]
    assert vmm["pid"] == z.pid and vmm.get("gone") is True and vmm["rssBytes"] is None
    assert any(f"vmm pid {z.pid} is not running" in note for note in it["notes"]), it["notes"]
    assert it["measured"] is None and it["vcpusUnknown"] is None


def test_sandbox_without_its_vmm_is_not_measured(cli):
    """The VMM has exited (a zombie here, not yet reaped) while the shim still answers: the
    sandbox is being torn down, and the shim alone is no sample of a running pod's overhead.
    measured is null (info, not "within the declared overhead"), out of the suggestion and the
    node sums (notMeasured)."""
    ok = _proc()
    z = subprocess.Popen(["true"])
    try:
        for _ in range(100):
            if open(f"/proc/{z.pid}/stat").read().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.05)
        with node() as n:
            n.go("ok01", pod_name="ok", pod_namespace="prod", pid=ok.pid,
                 flavour_kw={"state": ShimState(sandbox_id="ok01", guest_mem_total=2048 * MiB,
                                                guest_mem_free=2040 * MiB)})
            n.go("zom01", pod_name="gone", pod_namespace="prod", pid=z.pid,
                 flavour_kw={"state": ShimState(sandbox_id="zom01")})
            r = cli(["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    finally:
        z.wait()
        ok.kill()
        ok.wait()
    assert r.exit_code == 0, r.stdout
    d = r.json()
    items = {i["id"]: i for i in d["items"]}
    gone, live = items["zom01"], items["ok01"]
    assert [q["role"] for q in gone["processes"] if q.get("gone")] == ["vmm"]
    assert any(q["role"] == "shim" and not q.get("gone") for q in gone["processes"]), gone["processes"]
    assert gone["measured"] is None and gone["ratio"]["max"] is None
    assert gone["severity"] == "info" and gone["message"].startswith("not measured"), gone
    (s,) = d["suggestions"]
    assert s["memory"]["samples"] == 1 and s["memory"]["p50"] == live["measured"]["memoryBytes"]
    (nd,) = d["nodes"]
    assert nd["pods"] == 2 and nd["notMeasured"] == 1


def test_nothing_measured_is_null_not_zero(cli):
    """A sandbox still listed as running whose VMM has exited (a zombie) and whose shim does not
    answer: nothing of it was measured. measured is null (not 0 B "within the declared
    overhead"), and it is no sample of the suggestion nor part of the node's sums."""
    ok = _proc()
    z = subprocess.Popen(["true"])
    try:
        for _ in range(100):
            if open(f"/proc/{z.pid}/stat").read().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.05)
        with node() as n:
            n.go("ok01", pod_name="ok", pod_namespace="prod", pid=ok.pid)
            p = n.go("gone01", pod_name="gone", pod_namespace="prod", pid=z.pid, serve=False)
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(p.shim_socket)
                s.listen(5)  # accepts (listed as running), never answers
                r = cli(["--host-root", n.root, "--request-timeout", "1s", "overhead", "-o", "json",
                         "--interval", "0.2s", "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    finally:
        z.wait()
        ok.kill()
        ok.wait()
    assert r.exit_code == 0, r.stdout
    d = r.json()
    items = {i["id"]: i for i in d["items"]}
    gone, live = items["gone01"], items["ok01"]
    assert gone["measured"] is None and gone["ratio"]["max"] is None
    assert gone["severity"] == "info" and gone["message"].startswith("not measured"), gone
    assert live["measured"]["memoryBytes"] > 0
    (s,) = d["suggestions"]
    assert s["pods"] == 1 and s["memory"]["samples"] == 1 and s["memory"]["p50"] == live["measured"]["memoryBytes"]
    (nd,) = d["nodes"]
    assert nd["pods"] == 2 and nd["notMeasured"] == 1 and nd["declared"]["memoryBytes"] == 64 << 30


def test_unnamed_vcpus_never_count_the_guest_as_overhead(cli):
    """A QEMU-like VMM whose vCPU thread is unnamed (no debug-threads=on, Kata's default), no QMP
    monitor, sandbox_cgroup_only = true: which threads run the guest is unknown, so the CPU is not
    measured (null, a note, '?vcpu' in the table), and no CPU ratio makes it over-declared."""
    p = _proc(named_vcpu=False)
    try:
        with node() as n:
            n.go("unn01", pod_name="batch", pod_namespace="jobs", pid=p.pid, sandbox_cgroup_only=True,
                 flavour_kw={"state": ShimState(sandbox_id="unn01", guest_mem_total=2048 * MiB,
                                                guest_mem_free=2040 * MiB)})
            args = ["--host-root", n.root, "overhead", "--interval", "0.2s", "--runtime-class-overhead",
                    "cpu=1m,memory=64Gi"]
            r = cli([*args, "-o", "json"])
            t = cli(args)
    finally:
        p.kill()
        p.wait()
    assert r.exit_code == 0, r.stdout
    (it,) = r.json()["items"]
    assert it["measured"]["cpuMillis"] is None and it["ratio"]["cpu"] is None and it["severity"] is None
    assert "debug-threads" in it["vcpusUnknown"] and "sandbox_cgroup_only = true" in it["vcpusUnknown"]
    assert any(n.startswith("CPU not measured") for n in it["notes"]) and "CPU not measured" in it["message"]
    vmm = [q for q in it["processes"] if q["role"] == "vmm"][0]
    assert vmm["cpuMillis"] is None and vmm["rssBytes"] > 20 * MiB
    assert t.exit_code == 0 and "?vcpu" in t.stdout.splitlines()[1].split(), t.stdout


def test_unnamed_vcpus_from_the_sandbox_cgroup(cli):
    """sandbox_cgroup_only = false: the runtime moves exactly the vCPU threads into the sandbox
    cgroup (the rest stays in kata_overhead). A busy unnamed vCPU thread moved into a real cgroup
    v1 'cpu' group is the guest's CPU, not the VMM's: subtracted, never 'critical'."""
    name = f"katactl-test-vcpu-{uuid.uuid4().hex[:8]}"
    d = f"/sys/fs/cgroup/cpu/{name}"
    try:
        os.makedirs(d)
    except OSError as e:
        pytest.skip(f"cannot create a cgroup here: {e.strerror}")
    p = _proc(named_vcpu=False, spin=True)
    try:
        (tid,) = [int(t) for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid]
        with open(f"{d}/tasks", "w") as f:
            f.write(str(tid))
        with node() as n:
            n.go("cgv01", pod_name="batch", pod_namespace="jobs", pid=p.pid, sandbox_cgroup_only=False,
                 cgroup_path=f"/{name}", flavour_kw={"state": ShimState(sandbox_id="cgv01")})
            r = cli(["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.5s",
                     "--runtime-class-overhead", "cpu=250m,memory=64Gi"])
    finally:
        p.kill()
        p.wait()
        os.rmdir(d)
    assert r.exit_code == 0, r.stdout
    (it,) = r.json()["items"]
    assert it["vcpusUnknown"] is None and it["measured"]["source"] == "processes"
    # the spinning thread alone runs ~1000m; the VMM's own (python asleep) is far below 250m
    assert it["measured"]["cpuMillis"] < 250 and it["severity"] is None, it


def test_shim_garbage_metrics_is_a_note(cli, tree):
    srv = tree.server("ovh01")
    old = srv.metrics_text
    srv.metrics_text = lambda: "this is {not prometheus\n"
    try:
        r = cli(["--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
                 "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    finally:
        srv.metrics_text = old
    assert r.exit_code == 0, r.stderr
    it = {i["id"]: i for i in r.json()["items"]}["ovh01"]
    assert any("VMM's private memory counts whole" in n for n in it["notes"])
    assert it["guestMemoryUsedBytes"] is None and it["guestMemoryBytes"] == 2048 * MiB  # from persist.json


def test_empty_node(cli, tmp_path):
    r = cli(["--host-root", str(tmp_path), "overhead", "-o", "json", "--interval", "0.1s"])
    assert r.exit_code == 0 and r.json()["items"] == []


# -- the real cgroup filesystem: kata_overhead/<id> ----------------------------------------------
@pytest.fixture
def overhead_cgroup():
    base = "/sys/fs/cgroup/memory"
    name = f"katactl-test-ovh-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(f"{base}/{name}/sb1")
        os.makedirs(f"/sys/fs/cgroup/cpuacct/{name}/sb1")
    except OSError as e:
        pytest.skip(f"cannot create a cgroup here: {e.strerror}")
    yield f"/{name}/sb1"
    for c in ("memory", "cpuacct"):
        for d in (f"/sys/fs/cgroup/{c}/{name}/sb1", f"/sys/fs/cgroup/{c}/{name}"):
            try:
                for pid in open(f"{d}/cgroup.procs").read().split():
                    with open(f"/sys/fs/cgroup/{c}/cgroup.procs", "w") as f:
                        f.write(pid)
                os.rmdir(d)
            except OSError:
                pass


def test_kata_overhead_cgroup_gives_the_cpu_not_the_memory(cli, overhead_cgroup):
    """memcg charges the VMM's whole mm (the guest's RAM) to kata_overhead/<id>: a VMM stand-in
    holding 160 MiB of "guest RAM" the guest reports as used is ~160 MiB over in the cgroup, not
    in overhead. The CPU is the cgroup's (cpuacct.usage deltas); each figure says its source."""
    if not os.path.exists("/sys/fs/cgroup/memory/cgroup.procs"):
        pytest.skip("no cgroup v1 memory hierarchy")
    p = subprocess.Popen(["python3", "-c", "import time\nguest = bytearray(160 << 20)\n"
                          "while True:\n  b = bytearray(1 << 20); time.sleep(0.005)"])
    try:
        for c in ("memory", "cpuacct"):
            with open(f"/sys/fs/cgroup/{c}{overhead_cgroup}/cgroup.procs", "w") as f:
                f.write(str(p.pid))
        time.sleep(0.5)
        with node() as n:
            os.makedirs(os.path.join(n.root, "sys/fs"), exist_ok=True)
            os.symlink("/sys/fs/cgroup", os.path.join(n.root, "sys/fs/cgroup"))
            n.go("cg01", pod_name="cg", pod_namespace="prod", pid=p.pid, overhead_cgroup_path=overhead_cgroup,
                 flavour_kw={"state": ShimState(sandbox_id="cg01", guest_mem_total=256 * MiB,
                                                guest_mem_free=96 * MiB)})
            r = cli(["--host-root", n.root, "overhead", "-o", "json", "--interval", "0.5s",
                     "--runtime-class-overhead", "cpu=64,memory=160Mi"])
    finally:
        p.kill()
        p.wait()
    assert r.exit_code == 0, r.stdout
    it = r.json()["items"][0]
    cg = it["cgroup"]
    assert cg["path"] == overhead_cgroup and cg.get("error") is None
    assert cg["memoryBytes"] > 160 * MiB  # the guest's RAM, shown for information
    assert cg["cpuMillis"] > 0  # the busy loop's CPU, from cpuacct.usage deltas
    vmm = [q for q in it["processes"] if q["role"] == "vmm"][0]
    own = sum(q["ownBytes"] for q in it["processes"])
    assert vmm["ownBytes"] < 64 * MiB and it["measured"]["memoryBytes"] == own
    assert it["measured"]["cpuMillis"] == cg["cpuMillis"]
    assert it["measured"]["sources"] == {"memoryBytes": "processes", "cpuMillis": "cgroup"}
    assert it["measured"]["source"] == "cgroup+processes" and it["severity"] is None


def test_missing_overhead_cgroup_falls_back_to_processes(cli, tree):
    r = cli(["--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
             "--runtime-class-overhead", "cpu=64,memory=64Gi"])
    it = r.json()["items"][0]
    assert it["cgroup"]["path"].startswith("/kata_overhead/") and it["cgroup"]["memoryBytes"] is None
    assert it["measured"]["source"] == "processes"
    assert it["measured"]["sources"] == {"memoryBytes": "processes", "cpuMillis": "processes"}


# -- declared through the Kubernetes API ------------------------------------------------
def test_declared_from_the_api(cli, kube, tmp_path):
    kc = kube.kubeconfig(tmp_path / "kc")
    kube.add_runtimeclass("kata-qemu", "kata-qemu", overhead={"cpu": "250m", "memory": "160Mi"})
    kube.add_runtimeclass("kata-bare", "kata")                      # a RuntimeClass with no overhead
    web = kube.add_pod("web", "prod", node="n1", runtime_class="kata-qemu",
                       overhead={"cpu": "250m", "memory": "160Mi"})
    batch = kube.add_pod("batch", "jobs", node="n1", runtime_class="kata-bare")  # a pod without one
    kube.add_pod("old", "prod", node="n1", runtime_class="kata-qemu")  # created before the RC had overhead
    procs = [_proc() for _ in range(3)]
    try:
        with node() as tree:
            for sid, pod, p in (("api01", web, procs[0]), ("api02", batch, procs[1])):
                tree.go(sid, pod_name=pod["metadata"]["name"], pod_namespace=pod["metadata"]["namespace"],
                        pod_uid=pod["metadata"]["uid"], pid=p.pid)
            tree.go("api03", pod_name="old", pod_namespace="prod", pod_uid="another-uid", pid=procs[2].pid)
            r = cli(["--kubeconfig", kc, "--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--fail-on", "critical"])
            assert r.exit_code in (0, 8), r.stderr
            items = {i["id"]: i for i in r.json()["items"]}
            w, b, o = items["api01"], items["api02"], items["api03"]
            assert w["runtimeClass"] == "kata-qemu"
            assert w["declared"] == {"cpuMillis": 250, "memoryBytes": 160 * MiB, "source": "pod"}
            assert b["runtimeClass"] == "kata-bare" and b["declared"]["memoryBytes"] == 0
            assert any("no Pod overhead declared" in n for n in b["notes"])
            assert b["severity"] in ("medium", "high", "critical")
            assert o["declared"]["memoryBytes"] is None and any("another UID" in n for n in o["notes"])
            assert o["severity"] == "info" and o["message"].startswith("declared overhead unknown: the API's pod")
            # the flag is a what-if that wins over the API
            r = cli(["--kubeconfig", kc, "--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--runtime-class-overhead", "cpu=64,memory=64Gi"])
            assert {i["declared"]["source"] for i in r.json()["items"]} == {"flag"}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_runtimeclass_overhead_when_the_pod_has_none(cli, kube, tmp_path):
    kc = kube.kubeconfig(tmp_path / "kc")
    kube.add_runtimeclass("kata-qemu", "kata-qemu", overhead={"cpu": "250m", "memory": "160Mi"})
    pod = kube.add_pod("old", "prod", node="n1", runtime_class="kata-qemu")
    p = _proc()
    try:
        with node() as tree:
            tree.go("rc01", pod_name="old", pod_namespace="prod", pod_uid=pod["metadata"]["uid"], pid=p.pid)
            r = cli(["--kubeconfig", kc, "--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
                     "--fail-on", "critical"])
    finally:
        p.kill()
        p.wait()
    (it,) = r.json()["items"]
    assert it["declared"] == {"cpuMillis": 250, "memoryBytes": 160 * MiB, "source": "runtimeclass"}


@pytest.mark.parametrize("configured", [True, False])
def test_api_down_keeps_the_measurement(cli, tree, tmp_path, monkeypatch, configured):
    """A kubeconfig whose API server is down (a real refused connection on 127.0.0.1:1): the
    node-local measurement stands; declared comes from runtime_class_overhead (source noted)
    or is unknown with the API's error as a note, one warning; never exit 7 for the node."""
    kc = tmp_path / "down.kubeconfig"
    kc.write_text("apiVersion: v1\nkind: Config\n"
                  "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n"
                  "users: [{name: u, user: {token: x}}]\n"
                  "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n")
    if configured:
        cfg = tmp_path / "c.toml"
        cfg.write_text('runtime_class_overhead = "cpu=64,memory=64Gi"\n')
        monkeypatch.setenv("KATACTL_CONFIG", str(cfg))
    r = cli(["--kubeconfig", str(kc), "--request-timeout", "2s", "--host-root", tree.root, "overhead", "-o", "json",
             "--interval", "0.2s"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    items = r.json()["items"]
    assert {i["id"] for i in items} == {"ovh01", "ovh02"}
    for it in items:
        assert it["measured"]["memoryBytes"] > 0 and it["measured"]["cpuMillis"] is not None, it["notes"]
        assert any("https://127.0.0.1:1" in n for n in it["notes"]), it["notes"]
        if configured:
            assert it["declared"] == {"cpuMillis": 64000, "memoryBytes": 64 << 30, "source": "config"}
            assert it["severity"] is None
        else:
            assert it["declared"] == {"cpuMillis": None, "memoryBytes": None, "source": None}
            assert it["severity"] == "info" and "https://127.0.0.1:1" in it["message"]
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "127.0.0.1:1" in warn[0], r.stderr
    assert ("runtime_class_overhead" in warn[0]) == configured


def test_pod_missing_from_the_api(cli, kube, tree, tmp_path):
    kc = kube.kubeconfig(tmp_path / "kc")
    r = cli(["--kubeconfig", kc, "--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s"])
    assert r.exit_code == 0, r.stderr
    it = r.json()["items"][0]
    assert it["declared"]["cpuMillis"] is None and any("not found in the Kubernetes API" in n for n in it["notes"])
    # nothing was compared: unknown (info, as --help says), never "within the declared overhead"
    assert it["severity"] == "info", it
    assert it["message"].startswith("declared overhead unknown: pod") and "not found" in it["message"]
    r = cli(["--kubeconfig", kc, "--host-root", tree.root, "overhead", "-o", "json", "--interval", "0.2s",
             "--fail-on", "info"])
    assert r.exit_code == 8, r.stderr


# -- the QEMU lab ------------------------------------------------------------------------------
def test_on_the_lab_real_qemu(cli, lab):
    r = cli(lab.args("overhead", "-o", "json", "--interval", "0.5s", "--runtime-class-overhead",
                     "cpu=250m,memory=160Mi", "--fail-on", "critical", lab.pod("qemu-0")))
    assert r.exit_code in (0, 8), r.stderr
    (it,) = r.json()["items"]
    vmm = [p for p in it["processes"] if p["role"] == "vmm"][0]
    assert vmm["pid"] == lab.sb("qemu-0")["qemuPid"] and vmm["name"].startswith("qemu")
    assert vmm["rssBytes"] > 0 and vmm["cpuMillis"] is not None
    assert it["guestMemoryBytes"] and it["measured"]["memoryBytes"] > 0
    assert it["ratio"]["memory"] == pytest.approx(it["measured"]["memoryBytes"] / (160 * MiB), rel=1e-2)



def test_on_the_lab_one_sandbox_owns_no_other_sandboxs_vmm(cli, lab):
    """The lab's one daemon is every sandbox's shim and every QEMU's parent: asked for one
    sandbox, overhead still sees it shared (never descended), so the other sandboxes' VMMs are
    not that sandbox's helpers. Its processes are the ones the node-wide run gives it."""
    def procs(*refs):
        r = cli(lab.args("overhead", "-o", "json", "--interval", "0.1s", "--runtime-class-overhead",
                         "cpu=250m,memory=160Mi", *refs))
        assert r.exit_code in (0, 8), r.stderr
        return {it["podRef"]: {(p["pid"], p["role"]) for p in it["processes"]} for it in r.json()["items"]}

    ref = lab.pod("clh-0")
    one = procs(ref)[ref]
    qemus = {s["qemuPid"] for s in lab.refresh()["sandboxes"] if s.get("qemuPid")}
    assert qemus and not {pid for pid, _ in one} & qemus, one
    assert one == procs()[ref]


# -- over SSH --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    """Its own sshd nodes (the session lab's trees have no /proc): 'ovh' serves a tree whose /proc
    is this machine's, 'down' does not listen."""
    import shutil

    from tests.conftest_sshd import SSH_KEYGEN, SSHD, SshLab

    if not (os.path.exists(SSHD) and SSH_KEYGEN and shutil.which("ssh")):
        pytest.skip("OpenSSH (openssh-server, openssh-client) is not installed")
    lab = SshLab(tmp_path_factory.mktemp("ovhssh"))
    lab.add_node("ovh")
    lab.add_unreachable("down")
    os.symlink("/proc", os.path.join(str(lab.nodes["ovh"].root), "proc"))
    lab.write_config()
    lab.wait_ready()
    yield lab
    from katactl.backends import ssh

    ssh.close_pool()
    lab.stop()


def test_over_ssh(cli, ssh_nodes):
    from katactl.lab import layout
    from katactl.lab.shimserver import ShimServer

    p = _proc()
    root = str(ssh_nodes.nodes["ovh"].root)
    paths = layout.write_go_sandbox(root, "sshovh1", pid=p.pid, pod_name="remote", pod_namespace="prod")
    srv = ShimServer(paths.shim_socket).start()
    try:
        r = cli(["--ssh-config", str(ssh_nodes.config), "-N", "ovh,down", "overhead", "-o", "json",
                 "--interval", "0.3s", "--runtime-class-overhead", "cpu=64,memory=1Ki"])
    finally:
        srv.stop()
        p.kill()
        p.wait()
    assert r.exit_code == 4, r.stderr
    d = r.json()
    (it,) = [i for i in d["items"] if i["id"] == "sshovh1"]
    assert it["node"] == "ovh" and it["severity"] == "critical"
    vmm = [q for q in it["processes"] if q["role"] == "vmm"][0]
    assert vmm["pid"] == p.pid and vmm["rssBytes"] > 20 * MiB and vmm["cpuMillis"] is not None
    assert [e["node"] for e in d["errors"]] == ["down"]
    assert [n["node"] for n in d["nodes"]] == ["ovh"]


@pytest.mark.parametrize("value", ["cpu=xx", "", "memory=1Gi\n", "gpu=1", "memory=1e99999999"])
def test_bad_config_value_exit_2(cli, tmp_path, monkeypatch, value):
    monkeypatch.setenv("KATACTL_RUNTIME_CLASS_OVERHEAD", value)
    r = cli(["--host-root", str(tmp_path), "overhead"])
    assert r.exit_code == 2 and "KATACTL_RUNTIME_CLASS_OVERHEAD" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
