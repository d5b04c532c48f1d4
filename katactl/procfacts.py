"""Process facts of a node: identity (start time, command line) and CPU/RSS figures.

One small interface, two implementations, so domain code does not care where the
node is:

- :class:`LocalProcessFacts`: this host's processes through psutil. With a
  ``--host-root`` the node's ``/proc`` is read under it (``psutil.PROCFS_PATH``
  pointed at ``HOST_ROOT/proc``, e.g. a privileged pod with the host at ``/host``,
  or a lab whose ``/proc`` links to this host's).
- :class:`TransportProcessFacts`: another machine's processes, from its
  ``/proc/<pid>/{stat,status,cmdline}`` through the node's transport (SSH, kube
  pods/exec): one pipelined ``read_many`` for any number of pids.

:func:`for_transport` picks the one that fits a transport. psutil is imported only
when local facts are asked for (never by ``--help`` or completion).

Identity (:class:`ProcIdentity`) is what katactl records when it starts a process
and checks before it signals one: a pid alone may have been reused by anything.
"""
from __future__ import annotations

import abc
import dataclasses
import os
import threading
from typing import Iterable, Sequence
from katactl.backends.base import NodeTransport

#: clock ticks per second in /proc/<pid>/stat (USER_HZ: 100 on every Linux ABI katactl meets)
USER_HZ = 100
#: start times are compared with this slack: /proc/stat's btime can move by a second under
#: NTP adjustments, while a reused pid with the very same command line inside it is not a risk
CREATE_TIME_SLACK = 1.0


@dataclasses.dataclass(frozen=True)
class ProcIdentity:
    """Who a pid is: its start time (seconds since the epoch) and its argv."""

    pid: int
    create_time: float
    cmdline: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"pid": self.pid, "createTime": self.create_time, "cmdline": list(self.cmdline)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ProcIdentity | None":
        """The recorded identity, or None when d lacks one (an older state file)."""
        if not isinstance(d, dict):
            return None
        pid, ct, cmd = d.get("pid"), d.get("createTime"), d.get("cmdline")
        if (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(ct, (int, float))
                or isinstance(ct, bool) or not isinstance(cmd, list) or not all(isinstance(a, str) for a in cmd)):
            return None
        return cls(pid, float(ct), tuple(cmd))

    def same_process(self, other: "ProcIdentity | None") -> bool:
        """True when other is the very process this identity was recorded from."""
        return (other is not None and other.pid == self.pid and other.cmdline == self.cmdline
                and abs(other.create_time - self.create_time) <= CREATE_TIME_SLACK)

    def describe(self) -> str:
        return " ".join(self.cmdline) or "(no command line: a kernel thread or a zombie)"


@dataclasses.dataclass(frozen=True)
class ProcStats:
    """CPU and memory figures of one process at one moment."""

    pid: int
    name: str
    state: str            # one letter as in /proc/<pid>/stat: R, S, D, Z, ...
    create_time: float    # seconds since the epoch
    cpu_user: float       # seconds
    cpu_system: float     # seconds
    rss: int              # bytes
    threads: int
    #: RssShmem (bytes): the shared memory (tmpfs, memfd, SysV) in rss; None where not known
    rss_shmem: int | None = None
    #: HugetlbPages (bytes): hugetlbfs pages mapped, which VmRSS (anon + file + shmem) leaves out
    #: (linux fs/proc/task_mmu.c task_mem, hugetlb_report_usage); None where not known
    hugetlb: int | None = None

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_user + self.cpu_system

    def to_dict(self) -> dict:
        return {"pid": self.pid, "name": self.name, "state": self.state, "createTime": self.create_time,
                "cpuUser": self.cpu_user, "cpuSystem": self.cpu_system, "rss": self.rss, "threads": self.threads,
                "rssShmem": self.rss_shmem, "hugetlb": self.hugetlb}


