"""A process's threads as the scheduler sees them: vCPU identity, affinity,
cgroup, resctrl group, scheduling policy and nice, from /proc on the node.

vCPU threads by name: Cloud Hypervisor always names them ``vcpu<n>`` (vmm/src/cpu.rs,
``thread::Builder::new().name(format!("vcpu{cpu_id}"))``), Firecracker ``fc_vcpu <n>``
(src/vmm/src/vstate/vcpu). QEMU names them ``CPU <n>/KVM`` only with ``-name
...,debug-threads=on``, which Kata's Go runtime adds only when ``[hypervisor.qemu]
enable_debug = true`` (kata-containers src/runtime/pkg/govmm/qemu/qemu.go ``appendName``:
``if config.Debug { nameParams = append(nameParams, "debug-threads=on") }``): a production
QEMU's vCPU threads carry its default comm. For those, :func:`identify_vcpus` does what Kata
does (src/runtime/virtcontainers/qemu.go ``GetThreadIDs``: QMP ``query-cpus-fast`` (on the extra monitor: qmp.sock is the runtime's), each
CPU's ``thread-id``), else, with ``sandbox_cgroup_only = false`` on cgroup v1, takes the
threads the runtime moved into the sandbox cgroup, else says it cannot tell. Only v1 moves
just the vCPUs: the runtime's ``LinuxCgroup.AddThread`` is ``AddTask`` (the TID to ``tasks``)
there, and on v2 ``cgroupsv2.Manager.AddProc`` (the TID to ``cgroup.procs``: kata-containers
src/runtime/pkg/resourcecontrol/cgroups.go, called per vCPU by ``constrainHypervisor`` in
src/runtime/virtcontainers/sandbox.go), for which the kernel moves the whole thread group
(linux kernel/cgroup/cgroup.c ``cgroup_procs_write_start``: ``tsk = tsk->group_leader``): on
v2 every thread of the VMM is in the sandbox cgroup, and being there names no vCPU.
"""
from __future__ import annotations

import re

from katactl.errors import KatactlError, NotFound, UsageError
from katactl.isolation.cgroups import expand_systemd, norm_cgpath, parse_proc_cgroup
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
        try:
            cg = parse_proc_cgroup(transport.read_text(base + "/cgroup"))
            cg_error = None
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue  # it exited after its comm was read (VM shutting down, vCPU unplugged)
        except OSError as e:
            cg, cg_error = {}, e.strerror or str(e)
        if any(outside_own_ns(cg[c]) for c in controllers if c in cg):
            cg, cg_error = {}, OTHER_CGROUPNS
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
        if cg_error is not None:
            row["cgroupError"] = cg_error  # where it is, is unknown: never "outside"
        if tid_groups is not None:
            row["resctrlGroup"] = tid_groups.get(tid, "/")
        out.append(row)
    out.sort(key=lambda r: (r["role"] != "main", r["role"] != "vcpu", r["vcpu"] or 0, r["tid"]))
    return out


#: why a thread's cgroup is unknown when katactl runs in a cgroup namespace of its own
OTHER_CGROUPNS = ("its cgroup path is relative to katactl's own cgroup namespace ('/..'): run katactl in the "
                  "host's (on the host, or a node pod sharing the host cgroup namespace)")


def outside_own_ns(path: str) -> bool:
    """/proc/<pid>/cgroup as read from another cgroup namespace: a cgroup outside the reader's
    namespace root shows as ``/..``-relative (cgroup_namespaces(7)), not the host path."""
    return path == "/.." or path.startswith("/../")


def primary_cgroup(row: dict) -> str | None:
    c = row.get("cgroups", {})
    return c.get("cpu") or c.get("unified")


# -- vCPUs of an unnamed QEMU ----------------------------------------------------------------
#: how long the extra monitor may take to greet and answer
QMP_TIMEOUT = 2.0


def needs_identity(hypervisor: str | None, named: int) -> bool:
    """QEMU without named vCPU threads (no debug-threads=on): the names say nothing."""
    return hypervisor == "qemu" and named == 0


def qmp_vcpus(transport: NodeTransport, sb, *, timeout: float = QMP_TIMEOUT) -> tuple[dict[int, int | None] | None, str]:
    """({tid: cpu index}, socket) of a QEMU sandbox's vCPUs from QMP ``query-cpus-fast``
    (``thread-id`` > 0, as Kata's GetThreadIDs) over its extra monitor; (None, why) else.

    Never qmp.sock: the runtime holds it for the sandbox's life, and QEMU's monitor
    listens with a backlog of one and accepts nobody else meanwhile, so a connection to
    it stays queued until the runtime lets go (closing ours does not dequeue it): one
    inspection would fill the queue, and every later client (katactl's balloon or
    vmcore fallback, the runtime reconnecting) would be refused with EAGAIN."""
    from katactl.backends.qmp import QMPClient

    path = sb.extra_monitor_socket
    if not path:
        return None, "no extra monitor (extra_monitor_socket in [hypervisor.qemu]; qmp.sock is the runtime's)"
    try:
        c = QMPClient.connect(transport, path, timeout=timeout)
    except (KatactlError, OSError) as e:
        return None, f"the extra monitor {path} did not answer ({getattr(e, 'message', e)})"
    try:
        cpus = c.execute("query-cpus-fast")
    except (KatactlError, OSError) as e:
        return None, f"the extra monitor {path} did not answer ({getattr(e, 'message', e)})"
    finally:
        c.close()
    out: dict[int, int | None] = {}
    for cpu in cpus if isinstance(cpus, list) else []:
        tid = cpu.get("thread-id") if isinstance(cpu, dict) else None
        idx = cpu.get("cpu-index")
        if isinstance(tid, int) and not isinstance(tid, bool) and tid > 0:
            out[tid] = idx if isinstance(idx, int) and not isinstance(idx, bool) else None
    if out:
        return out, path
    return None, f"the extra monitor {path} named no vCPU thread"


