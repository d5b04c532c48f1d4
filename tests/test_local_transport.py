"""LocalTransport on real files and sockets."""
import errno
import os
import socket
import threading

import pytest

from katactl.backends.local import LocalTransport
from katactl.errors import SOCKET_BUSY, SOCKET_MISSING, SOCKET_REFUSED, TimeoutExpired, UnreachableError, UsageError


def _listen(path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind through a short relative name: the path itself may be too long for sun_path
    cwd = os.getcwd()
    os.chdir(os.path.dirname(path))
    try:
        srv.bind(os.path.basename(path))
    finally:
        os.chdir(cwd)
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        c.sendall(b"hello")
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_connect_unix_with_a_path_longer_than_sun_path(tmp_path):
    root = tmp_path / ("r" * 60)
    sock_dir = root / "run" / "vc" / "sbs" / ("a" * 64)
    sock_dir.mkdir(parents=True)
    srv = _listen(str(sock_dir / "shim-monitor.sock"))
    t = LocalTransport(str(root))
    assert len(t.real(f"/run/vc/sbs/{'a' * 64}/shim-monitor.sock")) > 108
    s = t.connect_unix(f"/run/vc/sbs/{'a' * 64}/shim-monitor.sock", 2)
    assert s.recv(5) == b"hello"
    s.close()
    srv.close()


def test_connect_errors(tmp_path):
    """Each failure carries its reason (what sandbox liveness decides on), not only words."""
    t = LocalTransport(str(tmp_path))
    with pytest.raises(UnreachableError, match="does not exist") as e:
        t.connect_unix("/nope.sock", 1)
    assert e.value.reason == SOCKET_MISSING
    (tmp_path / "file").write_text("")
    with pytest.raises(UnreachableError, match="does not exist") as e:
        t.connect_unix("/file/under-a-file.sock", 1)  # ENOTDIR: no such socket either
    assert e.value.reason == SOCKET_MISSING
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "dead.sock"))
    s.close()  # the file stays, nobody listens
    with pytest.raises(UnreachableError, match="nobody is listening") as e:
        t.connect_unix("/dead.sock", 1)
    assert e.value.reason == SOCKET_REFUSED
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "busy.sock"))
    srv.listen(0)
    held = socket.socket(socket.AF_UNIX)
    held.connect(str(tmp_path / "busy.sock"))  # fills the backlog: the next connect gets EAGAIN
    try:
        with pytest.raises(UnreachableError) as e:
            t.connect_unix("/busy.sock", 1)
        assert e.value.reason == SOCKET_BUSY  # someone listens (not missing, not refused), accepts nobody
    finally:
        held.close()
        srv.close()


def test_host_root_cannot_be_escaped(tmp_path):
    (tmp_path / "inside").write_text("x")
    t = LocalTransport(str(tmp_path / "root"))
    assert t.real("/../../etc/passwd") == str(tmp_path / "root") + "/etc/passwd"
    with pytest.raises(UsageError):
        t.real("relative/path")
    with pytest.raises(UsageError):
        t.real("/a\0b")


def test_atomic_write_leaves_no_temp_on_failure(tmp_path):
    t = LocalTransport(str(tmp_path))
    t.write_bytes_atomic("/f", b"one", mode=0o600)
    assert (tmp_path / "f").read_bytes() == b"one" and oct((tmp_path / "f").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileNotFoundError):
        t.write_bytes_atomic("/missing-dir/f", b"two")
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_stream_is_chunked(tmp_path):
    (tmp_path / "big").write_bytes(os.urandom(3 << 20))
    t = LocalTransport(str(tmp_path))
    chunks = list(t.open_stream("/big", offset=1 << 20, chunk_size=1 << 19))
    assert all(len(c) <= 1 << 19 for c in chunks)
    assert b"".join(chunks) == (tmp_path / "big").read_bytes()[1 << 20:]


