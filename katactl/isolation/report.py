"""The inspect reports: cgroup, bvt, memcg, rdt and threads, as plain dicts.

A :class:`Node` caches what several reports need (mounts, sandboxes, the
resctrl tree) for one transport.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from katactl.errors import NotFound, OperationFailed, UsageError
from katactl.isolation import cgroups as cg
from katactl.isolation import io, resctrl, threads
from katactl.backends.base import NodeTransport

if TYPE_CHECKING:
    from katactl.sandbox import Sandbox

_UID_RE = re.compile(r"^[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}$")

BVT_SWITCH = "/proc/sys/kernel/sched_group_identity_enabled"
CORE_SCHED = "/proc/sys/kernel/sched_core"


class Node:
    """Lazily read facts about one node, shared by the reports and the audit."""

    def __init__(self, transport: NodeTransport):
        self.t = transport
        self._fs: cg.CgroupFS | None = None
        self._sandboxes: list[Sandbox] | None = None
        self._rdt: dict | None = None
        self._devices: dict[str, str] | None = None

    @property
    def devices(self) -> dict[str, str]:
        """maj:min -> block device name (the node's /sys/dev/block)."""
        if self._devices is None:
            self._devices = io.block_devices(self.t)
        return self._devices

    @property
    def fs(self) -> cg.CgroupFS:
        if self._fs is None:
            self._fs = cg.CgroupFS(self.t)
        return self._fs

    @property
    def sandboxes(self) -> list[Sandbox]:
        if self._sandboxes is None:
            from katactl import sandbox

            self._sandboxes = sandbox.discover(self.t, check=False)
        return self._sandboxes

    def resolve_sandbox(self, ref: str) -> Sandbox:
        from katactl import sandbox

        return sandbox.resolve(self.t, ref, check=False)

    def sandbox_cgroup(self, sb) -> str | None:
        return cg.expand_systemd(sb.sandbox_cgroup_path) if sb.sandbox_cgroup_path else None

    def overhead_cgroup(self, sb) -> str | None:
        return cg.expand_systemd(sb.overhead_cgroup_path) if sb.overhead_cgroup_path else None

    def sandbox_by_pod_cgroup(self) -> dict[str, Sandbox]:
        """pod cgroup path -> sandbox (and pod uid -> sandbox under key 'uid:<uid>')."""
        out: dict[str, Sandbox] = {}
        for sb in self.sandboxes:
            p = self.sandbox_cgroup(sb)
            pod = cg.pod_cgroup_path(p) if p else None
            if pod:
                out[pod] = sb
            uid = (sb.pod or {}).get("uid")
            if uid:
                out["uid:" + uid] = sb
        return out

    def rdt(self, interval: float = 0.0) -> dict | None:
        if self.fs.resctrl is None:
            return None
        if self._rdt is None or interval:
            opts = self.fs.resctrl.options
            self._rdt = resctrl.read_tree(self.t, self.fs.resctrl.mountpoint, interval=interval,
                                          mba_mbps="mba_MBps" in opts)
        return self._rdt


# -- inspect cgroup --------------------------------------------------------------

def cgroup_entry(node: Node, path: str, role: str, members: bool = True) -> dict:
    fs, t = node.fs, node.t
    knobs, log = cg.read_knobs(t, fs, path)
    present = fs.exists(path)
    e = {"role": role, "path": path, "presentIn": present, **_layout(path)}
    e.update(knobs)
    e["io"] = io.read_io(t, fs, path, node.devices, log)
    if members:
        e["members"] = cg.read_members(t, fs, path)
    e["unsupported"] = sorted(set(log.unsupported)) if present else []
    if log.unreadable:
        e["unreadable"] = log.unreadable
    e["files"] = log.files
    return e


def _layout(path: str) -> dict:
    c = cg.classify(path)
    return {"layout": {k: v for k, v in c.items() if v is not None}}


def inspect_cgroup(node: Node, target: str | None, pid: int | None = None) -> dict:
    """Resolve TARGET (a cgroup path, a cgroupfs directory, a pod uid, a sandbox)
    and report its cgroup(s)."""
    fs = node.fs
    fs.require()
    cgroups: list[tuple[str, str]] = []
    info: dict = {"target": target if target is not None else f"pid {pid}", "hierarchy": fs.mode,
                  "mounts": {lab: m.mountpoint for lab, m in fs.hierarchies().items()}}
    if pid is not None:
        pc = cg.proc_cgroups(node.t, pid)
        if any(threads.outside_own_ns(pc[c]) for c in ("cpu", "cpuset", "memory", "unified") if c in pc):
            raise OperationFailed(f"process {pid}: {threads.OTHER_CGROUPNS}")
        seen = []
        for lab in ("cpu", "cpuset", "memory", "unified"):
            p = pc.get(lab)
            if p and p not in seen:
                seen.append(p)
                cgroups.append((f"process ({lab})" if len(seen) > 1 else "process", p))
    elif target is None:
        raise UsageError("give exactly one of TARGET or --pid PID")
    elif target.startswith("/"):
        cgroups.append(("path", fs.resolve_path(target)))
    elif target.startswith("pod/") and _UID_RE.fullmatch(target[4:]) or _UID_RE.fullmatch(target):
        uid = target.removeprefix("pod/").replace("_", "-")
        cgroups.append(("pod", find_pod_cgroup(node, uid)))
    else:
        sb = node.resolve_sandbox(target)
        info["sandbox"] = {"id": sb.id, "pod": sb.pod, "hypervisor": sb.hypervisor,
                           "sandboxCgroupOnly": sb.sandbox_cgroup_only}
        sp, op = node.sandbox_cgroup(sb), node.overhead_cgroup(sb)
        pod = cg.pod_cgroup_path(sp) if sp else None
        if pod and pod != sp:
            cgroups.append(("pod", pod))
        if sp:
            cgroups.append(("sandbox", sp))
        if op:
            cgroups.append(("overhead", op))
        if not cgroups:
            raise NotFound(f"sandbox {sb.id}: its state file records no cgroup path")
    info["cgroups"] = [cgroup_entry(node, p, role) for role, p in cgroups]
    return info


def find_pod_cgroup(node: Node, uid: str) -> str:
    for e in cg.kubepods_tree(node.t, node.fs):
        if e["level"] == "pod" and (e["podUid"] or "").lower() == uid.lower():
            return e["path"]
    raise NotFound(f"no pod cgroup for uid {uid} under kubepods (cgroupfs or systemd layout)")


# -- inspect bvt ----------------------------------------------------------------

def _read_int(transport: NodeTransport, path: str) -> tuple[int | None, str | None]:
    """(value, None); (None, None) when the file is absent; (None, why) when it could not be
    read or parsed: unknown, which is neither on nor off."""
    try:
        raw = transport.read_text(path, limit=4096)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as e:
        return None, e.strerror or str(e)
    try:
        return int(raw.strip()), None
    except ValueError:
        return None, f"unexpected content {raw.strip()[:40]!r}"


def bvt_support(node: Node) -> dict:
    t, fs = node.t, node.fs
    out: dict = {"supported": False}
    cpu_root = fs.dir("cpu", "/")
    if cpu_root is None:
        out["reason"] = "no cpu controller mounted"
        return out
    probe = [fs.dir("cpu", p) for p in ("/kubepods", "/kubepods.slice", "/")]
    hit = next((d for d in probe if d and t.exists(d + "/cpu.bvt_warp_ns")), None)
    if hit is None:
        out["reason"] = ("kernel has no group identity (no cpu.bvt_warp_ns in the cpu controller; "
                         "needs an Alibaba Cloud Linux / Anolis kernel)")
        return out
    out["supported"] = True
    out["probe"] = hit + "/cpu.bvt_warp_ns"
    sw, err = _read_int(t, BVT_SWITCH)
    out["switch"] = {"file": BVT_SWITCH, "value": sw,
                     "enabled": None if err else (sw == 1) if sw is not None else True,
                     "note": (f"unreadable: {err}" if err else None if sw is not None
                              else "no switch on this kernel: on while the file exists")}
    core, err = _read_int(t, CORE_SCHED)
    if core is not None or err:
        out["coreSched"] = {"file": CORE_SCHED, "value": core, **({"error": err} if err else {})}
    return out


def kube_rows(node: Node, sections=("cpu",), only: set[str] | None = None) -> list[dict]:
    """One row per cgroup in kubelet's tree (+ kata_overhead), with knobs read."""
    t, fs = node.t, node.fs
    by_pod = node.sandbox_by_pod_cgroup()
    by_path = {node.sandbox_cgroup(s): s for s in node.sandboxes if s.sandbox_cgroup_path}
    rows = []
    tree = cg.kubepods_tree(t, fs, controller="cpu" if "cpu" in sections else "memory")
    tree += [{"path": p, **cg.classify(p)} for p in cg.overhead_cgroups(t, fs, "cpu" if "cpu" in sections else "memory")]
    for e in tree:
        path = e["path"]
        if path in by_path and e["level"] != "sandbox":  # e.g. <pod>/<id> with sandbox_cgroup_only=true
            e = {**e, "level": "sandbox", "sandbox": by_path[path].id, "container": None}
        knobs, log = cg.read_knobs(t, fs, path, sections=sections, only=only)
        pod_path = cg.pod_cgroup_path(path)
        sb = by_pod.get(pod_path) if pod_path else None
        if sb is None and e["level"] == "overhead":
            sb = next((s for s in node.sandboxes if s.id == e["sandbox"]), None)
        row = {"path": path, "level": e["level"], "qos": e.get("qos"), "podUid": e.get("podUid"),
               "sandbox": sb.id if sb is not None else e.get("sandbox"),
               "pod": (sb.pod if sb is not None else None), "podRef": (sb.pod_ref if sb is not None else None),
               "class": workload_class(e, sb)}
        for s in sections:
            row.update({k: v for k, v in knobs.get(s, {}).items()})
        row["_files"] = log.files
        if log.unreadable:
            row["unreadable"] = log.unreadable
        rows.append(row)
    return rows


def workload_class(e: dict, sb) -> str | None:
    """online / offline / system for a kubelet-tree cgroup (Kata = offline, as co-location runs it)."""
    if e["level"] in ("kubepods",):
        return "system"
    if e["level"] == "overhead":
        return "offline"
    if sb is not None or e.get("qos") == "besteffort":
        return "offline"
    if e["level"] == "qos":
        return "online"
    return "online" if e.get("qos") else None


def expected_bvt(row: dict, pol) -> int | None:
    lvl, qos = row["level"], row.get("qos")
    if lvl == "kubepods":
        return pol.bvt.kubepods
    if lvl == "qos":
        return pol.bvt.offline if qos == "besteffort" else pol.bvt.online
    if lvl == "overhead":
        return None
    return pol.bvt.offline if row.get("class") == "offline" else pol.bvt.online


def inspect_bvt(node: Node, pol) -> dict:
    sup = bvt_support(node)
    node.fs.require()
    rows = []
    if sup["supported"]:
        for r in kube_rows(node, ("cpu",), only={"cpu.bvtWarpNs", "cpu.identity", "cpu.shares", "cpu.weight"}):
            r.pop("_files", None)
            r["expected"] = expected_bvt(r, pol)
            r["ok"] = None if r["expected"] is None or r.get("bvtWarpNs") is None else r["bvtWarpNs"] == r["expected"]
            rows.append(r)
    return {"meta": sup, "items": rows}


# -- inspect memcg --------------------------------------------------------------

MEMCG_KEYS = {"memory.limit", "memory.usage", "memory.high", "memory.low", "memory.min", "memory.oomGroup",
              "memory.usePriorityOom", "memory.priority", "memory.wmarkRatio", "memory.wmarkHigh",
              "memory.wmarkLow", "memory.wmarkScaleFactor", "memory.wmarkMinAdj"}
ALINUX_MEMCG = ("memory.use_priority_oom", "memory.priority", "memory.wmark_ratio", "memory.wmark_scale_factor",
                "memory.wmark_min_adj")


def memcg_support(node: Node) -> dict:
    t, fs = node.t, node.fs
    d = None
    for p in ("/kubepods", "/kubepods.slice", "/"):
        cand = fs.dir("memory", p)
        if cand and t.is_dir(cand):
            d = cand
            break
    if d is None:
        return {"supported": False, "reason": "no memory controller mounted", "features": {}}
    feats = {f: t.exists(f"{d}/{f}") for f in ALINUX_MEMCG}
    out: dict[str, Any] = {"supported": True, "version": fs.version_of("memory"), "features": feats}
    missing = [f for f, ok in feats.items() if not ok]
    if missing:
        out["unsupported"] = missing
        out["reason"] = "kernel lacks the Alinux memcg QoS knobs: " + ", ".join(missing)
    return out


def inspect_memcg(node: Node) -> dict:
    node.fs.require()
    sup = memcg_support(node)
    rows = []
    if sup["supported"]:
        for r in kube_rows(node, ("memory",), only=MEMCG_KEYS):
            r.pop("_files", None)
            rows.append(r)
    return {"meta": sup, "items": rows}


# -- inspect rdt -----------------------------------------------------------------

#: the longest mon_data sampling interval inspect_rdt waits (seconds)
MAX_RDT_INTERVAL = 60.0


def rdt_interval(value: str | float) -> float:
    """inspect_rdt's sampling interval: a duration ("1s", "500ms") or seconds, 0 (no
    rates) to 60s; anything else is a usage error (about --interval)."""
    from katactl.values import parse_duration

    secs = parse_duration(value, allow_zero=True, what="--interval") if isinstance(value, str) else float(value)
    if not 0 <= secs <= MAX_RDT_INTERVAL:
        raise UsageError(f"invalid --interval {value!r}: at most {MAX_RDT_INTERVAL:g}s"
                         if secs > 0 else f"invalid --interval {value!r}: must not be negative")
    return secs


def inspect_rdt(node: Node, interval: str | float = 0.0, with_sandboxes: bool = True) -> dict:
    """The resctrl groups with decoded schemata, mon_data (rates when ``interval``,
    see :func:`rdt_interval`) and the sandboxes whose threads sit in each group."""
    interval = rdt_interval(interval)
    fs = node.fs
    if fs.resctrl is None:
        return {"meta": {"supported": False,
                         "reason": "resctrl is not mounted (mount -t resctrl resctrl /sys/fs/resctrl)",
                         "cpuFlags": resctrl.cpu_has_rdt(node.t)}, "items": []}
    tree = node.rdt(interval)
    assert tree is not None  # resctrl is mounted (checked above)
    meta = {"supported": True, "root": tree["root"], "options": sorted(fs.resctrl.options - {"rw", "relatime"}),
            "mbUnit": tree["mbUnit"], "info": _info_json(tree["info"])}
    if tree["errors"]:  # info/ files that could not be read or parsed: warned, exit 1
        meta["errors"] = tree["errors"]
    if with_sandboxes:
        _attach_sandboxes(node, tree)
    items = []
    for g in tree["groups"]:
        g = {k: v for k, v in g.items() if not k.startswith("_")}
        g["tasks"] = len(g.get("tasks", []))
        items.append(g)
    return {"meta": meta, "items": items}


def _info_json(info: dict) -> dict:
    out = {}
    for k, v in info.items():
        if isinstance(v, dict):
            v = dict(v)
            if isinstance(v.get("cbmMask"), int):
                v["cbmMask"] = f"0x{v['cbmMask']:x}"
                v["ways"] = int(v["cbmMask"], 16).bit_length()
        out[k] = v
    return out


def _attach_sandboxes(node: Node, tree: dict) -> None:
    tg = resctrl.tid_groups(tree)
    by_group: dict[str, list] = {}
    listed: dict[str, list[dict]] = {}
    for sb in node.sandboxes:
        if not sb.hypervisor_pid:
            continue
        try:
            listed[sb.id] = threads.list_threads(node.t, sb.hypervisor_pid, hypervisor=sb.hypervisor, tid_groups=tg,
                                                 controllers=())
        except NotFound:
            continue
    qmp = threads.qmp_vcpus_many(node.t, [sb for sb in node.sandboxes if sb.id in listed and threads.needs_identity(
        sb.hypervisor, sum(th["role"] == "vcpu" for th in listed[sb.id]))])
    for sb in node.sandboxes:
        ths = listed.get(sb.id)
        if ths is None:
            continue
        known = threads.identify_vcpus(node.t, sb, ths, qmp=qmp.get(sb.id))["by"] is not None
        counts: dict[str, dict] = {}
        for th in ths:
            c = counts.setdefault(th["resctrlGroup"], {"threads": 0, "vcpus": 0 if known else None})
            c["threads"] += 1
            if known:
                c["vcpus"] += th["role"] == "vcpu"
        for gname, c in counts.items():
            by_group.setdefault(gname, []).append({"id": sb.id, "pod": sb.pod, "podRef": sb.pod_ref, **c})
    for g in tree["groups"]:
        if g["type"] != "mon":
            g["sandboxes"] = by_group.get(g["name"], [])


# -- inspect threads ---------------------------------------------------------------

def inspect_threads(node: Node, ref: str | None, pid: int | None = None) -> dict:
    hv = None
    meta: dict = {}
    if ref is not None:
        sb = node.resolve_sandbox(ref)
        if not sb.hypervisor_pid:
            raise NotFound(f"sandbox {sb.id}: " + (sb.vmm_note or f"no hypervisor pid recorded in {sb.state_file}"),
                           hint="give the VMM's pid with --pid PID")
        pid, hv = sb.hypervisor_pid, sb.hypervisor
        meta["sandbox"] = {"id": sb.id, "pod": sb.pod, "hypervisor": hv,
                           "sandboxCgroup": node.sandbox_cgroup(sb), "overheadCgroup": node.overhead_cgroup(sb),
                           "sandboxCgroupOnly": sb.sandbox_cgroup_only}
    if pid is None or pid <= 0:
        raise UsageError("give a SANDBOX or --pid PID (a positive process id)")
    rdt = node.rdt() if node.fs.resctrl is not None else None
    tg = resctrl.tid_groups(rdt) if rdt else None
    rows = threads.list_threads(node.t, pid, hypervisor=hv, tid_groups=tg)
    meta["pid"] = pid
    meta["resctrl"] = "mounted" if rdt else "unsupported (resctrl not mounted)"
    meta["vcpuThreads"] = sum(r["role"] == "vcpu" for r in rows)
    if ref is not None:  # an unnamed QEMU's vCPUs: over QMP, or by the sandbox cgroup (threads.identify_vcpus)
        ident = threads.identify_vcpus(node.t, sb, rows)
        meta["vcpusBy"] = ident["by"]
        meta["vcpuThreads"] = sum(r["role"] == "vcpu" for r in rows) if ident["by"] else None
        if ident["note"]:
            meta["vcpuNote"] = ident["note"]
    meta["threads"] = len(rows)
    return {"meta": meta, "items": rows}
