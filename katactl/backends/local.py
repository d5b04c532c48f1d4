"""The local NodeTransport: this host, optionally with its root under --host-root."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import stat as _st
import subprocess
import tempfile
from typing import BinaryIO, Generator, Iterable, Iterator, Sequence

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
    """At most ``limit`` bytes of a local file (all of it without a limit).

    os.open/os.read in 64 KiB reads: ``open(...).read(limit)`` made Python allocate
    ``limit`` bytes (16 MiB for a state file) and shrink the result, an mmap/mremap/munmap
    per file; a file object adds two fstat calls and an object per file. Errors name the
    path, as open() does (a directory fails at the first read: EISDIR)."""
    fd = os.open(real, os.O_RDONLY)
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
        raise type(e)(e.errno, e.strerror, real) from None
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class LocalTransport(NodeTransport):
    def __init__(self, host_root: str = "", node: str = "localhost"):
        self.host_root = os.path.abspath(host_root) if host_root else ""
        self.node = node

    def real(self, path: str) -> str:
        """The local filesystem path of a node path."""
        p = check_node_path(path)
        return self.host_root + p if self.host_root else p

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        return _read_file(self.real(path), limit)

    def read_many(self, paths: Sequence[str], limit: int | None = None) -> dict[str, bytes | OSError]:
        out: dict[str, bytes | OSError] = {}
        real, root = self.real, self.host_root
        for p in paths:
            try:
                out[p] = _read_file(root + p if _is_normal(p) else real(p), limit)
            except OSError as e:
                out[p] = _bare(e)
        return out

    def stat_many(self, paths: Sequence[str], follow_symlinks: bool = True) -> dict[str, FileStat | OSError]:
        out: dict[str, FileStat | OSError] = {}
        real, root, stat = self.real, self.host_root, os.stat
        for p in paths:
            try:
                out[p] = _file_stat(stat(root + p if _is_normal(p) else real(p), follow_symlinks=follow_symlinks))
            except OSError as e:
                out[p] = _bare(e)
        return out

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.real(path)))

    def list_dirs(self, paths: Sequence[str]) -> dict[str, list[str] | OSError]:
        """os.listdir: one getdents per few hundred entries, no stat per entry (scan_dirs
        makes one each: 10,000 on a node of 10,000 sandboxes for the bundle index)."""
        out: dict[str, list[str] | OSError] = {}
        for p in paths:
            try:
                out[p] = sorted(os.listdir(self.real(p)))
            except OSError as e:
                out[p] = _bare(e)
        return out

    def stat(self, path: str, follow_symlinks: bool = True) -> FileStat:
        return _file_stat(os.stat(self.real(path), follow_symlinks=follow_symlinks))

    def scan_dir(self, path: str, follow_symlinks: bool = True) -> list[tuple[str, FileStat]]:
        out = []
        with os.scandir(self.real(path)) as it:
            for e in it:
                s = _entry_stat(e, follow_symlinks)
                if s is not None:
                    out.append((e.name, _file_stat(s)))
        return sorted(out, key=lambda x: x[0])

    def list_kinds(self, paths: Sequence[str]) -> dict[str, list[tuple[str, bool, bool, float | None]] | OSError]:
        """Only symlinks are stat()ed (their target's kind, as scan_dir tells it); any other
        entry's kind is the directory's own d_type, its mtime None: a listing of 10,000
        sandbox directories makes no stat, where scan_dir makes 10,000."""
        out: dict[str, list[tuple[str, bool, bool, float | None]] | OSError] = {}
        for p in paths:
            try:
                entries: list[tuple[str, bool, bool, float | None]] = []
                with os.scandir(self.real(p)) as it:
                    for e in it:
                        if not e.is_symlink():
                            entries.append((e.name, e.is_dir(follow_symlinks=False), False, None))
                        elif (s := _entry_stat(e, True)) is not None:
                            mode = s.st_mode
                            entries.append((e.name, _st.S_ISDIR(mode), _st.S_ISLNK(mode), s.st_mtime))
                out[p] = sorted(entries, key=lambda x: x[0])
            except OSError as e:
                out[p] = _bare(e)
        return out

    def readlink(self, path: str) -> str:
        return os.readlink(self.real(path))

    def open_stream(self, path: str, offset: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        f = open(self.real(path), "rb")  # opened eagerly so a missing file fails at the call

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
        s = os.statvfs(self.real(path))
        return s.f_bavail * s.f_frsize

    def write_bytes_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        atomic_write(self.real(path), data, mode)

    def write_stream_atomic(self, path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
        return atomic_write_stream(self.real(path), chunks, mode)

    def fsync_dir(self, path: str) -> None:
        fsync_dir(self.real(path))

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = True) -> None:
        if parents:
            os.makedirs(self.real(path), mode=mode, exist_ok=True)
        else:
            os.mkdir(self.real(path), mode)

    def remove(self, path: str, recursive: bool = False) -> None:
        real = self.real(path)
        if recursive and os.path.isdir(real) and not os.path.islink(real):
            shutil.rmtree(real)
        else:
            os.unlink(real)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.real(src), self.real(dst))
        fsync_dir(os.path.dirname(self.real(dst)))

    def symlink(self, target: str, link: str) -> None:
        os.symlink(target, self.real(link))

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
        real = self.real(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        dirfd = None
        try:
            if len(real.encode()) >= _SUN_PATH_MAX:
                # sun_path holds 108 bytes; a 64-hex sandbox id under a --host-root
                # exceeds it. Reach the socket through an open fd of its directory.
                dirfd = os.open(os.path.dirname(real), os.O_RDONLY | os.O_DIRECTORY)
                real = f"/proc/self/fd/{dirfd}/{os.path.basename(real)}"
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
            if dirfd is not None:
                os.close(dirfd)
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


def _entry_stat(e: os.DirEntry, follow_symlinks: bool) -> os.stat_result | None:
    """A directory entry's stat for scan_dir (None: removed meanwhile). Followed, a link
    that cannot be (dangling, a loop, an unreadable target) is described by its own lstat,
    as the SSH transport does: one bad entry must not fail the whole listing."""
    try:
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


def atomic_write_stream(path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
    """atomic_write() from an iterable of chunks (bounded memory); returns the size.
    A failure midway (the iterable's included) removes the temp file."""
    n = 0
    with atomic_file(path, mode) as f:
        for b in chunks:
            f.write(b)
            n += len(b)
    return n


@contextlib.contextmanager
def atomic_file(path: str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file object for writers that push (``with atomic_file(p) as f:``):
    the content appears at ``path`` complete and durable when the block ends, and
    not at all when it raises (the temp file is removed)."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".katactl-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
        fsync_dir(d)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
