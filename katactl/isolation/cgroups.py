"""cgroup mounts, paths and knobs, read through a NodeTransport.

Handles cgroup v1 (one mount per controller, possibly co-mounted such as
``cpu,cpuacct``), pure v2 (one ``cgroup2`` mount) and hybrid (v1 controllers
plus a ``cgroup2`` mount at ``/sys/fs/cgroup/unified``). Mounts are found in
the node's ``/proc/self/mountinfo`` (then ``/proc/mounts``, then the well-known
layout under ``/sys/fs/cgroup``). A *cgroup path* is the path inside a
hierarchy ("/kubepods/burstable/pod<uid>"); a *directory* is a node path
("/sys/fs/cgroup/cpu/kubepods/...").
"""
from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Any, Callable, Iterable

from katactl.errors import NotFound, UsageError
from katactl.isolation import weights
from katactl.backends.base import NodeTransport

CGROUP_ROOT = "/sys/fs/cgroup"
V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX; anything above this
NOT_DIRS = {"tasks", "notify_on_release", "release_agent"}


@dataclasses.dataclass(frozen=True)
class Mount:
    mountpoint: str          # node path
    root: str                # the mount's root inside the hierarchy (cgroup namespaces)
    fstype: str              # cgroup | cgroup2 | resctrl
    options: frozenset = frozenset()

    @property
    def controllers(self) -> frozenset:
        if self.fstype != "cgroup":
            return frozenset()
        known = {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio",
                 "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc"}
        out = {o for o in self.options if o in known}
        out |= {o for o in self.options if o.startswith("name=")}
        return frozenset(out)


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts:
            continue
        sep = parts.index("-")
        if sep < 5 or len(parts) < sep + 3:
            continue
        fstype = parts[sep + 1]
        if fstype not in ("cgroup", "cgroup2", "resctrl"):
            continue
        opts = set(parts[5].split(",")) | set(parts[sep + 3].split(",")) if len(parts) > sep + 3 else set(parts[5].split(","))
        out.append(Mount(_unescape(parts[4]), _unescape(parts[3]), fstype, frozenset(opts)))
    return out


def parse_proc_mounts(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] not in ("cgroup", "cgroup2", "resctrl"):
            continue
        out.append(Mount(_unescape(parts[1]), "/", parts[2], frozenset(parts[3].split(","))))
    return out


def read_mounts(transport: NodeTransport) -> list[Mount]:
    """cgroup/cgroup2/resctrl mounts of the node, as node paths."""
    mounts: list[Mount] = []
    for path, parser in (("/proc/self/mountinfo", parse_mountinfo), ("/proc/mounts", parse_proc_mounts)):
        try:
            mounts = parser(transport.read_text(path))
        except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
            continue
        if mounts:
            break
    hr = transport.host_root.rstrip("/")
    if hr:  # a DaemonSet reading /host: its own mountinfo shows /host/sys/fs/cgroup/...
        fixed = []
        for m in mounts:
            if m.mountpoint == hr or m.mountpoint.startswith(hr + "/"):
                fixed.append(dataclasses.replace(m, mountpoint=m.mountpoint[len(hr):] or "/"))
            elif not transport.exists(m.mountpoint):
                continue  # a mount of the reader, not visible under the host root
            else:
                fixed.append(m)
        mounts = fixed
    if not any(m.fstype in ("cgroup", "cgroup2") for m in mounts):
        mounts += _probe_cgroup_layout(transport)
    if not any(m.fstype == "resctrl" for m in mounts) and transport.exists("/sys/fs/resctrl/info"):
        mounts.append(Mount("/sys/fs/resctrl", "/", "resctrl", frozenset()))
    return mounts


def _probe_cgroup_layout(transport: NodeTransport) -> list[Mount]:
    """No mount table (a collected snapshot): recognise the standard layout."""
    if transport.exists(CGROUP_ROOT + "/cgroup.controllers"):
        return [Mount(CGROUP_ROOT, "/", "cgroup2")]
    out: list[Mount] = []
    try:
        names = transport.listdir(CGROUP_ROOT)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return out
    seen: set[str] = set()
    for name in sorted(names, key=lambda n: ("," not in n, n)):
        d = f"{CGROUP_ROOT}/{name}"
        if name == "unified":
            if transport.exists(d + "/cgroup.controllers"):
                out.append(Mount(d, "/", "cgroup2"))
            continue
        if not transport.exists(d + "/cgroup.procs"):
            continue
        ctrls = set(name.split(",")) if name != "systemd" else {"name=systemd"}
        if ctrls <= seen:
            continue  # cpu -> cpu,cpuacct symlink
        seen |= ctrls
        out.append(Mount(d, "/", "cgroup", frozenset(ctrls)))
    return out


