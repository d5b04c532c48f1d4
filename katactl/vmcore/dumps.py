"""The dumps on a node: where they live, what they are, removing them.

Facts (reference/kata-node.md "Post-panic vmcore", hypervisors.md): the Go
runtime dumps a panicked QEMU guest into
``<guest_memory_dump_path>/<sandbox-id>/vmcore-<YYYYMMDDhhmmss.fff>.elf``
next to ``hypervisor.conf`` (JSON of the hypervisor config),
``hypervisor.version`` (``qemu --version``) and ``state/`` (a copy of
``/run/vc/sbs/<id>``). ``guest_memory_dump_path`` comes from the Kata
configuration each runtime really reads (:mod:`katactl.katacfg`: per sandbox and per
containerd runtime handler, drop-ins applied; :func:`dump_configs`). runtime-rs never
dumps: it parses ``guest_memory_dump_path`` but has no GUEST_PANICKED handler (its QMP
client, ``src/runtime-rs/crates/hypervisor/src/qemu/qmp.rs``, only sends commands).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import posixpath
import re
import socket
import time
from typing import Any, Callable

from katactl import sandbox as sbmod
from katactl.errors import (Ambiguous, Interrupted, KatactlError, NotFound, OperationFailed, Refused,
                            UsageError, as_katactl_error)
from katactl.sandbox import CONTAINERD_TASK_DIR, pod_ref
from katactl.vmcore.records import CollectIndex
from katactl.backends.base import NodeTransport

POD_LOG_DIR = "/var/log/pods"
DUMP_RE = re.compile(r"^vmcore-(\d{14}(?:\.\d{1,3})?)\.(elf|kdump(?:-[a-z]+)?)$")
_POD_UID_RE = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


# ---------------------------------------------------------------------------
# where dumps live
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class DumpConfig:
    dump_path: str
    paging: bool
    hypervisor: str | None
    default_memory_mib: int
    config_path: str | None
    dropins: list[str]


def dump_config(transport: NodeTransport, *, dump_path: str | None = None, kata_config: str | None = None) -> DumpConfig:
    """guest_memory_dump_path and friends from the node's effective Kata configuration."""
    from katactl import katacfg

    if kata_config is not None:
        check_abs(kata_config, "--kata-config")
    if dump_path is not None:
        check_abs(dump_path, "--dump-path")
        cfg = None
        try:
            cfg = katacfg.load(transport, kata_config)
        except KatactlError:
            if kata_config is not None:
                raise  # a --kata-config that cannot be read is never silently ignored
    else:
        # no fallback to the sandboxes' state: the Go runtime never persists
        # GuestMemoryDumpPath (virtcontainers dumpConfig), runtime-rs has no dump at all
        cfg = katacfg.load(transport, kata_config)
    d = _from_config(cfg, dump_path)
    if d is None:
        assert cfg is not None  # loaded above: there is no --dump-path
        raise NotFound(
            f"guest_memory_dump_path is not set in {cfg.resolved}"
            + (f" (drop-ins: {', '.join(cfg.dropins)})" if cfg.dropins else "")
            + f" on node {transport.node}: the runtime writes no vmcores",
            hint=f'set guest_memory_dump_path = "/var/crash/kata" in [hypervisor.{cfg.hypervisor_name or "qemu"}]'
                 " (or pass --dump-path)")
    return d


def _from_config(cfg, dump_path: str | None) -> DumpConfig | None:
    """The DumpConfig of one configuration (and/or an explicit dump path); None when
    neither names a dump directory. A value the runtime would refuse is exit 1 naming
    the file and the key."""
    hv_key = f"hypervisor.{cfg.hypervisor_name}." if cfg and cfg.hypervisor_name else None

    def typed(key: str, kind: str, default):
        return cfg.typed(hv_key + key, kind, default) if cfg and hv_key else default

    if dump_path:
        path = dump_path
    else:
        path = typed("guest_memory_dump_path", "str", "")
        if not path:
            return None
        if not path.startswith("/"):  # a value was read: from [hypervisor.<name>]
            section = f"hypervisor.{cfg.hypervisor_name}"
            raise OperationFailed(f"{cfg.source(section + '.guest_memory_dump_path')}: [{section}] "
                                  f"guest_memory_dump_path = {path!r}: must be an absolute path")
    check_abs(path, "guest_memory_dump_path")
    return DumpConfig(dump_path=posixpath.normpath(path), paging=typed("guest_memory_dump_paging", "bool", False),
                      hypervisor=cfg.hypervisor_name if cfg else None,
                      default_memory_mib=typed("default_memory", "mib", 2048),
                      config_path=cfg.resolved if cfg else None, dropins=list(cfg.dropins) if cfg else [])


