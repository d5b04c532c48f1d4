"""The lab daemon: plays the Kata runtime's part for every lab sandbox.

Started detached by ``katactl lab up`` (``python -m katactl.lab.daemon --root
ROOT``); reads ``ROOT/.katactl-lab/config.json``; writes
``ROOT/.katactl-lab/state.json``; stops on SIGTERM/SIGINT, killing its VMs
and removing the whole lab tree.

The node's Kata configuration is kata-deploy's (Lab.write_kata_config): containerd's
config importing ``/opt/kata/containerd/config.d/kata-deploy.toml``, handlers kata-qemu,
kata-clh and kata-fc with their own ``runtimes/<shim>/configuration-<shim>.toml`` and
``config.d`` (where the dump path lives), no ``/etc/kata-containers``.

For each sandbox it:
- lays out the Go runtime's node state under ROOT (katactl.lab.layout), and the
  bundle's ``shim-binary-path`` (containerd) and ``shim.pid`` (the shim: this daemon);
- QEMU: starts a real micro-VM (katactl.lab.vm) and, like the runtime, holds
  ``qmp.sock`` for the VM's whole life (reader thread; ``GUEST_PANICKED`` runs
  the runtime's panic handler, katactl.lab.panic);
- Cloud Hypervisor / Firecracker: serves a protocol-faithful API server on the
  socket the runtime would use;
- serves the shim management socket (``shim-monitor.sock``): ``/metrics``
  with real numbers from the VM where it can, ``/agent-url``, one direct-assigned
  volume (``/direct-volume/*`` for ``LAB_VOLUMES/<name>``, registered under
  ``/run/kata-containers/shared/direct-volumes``), and the katactl extension
  ``/ext/v1/...`` (docs/shim-extension.md).

The root also links the host's ``/proc``, ``/sys/fs/cgroup`` and (when mounted)
``/sys/fs/resctrl`` (katactl.lab.layout.link_host_views), so the lab looks like a
node to every command; removing the tree unlinks them, never follows them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING

from katactl import procfacts
from katactl.sandbox import pod_ref
from katactl.lab import layout as L

if TYPE_CHECKING:
    from katactl.backends.qmp import QMPClient
    from katactl.lab.clh_server import ClhServer
    from katactl.lab.fc_server import FcServer
    from katactl.lab.shimserver import ShimServer
    from katactl.lab.vm import GuestAssets

LAB_DIR = ".katactl-lab"
EXT_API = "katactl.io/shim-ext/v1"
DUMP_PATH = "/var/crash/kata"
MIB = 1 << 20
SUN_PATH_MAX = 107
#: where the lab's direct-assigned volumes are "mounted" on the node (one per sandbox)
LAB_VOLUMES = "/mnt/lab-volumes"
LAB_VOLUME_DEVICE = 1 << 30  # a 1 GiB block device with ext4 on it


def id_length(root: str) -> int:
    """Longest sandbox id whose sockets still fit in sun_path under root."""
    longest_tail = len("/run/vc/vm/") + len("/extra-monitor.sock")
    return max(0, min(64, SUN_PATH_MAX - len(os.path.abspath(root)) - longest_tail))


def sandbox_id(name: str, length: int) -> str:
    return hashlib.sha256(f"katactl-lab:{name}".encode()).hexdigest()[:length]


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def launched_identity(pid: int, timeout: float = 10.0) -> procfacts.ProcIdentity | None:
    """The identity (start time, argv) of a child this process just started, taken once it is
    past exec: None when the process is already gone.

    ``Popen`` returns when exec closes its CLOEXEC pipe (``begin_new_exec`` in the kernel's
    fs/exec.c), before ``create_elf_tables`` (fs/binfmt_elf.c) sets the new image's argv:
    read at once, the command line can still be empty, or (before exec) this process's own,
    the fork's. Recorded so, it never matches the running process and 'lab down' after a lost
    daemon would take its own QEMU for a stranger. Any other command line is the launched
    program's, whatever it shows: a wrapper script on PATH (``exec /usr/bin/qemu-system-x86_64
    "$@"``) shows its interpreter first, then the binary it execs (LabSandbox.settle_identity
    records that one). RuntimeError when the child does not get past exec within timeout."""
    me = procfacts.local_identity(os.getpid())
    pre_exec = me.cmdline if me is not None else ()
    deadline = time.monotonic() + timeout
    while True:
        now = procfacts.local_identity(pid)
        if now is None or (now.cmdline and now.cmdline != pre_exec):
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not get past exec within {timeout:g}s (it shows: "
                               f"{now.describe()[:200]})")
        time.sleep(0.002)


# -- one sandbox ----------------------------------------------------------------
def pod_of_spec(spec: dict) -> dict:
    """A lab sandbox's pod, {name, namespace, uid} as sandbox list reads it back from the CRI
    annotations lay_out writes (the uid: layout's stable one for the sandbox id)."""
    import uuid

    return {"name": spec.get("pod", spec["name"]), "namespace": spec.get("namespace", "lab"),
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, "pod/" + spec["id"]))}