def norm_cgpath(p: str) -> str:
    if not isinstance(p, str) or "\0" in p:
        raise UsageError(f"invalid cgroup path {p!r}")
    p = "/" + p.strip().strip("/")
    return posixpath.normpath(p) if p != "/" else "/"


class CgroupFS:
    """The cgroup hierarchies of one node."""

    PRIMARY = ("cpu", "cpuset", "memory")

    def __init__(self, transport: NodeTransport, mounts: list[Mount] | None = None):
        self.t = transport
        self.mounts = mounts if mounts is not None else read_mounts(transport)
        self.v1: dict[str, Mount] = {}
        self.v2: Mount | None = None
        for m in self.mounts:
            if m.fstype == "cgroup":
                for c in m.controllers:
                    self.v1.setdefault(c, m)
            elif m.fstype == "cgroup2" and self.v2 is None:
                self.v2 = m
        self.v2_controllers: set[str] = set()
        if self.v2 is not None:
            try:
                self.v2_controllers = set(transport.read_text(self.v2.mountpoint + "/cgroup.controllers").split())
            except OSError:
                pass
        self.resctrl: Mount | None = next((m for m in self.mounts if m.fstype == "resctrl"), None)

    @property
    def mode(self) -> str:
        if self.v1 and self.v2 is not None:
            return "hybrid"
        if self.v2 is not None:
            return "v2"
        return "v1" if self.v1 else "none"

    def require(self) -> None:
        if self.mode == "none":
            raise NotFound("no cgroup filesystem found on the node "
                           "(no cgroup or cgroup2 mount in /proc/self/mountinfo, nothing under /sys/fs/cgroup)")

    def mount_for(self, controller: str) -> Mount | None:
        """Where a controller's knobs live: its v1 mount, else v2 if enabled there."""
        if controller in self.v1:
            return self.v1[controller]
        if self.v2 is not None and (controller in self.v2_controllers or controller == "unified"):
            return self.v2
        return None

    def version_of(self, controller: str) -> int | None:
        m = self.mount_for(controller)
        return None if m is None else (2 if m.fstype == "cgroup2" else 1)

    @staticmethod
    def _join(m: Mount, cgpath: str) -> str:
        p = norm_cgpath(cgpath)
        root = m.root.rstrip("/")
        if root and (p == root or p.startswith(root + "/")):
            p = p[len(root):] or "/"
        return m.mountpoint.rstrip("/") + ("" if p == "/" else p)

    def dir(self, controller: str, cgpath: str) -> str | None:
        m = self.mount_for(controller)
        return None if m is None else self._join(m, cgpath)

    def hierarchies(self) -> dict[str, Mount]:
        """Label -> mount for the hierarchies a cgroup report covers."""
        out: dict[str, Mount] = {}
        for c in self.PRIMARY:
            if c in self.v1:
                out[c] = self.v1[c]
        if self.v2 is not None:
            out["unified"] = self.v2
        return out

    def locate(self, path: str) -> tuple[Mount, str] | None:
        """A node directory -> (mount, cgroup path), or None if outside every cgroup mount."""
        p = posixpath.normpath(path)
        best = None
        for m in self.mounts:
            if m.fstype not in ("cgroup", "cgroup2"):
                continue
            mp = m.mountpoint.rstrip("/") or "/"
            if p == mp or p.startswith(mp + "/"):
                if best is None or len(mp) > len(best[0].mountpoint):
                    rel = p[len(mp):] or "/"
                    best = (m, rel)
        return best

    def _through_link(self, p: str) -> str:
        """``/sys/fs/cgroup/cpu/...`` where ``cpu`` is the symlink systemd makes to a co-mounted
        hierarchy (``cpu -> cpu,cpuacct`` on v1 nodes): the path in the mount it names. Only
        that level is followed (one readlink on the node); other paths come back as given."""
        if self.locate(p) is not None or not p.startswith(CGROUP_ROOT + "/"):
            return p
        top = CGROUP_ROOT + "/" + p[len(CGROUP_ROOT) + 1:].split("/", 1)[0]
        try:
            link = self.t.readlink(top)
        except OSError:  # not a symlink (EINVAL), or absent
            return p
        real = posixpath.normpath(posixpath.join(CGROUP_ROOT, link)) + p[len(top):]
        return real if self.locate(real) is not None else p

    def exists(self, cgpath: str) -> list[str]:
        """Hierarchy labels in which the cgroup exists."""
        return [lab for lab, m in self.hierarchies().items() if self.t.is_dir(self._join(m, cgpath))]

    def mount_list(self) -> str:
        return ", ".join(sorted({m.mountpoint for m in self.mounts if m.fstype != "resctrl"})) or "none"

    def resolve_path(self, target: str) -> str:
        """A user-given path (cgroupfs directory or cgroup path) -> cgroup path.

        A node path below a cgroup mount is translated; a path that exists on
        the node outside every cgroup mount is a usage error; a cgroup path that
        exists in no hierarchy is 'not found'.
        """
        self.require()
        if not target.startswith("/"):
            raise UsageError(f"cgroup path {target!r} must be absolute (e.g. /kubepods/besteffort/pod<uid> "
                             "or /sys/fs/cgroup/cpu/kubepods/...)")
        p = self._through_link(posixpath.normpath(target))
        loc = self.locate(p)
        if loc is not None:
            m, rel = loc
            root = m.root.rstrip("/")
            cg = norm_cgpath((root + rel) if root else rel)
            if not self.t.is_dir(p):
                raise NotFound(f"{target}: no such cgroup")
            return cg
        if p == CGROUP_ROOT or p.startswith(CGROUP_ROOT + "/") or p.startswith("/sys/") or p.startswith("/proc/"):
            raise UsageError(f"{target} is outside the cgroup mounts ({self.mount_list()})")
        cg = norm_cgpath(p)
        if self.exists(cg):
            return cg
        if self.t.exists(p):
            raise UsageError(f"{target} is outside the cgroup mounts ({self.mount_list()})")
        raise NotFound(f"cgroup {cg} exists in no hierarchy (mounts: {self.mount_list()})")


