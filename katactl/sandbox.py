"""Sandbox discovery, pod mapping and target resolution on one node.

Everything goes through a NodeTransport with node paths, so ``--host-root``
and SSH work unchanged. Discovery reads only the runtime state files
(Go ``/run/vc/sbs/<id>/persist.json``, runtime-rs ``/run/kata/<id>/state.json``)
and the sandbox's OCI bundle ``config.json`` (containerd or CRI-O); it never
starts a process per sandbox. Liveness is cheap: ``/proc/<pid>`` on the node
plus a connect() to the shim management socket.

A sandbox whose state file is missing, truncated or not JSON is still listed,
with ``state: unknown`` and the reason; it never hides the others. Nor does a
hostile entry: a symlink loop as a sandbox dir, a state file nested deeper than
the parser's recursion limit, or a FIFO/device as a state file or bundle
``config.json`` (never opened: every file is stat()ed first and only regular
files are read, so nothing can block the listing).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import posixpath
import re
import stat as _stat
import sys
import time

from katactl.errors import (NOT_A_SOCKET, SOCKET_MISSING, SOCKET_REFUSED, Ambiguous, Incomplete, NotFound, Refused,
                            TimeoutExpired, UnreachableError, UsageError)
from katactl.gcpause import paused as _gc_paused
from katactl.values import format_duration

GO_SBS = "/run/vc/sbs"
GO_VM = "/run/vc/vm"
RS_DIR = "/run/kata"
#: runtime-rs's jailed Firecracker VMs: <RS_FC_JAIL>/<id>/root/{state.json,run/fc.sock}
#: (firecracker/inner_hypervisor.rs prepare_vm; persist/src/lib.rs to_disk with a jailer path)
RS_FC_JAIL = f"{RS_DIR}/firecracker"
CONTAINERD_TASK_DIR = "/run/containerd/io.containerd.runtime.v2.task"
CRIO_DIR = "/run/containers/storage/overlay-containers"
SHIM_SOCKET_NAME = "shim-monitor.sock"
#: what Sandbox.state can be (see liveness)
STATES = ("running", "stale", "unknown")
STATE_LIMIT = 16 << 20  # a persist.json is a few KiB; refuse to slurp anything absurd

# Kata's VerifyContainerID: ^[a-zA-Z0-9][a-zA-Z0-9_.-]+$ (we also accept 1-char prefixes)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # used with fullmatch: "$" admits a trailing newline
_NS_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_POD_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")

_HV_NAMES = {"qemu": "qemu", "clh": "clh", "cloud_hypervisor": "clh", "cloud-hypervisor": "clh",
             "ch": "clh", "firecracker": "fc", "fc": "fc", "dragonball": "dragonball"}


def pod_ref(pod: dict | None) -> str | None:
    """"NAMESPACE/NAME" of a sandbox's pod ("-/NAME" without a namespace); None without a pod."""
    if not pod or not pod.get("name"):
        return None
    return f"{pod.get('namespace') or '-'}/{pod['name']}"


@dataclasses.dataclass(slots=True)  # slots: ~1.2 KiB less per sandbox than a 40-key __dict__
class Sandbox:
    id: str
    runtime: str                       # "go" | "rs"
    state_file: str                    # node path of persist.json / state.json
    hypervisor: str | None = None      # qemu | clh | fc | dragonball | other raw type | None
    hypervisor_pid: int | None = None
    #: the shim's pid from <bundle>/shim.pid (containerd's shim v2 writes it, both runtimes)
    shim_pid: int | None = None
    #: why hypervisor_pid is None for a sandbox whose state was read (runtime-rs persists none)
    vmm_note: str | None = None
    api_socket: str | None = None      # node path: qmp.sock / clh-api.sock / firecracker.socket
    shim_socket: str | None = None     # node path of shim-monitor.sock
    extra_monitor_socket: str | None = None
    vcpus: float | None = None
    max_vcpus: int | None = None
    memory_mib: int | None = None
    hotplugged_memory_mib: int = 0
    kernel: str | None = None
    image: str | None = None
    initrd: str | None = None
    hypervisor_path: str | None = None
    sandbox_cgroup_path: str | None = None
    overhead_cgroup_path: str | None = None
    sandbox_cgroup_only: bool | None = None
    runtime_state: str | None = None   # the runtime's own State field (Go: ready/running/paused)
    agent_url: str | None = None
    guest_memory_dump_path: str | None = None
    virtio_mem: bool | None = None
    reclaim_guest_freed_memory: bool | None = None
    enable_pprof: bool | None = None
    #: the Kata configuration the sandbox's runtime used (katacfg.SandboxConfig.to_dict():
    #: file, path, dropIns, source, sourceDetail, runtimeHandler, error); None when not resolved
    kata_config: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    state: str = "unknown"             # running | stale | unknown
    reason: str | None = None
    created: float | None = None       # epoch seconds (bundle config.json mtime, else state file)
    pod: dict | None = None            # {name, namespace, uid}
    bundle: str | None = None          # node path of the OCI bundle dir
    cri: str | None = None             # containerd | crio
    #: the parsed state file (Go persist.json / RS state.json), for other modules
    raw: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    annotations: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    #: the bytes ``raw`` / ``annotations`` are parsed from when first read (see _lazy_json)
    _raw_src: bytes | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _annotations_src: bytes | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def has_state(self) -> bool:
        """The state file was read and parsed (``raw is not None``, without parsing it again)."""
        return self._raw_src is not None or _RAW_SLOT.__get__(self) is not None

    @property
    def total_memory_mib(self) -> int | None:
        if self.memory_mib is None:
            return None
        return self.memory_mib + (self.hotplugged_memory_mib or 0)

    @property
    def age(self) -> float | None:
        return None if self.created is None else max(0.0, time.time() - self.created)

    @property
    def pod_ref(self) -> str | None:
        return pod_ref(self.pod)

    def to_dict(self) -> dict:
        """The stable JSON shape (``katactl sandbox list -o json`` items)."""
        created = self.created
        if created is None:
            when = age_text = age_s = None
        else:  # one clock reading for both fields (age would read it once per use)
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
            age = max(0.0, time.time() - created)
            age_text, age_s = format_duration(age), int(age)
        return {
            "id": self.id,
            "runtime": self.runtime,
            "state": self.state,
            "reason": self.reason,
            "pod": self.pod,
            "hypervisor": self.hypervisor,
            "hypervisorPid": self.hypervisor_pid,
            "shimPid": self.shim_pid,
            "vcpus": self.vcpus,
            "maxVcpus": self.max_vcpus,
            "memoryMiB": self.memory_mib,
            "hotpluggedMemoryMiB": self.hotplugged_memory_mib,
            "totalMemoryMiB": self.total_memory_mib,
            "kernel": self.kernel,
            "image": self.image,
            "initrd": self.initrd,
            "hypervisorPath": self.hypervisor_path,
            "cgroup": {"sandbox": self.sandbox_cgroup_path, "overhead": self.overhead_cgroup_path,
                       "sandboxCgroupOnly": self.sandbox_cgroup_only},
            "sockets": {"shim": self.shim_socket, "api": self.api_socket,
                        "extraMonitor": self.extra_monitor_socket},
            "agentURL": self.agent_url,
            "runtimeState": self.runtime_state,
            "guestMemoryDumpPath": self.guest_memory_dump_path,
            "pprofEnabled": self.enable_pprof,
            "kataConfig": self.kata_config,
            "created": when,
            "age": age_text,
            "ageSeconds": age_s,
            "bundle": self.bundle,
            "cri": self.cri,
            "stateFile": self.state_file,
        }


