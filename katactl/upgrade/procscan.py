"""Which running processes and sandboxes use which release.

A process *references* a release when its executable (``/proc/<pid>/exe``),
a mapped file (``maps``: shared libraries, mmapped kernels), an open file
descriptor (``fd/``: QEMU keeps the guest image and initrd open) or an
argument (``cmdline``: ``-kernel``, ``-initrd``, ``file=``) lies under
``releases/<v>/``: as given, or with the kata root's symlinks resolved (the kernel
reports exe, maps and fd paths resolved). Deleted files still count (``(deleted)`` suffix): a
process that runs a removed binary is still an old-release process.

Sandboxes come from the runtime's state (persist.json / state.json): the
configured hypervisor binary and guest assets, the hypervisor pid, and the
shim process (the ``containerd-shim-kata-v2 ... -id <sandbox-id>`` process).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any
from katactl.backends.base import NodeTransport
from katactl.upgrade.layout import VERSION_CHARS

_SHIM_NAMES = ("containerd-shim-kata-v2",)
_KATA_LIKE = re.compile(r"^(containerd-shim-k|kata-|qemu|cloud-hyperviso|firecracker|jailer|virtiofsd)")


@dataclasses.dataclass
class ProcRef:
    pid: int
    comm: str
    exe: str | None
    cmdline: list[str]
    releases: dict[str, set[str]]  # version -> {"exe", "maps", "fd", "cmdline"}

    def to_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "exe": self.exe,
                "releases": sorted(self.releases),
                "via": {v: sorted(s) for v, s in sorted(self.releases.items())},
                "role": role_of(self)}


def role_of(p: ProcRef) -> str:
    base = (p.exe or "").removesuffix(" (deleted)").rsplit("/", 1)[-1] or p.comm
    if base in _SHIM_NAMES or p.comm.startswith("containerd-shim"):
        return "shim"
    if base.startswith(("qemu", "cloud-hypervisor", "firecracker", "jailer")):
        return "hypervisor"
    if base.startswith("virtiofsd"):
        return "virtiofsd"
    return "other"


def scan(transport: NodeTransport, layout) -> tuple[list[ProcRef], dict]:
    """Every process that references some release; plus scan statistics."""
    import os

    real = layout.real_releases(transport)
    rx = _arg_rx([layout.releases] + ([real] if real else []))
    hr = transport.host_root
    me = os.getpid() if not hr and not transport.is_remote else None  # our own pid only means us here
    refs: list[ProcRef] = []
    stats: dict[str, Any] = {"scanned": 0, "unreadable": 0}
    try:
        pids = [int(p) for p in transport.listdir("/proc") if p.isdigit()]
    except OSError:
        return [], {"scanned": 0, "unreadable": 0, "error": "cannot list /proc"}
    for pid in pids:
        if pid == me:
            continue
        base = f"/proc/{pid}"
        found: dict[str, set[str]] = {}
        denied = False

        def note(path: str, via: str, found: dict[str, set[str]] = found) -> None:
            v = layout.version_of_path(_unroot(path, hr), real)
            if v:
                found.setdefault(v, set()).add(via)

        exe = None
        try:
            exe = transport.readlink(base + "/exe")
            note(exe, "exe")
        except PermissionError:
            denied = True
        except OSError:
            pass
        try:
            for line in transport.read_text(base + "/maps").splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    note(parts[5], "maps")
        except PermissionError:
            denied = True
        except OSError:
            pass
        try:
            for fd in transport.listdir(base + "/fd"):
                try:
                    note(transport.readlink(f"{base}/fd/{fd}"), "fd")
                except OSError:
                    pass
        except PermissionError:
            denied = True
        except OSError:
            pass
        cmd: list[str] = []
        try:
            cmd = [a.decode("utf-8", "replace") for a in
                   transport.read_bytes(base + "/cmdline").split(b"\0") if a]
            for a in cmd:
                if hr:
                    a = a.replace(hr + "/", "/")
                for m in rx.finditer(a):
                    found.setdefault(m.group(1), set()).add("cmdline")
        except OSError:
            pass
        stats["scanned"] += 1
        if denied and not found:
            # cmdline and comm stay readable: a process we cannot look into blocks
            # gc only if it looks like Kata's (shim, hypervisor, virtiofsd)
            stats["unreadable"] += 1
            try:
                comm = transport.read_text(base + "/comm").strip()
            except OSError:
                comm = ""
            argv0 = cmd[0].rsplit("/", 1)[-1] if cmd else ""
            if _KATA_LIKE.search(comm) or _KATA_LIKE.search(argv0):
                stats.setdefault("unreadableKata", []).append(pid)
        if found:
            try:
                comm = transport.read_text(base + "/comm").strip()
            except OSError:
                comm = ""
            refs.append(ProcRef(pid, comm, _unroot(exe, hr) if exe else exe, cmd, found))
    return refs, stats


#: what may precede a release path in an argument for it to name another tree's copy
#: (/mnt/old/opt/kata/releases/V, a second node root or a backup on this machine)
_PATH_CHARS = "A-Za-z0-9._~/-"


def _arg_rx(prefixes: list[str]) -> re.Pattern[str]:
    """A release path anywhere in an argument that no path character precedes, its version
    ending at the first character no version has. A separator list misses real forms: Kata
    passes ``-kernel PATH``, ``file=PATH,...`` and ``mem-path=PATH`` (kata-containers
    src/runtime/pkg/govmm/qemu/qemu.go); QEMU takes ``-blockdev {"filename":"PATH"}``; a
    shell wrapper ``sh -c 'exec "PATH" "$@"'``, ``cd /;PATH``, ``a&&PATH`` or
    ``K=RELEASE; exec $K/bin/...``. The argv is /proc/PID/cmdline's NUL-separated words."""
    return re.compile(rf"(?<![{_PATH_CHARS}])(?:" + "|".join(re.escape(p + "/") for p in prefixes)
                      + rf")([A-Za-z0-9][{VERSION_CHARS}]*)")