# -- processes ---------------------------------------------------------------

def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup -> {controller: path}; v2 under "unified"."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            out["unified"] = path
            continue
        for c in ctrls.split(","):
            if c:
                out[c] = path
    return out


def proc_cgroups(transport: NodeTransport, pid: int, tid: int | None = None) -> dict[str, str]:
    p = f"/proc/{pid}/task/{tid}/cgroup" if tid is not None else f"/proc/{pid}/cgroup"
    try:
        return parse_proc_cgroup(transport.read_text(p))
    except FileNotFoundError:
        raise NotFound(f"process {pid}{'' if tid is None else f' thread {tid}'} does not exist") from None


# -- knobs -------------------------------------------------------------------

def _int(s: str) -> int:
    return int(s.strip())


def _limit(s: str):
    s = s.strip()
    if s == "max":
        return "max"
    v = int(s)
    return "max" if v >= V1_UNLIMITED or v < 0 else v


def _cpulist(s: str) -> str:
    return s.strip()


def _first_line(s: str) -> str:
    return s.strip().splitlines()[0] if s.strip() else ""


@dataclasses.dataclass(frozen=True)
class Knob:
    section: str
    key: str
    controller: str
    v1: str | None
    v2: str | None
    parse: Callable[[str], object]
    alinux: bool = False  # a knob only Alibaba Cloud Linux / Anolis kernels have


