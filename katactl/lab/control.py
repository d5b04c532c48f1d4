"""``katactl lab up | status | down``: the library side (no printing).

``up`` writes ``ROOT/.katactl-lab/config.json``, starts the lab daemon
detached (own session, stdio to ``ROOT/.katactl-lab/daemon.log``) and waits
until it reports ``ready`` (or failed: then it cleans up and raises with the
daemon's error). Interrupted (Ctrl-C, SIGTERM, SIGHUP) while it waits, it stops
the daemon it started and removes the lab: nothing keeps booting unseen. ``up``
and ``down`` on one root run one at a time (a flock on the root directory:
:func:`root_lock`), so a second ``up`` waits for the first and then finds its
lab ready (``changed: false``); one that finds a lab still ``starting`` without
its ``up`` (killed) waits for it the same way.
``down`` sends SIGTERM, waits for the daemon to exit (it kills
its VMs and removes the tree), then removes whatever is left: no process and
no file stays behind. Only processes the lab started are ever signalled: the
daemon and each QEMU record their start time and argv (katactl.procfacts), and
a pid that no longer matches them is never signalled.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

from typing import TYPE_CHECKING, Callable

from katactl.errors import NotFound, OperationFailed, Refused, TimeoutExpired, UsageError

if TYPE_CHECKING:
    from katactl.procfacts import ProcIdentity

LAB_DIR = ".katactl-lab"
HYPERVISORS = ("qemu", "clh", "fc", "mixed")
MAX_SANDBOXES = 16


def default_root() -> str:
    env = os.environ.get("KATACTL_LAB_ROOT")
    if env:
        return env
    return "/tmp/katactl-lab" if os.getuid() == 0 else f"/tmp/katactl-lab-{os.getuid()}"


def lab_root(root: str | None = None) -> str:
    """The lab's root directory, absolute; a usage error (never a silent fallback to the
    default) for an empty value, a NUL, or a path that is (or lies under) a non-directory."""
    from katactl.values import local_dir

    return local_dir(default_root() if root is None else root, what="--root",
                     empty_hint="give a directory (or omit --root for the default lab)")


def check_kernel(kernel: str | None) -> str | None:
    """--kernel as an absolute path to a regular file (None: the default kernel)."""
    if kernel is None:
        return None
    if not kernel.strip() or "\0" in kernel:
        raise UsageError(f"invalid --kernel {kernel!r}: give a kernel image file")
    kernel = os.path.abspath(kernel)
    if os.path.isdir(kernel):
        raise UsageError(f"--kernel {kernel}: not a file (a directory)")
    if not os.path.exists(kernel):
        raise UsageError(f"--kernel {kernel}: no such file")
    if not os.path.isfile(kernel):
        raise UsageError(f"--kernel {kernel}: not a regular file")
    return kernel


def specs_for(count: int, hypervisor: str, memory_mib: int = 512) -> list[dict]:
    if hypervisor not in HYPERVISORS:
        raise UsageError(f"invalid hypervisor {hypervisor!r} (choose from {', '.join(HYPERVISORS)})")
    if not 1 <= count <= MAX_SANDBOXES:
        raise UsageError(f"invalid --sandboxes {count}: choose 1..{MAX_SANDBOXES}")
    if not 64 <= memory_mib <= 16384:
        raise UsageError(f"invalid --memory {memory_mib}MiB: choose 64Mi..16Gi")
    cycle = ("qemu", "clh", "fc") if hypervisor == "mixed" else (hypervisor,)
    out = []
    for i in range(count):
        hv = cycle[i % len(cycle)]
        out.append({"name": f"{hv}-{i}", "hypervisor": hv, "memory_mib": memory_mib,
                    "pod": f"batch-{hv}-{i}", "namespace": "lab"})
    return out


def _paths(root: str) -> dict:
    d = os.path.join(root, LAB_DIR)
    return {"dir": d, "config": os.path.join(d, "config.json"), "state": os.path.join(d, "state.json"),
            "log": os.path.join(d, "daemon.log")}


def read_state(root: str) -> dict | None:
    try:
        with open(_paths(root)["state"]) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _daemon(root: str, st: dict | None) -> tuple[str, "ProcIdentity | None"]:
    """Whether the pid in the lab's state is its daemon: ("running", identity), ("gone", None)
    (no such process any more) or ("foreign", what runs there now: a reused or edited pid).

    The daemon records its start time and argv in state.json; the process now at that
    pid must have both. A state file without them (an older katactl) is checked by the
    argv alone, which must be the lab daemon's for this root."""
    from katactl.procfacts import ProcIdentity, local_identity

    pid = (st or {}).get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not _alive(pid):
        return "gone", None
    now = local_identity(pid)
    if now is None:
        return "gone", None
    recorded = ProcIdentity.from_dict((st or {}).get("daemon"))
    if recorded is not None:
        return ("running" if recorded.same_process(now) else "foreign"), now
    argv = list(now.cmdline)
    ours = "katactl.lab.daemon" in argv and any(a == "--root" and argv[i + 1:i + 2] == [root]
                                                 for i, a in enumerate(argv))
    return ("running" if ours else "foreign"), now


