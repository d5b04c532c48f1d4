"""The Go runtime's post-panic vmcore handler, as the lab plays it.

On QMP ``GUEST_PANICKED`` (with ``guest_memory_dump_path`` set), the Kata Go
runtime (virtcontainers/qemu.go, reference/kata-node.md "Post-panic vmcore"):
1. makes ``<dump_path>/<sandbox-id>/`` and copies ``/run/vc/sbs/<id>`` into
   ``<dir>/state/``;
2. writes ``<dir>/hypervisor.conf`` (JSON of the hypervisor config) and
   ``<dir>/hypervisor.version`` (``qemu --version`` output);
3. refuses to dump unless free space >= 2 x (default_memory + hotplugged);
4. runs ``dump-guest-memory`` with ``protocol=file:<dir>/vmcore-<ts>.elf``,
   ``paging=guest_memory_dump_paging``, ``format=elf``.

The daemon calls ``katactl.vmcore.runtime_panic_dump(ctx)`` when the vmcore
module provides it (the vmcore owner may refine this), else :func:`default_dump`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import time


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


def vmcore_name(now: float | None = None) -> str:
    now = time.time() if now is None else now
    ms = int((now % 1) * 1000)
    return f"vmcore-{time.strftime('%Y%m%d%H%M%S', time.localtime(now))}.{ms:03d}.elf"


def _copy_state(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        st = os.lstat(s)
        if stat.S_ISDIR(st.st_mode):
            _copy_state(s, d)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(s, d)
        # sockets and others are skipped, as a file copy would


def default_dump(ctx: PanicContext) -> dict:
    """Do what the Go runtime does; return {"path": node path, "error": ...}."""
    d_node = f"{ctx.dump_path_node.rstrip('/')}/{ctx.sandbox_id}"
    d = ctx.real(d_node)
    os.makedirs(d, exist_ok=True)
    _copy_state(ctx.real(ctx.state_dir_node), os.path.join(d, "state"))
    with open(os.path.join(d, "hypervisor.conf"), "w") as f:
        json.dump(ctx.hypervisor_config, f)
    try:
        ver = subprocess.run([ctx.qemu_path, "--version"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        ver = b""
    with open(os.path.join(d, "hypervisor.version"), "wb") as f:
        f.write(ver)
    s = os.statvfs(d)
    free = s.f_bavail * s.f_frsize
    need = 2 * ctx.memory_bytes
    if free < need:
        return {"path": None, "error": f"not enough free space in {d_node}: {free} < {need}"}
    name = vmcore_name()
    ctx.qmp.execute("dump-guest-memory", {"paging": bool(ctx.paging), "protocol": f"file:{os.path.join(d, name)}",
                                          "format": "elf"}, timeout=600)
    return {"path": f"{d_node}/{name}", "error": None}


def run(ctx: PanicContext) -> dict:
    """katactl.vmcore.runtime_panic_dump when the vmcore module provides it, else default_dump."""
    try:
        from katactl import vmcore  # type: ignore[attr-defined]

        hook = getattr(vmcore, "runtime_panic_dump", None)
    except ImportError:
        hook = None
    if hook is None:
        return default_dump(ctx)
    from katactl.backends.local import LocalTransport
    from katactl.errors import Refused

    try:
        path = hook(LocalTransport(host_root=ctx.root), ctx.sandbox_id, ctx.qmp, ctx.dump_path_node,
                    ctx.paging)
    except Refused as e:  # the runtime logs and skips the dump
        return {"path": None, "error": e.message}
    return {"path": path, "error": None}