KNOBS: list[Knob] = [
    Knob("cpu", "shares", "cpu", "cpu.shares", None, _int),
    Knob("cpu", "weight", "cpu", None, "cpu.weight", _int),
    Knob("cpu", "quotaUs", "cpu", "cpu.cfs_quota_us", None, _limit),
    Knob("cpu", "periodUs", "cpu", "cpu.cfs_period_us", None, _int),
    Knob("cpu", "max", "cpu", None, "cpu.max", _first_line),
    Knob("cpu", "burstUs", "cpu", "cpu.cfs_burst_us", "cpu.max.burst", _int),
    Knob("cpu", "idle", "cpu", "cpu.idle", "cpu.idle", _int),
    Knob("cpu", "bvtWarpNs", "cpu", "cpu.bvt_warp_ns", "cpu.bvt_warp_ns", _int, alinux=True),
    Knob("cpu", "identity", "cpu", "cpu.identity", "cpu.identity", _int, alinux=True),
    Knob("cpuset", "cpus", "cpuset", "cpuset.cpus", "cpuset.cpus", _cpulist),
    Knob("cpuset", "effectiveCpus", "cpuset", "cpuset.effective_cpus", "cpuset.cpus.effective", _cpulist),
    Knob("cpuset", "mems", "cpuset", "cpuset.mems", "cpuset.mems", _cpulist),
    Knob("cpuset", "effectiveMems", "cpuset", "cpuset.effective_mems", "cpuset.mems.effective", _cpulist),
    Knob("cpuset", "cpuExclusive", "cpuset", "cpuset.cpu_exclusive", None, _int),
    Knob("memory", "limit", "memory", "memory.limit_in_bytes", "memory.max", _limit),
    Knob("memory", "usage", "memory", "memory.usage_in_bytes", "memory.current", _int),
    Knob("memory", "high", "memory", "memory.high", "memory.high", _limit),
    Knob("memory", "low", "memory", "memory.low", "memory.low", _limit),
    Knob("memory", "min", "memory", "memory.min", "memory.min", _limit),
    Knob("memory", "oomGroup", "memory", "memory.oom.group", "memory.oom.group", _int),
    Knob("memory", "swappiness", "memory", "memory.swappiness", None, _int),
    Knob("memory", "usePriorityOom", "memory", "memory.use_priority_oom", "memory.use_priority_oom", _int, alinux=True),
    Knob("memory", "priority", "memory", "memory.priority", "memory.priority", _int, alinux=True),
    Knob("memory", "wmarkRatio", "memory", "memory.wmark_ratio", "memory.wmark_ratio", _int, alinux=True),
    Knob("memory", "wmarkHigh", "memory", "memory.wmark_high", "memory.wmark_high", _limit, alinux=True),
    Knob("memory", "wmarkLow", "memory", "memory.wmark_low", "memory.wmark_low", _limit, alinux=True),
    Knob("memory", "wmarkScaleFactor", "memory", "memory.wmark_scale_factor", "memory.wmark_scale_factor", _int, alinux=True),
    Knob("memory", "wmarkMinAdj", "memory", "memory.wmark_min_adj", "memory.wmark_min_adj", _int, alinux=True),
]

SECTIONS = ("cpu", "cpuset", "memory")


@dataclasses.dataclass
class ReadLog:
    """Files read for a report: the audit's evidence, and what could not be read."""

    files: dict[str, str] = dataclasses.field(default_factory=dict)          # key -> node path
    unreadable: list[dict] = dataclasses.field(default_factory=list)
    unsupported: list[str] = dataclasses.field(default_factory=list)


def read_value(transport: NodeTransport, path: str, parse, log: ReadLog | None = None, key: str | None = None):
    """Read+parse one knob file. Missing -> None (and 'unsupported'); unreadable or
    malformed -> None with an entry in log.unreadable (never raised)."""
    try:
        raw = transport.read_text(path, limit=65536)
    except (FileNotFoundError, NotADirectoryError):
        if log is not None and key:
            log.unsupported.append(key)
        return None
    except OSError as e:
        if log is not None:
            log.unreadable.append({"file": path, "error": e.strerror or str(e)})
        return None
    try:
        v = parse(raw)
    except (ValueError, IndexError):
        if log is not None:
            log.unreadable.append({"file": path, "error": f"unexpected content {raw.strip()[:40]!r}"})
        return None
    if log is not None and key:
        log.files[key] = path
    return v


