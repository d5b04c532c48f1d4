"""One upgrade operation at a time per node, and its audit record.

The lock is the directory ``releases/.katactl/lock.d`` holding an ``owner.json``,
whatever the transport, so a local or --host-root run and an SSH or --via kube run
on the same node exclude each other. It appears *with* its owner: katactl makes a
private ``.lock-new-<token>/owner.json`` and renames that directory to ``lock.d``
(rename(2) of a directory fails onto a non-empty one, so one of two racing clients
wins), never a bare mkdir followed by a write that a cut stream can separate. If the
outcome of a step is unknown (the exec/SSH stream was cut), katactl removes its temp
directory and ``lock.d`` if ``lock.d`` names its token.

A lock is broken (claimed by one breaker, then renamed away: ``_break``) only when its
owner is provably gone:

- a local run (local transports, including --host-root) first takes ``fcntl.flock`` on
  ``releases/.katactl/lock``, which the kernel drops when katactl dies, even by SIGKILL,
  and holds it as long as its ``lock.d`` (owner ``"flock": true``). Such a lock.d is
  stale once that flock is free: certainly for a local run, which holds the flock
  itself; a remote run asks the node (``flock -n`` of the same file, util-linux).
- any other owner names its process: boot id, pid namespace, pid and start time. It is
  dead only as judged by a katactl with the same boot id and pid namespace (the same
  machine, the same pid numbering): no such process, or another one since. Two clients
  that share only a host name (CI runners all called ``runner``) never break each
  other's lock. An owner without a boot id (an older katactl) is judged by host name
  and pid, as that katactl did.
- a lock with no readable owner older than ``OWNERLESS_STALE`` (by the node's clock: a
  lock of an older katactl between its mkdir and its owner write is that young).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import json
import os
import secrets
import socket
import stat
import time
from typing import TYPE_CHECKING

from katactl.audit import changing, current_user, intent, now_iso, record
from katactl.backends.base import NodeTransport
from katactl.errors import KatactlError, Refused, TimeoutExpired

if TYPE_CHECKING:
    from katactl.backends.local import LocalTransport


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "user": current_user(), "since": now_iso(),
            **owner_identity()}


def _proc_start(pid: int) -> str | None:
    """The start time of process pid (/proc/<pid>/stat field 22, clock ticks since boot),
    None when there is no such process: with the boot id, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
    except OSError:
        return None
    return fields[19].decode() if len(fields) > 19 else None


def owner_identity() -> dict:
    """This process, as a lock owner another katactl can judge dead or alive (owner_dead);
    the rollout Lease's session carries it too (rollout/store.py)."""
    out: dict = {}
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            out["boot"] = f.read().strip()
    with contextlib.suppress(OSError):
        out["pidns"] = os.readlink("/proc/self/ns/pid")
    start = _proc_start(os.getpid())
    if start is not None:
        out["start"] = start
    return out


def _owner_of(raw: bytes) -> dict | None:
    """The owner record in a lock file, or None for anything else (a torn or foreign file)."""
    try:
        o = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return o if isinstance(o, dict) else None


def _describe(raw: bytes) -> str:
    o = _owner_of(raw)
    if o is None:
        return "another katactl"
    return f"pid {o.get('pid')} on {o.get('host')} (user {o.get('user')}, since {o.get('since')})"


