"""katactl.procfacts: psutil (local) and /proc-through-the-transport (remote) give the same
facts about the same real processes; --host-root reaches psutil through PROCFS_PATH."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from katactl import procfacts
from katactl.backends.local import LocalTransport
from katactl.procfacts import LocalProcessFacts, ProcIdentity, TransportProcessFacts


@pytest.fixture()
def procs():
    """A busy process (CPU time moves), an idle one, and this test process."""
    busy = subprocess.Popen([sys.executable, "-c", "x = bytearray(32 << 20)\nwhile True: pass"])
    idle = subprocess.Popen(["sleep", "300"])
    time.sleep(0.5)
    try:
        yield [busy.pid, idle.pid, os.getpid()]
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()


def _pair(host_root=""):
    return LocalProcessFacts(host_root), TransportProcessFacts(LocalTransport(host_root))


@pytest.mark.parametrize("with_root", [False, True])
def test_psutil_and_proc_agree_on_real_processes(procs, tmp_path, with_root):
    root = ""
    if with_root:  # a node root mounted elsewhere, its /proc inside (as the lab and tests/_katanode lay out)
        os.symlink("/proc", tmp_path / "proc")
        root = str(tmp_path)
    local, remote = _pair(root)
    # a process whose figures do not move (sleep) must agree exactly; a busy one within the
    # CPU time between the two reads
    a, b = local.stats(procs), remote.stats(procs)
    for pid in procs:
        x, y = a[pid], b[pid]
        assert x is not None and y is not None, pid
        assert x.pid == y.pid == pid
        assert x.name == y.name
        assert x.create_time == pytest.approx(y.create_time, abs=procfacts.CREATE_TIME_SLACK)
        assert y.cpu_seconds - 0.5 <= x.cpu_seconds <= y.cpu_seconds + 0.5
        assert abs(x.rss - y.rss) <= 8 << 20, (x.rss, y.rss)
        assert x.threads >= 1 and y.threads >= 1
    busy, idle = procs[0], procs[1]
    assert a[busy].rss >= 32 << 20 and b[busy].rss >= 32 << 20  # the bytearray is resident
    assert a[busy].cpu_seconds > 0.1 and b[busy].cpu_seconds > 0.1
    assert (a[idle].rss, a[idle].cpu_user, a[idle].threads) == (b[idle].rss, b[idle].cpu_user, b[idle].threads)
    assert a[idle].state == b[idle].state == "S"
    # identities agree too: same argv, same start
    ia, ib = local.identities(procs), remote.identities(procs)
    for pid in procs:
        assert ia[pid].cmdline == ib[pid].cmdline == tuple(psutil.Process(pid).cmdline())
        assert ia[pid].same_process(ib[pid])
    assert ia[idle].cmdline == ("sleep", "300")


def test_host_root_points_psutil_at_the_nodes_proc(tmp_path):
    """PROCFS_PATH is the node's /proc while asking, and psutil's own setting afterwards;
    a --host-root without /proc (a snapshot) knows no process."""
    seen = []
    (tmp_path / "node").mkdir()
    os.symlink("/proc", tmp_path / "node" / "proc")
    LocalProcessFacts(str(tmp_path / "node"))._each([os.getpid()], lambda p: seen.append(psutil.PROCFS_PATH))
    assert seen == [str(tmp_path / "node" / "proc")]
    assert psutil.PROCFS_PATH == "/proc"
    facts = LocalProcessFacts(str(tmp_path))
    assert facts.stats([os.getpid()]) == {os.getpid(): None}
    assert facts.identity(os.getpid()) is None


def test_missing_and_zombie_processes_are_none(tmp_path):
    z = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while psutil.Process(z.pid).status() != "zombie" and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        for facts in _pair():
            assert facts.identity(z.pid) is None  # exited: not the process anyone recorded
            assert facts.stats([2 ** 22 + 7]) == {2 ** 22 + 7: None}
            assert facts.identity(2 ** 22 + 7) is None
    finally:
        z.wait()


def test_identity_round_trip_and_reuse_detection():
    me = procfacts.local_identity(os.getpid())
    assert me is not None and me.cmdline == tuple(psutil.Process().cmdline())
    assert ProcIdentity.from_dict(me.to_dict()) == me
    assert LocalProcessFacts().still_is(me)
    assert not LocalProcessFacts().still_is(ProcIdentity(me.pid, me.create_time - 3600, me.cmdline))
    assert not LocalProcessFacts().still_is(ProcIdentity(me.pid, me.create_time, ("sleep", "300")))
    for bad in (None, {}, {"pid": "1", "createTime": 1.0, "cmdline": []}, {"pid": 1, "createTime": True,
                "cmdline": []}, {"pid": 1, "createTime": 1.0, "cmdline": "x"}, {"pid": -1, "createTime": 1.0,
                                                                              "cmdline": []}):
        assert ProcIdentity.from_dict(bad) is None


def test_malformed_proc_text_is_none():
    assert procfacts.parse_stats(1, b"garbage", b"", 0.0) is None
    assert procfacts.parse_stats(1, b"1 (a) R " + b"x " * 40, b"", 0.0) is None
    ok = b"1 (a) b) S " + b" ".join(b"7" for _ in range(40))
    s = procfacts.parse_stats(1, ok, b"Name:\ta) b\nVmRSS:\t 12 kB\n", 100.0)
    assert (s.name, s.state, s.rss, s.cpu_user, s.create_time) == ("a) b", "S", 12 * 1024, 0.07, 100.07)


def test_for_transport_picks_by_where_processes_run():
    assert isinstance(procfacts.for_transport(LocalTransport()), LocalProcessFacts)

    class Remote(LocalTransport):
        is_remote = True

    assert isinstance(procfacts.for_transport(Remote()), TransportProcessFacts)


def test_rss_shmem_of_a_shared_mapping(tmp_path):
    """RssShmem (/proc/<pid>/status): the shared memory in a process's RSS (what overhead leaves
    out: a virtio-fs guest's RAM), from psutil's side and the transport's alike."""
    import uuid

    shm = f"/dev/shm/katactl-test-{uuid.uuid4().hex[:8]}"
    p = subprocess.Popen([sys.executable, "-c", "import mmap, os, sys, time\n"
                          "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); os.ftruncate(fd, 16 << 20)\n"
                          "m = mmap.mmap(fd, 16 << 20, mmap.MAP_SHARED)\n"
                          "for off in range(0, 16 << 20, 4096): m[off] = 1\n"
                          "print('ready', flush=True); time.sleep(300)", shm], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        local, remote = _pair()
        a, b = local.stats([p.pid])[p.pid], remote.stats([p.pid])[p.pid]
    finally:
        p.kill()
        p.wait()
        os.unlink(shm)
    assert a is not None and b is not None
    assert a.rss_shmem == b.rss_shmem and 16 << 20 <= b.rss_shmem <= b.rss


def test_hugetlb_pages_from_status(tmp_path):
    """HugetlbPages (/proc/<pid>/status, after VmSwap: linux fs/proc/task_mmu.c task_mem,
    hugetlb_report_usage): the hugetlbfs pages a process maps, which VmRSS leaves out (a guest
    backed by /dev/hugepages). From the transport's parser and from psutil's side (a node root
    whose /proc/<pid>/status is this process's real one with 200 MiB there: this machine has no
    hugepage pool, and a test must not reserve one)."""
    real = open(f"/proc/{os.getpid()}/status", "rb").read()
    assert b"\nHugetlbPages:\t       0 kB\n" in real
    big = real.replace(b"\nHugetlbPages:\t       0 kB\n", b"\nHugetlbPages:\t  204800 kB\n")
    stat = open(f"/proc/{os.getpid()}/stat", "rb").read()
    assert procfacts.parse_stats(os.getpid(), stat, real, 0.0).hugetlb == 0
    assert procfacts.parse_stats(os.getpid(), stat, big, 0.0).hugetlb == 200 << 20
    assert procfacts.parse_stats(os.getpid(), stat, b"VmRSS:\t 12 kB\n", 0.0).hugetlb is None
    me = str(os.getpid())
    os.makedirs(tmp_path / "proc" / me)
    for e in os.listdir("/proc"):
        if e != me:
            os.symlink(f"/proc/{e}", tmp_path / "proc" / e)
    for e in os.listdir(f"/proc/{me}"):
        if e != "status":
            os.symlink(f"/proc/{me}/{e}", tmp_path / "proc" / me / e)
    (tmp_path / "proc" / me / "status").write_bytes(big)
    got = LocalProcessFacts(str(tmp_path)).stats([os.getpid()])[os.getpid()]
    assert got is not None and got.hugetlb == 200 << 20 and got.rss > 0