def read_knobs(transport: NodeTransport, fs: CgroupFS, cgpath: str, sections: Iterable[str] = SECTIONS,
               only: set[str] | None = None) -> tuple[dict, ReadLog]:
    """The cpu/cpuset/memory knobs of one cgroup (v1 or v2 file names as mounted)."""
    log = ReadLog()
    out: dict[str, dict] = {s: {} for s in sections}
    dirs: dict[str, tuple | None] = {}
    for k in KNOBS:
        if k.section not in out or (only is not None and f"{k.section}.{k.key}" not in only):
            continue
        ver = fs.version_of(k.controller)
        fname = k.v1 if ver == 1 else k.v2 if ver == 2 else None
        if fname is None:
            continue
        if k.controller not in dirs:
            d = fs.dir(k.controller, cgpath)
            try:  # one listdir per directory instead of one failed open per absent knob
                dirs[k.controller] = (d, set(transport.listdir(d))) if d else None
            except (FileNotFoundError, NotADirectoryError):
                dirs[k.controller] = None
            except OSError:
                dirs[k.controller] = (d, None)
        ent = dirs[k.controller]
        if ent is None:
            continue
        d, names = ent
        if names is not None and fname not in names:
            log.unsupported.append(fname)
            out[k.section][k.key] = None
            continue
        v = read_value(transport, f"{d}/{fname}", k.parse, log, fname)
        out[k.section][k.key] = v
    _derive(out)
    return out, log


def _derive(out: dict) -> None:
    cpu = out.get("cpu")
    if not cpu:
        return
    if "max" in cpu:  # v2 "quota period"
        raw = cpu.pop("max")
        if isinstance(raw, str) and raw:
            q, _, per = raw.partition(" ")
            cpu["quotaUs"] = "max" if q == "max" else _safe_int(q)
            cpu["periodUs"] = _safe_int(per) if per else 100000
    q, per = cpu.get("quotaUs"), cpu.get("periodUs")
    if isinstance(q, int) and isinstance(per, int) and per > 0:
        cpu["limitCpus"] = round(q / per, 3)
    elif q == "max":
        cpu["limitCpus"] = "max"
    if isinstance(cpu.get("shares"), int):
        cpu["weightFromShares"] = weights.weight_view(cpu["shares"])
    if isinstance(cpu.get("weight"), int):
        cpu["sharesFromWeight"] = weights.shares_view(cpu["weight"])


def _safe_int(s: str):
    try:
        return int(s)
    except ValueError:
        return None


def read_members(transport: NodeTransport, fs: CgroupFS, cgpath: str, limit: int = 64) -> dict:
    """Processes and threads of a cgroup in each hierarchy."""
    out = {}
    for label, m in fs.hierarchies().items():
        d = fs._join(m, cgpath)
        entry: dict[str, Any] = {}
        for key, fname in (("procs", "cgroup.procs"), ("threads", "tasks" if m.fstype == "cgroup" else "cgroup.threads")):
            try:
                ids = [int(x) for x in transport.read_text(f"{d}/{fname}").split()]
            except (OSError, ValueError):
                continue
            entry[key] = ids[:limit]
            entry[key[:-1] + "Count"] = len(ids)
        if entry:
            out[label] = entry
    return out


# -- kubelet layout ------------------------------------------------------------

_SYSTEMD_POD = re.compile(r"^kubepods(?:-(burstable|besteffort))?-pod([0-9a-fA-F_]+)\.slice$")
_CTR_SCOPE = re.compile(r"^(?:cri-containerd|crio|docker)-([0-9a-f]+)\.scope$")


def classify(cgpath: str) -> dict:
    """Where a cgroup sits in kubelet's (and Kata's) layout.

    Returns {driver, level, qos, podUid, container, sandbox}; level is one of
    kubepods, qos, pod, container, sandbox (kata_<id>), overhead, other.
    """
    parts = [p for p in norm_cgpath(cgpath).split("/") if p]
    info = {"driver": None, "level": "other", "qos": None, "podUid": None, "container": None, "sandbox": None}
    if len(parts) >= 2 and parts[0] == "kata_overhead":
        info.update(level="overhead", sandbox=parts[1])
        return info
    if "kubepods" in parts:
        i = parts.index("kubepods")
        info["driver"] = "cgroupfs"
        rest = parts[i + 1:]
        info["level"] = "kubepods"
        info["qos"] = None
        if rest and rest[0] in ("burstable", "besteffort"):
            info["qos"], rest = rest[0], rest[1:]
            info["level"] = "qos"
        if rest and rest[0].startswith("pod"):
            info["qos"] = info["qos"] or "guaranteed"
            info["podUid"] = rest[0][3:]
            info["level"] = "pod"
            _leaf(info, rest[1:])
        return info
    if "kubepods.slice" in parts:
        i = parts.index("kubepods.slice")
        info["driver"] = "systemd"
        info["level"] = "kubepods"
        rest = parts[i + 1:]
        if rest and rest[0] in ("kubepods-burstable.slice", "kubepods-besteffort.slice"):
            info["qos"] = rest[0][len("kubepods-"):-len(".slice")]
            info["level"] = "qos"
            rest = rest[1:]
        if rest:
            m = _SYSTEMD_POD.fullmatch(rest[0])
            if m:
                info["qos"] = m.group(1) or "guaranteed"
                info["podUid"] = m.group(2).replace("_", "-")
                info["level"] = "pod"
                _leaf(info, rest[1:])
        return info
    return info


