"""Firecracker API client (HTTP over ``firecracker.socket``).

Balloon semantics: ``amount_mib`` is the balloon size (memory taken away).
``PATCH /balloon`` works after boot; ``PUT /balloon`` only before. Errors are
``{"fault_message": "..."}`` with status 400.
"""
from __future__ import annotations

from katactl.backends.unixhttp import JsonUnixClient
from katactl.errors import OperationFailed

MIB = 1 << 20


class FcError(OperationFailed):
    code = "FirecrackerError"

    def __init__(self, what: str, status: int, fault: str):
        super().__init__(f"{what}: Firecracker answered {status}: {fault}")
        self.status = status
        self.fault = fault


class FcClient(JsonUnixClient):
    def _fail(self, what: str, r) -> None:
        try:
            fault = str(r.json().get("fault_message", r.text))
        except (ValueError, AttributeError):
            fault = r.text.strip() or "(no body)"
        raise FcError(what, r.status_code, fault)

    def instance(self) -> dict:
        return self._call("GET", "/")

    def machine_config(self) -> dict:
        return self._call("GET", "/machine-config")

    def balloon(self) -> dict:
        return self._call("GET", "/balloon")

    def balloon_statistics(self) -> dict:
        return self._call("GET", "/balloon/statistics")

    def patch_balloon(self, amount_mib: int) -> None:
        self._call("PATCH", "/balloon", {"amount_mib": int(amount_mib)})

    # -- balloon in katactl's terms ------------------------------------------
    def balloon_state(self) -> dict:
        """{memory, balloonTarget, balloonActual, hasBalloon, guest} in bytes."""
        mc = self.machine_config()
        memory = int(mc.get("mem_size_mib") or 0) * MIB
        try:
            b = self.balloon()
        except FcError:
            return {"memory": memory, "hasBalloon": False, "balloonTarget": None, "balloonActual": None,
                    "guest": None}
        target = int(b.get("amount_mib") or 0) * MIB
        actual, guest = None, None
        try:
            st = self.balloon_statistics()
            actual = int(st.get("actual_mib") or 0) * MIB
            if st.get("total_memory") is not None:
                guest = {"total": st.get("total_memory"), "free": st.get("free_memory"),
                         "available": st.get("available_memory")}
        except FcError:
            pass  # statistics not enabled: actual unknown
        return {"memory": memory, "hasBalloon": True, "balloonTarget": target, "balloonActual": actual,
                "guest": guest}
