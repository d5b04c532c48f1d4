"""A QEMU Machine Protocol (QMP) client over any NodeTransport socket.

Facts it relies on (reference/hypervisors.md):
- one JSON object per line; the server greets first, then wants
  ``qmp_capabilities`` before anything else;
- replies are matched by ``id`` (never by order, never by parsing ``desc``);
- events can arrive at any time, even *before* the reply of the command that
  caused them: they go to a queue the caller reads with :meth:`events` /
  :meth:`wait_event`;
- a monitor serves one client at a time: a second client connects but gets no
  greeting. "No greeting within ``greeting_timeout``" is reported as
  :class:`MonitorBusy` (the Kata runtime holds ``qmp.sock`` for the sandbox's
  whole life).

Two ways to use it:
- synchronous (the CLI): ``execute()`` reads the socket itself until its reply
  comes, queueing any events it meets;
- with a reader thread (the lab daemon, which holds the monitor for the VM's
  life): ``start_reader()``; then ``execute()`` may be called from any thread
  and ``on_event`` callbacks run on the reader thread.

Every wait has a timeout and raises katactl.errors.TimeoutExpired.
"""
from __future__ import annotations

import collections
import itertools
import json
import socket
import threading
import time
from typing import Any, Callable, Iterable

from katactl.errors import SOCKET_BUSY, OperationFailed, ProtocolError, TimeoutExpired, UnreachableError
from katactl.backends import shape
from katactl.backends.base import NodeTransport

DEFAULT_TIMEOUT = 5.0
#: A free monitor greets within a few ms even under TCG; 0.5 s is generous.
DEFAULT_GREETING_TIMEOUT = 0.5
#: the longest message read. Real ones are small: the largest a katactl command asks for is a
#: few KiB (query-cpus-fast with hundreds of vCPUs: ~60 KiB); events are tiny (qapi/*.json)
MAX_LINE = 1 << 20
#: events kept for :meth:`events`/:meth:`wait_event`, in bytes, the oldest dropped first: a
#: monitor sending events instead of the reply must not fill memory until the timeout
MAX_EVENT_BYTES = 1 << 20


class MonitorBusy(UnreachableError):
    """Another client holds the monitor: it did not greet us, or its connection queue is full."""

    code = "MonitorBusy"


def _busy(message: str) -> MonitorBusy:
    return MonitorBusy(message, hint="use the shim extension, or configure extra_monitor_socket in the "
                                     "Kata [hypervisor.qemu] section for a second monitor")


class MonitorClosed(UnreachableError):
    """The monitor closed the connection (QEMU exited, or dropped us)."""

    code = "MonitorClosed"


