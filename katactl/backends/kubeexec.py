"""The Kubernetes NodeTransport (``--via kube``): a node reached through ``pods/exec`` into a
privileged node pod (hostPID, the host's / at /host) — a katactl node agent DaemonSet pod, or an
ephemeral pod like ``kubectl debug node`` (katactl.nodeagent finds or creates it).

The node-side logic is RemoteTransport's (remote.py), shared with the SSH transport: argv
execution, streams through ``cat``/``tail``, the python3 unix-socket relay for shim, QMP, Cloud
Hypervisor and Firecracker sockets. Here is the channel: one WebSocket per exec, and file access
through one long-lived node-side helper (HELPER below, ``python3 -I -S``) per transport that
serves batched reads, stats, directory scans and atomic writes over its stdin/stdout (the
counterpart of the SSH transport's pipelined SFTP: a command costs a few round trips, not one
exec per file). Paths are mapped to ``/host<path>`` (``--host-root`` overrides /host). The
helper's source (4 KB) goes on its stdin behind a short bootstrap (HELPER_ARGV): in the exec
URL, percent-encoded, it made a 9.2 KB request line, over the 8 KB that an HTTP-terminating
front's default allows (nginx ``large_client_header_buffers 4 8k``: 414).

``run`` and streams run their argv under remote.py's GUARD, the SSH transport's, with the exec's
stdin held open as its lifeline: the kubelet does not end an exec whose client went away (the
runtime only closes its stdin: containerd pkg/cri/server/container_execsync.go execInternal;
kubernetes/kubernetes#89031), so the guard ends a command katactl gave up on (a timeout,
Ctrl-C, SIGTERM, a stream closed or dropped early, katactl killed) when that stdin closes.

Wire protocol (kubernetes-ops.md): ``GET .../pods/{pod}/exec?command=...`` upgraded to a
WebSocket offering ``v5.channel.k8s.io`` then ``v4.channel.k8s.io`` (kube-apiserver 1.30+
translates only v5; older servers hand the upgrade to the kubelet, which speaks v4). Messages are
``[channel] + data``: 0 stdin, 1 stdout, 2 stderr, 3 status (a metav1.Status whose
``details.causes`` carry the exit code). v5 half-closes stdin with ``[255, 0]``; v4 cannot, so on
v4 a command given input runs under a small feeder that reads exactly that many bytes and closes
the command's stdin itself.

Why websocket-client (the ``websocket`` module) and not the kubernetes package's ``stream`` or
httpx-ws:
- correctness: ``kubernetes.stream`` offers only v4 before client 36 (no half-close: a command
  reading stdin to EOF never ends) and buffers every channel's data in memory (a 1 GiB vmcore
  would be held whole); httpx-ws reads in a background thread into a queue (bounded only by
  message count x 64 KiB default message size) over anyio. websocket-client is synchronous: a
  frame is read only when the caller asks for bytes, so TCP flow control reaches the node and a
  stream's memory is one frame.
- start-up cost: ``kubernetes.stream`` pulls in the generated client (~0.6 s, python-cli.md);
  websocket-client costs ~4 ms on top of httpx (which the API client already loads) and is
  already installed as a dependency of the kubernetes package (declared explicitly in
  pyproject.toml because katactl imports it). It is imported only when a node is contacted.

Every WebSocket is pinged every 5 s (PING_PERIOD, as client-go's executor): a quiet command
(makedumpfile, a helper idle between calls) outlives a load balancer's idle timeout. The pinger
holds its channel weakly: a channel dropped without close() (a stream never read) is still
collected, which shuts its socket and so ends its node command (through GUARD, below). A helper stream found closed
before a request is written is replaced, for a mutation too (nothing of it was sent), except
in the middle of an atomic write: its wdata already went on the closed stream, so the write
fails and nothing more of it is sent (write_stream_atomic).

Each WebSocket's socket is katactl's own (:func:`_dial`), through the kube client's proxy
decision (kube.proxy_for), as kubectl's exec connects: an HTTP CONNECT tunnel, TLS inside it.

Errors: 403 on the upgrade -> AuthError (exit 7) naming ``create pods/exec``; the pod gone (404)
or not running -> the pod is looked up again (a DaemonSet replaces it; an ephemeral pod is
recreated) and the exec retried once; the API unreachable -> UnreachableError (7); an exec
stream cut before its status -> UnreachableError (7) for that call. What the kubelet side
answers comes before the upgrade (v4: 400 "container not found", 500 "error dialing backend")
or, from kube-apiserver >= 1.30's v5 translator, after it as an InternalError status on channel
3 (_kubelet_failure): the same two cases are told apart there -- the exec never started, so it
is sent again on the replacement pod, a helper mutation too.
"""
from __future__ import annotations

import errno
import json
import os
import posixpath
import select
import socket
import struct
import threading
import time
import weakref
from typing import Iterable, Sequence
from urllib.parse import quote

from katactl.backends.base import FileStat
from katactl.backends.kube import KubeAPI, seg
from katactl.backends.remote import RemoteTransport, _check_argv, _check_root, stale_tmps
from katactl.errors import (AuthError, KatactlError, OperationFailed, ProtocolError, TimeoutExpired,
                            UnreachableError, UsageError)

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, STATUS, CLOSE = 0, 1, 2, 3, 255
SEND_CHUNK = 256 << 10          # stdin bytes per WebSocket message
STDERR_KEEP = 64 << 10          # stderr bytes kept per exec (the end of it)
CONTAINER = "agent"
# client-go's WebSocket executor pings every 5 s (tools/remotecommand/websocket.go pingPeriod,
# heartbeat): an exec quiet for longer than a load balancer's idle timeout is not cut
PING_PERIOD = 5.0

