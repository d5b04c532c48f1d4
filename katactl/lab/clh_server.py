"""A protocol-faithful Cloud Hypervisor REST API server (HTTP over ``clh-api.sock``).

Base ``/api/v1``. Implemented: ``GET vmm.ping``, ``GET vm.info``,
``GET vm.counters``, ``PUT vm.resize`` (``desired_balloon`` is the *balloon
size*: memory taken from the guest; ``desired_ram`` grows the VM),
``PUT vm.coredump`` (only with the ``guest_debug`` feature, else 404),
``PUT vm.pause``/``vm.resume``.

Status codes and error bodies follow the ``version`` given (default v48):
404 unknown endpoint, 400 wrong method / unparsable body; API errors are 500
before v53 (400 from v53); the error body is a JSON array of strings since v47
(plain text before).

Known differences from the real Cloud Hypervisor:
- there is no VM: the guest is :class:`katactl.lab.simguest.SimGuest`; the
  balloon moves at a fixed rate, the guest uses a fixed amount of memory;
- ``vm.counters`` is empty, ``device_tree`` is ``{}``;
- as the real one, the balloon takes whole 4 KiB pages, rounded down (virtio-devices
  src/balloon.rs ``Balloon::resize``: ``num_pages = size >> VIRTIO_BALLOON_PFN_SHIFT``) while
  ``config.balloon.size`` keeps the size asked for (vmm/src/vm.rs ``Vm::resize``);
- ``vm.coredump`` writes a tiny ELF header, not guest memory;
- no 429 (no vCPU removal ever pends); no other endpoints (``vm.create``,
  ``vm.boot``, ``vm.add-*``, ``vm.snapshot`` ...): they answer 404.
- a fault hook for tests: :meth:`ClhServer.fail_coredump` makes ``vm.coredump``
  fail as an API error does (the status and body above) with given messages;
  :meth:`ClhServer.hold_coredump` makes it answer only when the test says (a big
  guest's dump takes minutes, the PUT answering when the file is complete);
  :meth:`ClhServer.garble_coredump` makes it answer what is not HTTP.
"""
from __future__ import annotations

import json
import os
import threading

from katactl.lab import httpunix
from katactl.lab.simguest import SimGuest

PAGE = 4096  # VIRTIO_BALLOON_PFN_SHIFT 12