def _foreign_message(root: str, pid: object, now: "ProcIdentity | None") -> str:
    return (f"pid {pid} in {os.path.join(root, LAB_DIR, 'state.json')} is not the lab daemon katactl "
            f"started (it is now: {now.describe() if now else '?'}): the daemon is gone and its pid reused, "
            "or the state file was edited")


def is_running(root: str | None = None) -> bool:
    """Whether a lab daemon runs at root (its recorded pid, still the same process)."""
    root = lab_root(root)
    return _daemon(root, read_state(root))[0] == "running"


def _comparable(specs: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "id"} for s in specs]


def _read_config(root: str) -> dict:
    try:
        with open(_paths(root)["config"]) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def _describe(specs: list[dict]) -> str:
    from collections import Counter

    hvs = Counter(s.get("hypervisor", "qemu") for s in specs)
    mems = sorted({int(s.get("memory_mib", 512)) for s in specs})
    return (f"{len(specs)} sandbox(es): " + ", ".join(f"{n} {hv}" for hv, n in sorted(hvs.items()))
            + ", memory " + "/".join(f"{m}Mi" for m in mems))


def plan(root: str | None = None, *, sandboxes: int = 2, hypervisor: str = "qemu", kernel: str | None = None,
         memory_mib: int = 512, specs: list[dict] | None = None) -> tuple[str, list[dict], str | None]:
    """Validate every input of :func:`up` (no file, no process touched): (root, specs with
    their ids, kernel), or a UsageError."""
    from katactl.lab.daemon import id_length, sandbox_id

    root = lab_root(root)
    specs = [dict(s) for s in specs] if specs is not None else specs_for(sandboxes, hypervisor, memory_mib)
    kernel = check_kernel(kernel)
    n = id_length(root)
    if n < 16:
        raise UsageError(f"--root {root} is too long for unix socket paths (sun_path is 108 bytes): "
                         "use a shorter directory")
    for s in specs:
        s.setdefault("id", sandbox_id(s["name"] + ":" + root, n))
        if s.get("hypervisor") == "fc":
            sock = f"{root}/run/vc/firecracker/{s['id'][:32]}/root/run/firecracker.socket"
            if len(sock) > 107:
                raise UsageError(f"--root {root} is too long for Firecracker's socket path "
                                 f"({len(sock)} bytes; sun_path holds 107): use a shorter directory")
    return root, specs, kernel


