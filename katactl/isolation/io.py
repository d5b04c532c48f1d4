"""I/O isolation settings of a cgroup, per device, cgroup v1 ``blkio`` and v2 ``io``.

File formats (as the kernel prints them; Documentation/admin-guide/cgroup-v2.rst
"IO Interface Files", Documentation/admin-guide/cgroup-v1/blkio-controller.rst):

v2 (``io`` controller)
    io.weight / io.bfq.weight   ``default 100`` then ``8:16 200`` lines (io.weight is iocost's,
                                io.bfq.weight BFQ's: Documentation/block/bfq-iosched.rst)
    io.max                      ``8:16 rbps=2097152 wbps=max riops=max wiops=120``
    io.latency                  ``8:16 target=75`` (microseconds)
    io.cost.qos (root only)     ``8:16 enable=1 ctrl=user rpct=95.00 rlat=75000 wpct=95.00 wlat=150000 min=50.00 max=150.00``
    io.cost.model (root only)   ``8:16 ctrl=auto model=linear rbps=... rseqiops=... rrandiops=... wbps=... ...``
    io.stat                     ``8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0``
v1 (``blkio``)
    blkio.weight                one number (CFQ, gone since 5.0; Alinux keeps it for iocost)
    blkio.bfq.weight            one number (block/bfq-cgroup.c bfq_io_show_weight_legacy)
    blkio.bfq.weight_device     as io.bfq.weight: ``default 100`` + ``8:16 200`` lines
                                (bfq_io_show_weight; bfq_blkcg_legacy_files)
    blkio.weight_device         ``8:16 200`` lines
    blkio.throttle.{read,write}_{bps,iops}_device   ``8:16 1048576`` lines (no line = no limit)
    blkio.throttle.io_service_bytes[_recursive]      ``8:16 Read 1234`` ... and a last ``Total N``
    blkio.throttle.io_serviced[_recursive]           same, in IOs
    blkio.cost.qos / blkio.cost.model               Alinux's iocost on v1, same format as v2

Devices are named from the node's ``/sys/dev/block/<maj:min>/uevent`` (``DEVNAME=``).
A knob the kernel lacks is listed as unsupported, never raised.
"""
from __future__ import annotations

import re

from katactl.isolation import cgroups as cg
from katactl.backends.base import NodeTransport

_DEV = re.compile(r"^\d+:\d+$")


def _num(v: str):
    if v == "max":
        return "max"
    try:
        return int(v)
    except ValueError:
        return float(v)  # "95.00": ValueError if not a number either


def parse_nested(text: str) -> dict[str, dict]:
    """``MAJ:MIN key=value ...`` lines -> {dev: {key: number|"max"|str}}."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if not _DEV.fullmatch(parts[0]):
            raise ValueError(f"not a device line: {line[:40]!r}")
        d: dict = {}
        for kv in parts[1:]:
            k, sep, v = kv.partition("=")
            if not sep or not k:
                raise ValueError(f"not key=value: {kv[:40]!r}")
            try:
                d[k] = _num(v)
            except ValueError:
                d[k] = v  # ctrl=auto, model=linear
        out[parts[0]] = d
    return out


def parse_weight(text: str) -> dict:
    """io.weight / io.bfq.weight / blkio.bfq.weight -> {"default": n, "devices": {dev: n}};
    a bare number (blkio.weight) -> {"default": n, "devices": {}}."""
    out: dict = {"default": None, "devices": {}}
    s = text.strip()
    if re.fullmatch(r"\d+", s):
        out["default"] = int(s)
        return out
    for line in s.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(line)
        if parts[0] == "default":
            out["default"] = int(parts[1])
        elif _DEV.fullmatch(parts[0]):
            out["devices"][parts[0]] = int(parts[1])
        else:
            raise ValueError(line)
    return out


def parse_dev_values(text: str) -> dict[str, int]:
    """``8:16 1048576`` lines (blkio.weight_device, blkio.throttle.*_device)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not _DEV.fullmatch(parts[0]):
            raise ValueError(line)
        out[parts[0]] = int(parts[1])
    return out


