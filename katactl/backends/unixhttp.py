"""HTTP/1.1 over a node's unix socket, through any NodeTransport.

The socket is whatever NodeTransport.connect_unix returns (a local socket, an
SSH-relayed stream on a remote node, the relay through a pod with --via kube),
and HTTP/1.1 is spoken on it with h11, the sans-IO parser httpcore itself uses:
this module only moves bytes and keeps the kept-alive connections. The shim,
Cloud Hypervisor and Firecracker clients all build on :class:`UnixHttpClient`
(the last two through :class:`JsonUnixClient`), so they work remotely without
knowing it. Not httpx: its client/transport/pool layers cost ~0.75 ms of CPU per
request (``metrics --all``, ``top`` and ``overhead`` make one client per shim)
and ~60 ms of import, for features (TLS, proxies, cookies, redirects, decoding)
a unix socket never uses.

What the peers send (checked against their sources):

- the Go shim (src/runtime/pkg/containerd-shim-v2/shim_management.go) answers
  through net/http, which sends ``Transfer-Encoding: chunked`` for any body a
  handler writes past its 2 KiB buffer without a length: /metrics, pprof;
- runtime-rs's hyper server (crates/runtimes/src/shim_mgmt/server.rs) sends full
  bodies with Content-Length, and drops the connection unanswered when a handler
  fails;
- Cloud Hypervisor and Firecracker (micro_http) always send Content-Length.

Imported lazily by its users; h11 itself only when a request is made, so that
neither loads for --help or completion.
"""
from __future__ import annotations

import contextlib
import json as _json
import re
import select
import socket
import threading
import time
from typing import Iterator

from katactl import __version__
from katactl.errors import OperationFailed, ProtocolError, TimeoutExpired, UnreachableError
from katactl.backends.base import NodeTransport, SocketLike

#: idempotent and body-less: safe to send again when a kept-alive connection turns out closed
_REPLAYABLE = ("GET", "HEAD")
_BODY_METHODS = ("POST", "PUT", "PATCH")
_RECV = 65536
_CHARSET = re.compile(r"""charset\s*=\s*["']?([\w.:-]+)""", re.I)
_USER_AGENT = f"katactl/{__version__}"


class _Timeout(Exception):
    """The call's deadline passed."""


class _Broken(Exception):
    """The peer broke HTTP/1.1 (or closed before a complete answer)."""


class _Lost(Exception):
    """The connection failed under a read or a write (reset, broken pipe)."""


@contextlib.contextmanager
def _errors(what: str, timeout: float, hint: str | None):
    """This module's failures as katactl errors (exit codes 6, 7, 1): the one mapping place.
    Only its own exceptions: a caller's sink failing inside a stream block passes unchanged."""
    try:
        yield
    except _Timeout:
        raise TimeoutExpired(f"{what}: no answer within {timeout:g}s", hint=hint) from None
    except _Broken as e:
        raise ProtocolError(f"{what}: the peer broke the HTTP exchange: {e}") from None
    except _Lost as e:
        raise UnreachableError(f"{what}: connection lost: {e}") from None