def up(root: str | None = None, *, sandboxes: int = 2, hypervisor: str = "qemu", kernel: str | None = None,
       memory_mib: int = 512, specs: list[dict] | None = None, timeout: float = 180,
       die_with_parent: bool = False, dry_run: bool = False, on_wait: Callable[[], None] | None = None) -> dict:
    """Start a lab; return its state.

    A lab already running there with the same spec (sandboxes, hypervisors, memory,
    kernel) is left alone: ``changed: false``. One with another spec is refused: a
    lab is not reshaped in place (``lab down`` first). ``dry_run`` validates
    everything and returns the plan (``status: planned``, the sandboxes it would
    start) without creating a file or a process.

    ``die_with_parent`` (tests): the lab stops and cleans up when this process dies,
    even by SIGKILL.

    A lab there still ``starting`` (another ``up`` is booting it) is waited for as a
    first start is: ``changed: false`` once ready, its error if it fails; it is left
    alone if it is not ready within timeout, and on an interrupt (it is not ours).

    Interrupted (KeyboardInterrupt: Ctrl-C, and SIGTERM/SIGHUP in the CLI) after it
    touched anything, it stops the daemon it started and removes the lab, audits
    ``result: interrupted`` and re-raises.

    ``up`` and ``down`` on one root run one at a time (:func:`root_lock`): an ``up`` that
    finds another ``up`` or ``down`` at work there waits for it (up to timeout) and then
    decides, so two starts together end with one daemon (the other: ``changed: false``);
    on_wait is called when it starts waiting so.

    A start (or a failed or interrupted attempt to start) goes to the audit log; a dry
    run, a no-op, and an input refused before anything was touched do not."""
    params = ({"sandboxes": sandboxes, "hypervisor": hypervisor, "kernel": kernel, "memoryMiB": memory_mib}
              if specs is None else {"specs": [s.get("name") for s in specs], "kernel": kernel})
    root, specs, kernel = plan(root, sandboxes=sandboxes, hypervisor=hypervisor, kernel=kernel,
                               memory_mib=memory_mib, specs=specs)
    try:
        if dry_run:  # reads only: no lock (it would create the root)
            st = _up(root, specs, kernel, timeout=timeout, die_with_parent=die_with_parent, dry_run=True)
        else:
            with root_lock(root, timeout, create=True, on_wait=on_wait), _intent("lab.up", root, params):
                st = _up(root, specs, kernel, timeout=timeout, die_with_parent=die_with_parent, dry_run=False)
    except (UsageError, Refused):
        raise  # nothing was started or changed
    except _StartInterrupted as e:
        _audit("lab.up", root, params, result="interrupted", changed=e.removed_dead_lab, daemonPid=e.daemon_pid,
               undone=e.undone)
        raise
    except Exception as e:
        if not dry_run:
            _audit("lab.up", root, params, result=f"error: {e}")
        raise
    if st["changed"] and not st["dryRun"]:
        _audit("lab.up", st.get("root", root), params, changed=True, daemonPid=st.get("pid"),
               qemuPids=[s["qemuPid"] for s in st.get("sandboxes", []) if s.get("qemuPid")],
               removedDeadLab=st.get("removedDeadLab", False))
    return st


#: how long 'lab down' waits for an 'up' at work on the root: longer than up's default timeout,
#: so a start being waited for ends (ready, failed or timed out) first
DOWN_LOCK_WAIT = 240.0


@contextlib.contextmanager
def root_lock(root: str, timeout: float, *, create: bool, on_wait: Callable[[], None] | None = None):
    """Hold the exclusive flock(2) on the lab root directory itself while checking and then
    starting or stopping the lab there: without it, a second ``up`` landing between the first
    one's config.json and its daemon's first state.json took the lab for a dead one, removed
    it and started a second daemon (``down`` then stopped only one).

    The root directory, not a file: every user who can use the root can lock it (no writable
    parent needed), and nothing is left behind. ``down`` (and a failed ``up``) remove the root,
    so a waiter may get the lock of a removed directory: it then checks that the path still
    names the inode it locked, and retries on the new one. create: make the root first (``up``);
    without it a missing root is not locked (``down``: no lab, nothing to serialise).
    on_wait: called once when another holder makes this one wait. TimeoutExpired when the
    other holder keeps it past timeout."""
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        if create:
            os.makedirs(root, mode=0o755, exist_ok=True)
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                continue  # removed (by the holder) between makedirs and open
            yield
            return
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if on_wait is not None:
                        on_wait()
                        on_wait = None
                    if time.monotonic() > deadline:
                        raise TimeoutExpired(
                            f"another 'katactl lab up' or 'lab down' is still at work on the lab at {root} "
                            f"after {timeout:g}s") from None
                    time.sleep(0.05)
            held = os.fstat(fd)
            try:
                now = os.stat(root)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                yield
                return
        finally:
            os.close(fd)  # releases the lock


def _intent(action: str, root: str, params: dict):
    """The ``requested`` entry _up and _down write (_changing) before they touch anything:
    a kill -9 midway leaves the start or the removal logged."""
    from katactl import audit

    return audit.intent(action, root, params=params)


