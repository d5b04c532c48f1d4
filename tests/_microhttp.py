"""Unix-socket HTTP peers for the node-local HTTP client's tests: a bare server that hands
each connection to a handler (test_unixhttp), and micro_http's answers as the Cloud
Hypervisor / Firecracker API socket writes them (test_clh, test_fc)."""
from __future__ import annotations

import socket
import threading


def unix_server(path: str, handler, accepted: list | None = None) -> socket.socket:
    """Listen on ``path``; each accepted connection goes to ``handler(conn)`` on its own
    thread (appended to ``accepted`` first when given). Close the returned socket to stop."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            if accepted is not None:
                accepted.append(c)
            threading.Thread(target=handler, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def read_request(c) -> bytes:
    """One request's head (up to the blank line); less when the peer closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def micro_http(path: str, server: str, body: bytes) -> tuple[list, socket.socket]:
    """A unix socket answering every request as micro_http writes an answer
    (firecracker-microvm/micro-http src/response.rs: "HTTP/1.1 200 " with no reason, Server,
    Connection: keep-alive, Content-Type, Content-Length; Cloud Hypervisor's server name from
    vmm/src/api/http/mod.rs), the whole body in one write. Returns (accepted sockets, listener)."""
    def serve(c):
        try:
            while b"\r\n\r\n" in read_request(c):
                c.sendall(b"HTTP/1.1 200 \r\nServer: %s\r\nConnection: keep-alive\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (server.encode(), len(body), body))
        except OSError:
            pass
        finally:
            c.close()

    accepted: list = []
    return accepted, unix_server(path, serve, accepted)
