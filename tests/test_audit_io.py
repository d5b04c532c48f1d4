"""audit's io.* checks follow the kernel's hierarchy semantics, on fixture trees laid out as
tests/fixtures_isolation.py describes.

- cgroup v1 blk-throttle is flat: a limit applies to the group itself only, never to its
  children (linux block/blk-throttle.c throtl_pd_init: "If not on the default hierarchy, the
  broken flat hierarchy behavior is retained ... Limits of a group don't interact with limits
  of other groups regardless of the position of the group in the hierarchy"), and Kata writes
  the vCPU TIDs to kata_<id>'s ``tasks`` and leaves the VMM's other threads in
  /kata_overhead/<id> (kata-containers src/runtime/pkg/resourcecontrol/cgroups.go AddThread).
- cgroup v2 io.max applies to the whole subtree (the same comment: "limits on a given
  throtl_grp are applied to the whole subtree").
- io.weight / io.bfq.weight count among siblings only (Documentation/admin-guide/cgroup-v2.rst
  "IO Interface Files": "the relative amount IO time the cgroup can use in relation to its
  siblings")."""
from __future__ import annotations

from tests import fixtures_isolation as fx


def _audit(cli, root, *args):
    r = cli(["--host-root", root, "audit", "-o", "json", "--fail-on", "info", *args])
    assert r.stdout, r.stderr
    return r, r.json()


def _io(d, check):
    return [i for i in d["items"] if i["check"] == check]


def _policy(tmp_path, body='[io]\noffline_devices = "sdb"\n'):
    p = tmp_path / "p.toml"
    p.write_text(body)
    return str(p)


def _v1_node(root, **kw):
    built = fx.build_node(root, mode="v1", online_pods=1, sandboxes=1, resctrl=False, **kw)
    fx.write_block_devices(root)
    sid = next(iter(built["vcpu_tids"]))
    pod = f"/kubepods/besteffort/pod{fx.pod_uid(0, 'offline')}"
    sb = f"{pod}/kata_{sid}" if not kw.get("sandbox_cgroup_only") else f"{pod}/{sid}"
    online = f"/kubepods/burstable/pod{built['online'][0]}"
    for p in (pod, sb, f"/kata_overhead/{sid}", online):
        fx.write_v1_blkio(root, p)
    return {"pod": pod, "sandbox": sb, "overhead": f"/kata_overhead/{sid}", "online": online}


THROTTLE = {"blkio.throttle.read_bps_device": "8:16 1048576\n", "blkio.throttle.write_bps_device": "8:16 1048576\n"}


def test_v1_pod_level_throttle_does_not_reach_the_vm(cli, tmp_path):
    """The pod cgroup's throttle never applies to the VM's threads in kata_<id> and
    /kata_overhead/<id> (v1 is flat): the pod is not throttled; a throttle on each cgroup
    that holds the VM's threads is."""
    root = str(tmp_path / "node")
    p = _v1_node(root)
    pol = _policy(tmp_path)
    fx.write_v1_blkio(root, p["pod"], THROTTLE)
    r, d = _audit(cli, root, "--policy", pol)
    (f,) = _io(d, "io.offline-throttle")
    assert r.exit_code == 8 and f["target"] == "pod batch/batch-0" and f["status"] == "problem"
    assert "cgroup v1" in f["message"] and "pod cgroup" in f["message"], f["message"]
    files = [e["file"] for e in f["evidence"]]
    assert files[0].endswith(p["pod"] + "/blkio.throttle.read_bps_device")
    assert f["evidence"][0]["value"] != "no line"
    assert any(x.endswith(p["sandbox"] + "/blkio.throttle.read_bps_device") for x in files), files
    assert any(x.endswith(p["overhead"] + "/blkio.throttle.read_bps_device") for x in files), files
    # the vCPU threads' cgroup throttled, the VMM's I/O threads in kata_overhead not yet
    fx.write_v1_blkio(root, p["sandbox"], THROTTLE)
    r, d = _audit(cli, root, "--policy", pol)
    (f,) = _io(d, "io.offline-throttle")
    files = [e["file"] for e in f["evidence"]]
    assert any(x.endswith(p["overhead"] + "/blkio.throttle.read_bps_device") for x in files), files
    assert not any(x.endswith(p["sandbox"] + "/blkio.throttle.read_bps_device") for x in files), files
    fx.write_v1_blkio(root, p["overhead"], THROTTLE)
    r, d = _audit(cli, root, "--policy", pol)
    assert not _io(d, "io.offline-throttle"), d["items"]


