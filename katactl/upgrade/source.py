"""Reading a release source (kata-static tarball or directory) safely.

The source is a file or directory on the machine running katactl; its
members are validated and then streamed to the node through the transport
(so the same code stages locally, under --host-root and over SSH).

Compression is detected from magic bytes: gzip, xz and bzip2 through Python's
decompressors, zstd through the ``zstd`` binary in a pipe (Python 3.11 has no
stdlib zstd; the binary is streaming, fast, and needs no extra wheel). An
archive counts only when it is complete: its end-of-archive marker, then the
compressor's end of stream (trailer, checksum, zstd's exit status); a cut or
damaged one is "corrupt or truncated" (exit 1), whatever it held so far.

Safety rules (any violation refuses the whole source, exit 5): no absolute
member names, no ``..`` component, no device/fifo members, symlinks must
resolve inside the release (checked by resolving them in the archive's own
namespace, so chains like ``a -> .`` + ``b -> a/../x`` are caught), no member
written through a symlinked directory, hard links only to earlier regular
files inside. setuid/setgid/sticky bits are dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import posixpath
import re
import stat as st
import subprocess
import threading
from typing import Callable, Iterator

from katactl.errors import OperationFailed, Refused, UsageError

MANIFEST_NAMES = ("SHA256SUMS", "sha256sums.txt")
_FILENAME_VERSION = re.compile(
    r"kata-static-(?P<v>\d[0-9A-Za-z.+~-]*?)-(?:amd64|arm64|s390x|ppc64le|x86_64|aarch64|riscv64)"
    r"\.tar(?:\.(?:xz|gz|zst|bz2))?$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclasses.dataclass
class Member:
    raw: str
    kind: str  # file | dir | symlink | hardlink
    mode: int
    size: int
    linkname: str | None
    read: Callable[[], bytes] | None = None
    name: str = ""  # normalized, prefix-stripped path inside the release
    #: the content in 1 MiB chunks (bounded memory); like read(), valid until the next member
    chunks: Callable[[], Iterator[bytes]] | None = None

    def content(self) -> bytes:
        """read() of a file member."""
        if self.read is None:
            raise OperationFailed(f"internal: member {self.raw!r} ({self.kind}) has no content to read")
        return self.read()

    def iter_chunks(self) -> Iterator[bytes]:
        """chunks() of a file member."""
        if self.chunks is None:
            raise OperationFailed(f"internal: member {self.raw!r} ({self.kind}) has no content to read")
        return self.chunks()

    def target(self) -> str:
        """The linkname of a symlink or hard link member."""
        if self.linkname is None:
            raise OperationFailed(f"internal: member {self.raw!r} ({self.kind}) is not a link")
        return self.linkname


@dataclasses.dataclass
class Scan:
    members: list[Member]
    strip: str
    total_bytes: int
    manifest: dict[str, str] | None
    manifest_name: str | None
    version_file: str | None


# -- opening -----------------------------------------------------------------
def sniff(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except IsADirectoryError:
        return "dir"
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zst"
    if head[:3] == b"BZh":
        return "bz2"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise UsageError(f"{path}: not a tar archive (.tar, .tar.gz, .tar.xz, .tar.zst) or a directory")


def check_source_arg(source) -> str:
    """The SOURCE argument as given: '' (or blanks) is not "the current directory"."""
    if not isinstance(source, str) or not source.strip():
        raise UsageError("empty SOURCE: give a kata-static tarball (.tar.xz, .tar.zst, .tar.gz) or a directory")
    if "\0" in source:
        raise UsageError(f"invalid SOURCE {source!r}: contains a NUL byte")
    return source


def check_source(path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return "dir"
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not a regular file or directory")
    try:
        return sniff(path)
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None


class _TarReader:
    """A tarfile in stream mode over a decompressed stream that insists on a complete
    archive: the end-of-archive marker (a zero block; tarfile takes a cut header, a
    corrupt header or plain end of data for the end too) and, after it, the
    compressor's own end (trailer and checksum; zstd's exit status)."""

    def __init__(self, path: str, kind: str, digest=None):
        import tarfile

        self.path, self.kind = path, kind
        self.proc: subprocess.Popen | None = None
        # with a digest: the file is read (and hashed) here, zstd fed by a pump thread
        self.raw: _Hashing | None = _Hashing(open(path, "rb"), digest) if digest is not None else None
        self.pump: threading.Thread | None = None
        self.ends: list[BaseException] = []
        ends = self.ends

        class _Info(tarfile.TarInfo):
            @classmethod
            def fromtarfile(cls, tarfile_):
                try:
                    return super().fromtarfile(tarfile_)
                except tarfile.HeaderError as e:  # how tarfile's next() decided the archive ended
                    ends.append(e)
                    raise

        self._info = _Info
        try:
            self.src = self._open_stream()
        except BaseException:
            self.close_raw()
            raise
        try:
            self.tf = tarfile.open(fileobj=self.src, mode="r|", tarinfo=_Info)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            zstd_err = self._close_stream()
            self.close_raw()
            raise self.corrupt(zstd_err or e) from None
        except BaseException:
            self._close_stream()
            self.close_raw()
            raise

    def _open_stream(self):
        if self.kind == "zst":
            import shutil

            if not shutil.which("zstd"):
                raise OperationFailed(f"{self.path}: zstd-compressed, but the zstd program is not installed",
                                      hint="apt-get install zstd")
            if self.raw is None:
                self.proc = subprocess.Popen(["zstd", "-dcq", "--", self.path], stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
            else:
                self.proc = subprocess.Popen(["zstd", "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
                self.pump = threading.Thread(target=_pump, args=(self.raw, self.proc.stdin), daemon=True)
                self.pump.start()
            return self.proc.stdout
        f = self.raw if self.raw is not None else open(self.path, "rb")
        if self.kind == "tar":
            return f
        import bz2
        import gzip
        import lzma

        if self.kind == "gz":
            return gzip.GzipFile(fileobj=f, mode="rb")
        return {"xz": lzma.LZMAFile, "bz2": bz2.BZ2File}[self.kind](f, "rb")

    def close_raw(self) -> None:
        if self.raw is not None:
            self.raw.close()

    def corrupt(self, why) -> OperationFailed:
        return OperationFailed(f"{self.path}: corrupt or truncated archive: {why}")

    def finish(self) -> None:
        """After the last member: the archive ended at its marker and the compressed
        stream ends cleanly after it."""
        import tarfile

        # tarfile's header errors are public at run time but missing from typeshed
        eof_header = tarfile.EOFHeaderError  # type: ignore[attr-defined]
        truncated_header = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]
        empty_header = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
        end = self.ends[-1] if self.ends else None
        if not isinstance(end, eof_header):
            why = ("cut inside a member header" if isinstance(end, truncated_header)
                   else "no end-of-archive marker" if end is None or isinstance(end, empty_header)
                   else f"invalid member header ({end})")
            zstd_err = self._close_stream()
            raise self.corrupt(zstd_err or why)
        while self.src.read(1 << 20):  # the padding after the marker, to the compressor's trailer
            pass
        zstd_err = self._close_stream()
        if zstd_err:
            raise self.corrupt(zstd_err)
        if self.raw is not None:
            while self.raw.read(1 << 20):  # what the decompressor left: the digest covers the file
                pass

    def _close_stream(self) -> str:
        """Close the source; for zstd, its complaint ('' when it succeeded or was cut off by us)."""
        with contextlib.suppress(OSError):
            if self.proc is None and self.src is not self.raw:  # raw: closed by close_raw, after its digest
                self.src.close()
        if self.proc is None:
            return ""
        proc, self.proc = self.proc, None
        err = _reap(proc)
        if self.pump is not None:
            self.pump.join()  # ends with zstd's stdin: read to the end, or a broken pipe
        if proc.returncode not in (0, None, -13):
            # zstd says "<path> : Read error (39) : premature end" (or "/*stdin*\ : ..."); the path is
            # already in the message
            for prefix in (self.path + " : ", "/*stdin*\\ : "):
                if err.startswith(prefix):
                    err = err[len(prefix):]
            return f"zstd: {err or f'exit status {proc.returncode}'}"
        return ""


@contextlib.contextmanager
def _open_tar(path: str, kind: str, digest=None):
    import lzma
    import tarfile
    import zlib

    reader = _TarReader(path, kind, digest)
    try:
        yield reader
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        if isinstance(e, OSError) and e.filename:  # a node-side error, not the archive
            raise
        zstd_err = reader._close_stream()
        raise reader.corrupt(zstd_err or e) from None
    except BaseException:
        reader._close_stream()
        raise
    finally:
        reader.tf.close()
        reader._close_stream()
        reader.close_raw()


class _Hashing:
    """A file read through a digest: every byte read updates it."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.digest.update(b)
        return b

    def close(self) -> None:
        self.f.close()