def parse_blkio_stat(text: str) -> dict[str, dict[str, int]]:
    """blkio.throttle.io_service_bytes / io_serviced -> {dev: {read, write, sync, async, discard, total}}
    (the last ``Total N`` line, the sum over devices, is left out)."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] == "Total":
            continue
        if len(parts) != 3 or not _DEV.fullmatch(parts[0]):
            raise ValueError(line)
        out.setdefault(parts[0], {})[parts[1].lower()] = int(parts[2])
    return out


def block_devices(transport: NodeTransport) -> dict[str, str]:
    """``maj:min`` -> device name, from the node's /sys/dev/block (one read_many)."""
    try:
        names = [n for n in transport.listdir("/sys/dev/block") if _DEV.fullmatch(n)]
    except OSError:
        return {}
    got = transport.read_many([f"/sys/dev/block/{n}/uevent" for n in names], limit=4096)
    out = {}
    for n in names:
        raw = got.get(f"/sys/dev/block/{n}/uevent")
        if isinstance(raw, bytes):
            m = re.search(r"^DEVNAME=(\S+)$", raw.decode("utf-8", "replace"), re.M)
            if m:
                out[n] = m.group(1)
    return out


def physical_disks(transport: NodeTransport) -> set[str] | None:
    """``maj:min`` of the node's whole disks backed by a device (sd, nvme, vd, xvd, mmcblk):
    the kernel's ``DEVTYPE=disk`` in /sys/dev/block/<maj:min>/uevent with a ``device`` link.
    Partitions (``DEVTYPE=partition``) are counted by their disk; dm, md, loop, zram, ram and
    nbd have no ``device``: dm/md stack on disks already counted and zram is memory, so
    summing them would count one I/O twice or count none. None when /sys is not readable
    (the caller falls back to device names). Two batched reads, any number of devices."""
    try:
        names = [n for n in transport.listdir("/sys/dev/block") if _DEV.fullmatch(n)]
    except OSError:
        return None
    events = transport.read_many([f"/sys/dev/block/{n}/uevent" for n in names], limit=4096)
    disks = [n for n in names if isinstance(raw := events.get(f"/sys/dev/block/{n}/uevent"), bytes)
             and re.search(rb"^DEVTYPE=disk$", raw, re.M)]
    linked = transport.stat_many([f"/sys/dev/block/{n}/device" for n in disks], follow_symlinks=False)
    return {n for n in disks if not isinstance(linked.get(f"/sys/dev/block/{n}/device"), (OSError, type(None)))}


#: (key in the report, v1 file, v2 file, parser)
IO_KNOBS = [
    ("weight", "blkio.weight", "io.weight", parse_weight),
    ("bfqWeight", "blkio.bfq.weight", "io.bfq.weight", parse_weight),
    ("bfqWeightDevice", "blkio.bfq.weight_device", None, parse_weight),
    ("weightDevice", "blkio.weight_device", None, parse_dev_values),
    ("readBps", "blkio.throttle.read_bps_device", None, parse_dev_values),
    ("writeBps", "blkio.throttle.write_bps_device", None, parse_dev_values),
    ("readIops", "blkio.throttle.read_iops_device", None, parse_dev_values),
    ("writeIops", "blkio.throttle.write_iops_device", None, parse_dev_values),
    ("max", None, "io.max", parse_nested),
    ("latency", None, "io.latency", parse_nested),
]
ROOT_KNOBS = [
    ("costQos", "blkio.cost.qos", "io.cost.qos", parse_nested),
    ("costModel", "blkio.cost.model", "io.cost.model", parse_nested),
]
_V2_MAX = {"rbps": "readBps", "wbps": "writeBps", "riops": "readIops", "wiops": "writeIops"}


