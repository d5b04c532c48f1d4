"""Firecracker API client (HTTP over ``firecracker.socket``).

Balloon semantics: ``amount_mib`` is the balloon size (memory taken away).
``PATCH /balloon`` works after boot; ``PUT /balloon`` only before. Errors are
``{"fault_message": "..."}`` with status 400.
"""
from __future__ import annotations

from katactl.backends import shape
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
        """{memory, balloonTarget, balloonActual, hasBalloon, guest} in bytes (firecracker
        src/vmm/src/vmm_config/machine_config.rs, balloon.rs: mem_size_mib, amount_mib and
        actual_mib are integers; the guest's memory figures are optional)."""
        mc = shape.obj(self.machine_config(), f"{self.path} GET /machine-config")
        memory = shape.integer(mc.get("mem_size_mib"), f"{self.path} GET /machine-config", "mem_size_mib") * MIB
        try:
            b = self.balloon()
        except FcError:
            return {"memory": memory, "hasBalloon": False, "balloonTarget": None, "balloonActual": None,
                    "guest": None}
        what = f"{self.path} GET /balloon"
        target = shape.integer(shape.obj(b, what).get("amount_mib"), what, "amount_mib") * MIB
        actual, guest = None, None
        try:
            st = self.balloon_statistics()
        except FcError:
            st = None  # statistics not enabled: actual unknown
        if st is not None:
            what = f"{self.path} GET /balloon/statistics"
            st = shape.obj(st, what)
            actual = shape.integer(st.get("actual_mib"), what, "actual_mib") * MIB
            figures = {k: shape.opt_integer(st.get(f"{k}_memory"), what, f"{k}_memory")
                       for k in ("total", "free", "available")}
            if figures["total"] is not None:
                guest = figures
        return {"memory": memory, "hasBalloon": True, "balloonTarget": target, "balloonActual": actual,
                "guest": guest}