def test_v1_sandbox_cgroup_only_throttle_on_the_sandbox_cgroup(cli, tmp_path):
    """sandbox_cgroup_only=true: every VM thread is in <pod>/<id>; a throttle there is enough,
    the same throttle on the pod cgroup alone is not."""
    root = str(tmp_path / "node")
    p = _v1_node(root, sandbox_cgroup_only=True)
    pol = _policy(tmp_path)
    fx.write_v1_blkio(root, p["pod"], THROTTLE)
    r, d = _audit(cli, root, "--policy", pol)
    assert [f["target"] for f in _io(d, "io.offline-throttle")] == ["pod batch/batch-0"], d["items"]
    fx.write_v1_blkio(root, p["sandbox"], THROTTLE)
    r, d = _audit(cli, root, "--policy", pol)
    assert not _io(d, "io.offline-throttle"), d["items"]


def test_v1_shared_device_counts_the_vmm_io_in_kata_overhead(cli, tmp_path):
    """On v1 the VMM's I/O threads are in /kata_overhead/<id>: the pod's recursive counters miss
    their I/O on sdb, and the pod cgroup's throttle does not apply to them."""
    root = str(tmp_path / "node")
    p = _v1_node(root)
    fx.write_v1_blkio(root, p["pod"], THROTTLE)
    stat = "8:16 Read 4096\n8:16 Write 8192\n8:16 Sync 0\n8:16 Async 12288\n8:16 Total 12288\nTotal 12288\n"
    fx.write_v1_blkio(root, p["overhead"], {"blkio.throttle.io_service_bytes_recursive": stat})
    fx.write_v1_blkio(root, p["online"], {"blkio.throttle.io_service_bytes_recursive": stat})
    r, d = _audit(cli, root, "--policy", _policy(tmp_path, "[io]\n"))
    (f,) = _io(d, "io.shared-device")
    assert r.exit_code == 8 and f["target"] == "pod batch/batch-0" and "sdb (8:16)" in f["message"], f
    assert f["evidence"][0]["file"].endswith(p["overhead"] + "/blkio.throttle.io_service_bytes_recursive")
    for c in (p["sandbox"], p["overhead"]):
        fx.write_v1_blkio(root, c, THROTTLE)
    r, d = _audit(cli, root, "--policy", _policy(tmp_path, "[io]\n"))
    assert not _io(d, "io.shared-device"), d["items"]


def _v2_node(root):
    built = fx.build_node(root, mode="v2", online_pods=2, sandboxes=2, resctrl=False)
    fx.write_block_devices(root)
    fx.write_v2_root_io(root)
    online = [f"/kubepods/burstable/pod{u}" for u in built["online"]]
    pods = [f"/kubepods/besteffort/pod{fx.pod_uid(i, 'offline')}" for i in range(2)]
    for p in online + pods + ["/kubepods", "/kubepods/burstable", "/kubepods/besteffort"]:
        fx.write_v2_io(root, p)
    for p in online + pods:
        fx.write_v2_signals(root, p, 0, io_bytes={"8:16": 1})
    return online, pods