class ProcessFacts(abc.ABC):
    """The processes of one node. Missing or inaccessible processes are None, never raised."""

    @abc.abstractmethod
    def stats(self, pids: Iterable[int]) -> dict[int, ProcStats | None]:
        """{pid: its figures, or None when no such process (or it cannot be read)}."""

    @abc.abstractmethod
    def identities(self, pids: Iterable[int]) -> dict[int, ProcIdentity | None]:
        """{pid: its identity, or None when no such process (or it cannot be read)}."""

    def identity(self, pid: int) -> ProcIdentity | None:
        return self.identities([pid]).get(pid)

    def still_is(self, recorded: ProcIdentity) -> bool:
        """Whether recorded.pid is still the process recorded (not a reused pid)."""
        return recorded.same_process(self.identity(recorded.pid))


# -- this host, through psutil ------------------------------------------------------
# psutil reads its procfs location from a module global: one lock serialises the
# callers that point it somewhere else (a --host-root) and puts it back afterwards.
_PROCFS_LOCK = threading.RLock()


class LocalProcessFacts(ProcessFacts):
    """This host's processes via psutil; host_root: the node's root is mounted there
    (its /proc is HOST_ROOT/proc)."""

    def __init__(self, host_root: str = ""):
        self.procfs = os.path.join(os.path.abspath(host_root), "proc") if host_root else "/proc"

    def _psutil(self):
        import psutil  # lazy: only local process facts need it

        return psutil

    def _each(self, pids: Iterable[int], fn) -> dict:
        psutil = self._psutil()
        out: dict = {}
        with _PROCFS_LOCK:
            saved = psutil.PROCFS_PATH
            psutil.PROCFS_PATH = self.procfs
            try:
                for pid in pids:
                    try:
                        p = psutil.Process(pid)
                        with p.oneshot():
                            out[pid] = fn(p)
                    except (psutil.Error, OSError, ValueError):
                        out[pid] = None
            finally:
                psutil.PROCFS_PATH = saved
        return out

    def stats(self, pids: Iterable[int]) -> dict[int, ProcStats | None]:
        def one(p):
            t = p.cpu_times()
            return ProcStats(pid=p.pid, name=p.name(), state=_STATE_LETTER.get(p.status(), "?"),
                             create_time=p.create_time(), cpu_user=t.user, cpu_system=t.system,
                             rss=p.memory_info().rss, threads=p.num_threads(),
                             **self._status_kbs(p.pid))
        return self._each(pids, one)

    def _status_kbs(self, pid: int) -> dict[str, int | None]:
        # psutil has neither RssShmem (its "shared" adds file pages) nor HugetlbPages: status,
        # as TransportProcessFacts
        try:
            with open(f"{self.procfs}/{pid}/status", "rb") as f:
                st = _status_fields(f.read())
        except OSError:
            return {"rss_shmem": None, "hugetlb": None}
        return {"rss_shmem": _status_kb(st, "RssShmem"), "hugetlb": _status_kb(st, "HugetlbPages")}

    def identities(self, pids: Iterable[int]) -> dict[int, ProcIdentity | None]:
        def one(p):
            if p.status() == "zombie":
                return None  # exited; only its parent's wait is missing
            return ProcIdentity(p.pid, p.create_time(), tuple(p.cmdline()))
        return self._each(pids, one)


_STATE_LETTER = {"running": "R", "sleeping": "S", "disk-sleep": "D", "stopped": "T", "tracing-stop": "t",
                 "zombie": "Z", "dead": "X", "wake-kill": "K", "waking": "W", "idle": "I", "parked": "P"}