#: why runtime-rs sandboxes never leave a dump, whatever their configuration says
RS_NO_PANIC_DUMP = ("runtime-rs writes no vmcore when a guest panics: it accepts guest_memory_dump_path "
                    "but never uses it (no GUEST_PANICKED handler in src/runtime-rs/crates/hypervisor)")


def _kata_shim(h) -> bool:
    """Whether a containerd runtime handler runs a Kata shim (containerd-shim-kata[-<x>]-v2)."""
    name = posixpath.basename(h.runtime_path) if h.runtime_path else h.binary_name
    return bool(name and name.startswith("containerd-shim-kata"))


def _rs_handler(h) -> bool:
    """kata-deploy installs runtime-rs under <dest>/runtime-rs/ and its configurations under
    .../kata-containers/runtime-rs/ (katactl.lab.layout.write_kata_deploy)."""
    return any("/runtime-rs/" in (p or "") for p in (h.runtime_path, h.config_path))


def dump_configs(transport: NodeTransport, *, dump_path: str | None = None,
                 kata_config: str | None = None, sandboxes: list | None = None) -> list[DumpConfig]:
    """Every dump directory of the node, one DumpConfig per distinct path.

    ``--dump-path`` or ``--kata-config`` name one (:func:`dump_config`). Otherwise, as each
    Go runtime reads its own configuration (katacfg.Resolver: a kata-deploy node gives every
    runtime handler its own ``runtimes/<shim>/configuration-<shim>.toml`` and ``config.d``),
    the paths are collected from the configuration every live Go sandbox used, from every
    Kata runtime handler's ``ConfigPath`` in containerd's configuration (dumps outlive their
    sandboxes), and from the node's default search (a handler without ``ConfigPath``, or
    nothing else to go by). runtime-rs configurations are skipped: RS_NO_PANIC_DUMP."""
    from katactl import katacfg

    if dump_path is not None or kata_config is not None:
        return [dump_config(transport, dump_path=dump_path, kata_config=kata_config)]
    res = katacfg.Resolver(transport)
    paths: list[str] = []
    rs_set: list[str] = []   # runtime-rs sandboxes/handlers that set a dump path, for the message
    try:  # ``sandboxes``: the node's, when the caller discovered them already
        sbs = sandboxes if sandboxes is not None else sbmod.discover(transport, check=False)
    except (KatactlError, OSError):
        sbs = []  # the handlers' and the default configurations still say where dumps go
    for sb in sbs:
        kc = sb.kata_config or {}
        if sb.runtime == "rs":
            if sb.guest_memory_dump_path:
                rs_set.append(f"sandbox {sb.id[:12]}")
        elif kc.get("path") and not kc.get("error"):
            # (a file its runtime now refuses is skipped here; read again below as a handler's
            # ConfigPath or by the default search, its error is reported when nothing else is found)
            paths.append(kc["path"])
    handlers = [h for h in res.containerd().handlers.values() if _kata_shim(h)]
    need_default = False
    for h in handlers:
        if _rs_handler(h):
            try:
                if h.config_path and res.load(h.config_path, "rs").hypervisor.get("guest_memory_dump_path"):
                    rs_set.append(f"runtime handler {h.name}")
            except KatactlError:
                pass
        elif h.config_path:
            paths.append(h.config_path)
        else:
            need_default = True
    cfgs: list[katacfg.KataConfig] = []
    errors: list[KatactlError] = []
    for p in dict.fromkeys(paths):
        try:
            cfgs.append(res.load(p, "go"))
        except KatactlError as e:
            errors.append(e)  # a ConfigPath that is gone or broken: its runtime cannot start either
    if need_default or not cfgs:
        try:
            cfgs.append(katacfg.load(transport))
        except KatactlError as e:
            errors.append(e)
    out: dict[str, DumpConfig] = {}
    seen: set[tuple] = set()
    for c in cfgs:
        if (c.resolved, tuple(c.dropins)) in seen:
            continue
        seen.add((c.resolved, tuple(c.dropins)))
        if c.runtime == "rs":
            if c.hypervisor.get("guest_memory_dump_path"):
                rs_set.append(c.resolved)
            continue
        d = _from_config(c, None)
        if d is not None:
            out.setdefault(d.dump_path, d)
    if out:
        return list(out.values())
    if errors and not rs_set:
        raise errors[0]
    shown = "; ".join(dict.fromkeys(c.resolved + (f" (drop-ins: {', '.join(c.dropins)})" if c.dropins else "")
                                    for c in cfgs))
    hv = next((c.hypervisor_name for c in cfgs if c.hypervisor_name), None) or "qemu"
    raise NotFound(
        f"guest_memory_dump_path is not set in {shown or 'any Kata configuration'} on node {transport.node}: "
        "the runtime writes no vmcores"
        + (f" ({', '.join(rs_set)} set it, but {RS_NO_PANIC_DUMP})" if rs_set else ""),
        hint=f'set guest_memory_dump_path = "/var/crash/kata" in [hypervisor.{hv}]'
             " (or pass --dump-path)")