# Runs argv with exactly N bytes of our stdin as its stdin, then EOF (v4 has no half-close).
FEED = r"""
import os, subprocess, sys
n = int(sys.argv[1])
try:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE)
except FileNotFoundError:
    sys.stderr.write("%s: command not found\n" % sys.argv[2]); sys.exit(127)
while n > 0:
    b = os.read(0, min(n, 1 << 20))
    if not b:
        break
    n -= len(b)
    try:
        p.stdin.write(b)
    except BrokenPipeError:
        pass
try:
    p.stdin.close()
except BrokenPipeError:
    pass
sys.exit(p.wait() & 255)
""".strip()

# The node-side file helper: requests and replies are framed as
# [u32 header length][JSON header][payload of header["n"] bytes]. Errors are per path:
# {"e": errno, "m": strerror}. Paths arrive already under the host root. At stdin EOF (katactl
# gone, the stream cut) it removes the temp files of the writes it still has open.
HELPER = r"""
import errno, json, os, stat, struct, sys
rd, wr = sys.stdin.buffer, sys.stdout.buffer
w = {}
def get(n):
    b = rd.read(n)
    if len(b) < n:
        for x in w.values():
            try: os.close(x[0]); os.unlink(x[2])
            except OSError: pass
        sys.exit(0)
    return b
def put(h, payload=b""):
    h["n"] = len(payload)
    j = json.dumps(h).encode()
    wr.write(struct.pack(">I", len(j)) + j)
    if payload:
        wr.write(payload)
    wr.flush()
def err(e):
    return {"e": e.errno or errno.EIO, "m": e.strerror or str(e)}
def st(s):
    return [s.st_size, s.st_mtime, s.st_mode, s.st_uid]
def fsyncdir(p):
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
while True:
    h = json.loads(get(struct.unpack(">I", get(4))[0]))
    data = get(h["n"]) if h.get("n") else b""
    op = h["op"]
    try:
        if op == "read":
            out, parts, lim = [], [], h.get("limit")
            for p in h["paths"]:
                try:
                    with open(p, "rb") as f:
                        b = f.read() if lim is None else f.read(lim)
                    out.append({"n": len(b)}); parts.append(b)
                except OSError as e:
                    out.append(err(e))
            put({"r": out}, b"".join(parts))
        elif op == "stat":
            out = []
            for p in h["paths"]:
                try:
                    out.append({"s": st(os.stat(p) if h["follow"] else os.lstat(p))})
                except OSError as e:
                    out.append(err(e))
            put({"r": out})
        elif op == "scan":
            out = []
            for p in h["paths"]:
                try:
                    ents = []
                    with os.scandir(p) as it:
                        for e in it:
                            s = e.stat(follow_symlinks=False)
                            if h["follow"] and stat.S_ISLNK(s.st_mode):
                                try:
                                    s = os.stat(e.path)
                                except OSError:
                                    pass
                            ents.append([e.name] + st(s) + [e.is_symlink()])
                    out.append({"d": ents})
                except OSError as e:
                    out.append(err(e))
            put({"r": out})
        elif op == "readlink":
            put({"v": os.readlink(h["path"])})
        elif op == "statvfs":
            s = os.statvfs(h["path"])
            put({"v": s.f_bavail * s.f_frsize})
        elif op == "mkdir":
            os.mkdir(h["path"], h["mode"]); put({})
        elif op == "unlink":
            os.unlink(h["path"]); put({})
        elif op == "rename":
            os.rename(h["src"], h["dst"]); fsyncdir(os.path.dirname(h["dst"]) or "/"); put({})
        elif op == "fsyncdir":
            if not os.path.isdir(h["path"]):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            fsyncdir(h["path"]); put({})
        elif op == "wopen":
            fd = os.open(h["tmp"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            w[h["id"]] = [fd, None, h["tmp"]]; put({})
        elif op == "wdata":
            x = w.get(h["id"])
            if x is not None and x[1] is None:
                try:
                    mv = memoryview(data)
                    while mv:
                        mv = mv[os.write(x[0], mv):]
                except OSError as e:
                    x[1] = e
        elif op == "wdone":
            if h["id"] not in w:
                raise OSError(errno.EBADF, "no write %s open in this helper" % h["id"])
            fd, e, _ = w.pop(h["id"])
            try:
                if e is not None:
                    raise e
                if h["commit"]:
                    os.fchmod(fd, h["mode"]); os.fsync(fd)
            except OSError as e2:
                os.close(fd)
                try: os.unlink(h["tmp"])
                except OSError: pass
                raise e2
            os.close(fd)
            if h["commit"]:
                os.rename(h["tmp"], h["dst"]); fsyncdir(os.path.dirname(h["dst"]) or "/")
            else:
                try: os.unlink(h["tmp"])
                except OSError: pass
            put({})
        else:
            put({"e": errno.ENOSYS, "m": "unknown op " + op})
    except OSError as e:
        if op != "wdata":
            put(err(e))
""".strip()
_HELPER_SRC = HELPER.encode()
#: the helper's exec: a bootstrap that reads the source from stdin (sent first, _helper_chan), so
#: the request line stays short (module docstring)
HELPER_ARGV = ("python3", "-I", "-S", "-c", f"import sys;exec(sys.stdin.buffer.read({len(_HELPER_SRC)}))")