class LabSandbox:
    def __init__(self, lab: "Lab", spec: dict):
        self.lab = lab
        self.spec = spec
        self.name = spec["name"]
        self.hv = spec.get("hypervisor", "qemu")
        self.memory = int(spec.get("memory_mib", 512)) * MIB
        self.id = spec["id"]
        self.status = "starting"
        self.error: str | None = None
        self.proc: subprocess.Popen | None = None
        self.qemu_identity: procfacts.ProcIdentity | None = None
        self.qmp: QMPClient | None = None
        self.api: ClhServer | FcServer | None = None
        self.shim: ShimServer | None = None
        self.target: int | None = None
        #: wall time the balloon last moved (BALLOON_CHANGE) or was asked to
        self.moved_at: float = 0.0
        self._last_actual: int | None = None
        self.panic: dict | None = None
        self.paths: L.SandboxPaths | None = None
        self.lock = threading.Lock()

    # layout + hypervisor
    def lay_out(self, pid: int, handler: L.KataDeployHandler) -> None:
        """The Go runtime's state for this sandbox, and the bundle files containerd and the
        shim write: ``shim-binary-path`` (the handler's runtime_path: containerd's
        ``runtime/v2/binary.go``) and ``shim.pid`` (the Go shim's ``StartShim`` in
        ``src/runtime/pkg/containerd-shim-v2/service.go``: ``WritePidFile("shim.pid", ...)``
        in its cwd, the bundle; the lab daemon plays every sandbox's shim)."""
        sp = self.spec
        pod = pod_of_spec(sp)
        kw = dict(hypervisor=self.hv, pid=pid, pod_name=pod["name"], pod_namespace=pod["namespace"],
                  pod_uid=pod["uid"], memory_mib=self.memory // MIB, vcpus=1,
                  reclaim_guest_freed_memory=sp.get("balloon", True),
                  extra_monitor_socket=self.hv == "qemu" and sp.get("extra_monitor", True),
                  guest_memory_dump_path=DUMP_PATH if self.hv == "qemu" else "",
                  created=time.time())
        if self.hv == "qemu" and self.lab.assets is not None:
            kw.update(kernel=self.lab.assets.kernel, initrd=self.lab.assets.initrd, image="",
                      hypervisor_path=self.lab.qemu)
        if self.hv == "fc":  # the Go runtime truncates the id to 32 chars for the jailer dir
            kw["api_socket"] = f"/run/vc/firecracker/{self.id[:32]}/root/run/firecracker.socket"
        # the lab's extra monitor speaks QMP: the kata-qemu handler's config.d says so
        # (extra_monitor_socket = "qmp", write_kata_config); persist.json never holds it
        self.paths = L.write_go_sandbox(self.lab.root, self.id, **kw)
        bundle = self.laid_out().bundle_node
        if bundle:
            L.write_shim_binary_path(self.lab.root, bundle, handler.runtime_path)
            L.write_shim_pid(self.lab.root, bundle, os.getpid())

    def laid_out(self) -> L.SandboxPaths:
        """The sandbox's paths (lay_out() has run: every later step needs them)."""
        if self.paths is None:
            raise RuntimeError(f"internal: sandbox {self.name} is not laid out yet")
        return self.paths

    def qemu_proc(self) -> subprocess.Popen:
        """The QEMU process (start_qemu() has run)."""
        if self.proc is None:
            raise RuntimeError(f"internal: QEMU of sandbox {self.name} is not started")
        return self.proc

    def monitor(self) -> QMPClient:
        """The QMP connection the shim holds (what _need_running() checked for)."""
        if self.qmp is None:
            raise ExtError(503, "MonitorUnavailable", "the shim holds no monitor connection")
        return self.qmp

    def api_server(self) -> ClhServer | FcServer:
        """The Cloud Hypervisor / Firecracker API server (start_api_server() has run)."""
        if self.api is None:
            raise ExtError(503, "HypervisorGone", "the VM is not running")
        return self.api

    def vm_dir(self) -> str:
        return self.lab.real(f"{L.GO_VM}/{self.id}")

    def start_qemu(self) -> None:
        from katactl.lab import vm

        d = self.vm_dir()
        os.makedirs(d, exist_ok=True)
        sp = self.spec
        if self.lab.assets is None:
            raise RuntimeError("internal: the lab's guest assets are not prepared")
        argv = vm.qemu_argv(self.lab.assets, d, name=self.id, memory_mib=self.memory // MIB,
                            balloon=sp.get("balloon", True), pvpanic=True,
                            extra_monitor=sp.get("extra_monitor", True),
                            debug_threads=sp.get("debug_threads", False), qemu=self.lab.qemu)
        if not sp.get("guest", True):
            argv.append("-S")  # no guest: prelaunch, QMP still answers
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(d, "qemu.log"), "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        # who this QEMU is (start time + argv), so 'lab down' never signals a reused pid
        self.qemu_identity = launched_identity(self.proc.pid)

    def settle_identity(self) -> None:
        """Record the QEMU's identity again once its monitor answers: a wrapper script (or
        its interpreter) seen at launch has exec'd the QEMU binary by then, and 'lab down'
        compares the command line the process shows now."""
        if self.proc is None or self.qemu_identity is None:
            return
        now = procfacts.local_identity(self.proc.pid)
        if now is not None and abs(now.create_time - self.qemu_identity.create_time) <= procfacts.CREATE_TIME_SLACK:
            self.qemu_identity = now

    def connect_qmp(self, timeout: float = 30) -> None:
        from katactl.backends.local import LocalTransport
        from katactl.backends.qmp import QMPClient

        sock = os.path.join(self.vm_dir(), "qmp.sock")
        proc = self.qemu_proc()
        deadline = time.monotonic() + timeout
        while True:
            self.lab.check_stop()
            if proc.poll() is not None:
                raise RuntimeError(f"qemu exited with {proc.returncode}: {self._qemu_log()}")
            if os.path.exists(sock):
                try:
                    if not self.spec.get("hold_qmp", True):
                        self.settle_identity()
                        return
                    qmp = QMPClient.connect(LocalTransport(), sock, timeout=10, greeting_timeout=2)
                    break
                except Exception:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("qmp.sock never answered")
            time.sleep(0.05)
        self.qmp = qmp
        self.settle_identity()
        qmp.on_event = self._on_event
        qmp.start_reader()
        if self.spec.get("balloon", True):
            try:
                qmp.execute("qom-set", {"path": "/machine/peripheral/balloon0",
                                             "property": "guest-stats-polling-interval", "value": 1})
                # the balloon's size at boot: the first move, by any monitor's client, is then
                # one (observe_actual takes a first sighting for none)
                self.observe_actual(int(qmp.execute("query-balloon")["actual"]))
            except Exception:
                pass

    def _qemu_log(self) -> str:
        try:
            with open(os.path.join(self.vm_dir(), "qemu.log"), errors="replace") as f:
                return f.read()[-500:].strip()
        except OSError:
            return ""

    def wait_guest(self, timeout: float = 90) -> None:
        from katactl.lab import vm

        if not self.spec.get("guest", True) or self.hv != "qemu":
            return
        deadline = time.monotonic() + timeout
        proc = self.qemu_proc()
        while not vm.console_ready(self.vm_dir()):
            self.lab.check_stop()
            if proc.poll() is not None:
                raise RuntimeError(f"qemu exited with {proc.returncode}: {self._qemu_log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest did not boot within {timeout:g}s (see {self.vm_dir()}/console.log)")
            time.sleep(0.1)

    def start_api_server(self) -> None:
        from katactl.lab.clh_server import ClhServer
        from katactl.lab.fc_server import FcServer

        sock = self.laid_out().api_socket
        if sock is None:
            raise RuntimeError(f"internal: sandbox {self.name} ({self.hv}) has no API socket")
        os.makedirs(os.path.dirname(sock), exist_ok=True)
        bal = self.spec.get("balloon", True)
        if self.hv == "clh":
            self.api = ClhServer(sock, self.memory, balloon=bal)
        else:
            self.api = FcServer(sock, self.memory, balloon=bal, vm_id=self.id[:32])

    def volume_path(self) -> str:
        """The direct-assigned volume the lab gives this sandbox (``shim volume`` tries it)."""
        return f"{LAB_VOLUMES}/{self.name}"

    def volume_device(self) -> str:
        """Its block device (mountInfo.json's ``device``): what the shim is asked about."""
        return f"/dev/mapper/lab-{self.name}"

    def start_shim(self) -> None:
        L.write_direct_volume(self.lab.root, self.volume_path(), sandbox_id=self.id, device=self.volume_device())
        self.shim = make_shim(self)

    def _on_event(self, ev: dict) -> None:
        name = ev.get("event")
        if name == "BALLOON_CHANGE":
            self.observe_actual((ev.get("data") or {}).get("actual"))
        elif name == "GUEST_PANICKED":
            self.status = "panicked"
            threading.Thread(target=self._panic_dump, args=(ev,), daemon=True).start()
        elif name == "SHUTDOWN":
            self.status = "shutdown"

    def _panic_dump(self, ev: dict) -> None:
        from katactl.lab import panic

        paths = self.laid_out()
        with open(paths.state_file) as f:
            hc = json.load(f)["Config"]["HypervisorConfig"]
        ctx = panic.PanicContext(root=self.lab.root, sandbox_id=self.id, qmp=self.qmp,
                                 dump_path_node=DUMP_PATH, state_dir_node=paths.state_dir_node,
                                 hypervisor_config=hc, qemu_path=self.lab.qemu or "", memory_bytes=self.memory,
                                 paging=False, event=ev)
        try:
            self.panic = {"status": "dumping", "event": ev}
            res = panic.run(ctx)
            self.panic = {"status": "done" if not res.get("error") else "refused", **res}
        except Exception as e:  # noqa: BLE001 - reported in lab status
            self.panic = {"status": "failed", "error": str(e)}
        self.lab.write_state()

    # -- balloon, in katactl's language (guest-visible bytes) -------------------
    def _need_running(self):
        if self.hv == "qemu":
            if self.proc is None or self.proc.poll() is not None:
                raise ExtError(503, "HypervisorGone", "the VM is not running")
            if self.qmp is None or self.qmp.closed:
                raise ExtError(503, "MonitorUnavailable", "the shim holds no monitor connection")

    def balloon_get(self, with_guest: bool = True, fresh_wait: float = 1.5) -> dict:
        from katactl.backends.qmp import QMPError

        self._need_running()
        if not self.spec.get("balloon", True):
            raise ExtError(409, "NoBalloon", "the VM has no balloon device "
                           "(Kata: reclaim_guest_freed_memory = false)")
        guest = None
        if self.hv == "qemu":
            try:
                actual = int(self.monitor().execute("query-balloon")["actual"])
                self.observe_actual(actual)
                mem = self.monitor().execute("query-memory-size-summary")
                memory = int(mem.get("base-memory", 0)) + int(mem.get("plugged-memory", 0))
            except QMPError as e:
                raise ExtError(409, e.error_class, e.desc) from None
            guest = self._qemu_guest_stats(fresh_wait) if with_guest else None
        else:
            g = self.api_server().guest
            memory = g.memory
            actual = memory - g.balloon_actual()
            st = g.guest_stats()
            guest = {"totalBytes": st["total"], "freeBytes": st["free"], "availableBytes": st["available"]}
        target = self.target if self.target is not None else memory
        if self.hv != "qemu":
            target = self.api_server().guest.memory - self.api_server().guest.balloon_target()
            if self.hv == "fc" and self.target is not None and _fc_amount(memory, self.target) * MIB == memory - target:
                # docs/shim-extension.md: the last target requested (un-rounded), while
                # Firecracker still has what it asked for (not moved by another client since)
                target = self.target
        return {"hypervisor": self.hv, "memoryBytes": memory, "targetBytes": target,
                "actualBytes": actual, "guest": guest}

    def observe_actual(self, actual) -> None:
        """Remember when the balloon's actual size last changed (events arrive rate-limited,
        up to a second late: a late event repeating a value already seen is no move)."""
        if actual is not None and actual != self._last_actual:
            if self._last_actual is not None:  # the first sighting is no move
                self.moved_at = time.time()
            self._last_actual = actual

    def _qemu_guest_stats(self, fresh_wait: float = 0.0) -> dict | None:
        """The balloon driver's statistics, fresher than the last balloon move.

        QEMU keeps the last sample (``last-update``, whole seconds); a sample taken
        before the balloon moved would count the balloon's pages wrongly: then the
        answer is None and a fresh sample is requested for the next call."""
        qmp = self.qmp
        if qmp is None:
            return None

        def read():
            try:
                return qmp.execute("qom-get", {"path": "/machine/peripheral/balloon0",
                                                    "property": "guest-stats"})
            except Exception:
                return None

        r = read()
        if r and self.moved_at and r.get("last-update", 0) <= self.moved_at:
            # stale: ask for a fresh sample now (polling off and on requests one at once),
            # answer "unknown" rather than wrong; a later call gets the fresh one
            try:
                for v in (0, 1):
                    qmp.execute("qom-set", {"path": "/machine/peripheral/balloon0",
                                                 "property": "guest-stats-polling-interval", "value": v})
            except Exception:
                pass
            deadline = time.monotonic() + fresh_wait
            while time.monotonic() < deadline:
                time.sleep(0.1)
                r = read()
                if not r or r.get("last-update", 0) > self.moved_at:
                    break
            if not r or r.get("last-update", 0) <= self.moved_at:
                return None
        if not r:
            return None
        from katactl.balloon import qemu_guest_stats

        try:  # a statistic the guest did not send is QEMU's uint64 -1: None here, as katactl reads it
            g = qemu_guest_stats(r, "QMP qom-get guest-stats")
        except Exception:
            return None
        if g is None:
            return None
        return {"totalBytes": g["total"], "freeBytes": g["free"], "availableBytes": g["available"],
                "lastUpdate": g["lastUpdate"]}

    def balloon_set(self, target: int) -> dict:
        from katactl.backends.qmp import QMPError

        self._need_running()
        if not self.spec.get("balloon", True):
            raise ExtError(409, "NoBalloon", "the VM has no balloon device "
                           "(Kata: reclaim_guest_freed_memory = false)")
        if target <= 0 or target > self.memory:
            raise ExtError(400, "BadTarget", f"targetBytes must be in 1..{self.memory}")
        if self.hv == "qemu":
            try:
                self.monitor().execute("balloon", {"value": int(target)})
            except QMPError as e:
                raise ExtError(409, e.error_class, e.desc) from None
            self.target = int(target)
        elif self.hv == "fc":
            # as the spec's shim does: PATCH /balloon {"amount_mib": ceil((memory - target) / MiB)}
            # (Firecracker takes whole MiB of balloon) and remember the request
            self.api_server().guest.set_balloon(_fc_amount(self.memory, int(target)) * MIB)
            self.target = int(target)
        else:
            guest = self.api_server().guest
            guest.set_balloon(guest.memory - int(target))
        return self.balloon_get(fresh_wait=0.0)  # the answer must not wait for statistics

    def vmcore(self, fmt: str = "elf", paging: bool = False) -> dict:
        from katactl.backends.qmp import QMPError
        from katactl.lab import panic

        self._need_running()
        if self.hv != "qemu":
            raise ExtError(501, "NotSupported", f"vmcore dumps are not implemented for {self.hv} in the lab")
        d_node = f"{DUMP_PATH}/{self.id}"
        d = self.lab.real(d_node)
        os.makedirs(d, exist_ok=True)
        name = panic.vmcore_name(fmt=fmt)
        try:
            self.monitor().execute("dump-guest-memory", {"paging": bool(paging), "format": fmt,
                                                   "protocol": f"file:{os.path.join(d, name)}"}, timeout=600)
        except QMPError as e:
            raise ExtError(409, e.error_class, e.desc) from None
        return {"path": f"{d_node}/{name}", "format": fmt, "bytes": os.path.getsize(os.path.join(d, name))}

    def stop(self) -> None:
        if self.shim is not None:
            try:
                self.shim.stop()
            except Exception:
                pass
        if self.api is not None:
            try:
                self.api.close()
            except Exception:
                pass
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def to_dict(self) -> dict:
        d = {"name": self.name, "id": self.id, "hypervisor": self.hv, "status": self.status,
             "memoryBytes": self.memory, "pod": pod_of_spec(self.spec), "error": self.error}
        d["podRef"] = pod_ref(d["pod"])
        if self.proc is not None:
            d["qemuPid"] = self.proc.pid
            if self.qemu_identity is not None:
                d["qemu"] = self.qemu_identity.to_dict()
        if self.paths is not None:
            d["shimSocket"] = self.paths.shim_socket_node
            d["apiSocket"] = self.paths.api_socket_node
            d["volumes"] = [self.volume_path()]
        if self.panic is not None:
            d["panic"] = self.panic
        d["features"] = {k: self.spec.get(k, True) for k in
                         ("guest", "balloon", "extra_monitor", "hold_qmp", "extension")}
        d["features"]["debug_threads"] = bool(self.spec.get("debug_threads", False))
        return d


