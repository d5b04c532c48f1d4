"""Live interference signals: is it the batch (Kata) VMs?

Two reads of the same files ``interval`` apart, per target cgroup (each online
pod; each Kata sandbox's pod cgroup, sandbox cgroup and ``kata_overhead/<id>``)
and for the node, turned into rates. Every read of one sample is one
``read_many`` (pipelined over SSH). Signals and their files (formats as in
Documentation/admin-guide/cgroup-v2.rst and Documentation/accounting/psi.rst):

PSI           ``<res>.pressure``: ``some avg10=0.12 avg60=0.05 avg300=0.01 total=123456``
              and a ``full`` line (total in microseconds); v2 (or the unified
              hierarchy of a hybrid node) per cgroup; Alinux's PSI on v1 puts
              the same files in the cpuacct hierarchy; ``/proc/pressure/<res>`` for
              the node. ``stallPercent`` = delta(total) / interval.
CPU           ``cpu.stat``: v2 ``usage_usec``, ``nr_periods``, ``nr_throttled``,
              ``throttled_usec``; v1 ``nr_periods``, ``nr_throttled``,
              ``throttled_time`` (ns) and ``cpuacct.usage`` (ns). A runc pod's
              container children's ``cpu.stat`` too (find_containers).
memory        v2 ``memory.events`` (low high max oom oom_kill), ``memory.stat``
              (``pgscan_direct``, ``pgsteal_direct``, ``workingset_refault_anon|file``, before 5.9
              the one ``workingset_refault``; ``pgmajfault``), ``memory.current``; v1 ``memory.stat`` (``total_*``:
              hierarchical), ``memory.failcnt``, ``memory.oom_control`` (``oom_kill``),
              ``memory.usage_in_bytes``; the node's ``/proc/vmstat``.
              v1's ``memory.pressure_level`` is an eventfd notifier
              (cgroup.event_control), not a readable value: noted, not sampled.
I/O           v2 ``io.stat`` (rbytes wbytes rios wios per device); v1
              ``blkio.throttle.io_service_bytes_recursive`` / ``io_serviced_recursive``;
              the node's ``/proc/diskstats``.
Alinux extras ``cpuacct.{wait,cgroup_wait,block,ioblock}_latency`` (sched_sli,
              switch ``/proc/cpusli/sched_lat_enabled``) and
              ``memory.direct_{reclaim_global,reclaim_memcg,compact}_latency``
              (memsli, ``/proc/memsli/enabled``), ``memory.exstat``: bucket
              deltas where the files exist, never required.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from katactl.errors import NotFound, UsageError
from katactl.isolation import cgroups as cg
from katactl.isolation import io as iomod
from katactl.backends.base import NodeTransport

RESOURCES = ("cpu", "memory", "io")
MAX_INTERVAL = 60.0
MIN_INTERVAL = 0.1
#: the clock and the wait between samples (tests replace them to move counters between samples)
_clock = time.monotonic
_sleep = time.sleep
ALINUX_CPU = ("cpuacct.wait_latency", "cpuacct.cgroup_wait_latency", "cpuacct.block_latency",
              "cpuacct.ioblock_latency")
ALINUX_MEM = ("memory.direct_reclaim_global_latency", "memory.direct_reclaim_memcg_latency",
              "memory.direct_compact_latency", "memory.exstat")


def parse_interval(value) -> float:
    from katactl.values import parse_duration

    secs = parse_duration(value, what="--interval") if isinstance(value, str) else float(value)
    if not MIN_INTERVAL <= secs <= MAX_INTERVAL:
        raise UsageError(f"invalid --interval {value!r}: between {MIN_INTERVAL * 1000:g}ms and {MAX_INTERVAL:g}s "
                         "(two samples that far apart)")
    return secs


# -- parsers -------------------------------------------------------------------

def parse_psi(text: str) -> dict:
    """``some avg10=.. avg60=.. avg300=.. total=..`` (+ ``full``) -> {some: {...}, full: {...}}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] not in ("some", "full"):
            raise ValueError(line)
        d = {}
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            d[k] = int(v) if k == "total" else float(v)
        if "total" not in d:
            raise ValueError(line)
        out[parts[0]] = d
    if "some" not in out:
        raise ValueError("no 'some' line")
    return out


def parse_flat(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat, memory.events, oom_control, vmstat)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    if not out and text.strip():
        raise ValueError("no 'key value' lines")
    return out


def parse_int(text: str) -> int:
    return int(text.strip())


