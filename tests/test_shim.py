"""Shim management client and commands against the lab shim server (issue 3):
agent-url, iptables, direct-volume, pprof, protocol dialects, faults."""
from __future__ import annotations

import gzip
import io
import json
import os
import socket

import pytest

from katactl.backends.local import LocalTransport
from katactl.backends.shim import ShimClient
from katactl.errors import NotFound, ProtocolError, TimeoutExpired
from katactl.lab.shimserver import ShimServer
from tests._katanode import node

VOL = "/dev/mapper/vol-1"


@pytest.fixture(scope="module")
def tree():
    with node() as n:
        n.go("go1111", pod_name="web", pod_namespace="prod", flavour_kw={"enable_pprof": True})
        n.go("go2222", pod_name="api", pod_namespace="prod")           # pprof disabled
        n.rs("rs3333", pod_name="batch-0", pod_namespace="batch")
        n.go("hang44", pod_name="stuck", pod_namespace="prod", flavour_kw={"fault": "hang"})
        n.go("huge55", pod_name="fat", pod_namespace="prod", flavour_kw={"fault": "huge"})
        n.go("junk66", pod_name="junk", pod_namespace="prod", flavour_kw={"fault": "garbage"})
        for s in n.servers:
            s.state.volumes[VOL] = {"total": 10 << 30, "used": 1 << 30, "available": 9 << 30}
        yield n