class QMPError(OperationFailed):
    """QEMU answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    code = "QMPError"

    def __init__(self, command: str, error_class: str, desc: str, **kw):
        super().__init__(f"QMP {command}: {error_class}: {desc}", **kw)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPClient:
    def __init__(self, sock, *, path: str = "qmp", timeout: float = DEFAULT_TIMEOUT):
        self._sock = sock
        self.path = path
        self.timeout = timeout
        self.greeting: dict | None = None
        self._buf = b""
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._replies: dict[Any, dict] = {}
        self._events: collections.deque[tuple[int, dict]] = collections.deque()  # (size, event)
        self._event_bytes = 0
        self._last_size = 0
        self._send_lock = threading.Lock()
        self._closed: BaseException | None = None
        self._reader: threading.Thread | None = None
        self.on_event: Callable[[dict], None] | None = None

    # -- connection -----------------------------------------------------------
    @classmethod
    def connect(cls, transport: NodeTransport, path: str, *, timeout: float = DEFAULT_TIMEOUT,
                greeting_timeout: float = DEFAULT_GREETING_TIMEOUT,
                negotiate: bool = True) -> "QMPClient":
        """Connect to a node's QMP socket, read the greeting, negotiate capabilities."""
        try:
            sock = transport.connect_unix(path, timeout)
        except UnreachableError as e:
            if e.reason != SOCKET_BUSY:
                raise
            # QEMU listens with a backlog of one: clients that queued behind the holder
            # (closing does not dequeue them) fill it, and then connect() says EAGAIN
            raise _busy(f"{path}: the QEMU monitor's connection queue is full: another client "
                        "holds it (a monitor serves one client at a time; on a live Kata sandbox "
                        "the Kata runtime keeps qmp.sock open)") from None
        c = cls(sock, path=path, timeout=timeout)
        try:
            c._handshake(greeting_timeout, negotiate)
        except BaseException:
            c.close()
            raise
        return c

    def _handshake(self, greeting_timeout: float, negotiate: bool) -> None:
        try:
            msg = self._read_message(time.monotonic() + greeting_timeout)
        except TimeoutExpired:
            raise _busy(
                f"{self.path}: the QEMU monitor accepted the connection but sent no greeting within "
                f"{greeting_timeout:g}s: another client holds it (a monitor serves one client at a "
                f"time; on a live Kata sandbox the Kata runtime keeps qmp.sock open)") from None
        if "QMP" not in msg:
            raise ProtocolError(f"{self.path}: expected a QMP greeting, got {_short(msg)}")
        self.greeting = shape.obj(msg["QMP"], f"{self.path}: QMP greeting", "QMP")
        if negotiate:
            self.execute("qmp_capabilities")

    @property
    def version(self) -> dict:
        """{"major":..,"minor":..,"micro":..} from the greeting."""
        return ((self.greeting or {}).get("version") or {}).get("qemu") or {}

    def close(self) -> None:
        with self._cond:
            if self._closed is None:
                self._closed = MonitorClosed(f"{self.path}: connection closed by katactl")
            self._cond.notify_all()
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading --------------------------------------------------------------
    def _read_message(self, deadline: float | None) -> dict:
        """Read one JSON message (blocking until deadline)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1:]
                line = line.strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise ProtocolError(f"{self.path}: not QMP (bad JSON line {line[:80]!r})") from None
                except RecursionError:  # [[[...]]] within MAX_LINE: deeper than json can decode
                    raise ProtocolError(f"{self.path}: not QMP (JSON nested too deeply)") from None
                if not isinstance(msg, dict):
                    raise ProtocolError(f"{self.path}: not QMP (JSON line is not an object)")
                # the id keys the waiting reply (QEMU echoes the request's, a string): an array or
                # object id cannot, and is no QMP answer to us
                if not isinstance(msg.get("id"), (str, int, type(None))):
                    raise ProtocolError(f"{self.path}: not QMP (id is {type(msg['id']).__name__})")
                self._last_size = len(line)
                return msg
            if len(self._buf) > MAX_LINE:
                raise ProtocolError(f"{self.path}: QMP line longer than {MAX_LINE} bytes")
            if deadline is None:
                self._sock.settimeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutExpired(f"{self.path}: no answer from the QEMU monitor")
                self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except (socket.timeout, TimeoutError):
                raise TimeoutExpired(f"{self.path}: no answer from the QEMU monitor") from None
            except OSError as e:
                raise MonitorClosed(f"{self.path}: monitor connection failed: {e.strerror or e}") from None
            if not data:
                raise MonitorClosed(f"{self.path}: the QEMU monitor closed the connection (QEMU exited?)")
            self._buf += data

    def _dispatch(self, msg: dict) -> None:
        if "event" in msg:
            with self._cond:
                self._events.append((self._last_size, msg))
                self._event_bytes += self._last_size
                while self._event_bytes > MAX_EVENT_BYTES:
                    self._event_bytes -= self._events.popleft()[0]
                self._cond.notify_all()
            cb = self.on_event
            if cb is not None:
                try:
                    cb(msg)
                except Exception:  # a callback bug must not kill the reader
                    pass
        elif "return" in msg or "error" in msg:
            with self._cond:
                self._replies[msg.get("id")] = msg
                self._cond.notify_all()
        # anything else (a stray greeting) is ignored

    def start_reader(self) -> None:
        """Read the socket on a daemon thread from now on (see module doc)."""
        if self._reader is not None:
            return

        def loop():
            try:
                while True:
                    self._dispatch(self._read_message(None))
            except BaseException as e:  # noqa: BLE001 - recorded for waiters
                with self._cond:
                    if self._closed is None:
                        self._closed = e if isinstance(e, Exception) else MonitorClosed(str(e))
                    self._cond.notify_all()

        self._reader = threading.Thread(target=loop, name=f"qmp-reader:{self.path}", daemon=True)
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _pump_until(self, ready: Callable[[], Any], deadline: float | None, what: str):
        """Wait until ready() is truthy, reading the socket if no reader thread does."""
        while True:
            with self._cond:
                r = ready()
                if r:
                    return r
                if self._closed is not None:
                    raise self._closed if isinstance(self._closed, Exception) else MonitorClosed(str(self._closed))
                if self._reader is not None:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutExpired(f"{self.path}: {what}")
                    self._cond.wait(left if left is not None else 1.0)
                    continue
            try:
                msg = self._read_message(deadline)
            except TimeoutExpired:
                raise TimeoutExpired(f"{self.path}: {what}") from None
            except MonitorClosed as e:
                with self._cond:
                    self._closed = e
                raise
            self._dispatch(msg)

    # -- commands -------------------------------------------------------------
    def execute(self, command: str, arguments: dict | None = None, *, timeout: float | None = None) -> Any:
        """Run one command; return its ``return`` value or raise QMPError."""
        if self._closed is not None:
            raise MonitorClosed(f"{self.path}: monitor connection is closed")
        cid = f"katactl-{next(self._ids)}"
        req: dict = {"execute": command, "id": cid}
        if arguments:
            req["arguments"] = arguments
        data = (json.dumps(req) + "\n").encode()
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        with self._send_lock:
            try:
                self._sock.settimeout(t)
                self._sock.sendall(data)
            except (socket.timeout, TimeoutError):
                raise TimeoutExpired(f"{self.path}: sending {command} timed out") from None
            except OSError as e:
                raise MonitorClosed(f"{self.path}: monitor connection failed: {e.strerror or e}") from None
        reply = self._pump_until(lambda: self._replies.pop(cid, None), deadline,
                                 f"no reply to {command} within {t:g}s")
        if "error" in reply:
            # qapi: {"error": {"class": ..., "desc": ...}}; anything else is not QEMU's
            err = shape.obj(reply["error"], f"{self.path}: QMP {command}", "error")
            raise QMPError(command, str(err.get("class", "GenericError")), str(err.get("desc", "")))
        return reply.get("return")

    # -- events ---------------------------------------------------------------
    def events(self, clear: bool = True) -> list[dict]:
        """Events received so far (and, with clear, forget them)."""
        with self._cond:
            out = [ev for _, ev in self._events]
            if clear:
                self._events.clear()
                self._event_bytes = 0
            return out

    def wait_event(self, names: str | Iterable[str] | None = None, *, timeout: float | None = None,
                   predicate: Callable[[dict], bool] | None = None) -> dict:
        """Wait for (and consume) the first queued or future event matching names/predicate."""
        if isinstance(names, str):
            names = {names}
        wanted = set(names) if names is not None else None
        t = self.timeout if timeout is None else timeout

        def find():
            for item in self._events:
                ev = item[1]
                if (wanted is None or ev.get("event") in wanted) and (predicate is None or predicate(ev)):
                    self._events.remove(item)
                    self._event_bytes -= item[0]
                    return ev
            return None

        label = ",".join(sorted(wanted)) if wanted else "any event"
        return self._pump_until(find, time.monotonic() + t, f"no {label} within {t:g}s")


def _short(msg: Any) -> str:
    s = json.dumps(msg)
    return s if len(s) < 120 else s[:117] + "..."