def parse_histogram(text: str) -> dict[str, int]:
    """Alinux latency histograms (``0-1ms: 12`` / ``total(ms): 5`` / ``key value``): label -> count."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        label, sep, val = line.rpartition(":") if ":" in line else line.rpartition(" ")
        try:
            out[label.strip()] = int(val.strip())
        except ValueError:
            continue
    return out


def parse_diskstats(text: str) -> dict[str, dict]:
    """/proc/diskstats -> {maj:min: {name, rios, rbytes, wios, wbytes}} (sectors are 512 bytes)."""
    out = {}
    for line in text.splitlines():
        p = line.split()
        if len(p) < 10:
            continue
        try:
            out[f"{int(p[0])}:{int(p[1])}"] = {"name": p[2], "rios": int(p[3]), "rbytes": int(p[5]) * 512,
                                               "wios": int(p[7]), "wbytes": int(p[9]) * 512}
        except ValueError:
            continue
    return out


PARSERS = {"psi": parse_psi, "flat": parse_flat, "int": parse_int, "iostat": iomod.parse_nested,
           "blkio": iomod.parse_blkio_stat, "hist": parse_histogram, "diskstats": parse_diskstats}


# -- targets -------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    role: str                 # node | pod | sandbox | overhead | cgroup
    cls: str | None           # online | offline | system
    path: str | None          # cgroup path; None for the node
    pod: dict | None = None   # the sandbox's {name, namespace, uid}, as in sandbox list
    pod_uid: str | None = None
    sandbox: str | None = None
    #: a pod cgroup's container children: each has its own quota, which the pod's cpu.stat
    #: does not count (see find_containers)
    containers: list[str] = dataclasses.field(default_factory=list)

    @property
    def pod_ref(self) -> str | None:
        from katactl.sandbox import pod_ref

        return pod_ref(self.pod)

    @property
    def label(self) -> str:
        if self.role == "node":
            return "node"
        if self.role in ("sandbox", "overhead") or (self.role == "pod" and self.sandbox):
            who = self.pod_ref or (self.sandbox or "")[:12]
            return f"{who} ({self.role})"
        return self.pod_ref or (f"pod uid {self.pod_uid}" if self.pod_uid else self.path or "")


def default_targets(node) -> list[Target]:
    """The node, every online pod, and every Kata sandbox (pod cgroup, sandbox cgroup, overhead)."""
    from katactl.isolation import report

    t, fs = node.t, node.fs
    out = [Target("node", "system", None)]
    by_pod = node.sandbox_by_pod_cgroup()
    ctl = "cpu" if fs.mount_for("cpu") else "memory"
    for e in cg.kubepods_tree(t, fs, controller=ctl, max_depth=2):
        if e["level"] != "pod":
            continue
        sb = by_pod.get(e["path"]) or by_pod.get("uid:" + (e["podUid"] or ""))
        if sb is not None:
            continue  # below, with its sandbox
        cls = report.workload_class(e, None)
        if cls == "online":
            out.append(Target("pod", "online", e["path"], pod_uid=e["podUid"]))
    for sb in node.sandboxes:
        out += sandbox_targets(node, sb)
    return out


def sandbox_targets(node, sb) -> list[Target]:
    sp, op = node.sandbox_cgroup(sb), node.overhead_cgroup(sb)
    pod = cg.pod_cgroup_path(sp) if sp else None
    uid = (sb.pod or {}).get("uid")
    out = []
    kw = {"pod": sb.pod, "pod_uid": uid, "sandbox": sb.id}
    if pod and pod != sp:
        out.append(Target("pod", "offline", pod, **kw))
    if sp:
        out.append(Target("sandbox", "offline", sp, **kw))
    if op:
        out.append(Target("overhead", "offline", op, **kw))
    return out


def resolve_targets(node, refs: list[str]) -> list[Target]:
    """TARGETs: ``node``, a cgroup path or cgroupfs directory, a pod uid, or a sandbox."""
    from katactl.isolation import report

    out: list[Target] = []
    for ref in refs:
        if ref == "node":
            out.append(Target("node", "system", None))
        elif ref.startswith("/"):
            p = node.fs.resolve_path(ref)
            info = cg.classify(p)
            out.append(Target("cgroup", report.workload_class(info, None) if info["level"] != "other" else None, p,
                              pod_uid=info.get("podUid")))
        elif ref.startswith("pod/") and report._UID_RE.fullmatch(ref[4:]) or report._UID_RE.fullmatch(ref):
            uid = ref.removeprefix("pod/").replace("_", "-")
            p = report.find_pod_cgroup(node, uid)
            sb = node.sandbox_by_pod_cgroup().get(p)
            if sb is not None:
                out += sandbox_targets(node, sb)
            else:
                out.append(Target("pod", report.workload_class(cg.classify(p), None), p, pod_uid=uid))
        else:
            sb = node.resolve_sandbox(ref)
            ts = sandbox_targets(node, sb)
            if not ts:
                raise NotFound(f"sandbox {sb.id}: its state file records no cgroup path")
            out += ts
    return out


def find_containers(transport: NodeTransport, fs: cg.CgroupFS, tgs: list[Target]) -> None:
    """Fill each runc pod target's ``containers`` (one listing of every pod, pipelined).

    kubelet sets a pod cgroup's CFS quota to the sum of its containers' limits (kubernetes
    ``pkg/kubelet/cm/helpers_linux.go`` ``ResourceConfigForPod``) and each container cgroup
    its own; a container throttled by its limit leaves the pod's ``nr_throttled`` at 0 (a
    group's counts the periods its own quota ran out: linux ``kernel/sched/fair.c``), so a
    sidecar pod's throttling shows only in the container's cpu.stat. A Kata pod's child is
    its sandbox cgroup, a target of its own."""
    pods: dict[str, tuple[Target, str]] = {}
    for tg in tgs:
        if tg.path and not tg.sandbox and (tg.role == "pod" or tg.role == "cgroup" and
                                           cg.classify(tg.path)["level"] == "pod"):
            d = fs.dir("cpu", tg.path)
            if d:
                pods[d] = (tg, tg.path)
    if not pods:
        return
    for d, names in transport.list_dirs(list(pods)).items():
        if isinstance(names, OSError):
            continue  # the pod went away: its own files say so
        tg, path = pods[d]
        for n in names:
            if n in cg.NOT_DIRS or "." in n and not n.endswith(".scope"):
                continue  # a knob file (cpu.stat, tasks): containers are <id> or <runtime>-<id>.scope
            child = path.rstrip("/") + "/" + n
            if cg.classify(child)["level"] == "container":
                tg.containers.append(child)


# -- files ---------------------------------------------------------------------

def kernel_extras(transport: NodeTransport, fs: cg.CgroupFS) -> frozenset:
    """The Alinux extra files this kernel has, probed once per node in the kubepods cgroup
    (the root memcg lacks some of them), so nodes without them pay no reads per cgroup."""
    names: set = set()
    for ctl in ("memory", "cpuacct"):
        for p in ("/kubepods", "/kubepods.slice", "/"):
            d = fs.dir(ctl, p) if ctl in fs.v1 or ctl == "memory" else None
            if not d:
                continue
            try:
                names |= set(transport.listdir(d))
                break
            except OSError:
                continue
    return frozenset(n for n in ALINUX_CPU + ALINUX_MEM if n in names)


def target_files(fs: cg.CgroupFS, tg: Target, extras: frozenset | None = None) -> dict[str, list[tuple[str, str]]]:
    """signal -> candidate (node path, parser) list; the first that reads wins. ``extras``:
    the Alinux files to look for (None = all of them)."""
    f: dict[str, list[tuple[str, str]]]
    if tg.path is None:
        f = {f"psi.{r}": [(f"/proc/pressure/{r}", "psi")] for r in RESOURCES}
        f["vmstat"] = [("/proc/vmstat", "flat")]
        f["diskstats"] = [("/proc/diskstats", "diskstats")]
        return f
    p = tg.path
    f = {}
    uni = fs._join(fs.v2, p) if fs.v2 is not None else None
    acct = fs.dir("cpuacct", p) if "cpuacct" in fs.v1 else None
    for r in RESOURCES:
        f[f"psi.{r}"] = [(d + f"/{r}.pressure", "psi") for d in (uni, acct) if d]
    cpu_v = fs.version_of("cpu")
    cdir = fs.dir("cpu", p)
    if cdir:
        f["cpu.stat"] = [(cdir + "/cpu.stat", "flat")]
        for c in tg.containers:
            f["ctr.cpu.stat:" + c] = [(f"{cdir}/{c.rsplit('/', 1)[1]}/cpu.stat", "flat")]
    if cpu_v == 1 and acct:
        f["cpuacct.usage"] = [(acct + "/cpuacct.usage", "int")]
    mdir = fs.dir("memory", p)
    if mdir:
        if fs.version_of("memory") == 2:
            f["memory.events"] = [(mdir + "/memory.events", "flat")]
            f["memory.usage"] = [(mdir + "/memory.current", "int")]
        else:
            f["memory.failcnt"] = [(mdir + "/memory.failcnt", "int")]
            f["memory.oom_control"] = [(mdir + "/memory.oom_control", "flat")]
            f["memory.usage"] = [(mdir + "/memory.usage_in_bytes", "int")]
        f["memory.stat"] = [(mdir + "/memory.stat", "flat")]
        for name in ALINUX_MEM:
            if extras is None or name in extras:
                f["x." + name] = [(f"{mdir}/{name}", "hist")]
    if acct:
        for name in ALINUX_CPU:
            if extras is None or name in extras:
                f["x." + name] = [(f"{acct}/{name}", "hist")]
    b = fs.dir("blkio", p) if fs.version_of("blkio") == 1 else None
    if b is not None:
        f["io.bytes"] = [(b + "/blkio.throttle.io_service_bytes_recursive", "blkio"),
                         (b + "/blkio.throttle.io_service_bytes", "blkio")]
        f["io.ios"] = [(b + "/blkio.throttle.io_serviced_recursive", "blkio"),
                       (b + "/blkio.throttle.io_serviced", "blkio")]
    elif uni is not None:
        f["io.stat"] = [(uni + "/io.stat", "iostat")]
    return f


@dataclasses.dataclass
class Sample:
    at: float
    raw: dict  # node path -> bytes | OSError


def take_sample(transport: NodeTransport, paths: list[str]) -> Sample:
    t0 = _clock()
    raw = transport.read_many(paths, limit=1 << 20)
    return Sample((t0 + _clock()) / 2, raw)


def _pick(sample: Sample, cands: list[tuple[str, str]]) -> tuple[str, Any] | None:
    """(path, parsed value) of the first candidate that reads; (path, OSError|ValueError) of
    the first failure that is not 'missing'; None if every candidate is missing."""
    err: tuple[str, Exception] | None = None
    for path, kind in cands:
        v = sample.raw.get(path)
        if isinstance(v, bytes):
            try:
                return path, PARSERS[kind](v.decode("utf-8", "replace"))
            except (ValueError, IndexError) as e:
                err = err or (path, ValueError(f"unexpected content: {e}"))
        elif isinstance(v, (FileNotFoundError, NotADirectoryError)) or v is None:
            continue
        elif isinstance(v, OSError):
            # ENODEV/EOPNOTSUPP (psi=0 boots: the file exists, reading fails) = unsupported
            if getattr(v, "errno", None) in (19, 95):
                continue
            err = err or (path, v)
    return err


# -- rates ---------------------------------------------------------------------

def _rate(a, b, dt, scale=1.0, nd=3):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or dt <= 0:
        return None
    d = b - a
    if d < 0:  # a counter reset (cgroup re-created between samples)
        return None
    return round(d / dt * scale, nd)


def _delta(a, b):
    if not isinstance(a, int) or not isinstance(b, int) or b < a:
        return None
    return b - a


def compute(fs: cg.CgroupFS, tg: Target, files: dict, s1: Sample, s2: Sample,
            disks: set[str] | None = None) -> dict:
    """One target's row. ``disks``: the node's physical disks (io.physical_disks), which
    alone make the node row's I/O (None: judged by device name)."""
    dt = s2.at - s1.at
    row: dict = {"target": tg.label, "role": tg.role, "class": tg.cls, "pod": tg.pod, "podRef": tg.pod_ref,
                 "podUid": tg.pod_uid,
                 "sandbox": tg.sandbox, "path": tg.path}
    unsupported, unreadable, ev = [], [], {}
    got: dict[str, tuple] = {}
    for sig, cands in files.items():
        first, last = _pick(s1, cands), _pick(s2, cands)
        if last is None:
            if (first is None or not isinstance(first[1], Exception)) and not sig.startswith("ctr."):
                unsupported.append(sig.removeprefix("x."))  # a container that ended is not a missing knob
            continue
        if isinstance(last[1], Exception):
            unreadable.append({"file": last[0], "error": getattr(last[1], "strerror", None) or str(last[1])})
            continue
        if first is None or isinstance(first[1], Exception) or first[0] != last[0]:
            got[sig] = (last[0], None, last[1])
        else:
            got[sig] = (last[0], first[1], last[1])
        ev[sig] = last[0]
    gone = tg.path is not None and not any(isinstance(s2.raw.get(p), bytes) for c in files.values() for p, _ in c)
    # PSI
    psi: dict[str, Any] = {}
    for r in RESOURCES:
        g = got.get(f"psi.{r}")
        if not g:
            psi[r] = None
            continue
        _, a, b = g
        psi[r] = {}
        for line in ("some", "full"):
            if line not in b:
                if tg.path is not None:  # a cgroup's CPU "full" line came in 5.13 (psi.rst)
                    unsupported.append(f"psi.{r}.{line}")
                continue
            ent = {k: b[line].get(k) for k in ("avg10", "avg60", "avg300")}
            rate = _rate(a[line]["total"], b[line]["total"], dt, scale=100 / 1e6, nd=2) \
                if a and line in a else None
            ent["stallPercent"] = min(100.0, rate) if rate is not None else None
            psi[r][line] = ent
    row["psi"] = psi
    # CPU
    cpu = {}
    g = got.get("cpu.stat")
    if g:
        _, a, b = g
        a = a or {}
        cpu.update(_throttling(a, b, dt))
        if "usage_usec" in b:
            cpu["usageCores"] = _rate(a.get("usage_usec"), b["usage_usec"], dt, 1e-6)
    g = got.get("cpuacct.usage")
    if g:
        cpu["usageCores"] = _rate(g[1], g[2], dt, 1e-9)
    ctrs = [{"path": sig.removeprefix("ctr.cpu.stat:"), "file": path, **_throttling(a or {}, b, dt)}
            for sig, (path, a, b) in sorted(got.items()) if sig.startswith("ctr.cpu.stat:")]
    if ctrs:
        cpu["containers"] = ctrs
    row["cpu"] = cpu or None
    # memory
    mem: dict = {}
    if tg.path is None:
        g = got.get("vmstat")
        if g:
            a, b = g[1] or {}, g[2]
            mem.update(_reclaim(a, b, dt, ""))
            mem["allocstallPerSec"] = _sum_rate(a, b, dt, [k for k in b if k.startswith("allocstall")])
            mem["events"] = {"oomKill": _delta(a.get("oom_kill"), b.get("oom_kill"))}
    else:
        g = got.get("memory.usage")
        if g:
            mem["usageBytes"] = g[2]
        g = got.get("memory.events")
        if g:
            a, b = g[1] or {}, g[2]
            mem["events"] = {k2: _delta(a.get(k), b.get(k)) for k, k2 in
                             (("low", "low"), ("high", "high"), ("max", "max"), ("oom", "oom"), ("oom_kill", "oomKill"))
                             if k in b}
        g = got.get("memory.failcnt")
        if g:
            mem.setdefault("events", {})["max"] = _delta(g[1], g[2])  # v1: hits of the limit
        g = got.get("memory.oom_control")
        if g:
            a, b = g[1] or {}, g[2]
            if "oom_kill" in b:
                mem.setdefault("events", {})["oomKill"] = _delta(a.get("oom_kill"), b["oom_kill"])
            mem["underOom"] = b.get("under_oom")
        g = got.get("memory.stat")
        if g:
            a, b = g[1] or {}, g[2]
            pre = "total_" if "total_cache" in b else ""  # v1: total_* are hierarchical
            mem.update(_reclaim(a, b, dt, pre))
            unsupported += [f"memory.stat:{k}" for k in ("pgscan_direct", "pgsteal_direct")
                            if k not in b and pre + k not in b]
            if "refaultAnonPerSec" not in mem and "refaultFilePerSec" not in mem:
                unsupported.append("memory.stat:workingset_refault")  # no workingset counter in this memory.stat
        if fs.version_of("memory") == 1:
            mem["pressureLevel"] = "eventfd notifier only (memory.pressure_level via cgroup.event_control)"
    row["memory"] = mem or None
    # I/O
    row["io"] = _io_rates(got, dt, tg, disks)
    # Alinux extras
    extras = {}
    for sig, (_path, a, b) in got.items():
        if sig.startswith("x."):
            extras[sig[2:]] = {k: _delta((a or {}).get(k), v) for k, v in b.items()} if a else {k: None for k in b}
    if extras:
        row["extras"] = extras
    row["unsupported"] = sorted(set(unsupported))
    if unreadable:
        row["unreadable"] = unreadable
    if gone:
        row["gone"] = True
    row["_files"] = ev
    return row