def check_abs(path: str, what: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise UsageError(f"invalid {what} {path!r}: must be an absolute path")


def check_ref(ref: str) -> str:
    """A dump or sandbox reference, checked before any node is asked: a node path
    ``DIR/SANDBOX-ID/vmcore-<time>.elf``, ``SANDBOX-ID/vmcore-<time>.elf``,
    ``vmcore-<time>.elf``, ``NAMESPACE/POD``, or a sandbox id (prefix). Anything else
    (``..``, ``/etc/passwd``, control characters) is a UsageError."""

    if not isinstance(ref, str) or not ref or "\0" in ref or len(ref) > 4096:
        raise UsageError(f"invalid dump or sandbox reference {ref!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in ref):
        raise UsageError(f"invalid dump or sandbox reference {ref!r}: contains a control character")
    if ref.startswith("/"):
        check_abs(ref, "dump path")
        parts = ref.split("/")
        if posixpath.normpath(ref) != ref or len(parts) < 4 or not DUMP_RE.fullmatch(parts[-1]):
            raise UsageError(f"invalid dump path {ref!r}: expected DIR/SANDBOX-ID/vmcore-<time>.elf")
        sbmod.validate_id(parts[-2])
        return ref
    if DUMP_RE.fullmatch(ref):
        return ref
    head, _, tail = ref.rpartition("/")
    if head and DUMP_RE.fullmatch(tail) and "/" not in head:
        sbmod.validate_id(head)
        return ref
    if "/" not in ref:
        sbmod.validate_id(ref, "dump or sandbox reference")
        return ref
    try:
        sbmod.parse_ref(ref)
    except UsageError:
        raise UsageError(f"invalid dump or sandbox reference {ref!r}: expected SANDBOX-ID/vmcore-<time>.elf, "
                         "vmcore-<time>.elf, a sandbox id (prefix), NAMESPACE/POD or a dump's path") from None
    return ref


def node_name(transport: NodeTransport) -> str:
    """The name used for DIR/<node>/: the transport's node, or the node's hostname locally.

    A hostname is node-controlled text: ``..`` or ``.`` joined under --to would put the copies
    outside it or among the node directories, so leading dots become ``_`` (and the name is cut
    to a file name's length)."""
    if transport.node not in ("localhost", ""):
        return transport.node
    try:
        name = transport.read_text("/etc/hostname", limit=256).strip()
    except OSError:
        name = ""
    if not name and not transport.host_root:
        name = socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:253]
    name = re.sub(r"^\.+", lambda m: "_" * len(m.group()), name)
    return name or "localhost"


def real_path(transport: NodeTransport, node_path: str) -> str:
    """The path the hypervisor (a process on the node) sees for a node path. Under a local
    --host-root that process runs here: the path has the node's symlinks resolved inside the
    root (LocalTransport.real), or this host's kernel follows /var/crash -> /data/crash to *its*
    /data/crash."""
    from katactl.backends.local import LocalTransport

    if isinstance(transport, LocalTransport):
        return transport.real(node_path)
    return (transport.host_root or "") + node_path


# ---------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------
def node_zone(transport: NodeTransport):
    """The node's local time zone as the Kata runtime (Go, ``time.Local``) sees it:
    ``/etc/localtime`` on the node, UTC when it is missing or unreadable (Go's
    rule; a ``TZ`` variable in the runtime's environment cannot be seen from here)."""
    import io
    import zoneinfo

    try:
        if _regular(transport, "/etc/localtime"):
            return zoneinfo.ZoneInfo.from_file(io.BytesIO(transport.read_bytes("/etc/localtime", limit=1 << 20)),
                                               key="localtime")
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        pass
    try:  # a --host-root tree whose /etc/localtime links to a zone file outside the tree
        m = re.search(r"zoneinfo/(.+)$", transport.readlink("/etc/localtime"))
        if m:
            return zoneinfo.ZoneInfo(m.group(1))
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        pass
    return datetime.timezone.utc


def dump_timestamp(name: str, tz=None) -> str | None:
    """'vmcore-20240102030405.67.elf' -> '2024-01-02T03:04:05.670Z' (RFC 3339, UTC).

    The name holds the node's local time without a zone (Go's
    ``Format("20060102150405.999")``, trailing zeros trimmed); tz is the node's
    zone (:func:`node_zone`; default UTC)."""
    m = DUMP_RE.fullmatch(name)
    if not m:
        return None
    whole, _, frac = m.group(1).partition(".")
    try:
        local = datetime.datetime.strptime(whole, "%Y%m%d%H%M%S").replace(tzinfo=tz or datetime.timezone.utc)
        utc = local.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):  # not a real date (e.g. month 13): no time
        return None
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac.ljust(3, '0')}Z"


