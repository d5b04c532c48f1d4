"""Memory elasticity: read and move a sandbox's memory balloon.

One meaning for the user: the **guest-visible memory target** (what the guest
keeps), or "reclaim N" (take N more away), or "release" (give everything back).
Converted per hypervisor: QEMU's ``balloon`` value is the guest size; Cloud
Hypervisor's ``desired_balloon`` and Firecracker's ``amount_mib`` are the
balloon size (memory taken away).

Path order (design.md "Shim management extension"):
1. ``extension``: the shim's katactl extension (``/ext/v1/balloon``);
2. ``hypervisor-api``: Cloud Hypervisor / Firecracker HTTP APIs (multi-client);
3. ``extra-monitor``: QEMU's ``extra-monitor.sock`` (a second QMP monitor);
4. ``qmp``: QEMU's ``qmp.sock`` if it greets (normally the runtime holds it);
5. otherwise an exact explanation of each path tried and the setting that
   would make one work.

Library only: functions return dicts; nothing prints.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from typing import TYPE_CHECKING, Callable

from katactl.errors import (SOCKET_MISSING, SOCKET_REFUSED, Interrupted, KatactlError, NotFound, OperationFailed,
                            ProtocolError, Refused, TimeoutExpired, UnreachableError, UsageError)
from katactl.values import format_size
from katactl.backends import shape
from katactl.backends.base import NodeTransport

if TYPE_CHECKING:
    from katactl.sandbox import Sandbox

MIB = 1 << 20
#: virtio-balloon's page (VIRTIO_BALLOON_PFN_SHIFT = 12, linux include/uapi/linux/virtio_balloon.h)
BALLOON_PAGE = 4096
PATHS = ("extension", "hypervisor-api", "extra-monitor", "qmp")
DEFAULT_MARGIN = 64 * MIB
DEFAULT_TOLERANCE = 4 * MIB

EXTRA_MONITOR_HINT = ('set extra_monitor_socket = "qmp" in [hypervisor.qemu] of the Kata configuration '
                      "(new sandboxes get a second QMP monitor, extra-monitor.sock)")
EXTENSION_HINT = "run a shim that implements the katactl shim extension (docs/shim-extension.md)"
NO_BALLOON_HINT = ("Kata adds the virtio-balloon device only with reclaim_guest_freed_memory = true "
                   "in the [hypervisor.*] section; new sandboxes get it")
#: neither Kata runtime configures a Firecracker balloon (src/runtime/virtcontainers/fc.go,
#: src/runtime-rs/crates/hypervisor/src/firecracker/fc_api.rs: no PUT /balloon), whatever the setting
FC_NO_BALLOON_HINT = ("Kata's Firecracker drivers add no balloon device (reclaim_guest_freed_memory does not "
                      "apply to Firecracker): only a Firecracker given PUT /balloon before boot has one")


def no_balloon_hint(hypervisor: str | None) -> str:
    return FC_NO_BALLOON_HINT if hypervisor == "fc" else NO_BALLOON_HINT


class NoBalloon(OperationFailed):
    code = "NoBalloon"


class VMGone(OperationFailed):
    code = "VMGone"


# -- paths ----------------------------------------------------------------------
class _Path:
    name = "?"
    #: the unit the hypervisor sets the balloon in (for the "rounded" warning)
    unit = "its own units"

    def state(self, guest: bool = True) -> dict:
        """{memory, target (guest bytes or None), actual (guest bytes), guest {total,free,available}|None}"""
        raise NotImplementedError

    def effective_target(self, want: int, memory: int) -> int:
        """The guest-visible target this path really sets for ``want`` (what the hypervisor
        then reports as its target, and what the guest's memory converges to)."""
        return want

    def set_target(self, target: int) -> int | None:
        """Ask for ``target``; return the target the hypervisor recorded when it says so."""
        raise NotImplementedError

    def _client(self):
        """The client whose ``timeout`` bounds each call (read at call time)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def timeout_at_most(self, seconds: float):
        """Calls made inside take at most ``seconds`` (a wait's deadline bounds its polls)."""
        c = self._client()
        saved = c.timeout
        c.timeout = min(saved, seconds)
        try:
            yield
        finally:
            c.timeout = saved

    def close(self) -> None:
        pass


def page_effective_target(want: int, memory: int) -> int:
    """virtio-balloon asks the guest for whole 4 KiB pages of balloon, rounded down, so the
    guest keeps at least ``want``: QEMU (qemu hw/virtio/virtio-balloon.c
    ``virtio_balloon_to_target``: ``num_pages = (ram_size - target) >> VIRTIO_BALLOON_PFN_SHIFT``)
    and Cloud Hypervisor (cloud-hypervisor virtio-devices/src/balloon.rs ``Balloon::resize``:
    ``num_pages = size >> VIRTIO_BALLOON_PFN_SHIFT``). ``query-balloon``'s ``actual`` and CLH's
    ``memory_actual_size`` count whole pages too."""
    return memory - (memory - int(want)) // BALLOON_PAGE * BALLOON_PAGE


UNITS = {"fc": "Firecracker: MiB of balloon", "qemu": "QEMU: 4 KiB pages of balloon",
         "clh": "Cloud Hypervisor: 4 KiB pages of balloon"}


def fc_effective_target(want: int, memory: int) -> int:
    """Firecracker's ``amount_mib`` is whole MiB of balloon (firecracker
    src/vmm/src/vmm_config/balloon.rs ``BalloonUpdateConfig { amount_mib: u32 }``): rounded
    up, so the guest keeps at most ``want``."""
    return memory - -(-(memory - int(want)) // MIB) * MIB


class _ExtensionPath(_Path):
    name = "extension"

    def __init__(self, shim, hypervisor: str | None = None):
        self.shim = shim
        self.hypervisor = hypervisor
        self.unit = UNITS.get(hypervisor or "", _Path.unit)

    def _call(self, method: str, body: dict | None = None, url: str = "/ext/v1/balloon") -> dict:
        kw = {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}} \
            if body is not None else {}
        status, raw = self.shim.call(method, url, **kw)
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            raise ProtocolError(f"{self.shim.what}: /ext/v1/balloon did not answer JSON") from None
        if status == 200:
            return shape.obj(obj, f"{self.shim.what}: {method} {url}")
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, str):  # a shim's plain {"error": "..."}: its words, not ours
            err = {"message": err}
        err = err if isinstance(err, dict) else {}
        msg = str(err.get("message") or raw[:200].decode(errors="replace"))
        code = err.get("code")
        if code == "NoBalloon" or (status == 409 and code == "DeviceNotActive"):
            raise NoBalloon(f"{self.shim.what}: {msg}", hint=no_balloon_hint(self.hypervisor))
        if code in ("HypervisorGone", "MonitorUnavailable") or status == 503:
            raise VMGone(f"{self.shim.what}: {msg}")
        if status == 400:
            raise UsageError(f"{self.shim.what}: {msg}")
        raise OperationFailed(f"{self.shim.what}: extension answered {status}: {msg}")

    def state(self, guest: bool = True) -> dict:
        url = "/ext/v1/balloon" if guest else "/ext/v1/balloon?guest=0"
        o = self._call("GET", url=url)
        what = f"{self.shim.what}: GET {url}"  # fields as docs/shim-extension.md gives them
        g = o.get("guest")
        if g is not None:
            g = shape.obj(g, what, "guest")
            g = {k: shape.opt_integer(g.get(f"{k}Bytes"), what, f"guest.{k}Bytes")
                 for k in ("total", "free", "available")} if g else None
        return {"memory": shape.integer(o.get("memoryBytes"), what, "memoryBytes"),
                "target": shape.opt_integer(o.get("targetBytes"), what, "targetBytes"),
                "actual": shape.opt_integer(o.get("actualBytes"), what, "actualBytes"), "guest": g}

    def effective_target(self, want: int, memory: int) -> int:
        # docs/shim-extension.md: the shim converts for Firecracker as _FcPath does; QEMU and
        # Cloud Hypervisor then round to pages as they do for any client
        if self.hypervisor == "fc":
            return fc_effective_target(want, memory)
        if self.hypervisor in ("qemu", "clh"):
            return page_effective_target(want, memory)
        return want

    def set_target(self, target: int) -> int | None:
        t = self._call("PUT", {"targetBytes": int(target)}).get("targetBytes")
        return shape.opt_integer(t, f"{self.shim.what}: PUT /ext/v1/balloon", "targetBytes")

    def _client(self):
        return self.shim

    def close(self):
        self.shim.close()


#: QEMU's guest-stats names for the figures katactl uses (qemu hw/virtio/virtio-balloon.c balloon_stat_names)
QEMU_STATS = {"total": "stat-total-memory", "free": "stat-free-memory", "available": "stat-available-memory"}


def qemu_guest_stats(r, what: str) -> dict | None:
    """QEMU's ``qom-get guest-stats`` answer as {total, free, available, lastUpdate}; None when
    the guest never sent statistics (last-update 0) or not its MemTotal. A statistic the guest
    did not send is None: QEMU keeps -1 in its ``uint64_t stats[]`` for those (reset_stats, "in
    case the guest reports a subset", qemu hw/virtio/virtio-balloon.c) and visits it as uint64,
    so 18446744073709551615 reaches us; older QEMUs printed it as int64, -1. Anything of the
    wrong JSON type is a ProtocolError naming ``what`` (backends/shape.py)."""
    r = shape.obj(r, what)
    upd = shape.opt_integer(r.get("last-update"), what, "last-update")
    st = shape.obj(r.get("stats"), what, "stats") if r.get("stats") is not None else {}
    out: dict = {}
    for k, name in QEMU_STATS.items():
        v = shape.opt_integer(st.get(name), what, f"stats.{name}")
        out[k] = None if v is None or v < 0 or v >= 1 << 63 else v
    if not upd or out["total"] is None:
        return None
    return {**out, "lastUpdate": upd}


class _QmpPath(_Path):  # noqa: D101
    unit = UNITS["qemu"]

    def __init__(self, name: str, qmp):
        self.name = name
        self.qmp = qmp
        self.memory: int | None = None

    def _x(self, cmd, args=None):
        from katactl.backends.qmp import MonitorClosed, QMPError

        try:
            return self.qmp.execute(cmd, args)
        except MonitorClosed as e:
            raise VMGone(f"the VM exited or closed its monitor: {e.message}") from None
        except QMPError as e:
            if e.error_class == "DeviceNotActive":
                raise NoBalloon(f"the VM has no balloon device ({e.desc})", hint=NO_BALLOON_HINT) from None
            raise

    def state(self, guest: bool = True) -> dict:
        # qapi/machine.json MemoryInfo (plugged-memory optional), BalloonInfo
        if self.memory is None:
            what = f"{self.qmp.path}: query-memory-size-summary"
            m = shape.obj(self._x("query-memory-size-summary"), what)
            self.memory = shape.integer(m.get("base-memory"), what, "base-memory") \
                + (shape.opt_integer(m.get("plugged-memory"), what, "plugged-memory") or 0)
        what = f"{self.qmp.path}: query-balloon"
        actual = shape.integer(shape.obj(self._x("query-balloon"), what).get("actual"), what, "actual")
        if not guest:
            return {"memory": self.memory, "target": None, "actual": actual, "guest": None}
        try:
            r = self._x("qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"})
        except ProtocolError:
            raise
        except KatactlError:
            r = None  # no such property or device: no statistics
        g = None if r is None else qemu_guest_stats(r, f"{self.qmp.path}: QMP qom-get guest-stats")
        if g is not None:
            del g["lastUpdate"]
        # QEMU cannot report the target: only what the guest has now
        return {"memory": self.memory, "target": None, "actual": actual, "guest": g}

    def effective_target(self, want: int, memory: int) -> int:
        return page_effective_target(want, memory)

    def set_target(self, target: int) -> int | None:
        self._x("balloon", {"value": int(target)})
        return None

    def _client(self):
        return self.qmp

    def close(self):
        self.qmp.close()


