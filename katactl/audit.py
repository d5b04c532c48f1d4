"""Audit log of changes: one JSON line per mutating action.

Lives at $XDG_STATE_HOME/katactl/audit.log, or where the ``audit_log`` setting
says (the CLI calls configure() once its settings are resolved; library users
may too). Written with O_APPEND so concurrent katactl processes never
interleave a line, and with O_NOFOLLOW: a symlink planted where the log goes (a shared,
writable audit_log directory, katactl run as root) must not make it append to another file;
nor may a FIFO or device planted there stall katactl or take its lines (only a regular file,
opened without blocking).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import errno
import getpass
import json
import logging
import os
import socket
import stat
import sys
import threading
from typing import Any, Iterator

from katactl.config import state_dir
from katactl.errors import Refused

log = logging.getLogger(__name__)
_configured: str | None = None
_enabled = True


def configure(path: str | None, *, enabled: bool = True) -> None:
    """Make ``path`` the default audit log of this process (None: the default);
    ``enabled=False`` (``--no-audit``) writes nothing and lets mutations go ahead
    without a log."""
    global _configured, _enabled
    _configured = path
    _enabled = enabled


def audit_path(override: str | None = None) -> str:
    p = (override or _configured or os.environ.get("KATACTL_AUDIT_LOG")
         or os.path.join(state_dir(), "audit.log"))
    return os.path.abspath(os.path.expanduser(p))


def require_writable(path: str | None = None, *, dry_run: bool = False) -> None:
    """Refuse (exit 5) a mutation whose audit entry could not be written, before it
    starts: a change nobody can trace afterwards is what the log exists to prevent.
    ``--no-audit`` (configure(enabled=False)) is the explicit way past it; a dry run
    changes nothing and needs no log. Every mutating command calls it before its first
    change, through the same _open record() writes with."""
    if not _enabled or dry_run:
        return
    p = audit_path(path)
    try:
        os.close(_open(p))
    except OSError as e:
        raise Refused(f"cannot write the audit log {p}: {_why(e)}; nothing was changed",
                      hint="fix the log's directory or permissions (audit_log setting, KATACTL_AUDIT_LOG), "
                           "or give --no-audit to change without a record") from None


def record(action: str, target: str, *, node: str = "localhost", params: dict | None = None,
           result: str = "ok", changed: bool | None = None, path: str | None = None, **extra) -> dict:
    """Append one entry; returns it. Never raises for a log problem: a change
    that happened must not be reported as failed because the log is full;
    instead it is logged as a warning (the CLI shows it on stderr)."""
    entry: dict[str, Any] = {
        "time": now_iso(),
        "user": current_user(),
        "host": socket.gethostname(),
        "command": sys.argv[:],
        "node": node,
        "action": action,
        "target": target,
        "params": params or {},
        "result": result,
    }
    if changed is not None:
        entry["changed"] = changed
    entry.update(extra)
    if not _enabled:
        return entry
    p = audit_path(path)
    try:
        fd = _open(p)
        try:
            os.write(fd, (json.dumps(entry, default=str) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot write audit log %s: %s", p, _why(e))
    return entry


def _open(p: str) -> int:
    """The log opened for appending, created 0600 if missing; never through a symlink, and
    only a regular file: O_NONBLOCK so that opening a FIFO with no reader fails (ENXIO) rather
    than waiting for one, then fstat on what was opened (no race with a rename), then back to
    blocking writes."""
    os.makedirs(os.path.dirname(p), mode=0o700, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(e: OSError) -> str:
    if e.errno == errno.ELOOP:  # O_NOFOLLOW's answer for a symlink
        return "it is a symbolic link (refused: give the real file as audit_log)"
    if e.errno in (errno.ENXIO, errno.EINVAL):  # a FIFO without a reader, or any non-regular file
        return "not a regular file (refused: give a regular file as audit_log)"
    return e.strerror or str(e)


def record_unfinished(action: str, target: str, *, node: str, params: dict, exc: BaseException, sent: bool,
                      result: str | None = None, **extra) -> dict:
    """Audit a mutation that ended in ``exc`` before it reported: ``result: "interrupted"``
    for Ctrl-C (SIGTERM and SIGHUP arrive as the same KeyboardInterrupt, katactl.interrupt),
    else ``"error"`` (or the caller's ``result``, e.g. a wait's ``"timeout"``). ``requestSent``
    says whether the change request had gone out: when it had, the change may have landed
    although no answer came (design.md "Safety": every mutating action is audited, and this
    outcome most of all)."""
    from katactl.errors import as_katactl_error

    interrupted = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) == 130
    return record(action, target, node=node, params=params,
                  result=result or ("interrupted" if interrupted else "error"),
                  error="interrupted" if interrupted else as_katactl_error(exc).message, requestSent=sent, **extra)


class Intent:
    """One mutating action's ``requested`` entry, appended at most once, just before its first
    change (:func:`changing`): a change is in the log whatever ends the run, ``kill -9``
    included, and the caller's outcome entry follows it. ``sent`` says whether it was written:
    a run that wrote it writes its outcome even when that is ``changed: false``."""

    def __init__(self, action: str, target: str, *, node: str = "localhost", params: dict | None = None):
        self.action, self.target, self.node, self.params = action, target, node, params or {}
        self.sent = False
        self._lock = threading.Lock()  # a drain's eviction workers may change the node together

    def request(self, **extra) -> None:
        with self._lock:
            if self.sent:
                return
            self.sent = True
        record(self.action, extra.pop("target", self.target), node=self.node, params=self.params,
               result="requested", requestSent=True, **extra)


_intent: contextvars.ContextVar[Intent | None] = contextvars.ContextVar("audit_intent", default=None)


@contextlib.contextmanager
def intent(action: str, target: str, *, node: str = "localhost", params: dict | None = None,
           dry_run: bool = False) -> Iterator[Intent]:
    """The action's Intent for the block, which :func:`changing` reaches from the code that
    makes the change (as deep as a cordon's PATCH or a rename): no ``requested`` entry unless
    the run really changes something, so never for a no-op; never for a dry run either
    (``dry_run``: the Intent is not made current)."""
    it = Intent(action, target, node=node, params=params)
    if dry_run:
        yield it
        return
    token = _intent.set(it)
    try:
        yield it
    finally:
        _intent.reset(token)


def changing(**extra) -> None:
    """Called just before a change (a PATCH, a rename, a signal, a dump request): the current
    :func:`intent`'s ``requested`` entry, with ``extra`` (``target`` replaces its target),
    once. Outside one (a dry run, a library caller with no intent) nothing is written."""
    it = _intent.get()
    if it is not None:
        it.request(**extra)


def now_iso() -> str:
    """Local time with its UTC offset, RFC 3339 (section 5.6: the offset has its colon, as Go's
    time.RFC3339 wants), as audit records, upgrade history, lock owners and rollouts write it.
    Files written before carry ``+0000``: readers parse both (datetime.fromisoformat)."""
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def current_user() -> str:
    """Who runs katactl: the sudo caller if any, else the login name (the uid without a passwd entry)."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in a container (KeyError before 3.13)
        return str(os.getuid())