def _throttling(a: dict, b: dict, dt: float) -> dict:
    """periods, throttledPeriods, throttledPercent, throttledMsPerSec of two cpu.stat reads."""
    if "nr_periods" not in b:
        return {}
    dper, dthr = _delta(a.get("nr_periods"), b["nr_periods"]), _delta(a.get("nr_throttled"), b.get("nr_throttled"))
    out = {"periods": dper, "throttledPeriods": dthr,
           "throttledPercent": round(100 * dthr / dper, 2) if dper and dthr is not None else (0.0 if dper == 0 else None)}
    if "throttled_usec" in b:
        out["throttledMsPerSec"] = _rate(a.get("throttled_usec"), b["throttled_usec"], dt, 1e-3, 2)
    elif "throttled_time" in b:
        out["throttledMsPerSec"] = _rate(a.get("throttled_time"), b["throttled_time"], dt, 1e-6, 2)
    return out


def worst_throttling(r: dict, key: str = "throttledPercent") -> tuple[float | None, str | None]:
    """(value, cpu.stat file) of the most throttled of a row's cgroup and its containers."""
    cpu = r.get("cpu") or {}
    best, where = cpu.get(key), (r.get("_files") or {}).get("cpu.stat")
    for c in cpu.get("containers") or []:
        v = c.get(key)
        if isinstance(v, (int, float)) and (not isinstance(best, (int, float)) or v > best):
            best, where = v, c["file"]
    return best, where


