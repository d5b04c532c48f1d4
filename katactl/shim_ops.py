"""Operations on the upstream shim endpoints: agent-url, iptables get/set,
direct-volume stats/resize, pprof download.

Library only (design.md "Architecture"): each function takes a transport and a
sandbox (or a reference to one on that node), validates its input, talks to
the shim, and returns a plain dict naming the node and the sandbox. Nothing
prints; the CLI renders.

The mutating ones (iptables set, volume resize) read the current state, change
only what differs, append to the audit log (a change, a no-op and a failure
alike: an attempted mutation that failed is audited with ``result: "error"``, one
cut short by Ctrl-C, SIGTERM or SIGHUP with ``result: "interrupted"``) and report
``changed`` and ``dryRun``.
"""
from __future__ import annotations

import errno

import os
import re
import stat
from typing import BinaryIO, TextIO

from katactl.backends.shim import IPTABLES_LIMIT, PPROF_PROFILES, ShimClient
from katactl.errors import NotFound, OperationFailed, ProtocolError, UsageError
from katactl.values import format_size
from katactl.backends.base import NodeTransport

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def _sandbox(transport: NodeTransport, ref):
    """A Sandbox as given (e.g. by katactl.sandbox.on_sandbox), or resolved (live-checked) from a reference."""
    from katactl import sandbox

    return sandbox.as_sandbox(transport, ref, check=True)


# -- agent-url ---------------------------------------------------------------------------
def agent_url(transport: NodeTransport, sandbox, *, timeout: float = 10.0) -> dict:
    """The kata-agent URL the shim talks to (``vsock://CID:1024``, ``hvsock://...``)."""
    sandbox = _sandbox(transport, sandbox)
    with ShimClient.for_sandbox(transport, sandbox, timeout=timeout) as c:
        url = c.agent_url()
    return {"node": transport.node, "sandbox": sandbox.id, "agentURL": url}


# -- iptables --------------------------------------------------------------------------
def read_rules(source: str, stdin: BinaryIO | TextIO | None = None, *, limit: int = IPTABLES_LIMIT) -> bytes:
    """The bytes of FILE (or of ``stdin`` when source is ``-``), at most ``limit``.

    Reads at most limit+1 bytes (or characters, from a text stream): anything
    larger is refused, never truncated."""
    if not isinstance(source, str) or not source.strip():
        raise UsageError("empty FILE: give an iptables-save file, or - for standard input")
    name = "stdin" if source == "-" else source
    try:
        if source == "-":
            if stdin is None:
                raise UsageError("no standard input to read rules from")
            data = stdin.read(limit + 1)
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogateescape")
        else:
            with open(source, "rb") as f:
                data = f.read(limit + 1)
    except IsADirectoryError:
        raise UsageError(f"{name}: is a directory, not an iptables-save file") from None
    except OSError as e:
        raise UsageError(f"{name}: {e.strerror or e}") from None
    if len(data) > limit:
        raise UsageError(f"{name}: more than the {limit / (1 << 20):g} MiB limit for iptables rules "
                         "(the shim API carries the whole ruleset in one request)")
    return data


def validate_rules(data: bytes | str, source: str = "rules", *, limit: int = IPTABLES_LIMIT) -> str:
    """iptables-save text: at most ``limit`` bytes, UTF-8, a ``*table`` line and ``COMMIT``, no NUL."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > limit:
        raise UsageError(f"{source}: more than the {limit / (1 << 20):g} MiB limit for iptables rules")
    if not data.strip():
        raise UsageError(f"{source}: empty rules (an iptables-save dump has '*filter' ... 'COMMIT')")
    if b"\0" in data:
        raise UsageError(f"{source}: contains NUL bytes; not iptables-save text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines()]
    if not any(ln.startswith("*") for ln in lines) or "COMMIT" not in lines:
        raise UsageError(f"{source}: not iptables-save text (needs a '*table' line and 'COMMIT')")
    return text


def normalize_rules(text: str) -> list[str]:
    """The rules without what iptables-save adds on every dump (comment lines
    with timestamps, chain packet/byte counters), for comparison."""
    out = []
    for ln in text.splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        out.append(_COUNTERS.sub("[0:0]", ln))
    return out


def iptables_get(transport: NodeTransport, sandbox, *, v6: bool = False, timeout: float = 10.0) -> dict:
    """The guest's (ip6)tables rules as iptables-save text (``rules``), as the shim sent it."""
    sandbox = _sandbox(transport, sandbox)
    with ShimClient.for_sandbox(transport, sandbox, timeout=timeout) as c:
        rules = c.iptables_get(v6)
    return {"node": transport.node, "sandbox": sandbox.id, "v6": v6, "rules": rules}


