"""LocalTransport on real files and sockets."""
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
