"""Taking dumps: the runtime's panic handler (:func:`runtime_panic_dump`, the
lab calls it on ``GUEST_PANICKED``) and on-demand triggers (:func:`trigger`:
shim extension, Cloud Hypervisor, QEMU), both into the runtime's layout.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import stat
import time
from typing import Callable

from katactl import sandbox as sbmod
from katactl.errors import (Interrupted, KatactlError, OperationFailed, ProtocolError, Refused, TimeoutExpired,
                            UsageError, as_katactl_error)
from katactl.sandbox import GO_SBS, GO_VM
from katactl.backends import shape
from katactl.vmcore.dumps import RS_NO_PANIC_DUMP, check_abs, dump_config, dump_name, node_zone, read_json, real_path
from katactl.backends.base import NodeTransport

FORMATS = ("elf", "kdump-zlib")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _copy_tree(transport: NodeTransport, src: str, dst: str) -> None:
    """Copy a node directory into another node directory (regular files and dirs only):
    one batched walk and one batched read of the (small) state files; a write each."""
    transport.mkdir(dst, 0o755)
    entries = transport.walk(src)
    regular = [p for p, st in entries if stat.S_ISREG(st.mode)]
    got = transport.read_many(regular)
    base = src.rstrip("/")
    for p, st in entries:
        d = dst + p[len(base):]
        if st.is_dir:
            transport.mkdir(d, 0o755)
        elif p in got:
            data = got[p]
            if isinstance(data, FileNotFoundError):
                continue  # removed meanwhile
            if isinstance(data, OSError):
                raise data
            transport.write_bytes_atomic(d, data, mode=st.mode & 0o777)


def _ensure_dirs(transport: NodeTransport, path: str, mode: int) -> None:
    """Go's os.MkdirAll(path, mode): each missing directory, not only the last, gets mode
    (a transport's mkdir -p gives the parents the default mode)."""
    missing = []
    p = path
    while p not in ("", "/") and not transport.is_dir(p):
        missing.append(p)
        p = posixpath.dirname(p)
    for p in reversed(missing):
        try:
            transport.mkdir(p, mode, parents=False)
        except FileExistsError:
            pass   # made meanwhile (a second dump of the sandbox): MkdirAll takes it as it is


def sandbox_persist(transport: NodeTransport, sandbox_id: str) -> dict:
    p = read_json(transport, f"{GO_SBS}/{sandbox_id}/persist.json")
    return p if isinstance(p, dict) else {}


def prepare_dump_dir(transport: NodeTransport, sandbox_id: str, dump_path: str, *, persist: dict | None = None,
                     hypervisor_path: str | None = None) -> tuple[str, dict]:
    """Steps 1-2 of the runtime's handler: <dump_path>/<id>/ with state/, hypervisor.conf,
    hypervisor.version. Returns (dir, persist)."""
    _check_sandbox_id(sandbox_id)
    persist = persist if persist is not None else sandbox_persist(transport, sandbox_id)
    d = f"{dump_path}/{sandbox_id}"
    # virtcontainers/qemu.go dumpGuestMemory: EnsureDir(<dir>/state, DirMode), that is
    # os.MkdirAll(path, 0750) (src/runtime/pkg/utils/utils.go EnsureDir; virtcontainers
    # DirMode): every directory it creates, <dir> and a missing dump path too, is 0750
    _ensure_dirs(transport, f"{d}/state", 0o750)
    src_state = f"{GO_SBS}/{sandbox_id}"
    if transport.is_dir(src_state):
        # then dumpSandboxMetaInfo runs `/bin/cp -ar /run/vc/sbs/<id> <dir>/state`: the target
        # exists, so the copy lands in <dir>/state/<id>/ (persist.json there)
        copied = False
        try:
            r = transport.run(["/bin/cp", "-ar", real_path(transport, src_state), real_path(transport, f"{d}/state")],
                              timeout=120)
            copied = r.returncode == 0
        except (OSError, KatactlError):
            pass
        if not copied:
            _copy_tree(transport, src_state, f"{d}/state/{sandbox_id}")
    # the runtime writes json.MarshalIndent(q.config, "", " "): its whole in-memory
    # HypervisorConfig; persist.json's copy lacks the fields only the configuration holds
    hvconf = dict(((persist.get("Config") or {}).get("HypervisorConfig")) or {})
    hvconf.setdefault("GuestMemoryDumpPath", dump_path)
    transport.write_bytes_atomic(f"{d}/hypervisor.conf", json.dumps(hvconf, indent=1).encode(), mode=0o644)
    exe = hypervisor_path or hvconf.get("HypervisorPath") or "qemu-system-x86_64"
    version = b""
    try:
        r = transport.run([exe, "--version"], timeout=30)
        if r.returncode == 0:
            version = r.stdout
    except (OSError, KatactlError):
        pass
    if not version and exe != "qemu-system-x86_64":
        try:
            r = transport.run(["qemu-system-x86_64", "--version"], timeout=30)
            version = r.stdout if r.returncode == 0 else b""
        except (OSError, KatactlError):
            pass
    transport.write_bytes_atomic(f"{d}/hypervisor.version", version, mode=0o644)
    return d, persist


def required_free(memory_bytes: int) -> int:
    return 2 * memory_bytes


def guest_memory_bytes(persist: dict, qmp_client=None) -> int:
    """default_memory + hotplugged memory, as the runtime counts it (MiB in persist.json)."""
    hv = ((persist.get("Config") or {}).get("HypervisorConfig")) or {}
    mem = int(hv.get("MemorySize") or 0)
    hot = int((persist.get("HypervisorState") or {}).get("HotpluggedMemory") or 0)
    if mem:
        return (mem + hot) << 20
    if qmp_client is not None:
        what = f"{qmp_client.path}: QMP query-memory-size-summary"
        s = shape.obj(qmp_client.execute("query-memory-size-summary"), what)
        return shape.integer(s.get("base-memory"), what, "base-memory") \
            + (shape.opt_integer(s.get("plugged-memory"), what, "plugged-memory") or 0)
    return 0


def check_free_space(transport: NodeTransport, d: str, memory_bytes: int) -> None:
    free = transport.statvfs_free(d)
    need = required_free(memory_bytes)
    if free < need:
        raise Refused(f"{d}: {free} bytes free, a dump needs 2 x guest memory = {need} (the runtime's rule)",
                      hint="free space under guest_memory_dump_path first")


def _existing_ancestor(transport: NodeTransport, path: str) -> str:
    """``path`` or its nearest existing ancestor (what statvfs can ask before mkdir)."""
    p = path
    while p not in ("", "/") and not transport.exists(p):
        p = posixpath.dirname(p)
    return p or "/"


def check_space_first(transport: NodeTransport, d: str, memory_bytes: int) -> None:
    """Before anything is created under ``d``, in the dry run as in the run: the part of ``d``
    that exists is a directory (a regular file there fails the run's mkdir, and statvfs on it
    would answer for the file's filesystem), and the runtime's 2 x guest memory rule (a
    refusal leaves no directory behind; nothing to check when the guest's memory is unknown)."""
    base = _existing_ancestor(transport, d)
    if not transport.is_dir(base):
        raise OperationFailed(f"{d}: Not a directory ({base} is not a directory)")
    if memory_bytes:
        check_free_space(transport, base, memory_bytes)


def _node_named(transport: NodeTransport, e: BaseException) -> BaseException:
    """``e`` naming the node's path where LocalTransport under --host-root named this host's
    (``host_root + path``): vmcore's messages and audit records name node paths."""
    root = getattr(transport, "host_root", "")
    if not (isinstance(e, OSError) and root and root != "/"):
        return e
    names = [n[len(root):] if isinstance(n, str) and n.startswith(root + "/") else n
             for n in (e.filename, e.filename2)]
    if names == [e.filename, e.filename2]:
        return e
    return type(e)(e.errno, e.strerror, names[0], None, names[1])


class _DumpDirGuard:
    """What one trigger adds under ``<dump_path>/<id>/`` (the directory and its
    parents when new; else the entries it adds, state/ copies included), removed
    again when the dump fails. Once the hypervisor is writing (``started``), a
    timeout or an interrupt leaves it: the dump goes on without us."""

    def __init__(self, transport: NodeTransport, d: str):
        self.t, self.d = transport, d
        self.top = None  # the first directory this trigger creates
        p = d
        while p not in ("", "/") and not transport.exists(p):
            self.top, p = p, posixpath.dirname(p)
        self.before = set() if self.top else set(transport.listdir(d))
        st = f"{d}/state"
        self.state_before = set(transport.listdir(st)) if not self.top and transport.is_dir(st) else None
        self.started = False

    def __enter__(self):
        from katactl import audit

        audit.changing()  # the trigger's first change: its "requested" entry goes first
        return self

    def __exit__(self, typ, exc, tb):
        from katactl.errors import Interrupted, TimeoutExpired

        if exc is None:
            return False
        if self.started and isinstance(exc, (TimeoutExpired, Interrupted, KeyboardInterrupt, DumpGoesOn)):
            return False
        try:
            if self.top:
                self.t.remove(self.top, recursive=True)
                return False
            for n in set(self.t.listdir(self.d)) - self.before:
                self.t.remove(f"{self.d}/{n}", recursive=True)
            if self.state_before is not None:
                for n in set(self.t.listdir(f"{self.d}/state")) - self.state_before:
                    self.t.remove(f"{self.d}/state/{n}", recursive=True)
        except (OSError, KatactlError):
            pass  # the failure itself is what the user needs to read
        return False


def runtime_panic_dump(transport: NodeTransport, sandbox, qmp_client, dump_path: str, paging: bool = False, *,
                       timeout: float = 3600.0) -> str:
    """Play the Go runtime's GUEST_PANICKED handler (kata-node.md steps 1-4).

    sandbox: a sandbox id (or an object with ``.id``). qmp_client: a connected
    :class:`katactl.backends.qmp.QMPClient` (the caller's, e.g. the lab
    daemon's reader-thread client). Returns the dump's node path. Raises
    Refused when the filesystem lacks 2 x guest memory (the runtime logs and
    skips the dump then).
    """
    sandbox_id = getattr(sandbox, "id", None) or getattr(sandbox, "sandbox_id", None) or str(sandbox)
    check_abs(dump_path, "dump_path")
    d, persist = prepare_dump_dir(transport, sandbox_id, posixpath.normpath(dump_path))
    check_free_space(transport, d, guest_memory_bytes(persist, qmp_client))
    path = f"{d}/{dump_name('elf', tz=node_zone(transport))}"
    qmp_client.execute("dump-guest-memory", {"paging": bool(paging), "protocol": "file:" + real_path(transport, path),
                                             "format": "elf"}, timeout=timeout)
    return path


def _check_sandbox_id(sid: str) -> None:
    if not isinstance(sid, str) or not _ID_RE.fullmatch(sid):
        raise UsageError(f"invalid sandbox id {sid!r}")


@dataclasses.dataclass
class TriggerOptions:
    format: str = "elf"
    detach: bool = False
    paging: bool | None = None
    dump_path: str | None = None
    kata_config: str | None = None
    dry_run: bool = False
    timeout: float = 3600.0
    progress: Callable[[int, int], None] | None = None
    poll: float = 0.2


def trigger(transport: NodeTransport, ref, opts: TriggerOptions) -> dict:
    """An on-demand dump of a live sandbox into Kata's layout.

    ref: a sandbox reference (id, prefix, NAMESPACE/POD) or a resolved
    katactl.sandbox.Sandbox. Paths tried, in order: the shim extension
    (``/ext/v1/capabilities`` lists ``vmcore``), Cloud Hypervisor
    ``PUT /vm.coredump`` (when ``vmm.ping`` lists ``guest_debug``), QEMU
    ``dump-guest-memory`` on ``extra-monitor.sock`` then ``qmp.sock``
    (progress from ``query-dump``).

    Not idempotent by design: every call takes a new dump (the guest pauses
    while the hypervisor writes it). Each dump, and each failed or interrupted
    attempt, is recorded in the audit log (``vmcore.trigger``: ``requested`` before
    its first change, then the outcome); a dry run and a usage error record nothing.
    """
    from katactl import audit

    if opts.format not in FORMATS:
        raise UsageError(f"invalid --format {opts.format!r} (choose {', '.join(FORMATS)})")
    if opts.dump_path is not None:
        check_abs(opts.dump_path, "--dump-path")
    sb = sbmod.as_sandbox(transport, ref)
    params = {"format": opts.format, "detach": opts.detach, "paging": opts.paging,
              "dumpPath": opts.dump_path}
    # "requested" before the dump directory and the dump request (_DumpDirGuard): a kill -9
    # meanwhile leaves the dump logged
    try:
        try:
            with audit.intent("vmcore.trigger", sb.id, node=transport.node, params=params, dry_run=opts.dry_run):
                r = _trigger(transport, sb, opts)
        except OSError as e:
            named = _node_named(transport, e)
            if named is e:
                raise
            raise named from None
    except UsageError:
        raise
    except BaseException as e:
        if isinstance(e, DumpGoesOn):
            # stopped waiting, not the dump: the file is being written, the guest paused meanwhile
            audit.record_unfinished("vmcore.trigger", sb.id, node=transport.node, params=params, exc=e, sent=True,
                                    result="timeout" if isinstance(e, TimeoutExpired) else None,
                                    changed=True, dump=e.details["path"], via=e.details.get("via"))
        elif not opts.dry_run:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else as_katactl_error(e).message
            audit.record("vmcore.trigger", sb.id, node=transport.node, params=params, result="error",
                         changed=False, error=why)
        raise
    if not r.get("dryRun"):
        audit.record("vmcore.trigger", sb.id, node=transport.node, params=params, changed=True,
                     dump=r.get("path"), via=r.get("via"), status=r.get("status"))
    return r


def _trigger(transport: NodeTransport, sb, opts: TriggerOptions) -> dict:
    sid = sb.id
    kc = sb.kata_config or {}
    # the configuration this sandbox's runtime read (not the node's default search: on a
    # kata-deploy node each runtime handler has its own file and config.d)
    kata_config = opts.kata_config if opts.kata_config is not None else (
        kc.get("path") if sb.runtime == "go" and not kc.get("error") else None)
    cfg = dump_config(transport, dump_path=opts.dump_path if opts.dump_path is not None
                      else (sb.guest_memory_dump_path or None),
                      kata_config=kata_config)
    persist = sb.raw if (sb.runtime == "go" and isinstance(sb.raw, dict)) else sandbox_persist(transport, sid)
    hv_type = sb.hypervisor or cfg.hypervisor or "qemu"
    paging = cfg.paging if opts.paging is None else opts.paging
    if opts.format != "elf" and paging:
        raise UsageError("kdump formats do not support paging (QEMU refuses it)")
    d = f"{cfg.dump_path}/{sid}"
    path = f"{d}/{dump_name(opts.format, tz=node_zone(transport))}"
    result = {"sandbox": sid, "pod": sb.pod, "podRef": sb.pod_ref, "path": path, "format": opts.format, "hypervisor": hv_type,
              "detached": opts.detach}
    if sb.runtime == "rs":
        result["note"] = f"{RS_NO_PANIC_DUMP}; this dump is katactl's own"
    mem = (sb.total_memory_mib or 0) << 20 or guest_memory_bytes(persist)
    reasons: list[str] = []
    # 1. the shim extension
    shim = _shim_ext(transport, sb.shim_socket) if sb.shim_socket else None
    if shim is not None and "vmcore" in shim["capabilities"]:
        result["via"] = "shim-extension"
        check_space_first(transport, d, mem)
        if opts.dry_run:
            return {**result, "changed": True, "dryRun": True}
        # the metadata the runtime writes, then the shim dumps
        with _DumpDirGuard(transport, d) as guard:
            prepare_dump_dir(transport, sid, cfg.dump_path, persist=persist, hypervisor_path=sb.hypervisor_path)
            guard.started = True
            # the shim names the file itself (docs/shim-extension.md): katactl knows its directory
            names = f"{d}/vmcore-*{posixpath.splitext(path)[1]}"
            return {**result, **_trigger_shim(transport, shim, sid, opts, paging, names), "changed": True}
    reasons.append("the shim does not offer the vmcore extension" if shim is not None
                   else "no shim extension (/ext/v1/capabilities)")
    if hv_type in ("clh", "cloud-hypervisor", "cloud_hypervisor"):
        sock = sb.api_socket or f"{GO_VM}/{sid}/clh-api.sock"
        if opts.format != "elf":
            raise UsageError("Cloud Hypervisor writes ELF dumps only (--format elf)")
        result["via"] = "clh"
        return _trigger_clh(transport, sock, sid, d, path, persist, mem, opts, result)
    if hv_type != "qemu":
        raise OperationFailed(f"{hv_type} has no guest memory dump API ({'; '.join(reasons)})",
                              hint="Firecracker only offers full snapshots")
    socks = [x for x in (sb.extra_monitor_socket, f"{GO_VM}/{sid}/extra-monitor.sock", sb.api_socket,
                         f"{GO_VM}/{sid}/qmp.sock") if x]
    return _trigger_qemu(transport, sid, d, path, persist, mem, paging, opts, result, reasons,
                         list(dict.fromkeys(socks)))


def _shim_ext(transport: NodeTransport, sock: str) -> dict | None:
    """The shim's extension capabilities ({socket, capabilities, raw}); None without one."""
    from katactl.backends.shim import ShimClient

    if not transport.exists(sock):
        return None
    try:
        with ShimClient(transport, sock, timeout=5.0) as c:
            body = c.capabilities()
    except KatactlError:
        return None
    if body is None:
        return None
    caps = body.get("features") or body.get("capabilities")
    if isinstance(caps, dict):
        caps = [k for k, v in caps.items() if v]
    if not isinstance(caps, list):
        return None
    return {"socket": sock, "capabilities": [str(c) for c in caps], "raw": body}


def _trigger_shim(transport: NodeTransport, shim: dict, sid: str, opts: TriggerOptions, paging: bool,
                  names: str) -> dict:
    from katactl.backends.shim import ShimClient

    body = json.dumps({"format": opts.format, "paging": paging}).encode()
    try:
        with ShimClient(transport, shim["socket"], timeout=opts.timeout, sandbox_id=sid) as c:
            status, raw = c.call("POST", "/ext/v1/vmcore", content=body,
                                 headers={"Content-Type": "application/json"})
    except (KeyboardInterrupt, Interrupted, TimeoutExpired, ProtocolError) as e:
        # the POST may have reached the shim: its dump goes on (the extension has no cancel),
        # pausing a running guest until it ends, into a file matching ``names``; an answer
        # katactl cannot read (a broken HTTP exchange) says no more of the dump than no answer
        raise _goes_on(e, names, "shim-extension", False, None, who="the shim") from None
    try:
        d = json.loads(raw)
    except ValueError:
        d = {}
    msg = ((d.get("error") or {}).get("message") if isinstance(d, dict) else None) \
        or raw.decode("utf-8", "replace").strip()[:300]
    if status in (409, 507):
        raise Refused(f"the shim refused the dump: {msg}")
    if status >= 300:
        raise OperationFailed(f"shim vmcore dump failed: HTTP {status}: {msg}")
    if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not d["path"]:
        # a success without the file's name: the shim wrote the dump (the POST is synchronous,
        # docs/shim-extension.md), so its directory stays and the audit names the pattern
        raise _UnreadableDump(f"shim vmcore dump: the shim answered {status} but the answer names no dump "
                              f"path: its dump is in {names}",
                              hint="katactl vmcore list shows it",
                              details={"path": names, "via": "shim-extension", "acknowledged": True,
                                       "pausedByDump": None})
    return {"path": d["path"], "size": d.get("bytes"), "status": "completed"}


def _trigger_clh(transport: NodeTransport, sock, sid, d, path, persist, mem, opts, result) -> dict:
    from katactl.backends.clh import ClhClient

    with ClhClient(transport, sock, opts.timeout) as c:
        feats = (c.ping() or {}).get("features") or []
        if "guest_debug" not in feats:
            raise OperationFailed("this Cloud Hypervisor build has no guest_debug feature (vmm.ping features: "
                                  + (",".join(feats) or "none") + "): vm.coredump is unavailable",
                                  hint="use a cloud-hypervisor built with --features guest_debug (x86_64)")
        check_space_first(transport, d, mem)
        if opts.dry_run:
            return {**result, "changed": True, "dryRun": True}
        with _DumpDirGuard(transport, d) as guard:
            prepare_dump_dir(transport, sid, posixpath.dirname(d), persist=persist)
            guard.started = True
            try:
                c.coredump(real_path(transport, path))
            except (KeyboardInterrupt, Interrupted, TimeoutExpired, ProtocolError) as e:
                # the PUT may have reached it: Cloud Hypervisor pauses a running guest, writes the
                # whole dump and resumes it, whoever waits (vmm/src/vm.rs GuestDebuggable::coredump);
                # an unreadable answer leaves the dump as unknown as no answer
                raise _goes_on(e, path, "clh", False, None, who="Cloud Hypervisor") from None
    return {**result, "status": "completed", "changed": True}


class DumpGoesOn(KatactlError):
    """The wait for a dump stopped (Ctrl-C, SIGTERM, --timeout), the dump did not:
    ``details.path`` is the file the hypervisor goes on writing. Raised as the
    :class:`Interrupted` or :class:`TimeoutExpired` it stands for (exit 130 or 6)."""


class _InterruptedDump(DumpGoesOn, Interrupted):
    pass


class _TimedOutDump(DumpGoesOn, TimeoutExpired):
    pass


class _UnreadableDump(DumpGoesOn, ProtocolError):
    """The monitor's answer could not be read once the dump may have started: katactl stops
    following it, QEMU does not."""


def _goes_on(e: BaseException, path: str, via: str, accepted: bool, running: bool | None, *,
             who: str = "QEMU") -> DumpGoesOn:
    """The error of a wait stopped while ``who`` dumps: where the file goes, and that a guest that
    was running stays paused until the dump ends (QEMU resumes it then: dump_cleanup)."""
    head = e.message if isinstance(e, (TimeoutExpired, ProtocolError)) else "interrupted"
    cls = _TimedOutDump if isinstance(e, TimeoutExpired) else _UnreadableDump if isinstance(e, ProtocolError) \
        else _InterruptedDump
    paused = {True: "the guest stays paused until it is finished", False: "",
              None: "a running guest stays paused until it is finished"}[running]
    if accepted:
        msg = f"{head}: {who} goes on writing the dump into {path}" + (f"; {paused}" if paused else "")
    else:
        # a timeout's own message says no answer came; an interrupt's does not
        msg = (f"{head}{f' before {who} answered: it' if cls is _InterruptedDump else f': {who}'} may be writing "
               f"the dump into {path}" + (f"; if so, {paused}" if paused else ""))
    return cls(msg, hint=f"katactl vmcore list shows the dump incomplete until {who} has finished it",
               details={"path": path, "via": via, "acknowledged": accepted, "pausedByDump": running})


def _dump_formats(client) -> list[str]:
    """query-dump-guest-memory-capability's formats (qapi/dump.json DumpGuestMemoryCapability)."""
    what = f"{client.path}: QMP query-dump-guest-memory-capability"
    formats = shape.obj(client.execute("query-dump-guest-memory-capability"), what).get("formats")
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise ProtocolError(f"{what}: formats is not a list of strings")
    return formats


def _query_dump(client) -> dict:
    """query-dump's answer (qapi/dump.json DumpQueryResult: status, completed, total)."""
    what = f"{client.path}: QMP query-dump"
    st = shape.obj(client.execute("query-dump"), what)
    status = st.get("status")
    if not isinstance(status, str):
        raise ProtocolError(f"{what}: status is {type(status).__name__}, not a string")
    return {"status": status, "completed": shape.opt_integer(st.get("completed"), what, "completed") or 0,
            "total": shape.opt_integer(st.get("total"), what, "total") or 0}


def _trigger_qemu(transport: NodeTransport, sid, d, path, persist, mem, paging, opts, result, reasons, socks) -> dict:
    from katactl.backends.qmp import MonitorBusy, QMPClient

    client = None
    tried = []
    for sock in socks:
        if not transport.exists(sock):
            continue
        try:
            # each call is a request (--request-timeout); --timeout is the wait for the dump
            client = QMPClient.connect(transport, sock, timeout=transport.timeout)
            result["via"] = "qmp:" + posixpath.basename(sock)
            break
        except MonitorBusy:
            tried.append(f"{posixpath.basename(sock)} is held by another client (the Kata runtime)")
        except KatactlError as e:
            tried.append(f"{posixpath.basename(sock)}: {e.message}")
    if client is None:
        raise Refused("cannot reach the QEMU monitor of sandbox " + sid[:12] + ": "
                      + "; ".join(reasons + (tried or ["no qmp.sock or extra-monitor.sock"])),
                      hint="offer the shim extension (docs/shim-extension.md) or set "
                           "extra_monitor_socket in [hypervisor.qemu]")
    with client:
        if not mem:
            mem = guest_memory_bytes(persist, client)
        formats = _dump_formats(client)
        if opts.format not in formats:
            raise OperationFailed(f"this QEMU cannot write {opts.format} dumps (it offers "
                                  + ", ".join(formats) + ")")
        if _query_dump(client)["status"] == "active":
            raise Refused(f"sandbox {sid[:12]}: a dump is already in progress")
        check_space_first(transport, d, mem)
        if opts.dry_run:
            return {**result, "changed": True, "dryRun": True}
        with _DumpDirGuard(transport, d) as guard:
            prepare_dump_dir(transport, sid, posixpath.dirname(d), persist=persist)
            client.events()  # forget old events: DUMP_COMPLETED below must be ours
            args = {"paging": bool(paging), "protocol": "file:" + real_path(transport, path),
                    "format": opts.format, "detach": True}
            # Once the command may have reached QEMU, the dump is its own: it opens the file and
            # pauses a running guest (dump/dump.c qmp_dump_guest_memory, dump_init:
            # vm_stop(RUN_STATE_SAVE_VM)) until the dump ends (dump_cleanup: vm_start), and
            # qapi/dump.json has no command that cancels it. Stopping our wait (Ctrl-C, SIGTERM,
            # --timeout) stops neither: the directory stays, and the error says so.
            try:
                running = bool(shape.obj(client.execute("query-status"), f"{client.path}: QMP query-status").get("running"))
            except KatactlError:
                running = None      # unknown: the error says what a running guest does
            guard.started = True
            accepted = False
            try:
                # detached, QEMU answers once dump_init is done (longer with paging on a big guest)
                client.execute("dump-guest-memory", args, timeout=max(transport.timeout, opts.timeout))
                accepted = True
                if opts.detach:
                    return {**result, "status": "active", "changed": True}
                deadline = time.monotonic() + opts.timeout
                while True:
                    st = _query_dump(client)
                    if opts.progress and st["total"]:
                        opts.progress(st["completed"], st["total"])
                    if st["status"] == "completed":
                        break
                    if st["status"] == "failed":
                        ev = [e for e in client.events() if e.get("event") == "DUMP_COMPLETED"]
                        data = ev[-1].get("data") if ev else None
                        why = data.get("error") if isinstance(data, dict) else None
                        why = why if isinstance(why, str) else None
                        raise OperationFailed(f"QEMU dump failed{': ' + why if why else ''}")
                    if time.monotonic() > deadline:
                        raise TimeoutExpired(f"dump not finished within {opts.timeout:g}s")
                    time.sleep(opts.poll)
            except (KeyboardInterrupt, Interrupted, TimeoutExpired, ProtocolError) as e:
                # an unreadable answer (the dump-guest-memory reply, a query-dump) leaves the
                # dump as unknown as a stopped wait does: its directory must not be removed
                raise _goes_on(e, path, result["via"], accepted, running) from None
    try:
        size = transport.stat(path).size
    except OSError:
        size = None
    return {**result, "status": "completed", "size": size, "changed": True}