def _kubelet_failure(status: dict) -> str | None:
    """Why an exec never started, from a status without an exit code: "gone" (the pod's
    container is not running: the pod is looked up again), "unreachable" (the API server cannot
    reach the kubelet), else None. kube-apiserver >= 1.30's v5 StreamTranslatorHandler answers
    the 101 first and only then execs at the kubelet over SPDY; that failing is written as
    apierrors.NewInternalError(err) on channel 3 (staging/src/k8s.io/apiserver/pkg/util/proxy/
    streamtranslator.go ServeHTTP), where older servers answered the upgrade with a 400 / 500."""
    if _status_rc(status) is not None or status.get("reason") != "InternalError":
        return None
    msg = str(status.get("message") or "")
    if "executable file not found" in msg:
        return None
    if "container not found" in msg or "not running" in msg or ('pods "' in msg and "not found" in msg):
        return "gone"
    if any(w in msg for w in ("error dialing backend", "dial tcp", "connection refused", "no route to host",
                              "i/o timeout")):
        return "unreachable"
    return None


def _status_rc(status: dict) -> int | None:
    """The exit code a v4/v5 status message carries (None: an exec failure without one)."""
    if status.get("status") == "Success":
        return 0
    for c in ((status.get("details") or {}).get("causes") or []):
        if c.get("reason") == "ExitCode":
            try:
                return int(c.get("message"))
            except (TypeError, ValueError):
                return None
    return None


class WSChannel:
    """One exec over a WebSocket, with paramiko Channel's interface (see remote.py)."""

    hold_stdin = False  # True: the command runs under remote.GUARD, stdin is its lifeline

    def __init__(self, ws, argv, what: str, node: str = "", reopen=None):
        self.ws = ws
        self.argv = argv
        self.what = what
        self.node = node
        self.protocol = ws.subprotocol or ""
        # a new WebSocket for the same exec on the replacement pod: used once, when the exec
        # is found never to have started (the pod's container is gone) before anything was sent
        self._reopen = reopen
        self._got_data = False
        self._sent = False
        self._out = b""
        self._err = bytearray()
        self._status: dict | None = None
        self._ended = False
        self._closed = False
        self._wclosed = False
        self._timeout: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The pinger holds the channel only weakly: a channel nobody closed (a stream generator
        # dropped unread) is still collected, which stops the pinger and shuts the socket, so
        # the exec ends (the kubelet sees the connection go) rather than being kept alive.
        self._fin = self._finalizer(ws)
        threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop), name="katactl-ws-ping",
                         daemon=True).start()

    def _finalizer(self, ws) -> weakref.finalize:
        fin = weakref.finalize(self, _release, self._stop, ws)
        fin.atexit = False
        return fin

    def idle_dead(self) -> bool:
        """Whether this stream, with no request outstanding, has ended (the server or a hop
        closed it): anything but a ping/pong arriving unasked means it is unusable. Between
        requests nothing of ours is in flight on it, so a request may go on a new one, a
        mutation too (not the rest of an atomic write: write_stream_atomic pins its stream)."""
        import websocket

        if self._ended or self._closed or self._status is not None or self._out:
            return True
        while True:
            sock = self.ws.sock
            if sock is None:
                return True
            try:
                if not ((hasattr(sock, "pending") and sock.pending()) or select.select([sock], [], [], 0)[0]):
                    return False
                op, _ = self.ws.recv_data_frame(True)
            except (websocket.WebSocketException, OSError, ValueError):
                return True
            if op not in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
                return True

    # -- reading -----------------------------------------------------------------------
    def _read_message(self) -> None:
        """Read one message and file its data; sets _ended at the close or connection end."""
        import websocket

        try:
            op, data = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            raise socket.timeout("timed out") from None
        except socket.timeout:
            raise
        except (websocket.WebSocketConnectionClosedException, OSError, ConnectionError) as e:
            self._ended = True
            if self._status is None:
                raise UnreachableError(f"{self.what}: the exec stream was cut ({e or type(e).__name__})") from None
            return
        except websocket.WebSocketException as e:
            self._ended = True
            raise ProtocolError(f"{self.what}: bad WebSocket data from the API server: {e}") from None
        if op == 0x8:  # close
            self._ended = True
            return
        if not data:
            return
        ch = data[0]
        if ch == STDOUT:
            if len(data) > 1:
                self._got_data = True
                self._out = data[1:] if not self._out else self._out + data[1:]
        elif ch == STDERR:
            self._got_data = self._got_data or len(data) > 1
            self._err += data[1:]
            if len(self._err) > STDERR_KEEP:
                del self._err[:-STDERR_KEEP]
        elif ch == STATUS and len(data) > 1:
            try:
                self._status = json.loads(data[1:])
            except ValueError:
                self._status = {"status": "Failure", "message": data[1:200].decode("utf-8", "replace")}
            if (self._reopen is not None and not self._got_data and not self._sent
                    and _kubelet_failure(self._status) == "gone"):
                self._adopt()

    def _adopt(self) -> None:
        """The same exec again on a new WebSocket (the replacement pod's): nothing was sent or
        received on this one, and the command never started."""
        reopen, self._reopen = self._reopen, None
        ws = reopen()
        old, self.ws = self.ws, ws
        self._fin.detach()
        self._fin = self._finalizer(ws)
        try:
            old.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self.protocol = ws.subprotocol or ""
        self._status = None
        self._ended = False
        ws.settimeout(self._timeout)
        if self._wclosed and self.protocol.startswith("v5"):
            self._wclosed = False
            self.shutdown_write()

    def recv(self, n: int) -> bytes:
        while not self._out:
            if self._ended or self._status is not None:
                return b""  # the status comes after all output
            self._read_message()
        b, self._out = self._out[:n], self._out[n:]
        return b

    def recv_all_until_end(self, deadline: float | None) -> tuple[bytes, bytes]:
        out = []
        while True:
            if self._out:
                out.append(self._out)
                self._out = b""
            if self._ended or self._status is not None:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                self.settimeout(left)
            self._read_message()
        if self._out:
            out.append(self._out)
            self._out = b""
        return b"".join(out), bytes(self._err)

    def recv_exit_status(self) -> int:
        while self._status is None and not self._ended:
            self._read_message()
            self._out = b""  # (only called once stdout has ended)
        if self._status is None:
            raise UnreachableError(f"{self.what}: the exec stream ended without an exit status")
        rc = _status_rc(self._status)
        if rc is None:
            msg = str(self._status.get("message") or "exec failed")
            why = _kubelet_failure(self._status)
            if why == "gone":
                raise _PodGone(f"{self.what}: the node pod's container is not running: {msg}")
            if why == "unreachable":
                raise UnreachableError(f"node {self.node}: the API server cannot reach its kubelet: {msg}")
            if "executable file not found" in msg or "no such file or directory" in msg.lower():
                self._err += (msg + "\n").encode()
                return 127
            raise OperationFailed(f"{self.what}: {msg}")
        return rc

    def recv_stderr(self, n: int) -> bytes:
        b = bytes(self._err[:n])
        del self._err[:n]
        return b

    # -- writing -----------------------------------------------------------------------
    def sendall(self, data: bytes) -> None:
        import websocket

        mv = memoryview(data)
        self._sent = self._sent or len(mv) > 0
        try:
            for off in range(0, len(mv), SEND_CHUNK):
                self.ws.send_bytes(b"\x00" + bytes(mv[off:off + SEND_CHUNK]))
        except websocket.WebSocketTimeoutException:
            raise socket.timeout("timed out") from None
        except (websocket.WebSocketException, OSError) as e:
            raise BrokenPipeError(f"{self.what}: the exec stream is closed ({e or type(e).__name__})") from None

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def shutdown_write(self) -> None:
        if self._wclosed:
            return
        self._wclosed = True
        if self.protocol.startswith("v5"):
            try:
                self.ws.send_bytes(bytes([CLOSE, STDIN]))
            except Exception:  # noqa: BLE001 - the read side reports what happened
                pass

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self.shutdown_write()

    # -- socket-ish --------------------------------------------------------------------
    def settimeout(self, t: float | None) -> None:
        self._timeout = t
        self.ws.settimeout(t)

    def gettimeout(self):
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "a WebSocket exec channel has no file descriptor to poll")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            if self.ws.connected:
                self.ws.settimeout(1.0)
                self.ws.send_close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.ws.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self._fin.detach()


