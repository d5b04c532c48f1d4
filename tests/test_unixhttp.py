"""HTTP over a node's unix socket: keep-alive reuse after the server closes, peer resets."""
import socket
import time
import threading

import pytest

from katactl.backends.local import LocalTransport
from katactl.backends.unixhttp import UnixHttpClient
from katactl.errors import ProtocolError, TimeoutExpired, UnreachableError
from tests._microhttp import read_request, unix_server


def test_reuses_nothing_after_server_closed_keepalive(tmp_path):
    """The server answers keep-alive, then closes without telling: the next request must still work."""
    def handler(c):
        read_request(c)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        c.close()  # closes although it said nothing about Connection: close

    srv = unix_server(str(tmp_path / "s.sock"), handler)
    client = UnixHttpClient(LocalTransport(str(tmp_path)), "/s.sock", 2)
    for _ in range(40):
        assert client.request("GET", "/x", what="test").text == "ok"
    srv.close()


def test_reset_and_silence_map_to_exit_codes(tmp_path):
    def reset(c):
        read_request(c)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()

    hang_conns = []
    srv1 = unix_server(str(tmp_path / "reset.sock"), reset)
    srv2 = unix_server(str(tmp_path / "hang.sock"), hang_conns.append)
    t = LocalTransport(str(tmp_path))
    with pytest.raises((ProtocolError, UnreachableError)):
        UnixHttpClient(t, "/reset.sock", 2).request("GET", "/", what="shim")
    with pytest.raises(TimeoutExpired):
        UnixHttpClient(t, "/hang.sock", 0.3).request("GET", "/", what="shim")
    srv1.close()
    srv2.close()


def _trickle(c):
    """A peer that answers one byte every 0.2 s, forever: every read gets data in
    time, the answer never ends (issue 16, finding 5)."""
    read_request(c)
    try:
        for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
            c.sendall(bytes([b]))
            time.sleep(0.2)
    except OSError:
        pass


def _bounded(fn, limit=60):
    """Run fn on a thread; what it raised (or returned) if it ends within ``limit``
    seconds, else fail: a hang guard, not a timing assertion."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), "the call never ended: the trickle held it past every deadline"
    return box


def test_trickling_peer_is_bounded_per_call_not_per_read(tmp_path):
    from katactl.backends.clh import ClhClient
    from katactl.backends.fc import FcClient
    from katactl.backends.shim import ShimClient

    srv = unix_server(str(tmp_path / "slow.sock"), _trickle)
    t = LocalTransport(str(tmp_path))
    calls = [
        lambda: UnixHttpClient(t, "/slow.sock", 1).request("GET", "/", what="shim"),
        lambda: ClhClient(t, "/slow.sock", timeout=1).ping(),
        lambda: FcClient(t, "/slow.sock", timeout=1).balloon(),
        lambda: ShimClient(t, "/slow.sock", timeout=1).metrics_text(),
        lambda: ShimClient(t, "/slow.sock", timeout=1).capabilities(),
    ]
    for call in calls:
        box = _bounded(call)
        assert isinstance(box.get("error"), TimeoutExpired), box
    srv.close()


def _raw_get(path, target="/metrics"):
    """The raw bytes a server answers to one GET (it closes after: Connection: close)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data


def test_go_shim_chunked_metrics_on_one_kept_alive_connection(tmp_path):
    """The Go shim's /metrics is written without a length, so net/http sends it chunked
    (the lab server does as net/http does); the client decodes it and reuses the connection."""
    from katactl.backends.shim import ShimClient
    from katactl.lab.shimserver import ShimServer

    path = str(tmp_path / "shim-monitor.sock")
    with ShimServer(path, flavour="go") as srv:
        head = _raw_get(path).split(b"\r\n\r\n", 1)[0].lower()
        assert b"transfer-encoding: chunked" in head and b"content-length" not in head
        accepted = []
        srv._srv.get_request = lambda real=srv._srv.get_request: accepted.append(1) or real()
        with ShimClient(LocalTransport(), path) as c:
            texts = [c.metrics_text() for _ in range(5)]
        want = srv.metrics_text()
    assert len(want) > 4096 and all("kata_shim_threads" in t for t in texts)
    assert texts[-1].splitlines()[0] == want.splitlines()[0]
    assert len(accepted) == 1


def _answer(head: bytes, body: bytes, *, then=None):
    def handler(c):
        read_request(c)
        c.sendall(head + b"\r\n\r\n" + body)
        if then:
            then(c)
        c.close()
    return handler