def _pump(src: _Hashing, dst) -> None:
    """Copy src into zstd's stdin until either ends (zstd exits early on a corrupt stream)."""
    try:
        while b := src.read(1 << 20):
            dst.write(b)
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            dst.close()


def _reap(proc) -> str:
    if proc is None:
        return ""
    with contextlib.suppress(OSError):
        proc.stdout.close()
    try:
        err = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
    except OSError:
        err = ""
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return err.splitlines()[0] if err else ""


def iter_members(path: str, kind: str, digest=None) -> Iterator[Member]:
    """Raw members in archive order; ``read()`` is valid until the next one. ``digest``
    (a hashlib object, archives only) is fed the whole archive file, as read for them."""
    if kind == "dir":
        yield from _iter_dir(path)
        return
    with _open_tar(path, kind, digest) as reader:
        tf = reader.tf
        # next(), not iteration: that indexes tf.members, the list of every member seen so
        # far (about 1 KiB each), which is dropped here as each one is read
        while (ti := tf.next()) is not None:
            tf.members.clear()
            if ti.isreg():
                m = Member(ti.name, "file", ti.mode, ti.size, None)
                m.read = (lambda ti=ti: _read_exact(tf.extractfile(ti), ti.size))
                m.chunks = (lambda ti=ti: _iter_exact(tf.extractfile(ti), ti.size))
            elif ti.isdir():
                m = Member(ti.name, "dir", ti.mode, 0, None)
            elif ti.issym():
                m = Member(ti.name, "symlink", ti.mode, 0, ti.linkname)
            elif ti.islnk():
                m = Member(ti.name, "hardlink", ti.mode, 0, ti.linkname)
            else:
                what = ("device" if (ti.ischr() or ti.isblk()) else "fifo" if ti.isfifo()
                        else f"type {ti.type!r}")
                raise Refused(f"{path}: member {ti.name!r} is a {what}; releases hold only files, "
                              "directories and symlinks")
            yield m
        reader.finish()


