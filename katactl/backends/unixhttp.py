"""HTTP/1.1 over a node's unix socket, through any NodeTransport.

httpx is given a httpcore NetworkBackend whose "unix socket" is whatever
NodeTransport.connect_unix returns: a local socket, or an SSH-relayed stream
on a remote node. The shim, Cloud Hypervisor and Firecracker clients all
build on this one function (the last two through JsonUnixClient), so they
work remotely without knowing it.

Imported lazily: httpx must not load for --help or completion.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

from katactl.errors import OperationFailed, ProtocolError, TimeoutExpired, UnreachableError
from katactl.backends.base import NodeTransport


_deadline = threading.local()


@contextlib.contextmanager
def call_deadline(seconds: float):
    """Bound everything this thread reads or writes on unix_http_client sockets
    inside the block to ``seconds`` in all (an inner block never extends an outer
    one). httpx's timeouts bound each read: a peer trickling a byte at a time
    would otherwise hold a call forever."""
    prev = getattr(_deadline, "at", None)
    at = time.monotonic() + seconds
    _deadline.at = at if prev is None else min(prev, at)
    try:
        yield
    finally:
        _deadline.at = prev


def _left(timeout: float | None) -> float | None:
    """``timeout`` cut to what the call's deadline leaves; 0 when it has passed."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = max(0.0, at - time.monotonic())
    return left if timeout is None else min(timeout, left)


_tls_lock = threading.Lock()
_tls_ctx = None


def _no_tls():
    """One SSLContext for every unix-socket client of the process: httpx's transport builds
    one per client (verify=False still makes a new ssl.SSLContext, ~0.7 ms of CPU) although
    plain HTTP over a unix socket never uses it; ``metrics --all`` makes a client per shim."""
    global _tls_ctx
    with _tls_lock:
        if _tls_ctx is None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            _tls_ctx = ctx
        return _tls_ctx


def unix_http_client(transport: NodeTransport, socket_path: str, timeout: float):
    """An httpx.Client talking to ``socket_path`` on the node, base URL http://localhost.

    Every request has ``timeout``; a peer that accepts and never answers
    raises katactl.errors.TimeoutExpired via ``request()`` below. Inside
    :func:`call_deadline` (``request()`` and ShimClient.call) the whole
    exchange is bounded too, not only each read.
    """
    import httpcore
    import httpx

    class _Stream(httpcore.NetworkStream):
        def __init__(self, sock):
            self._sock = sock

        def read(self, max_bytes, timeout=None):
            timeout = _left(timeout)
            if timeout == 0:
                raise httpcore.ReadTimeout("the call's deadline passed")
            self._sock.settimeout(timeout)
            try:
                return self._sock.recv(max_bytes)
            except (socket.timeout, TimeoutError) as e:
                raise httpcore.ReadTimeout(str(e) or "read timed out") from e
            except OSError as e:  # reset, broken pipe: the peer went away
                raise httpcore.ReadError(str(e) or type(e).__name__) from e

        def write(self, buffer, timeout=None):
            timeout = _left(timeout)
            if timeout == 0:
                raise httpcore.WriteTimeout("the call's deadline passed")
            self._sock.settimeout(timeout)
            try:
                self._sock.sendall(buffer)
            except (socket.timeout, TimeoutError) as e:
                raise httpcore.WriteTimeout(str(e) or "write timed out") from e
            except OSError as e:
                raise httpcore.WriteError(str(e) or type(e).__name__) from e

        def close(self):
            self._sock.close()

        def get_extra_info(self, info):
            # httpcore asks "is_readable" before reusing a pooled connection: an idle
            # connection that is readable has been closed by the server (EOF).
            if info == "is_readable":
                try:
                    import select

                    return bool(select.select([self._sock], [], [], 0)[0])
                except (OSError, TypeError, ValueError):  # no fileno (some relays)
                    return False
            return None

    class _Backend(httpcore.NetworkBackend):
        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            left = _left(timeout or 5.0)
            if left == 0:
                raise httpcore.ConnectTimeout("the call's deadline passed")
            return _Stream(transport.connect_unix(socket_path, left))

        def connect_tcp(self, *a, **kw):  # pragma: no cover - never used
            raise httpcore.ConnectError("only unix sockets are supported")

    class _Transport(httpx.HTTPTransport):
        def __init__(self):
            super().__init__(verify=_no_tls(), trust_env=False)
            # httpx does not take a network backend; give its pool ours.
            self._pool = httpcore.ConnectionPool(uds=socket_path, network_backend=_Backend(),
                                                 max_connections=4)

    return httpx.Client(transport=_Transport(), base_url="http://localhost",
                        timeout=timeout, trust_env=False)


@contextlib.contextmanager
def http_errors(what: str, timeout: float, *, hint: str | None = None):
    """Map httpx/httpcore failures inside the block to katactl errors (one place)."""
    import httpx

    try:
        yield
    except httpx.TimeoutException:
        raise TimeoutExpired(f"{what}: no answer within {timeout:g}s", hint=hint) from None
    except httpx.ConnectError as e:
        raise UnreachableError(f"{what}: {e}") from None
    except (httpx.RemoteProtocolError, httpx.LocalProtocolError) as e:
        raise ProtocolError(f"{what}: the peer broke the HTTP exchange: {e}") from None
    except (httpx.ReadError, httpx.WriteError) as e:
        raise UnreachableError(f"{what}: connection lost: {e}") from None
    except httpx.TransportError as e:
        raise UnreachableError(f"{what}: {e}") from None


def request(client, method: str, url: str, *, what: str, **kw):
    """client.request with katactl's error mapping (timeouts -> exit 6, refused -> 7).

    A GET on a pooled keep-alive connection can race the server closing it
    (the FIN arrives after we reused it); such a request is retried once on a
    fresh connection. Non-idempotent methods are never retried.
    """
    import httpx

    retryable = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
    t = client.timeout.read or 0
    with http_errors(what, t), call_deadline(t) if t else contextlib.nullcontext():
        if method.upper() in ("GET", "HEAD"):
            try:
                return client.request(method, url, **kw)
            except retryable:
                pass
        return client.request(method, url, **kw)


class JsonUnixClient:
    """Base of the JSON-over-unix-socket API clients (Cloud Hypervisor, Firecracker).

    A subclass keeps only its protocol: ``prefix`` (prepended to every
    endpoint), ``json_ok`` (statuses whose body is JSON; 204 is always None)
    and ``_fail(what, response)``, which raises the hypervisor's own error.
    """

    prefix = ""
    json_ok: tuple[int, ...] = (200,)

    def __init__(self, transport: NodeTransport, socket_path: str, timeout: float = 5.0):
        self.path = socket_path
        self._c = unix_http_client(transport, socket_path, timeout)

    def close(self):
        self._c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, ep: str, body: dict | None = None):
        what = f"{self.path} {method} {ep}"
        kw = {"json": body} if body is not None else {}
        r = request(self._c, method, self.prefix + ep, what=what, **kw)
        if r.status_code == 204:
            return None
        if r.status_code in self.json_ok:
            try:
                return r.json()
            except ValueError:
                raise ProtocolError(f"{what}: answer is not JSON") from None
        self._fail(what, r)

    def _fail(self, what: str, r) -> None:
        raise OperationFailed(f"{what}: answered {r.status_code}")