def test_v2_io_max_of_an_ancestor_counts(cli, tmp_path):
    """koordinator's BE-class limit sits on kubepods/besteffort: on v2 it limits every offline
    pod below it, so neither io.offline-throttle nor io.shared-device fires (the sandboxes'
    /kata_overhead/<id> limited alike, on /kata_overhead). The same line at "max" limits
    nothing: the finding names each io.max it read, the ancestors' too."""
    root = str(tmp_path / "node")
    online, pods = _v2_node(root)
    pol = _policy(tmp_path)
    for p in ("/kubepods/besteffort", "/kata_overhead"):
        fx.write_v2_io(root, p, io_max={"8:16": "rbps=10485760 wbps=10485760 riops=max wiops=max"})
    r, d = _audit(cli, root, "--policy", pol)
    assert not [i for i in d["items"] if i["check"] in ("io.offline-throttle", "io.shared-device")], d["items"]
    fx.write_v2_io(root, "/kubepods/besteffort", io_max={"8:16": "rbps=max wbps=max riops=max wiops=max"})
    r, d = _audit(cli, root, "--policy", pol)
    found = _io(d, "io.offline-throttle")
    assert r.exit_code == 8 and sorted(f["target"] for f in found) == ["pod batch/batch-0", "pod batch/batch-1"]
    files = {e["file"].removeprefix(root): e["value"] for e in found[0]["evidence"]}
    assert files["/sys/fs/cgroup/kubepods/besteffort/io.max"] == [
        {"device": "8:16", "name": "sdb", "readBps": "max", "writeBps": "max", "readIops": "max", "writeIops": "max",
         "throttled": False}], files
    assert files["/sys/fs/cgroup/kubepods/io.max"] == "no line", files
    assert len(_io(d, "io.shared-device")) == 2


def test_v2_weights_compared_among_siblings(cli, tmp_path):
    """burstable 1000 and besteffort 10 with every pod at the kernel default 100: an offline pod
    gets about 1% of the disk, an online one 99%: no finding. The QoS classes the other way
    round are one finding, on kubepods/besteffort, whatever the pods' own weights (they count
    only against their siblings in the same class)."""
    root = str(tmp_path / "node")
    online, pods = _v2_node(root)
    fx.write_block_devices(root, scheduler="bfq")
    fx.write_v2_root_io(root, qos_enable=0)  # BFQ's weights only
    fx.write_v2_io(root, "/kubepods/burstable", weight=1000)
    fx.write_v2_io(root, "/kubepods/besteffort", weight=10)
    r, d = _audit(cli, root)
    assert not _io(d, "io.offline-weight"), d["items"]
    fx.write_v2_io(root, "/kubepods/burstable", weight=10)
    fx.write_v2_io(root, "/kubepods/besteffort", weight=1000)
    for p in pods:
        fx.write_v2_io(root, p, weight=10)
    r, d = _audit(cli, root)
    (f,) = _io(d, "io.offline-weight")
    assert r.exit_code == 8 and f["target"] == "/kubepods/besteffort", f
    assert "1000 is not below its online sibling /kubepods/burstable's 10" in f["message"], f["message"]
    assert [e["file"].removeprefix(root) for e in f["evidence"]] == [
        "/sys/fs/cgroup/kubepods/besteffort/io.bfq.weight", "/sys/fs/cgroup/kubepods/burstable/io.bfq.weight"]


def test_v2_unreadable_ancestor_io_max_is_unknown(cli, tmp_path):
    """An io.max above the pod that cannot be parsed may hold the limit: the check did not run
    (unknown, naming that file), it did not find a problem."""
    root = str(tmp_path / "node")
    online, pods = _v2_node(root)
    with open(fx.v2_dir(root, "/kubepods/besteffort") + "/io.max", "w") as f:
        f.write("8:16 rbps\n")
    r, d = _audit(cli, root, "--policy", _policy(tmp_path))
    found = _io(d, "io.offline-throttle")
    assert r.exit_code == 8 and len(found) == 2 and {f["status"] for f in found} == {"unknown"}, found
    assert found[0]["evidence"][0]["file"] == "/sys/fs/cgroup/kubepods/besteffort/io.max", found[0]
    assert found[0]["message"] == "not checked: the throttle on sdb (8:16) could not be read"