def go_timestamp(t: float | None = None, tz=None) -> str:
    """Go's ``time.Now().Format("20060102150405.999")``: milliseconds *truncated* (Go's
    fractional-second layouts never round), trailing zeros (and a bare dot) dropped; in
    tz (the node's zone, :func:`node_zone`), default this machine's local time."""
    t = time.time() if t is None else t
    ms = int(round(t * 1_000_000)) // 1000 % 1000  # (microseconds first: no float drift)
    if tz is None:
        s = time.strftime("%Y%m%d%H%M%S", time.localtime(int(t)))
    else:
        s = datetime.datetime.fromtimestamp(int(t), tz).strftime("%Y%m%d%H%M%S")
    frac = f"{ms:03d}".rstrip("0")
    return s + (f".{frac}" if frac else "")


def dump_name(fmt: str = "elf", t: float | None = None, tz=None) -> str:
    """The file name of a new dump: ``vmcore-<go_timestamp>.elf`` (the runtime's panic
    dumps, ``--format elf``), or ``.kdump`` for QEMU's kdump formats (kdump-zlib,
    kdump-lzo, kdump-snappy). katactl's triggers and the lab's shim extension both
    name their dumps with it."""
    return f"vmcore-{go_timestamp(t, tz=tz)}" + (".elf" if fmt == "elf" else ".kdump")


def sniff_format(head: bytes) -> str:
    if head.startswith(b"\x7fELF"):
        return "elf"
    if head.startswith(b"KDUMP   "):
        return "kdump"
    if head.startswith(b"makedumpfile"):
        return "kdump-flat"
    if not head:
        return "empty"
    return "unknown"


def elf_extent(head: bytes) -> tuple[int, int] | None:
    """(end of the last segment, PT_LOAD count) from an ELF64 header + program headers."""
    import struct

    if len(head) < 64 or not head.startswith(b"\x7fELF") or head[4] != 2:
        return None
    endian = "<" if head[5] == 1 else ">"
    phoff, = struct.unpack_from(endian + "Q", head, 32)
    phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
    if phnum == 0xFFFF or phentsize < 56 or phoff + phentsize * phnum > len(head):
        return None
    end, loads = 0, 0
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(endian + "IIQQQQ", head,
                                                                           phoff + i * phentsize)
        if p_type == 1:
            loads += 1
        end = max(end, p_offset + p_filesz)
    return end, loads


