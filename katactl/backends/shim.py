"""Client for the Kata shim management API (``shim-monitor.sock``), both runtimes.

HTTP/1.1 over the node's unix socket through any NodeTransport (httpx, lazily
imported), a timeout on every call. It speaks each flavour's dialect:

- runtime-rs is method-strict (GET /metrics, /agent-url; POST
  /direct-volume/*) and answers everything else ``404 URL NOT FOUND``;
- the Go shim accepts any method on most paths, answers 400 on
  ``/direct-volume/stats`` without ``path``, 501 on a wrong iptables method,
  and serves ``/debug/pprof`` only with ``enable_pprof``;
- resize bodies differ: Go ``{"VolumePath", "Size"}``, RS
  ``{"volume_guest_path", "size"}``.
"""
from __future__ import annotations

import json
import urllib.parse
from typing import IO, Protocol

from katactl.errors import NotFound, OperationFailed, ProtocolError, UsageError
from katactl.backends.base import NodeTransport

METRICS_LIMIT = 16 << 20   # a real shim's /metrics is ~100 KiB; refuse absurd bodies
TEXT_LIMIT = 4 << 20
#: one limit for iptables rules in both directions: what ``set`` accepts, ``get``
#: must be able to read back (a guest ruleset is KiBs; a node's kube-proxy dump is MiBs)
IPTABLES_LIMIT = 8 << 20
PPROF_PROFILES = ("heap", "goroutine", "profile", "trace", "allocs", "block", "mutex",
                  "threadcreate", "cmdline", "symbol")



class BytesSink(Protocol):
    """Where a streamed answer goes: a binary file, or anything with its write()."""

    def write(self, b: bytes, /) -> int: ...