def _changing() -> None:
    from katactl import audit

    audit.changing()


def _audit(action: str, root: str, params: dict, *, changed=None, result: str = "ok", **extra) -> None:
    from katactl import audit

    audit.record(action, root, params=params, result=result, changed=changed, **extra)


def _up(root: str, specs: list[dict], kernel: str | None, *, timeout: float, die_with_parent: bool,
        dry_run: bool) -> dict:
    p = _paths(root)
    st = read_state(root)
    if st and _daemon(root, st)[0] == "running":
        cfg = _read_config(root)
        running = cfg.get("sandboxes") or []
        if _comparable(running) != _comparable(specs) or cfg.get("kernel") != kernel:
            what = _describe(running) + (f", kernel {cfg.get('kernel')}" if cfg.get("kernel") else "")
            want = _describe(specs) + (f", kernel {kernel}" if kernel else "")
            raise Refused(f"a lab with another spec already runs at {root} ({what}; asked for {want})",
                          hint=f"katactl lab down --root {root} first, or another --root")
        if st.get("status") != "ready" and not dry_run:
            st = _wait_ready(root, timeout)  # still starting: as a first start waits
        return {**st, "changed": False, "dryRun": dry_run}
    if os.path.exists(root) and os.listdir(root) and not os.path.isdir(p["dir"]):
        raise Refused(f"{root} exists and is not empty: the lab needs its own directory",
                      hint="give another --root, or remove that directory")
    leftovers = os.path.isdir(p["dir"])  # a dead lab's
    if dry_run:
        from katactl.lab.daemon import pod_of_spec
        from katactl.sandbox import pod_ref

        return {"apiVersion": "katactl/v1", "kind": "Lab", "root": root, "pid": None, "status": "planned",
                "kernel": kernel, "removesDeadLab": leftovers,
                "sandboxes": [{"name": s["name"], "id": s["id"], "hypervisor": s.get("hypervisor", "qemu"),
                               "status": "planned", "memoryBytes": int(s.get("memory_mib", 512)) << 20,
                               "pod": pod_of_spec(s), "podRef": pod_ref(pod_of_spec(s))}
                              for s in specs],
                "changed": True, "dryRun": True}
    proc: subprocess.Popen | None = None
    _changing()
    try:
        if leftovers:
            _cleanup(root)
        os.makedirs(p["dir"], mode=0o755, exist_ok=True)
        with open(p["config"], "w") as f:
            json.dump({"root": root, "kernel": kernel, "sandboxes": specs,
                       "parentPid": os.getpid() if die_with_parent else None,
                       "startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=1)
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(p["log"], "wb") as log, _interrupts_held():
            proc = subprocess.Popen([sys.executable, "-m", "katactl.lab.daemon", "--root", root],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, env=env, cwd="/")
        st = _wait_ready(root, timeout, proc)
    except KeyboardInterrupt:
        # the daemon leads its own session: Ctrl-C on the terminal never reaches it, so
        # stop what this run started rather than leave a lab booting that nobody waits for
        undone = False
        try:
            if proc is not None:
                _stop_pid(proc.pid, 10)
                proc.poll()
            _cleanup(root)
            undone = not os.path.isdir(p["dir"])
        finally:
            raise _StartInterrupted(proc.pid if proc else None, undone, leftovers) from None
    return {**st, "changed": True, "dryRun": False, "removedDeadLab": leftovers}


class _StartInterrupted(KeyboardInterrupt):
    """A start interrupted after it touched something (still a KeyboardInterrupt: exit 130)."""

    def __init__(self, daemon_pid: int | None, undone: bool, removed_dead_lab: bool):
        super().__init__()
        self.daemon_pid, self.undone, self.removed_dead_lab = daemon_pid, undone, removed_dead_lab


_INTERRUPTS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT, SIGTERM and SIGHUP held back (in this thread) while the daemon is forked:
    an interrupt raised inside Popen would lose the child's pid, leaving a daemon that
    nobody stops; held, it arrives once ``proc`` is known. The daemon inherits the mask
    and unblocks them itself (katactl.lab.daemon.main)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals run their handlers in the main thread only
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_ready(root: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    """The lab's state once its daemon reports ``ready``.

    proc: the daemon this run started; when it fails or is not ready within timeout, it
    is stopped and the lab removed. Without proc (a lab another ``up`` is starting): a
    failure is cleaned up the same way (the failed daemon waits for an ``up`` to read its
    error and remove it), but a lab merely slow is left to the ``up`` that started it."""
    p = _paths(root)
    deadline = time.monotonic() + timeout
    while True:
        st = read_state(root)
        if st and st.get("status") == "ready":
            return st
        if proc is not None:
            daemon, now = ("gone", None) if proc.poll() is not None else ("running", None)
        else:
            daemon, now = _daemon(root, st)
        failed = bool(st and st.get("status") == "failed") or daemon != "running"
        if failed or time.monotonic() > deadline:
            err = (st or {}).get("error") or _log_tail(p["log"])
            if st is None and proc is None:
                raise OperationFailed(f"the lab at {root} went away while it was starting "
                                      "(its 'lab up' was interrupted, or 'lab down' ran)")
            if not failed and proc is None:
                raise TimeoutExpired(f"the lab at {root} is still starting after {timeout:g}s (another "
                                     "'lab up' started it)", hint=f"katactl lab down --root {root} stops it")
            if proc is not None:
                _stop_pid(proc.pid, 10)
                proc.poll()
            elif daemon == "running" and now is not None:
                _stop_pid(now.pid, 10, identity=now)
            _cleanup(root)
            if not failed:
                raise TimeoutExpired(f"the lab did not become ready within {timeout:g}s: {err}")
            raise OperationFailed(f"the lab failed to start: {err}")
        time.sleep(0.1)


def _log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        return lines[-1] if lines else "(no output)"
    except OSError:
        return "(no log)"


def status(root: str | None = None) -> dict:
    root = lab_root(root)
    st = read_state(root)
    if st is None:
        raise NotFound(f"no lab at {root}", hint="start one with 'katactl lab up'")
    daemon, now = _daemon(root, st)
    if daemon == "foreign":
        st["status"] = "dead"
        st["error"] = (_foreign_message(root, st.get("pid"), now)
                       + f" (katactl lab down --force --root {root} removes the lab without signalling it)")
    elif daemon == "gone":
        st["status"] = "dead"
        again = f"katactl lab down --root {root} cleans up, then katactl lab up --root {root} starts it again"
        st["error"] = (f"{st['error']} ({again})" if st.get("error")
                       else f"the lab daemon is not running, so its sandboxes are stale ({again})")
    if st["status"] == "dead":
        # the daemon served every shim socket: with it gone no sandbox answers, whatever it
        # last recorded (`sandbox list` calls them stale too)
        for sb in st.get("sandboxes") or []:
            if isinstance(sb, dict):
                sb["recordedStatus"] = sb.get("status")
                sb["status"] = "stale"
    return st


def _stop_pid(pid: int, timeout: float, identity: "ProcIdentity | None" = None) -> bool:
    """SIGTERM, then (after timeout) SIGKILL to its process group. With identity, the
    KILL goes only to that same process (its pid may have been reused meanwhile)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    if identity is not None:
        from katactl.procfacts import LocalProcessFacts

        if not LocalProcessFacts().still_is(identity):
            return True
    try:
        os.killpg(pid, signal.SIGKILL)  # the daemon leads its own session
    except (ProcessLookupError, PermissionError):
        pass
    return False


def _our_qemus(st: dict | None) -> list[tuple[dict, int]]:
    """(sandbox, pid) of the lab's QEMUs that still run: the recorded start time and argv
    match the process at the pid. An older state without them: its argv names qemu. One
    whose argv was recorded before QEMU's showed (empty: read mid-exec by an older daemon;
    a wrapper script's interpreter, the daemon lost before it recorded QEMU's own): the
    start time, and an argv naming qemu."""
    from katactl.procfacts import CREATE_TIME_SLACK, LocalProcessFacts, ProcIdentity

    def is_qemu(p: ProcIdentity) -> bool:
        return bool(p.cmdline) and "qemu" in os.path.basename(p.cmdline[0])

    cands: list[tuple[dict, int]] = []
    for s in (st or {}).get("sandboxes", []):
        q = s.get("qemuPid") if isinstance(s, dict) else None
        if isinstance(q, int) and not isinstance(q, bool) and q > 0:
            cands.append((s, q))
    now = LocalProcessFacts().identities([q for _, q in cands])
    out = []
    for s, q in cands:
        cur, recorded = now.get(q), ProcIdentity.from_dict(s.get("qemu"))
        if cur is None:
            continue
        if recorded is None:
            ours = is_qemu(cur)
        elif recorded.same_process(cur):
            ours = True
        else:  # argv recorded before QEMU's own showed: the same start time, and QEMU now
            ours = abs(cur.create_time - recorded.create_time) <= CREATE_TIME_SLACK and is_qemu(cur)
        if ours:
            out.append((s, q))
    return out


def _kill_qemus(st: dict | None) -> None:
    for _, pid in _our_qemus(st):
        try:
            os.killpg(pid, signal.SIGKILL)  # each QEMU leads its own session
        except (OSError, ProcessLookupError):
            pass


def _cleanup(root: str) -> None:
    from katactl.lab.daemon import remove_tree

    _kill_qemus(read_state(root))
    remove_tree(root)


def down(root: str | None = None, timeout: float = 30, dry_run: bool = False, force: bool = False,
         on_wait: Callable[[], None] | None = None) -> dict:
    """Stop the lab at root and remove its directory; return what was (with ``dry_run``:
    what would be) stopped and removed. No lab there: ``changed: false``.

    Only the processes the lab started are signalled: the pid in its state must still be
    the daemon (same start time and argv as recorded), else Refused (exit 5) and nothing
    is touched; ``force`` then removes the lab's files without signalling that process.
    A QEMU pid that is no longer the lab's QEMU is left alone.

    An ``up`` at work on root (:func:`root_lock`) is waited for first (up to DOWN_LOCK_WAIT;
    on_wait is called when it starts waiting).

    A removal (or a failed attempt) goes to the audit log; a dry run and a no-op do not."""
    root = lab_root(root)
    try:
        if dry_run:
            r = _down(root, timeout, dry_run, force)
        else:
            with root_lock(root, DOWN_LOCK_WAIT, create=False, on_wait=on_wait), _intent("lab.down", root, {}):
                r = _down(root, timeout, dry_run, force)
    except Exception as e:
        if not dry_run:
            _audit("lab.down", root, {}, result=f"error: {e}")
        raise
    if r["changed"] and not dry_run:
        _audit("lab.down", r["root"], {}, changed=True, stopped=r["stopped"], removed=r["removed"])
    return r


def _down(root: str, timeout: float, dry_run: bool, force: bool) -> dict:
    st = read_state(root)
    if st is None and not os.path.isdir(os.path.join(root, LAB_DIR)):
        return {"root": root, "status": "absent", "stopped": [], "removed": [], "changed": False,
                "dryRun": dry_run}
    pid = (st or {}).get("pid")
    daemon, now = _daemon(root, st)
    if daemon == "foreign" and not force:
        raise Refused(_foreign_message(root, pid, now) + ": not signalled, nothing removed",
                      hint=f"if no lab daemon runs for {root} any more, 'katactl lab down --force --root {root}' "
                           f"removes the lab's files without signalling pid {pid}")
    stopped = []
    if daemon == "running":
        stopped.append({"pid": pid, "what": "lab daemon"})
    for s, q in _our_qemus(st):
        stopped.append({"pid": q, "what": f"qemu ({s.get('name')})"})
    result = {"root": root, "status": "removed", "stopped": stopped, "removed": [root],
              "changed": True, "dryRun": dry_run}
    if daemon == "foreign":
        result["skipped"] = [{"pid": pid, "what": "not the lab daemon (--force): not signalled",
                              "cmdline": list(now.cmdline) if now else None}]
    if dry_run:
        result["status"] = (st or {}).get("status") or "unknown"
        if daemon != "running":
            result["status"] = "dead"
        return result
    _changing()
    if daemon == "running" and now is not None:  # running: now is the daemon, at pid
        _stop_pid(now.pid, timeout, identity=now)
    _cleanup(root)
    if os.path.exists(root):
        raise OperationFailed(f"could not remove {root}")
    return result