def _leaf(info: dict, rest: list[str]) -> None:
    if not rest:
        return
    name = rest[0]
    if name.startswith("kata_") or name.startswith("kata-"):
        info["level"], info["sandbox"] = "sandbox", name[5:].removesuffix(".scope")
        return
    m = _CTR_SCOPE.fullmatch(name)
    info["level"] = "container"
    info["container"] = m.group(1) if m else name


def expand_systemd(path: str) -> str:
    """Kata/runc systemd cgroup notation "slice:prefix:name" -> a cgroup path.

    "kubepods-besteffort-pod1_2.slice:cri-containerd:abc" ->
    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/cri-containerd-abc.scope".
    Paths without ':' are returned normalised.
    """
    if ":" not in path:
        return norm_cgpath(path)
    slice_, prefix, name = (path.split(":") + ["", ""])[:3]
    slice_ = slice_.strip("/")
    parts = []
    if slice_ and slice_ != "-.slice":
        stem = slice_.removesuffix(".slice")
        acc = ""
        for piece in stem.split("-"):
            acc = f"{acc}-{piece}" if acc else piece
            parts.append(acc + ".slice")
    leaf = f"{prefix}-{name}.scope" if prefix else name
    if name.endswith(".slice"):
        leaf = name
    return "/" + "/".join(parts + ([leaf] if leaf else []))


def pod_cgroup_path(cgpath: str) -> str | None:
    """The pod-level ancestor of a cgroup path (kubelet layouts), or None."""
    parts = [p for p in norm_cgpath(cgpath).split("/") if p]
    for i in range(len(parts), 0, -1):
        sub = "/" + "/".join(parts[:i])
        if classify(sub)["level"] == "pod":
            return sub
    return None


def _child_dirs(transport: NodeTransport, d: str) -> list[str]:
    try:
        names = transport.listdir(d)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    out = []
    for n in names:
        if n in NOT_DIRS:
            continue
        if "." in n and not (n.endswith(".slice") or n.endswith(".scope")):
            continue
        if transport.is_dir(f"{d}/{n}"):
            out.append(n)
    return out


def kubepods_tree(transport: NodeTransport, fs: CgroupFS, controller: str = "cpu", max_depth: int = 3) -> list[dict]:
    """Walk kubelet's tree in one hierarchy: kubepods root, QoS groups, pods,
    and the pods' children (containers, kata_<id>). Returns classify() dicts
    with a "path" key, parents before children."""
    m = fs.mount_for(controller) or fs.mount_for("unified")
    if m is None:
        return []
    out: list[dict] = []
    for root in ("/kubepods", "/kubepods.slice"):
        d = fs._join(m, root)
        if not transport.is_dir(d):
            continue
        stack = [(root, 0)]
        while stack:
            cg, depth = stack.pop(0)
            info = classify(cg)
            info["path"] = cg
            out.append(info)
            if info["level"] in ("container", "sandbox") or depth >= max_depth:
                continue
            for n in _child_dirs(transport, fs._join(m, cg)):
                stack.append((cg.rstrip("/") + "/" + n, depth + 1))
    return out


def overhead_cgroups(transport: NodeTransport, fs: CgroupFS, controller: str = "cpu") -> list[str]:
    m = fs.mount_for(controller) or fs.mount_for("unified")
    if m is None:
        return []
    return [f"/kata_overhead/{n}" for n in _child_dirs(transport, fs._join(m, "/kata_overhead"))]
