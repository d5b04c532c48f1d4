"""A protocol-faithful Firecracker API server (HTTP over ``firecracker.socket``).

Implemented: ``GET /`` (instance info), ``GET /machine-config``,
``GET /balloon``, ``PUT /balloon`` (pre-boot only: after boot 400),
``PATCH /balloon {"amount_mib": N}`` (204; ``amount_mib`` is the *balloon
size*; unknown fields rejected; 400 "Device not activated yet." without a guest
driver; 400 when larger than guest RAM), ``GET /balloon/statistics`` (400
unless statistics were enabled pre-boot, i.e. ``stats_polling_interval_s > 0``).
Errors are ``{"fault_message": "..."}``; unknown paths/methods answer 400
"Invalid request method and/or path" as Firecracker does.

Known differences from the real Firecracker:
- there is no VM: the guest is :class:`katactl.lab.simguest.SimGuest`;
- fault messages are close to, not byte-identical with, Firecracker's;
- no other endpoints (drives, network, snapshots, ``PATCH /balloon/statistics``,
  ``/actions``...): they answer 400 as unknown.
"""
from __future__ import annotations

import json

from katactl.lab import httpunix
from katactl.lab.simguest import SimGuest

MIB = 1 << 20


class _H(httpunix.Handler):
    server_version = "Firecracker API"

    def fault(self, msg: str, code: int = 400):
        self.send(code, {"fault_message": msg})

    def route(self, method):
        srv = self.server
        g: SimGuest = srv.guest
        path = self.path.split("?", 1)[0]
        if path == "/" and method == "GET":
            return self.send(200, {"id": srv.vm_id, "state": "Running", "vmm_version": srv.version,
                                   "app_name": "Firecracker"})
        if path == "/machine-config" and method == "GET":
            return self.send(200, {"vcpu_count": srv.vcpus, "mem_size_mib": g.memory // MIB, "smt": False,
                                   "track_dirty_pages": False})
        if path == "/balloon":
            if method == "GET":
                if not srv.balloon:
                    return self.fault("Invalid request: the balloon device is not configured.")
                return self.send(200, {"amount_mib": g.balloon_target() // MIB, "deflate_on_oom": True,
                                       "stats_polling_interval_s": srv.stats_interval})
            if method == "PUT":
                return self.fault("The requested operation is not supported after starting the microVM.")
            if method == "PATCH":
                try:
                    body = self.json_body()
                except ValueError as e:
                    return self.fault(f"An error occurred when deserializing the json body of a request: {e}.")
                if not isinstance(body, dict):
                    return self.fault("An error occurred when deserializing the json body of a request: "
                                      "invalid type: expected struct BalloonUpdateConfig.")
                unknown = set(body) - {"amount_mib"}
                if unknown:
                    f = sorted(unknown)[0]
                    return self.fault("An error occurred when deserializing the json body of a request: "
                                      f"unknown field `{f}`, expected `amount_mib`.")
                amt = body.get("amount_mib")
                if not isinstance(amt, int) or isinstance(amt, bool) or amt < 0:
                    return self.fault("An error occurred when deserializing the json body of a request: "
                                      "missing or invalid field `amount_mib`.")
                if not srv.balloon:
                    return self.fault("Invalid request: the balloon device is not configured.")
                if not g.driver:
                    return self.fault("Device not activated yet.")
                if amt * MIB > g.memory:
                    return self.fault("Amount of pages requested is too large.")
                g.set_balloon(amt * MIB)
                return self.send(204)
        if path == "/balloon/statistics" and method == "GET":
            if not srv.balloon or not srv.stats_interval:
                return self.fault("Statistics for the balloon device are not enabled")
            st = g.guest_stats()
            tgt, act = g.balloon_target(), g.balloon_actual()
            return self.send(200, {"target_pages": tgt // 4096, "actual_pages": act // 4096,
                                   "target_mib": tgt // MIB, "actual_mib": act // MIB,
                                   "free_memory": st["free"], "total_memory": st["total"],
                                   "available_memory": st["available"]})
        return self.fault(f"Invalid request method and/or path: {method} {path}.")


class FcServer:
    def __init__(self, socket_path: str, memory_bytes: int, *, vcpus: int = 1, balloon: bool = True,
                 stats_interval: int = 1, vm_id: str = "anonymous-instance", version: str = "1.7.0",
                 guest_used: int = 96 << 20):
        self.path = socket_path
        self.guest = SimGuest(memory_bytes, guest_used)
        self._srv = httpunix.serve(socket_path, _H, guest=self.guest, balloon=balloon, vcpus=vcpus,
                                   stats_interval=stats_interval, vm_id=vm_id, version=version)

    def close(self) -> None:
        httpunix.shutdown(self._srv)


if __name__ == "__main__":  # pragma: no cover
    import sys
    import time

    s = FcServer(sys.argv[1], 1 << 30)
    print(json.dumps({"socket": s.path}))
    time.sleep(1e9)
