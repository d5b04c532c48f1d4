"""Cloud Hypervisor REST API client (HTTP over ``clh-api.sock``, base /api/v1).

Multi-client: katactl may talk to it while the Kata runtime does. Balloon
semantics: ``desired_balloon`` is the balloon size (memory taken away), not
what the guest keeps. Error bodies: a JSON array of strings since v47, plain
text before; most API errors are 500 before v53.
"""
from __future__ import annotations

from katactl.backends import shape
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
        """{memory, balloonTarget, balloonActual, hasBalloon} in bytes (cloud-hypervisor
        vmm/src/api/mod.rs VmInfoResponse: memory_actual_size is optional; vmm/src/vm_config.rs
        MemoryConfig.size and BalloonConfig.size are not)."""
        what = f"{self.path} GET vm.info"
        info = shape.obj(self.info(), what)
        cfg = shape.obj(info.get("config"), what, "config")
        mem = shape.obj(cfg.get("memory"), what, "config.memory")
        total = shape.integer(mem.get("size"), what, "config.memory.size") \
            + (shape.opt_integer(mem.get("hotplugged_size"), what, "config.memory.hotplugged_size") or 0)
        bal = cfg.get("balloon")
        target = None
        if bal is not None:
            target = shape.integer(shape.obj(bal, what, "config.balloon").get("size"), what, "config.balloon.size")
        actual_size = shape.opt_integer(info.get("memory_actual_size"), what, "memory_actual_size")
        balloon_actual = (total - actual_size) if actual_size is not None and bal else 0
        return {"memory": total, "hasBalloon": bal is not None, "balloonTarget": target,
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