# ``raw`` and ``annotations`` are kept as JSON bytes and parsed again when first asked for:
# a parsed persist.json takes ~4x its bytes, and most callers (sandbox list) never look at
# it. ``raw`` keeps the state file's own bytes; ``annotations`` the annotations alone, as
# compact ASCII JSON (the bundle's config.json is mostly mounts, namespaces and a seccomp
# profile: 5-20 KiB on a real node). Either way parsing gives back the same object tree.
# The field's own slot holds the parsed value; _<name>_src the bytes not parsed yet.
def _lazy_json(name: str, extract):
    slot, src = getattr(Sandbox, name), getattr(Sandbox, f"_{name}_src")

    def get(self):
        data = src.__get__(self)
        if data is not None:
            slot.__set__(self, extract(_loads(data)))
            src.__set__(self, None)
        return slot.__get__(self)

    def set_(self, value):
        slot.__set__(self, value)
        src.__set__(self, None)

    return property(get, set_, doc=f"{name} (parsed when first read)"), slot


def _annotations_of(spec) -> dict:
    ann = spec.get("annotations") if isinstance(spec, dict) else None
    return ann if isinstance(ann, dict) else {}


# the lazy properties take the place of the slots' descriptors on purpose (parsed on first read)
Sandbox.raw, _RAW_SLOT = _lazy_json("raw", lambda obj: obj)  # type: ignore[misc]
Sandbox.annotations, _ANN_SLOT = _lazy_json("annotations", lambda obj: obj)  # type: ignore[misc]
#: annotations -> the bytes kept for them (ensure_ascii: a lone surrogate escape survives)
_compact_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def _compact(ann: dict) -> bytes:
    """The bytes kept for annotations: parsed again, the same dict. Annotations are a
    map of strings (OCI runtime-spec config.md): orjson writes those in a tenth of
    json's time. Anything else (a float could be NaN, which orjson writes as null; a
    64-bit overflow) and what orjson refuses (a lone surrogate) json writes."""
    if set(map(type, ann.values())) <= _STR_ONLY:
        import orjson

        try:  # copied: orjson's bytes keep a 4 KiB allocation, kept for every sandbox
            return memoryview(orjson.dumps(ann)).tobytes()
        except TypeError:  # orjson.JSONEncodeError: a lone surrogate
            pass
    return _compact_json(ann).encode("ascii")


_STR_ONLY = frozenset({str})


def _set_lazy(sb: Sandbox, name: str, data: bytes) -> None:
    (_RAW_SLOT if name == "raw" else _ANN_SLOT).__set__(sb, None)
    setattr(sb, f"_{name}_src", data)


# -- validation ---------------------------------------------------------------
def validate_id(ref: str, what: str = "sandbox id") -> str:
    """A sandbox id (or id prefix): refuse '/', '..', NUL, control chars, empty."""
    if not isinstance(ref, str) or ref == "":
        raise UsageError(f"empty {what}")
    if "\0" in ref:
        raise UsageError(f"invalid {what}: contains a NUL byte")
    if ".." in ref:
        raise UsageError(f"invalid {what} {ref!r}: contains '..'")
    if "/" in ref:
        raise UsageError(f"invalid {what} {ref!r}: contains '/'")
    if len(ref) > 253 or not _ID_RE.fullmatch(ref):
        raise UsageError(f"invalid {what} {ref!r}: expected letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit)")
    return ref


def parse_ref(ref: str) -> tuple[str, str | tuple[str, str]]:
    """('id', prefix) or ('pod', (namespace, name)) for a SANDBOX argument."""
    if not isinstance(ref, str) or ref == "":
        raise UsageError("empty sandbox reference")
    if "\0" in ref:
        raise UsageError("invalid sandbox reference: contains a NUL byte")
    if "/" not in ref:
        return "id", validate_id(ref)
    parts = ref.split("/")
    if len(parts) == 3 and parts[0] in ("pod", "pods"):
        parts = parts[1:]
    if len(parts) != 2 or ".." in ref:
        raise UsageError(f"invalid sandbox reference {ref!r}: expected an id, an id prefix, "
                         "NAMESPACE/POD or pod/NAMESPACE/NAME")
    ns, name = parts
    if not _NS_RE.fullmatch(ns) or len(ns) > 63:
        raise UsageError(f"invalid namespace {ns!r} in {ref!r}")
    if not _POD_RE.fullmatch(name) or len(name) > 253:
        raise UsageError(f"invalid pod name {name!r} in {ref!r}")
    return "pod", (ns, name)


# -- reading ------------------------------------------------------------------
def _kinds(transport, paths: list[str]) -> dict[str, list]:
    """{dir: [(name, is_dir, is_link, mtime or None), ...]} (transport.list_kinds, symlinks
    followed as scan_dir follows them); a missing dir lists as []."""
    return _listings(transport.list_kinds(paths))


def _names(transport, paths: list[str]) -> dict[str, list[str]]:
    """{dir: sorted names} (transport.list_dirs, no stat per entry); a missing dir lists as []."""
    return _listings(transport.list_dirs(paths))


def _listings(results: dict) -> dict:
    """A batch listing's results with a missing dir as [] and any other error raised."""
    out = {}
    for p, v in results.items():
        if isinstance(v, (FileNotFoundError, NotADirectoryError)):
            v = []
        elif isinstance(v, OSError):
            raise v
        out[p] = v
    return out


def _not_regular(path: str, st) -> OSError | None:
    """An OSError naming why ``path`` must not be opened for reading state: its stat
    failed, or it is not a regular file (a FIFO would block the reader forever, a
    device would stream without end). None for a regular file."""
    if isinstance(st, OSError):
        return st
    if st is None or _stat.S_ISREG(st.mode):
        return None
    if st.is_dir:
        return IsADirectoryError(21, "Is a directory", path)
    kind = _file_kind(st.mode)
    return OSError(f"{posixpath.basename(path)} is not a regular file ({kind})")