class ExtError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- the lab shim (Go flavour, katactl.lab.shimserver + the /ext/v1 extension) ---
def _fc_amount(memory: int, target: int) -> int:
    """docs/shim-extension.md: Firecracker's ``amount_mib`` for a guest-visible target,
    ⌈(memory − target) / MiB⌉ (whole MiB of balloon: the guest keeps at most ``target``)."""
    return -(-(memory - target) // MIB)


def _json_response(status: int, obj) -> "object":
    from katactl.lab.shimserver import Response

    return Response(status, json.dumps(obj), "application/json")


def make_shim(sb: "LabSandbox"):
    from katactl.lab.shimserver import ShimServer, ShimState, ext4_statfs_total

    class LabShim(ShimServer):
        def metrics_text(self) -> str:
            refresh_shim_state(sb, self.state)
            return super().metrics_text()

        def handle_ext(self, req):
            if not sb.spec.get("extension", True):
                return None
            try:
                return ext_route(sb, req.method, req.path[len("/ext/v1/"):] if req.path.startswith("/ext/v1/")
                                 else None, req.body, req.query)
            except ExtError as e:
                return _json_response(e.status, {"error": {"code": e.code, "message": e.message}})
            except Exception as e:  # noqa: BLE001
                return _json_response(500, {"error": {"code": "Internal", "message": f"{type(e).__name__}: {e}"}})

    paths = sb.laid_out()
    with open(paths.state_file) as f:
        url = json.load(f).get("AgentState", {}).get("URL", "")
    st = ShimState(sandbox_id=sb.id, hypervisor=sb.hv, shim_pid=os.getpid(),
                   hypervisor_pid=sb.proc.pid if sb.proc else os.getpid(), agent_url=url,
                   guest_mem_total=sb.memory, guest_mem_free=sb.memory, guest_mem_available=sb.memory)
    # one direct-assigned volume (the guest's statfs of an ext4 on a 1 GiB device)
    total, used, inodes = ext4_statfs_total(LAB_VOLUME_DEVICE), 48 << 20, LAB_VOLUME_DEVICE // 16384
    st.volumes[sb.volume_device()] = {"total": total, "used": used, "available": total - used,
                                    "inodes": inodes, "inodes_used": 11, "inodes_free": inodes - 11}
    return LabShim(paths.shim_socket, flavour="go", state=st).start()


def ext_route(sb: "LabSandbox", method: str, ep: str | None, raw: bytes, query: dict | None = None):
    if ep == "capabilities":
        if method != "GET":
            raise ExtError(405, "MethodNotAllowed", "use GET")
        feats = {"balloon": {"set": True, "guestStats": True} if sb.spec.get("balloon", True) else None,
                 "vmcore": {"formats": ["elf", "kdump-zlib"]} if sb.hv == "qemu" else None}
        return _json_response(200, {"apiVersion": EXT_API, "kind": "ShimCapabilities",
                                    "hypervisor": sb.hv, "features": [k for k, v in feats.items() if v],
                                    "details": {k: v for k, v in feats.items() if v}})
    if ep == "balloon":
        if method == "GET":
            q = (query or {}).get("guest")
            q = q[0] if isinstance(q, list) and q else q
            return _json_response(200, {"apiVersion": EXT_API, "kind": "Balloon",
                                        **sb.balloon_get(with_guest=q not in ("0", "false"))})
        if method == "PUT":
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise ExtError(400, "BadRequest", "body is not JSON") from None
            t = body.get("targetBytes") if isinstance(body, dict) else None
            if not isinstance(body, dict) or set(body) - {"targetBytes"} or not isinstance(t, int) \
                    or isinstance(t, bool):
                raise ExtError(400, "BadRequest", 'expected {"targetBytes": <integer>}')
            with sb.lock:
                return _json_response(200, {"apiVersion": EXT_API, "kind": "Balloon", **sb.balloon_set(t)})
        raise ExtError(405, "MethodNotAllowed", "use GET or PUT")
    if ep == "vmcore":
        if method != "POST":
            raise ExtError(405, "MethodNotAllowed", "use POST")
        try:
            body = (json.loads(raw) if raw else {}) or {}
        except ValueError:
            raise ExtError(400, "BadRequest", "body is not JSON") from None
        if not isinstance(body, dict):
            raise ExtError(400, "BadRequest", "body must be a JSON object")
        fmt = body.get("format", "elf")
        if fmt not in ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy"):
            raise ExtError(400, "BadRequest", f"unknown format {fmt!r}")
        with sb.lock:
            return _json_response(200, {"apiVersion": EXT_API, "kind": "Vmcore",
                                        **sb.vmcore(fmt, bool(body.get("paging", False)))})
    raise ExtError(404, "NotFound", f"no extension endpoint {ep!r}")


def refresh_shim_state(sb: "LabSandbox", st) -> None:
    """Put the real numbers the lab has into the shim's metrics state (the shim's and
    its hypervisor's process figures from this host's processes, via psutil)."""
    facts = procfacts.LocalProcessFacts()
    me = facts.stats([os.getpid()])[os.getpid()]
    if me is not None:
        st.shim_rss, st.shim_threads = me.rss, me.threads
    if sb.proc is not None and sb.proc.poll() is None:
        hs = facts.stats([sb.proc.pid])[sb.proc.pid]
        if hs is not None:
            st.hypervisor_rss, st.hypervisor_threads = hs.rss, hs.threads
        try:
            st.hypervisor_fds = len(os.listdir(f"/proc/{sb.proc.pid}/fd"))
        except OSError:
            pass
    try:
        if sb.spec.get("balloon", True):
            # the real agent reads /proc/meminfo at each scrape; the lab has QEMU's last balloon
            # statistics: after a move (whoever made it: moved_at follows query-balloon's actual
            # and BALLOON_CHANGE) a fresh sample is asked for and awaited, as the extension's GET
            b = sb.balloon_get(fresh_wait=1.5)
            g = b.get("guest") or {}
            if g.get("totalBytes"):
                st.guest_mem_total = g["totalBytes"]
                st.guest_mem_free = g.get("freeBytes") or 0
                st.guest_mem_available = g.get("availableBytes") or 0
            # none came: the figures held predate the move and, beside the new balloon_inflate,
            # would give a wrong guest usage: kata_guest_meminfo is left out until a fresh one
            st.guest_meminfo = bool(g.get("totalBytes")) or not sb.moved_at
            st.balloon_inflate = max(0, (b["memoryBytes"] - b["actualBytes"]) // 4096)
    except Exception:
        pass


# -- the lab ---------------------------------------------------------------------
class StopRequested(Exception):
    """SIGTERM/SIGINT while the lab was starting ('lab up' interrupted, or 'lab down')."""


class Lab:
    def __init__(self, root: str, cfg: dict, stop: threading.Event | None = None):
        self.root = os.path.abspath(root)
        #: set by SIGTERM/SIGINT: the start gives up at its next step (check_stop)
        self.stop_requested = stop or threading.Event()
        self.cfg = cfg
        self.assets: GuestAssets | None = None
        self.qemu: str | None = cfg.get("qemu")
        self.sandboxes = [LabSandbox(self, s) for s in cfg["sandboxes"]]
        self.status = "starting"
        self.error: str | None = None
        self.host_views: list[str] = []
        self._state_lock = threading.Lock()
        #: this daemon's start time and argv: 'lab down' checks them before it signals the pid
        self.identity = procfacts.local_identity(os.getpid())

    def real(self, node_path: str) -> str:
        return os.path.join(self.root, node_path.lstrip("/"))

    def check_stop(self) -> None:
        """Raise StopRequested when asked to stop: a boot takes seconds (TCG), and an
        interrupted 'lab up' waits for this daemon to end before it removes the lab."""
        if self.stop_requested.is_set():
            raise StopRequested("asked to stop while starting")

    def write_state(self) -> None:
        with self._state_lock:
            _write_json(os.path.join(self.root, LAB_DIR, "state.json"), {
                "apiVersion": "katactl/v1", "kind": "Lab", "root": self.root, "pid": os.getpid(),
                "daemon": self.identity.to_dict() if self.identity else None,
                "status": self.status, "error": self.error,
                "kernel": self.assets.kernel if self.assets else None,
                "kernelVersion": self.assets.kernel_version if self.assets else None,
                "startedAt": self.cfg.get("startedAt"), "bootSeconds": self.cfg.get("bootSeconds"),
                "hostViews": self.host_views,
                "sandboxes": [s.to_dict() for s in self.sandboxes]})

    def write_kata_config(self) -> dict[str, L.KataDeployHandler]:
        """The node's Kata configuration as kata-deploy leaves it (layout.write_kata_deploy):
        one runtime handler per hypervisor (kata-qemu, kata-clh, kata-fc, all the Go shim)
        with its own ``runtimes/<shim>/configuration-<shim>.toml``, containerd's config
        importing ``kata-deploy.toml``, and kata-static's ``configuration.toml`` link to the
        QEMU file. Each handler's dump path (and QEMU's extra monitor) is set in its own
        ``config.d`` (kata-deploy copies each shim's file so that its config.d applies):
        vmcore and sandbox inspect read them there, as on a real node. Returns the handlers."""
        kernel = self.assets.kernel if self.assets else L.DEFAULT_KERNEL
        initrd = self.assets.initrd if self.assets else ""
        mem_mib = max((s.memory // MIB for s in self.sandboxes), default=512)

        def base(hv: str, path: str, kernel_: str, initrd_: str) -> str:
            return (f"# Written by katactl lab: kata-deploy's configuration for the {hv} shim.\n"
                    f"[hypervisor.{hv}]\n"
                    f"path = {json.dumps(path)}\n"
                    f"kernel = {json.dumps(kernel_)}\n"
                    + (f"initrd = {json.dumps(initrd_)}\n" if initrd_ else
                       f"image = {json.dumps(L.DEFAULT_IMAGE)}\n")
                    + f"default_memory = {mem_mib}\n"
                    "default_vcpus = 1\n"
                    "reclaim_guest_freed_memory = true\n\n"
                    "[runtime]\n"
                    "sandbox_cgroup_only = false\n")

        shims = {"qemu": base("qemu", self.qemu or L.DEFAULT_HYPERVISOR_PATHS["qemu"], kernel, initrd),
                 "clh": base("clh", L.DEFAULT_HYPERVISOR_PATHS["clh"], L.DEFAULT_KERNEL, ""),
                 "fc": base("fc", L.DEFAULT_HYPERVISOR_PATHS["fc"], L.DEFAULT_KERNEL, "")}
        # per handler: its dump directory (the Go runtime dumps QEMU guests on panic; for
        # Cloud Hypervisor and Firecracker only katactl's trigger uses it), and for QEMU the
        # extra monitor the lab's tests use
        dropins = {hv: {"50-lab.toml": (
            "# katactl lab: this handler's own settings (kata-deploy applies this config.d)\n"
            f"[hypervisor.{hv}]\n"
            + ('extra_monitor_socket = "qmp"\n' if hv == "qemu" else "")
            + f"guest_memory_dump_path = {json.dumps(DUMP_PATH)}\n"
            "guest_memory_dump_paging = false\n")} for hv in shims}
        handlers = L.write_kata_deploy(self.root, shims, dropins=dropins)
        # kata-static ships share/defaults/kata-containers/configuration.toml -> configuration-qemu.toml
        pristine = handlers["kata-qemu"].pristine
        link = self.real(os.path.join(os.path.dirname(pristine), "configuration.toml"))
        if not os.path.lexists(link):
            os.symlink(os.path.basename(pristine), link)
        return handlers

    def start(self) -> None:
        from katactl.lab import vm

        t0 = time.monotonic()
        # the host's /proc, /sys/fs/cgroup (and resctrl) under the root, so that inspect,
        # audit, sandbox list (pid liveness) and upgrade see this machine's processes
        self.host_views = L.link_host_views(self.root)
        qemus = [s for s in self.sandboxes if s.hv == "qemu"]
        if qemus:
            self.qemu = self.qemu or vm.qemu_binary()
            if not self.qemu:
                raise RuntimeError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
            self.assets = vm.prepare_assets(os.path.join(self.root, LAB_DIR, "assets"),
                                            kernel=self.cfg.get("kernel"))
        for s in qemus:
            self.check_stop()
            s.start_qemu()
            self.write_state()  # its pid and identity on record before anything can go wrong
        handlers = self.write_kata_config()
        for s in self.sandboxes:
            s.lay_out(s.proc.pid if s.proc else os.getpid(), handlers[f"kata-{s.hv}"])
        for s in self.sandboxes:
            self.check_stop()
            if s.hv == "qemu":
                s.connect_qmp()
            else:
                s.start_api_server()
            s.start_shim()
        self.write_state()
        for s in qemus:
            s.wait_guest()
            s.status = "running"
        for s in self.sandboxes:
            s.status = "running"
        self.status = "ready"
        self.boot_seconds = time.monotonic() - t0
        self.cfg["bootSeconds"] = round(self.boot_seconds, 2)
        self.write_state()

    def watch(self, stop: threading.Event) -> None:
        """Notice VMs that exit (as the runtime would) until asked to stop."""
        parent = self.cfg.get("parentPid")
        while not stop.wait(0.2):
            if parent and not _pid_alive(parent):
                return  # the test session that owns us is gone: clean up
            changed = False
            for s in self.sandboxes:
                if s.proc is not None and s.proc.poll() is not None and s.status not in ("exited",):
                    s.status, s.error = "exited", f"qemu exited with status {s.proc.returncode}"
                    if s.qmp is not None:
                        s.qmp.close()
                    changed = True
            if changed:
                self.write_state()

    def stop(self) -> None:
        for s in self.sandboxes:
            s.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def remove_tree(root: str) -> None:
    """Remove the lab root (only a tree that carries the lab marker).

    Never follows a symlink: the links to the host's /proc and /sys/fs/cgroup are
    unlinked first, and shutil.rmtree (fd-based here: ``avoids_symlink_attacks``)
    unlinks any other link instead of descending into it."""
    import shutil

    if os.path.isdir(os.path.join(root, LAB_DIR)) and not os.path.islink(root):
        L.unlink_host_views(root)
        if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - not on Linux
            raise RuntimeError("this platform's shutil.rmtree may follow symlinks; remove "
                               f"{root} by hand (mind {', '.join(L.HOST_VIEWS)} under it)")
        # QEMU's dump files are 0400: rmtree copes (it unlinks, no write needed)
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="katactl-lab-daemon")
    ap.add_argument("--root", required=True)
    a = ap.parse_args(argv)
    root = os.path.abspath(a.root)
    with open(os.path.join(root, LAB_DIR, "config.json")) as f:
        cfg = json.load(f)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # 'lab up' forks us with these held (control._interrupts_held): ours are installed now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    lab = Lab(root, cfg, stop)
    # "starting" on record from the first moment: a second 'lab up' waits for this one
    # instead of taking the directory for a dead lab's leftovers
    lab.write_state()
    try:
        lab.start()
    except Exception as e:  # noqa: BLE001 - reported through state.json
        if stop.is_set():  # stopped while starting: nothing failed, leave nothing behind
            lab.status = "stopping"
            lab.write_state()
            lab.stop()
            remove_tree(root)
            return 0
        lab.status, lab.error = "failed", str(e)
        traceback.print_exc()
        try:
            lab.write_state()
        except OSError:
            pass
        lab.stop()
        # leave the state for `lab up` to read the error; it removes the tree
        stop.wait(30)
        return 1
    lab.watch(stop)
    lab.status = "stopping"
    lab.write_state()
    lab.stop()
    remove_tree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