def read_io(transport: NodeTransport, fs: cg.CgroupFS, cgpath: str, devnames: dict[str, str] | None = None,
            log: cg.ReadLog | None = None) -> dict | None:
    """The I/O settings of one cgroup: {"version", "weight", "bfqWeight", "devices": [...],
    and at the root "costQos"/"costModel"}. None when neither blkio nor io is mounted/enabled
    or the cgroup does not exist there."""
    ver = fs.version_of("blkio") or (2 if fs.v2 is not None and "io" in fs.v2_controllers else None)
    if ver is None:
        return None
    mount = fs.mount_for("blkio") if ver == 1 else fs.v2
    if mount is None:  # ver says which one is mounted
        return None
    d = fs._join(mount, cgpath)
    try:
        names = set(transport.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        names = None
    log = log if log is not None else cg.ReadLog()
    knobs = IO_KNOBS + (ROOT_KNOBS if cg.norm_cgpath(cgpath) == "/" else [])
    raw: dict = {}
    for key, f1, f2, parse in knobs:
        fname = f1 if ver == 1 else f2
        if fname is None:
            continue
        if names is not None and fname not in names:
            log.unsupported.append(fname)
            continue
        raw[key] = cg.read_value(transport, f"{d}/{fname}", parse, log, fname)
    devnames = devnames if devnames is not None else block_devices(transport)
    devs: dict[str, dict] = {}

    def dev(mm: str) -> dict:
        return devs.setdefault(mm, {"device": mm, "name": devnames.get(mm)})

    out: dict = {"version": ver}
    for key in ("weight", "bfqWeight"):
        w = raw.get(key)
        out[key] = w["default"] if w else None
        for mm, v in (w or {}).get("devices", {}).items():
            dev(mm)[key] = v
    for mm, v in (raw.get("weightDevice") or {}).items():
        dev(mm)["weight"] = v
    bwd = raw.get("bfqWeightDevice")  # v1: its "default" is blkio.bfq.weight's number
    if bwd:
        if out["bfqWeight"] is None:
            out["bfqWeight"] = bwd["default"]
        for mm, v in bwd["devices"].items():
            dev(mm)["bfqWeight"] = v
    for key in ("readBps", "writeBps", "readIops", "writeIops"):
        for mm, v in (raw.get(key) or {}).items():
            dev(mm)[key] = v
    for mm, kv in (raw.get("max") or {}).items():
        for k, v in kv.items():
            if k in _V2_MAX:
                dev(mm)[_V2_MAX[k]] = v
    for mm, kv in (raw.get("latency") or {}).items():
        if "target" in kv:
            dev(mm)["latencyTargetUs"] = kv["target"]
    for e in devs.values():
        e["throttled"] = any(isinstance(e.get(k), int) and e[k] > 0
                             for k in ("readBps", "writeBps", "readIops", "writeIops"))
    out["devices"] = sorted(devs.values(), key=lambda e: tuple(int(x) for x in e["device"].split(":")))
    for key in ("costQos", "costModel"):
        if key in raw and raw[key] is not None:
            out[key] = [{"device": mm, "name": devnames.get(mm), **kv} for mm, kv in sorted(raw[key].items())]
    return out


#: the weights a device can run under, by what gives them effect: "bfqWeight" when its
#: scheduler is bfq (io.bfq.weight, blkio.bfq.weight[_device]), "weight" under iocost
#: (io.cost.qos enable=1: io.weight; blkio.weight[_device] on Alinux v1, CFQ before 5.0)
WEIGHT_KINDS = ("weight", "bfqWeight")


def effective_weight(io: dict | None, device: str | None = None, kind: str = "weight"):
    """The ``kind`` weight (WEIGHT_KINDS) that applies to a device: its own line, else the
    default; None when the cgroup has no such weight."""
    if not io:
        return None
    if device:
        for e in io.get("devices", []):
            if e["device"] == device and isinstance(e.get(kind), int):
                return e[kind]
    w = io.get(kind)
    return w if isinstance(w, int) else None


def devices_used(transport: NodeTransport, fs: cg.CgroupFS, cgpath: str) -> dict[str, int] | None:
    """Devices a cgroup (and its children) has done I/O on: {maj:min: bytes}, from io.stat
    or blkio.throttle.io_service_bytes_recursive; None if the kernel does not say."""
    if fs.version_of("blkio") == 1:
        d = fs.dir("blkio", cgpath)
        for fname in ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes"):
            try:
                st = parse_blkio_stat(transport.read_text(f"{d}/{fname}"))
            except (OSError, ValueError):
                continue
            return {mm: v.get("total", v.get("read", 0) + v.get("write", 0)) for mm, v in st.items()
                    if v.get("total", v.get("read", 0) + v.get("write", 0))}
        return None
    if fs.v2 is None or "io" not in fs.v2_controllers:
        return None
    try:
        st = parse_nested(transport.read_text(fs._join(fs.v2, cgpath) + "/io.stat"))
    except (OSError, ValueError):
        return None
    return {mm: v.get("rbytes", 0) + v.get("wbytes", 0) for mm, v in st.items()
            if v.get("rbytes", 0) + v.get("wbytes", 0)}


def schedulers(transport: NodeTransport, devices: dict[str, str]) -> dict[str, str | None]:
    """maj:min -> the active I/O scheduler ([bfq] in queue/scheduler), None if unknown."""
    paths = {mm: f"/sys/dev/block/{mm}/queue/scheduler" for mm in devices}
    got = transport.read_many(list(paths.values()), limit=4096)
    out = {}
    for mm, p in paths.items():
        raw = got.get(p)
        m = re.search(r"\[([^\]]+)\]", raw.decode("utf-8", "replace")) if isinstance(raw, bytes) else None
        out[mm] = m.group(1) if m else None
    return out


def match_device(spec: str, mm: str, devnames: dict[str, str]) -> bool:
    """A policy device spec (name like vdb or /dev/vdb, or MAJ:MIN) names this device."""
    spec = spec.strip().removeprefix("/dev/")
    return spec == mm or devnames.get(mm) == spec
