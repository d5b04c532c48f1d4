"""Byte plumbing for collect: read-ahead and hashing threads, rate limiting,
the stored-file writers (plain with holes, gzip members, zstd frames) and
reading a stored prefix back uncompressed (to re-hash it on resume).

Knows nothing of dumps or nodes: every piece works on chunks, file
descriptors and local paths.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
from typing import IO, TYPE_CHECKING, Any, Iterator

from katactl.errors import OperationFailed

if TYPE_CHECKING:
    import gzip

CHUNK = 4 << 20                # streaming chunk; memory stays ~ (4 read-ahead + 8 hash queue) chunks
ZBLOCK = 64 << 10              # hole granularity of uncompressed copies
ZERO_BLOCK = bytes(ZBLOCK)
ZERO_CHUNK = bytes(CHUNK)


def _pipe(f: IO[bytes] | None) -> IO[bytes]:
    """A stream of a Popen asked for with PIPE (never None then)."""
    if f is None:
        raise RuntimeError("internal: the subprocess was started without this pipe")
    return f


class RateLimit:
    """Called with the bytes copied so far; sleeps to keep the average at ``bps`` (None: no limit)."""

    def __init__(self, bps: int | None):
        self.bps = bps
        self.t0 = time.monotonic()

    def __call__(self, n: int) -> None:
        if not self.bps:
            return
        ahead = n / self.bps - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)


def hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def iter_uncompressed(part: str, dst_len: int, compress: str) -> Iterator[bytes]:
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
    kind, mod = zstd_backend()
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
            stdin, stdout = _pipe(p.stdin), _pipe(p.stdout)
            import threading

            def feed():
                try:
                    while True:
                        b = lim.read(CHUNK)
                        if not b:
                            break
                        stdin.write(b)
                finally:
                    stdin.close()

            t = threading.Thread(target=feed, daemon=True)
            t.start()
            while True:
                b = stdout.read(CHUNK)
                if not b:
                    break
                yield b
            t.join()
            p.wait()


class _Limited:
    def __init__(self, f: IO[bytes], n: int):
        self.f, self.left = f, n

    def read(self, n: int | None = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        b = self.f.read(n)
        self.left -= len(b)
        return b

    def readable(self) -> bool:
        return True

    def seek(self, n: int, whence: int = 0) -> int:  # gzip seeks only to rewind, which reading never does
        import io

        raise io.UnsupportedOperation("seek")


# -- pipeline: read ahead and hash on their own threads (hashlib and os I/O release the GIL)
class Hasher:
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
        import queue

        while True:
            try:
                b = self._q.get(timeout=0.1)
            except queue.Empty:
                # look again: a wakeup is lost when Ctrl-C/SIGTERM's KeyboardInterrupt strikes the
                # main thread inside put()'s Condition.notify (after it took our waiter, before it
                # released it), and close() then waited on this thread for ever
                continue
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


class Prefetch:
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

        cancel = getattr(self._it, "cancel", None)
        if cancel is not None:
            cancel()    # a process stream: ends a read the reader thread may be blocked in
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
        self.g: gzip.GzipFile | None = None

    def write(self, b: bytes) -> None:
        if self.g is None:
            self.g = self._gzip.GzipFile(fileobj=self.f, mode="wb", compresslevel=self.level, mtime=0)
        self.g.write(b)

    def _close_frame(self) -> None:
        if self.g is not None:
            self.g.close()
            self.g = None


class _ZstdWriter(_FramedWriter):
    def __init__(self, fd: int, level: int = 3, one_core: bool = False):
        super().__init__(fd, level)
        # on the node itself (one_core): its online pods keep the other cores
        self.threads = 0 if one_core else -1
        self.tflag = "-T1" if one_core else "-T0"
        self.kind, self.mod = zstd_backend()
        self.c: Any = None                                 # the open frame: a zstandard stream writer
        self.proc: subprocess.Popen[bytes] | None = None  # or the zstd binary writing it

    def write(self, b: bytes) -> None:
        if self.kind == "module":
            if self.c is None:
                self.c = self.mod.ZstdCompressor(level=self.level, threads=self.threads).stream_writer(
                    self.f, closefd=False)
            self.c.write(b)
            return
        if self.proc is None:
            self.f.flush()
            self.proc = subprocess.Popen([self.mod, "-q", "-c", f"-{self.level}", self.tflag], stdin=subprocess.PIPE,
                                         stdout=self.f.fileno(), stderr=subprocess.PIPE)
        try:
            _pipe(self.proc.stdin).write(b)
        except BrokenPipeError:
            self._check(self.proc)
            raise

    def _check(self, proc: subprocess.Popen[bytes]) -> None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
        self.proc = None
        if rc != 0:
            if "space" in err.lower():
                raise OSError(errno.ENOSPC, "No space left on device")
            raise OperationFailed(f"zstd failed (exit {rc}): {err.strip()[-200:]}")

    def _close_frame(self) -> None:
        if self.c is not None:
            self.c.flush(self.mod.FLUSH_FRAME)
            self.c = None
        if self.proc is not None:
            _pipe(self.proc.stdin).close()
            self._check(self.proc)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait()
            except OSError:
                pass
        super().close()


def make_writer(compress: str, fd: int, one_core: bool = False):
    """The writer of a copy compressed in katactl's process; one_core: zstd on one core
    (katactl runs on the node; gzip here is single-threaded anyway)."""
    if compress == "gzip":
        return _GzipWriter(fd)
    if compress == "zstd":
        return _ZstdWriter(fd, one_core=one_core)
    return _PlainWriter(fd)


def zstd_backend():
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


# -- reading a compressed stream back (node-side compression) -------------------
class Inflater:
    """Decompress a gzip or zstd stream fed in compressed chunks (``feed``), handing the
    output to ``sink(bytes)`` in pieces of at most CHUNK bytes: zero pages shrink
    ~1000x (zstd RLE blocks far more), so a chunk is never inflated in one piece.
    ``out`` counts the bytes produced so far. ``sink`` runs on the caller's thread,
    or on a reader thread when the local ``zstd`` binary decompresses. ``finish()``
    raises OperationFailed when the stream is corrupt or ends mid-member/frame."""

    def __init__(self, compress: str, sink):
        self.out = 0
        self._sink = sink
        self._impl: _GzipInflate | _ZstdModuleInflate | _ZstdProcInflate
        if compress == "gzip":
            self._impl = _GzipInflate(self._emit)
        elif compress == "zstd":
            kind, mod = zstd_backend()
            self._impl = _ZstdModuleInflate(mod, self._emit) if kind == "module" else _ZstdProcInflate(mod, self._emit)
        else:
            raise ValueError(f"internal: nothing to inflate for {compress!r}")

    def _emit(self, b: bytes) -> None:
        self.out += len(b)
        self._sink(b)

    def feed(self, b: bytes) -> None:
        self._impl.feed(b)

    def finish(self) -> None:
        self._impl.finish()

    def close(self) -> None:
        self._impl.close()


def _corrupt(what: str, detail: str) -> OperationFailed:
    return OperationFailed(f"the {what} stream cannot be decoded: {detail}")


class _GzipInflate:
    def __init__(self, emit):
        import zlib

        self._zlib, self._emit, self._d, self._seen = zlib, emit, None, False

    def feed(self, data: bytes) -> None:
        try:
            while True:
                if self._d is None:
                    if not data:
                        return
                    self._d, self._seen = self._zlib.decompressobj(31), True   # 31: a gzip member
                out = self._d.decompress(data, CHUNK)
                if out:
                    self._emit(out)
                if self._d.eof:                     # next member (if any) starts in unused_data
                    data, self._d = self._d.unused_data, None
                    continue
                data = self._d.unconsumed_tail
                if not data and len(out) < CHUNK:   # input used up and no output pending
                    return
        except self._zlib.error as e:
            raise _corrupt("gzip", str(e)) from None

    def finish(self) -> None:
        if self._d is not None or not self._seen:
            raise _corrupt("gzip", "it ends in the middle of a member")

    def close(self) -> None:
        self._d = None


class _ZstdModuleInflate:
    """python-zstandard's stream_writer: it writes its output in write_size pieces."""

    def __init__(self, mod, emit):
        class _Out:
            def write(self, b):
                emit(bytes(b))
                return len(b)

        self._mod = mod
        self._w = mod.ZstdDecompressor().stream_writer(_Out(), write_size=CHUNK)
        self._seen = False

    def feed(self, data: bytes) -> None:
        self._seen = self._seen or bool(data)
        try:
            self._w.write(data)
        except self._mod.ZstdError as e:
            raise _corrupt("zstd", str(e)) from None

    def finish(self) -> None:
        # a truncated frame is not an error to stream_writer: the caller's size and
        # sha256 checks (out != the source's size) catch it
        if not self._seen:
            raise _corrupt("zstd", "it is empty")
        try:
            self._w.flush()
        except self._mod.ZstdError as e:
            raise _corrupt("zstd", str(e)) from None

    def close(self) -> None:
        pass


