"""SIGTERM and SIGHUP as Ctrl-C, for commands that change things and must restore them.

Ansible's timeouts, ``timeout(1)``, systemd and ``kill`` send SIGTERM; a closed terminal or a
dropped SSH session sends SIGHUP. Both end Python at once by default, skipping every
``finally`` and ``except``: a cordoned node stays cordoned, no audit entry is written. Made a
KeyboardInterrupt in the main thread instead, they take Ctrl-C's path (restore, audit, exit 130).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


#: set by SIGINT, SIGTERM or SIGHUP while terminate_as_interrupt is in place. The
#: KeyboardInterrupt a handler raises runs in whatever Python code the main thread is in, and
#: one raised inside a finalizer (a __del__ that garbage collection ran) is swallowed: a long
#: wait made with sleep() still ends. A plain flag, not a threading.Event: the handler runs in
#: the main thread between two bytecodes, and Event.set() there deadlocked when the main thread
#: was inside that Event's own wait() holding its lock (top's live view, 1 in ~50 SIGHUPs).
_stopped = False

#: how often sleep() looks at the flag: the bound on a lost interrupt's delay
_POLL = 0.05

#: the command has completed (katactl.cli._run: Click returned, its result printed and its
#: audit record written): SIGTERM and SIGHUP no longer interrupt it (see terminate_as_interrupt)
_complete = False

#: signals that came while the console entry imported the CLI, before main could report them
_early: list[int] = []


def sleep(seconds: float) -> None:
    """time.sleep that raises KeyboardInterrupt once an interrupt arrived, even one whose
    own KeyboardInterrupt was lost."""
    end = time.monotonic() + seconds
    while not _stopped:
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, _POLL))  # a signal's handler raises through it at once
    raise KeyboardInterrupt


def hold_early() -> None:
    """The console entry's first step (katactl.__main__.run): SIGINT, SIGTERM and SIGHUP are
    noted, not acted on, while Python imports the CLI (about 40 ms of Typer); main's
    terminate_as_interrupt then reports them as the run's interrupt (exit 130, the JSON error)
    where the default action ended the process (shell 143, nothing on stdout)."""
    import signal

    def note(signum, frame):
        _early.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, note)
        except (ValueError, OSError):
            pass


def complete() -> None:
    """The command is over: from now on SIGTERM and SIGHUP leave its outcome alone."""
    global _complete
    _complete = True


@contextlib.contextmanager
def terminate_as_interrupt(keep: bool = False) -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as SIGINT
    does, and all three set the flag sleep() waits on; a signal hold_early noted is raised
    on entry. Once complete() was called, SIGTERM and SIGHUP are ignored: the change is made,
    printed and audited, and 130 (or the default action's 143) would report it as not done;
    Ctrl-C still raises, the user's way out of a cleanup that hangs. The previous handlers
    come back after, unless ``keep`` (katactl.cli.main in a real process): then SIGTERM and
    SIGHUP stay ignored to the process's exit, the tail in which the interpreter flushes and
    ends. The flag goes down. A signal already ignored (``nohup``: SIGHUP) stays ignored; in
    other threads (in-process test runners) nothing changes."""
    import signal

    global _complete, _stopped
    _stopped = False
    _complete = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        global _stopped
        if _complete and signum != signal.SIGINT:
            return
        _stopped = True
        raise KeyboardInterrupt

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                old[sig] = signal.signal(sig, on_signal)
        except (ValueError, OSError):
            pass
    try:
        if _early:
            first = _early[0]
            _early.clear()
            signal.raise_signal(first)  # on_signal raises it here
        yield
    finally:
        _complete = True
        for sig, handler in old.items():
            if not keep:
                signal.signal(sig, handler)
            elif sig != signal.SIGINT:
                # ignored by the kernel, not by on_signal: Python puts the handlers of Python
                # functions back to the default action before it tears its modules down
                # (Py_FinalizeEx: _PySignal_Fini, after flushing stdout), milliseconds in
                # which SIGTERM still ended a completed command with 143; SIG_IGN stays
                signal.signal(sig, signal.SIG_IGN)
        # the interrupt was this run's: a later sleep() outside any run (a library call, the
        # next in-process command) must not end at once on it
        _stopped = False