def test_weights_ineffective_on_the_shared_disk(cli, tmp_path):
    """bfq on the system disk sda only, iocost off: the weights do nothing on sdb, the disk
    online and offline pods share (and the offline data disk), even though one disk has bfq."""
    root = str(tmp_path / "node")
    online, pods = _v2_node(root)
    fx.write_v2_root_io(root, qos_enable=0)
    fx.write_block_devices(root, {"8:0": "sda"}, scheduler="bfq")
    fx.write_v2_io(root, "/kubepods/burstable", weight=1000)
    fx.write_v2_io(root, "/kubepods/besteffort", weight=10)
    r, d = _audit(cli, root)
    (f,) = _io(d, "io.weight-ineffective")
    assert r.exit_code == 8 and "sdb (8:16)" in f["message"] and "sda" not in f["message"], f["message"]
    assert {"file": "/sys/dev/block/8:16/queue/scheduler", "value": "mq-deadline"} in f["evidence"], f["evidence"]
    fx.write_block_devices(root, {"8:16": "sdb"}, scheduler="bfq")
    r, d = _audit(cli, root)
    assert not _io(d, "io.weight-ineffective"), d["items"]


def test_v2_io_max_must_reach_kata_overhead_too(cli, tmp_path):
    """Review 13 diffB finding 1: on v2 with sandbox_cgroup_only=false the runtime's vCPU move
    takes only the VMM's process into the sandbox cgroup; the shim and virtiofsd (the guest's
    virtio-fs file I/O) stay in /kata_overhead/<id>, which an io.max on kubepods/besteffort
    does not reach. Their 50 GiB on sdb, which an online pod uses too, is unthrottled until
    /kata_overhead (or /kata_overhead/<id>) has its own io.max."""
    root = str(tmp_path / "node")
    built = fx.build_node(root, mode="v2", online_pods=1, sandboxes=1, resctrl=False)
    fx.write_block_devices(root)
    fx.write_v2_root_io(root)
    ov = f"/kata_overhead/{next(iter(built['vcpu_tids']))}"
    online = f"/kubepods/burstable/pod{built['online'][0]}"
    pod = f"/kubepods/besteffort/pod{fx.pod_uid(0, 'offline')}"
    for p in (online, pod, "/kubepods", "/kubepods/burstable", "/kubepods/besteffort", ov, "/kata_overhead"):
        fx.write_v2_io(root, p)
    fx.write_v2_signals(root, online, 0, io_bytes={"8:16": 1})
    fx.write_v2_signals(root, pod, 0, io_bytes={"8:0": 1})
    fx.write_v2_signals(root, ov, 0, io_bytes={"8:16": 50 << 30})
    limit = {"8:16": "rbps=10485760 wbps=10485760 riops=max wiops=max"}
    fx.write_v2_io(root, "/kubepods/besteffort", io_max=limit)
    r, d = _audit(cli, root, "--policy", _policy(tmp_path))
    (f,) = _io(d, "io.offline-throttle")
    assert r.exit_code == 8 and f["target"] == "pod batch/batch-0" and f["status"] == "problem", f
    assert ov in f["message"] and "virtiofsd" in f["message"], f["message"]
    files = [e["file"].removeprefix("/sys/fs/cgroup") for e in f["evidence"]]
    assert files == [f"{pod}/io.max", "/kubepods/besteffort/io.max", "/kubepods/io.max", f"{ov}/io.max",
                     "/kata_overhead/io.max"], files
    assert "/kata_overhead" in f["fix"], f["fix"]
    (s,) = _io(d, "io.shared-device")
    assert s["evidence"][0]["file"] == f"/sys/fs/cgroup{ov}/io.stat", s["evidence"]
    fx.write_v2_io(root, "/kata_overhead", io_max=limit)
    r, d = _audit(cli, root, "--policy", _policy(tmp_path))
    assert not [i for i in d["items"] if i["check"] in ("io.offline-throttle", "io.shared-device")], d["items"]
