"""The NodeTransport interface: how every domain module reaches a node.

A transport speaks in *node paths* ("/run/vc/sbs"): paths as the node itself
sees them. The transport maps them onto where they really are (a --host-root
prefix locally, the same prefix on a remote node over SSH). Domain code never
joins host_root itself, so --host-root is honoured everywhere for free.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Iterable, Iterator, Protocol, Sequence, TypeVar


class SocketLike(Protocol):
    """The subset of socket.socket that protocol clients use."""

    def sendall(self, data: bytes) -> None: ...
    def recv(self, n: int) -> bytes: ...
    def settimeout(self, t: float | None) -> None: ...
    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class FileStat:
    size: int
    mtime: float
    mode: int
    is_dir: bool
    is_link: bool
    uid: int = 0


@dataclasses.dataclass(frozen=True)
class RunResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


_T = TypeVar("_T", bound="NodeTransport")


class NodeTransport(abc.ABC):
    """Reach one node's files, processes and unix sockets.

    Every method takes node paths. Errors are raised as katactl.errors types:
    FileNotFoundError/PermissionError/NotADirectoryError are passed through
    (callers decide what a missing file means); connection problems raise
    katactl.errors.UnreachableError; timeouts katactl.errors.TimeoutExpired.
    """

    #: node name as the user knows it ("localhost" for the local node)
    node: str
    #: prefix under which the node's root lives ("" = real root)
    host_root: str
    #: True when the node is another machine (its processes do not run on this host)
    is_remote: bool = False
    #: True when node paths resolve inside host_root as on the node (an absolute symlink starts
    #: again at the node's /): the local transport's openat2. Over SSH and --via kube the
    #: machine's kernel resolves host_root + path, following such a link out of the tree.
    resolves_in_root: bool = False
    #: seconds one call may take (--request-timeout); a local transport does not enforce it
    timeout: float = 30.0

    # -- files -------------------------------------------------------------
    @abc.abstractmethod
    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """Whole small file (raise ValueError-free; limit truncates)."""

    def read_text(self, path: str, limit: int | None = None) -> str:
        return self.read_bytes(path, limit).decode("utf-8", errors="replace")

    def read_many(self, paths: Sequence[str], limit: int | None = None) -> dict[str, bytes | OSError]:
        """Several small files at once: {path: bytes, or the OSError reading it raised}.

        Nothing is raised for a file (missing, unreadable, a directory): each
        failure is that path's value. Over SSH the reads are pipelined (a few
        round trips for any number of files); locally this is a loop.
        """
        out: dict[str, bytes | OSError] = {}
        for p in paths:
            try:
                out[p] = self.read_bytes(p, limit)
            except OSError as e:
                out[p] = e.with_traceback(None)  # its frame holds out: a cycle the GC must free
        return out

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]: ...

    def scan_dirs(self, paths: Sequence[str], follow_symlinks: bool = True
                  ) -> dict[str, "list[tuple[str, FileStat]] | OSError"]:
        """scan_dir() of several directories: {path: entries, or the OSError listing raised}
        (pipelined over SSH)."""
        out: dict[str, list[tuple[str, FileStat]] | OSError] = {}
        for p in paths:
            try:
                out[p] = self.scan_dir(p, follow_symlinks)
            except OSError as e:
                out[p] = e.with_traceback(None)  # its frame holds out: a cycle the GC must free
        return out

    def list_kinds(self, paths: Sequence[str]) -> dict[str, "list[tuple[str, bool, bool, float | None]] | OSError"]:
        """scan_dirs() (symlinks followed) as (name, is_dir, is_link, mtime) per entry, for
        callers that need an entry's kind and only sometimes its mtime: mtime may be None
        (the local transport stats only symlinks; over SSH the attributes come with the
        listing, mtime included)."""
        return {p: v if isinstance(v, OSError) else [(n, st.is_dir, st.is_link, st.mtime) for n, st in v]
                for p, v in self.scan_dirs(paths).items()}

    def list_dirs(self, paths: Sequence[str]) -> dict[str, "list[str] | OSError"]:
        """The names in several directories, sorted: {path: names, or the OSError listing
        raised}, for callers that need no stats. Here scan_dirs() (over SSH its stats come
        with the listing at no cost); the local transport lists without a stat per entry."""
        return {p: v if isinstance(v, OSError) else [n for n, _ in v]
                for p, v in self.scan_dirs(paths, follow_symlinks=False).items()}

    def scan_dir(self, path: str, follow_symlinks: bool = True) -> list[tuple[str, "FileStat"]]:
        """(name, stat) of every entry of a directory, sorted by name: listdir + stat
        in one call (over SSH the stats come with the listing). Raises like
        listdir. With follow_symlinks a link's target is described (a dangling
        link keeps its own lstat, is_link=True)."""
        base = path.rstrip("/")
        names = self.listdir(path)
        lst = self.stat_many([f"{base}/{n}" for n in names], follow_symlinks=False)
        out = []
        for n in names:
            s = lst[f"{base}/{n}"]
            if isinstance(s, OSError):
                continue  # removed meanwhile
            if follow_symlinks and s.is_link:
                try:
                    s = self.stat(f"{base}/{n}")
                except OSError:
                    pass
            out.append((n, s))
        return out

    def walk(self, top: str) -> list[tuple[str, "FileStat"]]:
        """(path, lstat) of everything below top, symlinks not followed, in depth-first
        order (a directory before its entries, names sorted). One scan_dirs() per depth
        level: over SSH about two round trips for all the directories of a level, never one
        per entry. A top that is missing or not a directory walks as []; a directory removed
        meanwhile is skipped; other errors (PermissionError) are raised."""
        out: list[tuple[str, FileStat]] = []
        level = [top.rstrip("/") or "/"]
        while level:
            below = []
            for d, entries in self.scan_dirs(level, follow_symlinks=False).items():
                if isinstance(entries, (FileNotFoundError, NotADirectoryError)):
                    continue
                if isinstance(entries, OSError):
                    raise entries
                base = d.rstrip("/")
                for n, s in entries:
                    out.append((f"{base}/{n}", s))
                    if s.is_dir:
                        below.append(f"{base}/{n}")
            level = below
        out.sort(key=lambda e: e[0].split("/"))
        return out

    @abc.abstractmethod
    def stat(self, path: str, follow_symlinks: bool = True) -> FileStat: ...

    def stat_many(self, paths: Sequence[str], follow_symlinks: bool = True) -> dict[str, "FileStat | OSError"]:
        """{path: FileStat, or the OSError stat raised} (pipelined over SSH)."""
        out: dict[str, FileStat | OSError] = {}
        for p in paths:
            try:
                out[p] = self.stat(p, follow_symlinks=follow_symlinks)
            except OSError as e:
                out[p] = e.with_traceback(None)  # its frame holds out: a cycle the GC must free
        return out

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return False

    def is_dir(self, path: str) -> bool:
        try:
            return self.stat(path).is_dir
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return False

    @abc.abstractmethod
    def readlink(self, path: str) -> str: ...

    @abc.abstractmethod
    def open_stream(self, path: str, offset: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream a (large) file from offset in chunks: bounded memory."""

    @abc.abstractmethod
    def statvfs_free(self, path: str) -> int:
        """Bytes available to an unprivileged writer on path's filesystem."""

    # -- mutations (used by upgrade, vmcore, lab) ---------------------------
    @abc.abstractmethod
    def write_bytes_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write to a temp file in the same dir, fsync, rename over path."""

    @abc.abstractmethod
    def write_stream_atomic(self, path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
        """Like write_bytes_atomic, from an iterable of chunks, in bounded memory (a chunk
        plus a fixed window in flight). Returns the bytes written. If the iterable (or
        anything else) fails midway, the temp file is removed and path is untouched."""

    @abc.abstractmethod
    def fsync_dir(self, path: str) -> None:
        """fsync a directory: makes the entries created, renamed or removed in it durable."""

    @abc.abstractmethod
    def mkdir(self, path: str, mode: int = 0o755, parents: bool = True) -> None: ...

    @abc.abstractmethod
    def remove(self, path: str, recursive: bool = False) -> None: ...

    @abc.abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Atomic rename(2) (replaces dst), then an fsync of dst's directory."""

    @abc.abstractmethod
    def symlink(self, target: str, link: str) -> None: ...

    # -- processes and sockets --------------------------------------------
    @abc.abstractmethod
    def run(self, argv: Sequence[str], timeout: float | None = None,
            input: bytes | None = None) -> RunResult:
        """Run an argv (never a shell string) on the node."""

    def run_stream(self, argv: Sequence[str], chunk_size: int = 1 << 20,
                   timeout: float | None = None) -> Iterator[bytes]:
        """Run an argv on the node and stream its stdout in chunks (bounded memory).
        Closing the iterator early stops the process. When stdout has ended: exit 127
        (or no such program) raises FileNotFoundError, another non-zero exit OSError.
        timeout: the longest wait for the next bytes."""
        raise NotImplementedError(f"{type(self).__name__} cannot stream a command's output")

    @abc.abstractmethod
    def connect_unix(self, path: str, timeout: float) -> SocketLike:
        """Connect to a unix socket on the node (path is a node path)."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract: most transports hold nothing
        """Release connections (no-op locally)."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
