"""Client for the Kata shim management API (``shim-monitor.sock``), both runtimes.

HTTP/1.1 over the node's unix socket through any NodeTransport
(katactl.backends.unixhttp, lazily imported), a timeout on every call. It speaks
each flavour's dialect:

- runtime-rs is method-strict (GET /metrics, /agent-url; POST
  /direct-volume/*) and answers everything else ``404 URL NOT FOUND``;
- the Go shim accepts any method on most paths, answers 400 on
  ``/direct-volume/stats`` without ``path``, 501 on a wrong iptables method,
  and serves ``/debug/pprof`` only with ``enable_pprof``;
- resize bodies differ: Go ``{"VolumePath", "Size"}``, RS
  ``{"volume_guest_path", "size"}``;
- ``/direct-volume/stats`` answers differ: Go the agent's VolumeStatsResponse
  as JSON, runtime-rs as Rust ``{:?}`` Debug text (:func:`parse_volume_stats_debug`);
- a failing runtime-rs handler answers nothing: its hyper service returns Err
  and hyper drops the connection (no 500), which :meth:`ShimClient.call`
  reports as the handler's failure (:class:`HandlerDropped`), not as a transport fault;
- runtime-rs's ``/metrics`` handler never returns Err (``unwrap_or_default`` on every
  part), but panics where the hypervisor's ``get_hypervisor_metrics`` is ``todo!()``:
  Firecracker, and QEMU before its procfs metrics (:class:`NoHypervisorMetrics`).
"""
from __future__ import annotations

import json
import re
import urllib.parse
from typing import IO, Protocol

from katactl.errors import NotFound, OperationFailed, ProtocolError, UnreachableError, UsageError
from katactl.backends.base import NodeTransport

METRICS_LIMIT = 16 << 20   # a real shim's /metrics is ~100 KiB; refuse absurd bodies
TEXT_LIMIT = 4 << 20
#: one limit for iptables rules in both directions: what ``set`` accepts, ``get``
#: must be able to read back (a guest ruleset is KiBs; a node's kube-proxy dump is MiBs)
IPTABLES_LIMIT = 8 << 20
#: JSON's names for what json.loads returns, for messages about a peer's answer
_JSON_TYPE: dict[type, str] = {dict: "an object", list: "an array", str: "a string", int: "a number",
                               float: "a number", bool: "a boolean"}
PPROF_PROFILES = ("heap", "goroutine", "profile", "trace", "allocs", "block", "mutex",
                  "threadcreate", "cmdline", "symbol")



#: runtime-rs hypervisors whose get_hypervisor_metrics is todo!(): /metrics panics (src/runtime-rs/
#: crates/hypervisor/src/firecracker/inner_hypervisor.rs; qemu/inner.rs before the 2026 procfs metrics)
NO_HYPERVISOR_METRICS = {"fc": "Firecracker",
                         "qemu": "QEMU in releases before its 2026 procfs hypervisor metrics"}


class HandlerDropped(OperationFailed):
    """A runtime-rs handler failed: the shim closed the connection without answering."""


class NoHypervisorMetrics(OperationFailed):
    """A runtime-rs shim's /metrics panics on its VMM's unimplemented hypervisor metrics."""


class BytesSink(Protocol):
    """Where a streamed answer goes: a binary file, or anything with its write()."""

    def write(self, b: bytes, /) -> int: ...

