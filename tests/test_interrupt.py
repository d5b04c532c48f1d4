"""katactl.interrupt in-process: the flag sleep() waits on belongs to one run."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from katactl import interrupt


def test_an_interrupt_does_not_outlive_its_run():
    """After one run got SIGTERM, every later interrupt.sleep in the process (metrics.top_snapshot's
    wait, a library call, the next in-process command) raised KeyboardInterrupt at once."""
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(60)  # the handler raises here
    assert signal.getsignal(signal.SIGTERM) == before
    try:
        interrupt.sleep(0.01)  # no signal since: it sleeps
    except KeyboardInterrupt:  # (uncaught, it would end the whole pytest session)
        pytest.fail("interrupt.sleep raised on the previous run's interrupt")