def _reclaim(a: dict, b: dict, dt: float, pre: str) -> dict:
    out = {}
    for key, name in (("pgscan_direct", "pgscanDirectPerSec"), ("pgsteal_direct", "pgstealDirectPerSec"),
                      ("workingset_refault_anon", "refaultAnonPerSec"),
                      ("workingset_refault_file", "refaultFilePerSec"), ("pgmajfault", "pgmajfaultPerSec")):
        k = pre + key
        if k in b:
            out[name] = _rate(a.get(k), b[k], dt, nd=1)
        elif key in b:
            out[name] = _rate(a.get(key), b[key], dt, nd=1)
    if "refaultAnonPerSec" not in out and "refaultFilePerSec" not in out:
        # before 5.9 one counter, file pages only (anon refaults are tracked since
        # 170b04b7ae49 split it into _anon/_file; mm/vmstat.c vmstat_text)
        for k in (pre + "workingset_refault", "workingset_refault"):
            if k in b:
                out["refaultFilePerSec"] = _rate(a.get(k), b[k], dt, nd=1)
                break
    return out


def _sum_rate(a: dict, b: dict, dt: float, keys: list[str]):
    if not keys:
        return None
    try:
        return _rate(sum(a[k] for k in keys), sum(b[k] for k in keys), dt, nd=1)
    except KeyError:
        return None