class _Conn:
    """One connection: the socket and its h11 state. Every read and write is cut to what the
    call's deadline leaves, so a peer trickling a byte at a time cannot hold a call past it."""

    __slots__ = ("sock", "h", "deadline")

    def __init__(self, sock: SocketLike):
        import h11

        self.sock = sock
        self.h = h11.Connection(h11.CLIENT)
        self.deadline = 0.0

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Timeout()
        return left

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        try:
            self.sock.sendall(data)
        except (socket.timeout, TimeoutError):
            raise _Timeout() from None
        except OSError as e:
            raise _Lost(str(e) or type(e).__name__) from None

    def next_event(self):
        import h11

        h = self.h
        while True:
            try:
                ev = h.next_event()
            except h11.RemoteProtocolError as e:
                raise _Broken(str(e)) from None
            if ev is not h11.NEED_DATA:
                return ev
            self.sock.settimeout(self._left())
            try:
                data = self.sock.recv(_RECV)
            except (socket.timeout, TimeoutError):
                raise _Timeout() from None
            except OSError as e:
                raise _Lost(str(e) or type(e).__name__) from None
            if not data and h.their_state is h11.SEND_RESPONSE:
                # httpcore's words: ShimClient tells runtime-rs's dropped handler by them
                raise _Broken("Server disconnected without sending a response.")
            h.receive_data(data)

    def stale(self) -> bool:
        """Whether an idle kept-alive connection became readable: the server closed it (EOF)
        or sent what nobody asked for. Relays without a file descriptor are trusted."""
        fileno = getattr(self.sock, "fileno", None)
        if fileno is None:
            return False
        try:
            return bool(select.select([fileno()], [], [], 0)[0])
        except (OSError, TypeError, ValueError):
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Response:
    """An answer: ``status_code``, ``headers`` (lower-case names), then the body through
    :meth:`iter_raw` (as it arrives, transfer coding removed) or :meth:`read`."""

    def __init__(self, status_code: int, headers: dict[str, str], conn: _Conn):
        self.status_code = status_code
        self.headers = headers
        self._conn = conn
        self.complete = False
        self._content: bytes | None = None

    def iter_raw(self) -> Iterator[bytes]:
        import h11

        while not self.complete:
            ev = self._conn.next_event()
            t = type(ev)
            if t is h11.Data:
                yield bytes(ev.data)
            elif t is h11.EndOfMessage:
                self.complete = True

    def read(self) -> bytes:
        if self._content is None:
            self._content = b"".join(self.iter_raw())
        return self._content

    @property
    def content(self) -> bytes:
        return self.read()

    @property
    def text(self) -> str:
        m = _CHARSET.search(self.headers.get("content-type", ""))
        try:
            return self.content.decode(m.group(1) if m else "utf-8", "replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", "replace")

    def json(self):
        """The body as JSON; ValueError when it is not."""
        return _json.loads(self.content)


class UnixHttpClient:
    """HTTP/1.1 to ``socket_path`` on the node, ``timeout`` seconds per call (connect, send
    and the whole answer together). Kept-alive connections are reused; one that fails before
    any answer is retried once on a fresh connection when the request is replayable (the server
    may close an idle connection just as we reuse it). Safe to share between threads."""

    def __init__(self, transport: NodeTransport, socket_path: str, timeout: float):
        self.transport = transport
        self.path = socket_path
        self.timeout = float(timeout)
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _take(self, deadline: float, fresh: bool) -> tuple[_Conn, bool]:
        """(a connection, whether it was kept alive from an earlier call)."""
        while not fresh:
            with self._lock:
                c = self._idle.pop() if self._idle else None
            if c is None:
                break
            if not c.stale():
                c.deadline = deadline
                return c, True
            c.close()
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Timeout()
        # the transport's own errors (no socket, nobody listening: exit 7) pass as they are
        c = _Conn(self.transport.connect_unix(self.path, left))
        c.deadline = deadline
        return c, False

    def _give_back(self, c: _Conn, r: Response) -> None:
        import h11

        h = c.h
        # bytes past the complete answer (trailing_data: h11's unparsed buffer, and whether EOF
        # came) would be read as the next request's answer: such a connection is not reused
        if (r.complete and h.our_state is h11.DONE and h.their_state is h11.DONE
                and not h.trailing_data[0] and not h.trailing_data[1]):
            h.start_next_cycle()
            with self._lock:
                if not self._closed:
                    self._idle.append(c)
                    return
        c.close()

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, what: str, timeout: float | None = None,
               hint: str | None = None, content: bytes | str | None = None, json=None,
               headers: dict[str, str] | None = None, absolute_target: bool = False
               ) -> Iterator[Response]:
        """The answer's head; its body is read inside the block. ``url`` is the path (and
        query); ``absolute_target`` sends it in absolute form (``http://localhost/path``).
        Failures inside the block (reading the body included) are katactl errors naming
        ``what``: timeouts exit 6 (with ``hint``), a lost connection 7, a broken answer 1."""
        import h11

        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        if json is not None:
            content = _json.dumps(json, separators=(",", ":")).encode()
        elif isinstance(content, str):
            content = content.encode()
        hdrs = [("Host", "localhost"), ("User-Agent", _USER_AGENT), ("Accept", "*/*")]
        if json is not None:
            hdrs.append(("Content-Type", "application/json"))
        if content is not None or method in _BODY_METHODS:
            hdrs.append(("Content-Length", str(len(content or b""))))
        hdrs.extend((headers or {}).items())
        target = ("http://localhost" + url) if absolute_target else url
        with _errors(what, t, hint):
            for attempt in (0, 1):
                c, reused = self._take(deadline, fresh=attempt > 0)
                try:
                    try:
                        h = c.h
                        data = h.send(h11.Request(method=method, target=target, headers=hdrs))
                        if content:
                            data += h.send(h11.Data(data=content))
                        data += h.send(h11.EndOfMessage())
                    except h11.LocalProtocolError as e:  # a request h11 refuses to write
                        raise _Broken(str(e)) from None
                    c.send(data)
                    ev = c.next_event()
                    while type(ev) is h11.InformationalResponse:  # 1xx: the answer follows
                        ev = c.next_event()
                    break
                except (_Broken, _Lost):
                    c.close()
                    if attempt or not reused or method not in _REPLAYABLE:
                        raise
                except BaseException:
                    c.close()
                    raise
            r = Response(ev.status_code, {k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers}, c)
            try:
                yield r
            except BaseException:
                c.close()
                raise
            self._give_back(c, r)

    def request(self, method: str, url: str, *, what: str, limit: int | None = None, **kw) -> Response:
        """:meth:`stream` with the whole body read; more than ``limit`` bytes (declared by
        Content-Length, or as they come) is a ProtocolError (exit 1) and the connection closed."""
        with self.stream(method, url, what=what, **kw) as r:
            if limit is None:
                r.read()
                return r
            declared = r.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ProtocolError(f"{what}: answered {int(declared)} bytes, more than the {_size(limit)} limit")
            chunks, n = [], 0
            for chunk in r.iter_raw():
                n += len(chunk)
                if n > limit:
                    raise ProtocolError(f"{what}: answered more than the {_size(limit)} limit")
                chunks.append(chunk)
            r._content = b"".join(chunks)
        return r


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


