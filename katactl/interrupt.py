"""SIGTERM and SIGHUP as Ctrl-C, for commands that change things and must restore them.

Ansible's timeouts, ``timeout(1)``, systemd and ``kill`` send SIGTERM; a closed terminal or a
dropped SSH session sends SIGHUP. Both end Python at once by default, skipping every
``finally`` and ``except``: a cordoned node stays cordoned, no audit entry is written. Made a
KeyboardInterrupt in the main thread instead, they take Ctrl-C's path (restore, audit, exit 130).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


#: set by SIGINT, SIGTERM or SIGHUP while terminate_as_interrupt is in place. The
#: KeyboardInterrupt a handler raises runs in whatever Python code the main thread is in, and
#: one raised inside a finalizer (a __del__ that garbage collection ran) is swallowed: a long
#: wait made with sleep() still ends.
_stopped = threading.Event()


def sleep(seconds: float) -> None:
    """time.sleep that raises KeyboardInterrupt once an interrupt arrived, even one whose
    own KeyboardInterrupt was lost."""
    if _stopped.wait(seconds):
        raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as SIGINT
    does, and all three set the flag sleep() waits on; the previous handlers come back
    after, and the flag goes down. A signal already ignored (``nohup``: SIGHUP) stays ignored; in other threads
    (in-process test runners) nothing changes."""
    import signal

    _stopped.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        _stopped.set()
        raise KeyboardInterrupt

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                old[sig] = signal.signal(sig, on_signal)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        # the interrupt was this run's: a later sleep() outside any run (a library call, the
        # next in-process command) must not end at once on it
        _stopped.clear()
