"""Guest memory dumps (vmcores): find, collect, take and remove them.

Facts (reference/kata-node.md "Post-panic vmcore", hypervisors.md):

- The Go runtime dumps a panicked QEMU guest into
  ``<guest_memory_dump_path>/<sandbox-id>/vmcore-<YYYYMMDDhhmmss.fff>.elf``
  next to ``hypervisor.conf`` (JSON of the hypervisor config),
  ``hypervisor.version`` (``qemu --version``) and ``state/`` (a copy of
  ``/run/vc/sbs/<id>``). :func:`runtime_panic_dump` plays that handler
  exactly (the lab calls it on ``GUEST_PANICKED``).
- ``guest_memory_dump_path`` comes from the node's effective Kata
  configuration (:mod:`katactl.katacfg`: search order and drop-ins).

Collecting (:func:`collect`), the guarantees:

- the dump streams through ``transport.open_stream`` in 4 MiB chunks, read ahead
  and sha256-hashed on worker threads (bounded queues: peak RSS ~75 MiB; bounded
  memory, also over SSH) into ``<name>.partial`` beside a small JSON sidecar
  ``<name>.partial.json`` naming the source (path, size, mtime); the final
  name appears only after verification (rename), and the manifest
  (``SHA256SUMS``, ``sha256sum -c`` compatible, plus ``manifest.json``) is
  rewritten atomically last. A partial file is never presented as complete.
- verification: a fresh copy hashes what it writes while streaming and checks
  that the source still exists, unchanged (size, mtime) and that exactly
  ``size`` bytes arrived. A *resumed* copy, and every copy before
  ``--delete-after``, is checked end to end against the node's own
  ``sha256sum`` of the source (re-reading the source through the transport
  when the node has no ``sha256sum``).
- resume: an uncompressed partial resumes from its size (its prefix is
  re-hashed locally); a compressed one is written as independent gzip
  members / zstd frames of 256 MiB of input, checkpointed in the sidecar, and
  resumes at the last complete frame.
- compression happens here, while streaming (Python's gzip, the
  ``zstandard`` package or the local ``zstd`` binary): the transport's
  ``run()`` returns whole outputs, so a node-side compressor could only write
  a second copy on the node's (often full) crash disk.
- all-zero chunks of an uncompressed copy are written as holes (dumps are
  mostly zero pages): the local copy stays sparse.
- files are mode 0600, directories 0700. A second collect of an already
  collected dump is a no-op (``changed: false``).

Domain code only: no printing; errors are katactl.errors types.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import subprocess
import time
from typing import Any, Callable, Iterator

from katactl.backends.local import atomic_write, fsync_dir
from katactl.errors import (Ambiguous, KatactlError, NotFound, OperationFailed, ProtocolError,
                            Refused, UsageError)

GO_SBS = "/run/vc/sbs"
GO_VM = "/run/vc/vm"
RS_DIR = "/run/kata"
CONTAINERD_TASK_DIR = "/run/containerd/io.containerd.runtime.v2.task"
POD_LOG_DIR = "/var/log/pods"
DUMP_RE = re.compile(r"^vmcore-(\d{14}(?:\.\d{1,3})?)\.(elf|kdump(?:-[a-z]+)?)$")
METADATA = ("hypervisor.conf", "hypervisor.version")
CHUNK = 4 << 20                # streaming chunk; memory stays ~ (4 read-ahead + 8 hash queue) chunks
ZBLOCK = 64 << 10              # hole granularity of uncompressed copies
ZERO_BLOCK = bytes(ZBLOCK)
SEGMENT = 256 << 20            # input bytes per gzip member / zstd frame (resume granularity)
ZERO_CHUNK = bytes(CHUNK)
MANIFEST_JSON = "manifest.json"
SHA256SUMS = "SHA256SUMS"
COMPRESS_SUFFIX = {"none": "", "gzip": ".gz", "zstd": ".zst"}
FORMATS = ("elf", "kdump-zlib")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_POD_UID_RE = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")

ProgressFn = Callable[[int, int], None]


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


def dump_config(transport, *, dump_path: str | None = None, kata_config: str | None = None) -> DumpConfig:
    """guest_memory_dump_path and friends from the node's effective Kata configuration."""
    from katactl import katacfg

    if kata_config is not None:
        _check_abs(kata_config, "--kata-config")
    if dump_path:
        _check_abs(dump_path, "--dump-path")
        cfg = None
        try:
            cfg = katacfg.load(transport, kata_config)
        except KatactlError:
            pass
    else:
        try:
            cfg = katacfg.load(transport, kata_config)
        except NotFound as e:
            # no configuration file where the runtime looks: the running sandboxes' saved
            # config (persist.json GuestMemoryDumpPath) still says where dumps go
            paths = _dump_paths_from_sandboxes(transport) if kata_config is None else set()
            if len(paths) != 1:
                raise e
            return DumpConfig(dump_path=posixpath.normpath(paths.pop()), paging=False, hypervisor=None,
                              default_memory_mib=2048, config_path=None, dropins=[])
    hv = cfg.hypervisor if cfg else {}
    path = dump_path or str(hv.get("guest_memory_dump_path") or "")
    if not path:
        raise NotFound(
            f"guest_memory_dump_path is not set in {cfg.resolved}"
            + (f" (drop-ins: {', '.join(cfg.dropins)})" if cfg.dropins else "")
            + f" on node {transport.node}: the runtime writes no vmcores",
            hint=f'set guest_memory_dump_path = "/var/crash/kata" in [hypervisor.{cfg.hypervisor_name or "qemu"}]'
                 " (or pass --dump-path)")
    _check_abs(path, "guest_memory_dump_path")
    return DumpConfig(dump_path=posixpath.normpath(path), paging=bool(hv.get("guest_memory_dump_paging", False)),
                      hypervisor=cfg.hypervisor_name if cfg else None,
                      default_memory_mib=int(hv.get("default_memory", 2048) or 2048),
                      config_path=cfg.resolved if cfg else None, dropins=list(cfg.dropins) if cfg else [])


def _dump_paths_from_sandboxes(transport) -> set[str]:
    try:
        from katactl import sandbox as sbmod

        return {sb.guest_memory_dump_path for sb in sbmod.discover(transport, check=False)
                if sb.guest_memory_dump_path and sb.guest_memory_dump_path.startswith("/")}
    except (ImportError, KatactlError, OSError):
        return set()