def qmp_vcpus_many(transport: NodeTransport, sbs, *, timeout: float = QMP_TIMEOUT,
                   workers: int = 16) -> dict[str, tuple[dict[int, int | None] | None, str]]:
    """:func:`qmp_vcpus` of many sandboxes at once ({sandbox id: result}): a monitor held
    by another client costs its greeting timeout, so they wait side by side."""
    sbs = list(sbs)
    if len(sbs) <= 1:
        return {sb.id: qmp_vcpus(transport, sb, timeout=timeout) for sb in sbs}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(workers, len(sbs))) as ex:
        got = list(ex.map(lambda sb: qmp_vcpus(transport, sb, timeout=timeout), sbs))
    return {sb.id: g for sb, g in zip(sbs, got, strict=True)}


def sandbox_cgroup_of(sb) -> str | None:
    """The sandbox cgroup where the runtime moves the vCPU threads (sandbox_cgroup_only = false):
    exactly them on cgroup v1, the whole VMM on v2 (see the module docstring)."""
    if sb.sandbox_cgroup_only is not False or not sb.sandbox_cgroup_path:
        return None
    try:
        return expand_systemd(sb.sandbox_cgroup_path)
    except UsageError:
        return None


def inside(path: str | None, parent: str) -> bool:
    """A cgroup path at or below parent."""
    if not path:
        return False
    try:
        p, q = norm_cgpath(path), norm_cgpath(parent)
    except UsageError:
        return False
    return p == q or p.startswith(q.rstrip("/") + "/")


def unknown_note(sb, qmp_why: str, *, v2: bool = False) -> str:
    return (f"QEMU's vCPU threads are unnamed (no debug-threads=on: Kata's enable_debug is off), {qmp_why}"
            + (" and sandbox_cgroup_only = true (every thread in one cgroup)" if sb.sandbox_cgroup_only
               else " and sandbox_cgroup_only is not recorded" if sb.sandbox_cgroup_only is None
               else " and no sandbox cgroup is recorded" if not sb.sandbox_cgroup_path
               else " and on cgroup v2 the runtime moves the whole VMM into the sandbox cgroup (the vCPU's "
                    "thread id written to cgroup.procs moves its process): every thread in one cgroup" if v2
               else " and none of its threads is in the sandbox cgroup"))


def identify_vcpus(transport: NodeTransport, sb, rows: list[dict], *, qmp: tuple | None = None,
                   timeout: float = QMP_TIMEOUT) -> dict:
    """Mark the vCPU rows of a sandbox's VMM (:func:`list_threads` rows) when the names did
    not: {"by": "names" | "qmp" | "cgroup" | None, "note": why unknown (by None)}.
    ``qmp``: its :func:`qmp_vcpus` result when already asked (:func:`qmp_vcpus_many`)."""
    if not needs_identity(sb.hypervisor, sum(r["role"] == "vcpu" for r in rows)):
        return {"by": "names", "note": None}
    got, why = qmp if qmp is not None else qmp_vcpus(transport, sb, timeout=timeout)
    if got and not any(r["tid"] in got for r in rows):
        # another pid namespace's ids (or another QEMU behind that socket): not these threads
        why = f"QMP's vCPU thread ids {sorted(got)[:4]} are no threads of pid {sb.hypervisor_pid}"
        got = None
    if got:
        for r in rows:
            if r["tid"] in got:
                r["role"], r["vcpu"] = "vcpu", got[r["tid"]]
        by = "qmp"
    else:
        sp = sandbox_cgroup_of(sb)
        hits = []
        v2 = False
        if sp is not None:
            for r in rows:
                if r["tid"] == sb.hypervisor_pid:
                    continue  # the main thread runs no vCPU
                cg = r["cgroups"] if r.get("cgroups") else parse_proc_cgroup(
                    _read(transport, f"/proc/{sb.hypervisor_pid}/task/{r['tid']}/cgroup") or "")
                if "cpu" not in cg:
                    # no v1 cpu hierarchy: the v2 sandbox cgroup holds the whole VMM, vCPUs or not
                    v2 = v2 or "unified" in cg
                    continue
                if inside(cg["cpu"], sp):
                    hits.append(r)
        if not hits:
            return {"by": None, "note": unknown_note(sb, why, v2=v2)}
        for r in hits:
            r["role"], r["vcpu"] = "vcpu", None
        by = "cgroup"
    rows.sort(key=lambda r: (r["role"] != "main", r["role"] != "vcpu", r["vcpu"] or 0, r["tid"]))
    return {"by": by, "note": None}
