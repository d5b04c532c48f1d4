"""A protocol-faithful Kata shim management server over a real unix socket.

Serves what ``containerd-shim-kata-v2`` (flavour ``"go"``) or the runtime-rs
shim (flavour ``"rs"``) serve on ``shim-monitor.sock``: HTTP/1.1,

=========================== ================================ ==========================
path                        Go                               runtime-rs
=========================== ================================ ==========================
/metrics                    any method                       GET only
/agent-url                  any method                       GET only
/direct-volume/stats?path=  any method, 400 without ``path``, POST only, absolute-form target,
                            JSON (``omitempty``)              Rust ``{:?}`` Debug text
/direct-volume/resize       any, ``{"VolumePath","Size"}``    POST, ``{"volume_guest_path","size"}``
a failing handler           500 and the error text           the connection dropped, no answer
/iptables, /ip6tables       GET / PUT, else 501              GET / PUT
/policy                     PUT                              PUT
/debug/vars, /debug/pprof/* only when ``enable_pprof``        never
unknown                     404 ``404 page not found``        404 ``URL NOT FOUND``
=========================== ================================ ==========================

Metrics text uses the real family names (``kata_shim_*``, ``kata_hypervisor_*``,
``kata_agent_*``, ``kata_guest_meminfo{item=...}``, ``kata_guest_vm_stat{item=
"balloon_inflate"}``, and for Go the unprefixed ``go_*``/``process_*``), produced
from a settable :class:`ShimState`. ``proc_stat`` utime/stime (clock ticks)
advance with wall time at ``*_cpu_percent`` so ``top`` sees CPU usage.

runtime-rs's hypervisor families depend on ``state.hypervisor``, as upstream's
``metrics_url_handler`` (``src/runtime-rs/crates/runtimes/src/shim_mgmt/handlers.rs``)
appends ``sandbox.hypervisor_metrics()``:

- ``dragonball``: Dragonball's own ``kata_hypervisor_{scrape_count,vcpu,seccomp,signals}``
  (``src/dragonball/src/hypervisor_metrics.rs``), no ``kata_hypervisor_proc_*``: the VMM
  is the shim process, whose ``kata_shim_proc_*`` already describe it;
- ``qemu``: the procfs families of the QEMU process (``threads``, ``proc_status``,
  ``proc_stat``, ``io_stat``, ``fds``: runtime-rs's 2026 procfs hypervisor metrics); with
  ``state.hypervisor_metrics = False`` the older releases, whose ``get_hypervisor_metrics``
  is ``todo!()`` (``qemu/inner.rs``);
- ``clh``: none (``ch/inner_hypervisor.rs`` returns Err, which the handler turns into "");
- ``fc``: ``todo!()`` (``firecracker/inner_hypervisor.rs``): the handler panics and the
  connection is dropped unanswered, on every scrape.

Extension points for the lab daemon:

- ``extra_routes``: ``{(METHOD or None, "/path"): fn(server, req) -> Response}``;
- override :meth:`ShimServer.handle_ext` to serve ``/ext/...`` paths;
- :attr:`ShimServer.state` may be mutated at any time (under ``server.lock``).

Fault modes (``fault=``) for tests: ``"hang"`` (accept, read, never answer),
``"trickle"`` (answer one byte every 0.5 s, forever: every read gets data, the
answer never ends), ``"huge"`` (a ``huge_bytes`` /metrics body), ``"close"`` (close without a
response), ``"garbage"`` (non-HTTP bytes).

Known differences from the real shims:

- the values are synthetic (a settable state object), not read from /proc or
  from the agent; the guest families are a representative subset. The lab's
  QEMU sandboxes fill ``kata_guest_meminfo`` from the balloon's guest statistics
  (QEMU's last sample, not the agent's /proc/meminfo at scrape time): after a
  balloon move the scrape waits up to 1.5 s for a newer sample and, without
  one, leaves the family out (``guest_meminfo = False``);
- pprof answers are small gzip blobs (the pprof magic, not a real profile);
  ``profile``/``trace`` do sleep ``seconds`` like the real handlers, but the
  named profiles (heap, allocs, block, mutex, goroutine, threadcreate) ignore
  ``seconds`` and answer at once: Go's net/http/pprof (pprof.go
  ``handler.serveDeltaProfile``) serves them a delta profile taken over that
  many seconds, so the real shim answers only ``seconds`` later, and it
  answers 400 where the lab does not check: ``seconds`` not a positive integer,
  or given with ``debug``;
- ``/policy`` is accepted and stored, not handed to an agent;
- ``/direct-volume/*`` answers from ``state.volumes`` (the device both runtimes'
  tools send, mountInfo.json's ``device`` -> statfs of the volume's filesystem;
  the Go shim really maps it to the guest mount, runtime-rs hands it to the agent
  as is), and a resize is not run by an agent: it sets
  the filesystem's total to what a fresh ext4 of that device size reports,
  :func:`ext4_statfs_total` (the device size minus inode tables, bitmaps and
  the journal, ~2-3%, as ``mkfs.ext4`` defaults and ``df`` show; the
  reserved-blocks share of ``available`` is not modelled). Like online
  ``resize2fs`` it refuses to shrink and the same size again is a no-op;
  real guests may run XFS or other filesystems with other overheads;
- Go answers past 2 KiB (``/metrics``, pprof) are chunked as net/http sends them,
  one chunk per 2 KiB buffer flush (the real shim's chunks follow its encoder's
  writes, so their sizes vary); runtime-rs (hyper, full bodies) always sends
  Content-Length;
- Go's ``/metrics`` never gzips (the real one does not either unless asked by
  kata-monitor's client; we never ask);
- the socket is bound under a short temporary name and renamed into place, so
  paths longer than the 108-byte ``sun_path`` limit work (a real shim would fail).
"""
from __future__ import annotations