def test_run_timeout(tmp_path):
    with pytest.raises(TimeoutExpired):
        LocalTransport().run(["sleep", "5"], timeout=0.2)
    r = LocalTransport().run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_batched_reads_stats_and_scans(tmp_path):
    t = LocalTransport(str(tmp_path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a").write_bytes(b"aaa")
    (tmp_path / "d/sub").mkdir()
    (tmp_path / "d/ln").symlink_to("sub")
    (tmp_path / "d/dangling").symlink_to("nowhere")
    got = t.read_many(["/d/a", "/d/missing", "/d/sub"], limit=2)
    assert got["/d/a"] == b"aa"
    assert isinstance(got["/d/missing"], FileNotFoundError) and isinstance(got["/d/sub"], IsADirectoryError)
    st = t.stat_many(["/d/ln", "/d/missing"], follow_symlinks=False)
    assert st["/d/ln"].is_link and isinstance(st["/d/missing"], FileNotFoundError)
    entries = dict(t.scan_dir("/d"))
    assert list(entries) == ["a", "dangling", "ln", "sub"]
    assert entries["ln"].is_dir and not entries["ln"].is_link and entries["dangling"].is_link
    assert dict(t.scan_dir("/d", follow_symlinks=False))["ln"].is_link
    many = t.scan_dirs(["/d", "/nope", "/d/a"])
    assert isinstance(many["/nope"], FileNotFoundError) and isinstance(many["/d/a"], NotADirectoryError)
    assert [n for n, _ in many["/d"]] == ["a", "dangling", "ln", "sub"]


def test_list_dirs_names_without_stats_as_scan_dirs_lists_them(tmp_path):
    """list_dirs (the bundle index's listing) gives scan_dirs' names, sorted, and its errors
    as values; the local one makes no stat per entry, the default (SSH, kube) reads the
    names off scan_dirs."""
    from katactl.backends.base import NodeTransport

    t = LocalTransport(str(tmp_path))
    (tmp_path / "d").mkdir()
    for name in ("b", "a", "c"):
        (tmp_path / "d" / name).write_bytes(b"x")
    (tmp_path / "d/sub").mkdir()
    (tmp_path / "d/dangling").symlink_to("nowhere")
    (tmp_path / "empty").mkdir()
    paths = ["/d", "/empty", "/nope", "/d/a", "/d//sub/"]
    for got in (t.list_dirs(paths), NodeTransport.list_dirs(t, paths)):
        assert got["/d"] == ["a", "b", "c", "dangling", "sub"] == [n for n, _ in t.scan_dir("/d")]
        assert got["/empty"] == [] and got["/d//sub/"] == []
        assert isinstance(got["/nope"], FileNotFoundError) and isinstance(got["/d/a"], NotADirectoryError)
    with pytest.raises(UsageError):
        t.list_dirs(["relative"])


def test_file_stats_are_the_dataclass_made_as_usual(tmp_path):
    """LocalTransport builds FileStat without its __init__ (speed): every field, same values,
    equal and hashable like one made the usual way."""
    import dataclasses

    from katactl.backends.base import FileStat

    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "ln").symlink_to("f")
    t = LocalTransport(str(tmp_path))
    for path, follow in (("/f", True), ("/ln", False), ("/", True)):
        got = t.stat_many([path], follow_symlinks=follow)[path]
        s = os.stat(str(tmp_path) + path, follow_symlinks=follow)
        want = FileStat(s.st_size, s.st_mtime, s.st_mode, os.path.isdir(str(tmp_path) + path) and follow,
                        not follow, s.st_uid)
        assert dataclasses.asdict(got) == dataclasses.asdict(want) and got == want and hash(got) == hash(want)
        assert list(vars(got)) == [f.name for f in dataclasses.fields(FileStat)]
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.size = 0  # type: ignore[misc]


def test_list_kinds_tells_what_scan_dirs_tells(tmp_path):
    """list_kinds: (name, is_dir, is_link, mtime) with scan_dirs' kinds (a symlink described
    by its target, a dangling one by itself); locally mtime is None but for symlinks (no
    stat per entry); the default (SSH, kube) has scan_dirs' mtime."""
    from katactl.backends.base import NodeTransport

    t = LocalTransport(str(tmp_path))
    (tmp_path / "d/sub").mkdir(parents=True)
    (tmp_path / "d/file").write_bytes(b"x")
    (tmp_path / "d/ln").symlink_to("sub")
    (tmp_path / "d/lnfile").symlink_to("file")
    (tmp_path / "d/dangling").symlink_to("nowhere")
    (tmp_path / "d/loop").symlink_to("loop")
    paths = ["/d", "/nope", "/d/file"]
    scan = t.scan_dirs(paths)
    for got in (t.list_kinds(paths), NodeTransport.list_kinds(t, paths)):
        assert [(n, d, k) for n, d, k, _ in got["/d"]] == [(n, s.is_dir, s.is_link) for n, s in scan["/d"]]
        assert isinstance(got["/nope"], FileNotFoundError) and isinstance(got["/d/file"], NotADirectoryError)
    local = {n: m for n, _, _, m in t.list_kinds(["/d"])["/d"]}
    full = {n: s.mtime for n, s in scan["/d"]}
    assert local == {n: (full[n] if n in ("ln", "lnfile", "dangling", "loop") else None) for n in full}
    assert {n: m for n, _, _, m in NodeTransport.list_kinds(t, ["/d"])["/d"]} == full


def _linked_node(tmp_path):
    """A node root with what the node's own kernel resolves inside it: /var/crash -> /data/crash
    (absolute), and links naming this host's files by their absolute path (``host``: a
    directory outside the root, which the node does not have)."""
    root, host = tmp_path / "node", tmp_path / "host"
    (root / "data/crash").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "data/crash/f").write_bytes(b"node")
    os.symlink("/data/crash", root / "var/crash")
    host.mkdir()
    (host / "f").write_bytes(b"host")
    os.symlink(str(host / "f"), root / "file-out")           # absolute, to this host's file
    os.symlink(str(host), root / "dir-out")                  # absolute, to this host's directory
    os.symlink("../../../../../.." + str(host), root / "var/climb")  # relative, climbing above /
    return root, host