#: the end of a complete makedumpfile flattened stream: a ``makedumpfile_data_header`` whose
#: offset and buf_size are both END_FLAG_FLAT_HEADER (-1). QEMU dump/dump.c
#: ``write_end_flat_header()`` (kdump-zlib/-lzo/-snappy) and makedumpfile.c's own
#: ``write_end_flat_header()`` (-F) write it last; makedumpfile's reader refuses a stream
#: without it ("Can't get valid end header of flattened format").
FLAT_END = b"\xff" * 16


def flat_stream_status(transport: NodeTransport, path: str, size: int) -> str:
    """``ok`` when a kdump-flat dump of this size ends with :data:`FLAT_END`, ``incomplete``
    when it does not (or the file ends before), ``unreadable`` when its last 16 bytes could
    not be read (the node's read failed, its stream was cut, or stalled past the request
    timeout): that one dump's status is unknown, the rest of the list stands. A stream may
    deliver the 16 bytes in more than one piece (a short recv on an SSH channel).

    A raw ``KDUMP   `` file (QEMU's kdump-raw-* formats, makedumpfile without -F) has no end
    marker; its extent is the last page descriptor's, which needs the population count of
    its whole dump bitmap (MiBs for a large guest): not checked by ``list``."""
    if size < 4096 + 16:                    # the 4 KiB flat header (MAX_SIZE_MDF_HEADER) and the marker
        return "incomplete"
    tail = b""
    try:
        it = transport.open_stream(path, offset=size - 16, chunk_size=16)
        try:
            for b in it:
                tail += b
                if len(tail) >= 16:
                    break
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
    except Interrupted:
        raise
    except (OSError, KatactlError):
        return "unreadable"
    return "ok" if tail[:16] == FLAT_END else "incomplete"


def _regular(transport: NodeTransport, path: str, st=None) -> bool:
    """Whether ``path`` may be opened for reading: a regular file (symlinks followed, as
    the read follows them). A FIFO would block open(2) forever, a device stream without
    end: a node or a collected snapshot may hold either under a dump's or a state file's
    name (as katactl.sandbox reads state files). ``st``: the stat already taken (a
    FileStat, or the OSError a stat_many gave), else one stat here."""
    if st is None:
        try:
            st = transport.stat(path)
        except OSError:
            return False
    return sbmod._not_regular(path, st) is None


def read_json(transport: NodeTransport, path: str, limit: int = 8 << 20, st=None) -> Any:
    """A node JSON file's value; None when it is missing, not a regular file (``st``: its
    stat, when taken already) or not JSON."""
    if not _regular(transport, path, st):
        return None
    try:
        return json.loads(transport.read_bytes(path, limit=limit))
    except (OSError, ValueError, RecursionError):  # a dump's state copy nested too deeply: no metadata
        return None


def _read_first_line(transport: NodeTransport, path: str, st=None) -> str | None:
    if not _regular(transport, path, st):
        return None
    try:
        text = transport.read_text(path, limit=4096)
    except OSError:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line or None


def _state_files(dump_dir: str, sandbox_id: str) -> tuple[str, ...]:
    """The saved state files :func:`pod_of` reads: the runtime's layout, state/<id>/persist.json
    (sandbox) and state/<id>/<cid>/persist.json (containers: the pause container's id is the
    sandbox id); katactl's own trigger used to write state/persist.json: still read."""
    return (f"{dump_dir}/state/{sandbox_id}/{sandbox_id}/persist.json", f"{dump_dir}/state/{sandbox_id}/persist.json",
            f"{dump_dir}/state/persist.json")


