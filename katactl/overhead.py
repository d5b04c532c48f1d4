"""Pod overhead accounting: what each Kata pod declares (RuntimeClass ``overhead.podFixed``,
copied by admission into the pod's ``spec.overhead``) against what its sandbox really uses
on the node.

Declared: the pod's ``spec.overhead`` through the Kubernetes API, else its RuntimeClass's
``overhead.podFixed``; without an API (or to ask "what if"), one ``cpu=250m,memory=160Mi``
value from ``--runtime-class-overhead`` or the config file.

Measured, per sandbox, over one sampling window (two samples ``interval`` apart):

- the host processes of the sandbox: the shim (``<bundle>/shim.pid``), the VMM, virtiofsd
  (``VirtiofsDaemonPid`` / ``virtiofs_daemon_pid``) and the helpers (other descendants of the
  shim and VMM that belong to no other sandbox). A process shared by several sandboxes (a
  Dragonball VMM inside its shim, one lab daemon) is divided between them. When the shim's
  pid is unknown its figures come from its own ``/metrics`` (``kata_shim_proc_*``).
  CPU is the processes' CPU time minus the VMM's vCPU threads (the guest's work, which the
  pod's requests cover; a QEMU without debug-threads=on names none: see
  :func:`katactl.isolation.threads.identify_vcpus`; where they stay unknown the CPU is not
  measured, never the guest's counted as overhead). Memory is their RSS without its shared
  memory (``RssShmem`` of ``/proc/<pid>/status``): with virtio-fs Kata backs the guest's RAM
  with shared memory (kata-containers ``src/runtime/virtcontainers/qemu.go`` ``setupFileBackedMem``:
  ``/dev/shm``, ``MemShared``), which the VMM and virtiofsd (a vhost-user back-end, it maps the guest's
  regions: qemu ``docs/interop/vhost-user.rst`` ``VHOST_USER_SET_MEM_TABLE``) both hold
  resident; the guest's memory, covered by the pod's requests. The guest memory the guest uses
  (``MemTotal - MemFree`` of ``kata_guest_meminfo`` without the balloon's pages, as
  :func:`katactl.balloon.guest_used`) beyond that shared memory and the VMM's hugepages
  (``HugetlbPages``, never in RSS: ``enable_hugepages``) is taken out of the VMM's private
  memory (an anonymous backing). Without guest figures the VMM's private memory
  counts whole (noted on the item). Limits: docs/overhead.md.
- ``kata_overhead/<id>`` (``sandbox_cgroup_only = false``): the runtime starts in it, so the
  shim, the VMM and virtiofsd do too, then it moves each vCPU thread to the sandbox cgroup
  (kata-containers ``src/runtime/virtcontainers/sandbox.go``: ``setupResourceController``,
  ``constrainHypervisor`` -> ``AddThread``). On cgroup v1 that is the thread alone (``AddTask``:
  ``tasks``), so the cgroup's CPU usage, when it can be read, is the measured CPU (the kernel's
  own accounting; the processes are the breakdown). On v2 ``AddThread`` writes the TID to
  ``cgroup.procs`` (``src/runtime/pkg/resourcecontrol/cgroups.go``: ``cgroupsv2.Manager.AddProc``)
  and the kernel moves the whole VMM (linux ``kernel/cgroup/cgroup.c``
  ``cgroup_procs_write_start``: ``tsk->group_leader``): the cgroup keeps the shim and
  virtiofsd, and each member found outside it (``/proc/<pid>/cgroup``) adds its own CPU, the
  VMM's without its vCPU threads (``cgroup+processes``). Its memory is not overhead: memcg
  charges a page to the cgroup of the mm's owner, the VMM's thread-group leader (linux
  ``mm/memcontrol.c`` ``get_mem_cgroup_from_mm``: ``mem_cgroup_from_task(mm->owner)``), so
  the guest's RAM is charged there (on v2 what the VMM touched before it moved: a migration
  moves no charges, cgroup-v2.rst "Memory Ownership"). Memory always comes from the
  processes; the cgroup's is shown on the item
  (``cgroup.memoryBytes``, for information). ``measured.sources`` says where each figure
  came from, ``measured.source`` joins them (``cgroup+processes``).

Nothing here prints; :func:`measure_node` is what a command fans out over nodes and
:func:`report` turns the items of every node into findings, node sums and suggestions.
"""
from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import re
import threading
import time
from typing import Any

from katactl.errors import KatactlError, UsageError, as_katactl_error
from katactl.backends.base import NodeTransport
from katactl.procfacts import USER_HZ
from katactl.values import parse_quantity, parse_size

#: severities, as audit's (katactl.isolation.policy.SEVERITIES)
SEVERITIES = ("info", "low", "medium", "high", "critical")
#: measured/declared ratio -> severity: above 1 low, above 1.25 medium, above 1.5 high, above 2 critical
RATIO_SEVERITY = ((2.0, "critical"), (1.5, "high"), (1.25, "medium"), (1.0, "low"))
PROC_SCAN_LIMIT = 65536

# -- Kubernetes quantities (katactl.values: one parser for quantities and sizes) ----
def cpu_millis(q) -> int:
    """A CPU quantity in millicores, rounded up as the scheduler does ('0.1' -> 100)."""
    return int(math.ceil(parse_quantity(q, what="CPU quantity") * 1000))


def memory_bytes(q) -> int:
    """A memory quantity in bytes, rounded up ('160Mi' -> 167772160)."""
    return int(math.ceil(parse_quantity(q, what="memory quantity")))