def locked_audited(transport: NodeTransport, layout, action: str, params: dict, body, *, target: str, dry_run: bool,
                   lock_timeout: float, on_wait, target_of=None, prepare=None,
                   unstaged: Exception | dict | None = None) -> dict:
    """One mutating upgrade operation (stage, switch, rollback, gc) on a node: body() under
    the node's upgrade lock, and an ``upgrade.<action>`` audit record of the outcome (an
    error too), after a ``requested`` one written before its first live step, if it takes one.
    A dry run takes no lock and records nothing.

    ``prepare()``, when given, runs first, without the lock (reading a local source, say);
    body gets its result. ``unstaged``, when given, is the outcome on a node without a
    releases directory (nothing was ever staged): an exception to raise or the result, the
    lock not taken (that would create the directory). The record's target is ``target``,
    or ``target_of(result)`` once the result is known."""
    layout.check_inside(transport)  # bad input: refused before anything, the audit log too

    def run() -> dict:
        if unstaged is not None and not transport.is_dir(layout.releases):
            if isinstance(unstaged, Exception):
                raise unstaged
            return unstaged
        args = (prepare(),) if prepare is not None else ()
        if dry_run:
            return body(*args)
        with node_lock(transport, layout, timeout=lock_timeout, on_wait=on_wait):
            return body(*args)

    if dry_run:
        return run()
    progress = Progress()
    token = _progress.set(progress)
    try:
        # a "requested" entry before the first live step (live, journal_on_node, changing): a
        # kill -9 after it leaves the change logged; a run with nothing to do writes none
        with intent(f"upgrade.{action}", target, node=transport.node, params=params):
            res = run()
    except BaseException as e:
        # what was done before the failure: a Ctrl-C (SIGTERM, SIGHUP) after a live step
        # leaves a changed node, which the log must say
        extra: dict = {"done": progress.done} if progress.done else {}
        if progress.unsure:
            extra["maybeDone"] = progress.unsure
        if progress.journal:
            extra["pendingJournal"] = layout.journal  # the next stage/switch/rollback/gc finishes it
        changed = True if progress.done else None if progress.unsure else False
        if isinstance(e, KeyboardInterrupt):
            _record(action, target, transport, params, changed, result="interrupted", **extra)
        else:
            _record(action, target, transport, params, changed or None, result=f"error: {e}", **extra)
        raise
    finally:
        _progress.reset(token)
    if progress.done:
        # also a run that had nothing of its own to do changed the node when it first
        # finished an interrupted one (recovered): the killed run wrote no record of it
        res = {**res, "changed": True}
    steps: dict = {"done": progress.done} if progress.done else {}
    _record(action, target_of(res) if target_of else target, transport, params, res["changed"], **steps)
    return res


def _record(action: str, target: str, transport: NodeTransport, params: dict, changed: bool | None,
            result: str = "ok", **extra) -> None:
    record(f"upgrade.{action}", target, node=transport.node, params=params, result=result,
           changed=changed, **extra)


@dataclasses.dataclass
class Progress:
    """The live steps of the running operation so far, for its audit record should it stop
    midway (its result tells them otherwise)."""
    done: list[str] = dataclasses.field(default_factory=list)
    unsure: str | None = None  # a step stopped in mid-call: done or not, unknown
    journal: bool = False  # its journal may be on the node


_progress: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("upgrade_progress", default=None)


def done(step: str) -> None:
    """Note a live step of the running locked_audited operation (a release renamed into or
    out of place, ``current`` flipped, a live configuration file replaced)."""
    changing()
    p = _progress.get()
    if p is not None:
        p.done.append(step)


@contextlib.contextmanager
def live(step: str):
    """Around the one call that takes a live step: done once it returns; unsure when it is
    interrupted (a Ctrl-C during a rename's round trip: it may have landed; the record then
    has no ``changed``); not done when the node refused it (OSError)."""
    changing()
    p = _progress.get()
    if p is not None:
        p.unsure = step
    try:
        yield
    except OSError:
        if p is not None:
            p.unsure = None
        raise
    if p is not None:
        p.unsure = None
        p.done.append(step)


def journal_on_node(present: bool) -> None:
    """Note that the running operation's journal may be on the node (set before it is
    written), or is no longer (after it is removed)."""
    if present:
        changing()  # the journal makes the next run finish this one: a change under way
    p = _progress.get()
    if p is not None:
        p.journal = present


@contextlib.contextmanager
def node_lock(transport: NodeTransport, layout, *, timeout: float, on_wait=None):
    """The node's upgrade lock: lock.d on every transport; a local run holds the flock too,
    first, and for as long (see the module docstring). One wait of ``timeout`` for both."""
    transport.mkdir(layout.state)
    from katactl.backends.local import LocalTransport

    deadline = time.monotonic() + timeout
    said: list[str] = []

    def once(holder: str) -> None:  # one "waiting for ..." message, whichever lock waits
        if on_wait and not said:
            said.append(holder)
            on_wait(holder)

    if isinstance(transport, LocalTransport):
        with _flock(transport, layout, timeout, once):
            with _mkdir_lock(transport, layout, max(0.0, deadline - time.monotonic()), once, flocked=True):
                yield
    else:
        with _mkdir_lock(transport, layout, timeout, once):
            yield


