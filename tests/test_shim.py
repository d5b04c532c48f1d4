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
from katactl.backends.shim import IPTABLES_LIMIT, ShimClient
from katactl.errors import NotFound, ProtocolError, TimeoutExpired
from katactl.lab import layout
from katactl.lab.shimserver import Response, ShimServer, ext4_statfs_total
from tests._katanode import node

#: a direct volume as a CSI driver publishes it: its path on the host (what the user gives),
#: and the block device its mountInfo.json names (what the shim is asked about)
VOL = "/var/lib/kubelet/pods/7d1c2e0a/volumes/kubernetes.io~csi/pvc-1/mount"
DEV = "/dev/mapper/vol-1"
#: registered, but its device is not in the guest
GONE = "/mnt/gone"


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
            s.state.volumes[DEV] = {"total": 10 << 30, "used": 1 << 30, "available": 9 << 30}
            layout.write_direct_volume(n.root, VOL, sandbox_id=s.state.sandbox_id, device=DEV)
            layout.write_direct_volume(n.root, GONE, sandbox_id=s.state.sandbox_id, device="/dev/nope")
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
    # runtime-rs parses the query with Url::parse(req.uri()): only an absolute-form target works
    ("rs", "POST", "http://localhost/direct-volume/stats?path=%2Fdev%2Fmapper%2Fvol-1", 200,
     b"Usage: [VolumeUsage { available: 9663676416, total: 10737418240, used: 1073741824, unit: BYTES, "
     b"special_fields: SpecialFields { unknown_fields: UnknownFields { fields: None }, cached_size: "
     b"CachedSize { size: 0 } } }, VolumeUsage { available: 0, total: 0, used: 0, unit: INODES, "
     b"special_fields: SpecialFields { unknown_fields: UnknownFields { fields: None }, cached_size: "
     b"CachedSize { size: 0 } } }] Volume Condition: VolumeCondition { abnormal: false, message: \"OK\", "
     b"special_fields: SpecialFields { unknown_fields: UnknownFields { fields: None }, cached_size: "
     b"CachedSize { size: 0 } } }"),
    ("go", "GET", "/direct-volume/stats?path=%2Fdev%2Fmapper%2Fvol-1", 200,
     b'{"usage":[{"available":9663676416,"total":10737418240,"used":1073741824,"unit":1},{"unit":2}],'
     b'"volume_condition":{"message":"OK"}}'),
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


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/direct-volume/stats?path=%2Fdev%2Fmapper%2Fvol-1", b""),     # origin-form: Url::parse fails
    ("POST", "http://localhost/direct-volume/stats", b""),                  # no path parameter
    ("POST", "http://localhost/direct-volume/stats?path=%2Fdev%2Fnope", b""),  # the agent fails
    ("POST", "/direct-volume/resize", b"{not json"),
    ("POST", "/direct-volume/resize", b'{"volume_guest_path": "/dev/nope", "size": 1}'),
    ("PUT", "/iptables", b"\xff\xfe"),
])
def test_runtime_rs_handler_errors_drop_the_connection(tree, method, path, body):
    """hyper drops the connection when a runtime-rs handler returns Err: no status line at all."""
    req = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
           "Connection: close\r\n\r\n").encode() + body
    assert raw_http(tree.paths["rs3333"].shim_socket, req) == b""


@pytest.mark.parametrize("hv,has,lacks", [
    ("dragonball", ["kata_hypervisor_scrape_count ", 'kata_hypervisor_vcpu{item="exit_io_in"}',
                    'kata_hypervisor_signals{item="sigbus"}'], ["kata_hypervisor_proc_", "kata_hypervisor_netdev"]),
    ("qemu", ['kata_hypervisor_proc_status{item="vmrss"}', "kata_hypervisor_threads "],
     ["kata_hypervisor_scrape_count", "kata_hypervisor_netdev"]),
    ("clh", [], ["kata_hypervisor_"]),
    ("fc", None, None),
])
def test_runtime_rs_metrics_hypervisor_families_as_upstream(hv, has, lacks):
    """The lab's runtime-rs /metrics appends what each hypervisor's get_hypervisor_metrics
    gives (shim_mgmt/handlers.rs metrics_url_handler): Dragonball's own families
    (src/dragonball/src/hypervisor_metrics.rs), QEMU's procfs ones, nothing for Cloud
    Hypervisor (an Err, unwrap_or_default), and Firecracker's todo!() panics: no answer."""
    path = f"/tmp/kh{os.getpid()}{hv}.sock"
    req = b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    from katactl.lab.shimserver import ShimState

    with ShimServer(path, flavour="rs", state=ShimState(hypervisor=hv)):
        out = raw_http(path, req)
    if has is None:
        assert out == b""
        return
    body = out.partition(b"\r\n\r\n")[2].decode()
    assert out.startswith(b"HTTP/1.1 200") and 'kata_shim_proc_status{item="vmrss"}' in body
    assert all(x in body for x in has) and not any(x in body for x in lacks), body


# -- agent-url -------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["go1111", "prod/web", "rs33", "batch/batch-0"])
def test_agent_url(cli, tree, ref):
    r = cli(["--host-root", tree.root, "shim", "agent-url", ref])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "vsock://1234567:1024\n"
    r = cli(["--host-root", tree.root, "shim", "agent-url", ref, "-o", "json"])
    assert r.json()["kind"] == "AgentURL" and r.json()["agentURL"] == "vsock://1234567:1024"


def test_agent_url_from_a_hostile_shim_is_printable_in_text_output(cli, tree):
    """A shim answering /agent-url with terminal escapes: text output shows them escaped,
    on one line (never raw to the terminal or a log); JSON keeps the value as sent
    (issue 16, finding 17)."""
    s = tree.server("go2222")
    hostile = "vsock://1:1024\x1b]0;owned\x07\x1b[2J\r\nrm -rf /\x9b"
    old, s.state.agent_url = s.state.agent_url, hostile
    try:
        r = cli(["--host-root", tree.root, "shim", "agent-url", "go2222"])
        assert r.exit_code == 0, r.stderr
        assert r.stdout == "vsock://1:1024\\x1b]0;owned\\x07\\x1b[2J\\r\\nrm -rf /\\x9b\n"
        r = cli(["--host-root", tree.root, "shim", "agent-url", "go2222", "-o", "json"])
        assert r.json()["agentURL"] == hostile
    finally:
        s.state.agent_url = old


