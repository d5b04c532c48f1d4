"""A process's threads as the scheduler sees them: vCPU identity, affinity,
cgroup, resctrl group, scheduling policy and nice, from /proc on the node."""
from __future__ import annotations

import re

from katactl.errors import NotFound
from katactl.isolation.cgroups import parse_proc_cgroup
from katactl.backends.base import NodeTransport

#: vCPU thread names per hypervisor (comm, 15 chars max)
VCPU_PATTERNS = {
    "qemu": re.compile(r"^CPU (\d+)/(?:KVM|TCG|HVF|WHPX)$"),
    "clh": re.compile(r"^vcpu(\d+)$"),
    "fc": re.compile(r"^fc_vcpu ?(\d+)$"),
    "dragonball": re.compile(r"^db_vcpu_?(\d+)$"),
}
_ANY_VCPU = [p for p in VCPU_PATTERNS.values()]

POLICIES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
            6: "SCHED_DEADLINE"}


def vcpu_index(comm: str, hypervisor: str | None) -> int | None:
    pats = [VCPU_PATTERNS[hypervisor]] if hypervisor in VCPU_PATTERNS else _ANY_VCPU
    for p in pats:
        m = p.fullmatch(comm)
        if m:
            return int(m.group(1))
    return None


def parse_stat(text: str) -> dict:
    """/proc/<pid>/task/<tid>/stat -> {nice, policy, processor, rtPriority} (comm may hold ') ')."""
    rest = text[text.rfind(")") + 2:].split()
    out: dict[str, str | int] = {}
    try:
        out["state"] = rest[0]
        out["nice"] = int(rest[16])
        out["processor"] = int(rest[36])
        out["rtPriority"] = int(rest[37])
        pol = int(rest[38])
        out["policy"] = POLICIES.get(pol, str(pol))
    except (IndexError, ValueError):
        pass
    return out


def _status_field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _read(transport: NodeTransport, path: str) -> str | None:
    try:
        return transport.read_text(path)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError:
        return None


def list_threads(transport: NodeTransport, pid: int, *, hypervisor: str | None = None, tid_groups: dict[int, str] | None = None,
                 controllers: tuple[str, ...] = ("cpu", "cpuset", "memory", "unified")) -> list[dict]:
    """Every thread of pid with its vCPU index (if any), affinity, cgroups,
    resctrl group, policy and nice. Threads that exit while we read are skipped."""
    try:
        tids = sorted(int(x) for x in transport.listdir(f"/proc/{pid}/task") if x.isdigit())
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"process {pid} does not exist on the node") from None
    out = []
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        comm = _read(transport, base + "/comm")
        if comm is None:
            continue
        comm = comm.rstrip("\n")
        stat = parse_stat(_read(transport, base + "/stat") or "")
        status = _read(transport, base + "/status") or ""
        cg = parse_proc_cgroup(_read(transport, base + "/cgroup") or "")
        v = vcpu_index(comm, hypervisor)
        row = {
            "tid": tid,
            "name": comm,
            "role": "vcpu" if v is not None else ("main" if tid == pid else "other"),
            "vcpu": v,
            "affinity": _status_field(status, "Cpus_allowed_list"),
            "cgroups": {c: cg[c] for c in controllers if c in cg},
            "policy": stat.get("policy"),
            "nice": stat.get("nice"),
            "rtPriority": stat.get("rtPriority"),
            "lastCpu": stat.get("processor"),
        }
        if tid_groups is not None:
            row["resctrlGroup"] = tid_groups.get(tid, "/")
        out.append(row)
    out.sort(key=lambda r: (r["role"] != "main", r["role"] != "vcpu", r["vcpu"] or 0, r["tid"]))
    return out


def primary_cgroup(row: dict) -> str | None:
    c = row.get("cgroups", {})
    return c.get("cpu") or c.get("unified")