import dataclasses
import gzip
import http.server
import json
import os
import socketserver
import tempfile
import threading
import time
import urllib.parse
from typing import Callable

USER_HZ = 100
#: net/http's bufferBeforeChunkingSize (src/net/http/server.go): a Go handler's answer longer
#: than this, written without a Content-Length, goes out with Transfer-Encoding: chunked
GO_BUFFER_BEFORE_CHUNKING = 2048
_EXT4_BLOCK = 4096


def ext4_statfs_total(device_bytes: int) -> int:
    """statfs f_blocks * f_bsize of a freshly made ext4 on a device_bytes device,
    with mkfs.ext4 defaults (4 KiB blocks, 256-byte inodes, one inode per 16 KiB,
    e2fsprogs' default journal size): what ``df`` shows as Size. An estimate to
    within a few MiB, which is all the lab needs: never equal to the device size."""
    blocks = device_bytes // _EXT4_BLOCK
    if blocks < 2048:
        return blocks * _EXT4_BLOCK
    journal = 0
    for limit, jblocks in ((32768, 1024), (256 << 10, 4096), (512 << 10, 8192), (4096 << 10, 16384),
                           (8192 << 10, 32768), (16384 << 10, 65536), (32768 << 10, 131072)):
        if blocks < limit:
            journal = jblocks
            break
    else:
        journal = 262144
    groups = -(-blocks // 32768)
    inode_tables = blocks * _EXT4_BLOCK // 16384 * 256 // _EXT4_BLOCK
    bitmaps_and_descriptors = groups * 2 + -(-groups * 64 // _EXT4_BLOCK)
    return (blocks - journal - inode_tables - bitmaps_and_descriptors) * _EXT4_BLOCK


@dataclasses.dataclass
class ShimState:
    """What the fake shim reports. Sizes in bytes; CPU as a percentage of one CPU."""

    sandbox_id: str = "sandbox"
    hypervisor: str = "qemu"
    shim_pid: int = 0
    hypervisor_pid: int = 0
    agent_url: str = "vsock://1234567:1024"
    shim_rss: int = 48 << 20
    hypervisor_rss: int = 300 << 20
    agent_rss: int = 12 << 20
    shim_cpu_percent: float = 0.5
    hypervisor_cpu_percent: float = 10.0
    shim_threads: int = 14
    hypervisor_threads: int = 6
    shim_fds: int = 32
    hypervisor_fds: int = 64
    guest_mem_total: int = 2048 << 20
    guest_mem_free: int = 1500 << 20
    guest_mem_available: int = 1700 << 20
    guest_cached: int = 100 << 20
    guest_meminfo: bool = True     # False: kata_guest_meminfo left out (the lab holds no fresh figures)
    balloon_inflate: int = 0       # kata_guest_vm_stat{item="balloon_inflate"} (pages)
    oom_kill: int = 0
    pgmajfault: int = 10
    guest_tasks: int = 42
    guest_load1: float = 0.1
    pod_overhead_cpu: float = 0.0
    #: runtime-rs QEMU: False for the releases before its procfs hypervisor metrics
    #: (``get_hypervisor_metrics`` is ``todo!()``: every /metrics is dropped)
    hypervisor_metrics: bool = True
    pod_overhead_memory: int = 0
    iptables: str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    ip6tables: str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    policy: str = ""
    #: volume device (what the shim is asked about) -> {"total", "used", "available"} bytes,
    #: and optionally {"inodes", "inodes_used", "inodes_free"}
    volumes: dict = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.time)
    scrapes: int = 0


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes
    raw_path: str


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict = dataclasses.field(default_factory=dict)
    #: answer nothing and close the connection: what hyper does when a runtime-rs
    #: handler returns Err (shim_mgmt/server.rs serve_connection)
    drop: bool = False

    def data(self) -> bytes:
        return self.body.encode() if isinstance(self.body, str) else self.body


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def handle_error(self, request, client_address):
        import sys

        # a client that stops reading (a body over its limit, a timeout) is normal
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    def server_bind(self):
        final = self.server_address
        # bind under a short temporary name, then rename into place (sun_path is 108 bytes)
        tmpdir = tempfile.mkdtemp(prefix="ks", dir="/tmp")
        short = os.path.join(tmpdir, "s")
        self.socket.bind(short)
        try:
            os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
            try:
                os.unlink(final)
            except FileNotFoundError:
                pass
            os.rename(short, final)
        finally:
            try:
                os.rmdir(tmpdir)
            except OSError:
                pass
        self.server_address = final


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "katactl-lab-shim"
    sys_version = ""

    def address_string(self):
        return "unix"

    def log_message(self, fmt, *args):
        pass

    def _dispatch(self):
        srv: ShimServer = self.server.owner
        if srv.fault == "hang":
            srv._hung.append(self.connection)
            srv._stop.wait()
            self.close_connection = True
            return
        if srv.fault == "trickle":
            srv._hung.append(self.connection)
            try:
                while not srv._stop.wait(0.5):
                    self.wfile.write(b"X")
                    self.wfile.flush()
            except OSError:  # the client gave up
                pass
            self.close_connection = True
            return
        if srv.fault == "close":
            self.close_connection = True
            return
        if srv.fault == "garbage":
            self.wfile.write(b"\x00\xffnot http at all\r\n\r\n")
            self.close_connection = True
            return
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n > 0 else b""
        u = urllib.parse.urlsplit(self.path)
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query, keep_blank_values=True).items()}
        req = Request(self.command, u.path, q, dict(self.headers.items()), body, self.path)
        with srv.lock:
            srv.requests.append((req.method, req.raw_path))
        try:
            resp = srv.route(req)
        except Exception as e:  # a bug in a test route must still answer
            resp = Response(500, f"internal error: {e}\n")
        if resp.drop:
            self.close_connection = True
            return
        data = resp.data()
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if srv.fault == "huge" and req.path == "/metrics":
            self.send_header("Content-Length", str(srv.huge_bytes))
            self.end_headers()
            line = b"kata_shim_padding{item=\"x\"} 1\n"
            chunk = line * (65536 // len(line))
            sent = 0
            try:
                while sent < srv.huge_bytes:
                    part = chunk[: srv.huge_bytes - sent]
                    self.wfile.write(part)
                    sent += len(part)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return
        if (srv.flavour == "go" and len(data) > GO_BUFFER_BEFORE_CHUNKING and self.command != "HEAD"
                and not any(k.lower() == "content-length" for k in resp.headers)):
            # net/http (server.go chunkWriter): a handler that writes past the response buffer
            # without setting Content-Length is answered chunked, a chunk per buffer flush
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (
                data[i:i + GO_BUFFER_BEFORE_CHUNKING] for i in range(0, len(data), GO_BUFFER_BEFORE_CHUNKING)))
                + b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch


