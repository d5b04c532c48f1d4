"""The local NodeTransport: this host, optionally with its root under --host-root."""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import shutil
import signal
import socket
import stat as _st
import subprocess
import tempfile
from typing import BinaryIO, Callable, Generator, Iterable, Iterator, Literal, Sequence

from katactl.backends.base import FileStat, NodeTransport, RunResult
from katactl.errors import SOCKET_BUSY, SOCKET_MISSING, SOCKET_REFUSED, TimeoutExpired, UnreachableError, UsageError


def check_node_path(path: str) -> str:
    """Node paths are absolute and free of NUL; '..' is resolved lexically so a
    path can never climb above the host root."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise UsageError(f"internal: node path must be absolute: {path!r}")
    if "\0" in path:
        raise UsageError("path contains a NUL byte")
    if "//" in path or "/." in path or (path.endswith("/") and path != "/"):
        return os.path.normpath(path)
    return path  # already normal: normpath would return it unchanged


def _is_normal(path: str) -> bool:
    """check_node_path(path) would return path unchanged (the common case, tested first
    by the batched calls: a listing checks tens of thousands of paths)."""
    return (type(path) is str and path[:1] == "/" and path[-1:] != "/" and "/." not in path
            and "//" not in path and "\0" not in path)


#: read size: one read for a state file or a /proc file, bounded allocation for a large one
_CHUNK = 64 << 10


def _read_file(real: str, limit: int | None) -> bytes:
    """At most ``limit`` bytes of a local file (all of it without a limit)."""
    return _read_fd(os.open(real, os.O_RDONLY), limit, real)


def _read_fd(fd: int, limit: int | None, name: str) -> bytes:
    """At most ``limit`` bytes from ``fd`` (all without a limit), which is closed.

    os.read in 64 KiB reads: ``open(...).read(limit)`` made Python allocate ``limit``
    bytes (16 MiB for a state file) and shrink the result, an mmap/mremap/munmap per
    file; a file object adds two fstat calls and an object per file. Errors name the
    file (``name``), as open() does (a directory fails at the first read: EISDIR)."""
    try:
        parts = []
        total = 0
        while limit is None or total < limit:
            b = os.read(fd, _CHUNK if limit is None else min(_CHUNK, limit - total))
            if not b:
                break
            parts.append(b)
            total += len(b)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, name) from None
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


#: openat2(2)'s number: new system calls share one table on every architecture since Linux 5.1
#: (include/uapi/asm-generic/unistd.h and arch/x86/entry/syscalls/syscall_64.tbl: 437); elsewhere
#: (alpha, mips: offset tables) the hand-written walk is used
_NR_OPENAT2 = 437
_OPENAT2_ARCHES = ("x86_64", "aarch64", "arm64", "armv7l", "armv8l", "i686", "ppc64le", "ppc64", "s390x",
                   "riscv64", "loongarch64")
#: include/uapi/linux/openat2.h: absolute symlinks and ``..`` resolve as if the dirfd were /
_RESOLVE_IN_ROOT = 0x10

#: where a node root may hold a link to its own path (/proc -> /proc, /proc/1/stat ->
#: /proc/1/stat, /sys/fs/cgroup -> /sys/fs/cgroup: lab.layout.link_host_views, the tests' fake
#: /proc): inside the root such a link is a loop, so it can only mean this host's kernel view.
#: Nothing else of this host is ever reached.
_KERNEL_VIEWS = ("/proc", "/sys")
_ENOENT = os.strerror(errno.ENOENT)
#: attempts of one openat2 answered EAGAIN or EINTR (a busy machine's renames) before giving up
_OPENAT2_TRIES = 64


def _make_openat2() -> Callable[[int], Callable[[str, int], int]] | None:
    """openat2(2) through libc's syscall() (Python has no binding): ``bind(rootfd)`` gives
    ``call(path, flags)``, the fd or minus the errno (no exception: a missing file is common,
    and each raise costs). Its arguments but the path are converted once (an open_how per
    flag set): what ctypes adds to the system call is then ~1 us. None where the number is not
    437."""
    if os.uname().machine not in _OPENAT2_ARCHES:
        return None
    import ctypes  # ~5 ms: imported only under a host root

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    nr, size, get_errno = ctypes.c_long(_NR_OPENAT2), ctypes.c_size_t(ctypes.sizeof(OpenHow)), ctypes.get_errno
    hows: dict[int, object] = {}

    def how(flags: int) -> object:
        h = hows[flags] = ctypes.byref(OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT))  # keeps its struct
        return h

    def bind(rootfd: int) -> Callable[[str, int], int]:
        dirfd = ctypes.c_long(rootfd)

        def openat2(path: str, flags: int) -> int:
            b, h = path.encode("utf-8", "surrogateescape"), hows.get(flags) or how(flags)
            for _ in range(_OPENAT2_TRIES):
                fd = fn(nr, dirfd, b, h, size)
                if fd >= 0:
                    return fd
                e = get_errno()
                # EAGAIN: a rename or mount anywhere on the machine raced a ".." of this lookup
                # (RESOLVE_IN_ROOT, fs/namei.c): openat2(2) says to try again; EINTR: a signal
                if e not in (errno.EAGAIN, errno.EINTR):
                    break
            return -e

        return openat2

    return bind


#: None: not made yet; False: none here (another architecture; ENOSYS: a kernel before 5.6,
#: or a seccomp profile that refuses it)
_openat2: Callable[[int], Callable[[str, int], int]] | None | Literal[False] = None


def _links_to_itself(root: str, path: str) -> bool:
    try:
        return os.readlink(root + path) == path
    except OSError:
        return False


def _get_openat2() -> Callable[[int], Callable[[str, int], int]] | None:
    global _openat2
    if _openat2 is None:
        _openat2 = _make_openat2() or False
    return _openat2 or None


class LocalTransport(NodeTransport):
    """This host's files, or with ``host_root`` a node's root mounted there (a DaemonSet pod's
    /host, a lab, a snapshot). Under a root every node path resolves inside it, as the node's
    own kernel resolves it: an absolute symlink (/var/crash -> /data/crash) and a ``..`` start
    again at the root and never leave it. That is openat2(2) with RESOLVE_IN_ROOT, one system
    call per open and an fd for the rest (fstat, getdents, readlinkat); where the kernel has no
    openat2 (< 5.6, ENOSYS) a walk of readlink per component does the same, less atomically."""

    resolves_in_root = True

    def __init__(self, host_root: str = "", node: str = "localhost"):
        self.host_root = os.path.abspath(host_root) if host_root else ""
        self.node = node
        #: a root other than / to resolve in ("/" is this host's own resolution)
        self._rooted = self.host_root not in ("", "/")
        # opened at the first path (the root may not exist before), then kept: a directory
        # put at the same name afterwards is not this transport's root
        self._rootfd: int | None = None
        #: links to this host's kernel views met (see _KERNEL_VIEWS), and "<link>/" of each
        self._views: set[str] = set()
        self._view_dirs: tuple[str, ...] = ()
        self._openat2: Callable[[str, int], int] | None = None  # bound to the root when it is opened

    def close(self) -> None:
        fd, self._rootfd = self._rootfd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _root(self, p: str) -> int:
        """The root's fd, opened at the first path (errors name that path, as open() did)."""
        if self._rootfd is None:
            try:
                fd = os.open(self.host_root, os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                err = type(e)(e.errno, e.strerror, self.host_root + p)
                raise err from None
            if self._rootfd is not None:  # another thread was first
                os.close(fd)
            else:
                bind = _get_openat2()
                self._openat2 = bind(fd) if bind else None
                self._rootfd = fd
        return self._rootfd

    def _open(self, p: str, flags: int) -> int:
        """An fd of the normalized node path ``p`` resolved inside the root (``O_NOFOLLOW``:
        not its last component). Errors name the path under the root, as open() did."""
        if self._views and (p in self._views or p.startswith(self._view_dirs)):
            return os.open(p, flags)  # this host's kernel view (see _KERNEL_VIEWS)
        if self._rootfd is None:
            self._root(p)
        fn = self._openat2
        if fn is not None:
            fd = fn(p, flags)
            if fd >= 0:
                return fd
            if fd == -errno.ELOOP and self._find_view(p):
                return os.open(p, flags)
            # ENOSYS: a kernel before 5.6; EPERM on the root itself too: a seccomp profile that
            # refuses openat2 so (systemd-nspawn, older container runtimes'): walk instead
            if fd != -errno.ENOSYS and not (fd == -errno.EPERM and self._openat2_refused(fn)):
                raise OSError(-fd, os.strerror(-fd), self.host_root + p)
            global _openat2
            _openat2, self._openat2 = False, None
        try:
            return os.open(self._walk(p, not flags & os.O_NOFOLLOW), flags | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.ELOOP and self._find_view(p):
                return os.open(p, flags)
            err = type(e)(e.errno, e.strerror, self.host_root + p)
        raise err  # outside the except: no __context__ (a caller keeps errors as values)

    @staticmethod
    def _openat2_refused(fn: Callable[[str, int], int]) -> bool:
        """Whether openat2 is refused as such (EPERM opening the root itself, which any
        process that opened the root may), not the file asked for."""
        fd = fn("/", os.O_PATH)
        if fd >= 0:
            os.close(fd)
        return fd == -errno.EPERM

    def _stat(self, p: str, follow_symlinks: bool = True) -> os.stat_result:
        if self._views and (p in self._views or p.startswith(self._view_dirs)):
            return os.stat(p, follow_symlinks=follow_symlinks)
        fd = self._open(p, os.O_PATH if follow_symlinks else os.O_PATH | os.O_NOFOLLOW)
        try:
            return os.stat(fd)
        finally:
            os.close(fd)

    def _in_view(self, p: str) -> bool:
        return p in self._views or p.startswith(self._view_dirs)

    def _find_view(self, p: str) -> bool:
        """Whether ``p`` (which looped) lies under a link to its own path in /proc or /sys,
        remembered: the next path under it goes to this host's view at once."""
        if not p.startswith(_KERNEL_VIEWS):
            return False
        q = ""
        for part in p.split("/")[1:]:
            q = f"{q}/{part}"
            if _links_to_itself(self.host_root, q):
                self._views.add(q)
                self._view_dirs = (*self._view_dirs, q + "/")
                return True
        return False

    def _walk(self, p: str, follow: bool = True) -> str:
        """The local path of node path ``p`` with its symlinks resolved inside the root by hand
        (a readlink per component), for kernels without openat2: an absolute target restarts
        at the root, ``..`` stops there. A missing component ends the resolution (the open
        then fails); ``follow``: the last component too. Unlike openat2 it races a component
        replaced by a symlink between the walk and the open."""
        root = self.host_root
        todo = [c for c in reversed(p.split("/")) if c]
        out = ""  # the resolved node path so far, "" being /
        links = 0
        while todo:
            c = todo.pop()
            if c == ".":
                continue
            if c == "..":
                out = out[:out.rfind("/")] if out else ""
                continue
            cand = f"{out}/{c}"
            if not todo and not follow:
                out = cand
                break
            try:
                target = os.readlink(root + cand)
            except OSError:  # EINVAL: not a link; ENOENT, ENOTDIR, EACCES: the open will say
                out = cand
                continue
            links += 1
            if links > 40:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if target.startswith("/"):
                out = ""
            todo.extend(c for c in reversed(target.split("/")) if c)
        return root + (out or "/")

    def real(self, path: str, follow_symlinks: bool = True) -> str:
        """The local path of a node path, for what takes a path rather than an fd (a hypervisor's
        dump file, a program's argument, a rename): under a root, with its symlinks resolved
        inside the root (the last one only with ``follow_symlinks``); a part that does not
        exist yet is appended as named."""
        p = check_node_path(path)
        if not self._rooted:
            return p
        try:
            fd = self._open(p, os.O_PATH | (0 if follow_symlinks else os.O_NOFOLLOW))
        except OSError:  # not there (yet): its links resolved as far as they go
            return p if self._in_view(p) else self._walk(p, follow_symlinks)
        try:
            return os.readlink(f"/proc/self/fd/{fd}")  # the kernel's name of what it opened
        except OSError:  # no /proc here
            return self._walk(p, follow_symlinks)
        finally:
            os.close(fd)

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        p = check_node_path(path)
        if not self._rooted:
            return _read_file(p, limit)
        return _read_fd(self._open(p, os.O_RDONLY), limit, self.host_root + p)

    def read_many(self, paths: Sequence[str], limit: int | None = None) -> dict[str, bytes | OSError]:
        out: dict[str, bytes | OSError] = {}
        rooted, root, open_ = self._rooted, self.host_root, self._open
        fast = self._fast()
        for p in paths:
            try:
                n = p if _is_normal(p) else check_node_path(p)
                if not rooted:
                    out[p] = _read_file(n, limit)
                    continue
                fd = fast(n, os.O_RDONLY) if fast is not None and not n.startswith(_KERNEL_VIEWS) else -1
                if fd == -errno.ENOENT:  # the common miss: a value, never raised
                    out[p] = OSError(errno.ENOENT, _ENOENT, root + n)
                else:
                    out[p] = _read_fd(fd if fd >= 0 else open_(n, os.O_RDONLY), limit, root + n)
            except OSError as e:
                out[p] = _bare(e)
        return out

    def stat_many(self, paths: Sequence[str], follow_symlinks: bool = True) -> dict[str, FileStat | OSError]:
        out: dict[str, FileStat | OSError] = {}
        stat = self._stat if self._rooted else os.stat
        fast, root = self._fast(), self.host_root
        flags = os.O_PATH if follow_symlinks else os.O_PATH | os.O_NOFOLLOW
        for p in paths:
            try:
                n = p if _is_normal(p) else check_node_path(p)
                fd = fast(n, flags) if fast is not None and not n.startswith(_KERNEL_VIEWS) else -1
                if fd >= 0:
                    try:
                        out[p] = _file_stat(os.stat(fd))
                    finally:
                        os.close(fd)
                elif fd == -errno.ENOENT:  # the common miss: a value, never raised
                    out[p] = OSError(errno.ENOENT, _ENOENT, root + n)
                else:
                    out[p] = _file_stat(stat(n, follow_symlinks=follow_symlinks))
            except OSError as e:
                out[p] = _bare(e)
        return out

    def _fast(self) -> Callable[[str, int], int] | None:
        """The batched calls' openat2 (the fd or -errno) for paths outside /proc and /sys, on
        which _open's answer would be the same; None without a root, or without openat2 (the
        calls then go through _open)."""
        if not self._rooted:
            return None
        if self._rootfd is None:
            try:
                self._root("/")
            except OSError:
                return None  # each path says so through _open
        return self._openat2

    def stat(self, path: str, follow_symlinks: bool = True) -> FileStat:
        p = check_node_path(path)
        if not self._rooted:
            return _file_stat(os.stat(p, follow_symlinks=follow_symlinks))
        return _file_stat(self._stat(p, follow_symlinks))

    def listdir(self, path: str) -> list[str]:
        p = check_node_path(path)
        if not self._rooted:
            return sorted(os.listdir(p))
        fd = self._open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def list_dirs(self, paths: Sequence[str]) -> dict[str, list[str] | OSError]:
        """os.listdir: one getdents per few hundred entries, no stat per entry (scan_dirs
        makes one each: 10,000 on a node of 10,000 sandboxes for the bundle index)."""
        out: dict[str, list[str] | OSError] = {}
        for p in paths:
            try:
                out[p] = self.listdir(p)
            except OSError as e:
                out[p] = _bare(e)
        return out

    def _dir(self, path: str) -> str | int:
        """What os.scandir takes for a node directory: its path, or under a root an fd opened
        inside the root (the caller closes it)."""
        p = check_node_path(path)
        return self._open(p, os.O_RDONLY | os.O_DIRECTORY) if self._rooted else p

    def _link_stat(self, path: str) -> Callable[[str], os.stat_result] | None:
        """How scan_dir/list_kinds stat a symlink entry of directory ``path`` through its
        target: under a root, inside the root (os.DirEntry.stat would follow an absolute
        target on this host); else DirEntry.stat's own."""
        if not self._rooted:
            return None
        base = check_node_path(path).rstrip("/")
        return lambda name: self._stat(f"{base}/{name}", True)

    def scan_dir(self, path: str, follow_symlinks: bool = True) -> list[tuple[str, FileStat]]:
        out = []
        link_stat = self._link_stat(path) if follow_symlinks else None
        d = self._dir(path)
        try:
            with os.scandir(d) as it:
                for e in it:
                    s = _entry_stat(e, follow_symlinks, link_stat)
                    if s is not None:
                        out.append((e.name, _file_stat(s)))
        finally:
            if type(d) is int:
                os.close(d)
        return sorted(out, key=lambda x: x[0])

    def list_kinds(self, paths: Sequence[str]) -> dict[str, list[tuple[str, bool, bool, float | None]] | OSError]:
        """Only symlinks are stat()ed (their target's kind, as scan_dir tells it); any other
        entry's kind is the directory's own d_type, its mtime None: a listing of 10,000
        sandbox directories makes no stat, where scan_dir makes 10,000."""
        out: dict[str, list[tuple[str, bool, bool, float | None]] | OSError] = {}
        for p in paths:
            try:
                entries: list[tuple[str, bool, bool, float | None]] = []
                link_stat = self._link_stat(p)
                d = self._dir(p)
                try:
                    with os.scandir(d) as it:
                        for e in it:
                            if not e.is_symlink():
                                entries.append((e.name, e.is_dir(follow_symlinks=False), False, None))
                            elif (s := _entry_stat(e, True, link_stat)) is not None:
                                mode = s.st_mode
                                entries.append((e.name, _st.S_ISDIR(mode), _st.S_ISLNK(mode), s.st_mtime))
                finally:
                    if type(d) is int:
                        os.close(d)
                out[p] = sorted(entries, key=lambda x: x[0])
            except OSError as e:
                out[p] = _bare(e)
        return out

    def readlink(self, path: str) -> str:
        p = check_node_path(path)
        if not self._rooted:
            return os.readlink(p)
        fd = self._open(p, os.O_PATH | os.O_NOFOLLOW)
        try:
            return os.readlink("", dir_fd=fd)  # readlinkat(2): "" is the link fd itself
        except FileNotFoundError:  # what readlinkat says of an fd that is no link
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), self.host_root + p) from None
        finally:
            os.close(fd)

    def open_stream(self, path: str, offset: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        # opened eagerly so a missing file fails at the call
        if not self._rooted:
            f = open(self.real(path), "rb")
        else:
            p = check_node_path(path)
            fd = self._open(p, os.O_RDONLY)
            try:
                if _st.S_ISDIR(os.fstat(fd).st_mode):  # as open() says, naming the path
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.host_root + p)
                f = os.fdopen(fd, "rb")
            except BaseException:
                os.close(fd)
                raise

        def chunks():
            with f:
                if offset:
                    f.seek(offset)
                while True:
                    b = f.read(chunk_size)
                    if not b:
                        return
                    yield b

        return chunks()

    def statvfs_free(self, path: str) -> int:
        if not self._rooted:
            s = os.statvfs(self.real(path))
        else:
            fd = self._open(check_node_path(path), os.O_PATH)
            try:
                s = os.statvfs(fd)
            finally:
                os.close(fd)
        return s.f_bavail * s.f_frsize

    # Under a root, writes act through an fd of the directory resolved in the root (as remove
    # and rename do): a directory swapped for a link between resolving and writing cannot send
    # the write out of the root.
    def write_bytes_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.write_stream_atomic(path, (data,), mode)

    def write_stream_atomic(self, path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
        if not self._rooted:
            return atomic_write_stream(check_node_path(path), chunks, mode)
        fd, name = self._parent(path)
        try:
            return atomic_write_stream(name, _SourceErrors(chunks), mode, dir_fd=fd)
        except _SourceError as e:  # the data's own failure (a corrupt archive), not the file's
            raise e.error from None
        except OSError as e:  # named as the node's path, not the bare name of the *at call
            raise type(e)(e.errno, e.strerror, self.host_root + check_node_path(path)) from None
        finally:
            os.close(fd)

    def fsync_dir(self, path: str) -> None:
        p = check_node_path(path)
        if not self._rooted:
            fsync_dir(p)
            return
        fd = self._open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = True) -> None:
        p = check_node_path(path)
        if not self._rooted:
            if parents:
                os.makedirs(p, mode=mode, exist_ok=True)
            else:
                os.mkdir(p, mode)
        elif parents:
            self._makedirs(p, mode)
        else:
            self._mkdir_at(p, mode)

    def _makedirs(self, p: str, mode: int, top: bool = True, links: int = 0) -> None:
        """os.makedirs(exist_ok=True) inside the root: the directories that exist are found by
        resolving in the root (an in-root link to a directory counts, as it does for the node),
        each missing one is made in its parent's fd; ``mode`` is the last one's, as makedirs'.
        A file in the way fails as makedirs fails: EEXIST for ``p`` itself, else ENOTDIR
        naming the directory that could not be made under it. A dangling link is followed (its
        target made), as the path-string makedirs of before did."""
        try:
            os.close(self._open(p, os.O_PATH | os.O_DIRECTORY))
            return
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
        if p == "/":  # the root itself, not there yet (a lab's, a test's): made as makedirs did
            os.makedirs(self.host_root, exist_ok=True)
            return
        if self._exists(p):  # not a directory
            if top:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.host_root + p)
            return  # the caller's mkdir under it says ENOTDIR
        self._makedirs(os.path.dirname(p), 0o777, False, links)  # links: the count spans the walk (a -> b/x, b -> a/y)
        try:
            self._mkdir_at(p, mode)
        except FileExistsError:
            target = self._dangling_target(p)
            if target is None:  # made meanwhile by someone else: exist_ok, if a directory
                os.close(self._open(p, os.O_PATH | os.O_DIRECTORY))
            elif links < 40:  # a link to a directory not made yet: made where it points, in the root
                self._makedirs(target, mode, top, links + 1)
            else:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), self.host_root + p) from None

    def _dangling_target(self, p: str) -> str | None:
        """The node path a dangling symlink at ``p`` names, or None when ``p`` is not one. A
        relative target counts from the link's real directory (its parent may be reached
        through a link itself: /d/x with /d -> /r names /r/<target>, not /d/<target>)."""
        try:
            fd, name = self._parent(p)
        except OSError:
            return None
        try:
            target = os.readlink(name, dir_fd=fd)
            real_dir = os.readlink(f"/proc/self/fd/{fd}")  # the kernel's name of the directory opened
        except OSError:
            return None
        finally:
            os.close(fd)
        if target.startswith("/"):
            return posixpath.normpath(target)
        if real_dir == self.host_root:
            base = "/"
        elif real_dir.startswith(self.host_root + "/"):
            base = real_dir[len(self.host_root):]
        else:  # a kernel view (/proc, /sys) or no /proc: as written
            base = posixpath.dirname(p)
        return posixpath.normpath(posixpath.join(base, target))

    def _exists(self, p: str) -> bool:
        try:
            self._stat(p)
            return True
        except OSError:
            return False

    def _mkdir_at(self, p: str, mode: int) -> None:
        try:
            fd, name = self._parent(p)
        except OSError as e:  # named as mkdir(2) names it: the directory to be made
            raise type(e)(e.errno, e.strerror, self.host_root + p) from None
        try:
            os.mkdir(name, mode, dir_fd=fd)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, self.host_root + p) from None
        finally:
            os.close(fd)

    def _parent(self, p: str) -> tuple[int, str]:
        """An fd of the node path's directory, resolved inside the root, and its last name: the
        *at calls then act in that very directory, however the path is changed meanwhile (a
        resolved path handed on as a string would be resolved again from this host's /, and
        a directory swapped for a link in between would take a removal out of the root)."""
        d, name = os.path.split(check_node_path(p))
        if name in ("", ".", ".."):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), self.host_root + p)
        return self._open(d or "/", os.O_PATH | os.O_DIRECTORY), name

    def remove(self, path: str, recursive: bool = False) -> None:
        if not self._rooted:
            real = check_node_path(path)
            if recursive and os.path.isdir(real) and not os.path.islink(real):
                shutil.rmtree(real)
            else:
                os.unlink(real)
            return
        fd, name = self._parent(path)
        try:
            if recursive and _st.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                shutil.rmtree(name, dir_fd=fd)  # the fd-based walk: never follows a link
            else:
                os.unlink(name, dir_fd=fd)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, self.host_root + check_node_path(path)) from None
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        if not self._rooted:
            real_dst = check_node_path(dst)
            os.rename(check_node_path(src), real_dst)
            fsync_dir(os.path.dirname(real_dst))
            return
        sfd, sname = self._parent(src)
        try:
            dfd, dname = self._parent(dst)
            try:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
                _fsync_dir_fd(dfd)  # the directory renamed into
            except OSError as e:  # named as the node's paths, not the bare names of the *at call
                raise type(e)(e.errno, e.strerror, self.host_root + check_node_path(src), None,
                              self.host_root + check_node_path(dst)) from None
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def symlink(self, target: str, link: str) -> None:
        if not self._rooted:
            os.symlink(target, check_node_path(link))
            return
        fd, name = self._parent(link)
        try:
            os.symlink(target, name, dir_fd=fd)
        finally:
            os.close(fd)

    def run(self, argv: Sequence[str], timeout: float | None = None,
            input: bytes | None = None) -> RunResult:
        argv = tuple(str(a) for a in argv)
        try:
            p = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise TimeoutExpired(f"{argv[0]} did not finish within {timeout:g}s") from None
        return RunResult(argv, p.returncode, p.stdout, p.stderr)

    def run_stream(self, argv: Sequence[str], chunk_size: int = 1 << 20,
                   timeout: float | None = None) -> Iterator[bytes]:
        """argv's stdout in chunks (timeout is not enforced locally: the process is ours).

        argv runs in a session of its own and is stopped as a process group, as the
        remote channel's GUARD (setsid, kill -pgid) does on a node: a ``sh -c`` pipeline
        goes whole, not only its first process. ``cancel()`` on the returned iterator
        does that from any thread, also while another is blocked reading (the read then
        ends), which a generator's close() cannot."""
        argv = tuple(str(a) for a in argv)
        err = tempfile.TemporaryFile()
        try:
            # stdin is the guard's lifeline: a pipe only we hold, closed by the kernel even
            # when katactl is SIGKILLed (no finally runs then)
            p = subprocess.Popen(("sh", "-c", _GUARD, "sh", *argv), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        except BaseException:
            err.close()
            raise

        def chunks():
            try:
                while True:
                    b = p.stdout.read(chunk_size)
                    if not b:
                        break
                    yield b
                rc = p.wait()
                if rc == 127:  # the base contract: a missing program is FileNotFoundError
                    raise FileNotFoundError(errno.ENOENT, f"{argv[0]}: command not found", argv[0])
                if rc != 0:
                    err.seek(0)
                    text = err.read()[-4096:].decode("utf-8", "replace").strip()
                    raise OSError(errno.EIO, f"{argv[0]} failed: {text or f'exit {rc}'}", argv[0])
            finally:
                _kill_group(p)
                p.stdout.close()
                p.stdin.close()
                p.wait()
                err.close()

        return _ProcessStream(p, chunks())

    def connect_unix(self, path: str, timeout: float):
        p = check_node_path(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        fd = None
        try:
            if self._rooted:
                # the socket opened inside the root (O_PATH) and reached through its fd,
                # which also keeps within sun_path's 108 bytes
                fd = self._open(p, os.O_PATH)
                real = f"/proc/self/fd/{fd}"
            else:
                real = p
                if len(real.encode()) >= _SUN_PATH_MAX:
                    # sun_path holds 108 bytes: reach the socket through an fd of its directory
                    fd = os.open(os.path.dirname(real), os.O_RDONLY | os.O_DIRECTORY)
                    real = f"/proc/self/fd/{fd}/{os.path.basename(real)}"
            s.connect(real)
        except (FileNotFoundError, NotADirectoryError):
            s.close()
            raise UnreachableError(f"{path}: socket does not exist", reason=SOCKET_MISSING) from None
        except ConnectionRefusedError:
            s.close()  # also what connect() says of a file that is not a socket
            raise UnreachableError(f"{path}: nobody is listening on the socket", reason=SOCKET_REFUSED) from None
        except socket.timeout:
            s.close()
            raise TimeoutExpired(f"{path}: connect timed out after {timeout:g}s") from None
        except BlockingIOError:  # EAGAIN: the listen queue is full (a timeout makes connect non-blocking)
            s.close()
            raise UnreachableError(f"{path}: the socket's connection queue is full (its server accepts "
                                   "nobody now)", reason=SOCKET_BUSY) from None
        except OSError as e:
            s.close()
            raise UnreachableError(f"{path}: {e.strerror or e}") from None
        finally:
            if fd is not None:
                os.close(fd)
        return s


_SUN_PATH_MAX = 108


#: run_stream's wrapper, the group leader of its own session: the command runs in its
#: group, and a watcher ends the whole group (kill 0) when the wrapper's stdin, a pipe only
#: katactl holds, reaches EOF: katactl gone, even by SIGKILL (remote.py's GUARD does
#: the same on a node). Only the watcher keeps that pipe (fd 3); the command gets /dev/null.
_GUARD = (
    'exec 3<&0 </dev/null\n'
    '"$@" 3<&- &\n'
    'p=$!\n'
    '{ cat <&3; kill -KILL 0; } >/dev/null 2>&1 &\n'
    'w=$!\n'
    'exec 3<&-\n'
    'wait "$p"\n'
    'rc=$?\n'
    'kill "$w" 2>/dev/null\n'
    'exit "$rc"\n'
)


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL p's process group (its own session: start_new_session) while p is not yet
    reaped, so the group id cannot be another's. Its only output is the pipe we stop
    reading: nothing of it needs a clean exit."""
    if p.returncode is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class _ProcessStream:
    """LocalTransport.run_stream's iterator: a generator, plus ``cancel()`` for other threads."""

    def __init__(self, p: subprocess.Popen, gen: Generator[bytes, None, None]):
        self._p, self._gen = p, gen

    def __iter__(self) -> "_ProcessStream":
        return self

    def __next__(self) -> bytes:
        return next(self._gen)

    def cancel(self) -> None:
        _kill_group(self._p)

    def close(self) -> None:
        self.cancel()
        try:
            self._gen.close()
        except ValueError:
            pass    # running in another thread: the kill ends its read, and it closes itself


def _entry_stat(e: os.DirEntry, follow_symlinks: bool,
                link_stat: Callable[[str], os.stat_result] | None = None) -> os.stat_result | None:
    """A directory entry's stat for scan_dir (None: removed meanwhile). Followed, a link
    that cannot be (dangling, a loop, an unreadable target) is described by its own lstat,
    as the SSH transport does: one bad entry must not fail the whole listing. ``link_stat``:
    how to follow a symlink entry (by name) when DirEntry.stat must not (a host root)."""
    try:
        if follow_symlinks and link_stat is not None and e.is_symlink():
            return link_stat(e.name)
        return e.stat(follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        if not follow_symlinks:
            return None
    except OSError:
        if not follow_symlinks:
            raise
    try:
        return e.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None


def _file_stat(s: os.stat_result) -> FileStat:
    """FileStat(size, mtime, mode, is_dir, is_link, uid) of s, made without the frozen
    dataclass's __init__ (an object.__setattr__ per field: 1.0 vs 0.5 us, and discovery
    makes ~5 per sandbox); the same instance (tests/test_local_transport.py checks)."""
    mode = s.st_mode
    fs = _new(FileStat)
    _setattr(fs, "__dict__", {"size": s.st_size, "mtime": s.st_mtime, "mode": mode, "is_dir": _st.S_ISDIR(mode),
                              "is_link": _st.S_ISLNK(mode), "uid": s.st_uid})
    return fs


_new, _setattr = object.__new__, object.__setattr__


def _bare(e: OSError) -> OSError:
    """e without its traceback: an error kept as a value (read_many, stat_many) must not
    keep the frame that caught it, whose locals hold the dict holding the error (a
    reference cycle per missing file, left to the cyclic GC)."""
    e.__traceback__ = None
    return e


def fsync_dir(d: str) -> None:
    """fsync a directory (makes a rename in it durable). Local paths."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to the local ``path`` atomically and durably: a temp file
    (mode 0600 until complete) in the same directory, fsync, chmod, rename,
    fsync of the directory. Used by LocalTransport and for katactl's own local
    output (vmcore collect manifests)."""
    atomic_write_stream(path, (data,), mode)


def atomic_write_stream(path: str, chunks: Iterable[bytes], mode: int = 0o644,
                        dir_fd: int | None = None) -> int:
    """atomic_write() from an iterable of chunks (bounded memory); returns the size.
    A failure midway (the iterable's included) removes the temp file."""
    n = 0
    with atomic_file(path, mode, dir_fd) as f:
        for b in chunks:
            f.write(b)
            n += len(b)
    return n


@contextlib.contextmanager
def atomic_file(path: str, mode: int = 0o644, dir_fd: int | None = None) -> Iterator[BinaryIO]:
    """A binary file object for writers that push (``with atomic_file(p) as f:``):
    the content appears at ``path`` complete and durable when the block ends, and
    not at all when it raises (the temp file is removed). With ``dir_fd``, ``path``
    is a name in that directory (an O_PATH fd will do) and every call is an *at call."""
    if dir_fd is None:
        d = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".katactl-", suffix=".tmp")
    else:
        fd, tmp = _mkstemp_at(dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode, dir_fd=dir_fd)
        os.rename(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if dir_fd is None:
            fsync_dir(d)
        else:
            _fsync_dir_fd(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


class _SourceError(Exception):
    """An error the chunks of a write raised, carried past the write's own error handling."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


class _SourceErrors:
    """Iterates chunks, raising what they raise as a _SourceError."""

    def __init__(self, chunks: Iterable[bytes]):
        self._it = iter(chunks)

    def __iter__(self) -> "_SourceErrors":
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            raise _SourceError(e) from e


def _mkstemp_at(dir_fd: int) -> tuple[int, str]:
    """tempfile.mkstemp() in a directory given by fd (mkstemp takes only a path)."""
    for _ in range(100):
        name = f".katactl-{secrets.token_hex(6)}.tmp"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600, dir_fd=dir_fd), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no usable temporary file name")


def _fsync_dir_fd(dir_fd: int) -> None:
    """fsync the directory of an fd that may be O_PATH (which fsync refuses): reopen it."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