def _iter_dir(root: str) -> Iterator[Member]:
    for d, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        rel_d = os.path.relpath(d, root)
        for n in sorted(dirs) + sorted(files):
            full = os.path.join(d, n)
            rel = n if rel_d == "." else f"{rel_d}/{n}"
            s = os.lstat(full)
            if st.S_ISLNK(s.st_mode):
                yield Member(rel, "symlink", 0o777, 0, os.readlink(full))
            elif st.S_ISDIR(s.st_mode):
                yield Member(rel, "dir", s.st_mode & 0o7777, 0, None)
            elif st.S_ISREG(s.st_mode):
                yield Member(rel, "file", s.st_mode & 0o7777, s.st_size, None,
                             read=functools.partial(_read_file, full), chunks=functools.partial(_iter_file, full))
            else:
                raise Refused(f"{full}: not a regular file, directory or symlink")


def _read_file(p: str) -> bytes:
    with open(p, "rb") as f:
        return _read_exact(f, os.fstat(f.fileno()).st_size)


def _iter_file(p: str) -> Iterator[bytes]:
    with open(p, "rb") as f:
        yield from _iter_exact(f, os.fstat(f.fileno()).st_size)


def _iter_exact(f, size: int) -> Iterator[bytes]:
    """Exactly size bytes of f in 1 MiB chunks (a short member is an error, as in _read_exact)."""
    got = 0
    while got < size:
        b = f.read(min(1 << 20, size - got))
        if not b:
            raise EOFError(f"unexpected end of data ({got} of {size} bytes)")
        got += len(b)
        yield b


def _read_exact(f, size: int):
    """One member into one preallocated buffer (f.read() would briefly hold two copies)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = f.readinto(view[got:got + (1 << 20)])  # small reads: no big temporaries inside tarfile
        if not n:
            raise EOFError(f"unexpected end of data ({got} of {size} bytes)")
        got += n
    return buf


# -- validation ----------------------------------------------------------------
def normalize(raw: str, where: str) -> str:
    if "\0" in raw or "\n" in raw:
        raise Refused(f"{where}: member name {raw!r} contains control characters")
    if raw.startswith("/"):
        raise Refused(f"{where}: member {raw!r} has an absolute path; refusing the archive")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(f"{where}: member {raw!r} climbs out with '..'; refusing the archive")
    if len(parts) > MAX_DEPTH or len(raw) > MAX_NAME:
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        raise Refused(f"{where}: member {shown!r} is {len(parts)} levels deep and {len(raw)} bytes long "
                      f"(a release path has at most {MAX_DEPTH} levels and {MAX_NAME} bytes)")
    return "/".join(parts)


#: the largest VERSION file or SHA256SUMS manifest read (kata-static's manifest of a few
#: hundred files is about 40 KiB)
MAX_META = 1 << 20


def _may_be_root(parent: str, tops: set[str]) -> bool:
    """Whether directory ``parent`` can still turn out to be the release root, that is the
    prefix _strip_prefix picks, given the top-level names seen so far."""
    return parent in ("", "opt/kata") or ("/" not in parent and tops == {parent})


def _head(m: Member, limit: int) -> bytes | None:
    """A file member's content when it is at most ``limit`` bytes, else None (not read: a
    directory source's file that grew since its stat is cut off after limit + 1 bytes)."""
    if m.size > limit:
        return None
    buf = bytearray()
    for b in m.iter_chunks():
        buf += b
        if len(buf) > limit:
            return None
    return bytes(buf)


