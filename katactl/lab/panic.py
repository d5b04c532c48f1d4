"""The Go runtime's post-panic vmcore handler, as the lab plays it.

On QMP ``GUEST_PANICKED`` (with ``guest_memory_dump_path`` set), the Kata Go
runtime (virtcontainers/qemu.go, reference/kata-node.md "Post-panic vmcore"):
1. makes ``<dump_path>/<sandbox-id>/state/`` and runs ``cp -ar /run/vc/sbs/<id>
   <dir>/state``, so the copy lands in ``<dir>/state/<id>/`` (qemu.go dumpGuestMemory);
2. writes ``<dir>/hypervisor.conf`` (``json.MarshalIndent`` of the hypervisor config,
   one-space indent) and
   ``<dir>/hypervisor.version`` (``qemu --version`` output);
3. refuses to dump unless free space >= 2 x (default_memory + hotplugged);
4. runs ``dump-guest-memory`` with ``protocol=file:<dir>/vmcore-<ts>.elf``,
   ``paging=guest_memory_dump_paging``, ``format=elf``.

:func:`run` does it with :func:`katactl.vmcore.runtime_panic_dump`; the lab
daemon calls it on ``GUEST_PANICKED``.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class PanicContext:
    root: str                 # the lab's host root (real path prefix)
    sandbox_id: str
    qmp: object               # katactl.backends.qmp.QMPClient held by the lab (reader-thread mode)
    dump_path_node: str       # guest_memory_dump_path, a node path (e.g. /var/crash/kata)
    state_dir_node: str       # /run/vc/sbs/<id>
    hypervisor_config: dict   # persist.json Config.HypervisorConfig
    qemu_path: str            # the QEMU binary really running
    memory_bytes: int         # default_memory + hotplugged, bytes
    paging: bool = False
    event: dict | None = None

    def real(self, node_path: str) -> str:
        return os.path.join(self.root, node_path.lstrip("/"))


def vmcore_name(now: float | None = None, fmt: str = "elf") -> str:
    """The runtime's dump name: ``vmcore-`` + Go's ``Format("20060102150405.999")``
    (trailing zeros trimmed) + ``.elf`` (``.kdump`` for the kdump formats, as
    katactl's own triggers name them: :func:`katactl.vmcore.dump_name`), in the lab
    node's local time: UTC, as Go's ``time.Local`` is on a node without
    ``/etc/localtime`` (the lab's)."""
    import datetime

    from katactl.vmcore import dump_name

    return dump_name(fmt, now, tz=datetime.timezone.utc)


def run(ctx: PanicContext) -> dict:
    """Play the runtime's GUEST_PANICKED handler; return {"path": node path, "error": ...}."""
    from katactl.backends.local import LocalTransport
    from katactl.errors import Refused
    from katactl.vmcore import runtime_panic_dump

    try:
        path = runtime_panic_dump(LocalTransport(host_root=ctx.root), ctx.sandbox_id, ctx.qmp, ctx.dump_path_node,
                                  ctx.paging)
    except Refused as e:  # the runtime logs and skips the dump
        return {"path": None, "error": e.message}
    return {"path": path, "error": None}
