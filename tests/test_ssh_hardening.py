"""SSHTransport under a node that stops answering, large outputs, interrupted commands,
odd names and host certificates: real OpenSSH sshd (tests/conftest_sshd.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from katactl import config
from katactl.errors import HostKeyError, TimeoutExpired, UnreachableError


@pytest.fixture
def frozen(sshd_lab, ssh_open):
    """A transport to node 'freeze' whose sshd session processes are then stopped
    (SIGSTOP: a hung kernel, a black-holed link); SIGCONT and a fresh pool after."""
    from katactl.backends import ssh

    ssh.close_pool()
    t = ssh_open("freeze", timeout=1.0)
    assert t.read_bytes("/etc/hostname") == b"freeze\n"  # the SFTP session is open
    pids = sshd_lab.session_pids("freeze")
    assert pids
    def signal_all(sig: int) -> None:
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass  # a session process of an earlier connection, ended since it was listed

    signal_all(signal.SIGSTOP)
    try:
        yield t
    finally:
        signal_all(signal.SIGCONT)
        ssh.close_pool()


@pytest.mark.parametrize("call", ["read_bytes", "stat", "read_many", "scan_dir"])
def test_sftp_call_to_a_frozen_node_times_out(frozen, call):
    fn = {"read_bytes": lambda: frozen.read_bytes("/etc/hostname"),
          "stat": lambda: frozen.stat("/etc/hostname"),
          "read_many": lambda: frozen.read_many(["/etc/hostname"]),
          "scan_dir": lambda: frozen.scan_dir("/etc")}[call]
    with pytest.raises(TimeoutExpired) as ei:
        fn()
    assert ei.value.exit_code == 6
    assert "/etc" in ei.value.message
    assert frozen._conn._sftp is None  # the session was dropped: its replies are out of step
    # the next call opens a new session on the still frozen node: bounded as well
    with pytest.raises((TimeoutExpired, UnreachableError)):
        fn()


def test_calls_queued_behind_a_timed_out_one_time_out_too(frozen):
    """Several calls of one node at once (a fan-out's rows share the connection's SFTP
    session, one at a time): the first gets no reply and drops the session; the others,
    queued behind it with that session in hand, once failed "Socket is closed" as the
    file's error (exit 1, review 10 finding 2). They are the node's same timeout (6)."""
    import threading

    calls = [lambda: frozen.stat("/etc/hostname"), lambda: frozen.read_bytes("/etc/hostname"),
             lambda: frozen.read_many(["/etc/hostname"]), lambda: frozen.stat("/etc")]
    start = threading.Barrier(len(calls))
    errors: list = [None] * len(calls)

    def one(i):
        start.wait()
        try:
            calls[i]()
        except BaseException as e:  # noqa: BLE001 - the test looks at each one
            errors[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert all(isinstance(e, TimeoutExpired) for e in errors), [repr(e) for e in errors]
    assert {e.exit_code for e in errors} == {6}


def test_a_call_queued_on_a_connection_lost_meanwhile_is_unreachable(sshd_lab, ssh_open):
    """A call waits for the SFTP session (another one holds it) while the node's sshd
    session ends (killed: a reboot, a dropped link): it is the connection's failure (7),
    not "Socket is closed" as an I/O error on its path (1)."""
    import sys
    import threading

    from katactl.backends import ssh

    ssh.close_pool()
    t = ssh_open("freeze", timeout=5.0)
    assert t.read_bytes("/etc/hostname") == b"freeze\n"
    got: list = []

    def queued():
        try:
            t.stat("/etc/hostname")
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            got.append(e)

    def waiting(th) -> bool:
        f = sys._current_frames().get(th.ident)
        while f is not None and f.f_code.co_name != "_sftp_call":
            f = f.f_back
        return f is not None

    try:
        with t._conn.sftp_lock:  # the call in progress
            th = threading.Thread(target=queued)
            th.start()
            for _ in range(400):
                if waiting(th):
                    break
                time.sleep(0.01)
            for p in sshd_lab.session_pids("freeze"):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(400):  # the transport thread sees the EOF asynchronously
                if not t._conn.t.is_active():
                    break
                time.sleep(0.01)
        th.join(30)
        assert len(got) == 1 and isinstance(got[0], UnreachableError), [repr(e) for e in got]
        assert got[0].exit_code == 7 and "SSH connection lost" in got[0].message
    finally:
        ssh.close_pool()


def test_run_collects_all_output_of_a_fast_exit(ssh_open):
    # sshd sends exit-status when it reaps the child, possibly before the last of the
    # child's output (session.c session_exit_message): run() waits for EOF as well
    t = ssh_open("node1")
    n = 3_000_000
    for _ in range(15):
        r = t.run(["head", "-c", str(n), "/dev/zero"])
        assert (r.returncode, len(r.stdout)) == (0, n)


def _running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


def _gone(pattern: str) -> bool:
    """Polls until no process matches (the node ends it asynchronously)."""
    for _ in range(200):
        if not _running(pattern):
            return True
        time.sleep(0.05)
    return False


def test_run_timeout_ends_the_command_on_the_node(ssh_open):
    t = ssh_open("node1")
    with pytest.raises(TimeoutExpired):
        t.run(["sleep", "4242.1"], timeout=0.5)
    assert _gone("^sleep 4242.1$")
    assert t.run(["true"]).returncode == 0  # connection still usable


def test_a_command_given_up_on_ends_with_its_children(ssh_open):
    # the guard signals the command's whole process group: a pipeline's or a script's
    # children (a resumed dump's compressor feeding tail) must not run on either
    t = ssh_open("node1")
    with pytest.raises(TimeoutExpired):
        t.run(["sh", "-c", "sleep 4242.5 | sleep 4242.6; echo never"], timeout=0.5)
    assert _gone("^sleep 4242.5$") and _gone("^sleep 4242.6$")
    it = t.run_stream(["sh", "-c", "echo go; sleep 4242.7 | sleep 4242.8"])
    assert next(it) == b"go\n"
    it.close()
    assert _gone("^sleep 4242.7$") and _gone("^sleep 4242.8$")
    # exit codes and output are the command's own, as without the guard
    r = t.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    with pytest.raises(FileNotFoundError):  # rc 127, as a missing program locally
        t.run(["katactl-no-such-command"])


def test_stream_closed_early_ends_the_command_on_the_node(ssh_open):
    t = ssh_open("node1")
    it = t.run_stream(["sh", "-c", "echo go; exec sleep 4242.2"])
    assert next(it) == b"go\n"
    it.close()
    assert _gone("^sleep 4242.2$")


def test_closing_the_pool_ends_unfinished_commands(ssh_open):
    from katactl.backends import ssh

    t = ssh_open("node1")
    it = t.run_stream(["sh", "-c", "echo go; exec sleep 4242.3"])
    assert next(it) == b"go\n"
    ssh.close_pool()  # atexit does this: nothing must keep running on the node
    assert _gone("^sleep 4242.3$")


def test_non_utf8_names_agree_with_local(ssh_open, sshd_lab):
    # os.listdir gives undecodable bytes as surrogates (surrogateescape): so must SFTP, and
    # such a name must go back out to the node (SFTP paths, argv) as the same bytes
    from katactl.backends.local import LocalTransport

    root = sshd_lab.nodes["node1"].root
    d = os.path.join(os.fsencode(root), b"nonutf8")
    os.makedirs(os.path.join(d, b"sub\xfe"), exist_ok=True)
    with open(os.path.join(d, b"bad\xff"), "wb") as f:
        f.write(b"payload")
    os.symlink(b"bad\xff", os.path.join(d, b"link\xfd"))
    t, local = ssh_open("node1"), LocalTransport(str(root))
    for follow in (True, False):
        got, want = t.scan_dir("/nonutf8", follow), local.scan_dir("/nonutf8", follow)
        assert [(n, s.is_dir, s.is_link) for n, s in got] == [(n, s.is_dir, s.is_link) for n, s in want]
    names = t.listdir("/nonutf8")
    assert names == local.listdir("/nonutf8") == sorted(["bad\udcff", "link\udcfd", "sub\udcfe"])
    for name in ("bad\udcff", "link\udcfd"):
        p = f"/nonutf8/{name}"
        assert t.read_bytes(p) == local.read_bytes(p) == b"payload"
        assert t.read_many([p]) == {p: b"payload"}
        assert t.stat(p).size == local.stat(p).size == 7
        assert b"".join(t.open_stream(p)) == b"payload"
        assert t.run(["cat", "--", t.remote(p)]).stdout == b"payload"
    assert t.readlink("/nonutf8/link\udcfd") == local.readlink("/nonutf8/link\udcfd") == "bad\udcff"
    t.write_bytes_atomic("/nonutf8/new\udcfc", b"new")
    assert open(os.path.join(d, b"new\xfc"), "rb").read() == b"new"
    t.remove("/nonutf8/new\udcfc")
    assert not os.path.exists(os.path.join(d, b"new\xfc"))


def test_sandbox_list_with_a_non_utf8_name_agrees_with_local(cli, sshd_lab):
    root = sshd_lab.nodes["freeze"].root
    bad = os.path.join(os.fsencode(root), b"run/vc/sbs/bad\xff")
    os.makedirs(bad)
    try:
        local = cli(["--host-root", str(root), "sandbox", "list", "-o", "json"])
        remote = cli(["--ssh-config", str(sshd_lab.config), "-N", "freeze", "sandbox", "list", "-o", "json"])
        assert (remote.exit_code, remote.json()["items"]) == (local.exit_code, local.json()["items"]), remote.stderr
    finally:
        os.rmdir(bad)


def test_expired_host_cert_falls_back_to_the_pinned_plain_key(ssh_open):
    # as OpenSSH's check_host_key (sshconnect.c): an invalid certificate is retried as
    # the plain key, and expcert's plain key is in known_hosts
    t = ssh_open("expcert")
    assert t.read_bytes("/etc/hostname") == b"expcert\n"
    assert t._conn.trust.startswith("known key (")
    assert "expired" in t._conn.trust


def test_expired_host_cert_with_an_unknown_plain_key_is_refused_naming_why(sshd_lab, tmp_path):
    from katactl.backends.ssh import SSHTransport

    ca = next(ln for ln in sshd_lab.known_hosts.read_text().splitlines() if ln.startswith("@cert-authority"))
    kh = tmp_path / "known_hosts"
    kh.write_text(ca + "\n")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host expcert\n  HostName 127.0.0.1\n  Port {sshd_lab.nodes['expcert'].port}\n"
                   f"  User {sshd_lab.user}\n  IdentityFile {sshd_lab.user_key}\n  IdentitiesOnly yes\n"
                   f"  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n")
    with pytest.raises(HostKeyError) as ei:
        SSHTransport.from_settings("expcert", config.resolve({"ssh_config": str(cfg)}))
    assert ei.value.exit_code == 7
    assert "unknown host key" in ei.value.message and "expired" in ei.value.message


def test_atomic_write_sweeps_stale_temp_files_of_killed_writes(ssh_open, sshd_lab):
    d = sshd_lab.nodes["node1"].root / "litter"
    d.mkdir()
    old = os.path.getmtime(d) - 2 * 3600
    stale, fresh = d / ".katactl-0123456789ab.tmp", d / ".katactl-ba9876543210.tmp"
    other, a_dir = d / ".katactl-notours.tmp", d / ".katactl-aaaaaaaaaaaa.tmp"
    for f in (stale, fresh, other):
        f.write_bytes(b"half")
    a_dir.mkdir()
    for f in (stale, other, a_dir):
        os.utime(f, (old, old))
    t = ssh_open("node1")
    t.write_bytes_atomic("/litter/conf.toml", b"x = 1\n")
    assert (d / "conf.toml").read_bytes() == b"x = 1\n"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [fresh.name, other.name, a_dir.name, "conf.toml"])  # only the stale one of ours went


def test_the_sweep_lists_a_directory_once_per_transport(ssh_open, sshd_lab):
    """As over --via kube: a transport lists a directory for stale temps at its first write
    into it only (a listing is a stat per entry); a later stale temp is the next run's."""
    d = sshd_lab.nodes["node1"].root / "litter-once"
    d.mkdir()
    t = ssh_open("node1")
    t.write_bytes_atomic("/litter-once/a.toml", b"1")
    stale = d / ".katactl-0123456789ab.tmp"
    stale.write_bytes(b"half")
    old = os.path.getmtime(d / "a.toml") - 2 * 3600
    os.utime(stale, (old, old))
    t.write_bytes_atomic("/litter-once/b.toml", b"2")
    assert stale.exists()
    t.close()
    t = ssh_open("node1")  # the next run
    t.write_bytes_atomic("/litter-once/b.toml", b"2")
    t.close()
    assert not stale.exists()


