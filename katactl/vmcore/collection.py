"""Collecting dumps from a node into a local directory (:func:`collect`).

The guarantees:

- the dump streams through ``transport.open_stream`` in 4 MiB chunks, read ahead
  and sha256-hashed on worker threads (bounded queues: peak RSS ~75 MiB; bounded
  memory, also over SSH) into ``<name>.partial`` beside a small JSON sidecar
  ``<name>.partial.json`` naming the source (path, size, mtime); the final
  name appears only after verification (rename), between the writing of the
  new manifest (``SHA256SUMS``, ``sha256sum -c`` compatible, plus
  ``manifest.json``) to temp files and their renames
  (:func:`records.update_manifest`): a disk too full for the manifest fails
  the collect before the dump appears under its name, and leaves the
  complete partial to resume from. A partial file is never presented as
  complete.
- verification: a fresh copy hashes what it writes while streaming and checks
  that the source still exists, unchanged (size, mtime) and that exactly
  ``size`` bytes arrived. A *resumed* copy, and every copy before
  ``--delete-after``, is checked end to end against the node's own
  SHA-256 of the source (``openssl dgst``, else python3's hashlib, else
  ``sha256sum``; re-reading the source through the transport when the node
  has none of them).
- resume: an uncompressed partial resumes from its size (its prefix is
  re-hashed locally); a compressed one is written as independent gzip
  members / zstd frames of 256 MiB of input, checkpointed in the sidecar, and
  resumes at the last complete frame.
- compression (``--compress-on``): on a node that has the compressor
  (``auto``, ``node``), the node runs ``zstd -q -c -3 -T1`` / ``gzip -c -1 -n``
  at idle priority (``ionice -c3 nice -n 19`` when present, so online pods
  keep the CPU and the disk) and its stdout streams here
  (``transport.run_stream``): ~3x fewer bytes on the wire, nothing written on
  the node's (often full) crash disk. The local node too (katactl on the node,
  ``--host-root``): the same idle, one-core process, on this machine. The
  stored file is the compressor's output as is; it is decompressed on the fly
  here (:class:`streams.Inflater`) to hash the original content, so the
  manifest records the same two checksums as an in-process compression.
  Otherwise (``local``, or the node lacks the program in ``auto``) compression
  happens in katactl's process, while streaming (Python's gzip, the
  ``zstandard`` package or the local ``zstd``; on one core when the node is
  this machine). The node's SHA-256 programs run at idle priority too.
- resume of a node-compressed copy: the compressor's output is deterministic
  for one program version and argv (both kept in the sidecar), so a resume
  re-runs it on the node and skips the bytes already stored there, on the node
  (``tail -c +N`` behind a fixed ``sh -c`` script, arguments passed as
  positional parameters): only the rest crosses the wire. The stored prefix
  is decompressed here again (it is not fetched again), and the whole copy is
  then checked against the node's ``sha256sum`` like any resumed copy; a
  mismatch discards the partial. A partial made by another compressor
  version, argv or place restarts from zero (``resumed: false`` and a
  ``note``).
- all-zero chunks of an uncompressed copy are written as holes (dumps are
  mostly zero pages): the local copy stays sparse.
- files are mode 0600, directories 0700. A second collect of an already
  collected dump is a no-op (``changed: false``), also once the node's dump is
  gone (:func:`collected_gone`).
- one copy of a dump into one --to at a time (:class:`_CopyLock`): a second
  collect of it is refused (exit 5) while the first holds ``<name>.lock``;
  the manifest is rewritten under a lock of its directory
  (:func:`records.update_manifest`).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import socket
import threading
import time
import weakref
from typing import Callable, Iterator

from katactl.backends.local import atomic_write, atomic_write_stream, fsync_dir
from katactl.errors import OperationFailed, Refused, UsageError, as_katactl_error
from katactl.vmcore.dumps import match_ref, node_name, real_path, remove_dumps, resolve_dumps
from katactl.vmcore.records import CollectIndex, load_manifest, same_mtime, update_manifest
from katactl.vmcore.streams import (CHUNK, Hasher, Inflater, Prefetch, RateLimit, hash_file, iter_uncompressed,
                                    make_writer, zstd_backend)
from katactl.backends.base import NodeTransport

METADATA = ("hypervisor.conf", "hypervisor.version")
SEGMENT = 256 << 20            # input bytes per gzip member / zstd frame (resume granularity)
COMPRESS_SUFFIX = {"none": "", "gzip": ".gz", "zstd": ".zst"}
COMPRESS_ON = ("auto", "node", "local")
# the node-side compressors: the same levels as here, one thread, no name/time in gzip's header
NODE_COMPRESSOR = {"zstd": ("zstd", "-q", "-c", "-3", "-T1", "--"), "gzip": ("gzip", "-c", "-1", "-n", "--")}
IDLE_PRIORITY = (("ionice", "-c3"), ("nice", "-n", "19"))
NODE_CHECKPOINT = 64 << 20     # stored bytes between fsync + sidecar checkpoints of a node-compressed copy
# Resume of a node-compressed copy: run the compressor ("$@") and drop the first
# $1-1 bytes of its output on the node. A fixed script: every value is a positional
# parameter. The exit status is the compressor's (POSIX sh has no pipefail).
SKIP_SCRIPT = ('n=$1; shift; exec 4>&1; '
               'rc=$( { { "$@"; echo $? >&3; } | tail -c "+$n" >&4; } 3>&1 ); exit "${rc:-1}"')


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
    compress_on: str = "auto"           # auto | node | local
    force: bool = False                 # skip the free-space check of an uncompressed copy
    progress: Callable[[dict, int, int], None] | None = None   # (dump, done, total)

    def validate(self) -> None:
        if self.compress not in COMPRESS_SUFFIX:
            raise UsageError(f"invalid --compress {self.compress!r} (choose none, gzip or zstd)")
        if self.makedumpfile and self.compress != "none":
            raise UsageError("--makedumpfile compresses on the node already; use it with --compress none")
        if self.compress_on not in COMPRESS_ON:
            raise UsageError(f"invalid --compress-on {self.compress_on!r} (choose auto, node or local)")
        if self.compress_on == "node" and self.compress == "none":
            raise UsageError("--compress-on node needs --compress gzip or zstd")
        if not 0 <= self.dump_level <= 31:
            raise UsageError(f"invalid --dump-level {self.dump_level} (0-31)")
        check_to(self.to)
        if self.bwlimit is not None and self.bwlimit <= 0:
            raise UsageError("--bwlimit must be greater than zero")
        if self.compress == "zstd":
            zstd_backend()  # fail early and clearly


def check_to(to) -> str:
    """--to: a local directory (created when missing). Refused up front, before any node
    is asked: empty, a NUL, an existing non-directory (or a path under one), or a path
    under /proc or /sys (kernel interfaces, never a place for dumps)."""
    from katactl.values import local_dir

    path = local_dir(to, what="--to", empty_hint="--to must name a directory")
    for p in {path, os.path.realpath(path)}:
        if any(p == top or p.startswith(top + "/") for top in ("/proc", "/sys")):
            raise UsageError(f"invalid --to {to}: {p} is under /proc or /sys, not a place for dumps")
    return path


def _dest_dir(opts: CollectOptions, node_dir: str, sandbox: str) -> str:
    to = os.path.abspath(opts.to)
    d = os.path.join(to, node_dir, sandbox)
    # both names come from the node (its hostname, its directory names): never outside --to
    if os.path.dirname(os.path.dirname(os.path.normpath(d))) != to:
        raise OperationFailed(f"{node_dir!r}/{sandbox!r}: not a directory name katactl can collect into under {to}")
    return d


def collect(transport: NodeTransport, refs: list[str], opts: CollectOptions, *, dump_path: str | None = None,
            kata_config: str | None = None, index: CollectIndex | None = None,
            keep_going: bool = False) -> list[dict]:
    """Collect the dumps named by refs (all with none) into opts.to/<node>/<sandbox>/.

    Items carry the node as list and rm do (``transport.node``), and the directory name
    under opts.to as ``nodeDir`` (:func:`node_name`: locally, the node's hostname).

    keep_going: a dump that fails does not stop the others; it is reported as
    an item ``{name, source, changed: false, error: {code, message, exitCode}}``.
    When it is the only dump, its error is raised as is (like one node's
    failure is the command's failure). Without keep_going the first failure
    is raised. Every collect (and failed one) is in the audit log.
    """
    opts.validate()
    index = index if index is not None else CollectIndex()
    node_dir = node_name(transport)
    results: list[dict] = []

    def collected_before(ref: str) -> bool:
        """A ref that names no dump on the node, but one an earlier collect copied into
        --to (gone since: --delete-after, vmcore rm): done already, changed: false."""
        found = [i for i in collected_gone(opts.to, node_dir, ref, node=transport.node)
                 if i["to"] not in {r["to"] for r in results}]
        for item in found:
            if not opts.dry_run:
                from katactl import audit

                audit.record("vmcore.collect", item["name"], node=transport.node, params=_audit_params(opts),
                             changed=False, to=item["to"], sha256=item["sha256"], deleted=False)
            results.append(item)
        return bool(found)

    dumps = resolve_dumps(transport, refs, dump_path=dump_path, kata_config=kata_config, index=index,
                          missing=collected_before if refs else None)
    for d in dumps:
        try:
            results.append(collect_one(transport, d, node_dir, opts, index))
        except Exception as e:
            if not keep_going or len(dumps) == 1:
                raise

            err = as_katactl_error(e).to_dict()
            if d["name"] not in err["message"]:   # the error line names the node, the message the dump
                err["message"] = f"{d['name']}: {err['message']}"
            results.append({"name": d["name"], "source": d["path"], "changed": False, "error": err})
    return results


def collected_gone(to: str, node_dir: str, ref: str, *, node: str | None = None) -> list[dict]:
    """The collect items (``changed: false``) of the dumps ref names among those collected
    into to/<node_dir>/ (their manifests) whose copy is still there, matched as
    :func:`resolve_dumps` matches a ref (:func:`match_ref`). Used for a ref the node has
    no dump for; ``node``: the items' node (default node_dir)."""
    base = os.path.join(os.path.abspath(to), node_dir)
    try:
        sids = sorted(os.listdir(base))
    except OSError:
        return []
    found = []   # match_ref's entries, each with its item
    for sid in sids:
        d = os.path.join(base, sid)
        manifest = load_manifest(d)
        for stored, e in sorted(manifest["files"].items()):
            src = e.get("source")
            final = os.path.join(d, stored)
            if (e.get("kind") != "vmcore" or not isinstance(src, dict) or not isinstance(src.get("path"), str)
                    or not os.path.isfile(final) or os.path.getsize(final) != e.get("size")):
                continue
            file = posixpath.basename(src["path"])
            item = {"name": f"{sid}/{file}", "node": node or node_dir, "nodeDir": node_dir, "source": src["path"],
                    "to": final, "size": src.get("size"), "compress": e.get("compress"), "compressedOn": None}
            _recorded(item, e)
            item["note"] = "collected before; the dump is no longer on the node"
            pod = manifest.get("podRef", manifest.get("pod"))  # "pod" was this string before review 11
            found.append({"name": item["name"], "path": src["path"], "file": file, "sandbox": sid,
                          "podRef": pod if isinstance(pod, str) else None, "item": item})
    return [e["item"] for e in match_ref(found, ref)]


def _audit_params(opts: CollectOptions) -> dict:
    return {"to": opts.to, "compress": opts.compress, "compressOn": opts.compress_on,
            "makedumpfile": opts.makedumpfile, "deleteAfter": opts.delete_after}


def collect_one(transport: NodeTransport, dump: dict, node_dir: str, opts: CollectOptions,
                index: CollectIndex) -> dict:
    """Collect one dump (an item of :func:`resolve_dumps`); recorded in the audit log
    (``vmcore.collect``) on success, on failure and when interrupted (``result:
    interrupted``), except for a dry run."""
    from katactl import audit

    committed: list[bool] = []      # set once the copy is in place: a failure after it still changed --to
    try:
        r = _collect_one(transport, dump, node_dir, opts, index, committed)
    except BaseException as e:
        if not opts.dry_run:
            # Ctrl-C (KeyboardInterrupt, a BaseException) too: the partial copy it leaves is a change
            interrupted = isinstance(e, KeyboardInterrupt) or getattr(e, "exit_code", None) == 130
            audit.record("vmcore.collect", dump["name"], node=transport.node, params=_audit_params(opts),
                         result="interrupted" if interrupted else "error", changed=bool(committed),
                         error="interrupted" if interrupted else as_katactl_error(e).message)
        raise
    if not opts.dry_run:
        audit.record("vmcore.collect", dump["name"], node=transport.node, params=_audit_params(opts),
                     changed=r["changed"], to=r["to"], sha256=r.get("sha256"), deleted=r.get("deleted"))
    return r


def _collect_one(transport: NodeTransport, dump: dict, node_dir: str, opts: CollectOptions,
                 index: CollectIndex, committed: list[bool]) -> dict:
    src = dump["path"]
    dest_dir = _dest_dir(opts, node_dir, dump["sandbox"])
    stored_name = dump["file"] + COMPRESS_SUFFIX[opts.compress]
    if opts.makedumpfile:
        stored_name = re.sub(r"\.(elf|kdump)$", "", dump["file"]) + ".kdump"
    final = os.path.join(dest_dir, stored_name)
    result = {"name": dump["name"], "node": transport.node, "nodeDir": node_dir, "source": src, "to": final,
              "size": dump["size"],
              "compress": "makedumpfile" if opts.makedumpfile else opts.compress, "compressedOn": None}
    if dump["status"] == "not-regular":  # a FIFO would block the copy forever
        raise OperationFailed(f"{dump['name']}: {dump['problem']}: not a dump that can be copied")
    if dump["status"] == "incomplete":
        why = ("has no end marker of a flattened kdump stream" if dump["format"] == "kdump-flat"
               else "is short of its ELF segments")
        raise Refused(f"{dump['name']}: the dump is incomplete (size {dump['size']} {why}): "
                      "still being written, or truncated",
                      hint="wait for the dump to finish (katactl vmcore list shows its status)")
    if dump["status"] == "unreadable":
        # not known to be complete: a copy could take a dump still being written for a whole one
        raise OperationFailed(f"{dump['name']}: the end of the dump could not be read on node {transport.node}, "
                              "so it is not known to be complete", hint="run collect again")
    lock = _CopyLock(final)
    for p in (final, final + ".partial", final + ".partial.json", lock.path):
        if os.path.isdir(p) or (os.path.lexists(p) and not os.path.isfile(p)):
            raise OperationFailed(f"{p}: is a directory or special file where the copy of {dump['name']} "
                                  "(or its partial copy) goes", hint="move it aside, or choose another --to")
    try:
        # taken before the record and the sidecar are read; a directory that does not exist
        # yet holds neither: prepare() takes it once it made the directory
        if not opts.dry_run and os.path.isdir(dest_dir):
            lock.acquire(dump["name"])
        try:
            return _collect_locked(transport, dump, node_dir, opts, index, dict(result), lock, committed)
        except _Replan:
            return _collect_locked(transport, dump, node_dir, opts, index, dict(result), lock, committed)
    finally:
        lock.release()


def _collect_locked(transport: NodeTransport, dump: dict, node: str, opts: CollectOptions, index: CollectIndex,
                    result: dict, lock: "_CopyLock", committed: list[bool]) -> dict:
    src, final = dump["path"], result["to"]
    src_dir = posixpath.dirname(src)
    dest_dir, stored_name = os.path.split(final)
    entry = load_manifest(dest_dir)["files"].get(stored_name)
    if (entry and entry.get("source", {}).get("size") == dump["size"]
            and same_mtime(entry.get("source", {}).get("mtime"), dump["mtime"])
            and os.path.exists(final) and os.path.getsize(final) == entry.get("size")):
        _recorded(result, entry)
        if opts.delete_after and not opts.dry_run:
            _verify_against_node(transport, src, entry.get("source", {}).get("sha256"))
            _delete_source(transport, dump)
            result.update(changed=True, deleted=True)
        return result
    tool = None
    if opts.makedumpfile:
        result["compressedOn"] = "node"
    elif opts.compress != "none":
        tool = _compress_where(transport, dump, final, opts)
        result["compressedOn"] = "node" if tool else "local"
    if opts.dry_run:
        if opts.compress == "none" and not opts.makedumpfile and not opts.force:
            # the real run's check (_copy_dump), so a dry run predicts its refusal (exit 5)
            _check_space(transport, src, dump["size"], _plain_resume(final, _ident(transport, dump, opts),
                                                                      dump["size"]), final)
        result.update(changed=True, dryRun=True, deleted=False, verified=False)
        return result
    if opts.makedumpfile:
        _probe_makedumpfile(transport)
    meta_entries: dict = {}

    def prepare() -> None:
        """Once the space check passed, before the dump's bytes: the directory, then the
        metadata (small); the manifest comes after both."""
        os.makedirs(dest_dir, mode=0o700, exist_ok=True)
        os.chmod(dest_dir, 0o700)
        if lock.fd is None:
            lock.acquire(dump["name"])
            if any(os.path.lexists(final + x) for x in ("", ".partial", ".partial.json")):
                raise _Replan   # another collect came and went since this one looked: look again
        meta_entries.update(_copy_metadata(transport, src_dir, dest_dir, dump["name"], opts))

    if opts.makedumpfile:
        info = _collect_makedumpfile(transport, dump, final, opts, prepare)
    elif tool:
        info = _copy_dump_node(transport, dump, final, opts, tool, prepare)
    else:
        info = _copy_dump(transport, dump, final, opts, prepare)
    entry = {"size": info["size"], "sha256": info["sha256"], "kind": "vmcore", "compress": result["compress"],
             "compressedOn": result["compressedOn"],
             "source": {"path": src, "size": dump["size"], "mtime": dump["mtime"],
                        "sha256": info.get("source_sha256")},
             "verified": info["verified"], "verification": info["verification"],
             "collectedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def commit() -> None:
        _commit(info["part"], final, _Sidecar(final))
        committed.append(True)

    try:
        update_manifest(dest_dir, {**meta_entries, stored_name: entry},
                        {"node": node, "sandbox": dump["sandbox"], "pod": dump.get("pod"), "podRef": dump.get("podRef"),
                         "podUid": dump.get("podUid"),
                         "hypervisorVersion": dump.get("hypervisorVersion")}, commit)
    except OSError as e:
        if committed or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _manifest_full(dest_dir, dump["name"], final, opts, tool is not None) from None
    index.add(transport, src, dump["size"], dump["mtime"], final, dest_dir, info["sha256"])
    result.update(changed=True, sha256=info["sha256"], verified=info["verified"],
                  verification=info["verification"], resumed=info.get("resumed", False),
                  storedSize=info["size"], transferredBytes=info["transferred"], deleted=False)
    if info.get("note"):
        result["note"] = info["note"]
    if opts.delete_after:
        _verify_against_node(transport, src, info.get("source_sha256"))
        _delete_source(transport, dump)
        result["deleted"] = True
    return result


class _Replan(Exception):
    """The copy was planned without the lock (its directory did not exist yet) and another
    collect wrote there before this one took it: plan again, under the lock."""


def _recorded(result: dict, entry: dict) -> dict:
    """A dump collected before (its manifest entry): the item of a full collect, nothing
    done this time. ``verification``/``compressedOn`` are null in a manifest older than them."""
    result.update(changed=False, sha256=entry["sha256"], verified=entry.get("verified", True),
                  verification=entry.get("verification"), resumed=False, storedSize=entry.get("size"),
                  transferredBytes=0, deleted=False)
    if result.get("compressedOn") is None:
        result["compressedOn"] = entry.get("compressedOn")
    return result


class _CopyLock:
    """The lock of one dump's copy in one --to: ``<final>.lock``, an exclusive flock held
    from before the manifest and the sidecar are read until after the commit (and
    --delete-after). A second collect of the same dump into the same place is refused
    (exit 5) instead of resuming from, and cutting back, a partial the first is still
    writing. The file is removed on release, while still locked; a run that locked a file
    removed meanwhile (not the one at the path) tries again."""

    def __init__(self, final: str):
        self.path = final + ".lock"
        self.fd: int | None = None

    def acquire(self, name: str) -> None:
        import fcntl

        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                if e.errno != errno.EROFS:
                    raise
                # a read-only --to (an archive mounted ro): no run can write there, so there is
                # nothing to guard; a dump collected before is still a no-op, a copy fails as ever
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st, cur = os.fstat(fd), os.stat(self.path)
            except BlockingIOError:
                holder = _lock_holder(os.pread(fd, 256, 0))
                os.close(fd)
                raise Refused(f"{name}: another collect ({holder}) is copying this dump into "
                              f"{os.path.dirname(self.path)}",
                              hint="wait for it to finish: collect again is then a no-op") from None
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            if (st.st_dev, st.st_ino) != (cur.st_dev, cur.st_ino):
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            except OSError:
                pass    # a full disk: the lock holds all the same, its holder is unnamed
            self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def _lock_holder(raw: bytes) -> str:
    try:
        d = json.loads(raw)
        pid, host = int(d["pid"]), str(d.get("host") or "")
    except (ValueError, TypeError, KeyError):
        return "pid unknown"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


#: a metadata file up to this size is read in a batch with others (one round trip over SSH);
#: a larger one streams. A batch holds at most META_BATCH bytes: memory stays bounded whatever
#: state/ (the node's ``cp -ar`` of the sandbox's state) holds
META_SMALL = 1 << 20
META_BATCH = 4 << 20


def _copy_metadata(transport: NodeTransport, src_dir: str, dest_dir: str, name: str, opts: CollectOptions) -> dict:
    """hypervisor.conf, hypervisor.version and state/ (what kata-containers
    src/runtime/virtcontainers/qemu.go ``dumpSandboxMetaInfo`` writes beside a dump: state/ is
    ``/bin/cp -ar <RunStorePath>/<id>``, any size): small files in batches, larger ones
    streamed (at --bwlimit). A full disk here is the disk-full error naming the destination."""
    # only regular files: a FIFO as hypervisor.version would block the read forever
    meta = transport.stat_many([f"{src_dir}/{m}" for m in METADATA])
    files = [(p, posixpath.basename(p), st.size) for p, st in meta.items()
             if not isinstance(st, OSError) and (st.mode & 0o170000) == 0o100000]
    files += [(p, posixpath.relpath(p, src_dir), st.size) for p, st in transport.walk(f"{src_dir}/state")
              if (st.mode & 0o170000) == 0o100000]
    entries: dict = {}
    limit = RateLimit(opts.bwlimit)
    sent = [0]

    def store(rel: str, chunks: Iterator[bytes]) -> None:
        h, n = hashlib.sha256(), 0

        def hashed() -> Iterator[bytes]:
            nonlocal n
            for b in chunks:
                h.update(b)
                n += len(b)
                sent[0] += len(b)
                limit(sent[0])
                yield b

        dst = os.path.join(dest_dir, *rel.split("/"))
        try:
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            atomic_write_stream(dst, hashed(), 0o600)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OperationFailed(f"destination {dest_dir} is full: {rel} of {name} could not be written",
                                  hint="free space (or choose another --to) and run the same collect again") from None
        entries[rel] = {"size": n, "sha256": h.hexdigest(), "kind": "metadata"}

    small = [(p, rel, size) for p, rel, size in files if size <= META_SMALL]
    i = 0
    while i < len(small):
        batch: list[tuple[str, str, int]] = []
        total = 0
        while i < len(small) and (not batch or total + small[i][2] <= META_BATCH):
            batch.append(small[i])
            total += small[i][2]
            i += 1
        got = transport.read_many([p for p, _, _ in batch], limit=META_SMALL + 1)
        for p, rel, _ in batch:
            data = got[p]
            if isinstance(data, OSError):
                raise data
            if len(data) > META_SMALL:      # grew since it was listed: it streams
                files.append((p, rel, len(data)))
                continue
            store(rel, iter((data,)))
    for p, rel, size in files:
        if size > META_SMALL:
            store(rel, transport.open_stream(p, 0, CHUNK))
    return entries


class _Sidecar:
    def __init__(self, final: str):
        self.path = final + ".partial.json"

    def load(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
            return d if isinstance(d, dict) else None
        except (OSError, ValueError, RecursionError):
            return None

    def save(self, d: dict) -> None:
        atomic_write(self.path, json.dumps(d).encode(), 0o600)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _disk_full(final: str, fd: int, side: "_Sidecar", total: int, resumable: int, compressed: str | None,
               why: str = "") -> OperationFailed:
    """The destination filled mid-copy (ENOSPC, EDQUOT). ``resumable``: the bytes of the partial
    copy a resume starts from (its last checkpoint; all of an uncompressed one); what lies past
    them is cut off now (a resume drops it anyway), which gives the full disk that room back.
    With nothing resumable (``why`` says why), the partial copy and its record go: kept, they
    would only keep the disk full. The bytes named are those in the file (what was written,
    not what was handed to write)."""
    stored = os.fstat(fd).st_size
    where, name = os.path.dirname(final), os.path.basename(final) + ".partial"
    what = f" of {compressed} data" if compressed else ""
    hint = "free space (or choose another --to) and run the same collect again"
    if resumable <= 0:
        _discard(final + ".partial", side)
        return OperationFailed(f"destination {where} is full: {stored} bytes{what} of the {total}-byte dump "
                               f"were written, none of them resumable{f' ({why})' if why else ''}; "
                               "the partial copy was removed", hint=hint + " (it copies the dump from the start)")
    if resumable < stored:
        try:
            os.ftruncate(fd, resumable)
        except OSError:
            pass
    return OperationFailed(f"destination {where} is full: the partial copy {name} holds {resumable} bytes{what} "
                           f"of the {total}-byte dump; it is kept", hint=hint + " to resume from it")


def _plain_resume(final: str, ident: dict, size: int) -> int:
    """The bytes an uncompressed copy resumes from: its partial copy's, when the sidecar
    names the same source (else 0: copied from the start)."""
    part = final + ".partial"
    state = _Sidecar(final).load()
    if state and state.get("source") == ident and os.path.exists(part):
        return min(os.path.getsize(part), size)
    return 0


def _existing_dir(path: str) -> str:
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _copy_dump(transport: NodeTransport, dump: dict, final: str, opts: CollectOptions, prepare=None) -> dict:
    """Stream one dump into final.partial and verify it; the caller commits it (``part`` in
    the result). ``prepare()`` runs once the space check passed and before anything is
    written: a refused copy leaves no file behind."""
    src, size, mtime = dump["path"], dump["size"], dump["mtime"]
    part = final + ".partial"
    side = _Sidecar(final)
    ident = _ident(transport, dump, opts)
    state = side.load()
    resume_src = resume_dst = 0
    note = None
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if state and state.get("source") == ident and os.path.exists(part):
        if opts.compress == "none":
            resume_src = resume_dst = min(have, size)
        else:
            resume_src, resume_dst = _offset(state, "srcOffset"), _offset(state, "dstOffset")
            if have < resume_dst:
                resume_src = resume_dst = 0
                note = (f"the partial copy ({have} bytes) is shorter than its last checkpoint "
                        f"({state.get('dstOffset')} bytes)")
            elif not resume_src and have:
                note = (f"the partial copy had no complete {opts.compress} segment yet "
                        f"(compressed copies resume at {SEGMENT >> 20} MiB boundaries)")
    elif have:
        note = ("the partial copy has no readable record (.partial.json)" if not state
                else "the partial copy was made from another source or with other options "
                     "(size, mtime or --compress differ)")
    if note:
        note += "; it was discarded: copied from the start"
    if opts.compress == "none" and not opts.force:
        _check_space(transport, src, size, resume_dst, final)
    fd = _open_partial(part, side, {"source": ident, "srcOffset": resume_src, "dstOffset": resume_dst},
                       prepare)
    try:
        src_hash = Hasher()
        # prefix: re-hash what is already on the local disk
        if resume_src:
            _hash_prefix(part, resume_dst, opts.compress, src_hash)
        os.lseek(fd, resume_dst, os.SEEK_SET)
        writer = make_writer(opts.compress, fd, one_core=not transport.is_remote)
        limit = RateLimit(opts.bwlimit)
        done = resume_src
        seg_left = SEGMENT - (resume_src % SEGMENT) if opts.compress != "none" else None
        if opts.progress:
            opts.progress(dump, done, size)
        try:
            stream = Prefetch(transport.open_stream(src, offset=resume_src, chunk_size=CHUNK))
        except FileNotFoundError:
            src_hash.close()
            raise OperationFailed(f"{src}: the source dump vanished before the copy started") from None
        full = False
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
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            full = True
        finally:
            writer.close()      # a compressing writer flushes what it buffered: before the partial is measured
            stream.close()
            src_hash.close()
        if full:
            if opts.compress == "none":
                resumable = os.fstat(fd).st_size
            else:
                st = side.load() or {}   # the last checkpoint that was saved (the disk may have refused one)
                resumable = _offset(st, "dstOffset") if _offset(st, "srcOffset") else 0
            raise _disk_full(final, fd, side, size, resumable, None if opts.compress == "none" else opts.compress,
                             f"a copy compressed here resumes from a complete {SEGMENT >> 20} MiB segment, "
                             "and none was written")
        os.fsync(fd)
        if done != size:
            raise OperationFailed(f"{src}: the source dump shrank during the copy: got {done} of {size} bytes; "
                                  f"the partial copy is kept as {os.path.basename(part)}")
        if opts.compress != "none":
            # all of it is a checkpoint: a manifest the full disk refuses leaves nothing to fetch again
            _checkpoint(fd, side, {"source": ident, "srcOffset": size, "dstOffset": os.fstat(fd).st_size})
    finally:
        os.close(fd)
    _check_unchanged(transport, src, size, mtime, part)
    source_sha = src_hash.hexdigest()
    resumed = resume_src > 0
    verification = "stream"
    if resumed or opts.verify_source:
        prefix_len = resume_src if resumed else size
        kind, value = _node_sha256(transport, src, prefix_len)
        if kind == "full" and value != source_sha:
            _discard(part, side)
            raise OperationFailed(f"{src}: sha256 mismatch after resume (node {value[:12]}, copy "
                                  f"{source_sha[:12]}); the partial copy was discarded, run collect again")
        if kind == "prefix" and value != (source_sha if prefix_len == size else
                                          _prefix_hash_local(part, resume_dst, opts.compress)):
            _discard(part, side)
            raise OperationFailed(f"{src}: the resumed prefix does not match the source; the partial copy "
                                  "was discarded, run collect again")
        verification = "node-sha256sum" if kind == "full" else "prefix-rehash"
    stored_sha = source_sha if opts.compress == "none" else hash_file(part)
    return {"size": os.path.getsize(part), "sha256": stored_sha, "source_sha256": source_sha, "verified": True,
            "verification": verification, "resumed": resumed, "transferred": done - resume_src, "note": note,
            "part": part}


def _allocated(transport: NodeTransport, path: str) -> int | None:
    """The bytes the node's filesystem allocates to path (``stat -c '%b %B'``: st_blocks
    times their unit; SFTP attributes carry no block count), None when unknown."""
    try:
        r = transport.run(["stat", "-L", "-c", "%b %B", "--", real_path(transport, path)], timeout=30)
        blocks, unit = r.stdout.split() if r.returncode == 0 else (b"", b"")
        return int(blocks) * int(unit)
    except (OSError, ValueError):
        return None


def _check_space(transport: NodeTransport, src: str, size: int, done: int, final: str) -> None:
    """An uncompressed copy must fit. All-zero 64 KiB blocks are written as holes, so it
    takes at most the source's allocated size (less on a sparse source) and the rest of the
    apparent size, but possibly far less (QEMU writes zero pages, dumps are mostly zero):
    the need is an upper bound, and --force copies anyway (a full disk stops the copy,
    the partial is kept and resumed). A compressed copy has no check: its size is unknown
    until it is written, and the same full-disk stop applies."""
    where = _existing_dir(os.path.dirname(final))
    free = shutil.disk_usage(where).free
    need = size - done
    alloc = _allocated(transport, src)
    if alloc is not None:
        need = min(need, alloc)
    if free < need:
        raise Refused(f"destination {where} has {free} bytes free; the copy of {src} may need up to {need} "
                      f"more ({'its allocated size on the node' if need == alloc else 'the rest of its size'}; "
                      "zero pages become holes, so it may take less)",
                      hint="free space, choose another --to, use --compress, or --force to copy anyway "
                           "(a full disk stops the copy and keeps it for a resume)")


def _offset(state: dict, key: str) -> int:
    """A checkpoint offset from the sidecar; 0 (start again) for anything but a whole number >= 0."""
    v = state.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _open_partial(part: str, side: "_Sidecar", checkpoint: dict, prepare) -> int:
    """Once the space check passed: ``prepare()``; a fresh copy (``dstOffset`` 0) drops an
    old partial; the sidecar names the source; the partial is opened (0600) and cut back
    to the checkpoint. Returns its descriptor."""
    if prepare is not None:
        prepare()
    if checkpoint["dstOffset"] == 0:
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
    side.save(checkpoint)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, checkpoint["dstOffset"])
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ident(transport: NodeTransport, dump: dict, opts: CollectOptions) -> dict:
    """What a partial copy was made from (kept in its sidecar; a resume needs the same)."""
    return {"path": dump["path"], "size": dump["size"], "mtime": dump["mtime"], "compress": opts.compress,
            "node": transport.node}


def _check_unchanged(transport: NodeTransport, src: str, size: int, mtime, part: str) -> None:
    """After the copy: the source must still be there, unchanged (size, and mtime unless None)."""
    try:
        st = transport.stat(src)
    except FileNotFoundError:
        raise OperationFailed(f"{src}: the source dump vanished during the copy; the partial copy is "
                              f"kept as {part} and is not a verified dump") from None
    if st.size != size or (mtime is not None and not same_mtime(st.mtime, mtime)):
        raise OperationFailed(f"{src}: the source dump changed during the copy (size/mtime); "
                              "run collect again to copy it afresh")


def _commit(part: str, final: str, side: "_Sidecar") -> None:
    """The verified partial becomes final (rename, directory fsync). Run by
    records.update_manifest once the new manifest is written (not yet in place)."""
    os.rename(part, final)
    fsync_dir(os.path.dirname(final))
    side.remove()


def _manifest_full(dest_dir: str, name: str, final: str, opts: CollectOptions, on_node: bool) -> OperationFailed:
    """The disk filled while the manifest was written, before the copy was committed. What a
    re-run resumes from is kept, as :func:`_disk_full` does: all of an uncompressed copy, a
    compressed one from its last checkpoint (all of it when the full disk took that one too).
    A compressed copy with no checkpoint, or a filtered one (--makedumpfile, made afresh
    each time), goes: kept, it would only keep the disk full."""
    part, side = final + ".partial", _Sidecar(final)
    msg = (f"destination {dest_dir} is full: the copy of {name} is complete, but its manifest "
           "(manifest.json, SHA256SUMS) could not be written")
    st = side.load() or {}
    if opts.makedumpfile:
        resumable = False
    elif opts.compress == "none":
        resumable = True
    else:
        resumable = _offset(st, "dstOffset") > 0 and (on_node or _offset(st, "srcOffset") > 0)
    if not resumable:
        _discard(part, side)
        return OperationFailed(f"{msg}; none of it is resumable, so the copy was removed",
                               hint="free space and run the same collect again (it copies the dump from the start)")
    return OperationFailed(f"{msg}; the copy is kept as {os.path.basename(part)}",
                           hint="free space and run the same collect again to resume from it")


# -- node-side compression ------------------------------------------------------
_TOOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def node_compressor(transport: NodeTransport, algo: str) -> dict | None:
    """``{"argv": [...], "version": ...}``: how algo's compressor runs on the node, at idle
    priority when ionice/nice are there; None when the node lacks it. Probed with argvs
    (``zstd --version``; the whole chain first, so usually one round trip), once per
    transport."""
    cache = _TOOLS.setdefault(transport, {})
    if algo not in cache:
        cache[algo] = _probe_compressor(transport, algo)
    return cache[algo]


def _probe(transport: NodeTransport, argv) -> str | None:
    """The first line of argv's output when it runs and exits 0, else None."""
    try:
        r = transport.run(list(argv), timeout=30)
    except (FileNotFoundError, PermissionError):
        return None
    if r.returncode != 0:
        return None
    text = (r.stdout or r.stderr).decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else ""


def idle_prefix(transport: NodeTransport) -> list[str]:
    """``ionice -c3 nice -n 19`` (what of it the node has): the argv prefix that runs a
    program over a whole dump (compressor, SHA-256) at idle CPU and disk priority. Probed
    once per transport (one round trip when both are there)."""
    cache = _TOOLS.setdefault(transport, {})
    if "idle" not in cache:
        full = [a for p in IDLE_PRIORITY for a in p]
        cache["idle"] = full if _probe(transport, [*full, "true"]) is not None else [
            a for p in IDLE_PRIORITY if _probe(transport, [*p, "true"]) is not None for a in p]
    return cache["idle"]


def _probe_compressor(transport: NodeTransport, algo: str) -> dict | None:
    tool = NODE_COMPRESSOR[algo]
    prefix = idle_prefix(transport)
    version = _probe(transport, [*prefix, tool[0], "--version"])
    if version is None:
        return None
    return {"argv": [*prefix, *tool], "version": version}


def _compress_where(transport: NodeTransport, dump: dict, final: str, opts: CollectOptions) -> dict | None:
    """The node's compressor (see node_compressor) when this copy compresses there, else
    None (in katactl's process). auto: a node that has it, unless a partial copy compressed
    in-process is waiting to be resumed; node: the node must have it. The local node too
    (katactl on the node, --host-root): there the compressor is a process of this machine,
    at idle priority and on one core like on a remote node, so online pods keep the CPU and
    the disk."""
    if opts.compress_on == "local":
        return None
    if opts.compress_on == "auto":
        state = _Sidecar(final).load()
        if state and state.get("source") == _ident(transport, dump, opts) and os.path.exists(final + ".partial"):
            return None
    tool = node_compressor(transport, opts.compress)
    if tool is None and opts.compress_on == "node":
        raise OperationFailed(f"--compress-on node: {NODE_COMPRESSOR[opts.compress][0]} is not installed "
                              f"on node {transport.node} (or not on its PATH)",
                              hint=f"install {opts.compress} on the node, or use --compress-on auto "
                                   "(compresses here when the node cannot)")
    return tool


def _copy_dump_node(transport: NodeTransport, dump: dict, final: str, opts: CollectOptions, tool: dict, prepare=None) -> dict:
    """Stream the node's compressor output for one dump into final.partial (the caller
    commits it, as with :func:`_copy_dump`), decompressing it here on the fly to hash and
    count the original bytes."""
    src, size, mtime = dump["path"], dump["size"], dump["mtime"]
    part = final + ".partial"
    side = _Sidecar(final)
    argv = [*tool["argv"], real_path(transport, src)]
    ident = dict(_ident(transport, dump, opts), compressor={"argv": argv, "version": tool["version"]})
    state = side.load()
    resume_dst, note = 0, None
    have = os.path.getsize(part) if os.path.exists(part) else 0
    source = state.get("source") if state else None
    if state and os.path.exists(part) and source == ident:
        resume_dst = min(_offset(state, "dstOffset"), have)
    elif (isinstance(source, dict) and os.path.exists(part)
          and {k: v for k, v in source.items() if k != "compressor"} == _ident(transport, dump, opts)):
        note = ("a partial copy made by another compressor (version, options or place) was discarded: "
                "copied from the start")
    elif have:
        note = (("the partial copy has no readable record (.partial.json)" if not state
                 else "the partial copy was made from another source or with other options "
                      "(size, mtime or --compress differ)") + "; it was discarded: copied from the start")
    fd = _open_partial(part, side, {"source": ident, "dstOffset": resume_dst}, prepare)
    stored_hash, src_hash = Hasher(), Hasher()
    inflater = Inflater(opts.compress, src_hash.update)
    stream = None
    written = resume_dst
    bad: list = []          # the stored bytes are unusable (undecodable, too many): no resume from them

    def inflate(b: bytes | None) -> None:
        try:
            inflater.feed(b) if b is not None else inflater.finish()
        except OperationFailed:
            bad.append(True)
            raise
        if inflater.out > size:
            bad.append(True)
            raise OperationFailed(f"the source dump grew during the copy (was {size} bytes)")
    try:
        # the stored prefix: hashed and decompressed again here, not fetched again
        for b in iter_uncompressed(part, resume_dst, "none"):
            stored_hash.update(b)
            inflate(b)
            if opts.progress:
                opts.progress(dump, min(inflater.out, size), size)
        run_argv = argv if not resume_dst else ["sh", "-c", SKIP_SCRIPT, "katactl-skip", str(resume_dst + 1), *argv]
        # the compressor may run for long before its first byte (idle priority; a resume's skipped prefix)
        wait = max(transport.timeout, 3600.0 if resume_dst else 300.0)
        stream = Prefetch(_NodeOutput(transport, run_argv, wait, NODE_COMPRESSOR[opts.compress][0], src))
        os.lseek(fd, resume_dst, os.SEEK_SET)
        limit = RateLimit(opts.bwlimit)
        mark = written
        for chunk in stream:
            mv = memoryview(chunk)
            while mv:
                mv = mv[os.write(fd, mv):]
            written += len(chunk)
            stored_hash.update(chunk)
            inflate(chunk)
            if written - mark >= NODE_CHECKPOINT:
                os.fsync(fd)
                side.save({"source": ident, "dstOffset": written})
                mark = written
            limit(written - resume_dst)                 # --bwlimit: the bytes on the wire
            if opts.progress:
                opts.progress(dump, inflater.out, size)
        inflate(None)
        os.fsync(fd)
        _checkpoint(fd, side, {"source": ident, "dstOffset": written})   # all of it (see _copy_dump)
    except BaseException as e:
        if not bad:
            _checkpoint(fd, side, {"source": ident, "dstOffset": written})
        else:
            _discard(part, side)
            if isinstance(e, OperationFailed):
                raise OperationFailed(f"{src}: {e.message}; the partial copy was discarded",
                                      hint="run collect again: it copies that dump afresh") from None
        if not bad and isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # the checkpoint saved last (the full disk may have refused this one)
            raise _disk_full(final, fd, side, size, _offset(side.load() or {}, "dstOffset"), opts.compress,
                             f"the node's compressor output resumes from a checkpoint, one every "
                             f"{NODE_CHECKPOINT >> 20} MiB stored, and none was reached") from None
        raise
    finally:
        if stream is not None:
            stream.close()
        inflater.close()
        os.close(fd)
        stored_hash.close()
        src_hash.close()
    done = inflater.out
    if done != size:
        _discard(part, side)
        raise OperationFailed(f"{src}: the node's compressor gave {done} bytes of the {size}-byte dump "
                              "(the source shrank, or the stream was cut); the partial copy was discarded, "
                              "run collect again")
    _check_unchanged(transport, src, size, mtime, part)
    source_sha = src_hash.hexdigest()
    resumed = resume_dst > 0
    verification = "stream"
    if resumed or opts.verify_source:
        kind, value = _node_sha256(transport, src, size)
        if value != source_sha:
            _discard(part, side)
            raise OperationFailed(f"{src}: sha256 mismatch{' after resume' if resumed else ''} (node {value[:12]}, "
                                  f"copy {source_sha[:12]}); the partial copy was discarded, run collect again")
        verification = "node-sha256sum" if kind == "full" else "prefix-rehash"
    stored_sha = stored_hash.hexdigest()
    return {"size": os.path.getsize(part), "sha256": stored_sha, "source_sha256": source_sha, "verified": True,
            "verification": verification, "resumed": resumed, "transferred": written - resume_dst,
            "note": note, "part": part}


class _NodeOutput:
    """The compressor's stdout (``transport.run_stream``); its failure (exit status, stderr)
    named as such. ``cancel()`` reaches the transport's stream (a local process group: see
    LocalTransport.run_stream) from another thread, for :class:`Prefetch`."""

    def __init__(self, transport: NodeTransport, argv: list, wait: float, tool: str, src: str):
        self._what = (transport.node, tool, src)
        try:
            self._stream = transport.run_stream(argv, CHUNK, timeout=wait)
        except OSError as e:
            raise self._failed(e) from None
        self._it = self._chunks()

    def _failed(self, e: OSError) -> OperationFailed:
        node, tool, src = self._what
        if isinstance(e, FileNotFoundError):
            return OperationFailed(f"{tool} is no longer on node {node}",
                                   hint="run collect again (it resumes), or use --compress-on local")
        return OperationFailed(f"{src}: {tool} failed on node {node}: {e.strerror or e}",
                               hint="run collect again to resume, or use --compress-on local")

    def _chunks(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except OSError as e:
            raise self._failed(e) from None

    def __iter__(self) -> Iterator[bytes]:
        return self._it

    def cancel(self) -> None:
        cancel = getattr(self._stream, "cancel", None)
        if cancel is not None:
            cancel()

    def close(self) -> None:
        self._it.close()    # type: ignore[attr-defined]


def _checkpoint(fd: int, side: "_Sidecar", state: dict) -> None:
    """What is stored (fsynced) is where a resume starts: an interrupted node-compressed copy,
    or a complete compressed one. Best effort: on a full disk the last checkpoint stands."""
    try:
        os.fsync(fd)
        side.save(state)
    except OSError:
        pass


def _discard(part: str, side: _Sidecar) -> None:
    try:
        os.unlink(part)
    except FileNotFoundError:
        pass
    side.remove()


def _hash_prefix(part: str, dst_len: int, compress: str, h) -> None:
    for b in iter_uncompressed(part, dst_len, compress):
        h.update(b)


def _prefix_hash_local(part: str, dst_len: int, compress: str) -> str:
    h = hashlib.sha256()
    _hash_prefix(part, dst_len, compress, h)
    return h.hexdigest()


#: SHA-256 of the file named by argv[1], in python3 (hashlib is OpenSSL's), for nodes without openssl
_PY_SHA256 = r"""
import hashlib, sys
h = hashlib.sha256()
buf = bytearray(1 << 20)
view = memoryview(buf)
with open(sys.argv[1], "rb", buffering=0) as f:
    while True:
        n = f.readinto(buf)
        if not n:
            break
        h.update(view[:n])
print(h.hexdigest())
""".strip()


def _node_hashers(path: str) -> list[list[str]]:
    """argv of the node's SHA-256 programs, fastest first: OpenSSL's code (openssl, then
    python3's hashlib) is ~4x coreutils sha256sum on current x86 CPUs (SHA-NI/AVX2).
    openssl's -r prints sha256sum's format; it gets no ``--`` (OpenSSL 1.1 lacks it),
    so only an absolute path, which cannot be read as an option."""
    out = [["openssl", "dgst", "-sha256", "-r", path]] if path.startswith("/") else []
    return out + [["python3", "-I", "-S", "-c", _PY_SHA256, path], ["sha256sum", "--", path]]


def _node_sha256(transport: NodeTransport, path: str, prefix_len: int) -> tuple[str, str]:
    """('full', hex) from the node's fastest SHA-256 program (_node_hashers), else
    ('prefix', hex) by re-reading prefix_len bytes."""
    prefix = idle_prefix(transport)     # a full read of the dump: not at the online pods' expense
    for argv in _node_hashers(real_path(transport, path)):
        argv = [*prefix, *argv]
        try:
            r = transport.run(argv, timeout=3600)
        except OSError:
            continue
        m = re.match(rb"^\\?([0-9a-f]{64})\s", r.stdout) if r.returncode == 0 else None
        if m:
            return "full", m.group(1).decode()
    h = hashlib.sha256()
    left = prefix_len
    for b in transport.open_stream(path, 0, CHUNK):
        if left <= 0:
            break
        b = b[:left]
        left -= len(b)
        h.update(b)
    return "prefix", h.hexdigest()


def _verify_against_node(transport: NodeTransport, src: str, source_sha: str | None) -> None:
    """Before deleting a node's dump: the node's own sha256 must equal our copy's."""
    if not source_sha:
        # a copy filtered by makedumpfile without --delete-after/--verify: nothing ties it to the original
        raise Refused(f"{src}: no checksum of the original was recorded when it was collected; not deleting it",
                      hint="check the copy, then delete the dump with katactl vmcore rm")
    r = _node_sha256(transport, src, 1 << 62)
    if r[1] != source_sha:
        raise Refused(f"{src}: the node's sha256 ({r[1][:12]}) differs from the collected copy "
                      f"({source_sha[:12]}); not deleting it")


def _delete_source(transport: NodeTransport, dump: dict) -> None:
    """Delete a verified dump on the node (its sandbox dir too once no dump is left)."""
    remove_dumps(transport, [dump])


def _probe_makedumpfile(transport: NodeTransport) -> None:
    try:
        r = transport.run(["makedumpfile", "-v"], timeout=30)
        ok = r.returncode != 127
    except (FileNotFoundError, PermissionError):
        ok = False
    if not ok:
        raise OperationFailed(f"makedumpfile is not installed on node {transport.node}",
                              hint="apt-get install makedumpfile on the node, or collect without --makedumpfile")


#: a makedumpfile temp file not modified for this long, by the node's clock, is stale: left by a
#: collect killed with -9, an SSH drop, or an older katactl. A live collect touches its own
#: every HEARTBEAT seconds (reading it for the copy does not modify it), so it never looks that old.
STALE_TMP_AGE = 600.0
HEARTBEAT = 60.0

#: temp files of (any) collect's makedumpfile in a dump's directory, with the node-clock probes
#: of :func:`_sweep_tmp` (".katactl-<name>.tmp" without a token: an older katactl's)
_OURS = re.compile(r"\.katactl-.+\.(tmp|clock)")


def makedumpfile_tmp(dump_path: str, final: str, token: str) -> str:
    """The node path makedumpfile writes the filtered copy of dump_path to: beside it, one per
    collect (token), so no collect ever uses, or removes, another's; makedumpfile refuses an
    existing output file ("check_dump_file: Can't open the dump file ... File exists",
    makedumpfile.c), which a fresh name never is."""
    return f"{posixpath.dirname(dump_path)}/.katactl-{os.path.basename(final)}.{token}.tmp"


def _sweep_tmp(transport: NodeTransport, tmp: str) -> None:
    """Before filtering: the stale temp files of other collects in this dump's directory go
    (the crash disk is short of room). A younger one belongs to a collect that may still run
    (it touches it every HEARTBEAT s): left alone, it blocks nothing. Ages are taken on the
    node's clock, never this client's (which may run ahead of it): the mtime of a directory
    made on the node just now is the node's "now" (as katactl/upgrade/lock.py does). Best
    effort: another collect sweeping the same file at once, or a file that cannot be read,
    never fails this collect."""
    d = posixpath.dirname(tmp)
    clock = tmp[:-len(".tmp")] + ".clock"
    try:
        names = [f"{d}/{n}" for n in transport.listdir(d) if _OURS.fullmatch(n)]
        transport.mkdir(clock, mode=0o700, parents=False)
        try:
            st = transport.stat_many([clock, *names], follow_symlinks=False)
        finally:
            transport.remove(clock, recursive=True)
    except OSError:
        return
    now = st[clock]
    if isinstance(now, OSError):
        return
    for path in names:
        s = st[path]
        if isinstance(s, OSError) or now.mtime - s.mtime <= STALE_TMP_AGE:
            continue
        kind = s.mode & 0o170000
        if (kind == 0o100000 and path.endswith(".tmp")) or (kind == 0o040000 and path.endswith(".clock")):
            try:
                transport.remove(path, recursive=kind == 0o040000)
            except OSError:
                pass    # gone already: another collect swept it first


class _Heartbeat:
    """Touches this collect's temp file on the node every HEARTBEAT s while the collect uses it:
    once makedumpfile is done, the copy only reads it (a slow link, --bwlimit), and an
    unmodified file would look stale to another collect's :func:`_sweep_tmp` after
    STALE_TMP_AGE. ``touch -c`` never creates it (makedumpfile refuses an existing output)."""

    def __init__(self, transport: NodeTransport, path: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(transport, real_path(transport, path)),
                                        name="katactl-vmcore-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, transport: NodeTransport, path: str) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                transport.run(["touch", "-c", "--", path], timeout=30)
            except Exception:   # noqa: BLE001 - a missed beat only shortens the file's protection
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def _collect_makedumpfile(transport: NodeTransport, dump: dict, final: str, opts: CollectOptions, prepare=None) -> dict:
    """Filter+compress on the node with makedumpfile -c -d LEVEL, then stream the result.

    The temp file on the node goes whatever happens once makedumpfile may have started
    (failure, Ctrl-C, the run's timeout, SSH dropped): the crash disk is short of space.
    The filtered copy has no checksum relation to the original, so for --delete-after
    (and --verify) the node hashes the original first: that is ``source.sha256``, what the
    delete check compares the node's dump against."""
    src = dump["path"]
    tmp = makedumpfile_tmp(src, final, secrets.token_hex(6))
    _sweep_tmp(transport, tmp)
    source_sha = None
    if opts.delete_after or opts.verify_source:
        source_sha = _node_sha256(transport, src, dump["size"])[1]
    beat = _Heartbeat(transport, tmp)
    try:
        try:
            r = transport.run(["makedumpfile", "-c", "-d", str(opts.dump_level), real_path(transport, src),
                               real_path(transport, tmp)], timeout=3600)
        except FileNotFoundError:
            raise OperationFailed(f"makedumpfile is not installed on node {transport.node}",
                                  hint="apt-get install makedumpfile on the node, or collect without "
                                       "--makedumpfile") from None
        if r.returncode == 127:
            raise OperationFailed(f"makedumpfile is not installed on node {transport.node}")
        if r.returncode != 0:
            raise OperationFailed(f"makedumpfile failed (exit {r.returncode}): "
                                  f"{r.stderr.decode(errors='replace').strip()[-300:]}",
                                  hint="the dump needs VMCOREINFO (QEMU -device vmcoreinfo) for filtering")
        try:
            st = transport.stat(tmp)
        except FileNotFoundError:
            raise _tmp_gone(transport, tmp) from None
        # mtime None: the heartbeat modifies it; nobody else writes a file named with our token
        filtered = dict(dump, path=tmp, size=st.size, mtime=None)
        info = _copy_dump(transport, filtered, final, dataclasses.replace(opts, compress="none"), prepare)
        info["source_sha256"] = source_sha
        return info
    finally:
        beat.stop()
        try:
            transport.remove(tmp)
        except OSError:
            pass


def _tmp_gone(transport: NodeTransport, tmp: str) -> OperationFailed:
    return OperationFailed(f"{tmp}: the filtered copy was removed on node {transport.node} during the collect",
                           hint="run collect again (a collect suspended for 10 minutes or more looks "
                                "dead to the others, which remove its temp file)")