class _ApiPath(_Path):
    """A hypervisor HTTP API client (ClhClient / FcClient) and its balloon_state()."""

    name = "hypervisor-api"
    hypervisor = "?"

    def __init__(self, client):
        self.c = client

    def _balloon(self) -> dict:
        s = self.c.balloon_state()
        if not s["hasBalloon"]:
            raise NoBalloon(f"{self.c.path}: the VM has no balloon device", hint=no_balloon_hint(self.hypervisor))
        return s

    def _client(self):
        return self.c

    def close(self):
        self.c.close()


class _ClhPath(_ApiPath):
    unit = UNITS["clh"]
    hypervisor = "clh"

    def effective_target(self, want: int, memory: int) -> int:
        # config.balloon.size keeps the un-rounded desired_balloon (cloud-hypervisor
        # vmm/src/vm.rs Vm::resize), the guest gets whole pages
        return page_effective_target(want, memory)

    def state(self, guest: bool = True) -> dict:
        s = self._balloon()
        mem = s["memory"]
        return {"memory": mem, "target": mem - s["balloonTarget"], "actual": mem - s["balloonActual"],
                "guest": None}

    def set_target(self, target: int) -> int | None:
        s = self._balloon()
        self.c.resize(desired_balloon=max(0, s["memory"] - int(target)))
        return None