def _heartbeat(ref, stop: threading.Event) -> None:
    # the WebSocket sends under its own lock (enable_multithread); the pong is read and dropped
    # by whichever recv comes next. Between pings only the weak reference is held.
    while not stop.wait(PING_PERIOD):
        chan = ref()
        if chan is None:
            return
        ws = chan.ws
        del chan
        try:
            ws.ping()
        except Exception:  # noqa: BLE001 - the reading side reports a dead stream
            return


def _release(stop: threading.Event, ws) -> None:
    """A WSChannel collected without close(): stop its pinger, shut its socket."""
    stop.set()
    try:
        ws.shutdown()
    except Exception:  # noqa: BLE001
        pass


#: one kubeconfig load at a time: the kubernetes loader registers certificate-authority-data's
#: temp file in its per-process cache before writing it (kube_config.py,
#: _create_temp_file_with_content), so a node's transport opened concurrently with another
#: could read the empty file ("[X509: NO_CERTIFICATE_OR_CRL_FOUND]": that node failed)
_KUBECONFIG_LOCK = threading.Lock()
#: the last load (key, when, KubeAPI's arguments): the transports of one fan-out share it (a load is two
#: pure-Python YAML parses, ~4.5 ms of CPU: 0.15 s for 32 nodes); older than this, or another
#: kubeconfig (path, file times and sizes, context, namespace), and it is loaded again, so a
#: long --watch picks up rotated credentials
_LOADED_FOR = 5.0
_loaded: tuple | None = None


def _kubeconfig_key(settings) -> tuple:
    path = settings.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    files: list[tuple[str, int | None, int | None, int | None]] = []
    for f in path.split(os.pathsep):
        try:
            st = os.stat(os.path.expanduser(f))
            files.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            files.append((f, None, None, None))
    return (tuple(files), settings.context, settings.namespace, settings.request_timeout)


def _api(settings) -> KubeAPI:
    """A KubeAPI (its own connection pool) for one node's transport, from the kubeconfig as
    loaded for this fan-out."""
    global _loaded
    key = _kubeconfig_key(settings)
    with _KUBECONFIG_LOCK:
        now = time.monotonic()
        if _loaded is not None and _loaded[0] == key and now - _loaded[1] < _LOADED_FOR:
            host, headers, tls, timeout, user, namespace = _loaded[2]
            return KubeAPI(host, headers, tls, timeout, user=user, namespace=namespace)
        api = KubeAPI.from_settings(settings)
        _loaded = (key, now, (api.host, api.headers, api.tls, api.timeout, api.user, api.namespace))
        return api


def _check_proxy(proxy: str) -> str:
    scheme = proxy.partition("://")[0]
    if scheme != "http":
        # TLS to the proxy would put TLS inside TLS, which a socket cannot carry; SOCKS5 needs a
        # client katactl does not ship: the API client's requests (httpx) can use both
        raise UsageError(f"proxy {proxy!r}: --via kube reaches pods/exec through an http:// "
                         f"(HTTP CONNECT) proxy only, not {scheme}://")
    return proxy