def _strip_prefix(names: list[str]) -> str:
    """kata-static tarballs hold ./opt/kata/...; a release dir holds what is under it."""
    real = [n for n in names if n]
    if not real:
        return ""
    if all(n in ("opt", "opt/kata") or n.startswith("opt/kata/") for n in real) and \
            any(n.startswith("opt/kata/") for n in real):
        return "opt/kata"
    tops = {n.split("/", 1)[0] for n in real}
    if len(tops) == 1 and any("/" in n for n in real):
        top = tops.pop()
        if top not in ("bin", "share", "libexec", "runtime-rs"):
            return top
    return ""


#: a member name's depth and length at most: far beyond any release (kata-static's deepest
#: path has about ten levels), and short enough to stay under PATH_MAX below releases/<v>/
MAX_DEPTH = 64
MAX_NAME = 1024

#: members of a source, at most: kata-static has a few hundred files, and each member the
#: scan keeps costs memory (about 0.5 KiB), so a small archive of empty files must not
#: make the client hold gigabytes
MAX_MEMBERS = 100_000

#: symlinks followed in one path resolution, at most (Linux's MAXSYMLINKS)
MAX_SYMLINKS = 40


def _resolve(path: str, links: dict[str, str], where: str, budget: list[int] | None = None) -> list[str]:
    """Resolve a release-relative path through the archive's symlinks; refuse escapes.

    Like the kernel, one resolution follows at most MAX_SYMLINKS links in all
    (``budget`` is shared by the nested resolutions): a chain such as
    ``l_i -> l_{i-1}/../l_{i-1}`` doubles the work per link and would otherwise
    never finish."""
    if budget is None:
        budget = [MAX_SYMLINKS]
    out: list[str] = []
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            if not out:
                raise Refused(f"{where}: a symlink resolves outside the release dir ({path!r})")
            out.pop()
            continue
        out.append(p)
        cur = "/".join(out)
        if cur in links:
            target = links[cur]
            if target.startswith("/"):
                raise Refused(f"{where}: symlink {cur!r} -> {target!r} is absolute")
            budget[0] -= 1
            if budget[0] < 0:
                raise Refused(f"{where}: symlink loop or more than {MAX_SYMLINKS} symlinks to follow "
                              f"at {cur!r}")
            base = "/".join(out[:-1])
            out = _resolve(posixpath.join(base, target) if base else target, links, where, budget)
    return out