class ShimClient:
    """Talk to one sandbox's shim. ``flavour`` is the sandbox runtime: "go" or "rs"."""

    def __init__(self, transport: NodeTransport, socket_path: str, flavour: str = "go", *, timeout: float = 10.0,
                 sandbox_id: str | None = None, hypervisor: str | None = None):
        if flavour not in ("go", "rs"):
            raise ValueError(f"unknown shim flavour {flavour!r}")
        self.transport = transport
        self.socket_path = socket_path
        self.flavour = flavour
        self.timeout = float(timeout)
        self.what = f"shim of sandbox {sandbox_id[:12]}" if sandbox_id else f"shim at {socket_path}"
        self.hypervisor = hypervisor
        self._client = None

    @classmethod
    def for_sandbox(cls, transport: NodeTransport, sb, *, timeout: float = 10.0) -> "ShimClient":
        return cls(transport, sb.shim_socket, sb.runtime, timeout=timeout, sandbox_id=sb.id,
                   hypervisor=sb.hypervisor)

    # -- plumbing ----------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from katactl.backends.unixhttp import UnixHttpClient

            self._client = UnixHttpClient(self.transport, self.socket_path, self.timeout)
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
             sink: BytesSink | None = None, absolute_target: bool = False, **kw) -> tuple[int, bytes]:
        """(status, body) with the body capped at ``limit`` bytes, or, for a 2xx
        answer, streamed to ``sink`` (then body is empty). ``timeout`` bounds the whole
        call, not each read.

        ``absolute_target`` sends the request line in absolute form
        (``POST http://localhost/path?query``), which runtime-rs's stats handler
        needs (see :meth:`volume_stats`)."""
        t = self.timeout if timeout is None else timeout
        hint = ("the shim accepts connections but does not answer in time; is it stuck? "
                "(--request-timeout raises the limit)")
        answered = False
        try:
            with self.client.stream(method, url, what=f"{self.what}: {method} {url}", timeout=t, hint=hint,
                                    absolute_target=absolute_target, **kw) as r:
                answered = True
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
        except (ProtocolError, UnreachableError) as e:
            # runtime-rs answers a failing handler by dropping the connection (hyper closes it
            # when the service returns Err: shim_mgmt/server.rs serve_connection + handlers.rs)
            if self.flavour == "rs" and not answered and _dropped(e):
                raise HandlerDropped(
                    f"{self.what}: {method} {url}: the runtime-rs shim closed the connection without "
                    "answering: its handler failed (runtime-rs answers errors this way, not with a 500); "
                    "the shim's log says why") from None
            raise

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
        try:
            status, body = self.call("GET", "/metrics", limit=limit)
        except HandlerDropped:
            # a known upstream gap, not this shim's fault: its log only shows the panic
            vmm = NO_HYPERVISOR_METRICS.get(self.hypervisor or "")
            if vmm is None:
                raise
            raise NoHypervisorMetrics(
                f"{self.what}: GET /metrics: upstream runtime-rs does not implement hypervisor metrics for "
                f"{vmm} (get_hypervisor_metrics is todo!(): the handler panics and every scrape goes "
                "unanswered)") from None
        return self._check(status, body, "/metrics").decode("utf-8", "replace")

    def agent_url(self) -> str:
        """The agent's URL. runtime-rs answers 200 with an empty body when it cannot get the
        agent's socket (src/runtime-rs/crates/runtimes/src/shim_mgmt/handlers.rs
        ``agent_url_handler``: ``unwrap_or_else(|_| String::from(""))``), where Go answers
        500: no URL is that failure, not a success."""
        status, body = self.call("GET", "/agent-url")
        url = self._check(status, body, "/agent-url").decode("utf-8", "replace").strip()
        if not url:
            raise OperationFailed(f"{self.what}: /agent-url: " + (
                "the runtime-rs shim could not get the agent's socket (it answers an empty URL)"
                if self.flavour == "rs" else "the shim answered an empty URL"))
        return url

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

    def volume_stats(self, device: str) -> dict:
        """The guest's statistics of the direct volume backed by ``device`` (mountInfo.json's
        ``device``, what ``kata-runtime``/``kata-ctl direct-volume stats`` send):
        ``{"usage": [{"available", "total", "used", "unit"}], "volume_condition": {...} | None}``,
        the same for both runtimes (proto3 defaults filled in: Go's JSON omits zero fields).

        Go (src/runtime/pkg/containerd-shim-v2/shim_management.go serveVolumeStats) answers
        ``json.Marshal`` of the agent's VolumeStatsResponse. runtime-rs
        (src/runtime-rs/crates/runtimes/src/shim_mgmt/handlers.rs direct_volume_stats_handler)
        is POST-only, answers the Debug text (:func:`parse_volume_stats_debug`), and reads the
        query through ``Url::parse(&req.uri().to_string())``, which fails on an origin-form
        request target (a relative URL): only an absolute-form target reaches the agent."""
        if not device:
            raise UsageError("empty volume path")
        url = "/direct-volume/stats?path=" + urllib.parse.quote(device, safe="")
        go = self.flavour == "go"
        status, body = self.call("GET" if go else "POST", url, absolute_target=not go)
        body = self._check(status, body, "/direct-volume/stats")
        if not go:
            return parse_volume_stats_debug(body.decode("utf-8", "replace"), self.what)
        try:
            obj = json.loads(body)
        except ValueError:
            raise ProtocolError(f"{self.what}: /direct-volume/stats did not answer JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.what}: /direct-volume/stats answered {type(obj).__name__}")
        # csi.pb.go: usage is a repeated VolumeUsage, volume_condition a message or null
        raw, cond = obj.get("usage"), obj.get("volume_condition")
        for key, v, want in (("usage", raw, list), ("volume_condition", cond, dict)):
            if not isinstance(v, want | None):
                raise ProtocolError(f"{self.what}: /direct-volume/stats answered a {key} that is "
                                    f"{_JSON_TYPE.get(type(v), type(v).__name__)}, not {_JSON_TYPE[want]}")
        # encoding/json with the generated ``omitempty`` tags drops zero values (csi.pb.go)
        usage = [{"available": 0, "total": 0, "used": 0, "unit": 0, **u} if isinstance(u, dict) else u
                 for u in raw or []]
        if cond is not None:
            cond = {"abnormal": False, "message": "", **cond}
        return {**obj, "usage": usage, "volume_condition": cond}

    def volume_resize(self, device: str, size: int) -> None:
        """Ask the guest to grow the filesystem on the direct volume backed by ``device``
        (mountInfo.json's ``device``, as kata-volume.go Resize and kata-ctl volume_ops.rs send)."""
        if self.flavour == "go":
            payload = {"VolumePath": device, "Size": int(size)}
        else:
            payload = {"volume_guest_path": device, "size": int(size)}
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