def pod_of(transport: NodeTransport, dump_dir: str, sandbox_id: str, stats: dict | None = None) -> dict:
    """Pod identity of a dumped sandbox: the bundle's CRI annotations (while the
    bundle still exists), else the pod UID from the saved state's cgroup path
    mapped through /var/log/pods/<ns>_<name>_<uid>. ``stats``: {path: stat} of
    :func:`_state_files` taken already (else each is stat'ed before it is read)."""
    stats = stats or {}
    bundles = []
    sb_container, sb_state, old_state = _state_files(dump_dir, sandbox_id)
    for p in (sb_container, sb_state):
        persist = read_json(transport, p, st=stats.get(p))
        if isinstance(persist, dict) and persist.get("BundlePath"):
            bundles.append(str(persist["BundlePath"]))
            break
    try:
        for ns in transport.listdir(CONTAINERD_TASK_DIR):
            bundles.append(f"{CONTAINERD_TASK_DIR}/{ns}/{sandbox_id}")
    except OSError:
        pass
    for b in bundles:
        spec = read_json(transport, f"{b}/config.json")
        ann = (spec or {}).get("annotations") if isinstance(spec, dict) else None
        if isinstance(ann, dict) and ann.get("io.kubernetes.cri.sandbox-name"):
            return {"namespace": ann.get("io.kubernetes.cri.sandbox-namespace"),
                    "name": ann.get("io.kubernetes.cri.sandbox-name"),
                    "uid": ann.get("io.kubernetes.cri.sandbox-uid"), "source": "bundle"}
        if isinstance(ann, dict) and ann.get("io.kubernetes.cri-o.KubeName"):
            return {"namespace": ann.get("io.kubernetes.cri-o.Namespace"),
                    "name": ann.get("io.kubernetes.cri-o.KubeName"), "uid": None, "source": "bundle"}
    state = None
    for p in (sb_state, old_state):
        state = read_json(transport, p, st=stats.get(p))
        if isinstance(state, dict) and "SandboxCgroupPath" in state:
            break
    uid = None
    if isinstance(state, dict):
        m = _POD_UID_RE.search(str(state.get("SandboxCgroupPath") or ""))
        if m:
            uid = m.group(1).replace("_", "-")
    if uid:
        try:
            for entry in transport.listdir(POD_LOG_DIR):
                parts = entry.rsplit("_", 2)
                if len(parts) == 3 and parts[2] == uid:
                    return {"namespace": parts[0], "name": parts[1], "uid": uid, "source": "pod-logs"}
        except OSError:
            pass
        return {"namespace": None, "name": None, "uid": uid, "source": "state"}
    return {}


def list_dumps(transport: NodeTransport, *, dump_path: str | None = None, kata_config: str | None = None,
               index: "CollectIndex | None" = None, sandboxes: list | None = None) -> list[dict]:
    """Every dump under the node's guest_memory_dump_path(s) (:func:`dump_configs`), oldest first."""
    index = index if index is not None else CollectIndex()
    items: list[dict] = []
    tz = None
    for cfg in dump_configs(transport, dump_path=dump_path, kata_config=kata_config, sandboxes=sandboxes):
        try:
            sandboxes = transport.listdir(cfg.dump_path)
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            raise OperationFailed(f"{cfg.dump_path}: guest_memory_dump_path is not a directory") from None
        tz = _list_dir(transport, cfg.dump_path, sandboxes, index, items, tz)
    items.sort(key=lambda i: (i["time"] or "", i["name"]))
    return items


def _list_dir(transport: NodeTransport, top: str, sandboxes: list[str], index: CollectIndex, items: list[dict], tz):
    """Append the dumps of one dump directory to items; returns the node's zone (read once)."""
    for sid in sandboxes:
        d = f"{top}/{sid}"
        try:
            names = transport.listdir(d)
        except OSError:
            # not a sandbox directory the runtime made (a file, a symlink loop, gone meanwhile,
            # unreadable): one such entry must not hide every dump of the node, least of all
            # when the disk is full and dumps are to be removed
            continue
        dumps = [n for n in names if DUMP_RE.fullmatch(n)]
        if not dumps:
            continue
        # one batched stat (over SSH one round trip): only regular files are read
        version_p, conf_p = f"{d}/hypervisor.version", f"{d}/hypervisor.conf"
        stats = transport.stat_many([*(f"{d}/{n}" for n in dumps), version_p, conf_p, *_state_files(d, sid)])
        pod = pod_of(transport, d, sid, stats)
        version = _read_first_line(transport, version_p, stats[version_p])
        hvconf = read_json(transport, conf_p, st=stats[conf_p])
        if tz is None:
            tz = node_zone(transport)
        for name in dumps:
            items.append(_describe(transport, d, sid, name, pod, version, hvconf, index, tz, stats[f"{d}/{name}"]))
    return tz


