"""SSHTransport against real OpenSSH sshd processes (tests/conftest_sshd.py)."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading

import pytest

from tests.conftest_sshd import settings_for
from katactl import config
from katactl.errors import (NOT_A_SOCKET, SOCKET_MISSING, SOCKET_REFUSED, AuthError, HostKeyError, TimeoutExpired,
                            UnreachableError)


@pytest.fixture
def t1(ssh_open):
    return ssh_open("node1")


# -- connecting and host keys -------------------------------------------------------
@pytest.mark.parametrize("node,how", [
    ("node1", "known_hosts:1"),          # hashed entry
    ("node3", "known_hosts:3"),          # [127.0.0.1]:port entry
    ("node4", "global_known_hosts:1"),   # only in the global file
    ("certnode", "certificate signed by CA"),
])
def test_host_key_sources(ssh_open, node, how):
    t = ssh_open(node)
    assert how in t._conn.trust
    assert t.read_text("/etc/hostname").strip() == node  # its own node tree (SetEnv KATACTL_HOST_ROOT)


def test_changed_host_key_refused_naming_the_line(ssh_open, sshd_lab):
    with pytest.raises(HostKeyError) as ei:
        ssh_open("changed")
    e = ei.value
    assert e.exit_code == 7
    lines = sshd_lab.known_hosts.read_text().splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if line.startswith(f"[127.0.0.1]:{sshd_lab.nodes['changed'].port} "))
    assert f"{sshd_lab.known_hosts}:{lineno}" in e.message
    assert "CHANGED" in e.message
    assert e.details["line"] == lineno


def test_changed_key_refused_even_with_accept_new(ssh_open):
    with pytest.raises(HostKeyError, match="CHANGED"):
        ssh_open("changed", ssh_accept_new=True)


def test_revoked_key_refused(ssh_open, sshd_lab):
    with pytest.raises(HostKeyError, match=r"@revoked in .*known_hosts:\d+"):
        ssh_open("revoked")


def test_unknown_key_refused_by_default_then_accepted_on_opt_in(ssh_open, tmp_path, monkeypatch):
    with pytest.raises(HostKeyError, match="unknown host key"):
        ssh_open("unknown")
    kh = tmp_path / "kh"
    monkeypatch.setenv("KATACTL_KNOWN_HOSTS", str(kh))
    t = ssh_open("unknown", ssh_accept_new=True)
    assert "accepted" in t._conn.trust
    assert t.read_text("/etc/hostname").strip() == "unknown"
    assert "[127.0.0.1]:" in kh.read_text()
    from katactl.backends import ssh

    ssh.close_pool()
    t2 = ssh_open("unknown")  # now known, no opt-in needed
    assert "known key" in t2._conn.trust and str(kh) in t2._conn.trust



@pytest.mark.parametrize("name,alias", [("Kata-Node-1", "Kata-Node-1"), ("LOCALHOST", None)])
def test_accept_new_with_capitals_writes_one_entry_openssh_finds(katactl_bin, sshd_lab, tmp_path, name, alias):
    """--ssh-accept-new with HashKnownHosts yes (Debian's ssh_config) for a HostKeyAlias or
    a node name (no HostName) with capitals: one line, lower-cased before hashing as
    OpenSSH writes it, that the next run (without the flag), ssh and ssh-keygen -F find."""
    n = sshd_lab.nodes["unknown"]
    kh = tmp_path / "known_hosts"
    cfg = tmp_path / "config"
    cfg.write_text(f"Host {name}\n  Port {n.port}\n"  # LOCALHOST: ssh connects to 'localhost'
                   + (f"  HostName 127.0.0.1\n  HostKeyAlias {alias}\n" if alias else "")
                   + f"  User {sshd_lab.user}\n  IdentityFile {sshd_lab.user_key}\n  IdentitiesOnly yes\n"
                   f"  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  HashKnownHosts yes\n"
                   f"  SetEnv KATACTL_HOST_ROOT={n.root}\n")
    base = ["--ssh-config", cfg, "-N", name]
    for extra in (["--ssh-accept-new"], ["--ssh-accept-new"], []):
        r = katactl_bin([*base, *extra, "version", "-o", "json"])
        assert r.exit_code == 0, (extra, r.stderr)
    [line] = kh.read_text().splitlines()
    assert line.startswith("|1|")
    lookup = alias.lower() if alias else f"[localhost]:{n.port}"
    r = subprocess.run(["ssh-keygen", "-F", lookup, "-f", str(kh)], capture_output=True, text=True)
    assert r.returncode == 0, (lookup, r.stdout, r.stderr)
    r = subprocess.run(["ssh", "-F", str(cfg), "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                        name, "true"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 0, r.stderr

def test_multi_hop_proxyjump(ssh_open, sshd_lab):
    t = ssh_open("behind")
    assert t.read_text("/etc/hostname").strip() == "behind"
    port = sshd_lab.nodes["behind"].port
    j2port = sshd_lab.nodes["jump2"].port
    # jump1 forwarded to jump2, jump2 forwarded to the target
    assert f"port {j2port}" in sshd_lab.nodes["jump1"].log.read_text()
    assert f"port {port}" in sshd_lab.nodes["jump2"].log.read_text()


def test_proxycommand(ssh_open):
    t = ssh_open("viacmd")
    assert t.read_text("/etc/hostname").strip() == "viacmd"


def test_unreachable_and_silent_nodes(ssh_open):
    with pytest.raises(UnreachableError, match="cannot connect"):
        ssh_open("unreachable")
    with pytest.raises(UnreachableError, match="no SSH handshake"):
        ssh_open("slow", timeout=0.5)


def test_wrong_key_is_auth_error(tmp_path, sshd_lab):
    from katactl.backends import ssh
    from tests.conftest_sshd import keygen

    k = keygen(tmp_path / "other")
    with pytest.raises(AuthError) as ei:
        ssh.SSHTransport.from_settings("%s@127.0.0.1:%d" % (sshd_lab.user, sshd_lab.nodes["node3"].port),
                                       _no_default_identity(sshd_lab, k, tmp_path))
    assert ei.value.exit_code == 7


def _no_default_identity(lab, key, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Host *\n  IdentitiesOnly yes\n  UserKnownHostsFile {lab.known_hosts}\n")
    return config.resolve({"ssh_config": str(cfg), "identity": str(key), "request_timeout": 5.0})


def test_connection_reused(ssh_open):
    a = ssh_open("node2")
    b = ssh_open("node2")
    assert a._conn is b._conn
    for _ in range(20):
        a.stat("/etc")
        b.run(["true"])
    assert a._conn.t.is_active()


# -- files -------------------------------------------------------------------------
def test_reads(t1, sshd_lab):
    root = sshd_lab.nodes["node1"].root
    (root / "etc/os-release").write_text("ID=debian\n" * 100)
    assert t1.read_text("/etc/os-release").startswith("ID=debian")
    assert t1.read_bytes("/etc/os-release", limit=5) == b"ID=de"
    assert t1.read_bytes("/etc/../etc/os-release") == (root / "etc/os-release").read_bytes()
    assert "os-release" in t1.listdir("/etc")
    s = t1.stat("/etc")
    assert s.is_dir and not s.is_link
    assert t1.exists("/etc/hostname") and not t1.exists("/nope")
    assert t1.is_dir("/run/vc/sbs")
    with pytest.raises(FileNotFoundError) as ei:
        t1.read_bytes("/etc/missing")
    assert ei.value.filename == "/etc/missing"
    with pytest.raises(FileNotFoundError):
        t1.listdir("/missing")


def test_host_root_never_escaped_by_dotdot(t1, sshd_lab):
    # /../../.. normalises to / : still inside the node tree
    assert t1.read_text("/../../../etc/hostname").strip() == "node1"


def test_streaming_bounded_and_exact(t1, sshd_lab):
    root = sshd_lab.nodes["node1"].root
    data = os.urandom(5 << 20) + b"tail"
    (root / "big.bin").write_bytes(data)
    h = hashlib.sha256()
    biggest = 0
    for chunk in t1.open_stream("/big.bin", chunk_size=1 << 16):
        biggest = max(biggest, len(chunk))
        h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert biggest <= 1 << 16
    assert b"".join(t1.open_stream("/big.bin", offset=len(data) - 4)) == b"tail"
    with pytest.raises(FileNotFoundError):
        t1.open_stream("/nope.bin")


def test_stream_across_server_rekeys(ssh_open, sshd_lab):
    """sshd rekeys every MiB on this node (RekeyLimit): a 24 MiB stream crosses ~24 key
    changes, each a NEWKEYS amid the socket bytes read ahead in 256 KiB reads (_SockReader)
    and the packets queued on the channel (_ChunkPipe): every byte arrives, in order; the
    connection stays usable after the stream (katactl itself rekeys only at OpenSSH's limits)."""
    t = ssh_open("rekeying")
    data = os.urandom(24 << 20)
    (sshd_lab.nodes["rekeying"].root / "big.bin").write_bytes(data)
    h = hashlib.sha256()
    for chunk in t.open_stream("/big.bin"):
        h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert t.run(["echo", "ok"]).stdout == b"ok\n"


def test_mutations(t1, sshd_lab):
    root = sshd_lab.nodes["node1"].root
    t1.mkdir("/var/lib/katactl/x/y", mode=0o750)
    assert (root / "var/lib/katactl/x/y").is_dir()
    t1.write_bytes_atomic("/var/lib/katactl/x/f", b"one", mode=0o600)
    t1.write_bytes_atomic("/var/lib/katactl/x/f", b"two")
    assert (root / "var/lib/katactl/x/f").read_bytes() == b"two"
    assert not [n for n in os.listdir(root / "var/lib/katactl/x") if n.startswith(".katactl-")]
    t1.rename("/var/lib/katactl/x/f", "/var/lib/katactl/x/g")
    t1.symlink("g", "/var/lib/katactl/x/link")
    assert t1.readlink("/var/lib/katactl/x/link") == "g"
    assert t1.stat("/var/lib/katactl/x/link", follow_symlinks=False).is_link
    with pytest.raises(FileExistsError):
        t1.symlink("g", "/var/lib/katactl/x/link")
    t1.remove("/var/lib/katactl/x/link")
    with pytest.raises(IsADirectoryError):
        t1.remove("/var/lib/katactl/x")
    t1.remove("/var/lib/katactl", recursive=True)
    assert not (root / "var/lib/katactl").exists()
    assert t1.statvfs_free("/etc") > 0
    with pytest.raises(FileNotFoundError):
        t1.remove("/var/lib/katactl")


# -- processes -----------------------------------------------------------------------
def test_run_argv_exact(t1):
    args = ["a b", "'q'", '"dq"', "$HOME", "*", "", "x\ny", "ü€", "-n"]
    r = t1.run(["printf", "%s\\0", *args])
    assert r.returncode == 0
    assert r.stdout.split(b"\0")[:-1] == [a.encode() for a in args]
    r = t1.run(["cat"], input=b"piped\x00bytes")
    assert r.stdout == b"piped\x00bytes"
    r = t1.run(["sh", "-c", "echo err >&2; exit 3"])
    assert (r.returncode, r.stderr) == (3, b"err\n")
    with pytest.raises(FileNotFoundError):
        t1.run(["/no/such/program"])


def test_command_timeout(t1):
    with pytest.raises(TimeoutExpired) as ei:
        t1.run(["sleep", "5"], timeout=0.3)
    assert ei.value.exit_code == 6
    assert t1.run(["true"]).returncode == 0  # connection still usable


def test_many_concurrent_channels_queue_under_maxsessions(t1):
    # sshd's default MaxSessions is 10; 24 concurrent runs must all succeed
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(24) as ex:
        rs = list(ex.map(lambda i: t1.run(["sh", "-c", f"sleep 0.05; echo {i}"]), range(24)))
    assert [int(r.stdout) for r in rs] == list(range(24))


# -- unix sockets ----------------------------------------------------------------------
def _echo_server(path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                while True:
                    b = c.recv(65536)
                    if not b:
                        break
                    c.sendall(b.upper())

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_connect_unix_relay(t1, sshd_lab):
    root = sshd_lab.nodes["node1"].root
    (root / "run/vc/vm/abc").mkdir(parents=True, exist_ok=True)
    srv = _echo_server(root / "run/vc/vm/abc/qmp.sock")
    try:
        s = t1.connect_unix("/run/vc/vm/abc/qmp.sock", timeout=5)
        s.settimeout(5)
        payload = b"hello \x00\xff" * 5000
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += s.recv(65536)
        assert got == payload.upper()
        s.close()
        with pytest.raises(UnreachableError, match="does not exist") as e:
            t1.connect_unix("/run/vc/vm/abc/missing.sock", timeout=5)
        assert e.value.reason == SOCKET_MISSING
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
    with pytest.raises(UnreachableError, match="nobody is listening") as e:
        t1.connect_unix("/run/vc/vm/abc/qmp.sock", timeout=5)  # the relay's exit 4
    assert e.value.reason == SOCKET_REFUSED
    (root / "run/vc/vm/abc/plain").write_text("")
    with pytest.raises(UnreachableError, match="not a unix socket") as e:
        t1.connect_unix("/run/vc/vm/abc/plain", timeout=5)
    assert e.value.reason == NOT_A_SOCKET


def test_shim_http_over_ssh(t1, sshd_lab):
    """The unix-socket HTTP client (shim/CLH/FC) works unchanged through the SSH relay."""
    from katactl.backends.unixhttp import UnixHttpClient
    from katactl.lab.shimserver import ShimServer

    root = sshd_lab.nodes["node1"].root
    d = root / "run/test-shim"
    d.mkdir(parents=True, exist_ok=True)
    with ShimServer(str(d / "shim-monitor.sock")):
        with UnixHttpClient(t1, "/run/test-shim/shim-monitor.sock", timeout=5) as c:
            r = c.request("GET", "/metrics", what="shim")
            assert r.status_code == 200 and "kata_shim" in r.text
            r = c.request("GET", "/agent-url", what="shim")
            assert r.status_code == 200


def test_concurrent_sftp_calls_on_one_transport(t1):
    """paramiko's SFTPClient hangs on concurrent requests; the transport serialises them."""
    from concurrent.futures import ThreadPoolExecutor, wait

    def work(i):
        for _ in range(10):
            assert t1.read_text("/etc/hostname").strip() == "node1"
            t1.stat("/etc")
            assert not t1.exists(f"/nope/{i}")
        return i

    ex = ThreadPoolExecutor(16)
    futs = [ex.submit(work, i) for i in range(16)]
    done, pending = wait(futs, timeout=60)
    ex.shutdown(wait=False, cancel_futures=True)
    assert not pending, "concurrent SFTP calls hung"
    assert sorted(f.result() for f in done) == list(range(16))


@pytest.mark.parametrize("match_exec", [False, True])
def test_invoke_only_loaded_for_match_exec(sshd_lab, tmp_path, match_exec):
    """paramiko.config pulls in invoke (~125 ms); katactl avoids it unless Match exec is used."""
    import subprocess
    import sys

    cfg = tmp_path / "cfg"
    text = f"Include {sshd_lab.config}\n"
    if match_exec:
        text = 'Match exec "test -d /"\n  ConnectTimeout 9\n' + text
    cfg.write_text(text)
    code = (
        "import sys\n"
        "from katactl import config\n"
        "from katactl.backends.ssh import SSHTransport\n"
        f"t = SSHTransport.from_settings('node1', config.resolve({{'ssh_config': {str(cfg)!r}}}))\n"
        "assert t.read_text('/etc/hostname').strip() == 'node1'\n"
        "print('invoke' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(match_exec)


def test_agent_authentication(sshd_lab, tmp_path, monkeypatch):
    """No key file configured: the key comes from a real ssh-agent."""
    import shutil
    import subprocess

    from katactl.backends import ssh

    if not shutil.which("ssh-agent"):
        pytest.skip("ssh-agent missing")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            import time

            time.sleep(0.02)
        env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", "-q", str(sshd_lab.user_key)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* either
        cfg = tmp_path / "cfg"
        port = sshd_lab.nodes["node3"].port
        cfg.write_text(f"Host agentnode\n  HostName 127.0.0.1\n  Port {port}\n  User {sshd_lab.user}\n"
                       f"  UserKnownHostsFile {sshd_lab.known_hosts}\n")
        ssh.close_pool()
        t = ssh.SSHTransport.from_settings("agentnode", config.resolve({"ssh_config": str(cfg)}))
        assert t.run(["true"]).returncode == 0
    finally:
        agent.terminate()
        agent.wait(5)


# -- batched calls (pipelined SFTP) ---------------------------------------------------
def _batch_tree(root):
    d = root / "batch"
    if d.exists():
        import shutil

        shutil.rmtree(d)
    (d / "many").mkdir(parents=True)
    for i in range(250):  # more than one READDIR page (OpenSSH sends 100 names per reply)
        (d / "many" / f"e{i:03d}").write_bytes(b"x" * i)
    (d / "empty").write_bytes(b"")
    (d / "small").write_bytes(b"hello\n")
    (d / "big").write_bytes(os.urandom(300 << 10))  # > PIPE_CHUNK: several READs
    (d / "sub").mkdir()
    (d / "link-sub").symlink_to("sub")
    (d / "dangling").symlink_to("nowhere")
    (d / "noread").write_bytes(b"secret")
    (d / "noread").chmod(0)
    # a file whose size is unknown (0) but whose content is not: read to EOF
    (d / "proc-status").symlink_to("/proc/self/status")
    return d


def _norm(v):
    return type(v).__name__ if isinstance(v, OSError) else v


def test_read_bytes_errors_match_local(t1, sshd_lab):
    """A directory, a missing file, a dangling link: the same exception type and strerror
    as locally (sftp-server answers a READ on a directory with a bare "Failure")."""
    from katactl.backends.local import LocalTransport

    root = sshd_lab.nodes["node1"].root
    _batch_tree(root)
    local = LocalTransport(str(root))
    for p in ("/batch/sub", "/batch/missing", "/batch/dangling", "/batch/many"):
        with pytest.raises(OSError) as want:
            local.read_bytes(p)
        with pytest.raises(OSError) as got:
            t1.read_bytes(p, limit=100 if p.endswith("sub") else None)
        assert type(got.value) is type(want.value), p
        assert got.value.strerror == want.value.strerror and got.value.filename == p
    assert t1.read_bytes("/batch/small") == b"hello\n"  # the session is still in step


def test_read_many_matches_single_reads(t1, sshd_lab):
    from katactl.backends.local import LocalTransport

    root = sshd_lab.nodes["node1"].root
    d = _batch_tree(root)
    local = LocalTransport(str(root))
    paths = [f"/batch/{n}" for n in ("empty", "small", "big", "sub", "missing", "dangling", "noread")]
    paths += [f"/batch/many/e{i:03d}" for i in range(0, 250, 3)]  # more than PIPE_FILES
    got = t1.read_many(paths)
    want = local.read_many(paths)
    assert set(got) == set(paths)
    if os.geteuid() == 0:  # root reads mode-0 files
        assert got["/batch/noread"] == b"secret"
    else:
        assert isinstance(got["/batch/noread"], PermissionError)
    for p in paths:
        assert _norm(got[p]) == _norm(want[p]), p
    assert got["/batch/big"] == (d / "big").read_bytes()
    assert isinstance(got["/batch/missing"], FileNotFoundError) and got["/batch/missing"].filename == "/batch/missing"
    assert isinstance(got["/batch/sub"], IsADirectoryError)
    # limit truncates, as read_bytes(limit) does
    lim = t1.read_many(["/batch/big", "/batch/small"], limit=200_000)
    assert lim["/batch/big"] == (d / "big").read_bytes()[:200_000] and lim["/batch/small"] == b"hello\n"
    assert t1.read_many(["/batch/small"], limit=0) == {"/batch/small": b""}
    # size 0 in stat, content behind it: read until EOF
    status = t1.read_many(["/batch/proc-status"])["/batch/proc-status"]
    assert b"Name:" in status and b"VmRSS" in status
    assert t1.read_many([]) == {}


def test_stat_many_and_scan_dirs_match_local(t1, sshd_lab):
    from katactl.backends.local import LocalTransport

    root = sshd_lab.nodes["node1"].root
    _batch_tree(root)
    local = LocalTransport(str(root))
    paths = ["/batch/small", "/batch/sub", "/batch/link-sub", "/batch/dangling", "/batch/missing",
             "/batch/small/x"]
    for follow in (True, False):
        got, want = t1.stat_many(paths, follow), local.stat_many(paths, follow)
        for p in paths:
            g, w = got[p], want[p]
            if isinstance(w, OSError):
                assert (type(g), g.errno) == (type(w), w.errno), (p, g)
            else:
                assert (g.size, g.is_dir, g.is_link, g.mode, int(g.mtime)) == \
                       (w.size, w.is_dir, w.is_link, w.mode, int(w.mtime)), p
    dirs = ["/batch", "/batch/many", "/batch/missing", "/batch/empty"]
    for follow in (True, False):
        got, want = t1.scan_dirs(dirs, follow), local.scan_dirs(dirs, follow)
        assert isinstance(got["/batch/missing"], FileNotFoundError)
        assert isinstance(got["/batch/empty"], OSError)
        for p in ("/batch", "/batch/many"):
            # but proc-status -> /proc/self/status: the local transport resolves an absolute link
            # inside its root (no proc there: dangling), SSH under a root follows it on the node
            # machine's / (docs/configuration.md, --host-root)
            assert [(n, s.is_dir, s.is_link, s.size) for n, s in got[p] if n != "proc-status"] == \
                   [(n, s.is_dir, s.is_link, s.size) for n, s in want[p] if n != "proc-status"], (p, follow)
    entries = dict(t1.scan_dir("/batch"))
    assert entries["link-sub"].is_dir and not entries["link-sub"].is_link
    assert entries["dangling"].is_link  # a dangling link keeps its own lstat
    assert len(t1.scan_dir("/batch/many")) == 250
    with pytest.raises(FileNotFoundError):
        t1.scan_dir("/batch/missing")
    assert t1.listdir("/batch/many")[:2] == ["e000", "e001"]


def test_batched_calls_interleave_with_plain_sftp_calls(t1, sshd_lab):
    """Unwaited CLOSE replies and bulk-read replies never confuse paramiko's own reader."""
    root = sshd_lab.nodes["node1"].root
    d = _batch_tree(root)
    paths = [f"/batch/many/e{i:03d}" for i in range(250)]
    for _ in range(3):
        got = t1.read_many(paths)
        assert all(got[p] == b"x" * i for i, p in enumerate(paths))
        assert t1.read_bytes("/batch/small") == b"hello\n"    # leaves an unwaited CLOSE
        assert t1.stat("/batch/big").size == 300 << 10
        assert len(t1.scan_dirs(["/batch/many"])["/batch/many"]) == 250
        assert t1.readlink("/batch/link-sub") == "sub"
        assert t1.read_many(["/batch/big"])["/batch/big"] == (d / "big").read_bytes()
    # handles are closed: sftp-server would refuse new ones after its limit otherwise
    for _ in range(5):
        assert len(t1.read_many(paths)) == 250


def test_batched_calls_from_many_threads(t1, sshd_lab):
    root = sshd_lab.nodes["node1"].root
    _batch_tree(root)
    paths = [f"/batch/many/e{i:03d}" for i in range(0, 250, 7)]
    errors = []

    def work():
        try:
            for _ in range(5):
                got = t1.read_many(paths)
                assert all(len(got[p]) == int(p[-3:]) for p in paths)
                assert len(t1.scan_dir("/batch/many")) == 250
                assert t1.read_text("/batch/small") == "hello\n"
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


# -- streaming atomic writes ------------------------------------------------------------
def _temps(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".katactl-"))


@pytest.fixture(params=["local", "ssh"])
def wt(request, sshd_lab, ssh_open):
    """(transport, local path of its node root) for the same tree, local and over SSH."""
    from katactl.backends.local import LocalTransport

    root = sshd_lab.nodes["node2"].root
    (root / "w").mkdir(exist_ok=True)
    t = LocalTransport(str(root)) if request.param == "local" else ssh_open("node2")
    return t, root


def test_write_stream_atomic_streams_in_bounded_memory(wt):
    t, root = wt
    d = root / "w"
    mib = 1 << 20
    seen = []
    if (d / "big").exists():
        (d / "big").unlink()  # the other transport's run

    def chunks():
        for i in range(24):
            if i >= 8:
                # streaming, not collecting: what was yielded before is (nearly all) on the
                # node already; at most the write window (4 MiB) + one chunk is in flight
                tmp = [p for p in d.iterdir() if p.name.startswith(".katactl-")]
                assert len(tmp) == 1
                seen.append(tmp[0].stat().st_size)
                assert tmp[0].stat().st_size >= (i - 6) * mib
                assert not (d / "big").exists()
            yield bytes([i]) * mib

    n = t.write_stream_atomic("/w/big", chunks(), mode=0o640)
    assert n == 24 * mib and seen
    data = (d / "big").read_bytes()
    assert len(data) == n and data[:1] == b"\0" and data[-1:] == bytes([23])
    assert (d / "big").stat().st_mode & 0o777 == 0o640
    assert _temps(d) == []
    # odd sizes, empty chunks, memoryview/bytearray chunks
    assert t.write_stream_atomic("/w/odd", [b"", bytearray(b"ab"), memoryview(b"c" * 200_001), b""]) == 200_003
    assert (d / "odd").read_bytes() == b"ab" + b"c" * 200_001
    t.write_bytes_atomic("/w/odd", b"small")
    assert (d / "odd").read_bytes() == b"small" and _temps(d) == []


@pytest.mark.parametrize("when", [0, 1, 7])
def test_write_stream_atomic_failure_midway_keeps_the_old_file(wt, when):
    t, root = wt
    d = root / "w"
    (d / "f").write_bytes(b"old contents")

    class Boom(Exception):
        pass

    def chunks():
        for i in range(10):
            if i == when:
                raise Boom("source failed")
            yield b"n" * (300 << 10)

    with pytest.raises(Boom):
        t.write_stream_atomic("/w/f", chunks())
    assert (d / "f").read_bytes() == b"old contents"
    assert _temps(d) == []
    # the transport is still usable afterwards
    assert t.write_stream_atomic("/w/f", iter([b"new"])) == 3
    assert (d / "f").read_bytes() == b"new" and t.read_bytes("/w/f") == b"new"


def test_write_stream_atomic_errors(wt):
    t, root = wt
    with pytest.raises(FileNotFoundError):
        t.write_stream_atomic("/w/no-such-dir/f", [b"x"])
    (root / "w" / "adir").mkdir(exist_ok=True)
    with pytest.raises(OSError):
        t.write_stream_atomic("/w/adir", [b"x"])  # rename over a directory
    assert (root / "w" / "adir").is_dir() and _temps(root / "w") == []


def test_fsync_dir(wt):
    t, root = wt
    t.fsync_dir("/w")
    t.fsync_dir("/")
    with pytest.raises(FileNotFoundError):
        t.fsync_dir("/w/missing")
    (root / "w" / "plain").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        t.fsync_dir("/w/plain")
    # rename is followed by an fsync of the target directory on both transports
    (root / "w" / "r1").write_bytes(b"r")
    t.rename("/w/r1", "/w/r2")
    assert (root / "w" / "r2").read_bytes() == b"r" and not (root / "w" / "r1").exists()


# -- discovery over SSH gives what it gives locally --------------------------------------
def test_sandbox_discovery_over_ssh_matches_local(ssh_open, sshd_lab):
    from katactl import sandbox
    from katactl.backends.local import LocalTransport
    from katactl.lab import layout

    root = str(sshd_lab.nodes["node4"].root)
    if not os.path.lexists(os.path.join(root, "proc")):
        os.symlink("/proc", os.path.join(root, "proc"))  # pid liveness against the real /proc
    me = os.getpid()
    layout.write_go_sandbox(root, "g1qemu", pid=me, pod_name="web", pod_namespace="prod",
                            extra_monitor_socket=True)
    open(os.path.join(root, "run/vc/vm/g1qemu/extra-monitor.sock"), "w").close()
    layout.write_go_sandbox(root, "g2clh", hypervisor="clh", pid=me, pod_name="api", pod_namespace="prod")
    layout.write_go_sandbox(root, "g3fc", hypervisor="fc", pid=2 ** 22 + 3, pod_name="fn")
    layout.write_go_sandbox(root, "g4crio", cri="crio", pid=me, pod_name="c", pod_namespace="other")
    layout.write_go_sandbox(root, "g5ns", containerd_namespace="moby", pid=me, pod_name="m")
    layout.write_go_sandbox(root, "g6bad", raw_persist=b'{"State": "runn', pod_name="broken")
    layout.write_go_sandbox(root, "g7nobundle", bundle=False, pid=me)
    layout.write_rs_sandbox(root, "r1db", pid=me, pod_name="b0", pod_namespace="batch")
    layout.write_rs_sandbox(root, "r2qemu", hypervisor="qemu", pid=me, pod_name="b1", pod_namespace="batch")
    p = layout.write_go_sandbox(root, "g8refused", pid=me, pod_name="deaf")
    s = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on
    cwd = os.getcwd()
    os.chdir(os.path.dirname(p.shim_socket))
    try:
        s.bind(os.path.basename(p.shim_socket))
    finally:
        os.chdir(cwd)
    s.close()
    os.makedirs(os.path.join(root, "run/vc/sbs/not..an-id"), exist_ok=True)
    open(os.path.join(root, "run/kata/stray-file"), "w").close()

    def shape(sbs):
        out = []
        for x in sbs:
            d = x.to_dict()
            d.pop("age"), d.pop("ageSeconds")
            out.append(d)
        return out

    t = ssh_open("node4")
    local = LocalTransport(root)
    for check in (False, True):
        want = shape(sandbox.discover(local, check=check))
        got = shape(sandbox.discover(t, check=check))
        assert got == want
    # node4 belongs to the session's sshd lab: other tests may leave sandboxes of their own there
    ours = {"g1qemu", "g2clh", "g3fc", "g4crio", "g5ns", "g6bad", "g7nobundle", "r1db", "r2qemu", "g8refused"}
    by_id = {d["id"]: d for d in got if d["id"] in ours or d["id"] == "not..an-id"}
    assert set(by_id) == ours
    assert by_id["g1qemu"]["sockets"]["extraMonitor"] == "/run/vc/vm/g1qemu/extra-monitor.sock"
    assert by_id["g3fc"]["state"] == "stale" and "not running" in by_id["g3fc"]["reason"]
    assert by_id["g6bad"]["state"] == "unknown" and "not valid JSON" in by_id["g6bad"]["reason"]
    assert by_id["g8refused"]["reason"] == "nobody is listening on the shim socket"
    assert by_id["g4crio"]["cri"] == "crio" and by_id["g5ns"]["pod"]["name"] == "m"
    assert by_id["g1qemu"]["reason"] == "shim socket does not exist"
    for ref in ("g1", "r2qemu", "prod/web", "pod/batch/b0"):
        a, b = sandbox.resolve(local, ref), sandbox.resolve(t, ref)
        assert shape([a]) == shape([b])


# -- ssh_config loops (issue 16, finding 14) ------------------------------------------
def _config_with(sshd_lab, tmp_path, extra: str) -> str:
    """The lab's config with ``extra`` Host blocks in front (first obtained value wins)."""
    f = tmp_path / "ssh_config"
    f.write_text(extra + "\n" + sshd_lab.config.read_text())
    return str(f)


def test_host_star_proxyjump_does_not_jump_the_jump_host_through_itself(sshd_lab, tmp_path):
    """`Host *` + `ProxyJump jump1` matches jump1 as well: jump1 is reached directly,
    not through itself forever (RecursionError before)."""
    from katactl.backends import ssh

    f = tmp_path / "ssh_config"
    f.write_text(sshd_lab.config.read_text() + "\nHost *\n  ProxyJump jump1\n")
    t = ssh.SSHTransport.from_settings("node1", settings_for(sshd_lab, ssh_config=str(f)))
    try:
        assert t.read_text("/etc/hostname").strip() == "node1"
        assert f"port {sshd_lab.nodes['node1'].port}" in sshd_lab.nodes["jump1"].log.read_text()
    finally:
        ssh.close_pool()


@pytest.mark.parametrize("extra,needle", [
    ("Host node1\n  ProxyJump jump1\nHost jump1\n  ProxyJump jump2\nHost jump2\n  ProxyJump jump1\n",
     "ProxyJump loop in the SSH config: node1 through jump1, jump1 through jump2, jump2 through jump1"),
    ("Host jump1\n  ProxyJump jump2\nHost jump2\n  ProxyJump jump1\n",
     "ProxyJump loop in the SSH config: jump1 through jump2, jump2 through jump1"),
])
def test_proxyjump_loop_is_a_clear_usage_error(sshd_lab, tmp_path, extra, needle):
    from katactl.backends import ssh
    from katactl.errors import UsageError

    cfg = _config_with(sshd_lab, tmp_path, extra)
    target = "node1" if extra.startswith("Host node1") else "jump1"
    with pytest.raises(UsageError) as ei:
        ssh.SSHTransport.from_settings(target, settings_for(sshd_lab, ssh_config=cfg)).read_text("/etc/hostname")
    assert needle in str(ei.value)
    ssh.close_pool()


def test_pipe_refuses_a_paramiko_without_the_internals_it_needs():
    """The pipelined SFTP reader depends on SFTPClient internals: a paramiko that renamed them
    is a clear error, not a hang."""
    from katactl.backends.ssh import _Pipe
    from katactl.errors import OperationFailed

    from paramiko import SFTPClient

    class Renamed(SFTPClient):  # a paramiko whose SFTPClient no longer has these names
        def __init__(self):
            pass

    with pytest.raises(OperationFailed, match="paramiko .* lacks .*_expecting"):
        _Pipe(Renamed())