# -- any node, through its transport ------------------------------------------------
class TransportProcessFacts(ProcessFacts):
    """A node's processes from its /proc text through a NodeTransport (pipelined reads)."""

    def __init__(self, transport: NodeTransport):
        self.transport = transport

    def _read(self, pids: Sequence[int], names: Sequence[str]) -> tuple[dict, float | None]:
        paths = [f"/proc/{pid}/{n}" for pid in pids for n in names]
        got = self.transport.read_many(paths + ["/proc/stat"], limit=1 << 20) if pids else {}
        return got, _btime(got.get("/proc/stat"))

    def stats(self, pids: Iterable[int]) -> dict[int, ProcStats | None]:
        pids = list(dict.fromkeys(pids))
        got, btime = self._read(pids, ("stat", "status"))
        out: dict[int, ProcStats | None] = {}
        for pid in pids:
            stat, status = got.get(f"/proc/{pid}/stat"), got.get(f"/proc/{pid}/status")
            out[pid] = None
            if isinstance(stat, bytes) and isinstance(status, bytes) and btime is not None:
                out[pid] = parse_stats(pid, stat, status, btime)
        return out

    def identities(self, pids: Iterable[int]) -> dict[int, ProcIdentity | None]:
        pids = list(dict.fromkeys(pids))
        got, btime = self._read(pids, ("stat", "cmdline"))
        out: dict[int, ProcIdentity | None] = {}
        for pid in pids:
            stat, cmd = got.get(f"/proc/{pid}/stat"), got.get(f"/proc/{pid}/cmdline")
            fields = _stat_fields(stat) if isinstance(stat, bytes) else None
            if fields is None or btime is None or not isinstance(cmd, bytes) or fields[0] == "Z":
                out[pid] = None
                continue
            argv = tuple(a.decode("utf-8", "surrogateescape") for a in cmd.split(b"\0"))
            if argv and argv[-1] == "":
                argv = argv[:-1]  # the terminating NUL
            out[pid] = ProcIdentity(pid, btime + int(fields[19]) / USER_HZ, argv)
        return out


def _btime(raw) -> float | None:
    if not isinstance(raw, bytes):
        return None
    for line in raw.decode("ascii", "replace").splitlines():
        if line.startswith("btime "):
            try:
                return float(int(line.split()[1]))
            except (IndexError, ValueError):
                return None
    return None


def _stat_fields(raw: bytes) -> list[str] | None:
    """/proc/<pid>/stat after "(comm)" (comm may hold spaces and ')'): field N at [N-3]."""
    text = raw.decode("utf-8", "replace")
    head, sep, tail = text.rpartition(")")
    fields = tail.split()
    if not sep or len(fields) < 22 or not all(f.lstrip("-").isdigit() for f in fields[1:22]):
        return None
    return fields


def parse_stats(pid: int, stat: bytes, status: bytes, btime: float) -> ProcStats | None:
    """ProcStats from /proc/<pid>/stat and /proc/<pid>/status text (None if malformed)."""
    fields = _stat_fields(stat)
    if fields is None:
        return None
    st = _status_fields(status)
    try:
        rss_kb = int(st.get("VmRSS", "0 kB").split()[0])  # kernel threads have none
        name = st.get("Name") or stat.decode("utf-8", "replace").partition("(")[2].rpartition(")")[0]
        return ProcStats(pid=pid, name=name, state=fields[0], create_time=btime + int(fields[19]) / USER_HZ,
                         cpu_user=int(fields[11]) / USER_HZ, cpu_system=int(fields[12]) / USER_HZ,
                         rss=rss_kb * 1024, threads=int(fields[17]),
                         rss_shmem=_status_kb(st, "RssShmem") if "VmRSS" in st else 0,
                         hugetlb=_status_kb(st, "HugetlbPages") if "VmRSS" in st else 0)
    except (IndexError, ValueError):
        return None


def _status_fields(status: bytes) -> dict[str, str]:
    st: dict[str, str] = {}
    for line in status.decode("utf-8", "replace").splitlines():
        k, _, v = line.partition(":")
        st[k] = v.strip()
    return st


def _status_kb(st: dict[str, str], key: str) -> int | None:
    """A "<n> kB" field of /proc/<pid>/status in bytes (None: absent, as before Linux 4.5's
    RssShmem, or HugetlbPages without CONFIG_HUGETLB_PAGE)."""
    try:
        return int(st[key].split()[0]) * 1024
    except (KeyError, IndexError, ValueError):
        return None


def for_transport(transport: NodeTransport) -> ProcessFacts:
    """The process facts of transport's node: psutil when its processes run on this
    host (with its --host-root's /proc), its /proc through the transport otherwise."""
    if transport.is_remote:
        return TransportProcessFacts(transport)
    return LocalProcessFacts(transport.host_root)


def local_identity(pid: int) -> ProcIdentity | None:
    """A process of this host (for what katactl starts here: the lab daemon, its VMs)."""
    return LocalProcessFacts().identity(pid)