def iptables_set(transport: NodeTransport, sandbox, rules: bytes | str, *, v6: bool = False, dry_run: bool = False,
                 timeout: float = 10.0, source: str = "rules") -> dict:
    """Make the guest's (ip6)tables exactly ``rules``; send nothing when they already are.

    ``sandbox`` is a Sandbox or a reference (id, unique prefix) on ``transport``'s node."""
    from katactl import audit

    text = validate_rules(rules, source)
    if not dry_run:
        audit.require_writable()  # no untraceable change (exit 5 unless --no-audit)
    sandbox = _sandbox(transport, sandbox)
    node = transport.node
    action = "shim.iptables.set"  # params carry v6
    params = {"v6": v6, "bytes": len(text.encode("utf-8"))}
    result = {"node": node, "sandbox": sandbox.id, "v6": v6, "bytes": params["bytes"]}
    sent = False
    try:
        with ShimClient.for_sandbox(transport, sandbox, timeout=timeout) as c:
            changed = normalize_rules(c.iptables_get(v6)) != normalize_rules(text)
            if changed and not dry_run:
                sent = True
                # before the request: a change that lands is in the log whatever ends this run
                audit.record(action, sandbox.id, node=node, params=params, result="requested", requestSent=True)
                c.iptables_set(text, v6)
    except BaseException as e:
        if not dry_run:
            audit.record_unfinished(action, sandbox.id, node=node, params=params, exc=e, sent=sent)
        raise
    if not dry_run:
        audit.record(action, sandbox.id, node=node, params=params, changed=changed)
    return {**result, "changed": changed, "dryRun": dry_run}


# -- direct volumes ----------------------------------------------------------------------
def check_volume_path(path: str) -> str:
    if not path or "\0" in path or not path.startswith("/"):
        raise UsageError(f"invalid volume path {path!r}: expected an absolute path")
    return path


#: where ``kata-runtime``/``kata-ctl direct-volume add`` register a volume (both runtimes)
DIRECT_VOLUMES = "/run/kata-containers/shared/direct-volumes"
#: mountInfo.json's limit: a few hundred bytes of JSON
_MOUNT_INFO_LIMIT = 1 << 20


def direct_volume_dirs(path: str, flavour: str = "go") -> list[str]:
    """The node directories that may register host volume ``path``, the sandbox runtime's own first.

    The Go runtime names it ``base64.URLEncoding(path)`` (src/runtime/pkg/direct-volume/utils.go);
    runtime-rs and kata-ctl ``base64::encode(path)``, the standard alphabet, whose ``/`` makes
    subdirectories (src/libs/kata-types/src/mount.rs join_path). Both padded; for most paths the
    two names are the same."""
    import base64

    raw = path.encode("utf-8", "surrogateescape")
    names = [base64.urlsafe_b64encode(raw).decode(), base64.b64encode(raw).decode()]
    if flavour != "go":
        names.reverse()
    return [f"{DIRECT_VOLUMES}/{n}" for n in dict.fromkeys(names)]


