"""inspect pressure and the blkio settings on the machine's REAL cgroup filesystem
(hybrid here: v1 cpu, cpuacct, memory, blkio + v2 at /sys/fs/cgroup/unified, whose
cgroups carry cpu/memory/io.pressure).

One cgroup of the same name in every hierarchy; a process spinning under a 10 %
CPU quota and one allocating more than its 32 MiB memory limit are moved in.
Only directions and presence are asserted, never absolute times."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from tests._cgroupfs import remove_cgroups

V1 = "/sys/fs/cgroup"
HIER = ("cpu", "cpuacct", "memory", "blkio", "unified")
SPIN = "while True: pass\n"
ALLOC = r"""
import os, sys, time
for procs in sys.argv[1:]:  # join the limited cgroups itself: its restarting shell stays out
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
while True:
    b = bytearray(48 << 20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    del b
    time.sleep(0.05)
"""


def _w(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _disk() -> str | None:
    for mm in sorted(os.listdir("/sys/dev/block")):
        try:
            name = open(f"/sys/dev/block/{mm}/uevent").read()
        except OSError:
            continue
        if "DEVTYPE=disk" in name and "DEVNAME=loop" not in name and "DEVNAME=zram" not in name:
            return mm
    return None


@pytest.fixture(scope="module")
def loaded():
    if not all(os.path.isdir(f"{V1}/{h}") for h in HIER) or not os.path.exists(f"{V1}/unified/cpu.pressure"):
        pytest.skip("needs the hybrid layout with cpu, cpuacct, memory, blkio and a PSI-enabled unified hierarchy")
    name = f"katactl-psi-{secrets.token_hex(4)}"
    made, procs = [], []
    try:
        for h in HIER:
            os.mkdir(f"{V1}/{h}/{name}")
            made.append(f"{V1}/{h}/{name}")
    except OSError as e:
        for d in made:
            os.rmdir(d)
        pytest.skip(f"cgroup fs not writable here: {e}")
    try:
        _w(f"{V1}/cpu/{name}/cpu.cfs_period_us", 100000)
        _w(f"{V1}/cpu/{name}/cpu.cfs_quota_us", 10000)
        _w(f"{V1}/memory/{name}/memory.limit_in_bytes", 32 << 20)
        disk = _disk()
        if disk:
            _w(f"{V1}/blkio/{name}/blkio.throttle.read_bps_device", f"{disk} 1048576")
            _w(f"{V1}/blkio/{name}/blkio.throttle.write_iops_device", f"{disk} 100")
        for code in (SPIN, SPIN):
            p = subprocess.Popen([sys.executable, "-c", code])
            procs.append(p)
            for h in HIER:
                _w(f"{V1}/{h}/{name}/cgroup.procs", p.pid)
        # the allocator outgrows its limit (no swap here: the OOM killer ends it) and is
        # restarted by its shell; not under the CPU quota, so it keeps allocating
        # the shell stays outside the memory cgroup (the OOM killer must not end the loop)
        joins = [f"{V1}/{h}/{name}/cgroup.procs" for h in ("memory", "unified")]
        p = subprocess.Popen(["sh", "-c", 'while :; do "$0" -c "$1" "$2" "$3"; sleep 0.05; done',
                              sys.executable, ALLOC, *joins], start_new_session=True)
        procs.append(p)
        time.sleep(1.5)  # let the counters start moving
        yield {"name": name, "path": f"/{name}", "disk": disk, "pids": [p.pid for p in procs]}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 9) if p.args[0] == "sh" else p.kill()
            except ProcessLookupError:
                pass
            p.wait()
        for h in HIER:  # whatever is left in the cgroup (the allocator's current child)
            try:
                for pid in open(f"{V1}/{h}/{name}/cgroup.procs").read().split():
                    try:
                        os.kill(int(pid), 9)
                    except ProcessLookupError:
                        pass
            except OSError:
                pass
        remove_cgroups(made)


def test_real_throttling_psi_and_memory_limit_hits(cli, loaded):
    # real signals from real load: on a busy 2-core machine one second may see no OOM kill
    # yet, so sample again (up to three times) until the allocator has hit its limit
    for _ in range(3):
        r = cli(["inspect", "pressure", loaded["path"], "node", "-o", "json", "--interval", "1s"])
        assert r.exit_code == 0, r.stderr
        d = r.json()
        row, node = d["items"]
        ev = row["memory"]["events"]
        if ev["max"] > 0 and ev["oomKill"] > 0 and row["cpu"]["throttledPeriods"] > 0 \
                and row["psi"]["cpu"]["some"]["stallPercent"] > 0:
            break
    assert row["path"] == loaded["path"] and node["role"] == "node"
    # throttled by the 10 % quota: periods throttled, throttled time, and CPU stall in PSI
    assert row["cpu"]["throttledPeriods"] > 0 and row["cpu"]["throttledPercent"] > 0
    assert row["cpu"]["throttledMsPerSec"] > 0 and row["cpu"]["usageCores"] > 0
    assert row["psi"]["cpu"]["some"]["stallPercent"] > 0
    assert isinstance(row["psi"]["cpu"]["some"]["avg10"], float)
    # the allocator keeps hitting the 32 MiB limit (v1 memory.failcnt) and being OOM-killed
    ev = row["memory"]["events"]
    assert ev["max"] > 0 and ev["oomKill"] > 0 and row["memory"]["usageBytes"] > 0
    assert "memory.stat:pgscan_direct" in row["unsupported"]  # v1 has no pgscan_direct: unsupported, not an error
    assert "eventfd" in row["memory"]["pressureLevel"]
    assert isinstance(row["io"]["devices"], list)
    assert node["psi"]["cpu"]["some"]["stallPercent"] is not None
    assert d["psi"] == "per cgroup"


def test_real_fail_on_gates(cli, loaded):
    r = cli(["inspect", "pressure", loaded["path"], "-o", "json", "--interval", "500ms",
             "--fail-on", "cpu.throttled>0"])
    assert r.exit_code == 8, r.stderr
    v = r.json()["failOn"]["violations"]
    assert v and v[0]["metric"] == "cpu.throttled" and v[0]["path"] == loaded["path"]
    r = cli(["inspect", "pressure", loaded["path"], "-o", "json", "--interval", "500ms",
             "--fail-on", "cpu.throttled>100"])
    assert r.exit_code == 0, r.stderr


def test_real_blkio_settings(cli, loaded):
    if not loaded["disk"]:
        pytest.skip("no block disk on this machine")
    r = cli(["inspect", "cgroup", f"/sys/fs/cgroup/blkio/{loaded['name']}", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    (e,) = r.json()["cgroups"]
    assert e["io"]["version"] == 1
    dev = next(x for x in e["io"]["devices"] if x["device"] == loaded["disk"])
    assert dev["readBps"] == 1048576 and dev["writeIops"] == 100 and dev["throttled"] is True
    assert dev["name"] and not dev["name"].startswith("loop")
    # no CFQ/bfq weight files on this kernel: unsupported, not an error
    assert "blkio.weight" in e["unsupported"] or isinstance(e["io"]["weight"], int)


def test_real_v1_only_cgroup_rule_is_unknown_not_passed(cli):
    """A cgroup in the v1 cpu, cpuacct and memory hierarchies only (no unified twin: no
    <res>.pressure to read, as on a v1 node): ``cpu.some>=0`` holds for any measured value,
    so it cannot pass; it is unknown, and the gate fails (exit 8) with a warning."""
    hier = ("cpu", "cpuacct", "memory")
    if not all(os.path.isdir(f"{V1}/{h}") for h in hier):
        pytest.skip("needs the v1 cpu, cpuacct and memory hierarchies")
    name = f"katactl-nopsi-{secrets.token_hex(4)}"
    made = []
    try:
        for h in hier:
            os.mkdir(f"{V1}/{h}/{name}")
            made.append(f"{V1}/{h}/{name}")
    except OSError as e:
        for d in made:
            os.rmdir(d)
        pytest.skip(f"cgroup fs not writable here: {e}")
    try:
        r = cli(["inspect", "pressure", f"/{name}", "-o", "json", "--interval", "200ms", "--fail-on", "cpu.some>=0"])
        assert r.exit_code == 8, r.stderr
        fo = r.json()["failOn"]
        assert fo["passed"] is False and fo["violations"] == []
        assert [(u["metric"], u["path"]) for u in fo["unknown"]] == [("cpu.some", f"/{name}")]
        assert "psi.cpu" in fo["unknown"][0]["reason"] and "not measured" in r.stderr
    finally:
        for d in reversed(made):
            os.rmdir(d)


def test_real_container_throttled_under_an_unthrottled_pod(cli):
    """kubelet's layout on the real v1 cpu hierarchy: the pod's quota is the sum of its
    containers' limits (110 ms per 100 ms: 1 CPU + 100m) and a busy container spins under its
    own 100m. The container is throttled, the pod cgroup's own cpu.stat counts none (its quota
    is never reached): the pod row reports its container's throttling, with that file."""
    import uuid

    if not os.path.isdir(f"{V1}/cpu"):
        pytest.skip("needs the v1 cpu hierarchy")
    # under a private top directory: kubepods in its path (classified as kubelet's), never the
    # node's /kubepods that other tests and commands walk
    pod = f"/katactl-ctr-{secrets.token_hex(4)}/kubepods/burstable/pod{uuid.uuid4()}"
    made = []
    try:
        for d in ("", "/ctr-a", "/ctr-b"):
            os.makedirs(f"{V1}/cpu{pod}{d}", exist_ok=True)
            made.append(f"{V1}/cpu{pod}{d}")
    except OSError as e:
        pytest.skip(f"cgroup fs not writable here: {e}")
    spin = None
    try:
        _w(f"{V1}/cpu{pod}/cpu.cfs_quota_us", 110000)
        _w(f"{V1}/cpu{pod}/ctr-a/cpu.cfs_quota_us", 10000)
        _w(f"{V1}/cpu{pod}/ctr-b/cpu.cfs_quota_us", 100000)
        spin = subprocess.Popen([sys.executable, "-c", SPIN])
        _w(f"{V1}/cpu{pod}/ctr-a/cgroup.procs", spin.pid)
        for _ in range(3):  # a busy 2-core machine may not run it 10 ms in every period
            r = cli(["inspect", "pressure", pod, "-o", "json", "--interval", "1s", "--fail-on", "cpu.throttled>0"])
            if r.exit_code == 8:
                break
        assert r.exit_code == 8, r.stderr
        d = r.json()
        (row,) = d["items"]
        assert row["cpu"]["throttledPeriods"] == 0 and row["cpu"]["periods"] >= 0
        ctr = {c["path"].rsplit("/", 1)[1]: c for c in row["cpu"]["containers"]}
        assert ctr["ctr-a"]["throttledPeriods"] > 0 and ctr["ctr-a"]["throttledMsPerSec"] > 0
        assert ctr["ctr-b"]["throttledPeriods"] == 0
        (v,) = d["failOn"]["violations"]
        assert v["path"] == pod and v["file"] == f"{V1}/cpu{pod}/ctr-a/cpu.stat"
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
        remove_cgroups(made)
        top = pod.split("/")[1]
        for d in (f"{V1}/cpu/{top}/kubepods/burstable", f"{V1}/cpu/{top}/kubepods", f"{V1}/cpu/{top}"):
            try:
                os.rmdir(d)
            except OSError:
                pass