class ShimClient:
    """Talk to one sandbox's shim. ``flavour`` is the sandbox runtime: "go" or "rs"."""

    def __init__(self, transport: NodeTransport, socket_path: str, flavour: str = "go", *, timeout: float = 10.0,
                 sandbox_id: str | None = None):
        if flavour not in ("go", "rs"):
            raise ValueError(f"unknown shim flavour {flavour!r}")
        self.transport = transport
        self.socket_path = socket_path
        self.flavour = flavour
        self.timeout = float(timeout)
        self.what = f"shim of sandbox {sandbox_id[:12]}" if sandbox_id else f"shim at {socket_path}"
        self._client = None

    @classmethod
    def for_sandbox(cls, transport: NodeTransport, sb, *, timeout: float = 10.0) -> "ShimClient":
        return cls(transport, sb.shim_socket, sb.runtime, timeout=timeout, sandbox_id=sb.id)

    # -- plumbing ----------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from katactl.backends.unixhttp import unix_http_client

            self._client = unix_http_client(self.transport, self.socket_path, self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method: str, url: str, *, limit: int = TEXT_LIMIT, timeout: float | None = None,
             sink: BytesSink | None = None, **kw) -> tuple[int, bytes]:
        """(status, body) with the body capped at ``limit`` bytes, or, for a 2xx
        answer, streamed to ``sink`` (then body is empty)."""
        import httpx

        from katactl.backends.unixhttp import call_deadline, http_errors

        t = self.timeout if timeout is None else timeout
        hint = ("the shim accepts connections but does not answer in time; is it stuck? "
                "(--request-timeout raises the limit)")
        with http_errors(f"{self.what}: {method} {url}", t, hint=hint), call_deadline(t), \
                self.client.stream(method, url, timeout=httpx.Timeout(t), **kw) as r:
            declared = r.headers.get("content-length")
            if sink is None and declared and declared.isdigit() and int(declared) > limit:
                raise ProtocolError(f"{self.what}: {url} answered {int(declared)} bytes, "
                                    f"more than the {limit >> 20} MiB limit")
            chunks, n = [], 0
            if not 200 <= r.status_code < 300:
                sink = None  # an error page is the answer's reason, never the caller's data
            for chunk in r.iter_raw():
                n += len(chunk)
                if sink is not None:
                    sink.write(chunk)
                    continue
                if n > limit:
                    raise ProtocolError(f"{self.what}: {url} answered more than the "
                                        f"{limit >> 20} MiB limit")
                chunks.append(chunk)
            return r.status_code, b"".join(chunks)

    def _check(self, status: int, body: bytes, url: str, ok=(200,)) -> bytes:
        if status in ok:
            return body
        text = body[:300].decode("utf-8", "replace").strip()
        if status == 404:
            raise NotFound(f"{self.what}: {url} is not served by this shim ({self.flavour} runtime): "
                           f"404 {text or 'not found'}")
        if status == 501:
            raise OperationFailed(f"{self.what}: {url}: method not implemented (501)")
        raise OperationFailed(f"{self.what}: {url} answered {status}: {text or '(empty body)'}")

    # -- endpoints -------------------------------------------------------------------
    def metrics_text(self, limit: int = METRICS_LIMIT) -> str:
        status, body = self.call("GET", "/metrics", limit=limit)
        return self._check(status, body, "/metrics").decode("utf-8", "replace")

    def agent_url(self) -> str:
        status, body = self.call("GET", "/agent-url")
        return self._check(status, body, "/agent-url").decode("utf-8", "replace").strip()

    def iptables_get(self, v6: bool = False) -> str:
        url = "/ip6tables" if v6 else "/iptables"
        status, body = self.call("GET", url, limit=IPTABLES_LIMIT)
        return self._check(status, body, url).decode("utf-8", "replace")

    def iptables_set(self, rules: str, v6: bool = False) -> None:
        url = "/ip6tables" if v6 else "/iptables"
        data = rules.encode("utf-8")
        if len(data) > IPTABLES_LIMIT:
            # never send what a later get could not read back
            raise UsageError(f"iptables rules of {len(data)} bytes: more than the "
                             f"{IPTABLES_LIMIT >> 20} MiB limit")
        status, body = self.call("PUT", url, content=data,
                                 headers={"Content-Type": "text/plain"})
        self._check(status, body, url, ok=(200, 204))

    def volume_stats(self, volume_path: str) -> dict:
        if not volume_path:
            raise UsageError("empty volume path")
        url = "/direct-volume/stats?path=" + urllib.parse.quote(volume_path, safe="")
        method = "GET" if self.flavour == "go" else "POST"
        status, body = self.call(method, url)
        body = self._check(status, body, "/direct-volume/stats")
        try:
            obj = json.loads(body)
        except ValueError:
            raise ProtocolError(f"{self.what}: /direct-volume/stats did not answer JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.what}: /direct-volume/stats answered {type(obj).__name__}")
        return obj

    def volume_resize(self, volume_path: str, size: int) -> None:
        if self.flavour == "go":
            payload = {"VolumePath": volume_path, "Size": int(size)}
        else:
            payload = {"volume_guest_path": volume_path, "size": int(size)}
        status, body = self.call("POST", "/direct-volume/resize", content=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
        self._check(status, body, "/direct-volume/resize", ok=(200, 204))

    def pprof(self, profile: str, sink: IO[bytes], *, seconds: int | None = None) -> int:
        """Stream /debug/pprof/<profile> into sink (nothing is written unless the
        shim answers 2xx); return bytes written."""
        if profile not in PPROF_PROFILES:
            raise UsageError(f"unknown pprof profile {profile!r} (choose from {', '.join(PPROF_PROFILES)})")
        if self.flavour != "go":
            raise NotFound(f"{self.what}: runtime-rs shims have no pprof endpoint (Go runtime only)")
        q = {}
        if seconds is not None:
            q["seconds"] = str(int(seconds))
        url = f"/debug/pprof/{profile}" + ("?" + urllib.parse.urlencode(q) if q else "")
        wait = self.timeout + (seconds or (30 if profile == "profile" else 1 if profile == "trace" else 0))

        counted = _CountingSink(sink)
        status, body = self.call("GET", url, timeout=wait, sink=counted)
        if status == 404:
            raise NotFound(f"{self.what}: pprof is not enabled on this shim (404 for {url}); set "
                           "enable_pprof = true in the [runtime] section of the Kata configuration, "
                           "or the pod annotation io.katacontainers.config.runtime.enable_pprof=true, "
                           "and start the pod again")
        self._check(status, body, url)
        return counted.n

    def capabilities(self) -> dict | None:
        """GET /ext/v1/capabilities (the katactl shim extension); None when not served."""
        status, body = self.call("GET", "/ext/v1/capabilities")
        if status in (404, 405, 501):
            return None
        body = self._check(status, body, "/ext/v1/capabilities")
        try:
            obj = json.loads(body)
        except ValueError:
            raise ProtocolError(f"{self.what}: /ext/v1/capabilities did not answer JSON") from None
        return obj if isinstance(obj, dict) else None


class _CountingSink:
    def __init__(self, sink: IO[bytes]):
        self.sink, self.n = sink, 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return self.sink.write(b)