def direct_volume_device(transport: NodeTransport, path: str, flavour: str = "go") -> str:
    """The device the shim knows host volume ``path`` by: ``device`` of its
    ``mountInfo.json``, read through the node's transport.

    Both runtimes' tools send that device, never the host path, to the shim's stats and
    resize endpoints (src/runtime/cmd/kata-runtime/kata-volume.go Stats/Resize,
    src/tools/kata-ctl/src/ops/volume_ops.rs stats/resize); the Go shim then finds the
    container mount whose Source is that device. NotFound (exit 3) when the volume is not
    registered on the node."""
    files = [f"{d}/mountInfo.json" for d in direct_volume_dirs(path, flavour)]
    got = transport.read_many(files, limit=_MOUNT_INFO_LIMIT)
    for f in files:
        data = got.get(f)
        if isinstance(data, bytes):
            break
        if isinstance(data, OSError) and not isinstance(data, (FileNotFoundError, NotADirectoryError)) \
                and data.errno != errno.ENAMETOOLONG:  # a long path's base64 name cannot be registered
            raise OperationFailed(f"direct volume {path}: cannot read {f}: {data.strerror or data}")
    else:
        raise NotFound(f"direct volume {path} is not registered on node {transport.node}: no {files[0]} "
                       "(kata-runtime direct-volume add writes it); VOLUME_PATH is the volume's path on "
                       "the host, as the CSI driver published it")
    import json

    try:
        info = json.loads(data)
    except ValueError:
        info = None
    device = info.get("device") if isinstance(info, dict) else None
    if not isinstance(device, str) or not device:
        raise ProtocolError(f"direct volume {path}: {f} has no device (not a mountInfo.json)")
    return device


#: the shim's usage units: the Go shim sends the CSI enum's number, runtime-rs its name
_UNITS = {0: "unknown", 1: "bytes", 2: "inodes", "UNKNOWN": "unknown", "BYTES": "bytes", "INODES": "inodes"}


def _unit(u: dict):
    """'bytes' or 'inodes' for a usage entry; an unknown unit as sent."""
    unit = u.get("unit")
    if isinstance(unit, (int, str)) and not isinstance(unit, bool):
        return _UNITS.get(unit, unit)
    return unit


def volume_stats(transport: NodeTransport, sandbox, path: str, *, timeout: float = 10.0) -> dict:
    """Usage of the direct volume published at host path ``path``, inside the guest:
    ``device`` is what the shim was asked about (see :func:`direct_volume_device`);
    ``usage`` is a list of {unit: "bytes"|"inodes", total, used, available};
    ``condition`` is the shim's volume_condition (or None)."""
    check_volume_path(path)
    sandbox = _sandbox(transport, sandbox)
    device = direct_volume_device(transport, path, sandbox.runtime)
    with ShimClient.for_sandbox(transport, sandbox, timeout=timeout) as c:
        st = c.volume_stats(device)
    usage = [{"unit": _unit(u), "total": u.get("total"), "used": u.get("used"), "available": u.get("available")}
             for u in st.get("usage") or [] if isinstance(u, dict)]
    return {"node": transport.node, "sandbox": sandbox.id, "path": path, "device": device,
            "condition": st.get("volume_condition"), "usage": usage}


def _fs_bytes_total(c: ShimClient, device: str) -> tuple[int | None, str | None]:
    """The guest filesystem's statfs total in bytes, or (None, why) when the shim
    cannot say. A timeout or an unreachable shim is not swallowed: the resize
    would meet the same fate."""
    try:
        st = c.volume_stats(device)
    except (OperationFailed, NotFound) as e:
        return None, e.message
    for u in st.get("usage") or []:
        if isinstance(u, dict) and _unit(u) == "bytes":
            total = u.get("total")
            if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
                return total, None
    return None, "the shim's volume statistics carry no byte usage"


