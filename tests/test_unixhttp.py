"""HTTP over a node's unix socket: keep-alive reuse after the server closes, peer resets."""
import socket
import time
import threading

import pytest

from katactl.backends.local import LocalTransport
from katactl.backends.unixhttp import request, unix_http_client
from katactl.errors import ProtocolError, TimeoutExpired, UnreachableError


def _server(path, handler):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def _read_request(c):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_reuses_nothing_after_server_closed_keepalive(tmp_path):
    """The server answers keep-alive, then closes without telling: the next request must still work."""
    def handler(c):
        _read_request(c)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        c.close()  # closes although it said nothing about Connection: close

    srv = _server(str(tmp_path / "s.sock"), handler)
    client = unix_http_client(LocalTransport(str(tmp_path)), "/s.sock", 2)
    for _ in range(40):
        assert request(client, "GET", "/x", what="test").text == "ok"
    srv.close()


def test_reset_and_silence_map_to_exit_codes(tmp_path):
    def reset(c):
        _read_request(c)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()

    hang_conns = []
    srv1 = _server(str(tmp_path / "reset.sock"), reset)
    srv2 = _server(str(tmp_path / "hang.sock"), hang_conns.append)
    t = LocalTransport(str(tmp_path))
    with pytest.raises((ProtocolError, UnreachableError)):
        request(unix_http_client(t, "/reset.sock", 2), "GET", "/", what="shim")
    with pytest.raises(TimeoutExpired):
        request(unix_http_client(t, "/hang.sock", 0.3), "GET", "/", what="shim")
    srv1.close()
    srv2.close()


def _trickle(c):
    """A peer that answers one byte every 0.2 s, forever: every read gets data in
    time, the answer never ends (issue 16, finding 5)."""
    _read_request(c)
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

    srv = _server(str(tmp_path / "slow.sock"), _trickle)
    t = LocalTransport(str(tmp_path))
    calls = [
        lambda: request(unix_http_client(t, "/slow.sock", 1), "GET", "/", what="shim"),
        lambda: ClhClient(t, "/slow.sock", timeout=1).ping(),
        lambda: FcClient(t, "/slow.sock", timeout=1).balloon(),
        lambda: ShimClient(t, "/slow.sock", timeout=1).metrics_text(),
        lambda: ShimClient(t, "/slow.sock", timeout=1).capabilities(),
    ]
    for call in calls:
        box = _bounded(call)
        assert isinstance(box.get("error"), TimeoutExpired), box
    srv.close()
