"""A stand-in for the Cloud Hypervisor / Firecracker API socket as micro_http answers (test_clh, test_fc)."""
from __future__ import annotations

import socket
import threading


def micro_http(path: str, server: str, body: bytes) -> tuple[list, object]:
    """A unix socket answering every request as micro_http writes an answer
    (firecracker-microvm/micro-http src/response.rs: "HTTP/1.1 200 " with no reason, Server,
    Connection: keep-alive, Content-Type, Content-Length; Cloud Hypervisor's server name from
    vmm/src/api/http/mod.rs), the whole body in one write. Returns (accepted sockets, listener)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    accepted: list = []

    def serve(c):
        try:
            while True:
                req = b""
                while b"\r\n\r\n" not in req:
                    chunk = c.recv(65536)
                    if not chunk:
                        return
                    req += chunk
                c.sendall(b"HTTP/1.1 200 \r\nServer: %s\r\nConnection: keep-alive\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (server.encode(), len(body), body))
        except OSError:
            pass
        finally:
            c.close()

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            accepted.append(c)
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return accepted, srv