def volume_resize(transport: NodeTransport, sandbox, path: str, size: int, *, dry_run: bool = False,
                  timeout: float = 10.0) -> dict:
    """Ask the guest to grow the filesystem on the direct volume published at host path
    ``path`` (translated to its device, :func:`direct_volume_device`) to a ``size``-byte device.

    Why "changed" is decided this way: the shim's direct-volume stats are the
    guest filesystem's statfs, never the block device's size, and a
    filesystem's total is always smaller than its device (ext4: inode tables,
    bitmaps and the journal, ~2-3%; XFS: its log). Comparing the total with
    ``size`` would call every finished resize unfinished, and any tolerance
    would hide real small grows. So:

    - statfs total >= size: the device cannot be smaller than its filesystem,
      so it is already at least ``size``; online resize only grows: nothing
      is sent (changed: false);
    - otherwise the resize is always sent (the shim call is idempotent for the
      same size) and changed is whether the observed total grew; when the
      totals cannot be read, changed is true (a change may have happened);
    - with dry_run, changed says whether the resize *would be sent*: the
      statistics cannot tell a finished resize from a pending one.
    """
    from katactl import audit

    check_volume_path(path)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise UsageError(f"invalid volume size {size!r}: must be a whole number of bytes greater than zero")
    if not dry_run:
        audit.require_writable()  # no untraceable change (exit 5 unless --no-audit)
    sandbox = _sandbox(transport, sandbox)
    node = transport.node
    params = {"path": path, "size": size}
    result = {"node": node, "sandbox": sandbox.id, "path": path, "size": size}
    notes: list[str] = []
    device = None
    sent = False
    try:
        device = direct_volume_device(transport, path, sandbox.runtime)
        result["device"] = device
        with ShimClient.for_sandbox(transport, sandbox, timeout=timeout) as c:
            before, why = _fs_bytes_total(c, device)
            if why:
                notes.append(f"filesystem size before unknown: {why}")
            after = before
            if before is not None and before >= size:
                notes.append(f"the guest filesystem already has {format_size(before)} >= {format_size(size)}; "
                             "online resize only grows")
                changed = False
            elif dry_run:
                changed = True
            else:
                sent = True
                audit.record("shim.volume.resize", sandbox.id, node=node, params=params, result="requested",
                             requestSent=True, device=device)  # before the request, as iptables_set
                c.volume_resize(device, size)
                after, why = _fs_bytes_total(c, device)
                if why:
                    notes.append(f"filesystem size after unknown: {why}")
                changed = before is None or after is None or after > before
    except BaseException as e:
        if not dry_run:
            audit.record_unfinished("shim.volume.resize", sandbox.id, node=node, params=params, exc=e, sent=sent,
                                    device=device)
        raise
    if not dry_run:
        audit.record("shim.volume.resize", sandbox.id, node=node, params=params, changed=changed,
                     sizeBefore=before, sizeAfter=after, device=device)
    return {**result, "sizeBefore": before, "sizeAfter": after, "notes": notes,
            "changed": changed, "dryRun": dry_run}


# -- pprof (Go shim only) ------------------------------------------------------------------
#: the profiles Go's net/http/pprof answers over ``seconds=N`` with a delta (the change over N
#: seconds, not a snapshot): src/net/http/pprof/pprof.go handler.ServeHTTP -> serveDeltaProfile,
#: its profileSupportsDelta map. The Go shim mounts pprof.Index for /debug/pprof/, which serves
#: every named profile through that handler (shim_management.go mountPprofHandle) and sets no
#: WriteTimeout, so any N is served. cmdline and symbol are handlers of their own, with no seconds.
PPROF_DELTA = ("heap", "allocs", "goroutine", "block", "mutex", "threadcreate")
#: the profiles --seconds applies to: profile and trace record for N seconds, the others are deltas
PPROF_TIMED = ("profile", "trace", *PPROF_DELTA)