def _io_rates(got: dict, dt: float, tg: Target, disks: set[str] | None = None) -> dict | None:
    devs: dict[str, dict] = {}
    if tg.path is None:
        g = got.get("diskstats")
        if not g:
            return None
        a, b = g[1] or {}, g[2]
        for mm, v in b.items():
            if disks is not None:
                if mm not in disks:
                    continue  # partitions, dm/md stacks, loops, zram: see io.physical_disks
            elif v["name"].startswith(("loop", "ram", "zram", "dm-", "md", "nbd")) or re.fullmatch(
                    r"(sd[a-z]+|vd[a-z]+|xvd[a-z]+)\d+|(nvme\d+n\d+|mmcblk\d+)p\d+", v["name"]):
                continue  # no /sys: judged by name (partitions are counted by their disk)
            p = a.get(mm, {})
            devs[mm] = {"device": mm, "name": v["name"], "readBytesPerSec": _rate(p.get("rbytes"), v["rbytes"], dt, nd=1),
                        "writeBytesPerSec": _rate(p.get("wbytes"), v["wbytes"], dt, nd=1),
                        "readIops": _rate(p.get("rios"), v["rios"], dt, nd=1),
                        "writeIops": _rate(p.get("wios"), v["wios"], dt, nd=1)}
    elif got.get("io.stat"):
        _, a, b = got["io.stat"]
        a = a or {}
        for mm, v in b.items():
            p = a.get(mm, {})
            devs[mm] = {"device": mm, "readBytesPerSec": _rate(p.get("rbytes"), v.get("rbytes"), dt, nd=1),
                        "writeBytesPerSec": _rate(p.get("wbytes"), v.get("wbytes"), dt, nd=1),
                        "readIops": _rate(p.get("rios"), v.get("rios"), dt, nd=1),
                        "writeIops": _rate(p.get("wios"), v.get("wios"), dt, nd=1)}
    elif got.get("io.bytes") or got.get("io.ios"):
        for sig, rk, wk in (("io.bytes", "readBytesPerSec", "writeBytesPerSec"), ("io.ios", "readIops", "writeIops")):
            g = got.get(sig)
            if not g:
                continue
            a, b = g[1] or {}, g[2]
            for mm, v in b.items():
                p = a.get(mm, {})
                d = devs.setdefault(mm, {"device": mm})
                d[rk] = _rate(p.get("read"), v.get("read"), dt, nd=1)
                d[wk] = _rate(p.get("write"), v.get("write"), dt, nd=1)
    else:
        return None
    rows = sorted(devs.values(), key=lambda e: tuple(int(x) for x in e["device"].split(":")))
    tot = {}
    for k in ("readBytesPerSec", "writeBytesPerSec", "readIops", "writeIops"):
        vals = [v for d in rows if isinstance(v := d.get(k), (int, float))]
        tot[k] = round(sum(vals), 1) if vals else (0.0 if not rows else None)
    return {**tot, "devices": rows}


# -- one report ------------------------------------------------------------------