class ShimServer:
    """One shim management socket. ``with ShimServer(path, flavour="go") as s: ...``"""

    def __init__(self, socket_path: str, *, flavour: str = "go", state: ShimState | None = None,
                 enable_pprof: bool = False, fault: str | None = None, huge_bytes: int = 50 << 20,
                 extra_routes: dict | None = None):
        if flavour not in ("go", "rs"):
            raise ValueError("flavour must be 'go' or 'rs'")
        self.socket_path = socket_path
        self.flavour = flavour
        self.state = state or ShimState()
        self.enable_pprof = enable_pprof
        self.fault = fault
        self.huge_bytes = huge_bytes
        self.extra_routes: dict[tuple[str | None, str], Callable] = dict(extra_routes or {})
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._hung: list = []
        self._srv: _UnixServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> "ShimServer":
        self._srv = _UnixServer(self.socket_path, _Handler)
        self._srv.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"shim-{self.state.sandbox_id[:12]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None
        for c in self._hung:
            try:
                c.close()
            except OSError:
                pass
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- routing ---------------------------------------------------------------
    def not_found(self) -> Response:
        if self.flavour == "rs":
            return Response(404, "URL NOT FOUND")
        return Response(404, "404 page not found\n")

    def handle_ext(self, req: Request) -> Response | None:
        """Override to serve ``/ext/...`` (the katactl shim extension). None = 404."""
        return None

    def route(self, req: Request) -> Response:
        fn = self.extra_routes.get((req.method, req.path)) or self.extra_routes.get((None, req.path))
        if fn is not None:
            return fn(self, req)
        if req.path.startswith("/ext/"):
            r = self.handle_ext(req)
            return r if r is not None else self.not_found()
        go = self.flavour == "go"
        p, m = req.path, req.method

        def allow(*methods):
            return go or m in methods

        if p == "/metrics" and allow("GET"):
            if not go and self._rs_hypervisor_metrics_panic():
                return _HANDLER_ERR  # the todo!() panics in the connection's task: no answer
            return Response(200, self.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        if p == "/agent-url" and allow("GET"):
            return Response(200, self.state.agent_url)
        if p == "/direct-volume/stats" and allow("POST"):
            return self._volume_stats(req)
        if p == "/direct-volume/resize" and allow("POST"):
            return self._volume_resize(req)
        if p in ("/iptables", "/ip6tables"):
            attr = "iptables" if p == "/iptables" else "ip6tables"
            if m == "GET":
                with self.lock:
                    return Response(200, getattr(self.state, attr))
            if m == "PUT":
                try:
                    text = req.body.decode("utf-8")
                except UnicodeDecodeError:
                    return Response(400, "iptables rules are not UTF-8 text\n") if go else _HANDLER_ERR
                with self.lock:
                    setattr(self.state, attr, text)
                return Response(200, "")
            return Response(501, "") if go else self.not_found()
        if p == "/policy":
            if m == "PUT":
                with self.lock:
                    self.state.policy = req.body.decode("utf-8", "replace")
                return Response(200, "")
            return Response(501, "") if go else self.not_found()
        if go and self.enable_pprof and (p == "/debug/vars" or p.startswith("/debug/pprof")):
            return self._pprof(req)
        return self.not_found()

    # -- endpoints ---------------------------------------------------------------
    def _volume_stats(self, req: Request) -> Response:
        go = self.flavour == "go"
        # runtime-rs: Url::parse(&req.uri().to_string()) fails on an origin-form target
        # (a relative URL), and the handler's Err drops the connection (handlers.rs)
        if not go and not req.raw_path.startswith(("http://", "https://")):
            return _HANDLER_ERR
        path = req.query.get("path")
        if not path:
            return Response(400, "Required parameter path not found") if go else _HANDLER_ERR
        with self.lock:
            v = self.state.volumes.get(path)
        if v is None:
            return Response(500, f"volume {path} not found in the guest\n") if go else _HANDLER_ERR
        usage = [(v.get("available", 0), v.get("total", 0), v.get("used", 0), 1),
                 (v.get("inodes_free", 0), v.get("inodes", 0), v.get("inodes_used", 0), 2)]
        # the agent answers bytes then inodes, and condition {abnormal: false, message: "OK"}
        # (src/agent/src/rpc.rs get_volume_stats)
        if not go:
            return Response(200, volume_stats_debug(usage, False, "OK"))
        # json.Marshal of the agent's VolumeStatsResponse: csi.pb.go tags every field omitempty
        keys = ("available", "total", "used", "unit")
        body = {"usage": [{k: x for k, x in zip(keys, u, strict=True) if x} for u in usage],
                "volume_condition": {"message": "OK"}}
        return Response(200, json.dumps(body, separators=(",", ":")))

    def _volume_resize(self, req: Request) -> Response:
        go = self.flavour == "go"
        try:
            obj = json.loads(req.body or b"{}")
        except ValueError:
            obj = None
        pk, sk = ("VolumePath", "Size") if go else ("volume_guest_path", "size")
        path, size = (obj.get(pk), obj.get(sk)) if isinstance(obj, dict) else (None, None)
        if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool):
            # Go: json.Unmarshal's error, 500; runtime-rs: serde fails, the handler's Err drops it
            return Response(500, f"body needs {pk} (string) and {sk} (integer)\n") if go else _HANDLER_ERR
        with self.lock:
            v = self.state.volumes.get(path)
            if v is None:
                return Response(500, f"volume {path} not found in the guest\n") if go else _HANDLER_ERR
            total = ext4_statfs_total(size)
            if total < v.get("total", 0):
                # online resize2fs cannot shrink
                return (Response(500, f"resize volume {path}: on-line shrinking not supported\n") if go
                        else _HANDLER_ERR)
            v["total"] = total
            v["available"] = max(0, total - v.get("used", 0))
        return Response(200, "")

    def _pprof(self, req: Request) -> Response:
        p = req.path
        if p == "/debug/vars":
            return Response(200, json.dumps({"cmdline": ["containerd-shim-kata-v2"],
                                             "memstats": {"Alloc": self.state.shim_rss // 2}}),
                            "application/json; charset=utf-8")
        name = p[len("/debug/pprof"):].strip("/")
        if name == "":
            return Response(200, "<html>/debug/pprof/ heap goroutine profile trace</html>",
                            "text/html; charset=utf-8")
        if name == "cmdline":
            return Response(200, "containerd-shim-kata-v2\x00-namespace\x00k8s.io")
        if name in ("profile", "trace"):
            try:
                secs = float(req.query.get("seconds", "30" if name == "profile" else "1"))
            except ValueError:
                return Response(400, "Bad Request: invalid value for \"seconds\"\n")
            self._stop.wait(max(0.0, secs))
        elif name not in ("heap", "goroutine", "allocs", "block", "mutex", "threadcreate", "symbol"):
            return Response(404, "Unknown profile\n")
        if name == "goroutine" and req.query.get("debug") in ("1", "2"):
            return Response(200, "goroutine profile: total 12\n")
        blob = gzip.compress(b"katactl-lab fake pprof " + name.encode() + b"\n" + os.urandom(64))
        return Response(200, blob, "application/octet-stream",
                        {"Content-Disposition": f'attachment; filename="{name}"'})

    # -- metrics -------------------------------------------------------------------
    def _rs_hypervisor_metrics_panic(self) -> bool:
        """runtime-rs's get_hypervisor_metrics is todo!() for this hypervisor."""
        with self.lock:
            hv, implemented = self.state.hypervisor, self.state.hypervisor_metrics
        return hv == "fc" or (hv == "qemu" and not implemented)

    def metrics_text(self) -> str:
        with self.lock:
            s = dataclasses.replace(self.state)
            self.state.scrapes += 1
        elapsed = max(0.0, time.time() - s.started)

        def ticks(pct: float) -> int:
            return int(elapsed * USER_HZ * pct / 100.0)

        out: list[str] = []

        def fam(name: str, typ: str, help_: str, samples: list[tuple[dict, float]]):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {typ}")
            for labels, v in samples:
                lab = ",".join(f'{k}="{val}"' for k, val in labels.items())
                out.append(f"{name}{{{lab}}} {_num(v)}" if lab else f"{name} {_num(v)}")

        # *_proc_status sizes: the Go shim's prometheus/procfs converts /proc's kB to bytes;
        # runtime-rs (and the Rust agent, under either runtime) sets the Rust procfs crate's
        # Status fields as they are, in kB (runtime-rs crates/shim/src/shim_metrics.rs,
        # src/agent/src/metrics.rs set_gauge_vec_proc_status)
        status_unit = 1 if self.flavour == "go" else 1024

        def proc(prefix: str, who: str, rss: int, pct: float, threads: int, fds: int):
            fam(f"{prefix}_threads", "gauge", f"{who} process threads.", [({}, threads)])
            fam(f"{prefix}_proc_status", "gauge", f"{who} process status.",
                [({"item": k}, v // status_unit) for k, v in (
                    ("vmrss", rss), ("vmhwm", rss + (4 << 20)), ("rssanon", rss * 3 // 4),
                    ("rssfile", rss // 4), ("vmswap", 0), ("vmsize", rss * 4))])
            t = ticks(pct)
            fam(f"{prefix}_proc_stat", "gauge", f"{who} process statistics.",
                [({"item": "utime"}, t * 2 // 3), ({"item": "stime"}, t - t * 2 // 3),
                 ({"item": "cutime"}, 0), ({"item": "cstime"}, 0)])
            fam(f"{prefix}_io_stat", "gauge", f"{who} process IO statistics.",
                [({"item": "rchar"}, 4096), ({"item": "wchar"}, 2048)])
            fam(f"{prefix}_fds", "gauge", f"Open FDs for {who}.", [({}, fds)])

        if self.flavour == "go":
            fam("go_goroutines", "gauge", "Number of goroutines that currently exist.", [({}, 23)])
            fam("go_threads", "gauge", "Number of OS threads created.", [({}, s.shim_threads)])
            fam("go_memstats_alloc_bytes", "gauge", "Number of bytes allocated and still in use.",
                [({}, s.shim_rss // 2)])
            out.append("# HELP go_gc_duration_seconds A summary of the pause duration of garbage collection cycles.")
            out.append("# TYPE go_gc_duration_seconds summary")
            out.append('go_gc_duration_seconds{quantile="0"} 2.1e-05')
            out.append('go_gc_duration_seconds{quantile="1"} 0.000412')
            out.append("go_gc_duration_seconds_sum 0.0031")
            out.append("go_gc_duration_seconds_count 17")
            fam("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [({}, s.shim_rss)])
            fam("process_open_fds", "gauge", "Number of open file descriptors.", [({}, s.shim_fds)])
        proc("kata_shim", "Kata containerd shim v2", s.shim_rss, s.shim_cpu_percent, s.shim_threads, s.shim_fds)
        fam("kata_shim_pod_overhead_cpu", "gauge", "Kata Pod overhead for CPU resources(percent).",
            [({}, s.pod_overhead_cpu)])
        fam("kata_shim_pod_overhead_memory_in_bytes", "gauge", "Kata Pod overhead for memory resources(bytes).",
            [({}, s.pod_overhead_memory)])
        out.append("# HELP kata_shim_rpc_durations_histogram_milliseconds RPC latency distributions.")
        out.append("# TYPE kata_shim_rpc_durations_histogram_milliseconds histogram")
        for le, c in (("1", 3), ("10", 9), ("100", 12), ("+Inf", 12)):
            out.append(f'kata_shim_rpc_durations_histogram_milliseconds_bucket{{action="create",le="{le}"}} {c}')
        out.append('kata_shim_rpc_durations_histogram_milliseconds_sum{action="create"} 120.5')
        out.append('kata_shim_rpc_durations_histogram_milliseconds_count{action="create"} 12')
        if self.flavour == "go":
            proc("kata_hypervisor", "Hypervisor", s.hypervisor_rss, s.hypervisor_cpu_percent,
                 s.hypervisor_threads, s.hypervisor_fds)
            fam("kata_hypervisor_netdev", "gauge", "Net devices statistics.",
                [({"interface": "tap0_kata", "item": "recv_bytes"}, 123456),
                 ({"interface": "tap0_kata", "item": "sent_bytes"}, 65432)])
        elif s.hypervisor == "dragonball":  # src/dragonball/src/hypervisor_metrics.rs
            fam("kata_hypervisor_scrape_count", "counter", "Hypervisor metrics scrape count.",
                [({}, s.scrapes + 1)])
            fam("kata_hypervisor_vcpu", "gauge", "Hypervisor metrics specific to VCPUs' mode of functioning.",
                [({"item": k}, 0) for k in ("exit_io_in", "exit_io_out", "exit_mmio_read", "exit_mmio_write",
                                            "failures", "filter_cpuid")])
            fam("kata_hypervisor_seccomp", "gauge", "Hypervisor metrics for the seccomp filtering.",
                [({"item": "num_faults"}, 0)])
            fam("kata_hypervisor_signals", "gauge", "Hypervisor metrics related to signals.",
                [({"item": "sigbus"}, 0), ({"item": "sigsegv"}, 0)])
        elif s.hypervisor == "qemu":  # runtime-rs's procfs metrics of the QEMU process
            proc("kata_hypervisor", "Hypervisor", s.hypervisor_rss, s.hypervisor_cpu_percent,
                 s.hypervisor_threads, s.hypervisor_fds)
        fam("kata_agent_scrape_count", "counter", "Metrics scrape count", [({}, s.scrapes + 1)])
        fam("kata_agent_threads", "gauge", "Agent process threads", [({}, 5)])
        fam("kata_agent_total_rss", "gauge", "Agent process total rss size", [({}, s.agent_rss)])
        fam("kata_agent_proc_status", "gauge", "Agent process status.",
            [({"item": "vmrss"}, s.agent_rss >> 10), ({"item": "vmhwm"}, s.agent_rss >> 10)])
        fam("kata_guest_load", "gauge", "Guest system load.",
            [({"item": "load1"}, s.guest_load1), ({"item": "load5"}, s.guest_load1),
             ({"item": "load15"}, s.guest_load1)])
        fam("kata_guest_tasks", "gauge", "Guest system load.", [({"item": "cur"}, s.guest_tasks),
                                                                  ({"item": "max"}, 4194304)])
        fam("kata_guest_cpu_time", "gauge", "Guest CPU statistics.",
            [({"cpu": "total", "item": "user"}, elapsed), ({"cpu": "total", "item": "system"}, elapsed / 4),
             ({"cpu": "total", "item": "idle"}, elapsed * 10)])
        fam("kata_guest_vm_stat", "gauge", "Guest virtual memory statistics.",
            [({"item": "balloon_inflate"}, s.balloon_inflate), ({"item": "balloon_deflate"}, 0),
             ({"item": "pgmajfault"}, s.pgmajfault), ({"item": "oom_kill"}, s.oom_kill)])
        if s.guest_meminfo:
            fam("kata_guest_meminfo", "gauge", "Statistics about memory usage in the system.",
                [({"item": "mem_total"}, s.guest_mem_total), ({"item": "mem_free"}, s.guest_mem_free),
                 ({"item": "mem_available"}, s.guest_mem_available), ({"item": "cached"}, s.guest_cached),
                 ({"item": "buffers"}, 4 << 20), ({"item": "swap_total"}, 0), ({"item": "swap_free"}, 0)])
        fam("kata_guest_netdev_stat", "gauge", "Guest net devices statistics.",
            [({"interface": "eth0", "item": "recv_bytes"}, 1000)])
        fam("kata_guest_diskstat", "gauge", "Disks statistics in system.",
            [({"disk": "vda", "item": "reads"}, 120)])
        return "\n".join(out) + "\n"


#: a runtime-rs handler's Err: hyper closes the connection without an answer
_HANDLER_ERR = Response(drop=True)

_SPECIAL_FIELDS = ("special_fields: SpecialFields { unknown_fields: UnknownFields { fields: None }, "
                   "cached_size: CachedSize { size: 0 } }")
_UNIT_NAMES = {0: "UNKNOWN", 1: "BYTES", 2: "INODES"}


def _rust_debug_str(s: str) -> str:
    """``format!("{:?}", s)`` for a Rust str: quotes, backslash escapes, \\u{..} for controls."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\n\r\t\0":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}[c])
        elif ord(c) < 0x20 or ord(c) == 0x7f:
            out.append(f"\\u{{{ord(c):x}}}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def volume_stats_debug(usage: list[tuple[int, int, int, int]], abnormal: bool = False, message: str = "") -> str:
    """runtime-rs's ``/direct-volume/stats`` body: ``format!("Usage: {:?} Volume Condition: {:?}",
    result.usage(), result.volume_condition())`` over rust-protobuf 3 messages (derived Debug,
    ``special_fields`` last; an unset volume_condition prints its default instance).
    ``usage`` holds (available, total, used, unit number) tuples."""
    entries = ", ".join(
        f"VolumeUsage {{ available: {a}, total: {t}, used: {u}, unit: {_UNIT_NAMES.get(unit, unit)}, "
        f"{_SPECIAL_FIELDS} }}" for a, t, u, unit in usage)
    return (f"Usage: [{entries}] Volume Condition: VolumeCondition {{ abnormal: {str(bool(abnormal)).lower()}, "
            f"message: {_rust_debug_str(message)}, {_SPECIAL_FIELDS} }}")


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class ShimFleet:
    """Many ShimServers at once (benches, `top` tests): ``with ShimFleet(specs) as f``.

    ``specs`` is a list of (socket_path, kwargs) pairs.
    """

    def __init__(self, specs: list[tuple[str, dict]]):
        self.servers = [ShimServer(p, **kw) for p, kw in specs]

    def __enter__(self):
        for s in self.servers:
            s.start()
        return self

    def __exit__(self, *exc):
        for s in self.servers:
            s.stop()
