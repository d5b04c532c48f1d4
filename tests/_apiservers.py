"""Shared fixture body for the hypervisor API tests (test_clh, test_fc)."""
from __future__ import annotations

from katactl.backends.local import LocalTransport

MIB = 1 << 20


def server_factory(tmp_path, server_cls, client_cls, stem: str):
    """Yield make(**kw) -> (lab server, our client on its real unix socket).

    ``memory`` (bytes, default 1 GiB) and the other keywords go to the server.
    Every server and client made is closed at teardown.
    """
    made = []

    def make(**kw):
        s = server_cls(str(tmp_path / f"{stem}{len(made)}.sock"), kw.pop("memory", 1024 * MIB), **kw)
        c = client_cls(LocalTransport(), s.path, timeout=2)
        made.append((s, c))
        return s, c

    yield make
    for s, c in made:
        c.close()
        s.close()
