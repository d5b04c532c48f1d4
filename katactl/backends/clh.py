"""Cloud Hypervisor REST API client (HTTP over ``clh-api.sock``, base /api/v1).

Multi-client: katactl may talk to it while the Kata runtime does. Balloon
semantics: ``desired_balloon`` is the balloon size (memory taken away), not
what the guest keeps. Error bodies: a JSON array of strings since v47, plain
text before; most API errors are 500 before v53.
"""
from __future__ import annotations

from katactl.backends.unixhttp import JsonUnixClient
from katactl.errors import NotFound, OperationFailed

BASE = "/api/v1"


class ClhError(OperationFailed):
    code = "CloudHypervisorError"

    def __init__(self, what: str, status: int, messages: list[str]):
        super().__init__(f"{what}: Cloud Hypervisor answered {status}: {'; '.join(messages) or '(no body)'}")
        self.status = status
        self.messages = messages


class ClhClient(JsonUnixClient):
    prefix = BASE + "/"
    json_ok = (200, 201)

    def _fail(self, what: str, r) -> None:
        msgs = _messages(r)
        if r.status_code == 404:
            raise NotFound(f"{what}: endpoint not found (404){': ' + '; '.join(msgs) if msgs else ''}")
        raise ClhError(what, r.status_code, msgs)

    def ping(self) -> dict:
        return self._call("GET", "vmm.ping")

    def info(self) -> dict:
        return self._call("GET", "vm.info")

    def counters(self) -> dict:
        return self._call("GET", "vm.counters")

    def resize(self, *, desired_balloon: int | None = None, desired_ram: int | None = None,
               desired_vcpus: int | None = None) -> None:
        body = {k: v for k, v in dict(desired_balloon=desired_balloon, desired_ram=desired_ram,
                                      desired_vcpus=desired_vcpus).items() if v is not None}
        self._call("PUT", "vm.resize", body)

    def coredump(self, dest_path: str) -> None:
        self._call("PUT", "vm.coredump", {"destination_url": "file://" + dest_path})

    # -- balloon in katactl's terms ------------------------------------------
    def balloon_state(self) -> dict:
        """{memory, balloonTarget, balloonActual, hasBalloon} in bytes."""
        info = self.info()
        cfg = info.get("config") or {}
        mem = cfg.get("memory") or {}
        total = int(mem.get("size") or 0) + int(mem.get("hotplugged_size") or 0)
        bal = cfg.get("balloon")
        actual_size = info.get("memory_actual_size")
        balloon_actual = (total - int(actual_size)) if actual_size is not None and bal else 0
        return {"memory": total, "hasBalloon": bal is not None,
                "balloonTarget": int(bal.get("size") or 0) if bal else None,
                "balloonActual": max(0, balloon_actual), "state": info.get("state")}


def _messages(r) -> list[str]:
    try:
        j = r.json()
        if isinstance(j, list):
            return [str(x) for x in j]
        if isinstance(j, dict):
            return [str(j)]
    except ValueError:
        pass
    t = r.text.strip()
    return [ln for ln in t.splitlines() if ln.strip()] if t else []