def _check_abs(path: str, what: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise UsageError(f"invalid {what} {path!r}: must be an absolute path")


def node_name(transport) -> str:
    """The name used for DIR/<node>/: the transport's node, or the node's hostname locally."""
    if transport.node not in ("localhost", ""):
        return transport.node
    try:
        name = transport.read_text("/etc/hostname", limit=256).strip()
    except OSError:
        name = ""
    if not name and not transport.host_root:
        name = socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return name or "localhost"


# ---------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------
def dump_timestamp(name: str) -> str | None:
    """'vmcore-20240102030405.67.elf' -> '2024-01-02T03:04:05.670' (Go's .999 format trims zeros)."""
    m = DUMP_RE.match(name)
    if not m:
        return None
    ts = m.group(1)
    whole, _, frac = ts.partition(".")
    out = f"{whole[0:4]}-{whole[4:6]}-{whole[6:8]}T{whole[8:10]}:{whole[10:12]}:{whole[12:14]}"
    return out + (f".{frac.ljust(3, '0')}" if frac else ".000")


def go_timestamp(t: float | None = None) -> str:
    """Go's ``time.Now().Format("20060102150405.999")``: trailing zeros (and a bare dot) dropped."""
    t = time.time() if t is None else t
    ms = int(round((t - int(t)) * 1000))
    if ms == 1000:
        t, ms = int(t) + 1, 0
    s = time.strftime("%Y%m%d%H%M%S", time.localtime(int(t)))
    frac = f"{ms:03d}".rstrip("0")
    return s + (f".{frac}" if frac else "")


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


def _read_json(transport, path: str, limit: int = 8 << 20) -> Any:
    try:
        return json.loads(transport.read_bytes(path, limit=limit))
    except (OSError, ValueError):
        return None


def _read_first_line(transport, path: str) -> str | None:
    try:
        text = transport.read_text(path, limit=4096)
    except OSError:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line or None


def pod_of(transport, dump_dir: str, sandbox_id: str) -> dict:
    """Pod identity of a dumped sandbox: the bundle's CRI annotations (while the
    bundle still exists), else the pod UID from the saved state's cgroup path
    mapped through /var/log/pods/<ns>_<name>_<uid>."""
    bundles = []
    persist = _read_json(transport, f"{dump_dir}/state/{sandbox_id}/persist.json")
    if isinstance(persist, dict) and persist.get("BundlePath"):
        bundles.append(str(persist["BundlePath"]))
    try:
        for ns in transport.listdir(CONTAINERD_TASK_DIR):
            bundles.append(f"{CONTAINERD_TASK_DIR}/{ns}/{sandbox_id}")
    except OSError:
        pass
    for b in bundles:
        spec = _read_json(transport, f"{b}/config.json")
        ann = (spec or {}).get("annotations") if isinstance(spec, dict) else None
        if isinstance(ann, dict) and ann.get("io.kubernetes.cri.sandbox-name"):
            return {"namespace": ann.get("io.kubernetes.cri.sandbox-namespace"),
                    "name": ann.get("io.kubernetes.cri.sandbox-name"),
                    "uid": ann.get("io.kubernetes.cri.sandbox-uid"), "source": "bundle"}
        if isinstance(ann, dict) and ann.get("io.kubernetes.cri-o.KubeName"):
            return {"namespace": ann.get("io.kubernetes.cri-o.Namespace"),
                    "name": ann.get("io.kubernetes.cri-o.KubeName"), "uid": None, "source": "bundle"}
    state = _read_json(transport, f"{dump_dir}/state/persist.json")
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


def list_dumps(transport, *, dump_path: str | None = None, kata_config: str | None = None,
               index: "CollectIndex | None" = None) -> list[dict]:
    """Every dump under the node's guest_memory_dump_path, oldest first."""
    cfg = dump_config(transport, dump_path=dump_path, kata_config=kata_config)
    index = index if index is not None else CollectIndex()
    items: list[dict] = []
    try:
        sandboxes = transport.listdir(cfg.dump_path)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise OperationFailed(f"{cfg.dump_path}: guest_memory_dump_path is not a directory") from None
    for sid in sandboxes:
        d = f"{cfg.dump_path}/{sid}"
        try:
            names = transport.listdir(d)
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            continue
        dumps = [n for n in names if DUMP_RE.match(n)]
        if not dumps:
            continue
        pod = pod_of(transport, d, sid)
        version = _read_first_line(transport, f"{d}/hypervisor.version")
        hvconf = _read_json(transport, f"{d}/hypervisor.conf")
        for name in dumps:
            items.append(_describe(transport, d, sid, name, pod, version, hvconf, index))
    items.sort(key=lambda i: (i["time"] or "", i["name"]))
    return items


def _describe(transport, d, sid, name, pod, version, hvconf, index) -> dict:
    path = f"{d}/{name}"
    try:
        st = transport.stat(path)
    except OSError:
        st = None
    head = b""
    try:
        head = transport.read_bytes(path, limit=65536)
    except OSError:
        pass
    fmt = sniff_format(head)
    status = "ok"
    loads = None
    if fmt == "elf":
        ext = elf_extent(head)
        if ext is None:
            status = "unreadable-header"
        else:
            end, loads = ext
            if st is not None and st.size < end:
                status = "incomplete"   # still being written, or truncated
    elif fmt in ("empty", "unknown"):
        status = "incomplete" if fmt == "empty" else "unknown-format"
    coll = index.lookup(transport, path, st.size if st else None, st.mtime if st else None)
    mem = None
    if isinstance(hvconf, dict) and hvconf.get("MemorySize"):
        mem = int(hvconf["MemorySize"]) << 20
    return {
        "name": f"{sid}/{name}",
        "sandbox": sid,
        "file": name,
        "path": path,
        "format": fmt,
        "status": status,
        "size": st.size if st else None,
        "time": dump_timestamp(name),
        "mtime": st.mtime if st else None,
        "pod": f"{pod['namespace']}/{pod['name']}" if pod.get("name") else None,
        "podUid": pod.get("uid"),
        "hypervisorVersion": version,
        "guestMemory": mem,
        "loadSegments": loads,
        "collected": coll is not None,
        "collectedTo": coll,
    }


def resolve_dumps(transport, refs: list[str], *, dump_path: str | None = None,
                  kata_config: str | None = None, index: "CollectIndex | None" = None) -> list[dict]:
    """Dumps named by refs: SANDBOX-ID/vmcore-X.elf, vmcore-X.elf, a sandbox id
    (or unique prefix: all of its dumps), NAMESPACE/POD, or a node path. No refs: all."""
    items = list_dumps(transport, dump_path=dump_path, kata_config=kata_config, index=index)
    if not refs:
        return items
    out: list[dict] = []
    seen: set[str] = set()
    for ref in refs:
        if not ref or "\0" in ref or len(ref) > 4096:
            raise UsageError(f"invalid dump or sandbox reference {ref!r}")
        hit = [i for i in items if ref in (i["name"], i["path"], i["file"])]
        if not hit:
            hit = [i for i in items if i["pod"] == ref]
        if not hit:
            sids = sorted({i["sandbox"] for i in items if i["sandbox"].startswith(ref)})
            if len(sids) > 1:
                raise Ambiguous(f"{ref!r} matches the dumps of {len(sids)} sandboxes: "
                                + ", ".join(s[:12] for s in sids[:5]))
            hit = [i for i in items if sids and i["sandbox"] == sids[0]]
        if not hit:
            raise NotFound(f"no vmcore matches {ref!r} on node {transport.node}",
                           hint="see 'katactl vmcore list'")
        if len({i["file"] for i in hit}) < len(hit) and ref in [i["file"] for i in hit]:
            raise Ambiguous(f"{ref!r} names dumps of several sandboxes; use SANDBOX-ID/{ref}")
        for i in hit:
            if i["path"] not in seen:
                seen.add(i["path"])
                out.append(i)
    return out


# ---------------------------------------------------------------------------
# the local record of what was collected
# ---------------------------------------------------------------------------
class CollectIndex:
    """JSON lines under the XDG state dir: which node dumps were collected where.

    Appended with O_APPEND (concurrent collects never interleave a line).
    ``vmcore list`` shows a dump as collected while its manifest still exists.
    """

    def __init__(self, path: str | None = None):
        from katactl.config import state_dir

        self.path = path or os.path.join(state_dir(), "vmcore-collected.jsonl")
        self._entries: list[dict] | None = None

    @staticmethod
    def key(transport, path: str) -> str:
        return f"{transport.node}|{transport.host_root}|{path}"

    def entries(self) -> list[dict]:
        if self._entries is None:
            self._entries = []
            try:
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            e = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(e, dict):
                            self._entries.append(e)
            except OSError:
                pass
        return self._entries

    def lookup(self, transport, path: str, size: int | None, mtime: float | None) -> str | None:
        k = self.key(transport, path)
        for e in reversed(self.entries()):
            if e.get("key") == k and e.get("size") == size and _same_mtime(e.get("mtime"), mtime):
                if os.path.exists(os.path.join(e.get("dir", ""), MANIFEST_JSON)):
                    return e.get("to")
        return None

    def add(self, transport, path: str, size: int, mtime: float, to: str, dest_dir: str, sha256: str) -> None:
        entry = {"key": self.key(transport, path), "size": size, "mtime": mtime, "to": to,
                 "dir": dest_dir, "sha256": sha256, "time": time.time()}
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)
        if self._entries is not None:
            self._entries.append(entry)


