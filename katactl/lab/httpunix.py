"""A tiny threaded HTTP/1.1 server on a unix socket (stdlib only), for lab API servers."""
from __future__ import annotations

import http.server
import json
import os
import socketserver
import threading


class UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    """http.server.HTTPServer on a unix socket (HTTPServer adds only a server_bind for
    (host, port) addresses, replaced here)."""

    daemon_threads = True
    allow_reuse_address = False

    def server_bind(self):
        path = self.server_address
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.socket.bind(path)
        self.server_name, self.server_port = "localhost", 0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "katactl-lab"
    _body: bytes | None = None

    def address_string(self):  # unix sockets have no peer address
        return "unix"

    def log_message(self, fmt, *args):  # quiet
        pass

    def body(self) -> bytes:
        if self._body is None:
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = 0
            self._body = self.rfile.read(n) if n > 0 else b""
        return self._body

    def json_body(self):
        raw = self.body()
        if not raw:
            return None
        return json.loads(raw)

    def send(self, code: int, body: bytes | str | dict | list | None = None,
             ctype: str = "application/json") -> None:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body or b""
        self.send_response(code)
        if data or code not in (204,):
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _route(self, method: str) -> None:
        self._body = None
        self.body()  # always consume the request body: the connection stays usable
        self.route(method)

    def route(self, method: str) -> None:  # override
        self.send(404, "URL NOT FOUND", "text/plain")

    def do_GET(self):
        self._route("GET")

    def do_PUT(self):
        self._route("PUT")

    def do_PATCH(self):
        self._route("PATCH")

    def do_POST(self):
        self._route("POST")

    def do_DELETE(self):
        self._route("DELETE")


def serve(path: str, handler_cls, **attrs) -> UnixHTTPServer:
    """Bind ``path`` and serve on a daemon thread; attrs are set on the server."""
    srv = UnixHTTPServer(path, handler_cls)
    for k, v in attrs.items():
        setattr(srv, k, v)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                         name=f"http:{os.path.basename(path)}", daemon=True)
    t.start()
    srv._thread = t  # type: ignore[attr-defined]
    return srv


def shutdown(srv: UnixHTTPServer) -> None:
    srv.shutdown()
    srv.server_close()
    path = srv.server_address
    if isinstance(path, (str, bytes)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