@contextlib.contextmanager
def _flock(transport: LocalTransport, layout, timeout, on_wait):
    import fcntl

    fd = _open_lock_file(transport, layout)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _describe(os.pread(fd, 4096, 0))
                if time.monotonic() >= deadline:
                    raise TimeoutExpired(
                        f"another upgrade operation holds the lock on {transport.node} ({holder})",
                        hint="wait for it to finish, or raise --lock-timeout") from None
                if on_wait and not told:
                    on_wait(holder)
                    told = True
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock_file(transport: LocalTransport, layout) -> int:
    """The flock file, opened as audit.py opens its log: never through a symlink (under
    --host-root an absolute one would name a file of this host, which katactl, root, then
    truncates), and only a regular file (O_NONBLOCK: a FIFO there must not stall us)."""
    real = transport.real(layout.lock, follow_symlinks=False)  # the lock file itself, never a link
    try:
        fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO):  # ENXIO: a FIFO without a reader
            raise
        raise _not_a_lock_file(transport, layout) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_a_lock_file(transport, layout)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_a_lock_file(transport: NodeTransport, layout) -> Refused:
    return Refused(f"{layout.lock} on {transport.node} is not a regular file (a symlink, FIFO or device); "
                   "refusing to lock through it", hint="remove it; katactl creates the lock file itself")


#: an owner-less lock younger than this (or four --request-timeout) may be an older katactl
#: between its mkdir and its owner write (one round trip), so it blocks; an older one is the
#: leftover of a cut stream or a crash there, and nothing else would ever remove it. The same
#: bound ages a breaker's claim (_break: its round trips must fit in half of it)
OWNERLESS_STALE = 60.0


@contextlib.contextmanager
def _mkdir_lock(transport: NodeTransport, layout, timeout, on_wait, flocked: bool = False):
    """lock.d; ``flocked``: the caller holds the node's flock (a local run) until we return."""
    d = layout.lock + ".d"
    token = secrets.token_hex(8)
    tmp = f"{layout.state}/.lock-new-{token}"
    owner = {**_owner(), "token": token, **({"flock": True} if flocked else {})}
    try:
        transport.mkdir(tmp, parents=False)
        transport.write_bytes_atomic(tmp + "/owner.json", json.dumps(owner).encode())
        _take(transport, layout, d, tmp, timeout, on_wait, flocked)
    except BaseException:
        # the outcome of the failed step is unknown (a cut stream may have hidden a done
        # mkdir or rename): undo what is ours, on a new stream where the transport has one
        with contextlib.suppress(Exception):
            _release(transport, layout, d, token)
        with contextlib.suppress(Exception):
            transport.remove(tmp, recursive=True)
        raise
    try:
        yield
    finally:
        try:
            _release(transport, layout, d, token)
        except OSError:
            pass
        except KatactlError:
            # a cut stream: its step may or may not have happened; once more on a new one
            with contextlib.suppress(OSError):
                _release(transport, layout, d, token)


def _take(transport: NodeTransport, layout, d: str, tmp: str, timeout: float, on_wait,
          flocked: bool = False) -> None:
    """Rename tmp (our owner.json inside) to d once d is free or stale, within timeout."""
    deadline = time.monotonic() + timeout
    bound = max(OWNERLESS_STALE, 4 * transport.timeout)  # a breaker's round trips fit in bound/2
    told = False
    clock: tuple[float, float] | None = None  # (node time, monotonic time) when tmp was written

    def older(mtime: float) -> bool:
        """Older than bound on the node's clock (tmp's mtime was its "now" when tmp was written)."""
        assert clock is not None
        return clock[0] + (time.monotonic() - clock[1]) - mtime > bound

    while True:
        st = transport.stat_many([d, tmp], follow_symlinks=False)
        cur, mine = st[d], st[tmp]
        if isinstance(mine, OSError):
            raise mine
        if clock is None:
            clock = (mine.mtime, time.monotonic())
        if isinstance(cur, FileNotFoundError):
            # not rename-if-absent: rename(2) would replace an *empty* d (an older katactl
            # between its mkdir and its owner write), hence the stat first
            try:
                transport.rename(tmp, d)
            except OSError:
                if not transport.exists(d):
                    raise
                continue  # a racing client renamed first: look at its lock
            with contextlib.suppress(OSError, KatactlError):
                _sweep(transport, layout, flocked, older)
            return
        elif isinstance(cur, OSError):
            raise cur
        try:
            raw = transport.read_bytes(d + "/owner.json", limit=4096)
        except OSError:
            raw = b""
        stale = older(cur.mtime) if _owner_of(raw) is None else _stale(raw, transport, layout, flocked)
        if stale and _break(transport, layout, d, raw, older, bound=bound):
            continue  # broken: look again at once
        if time.monotonic() >= deadline:
            raise TimeoutExpired(
                f"another upgrade operation holds the lock on {transport.node} ({_describe(raw)})",
                hint=f"wait for it to finish; a lock left by a crashed client is {d}") from None
        if on_wait and not told:
            on_wait(_describe(raw))
            told = True
        time.sleep(0.2)


