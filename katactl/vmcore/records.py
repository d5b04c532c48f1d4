"""The local records of collected dumps: each destination directory's
manifest (``SHA256SUMS`` + ``manifest.json``) and the collect index.

The local side, kept apart from the node side (:mod:`.dumps`): ``vmcore list``
reads the index to show what was collected already, :mod:`.collection` writes
both, and an index entry counts only while its manifest still exists.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable

from katactl.backends.local import fsync_dir
from katactl.backends.base import NodeTransport

MANIFEST_JSON = "manifest.json"
SHA256SUMS = "SHA256SUMS"


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
    def key(transport: NodeTransport, path: str) -> str:
        return f"{transport.node}|{transport.host_root}|{path}"

    def entries(self) -> list[dict]:
        """The index's well-formed entries. It is only a hint of what was collected, so a
        damaged line (not UTF-8, not JSON, nested too deeply, fields of the wrong type)
        is skipped, never an error that stops ``vmcore list``."""
        if self._entries is None:
            self._entries = []
            try:
                with open(self.path, "rb") as f:
                    for line in f:
                        try:
                            e = json.loads(line.decode("utf-8"))
                        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                            continue
                        if _valid_entry(e):
                            self._entries.append(e)
            except OSError:
                pass
        return self._entries

    def lookup(self, transport: NodeTransport, path: str, size: int | None, mtime: float | None) -> str | None:
        k = self.key(transport, path)
        for e in reversed(self.entries()):
            if e.get("key") == k and e.get("size") == size and same_mtime(e.get("mtime"), mtime):
                if os.path.exists(os.path.join(e.get("dir", ""), MANIFEST_JSON)):
                    return e.get("to")
        return None

    def add(self, transport: NodeTransport, path: str, size: int, mtime: float, to: str, dest_dir: str, sha256: str) -> None:
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


def _valid_entry(e) -> bool:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

    return (isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("key", "to", "dir"))
            and number(e.get("mtime")) and (e.get("size") is None or number(e.get("size"))))


def same_mtime(a, b) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) < 1e-3


def load_manifest(dest_dir: str) -> dict:
    try:
        with open(os.path.join(dest_dir, MANIFEST_JSON), encoding="utf-8") as f:
            m = json.load(f)
        if isinstance(m, dict) and isinstance(m.get("files"), dict):
            # only entries update_manifest can write back (a damaged one is dropped, not fatal)
            m["files"] = {k: v for k, v in m["files"].items()
                          if isinstance(v, dict) and isinstance(v.get("sha256"), str)}
            return m
    except (OSError, ValueError, RecursionError):
        pass
    return {"apiVersion": "katactl/v1", "kind": "VmcoreManifest", "files": {}}


def _staged(dest_dir: str, manifest: dict) -> list[tuple[str, str]]:
    """manifest.json and SHA256SUMS written complete (fsynced, 0600) to temp files in
    dest_dir: ``[(temp, name)]``, manifest.json first. A failure (ENOSPC) removes the temp
    files written so far and leaves the pair in place untouched."""
    sums = "".join(f"{e['sha256']}  {name}\n" for name, e in sorted(manifest["files"].items()))
    out: list[tuple[str, str]] = []
    try:
        for name, data in ((MANIFEST_JSON, json.dumps(manifest, indent=2, sort_keys=True) + "\n"),
                           (SHA256SUMS, sums)):
            fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".katactl-", suffix=".tmp")  # 0600
            out.append((tmp, name))
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode())
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        _unlink(t for t, _ in out)
        raise
    return out


def _unlink(paths) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def update_manifest(dest_dir: str, files: dict, header: dict, commit: Callable[[], None] | None = None) -> None:
    """Add (or replace) files' entries in dest_dir's manifest. Read, changed and written
    under an exclusive flock of the directory: two collects of different dumps of one
    sandbox (into the same --to) each keep the other's entry.

    Both files are written to temp files first and renamed into place only once both are
    complete (manifest.json first): a full disk (ENOSPC) leaves the old pair, which agree.
    ``commit()`` (the dump's rename into place) runs between the two steps, so a manifest
    that cannot be written fails the collect before its dump appears under its name."""
    import fcntl

    fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        manifest = load_manifest(dest_dir)
        manifest["files"].update(files)
        manifest.update(header)
        staged = _staged(dest_dir, manifest)
        try:
            if commit is not None:
                commit()
            for tmp, name in staged:
                os.rename(tmp, os.path.join(dest_dir, name))
        finally:
            _unlink(t for t, _ in staged)   # the ones not renamed
        fsync_dir(dest_dir)
    finally:
        os.close(fd)