def _err(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return type(e), e.errno
    except Exception as e:  # noqa: BLE001
        return type(e), None
    return None


def test_symlink_loop_and_not_a_directory_agree_with_local(ssh_open, sshd_lab):
    # sftp-server maps ELOOP and ENOTDIR to SSH_FX_NO_SUCH_FILE (errno_to_portable)
    from katactl.backends.local import LocalTransport

    root = sshd_lab.nodes["node1"].root
    e = root / "errmap"
    (e / "dir").mkdir(parents=True)
    (e / "file").write_text("x")
    os.symlink("loopb", e / "loopa")
    os.symlink("loopa", e / "loopb")
    os.symlink("nowhere", e / "dangling")
    os.symlink("file", e / "tofile")
    os.symlink("dir", e / "todir")
    os.symlink("todir/../loopa", e / "viadir")
    os.symlink("file/x", e / "throughfile")
    t, local = ssh_open("node1"), LocalTransport(str(root))
    paths = ["/errmap/loopa", "/errmap/loopa/x", "/errmap/file/x", "/errmap/file/x/y", "/errmap/tofile/x",
             "/errmap/dangling", "/errmap/dangling/x", "/errmap/missing", "/errmap/missing/x",
             "/errmap/todir/missing", "/errmap/viadir", "/errmap/throughfile"]
    for p in paths:
        want = _err(local.stat, p)
        assert want is not None, p
        assert _err(t.stat, p) == want, p
        assert _err(t.read_bytes, p) == _err(local.read_bytes, p), p
        assert _err(t.scan_dir, p) == _err(local.scan_dir, p), p
    for name, fn in (("read_many", lambda x: x.read_many(paths)), ("stat_many", lambda x: x.stat_many(paths))):
        got, want = fn(t), fn(local)
        assert {p: (type(v), v.errno) for p, v in got.items()} == \
               {p: (type(v), v.errno) for p, v in want.items()}, name
    assert _err(t.scan_dir, "/errmap/file") == _err(local.scan_dir, "/errmap/file")


def test_batch_errors_told_from_the_batch_own_answers_agree_with_local(ssh_open, sshd_lab):
    # the batch's answers (a sibling found, a file, a missing parent also asked) decide
    # most misses without a request (_settled): they must still say what the kernel says
    from katactl.backends.local import LocalTransport

    root = sshd_lab.nodes["node1"].root
    e = root / "errmap2"
    (e / "dir" / "sub").mkdir(parents=True)
    (e / "file").write_text("x")
    (e / "dir" / "f").write_text("y")
    os.symlink("loopb", e / "dir" / "loopa")
    os.symlink("loopa", e / "dir" / "loopb")
    os.symlink("nowhere", e / "dir" / "dangling")
    os.symlink("../file/x", e / "dir" / "throughfile")
    os.symlink("dir", e / "todir")
    t, local = ssh_open("node1"), LocalTransport(str(root))
    paths = ["/errmap2/file", "/errmap2/dir/f", "/errmap2/dir/sub", "/errmap2/todir/sub",
             "/errmap2/dir/missing", "/errmap2/dir/missing/x/y", "/errmap2/file/x", "/errmap2/file/x/y",
             "/errmap2/dir/f/x", "/errmap2/dir/loopa", "/errmap2/dir/loopa/x", "/errmap2/dir/dangling",
             "/errmap2/dir/dangling/x", "/errmap2/dir/throughfile", "/errmap2/todir/loopb/x",
             "/errmap2/nope/a", "/errmap2/nope/b", "/errmap2/todir/missing"]

    def shape(got):
        return {p: (type(v), v.errno) if isinstance(v, OSError) else "ok" for p, v in got.items()}

    for name, fn in (("read_many", lambda x: x.read_many(paths)),
                     ("stat_many", lambda x: x.stat_many(paths)),
                     ("stat_many lstat", lambda x: x.stat_many(paths, follow_symlinks=False)),
                     ("scan_dirs", lambda x: x.scan_dirs(paths))):
        assert shape(fn(t)) == shape(fn(local)), name


def test_killed_client_leaves_no_command_running_on_the_node(sshd_lab):
    import sys

    code = ("import sys; from katactl import config; from katactl.backends.ssh import SSHTransport; "
            "t = SSHTransport.from_settings('node1', config.resolve({'ssh_config': sys.argv[1]})); "
            "t.run(['sleep', '4242.4'], timeout=600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(sshd_lab.config)])
    try:
        for _ in range(400):
            if _running("^sleep 4242.4$"):
                break
            time.sleep(0.05)
        assert _running("^sleep 4242.4$")
    finally:
        p.kill()  # no cleanup runs in the client: only the dropped connection tells the node
        p.wait()
    assert _gone("^sleep 4242.4$")