def _dropped(e: Exception) -> bool:
    """Whether a transport error is the peer closing the connection before any answer."""
    text = str(e).lower()
    return ("disconnected without sending a response" in text or "connection lost" in text
            or "reset by peer" in text)


# -- runtime-rs's Debug text -----------------------------------------------------------------
_DEBUG_TOKEN = re.compile(r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<id>[A-Za-z_]\w*)|(?P<p>[{}\[\](),:]))""")
_RUST_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
_UNIT_NAMES = ("UNKNOWN", "BYTES", "INODES")
#: a real answer is under 1 KiB (two usage entries); refuse a body or a nesting far beyond that
_DEBUG_LIMIT = 64 << 10
_DEBUG_DEPTH = 16


class _DebugStruct(dict):
    """A parsed ``Name { field: value, .. }``: its fields, and its type name."""

    def __init__(self, name: str, fields: dict):
        super().__init__(fields)
        self.name = name


def _rust_str(lit: str) -> str:
    out, i, body = [], 0, lit[1:-1]
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt == "u":  # \u{1f600}
            end = body.index("}", i)
            digits = body[i + 3:end]
            if not 1 <= len(digits) <= 6:  # Rust's \u{...} takes at most six hex digits
                raise ValueError(f"bad unicode escape \\u{{{digits[:8]}}}")
            out.append(chr(int(digits, 16)))  # over 0x10FFFF: ValueError, as Rust refuses it too
            i = end + 1
            continue
        if nxt not in _RUST_ESCAPES:
            raise ValueError(f"unknown escape \\{nxt}")
        out.append(_RUST_ESCAPES[nxt])
        i += 2
    return "".join(out)


class _DebugParser:
    """Recursive descent over Rust's compact ``{:?}``: structs, lists, maps, strings, integers,
    identifiers (enum variants, true/false/None) and tuple variants (``Some(x)``)."""

    def __init__(self, text: str):
        self.toks: list[tuple[str, str, int]] = []
        pos, end = 0, len(text.rstrip())
        while pos < end:
            m = _DEBUG_TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"unexpected {text[pos:pos + 12]!r} at offset {pos}")
            kind = m.lastgroup or "p"
            self.toks.append((kind, m.group(kind), m.start(kind)))
            pos = m.end()
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int]:
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "", -1)

    def take(self, kind: str, value: str | None = None) -> str:
        k, v, at = self.peek()
        if k != kind or (value is not None and v != value):
            want = value or kind
            raise ValueError(f"expected {want!r}, found {v or 'the end'!r}" + (f" at offset {at}" if at >= 0 else ""))
        self.i += 1
        return v

    def value(self):
        self.depth += 1
        try:
            if self.depth > _DEBUG_DEPTH:
                raise ValueError(f"nested deeper than {_DEBUG_DEPTH} levels")
            return self._value()
        finally:
            self.depth -= 1

    def _value(self):
        k, v, _ = self.peek()
        if k == "str":
            self.i += 1
            return _rust_str(v)
        if k == "num":
            self.i += 1
            return int(v)
        if k == "p" and v == "[":
            self.i += 1
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
                if self.peek()[1] != "]":
                    self.take("p", ",")
            self.take("p", "]")
            return items
        if k == "p" and v == "{":  # a map (HashMap's Debug), e.g. unknown fields a newer agent sent
            self.i += 1
            entries = {}
            while self.peek()[1] != "}":
                key = self.value()
                self.take("p", ":")
                entries[repr(key)] = self.value()
                if self.peek()[1] != "}":
                    self.take("p", ",")
            self.take("p", "}")
            return entries
        name = self.take("id")
        nk, nv, _ = self.peek()
        if nk == "p" and nv == "{":
            self.i += 1
            fields = {}
            while self.peek()[1] != "}":
                key = self.take("id")
                self.take("p", ":")
                fields[key] = self.value()
                if self.peek()[1] != "}":
                    self.take("p", ",")
            self.take("p", "}")
            return _DebugStruct(name, fields)
        if nk == "p" and nv == "(":
            self.i += 1
            inner = self.value()
            self.take("p", ")")
            return inner if name == "Some" else (name, inner)
        return {"true": True, "false": False, "None": None}.get(name, name)


def parse_volume_stats_debug(text: str, what: str = "shim") -> dict:
    """runtime-rs's ``/direct-volume/stats`` answer as the same dict the Go shim's JSON gives.

    runtime-rs formats the agent's answer with ``format!("Usage: {:?} Volume Condition: {:?}",
    result.usage(), result.volume_condition())`` (crates/runtimes/virt_container/src/sandbox.rs
    direct_volume_stats; before 3.x it was the agent crate's ``From<csi::VolumeStatsResponse>``
    in crates/agent/src/kata/trans.rs, same text). The types are rust-protobuf 3 messages
    generated from src/libs/protocols/protos/csi.proto with accessors (protocols/build.rs):
    derived Debug, so each message ends with its ``special_fields``, and the enum prints its
    variant name (``BYTES``), or its number when unknown (EnumOrUnknown's Debug)::

        Usage: [VolumeUsage { available: 966367641, total: 1020702720, used: 54335079,
        unit: BYTES, special_fields: SpecialFields { unknown_fields: UnknownFields { fields: None },
        cached_size: CachedSize { size: 0 } } }] Volume Condition: VolumeCondition { abnormal:
        false, message: "", special_fields: SpecialFields { .. } }

    Fields the messages do not have are ignored (a newer csi.proto); a missing field, a wrong
    type or any other shape is a ProtocolError naming what was wrong."""
    try:
        if len(text) > _DEBUG_LIMIT:
            raise ValueError(f"{len(text)} bytes, more than the {_DEBUG_LIMIT >> 10} KiB a stats answer can be")
        head, sep, rest = text.partition("Usage:")
        if head.strip() or not sep:
            raise ValueError("does not start with 'Usage:'")
        usage_text, sep, cond_text = rest.partition(" Volume Condition:")
        if not sep:
            raise ValueError("has no 'Volume Condition:'")
        usage_p, cond_p = _DebugParser(usage_text), _DebugParser(cond_text)
        usage, cond = usage_p.value(), cond_p.value()
        for p in (usage_p, cond_p):
            p.take("end")
        if not isinstance(usage, list):
            raise ValueError("Usage is not a list")
        out = []
        for u in usage:
            if not isinstance(u, _DebugStruct) or u.name != "VolumeUsage":
                raise ValueError(f"a usage entry is not a VolumeUsage: {u!r}")
            entry = {}
            for key in ("available", "total", "used"):
                v = u.get(key)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ValueError(f"VolumeUsage.{key} is {v!r}, not a count")
                entry[key] = v
            unit = u.get("unit")
            if isinstance(unit, bool) or not (isinstance(unit, int) or unit in _UNIT_NAMES):
                raise ValueError(f"VolumeUsage.unit is {unit!r}")
            entry["unit"] = unit
            out.append(entry)
        if not isinstance(cond, _DebugStruct) or cond.name != "VolumeCondition":
            raise ValueError("Volume Condition is not a VolumeCondition")
        if not isinstance(cond.get("abnormal"), bool) or not isinstance(cond.get("message"), str):
            raise ValueError("VolumeCondition needs abnormal (bool) and message (string)")
    except (ValueError, IndexError) as e:
        raise ProtocolError(f"{what}: /direct-volume/stats answered text that is not runtime-rs's "
                            f"VolumeStatsResponse Debug format ({e}): {text[:120]!r}") from None
    return {"usage": out, "volume_condition": {"abnormal": cond["abnormal"], "message": cond["message"]}}