def raw_http(path, request: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(request)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
        if b"\r\n\r\n" in out:
            head, _, body = out.partition(b"\r\n\r\n")
            n = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
            if n and len(body) >= n[0]:
                break
    s.close()
    return out


# -- the server's dialects, on the wire ----------------------------------------------
@pytest.mark.parametrize("flavour,method,path,status,body", [
    ("go", "POST", "/metrics", 200, None),
    ("rs", "POST", "/metrics", 404, b"URL NOT FOUND"),
    ("rs", "GET", "/nope", 404, b"URL NOT FOUND"),
    ("go", "GET", "/nope", 404, b"404 page not found\n"),
    ("go", "DELETE", "/iptables", 501, b""),
    ("go", "GET", "/direct-volume/stats", 400, None),
    ("rs", "GET", "/direct-volume/stats?path=x", 404, b"URL NOT FOUND"),
    ("go", "GET", "/debug/pprof/heap", 404, None),      # go2222: pprof disabled
    ("rs", "GET", "/debug/pprof/heap", 404, b"URL NOT FOUND"),
])
def test_server_dialects(tree, flavour, method, path, status, body):
    sid = "go2222" if flavour == "go" else "rs3333"
    out = raw_http(tree.paths[sid].shim_socket,
                   f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    assert out.startswith(f"HTTP/1.1 {status}".encode()), out[:80]
    if body is not None:
        assert out.partition(b"\r\n\r\n")[2] == body


# -- agent-url -------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["go1111", "prod/web", "rs33", "batch/batch-0"])
def test_agent_url(cli, tree, ref):
    r = cli(["--host-root", tree.root, "shim", "agent-url", ref])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "vsock://1234567:1024\n"
    r = cli(["--host-root", tree.root, "shim", "agent-url", ref, "-o", "json"])
    assert r.json()["kind"] == "AgentURL" and r.json()["agentURL"] == "vsock://1234567:1024"


# -- iptables ---------------------------------------------------------------------------
RULES = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n"


@pytest.mark.parametrize("sid", ["go1111", "rs3333"])
def test_iptables_set_idempotent_dry_run_audited(cli, tree, tmp_path, sid, _isolated_home):
    f = tmp_path / "rules"
    f.write_text(RULES)
    srv = tree.server(sid)
    before = srv.state.iptables
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", sid, str(f), "--dry-run", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True and r.json()["dryRun"] is True
    assert srv.state.iptables == before
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", sid, str(f), "-o", "json"])
    assert r.json()["changed"] is True and r.json()["dryRun"] is False
    assert srv.state.iptables == RULES
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", sid, str(f), "-o", "json"])
    assert r.json()["changed"] is False
    r = cli(["--host-root", tree.root, "shim", "iptables", "get", sid])
    assert r.stdout == RULES
    assert srv.state.ip6tables != RULES  # v4 only
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", sid, "-", "--v6"], stdin=RULES)
    assert r.exit_code == 0 and srv.state.ip6tables == RULES
    r = cli(["--host-root", tree.root, "shim", "iptables", "get", sid, "--v6", "-o", "json"])
    assert r.json()["rules"] == RULES and r.json()["v6"] is True
    log = _isolated_home / "state" / "katactl" / "audit.log"
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    mine = [e for e in entries if e["action"] == "shim.iptables.set" and e["target"] == sid]
    assert [e["changed"] for e in mine] == [True, False, True]


@pytest.mark.parametrize("content", [b"", b"   \n", b"\xff\xfe rules", b"*filter\n-A INPUT -j DROP\n",
                                     b"-A INPUT -j DROP\nCOMMIT\n", b"*filter\x00\nCOMMIT\n"])
def test_iptables_bad_rules_corpus(cli, tree, tmp_path, content):
    f = tmp_path / "rules"
    f.write_bytes(content)
    before = tree.server("go2222").state.iptables
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", str(f)])
    assert r.exit_code == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert tree.server("go2222").state.iptables == before


def test_iptables_missing_file(cli, tree):
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", "/nonexistent/rules"])
    assert r.exit_code == 2 and "No such file" in r.stderr


# -- direct volumes -------------------------------------------------------------------------
@pytest.mark.parametrize("sid", ["go1111", "rs3333"])
def test_volume_stats_and_resize(cli, tree, sid):
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", sid, VOL, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "VolumeStats" and d["path"] == VOL
    assert d["items"][0] == {"unit": "bytes", "total": 10 << 30, "used": 1 << 30, "available": 9 << 30}
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", sid, VOL, "20Gi", "--dry-run", "-o", "json"])
    assert r.json()["changed"] is True and tree.server(sid).state.volumes[VOL]["total"] == 10 << 30
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", sid, VOL, "20Gi", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True and r.json()["sizeBefore"] == 10 << 30
    # the server only accepts its flavour's body keys: the resize really arrived
    assert tree.server(sid).state.volumes[VOL]["total"] == 20 << 30
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", sid, VOL, "20Gi", "-o", "json"])
    assert r.json()["changed"] is False
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", sid, VOL])
    assert r.exit_code == 0 and "bytes" in r.stdout


def test_volume_unknown_path(cli, tree):
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", "go2222", "/dev/nope"])
    assert r.exit_code == 1 and "not found in the guest" in r.stderr


@pytest.mark.parametrize("size", ["", "-1", "0", "10Qi", "abc", "1.5", "1e9", "99999999999999Ei"])
def test_volume_resize_bad_size(cli, tree, size):
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", "go2222", VOL, size])
    assert r.exit_code == 2, (size, r.stderr)
    assert tree.server("go2222").state.volumes[VOL]["total"] in (10 << 30, 20 << 30)


@pytest.mark.parametrize("path", ["relative/vol", "", "/dev/x\x00y"])
def test_volume_bad_path(cli, tree, path):
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", "go2222", path])
    assert r.exit_code == 2, r.stderr


# -- pprof --------------------------------------------------------------------------------
def test_pprof_heap_to_file(cli, tree, tmp_path):
    out = tmp_path / "heap.pprof"
    r = cli(["--host-root", tree.root, "pprof", "prod/web", "heap", "-f", str(out), "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["bytes"] == out.stat().st_size > 0
    assert gzip.decompress(out.read_bytes()).startswith(b"katactl-lab fake pprof heap")


def test_pprof_cpu_profile_seconds(cli, tree, tmp_path):
    out = tmp_path / "cpu.pprof"
    r = cli(["--host-root", tree.root, "pprof", "go1111", "profile", "--seconds", "1", "-f", str(out)])
    assert r.exit_code == 0, r.stderr
    assert ("GET", "/debug/pprof/profile?seconds=1") in tree.server("go1111").requests


def test_pprof_stdout_subprocess(tree):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "katactl", "--host-root", tree.root, "pprof", "go1111",
                        "goroutine", "-f", "-"], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert gzip.decompress(p.stdout).startswith(b"katactl-lab fake pprof goroutine")


def test_pprof_disabled_names_enable_pprof(cli, tree, tmp_path):
    out = tmp_path / "heap.pprof"
    r = cli(["--host-root", tree.root, "pprof", "go2222", "heap", "-f", str(out)])
    assert r.exit_code == 3
    assert "enable_pprof" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_pprof_runtime_rs(cli, tree, tmp_path):
    r = cli(["--host-root", tree.root, "pprof", "rs3333", "heap", "-f", str(tmp_path / "x")])
    assert r.exit_code == 3 and "runtime-rs" in r.stderr


@pytest.mark.parametrize("args", [["heapp"], ["heap", "--seconds", "5"], ["profile", "--seconds", "0"],
                                  ["profile", "--seconds", "x"], ["heap", "-f", "/nonexistent/dir/f"]])
def test_pprof_bad_args(cli, tree, args):
    r = cli(["--host-root", tree.root, "pprof", "go1111", *args])
    assert r.exit_code == 2, (args, r.stderr)


# -- faults --------------------------------------------------------------------------------
def test_hung_shim_times_out_exit_6(cli, tree):
    r = cli(["--host-root", tree.root, "--timeout", "0.5s", "shim", "agent-url", "hang44"])
    assert r.exit_code == 6, r.stderr
    assert "no answer" in r.stderr
    r = cli(["--host-root", tree.root, "--timeout", "0.5s", "metrics", "hang44", "-o", "json"])
    assert r.exit_code == 6 and r.json()["code"] == "Timeout"


def test_huge_metrics_body_refused(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "huge55"])
    assert r.exit_code == 1 and "limit" in r.stderr and r.stderr.count("\n") == 1


def test_garbage_answer(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "junk66"])
    assert r.exit_code == 1 and "HTTP" in r.stderr


def test_nobody_listening(cli, tmp_path):
    with node() as n:
        p = n.go("deaf01", serve=False)
        s = socket.socket(socket.AF_UNIX)
        s.bind(p.shim_socket)
        s.close()
        r = cli(["--host-root", n.root, "shim", "agent-url", "deaf01"])
        assert r.exit_code == 7 and "nobody is listening" in r.stderr
        t = LocalTransport(n.root)
        with pytest.raises(Exception) as e:
            ShimClient(t, p.shim_socket_node, "go", timeout=1).agent_url()
        assert "nobody is listening" in str(e.value)


def test_client_library_errors(tree):
    t = LocalTransport(tree.root)
    with pytest.raises(TimeoutExpired):
        ShimClient(t, tree.paths["hang44"].shim_socket_node, timeout=0.3).metrics_text()
    with pytest.raises(ProtocolError):
        ShimClient(t, tree.paths["huge55"].shim_socket_node, timeout=5).metrics_text()
    with pytest.raises(NotFound):
        ShimClient(t, tree.paths["go2222"].shim_socket_node).pprof("heap", io.BytesIO())
    c = ShimClient(t, tree.paths["rs3333"].shim_socket_node, "rs")
    assert c.capabilities() is None  # upstream shims have no /ext/v1


def test_extension_hooks(tmp_path):
    from katactl.lab.shimserver import Response

    class ExtShim(ShimServer):
        def handle_ext(self, req):
            if req.path == "/ext/v1/capabilities":
                return Response(200, json.dumps({"balloon": True}), "application/json")
            return None

    path = f"/tmp/kx{os.getpid()}.sock"
    with ExtShim(path, flavour="rs",
                 extra_routes={("GET", "/ext/v1/ping"): lambda srv, req: Response(200, "pong")}):
        c = ShimClient(LocalTransport(), path, "rs", timeout=2)
        assert c.capabilities() == {"balloon": True}
        assert c.call("GET", "/ext/v1/ping") == (200, b"pong")
        assert c.call("GET", "/ext/v1/other")[0] == 404