def scan(path: str, kind: str) -> Scan:
    """First pass: validate every member, learn the prefix, size, manifest and VERSION."""
    members: list[Member] = []
    raws: list[str] = []
    # the VERSION and manifest files that may lie at the release root (the prefix to strip
    # is known only at the end): at most three names in each of three directories, each
    # read up to MAX_META bytes (None: larger), so a huge or repeated one costs no memory
    manifest_raw: dict[str, bytes | None] = {}
    tops: set[str] = set()
    for m in iter_members(path, kind):
        if len(members) >= MAX_MEMBERS:  # before any more memory goes to them
            raise Refused(f"{path}: more than {MAX_MEMBERS:,} members; a Kata release has a few "
                          "hundred files")
        m.name = normalize(m.raw, path)
        if m.name:
            tops.add(m.name.split("/", 1)[0])
        if m.kind == "file":
            parent, _, base = m.name.rpartition("/")
            if (base in MANIFEST_NAMES or base == "VERSION") and _may_be_root(parent, tops):
                manifest_raw[m.name] = _head(m, MAX_META)
        if len(tops) > 1:  # no single top directory: only "" and opt/kata may still be the root
            for n in [n for n in manifest_raw if not _may_be_root(n.rpartition("/")[0], tops)]:
                del manifest_raw[n]
        m.read = m.chunks = None  # each holds its TarInfo
        members.append(m)
        raws.append(m.name)
    strip = _strip_prefix(raws)
    kept: list[Member] = []
    links: dict[str, str] = {}
    files: dict[str, int] = {}  # name -> size
    seen: dict[str, str] = {}  # name -> kind
    for m in members:
        if not m.name:
            continue  # the archive's "./" entry
        if strip:
            if m.name in (strip, *_parents(strip)):
                continue
            if not m.name.startswith(strip + "/"):
                raise Refused(f"{path}: member {m.raw!r} lies outside {strip}/")
            m.name = m.name[len(strip) + 1:]
        if not m.name:
            continue
        if m.name in seen and not (m.kind == "dir" and seen[m.name] == "dir"):
            raise Refused(f"{path}: member {m.raw!r} appears twice"
                          + (f" (a {m.kind} after a {seen[m.name]})" if m.kind != seen[m.name] else ""))
        seen[m.name] = m.kind
        if m.kind == "symlink":
            if not m.linkname or m.linkname.startswith("/"):
                raise Refused(f"{path}: symlink {m.raw!r} -> {m.linkname!r} is absolute or empty; "
                              "a release must be self-contained")
            links[m.name] = m.linkname
        elif m.kind == "hardlink":
            ln = m.linkname or ""
            if ln.startswith("/") or ".." in ln.split("/"):
                raise Refused(f"{path}: hard link {m.raw!r} -> {ln!r} points outside the release")
            t = normalize(ln, path)
            if strip and t.startswith(strip + "/"):
                t = t[len(strip) + 1:]
            if t not in files:
                raise Refused(f"{path}: hard link {m.raw!r} -> {m.linkname!r} does not point to a "
                              "file inside the release")
            m.linkname = t
            m.size = files[t]  # _extract writes a copy of its target: the space check counts it
        elif m.kind == "file":
            files[m.name] = m.size
        kept.append(m)
    for m in kept:
        parent = m.name.rsplit("/", 1)[0] if "/" in m.name else ""
        under = next((p for p in _parents(m.name) if seen.get(p) in ("file", "hardlink")), None)
        if under:
            raise Refused(f"{path}: member {m.raw!r} lies under {under!r}, which is a file in the archive")
        if parent and _resolve(parent, {}, path) != _resolve(parent, links, path):
            raise Refused(f"{path}: member {m.raw!r} would be written through a symlink")
        if m.kind == "symlink":
            _resolve(posixpath.join(parent, m.target()) if parent else m.target(), links, path)
    manifest = None
    manifest_name = None
    version_file = None
    for raw_name, data in manifest_raw.items():
        rel = raw_name[len(strip) + 1:] if strip and raw_name.startswith(strip + "/") else raw_name
        if rel not in MANIFEST_NAMES and rel != "VERSION":
            continue  # not at the release root: an ordinary file
        if data is None:
            raise Refused(f"{path}: {raw_name} is larger than {MAX_META >> 20} MiB; a release's "
                          f"{'manifest' if rel in MANIFEST_NAMES else 'VERSION file'} is far smaller")
        if rel in MANIFEST_NAMES:
            manifest = parse_manifest(data, f"{path}:{rel}")
            manifest_name = rel
        elif rel == "VERSION":
            version_file = data.decode("utf-8", "replace").strip().splitlines()[0].strip() if data.strip() else None
    total = sum(m.size for m in kept if m.kind in ("file", "hardlink"))
    return Scan(kept, strip, total, manifest, manifest_name, version_file)


def _parents(p: str) -> list[str]:
    out = []
    while "/" in p:
        p = p.rsplit("/", 1)[0]
        out.append(p)
    return out


def parse_manifest(data: bytes, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not _HEX64.fullmatch(parts[0]):
            raise Refused(f"{where}: line {i} is not '<sha256>  <path>'")
        name = parts[1].lstrip("*")
        out[normalize(name, where)] = parts[0].lower()
    return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def sidecar_sha256(path: str) -> str | None:
    for ext in (".sha256", ".sha256sum"):
        p = path + ext
        if os.path.isfile(p):
            with open(p, encoding="utf-8", errors="replace") as f:
                tok = (f.read(4096).split() or [""])[0]
            if not _HEX64.fullmatch(tok):
                raise Refused(f"{p}: does not start with a sha256 hex digest")
            return tok.lower()
    return None


def version_from_filename(path: str) -> str | None:
    m = _FILENAME_VERSION.search(os.path.basename(path.rstrip("/")))
    return m.group("v") if m else None