def _pod_object(pod: dict) -> dict | None:
    """The pod as sandbox list has it, {name, namespace, uid}: pod_of's ``source`` (how it was
    found) is not part of it."""
    return {k: pod.get(k) for k in ("name", "namespace", "uid")} if pod.get("name") else None


def _describe(transport: NodeTransport, d, sid, name, pod, version, hvconf, index, tz, st) -> dict:
    """One dump's item; ``st``: its stat (or the OSError). Only a regular file is read."""
    path = f"{d}/{name}"
    st = None if isinstance(st, OSError) else st
    problem = None
    head = b""
    if st is not None and not _regular(transport, path, st):
        problem = f"not a regular file ({'a directory' if st.is_dir else sbmod._file_kind(st.mode)})"
    elif st is not None:
        try:
            head = transport.read_bytes(path, limit=65536)
        except OSError:
            pass
    fmt = sniff_format(head)
    status = "ok"
    loads = None
    if problem:
        fmt, status = "unknown", "not-regular"
    elif fmt == "elf":
        ext = elf_extent(head)
        if ext is None:
            status = "unreadable-header"
        else:
            end, loads = ext
            if st is not None and st.size < end:
                status = "incomplete"   # still being written, or truncated
    elif fmt == "kdump-flat":
        # incomplete: still being written, or cut (QEMU killed, ENOSPC)
        status = "incomplete" if st is None else flat_stream_status(transport, path, st.size)
    elif fmt in ("empty", "unknown"):
        status = "incomplete" if fmt == "empty" else "unknown-format"
    coll = index.lookup(transport, path, st.size if st else None, st.mtime if st else None)
    # hypervisor.conf is the runtime's HypervisorConfig as JSON: MemorySize is a uint32 of MiB
    # (virtcontainers/hypervisor.go); any other value is unknown, not the list's failure
    mib = hvconf.get("MemorySize") if isinstance(hvconf, dict) else None
    mem = mib << 20 if isinstance(mib, int) and not isinstance(mib, bool) and mib > 0 else None
    return {
        "name": f"{sid}/{name}",
        "sandbox": sid,
        "file": name,
        "path": path,
        "format": fmt,
        "status": status,
        "size": st.size if st else None,
        "time": dump_timestamp(name, tz),
        "mtime": st.mtime if st else None,
        "pod": _pod_object(pod),
        "podRef": pod_ref(pod),
        "podUid": pod.get("uid"),
        "hypervisorVersion": version,
        "guestMemory": mem,
        "loadSegments": loads,
        "collected": coll is not None,
        "collectedTo": coll,
        "problem": problem,
    }


def match_ref(entries: list[dict], ref: str) -> list[dict]:
    """The entries (dicts with name, path, file, sandbox, podRef) a ref names: the full name
    (SANDBOX-ID/vmcore-X.elf), node path or file name; else NAMESPACE/POD; else a sandbox id
    or unique prefix, all of its dumps, or with ``/vmcore-X.elf`` after it that one dump.
    A prefix of several sandboxes, or a file name several sandboxes have, is Ambiguous."""
    hit = [i for i in entries if ref in (i["name"], i["path"], i["file"])]
    if not hit:
        hit = [i for i in entries if i["podRef"] == ref]
    if not hit:
        head, _, tail = ref.rpartition("/")
        prefix, file = (head, tail) if head and "/" not in head and DUMP_RE.fullmatch(tail) else (ref, None)
        sids = sorted({i["sandbox"] for i in entries if i["sandbox"].startswith(prefix)})
        if len(sids) > 1:
            raise Ambiguous(f"{ref!r} matches the dumps of {len(sids)} sandboxes: "
                            + ", ".join(s[:12] for s in sids[:5]))
        hit = [i for i in entries if sids and i["sandbox"] == sids[0] and file in (None, i["file"])]
    if len({i["file"] for i in hit}) < len(hit) and ref in [i["file"] for i in hit]:
        raise Ambiguous(f"{ref!r} names dumps of several sandboxes; use SANDBOX-ID/{ref}")
    return hit