def check_in_root(root, host):
    """Every LocalTransport call on ``_linked_node``'s tree resolves inside the root: the node's
    files through its absolute link, never this host's. (Also run without openat2, below.)"""
    t = LocalTransport(str(root))
    assert t.read_bytes("/var/crash/f") == b"node" and t.read_many(["/var/crash/f"])["/var/crash/f"] == b"node"
    assert b"".join(t.open_stream("/var/crash/f")) == b"node"
    assert t.stat("/var/crash/f").size == 4 and t.stat_many(["/var/crash"])["/var/crash"].is_dir
    assert t.listdir("/var/crash") == ["f"] == t.list_dirs(["/var/crash"])["/var/crash"]
    assert [n for n, _ in t.scan_dir("/var/crash")] == ["f"]
    assert t.readlink("/var/crash") == "/data/crash" and t.stat("/var/crash", follow_symlinks=False).is_link
    assert t.real("/var/crash/f") == str(root / "data/crash/f") and t.statvfs_free("/var/crash") > 0
    # this host's file and directory are not the node's: they do not exist in its tree
    for p in ("/file-out", "/dir-out/f", "/var/climb/f"):
        with pytest.raises(FileNotFoundError):
            t.read_bytes(p)
        assert isinstance(t.read_many([p])[p], FileNotFoundError)
        assert isinstance(t.stat_many([p])[p], FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            t.open_stream(p)
    with pytest.raises(FileNotFoundError):
        t.listdir("/dir-out")
    kinds = {n: (d, k) for n, d, k, _ in t.list_kinds(["/"])["/"]}
    assert kinds["dir-out"] == (False, True) and kinds["var"] == (True, False)  # dangling in the node
    assert dict(t.scan_dir("/"))["dir-out"].is_link and not dict(t.scan_dir("/var"))["crash"].is_link
    # writes land in the node's tree, and nothing of this host is removed or written
    t.write_bytes_atomic("/var/crash/w", b"w")
    t.mkdir("/var/crash/new/sub")
    t.rename("/var/crash/w", "/var/crash/new/w")
    t.symlink("w", "/var/crash/new/ln")
    assert (root / "data/crash/new/w").read_bytes() == b"w" and os.readlink(root / "data/crash/new/ln") == "w"
    for call in (lambda: t.remove("/dir-out/f"), lambda: t.remove("/var/climb/f"),
                 lambda: t.write_bytes_atomic("/dir-out/w", b"x"), lambda: t.mkdir("/dir-out/d", parents=False),
                 lambda: t.rename("/dir-out/f", "/var/crash/stolen")):
        with pytest.raises(FileNotFoundError):
            call()
    t.remove("/file-out")  # the link itself, as unlink(2) on the node
    assert sorted(os.listdir(host)) == ["f"] and (host / "f").read_bytes() == b"host"
    t.remove("/var/crash/new", recursive=True)
    t.remove("/var/crash/f")
    assert os.listdir(root / "data/crash") == [] and os.path.islink(root / "var/crash")
    # the node's own file at that absolute path is the one read
    (root / str(host).lstrip("/")).mkdir(parents=True)
    (root / str(host).lstrip("/") / "f").write_bytes(b"node's")
    assert t.read_bytes("/dir-out/f") == b"node's" == t.read_bytes("/var/climb/f")


def test_host_root_resolves_symlinks_inside_the_root(tmp_path):
    """review 11 (vmcore finding 2): root + path let this host's kernel follow an absolute link
    (/var/crash -> /data/crash) from *its* /: the node's dumps went missing, this host's files
    were read, and rm deleted them."""
    check_in_root(*_linked_node(tmp_path))


#: a seccomp filter answering openat2 (437) with ENOSYS (argv[3]), as a kernel before 5.6 or a
#: container runtime's default profile does, or EPERM, as systemd-nspawn's and older runtimes'
#: profiles refuse what they do not know: the transport must fall back to its own walk
_NO_OPENAT2 = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class F(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
class P(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(F))]
prog = (F * 4)(F(0x20, 0, 0, 0), F(0x15, 0, 1, 437), F(0x06, 0, 0, 0x00050000 | int(sys.argv[3])),
               F(0x06, 0, 0, 0x7fff0000))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(P(4, prog)), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
from katactl.backends import local
from tests.test_local_transport import check_in_root
import pathlib
check_in_root(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
assert local._openat2 is False  # the walk did it
print("ok")
"""


@pytest.mark.parametrize("refusal", [errno.ENOSYS, errno.EPERM], ids=["ENOSYS", "EPERM"])
def test_without_openat2_the_walk_resolves_inside_the_root_too(tmp_path, refusal):
    import subprocess
    import sys

    if os.uname().machine != "x86_64":
        pytest.skip("the seccomp filter's syscall number is x86_64's")
    root, host = _linked_node(tmp_path)
    r = subprocess.run([sys.executable, "-c", _NO_OPENAT2, str(root), str(host), str(refusal)],
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_host_root_proc_linked_to_this_hosts_proc(tmp_path):
    """A lab's (and these tests') root/proc -> /proc: inside the root a loop, so this host's
    /proc (lab.layout.link_host_views); a socket behind an absolute link is reached in the root."""
    os.symlink("/proc", tmp_path / "proc")
    t = LocalTransport(str(tmp_path))
    assert t.stat(f"/proc/{os.getpid()}").is_dir and t.read_bytes("/proc/self/stat").startswith(f"{os.getpid()} ".encode())
    assert str(os.getpid()) in t.listdir("/proc") and t.real("/proc/self") == f"/proc/{os.getpid()}"
    (tmp_path / "data/vc").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    os.symlink("/data/vc", tmp_path / "run/vc")
    srv = _listen(str(tmp_path / "data/vc/s.sock"))
    s = t.connect_unix("/run/vc/s.sock", 2)
    assert s.recv(5) == b"hello"
    s.close()
    srv.close()


def test_a_rename_elsewhere_racing_a_dotdot_lookup_is_tried_again(tmp_path):
    """openat2 with RESOLVE_IN_ROOT answers EAGAIN when a rename anywhere on the machine races a
    ".." of the lookup (/var/run -> ../run on every systemd node): it was an error, so discovery
    exited 1 or showed a sandbox 'unknown' on a node where kubelet renames files (review 12)."""
    import subprocess
    import sys
    import time

    (tmp_path / "run/vc").mkdir(parents=True)
    (tmp_path / "run/vc/persist.json").write_bytes(b"{}")
    (tmp_path / "var").mkdir()
    os.symlink("../run", tmp_path / "var/run")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    renamer = subprocess.Popen([sys.executable, "-c", "import os, sys\na, b = sys.argv[1] + '/a', sys.argv[1] + '/b'\n"
                                "open(a, 'w').close()\nwhile True:\n    os.rename(a, b); os.rename(b, a)\n",
                                str(scratch)])
    try:
        t = LocalTransport(str(tmp_path))
        p = "/var/run/vc/persist.json"
        errors, calls, deadline = [], 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            calls += 1
            for call in (lambda: t.read_bytes(p), lambda: t.stat(p), lambda: t.read_many([p])[p]):
                try:
                    got = call()
                except OSError as e:
                    got = e
                if isinstance(got, OSError):
                    errors.append(got.errno)
        assert calls > 100 and errors == [], (calls, errors[:5], len(errors))
    finally:
        renamer.kill()
        renamer.wait()


def test_remove_and_rename_act_in_the_directory_resolved_in_the_root(tmp_path):
    """remove/rename resolved the node path inside the root, then handed the *string* on, which
    this host's kernel resolved again from its /: a directory swapped for an absolute link in
    between (another process, renameat2 RENAME_EXCHANGE in a loop) took the removal out of the
    root, 117 files of this host in 2 s (review 12 hostroot 3)."""
    import time

    root, victim, swapper = _swapping_node(tmp_path)
    c, lnk = str(root / "data/crash"), str(root / "data/crash.lnk")
    t = LocalTransport(str(root))
    escaped, deadline = 0, time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            (victim / "kata/sb").mkdir(parents=True, exist_ok=True)
            (victim / "kata/sb/host-file").write_bytes(b"x")
            (victim / "kata/f").write_bytes(b"x")
            d = c if not os.path.islink(c) else lnk
            try:
                os.makedirs(f"{d}/kata/sb", exist_ok=True)
                open(f"{d}/kata/f", "w").close()
            except OSError:
                continue
            for call in (lambda: t.remove("/data/crash/kata/sb", recursive=True),
                         lambda: t.rename("/data/crash/kata/f", "/data/crash/kata/g")):
                try:
                    call()
                except OSError:
                    pass
            escaped += not (victim / "kata/sb/host-file").exists() or not (victim / "kata/f").exists()
    finally:
        swapper.kill()
        swapper.wait()
    assert escaped == 0


def test_writes_and_mkdir_act_in_the_directory_resolved_in_the_root(tmp_path):
    """write_bytes_atomic/mkdir handed the resolved path on as a string, as remove/rename did
    before review 12: a directory swapped for an absolute link meanwhile (renameat2
    RENAME_EXCHANGE in a loop) put the node's new file or directory in this host's tree."""
    import time

    (tmp_path / "victim/kata").mkdir(parents=True)  # before the swapper starts: the link's target
    (tmp_path / "root/data/crash/kata").mkdir(parents=True)
    root, victim, swapper = _swapping_node(tmp_path)
    t = LocalTransport(str(root))
    calls, deadline = 0, time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            calls += 1
            for call, args in ((t.write_bytes_atomic, (f"/data/crash/kata/w{calls}", b"x")),
                               (t.mkdir, (f"/data/crash/kata/d{calls}/e",)),
                               (t.mkdir, (f"/data/crash/kata/n{calls}", 0o755, False))):
                try:
                    call(*args)
                except OSError:
                    pass
    finally:
        swapper.kill()
        swapper.wait()
    assert calls > 20 and os.listdir(victim / "kata") == []


def test_mkdir_through_dangling_links_in_the_root(tmp_path):
    """mkdir -p through a dangling link makes its target inside the root (as the path-string
    makedirs did); links that name each other end in ELOOP, never a RecursionError."""
    os.symlink("/data/crash", tmp_path / "crash")  # absolute: the node's /data/crash, not this host's
    t = LocalTransport(str(tmp_path))
    t.mkdir("/crash/kata/sb")
    assert (tmp_path / "data/crash/kata/sb").is_dir()
    os.symlink("/b/x", tmp_path / "a")
    os.symlink("/a/y", tmp_path / "b")
    with pytest.raises(OSError) as e:
        t.mkdir("/a/z")
    assert e.value.errno == errno.ELOOP
    with pytest.raises(FileExistsError):  # a file where the directory goes: makedirs' error
        (tmp_path / "f").write_bytes(b"")
        t.mkdir("/f")


def test_mkdir_through_a_relative_dangling_link_in_a_linked_directory(tmp_path):
    """review 13 diffA 4: the link's relative target counts from its real directory (/a -> x/y,
    /x/y/link -> ../z is /x/z, as the node's kernel resolves it), not from the path as given
    (/a/../z made /z and then failed)."""
    (tmp_path / "x/y").mkdir(parents=True)
    os.symlink("x/y", tmp_path / "a")
    os.symlink("../z", tmp_path / "x/y/link")
    LocalTransport(str(tmp_path)).mkdir("/a/link/sub")
    assert (tmp_path / "x/z/sub").is_dir() and not (tmp_path / "z").exists()


def test_a_write_fails_with_its_sources_own_error(tmp_path):
    """review 13 diffA 5: an error the data raises (a corrupt archive's BadGzipFile, an OSError)
    is that error, not a failure of the destination named with its path and no errno."""
    import gzip

    t = LocalTransport(str(tmp_path))

    def chunks():
        yield b"x"
        raise gzip.BadGzipFile("CRC check failed")

    with pytest.raises(gzip.BadGzipFile, match="CRC check failed"):
        t.write_stream_atomic("/f", chunks())
    assert os.listdir(tmp_path) == []  # no temp file left either
    with pytest.raises(IsADirectoryError) as e:  # the destination's own error names it
        (tmp_path / "d").mkdir()
        t.write_bytes_atomic("/d", b"x")
    assert e.value.filename == str(tmp_path / "d")


def _swapping_node(tmp_path):
    """(root, victim, swapper): a node root whose /data/crash a process keeps exchanging
    (renameat2 RENAME_EXCHANGE in a loop) with /data/crash.lnk, an absolute link to ``victim``
    outside the root, as another process on a node could. The caller kills the swapper."""
    import subprocess
    import sys

    root, victim = tmp_path / "root", tmp_path / "victim"
    (root / "data/crash").mkdir(parents=True, exist_ok=True)
    os.symlink(str(victim), root / "data/crash.lnk")
    c, lnk = str(root / "data/crash"), str(root / "data/crash.lnk")
    swapper = subprocess.Popen([sys.executable, "-c", "import ctypes, sys\nlibc = ctypes.CDLL(None)\n"
                                "c, l = sys.argv[1].encode(), sys.argv[2].encode()\n"
                                "while True:\n    libc.renameat2(-100, c, -100, l, 2)\n", c, lnk])
    return root, victim, swapper