#: a breaker's claim on a lock it is about to break: a directory inside the lock, holding one
#: entry named by its breaker's token
BREAK_CLAIM = ".break"


def _break(transport: NodeTransport, layout, d: str, raw: bytes, older=None, *, bound: float = OWNERLESS_STALE,
           clock=time.monotonic) -> bool:
    """Rename the stale lock d (whose owner.json read ``raw``) away, and remove it. True when
    d should be looked at again at once (broken, or no longer the lock judged stale); False
    while a breaker's claim (another's, or ours left behind) stands.

    d is judged stale from an earlier read: meanwhile another breaker may have freed it and
    a live client taken it, so renaming d at once could move a live lock away (and putting
    it back races with a third client taking the freed d: two holders). Instead a breaker
    first claims d: it renames a private ``.lock-claim-<token>/<token>`` to ``d/.break``
    (rename(2) of a directory fails onto a non-empty one, so one breaker wins; and rename(2)
    cannot replace the now non-empty d), then reads the owner again: only while d still
    holds the stale owner it judged is d renamed away, and nothing else moves a claimed
    lock. A live lock is left as it was (claim removed). A claim older than ``older``
    allows (its breaker died or was cut off between its steps, or gave up) is taken over in
    place (_take_over), so d's mtime, the age of an owner-less lock, stays what it was.

    A breaker that is slow, not dead (Ctrl-Z, a suspended laptop, calls near the request
    timeout) may have had its claim taken over as stale, and d broken and retaken by a live
    client since. So, right before the rename, it checks that ``d/.break/<token>`` is still
    there, and that no more than ``bound``/2 has passed on its own monotonic clock since
    just before it made the claim (the claim cannot be older than that, so nobody could
    take it over yet; others take a claim over only once it is older than ``bound``, by the
    node's clock). Past bound/2 it gives up and leaves its claim to age out: removing it
    then could remove a successor's claim. What remains is the window between those checks
    and the rename landing on the node: one request, well inside the other bound/2
    (``bound`` is at least four request timeouts) unless the client stalls in that instant
    or the request sits undelivered for longer; and a node clock stepped forward.

    An empty ``d/.break`` (a katactl before claims carried a token) is replaced by the
    claim's rename, without waiting for it to age."""
    claim = f"{d}/{BREAK_CLAIM}"
    token = secrets.token_hex(8)
    prep = f"{layout.state}/.lock-claim-{token}"
    t0 = clock()  # before the claim's entry exists: its age never exceeds clock() - t0
    left = prep  # ours to remove, until renamed to the claim
    try:
        transport.mkdir(f"{prep}/{token}")
        try:
            transport.rename(prep, claim)
            left = ""
        except OSError:
            # claimed by another breaker (or d is gone: the caller looks again)
            if not _take_over(transport, claim, token, older):
                return False
    except OSError:
        return False
    finally:
        if left:
            with contextlib.suppress(Exception):
                transport.remove(left, recursive=True)

    def drop_claim() -> None:
        """Remove our claim while it is certainly still ours (young); else leave it to age out."""
        if clock() - t0 <= bound / 2:
            with contextlib.suppress(OSError):
                transport.remove(claim, recursive=True)

    try:
        now = transport.read_bytes(d + "/owner.json", limit=4096)
    except OSError:
        now = b""
    if now != raw:  # not the lock judged stale any more: leave it
        drop_claim()
        return True  # changed since it was read: look again at once
    if not transport.exists(f"{claim}/{token}"):
        return True  # our claim was taken over (we were that slow): d may be a live lock now
    if clock() - t0 > bound / 2:
        return False  # too slow to be sure nobody took our claim over by the time the rename lands
    gone = f"{layout.state}/.lock-stale-{secrets.token_hex(8)}"
    try:
        transport.rename(d, gone)  # with our claim inside: still the stale lock
    except OSError:
        drop_claim()
        return False
    with contextlib.suppress(OSError):
        transport.remove(gone, recursive=True)
    return True


def _take_over(transport: NodeTransport, claim: str, token: str, older) -> bool:
    """Make a claim older than ``older`` allows (its breaker died, or stalled and gives up:
    _break) ours, in place: its token entry renamed to ours (rename(2): one of two takers
    wins). Not moved out of the lock: that would change d's mtime, by which an owner-less
    d is aged, and make an hours-old leftover look young again. True once it is ours."""
    if older is None or not older(transport.stat(claim, follow_symlinks=False).mtime):
        return False  # young: its breaker may be at work
    entries = transport.listdir(claim)
    if len(entries) != 1:
        return False  # not a claim we know how to take (by hand?): left for a human
    transport.rename(f"{claim}/{entries[0]}", f"{claim}/{token}")
    return True