class Session:
    """Samples of one node kept between refreshes (``--watch``): each refresh is
    one new sample compared with the previous one."""

    def __init__(self, interval: float, refs: list[str] | None = None):
        self.interval = interval
        self.refs = refs or []
        self.prev: Sample | None = None
        self.disks: set[str] | None = None  # the node's physical disks, read once
        self._disks_read = False

    def refresh(self, transport: NodeTransport, fail_rules: list | None = None) -> dict:
        from katactl.isolation.report import Node

        node = Node(transport)
        node.fs.require()
        tgs = resolve_targets(node, self.refs) if self.refs else default_targets(node)
        find_containers(transport, node.fs, tgs)
        extras = kernel_extras(transport, node.fs)
        files = [target_files(node.fs, tg, extras) for tg in tgs]
        paths = sorted({p for f in files for c in f.values() for p, _ in c})
        if self.prev is None:
            s1 = take_sample(transport, paths)
            _sleep(self.interval)
        else:
            # a target new since the last refresh has no first sample here: read now, just
            # before the second, its rates would be ~0 over the whole interval; it is unmeasured
            # ("new") until the next refresh
            s1 = self.prev
        s2 = take_sample(transport, paths)
        self.prev = s2
        if not self._disks_read and any(tg.path is None for tg in tgs):
            self._disks_read = True
            self.disks = iomod.physical_disks(transport) or None  # none found: judged by name
        rows = [compute(node.fs, tg, f, s1, s2, self.disks) for tg, f in zip(tgs, files, strict=True)]
        for r, f in zip(rows, files, strict=True):
            if r["path"] is not None and not any(p in s1.raw for c in f.values() for p, _ in c):
                r["new"] = True
        for r in rows:
            if r["role"] != "node" and r.get("io"):
                for d in r["io"]["devices"]:
                    d["name"] = node.devices.get(d["device"])
        meta = {"interval": round(s2.at - s1.at, 3), "hierarchy": node.fs.mode,
                "psi": _psi_support(node, rows), "targets": len(rows),
                "sandboxes": len({r["sandbox"] for r in rows if r.get("sandbox")}),
                "onlinePods": sum(1 for r in rows if r["class"] == "online")}
        meta["summary"] = summarize(rows)
        if fail_rules:
            meta["failOn"] = check_rules(rows, fail_rules, explicit=bool(self.refs))
        for r in rows:
            r.pop("_files", None)
        return {"meta": meta, "items": rows}


def _psi_support(node, rows) -> str:
    cg_rows = [r for r in rows if r["path"]]
    if not cg_rows:
        return "node only"
    with_psi = sum(1 for r in cg_rows if any(r["psi"].get(x) for x in RESOURCES))
    if with_psi == len(cg_rows):
        return "per cgroup"
    if with_psi:
        return f"per cgroup for {with_psi} of {len(cg_rows)} targets"
    return ("node only: no <res>.pressure in these cgroups (cgroup v1 without Alinux PSI, "
            "or pods not in the unified hierarchy)")


# -- summary ---------------------------------------------------------------------

def _stall(r: dict, res: str):
    p = (r.get("psi") or {}).get(res) or {}
    s = (p.get("some") or {}).get("stallPercent")
    return s


def _pressure_score(r: dict) -> tuple[float, str | None, dict]:
    """(score, resource, evidence) of the worst signal of one row."""
    best: tuple[float, str | None, dict] = (0.0, None, {})
    for res in RESOURCES:
        s = _stall(r, res)
        if isinstance(s, (int, float)) and s > best[0]:
            best = (s, res, {"metric": f"{res}.some", "value": s, "file": r["_files"].get(f"psi.{res}")})
    thr, thr_file = worst_throttling(r)
    if isinstance(thr, (int, float)) and thr > best[0]:
        best = (thr, "cpu", {"metric": "cpu.throttled", "value": thr, "file": thr_file})
    mem = r.get("memory") or {}
    scan = mem.get("pgscanDirectPerSec")
    if best[1] is None and isinstance(scan, (int, float)) and scan > 0:
        best = (0.0, "memory", {"metric": "memory.direct-reclaim", "value": scan,
                                "file": r["_files"].get("memory.stat")})
    return best


def _usage(rows: list[dict], res: str) -> list[dict]:
    """Kata sandboxes ranked by their use of a resource (pod cgroup, which holds the
    sandbox cgroup, plus kata_overhead/<id>; the sandbox cgroup when there is no pod one)."""
    per: dict[str, dict] = {}
    for r in rows:
        if not r.get("sandbox") or r["role"] not in ("pod", "sandbox", "overhead"):
            continue
        if res == "cpu":
            v = (r.get("cpu") or {}).get("usageCores")
        elif res == "memory":
            v = (r.get("memory") or {}).get("usageBytes")
        else:
            iod = r.get("io") or {}
            parts = [iod.get("readBytesPerSec"), iod.get("writeBytesPerSec")]
            v = sum(x for x in parts if isinstance(x, (int, float))) if any(
                isinstance(x, (int, float)) for x in parts) else None
        if not isinstance(v, (int, float)):
            continue
        e = per.setdefault(r["sandbox"], {"sandbox": r["sandbox"], "pod": r.get("pod"),
                                          "podRef": r.get("podRef"), "parts": {}})
        e["parts"][r["role"]] = v
    out = []
    for e in per.values():
        parts = e.pop("parts")
        v = (parts.get("pod") if "pod" in parts else parts.get("sandbox", 0)) + parts.get("overhead", 0)
        out.append({**e, "resource": res, "value": round(v, 3),
                    "unit": {"cpu": "cores", "memory": "bytes", "io": "bytes/s"}[res]})
    out.sort(key=lambda e: -e["value"])
    return out


def summarize(rows: list[dict], top: int = 3) -> dict:
    online = []
    for r in rows:
        if r["class"] != "online":
            continue
        score, res, ev = _pressure_score(r)
        if res is not None:
            online.append({"target": r["target"], "podUid": r.get("podUid"), "path": r["path"], "resource": res,
                           "score": score, "evidence": ev})
    online.sort(key=lambda e: -e["score"])
    worst = online[:top]
    node = next((r for r in rows if r["role"] == "node"), None)
    contended = worst[0]["resource"] if worst else None
    if contended is None and node is not None:
        sc, contended, _ = _pressure_score(node)
        if not sc:
            contended = None
    out = {"worstOnline": worst, "contended": contended,
           "topSandboxes": _usage(rows, contended)[:top] if contended else []}
    if node is not None:
        out["node"] = {r: _stall(node, r) for r in RESOURCES}
    return out