class _H(httpunix.Handler):
    server_version = "cloud-hypervisor"

    def _err(self, msgs: list[str]) -> None:
        major: int = self.server.major  # type: ignore[attr-defined]  # set by httpunix.serve(major=...)
        code = 400 if major >= 53 else 500
        if major >= 47:
            self.send(code, msgs)
        else:
            self.send(code, "\n".join(msgs), "text/plain")

    def route(self, method):
        srv = self.server
        path = self.path.split("?", 1)[0]
        if not path.startswith("/api/v1/"):
            return self.send(404, b"", "text/plain")
        ep = path[len("/api/v1/"):]
        g: SimGuest = srv.guest
        if ep == "vmm.ping":
            if method != "GET":
                return self.send(400, b"", "text/plain")
            return self.send(200, {"build_version": f"v{srv.major}.0-lab", "version": f"{srv.major}.0",
                                   "pid": os.getpid(), "features": list(srv.features)})
        if ep == "vm.info":
            if method != "GET":
                return self.send(400, b"", "text/plain")
            asked = srv.balloon_size  # the request, while the balloon is still the one it set
            if asked is None or asked - asked % PAGE != g.balloon_target():  # moved by the lab's shim
                asked = g.balloon_target()
            bal = ({"size": asked, "deflate_on_oom": False, "free_page_reporting": True}
                   if srv.balloon else None)
            return self.send(200, {
                "config": {"cpus": {"boot_vcpus": srv.vcpus, "max_vcpus": srv.vcpus},
                           "memory": {"size": g.memory, "hotplug_size": None, "shared": True,
                                      "hugepages": False, "thp": True},
                           "balloon": bal, "payload": {"kernel": srv.kernel}},
                "state": srv.state,
                "memory_actual_size": g.memory - (g.balloon_actual() if srv.balloon else 0),
                "device_tree": {}})
        if ep == "vm.counters":
            if method != "GET":
                return self.send(400, b"", "text/plain")
            return self.send(200, {})
        if ep in ("vm.pause", "vm.resume"):
            if method != "PUT":
                return self.send(400, b"", "text/plain")
            srv.state = "Paused" if ep == "vm.pause" else "Running"
            return self.send(204)
        if ep == "vm.resize":
            if method != "PUT":
                return self.send(400, b"", "text/plain")
            try:
                body = self.json_body() or {}
                if not isinstance(body, dict):
                    raise ValueError
            except ValueError:
                return self.send(400, b"", "text/plain")
            if srv.state != "Running":
                return self._err(["Error from API", "The VM could not be resized", "VM is not running"])
            if "desired_ram" in body and body["desired_ram"] is not None:
                g.memory = int(body["desired_ram"])
            if "desired_balloon" in body and body["desired_balloon"] is not None:
                size = body["desired_balloon"]
                if not isinstance(size, int) or size < 0:
                    return self.send(400, b"", "text/plain")
                if not srv.balloon:
                    return self._err(["Error from API", "The VM could not be resized",
                                      "Failed resizing balloon", "No balloon device"])
                if size > g.memory:
                    return self._err(["Error from API", "The VM could not be resized",
                                      "Failed resizing balloon",
                                      "Balloon size exceeds guest memory size"])
                srv.balloon_size = size
                g.set_balloon(size - size % PAGE)
            return self.send(204)
        if ep == "vm.coredump":
            if "guest_debug" not in srv.features:
                return self.send(404, b"", "text/plain")
            if method != "PUT":
                return self.send(400, b"", "text/plain")
            try:
                dest = (self.json_body() or {}).get("destination_url", "")
            except ValueError:
                return self.send(400, b"", "text/plain")
            if not dest.startswith("file://"):
                return self._err(["Error from API", "Failed to coredump the VM", "Invalid URL"])
            p = dest[len("file://"):]
            if os.path.exists(p):
                return self._err(["Error from API", "Failed to coredump the VM", "File exists"])
            if srv.coredump_error:                              # ClhServer.fail_coredump()
                return self._err(list(srv.coredump_error))
            with open(p, "wb") as f:
                f.write(b"\x7fELF\x02\x01\x01" + b"\0" * 57)
            if srv.coredump_hold:                               # ClhServer.hold_coredump()
                started, release = srv.coredump_hold
                started.set()
                release.wait(120)
            if srv.coredump_garbled:                            # ClhServer.garble_coredump()
                self.close_connection = True
                self.wfile.write(b"HTTP/1.1 2x4 garbled\r\n\r\n")
                return None
            return self.send(204)
        return self.send(404, b"", "text/plain")


class ClhServer:
    def __init__(self, socket_path: str, memory_bytes: int, *, vcpus: int = 1, balloon: bool = True,
                 version: int = 48, features=("kvm",), kernel: str = "/opt/kata/share/kata-containers/vmlinux.container",
                 guest_used: int = 96 << 20):
        self.path = socket_path
        self.guest = SimGuest(memory_bytes, guest_used)
        self._srv = httpunix.serve(socket_path, _H, guest=self.guest, major=version, features=tuple(features),
                                   balloon=balloon, vcpus=vcpus, state="Running", kernel=kernel,
                                   coredump_error=None, coredump_hold=None, coredump_garbled=False,
                                   balloon_size=None)

    def fail_coredump(self, messages: list[str] | None) -> None:
        """From now on ``vm.coredump`` answers an API error with these messages (after the
        request was read and its URL checked, writing nothing); None: it works again."""
        self._srv.coredump_error = list(messages) if messages else None  # type: ignore[attr-defined]

    def hold_coredump(self) -> tuple[threading.Event, threading.Event]:
        """From now on ``vm.coredump`` writes its file, sets ``started`` and answers only once
        ``release`` is set (at most 120 s later). Returns (started, release)."""
        hold = (threading.Event(), threading.Event())
        self._srv.coredump_hold = hold  # type: ignore[attr-defined]
        return hold

    def garble_coredump(self) -> None:
        """From now on ``vm.coredump`` writes its file, then answers bytes that are no HTTP
        status line (an answer katactl cannot read once the dump was made)."""
        self._srv.coredump_garbled = True  # type: ignore[attr-defined]

    def close(self) -> None:
        hold = self._srv.coredump_hold  # type: ignore[attr-defined]
        if hold:
            hold[1].set()  # a held answer must not keep the server's shutdown waiting
        httpunix.shutdown(self._srv)


def _main():  # pragma: no cover - manual poking
    import sys
    import time

    s = ClhServer(sys.argv[1], 1 << 30)
    print(json.dumps({"socket": s.path}))
    time.sleep(1e9)


if __name__ == "__main__":  # pragma: no cover
    _main()