@pytest.mark.parametrize("head,body,said", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100", b"kata_x 1\n", "received 9 bytes, expected 100"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", b"800\r\nkata_x 1\n", "incomplete chunked read"),
])
def test_peer_closing_mid_body_is_a_protocol_error(tmp_path, head, body, said):
    from katactl.backends.fc import FcClient
    from katactl.backends.shim import ShimClient

    srv = unix_server(str(tmp_path / "s.sock"), _answer(head, body))
    t = LocalTransport(str(tmp_path))
    for call in (lambda: ShimClient(t, "/s.sock", timeout=5).metrics_text(),
                 lambda: ShimClient(t, "/s.sock", "rs", timeout=5).metrics_text(),
                 lambda: FcClient(t, "/s.sock", timeout=5).balloon()):
        with pytest.raises(ProtocolError, match="the peer broke the HTTP exchange: peer closed "
                                                "connection without sending complete message body") as e:
            call()
        assert said in str(e.value)
    srv.close()


def _trickle_body(c):
    """A complete head, then the body a byte every 0.2 s: every read gets data in time."""
    read_request(c)
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(10_000):
            c.sendall(b"k")
            time.sleep(0.2)
    except OSError:
        pass


def test_trickling_body_is_bounded_by_the_call_deadline(tmp_path):
    import io

    from katactl.backends.shim import ShimClient

    srv = unix_server(str(tmp_path / "slow.sock"), _trickle_body)
    t = LocalTransport(str(tmp_path))
    sink = io.BytesIO()
    for call in (lambda: ShimClient(t, "/slow.sock", timeout=1).metrics_text(),
                 lambda: ShimClient(t, "/slow.sock", timeout=1).call("GET", "/debug/pprof/heap", sink=sink),
                 lambda: UnixHttpClient(t, "/slow.sock", 1).request("GET", "/", what="fc")):
        box = _bounded(call)
        assert isinstance(box.get("error"), TimeoutExpired), box
        assert "no answer within 1s" in str(box["error"])
    assert sink.getvalue().startswith(b"k")  # streamed as it came, then cut by the deadline
    srv.close()


def test_get_is_replayed_when_a_kept_alive_connection_drops_it(tmp_path):
    """The server answers one request per connection, keeps it open, and drops the next
    request unanswered (a server closing an idle connection as we reuse it). A GET is sent
    again on a fresh connection; a PUT never is (it may have been applied)."""
    seen = []

    def one_per_connection(c):
        req = read_request(c)
        seen.append(req.split(b" ", 1)[0])
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nkata_x 1\n")
        seen.append(read_request(c).split(b" ", 1)[0])  # read, never answered
        c.close()

    from katactl.backends.shim import ShimClient

    srv = unix_server(str(tmp_path / "s.sock"), one_per_connection)
    with ShimClient(LocalTransport(str(tmp_path)), "/s.sock", timeout=5) as c:
        assert c.metrics_text() == "kata_x 1\n"
        assert c.metrics_text() == "kata_x 1\n"
        assert seen[:3] == [b"GET", b"GET", b"GET"]
        with pytest.raises(ProtocolError, match="disconnected without sending a response"):
            c.iptables_set("*filter\nCOMMIT\n")
    assert seen.count(b"PUT") == 1
    srv.close()


def test_surplus_after_a_complete_answer_is_never_the_next_answer(tmp_path):
    """A peer writes more than its Content-Length in one write: the surplus looks like a
    second answer. The kept-alive connection is closed, not reused: the next request goes on
    a fresh connection and gets its own answer (review2 u2.py)."""
    conns = []
    after = []

    def handler(c):
        conns.append(c)
        read_request(c)
        if len(conns) == 1:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                      b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED")
            after.append(read_request(c))  # b"": we closed it rather than ask again
        else:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            read_request(c)
        c.close()

    srv = unix_server(str(tmp_path / "s.sock"), handler)
    with UnixHttpClient(LocalTransport(str(tmp_path)), "/s.sock", 5) as client:
        assert client.request("GET", "/metrics", what="t").content == b"first"
        assert client.request("GET", "/agent-url", what="t").content == b"second"
    assert len(conns) == 2
    srv.close()


def test_limit_counts_a_body_without_content_length(tmp_path):
    """request(limit=): a chunked answer (no length to check first) is counted as it comes
    and cut past the limit: exit 1 naming the limit, the connection not reused."""
    served = []

    def chunked(c):
        served.append(c)
        read_request(c)
        try:
            c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(64):
                c.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
            c.sendall(b"0\r\n\r\n")
            read_request(c)
        except OSError:
            pass
        c.close()

    srv = unix_server(str(tmp_path / "s.sock"), chunked)
    with UnixHttpClient(LocalTransport(str(tmp_path)), "/s.sock", 5) as client:
        with pytest.raises(ProtocolError, match=r"^t: answered more than the 32 KiB limit$") as e:
            client.request("GET", "/", what="t", limit=32 << 10)
        assert e.value.exit_code == 1
        assert len(client.request("GET", "/", what="t", limit=64 << 10).content) == 64 << 10
    assert len(served) == 2
    srv.close()