def _sweep(transport: NodeTransport, layout, flocked: bool, older=None) -> None:
    """Remove what a run killed at the wrong moment left for good: its ``.lock-new-<token>``
    (killed between writing it and renaming it to lock.d) or ``.lock-old-<token>`` (between
    renaming lock.d away and removing it). Run while holding the lock; only an owner proved
    gone as a lock's would be (_stale): a live client waiting for the lock keeps its own.

    A breaker's leftovers (_break) too: ``.lock-stale-<token>`` (killed between renaming the
    stale lock away and removing it) was proven stale already and nothing reads it again;
    ``.lock-claim-<token>`` (killed before renaming it into the lock) once older than
    ``older`` allows, as _take_over ages a claim: a slow breaker's rename of it then fails,
    and that breaker looks again."""
    for name in transport.listdir(layout.state):
        path = f"{layout.state}/{name}"
        if name.startswith((".lock-stale-", ".lock-claim-")):
            with contextlib.suppress(OSError):  # gone meanwhile: its breaker moved on
                if name.startswith(".lock-stale-") or (
                        older is not None and older(transport.stat(path, follow_symlinks=False).mtime)):
                    transport.remove(path, recursive=True)
            continue
        if not name.startswith((".lock-new-", ".lock-old-")):
            continue
        try:
            raw = transport.read_bytes(path + "/owner.json", limit=4096)
        except OSError:
            continue  # no owner to judge (an older katactl's, or mid-write): left alone
        if _stale(raw, transport, layout, flocked):
            with contextlib.suppress(FileNotFoundError):
                transport.remove(path, recursive=True)


def _release(transport: NodeTransport, layout, d: str, token: str) -> None:
    """Remove d if it is our lock (its owner has our token): renamed away first, so d never
    stands empty (an owner-less lock that others would wait on). Idempotent: a second call
    finishes what a cut stream interrupted."""
    gone = f"{layout.state}/.lock-old-{token}"
    try:
        o = _owner_of(transport.read_bytes(d + "/owner.json", limit=4096))
    except (FileNotFoundError, NotADirectoryError):
        o = None
    if o is not None and o.get("token") == token:  # else not ours (any more): broken as stale, retaken
        transport.rename(d, gone)
    with contextlib.suppress(FileNotFoundError):
        transport.remove(gone, recursive=True)


def _stale(raw: bytes, transport: NodeTransport | None = None, layout=None, flocked: bool = False) -> bool:
    """Whether the owner in raw is provably gone (the module docstring says when)."""
    o = _owner_of(raw)
    if o is None:
        return False
    if o.get("flock") is True:
        # it held the flock as long as the lock: gone once the flock is free
        return flocked or (transport is not None and layout is not None and _flock_free(transport, layout))
    return owner_dead(o)


def owner_dead(o: dict) -> bool:
    """A lock owner that names no flock: dead only by this machine's and pid namespace's word."""
    pid = o.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    if "boot" in o:
        me = owner_identity()
        if not me.get("boot") or o.get("boot") != me["boot"] or o.get("pidns") != me.get("pidns"):
            return False  # another machine or pid namespace (whatever its host name)
        start = _proc_start(pid)
        return start is None or (o.get("start") is not None and start != o.get("start"))
    # an older katactl's owner: host name and pid only
    if o.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _flock_free(transport: NodeTransport, layout) -> bool:
    """Whether nobody holds the node's upgrade flock (asked on the node with util-linux
    flock(1), which takes and drops it at once: exit 0 free, 75 held). Not knowing (no
    flock program, no answer) is not free."""
    remote = getattr(transport, "remote", None)  # a remote transport's node-side path
    if remote is None:
        return False
    # flock(1) opens its file following symlinks, with O_CREAT, and blocks on a FIFO: only a
    # regular file (or none: it creates one) is handed to it, as a local run opens it
    st = transport.stat_many([layout.lock], follow_symlinks=False)[layout.lock]
    if not isinstance(st, OSError) and not stat.S_ISREG(st.mode):
        raise _not_a_lock_file(transport, layout)
    try:
        r = transport.run(["flock", "-n", "-E", "75", remote(layout.lock), "true"])
    except (OSError, KatactlError):
        return False
    return r.returncode == 0
