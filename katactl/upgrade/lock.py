"""One upgrade operation at a time per node, and its audit record.

Local transports (including --host-root) take ``fcntl.flock`` on
``releases/.katactl/lock``: the kernel drops it when katactl dies, even by
SIGKILL, so a crashed run never leaves a stale lock. Other transports (SSH)
use a mkdir lock (``lock.d``, atomic on every POSIX filesystem) with an owner
file; a lock whose owner is a dead process *of this client host* is broken
by renaming it away (one breaker wins the rename).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import TYPE_CHECKING

from katactl.audit import current_user, now_iso, record
from katactl.backends.base import NodeTransport
from katactl.errors import TimeoutExpired

if TYPE_CHECKING:
    from katactl.backends.local import LocalTransport


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "user": current_user(), "since": now_iso()}


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
    error too). A dry run takes no lock and records nothing.

    ``prepare()``, when given, runs first, without the lock (reading a local source, say);
    body gets its result. ``unstaged``, when given, is the outcome on a node without a
    releases directory (nothing was ever staged): an exception to raise or the result, the
    lock not taken (that would create the directory). The record's target is ``target``,
    or ``target_of(result)`` once the result is known."""
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
    try:
        res = run()
    except Exception as e:
        _record(action, target, transport, params, None, result=f"error: {e}")
        raise
    _record(action, target_of(res) if target_of else target, transport, params, res["changed"])
    return res


def _record(action: str, target: str, transport: NodeTransport, params: dict, changed: bool | None,
            result: str = "ok") -> None:
    record(f"upgrade.{action}", target, node=transport.node, params=params, result=result,
                 changed=changed)


@contextlib.contextmanager
def node_lock(transport: NodeTransport, layout, *, timeout: float, on_wait=None):
    transport.mkdir(layout.state)
    from katactl.backends.local import LocalTransport

    if isinstance(transport, LocalTransport):
        with _flock(transport, layout, timeout, on_wait):
            yield
    else:
        with _mkdir_lock(transport, layout, timeout, on_wait):
            yield


@contextlib.contextmanager
def _flock(transport: LocalTransport, layout, timeout, on_wait):
    import fcntl

    real = transport.real(layout.lock)
    fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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


@contextlib.contextmanager
def _mkdir_lock(transport: NodeTransport, layout, timeout, on_wait):
    d = layout.lock + ".d"
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            transport.mkdir(d, parents=False)
            break
        except OSError as e:
            # a racing client may win between the transport's exists-check and its mkdir
            if not isinstance(e, FileExistsError) and not transport.exists(d):
                raise
            try:
                raw = transport.read_bytes(d + "/owner.json", limit=4096)
            except OSError:
                raw = b""
            if _stale(raw):
                with contextlib.suppress(OSError):
                    gone = f"{layout.state}/.lock-stale-{os.getpid()}-{time.monotonic_ns()}"
                    transport.rename(d, gone)
                    transport.remove(gone, recursive=True)
                continue
            if time.monotonic() >= deadline:
                raise TimeoutExpired(
                    f"another upgrade operation holds the lock on {transport.node} ({_describe(raw)})",
                    hint=f"wait for it to finish; a lock left by a crashed client is {d}") from None
            if on_wait and not told:
                on_wait(_describe(raw))
                told = True
            time.sleep(0.2)
    transport.write_bytes_atomic(d + "/owner.json", json.dumps(_owner()).encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            transport.remove(d, recursive=True)


def _stale(raw: bytes) -> bool:
    """Only a lock of a dead process on *this* client host is provably stale."""
    o = _owner_of(raw)
    if o is None or o.get("host") != socket.gethostname() or not isinstance(o.get("pid"), int):
        return False
    try:
        os.kill(o["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