@pytest.mark.parametrize("sid", ["rs3333", "go2222"])
def test_agent_url_empty_answer_is_a_failure(cli, tree, sid):
    """runtime-rs answers /agent-url 200 with an empty body when it cannot get the agent's
    socket (runtime-rs shim_mgmt/handlers.rs agent_url_handler: ``unwrap_or_else(|_|
    String::from(""))``): that is the operation failing (exit 1, one line), never a success
    with no URL. (The Go shim answers 500 instead; an empty 200 from it fails the same way.)"""
    s = tree.server(sid)
    old, s.state.agent_url = s.state.agent_url, ""
    try:
        r = cli(["--host-root", tree.root, "shim", "agent-url", sid])
        assert r.exit_code == 1, (r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        if sid == "rs3333":
            assert "the runtime-rs shim could not get the agent's socket (it answers an empty URL)" in r.stderr
        else:
            assert "answered an empty URL" in r.stderr
        r = cli(["--host-root", tree.root, "shim", "agent-url", sid, "-o", "json"])
        assert r.exit_code == 1 and r.json()["kind"] == "Error" and r.json()["exitCode"] == 1
    finally:
        s.state.agent_url = old


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
    # each change sent has its "requested" entry first (a kill -9 in flight leaves it logged)
    assert [e.get("changed", e["result"]) for e in mine] == ["requested", True, False, "requested", True]


def _fields(text: str) -> dict:
    """describe()'s 'key: value' lines."""
    return dict(ln.split(": ", 1) for ln in text.splitlines() if ": " in ln)


@pytest.mark.parametrize("fmt", [[], ["-o", "markdown"]])
def test_mutations_say_changed_and_dry_run_in_human_output(cli, tmp_path, fmt, _isolated_home):
    """Review 5 finding 7: on a terminal a dry run, a change and a no-op must read differently
    (design.md "Safety": every mutating command reports changed and dryRun)."""
    f = tmp_path / "rules"
    f.write_text(RULES)
    with node() as n:
        n.go("hum001")
        layout.write_direct_volume(n.root, VOL, sandbox_id="hum001", device=DEV)
        n.server("hum001").state.volumes[DEV] = {"total": 10 << 30, "used": 1 << 30, "available": 9 << 30}
        ipt = ["--host-root", n.root, "shim", "iptables", "set", "hum001", str(f), *fmt]
        vol = ["--host-root", n.root, "shim", "volume", "resize", "hum001", VOL, "20Gi", *fmt]
        seen = []
        for args in (ipt + ["--dry-run"], ipt, ipt, vol + ["--dry-run"], vol, vol):
            r = cli(args)
            assert r.exit_code == 0, r.stderr
            d = _fields(r.stdout)
            seen.append((d.get("changed"), d.get("dryRun")))
    assert seen == [("true", "true"), ("true", None), ("false", None)] * 2


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


def test_iptables_file_is_a_directory(cli, tree, tmp_path):
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", str(tmp_path)])
    assert r.exit_code == 2 and "directory" in r.stderr and r.stderr.count("\n") == 1


def _padded_rules(nbytes: int) -> bytes:
    """Valid iptables-save text of exactly nbytes (comment lines pad it)."""
    head, tail = RULES.encode(), b""
    pad = nbytes - len(head)
    line = b"# " + b"x" * 1021 + b"\n"   # 1 KiB comment lines
    body = line * (pad // len(line))
    rest = pad - len(body)
    if rest:
        tail = b"#" + b"y" * (rest - 2) + b"\n" if rest >= 2 else b"\n"
    data = body + tail + head
    assert len(data) == nbytes
    return data


def test_iptables_limit_is_one_for_set_and_get(cli, tree, tmp_path):
    """Regression: set accepted 8 MiB (truncating more) while get refused > 4 MiB,
    so a 5 MiB ruleset broke every later get/set."""
    srv = tree.server("go2222")
    f = tmp_path / "big.rules"
    f.write_bytes(_padded_rules(IPTABLES_LIMIT))
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", str(f), "--v6", "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is True, r.stderr
    assert len(srv.state.ip6tables.encode()) == IPTABLES_LIMIT
    r = cli(["--host-root", tree.root, "shim", "iptables", "get", "go2222", "--v6"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.encode() == f.read_bytes()
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", str(f), "--v6", "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is False, r.stderr


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_iptables_set_over_limit_refused_not_truncated(cli, tree, tmp_path, via, _isolated_home):
    srv = tree.server("go2222")
    before = srv.state.iptables
    data = _padded_rules(IPTABLES_LIMIT + 1)
    f = tmp_path / "huge.rules"
    f.write_bytes(data)
    if via == "file":
        r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", str(f)])
    else:
        r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", "-"], stdin=data.decode())
    assert r.exit_code == 2, r.stderr
    assert "8 MiB limit" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert srv.state.iptables == before
    assert _audit(_isolated_home, "shim.iptables.set", "go2222") == []   # nothing was attempted


def test_iptables_get_over_limit_refused(cli):
    with node() as n:
        n.go("big888")
        n.server("big888").state.iptables = _padded_rules(IPTABLES_LIMIT + 1).decode()
        r = cli(["--host-root", n.root, "shim", "iptables", "get", "big888"])
        assert r.exit_code == 1 and "limit" in r.stderr and r.stderr.count("\n") == 1


def test_iptables_set_failure_audited(cli, tree, tmp_path, _isolated_home):
    f = tmp_path / "rules"
    f.write_text(RULES.replace("DROP", "ACCEPT"))
    srv = tree.server("go2222")
    before = srv.state.iptables
    key = ("PUT", "/iptables")
    srv.extra_routes[key] = lambda s, req: Response(500, "iptables-restore: line 3 failed\n")
    try:
        r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", str(f), "-o", "json"])
    finally:
        del srv.extra_routes[key]
    assert r.exit_code == 1 and "line 3 failed" in r.json()["message"]
    assert srv.state.iptables == before
    (e,) = _audit(_isolated_home, "shim.iptables.set", "go2222")
    assert e["result"] == "error" and "line 3 failed" in e["error"] and e["params"]["v6"] is False
    assert "changed" not in e


def test_shim_ops_library_without_cli(tree, _isolated_home):
    from katactl import shim_ops
    from katactl.errors import UsageError

    t = LocalTransport(tree.root)
    rules = RULES.replace("-i lo", "-i eth9")
    res = shim_ops.iptables_set(t, "rs33", rules, v6=True, dry_run=True)
    assert res["changed"] is True and res["dryRun"] is True and res["sandbox"] == "rs3333"
    assert tree.server("rs3333").state.ip6tables != rules
    res = shim_ops.iptables_set(t, "rs33", rules, v6=True)
    assert res == {"node": "localhost", "sandbox": "rs3333", "v6": True, "bytes": len(rules),
                   "changed": True, "dryRun": False}
    # counters and comments iptables-save adds are not a difference
    dump = "# Generated by iptables-save v1.8.9 on Mon\n" + rules.replace("[0:0]", "[12:3456]")
    assert shim_ops.iptables_set(t, "rs33", dump, v6=True)["changed"] is False
    with pytest.raises(UsageError):
        shim_ops.iptables_set(t, "rs33", "x" * (IPTABLES_LIMIT + 1))
    with pytest.raises(UsageError):
        shim_ops.volume_resize(t, "rs33", VOL, 0)
    with pytest.raises(UsageError):
        shim_ops.volume_resize(t, "rs33", "vol", 1 << 30)
    mine = _audit(_isolated_home, "shim.iptables.set", "rs3333")
    assert [e["changed"] for e in mine] == [True, False]   # dry run and usage errors not audited


def test_read_ops_library_without_cli(tree):
    from katactl import shim_ops

    t = LocalTransport(tree.root)
    assert shim_ops.agent_url(t, "rs33") == {"node": "localhost", "sandbox": "rs3333",
                                             "agentURL": "vsock://1234567:1024"}
    got = shim_ops.iptables_get(t, "go11", v6=True)
    assert got == {"node": "localhost", "sandbox": "go1111", "v6": True,
                   "rules": tree.server("go1111").state.ip6tables}
    for sid in ("go1111", "rs3333"):  # Go sends the unit as a number, runtime-rs as a name
        st = shim_ops.volume_stats(t, sid, VOL)
        assert (st["sandbox"], st["path"], st["device"]) == (sid, VOL, DEV)
        assert [u["unit"] for u in st["usage"]] == ["bytes", "inodes"], st
        assert st["usage"][0]["total"] == tree.server(sid).state.volumes[DEV]["total"]
    with pytest.raises(NotFound):
        shim_ops.volume_stats(t, "nosuch", VOL)


@pytest.mark.parametrize("unit,shown", [("BYTES", "bytes"), ("INODES", "inodes"), (7, 7),
                                        (["x"], ["x"]), (None, None), (True, True)])
def test_volume_stats_odd_units(cli, unit, shown):
    """Whatever a shim sends as a unit is shown as sent, never a traceback."""
    body = json.dumps({"usage": [{"unit": unit, "total": 5, "used": 1, "available": 4}, "junk"]})
    with node() as n:
        p = n.go("odd001", serve=False)
        layout.write_direct_volume(n.root, VOL, device=DEV)
        n.serve(p, "go", extra_routes={(None, "/direct-volume/stats"):
                                       lambda srv, req: Response(200, body, "application/json")})
        r = cli(["--host-root", n.root, "shim", "volume", "stats", "odd001", VOL, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"] == [{"unit": shown, "total": 5, "used": 1, "available": 4}]


def test_volume_stats_human_output_shows_device_and_condition(cli):
    """Review 5 finding 6: the human view shows the device and the volume condition (stderr,
    after the usage table); an abnormal one is a warning with the guest's message, escaped,
    and the exit code stays 0 in every format (kubelet: an event, not a failed stats call)."""
    bad = {"usage": [{"unit": 1, "total": 100, "used": 90, "available": 10}],
           "volume_condition": {"abnormal": True, "message": "I/O error on /dev/vdb\x1b[2J: read-only"}}
    with node() as n:
        n.go("cond01")
        layout.write_direct_volume(n.root, VOL, sandbox_id="cond01", device=DEV)
        n.server("cond01").state.volumes[DEV] = {"total": 10 << 30, "used": 1 << 30, "available": 9 << 30}
        ok = cli(["--host-root", n.root, "shim", "volume", "stats", "cond01", VOL])
        p = n.go("cond02", serve=False)
        layout.write_direct_volume(n.root, VOL, sandbox_id="cond02", device=DEV)
        n.serve(p, "go", extra_routes={(None, "/direct-volume/stats"):
                                       lambda srv, req: Response(200, json.dumps(bad), "application/json")})
        plain = cli(["--host-root", n.root, "shim", "volume", "stats", "cond02", VOL])
        js = cli(["--host-root", n.root, "shim", "volume", "stats", "cond02", VOL, "-o", "json"])
    assert ok.exit_code == 0, ok.stderr
    assert ok.stderr == f"device {DEV}, condition normal (OK)\n"
    assert plain.exit_code == 0 and plain.stdout.split() == ["UNIT", "TOTAL", "USED", "AVAILABLE",
                                                             "bytes", "100", "90", "10"]
    warning, summary = plain.stderr.splitlines()
    assert warning.startswith(f"warning: volume {VOL} (device {DEV}) is abnormal: I/O error on /dev/vdb")
    assert "read-only" in warning and "\x1b" not in plain.stderr
    assert summary == f"device {DEV}, condition abnormal"
    assert js.exit_code == 0 and js.json()["condition"]["abnormal"] is True
    assert js.stderr.startswith("warning: ") and js.stderr.count("\n") == 1


@pytest.mark.parametrize("body", [{"usage": 5}, {"usage": True}, {"usage": "bytes"}, {"usage": {"unit": 0}},
                                  {"usage": [], "volume_condition": 3}, {"volume_condition": [True]},
                                  {"volume_condition": "abnormal"}])
def test_volume_stats_garbage_shape_is_a_protocol_error(cli, body):
    """usage that is not a list, or a volume_condition that is not an object (csi.pb.go's
    VolumeStatsResponse: repeated VolumeUsage, a VolumeCondition message or null): one line
    naming the shim, the documented exit code, never 'unexpected TypeError' or the value
    passed on as if it were the guest's answer."""
    with node() as n:
        p = n.go("bad001", serve=False)
        layout.write_direct_volume(n.root, VOL, device=DEV)
        n.serve(p, "go", extra_routes={(None, "/direct-volume/stats"):
                                       lambda srv, req: Response(200, json.dumps(body), "application/json")})
        r = cli(["--host-root", n.root, "shim", "volume", "stats", "bad001", VOL, "-o", "json"])
        rt = cli(["--host-root", n.root, "shim", "volume", "stats", "bad001", VOL])
    assert r.exit_code == 1 and r.json()["code"] == "ProtocolError", (body, r.stdout, r.stderr)
    assert "shim of sandbox bad001" in r.json()["message"] and "/direct-volume/stats" in r.json()["message"]
    assert rt.exit_code == 1 and len(rt.stderr.strip().splitlines()) == 1 and "unexpected" not in rt.stderr, rt.stderr


def test_iptables_get_escapes_control_characters_only_on_a_terminal(cli):
    import sys

    from tests._pty import run_on_pty

    rules = "# \x1b]0;owned\x07 \x1b[31mred\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
    with node() as n:
        n.go("esc001")
        n.server("esc001").state.iptables = rules
        r = cli(["--host-root", n.root, "shim", "iptables", "get", "esc001"])
        assert r.exit_code == 0 and r.stdout == rules  # piped: the exact text, for iptables-restore
        rc, text = run_on_pty([sys.executable, "-m", "katactl", "--host-root", n.root, "shim", "iptables",
                               "get", "esc001"])
    assert rc == 0, text
    assert "\x1b" not in text and "\\x1b]0;owned\\x07 \\x1b[31mred" in text and "*filter" in text


# -- direct volumes -------------------------------------------------------------------------
@pytest.mark.parametrize("sid", ["go1111", "rs3333"])
def test_volume_stats_and_resize(cli, tree, sid):
    srv = tree.server(sid)
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", sid, VOL, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "VolumeStats" and (d["path"], d["device"]) == (VOL, DEV)
    assert d["items"][0] == {"unit": "bytes", "total": 10 << 30, "used": 1 << 30, "available": 9 << 30}
    assert d["condition"] == {"abnormal": False, "message": "OK"}
    assert srv.requests[-1] == ("GET" if sid.startswith("go") else "POST",
                                f"{'' if sid.startswith('go') else 'http://localhost'}"
                                "/direct-volume/stats?path=%2Fdev%2Fmapper%2Fvol-1")
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", sid, VOL, "20Gi", "--dry-run", "-o", "json"])
    assert r.json()["changed"] is True and srv.state.volumes[DEV]["total"] == 10 << 30
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", sid, VOL, "20Gi", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    grown = ext4_statfs_total(20 << 30)
    assert r.json()["changed"] is True and r.json()["sizeBefore"] == 10 << 30 and r.json()["sizeAfter"] == grown
    # the server only accepts its flavour's body keys: the resize really arrived; like a real
    # guest, the filesystem's total is below the device size
    assert srv.state.volumes[DEV]["total"] == grown < 20 << 30
    sent = _resizes(srv)
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", sid, VOL, "20Gi", "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is False, r.stderr
    assert r.json()["sizeBefore"] == r.json()["sizeAfter"] == grown
    assert _resizes(srv) == sent + 1   # sent again (idempotent on the shim), nothing grew
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", sid, VOL])
    assert r.exit_code == 0 and "bytes" in r.stdout


def _resizes(srv) -> int:
    with srv.lock:
        return sum(1 for m, p in srv.requests if p == "/direct-volume/resize")


def test_volume_resize_fs_overhead_not_treated_as_pending(cli, tmp_path, _isolated_home):
    """Regression: statfs total < device size on every real guest; re-runs after
    success must say changed: false, and a further grow must say changed: true."""
    with node() as n:
        n.go("vol777")
        layout.write_direct_volume(n.root, VOL, sandbox_id="vol777", device=DEV)
        srv = n.server("vol777")
        dev = 8 << 30
        srv.state.volumes[DEV] = {"total": ext4_statfs_total(dev), "used": 1 << 30, "available": 0}
        base = ["--host-root", n.root, "shim", "volume", "resize", "vol777", VOL]
        for _ in range(2):
            r = cli(base + ["8Gi", "-o", "json"])
            assert r.exit_code == 0 and r.json()["changed"] is False, r.stderr
        r = cli(base + ["12Gi", "-o", "json"])
        assert r.json()["changed"] is True and srv.state.volumes[DEV]["total"] == ext4_statfs_total(12 << 30)
        # a SIZE the filesystem already holds: nothing is sent
        sent = _resizes(srv)
        r = cli(base + ["4Gi", "-o", "json"])
        assert r.exit_code == 0 and r.json()["changed"] is False and _resizes(srv) == sent
        assert any("only grows" in x for x in r.json()["notes"])
        r = cli(base + ["4Gi", "--dry-run", "-o", "json"])
        assert r.json()["changed"] is False and r.json()["dryRun"] is True
        # a device just above the filesystem but below the current device: the guest refuses to
        # shrink; that failure is reported (exit 1) and audited
        r = cli(base + [str(ext4_statfs_total(12 << 30) + (64 << 20))])
        assert r.exit_code == 1 and "shrinking" in r.stderr and r.stderr.count("\n") == 1
        entries = _audit(_isolated_home, "shim.volume.resize", "vol777")
        assert [(e["result"], e.get("changed")) for e in entries] == \
            [("ok", False), ("ok", False), ("ok", True), ("ok", False), ("error", None)]
        assert "shrinking" in entries[-1]["error"] and entries[-1]["params"]["path"] == VOL


def _audit(home, action, target, requested: bool = False) -> list[dict]:
    """The audit entries of action on target: the outcomes, with ``requested`` also the
    "requested" entries written before each change request."""
    log = home / "state" / "katactl" / "audit.log"
    if not log.exists():
        return []
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    return [e for e in entries if e["action"] == action and e["target"] == target
            and (requested or e["result"] != "requested")]


def test_volume_resize_failure_audited(cli, tree, _isolated_home):
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", "go2222", GONE, "1Gi", "-o", "json"])
    assert r.exit_code == 1 and r.json()["kind"] == "Error" and "not found in the guest" in r.json()["message"]
    (e,) = _audit(_isolated_home, "shim.volume.resize", "go2222")
    assert e["result"] == "error" and "not found in the guest" in e["error"]
    assert e["params"] == {"path": GONE, "size": 1 << 30} and e["device"] == "/dev/nope"
    # a dry run changes nothing and is not audited
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", "go2222", GONE, "1Gi", "--dry-run"])
    assert r.exit_code == 0
    assert len(_audit(_isolated_home, "shim.volume.resize", "go2222")) == 1


@pytest.mark.parametrize("cmd,route,sig", [
    (["iptables", "set"], ("PUT", "/iptables"), "SIGTERM"),
    (["volume", "resize"], ("POST", "/direct-volume/resize"), "SIGINT"),
])
def test_mutation_interrupted_mid_request_is_audited(tmp_path, _isolated_home, cmd, route, sig):
    """Review 5 finding 2: Ctrl-C (or SIGTERM, SIGHUP: katactl.interrupt) while the shim holds
    the change request: the change may have landed, so the audit log says interrupted, with
    the parameters and that the request went out; exit 130. A real process, a real signal."""
    import signal
    import subprocess
    import sys
    import threading

    arrived, release = threading.Event(), threading.Event()

    def applied_then_slow(srv, req):
        if route[1] == "/iptables":
            srv.state.iptables = req.body.decode()   # the guest has the new rules...
        arrived.set()
        release.wait(60)                              # ...and the answer is late
        return Response(200, "")

    rules = tmp_path / "rules"
    rules.write_text(RULES)
    args = [str(rules)] if cmd[0] == "iptables" else [VOL, "20Gi"]
    with node() as n:
        n.go("int001", pod_name="web", pod_namespace="prod")
        layout.write_direct_volume(n.root, VOL, sandbox_id="int001", device=DEV)
        srv = n.server("int001")
        srv.state.volumes[DEV] = {"total": 10 << 30, "used": 1 << 30, "available": 9 << 30}
        srv.extra_routes[route] = applied_then_slow
        p = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", n.root, "shim", *cmd, "int001",
                              *args, "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert arrived.wait(60), "the change request never reached the shim"
            p.send_signal(getattr(signal, sig))
            out, err = p.communicate(timeout=60)
        finally:
            release.set()
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 130, err
    assert json.loads(out)["code"] == "Interrupted"
    action = "shim.iptables.set" if cmd[0] == "iptables" else "shim.volume.resize"
    first, e = _audit(_isolated_home, action, "int001", requested=True)
    assert first["result"] == "requested" and first["requestSent"] is True, first
    assert e["result"] == "interrupted" and e["requestSent"] is True and "changed" not in e, e
    want = {"v6": False, "bytes": len(RULES)} if cmd[0] == "iptables" else {"path": VOL, "size": 20 << 30}
    assert e["params"] == want


def test_volume_unknown_path(cli, tree):
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", "go2222", GONE])
    assert r.exit_code == 1 and "not found in the guest" in r.stderr


@pytest.mark.parametrize("cmd", [["stats"], ["resize", "1Gi"]])
@pytest.mark.parametrize("sid", ["go2222", "rs3333"])
def test_volume_not_registered_is_not_found(cli, tree, sid, cmd, _isolated_home):
    """issue 18 item 5: VOLUME_PATH is the host path kata-runtime direct-volume registered;
    one that is not registered on the node is exit 3, naming it, and the shim is not asked."""
    srv = tree.server(sid)
    asked = len(srv.requests)
    long_path = "/var/lib/kubelet/pods/" + "p" * 300  # its base64 name is over NAME_MAX: never registered
    for path in (DEV, long_path):
        r = cli(["--host-root", tree.root, "shim", "volume", cmd[0], sid, path, *cmd[1:]])
        assert r.exit_code == 3, r.stderr
        assert path in r.stderr and "not registered" in r.stderr and r.stderr.count("\n") == 1
    assert len(srv.requests) == asked


def test_volume_registered_by_kata_ctl_for_runtime_rs(cli, tree):
    """runtime-rs and kata-ctl name the directory with standard base64 (its '/' makes a
    subdirectory) and write serde's field names; the Go runtime uses base64url."""
    import base64

    path = "/srv/\u00e9"   # standard base64 L3Nydi/DqQ==, base64url L3Nydi_DqQ==
    d = tree.root + layout.DIRECT_VOLUMES + "/" + base64.b64encode(path.encode()).decode()
    os.makedirs(d)
    with open(d + "/mountInfo.json", "w") as f:
        json.dump({"volume_type": "block", "device": DEV, "fs_type": "ext4", "metadata": {}, "options": []}, f)
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", "rs3333", path, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["device"] == DEV
    assert r.json()["items"][0]["total"] == tree.server("rs3333").state.volumes[DEV]["total"]


def test_runtime_rs_handler_failure_is_named(cli, tree, _isolated_home):
    """runtime-rs answers a failing handler by dropping the connection (no 500): one line
    saying so, exit 1, audited like any failure."""
    r = cli(["--host-root", tree.root, "shim", "volume", "stats", "rs3333", GONE])
    assert r.exit_code == 1, r.stderr
    assert "closed the connection without answering: its handler failed" in r.stderr
    assert r.stderr.count("\n") == 1
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", "rs3333", GONE, "1Gi", "-o", "json"])
    assert r.exit_code == 1 and "its handler failed" in r.json()["message"]
    (e,) = _audit(_isolated_home, "shim.volume.resize", "rs3333")
    assert e["result"] == "error" and "its handler failed" in e["error"]


def test_go_stats_json_omits_zero_fields(cli):
    """The Go shim's JSON drops zero values (csi.pb.go omitempty): a volume with nothing used
    reads used: 0, not null."""
    with node() as n:
        p = n.go("empty1")
        layout.write_direct_volume(n.root, VOL, sandbox_id="empty1", device=DEV)
        srv = n.server("empty1")
        srv.state.volumes[DEV] = {"total": 5 << 30, "used": 0, "available": 5 << 30}
        assert p.shim_socket
        r = cli(["--host-root", n.root, "shim", "volume", "stats", "empty1", VOL, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"][0] == {"unit": "bytes", "total": 5 << 30, "used": 0, "available": 5 << 30}
    assert r.json()["items"][1] == {"unit": "inodes", "total": 0, "used": 0, "available": 0}


@pytest.mark.parametrize("size", ["", "-1", "0", "10Qi", "abc", "1.5", "256m", "1e-3", "99999999999999Ei"])
def test_volume_resize_bad_size(cli, tree, size):
    r = cli(["--host-root", tree.root, "shim", "volume", "resize", "go2222", VOL, size])
    assert r.exit_code == 2, (size, r.stderr)
    assert tree.server("go2222").state.volumes[DEV]["total"] in (10 << 30, ext4_statfs_total(20 << 30))


@pytest.mark.parametrize("cmd", [["stats"], ["resize"]])
@pytest.mark.parametrize("path", ["relative/vol", "", "/dev/x\x00y"])
def test_volume_bad_path(cli, tree, path, cmd, _isolated_home):
    extra = ["1Gi"] if cmd == ["resize"] else []
    r = cli(["--host-root", tree.root, "shim", "volume", *cmd, "go2222", path, *extra])
    assert r.exit_code == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert _audit(_isolated_home, "shim.volume.resize", "go2222") == []


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
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file
    r = cli(["--host-root", tree.root, "pprof", "go2222", "heap", "-f", "-"])
    assert r.exit_code == 3 and r.stdout == ""  # the 404 page never reaches stdout


def test_pprof_runtime_rs(cli, tree, tmp_path):
    r = cli(["--host-root", tree.root, "pprof", "rs3333", "heap", "-f", str(tmp_path / "x")])
    assert r.exit_code == 3 and "runtime-rs" in r.stderr


@pytest.mark.parametrize("profile", ["heap", "allocs", "goroutine", "block", "mutex", "threadcreate"])
def test_pprof_delta_profile_seconds(cli, tree, tmp_path, profile):
    """Review 5 finding 12: Go's net/http/pprof answers ?seconds=N for these with a delta
    profile (pprof.go serveDeltaProfile, profileSupportsDelta): --seconds is passed on."""
    out = tmp_path / f"{profile}.pprof"
    r = cli(["--host-root", tree.root, "pprof", "go1111", profile, "--seconds", "1", "-f", str(out), "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert ("GET", f"/debug/pprof/{profile}?seconds=1") in tree.server("go1111").requests
    assert r.json()["bytes"] == out.stat().st_size > 0


@pytest.mark.parametrize("args", [["heapp"], ["cmdline", "--seconds", "5"], ["symbol", "--seconds", "1"],
                                  ["profile", "--seconds", "0"], ["heap", "--seconds", "3601"],
                                  ["profile", "--seconds", "x"], ["heap", "-f", "/nonexistent/dir/f"]])
def test_pprof_bad_args(cli, tree, args):
    r = cli(["--host-root", tree.root, "pprof", "go1111", *args])
    assert r.exit_code == 2, (args, r.stderr)


def test_pprof_download_library_without_cli(tree, tmp_path, monkeypatch):
    from katactl import shim_ops
    from katactl.errors import UsageError

    t = LocalTransport(tree.root)
    buf = io.BytesIO()
    res = shim_ops.pprof_download(t, "go11", "goroutine", buf)
    assert res == {"node": "localhost", "sandbox": "go1111", "profile": "goroutine", "file": None,
                   "bytes": len(buf.getvalue())}
    assert gzip.decompress(buf.getvalue()).startswith(b"katactl-lab fake pprof goroutine")
    monkeypatch.chdir(tmp_path)
    res = shim_ops.pprof_download(t, "go11", "heap")  # default name in the current directory
    assert res["file"] == str(tmp_path / "go1111-heap.pprof")
    assert (tmp_path / "go1111-heap.pprof").stat().st_size == res["bytes"] > 0
    assert (tmp_path / "go1111-heap.pprof").stat().st_mode & 0o777 == 0o600
    # a 404 leaves neither a file nor a temp file, and writes nothing to a stream
    buf = io.BytesIO()
    with pytest.raises(NotFound, match="enable_pprof"):
        shim_ops.pprof_download(t, "go22", "heap", buf)
    with pytest.raises(NotFound, match="enable_pprof"):
        shim_ops.pprof_download(t, "go22", "heap", tmp_path / "x.pprof")
    assert buf.getvalue() == b"" and sorted(os.listdir(tmp_path)) == ["go1111-heap.pprof"]
    # usage errors come before the sandbox is looked up
    for args, kw in [(("heapp",), {}), (("cmdline",), {"seconds": 5}), (("profile",), {"seconds": 0}),
                     (("trace",), {"seconds": True}), (("heap", str(tmp_path)), {}),
                     (("heap", str(tmp_path / "no" / "f")), {}), (("heap", " "), {})]:
        with pytest.raises(UsageError):
            shim_ops.pprof_download(t, "nosuch", *args, **kw)


# -- faults --------------------------------------------------------------------------------
def test_hung_shim_times_out_exit_6(cli, tree):
    r = cli(["--host-root", tree.root, "--request-timeout", "0.5s", "shim", "agent-url", "hang44"])
    assert r.exit_code == 6, r.stderr
    assert "no answer" in r.stderr
    r = cli(["--host-root", tree.root, "--request-timeout", "0.5s", "metrics", "hang44", "-o", "json"])
    assert r.exit_code == 6 and r.json()["code"] == "Timeout"


def test_hung_shim_pprof_times_out_and_leaves_no_file(cli, tree, tmp_path):
    r = cli(["--host-root", tree.root, "--request-timeout", "0.5s", "pprof", "hang44", "heap",
             "-f", str(tmp_path / "heap.pprof")])
    assert r.exit_code == 6, r.stderr
    assert list(tmp_path.iterdir()) == []  # neither the profile nor its temp file


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


def test_pprof_special_file_targets_never_replaced(cli, tree, tmp_path):
    """issue 16 #1: -f on a FIFO, a symlink or a socket is refused (exit 2) and left as it
    was; a character device is written in place (/dev/null works, /dev/full says ENOSPC)."""
    import stat

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "real.pprof"
    target.write_bytes(b"keep")
    link = tmp_path / "link.pprof"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.pprof"
    dangling.symlink_to(tmp_path / "nowhere")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        for path, word in [(fifo, "FIFO"), (link, "symbolic link"), (dangling, "symbolic link"),
                           (tmp_path / "sock", "socket")]:
            r = cli(["--host-root", tree.root, "pprof", "go1111", "heap", "-f", str(path)])
            assert r.exit_code == 2, (path, r.stderr)
            assert word in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
        assert os.readlink(link) == str(target) and target.read_bytes() == b"keep"
        assert os.readlink(dangling) == str(tmp_path / "nowhere")
        assert not (tmp_path / "nowhere").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.pprof", "fifo", "link.pprof",
                                                                "real.pprof", "sock"]
    finally:
        sock.close()
    if os.path.exists("/dev/full"):
        r = cli(["--host-root", tree.root, "pprof", "go1111", "heap", "-f", "/dev/full"])
        assert r.exit_code == 1 and "/dev/full" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)
    r = cli(["--host-root", tree.root, "pprof", "go1111", "heap", "-f", "/dev/null", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["bytes"] > 0 and stat.S_ISCHR(os.lstat("/dev/null").st_mode)


@pytest.mark.parametrize("args,code", [(["metrics", "slow01"], 6), (["top", "--interval", "0.1s"], 6),
                                       # balloon get then tries the other paths: none left, 7
                                       (["balloon", "get", "slow01"], 7)])
def test_trickling_shim_is_bounded_per_call(katactl_bin, args, code):
    """A shim that sends one byte every 0.5 s answers every read in time, and never
    finishes: --request-timeout bounds the whole call (issue 16, finding 5)."""
    with node() as n:
        n.go("slow01", flavour_kw={"fault": "trickle"})
        r = katactl_bin(["--host-root", n.root, "--request-timeout", "1.5s", *args, "-o", "json"], timeout=60)
    assert r.exit_code == code, r.stderr
    assert "no answer within 1.5s" in r.stdout and "Traceback" not in r.stderr


def test_unwritable_audit_log_refuses_the_change_unless_no_audit(cli, tree, tmp_path, monkeypatch):
    """An audit log that cannot be written refuses a mutation before it starts (exit 5,
    nothing sent); --no-audit is the explicit way past it (issue 16, finding 18)."""
    rules = tmp_path / "rules"
    rules.write_text("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -s 10.9.9.9 -j DROP\nCOMMIT\n")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(blocker / "audit.log"))
    srv = tree.server("go2222")
    srv.requests.clear()
    r = cli(["--host-root", tree.root, "-o", "json", "shim", "iptables", "set", "go2222", str(rules)])
    assert r.exit_code == 5, r.stderr
    assert "cannot write the audit log" in r.stderr and "nothing was changed" in r.stderr
    assert not [m for m, _ in srv.requests if m == "PUT"]
    r = cli(["--host-root", tree.root, "--no-audit", "-o", "json", "shim", "iptables", "set", "go2222",
             str(rules)])
    assert r.exit_code == 0, r.stderr
    assert [m for m, _ in srv.requests if m == "PUT"] and not blocker.is_dir()
    # a dry run changes nothing and needs no log
    r = cli(["--host-root", tree.root, "-o", "json", "shim", "iptables", "set", "go2222", str(rules),
             "--dry-run"])
    assert r.exit_code == 0, r.stderr


def test_relative_audit_log_path_is_refused_before_any_change(cli, tree, tmp_path, monkeypatch):
    """KATACTL_AUDIT_LOG=audit.log failed with ENOENT (makedirs of ''; issue 16, 17), then
    wrote under each working directory, one trail per cwd (review 11, finding 8): refused,
    exit 2, nothing sent to the shim, nothing written."""
    rules = tmp_path / "rules"
    rules.write_text("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KATACTL_AUDIT_LOG", "audit.log")
    srv = tree.server("go2222")
    srv.requests.clear()
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go2222", str(rules)])
    assert r.exit_code == 2 and "relative path" in r.stderr, r.stderr
    assert not [m for m, _ in srv.requests if m == "PUT"] and not (tmp_path / "audit.log").exists()


@pytest.mark.parametrize("arg", ["", "  "])
def test_iptables_set_empty_file_argument_says_so(cli, tree, arg):
    """issue 16 #17: 'shim iptables set S ""' said ': No such file or directory'."""
    r = cli(["--host-root", tree.root, "shim", "iptables", "set", "go1111", arg])
    assert r.exit_code == 2 and "empty FILE" in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- runtime-rs's Debug text ------------------------------------------------------------------
_SF = ("special_fields: SpecialFields { unknown_fields: UnknownFields { fields: None }, "
       "cached_size: CachedSize { size: 0 } }")


def test_parse_volume_stats_debug_upstream_shape():
    from katactl.backends.shim import parse_volume_stats_debug
    from katactl.lab.shimserver import volume_stats_debug

    text = (f"Usage: [VolumeUsage {{ available: 966367641, total: 1020702720, used: 54335079, unit: BYTES, {_SF} }}, "
            f"VolumeUsage {{ available: 65525, total: 65536, used: 11, unit: INODES, {_SF} }}] "
            f'Volume Condition: VolumeCondition {{ abnormal: false, message: "OK", {_SF} }}')
    assert text == volume_stats_debug([(966367641, 1020702720, 54335079, 1), (65525, 65536, 11, 2)], False, "OK")
    assert parse_volume_stats_debug(text) == {
        "usage": [{"available": 966367641, "total": 1020702720, "used": 54335079, "unit": "BYTES"},
                  {"available": 65525, "total": 65536, "used": 11, "unit": "INODES"}],
        "volume_condition": {"abnormal": False, "message": "OK"}}
    # an enum value this build does not know prints as its number; unknown fields a newer
    # agent sent print as a map; escapes in the message are Rust's
    odd = ("Usage: [VolumeUsage { available: 1, total: 2, used: 1, unit: 7, special_fields: SpecialFields { "
           "unknown_fields: UnknownFields { fields: Some({5: UnknownValues { fixed32: [], fixed64: [], "
           "varint: [1], length_delimited: [] }}) }, cached_size: CachedSize { size: 0 } } }] "
           'Volume Condition: VolumeCondition { abnormal: true, message: "fs \\"x\\" is \\u{1b}bad\\n", '
           + _SF + " }")
    assert parse_volume_stats_debug(odd) == {"usage": [{"available": 1, "total": 2, "used": 1, "unit": 7}],
                                             "volume_condition": {"abnormal": True, "message": 'fs "x" is \x1bbad\n'}}
    assert parse_volume_stats_debug(volume_stats_debug([], True, 'q"\\\x07')) == {
        "usage": [], "volume_condition": {"abnormal": True, "message": 'q"\\\x07'}}


@pytest.mark.parametrize("text", [
    "", "{}", '{"usage": []}', "Usage: []", "Usage: [] Volume Condition: x",
    "Usage: [1] Volume Condition: VolumeCondition { abnormal: false, message: \"\" }",
    "Usage: [] Volume Condition: VolumeCondition { abnormal: false }",
    "Usage: [] Volume Condition: VolumeCondition { abnormal: false, message: \"\" } trailing",
    "Usage: [VolumeUsage { available: 1, total: 2, used: 3 }] Volume Condition: "
    "VolumeCondition { abnormal: false, message: \"\" }",
    "Usage: [VolumeUsage { available: 1, total: 2, used: -3, unit: BYTES }] Volume Condition: "
    "VolumeCondition { abnormal: false, message: \"\" }",
    "Usage: [VolumeUsage { available: 1, total: 2, used: 3, unit: PETABYTES }] Volume Condition: "
    "VolumeCondition { abnormal: false, message: \"\" }",
    "Usage: [Other { available: 1 }] Volume Condition: VolumeCondition { abnormal: false, message: \"\" }",
    "Usage: [] Volume Condition: VolumeCondition { abnormal: false, message: \"\\q\" }",
    "Usage: " + "[" * 50000 + " Volume Condition: x",
    "Usage: " + "[" * 17 + "]" * 17 + " Volume Condition: VolumeCondition { abnormal: false, message: \"\" }",
    "Usage: [] Volume Condition: VolumeCondition { abnormal: false, message: \"" + "x" * (64 << 10) + "\" }",
    "Usage: [\x00] Volume Condition: VolumeCondition { abnormal: false, message: \"\" }",
    "Usage: [] Volume Condition: VolumeCondition { abnormal: false, message: \"\\u{99999999999999999999}\" }",
    "Usage: [] Volume Condition: VolumeCondition { abnormal: false, message: \"\\u{110000}\" }",
    "Usage: [] Volume Condition: VolumeCondition { abnormal: false, message: \"\\u{}\" }",
])
def test_parse_volume_stats_debug_refuses_other_shapes(text):
    from katactl.backends.shim import parse_volume_stats_debug

    with pytest.raises(ProtocolError) as e:
        parse_volume_stats_debug(text, "shim of sandbox x")
    assert "\n" not in e.value.message and "Debug format" in e.value.message


def test_runtime_rs_stats_in_another_shape_is_a_protocol_error(cli):
    with node() as n:
        p = n.rs("odd002", serve=False)
        layout.write_direct_volume(n.root, VOL, device=DEV)
        n.serve(p, "rs", extra_routes={("POST", "/direct-volume/stats"):
                                       lambda srv, req: Response(200, '{"usage": []}')})
        r = cli(["--host-root", n.root, "shim", "volume", "stats", "odd002", VOL])
    assert r.exit_code == 1 and "not runtime-rs's VolumeStatsResponse Debug format" in r.stderr
    assert r.stderr.count("\n") == 1


def test_runtime_rs_volume_over_ssh(sshd_lab):
    """Through a real SSH transport: mountInfo.json is read on the node, the absolute-form
    stats request and runtime-rs's dropped connection cross the SSH unix-socket relay intact."""
    import base64

    from katactl import shim_ops
    from katactl.backends.ssh import SSHTransport
    from katactl.errors import OperationFailed
    from tests.test_ssh_transport import settings_for

    t = SSHTransport.from_settings("node1", settings_for(sshd_lab))
    root = sshd_lab.nodes["node1"].root
    reg = root / layout.DIRECT_VOLUMES.lstrip("/") / base64.b64encode(VOL.encode()).decode()
    reg.mkdir(parents=True, exist_ok=True)
    (reg / "mountInfo.json").write_text(json.dumps({"volume_type": "block", "device": DEV, "fs_type": "ext4",
                                                    "metadata": {}, "options": []}))
    d = root / "run/test-rs-shim"
    d.mkdir(parents=True, exist_ok=True)
    with ShimServer(str(d / "shim-monitor.sock"), flavour="rs") as srv:
        srv.state.volumes[DEV] = {"total": 3 << 30, "used": 1 << 30, "available": 2 << 30}
        assert shim_ops.direct_volume_device(t, VOL, "rs") == DEV
        c = ShimClient(t, "/run/test-rs-shim/shim-monitor.sock", "rs", timeout=5)
        try:
            st = c.volume_stats(DEV)
            assert st["usage"][0] == {"available": 2 << 30, "total": 3 << 30, "used": 1 << 30, "unit": "BYTES"}
            with pytest.raises(OperationFailed) as e:
                c.volume_stats("/dev/nope")
            assert "its handler failed" in e.value.message
        finally:
            c.close()
    with pytest.raises(NotFound) as e:
        shim_ops.direct_volume_device(t, "/mnt/not-there", "rs")
    assert "/mnt/not-there is not registered on node node1" in e.value.message


def test_pprof_profile_help_names_every_accepted_profile():
    """Review 5 finding 11(c): the PROFILE help listed all but 'symbol'."""
    import typer

    from katactl.backends.shim import PPROF_PROFILES
    from katactl.commands.pprof import app

    cmd = typer.main.get_command(app)
    helptext = next(p for p in cmd.params if p.name == "profile").help or ""
    named = {w.strip(" .,()") for w in helptext.split()}
    assert set(PPROF_PROFILES) <= named, set(PPROF_PROFILES) - named


def test_pprof_help_examples_give_go_tool_pprof_a_file():
    """Review 5 suspicion 1: 'katactl pprof ... -f - | go tool pprof -top -' cannot work:
    google/pprof (internal/driver/fetch.go fetch) opens a non-URL source with os.Open, so '-'
    is a file named '-', and /dev/stdin from a pipe loses up to 8 bytes to isPerfFile's
    header check before the real open. Every example hands it the file -f wrote."""
    from katactl.commands.pprof import pprof

    lines = [ln.strip() for ln in (pprof.__doc__ or "").splitlines() if "go tool pprof" in ln and "katactl" in ln]
    assert lines
    for ln in lines:
        src = ln.split()[-1]
        assert "| go tool pprof" not in ln and src not in ("-", "/dev/stdin") and f"-f {src}" in ln, ln
