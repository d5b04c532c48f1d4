"""Which running processes and sandboxes use which release.

A process *references* a release when its executable (``/proc/<pid>/exe``),
a mapped file (``maps``: shared libraries, mmapped kernels), an open file
descriptor (``fd/``: QEMU keeps the guest image and initrd open) or an
argument (``cmdline``: ``-kernel``, ``-initrd``, ``file=``) lies under
``releases/<v>/``. Deleted files still count (``(deleted)`` suffix): a
process that runs a removed binary is still an old-release process.

Sandboxes come from the runtime's state (persist.json / state.json): the
configured hypervisor binary and guest assets, the hypervisor pid, and the
shim process (the ``containerd-shim-kata-v2 ... -id <sandbox-id>`` process).
"""
from __future__ import annotations

import dataclasses
import json
import re

_SHIM_NAMES = ("containerd-shim-kata-v2",)


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


def scan(transport, layout) -> tuple[list[ProcRef], dict]:
    """Every process that references some release; plus scan statistics."""
    import os

    prefix = layout.releases + "/"
    rx = re.compile(re.escape(prefix) + r"([^/\s,:=]+)")
    me = os.getpid() if not getattr(transport, "host_root", None) else None
    hr = getattr(transport, "host_root", "") or ""
    refs: list[ProcRef] = []
    stats = {"scanned": 0, "unreadable": 0}
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

        def note(path: str, via: str):
            v = layout.version_of_path(_unroot(path, hr))
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
                    v = m.group(1)
                    if not v.startswith("."):
                        found.setdefault(v, set()).add("cmdline")
        except OSError:
            pass
        stats["scanned"] += 1
        if denied and not found:
            stats["unreadable"] += 1
        if found:
            try:
                comm = transport.read_text(base + "/comm").strip()
            except OSError:
                comm = ""
            refs.append(ProcRef(pid, comm, _unroot(exe, hr) if exe else exe, cmd, found))
    return refs, stats


def _unroot(path: str, host_root: str) -> str:
    """Under --host-root, a process of this machine may show its files by their
    real path (a lab tree whose /proc is this host's): map them back to node paths."""
    if host_root and path.startswith(host_root + "/"):
        return path[len(host_root):]
    return path


# -- sandboxes ------------------------------------------------------------------
def sandboxes(transport) -> list[dict]:
    """Minimal sandbox records: id, runtime, hypervisor pid, configured paths.

    Uses katactl.sandbox.discover when present (the shared discovery), else
    reads persist.json / state.json directly."""
    try:
        from katactl import sandbox as sb  # written by the sandbox issue
        discover = getattr(sb, "discover", None)
    except ImportError:
        discover = None
    out: list[dict] = []
    if discover is not None:
        try:
            for s in discover(transport):
                g = (lambda k, s=s: (s.get(k) if isinstance(s, dict) else getattr(s, k, None)))
                out.append({"id": g("id") or g("sandbox_id"), "runtime": g("runtime"),
                            "hypervisorPid": g("hypervisor_pid"),
                            "paths": [p for p in (g("hypervisor_path"), g("kernel"), g("initrd"),
                                                  g("image")) if p]})
            return out
        except Exception:  # fall back to our own reader rather than report nothing
            out = []
    for base, fname, runtime in (("/run/vc/sbs", "persist.json", "go"), ("/run/kata", "state.json", "rs")):
        try:
            ids = transport.listdir(base)
        except OSError:
            continue
        for sid in ids:
            try:
                d = json.loads(transport.read_bytes(f"{base}/{sid}/{fname}", limit=16 << 20))
            except (OSError, ValueError):
                continue
            if not isinstance(d, dict):
                continue
            if runtime == "go":
                hs = d.get("HypervisorState") or {}
                hc = (d.get("Config") or {}).get("HypervisorConfig") or {}
                pid = hs.get("Pid")
                paths = [hc.get(k) for k in ("HypervisorPath", "KernelPath", "InitrdPath", "ImagePath")]
            else:
                h = d.get("hypervisor") or {}
                cfg = h.get("config") or {}
                boot = cfg.get("boot_info") or {}
                pid = h.get("pid")
                paths = [cfg.get("path"), boot.get("kernel"), boot.get("initrd"), boot.get("image")]
            out.append({"id": sid, "runtime": runtime, "hypervisorPid": pid if isinstance(pid, int) else None,
                        "paths": [p for p in paths if isinstance(p, str) and p]})
    return out


def attribute(transport, layout, procs: list[ProcRef], sbs: list[dict]) -> list[dict]:
    """For each sandbox: release of its shim, its hypervisor, and its guest assets."""
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
        configured = sorted({v for v in (layout.version_of_path(p) for p in s["paths"]) if v})
        rows.append({
            "id": sid, "runtime": s.get("runtime"),
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