class _ZstdProcInflate:
    """``zstd -d`` here: fed on the caller's thread, its output read on a worker thread."""

    def __init__(self, exe: str, emit):
        import threading

        self._emit = emit
        self._p = subprocess.Popen([exe, "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        self._stdin, self._stdout, self._stderr = _pipe(self._p.stdin), _pipe(self._p.stdout), _pipe(self._p.stderr)
        self._err: BaseException | None = None
        self._t = threading.Thread(target=self._read, name="vmcore-unzstd", daemon=True)
        self._t.start()

    def _read(self) -> None:
        try:
            while True:
                b = self._stdout.read(CHUNK)
                if not b:
                    return
                self._emit(b)
        except BaseException as e:  # noqa: BLE001 - handed to the feeding thread
            self._err = e
            self._p.kill()          # unblocks a feed() waiting on a full pipe

    def _failed(self) -> BaseException:
        self._t.join()
        if self._err is not None:
            return self._err
        rc = self._p.wait()
        err = self._stderr.read().decode("utf-8", "replace").strip()
        return _corrupt("zstd", err[-300:] or f"zstd -d exited {rc}")

    def feed(self, data: bytes) -> None:
        try:
            self._stdin.write(data)
        except (BrokenPipeError, ValueError):
            raise self._failed() from None

    def finish(self) -> None:
        try:
            self._stdin.close()
        except BrokenPipeError:
            pass
        self._t.join()
        rc = self._p.wait()
        if self._err is not None or rc != 0:
            raise self._failed()

    def close(self) -> None:
        if self._p.poll() is None:
            self._p.kill()
        try:
            self._stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        self._t.join(timeout=5)
        self._p.wait()
        for f in (self._stdout, self._stderr):
            f.close()