class JsonUnixClient:
    """Base of the JSON-over-unix-socket API clients (Cloud Hypervisor, Firecracker).

    A subclass keeps only its protocol: ``prefix`` (prepended to every
    endpoint), ``json_ok`` (statuses whose body is JSON; 204 is always None)
    and ``_fail(what, response)``, which raises the hypervisor's own error.
    """

    prefix = ""
    json_ok: tuple[int, ...] = (200,)
    #: the most an answer may be, error bodies included. The largest real one is Cloud
    #: Hypervisor's vm.info (vmm/src/api/mod.rs VmInfoResponse: the whole VmConfig and the
    #: device_tree, ~220 bytes a device: a few KiB, ~100 KiB with hundreds of devices);
    #: Firecracker's are under 1 KiB. micro_http (src/response.rs) declares any length up to
    #: 2 GiB (an i32 Content-Length), so the cap is ours; it also bounds what is parsed after
    #: the deadline-bounded read.
    answer_limit = 16 << 20

    def __init__(self, transport: NodeTransport, socket_path: str, timeout: float = 5.0):
        self.path = socket_path
        self._c = UnixHttpClient(transport, socket_path, timeout)

    @property
    def timeout(self) -> float:
        """Each call's bound (--request-timeout); a wait may lower it for its last polls."""
        return self._c.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._c.timeout = seconds

    def close(self):
        self._c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, ep: str, body: dict | None = None):
        what = f"{self.path} {method} {ep}"
        r = self._c.request(method, self.prefix + ep, what=what, json=body, limit=self.answer_limit)
        if r.status_code == 204:
            return None
        if r.status_code in self.json_ok:
            try:
                return r.json()
            except ValueError:
                raise ProtocolError(f"{what}: answer is not JSON") from None
        self._fail(what, r)

    def _fail(self, what: str, r: Response) -> None:
        raise OperationFailed(f"{what}: answered {r.status_code}")