def resolve_dumps(transport: NodeTransport, refs: list[str], *, dump_path: str | None = None,
                  kata_config: str | None = None, index: "CollectIndex | None" = None,
                  missing: Callable[[str], bool] | None = None) -> list[dict]:
    """Dumps named by refs (:func:`match_ref`). No refs: all.
    A ref that names no dump is NotFound, unless ``missing(ref)`` says the caller
    accounts for it (collect: a dump collected before, gone from the node since;
    rm: nothing left to delete for that ref)."""
    for ref in refs:
        check_ref(ref)
    items = list_dumps(transport, dump_path=dump_path, kata_config=kata_config, index=index)
    if not refs:
        return items
    out: list[dict] = []
    seen: set[str] = set()
    for ref in refs:
        hit = match_ref(items, ref)
        if not hit and missing is not None and missing(ref):
            continue
        if not hit:
            raise NotFound(f"no vmcore matches {ref!r} on node {transport.node}",
                           hint="see 'katactl vmcore list'")
        for i in hit:
            if i["path"] not in seen:
                seen.add(i["path"])
                out.append(i)
    return out


# ---------------------------------------------------------------------------
# removing
# ---------------------------------------------------------------------------
def remove_dumps(transport: NodeTransport, dumps: list[dict], *, dry_run: bool = False,
                 force: bool = False) -> list[dict]:
    """Delete dumps (and their sandbox dir once no dump is left in it).

    An incomplete dump is refused (Refused) unless ``force``: QEMU may still be writing it
    (``trigger --detach``, a panic dump), and then unlinking it frees nothing until QEMU
    closes the file, while its sandbox directory (metadata, state/) is gone already.
    Each deletion (and each failed or refused one) is recorded in the audit log
    (``vmcore.rm``); a dry run records nothing."""
    from katactl import audit

    for d in dumps:
        # a directory (a FIFO...) named like a dump is no dump: checked before any deletion, so
        # that --dry-run says what the real run does (its unlink failed with the host-root path)
        bad: KatactlError | None = None
        if d.get("status") == "not-regular":
            bad = OperationFailed(f"{d['path']} on node {transport.node}: {d.get('problem') or 'not a regular file'}"
                                  ": not a dump, katactl removes dumps only")
        elif d.get("status") == "incomplete" and not force:
            bad = Refused(f"{d['path']} on node {transport.node}: the dump is incomplete: still being written "
                          "(its space is freed only once the hypervisor closes it), or cut short",
                          hint="wait for it to finish (katactl vmcore list shows its status), "
                               "or pass --force to delete it anyway")
        if bad is not None:
            if not dry_run:
                audit.record("vmcore.rm", d["name"], node=transport.node, params={"path": d["path"]},
                             result="error", changed=False, error=bad.message)
            raise bad
    out = []
    for d in dumps:
        item = {"name": d["name"], "path": d["path"], "size": d.get("size"), "collected": d.get("collected")}
        if dry_run:
            out.append({**item, "changed": True, "dryRun": True})
            continue
        try:
            transport.remove(d["path"])
        except FileNotFoundError:
            audit.record("vmcore.rm", d["name"], node=transport.node, params={"path": d["path"]}, changed=False)
            out.append({**item, "changed": False})
            continue
        except Exception as e:
            audit.record("vmcore.rm", d["name"], node=transport.node, params={"path": d["path"]},
                         result="error", changed=False, error=as_katactl_error(e).message)
            raise
        sdir = posixpath.dirname(d["path"])
        try:
            rest = [n for n in transport.listdir(sdir) if DUMP_RE.fullmatch(n)]
            if not rest:
                transport.remove(sdir, recursive=True)
                item["removedDir"] = sdir
        except OSError:
            pass
        audit.record("vmcore.rm", d["name"], node=transport.node, params={"path": d["path"]}, changed=True,
                     **({"removedDir": item["removedDir"]} if "removedDir" in item else {}))
        out.append({**item, "changed": True})
    return out