def _same_mtime(a, b) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) < 1e-3


# ---------------------------------------------------------------------------
# collecting
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class CollectOptions:
    to: str
    compress: str = "none"              # none | gzip | zstd
    makedumpfile: bool = False
    dump_level: int = 31
    delete_after: bool = False
    dry_run: bool = False
    bwlimit: int | None = None          # bytes per second
    verify_source: bool = False         # always compare with the node's sha256sum
    progress: Callable[[dict, int, int], None] | None = None   # (dump, done, total)

    def validate(self) -> None:
        if self.compress not in COMPRESS_SUFFIX:
            raise UsageError(f"invalid --compress {self.compress!r} (choose none, gzip or zstd)")
        if self.makedumpfile and self.compress != "none":
            raise UsageError("--makedumpfile compresses on the node already; use it with --compress none")
        if not 0 <= self.dump_level <= 31:
            raise UsageError(f"invalid --dump-level {self.dump_level} (0-31)")
        if not self.to or not str(self.to).strip():
            raise UsageError("--to must name a directory")
        if self.bwlimit is not None and self.bwlimit <= 0:
            raise UsageError("--bwlimit must be greater than zero")
        if self.compress == "zstd":
            _zstd_backend()  # fail early and clearly


def _dest_dir(opts: CollectOptions, node: str, sandbox: str) -> str:
    return os.path.join(os.path.abspath(opts.to), node, sandbox)


def collect(transport, refs: list[str], opts: CollectOptions, *, dump_path: str | None = None,
            kata_config: str | None = None, index: CollectIndex | None = None) -> list[dict]:
    """Collect the dumps named by refs (all with none) into opts.to/<node>/<sandbox>/."""
    opts.validate()
    index = index if index is not None else CollectIndex()
    dumps = resolve_dumps(transport, refs, dump_path=dump_path, kata_config=kata_config, index=index)
    node = node_name(transport)
    results = []
    for d in dumps:
        results.append(collect_one(transport, d, node, opts, index))
    return results


