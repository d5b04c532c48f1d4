"""A scripted QMP monitor over a real unix socket, for answers a real QEMU never gives (valid
JSON of the wrong shape) or gives only in states the tests cannot reach cheaply (a guest that
sends a subset of the balloon statistics). Driven by katactl's real QMPClient.

As QEMU's monitor (qemu monitor/qmp.c, qapi/qmp-dispatch.c): it greets first with
``{"QMP": {"version": ..., "capabilities": []}}``, answers every command before
``qmp_capabilities`` with a CommandNotFound error, echoes each request's ``id``, ends lines with
CRLF, and serves one client at a time (a second one connects and waits for its greeting).

How it differs from QEMU: it knows only the commands in its script (any other answers
CommandNotFound), sends no events, and does not check arguments.
"""
from __future__ import annotations

import json
import socket
import threading
from typing import Any, Callable

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}

#: a 256 MiB guest with its balloon deflated and fresh statistics (qapi/machine.json MemoryInfo,
#: BalloonInfo; qom-get guest-stats as hw/virtio/virtio-balloon.c balloon_stats_get_all writes it)
BASE: dict[str, Any] = {
    "query-memory-size-summary": {"return": {"base-memory": 256 << 20}},
    "query-balloon": {"return": {"actual": 256 << 20}},
    "qom-get": {"return": {"stats": {"stat-total-memory": 240 << 20, "stat-free-memory": 100 << 20,
                                     "stat-available-memory": 150 << 20}, "last-update": 1700000000}},
    "query-status": {"return": {"running": True, "status": "running"}},
    "query-dump-guest-memory-capability": {"return": {"formats": ["elf", "kdump-zlib"]}},
    "query-dump": {"return": {"status": "none", "completed": 0, "total": 0}},
    "dump-guest-memory": {"return": {}},
    "balloon": {"return": {}},
}


class QmpServer:
    """``script``: {command: message} where a message is a dict (sent with the request's id),
    raw bytes (sent as one line, as is), or a callable(arguments) giving either. ``greeting``
    replaces the greeting (bytes: sent as is). ``calls`` lists the commands received."""

    def __init__(self, path: str, script: dict[str, Any] | None = None, *, greeting: Any = None):
        self.script = {**BASE, **(script or {})}
        self.greeting = GREETING if greeting is None else greeting
        self.calls: list[str] = []
        self._lock = threading.Lock()  # one client at a time
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(1)
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _line(msg: Any, rid: Any = None) -> bytes:
        if isinstance(msg, bytes):
            return msg + b"\r\n"
        return json.dumps({**msg, "id": rid} if rid is not None else msg).encode() + b"\r\n"

    def _serve(self, c: socket.socket) -> None:
        with self._lock:
            f = c.makefile("rb")
            try:
                c.sendall(self._line(self.greeting))
                negotiated = False
                for raw in f:
                    req = json.loads(raw)
                    cmd, rid = req.get("execute"), req.get("id")
                    self.calls.append(cmd)
                    if cmd == "qmp_capabilities":
                        negotiated = True
                        ans: Any = {"return": {}}
                    elif not negotiated:
                        ans = {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation "
                                                                            "with 'qmp_capabilities'"}}
                    else:
                        ans = self.script.get(cmd, {"error": {"class": "CommandNotFound",
                                                              "desc": f"The command {cmd} has not been found"}})
                        if callable(ans):
                            ans = ans(req.get("arguments"))
                    c.sendall(self._line(ans, rid))
            except OSError:
                pass
            finally:
                f.close()
                c.close()

    def close(self) -> None:
        self._srv.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def sequence(*answers: Any) -> Callable[[Any], Any]:
    """A script entry giving ``answers`` in turn, the last one from then on."""
    left = list(answers)

    def next_answer(_args):
        return left.pop(0) if len(left) > 1 else left[0]
    return next_answer