def summary_line(meta: dict) -> str:
    s = meta.get("summary") or {}
    w = s.get("worstOnline") or []
    node = s.get("node") or {}
    nodes = ", ".join(f"{r}.some {v:g}%" for r, v in node.items() if isinstance(v, (int, float)))
    head = f"node {nodes}; " if nodes else ""
    if not w:
        line = head + f"no online pod shows pressure over {meta.get('interval', 0):g}s"
    else:
        e = w[0]
        line = head + f"worst online: {e['target']} {e['evidence']['metric']} {e['evidence']['value']:g}"
        line += "%" if e["evidence"]["metric"] != "memory.direct-reclaim" else " pages/s"
    tops = s.get("topSandboxes") or []
    if tops:
        def fmt(x):
            if x["unit"] == "cores":
                return f"{x['value']:.2f} cores"
            from katactl.values import format_size
            return format_size(int(x["value"])) + ("/s" if x["unit"] == "bytes/s" else "")
        line += (f"; top Kata sandboxes by {s['contended']}: "
                 + ", ".join(f"{x['podRef'] or x['sandbox'][:12]} {fmt(x)}" for x in tops))
    fo = meta.get("failOn")
    if fo:
        line += f"; --fail-on {'passed' if fo['passed'] else 'FAILED: ' + str(len(fo['violations'])) + ' violations'}"
        if fo.get("unknown"):
            line += f", {len(fo['unknown'])} not measured ({fo['unknown'][0]['target']} {fo['unknown'][0]['metric']}: " \
                    f"{fo['unknown'][0]['reason']})"
    return line


# -- --fail-on -------------------------------------------------------------------

def _psi_get(res, line, key="stallPercent"):
    return lambda r: (((r.get("psi") or {}).get(res) or {}).get(line) or {}).get(key)


def _refault(anon, file):
    """anon + file refaults; no counter at all is not 0 refaults but unmeasured (None)."""
    vals = [v for v in (anon, file) if isinstance(v, (int, float))]
    return sum(vals) if vals else None


METRICS: dict[str, tuple] = {}
for _r in RESOURCES:
    for _l in ("some", "full"):
        METRICS[f"{_r}.{_l}"] = (_psi_get(_r, _l), f"% of the interval with {_l} {_r} stall (PSI total delta)")
        for _a in ("avg10", "avg60", "avg300"):
            METRICS[f"{_r}.{_l}.{_a}"] = (_psi_get(_r, _l, _a), f"the kernel's PSI {_a}")
METRICS["cpu.throttled"] = (lambda r: worst_throttling(r)[0], "% of CFS periods throttled")
METRICS["cpu.throttled-ms"] = (lambda r: worst_throttling(r, "throttledMsPerSec")[0], "throttled ms per second")
METRICS["memory.direct-reclaim"] = (lambda r: (r.get("memory") or {}).get("pgscanDirectPerSec"),
                                   "pages scanned by direct reclaim per second")
METRICS["memory.refault"] = (lambda r: _refault((r.get("memory") or {}).get("refaultAnonPerSec"),
                                                (r.get("memory") or {}).get("refaultFilePerSec")),
                             "workingset refaults per second")
METRICS["memory.oom"] = (lambda r: ((r.get("memory") or {}).get("events") or {}).get("oomKill"),
                         "OOM kills during the interval")
METRICS["memory.max"] = (lambda r: ((r.get("memory") or {}).get("events") or {}).get("max"),
                         "times the memory limit was hit during the interval")
_RULE = re.compile(r"\s*([a-z][a-z0-9.-]*)\s*(>=|<=|>|<)\s*([0-9]+(?:\.[0-9]+)?)\s*")
_OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


def parse_rules(text: str | None) -> list[tuple[str, str, float]]:
    """``cpu.some>10,memory.full>1`` -> [(metric, op, number)]; anything else is exit 2."""
    if text is None:
        return []
    if not text.strip():
        raise UsageError("empty --fail-on: expected METRIC>NUMBER[,...] (e.g. 'cpu.some>10,memory.full>1')")
    out = []
    for part in text.split(","):
        m = _RULE.fullmatch(part)
        if not m:
            raise UsageError(f"invalid --fail-on rule {part.strip()[:60]!r}: expected METRIC>NUMBER "
                             "(operators > >= < <=, e.g. cpu.some>10)")
        if m.group(1) not in METRICS:
            raise UsageError(f"unknown --fail-on metric {m.group(1)!r} (metrics: {', '.join(METRICS)})")
        out.append((m.group(1), m.group(2), float(m.group(3))))
    return out


#: metrics the node as a whole has no value for, and why: skipped there (with a warning), never
#: "unknown". CPU "full" is undefined at the system level: Documentation/accounting/psi.rst
#: ("reported since 5.13, so it is set to zero"); before 5.13 /proc/pressure/cpu has no
#: "full" line at all. Skipped on every kernel, so one rule means the same on each.
NOT_FOR_NODE = {
    **{m: "the node has no CFS quota" for m in ("cpu.throttled", "cpu.throttled-ms")},
    "memory.max": "the node has no memory limit",
    **{f"cpu.full{a}": "CPU full is undefined at the system level (psi.rst: 0 since 5.13)"
       for a in ("", ".avg10", ".avg60", ".avg300")},
}
#: the signal (compute's file keys) each metric family is read from, to say why it is missing
_SOURCE = {"cpu.throttled": ("cpu.stat",), "memory.direct-reclaim": ("memory.stat", "vmstat"),
           "memory.refault": ("memory.stat", "vmstat", "memory.stat:workingset_refault"),
           "memory.oom": ("memory.events", "memory.oom_control", "vmstat"),
           "memory.max": ("memory.events", "memory.failcnt")}