def collect_one(transport, dump: dict, node: str, opts: CollectOptions, index: CollectIndex) -> dict:
    src = dump["path"]
    src_dir = posixpath.dirname(src)
    dest_dir = _dest_dir(opts, node, dump["sandbox"])
    stored_name = dump["file"] + COMPRESS_SUFFIX[opts.compress]
    if opts.makedumpfile:
        stored_name = re.sub(r"\.(elf|kdump)$", "", dump["file"]) + ".kdump"
    final = os.path.join(dest_dir, stored_name)
    result = {"name": dump["name"], "node": node, "source": src, "to": final, "size": dump["size"],
              "compress": "makedumpfile" if opts.makedumpfile else opts.compress}
    if dump["status"] == "incomplete":
        raise Refused(f"{dump['name']}: the dump is incomplete (size {dump['size']} is short of its "
                      "ELF segments): still being written, or truncated",
                      hint="wait for the dump to finish (katactl vmcore list shows its status)")
    manifest = _load_manifest(dest_dir)
    entry = manifest["files"].get(stored_name)
    if (entry and entry.get("source", {}).get("size") == dump["size"]
            and _same_mtime(entry.get("source", {}).get("mtime"), dump["mtime"])
            and os.path.exists(final) and os.path.getsize(final) == entry.get("size")):
        result.update(changed=False, sha256=entry["sha256"], verified=True, deleted=False)
        if opts.delete_after and not opts.dry_run:
            _verify_against_node(transport, src, entry.get("source", {}).get("sha256"), final, opts)
            _delete_source(transport, dump, index)
            result.update(changed=True, deleted=True)
        return result
    if opts.dry_run:
        result.update(changed=True, dryRun=True, deleted=False, verified=False)
        return result
    if opts.makedumpfile:
        _probe_makedumpfile(transport)
    os.makedirs(dest_dir, mode=0o700, exist_ok=True)
    os.chmod(dest_dir, 0o700)
    # metadata first (small); the dump last; the manifest after both
    meta_entries = _copy_metadata(transport, src_dir, dest_dir, dump)
    if opts.makedumpfile:
        info = _collect_makedumpfile(transport, dump, final, opts)
    else:
        info = _copy_dump(transport, dump, final, opts)
    files = dict(manifest["files"])
    files.update(meta_entries)
    files[stored_name] = {"size": info["size"], "sha256": info["sha256"], "kind": "vmcore",
                          "compress": result["compress"],
                          "source": {"path": src, "size": dump["size"], "mtime": dump["mtime"],
                                     "sha256": info.get("source_sha256")},
                          "verified": info["verified"], "collectedAt": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest.update(node=node, sandbox=dump["sandbox"], pod=dump.get("pod"), podUid=dump.get("podUid"),
                    hypervisorVersion=dump.get("hypervisorVersion"), files=files)
    _write_manifest(dest_dir, manifest)
    index.add(transport, src, dump["size"], dump["mtime"], final, dest_dir, info["sha256"])
    result.update(changed=True, sha256=info["sha256"], verified=info["verified"],
                  verification=info["verification"], resumed=info.get("resumed", False),
                  storedSize=info["size"], deleted=False)
    if opts.delete_after:
        _verify_against_node(transport, src, info.get("source_sha256"), final, opts)
        _delete_source(transport, dump, index)
        result["deleted"] = True
    return result


def _load_manifest(dest_dir: str) -> dict:
    try:
        with open(os.path.join(dest_dir, MANIFEST_JSON), encoding="utf-8") as f:
            m = json.load(f)
        if isinstance(m, dict) and isinstance(m.get("files"), dict):
            return m
    except (OSError, ValueError):
        pass
    return {"apiVersion": "katactl/v1", "kind": "VmcoreManifest", "files": {}}


def _write_manifest(dest_dir: str, manifest: dict) -> None:
    sums = "".join(f"{e['sha256']}  {name}\n" for name, e in sorted(manifest["files"].items()))
    atomic_write(os.path.join(dest_dir, SHA256SUMS), sums.encode(), 0o600)
    atomic_write(os.path.join(dest_dir, MANIFEST_JSON),
                 (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), 0o600)


def _walk(transport, path: str) -> Iterator[tuple[str, Any]]:
    """(node path, stat) of every regular file under path (no symlinks followed)."""
    for name in transport.listdir(path):
        p = f"{path}/{name}"
        try:
            st = transport.stat(p, follow_symlinks=False)
        except OSError:
            continue
        if st.is_dir:
            yield from _walk(transport, p)
        elif not st.is_link and (st.mode & 0o170000) == 0o100000:
            yield p, st


def _copy_metadata(transport, src_dir: str, dest_dir: str, dump: dict) -> dict:
    """hypervisor.conf, hypervisor.version and state/ (small files)."""
    entries: dict = {}
    files = [(f"{src_dir}/{m}", m) for m in METADATA if transport.exists(f"{src_dir}/{m}")]
    if transport.is_dir(f"{src_dir}/state"):
        for p, _st in _walk(transport, f"{src_dir}/state"):
            files.append((p, posixpath.relpath(p, src_dir)))
    for src, rel in files:
        data = b"".join(transport.open_stream(src))
        h = hashlib.sha256(data).hexdigest()
        dst = os.path.join(dest_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        atomic_write(dst, data, 0o600)
        entries[rel] = {"size": len(data), "sha256": h, "kind": "metadata"}
    return entries


class _Sidecar:
    def __init__(self, final: str):
        self.path = final + ".partial.json"

    def load(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def save(self, d: dict) -> None:
        atomic_write(self.path, json.dumps(d).encode(), 0o600)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _RateLimit:
    def __init__(self, bps: int | None):
        self.bps = bps
        self.t0 = time.monotonic()
        self.n = 0

    def __call__(self, n: int) -> None:
        if not self.bps:
            return
        self.n += n
        ahead = self.n / self.bps - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)


def _disk_full(dest: str, done: int, total: int) -> OperationFailed:
    return OperationFailed(
        f"destination {os.path.dirname(dest)} is full: {done} of {total} bytes copied; the partial "
        f"copy is kept as {os.path.basename(dest)}.partial",
        hint="free space (or choose another --to) and run the same collect again to resume")


def _copy_dump(transport, dump: dict, final: str, opts: CollectOptions) -> dict:
    src, size, mtime = dump["path"], dump["size"], dump["mtime"]
    part = final + ".partial"
    side = _Sidecar(final)
    ident = {"path": src, "size": size, "mtime": mtime, "compress": opts.compress, "node": transport.node}
    state = side.load()
    resume_src = resume_dst = 0
    if state and state.get("source") == ident and os.path.exists(part):
        if opts.compress == "none":
            resume_src = resume_dst = min(os.path.getsize(part), size)
        else:
            resume_src, resume_dst = int(state.get("srcOffset", 0)), int(state.get("dstOffset", 0))
            if os.path.getsize(part) < resume_dst:
                resume_src = resume_dst = 0
    if resume_src == 0:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
    side.save({"source": ident, "srcOffset": resume_src, "dstOffset": resume_dst})
    if opts.compress == "none":
        free = shutil.disk_usage(os.path.dirname(final)).free
        if free < size - resume_dst:
            raise Refused(f"destination {os.path.dirname(final)} has {free} bytes free; the dump needs "
                          f"{size - resume_dst} more", hint="free space, choose another --to, or use --compress")
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, resume_dst)
        src_hash = _Hasher()
        # prefix: re-hash what is already on the local disk
        if resume_src:
            _hash_prefix(part, resume_dst, opts.compress, src_hash)
        os.lseek(fd, resume_dst, os.SEEK_SET)
        writer = _make_writer(opts.compress, fd)
        limit = _RateLimit(opts.bwlimit)
        done = resume_src
        seg_left = SEGMENT - (resume_src % SEGMENT) if opts.compress != "none" else None
        if opts.progress:
            opts.progress(dump, done, size)
        try:
            stream = _Prefetch(transport.open_stream(src, offset=resume_src, chunk_size=CHUNK))
        except FileNotFoundError:
            src_hash.close()
            raise OperationFailed(f"{src}: the source dump vanished before the copy started") from None
        try:
            for chunk in stream:
                if done + len(chunk) > size:
                    raise OperationFailed(f"{src}: the source dump grew during the copy (was {size} bytes)")
                src_hash.update(chunk)
                while chunk:
                    if seg_left is not None and len(chunk) >= seg_left:
                        piece, chunk = chunk[:seg_left], chunk[seg_left:]
                    else:
                        piece, chunk = chunk, b""
                    writer.write(piece)
                    done += len(piece)
                    if seg_left is not None:
                        seg_left -= len(piece)
                        if seg_left == 0:
                            writer.end_segment()
                            side.save({"source": ident, "srcOffset": done, "dstOffset": writer.tell()})
                            seg_left = SEGMENT
                limit(done - resume_src)
                if opts.progress:
                    opts.progress(dump, done, size)
            writer.finish()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(final, done, size) from None
            raise
        finally:
            writer.close()
            stream.close()
            src_hash.close()
        os.fsync(fd)
        if done != size:
            raise OperationFailed(f"{src}: the source dump shrank during the copy: got {done} of {size} bytes; "
                                  f"the partial copy is kept as {os.path.basename(part)}")
    finally:
        os.close(fd)
    # the source must still be there, unchanged
    try:
        st = transport.stat(src)
    except FileNotFoundError:
        raise OperationFailed(f"{src}: the source dump vanished during the copy; the partial copy is "
                              f"kept as {part} and is not a verified dump") from None
    if st.size != size or not _same_mtime(st.mtime, mtime):
        raise OperationFailed(f"{src}: the source dump changed during the copy (size/mtime); "
                              "run collect again to copy it afresh")
    source_sha = src_hash.hexdigest()
    resumed = resume_src > 0
    verification = "stream"
    if resumed or opts.verify_source:
        prefix_len = resume_src if resumed else size
        node_sha = _node_sha256(transport, src, prefix_len)
        if node_sha is None:
            raise OperationFailed(f"{src}: cannot verify the resumed copy against the node")
        kind, value = node_sha
        if kind == "full" and value != source_sha:
            _discard(part, side)
            raise OperationFailed(f"{src}: sha256 mismatch after resume (node {value[:12]}, copy "
                                  f"{source_sha[:12]}); the partial copy was discarded, run collect again")
        if kind == "prefix" and value != (source_sha if prefix_len == size else
                                          _prefix_hash_local(part, resume_dst, resume_src, opts.compress)):
            _discard(part, side)
            raise OperationFailed(f"{src}: the resumed prefix does not match the source; the partial copy "
                                  "was discarded, run collect again")
        verification = "node-sha256sum" if kind == "full" else "prefix-rehash"
    stored_sha = source_sha if opts.compress == "none" else _hash_file(part)
    stored_size = os.path.getsize(part)
    os.rename(part, final)
    fsync_dir(os.path.dirname(final))
    side.remove()
    return {"size": stored_size, "sha256": stored_sha, "source_sha256": source_sha, "verified": True,
            "verification": verification, "resumed": resumed}


def _discard(part: str, side: _Sidecar) -> None:
    try:
        os.unlink(part)
    except FileNotFoundError:
        pass
    side.remove()


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def _iter_local_uncompressed(part: str, dst_len: int, compress: str) -> Iterator[bytes]:
    """The uncompressed bytes of the first dst_len bytes of a local partial."""
    if compress == "none":
        with open(part, "rb") as f:
            left = dst_len
            while left > 0:
                b = f.read(min(CHUNK, left))
                if not b:
                    return
                left -= len(b)
                yield b
        return
    if compress == "gzip":
        import gzip
        import io

        with open(part, "rb") as raw:
            limited = io.BytesIO() if dst_len == 0 else _Limited(raw, dst_len)
            with gzip.GzipFile(fileobj=limited, mode="rb") as g:
                while True:
                    b = g.read(CHUNK)
                    if not b:
                        return
                    yield b
        return
    # zstd
    kind, mod = _zstd_backend()
    with open(part, "rb") as raw:
        lim = _Limited(raw, dst_len)
        if kind == "module":
            r = mod.ZstdDecompressor().stream_reader(lim, read_across_frames=True)
            while True:
                b = r.read(CHUNK)
                if not b:
                    return
                yield b
        else:
            p = subprocess.Popen([mod, "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            import threading

            def feed():
                try:
                    while True:
                        b = lim.read(CHUNK)
                        if not b:
                            break
                        p.stdin.write(b)
                finally:
                    p.stdin.close()

            t = threading.Thread(target=feed, daemon=True)
            t.start()
            while True:
                b = p.stdout.read(CHUNK)
                if not b:
                    break
                yield b
            t.join()
            p.wait()


class _Limited:
    def __init__(self, f, n):
        self.f, self.left = f, n

    def read(self, n=-1):
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        b = self.f.read(n)
        self.left -= len(b)
        return b

    def readable(self):
        return True


def _hash_prefix(part: str, dst_len: int, compress: str, h) -> None:
    for b in _iter_local_uncompressed(part, dst_len, compress):
        h.update(b)


def _prefix_hash_local(part_or_final: str, dst_len: int, src_len: int, compress: str) -> str:
    h = hashlib.sha256()
    for b in _iter_local_uncompressed(part_or_final, dst_len, compress):
        h.update(b)
    return h.hexdigest()


def _node_sha256(transport, path: str, prefix_len: int):
    """('full', hex) from the node's sha256sum, else ('prefix', hex) by re-reading prefix_len bytes."""
    try:
        r = transport.run(["sha256sum", "--", _real(transport, path)], timeout=3600)
        if r.returncode == 0:
            m = re.match(rb"^\\?([0-9a-f]{64})\s", r.stdout)
            if m:
                return "full", m.group(1).decode()
    except (FileNotFoundError, PermissionError, OSError):
        pass
    h = hashlib.sha256()
    left = prefix_len
    for b in transport.open_stream(path, 0, CHUNK):
        if left <= 0:
            break
        b = b[:left]
        left -= len(b)
        h.update(b)
    return "prefix", h.hexdigest()


def _verify_against_node(transport, src: str, source_sha: str | None, final: str, opts) -> None:
    """Before deleting a node's dump: the node's own sha256 must equal our copy's."""
    if not source_sha:
        raise Refused(f"{src}: no source checksum recorded; not deleting it")
    r = _node_sha256(transport, src, 1 << 62)
    if r[1] != source_sha:
        raise Refused(f"{src}: the node's sha256 ({r[1][:12]}) differs from the collected copy "
                      f"({source_sha[:12]}); not deleting it")


def _delete_source(transport, dump: dict, index: CollectIndex) -> None:
    """Delete a verified dump on the node (its sandbox dir too once no dump is left)."""
    remove_dumps(transport, [dump])


# -- pipeline: read ahead and hash on their own threads (hashlib and os I/O release the GIL)
class _Hasher:
    """sha256 on a worker thread; update() hands over immutable bytes (bounded queue)."""

    def __init__(self, depth: int = 4):
        import queue
        import threading

        self._h = hashlib.sha256()
        self._q: "queue.Queue[bytes | None]" = queue.Queue(depth)
        self._t = threading.Thread(target=self._run, name="vmcore-sha256", daemon=True)
        self._t.start()
        self._closed = False

    def _run(self):
        while True:
            b = self._q.get()
            if b is None:
                return
            self._h.update(b)

    def update(self, b: bytes) -> None:
        self._q.put(bytes(b) if not isinstance(b, bytes) else b)

    def hexdigest(self) -> str:
        self.close()
        return self._h.hexdigest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._t.join()


class _Prefetch:
    """Iterate a chunk stream on a reader thread, at most ``depth`` chunks ahead."""

    _END = object()

    def __init__(self, it, depth: int = 4):
        import queue
        import threading

        self._it = it
        self._q: "queue.Queue" = queue.Queue(depth)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="vmcore-read", daemon=True)
        self._t.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for chunk in self._it:
                if not self._put(chunk):
                    break
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(("__error__", e))
        finally:
            close = getattr(self._it, "close", None)
            if close:
                try:
                    close()
                except Exception:
                    pass

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "__error__":
                raise item[1]
            yield item

    def close(self) -> None:
        self._stop.set()
        import queue

        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._t.join(timeout=5)


# -- writers (none / gzip / zstd), each segment independently decodable --------
class _PlainWriter:
    """Writes data; runs of all-zero 64 KiB blocks become holes (seek), as dumps are mostly zeros."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pos = os.lseek(fd, 0, os.SEEK_CUR)
        self.hole = False

    def _write(self, mv) -> None:
        while mv:
            n = os.write(self.fd, mv)
            mv = mv[n:]

    def write(self, b: bytes) -> None:
        n = len(b)
        if n == CHUNK and b == ZERO_CHUNK:
            self.pos = os.lseek(self.fd, n, os.SEEK_CUR)
            self.hole = True
            return
        mv = memoryview(b)
        i = 0
        while i < n:
            j = i
            while j < n and (b[j:j + 16] != ZERO_BLOCK[:min(16, n - j)]    # cheap test first
                             or b[j:j + ZBLOCK] != ZERO_BLOCK[:min(ZBLOCK, n - j)]):
                j += ZBLOCK
            j = min(j, n)
            if j > i:
                self._write(mv[i:j])
            k = j
            while k < n and b[k:k + ZBLOCK] == ZERO_BLOCK[:min(ZBLOCK, n - k)]:
                k += ZBLOCK
            k = min(k, n)
            if k > j:
                os.lseek(self.fd, k - j, os.SEEK_CUR)
                self.hole = True
            i = k
        self.pos += n

    def end_segment(self) -> None:
        pass

    def tell(self) -> int:
        return self.pos

    def finish(self) -> None:
        if self.hole:
            os.ftruncate(self.fd, self.pos)

    def close(self) -> None:
        pass


class _FramedWriter:
    """Base of the compressing writers: a buffered file over a dup of ``fd``;
    ``end_segment`` closes the current gzip member / zstd frame and fsyncs."""

    def __init__(self, fd: int, level: int):
        self.fd, self.level = fd, level
        self.f = os.fdopen(os.dup(fd), "ab", buffering=CHUNK)

    def _close_frame(self) -> None:
        raise NotImplementedError

    def end_segment(self) -> None:
        self._close_frame()
        self.f.flush()
        os.fsync(self.fd)

    def tell(self) -> int:
        self.f.flush()
        return os.fstat(self.fd).st_size

    def finish(self) -> None:
        self.end_segment()

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


class _GzipWriter(_FramedWriter):
    def __init__(self, fd: int, level: int = 1):
        import gzip

        super().__init__(fd, level)
        self._gzip = gzip
        self.g = None

    def write(self, b: bytes) -> None:
        if self.g is None:
            self.g = self._gzip.GzipFile(fileobj=self.f, mode="wb", compresslevel=self.level, mtime=0)
        self.g.write(b)

    def _close_frame(self) -> None:
        if self.g is not None:
            self.g.close()
            self.g = None


class _ZstdWriter(_FramedWriter):
    def __init__(self, fd: int, level: int = 3):
        super().__init__(fd, level)
        self.kind, self.mod = _zstd_backend()
        self.c = None

    def _start(self):
        if self.kind == "module":
            self.c = self.mod.ZstdCompressor(level=self.level, threads=-1).stream_writer(
                self.f, closefd=False)
        else:
            self.f.flush()
            self.c = subprocess.Popen([self.mod, "-q", "-c", f"-{self.level}", "-T0"], stdin=subprocess.PIPE,
                                      stdout=self.f.fileno(), stderr=subprocess.PIPE)

    def write(self, b: bytes) -> None:
        if self.c is None:
            self._start()
        if self.kind == "module":
            self.c.write(b)
        else:
            try:
                self.c.stdin.write(b)
            except BrokenPipeError:
                self._check()
                raise

    def _check(self):
        err = self.c.stderr.read().decode(errors="replace") if self.c.stderr else ""
        rc = self.c.wait()
        self.c = None
        if rc != 0:
            if "space" in err.lower():
                raise OSError(errno.ENOSPC, "No space left on device")
            raise OperationFailed(f"zstd failed (exit {rc}): {err.strip()[-200:]}")

    def _close_frame(self) -> None:
        if self.c is not None:
            if self.kind == "module":
                self.c.flush(self.mod.FLUSH_FRAME)
                self.c = None
            else:
                self.c.stdin.close()
                self._check()

    def close(self) -> None:
        if self.c is not None and self.kind != "module":
            try:
                self.c.kill()
                self.c.wait()
            except OSError:
                pass
        super().close()


def _make_writer(compress: str, fd: int):
    if compress == "gzip":
        return _GzipWriter(fd)
    if compress == "zstd":
        return _ZstdWriter(fd)
    return _PlainWriter(fd)


def _zstd_backend():
    try:
        import zstandard

        return "module", zstandard
    except ImportError:
        pass
    exe = shutil.which("zstd")
    if exe:
        return "binary", exe
    raise OperationFailed("--compress zstd needs the zstd binary or the zstandard Python package here",
                          hint="apt-get install zstd, or use --compress gzip")


def _probe_makedumpfile(transport) -> None:
    try:
        r = transport.run(["makedumpfile", "-v"], timeout=30)
        ok = r.returncode != 127
    except (FileNotFoundError, PermissionError):
        ok = False
    if not ok:
        raise OperationFailed(f"makedumpfile is not installed on node {transport.node}",
                              hint="apt-get install makedumpfile on the node, or collect without --makedumpfile")


def _collect_makedumpfile(transport, dump: dict, final: str, opts: CollectOptions) -> dict:
    """Filter+compress on the node with makedumpfile -c -d LEVEL, then stream the result."""
    src = dump["path"]
    tmp = f"{posixpath.dirname(src)}/.katactl-{os.path.basename(final)}.tmp"
    try:
        r = transport.run(["makedumpfile", "-c", "-d", str(opts.dump_level), _real(transport, src),
                           _real(transport, tmp)], timeout=3600)
    except FileNotFoundError:
        raise OperationFailed(f"makedumpfile is not installed on node {transport.node}",
                              hint="apt-get install makedumpfile on the node, or collect without --makedumpfile") from None
    try:
        if r.returncode == 127:
            raise OperationFailed(f"makedumpfile is not installed on node {transport.node}")
        if r.returncode != 0:
            raise OperationFailed(f"makedumpfile failed (exit {r.returncode}): "
                                  f"{r.stderr.decode(errors='replace').strip()[-300:]}",
                                  hint="the dump needs VMCOREINFO (QEMU -device vmcoreinfo) for filtering")
        st = transport.stat(tmp)
        filtered = dict(dump, path=tmp, size=st.size, mtime=st.mtime)
        info = _copy_dump(transport, filtered, final, dataclasses.replace(opts, compress="none"))
        info["source_sha256"] = None
        return info
    finally:
        try:
            transport.remove(tmp)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# removing
# ---------------------------------------------------------------------------
def remove_dumps(transport, dumps: list[dict], *, dry_run: bool = False) -> list[dict]:
    """Delete dumps (and their sandbox dir once no dump is left in it)."""
    out = []
    for d in dumps:
        item = {"name": d["name"], "path": d["path"], "size": d.get("size"), "collected": d.get("collected")}
        if dry_run:
            out.append({**item, "changed": True, "dryRun": True})
            continue
        try:
            transport.remove(d["path"])
        except FileNotFoundError:
            out.append({**item, "changed": False})
            continue
        sdir = posixpath.dirname(d["path"])
        try:
            rest = [n for n in transport.listdir(sdir) if DUMP_RE.match(n)]
            if not rest:
                transport.remove(sdir, recursive=True)
                item["removedDir"] = sdir
        except OSError:
            pass
        out.append({**item, "changed": True})
    return out


# ---------------------------------------------------------------------------
# taking dumps: the runtime's panic handler, and on-demand triggers
# ---------------------------------------------------------------------------
def _copy_tree(transport, src: str, dst: str) -> None:
    """Copy a node directory into another node directory (regular files and dirs only)."""
    transport.mkdir(dst, 0o755)
    for name in transport.listdir(src):
        s, d = f"{src}/{name}", f"{dst}/{name}"
        try:
            st = transport.stat(s, follow_symlinks=False)
        except OSError:
            continue
        if st.is_dir:
            _copy_tree(transport, s, d)
        elif (st.mode & 0o170000) == 0o100000:
            transport.write_bytes_atomic(d, b"".join(transport.open_stream(s)), mode=st.mode & 0o777)


def sandbox_persist(transport, sandbox_id: str) -> dict:
    p = _read_json(transport, f"{GO_SBS}/{sandbox_id}/persist.json")
    return p if isinstance(p, dict) else {}


def _real(transport, node_path: str) -> str:
    """The path the hypervisor (a process on the node) sees for a node path."""
    return (transport.host_root or "") + node_path


def prepare_dump_dir(transport, sandbox_id: str, dump_path: str, *, persist: dict | None = None,
                     hypervisor_path: str | None = None) -> tuple[str, dict]:
    """Steps 1-2 of the runtime's handler: <dump_path>/<id>/ with state/, hypervisor.conf,
    hypervisor.version. Returns (dir, persist)."""
    _check_sandbox_id(sandbox_id)
    persist = persist if persist is not None else sandbox_persist(transport, sandbox_id)
    d = f"{dump_path}/{sandbox_id}"
    transport.mkdir(d, 0o755)
    src_state = f"{GO_SBS}/{sandbox_id}"
    if transport.is_dir(src_state):
        # the runtime runs `/bin/cp -ar /run/vc/sbs/<id> <dir>/state` (so a second dump of the
        # same sandbox lands in state/<id>/, as cp does when the target exists)
        copied = False
        try:
            r = transport.run(["/bin/cp", "-ar", _real(transport, src_state), _real(transport, f"{d}/state")],
                              timeout=120)
            copied = r.returncode == 0
        except (OSError, KatactlError):
            pass
        if not copied:
            dst = f"{d}/state/{sandbox_id}" if transport.is_dir(f"{d}/state") else f"{d}/state"
            _copy_tree(transport, src_state, dst)
    hvconf = ((persist.get("Config") or {}).get("HypervisorConfig")) or {}
    transport.write_bytes_atomic(f"{d}/hypervisor.conf", json.dumps(hvconf).encode(), mode=0o644)
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
        s = qmp_client.execute("query-memory-size-summary")
        return int(s.get("base-memory", 0)) + int(s.get("plugged-memory", 0))
    return 0


def check_free_space(transport, d: str, memory_bytes: int) -> None:
    free = transport.statvfs_free(d)
    need = required_free(memory_bytes)
    if free < need:
        raise Refused(f"{d}: {free} bytes free, a dump needs 2 x guest memory = {need} (the runtime's rule)",
                      hint="free space under guest_memory_dump_path first")


def runtime_panic_dump(transport, sandbox, qmp_client, dump_path: str, paging: bool = False, *,
                       timeout: float = 3600.0) -> str:
    """Play the Go runtime's GUEST_PANICKED handler (kata-node.md steps 1-4).

    sandbox: a sandbox id (or an object with ``.id``). qmp_client: a connected
    :class:`katactl.backends.qmp.QMPClient` (the caller's, e.g. the lab
    daemon's reader-thread client). Returns the dump's node path. Raises
    Refused when the filesystem lacks 2 x guest memory (the runtime logs and
    skips the dump then).
    """
    sandbox_id = getattr(sandbox, "id", None) or getattr(sandbox, "sandbox_id", None) or str(sandbox)
    _check_abs(dump_path, "dump_path")
    d, persist = prepare_dump_dir(transport, sandbox_id, posixpath.normpath(dump_path))
    check_free_space(transport, d, guest_memory_bytes(persist, qmp_client))
    path = f"{d}/vmcore-{go_timestamp()}.elf"
    qmp_client.execute("dump-guest-memory", {"paging": bool(paging), "protocol": "file:" + _real(transport, path),
                                             "format": "elf"}, timeout=timeout)
    return path


def _check_sandbox_id(sid: str) -> None:
    if not isinstance(sid, str) or not _ID_RE.match(sid):
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


def trigger(transport, ref, opts: TriggerOptions) -> dict:
    """An on-demand dump of a live sandbox into Kata's layout.

    ref: a sandbox reference (id, prefix, NAMESPACE/POD) or a resolved
    katactl.sandbox.Sandbox. Paths tried, in order: the shim extension
    (``/ext/v1/capabilities`` lists ``vmcore``), Cloud Hypervisor
    ``PUT /vm.coredump`` (when ``vmm.ping`` lists ``guest_debug``), QEMU
    ``dump-guest-memory`` on ``extra-monitor.sock`` then ``qmp.sock``
    (progress from ``query-dump``).
    """
    from katactl import sandbox as sbmod

    if opts.format not in FORMATS:
        raise UsageError(f"invalid --format {opts.format!r} (choose {', '.join(FORMATS)})")
    sb = ref if isinstance(ref, sbmod.Sandbox) else sbmod.resolve(transport, ref, check=False)
    sid = sb.id
    cfg = dump_config(transport, dump_path=opts.dump_path or sb.guest_memory_dump_path or None,
                      kata_config=opts.kata_config)
    persist = sb.raw if (sb.runtime == "go" and isinstance(sb.raw, dict)) else sandbox_persist(transport, sid)
    hv_type = sb.hypervisor or cfg.hypervisor or "qemu"
    paging = cfg.paging if opts.paging is None else opts.paging
    if opts.format != "elf" and paging:
        raise UsageError("kdump formats do not support paging (QEMU refuses it)")
    ext = ".elf" if opts.format == "elf" else ".kdump"
    d = f"{cfg.dump_path}/{sid}"
    path = f"{d}/vmcore-{go_timestamp()}{ext}"
    result = {"sandbox": sid, "pod": sb.pod_ref, "path": path, "format": opts.format, "hypervisor": hv_type,
              "detached": opts.detach}
    mem = (sb.total_memory_mib or 0) << 20 or guest_memory_bytes(persist)
    reasons: list[str] = []
    # 1. the shim extension
    shim = _shim_ext(transport, sb.shim_socket) if sb.shim_socket else None
    if shim is not None and "vmcore" in shim["capabilities"]:
        result["via"] = "shim-extension"
        if opts.dry_run:
            return {**result, "changed": True, "dryRun": True}
        # the metadata and the space check the runtime does, then the shim dumps
        prepare_dump_dir(transport, sid, cfg.dump_path, persist=persist, hypervisor_path=sb.hypervisor_path)
        if mem:
            check_free_space(transport, d, mem)
        return {**result, **_trigger_shim(transport, shim, sid, opts, paging), "changed": True}
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


def _shim_ext(transport, sock: str) -> dict | None:
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


def _trigger_shim(transport, shim: dict, sid: str, opts: TriggerOptions, paging: bool) -> dict:
    from katactl.backends.shim import ShimClient

    body = json.dumps({"format": opts.format, "paging": paging}).encode()
    with ShimClient(transport, shim["socket"], timeout=opts.timeout, sandbox_id=sid) as c:
        status, raw = c.call("POST", "/ext/v1/vmcore", content=body,
                             headers={"Content-Type": "application/json"})
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
    if not isinstance(d, dict) or not d.get("path"):
        raise ProtocolError("shim vmcore dump: the answer names no dump path")
    return {"path": d["path"], "size": d.get("bytes"), "status": "completed"}


def _trigger_clh(transport, sock, sid, d, path, persist, mem, opts, result) -> dict:
    from katactl.backends.clh import ClhClient

    with ClhClient(transport, sock, opts.timeout) as c:
        feats = (c.ping() or {}).get("features") or []
        if "guest_debug" not in feats:
            raise OperationFailed("this Cloud Hypervisor build has no guest_debug feature (vmm.ping features: "
                                  + (",".join(feats) or "none") + "): vm.coredump is unavailable",
                                  hint="use a cloud-hypervisor built with --features guest_debug (x86_64)")
        if opts.dry_run:
            return {**result, "changed": True, "dryRun": True}
        prepare_dump_dir(transport, sid, posixpath.dirname(d), persist=persist)
        if mem:
            check_free_space(transport, d, mem)
        c.coredump(_real(transport, path))
    return {**result, "status": "completed", "changed": True}


def _trigger_qemu(transport, sid, d, path, persist, mem, paging, opts, result, reasons, socks) -> dict:
    from katactl.backends.qmp import MonitorBusy, QMPClient

    client = None
    tried = []
    for sock in socks:
        if not transport.exists(sock):
            continue
        try:
            client = QMPClient.connect(transport, sock, timeout=min(opts.timeout, 30.0))
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
        caps = client.execute("query-dump-guest-memory-capability")
        if opts.format not in (caps or {}).get("formats", []):
            raise OperationFailed(f"this QEMU cannot write {opts.format} dumps (it offers "
                                  + ", ".join((caps or {}).get("formats", [])) + ")")
        st = client.execute("query-dump")
        if (st or {}).get("status") == "active":
            raise Refused(f"sandbox {sid[:12]}: a dump is already in progress")
        if opts.dry_run:
            return {**result, "changed": True, "dryRun": True}
        prepare_dump_dir(transport, sid, posixpath.dirname(d), persist=persist)
        check_free_space(transport, d, mem)
        client.events()  # forget old events: DUMP_COMPLETED below must be ours
        args = {"paging": bool(paging), "protocol": "file:" + _real(transport, path), "format": opts.format,
                "detach": True}
        client.execute("dump-guest-memory", args, timeout=opts.timeout)
        if opts.detach:
            return {**result, "status": "active", "changed": True}
        deadline = time.monotonic() + opts.timeout
        while True:
            st = client.execute("query-dump") or {}
            if opts.progress and st.get("total"):
                opts.progress(int(st.get("completed", 0)), int(st["total"]))
            if st.get("status") == "completed":
                break
            if st.get("status") == "failed":
                ev = [e for e in client.events() if e.get("event") == "DUMP_COMPLETED"]
                why = (ev[-1].get("data") or {}).get("error") if ev else None
                raise OperationFailed(f"QEMU dump failed{': ' + why if why else ''}")
            if time.monotonic() > deadline:
                from katactl.errors import TimeoutExpired

                raise TimeoutExpired(f"dump not finished within {opts.timeout:g}s (it continues in QEMU)")
            time.sleep(opts.poll)
    try:
        size = transport.stat(path).size
    except OSError:
        size = None
    return {**result, "status": "completed", "size": size, "changed": True}