def _file_kind(mode: int) -> str:
    for test, name in ((_stat.S_ISFIFO, "a FIFO"), (_stat.S_ISSOCK, "a socket"),
                       (_stat.S_ISCHR, "a character device"), (_stat.S_ISBLK, "a block device"),
                       (_stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return f"mode {mode:o}"


#: digits -> "0": a run of 19 "0"s in data.translate(_DIGITS) is a number orjson may not keep
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


def _loads(data: bytes):
    """json.loads of the bytes decoded as UTF-8 with errors replaced, nested past the
    recursion limit -> ValueError.

    orjson parses first (a persist.json in a third of json's time): for a document it
    accepts it gives the same objects (floats correctly rounded, the last of duplicate
    keys) but for integers beyond 64 bits, which it turns into floats: a document with a
    run of 19 digits anywhere (2**63 has 19) goes to json. What orjson refuses (invalid
    UTF-8, a lone surrogate escape, NaN, Infinity, 1e400, nesting past 1024) json reads
    as before, or fails with json's own message."""
    if _LONG_NUMBER not in data.translate(_DIGITS):
        import orjson  # lazy: discovery needs it, --help does not

        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(data.decode("utf-8", errors="replace"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _parse_json(path: str, data: bytes | OSError) -> tuple[dict | None, str | None]:
    """(object, None) or (None, reason) for a state file's bytes (or the error reading it)."""
    if isinstance(data, OSError) and data.errno is None and data.strerror is None:
        return None, str(data)  # _not_regular's reason, already worded
    if isinstance(data, FileNotFoundError):
        return None, f"{posixpath.basename(path)} is missing"
    if isinstance(data, PermissionError):
        return None, f"{path}: permission denied"
    if isinstance(data, IsADirectoryError):
        return None, f"{path} is a directory"
    if isinstance(data, OSError):
        return None, f"{path}: {data.strerror or data}"
    if len(data) > STATE_LIMIT:
        return None, f"{posixpath.basename(path)} is larger than {STATE_LIMIT >> 20} MiB"
    if not data.strip():
        return None, f"{posixpath.basename(path)} is empty"
    try:
        obj = _loads(data)
    except ValueError as e:
        return None, f"{posixpath.basename(path)} is not valid JSON ({_short_json_error(e)})"
    if not isinstance(obj, dict):
        return None, f"{posixpath.basename(path)} is not a JSON object"
    return obj, None


def _short_json_error(e: ValueError) -> str:
    msg = str(e)
    if "Expecting" in msg or "Unterminated" in msg:
        return "truncated or malformed: " + msg.split(":")[0]
    return msg[:80]


def _obj(v) -> dict:
    """v when it is a JSON object, else {}: a section that is missing, null or of another
    type reads as empty (each field then None), as a mistyped state file must not fail."""
    return v if isinstance(v, dict) else {}


def _int(v) -> int | None:
    try:
        return int(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError, OverflowError):  # json reads 1e400 as inf: no int holds it
        return None


def _float(v) -> float | None:
    try:
        return float(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        return None


def _str(v) -> str | None:
    return v if isinstance(v, str) and v != "" else None


def _common(v) -> str | None:
    """_str(v), one shared object for equal values: the fields that most sandboxes of a
    node have alike (asset paths, the runtime's state, the pod namespace) would otherwise
    be one string per sandbox, about 400 bytes each (json.loads makes new strings)."""
    return sys.intern(v) if isinstance(v, str) and v != "" else None


def _bool(v) -> bool | None:
    return bool(v) if v is not None else None


def _hv_name(t) -> str | None:
    if not isinstance(t, str) or not t:
        return None
    return _HV_NAMES.get(t.lower(), t.lower())


def _fill_go(sb: Sandbox, p: dict) -> None:
    hs = _obj(p.get("HypervisorState"))
    cfg = _obj(p.get("Config"))
    hc = _obj(cfg.get("HypervisorConfig"))
    sb.raw = p
    state = p.get("State")
    sb.runtime_state = _common(state.get("State") if isinstance(state, dict) else state)
    sb.hypervisor = _hv_name(hs.get("Type")) or _hv_name(cfg.get("HypervisorType"))
    pid = _int(hs.get("Pid"))
    sb.hypervisor_pid = pid if pid and pid > 0 else None
    sb.hotplugged_memory_mib = _int(hs.get("HotpluggedMemory")) or 0
    vcpus = _float(hc.get("NumVCPUsF"))
    if vcpus is None:
        vcpus = _float(hc.get("NumVCPUs"))
    sb.vcpus = vcpus
    sb.max_vcpus = _int(hc.get("DefaultMaxVCPUs"))
    sb.memory_mib = _int(hc.get("MemorySize"))
    sb.kernel = _common(hc.get("KernelPath"))
    sb.image = _common(hc.get("ImagePath"))
    sb.initrd = _common(hc.get("InitrdPath"))
    sb.hypervisor_path = _common(hc.get("HypervisorPath"))
    # GuestMemoryDumpPath, ReclaimGuestFreedMemory, EnablePprof and ExtraMonitorSocket are
    # not in persist.json (virtcontainers/sandbox.go dumpConfig does not write them): they
    # come from the configuration the shim used (apply_config)
    sb.virtio_mem = hc.get("VirtioMem")
    sb.sandbox_cgroup_path = _str(p.get("SandboxCgroupPath"))
    sb.overhead_cgroup_path = _str(p.get("OverheadCgroupPath"))
    sb.sandbox_cgroup_only = _bool(cfg.get("SandboxCgroupOnly"))
    sb.agent_url = _str(_obj(p.get("AgentState")).get("URL"))
    api = _str(hs.get("APISocket"))
    if api is None:
        vm = f"{GO_VM}/{sb.id}"
        if sb.hypervisor == "qemu":
            api = f"{vm}/qmp.sock"
        elif sb.hypervisor == "clh":
            api = f"{vm}/clh-api.sock"
        elif sb.hypervisor == "fc":
            hv_bin = posixpath.basename(sb.hypervisor_path or "") or "firecracker"
            # The Go runtime truncates the id to 32 chars here (firecracker.truncateID):
            # the full path would not fit sun_path's 108 bytes.
            api = f"/run/vc/{hv_bin}/{sb.id[:32]}/root/run/firecracker.socket"
    sb.api_socket = api


def _fill_rs(sb: Sandbox, s: dict) -> None:
    """Read runtime-rs's state.json (``hypervisor_persist.rs``'s HypervisorState).

    ``hypervisor.config`` is kata-types' hypervisor config
    (``src/libs/kata-types/src/config/hypervisor/mod.rs``): its boot, cpu, memory,
    device and debug info are ``#[serde(flatten)]``, so ``kernel``, ``default_vcpus``
    (an f32 in recent releases, an integer before), ``default_memory`` ... sit at one
    level. The same struct parses the flat ``[hypervisor.<name>]`` TOML tables, so no
    release wrote them nested. Every runtime-rs hypervisor persists ``pid: null`` and
    ``api_socket: ""``: the VMM is found through the shim (see :func:`find_rs_vmms`),
    and the control socket from the hypervisor and ``run_dir``."""
    hv = _obj(s.get("hypervisor"))
    cfg = _obj(hv.get("config"))
    sb.raw = s
    sb.runtime_state = None
    sb.hypervisor = _hv_name(hv.get("hypervisor_type"))
    pid = _int(hv.get("pid"))
    sb.hypervisor_pid = pid if pid and pid > 0 else None
    sb.vcpus = _float(cfg.get("default_vcpus"))
    sb.max_vcpus = _int(cfg.get("default_maxvcpus"))
    sb.memory_mib = _int(cfg.get("default_memory"))
    sb.virtio_mem = cfg.get("enable_virtio_mem")
    sb.reclaim_guest_freed_memory = cfg.get("reclaim_guest_freed_memory")
    sb.guest_memory_dump_path = _common(cfg.get("guest_memory_dump_path"))
    sb.kernel = _common(cfg.get("kernel"))
    sb.image = _common(cfg.get("image"))
    sb.initrd = _common(cfg.get("initrd"))
    sb.hypervisor_path = _common(cfg.get("path"))
    cg = _obj(_obj(s.get("resource")).get("cgroup_state"))
    sb.sandbox_cgroup_path = _str(cg.get("path"))
    sb.overhead_cgroup_path = _str(cg.get("overhead_path"))
    sb.sandbox_cgroup_only = _bool(cg.get("sandbox_cgroup_only"))
    api = _str(hv.get("api_socket"))
    if api is None:
        d = f"{RS_DIR}/{sb.id}"
        run_dir = _str(hv.get("run_dir"))
        if sb.hypervisor == "clh":
            api = f"{d}/ch-api.sock"
        elif sb.hypervisor == "fc":
            # firecracker/inner_hypervisor.rs: <run_dir>/fc.sock; run_dir is
            # /run/kata/firecracker/<id>/root/run jailed, /run/kata/<id>/run otherwise
            api = f"{run_dir or d + '/run'}/fc.sock"
        elif sb.hypervisor == "qemu" and sb.bundle:
            api = f"{sb.bundle}/qmp.sock"  # created relative to the shim's cwd (the bundle)
    sb.api_socket = api


def _pod_from_annotations(ann: dict) -> tuple[dict | None, str | None]:
    if not isinstance(ann, dict):
        return None, None
    if "io.kubernetes.cri.sandbox-name" in ann or "io.kubernetes.cri.container-type" in ann:
        return {"name": _str(ann.get("io.kubernetes.cri.sandbox-name")),
                "namespace": _common(ann.get("io.kubernetes.cri.sandbox-namespace")),
                "uid": _str(ann.get("io.kubernetes.cri.sandbox-uid"))}, "containerd"
    if "io.kubernetes.cri-o.KubeName" in ann or "io.kubernetes.cri-o.ContainerType" in ann:
        return {"name": _str(ann.get("io.kubernetes.cri-o.KubeName"))
                or _str(ann.get("io.kubernetes.pod.name")),
                "namespace": _common(ann.get("io.kubernetes.cri-o.Namespace"))
                or _common(ann.get("io.kubernetes.pod.namespace")),
                "uid": _str(ann.get("io.kubernetes.pod.uid"))}, "crio"
    return None, None


class _BundleIndex:
    """sandbox id -> bundle node path, built with two batched directory listings
    (``top``: _kinds listings of CRIO_DIR and CONTAINERD_TASK_DIR when already made)."""

    def __init__(self, transport, top: dict[str, list] | None = None):
        self.t = transport
        self.top = top
        self._map: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        m: dict[str, str] = {}
        top = self.top if self.top is not None else _kinds(self.t, [CRIO_DIR, CONTAINERD_TASK_DIR])
        for cid, *_ in top[CRIO_DIR]:
            m.setdefault(cid, f"{CRIO_DIR}/{cid}/userdata")
        nss = [n for n, *_ in top[CONTAINERD_TASK_DIR]]
        # k8s.io wins over other containerd namespaces
        nss = sorted(nss, key=lambda n: n != "k8s.io", reverse=True)
        # names only: a bundle is found by its config.json's stat (_load_batch)
        per_ns = _names(self.t, [f"{CONTAINERD_TASK_DIR}/{ns}" for ns in nss]) if nss else {}
        for ns in nss:
            for cid in per_ns[f"{CONTAINERD_TASK_DIR}/{ns}"]:
                m[cid] = f"{CONTAINERD_TASK_DIR}/{ns}/{cid}"
        return m

    def get(self, sid: str, quick: bool = False) -> str | None:
        if self._map is None and quick:
            cand = [f"{CONTAINERD_TASK_DIR}/k8s.io/{sid}", f"{CRIO_DIR}/{sid}/userdata"]
            for c in cand:
                if self.t.exists(c + "/config.json"):  # a stat: never opens the file
                    return c
        if self._map is None:
            self._map = self._build()
        return self._map.get(sid)


#: a candidate: (id, runtime, state dir mtime (None: not had with the listing), why the state
#: dir itself is unusable or None, the state file's node path, the node path it was listed as)
Candidate = tuple[str, str, "float | None", "str | None", str, str]


def _load_many(transport, cands: list[Candidate], bundles: _BundleIndex,
               quick: bool = False) -> list[Sandbox]:
    """Sandboxes for candidates, with all their files read in two batched transport
    calls (stat_many, then read_many of the regular files only: a few SSH round trips
    per node, however many sandboxes). Nothing but a regular file is ever opened."""
    out: list[Sandbox] = []
    for i in range(0, len(cands), _BATCH):  # bounds the batch's bytes, stats and errors in memory
        out += _load_batch(transport, cands[i:i + _BATCH], bundles, quick)
    find_rs_vmms(transport, out)
    apply_config(transport, out)
    return out


#: sandboxes whose files are read in one batch (one stat_many + one read_many: over SSH a
#: few round trips per batch). Nodes hold a few hundred at most; the bound is for memory.
_BATCH = 1024


def _load_batch(transport, cands: list[Candidate], bundles: _BundleIndex, quick: bool) -> list[Sandbox]:
    sbs = []
    for sid, runtime, _, _, state_file, _ in cands:
        base = GO_SBS if runtime == "go" else RS_DIR
        sb = Sandbox(id=sid, runtime=runtime, state_file=state_file,
                     shim_socket=f"{base}/{sid}/{SHIM_SOCKET_NAME}")
        sb.bundle = bundles.get(sid, quick=quick)
        sbs.append(sb)
    specs = [f"{sb.bundle}/config.json" for sb in sbs if sb.bundle]
    files = [sb.state_file for sb in sbs] + specs + [f"{sb.bundle}/shim.pid" for sb in sbs if sb.bundle]
    # extra-monitor.sock only matters for Go QEMU sandboxes: probed for every Go one
    # (the hypervisor is known only after parsing) to spare a round trip
    stats = transport.stat_many(files + [f"{GO_VM}/{sb.id}/extra-monitor.sock"
                                         for sb in sbs if sb.runtime == "go"])
    bad = {p: e for p in files if (e := _not_regular(p, stats.get(p))) is not None}
    data: dict = dict(bad)
    data.update(transport.read_many([p for p in files if p not in bad], limit=STATE_LIMIT + 1))
    # created: the bundle config.json's mtime, else the state dir's; a local listing leaves
    # the latter out (no stat per entry), so it is stat()ed here for the sandboxes needing it
    mtimes = [c[2] for c in cands]
    need = {}
    for i, (sb, c) in enumerate(zip(sbs, cands, strict=True)):
        spec = stats.get(f"{sb.bundle}/config.json") if sb.bundle else None
        if c[2] is None and (spec is None or isinstance(spec, OSError)):
            need[i] = c[5]
    if need:
        dirs = transport.stat_many(list(need.values()))
        for i, d in need.items():
            st = dirs.get(d)
            mtimes[i] = None if isinstance(st, OSError) or st is None else st.mtime
    return [_fill_one(sb, data, stats, mtime, c[3]) for sb, c, mtime in zip(sbs, cands, mtimes, strict=True)]


def _fill_one(sb: Sandbox, data: dict, stats: dict, dir_mtime: float | None,
              dir_problem: str | None = None) -> Sandbox:
    created = None
    if sb.runtime == "rs":  # no pprof whatever its configuration says: shim_mgmt has no /debug routes
        sb.enable_pprof = False
    if sb.bundle:
        spec_file = f"{sb.bundle}/config.json"
        raw = data.get(spec_file)
        try:
            if isinstance(raw, OSError):
                raise raw
            if raw is None:  # read_many answers every path it was asked: say so if not
                raise FileNotFoundError(errno.ENOENT, "not read", spec_file)
            raw = raw[:STATE_LIMIT]
            ann = _annotations_of(_loads(raw))
            sb.pod, sb.cri = _pod_from_annotations(ann)
            if sb.runtime == "go" and _parse_bool(ann.get("io.katacontainers.config.runtime.enable_pprof")):
                sb.enable_pprof = True
            if ann:
                _set_lazy(sb, "annotations", _compact(ann))
            else:
                sb.annotations = ann
        except OSError as e:
            if e.errno is None and e.strerror is None:  # present but not a regular file
                logging.getLogger(__name__).warning(
                    "sandbox %s: %s: %s; its pod is unknown", sb.id[:12], spec_file, e)
        except ValueError:
            pass  # no pod mapping; the sandbox itself is still listed
        st = stats.get(spec_file)
        created = None if isinstance(st, OSError) or st is None else st.mtime
    if sb.bundle:
        raw_pid = data.get(f"{sb.bundle}/shim.pid")
        if isinstance(raw_pid, bytes) and raw_pid.strip().isdigit() and len(raw_pid) < 16:
            sb.shim_pid = int(raw_pid.strip()) or None
    runtime, sid, state_file = sb.runtime, sb.id, sb.state_file
    obj, reason = _parse_json(state_file, data[state_file])
    if dir_problem is not None:
        obj, reason = None, dir_problem
    if obj is None:
        sb.state, sb.reason = "unknown", reason
    else:
        try:
            (_fill_go if runtime == "go" else _fill_rs)(sb, obj)
        except Exception as e:  # a schema we do not know must not hide the sandbox
            sb.state, sb.reason = "unknown", f"unexpected {posixpath.basename(state_file)} shape: {e}"
            obj = None
        else:
            if _RAW_SLOT.__get__(sb) is obj:
                _set_lazy(sb, "raw", data[state_file])  # parsed again (the same bytes) when asked for
    sb.created = created if created is not None else dir_mtime
    if runtime == "go" and sb.hypervisor == "qemu":
        em = f"{GO_VM}/{sid}/extra-monitor.sock"
        if not isinstance(stats.get(em), (OSError, type(None))):
            sb.extra_monitor_socket = em
    return sb


def _parse_bool(v) -> bool | None:
    """Go's strconv.ParseBool, as the runtime reads boolean annotations: 1 t T TRUE true
    True / 0 f F FALSE false False; anything else is not a boolean (None)."""
    if not isinstance(v, str):
        return None
    if v in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if v in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def apply_config(transport, sbs: list[Sandbox]) -> None:
    """Fill what only the configuration file holds: guest_memory_dump_path,
    reclaim_guest_freed_memory, enable_pprof (Go: the annotation wins when it says true) and
    the extra monitor's protocol, from the configuration the sandbox's own runtime used
    (:class:`katactl.katacfg.Resolver`: the ``io.katacontainers.config_path`` annotation
    (Go only), containerd's ``ConfigPath`` for the runtime handler that started it, the shim's
    ``KATA_CONF_FILE``, ``/etc``, then the build's own defaults; ``config.d`` applied as
    that runtime applies it). The Go runtime never persists them. ``kata_config`` says
    which file, which drop-ins and why; a configuration the runtime refuses (a directory
    in ``config.d``) leaves the fields unknown (None) and its error there.
    An HMP extra monitor is not offered as a QMP socket."""
    from katactl import katacfg

    todo = [sb for sb in sbs if sb.has_state()]
    if not todo:
        return
    facts = [katacfg.SandboxFacts(
        runtime=sb.runtime, hypervisor=sb.hypervisor, bundle=sb.bundle, shim_pid=sb.shim_pid,
        annotation_path=_config_path_annotation(sb),
        assets={"kernel": sb.kernel, "image": sb.image, "initrd": sb.initrd, "path": sb.hypervisor_path})
        for sb in todo]
    try:
        results = katacfg.Resolver(transport).resolve_many(facts)
    except Exception as e:  # noqa: BLE001 - the node's files failing to read must not hide sandboxes
        results = [katacfg.SandboxConfig(None, error=f"configuration not resolved: {e}") for _ in todo]
    for sb, res in zip(todo, results, strict=True):
        sb.kata_config = res.to_dict()
        cfg = res.config
        if cfg is None:
            continue
        hv = cfg.hypervisor
        if sb.runtime == "go":
            sb.guest_memory_dump_path = _str(hv.get("guest_memory_dump_path"))
            rg = hv.get("reclaim_guest_freed_memory")
            sb.reclaim_guest_freed_memory = rg if isinstance(rg, bool) else False
        if sb.enable_pprof is None:
            ep = cfg.get("runtime.enable_pprof", False)
            sb.enable_pprof = ep if isinstance(ep, bool) else False
        mon = hv.get("extra_monitor_socket") or hv.get("dbg_monitor_socket")
        if sb.extra_monitor_socket and mon not in ("qmp", "qmp-pretty"):
            sb.extra_monitor_socket = None  # HMP (or not configured): not a QMP monitor


def _config_path_annotation(sb: Sandbox) -> str | None:
    """io.katacontainers.config_path on the sandbox's spec, without parsing config.json
    when its bytes do not even mention it (most never do)."""
    src = sb._annotations_src
    if src is not None and b"io.katacontainers.config_path" not in src:
        return None
    v = (sb.annotations or {}).get("io.katacontainers.config_path")
    return v if isinstance(v, str) and v.startswith("/") else None


# -- the VMM of a runtime-rs sandbox --------------------------------------------
_VMM_NAMES = ("qemu", "cloud-hypervisor", "firecracker", "jailer")
PROC_SCAN_LIMIT = 65536  # processes; a node's /proc beyond this is not scanned


def _ppid_of(stat_line: bytes) -> int | None:
    """The parent pid in a /proc/<pid>/stat line (comm may hold spaces and ')')."""
    rest = stat_line.rsplit(b")", 1)[-1].split()
    return int(rest[1]) if len(rest) > 1 and rest[1].isdigit() else None


def find_rs_vmms(transport, sbs: list[Sandbox]) -> None:
    """Fill hypervisor_pid of runtime-rs sandboxes, which persist ``pid: null``.

    Dragonball runs in the shim, so the VMM is the shim (``<bundle>/shim.pid``). QEMU,
    Cloud Hypervisor and Firecracker are children of the shim whose command line names
    the sandbox (QEMU ``-name sandbox-<id>``, Cloud Hypervisor's API socket under
    ``/run/kata/<id>/``, Firecracker/jailer ``--id <id>``); virtiofsd, also a child
    naming the sandbox, is never taken for the VMM. The children are found through the
    node's /proc (one listing plus one batched read of the stat files, then the
    candidates' cmdlines: a few SSH round trips whatever the number of sandboxes).
    Where no VMM is found, ``vmm_note`` says why."""
    todo = [s for s in sbs if s.runtime == "rs" and s.has_state() and not s.hypervisor_pid]
    for s in todo:
        if s.shim_pid is None:
            s.vmm_note = ("runtime-rs persists no VMM pid, and the shim's pid is unknown "
                          + ("(no shim.pid in the bundle)" if s.bundle else "(no bundle found)"))
        elif s.hypervisor == "dragonball":
            s.hypervisor_pid = s.shim_pid  # the VMM is a thread group of the shim itself
    todo = [s for s in todo if s.shim_pid and not s.hypervisor_pid]
    if not todo:
        return
    try:
        pids = [p for p in transport.listdir("/proc") if p.isdigit()][:PROC_SCAN_LIMIT]
    except OSError as e:
        for s in todo:
            s.vmm_note = f"runtime-rs persists no VMM pid, and the node's /proc cannot be listed ({e})"
        return
    shims = {s.shim_pid for s in todo if s.shim_pid}
    stats = transport.read_many([f"/proc/{p}/stat" for p in pids], limit=1024)
    children: dict[int, list[int]] = {}
    for p in pids:
        b = stats.get(f"/proc/{p}/stat")
        if isinstance(b, bytes):
            ppid = _ppid_of(b)
            if ppid in shims:
                children.setdefault(ppid, []).append(int(p))
    kids = sorted({c for cs in children.values() for c in cs})
    cmds = transport.read_many([f"/proc/{c}/cmdline" for c in kids], limit=65536) if kids else {}
    argv = {c: [a.decode("utf-8", "replace") for a in b.split(b"\0") if a]
            for c in kids if isinstance(b := cmds.get(f"/proc/{c}/cmdline"), bytes)}
    for s in todo:
        naming = [c for c in children.get(s.shim_pid or 0, []) if any(s.id in a for a in argv.get(c, []))]
        vmms = [c for c in naming if posixpath.basename(argv[c][0]).startswith(_VMM_NAMES)]
        others = [c for c in naming if "virtiofsd" not in posixpath.basename(argv[c][0])]
        pick = vmms or others
        if pick:
            s.hypervisor_pid = pick[0]
        elif not pids:
            s.vmm_note = "runtime-rs persists no VMM pid, and the node's /proc is not visible"
        else:
            s.vmm_note = (f"runtime-rs persists no VMM pid, and no child of shim pid {s.shim_pid} "
                          "names the sandbox")


# -- liveness -----------------------------------------------------------------
def pid_alive(transport, pid: int | None) -> bool | None:
    """True/False from /proc/<pid> on the node; None when the node's /proc is not visible."""
    if not pid:
        return None
    if transport.exists(f"/proc/{pid}"):
        return True
    if not transport.is_dir("/proc/self") and not transport.is_dir("/proc/1"):
        return None  # e.g. a --host-root snapshot without /proc
    return False


#: what connect_unix's UnreachableError.reason says when it shows that nobody serves the
#: shim socket (the sandbox is stale); decided on the reason, never on the message's wording
_SOCKET_GONE = {SOCKET_MISSING: "shim socket does not exist",
                SOCKET_REFUSED: "nobody is listening on the shim socket",
                NOT_A_SOCKET: "the shim socket's path is not a socket"}


def socket_answers(transport, path: str | None, timeout: float = 0.5) -> tuple[bool | None, str | None]:
    """(True, None): the shim socket accepts a connection; (False, why): nobody serves it
    (missing, refused, not a socket); (None, why): the check could not tell (it timed
    out, or the transport failed on the way)."""
    if not path:
        return False, "no shim socket"
    try:
        s = transport.connect_unix(path, timeout)
    except UnreachableError as e:
        gone = _SOCKET_GONE.get(e.reason or "")
        return (False, gone) if gone else (None, f"shim socket not checked: {e.message}")
    except TimeoutExpired as e:
        return None, f"shim socket not checked: {e.message}"
    except OSError as e:
        return None, f"shim socket not checked: {e.strerror or e}"
    try:
        s.close()
    except OSError:
        pass
    return True, None


_UNSET = object()


def liveness(transport, sb: Sandbox, timeout: float = 0.5, *, _alive=_UNSET,
             _socket_missing: bool = False) -> Sandbox:
    """Set sb.state/reason: running (pid lives, socket answers), stale (the pid is gone, or
    nobody serves the shim socket), or unknown (the check could not tell: a timeout, a
    transport failure; a state file that cannot be read stays unknown too)."""
    if not sb.has_state():
        return sb  # unreadable state file: stays unknown with its reason
    alive = pid_alive(transport, sb.hypervisor_pid) if _alive is _UNSET else _alive
    if alive is False:
        sb.state, sb.reason = "stale", f"hypervisor pid {sb.hypervisor_pid} is not running"
        return sb
    ok: bool | None
    why: str | None
    if _socket_missing:
        ok, why = False, _SOCKET_GONE[SOCKET_MISSING]
    else:
        ok, why = socket_answers(transport, sb.shim_socket, timeout)
    if ok:
        sb.state, sb.reason = "running", None
        if alive is None and sb.hypervisor_pid:
            sb.reason = "pid not checked: the node's /proc is not visible"
        return sb
    sb.state, sb.reason = ("stale" if ok is False else "unknown"), why
    return sb


# -- discovery ----------------------------------------------------------------
def _candidates(transport, top: dict[str, list] | None = None) -> list[Candidate]:
    """Candidates (id, runtime, state dir mtime, problem); Go first, then runtime-rs (as
    the Go client looks). A symlink that does not resolve to a directory (a loop, a
    dangling link) is a candidate too, listed unknown with that problem; plain files
    are not sandboxes."""
    out: list[Candidate] = []
    seen: set[str] = set()
    if top is None:
        top = _kinds(transport, [GO_SBS, RS_DIR])
    jailed = {}
    if any(n == "firecracker" and is_dir for n, is_dir, _, _ in top[RS_DIR]):
        got = top.get(RS_FC_JAIL)
        if got is None:
            got = _kinds(transport, [RS_FC_JAIL])[RS_FC_JAIL]
        jailed = {e[0]: e for e in got if e[1] and _ID_RE.fullmatch(e[0]) and ".." not in e[0]}
    rs_entries = [(*e, RS_DIR) for e in top[RS_DIR] if e[0] != "firecracker"]
    rs_names = {e[0] for e in rs_entries}
    rs_entries += sorted(((*e, RS_FC_JAIL) for n, e in jailed.items() if n not in rs_names), key=lambda e: e[0])
    go_entries = [(*e, GO_SBS) for e in top[GO_SBS]]
    for base, rt, entries in ((GO_SBS, "go", go_entries), (RS_DIR, "rs", rs_entries)):
        for name, is_dir, is_link, mtime, listed_in in entries:
            if name in seen or not _ID_RE.fullmatch(name) or ".." in name:
                continue
            problem = None
            if not is_dir:
                if not is_link:
                    continue
                problem = (f"{base}/{name} is a symlink that does not resolve to a directory "
                           "(dangling, or a symlink loop)")
            seen.add(name)
            if rt == "go":
                state_file = f"{GO_SBS}/{name}/persist.json"
            elif name in jailed:
                state_file = f"{RS_FC_JAIL}/{name}/root/state.json"
            else:
                state_file = f"{RS_DIR}/{name}/state.json"
            out.append((name, rt, mtime, problem, state_file, f"{listed_in}/{name}"))
    return out


def check_state(state: str | None) -> str | None:
    """A state to filter on (None: any); anything but one of STATES is a usage error."""
    if state is not None and state not in STATES:
        raise UsageError(f"invalid --state {state!r} (choose from {', '.join(STATES)})")
    return state


def discover(transport, *, check: bool = True, timeout: float = 0.5, state: str | None = None,
             namespace: str | None = None) -> list[Sandbox]:
    """Every sandbox on the node, sorted by pod then id; ``check`` runs the liveness check.

    ``state`` keeps the sandboxes in that state (one of STATES), ``namespace`` those
    whose pod is in that namespace."""
    check_state(state)
    with _gc_paused():
        top = _kinds(transport, [GO_SBS, RS_DIR, RS_FC_JAIL, CRIO_DIR, CONTAINERD_TASK_DIR])
        bundles = _BundleIndex(transport, top)
        cands = _candidates(transport, top)
        sbs = _load_many(transport, cands, bundles)
        # the listings (a tuple and a FileStat per entry) go before the GC resumes: its
        # first collections walk whatever was made during the pause and is still alive
        del top, bundles, cands
        if check:
            _check_all(transport, sbs, timeout)
    sbs = [s for s in sbs if (not state or s.state == state)
           and (not namespace or (s.pod or {}).get("namespace") == namespace)]
    sbs.sort(key=lambda s: (s.pod_ref or "~", s.id))
    return sbs


def _check_all(transport, sbs: list[Sandbox], timeout: float) -> None:
    """liveness() for many sandboxes: the /proc/<pid> and shim socket probes in one
    stat_many (one SSH round trip); only sockets that exist are connected to."""
    todo = [s for s in sbs if s.has_state()]
    if not todo:
        return
    pids = sorted({f"/proc/{s.hypervisor_pid}" for s in todo if s.hypervisor_pid})
    probes = pids + (["/proc/self", "/proc/1"] if pids else [])
    probes += [s.shim_socket for s in todo if s.shim_socket]
    st = transport.stat_many(probes)
    proc_visible = any(not isinstance(st.get(p), OSError) and st[p].is_dir for p in ("/proc/self", "/proc/1")
                       if p in st)

    def check(s: Sandbox) -> None:
        alive = None
        if s.hypervisor_pid:
            alive = True if not isinstance(st[f"/proc/{s.hypervisor_pid}"], OSError) else \
                (False if proc_visible else None)
        missing = bool(s.shim_socket) and isinstance(st[s.shim_socket], (FileNotFoundError, NotADirectoryError))
        if missing and alive is not False:  # what liveness() says then, without its call
            s.state, s.reason = "stale", _SOCKET_GONE[SOCKET_MISSING]
            return
        liveness(transport, s, timeout, _alive=alive, _socket_missing=missing)

    connects = [s for s in todo if not (s.shim_socket and isinstance(st[s.shim_socket], OSError))]
    if len(connects) > 8 and getattr(transport, "node", "localhost") != "localhost":
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as ex:
            list(ex.map(check, todo))
    else:
        for s in todo:
            check(s)


def resolve(transport, ref: str, *, check: bool = True, timeout: float = 0.5) -> Sandbox:
    """One sandbox from an id, a unique id prefix, NAMESPACE/POD or pod/NAMESPACE/NAME."""
    kind, val = parse_ref(ref)
    bundles = _BundleIndex(transport)
    if kind == "id":
        cands = [c for c in _candidates(transport) if c[0].startswith(val)]
        exact = [c for c in cands if c[0] == val]
        if exact:
            cands = exact[:1]
        if not cands:
            raise NotFound(f"no sandbox matches {val!r} on {transport.node}",
                           hint="list them with 'katactl sandbox list'")
        if len(cands) > 1:
            ids = sorted(c[0] for c in cands)
            shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
            raise Ambiguous(f"sandbox prefix {val!r} is ambiguous: {shown}",
                            hint="give more characters of the id", details={"candidates": ids})
        sb = _load_many(transport, cands, bundles, quick=True)[0]
        if check:
            liveness(transport, sb, timeout)
        return sb
    assert isinstance(val, tuple)  # parse_ref: ("pod", (namespace, name))
    ns, name = val
    matches = [s for s in discover(transport, check=False)
               if s.pod and s.pod.get("namespace") == ns and s.pod.get("name") == name]
    if not matches:
        raise NotFound(f"no sandbox of pod {ns}/{name} on {transport.node}",
                       hint="the pod may run on another node (use -N) or not with a Kata runtime class")
    if check or len(matches) > 1:
        for s in matches:
            liveness(transport, s, timeout)
    if len(matches) > 1:
        running = [s for s in matches if s.state == "running"]
        if len(running) == 1:
            return running[0]
        ids = sorted(s.id for s in matches)
        raise Ambiguous(f"pod {ns}/{name} has {len(ids)} sandboxes on {transport.node}: {', '.join(ids)}",
                        hint="give the sandbox id", details={"candidates": ids})
    return matches[0]


def as_sandbox(transport, ref: str | Sandbox, *, check: bool = False) -> Sandbox:
    """ref itself when it is already a Sandbox (e.g. handed over by on_sandbox), else
    resolve(transport, ref, check=check): library functions take either."""
    return ref if isinstance(ref, Sandbox) else resolve(transport, ref, check=check)


def require_running(sb: Sandbox) -> Sandbox:
    """Refuse early, with the reason, when the shim cannot be talked to."""
    if sb.state != "running":
        raise UnreachableError(f"sandbox {sb.id[:12]} is {sb.state}: {sb.reason or 'shim not reachable'}")
    return sb


# -- one sandbox somewhere in the node selection -------------------------------
def locate(settings, ref: str, *, check: bool = True) -> tuple[str, Sandbox]:
    """(node, sandbox) for a node-local ref across the selected node(s).

    On one node, its own error is raised as is. On many, exactly one sandbox in the
    whole selection must match: none -> NotFound, several -> Ambiguous (exit 3) listing
    node:id, where a node on which the ref is itself ambiguous adds all its candidates.
    A prefix or pod matched while other nodes could not be searched is Refused (exit 5).
    """
    from katactl.fleet import run_on_nodes

    parse_ref(ref)  # bad input fails before any node is contacted
    timeout = min(float(settings.request_timeout), 2.0)
    fo = run_on_nodes(settings, lambda t: resolve(t, ref, check=check, timeout=timeout))
    fo.raise_if_only_node_failed()  # one sandbox, not a list: the node's failure is the command's
    found = [(n, fo.values[n]) for n in fo.nodes if n in fo.values]
    matches = []  # (node, id) of every sandbox the ref matches, in node order
    for n in fo.nodes:
        e = fo.errors.get(n)
        if n in fo.values:
            matches.append((n, fo.values[n].id))
        elif isinstance(e, Ambiguous):
            matches += [(n, i) for i in e.details.get("candidates", [])]
    if len(matches) > 1:
        nodes = list(dict.fromkeys(n for n, _ in matches))
        where = ", ".join(f"{n}:{i[:12]}" for n, i in matches[:10])
        where += f", ... ({len(matches)} in all)" if len(matches) > 10 else ""
        on = "several nodes" if len(nodes) > 1 else nodes[0]
        raise Ambiguous(f"{ref!r} matches {len(matches)} sandboxes on {on}: {where}",
                        hint="give more characters of the id, or narrow the node selection with -N NODE",
                        details={"candidates": [{"node": n, "id": i} for n, i in matches]})
    if found:
        node, sb = found[0]
        failed = {n: e.message for n, e in fo.errors.items() if not isinstance(e, NotFound)}
        # A prefix or pod may also match on a node that could not be asked: acting on the
        # one match seen could hit a sandbox the user never singled out (vmcore trigger
        # panics the guest), so only a full id, or a selection that was all searched, goes.
        if failed and sb.id != ref:
            down = ", ".join(f"{n} ({m})" for n, m in failed.items())
            raise Refused(f"{ref!r} matches {node}:{sb.id[:12]}, but {len(failed)} node(s) could not be"
                          f" searched for another match: {down}",
                          hint=f"give the full sandbox id, or select the node alone (-N {node})",
                          details={"match": {"node": node, "id": sb.id}, "notSearched": failed})
        return node, sb
    unsearched = {n: e for n, e in fo.errors.items() if not isinstance(e, NotFound)}
    if unsearched and len(unsearched) == len(fo.nodes):  # every node named, not the first one alone
        fo.raise_if_none_answered(notSearched={n: e.message for n, e in unsearched.items()})
    if unsearched:  # the sandbox may be on a node that could not be asked
        down = ", ".join(f"{n} ({e.message})" for n, e in unsearched.items())
        raise Incomplete(f"no sandbox matches {ref!r} on the {len(fo.nodes) - len(unsearched)} node(s) that "
                         f"answered; {len(unsearched)} could not be searched: {down}",
                         details={"notSearched": {n: e.message for n, e in unsearched.items()}})
    raise NotFound(f"no sandbox matches {ref!r} on {len(fo.nodes)} node(s)")


def on_sandbox(settings, ref: str, fn, *, require_live: bool = True):
    """Resolve ref, then call fn(transport, sandbox) on its node; returns (node, sandbox, value)."""
    from katactl.fleet import open_transport

    node, sb = locate(settings, ref)
    if require_live:
        require_running(sb)
    with open_transport(node, settings) as t:
        return node, sb, fn(t, sb)