def _why_missing(r: dict, metric: str) -> tuple[str, str]:
    """(kind, reason): "unreadable" (a file that exists could not be read), "unsupported"
    (this hierarchy or kernel has no such file or counter) or "unmeasured"."""
    fam = metric if metric in _SOURCE else "cpu.throttled" if metric.startswith("cpu.throttled") else None
    res, line = (metric.split(".") + [""])[:2]
    srcs = _SOURCE.get(fam or "", (f"psi.{res}", f"psi.{res}.{line}"))
    for u in r.get("unreadable") or []:
        if any(u["file"].endswith("/" + x.removeprefix("psi.") + (".pressure" if x.startswith("psi.") else ""))
               for x in srcs):
            return "unreadable", f"{u['file']}: {u['error']}"
    missing = [x for x in srcs if x in (r.get("unsupported") or [])]
    if missing:
        return "unsupported", f"unsupported here: {', '.join(missing)}"
    return "unmeasured", "no value measured"


def _measured_nowhere(metric: str, considered: list[dict], pods_why: tuple[str, str] | None,
                      explicit: bool) -> str:
    parts = []
    if pods_why:
        parts.append(f"online pods: {pods_why[1]}")
    elif not explicit and not any(r["class"] == "online" for r in considered):
        parts.append("no online pod")
    others = [r for r in considered if r["role"] != "node"]
    what = "target" if explicit else "online pod"
    if others and all(r.get("gone") for r in others):
        parts.append(f"every {what} vanished mid-sample")
    elif others and all(r.get("gone") or r.get("new") for r in others):
        parts.append(f"every {what} vanished mid-sample or is new since the last refresh")
    if not pods_why and metric in NOT_FOR_NODE and any(r["role"] == "node" for r in considered):
        parts.append(NOT_FOR_NODE[metric])
    return f"measured on no target ({'; '.join(parts) or 'no value on any target'})"


def merge_fail_on(metas: dict[str, dict], rules, *, incomplete: bool) -> dict:
    """The --fail-on verdict of several nodes (``{node: meta}`` of those that answered), as
    ``audit`` keeps one ``passed`` for its selection: violations, unknown and skipped rules
    of every node, each tagged with its ``node``; passed only when every node passed and none
    is missing (``incomplete``: a node failed, its gate was not checked: no pass)."""
    out: dict = {"rules": [f"{m}{o}{n:g}" for m, o, n in rules],
                 "passed": not incomplete and all((m.get("failOn") or {}).get("passed", False)
                                                  for m in metas.values()),
                 "violations": [], "unknown": [], "skipped": []}
    for n, m in metas.items():
        for key in ("violations", "unknown", "skipped"):
            out[key] += [{"node": n, **x} for x in (m.get("failOn") or {}).get(key, [])]
    return out


def check_rules(rows: list[dict], rules, explicit: bool) -> dict:
    """Rules apply to the online pods and the node (every target when TARGETs were given).
    A rule that could not be evaluated for such a target is ``unknown``, which does not
    pass: the gate never reports a check it could not make as passed. That is a file that
    should be there and could not be read (a permission error), a signal missing on a
    TARGET named explicitly, or a rule measured on no target at all. Skipped (listed under
    ``skipped``, warned once): a metric the node has no value for (NOT_FOR_NODE) and, for
    the default targets, one the online pods cannot have on this node (cgroup v1 without
    per-cgroup PSI, a kernel without the counter). A target that vanished mid-sample, or is
    new since the last ``--watch`` refresh, is left out; a rule left with no measured target
    at all, whatever the reason, is unknown."""
    viol: list[dict] = []
    unknown: list[dict] = []
    skipped: dict[tuple[str, str], dict] = {}  # (rule, reason) -> {rule, metric, reason, targets}
    measured: set[str] = set()
    pods_cannot: dict[str, tuple[str, str]] = {}  # rule -> (metric, why the online pods lack it)

    def skip(rule, metric, why, target):
        skipped.setdefault((rule, why), {"rule": rule, "metric": metric, "reason": why,
                                         "targets": []})["targets"].append(target)

    considered = [r for r in rows if explicit or r["class"] == "online" or r["role"] == "node"]
    for r in considered:
        for metric, op, num in rules:
            rule = f"{metric}{op}{num:g}"
            if r["role"] == "node" and metric in NOT_FOR_NODE:
                skip(rule, metric, NOT_FOR_NODE[metric], r["target"])
                continue
            v = METRICS[metric][0](r)
            if isinstance(v, (int, float)):
                measured.add(rule)
                if _OPS[op](v, num):
                    viol.append({"target": r["target"], "path": r["path"], "metric": metric, "value": v,
                                 "rule": rule})
                    if metric.startswith("cpu.throttled"):  # the pod's or one of its containers'
                        viol[-1]["file"] = worst_throttling(
                            r, "throttledPercent" if metric == "cpu.throttled" else "throttledMsPerSec")[1]
                continue
            if r.get("gone") or r.get("new"):
                continue
            kind, why = _why_missing(r, metric)
            if kind == "unsupported" and not explicit:
                skip(rule, metric, why, r["target"])
                pods_cannot[rule] = (metric, why)
                continue
            unknown.append({"target": r["target"], "path": r["path"], "metric": metric, "rule": rule,
                            "reason": why})
    for metric, op, num in rules:
        # nothing checked it (no online pod, the node has no such value, every target gone):
        # a gate never passes on a check it did not make
        rule = f"{metric}{op}{num:g}"
        if rule not in measured and not any(u["rule"] == rule for u in unknown):
            unknown.append({"target": "node" if not explicit else ", ".join(r["target"] for r in considered),
                            "path": None, "metric": metric, "rule": rule,
                            "reason": _measured_nowhere(metric, considered, pods_cannot.get(rule), explicit)})
    return {"rules": [f"{m}{o}{n:g}" for m, o, n in rules], "passed": not viol and not unknown,
            "violations": viol, "unknown": unknown, "skipped": list(skipped.values())}