def _dial(server: str, proxy: str | None, tls, timeout: float) -> socket.socket:
    """A socket to the API server for one pods/exec WebSocket, dialled as kubectl dials it.
    ``proxy`` is the kube client's decision (kube.proxy_for: the cluster's proxy-url, else
    HTTPS_PROXY/HTTP_PROXY less NO_PROXY and loopback). client-go's WebSocket executor dials
    through gorilla/websocket, whose proxy dialer (gorilla/websocket proxy.go httpProxyDialer)
    opens an HTTP CONNECT tunnel to the server's host:port whatever the scheme, with the proxy
    URL's user as Proxy-Authorization Basic; TLS to the API server then runs inside the tunnel,
    its certificate checked against the server's own name."""
    from urllib.parse import unquote, urlsplit

    u = urlsplit(server)
    host = u.hostname or ""
    port = u.port or (443 if u.scheme == "https" else 80)
    if proxy is None:
        sock = socket.create_connection((host, port), timeout)
    else:
        p = urlsplit(_check_proxy(proxy))
        sock = socket.create_connection((p.hostname or "", p.port or 80), timeout)
        try:
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            req = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            if p.username is not None:
                import base64

                cred = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
                req += f"Proxy-Authorization: Basic {base64.b64encode(cred).decode()}\r\n"
            sock.sendall((req + "\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:  # the proxy says nothing more until we do (TLS or the upgrade)
                chunk = sock.recv(4096)
                if not chunk or len(head) > 65536:
                    raise UnreachableError(f"proxy {p.hostname}:{p.port or 80}: CONNECT {target}: "
                                           "connection closed before an answer")
                head += chunk
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].startswith("2"):
                raise UnreachableError(f"proxy {p.hostname}:{p.port or 80}: CONNECT {target}: {status}")
        except BaseException:
            sock.close()
            raise
    # as Go's dialer (net: TCPConn NoDelay by default) and ssh.py: a small frame sent right
    # after another (a write's wdata then its wdone, the helper's source then its first
    # request) otherwise waits for the peer's delayed ACK, 40 ms each
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if u.scheme == "https":
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    return sock


class KubeExecTransport(RemoteTransport):
    """NodeTransport for a Kubernetes node through pods/exec into its node pod."""

    def __init__(self, node: str, api: KubeAPI, agent, host_root: str = "/host", timeout: float = 30.0):
        self.node = node
        self.api = api
        self.agent = agent                # katactl.nodeagent.AgentPod (namespace, name, container)
        self.host_root = _check_root(host_root) if host_root else ""
        self.timeout = timeout
        self._helper: WSChannel | None = None
        self._helper_lock = threading.RLock()
        self._wid = 0
        self._protocol: str | None = None  # the subprotocol the server chose (v5 or v4)
        self._swept_dirs: set[str] = set()

    @classmethod
    def from_settings(cls, node: str, settings) -> "KubeExecTransport":
        from katactl import nodeagent

        api = _api(settings)
        try:
            if api.proxy:
                _check_proxy(api.proxy)  # before any node is touched: exit 2, not a per-node error
            agent = nodeagent.agent_pod(api, settings, node)
            root = settings.host_root or "/host"
            t = cls(node, api, agent, root, float(settings.request_timeout or 30.0))
        except BaseException:
            api.close()
            raise
        if settings.host_root:
            try:
                t._check_host_root()
            except BaseException:
                t.close()
                raise
        return t

    def _check_host_root(self) -> None:
        """A --host-root that is not a directory in the node pod is a usage error (exit 2), as
        the local transport says (fleet.open_transport), not an empty answer."""
        import stat as st

        h, _ = self._call({"op": "stat", "paths": [self.host_root], "follow": True})
        [r] = self._answers(h, [self.host_root])
        if "e" in r:
            why = os.strerror(int(r["e"])) if r["e"] != errno.ENOENT else "no such directory"
        elif not st.S_ISDIR(r["s"][2]):
            why = "not a directory"
        else:
            return
        raise UsageError(f"--host-root {self.host_root}: {why} in node pod "
                         f"{self.agent.namespace}/{self.agent.name} on {self.node}")

    # -- the channel ---------------------------------------------------------------------
    def _exec_channel(self, argv, timeout=None) -> WSChannel:
        try:
            ws = self._open_ws(argv, timeout)
        except _PodGone:
            ws = self._reopen_ws(argv, timeout)
            reopen = None
        else:
            def reopen():
                return self._reopen_ws(argv, timeout)
        chan = WSChannel(ws, argv, f"{argv[0]} on {self.node}", self.node, reopen)
        self._protocol = chan.protocol
        chan.settimeout(self.timeout if timeout is None else timeout)
        return chan

    def _replace_pod(self) -> None:
        from katactl import nodeagent

        self.agent = nodeagent.replace_agent_pod(self.api, self.agent)

    def _reopen_ws(self, argv, timeout):
        """The exec's WebSocket on the node pod's replacement (the pod is gone or not running)."""
        self._replace_pod()
        try:
            return self._open_ws(argv, timeout)
        except _PodGone:
            raise UnreachableError(f"the node pod {self.agent.namespace}/{self.agent.name} on {self.node} "
                                   "went away and its replacement did not answer") from None

    def _open_ws(self, argv, timeout):
        import websocket

        # the dial and the upgrade are API requests: --request-timeout bounds them, whatever
        # the command's own (longer) wait; the stream then runs under the command's timeout
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        q = [("command", a) for a in argv] + [("container", self.agent.container),
                                               ("stdin", "true"),
                                               ("stdout", "true"), ("stderr", "true"), ("tty", "false")]
        path = (f"/api/v1/namespaces/{seg(self.agent.namespace)}/pods/{seg(self.agent.name)}/exec?"
                + "&".join(f"{k}={quote(os.fsencode(v), safe=b'')}" for k, v in q))
        host = self.api.host
        url = ("wss://" + host[len("https://"):] if host.startswith("https://")
               else "ws://" + host[len("http://"):] if host.startswith("http://") else host) + path
        # current credentials on every upgrade, as client-go's tools/remotecommand/websocket.go
        # RoundTripperFor wraps the exec-auth round tripper (plugin/pkg/client/auth/exec/exec.go,
        # which renews after a 401 for the next request); a 401 is then tried once more with the
        # renewed ones, as KubeAPI._send does for every API request
        for again in (False, True):
            auth = self.api.authorization()
            headers = [f"Authorization: {auth}"] if auth else []
            ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=True)
            try:
                # our socket: websocket-client would otherwise apply its own reading of the proxy
                # environment, not the kube client's (kubectl's) decision
                sock = _dial(host, self.api.proxy, self.api.tls, timeout)
                ws.connect(url, header=headers, subprotocols=list(PROTOCOLS), timeout=timeout,
                           suppress_origin=True, socket=sock)
                break
            except websocket.WebSocketBadStatusException as e:
                ws.shutdown()
                if e.status_code == 401 and not again and self.api.renew_authorization(auth):
                    continue  # a 401 means the server did nothing: safe to upgrade again
                raise self._upgrade_error(e) from None
            except (websocket.WebSocketTimeoutException, TimeoutError):
                ws.shutdown()
                # the API server silent: unreachable (7), as KubeAPI says of a REST call
                raise UnreachableError(f"Kubernetes API {host}: pods/exec did not answer within {timeout:g}s") \
                    from None
            except KatactlError:
                ws.shutdown()
                raise
            except (OSError, websocket.WebSocketException) as e:
                ws.shutdown()
                raise UnreachableError(f"Kubernetes API {host}: pods/exec: {e or type(e).__name__}") from None
        if ws.subprotocol not in PROTOCOLS:
            ws.shutdown()
            raise ProtocolError(f"Kubernetes API {host}: pods/exec answered subprotocol {ws.subprotocol!r} "
                                f"(katactl speaks {', '.join(PROTOCOLS)})")
        return ws

    def _upgrade_error(self, e) -> KatactlError:
        code = e.status_code
        try:
            body = json.loads(e.resp_body or b"{}")
        except ValueError:
            body = {"message": (e.resp_body or b"")[:200].decode("utf-8", "replace")}
        msg = body.get("message") or f"HTTP {code}"
        pod = f"{self.agent.namespace}/{self.agent.name}"
        if code in (401, 403):
            who = f"user {self.api.user!r}" if self.api.user else "this kubeconfig's user"
            return AuthError(f"Kubernetes API: {'Unauthorized' if code == 401 else 'Forbidden'}: {who} cannot "
                             f"create pods/exec (pod {pod}): {msg}",
                             hint="reaching nodes with --via kube needs get and create on pods/exec "
                                  f"in namespace {self.agent.namespace} (create since Kubernetes 1.35)")
        if code == 404 or (code == 400 and ("not found" in msg or "not running" in msg)):
            return _PodGone(msg)
        if code >= 500:
            return UnreachableError(f"node {self.node}: the API server cannot reach its kubelet: {msg}")
        return OperationFailed(f"Kubernetes API: pods/exec on {pod}: HTTP {code}: {msg}")

    def _communicate(self, chan: WSChannel, argv, input, timeout):
        deadline = time.monotonic() + timeout
        try:
            if input:
                chan.settimeout(timeout)
                chan.sendall(input)
            if not chan.hold_stdin:  # a guarded command's stdin is its lifeline: kept open
                chan.shutdown_write()
            out, _ = chan.recv_all_until_end(deadline)
            rc = chan.recv_exit_status()
        except socket.timeout:
            raise TimeoutExpired(f"{argv[0]} did not finish within {timeout:g}s") from None
        return out, chan.recv_stderr(STDERR_KEEP), rc

    def run(self, argv: Sequence[str], timeout: float | None = None,
            input: bytes | None = None, raw: bool = False):
        argv = _check_argv(argv)
        if input:
            return self._run_with_input(argv, timeout, input, raw)
        return super().run(argv, timeout, None, raw)

    def _run_with_input(self, argv, timeout, input: bytes, raw: bool):
        timeout = self.timeout if timeout is None else timeout
        for attempt in (0, 1):
            try:
                return self._run_input_once(argv, timeout, input, raw)
            except _PodGone:
                if attempt:
                    raise
                self._replace_pod()  # the command never started: its input went nowhere
        raise AssertionError("unreachable")

    def _run_input_once(self, argv, timeout, input: bytes, raw: bool):
        from katactl.backends.base import RunResult

        if self._protocol is None:
            with self._helper_lock:
                self._helper_chan()  # learns the server's subprotocol on an exec that is kept
        feed = ("python3", "-I", "-S", "-c", FEED, str(len(input)), *argv)
        # no half-close on v4: a feeder gives the command exactly these bytes, then EOF; argv
        # is never started bare first (it would run twice)
        chan = self._exec_channel(argv if (self._protocol or "").startswith("v5") else feed, timeout)
        if not chan.protocol.startswith("v5") and chan.argv is not feed:
            chan.close()  # the server changed to v4 since: stdin could never end, nothing is done
            raise UnreachableError(f"node {self.node}: the API server changed to {chan.protocol} "
                                   "during the run; try again")
        try:
            out, err, rc = self._communicate(chan, argv, input, timeout)
        finally:
            chan.close()
        if rc == 127 and not raw:
            raise FileNotFoundError(errno.ENOENT, f"{argv[0]}: command not found on {self.node}", argv[0])
        return RunResult(argv, rc, out, err)

    # -- the file helper -----------------------------------------------------------------
    def _helper_chan(self) -> WSChannel:
        if self._helper is not None and self._helper.idle_dead():
            self._drop_helper()  # cut while idle: nothing was sent on it, a new one is safe
        if self._helper is None:
            chan = self._exec_channel(HELPER_ARGV, self.timeout)
            chan.settimeout(self.timeout)
            self._helper = chan
            chan.sendall(_HELPER_SRC)  # what HELPER_ARGV's bootstrap reads, then the requests
        return self._helper

    def _drop_helper(self) -> None:
        h, self._helper = self._helper, None
        if h is not None:
            h.close()

    def _send_req(self, chan: WSChannel, header: dict, payload: bytes = b"") -> None:
        header["n"] = len(payload)
        j = json.dumps(header).encode()
        chan.sendall(struct.pack(">I", len(j)) + j + payload)

    def _read_exact(self, chan: WSChannel, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            b = chan.recv(n - got)
            if not b:
                if chan._status is not None:
                    rc = chan.recv_exit_status()  # raises what the status says went wrong
                    err = chan.recv_stderr(STDERR_KEEP).decode("utf-8", "replace").strip()
                    raise UnreachableError(f"the file helper on {self.node} stopped (exit {rc}"
                                           f"{': ' + err[-500:] if err else ''})")
                raise UnreachableError(f"the file helper on {self.node} stopped")
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def _reply(self, chan: WSChannel) -> tuple[dict, bytes]:
        (n,) = struct.unpack(">I", self._read_exact(chan, 4))
        h = json.loads(self._read_exact(chan, n))
        return h, (self._read_exact(chan, h["n"]) if h.get("n") else b"")

    def _call(self, header: dict, payload: bytes = b"", *, idempotent: bool = True) -> tuple[dict, bytes]:
        """One request to the helper. A read is retried once on a new helper (a cut stream, a
        replaced pod); a mutation is not (it may have happened)."""
        with self._helper_lock:
            for attempt in (0, 1):
                chan = None
                try:
                    chan = self._helper_chan()
                    self._send_req(chan, header, payload)
                    return self._reply(chan)
                except _PodGone:
                    # the helper never started (its pod's container is gone): nothing was done,
                    # so the request goes to the replacement pod's helper, a mutation too
                    self._drop_helper()
                    if attempt or (not idempotent and chan is not None and chan._got_data):
                        raise
                    self._replace_pod()
                except socket.timeout:
                    self._drop_helper()
                    raise TimeoutExpired(f"node {self.node}: the file helper did not answer within "
                                         f"{self.timeout:g}s") from None
                except (UnreachableError, BrokenPipeError) as e:
                    self._drop_helper()
                    if attempt or not idempotent:
                        if isinstance(e, BrokenPipeError):
                            raise UnreachableError(str(e)) from None
                        raise
                except BaseException:
                    self._drop_helper()
                    raise
        raise AssertionError("unreachable")

    def _answers(self, h: dict, items: list[str]) -> list[dict]:
        """The helper's per-path answers, one per path asked (else a ProtocolError, never a
        silently missing path)."""
        r = h.get("r")
        if not isinstance(r, list) or len(r) != len(items):
            raise ProtocolError(f"node {self.node}: the file helper answered "
                                f"{len(r) if isinstance(r, list) else 'no list'} results for {len(items)} paths")
        return r

    @staticmethod
    def _oserr(r: dict, path: str) -> OSError:
        code = int(r.get("e") or errno.EIO)
        return OSError(code, r.get("m") or os.strerror(code), path)

    def _one(self, header: dict, path: str, *, idempotent: bool = True) -> dict:
        h, _ = self._call(header, idempotent=idempotent)
        if "e" in h:
            raise self._oserr(h, path)
        return h

    def read_many(self, paths: Sequence[str], limit: int | None = None) -> dict:
        items = list(dict.fromkeys(paths))
        if not items:
            return {}
        h, payload = self._call({"op": "read", "paths": [self.remote(p) for p in items], "limit": limit})
        out: dict[str, bytes | OSError] = {}
        pos = 0
        for p, r in zip(items, self._answers(h, items), strict=True):
            if "e" in r:
                out[p] = self._oserr(r, p)
            else:
                out[p] = payload[pos:pos + r["n"]]
                pos += r["n"]
        return out

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        v = self.read_many([path], limit)[path]
        if isinstance(v, OSError):
            raise v
        return v

    @staticmethod
    def _fs(v) -> FileStat:
        import stat as st

        size, mtime, mode, uid = v[:4]
        return FileStat(size=size, mtime=float(mtime), mode=mode, is_dir=st.S_ISDIR(mode),
                        is_link=st.S_ISLNK(mode), uid=uid)

    def stat_many(self, paths: Sequence[str], follow_symlinks: bool = True) -> dict:
        items = list(dict.fromkeys(paths))
        if not items:
            return {}
        h, _ = self._call({"op": "stat", "paths": [self.remote(p) for p in items], "follow": follow_symlinks})
        return {p: (self._oserr(r, p) if "e" in r else self._fs(r["s"])) for p, r in zip(items, self._answers(h, items), strict=True)}

    def stat(self, path: str, follow_symlinks: bool = True) -> FileStat:
        v = self.stat_many([path], follow_symlinks)[path]
        if isinstance(v, OSError):
            raise v
        return v

    def scan_dirs(self, paths: Sequence[str], follow_symlinks: bool = True) -> dict:
        items = list(dict.fromkeys(paths))
        if not items:
            return {}
        h, _ = self._call({"op": "scan", "paths": [self.remote(p) for p in items], "follow": follow_symlinks})
        out: dict[str, list[tuple[str, FileStat]] | OSError] = {}
        for p, r in zip(items, self._answers(h, items), strict=True):
            if "e" in r:
                out[p] = self._oserr(r, p)
                continue
            # a followed link is described by its target; a dangling one keeps its lstat
            out[p] = sorted(((e[0], self._fs(e[1:5])) for e in r["d"]), key=lambda x: x[0])
        return out

    def readlink(self, path: str) -> str:
        return self._one({"op": "readlink", "path": self.remote(path)}, path)["v"]

    def statvfs_free(self, path: str) -> int:
        return int(self._one({"op": "statvfs", "path": self.remote(path)}, path)["v"])

    def _mkdir_one(self, path: str, remote: str, mode: int) -> None:
        self._one({"op": "mkdir", "path": remote, "mode": mode}, path, idempotent=False)

    def _unlink(self, path: str, remote: str) -> None:
        self._one({"op": "unlink", "path": remote}, path, idempotent=False)

    def rename(self, src: str, dst: str) -> None:
        """rename(2) on the node, then an fsync of dst's directory (in the helper)."""
        self._one({"op": "rename", "src": self.remote(src), "dst": self.remote(dst)}, src, idempotent=False)

    def fsync_dir(self, path: str) -> None:
        self._one({"op": "fsyncdir", "path": self.remote(path)}, path)

    def write_bytes_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.write_stream_atomic(path, (data,), mode)

    def write_stream_atomic(self, path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
        """A temp file beside path (0600, exclusive), the chunks streamed into it without
        waiting for replies (the WebSocket's flow control bounds what is in flight), then
        chmod, fsync, rename over path and an fsync of the directory, in one reply; then the
        temp files of killed writes beside path are swept, as the SSH transport does.

        The write is pinned to the helper its wopen went to: only that process knows it. If
        that stream goes (a hop cut it, the node pod was deleted), the write fails with
        UnreachableError and nothing more of it goes to a new helper (which would crash on the
        unknown write); its temp file is removed through a new helper (the old one, if still
        alive, removes it too when its stdin ends; killed with its pod, it cannot)."""
        import secrets

        real = self.remote(path)
        tmp = posixpath.join(posixpath.dirname(real), f".katactl-{secrets.token_hex(6)}.tmp")  # TMP_NAME
        with self._helper_lock:
            self._wid += 1
            wid = self._wid
            self._one({"op": "wopen", "id": wid, "tmp": tmp}, path, idempotent=False)
            chan = self._helper  # the one wopen was answered on
            n = 0
            failed: BaseException | None = None  # the chunks' own error (not the stream's)
            try:
                if chan is None:
                    raise UnreachableError(f"the file helper on {self.node} stopped")
                it = iter(chunks)
                while True:
                    try:
                        chunk = next(it)
                    except StopIteration:
                        break
                    except BaseException as e:
                        failed = e
                        break
                    mv = memoryview(chunk)
                    for off in range(0, len(mv), SEND_CHUNK):
                        piece = bytes(mv[off:off + SEND_CHUNK])
                        self._send_req(chan, {"op": "wdata", "id": wid}, piece)
                        n += len(piece)
            except (UnreachableError, BrokenPipeError, socket.timeout) as e:
                raise self._lost_write(path, tmp, e, committing=False) from None
            except BaseException:
                self._drop_helper()  # Ctrl-C mid-frame: the helper removes the temp at its stdin EOF
                raise
            if failed is not None:
                assert chan is not None
                try:  # the stream is sound: the write's own helper aborts it
                    self._on(chan, {"op": "wdone", "id": wid, "tmp": tmp, "commit": False}, path)
                except (KatactlError, OSError):
                    pass  # (_on dropped the helper: at its stdin EOF it removes the temp)
                raise failed
            assert chan is not None
            try:
                self._on(chan, {"op": "wdone", "id": wid, "tmp": tmp, "dst": real, "mode": mode & 0o7777,
                                "commit": True}, path)
            except (UnreachableError, BrokenPipeError, socket.timeout) as e:
                raise self._lost_write(path, tmp, e, committing=True) from None
        self._sweep_stale_tmps(path)
        return n

    def _on(self, chan: WSChannel, header: dict, path: str) -> dict:
        """One request on this helper stream, not on a replacement (a write's wdone)."""
        try:
            self._send_req(chan, header)
            h, _ = self._reply(chan)
        except BaseException:
            self._drop_helper()
            raise
        if "e" in h:
            raise self._oserr(h, path)
        return h

    def _lost_write(self, path: str, tmp: str, e: BaseException, *, committing: bool) -> KatactlError:
        """The error of a write whose helper stream went, after its temp file was removed
        through a new helper (best effort: the next write's sweep gets what is left)."""
        self._drop_helper()
        removed = False  # True: the temp was there, so the write was not committed
        try:
            h, _ = self._call({"op": "unlink", "path": tmp}, idempotent=False)
            removed = "e" not in h  # ENOENT: the old helper removed it at its stdin EOF, or committed
        except (KatactlError, OSError):
            pass
        why = "timed out" if isinstance(e, socket.timeout) else "was cut"
        done = ("it may or may not have been replaced" if committing and not removed
                else "it was not written")
        cls = TimeoutExpired if isinstance(e, socket.timeout) else UnreachableError
        return cls(f"node {self.node}: the file helper's exec stream {why} while writing {path}: {done}")

    def _sweep_stale_tmps(self, path: str) -> None:
        """Remove the temp files killed writes left beside path (remote.stale_tmps, the SSH
        transport's rule), judged against the file just written, once per directory
        (_sweep_due). Best effort: the write is done."""
        d, base = posixpath.split(posixpath.normpath(path))
        d = d or "/"
        if not self._sweep_due(d):
            return
        try:
            listing = self.scan_dirs([d], follow_symlinks=False)[d]
            if isinstance(listing, OSError):
                return
            for name in stale_tmps(listing, base):
                p = posixpath.join(d, name)
                self._unlink(p, self.remote(p))
        except (OSError, KatactlError):
            pass

    def close(self) -> None:
        with self._helper_lock:
            self._drop_helper()
        self.api.close()


class _PodGone(UnreachableError):
    """The node pod is gone or not running (the caller looks it up again)."""


__all__ = ["KubeExecTransport", "WSChannel", "HELPER", "HELPER_ARGV", "FEED", "PROTOCOLS"]