def parse_declared(text, *, what: str = "--runtime-class-overhead") -> dict:
    """'cpu=250m,memory=160Mi' -> {cpuMillis: 250, memoryBytes: 167772160} (either may be left out)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"empty {what}: expected cpu=QUANTITY,memory=QUANTITY (e.g. cpu=250m,memory=160Mi)")
    out: dict = {"cpuMillis": None, "memoryBytes": None}
    for part in text.split(","):
        key, eq, val = part.strip(" ").partition("=")
        key = key.strip(" ")
        if not eq or key not in ("cpu", "memory"):
            raise UsageError(f"invalid {what} {text!r}: expected cpu=QUANTITY,memory=QUANTITY "
                             f"(e.g. cpu=250m,memory=160Mi), got {part!r}")
        field = "cpuMillis" if key == "cpu" else "memoryBytes"
        if out[field] is not None:
            raise UsageError(f"invalid {what} {text!r}: {key} given twice")
        try:
            # a memory size typed here reads as everywhere else in katactl (256m is refused, not 1 byte)
            out[field] = cpu_millis(val) if key == "cpu" else parse_size(val, allow_zero=True, what="memory")
        except UsageError as e:
            raise UsageError(f"invalid {what} {text!r}: {e.message}") from None
    return out


def parse_margin(text) -> float:
    """'10%' or '10' (percent) -> 0.10; 0 to 1000 %."""
    s = str(text).strip() if isinstance(text, (str, int, float)) and not isinstance(text, bool) else ""
    num = s[:-1].strip() if s.endswith("%") else s
    if not re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", num, re.ASCII):
        raise UsageError(f"invalid --margin {text!r}: expected a percentage such as 10% or 25")
    v = float(num)
    if v > 1000:
        raise UsageError(f"invalid --margin {text!r}: at most 1000%")
    return v / 100.0


def check_fail_on(text) -> str:
    if text not in SEVERITIES:
        raise UsageError(f"invalid --fail-on {text!r}: choose from {', '.join(SEVERITIES)}")
    return text


# -- what the scheduler reserved ------------------------------------------------------
class Declared:
    """Where declared overheads come from: the Kubernetes API (pods and RuntimeClasses,
    asked once per namespace and shared by every node's thread), else a fixed value."""

    def __init__(self, *, api=None, fixed: dict | None = None, fixed_source: str | None = None,
                 fallback: dict | None = None):
        self.api = api
        self.fixed = fixed
        self.fixed_source = fixed_source
        #: the configured runtime_class_overhead, used when the API fails
        self.fallback = fallback
        self._lock = threading.Lock()
        self._rcs: dict | None = None
        self._pods: dict[str, dict] = {}   # namespace -> {name: pod}
        #: the API's failure, once: every later lookup falls back without asking again
        self.api_error: KatactlError | None = None
        self.warnings: list[str] = []

    def _runtime_classes(self) -> dict:
        if self._rcs is None:
            from katactl.nodes import runtime_classes

            self._rcs = runtime_classes(self.api)
        return self._rcs

    def _pod(self, ns: str, name: str) -> dict | None:
        if ns not in self._pods:
            pods = {}
            from katactl.backends.kube import seg

            for page in self.api.list_pages(f"/api/v1/namespaces/{seg(ns)}/pods"):
                for p in page:
                    pods[(p.get("metadata") or {}).get("name")] = p
            self._pods[ns] = pods
        return self._pods[ns].get(name)

    def lookup(self, pod: dict | None) -> tuple[str | None, dict]:
        """(RuntimeClass name, {cpuMillis, memoryBytes, source}) of a sandbox's pod."""
        if self.fixed is not None:
            return None, {**self.fixed, "source": self.fixed_source}
        none = {"cpuMillis": None, "memoryBytes": None, "source": None}
        if self.api is None or not pod or not pod.get("name") or not pod.get("namespace"):
            return None, none
        with self._lock:
            if self.api_error is None:
                try:
                    obj = self._pod(pod["namespace"], pod["name"])
                    rcs = self._runtime_classes() if obj is not None else {}
                except KatactlError as e:
                    # the node-local measurement still stands (design: a per-target note, not an abort)
                    self.api_error = e
                    self.warnings.append(f"{e.message}: declared overhead "
                                         + ("from runtime_class_overhead (config)" if self.fallback
                                            else "unknown"))
            if self.api_error is not None:
                note = f"declared overhead not read from the Kubernetes API ({self.api_error.message})"
                if self.fallback is not None:
                    return None, {**self.fallback, "source": "config",
                                  "note": note + ": runtime_class_overhead from the config used"}
                return None, {**none, "note": note}
        if obj is None:
            return None, {**none, "source": "api", "note": f"pod {pod['namespace']}/{pod['name']} not found "
                                                           "in the Kubernetes API"}
        if pod.get("uid") and (obj.get("metadata") or {}).get("uid") not in (None, pod["uid"]):
            return None, {**none, "source": "api", "note": "the API's pod of that name has another UID "
                                                           "(recreated): its overhead is not this sandbox's"}
        spec = obj.get("spec") or {}
        rc = spec.get("runtimeClassName")
        ov = spec.get("overhead")
        src = "pod"
        if not ov and rc and isinstance(rcs.get(rc), dict):
            ov, src = ((rcs[rc].get("overhead") or {}).get("podFixed")), "runtimeclass"
        if not isinstance(ov, dict) or not ov:
            why = (f"RuntimeClass {rc} declares no overhead.podFixed" if rc else "the pod has no runtimeClassName")
            return rc, {"cpuMillis": 0, "memoryBytes": 0, "source": src, "note": f"no Pod overhead declared ({why})"}
        out: dict[str, Any] = {"cpuMillis": None, "memoryBytes": None, "source": src}
        for key, field, conv in (("cpu", "cpuMillis", cpu_millis), ("memory", "memoryBytes", memory_bytes)):
            if key in ov:
                try:
                    out[field] = conv(ov[key])
                except UsageError:
                    out["note"] = f"unparsable overhead {key} {ov[key]!r}"
            else:
                out[field] = 0
        return rc, out


def declared_source(settings, flag: str | None, configured: str | None, *, use_api: bool | None = None,
                    configured_from: str = "config") -> Declared:
    """The declared-overhead source for this run: the flag (a what-if, it wins), the Kubernetes
    API when a kubeconfig is configured (the config file's runtime_class_overhead, when set,
    where the API fails), else the config file's runtime_class_overhead."""
    if flag is not None:
        return Declared(fixed=parse_declared(flag), fixed_source="flag")
    if configured:  # a bad value is a usage error even when the API is the source this time
        fixed = parse_declared(configured, what=f"runtime_class_overhead (from {configured_from})")
    if use_api is None:
        use_api = kube_configured(settings)
    if use_api:
        from katactl.backends import kube

        return Declared(api=kube.client(settings), fallback=fixed if configured else None)
    if configured:
        return Declared(fixed=fixed, fixed_source="config")
    return Declared()


def kube_configured(settings) -> bool:
    if getattr(settings, "kubeconfig", None) or os.environ.get("KUBECONFIG"):
        return True
    return os.path.isfile(os.path.expanduser("~/.kube/config"))


# -- what the node spends ----------------------------------------------------------------
@dataclasses.dataclass
class _Proc:
    pid: int
    ppid: int | None
    comm: str
    ticks: int          # utime + stime
    rss_pages: int


def _parse_stat(raw: bytes) -> tuple[str, list[str]] | None:
    text = raw.decode("utf-8", "replace")
    head, sep, tail = text.rpartition(")")
    fields = tail.split()
    if not sep or len(fields) < 22:
        return None
    return head.partition("(")[2], fields


def _proc_of(pid: int, raw) -> _Proc | None:
    if not isinstance(raw, bytes):
        return None
    got = _parse_stat(raw)
    if got is None:
        return None
    comm, f = got
    try:
        return _Proc(pid, int(f[1]), comm, int(f[11]) + int(f[12]), int(f[21]))
    except (ValueError, IndexError):
        return None


def _proc_table(transport: NodeTransport) -> dict[int, _Proc]:
    """Every process of the node from /proc/<pid>/stat (one batched read)."""
    try:
        pids = [int(p) for p in transport.listdir("/proc") if p.isdigit()][:PROC_SCAN_LIMIT]
    except OSError:
        return {}
    got = transport.read_many([f"/proc/{p}/stat" for p in pids], limit=4096) if pids else {}
    out = {}
    for p in pids:
        pr = _proc_of(p, got.get(f"/proc/{p}/stat"))
        if pr is not None:
            out[p] = pr
    return out


def _virtiofsd_pid(sb) -> int | None:
    raw = sb.raw or {}
    v = ((raw.get("HypervisorState") or {}).get("VirtiofsDaemonPid") if sb.runtime == "go"
         else (raw.get("hypervisor") or {}).get("virtiofs_daemon_pid"))
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def members(sbs, table: dict[int, _Proc]) -> dict[str, dict[int, str]]:
    """{sandbox id: {pid: role}}: shim, vmm (or shim+vmm), virtiofsd, helper."""
    roots: dict[str, dict[int, str]] = {}
    owned: dict[int, set[str]] = {}
    for sb in sbs:
        m: dict[int, str] = {}
        if sb.shim_pid:
            m[sb.shim_pid] = "shim"
        if sb.hypervisor_pid:
            m[sb.hypervisor_pid] = "shim+vmm" if sb.hypervisor_pid == sb.shim_pid else "vmm"
        vfs = _virtiofsd_pid(sb)
        if vfs and vfs not in m:
            m[vfs] = "virtiofsd"
        roots[sb.id] = m
        for p in m:
            owned.setdefault(p, set()).add(sb.id)
    if table:
        children: dict[int, list[int]] = {}
        for proc in table.values():
            if proc.ppid:
                children.setdefault(proc.ppid, []).append(proc.pid)
        for sb in sbs:
            m = roots[sb.id]
            stack = [p for p in m if len(owned.get(p, ())) == 1]  # never descend a shared process
            seen = set(stack)
            while stack:
                for c in children.get(stack.pop(), ()):
                    if c in seen or (c in owned and sb.id not in owned[c]):
                        continue  # another sandbox's own process (and what hangs below it)
                    seen.add(c)
                    if c not in m:
                        m[c] = "helper"
                    stack.append(c)
    return roots


def _vcpu_tids(transport: NodeTransport, sbs) -> tuple[dict[int, list[int]], dict[int, str]]:
    """({vmm pid: [vCPU thread ids]}, {vmm pid: why its vCPUs are unknown}). By the names of
    /proc/<pid>/task/<tid>; a QEMU without debug-threads=on names none: then as
    :func:`katactl.isolation.threads.identify_vcpus` (QMP query-cpus-fast, else, on cgroup v1,
    the sandbox cgroup where the runtime moved them)."""
    from katactl.isolation import threads as th

    vmms = {sb.hypervisor_pid: sb for sb in sbs if sb.hypervisor_pid}
    if not vmms:
        return {}, {}
    dirs = transport.scan_dirs([f"/proc/{p}/task" for p in vmms])
    tids: dict[int, list[str]] = {}
    for p in vmms:
        entries = dirs.get(f"/proc/{p}/task")
        tids[p] = [n for n, _ in entries if n.isdigit()] if isinstance(entries, list) else []
    got = transport.read_many([f"/proc/{p}/task/{n}/stat" for p, ns in tids.items() for n in ns], limit=4096)
    out: dict[int, list[int]] = {}
    for p, ns in tids.items():
        for n in ns:
            raw = got.get(f"/proc/{p}/task/{n}/stat")
            parsed = _parse_stat(raw) if isinstance(raw, bytes) else None
            if parsed and th.vcpu_index(parsed[0], vmms[p].hypervisor) is not None:
                out.setdefault(p, []).append(int(n))
    # a VMM that is gone (no threads) is noted as such by _item, not as unknown vCPUs
    todo = [sb for p, sb in vmms.items() if tids[p] and th.needs_identity(sb.hypervisor, len(out.get(p, ())))]
    if not todo:
        return out, {}
    qmp = th.qmp_vcpus_many(transport, todo)
    cg = transport.read_many([f"/proc/{sb.hypervisor_pid}/task/{n}/cgroup" for sb in todo
                              if th.sandbox_cgroup_of(sb) for n in tids[sb.hypervisor_pid]], limit=4096)
    unknown: dict[int, str] = {}
    for sb in todo:
        p = sb.hypervisor_pid
        rows: list[dict[str, Any]] = [
            {"tid": int(n), "role": "other", "vcpu": None, "cgroups": _cgroups_of(cg.get(f"/proc/{p}/task/{n}/cgroup"))}
            for n in tids[p]]
        ident = th.identify_vcpus(transport, sb, rows, qmp=qmp[sb.id])
        if ident["by"] is None:
            unknown[p] = ident["note"]
        else:
            out[p] = [r["tid"] for r in rows if r["role"] == "vcpu"]
    return out, unknown


def _cgroups_of(raw) -> dict[str, str]:
    from katactl.isolation.cgroups import parse_proc_cgroup

    c = parse_proc_cgroup(raw.decode("utf-8", "replace")) if isinstance(raw, bytes) else {}
    return {k: c[k] for k in ("cpu", "unified") if k in c}


def _thread_ticks(transport: NodeTransport, threads: dict[int, list[int]]) -> dict[tuple[int, int], int]:
    paths = {(p, n): f"/proc/{p}/task/{n}/stat" for p, ns in threads.items() for n in ns}
    got = transport.read_many(list(paths.values()), limit=4096) if paths else {}
    out = {}
    for k, path in paths.items():
        pr = _proc_of(k[1], got.get(path))
        if pr is not None:
            out[k] = pr.ticks
    return out


def _cgroup_reader(transport: NodeTransport):
    from katactl.isolation.cgroups import CgroupFS

    try:
        fs = CgroupFS(transport)
    except (OSError, KatactlError):
        return None
    if fs.mode == "none":
        return None
    return fs


def _cgroup_paths(fs, cgpath: str) -> dict[str, str]:
    """{memory: file, cpu: file} of a cgroup, v1 or v2 as the node mounts them."""
    out = {}
    mem_v = fs.version_of("memory")
    if mem_v is not None:
        out["memory"] = fs.dir("memory", cgpath) + ("/memory.current" if mem_v == 2 else "/memory.usage_in_bytes")
    if "cpuacct" in fs.v1:
        out["cpu"] = fs._join(fs.v1["cpuacct"], cgpath) + "/cpuacct.usage"
    elif fs.v2 is not None:
        out["cpu"] = fs._join(fs.v2, cgpath) + "/cpu.stat"
    return out


def _cpu_usage_ns(path: str, raw: bytes) -> int | None:
    text = raw.decode("ascii", "replace")
    try:
        if path.endswith("cpu.stat"):
            for line in text.splitlines():
                k, _, v = line.partition(" ")
                if k == "usage_usec":
                    return int(v) * 1000
            return None
        return int(text.strip())
    except ValueError:
        return None


@dataclasses.dataclass
class _Sample:
    t: float
    procs: dict            # pid -> procfacts.ProcStats | None
    vcpu: dict             # (pid, tid) -> ticks
    cgroup: dict           # path -> bytes | OSError


def _sample(transport: NodeTransport, facts, pids, threads, cg_files) -> _Sample:
    now = time.monotonic()
    # a zombie (state Z) has exited, only its parent's wait is missing: gone, as identities() says
    procs = {p: None if st is not None and st.state == "Z" else st
             for p, st in (facts.stats(sorted(pids)) if pids else {}).items()}
    vcpu = _thread_ticks(transport, threads)
    cg = transport.read_many(sorted(cg_files), limit=65536) if cg_files else {}
    return _Sample(now, procs, vcpu, cg)


def measure_node(transport: NodeTransport, *, interval: float = 1.0, refs=None, declared: Declared | None = None,
                 timeout: float = 5.0, workers: int = 32, scrape: bool = True) -> list[dict]:
    """One item per running Kata sandbox of the node (those matching refs: ids, id prefixes,
    NAMESPACE/POD). CPU over ``interval`` seconds (two samples)."""
    from katactl import metrics, procfacts, sandbox

    running = [s for s in sandbox.discover(transport, timeout=min(timeout, 1.0)) if s.state == "running"]
    sbs = select(transport, running, refs) if refs else running
    if not sbs:
        return []
    declared = declared or Declared()
    guest = metrics.scrape_all(transport, sbs, timeout=timeout, workers=workers) if scrape else {}
    need_tree = any(s.shim_pid or s.hypervisor_pid for s in sbs)
    table = _proc_table(transport) if need_tree else {}
    # members and sharers over every running sandbox, whichever refs named: a process the others
    # share too (one lab daemon, parent of every QEMU) is divided and never descended, so their
    # VMMs are not the named sandbox's helpers
    mem = members(running, table)
    sharers: dict[int, int] = {}
    for m in mem.values():
        for p in m:
            sharers[p] = sharers.get(p, 0) + 1
    threads, vcpus_unknown = _vcpu_tids(transport, sbs)
    fs = _cgroup_reader(transport) if any(s.overhead_cgroup_path and s.sandbox_cgroup_only is not True for s in sbs) else None
    cg_of: dict[str, dict[str, str]] = {}
    if fs is not None:
        for s in sbs:
            if s.overhead_cgroup_path and s.sandbox_cgroup_only is not True:
                try:
                    cg_of[s.id] = _cgroup_paths(fs, s.overhead_cgroup_path)
                except KatactlError:
                    pass
    cg_files = {f for d in cg_of.values() for f in d.values()}
    placed = _v2_placement(transport, fs, [s for s in sbs if s.id in cg_of], mem) if cg_of else {}
    # the members' /proc/<pid>/stat and status in one batched read per sample, on this host
    # too: psutil's per-process calls cost 2-3x as much (400 processes: 0.04-0.05 s a sample)
    facts = procfacts.TransportProcessFacts(transport)
    pids = {p for sb in sbs for p in mem[sb.id]}
    a = _sample(transport, facts, pids, threads, cg_files)
    if interval > 0:
        time.sleep(interval)
    b = _sample(transport, facts, pids, threads, cg_files)
    dt = b.t - a.t
    items = []
    for sb in sbs:
        g = guest.get(sb.id)
        items.append(_item(sb, mem[sb.id], sharers, threads, vcpus_unknown, a, b, dt, g, cg_of.get(sb.id),
                           declared, fs, placed.get(sb.id)))
    return items


def select(transport: NodeTransport, sbs, refs) -> list:
    """The sandboxes of sbs that refs name: an id or id prefix as every command resolves one
    (:func:`katactl.sandbox.resolve`: the exact id wins, a prefix of several sandboxes is
    Ambiguous, exit 3), NAMESPACE/POD every sandbox of that pod."""
    from katactl.errors import Ambiguous, NotFound
    from katactl.sandbox import resolve

    ids = set()
    for r in refs:
        if "/" in r:
            continue
        try:
            ids.add(resolve(transport, r, check=False).id)
        except Ambiguous:
            raise
        except NotFound:
            pass  # on another node, or none: the command says which refs matched nothing
    return [s for s in sbs if s.id in ids or any("/" in r and _pod_matches(s, r) for r in refs)]


def _pod_matches(sb, ref: str) -> bool:
    parts = ref.split("/")
    ns, name = parts[-2], parts[-1]
    return bool(sb.pod) and sb.pod.get("namespace") == ns and sb.pod.get("name") == name


def _item(sb, mem: dict[int, str], sharers, threads, vcpus_unknown: dict[int, str], a: _Sample, b: _Sample,
          dt: float, g, cg: dict | None, declared: Declared, fs, placed: dict[int, bool | None] | None = None) -> dict:
    from katactl import metrics
    from katactl.sandbox import pod_ref

    notes: list[str] = []
    guest_err = g if isinstance(g, KatactlError) else None
    g = g if isinstance(g, dict) else None
    if guest_err is not None:
        notes.append(f"shim /metrics: {guest_err.message}")
    g_total = g.get("guestMemTotal") if g else None
    # as top's, with the deflate-on-oom balloon's pages (in MemTotal, not in MemFree, and not
    # resident in the VMM) taken out; None where the statistics predate the balloon's last move
    guest_used = metrics.sandbox_guest_used(sb, g, metrics.balloon_bytes(g), resident=True) if g else None
    procs = []
    mem_total, cpu_total, cpu_known = 0, 0.0, dt > 0
    guest_cpu: dict[int, float] = {}  # VMM pid -> its vCPU threads' millicores
    for pid, role in sorted(mem.items(), key=lambda kv: (_ROLE_ORDER.get(kv[1], 9), kv[0])):
        sa, sb_ = a.procs.get(pid), b.procs.get(pid)
        share = sharers.get(pid, 1)
        st = sb_ or sa
        # a VMM gone by the second sample: the sandbox is being torn down, its first sample
        # no measurement of a running pod (docs/overhead.md "Nothing measured")
        if st is None or (sb_ is None and role in ("vmm", "shim+vmm")):
            notes.append(f"{role} pid {pid} " + ("exited while measured" if st else
                                                 "is not running (exited, or not visible)"))
            procs.append({"pid": pid, "role": role, "name": None, "rssBytes": None, "cpuMillis": None,
                          "shared": share if share > 1 else None, "gone": True})
            if role in ("vmm", "shim+vmm"):
                cpu_known = False
            continue
        if sb_ is None:
            notes.append(f"{role} pid {pid} exited while measured")
        rss = st.rss
        cpu = None
        if role in ("vmm", "shim+vmm") and pid in vcpus_unknown:
            # its CPU time is the guest's too, and which threads run the guest is unknown:
            # never counted as overhead (a false over-declared finding)
            notes.append(f"CPU not measured: the VMM's (pid {pid}) includes the guest's vCPU time, "
                         f"vCPU threads unknown: {vcpus_unknown[pid]}")
            cpu_known = False
        elif sa is not None and sb_ is not None and dt > 0 and sa.create_time == sb_.create_time:
            secs = max(0.0, sb_.cpu_seconds - sa.cpu_seconds)
            if role in ("vmm", "shim+vmm") and pid in threads:
                vt = sum(max(0, b.vcpu.get((pid, tid), 0) - a.vcpu.get((pid, tid), 0))
                         for tid in threads[pid] if (pid, tid) in a.vcpu and (pid, tid) in b.vcpu)
                secs = max(0.0, secs - vt / USER_HZ)
                guest_cpu[pid] = vt / USER_HZ / dt * 1000.0
            cpu = secs / dt * 1000.0
        elif dt > 0:
            cpu_known = False
        # a shared guest backing (virtio-fs: memory-backend-file share=on) is RssShmem in every
        # process that touched it (the VMM, virtiofsd mapping it for vhost-user): never overhead
        shmem = min(rss, st.rss_shmem or 0)
        own = rss - shmem
        if role in ("vmm", "shim+vmm"):
            if guest_used is not None:
                # what the guest uses beyond its shared backing is in the VMM's private memory
                # (an anonymous backing, Kata's default without virtio-fs), beyond its hugepage
                # backing too: HugetlbPages are not in VmRSS (linux fs/proc/task_mmu.c task_mem;
                # enable_hugepages: mem-path=/dev/hugepages, kata-containers
                # src/runtime/pkg/govmm/qemu/qemu.go appendMemoryKnobs)
                own = max(0, own - max(0, guest_used - shmem - (st.hugetlb or 0)))
            else:
                notes.append("no guest memory figures: the VMM's private memory counts whole "
                             "(the guest's included, unless its backing is shared)")
        own_share = own / share
        procs.append({"pid": pid, "role": role, "name": st.name, "rssBytes": rss, "shmemBytes": st.rss_shmem,
                      "hugetlbBytes": st.hugetlb,
                      "ownBytes": int(own_share),
                      "cpuMillis": None if cpu is None else round(cpu / share, 1),
                      "shared": share if share > 1 else None})
        mem_total += own_share
        if cpu is not None:
            cpu_total += cpu / share
    if not any(r in ("shim", "shim+vmm") for r in mem.values()) and g and g.get("shimRSS") is not None:
        procs.insert(0, {"pid": None, "role": "shim", "name": "(from the shim's /metrics)",
                         "rssBytes": int(g["shimRSS"]), "ownBytes": int(g["shimRSS"]), "cpuMillis": None,
                         "shared": None})
        mem_total += g["shimRSS"]
        notes.append("shim pid unknown (no shim.pid in the bundle): its RSS is from its /metrics, its CPU not counted")
    elif not any(r in ("shim", "shim+vmm") for r in mem.values()):
        notes.append("shim pid unknown and its /metrics gave no RSS: the shim is not counted")
    # a sandbox without its VMM is being torn down: the shim alone is no sample of a running
    # pod's overhead (it would pull the suggestions down), so nothing of it is measured
    vmm_gone = any(p.get("gone") for p in procs if p["role"] in ("vmm", "shim+vmm"))
    live = not vmm_gone and any(not p.get("gone") for p in procs)  # the shim's /metrics row counts
    mem_meas = int(mem_total) if live else None
    cpu_meas = round(cpu_total) if live and cpu_known else None
    sources = {"memoryBytes": "processes" if mem_meas is not None else None,
               "cpuMillis": "processes" if cpu_meas is not None else None}
    cgroup = None
    if sb.overhead_cgroup_path and sb.sandbox_cgroup_only is not True:
        cgroup = _cgroup_item(sb.overhead_cgroup_path, cg, a, b, dt, fs)
        # CPU only: the cgroup's memory holds the guest's RAM (see the module docstring)
        if cgroup.get("cpuMillis") is not None and placed is None:
            cpu_meas, sources["cpuMillis"] = cgroup["cpuMillis"], "cgroup"
        elif cgroup.get("cpuMillis") is not None and not vmm_gone:
            got = _v2_cgroup_cpu(cgroup, procs, placed or {}, guest_cpu, notes)
            if got is not None:
                cpu_meas, sources["cpuMillis"] = got
    # nothing measured (the sandbox stopped between discovery and the samples, or its VMM did) is not "no overhead":
    # null, left out of the node sums and the suggestions
    measured = None if vmm_gone or (mem_meas is None and cpu_meas is None) else {
        "memoryBytes": mem_meas, "cpuMillis": cpu_meas,
        "source": "+".join(sorted({s for v in sources.values() if v for s in v.split("+")})) or None,
        "sources": sources}
    rc, dec = declared.lookup(sb.pod)
    if dec.get("note"):
        notes.append(dec["note"])
    dec_out = {"cpuMillis": dec.get("cpuMillis"), "memoryBytes": dec.get("memoryBytes"), "source": dec.get("source")}
    meas = measured or {}
    ratio = {"cpu": _ratio(meas.get("cpuMillis"), dec_out["cpuMillis"]),
             "memory": _ratio(meas.get("memoryBytes"), dec_out["memoryBytes"])}
    known = [r for r in ratio.values() if r is not None]
    ratio["max"] = max(known) if known else None
    severity: str | None
    if measured is None:
        severity, message = "info", ("not measured: its VMM was not running (see notes)" if vmm_gone else
                                     "not measured: none of the sandbox's processes was running (see notes)")
    else:
        severity, message = _judge({**dec_out, "note": dec.get("note")}, measured, ratio)
    vcpus_note = vcpus_unknown.get(sb.hypervisor_pid) if sb.hypervisor_pid and not vmm_gone else None
    if vcpus_note and measured is not None and measured["cpuMillis"] is None and dec_out.get("source") is not None:
        message += "; CPU not measured (the VMM's vCPU threads are unknown: guest CPU is not overhead)"
    guest_mem = int(g_total) if g_total is not None else (
        sb.total_memory_mib * (1 << 20) if sb.total_memory_mib is not None else None)
    return {
        "id": sb.id, "pod": sb.pod, "podRef": pod_ref(sb.pod), "runtimeClass": rc, "hypervisor": sb.hypervisor,
        "declared": dec_out, "measured": measured, "ratio": ratio,
        "guestMemoryBytes": guest_mem, "guestMemoryUsedBytes": guest_used,
        "processes": procs, "cgroup": cgroup, "vcpusUnknown": vcpus_note,
        "severity": severity, "message": message, "notes": notes,
    }


_ROLE_ORDER = {"shim": 0, "shim+vmm": 0, "vmm": 1, "virtiofsd": 2, "helper": 3}


def _cgroup_item(path: str, files: dict | None, a: _Sample, b: _Sample, dt: float, fs) -> dict:
    out: dict = {"path": path, "memoryBytes": None, "cpuMillis": None}
    if fs is None or not files:
        out["error"] = "no cgroup filesystem visible on the node"
        return out
    mf, cf = files.get("memory"), files.get("cpu")
    raw = b.cgroup.get(mf) if mf else None
    if mf and isinstance(raw, bytes):
        try:
            out["memoryBytes"] = int(raw.decode("ascii", "replace").strip())
        except ValueError:
            out["error"] = f"{mf}: unexpected content"
    elif mf and isinstance(raw, OSError):
        out["error"] = (f"{posixpath.dirname(mf)}: no such cgroup" if isinstance(raw, FileNotFoundError)
                        else f"{mf}: {raw.strerror or raw}")
    ra, rb = (a.cgroup.get(cf), b.cgroup.get(cf)) if cf else (None, None)
    if cf and isinstance(ra, bytes) and isinstance(rb, bytes) and dt > 0:
        ua, ub = _cpu_usage_ns(cf, ra), _cpu_usage_ns(cf, rb)
        if ua is not None and ub is not None:
            out["cpuMillis"] = round(max(0, ub - ua) / 1e9 / dt * 1000.0)
    return out


def _v2_placement(transport: NodeTransport, fs, sbs, mem: dict[str, dict[int, str]]
                  ) -> dict[str, dict[int, bool | None]]:
    """{sandbox id: {member pid: inside its kata_overhead/<id>?}} where the CPU is accounted on
    cgroup v2 (no v1 cpuacct): a v2 cgroup holds whole processes, and the runtime's vCPU move
    takes the whole VMM out of kata_overhead (see the module docstring). None: unknown (gone,
    unreadable, another cgroup namespace)."""
    from katactl.isolation.cgroups import parse_proc_cgroup
    from katactl.isolation.threads import inside, outside_own_ns

    if fs is None or "cpuacct" in fs.v1 or fs.v2 is None:
        return {}
    pids = sorted({p for sb in sbs for p in mem[sb.id]})
    got = transport.read_many([f"/proc/{p}/cgroup" for p in pids], limit=4096) if pids else {}
    out: dict[str, dict[int, bool | None]] = {}
    for sb in sbs:
        row: dict[int, bool | None] = {}
        for p in mem[sb.id]:
            raw = got.get(f"/proc/{p}/cgroup")
            path = parse_proc_cgroup(raw.decode("utf-8", "replace")).get("unified") if isinstance(raw, bytes) else None
            row[p] = None if path is None or outside_own_ns(path) else inside(path, sb.overhead_cgroup_path)
        out[sb.id] = row
    return out


def _v2_cgroup_cpu(cgroup: dict, procs: list[dict], placed: dict[int, bool | None], guest_cpu: dict[int, float],
                   notes: list[str]) -> tuple[int, str] | None:
    """(millicores, source) of a sandbox whose kata_overhead/<id> is a v2 cgroup: its usage, plus
    the members outside it (the VMM the runtime moved, with its children), each without its
    vCPU threads; a VMM still inside has its vCPU threads' taken out of the usage. None (the
    processes' figure stands) where a member's place or its own CPU is unknown."""
    total, added, why, took = float(cgroup["cpuMillis"]), [], None, False
    for p in procs:
        pid = p["pid"]
        if pid is None or p.get("gone"):
            continue  # the shim counted from its /metrics runs in the cgroup; a gone member did run
        where = placed.get(pid)
        if where is None:
            why = f"where {p['role']} pid {pid} runs is unknown (/proc/{pid}/cgroup)"
        elif where and p["role"] in ("vmm", "shim+vmm"):
            if pid not in guest_cpu:
                why = f"the {p['role']} pid {pid} in it runs the guest's vCPU threads too"
            else:
                total -= guest_cpu[pid]
                took = True
        elif not where:
            if p["cpuMillis"] is None:
                why = f"the CPU of {p['role']} pid {pid} outside it is unknown"
            else:
                total += p["cpuMillis"]
                added.append(f"{p['role']} pid {pid}")
        if why:
            notes.append(f"cgroup v2: {cgroup['path']}'s CPU not used: {why}")
            return None
    if added:
        notes.append(f"cgroup v2: {', '.join(added)} not in {cgroup['path']} (the runtime's move of the vCPU "
                     "threads takes the whole VMM into the sandbox cgroup): its CPU without its vCPU threads' "
                     "added to the cgroup's")
    return max(0, round(total)), "cgroup+processes" if added or took else "cgroup"


def _ratio(measured, declared) -> float | None:
    if measured is None or not declared:
        return None
    return round(measured / declared, 3)


def severity_for(ratio: float | None) -> str | None:
    if ratio is None:
        return None
    for bound, sev in RATIO_SEVERITY:
        if ratio > bound:
            return sev
    return None


def _judge(dec: dict, meas: dict, ratio: dict) -> tuple[str | None, str]:
    from katactl.values import format_size

    if dec.get("source") is None or (dec.get("cpuMillis") is None and dec.get("memoryBytes") is None):
        # nothing to compare with (no declaration, or the API has no such pod / another UID):
        # unknown, never "within"
        return "info", "declared overhead unknown: " + (dec.get("note") or (
            "no Kubernetes API configured and no --runtime-class-overhead / runtime_class_overhead"
            if dec.get("source") is None else f"no cpu or memory in the {dec['source']} overhead"))
    zero = [k for k, f in (("cpu", "cpuMillis"), ("memory", "memoryBytes"))
            if dec.get(f) == 0 and (meas.get(f) or 0) > 0]
    sev = severity_for(ratio["max"])
    if zero:
        sev = max((sev or "medium"), "medium", key=SEVERITIES.index)
    if sev is None:
        return None, "within the declared overhead"
    parts = []
    if ratio["memory"] is not None and ratio["memory"] > 1:
        parts.append(f"memory {format_size(meas['memoryBytes'])} > declared {format_size(dec['memoryBytes'])} "
                     f"({ratio['memory']:.2f}x)")
    if ratio["cpu"] is not None and ratio["cpu"] > 1:
        parts.append(f"cpu {meas['cpuMillis']}m > declared {dec['cpuMillis']}m ({ratio['cpu']:.2f}x)")
    for k in zero:
        parts.append(f"{k} used but none declared")
    return sev, "over the declared overhead: " + "; ".join(parts)


# -- the whole picture ----------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of values; None for none."""
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    k = max(1, math.ceil(p / 100.0 * len(vs)))
    return vs[k - 1]


def node_summary(items: list[dict]) -> dict:
    """Sums of one node: declared, measured, and under-reservation (measured over declared),
    over the pods measured (the others are counted in notMeasured)."""
    out: dict[str, Any] = {"pods": len(items), "overDeclared": 0, "notMeasured": 0,
           "declared": {"cpuMillis": 0, "memoryBytes": 0},
           "measured": {"cpuMillis": 0, "memoryBytes": 0},
           "underReserved": {"cpuMillis": 0, "memoryBytes": 0}}
    for it in items:
        if it.get("severity") not in (None, "info"):
            out["overDeclared"] += 1
        if it["measured"] is None:  # its declared would be compared with nothing
            out["notMeasured"] += 1
            continue
        for f in ("cpuMillis", "memoryBytes"):
            d, m = it["declared"].get(f), it["measured"].get(f)
            out["declared"][f] += d or 0
            out["measured"][f] += m or 0
            if m is not None and d is not None:
                out["underReserved"][f] += max(0, m - d)
    return out


def suggestions(items: list[dict], margin: float) -> list[dict]:
    """Per RuntimeClass: p50/p95/max measured overhead and the podFixed covering p95 + margin
    (memory rounded up to MiB, CPU to the millicore)."""
    groups: dict[str, list[dict]] = {}
    for it in items:
        if it["measured"] is not None:
            groups.setdefault(it.get("runtimeClass") or "-", []).append(it)
    out = []
    for rc, its in sorted(groups.items()):
        row: dict = {"runtimeClass": rc, "pods": len(its), "margin": margin}
        sug: dict[str, int | None] = {}
        for f, key in (("memoryBytes", "memory"), ("cpuMillis", "cpu")):
            vals = [it["measured"].get(f) for it in its if it["measured"].get(f) is not None]
            p95 = percentile(vals, 95)
            row[key] = {"p50": percentile(vals, 50), "p95": p95, "max": max(vals) if vals else None,
                        "samples": len(vals)}
            if p95 is not None:
                want = round(p95 * (1 + margin), 6)  # 200 * 1.1 is 220.00000000000003
                sug[f] = (int(math.ceil(want / (1 << 20))) << 20) if f == "memoryBytes" else int(math.ceil(want))
            else:
                sug[f] = None
        declared = {(it["declared"].get("cpuMillis"), it["declared"].get("memoryBytes")) for it in its
                    if it["declared"].get("source")}
        row["declared"] = ([{"cpuMillis": c, "memoryBytes": m} for c, m in sorted(declared, key=str)])
        row["suggestedPodFixed"] = {**sug, "cpu": None if sug["cpuMillis"] is None else f"{sug['cpuMillis']}m",
                                    "memory": None if sug["memoryBytes"] is None else f"{sug['memoryBytes'] >> 20}Mi"}
        out.append(row)
    return out


def report(by_node: dict[str, list[dict]], *, fail_on: str, margin: float) -> tuple[list[dict], dict, bool]:
    """(items tagged with their node, {nodes, suggestions, counts, failOn}, failed?)."""
    items = []
    nodes = []
    for node, its in by_node.items():
        for it in its:
            items.append({"node": node, **it})
        nodes.append({"node": node, **node_summary(its)})
    counts = {s: 0 for s in SEVERITIES}
    for it in items:
        if it.get("severity"):
            counts[it["severity"]] += 1
    threshold = SEVERITIES.index(fail_on)
    failed = any(it.get("severity") and SEVERITIES.index(it["severity"]) >= threshold for it in items)
    meta = {"failOn": fail_on, "failed": failed, "counts": counts, "nodes": nodes,
            "suggestions": suggestions(items, margin)}
    return items, meta, failed


__all__ = ["Declared", "declared_source", "measure_node", "report", "parse_declared", "parse_margin",
           "parse_quantity", "cpu_millis", "memory_bytes", "percentile", "suggestions", "node_summary",
           "check_fail_on", "SEVERITIES", "as_katactl_error"]