class _FcPath(_ApiPath):
    unit = UNITS["fc"]
    hypervisor = "fc"

    def state(self, guest: bool = True) -> dict:
        s = self._balloon()
        mem = s["memory"]
        actual = None if s["balloonActual"] is None else mem - s["balloonActual"]
        return {"memory": mem, "target": mem - s["balloonTarget"], "actual": actual, "guest": s.get("guest")}

    def effective_target(self, want: int, memory: int) -> int:
        return fc_effective_target(want, memory)

    def set_target(self, target: int) -> int | None:
        mem = self._balloon()["memory"]
        eff = fc_effective_target(target, mem)
        self.c.patch_balloon(max(0, (mem - eff) // MIB))
        return eff


#: QEMU's options that serve a monitor on a chardev, and the protocol each speaks
_MONITOR_OPTIONS = {"monitor": "hmp", "qmp": "qmp", "qmp-pretty": "qmp-pretty"}


def _extra_monitor_protocol(transport: NodeTransport, sb) -> str | None:
    """What the VMM serves on extra-monitor.sock, from its command line: govmm passes
    ``-monitor unix:path=<sock>,server=on,wait=off`` for hmp and ``-qmp`` for qmp
    (kata-containers src/runtime/pkg/govmm/qemu/qemu.go appendQMPSockets; older releases
    ``unix:<sock>,server,nowait``). The Go runtime does not persist extra_monitor_socket
    (virtcontainers/sandbox.go dumpConfig) and the configuration may not resolve; the
    process always tells. None when it cannot be read or names no such monitor."""
    if not sb.hypervisor_pid:
        return None
    try:
        raw = transport.read_bytes(f"/proc/{int(sb.hypervisor_pid)}/cmdline", limit=1 << 20)
    except (OSError, KatactlError):
        return None
    argv = raw.decode(errors="replace").split("\0")
    for opt, val in zip(argv, argv[1:], strict=False):  # each option with the word after it
        proto = _MONITOR_OPTIONS.get(opt.lstrip("-")) if opt.startswith("-") else None
        if proto is None:
            continue
        # "unix:path=/run/vc/vm/<id>/extra-monitor.sock,server=on,..." or "unix:/run/...,server,..."
        where = val.removeprefix("unix:").split(",")[0].removeprefix("path=")
        if where.rsplit("/", 1)[-1] == "extra-monitor.sock":
            return proto
    return None


def open_path(transport: NodeTransport, sb, *, via: str = "auto", timeout: float = 10.0) -> tuple[_Path, list[dict]]:
    """The first path that works, in design order; and the attempts made."""
    from katactl.backends.qmp import MonitorBusy, QMPClient

    if via not in ("auto",) + PATHS:
        raise UsageError(f"invalid balloon path {via!r} (choose from auto, {', '.join(PATHS)})")
    attempts: list[dict] = []

    def tried(name, why):
        attempts.append({"path": name, "result": why})

    want = PATHS if via == "auto" else (via,)
    hv = sb.hypervisor
    if "extension" in want:
        if not sb.shim_socket:
            tried("extension", "the sandbox has no shim socket")
        else:
            from katactl.backends.shim import ShimClient

            shim = ShimClient.for_sandbox(transport, sb, timeout=timeout)
            try:
                caps = shim.capabilities()
                if caps is None:
                    tried("extension", "the shim does not implement the katactl extension (404)")
                    shim.close()
                elif "balloon" not in (caps.get("features") or []):
                    tried("extension", "the shim's extension has no balloon feature")
                    shim.close()
                else:
                    return _ExtensionPath(shim, hv), attempts
            except KatactlError as e:
                tried("extension", e.message)
                shim.close()
    if "hypervisor-api" in want:
        if hv in ("clh", "fc"):
            if not sb.api_socket:
                tried("hypervisor-api", "no API socket recorded for the sandbox")
            else:
                try:
                    if hv == "clh":
                        from katactl.backends.clh import ClhClient

                        clh = ClhClient(transport, sb.api_socket, timeout)
                        clh.ping()
                        return _ClhPath(clh), attempts
                    from katactl.backends.fc import FcClient

                    fc = FcClient(transport, sb.api_socket, timeout)
                    fc.machine_config()
                    return _FcPath(fc), attempts
                except KatactlError as e:
                    tried("hypervisor-api", e.message)
        else:
            tried("hypervisor-api", f"{hv or 'unknown hypervisor'} has no multi-client HTTP API")
    if hv == "qemu":
        if "extra-monitor" in want:
            proto = _extra_monitor_protocol(transport, sb) if sb.extra_monitor_socket else None
            if not sb.extra_monitor_socket:
                tried("extra-monitor", "no extra-monitor.sock (extra_monitor_socket is not configured)")
            elif proto and proto.lower() not in ("qmp", "qmp-pretty"):
                tried("extra-monitor", f"extra-monitor.sock speaks {proto}, not QMP")
            else:
                try:
                    return _QmpPath("extra-monitor", QMPClient.connect(
                        transport, sb.extra_monitor_socket, timeout=timeout)), attempts
                except MonitorBusy:
                    tried("extra-monitor", "extra-monitor.sock is held by another client")
                except KatactlError as e:
                    tried("extra-monitor", e.message)
        if "qmp" in want:
            if not sb.api_socket:
                tried("qmp", "no qmp.sock recorded for the sandbox")
            else:
                try:
                    return _QmpPath("qmp", QMPClient.connect(transport, sb.api_socket, timeout=timeout)), attempts
                except MonitorBusy:
                    tried("qmp", "qmp.sock is held by another client (the Kata runtime keeps it for the "
                                 "sandbox's life; a QEMU monitor serves one client at a time)")
                except KatactlError as e:
                    tried("qmp", e.message)
    elif via in ("extra-monitor", "qmp"):
        tried(via, f"only QEMU sandboxes have QMP monitors (this one runs {hv or 'an unknown hypervisor'})")
    lines = "; ".join(f"{a['path']}: {a['result']}" for a in attempts)
    hint = EXTENSION_HINT + (", or " + EXTRA_MONITOR_HINT if hv == "qemu" else "")
    raise UnreachableError(f"cannot reach the balloon of sandbox {sb.id[:12]}: {lines}", hint=hint,
                           details={"attempts": attempts})


# -- guest usage ----------------------------------------------------------------
_MEMINFO = re.compile(r'^kata_guest_meminfo\{[^}]*item="(mem_total|mem_free|mem_available)"[^}]*\}\s+(\S+)',
                      re.M)


def _guest_from_metrics(transport: NodeTransport, sb, timeout: float) -> dict | None:
    if not sb.shim_socket:
        return None
    from katactl.backends.shim import ShimClient

    try:
        with ShimClient.for_sandbox(transport, sb, timeout=timeout) as shim:
            text = shim.metrics_text()
    except KatactlError:
        return None
    vals = {}
    for k, v in _MEMINFO.findall(text):
        try:
            f = float(v)
        except ValueError:
            continue
        if math.isfinite(f):  # NaN, +-Inf: valid exposition text, not a size (int() raised)
            vals[k] = int(f)
    if "mem_total" not in vals or "mem_available" not in vals:
        return None
    return {"total": vals["mem_total"], "free": vals.get("mem_free"), "available": vals["mem_available"],
            "source": "metrics"}


def _guest_now(st: dict) -> int:
    """The guest-visible memory now: what the guest has, else its target, else the VM's size."""
    for k in ("actual", "target", "memory"):
        if st.get(k) is not None:
            return int(st[k])
    return 0


def _usage_unknown_reason(st: dict) -> str:
    g = st.get("guest")
    if not g or g.get("total") is None:
        return "no guest statistics"
    if g.get("available") is None:
        return "the guest does not report MemAvailable"
    # guest_used() gave up: the sample counts pages the balloon has taken since
    return "the guest statistics predate the balloon's last move"


#: whether Kata's balloon on this hypervisor has VIRTIO_BALLOON_F_DEFLATE_ON_OOM. QEMU's always
#: has (kata-containers src/runtime/virtcontainers/qemu.go CreateVM: BalloonDev DeflateOnOOM true,
#: the only balloon Kata adds); the others are left to guest_used's MemTotal rule.
DEFLATE_ON_OOM = {"qemu": True}


def guest_used(state: dict, hypervisor: str | None = None) -> int | None:
    """Memory the guest really uses (excluding pages held by the balloon). With deflate-on-oom
    the guest driver leaves the balloon's pages in MemTotal (linux drivers/virtio/virtio_balloon.c:
    adjust_managed_page_count only without it), and they are not free: they are taken out.
    Where the hypervisor does not say (DEFLATE_ON_OOM), a MemTotal above the guest's memory
    less the balloon means it did not shrink; this misses a balloon smaller than what the
    guest's kernel reserves (MemTotal is below the VM's memory by that much)."""
    g = state.get("guest")
    if not g or g.get("total") is None or g.get("available") is None:
        return None
    used = int(g["total"]) - int(g["available"])
    mem, actual = state.get("memory"), state.get("actual")
    deflate = DEFLATE_ON_OOM.get(hypervisor or "")
    if deflate is None and mem and actual is not None:
        deflate = int(g["total"]) > int(actual) + DEFAULT_TOLERANCE
    if deflate and mem and actual is not None:
        used -= int(mem) - int(actual)
    if used < 0:
        return None  # statistics older than the balloon's last move: not usable
    return used


# -- public API -------------------------------------------------------------------
def _view(sb, path: _Path, st: dict, attempts: list[dict]) -> dict:
    used = guest_used(st, sb.hypervisor)
    g = st.get("guest")
    return {
        "sandbox": sb.id,
        "pod": sb.pod,
        "podRef": sb.pod_ref,
        "hypervisor": sb.hypervisor,
        "path": path.name,
        "memoryBytes": st.get("memory"),
        "targetBytes": st.get("target"),
        "actualBytes": st.get("actual"),
        "balloonBytes": (st["memory"] - st["actual"]) if st.get("memory") and st.get("actual") is not None else None,
        "guest": ({"totalBytes": g.get("total"), "usedBytes": used, "availableBytes": g.get("available"),
                   "freeBytes": g.get("free"), "source": g.get("source", path.name)} if g else None),
        "attempts": attempts,
    }


def _state_with_guest(transport: NodeTransport, sb, path: _Path, timeout: float) -> dict:
    st = path.state()
    if isinstance(path, _QmpPath):
        # the agent's metrics read the guest's /proc/meminfo at scrape time; QEMU's balloon
        # statistics are the last polled sample (possibly older than the balloon's last move)
        st["guest"] = _guest_from_metrics(transport, sb, timeout) or st.get("guest")
    elif st.get("guest") is None and not isinstance(path, _ExtensionPath):
        # (an extension that gives no guest statistics knows they are unusable right now)
        st["guest"] = _guest_from_metrics(transport, sb, timeout)
    return st


def _resolve(transport: NodeTransport, ref: str | Sandbox) -> Sandbox:
    """ref: a Sandbox (already resolved, e.g. by katactl.sandbox.on_sandbox) or a reference string."""
    from katactl import sandbox

    sb = sandbox.as_sandbox(transport, ref)
    if sb.raw is None:
        raise OperationFailed(f"sandbox {sb.id[:12]}: {sb.reason or 'state file unreadable'}")
    return sb


def get(transport: NodeTransport, ref: str | Sandbox, *, via: str = "auto", timeout: float = 10.0) -> dict:
    sb = _resolve(transport, ref)
    path, attempts = open_path(transport, sb, via=via, timeout=timeout)
    try:
        return _view(sb, path, _state_with_guest(transport, sb, path, timeout), attempts)
    finally:
        path.close()


def plan_target(st: dict, *, target: int | None, reclaim: int | None, release: bool) -> int:
    chosen = [x for x in (target is not None, reclaim is not None, release) if x]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --target SIZE, --reclaim SIZE or --release")
    mem = int(st["memory"])
    if release:
        return mem
    if target is not None:
        return int(target)
    assert reclaim is not None  # exactly one of the three was given (checked above)
    base, what = st.get("target"), "the current target"
    if base is None:
        base, what = st.get("actual"), "the guest's current memory"
    if base is None:
        base, what = mem, "the VM's memory"
    if int(reclaim) >= int(base):
        # a value that cannot be applied (no --force makes it one), not a negative target
        raise UsageError(f"--reclaim {format_size(int(reclaim))} is not less than {what} {format_size(int(base))}",
                         hint="--target SIZE sets the memory the guest keeps")
    return int(base) - int(reclaim)


def set(transport: NodeTransport, ref: str | Sandbox, *, target: int | None = None, reclaim: int | None = None,  # noqa: A001
        release: bool = False, wait: bool = False, wait_timeout: float = 60.0,
        tolerance: int = DEFAULT_TOLERANCE, margin: int = DEFAULT_MARGIN, force: bool = False,
        dry_run: bool = False, via: str = "auto", timeout: float = 10.0,
        progress: Callable[[dict], None] | None = None) -> dict:
    """Move the balloon so the guest keeps ``target`` bytes; return the view + changed/dryRun."""
    from katactl import audit

    # usage errors before touching anything
    if [target is not None, reclaim is not None, release].count(True) != 1:
        raise UsageError("give exactly one of --target SIZE, --reclaim SIZE or --release")
    for v, name in ((target, "--target"), (reclaim, "--reclaim")):
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise UsageError(f"invalid {name} {v!r}: must be greater than zero")
    if not dry_run:
        audit.require_writable()  # no untraceable change (exit 5 unless --no-audit)
    sb = _resolve(transport, ref)
    path, attempts = open_path(transport, sb, via=via, timeout=timeout)
    try:
        st = _state_with_guest(transport, sb, path, timeout)
        if wait and st.get("actual") is None:
            # known before anything is sent: a refusal changes nothing (a request sent and then
            # "cannot --wait" was a change reported as a failure)
            raise Refused(f"sandbox {sb.id[:12]}: cannot --wait: the hypervisor does not report the balloon's "
                          "actual size (Firecracker: balloon statistics are off); nothing was sent",
                          hint="drop --wait (the target is still checked and set; 'katactl balloon get' shows it), "
                               "or boot the VM with balloon statistics (Firecracker: stats_polling_interval_s > 0 "
                               "in PUT /balloon before InstanceStart)")
        mem = int(st["memory"])
        want = plan_target(st, target=target, reclaim=reclaim, release=release)
        warnings: list[str] = []
        if reclaim is not None and st.get("target") is None and st.get("actual") is not None:
            # a pending target (another client's, one the guest has not acted on) is invisible
            warnings.append(f"the hypervisor does not report its target: --reclaim counted from the guest's "
                            f"current memory ({format_size(int(st['actual']))})")
        used = guest_used(st, sb.hypervisor)
        if want > mem:
            if not force:
                raise Refused(f"target {format_size(want)} is above the VM's memory {format_size(mem)}",
                              hint="the balloon can only take memory away; --release gives all of it back")
            warnings.append(f"target {format_size(want)} above the VM's memory: clamped to {format_size(mem)}")
            want = mem
        # what the path really sets (Firecracker: whole MiB of balloon): every check and
        # comparison is made against it, or a target that is not a whole MiB never converges
        eff = path.effective_target(want, mem)
        if eff <= 0:
            raise Refused(f"target {format_size(eff)} leaves the guest no memory")
        current = st.get("target")
        actual = st.get("actual")
        goal = eff
        if current is None:
            # QEMU cannot report its target (qapi/machine.json: query-balloon gives only
            # ``actual``), and a pending one (guest paused, driver not loaded, another
            # client's request) is not visible in ``actual``: the request is always sent
            # (harmless, qemu hw/virtio/virtio-balloon.c virtio_balloon_to_target only
            # recomputes num_pages), and ``changed`` says whether the guest's memory was
            # not already the target: a re-run after success stays changed:false
            changed = actual is None or int(actual) != goal
            send = True
        else:
            # already there = the target is what we want *and* the guest got there; a target
            # set but not reached (or set by another client meanwhile) is requested again.
            # A shim records the request (docs/shim-extension.md), a hypervisor what it set:
            # either is "there", and either way the guest converges to the effective target.
            at_target = path.effective_target(int(current), mem) == eff
            # Firecracker without balloon statistics (its default) reports no actual: its
            # recorded target (GET /balloon amount_mib) is then all there is to go by
            reached = actual is None or abs(int(actual) - goal) <= tolerance
            changed = not (at_target and reached)
            send = changed
        if used is not None:
            floor = used + margin
            if eff < floor and not force:
                raise Refused(f"target {format_size(eff)} is below the guest's used memory {format_size(used)} plus a "
                              f"margin of {format_size(margin)} (= {format_size(floor)})",
                              hint="use --force to go below it (the guest may OOM or thrash)")
        elif changed and eff < _guest_now(st):
            # a shrink with no usage figure: the used+margin check cannot be made, and a
            # safety check must not skip itself quietly
            why = _usage_unknown_reason(st)
            if not force:
                raise Refused(f"target {format_size(eff)} shrinks the guest (it has {format_size(_guest_now(st))}) "
                              f"but its memory usage is unknown ({why}): the used+margin check cannot be made",
                              hint="retry when the guest's statistics are fresh, or use --force to shrink "
                                   "without the check (the guest may OOM or thrash)")
            warnings.append(f"guest memory usage unknown ({why}): shrinking without the used+margin "
                            "check (--force)")
        view = _view(sb, path, st, attempts)
        view.update({"requestedTargetBytes": want, "effectiveTargetBytes": goal, "previousTargetBytes": current,
                     "warnings": warnings, "waited": False, "converged": None})
        if dry_run:
            view.update(changed=changed, dryRun=True)
            warnings.extend(_rounded(want, goal, path.unit))
            return view
        params = {"targetBytes": want, "effectiveTargetBytes": goal, "previousTargetBytes": current,
                  "actualBytes": actual, "path": path.name, "force": force, "wait": wait}
        if send:
            # before the request: a change that lands is in the log whatever ends this run
            # (Ctrl-C in flight, kill -9 during --wait); the outcome follows it
            audit.record("balloon.set", sb.id, node=transport.node, changed=changed, params=params,
                         result="requested", requestSent=True)
        try:
            if send:
                recorded = path.set_target(want)
                if recorded is not None:  # (a shim may have clamped it)
                    goal = path.effective_target(recorded, mem)
            if wait:
                st = _wait(path, goal, tolerance, wait_timeout, progress, sb)
            else:
                st = path.state()
        except BaseException as e:
            if not send:
                raise
            audit.record_unfinished("balloon.set", sb.id, node=transport.node, params=params, exc=e, sent=True,
                                    result=_outcome(e), changed=changed)
            raise _after_send(e, sb, changed) from None
        if send:
            audit.record("balloon.set", sb.id, node=transport.node, changed=changed, params=params)
        final = _view(sb, path, {**st, "guest": st.get("guest") or _guestback(view)}, attempts)
        if changed and final["guest"] is not None and not st.get("guest"):
            # measured before the change: what the guest itself uses still holds, its
            # total/free/available do not (the balloon moved since)
            final["guest"].update(totalBytes=None, freeBytes=None, availableBytes=None,
                                  source=f"{final['guest'].get('source')} (before the change)")
        if final["guest"] is not None and used is not None:
            # guest statistics lag the balloon by their polling interval: keep the
            # measurement made before the change
            final["guest"]["usedBytes"] = used
        if final["targetBytes"] is None and send:
            final["targetBytes"] = goal  # (QEMU: the target is what was just requested)
        warnings.extend(_rounded(want, goal, path.unit))
        final.update({"requestedTargetBytes": want, "effectiveTargetBytes": goal, "previousTargetBytes": current,
                      "warnings": warnings, "waited": wait, "converged": (abs(int(st["actual"]) - goal) <= tolerance)
                      if st.get("actual") is not None else None,
                      "changed": changed, "dryRun": False})
        return final
    finally:
        path.close()


def _after_send(exc: BaseException, sb, changed: bool) -> BaseException:
    """``exc`` of a run whose request was sent, telling the caller so (docs/output.md
    "Failures"): ``changed`` on the Error object and ``details.changed``/``requestSent``, or
    an Ansible ``changed_when`` reading the failed run's JSON hides the change it made."""
    if isinstance(exc, KeyboardInterrupt):  # (SIGTERM and SIGHUP arrive as it too: katactl.interrupt)
        exc = Interrupted(f"interrupted: sandbox {sb.id[:12]}: the balloon target was sent, the guest "
                          "may still be moving to it", hint="katactl balloon get shows where the balloon is")
    elif not isinstance(exc, KatactlError):
        return exc  # a bug: its traceback, as it is
    exc.changed = changed
    exc.details = {**exc.details, "changed": changed, "requestSent": True}
    return exc


def _rounded(want: int, goal: int, unit: str) -> list[str]:
    if goal == want:
        return []
    return [f"the hypervisor sets whole units ({unit}): the target is {format_size(goal)} "
            f"({goal} bytes), not the requested {want} bytes"]


def _outcome(exc: BaseException) -> str:
    """The audit ``result`` of a run that ended in ``exc``."""
    if isinstance(exc, TimeoutExpired):
        return "timeout"
    if isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) == 130:
        return "interrupted"
    return "error"


def _guestback(view: dict) -> dict | None:
    g = view.get("guest")
    if not g:
        return None
    return {"total": g["totalBytes"], "available": g["availableBytes"], "free": g["freeBytes"],
            "source": g.get("source")}


def _wait(path: _Path, want: int, tolerance: int, wait_timeout: float, progress, sb) -> dict:
    """Poll until the guest has ``want`` (within ``tolerance``). ``wait_timeout`` is a deadline
    (design.md "Timeouts"): each poll gets at most the time left, and a poll cut short by it is
    the wait's own timeout."""
    deadline = time.monotonic() + wait_timeout
    start_actual = actual = None

    def timed_out() -> TimeoutExpired:
        now = "at an unknown size" if actual is None else f"at {format_size(actual)}"
        return TimeoutExpired(f"sandbox {sb.id[:12]}: balloon {now}, target {format_size(want)} "
                              f"not reached within {wait_timeout:g}s",
                              hint="the guest may lack a balloon driver, or refuse to give memory back",
                              details={"actualBytes": actual, "targetBytes": want})

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out()
        capped = left < path._client().timeout
        try:
            with path.timeout_at_most(left):
                st = path.state(guest=False)
        except TimeoutExpired:
            if capped:
                raise timed_out() from None
            raise
        except (VMGone, UnreachableError) as e:
            # the VM is known gone when the path says so (a QEMU monitor closed, the shim's
            # HypervisorGone) or its hypervisor's own API socket went with its process; a shim
            # or a relay to the node that stops answering says nothing about the VM
            if isinstance(e, VMGone) or (isinstance(path, _ApiPath)
                                         and getattr(e, "reason", None) in (SOCKET_MISSING, SOCKET_REFUSED)):
                raise VMGone(f"sandbox {sb.id[:12]}: the VM went away while waiting for the balloon "
                             f"({e.message})") from None
            raise UnreachableError(f"sandbox {sb.id[:12]}: lost the {path.name} path while waiting for the "
                                   f"balloon ({e.message}); the target was sent, the VM may still be running",
                                   hint="katactl balloon get shows where the balloon is") from None
        actual = st.get("actual")
        if actual is None:
            raise OperationFailed(f"sandbox {sb.id[:12]}: the hypervisor does not report the balloon's actual "
                                  "size (Firecracker: statistics must be enabled at boot), cannot --wait")
        if start_actual is None:
            start_actual = actual
        if progress is not None:
            progress({"actualBytes": actual, "targetBytes": want, "startBytes": start_actual})
        if abs(int(actual) - want) <= tolerance:
            return st
        time.sleep(max(0.0, min(0.1, deadline - time.monotonic())))


__all__ = ["get", "set", "open_path", "guest_used", "plan_target", "NoBalloon", "VMGone", "PATHS", "NotFound"]