def check_pprof_request(profile: str, seconds: int | None = None, dest=None) -> None:
    """Usage errors of a pprof download, found without contacting any node (a CPU
    profile would otherwise take --seconds to fail). ``dest`` as for pprof_download."""
    if profile not in PPROF_PROFILES:
        raise UsageError(f"unknown profile {profile!r} (choose from {', '.join(PPROF_PROFILES)})")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= 3600:
            raise UsageError(f"invalid --seconds {seconds}: expected 1..3600")
        if profile not in PPROF_TIMED:
            raise UsageError(f"--seconds does not apply to {profile!r} (it does to {', '.join(PPROF_TIMED)})")
    if isinstance(dest, (str, os.PathLike)):
        f = os.fspath(dest)
        if not f.strip():
            raise UsageError("-f needs a file name, got an empty string")
        d = os.path.dirname(os.path.abspath(f))
        if not os.path.isdir(d):
            raise UsageError(f"-f {f}: directory {d} does not exist")
        if f.endswith("/") or os.path.isdir(f):
            raise UsageError(f"-f {f}: is a directory; give a file name")
        _dest_kind(f)


#: what a non-regular -f target is, for the refusal
_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device"))


def _dest_kind(f: str) -> str | None:
    """'file' or 'chardev' for an existing -f target, None when there is none.

    A regular file is replaced atomically; a character device (/dev/null) is
    written in place, never replaced.
    Anything else is refused: a symlink (replacing it would silently drop the
    link, and writing through it would replace a file the user did not name),
    a FIFO (a reader may never come), a socket, a block device."""
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"-f {f}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            to = os.readlink(f)
        except OSError:
            to = "?"
        raise UsageError(f"-f {f}: is a symbolic link (to {to}); give the file itself, or remove the link")
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISCHR(st.st_mode):
        return "chardev"
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"-f {f}: is a directory; give a file name")
    what = next((w for test, w in _SPECIAL if test(st.st_mode)), "not a regular file")
    raise UsageError(f"-f {f}: is {what}, not a regular file; give a file name, or -f - and a redirect")


class _WriteErrors:
    """A sink whose write errors say which -f file failed (ENOSPC on /dev/full)."""

    def __init__(self, f: BinaryIO, path: str):
        self.f, self.path = f, path

    def write(self, b: bytes) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            raise OperationFailed(f"-f {self.path}: {e.strerror or e}") from None


def pprof_download(transport: NodeTransport, sandbox, profile: str, dest: str | os.PathLike | BinaryIO | None = None, *,
                   seconds: int | None = None, timeout: float = 10.0) -> dict:
    """Stream the Go shim's /debug/pprof/``profile`` to ``dest``.

    ``dest`` is a local file path (None: ``<id12>-<profile>.pprof`` in the
    current directory) or a binary stream. A file appears, mode 0600, only once
    the shim answered 2xx and the download completed (a temp file renamed into
    place); a stream receives nothing unless the shim answered 2xx. Returns
    {node, sandbox, profile, file (None for a stream), bytes}.

    The shim serves pprof only with enable_pprof (NotFound says how to turn it
    on); runtime-rs has no pprof (NotFound)."""
    from katactl.backends.local import atomic_file

    check_pprof_request(profile, seconds, dest)
    sandbox = _sandbox(transport, sandbox)
    result = {"node": transport.node, "sandbox": sandbox.id, "profile": profile}
    with ShimClient.for_sandbox(transport, sandbox, timeout=timeout) as c:
        if dest is not None and not isinstance(dest, (str, os.PathLike)):
            n = c.pprof(profile, dest, seconds=seconds)
            flush = getattr(dest, "flush", None)
            if flush is not None:
                flush()
            return {**result, "file": None, "bytes": n}
        path = os.path.abspath(os.fspath(dest) if dest is not None else f"{sandbox.id[:12]}-{profile}.pprof")
        if _dest_kind(path) == "chardev":
            # written in place (/dev/null): a device is never replaced by a regular file
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise OperationFailed(f"-f {path}: {e.strerror or e}") from None
            with os.fdopen(fd, "wb", buffering=0) as f:
                n = c.pprof(profile, _WriteErrors(f, path), seconds=seconds)
            return {**result, "file": path, "bytes": n}
        with atomic_file(path, 0o600) as f:
            n = c.pprof(profile, _WriteErrors(f, path), seconds=seconds)
    return {**result, "file": path, "bytes": n}