def _unroot(path: str, host_root: str) -> str:
    """Under --host-root, a process of this machine may show its files by their
    real path (a lab tree whose /proc is this host's): map them back to node paths."""
    if host_root and path.startswith(host_root + "/"):
        return path[len(host_root):]
    return path


# -- sandboxes ------------------------------------------------------------------
def sandboxes(transport: NodeTransport, found: list | None = None) -> list[dict]:
    """Sandbox records from the shared discovery (katactl.sandbox): id, pod,
    hypervisor pid, and the configured hypervisor binary and guest assets.
    ``found``: the node's sandboxes when the caller discovered them already."""
    from katactl.sandbox import discover

    out: list[dict] = []
    for s in found if found is not None else discover(transport, check=False):
        out.append({"id": s.id, "runtime": s.runtime, "pod": s.pod, "podRef": s.pod_ref,
                    "hypervisorPid": s.hypervisor_pid,
                    "paths": [p for p in (s.hypervisor_path, s.kernel, s.initrd, s.image) if p]})
    return out


def attribute(transport: NodeTransport, layout, procs: list[ProcRef], sbs: list[dict]) -> list[dict]:
    """For each sandbox: release of its shim, its hypervisor, and its guest assets."""
    real = layout.real_releases(transport)
    by_pid = {p.pid: p for p in procs}
    shims: dict[str, ProcRef] = {}
    for p in procs:
        if role_of(p) == "shim" and "-id" in p.cmdline:
            i = p.cmdline.index("-id")
            if i + 1 < len(p.cmdline):
                shims[p.cmdline[i + 1]] = p
    rows = []
    for s in sbs:
        sid = s["id"]
        hv = by_pid.get(s.get("hypervisorPid") or -1)
        alive = bool(s.get("hypervisorPid")) and transport.exists(f"/proc/{s['hypervisorPid']}")
        shim = shims.get(sid)
        configured = sorted({v for v in (layout.version_of_path(p, real) for p in s["paths"]) if v})
        rows.append({
            "id": sid, "pod": s.get("pod"), "podRef": s.get("podRef"), "runtime": s.get("runtime"),
            "shimPid": shim.pid if shim else None,
            "shimRelease": _one(shim.releases) if shim else None,
            "hypervisorPid": s.get("hypervisorPid"), "hypervisorRunning": alive,
            "hypervisorRelease": _one(hv.releases) if hv else None,
            "assetsRelease": _one({v: set() for v in configured}) if configured else None,
            "releases": sorted(set(configured) | set(shim.releases if shim else ()) |
                               set(hv.releases if hv else ())) if (alive or shim) else [],
        })
    return rows


def _one(d) -> str | None:
    vs = sorted(d)
    if not vs:
        return None
    return vs[0] if len(vs) == 1 else ",".join(vs)
