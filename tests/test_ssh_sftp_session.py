"""_Conn hands out its SFTP session and that session's pipe together, under its lock."""
from __future__ import annotations

import threading
import types

from katactl.backends import ssh


class _FakeSFTP:
    def __init__(self):
        self.sock = types.SimpleNamespace(closed=False, settimeout=lambda t: None)

    def close(self) -> None:
        self.sock.closed = True


class _ResetAfterFirstRelease:
    """conn.lock, but the first time it is released another thread runs reset_sftp()
    (as a failing SFTP call on the same connection does) before the releaser goes on."""

    def __init__(self, conn: ssh._Conn):
        self.conn, self.inner, self.armed = conn, threading.Lock(), True

    def __enter__(self):
        self.inner.acquire()
        return self

    def __exit__(self, *exc):
        self.inner.release()
        if self.armed:
            self.armed = False
            t = threading.Thread(target=self.conn.reset_sftp)
            t.start()
            t.join()
        return False


def test_pipe_survives_a_reset_right_after_the_session_opens(monkeypatch):
    # pipe() used to open the session under the lock, then read _pipe after releasing it:
    # a reset_sftp() in between made it return None (an AttributeError in the caller)
    monkeypatch.setattr(ssh, "_open_sftp", lambda t, timeout: _FakeSFTP())
    conn = ssh._Conn(object(), "node1")
    conn.lock = _ResetAfterFirstRelease(conn)  # type: ignore[assignment]  # a lock that interleaves
    pipe = conn.pipe()
    assert isinstance(pipe, ssh._Pipe) and isinstance(pipe.sftp, _FakeSFTP)
    assert conn._pipe is None  # the reset did run, after pipe() had both
