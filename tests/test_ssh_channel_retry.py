"""SSHTransport._channel when sshd keeps refusing: a clear UnreachableError, never an AttributeError."""
from __future__ import annotations

import threading

import paramiko
import pytest

from katactl.backends.ssh import SSHTransport
from katactl.errors import UnreachableError


class _FakeParamikoTransport:
    def __init__(self, exc: Exception):
        self.exc = exc
        self.opens = 0

    def open_session(self, **kw):
        self.opens += 1
        raise self.exc

    def is_active(self) -> bool:
        return True


class _FakeConn:
    def __init__(self, exc: Exception):
        self.t = _FakeParamikoTransport(exc)
        self.sessions = threading.BoundedSemaphore(2)


@pytest.mark.parametrize("exc, says", [
    # paramiko reports a refusal under concurrent opens as a bare SSHException (no .text)
    (paramiko.SSHException("Unable to open channel."), "Unable to open channel."),
    (paramiko.ChannelException(1, "Administratively prohibited"), "Administratively prohibited"),
])
def test_refused_channel_until_deadline_is_unreachable(exc, says):
    conn = _FakeConn(exc)
    t = SSHTransport("node1", conn, timeout=0.05)  # type: ignore[arg-type]  # a stand-in connection
    with pytest.raises(UnreachableError, match=f"cannot open an SSH channel: {says}"):
        t._channel()
    assert conn.t.opens > 1  # retried before giving up
    # the session slot was given back
    assert conn.sessions.acquire(blocking=False) and conn.sessions.acquire(blocking=False)
