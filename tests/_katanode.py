"""Test ground for issue 3: short-rooted node trees (unix socket paths must fit
in 108 bytes) with live lab shim servers. Imported by tests/test_sandbox*.py,
test_shim*.py, test_metrics*.py, test_top*.py."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from katactl.lab import layout
from katactl.lab.shimserver import ShimServer, ShimState


class Node:
    """A node root under /tmp with a /proc symlink (so PID liveness is real)."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="kn", dir="/tmp")
        os.symlink("/proc", os.path.join(self.root, "proc"))
        self.servers: list[ShimServer] = []
        self.paths: dict[str, layout.SandboxPaths] = {}

    def go(self, sid, *, serve=True, flavour_kw=None, **kw):
        kw.setdefault("pid", os.getpid())
        p = layout.write_go_sandbox(self.root, sid, **kw)
        self.paths[sid] = p
        if serve:
            self.serve(p, "go", **(flavour_kw or {}))
        return p

    def rs(self, sid, *, serve=True, flavour_kw=None, **kw):
        kw.setdefault("pid", os.getpid())
        p = layout.write_rs_sandbox(self.root, sid, **kw)
        self.paths[sid] = p
        if serve:
            # runtime-rs's /metrics depends on the hypervisor (see katactl.lab.shimserver)
            self.serve(p, "rs", **(flavour_kw or {})).state.hypervisor = layout.hv_key(kw.get("hypervisor", "dragonball"))
        return p

    def serve(self, p, flavour, **kw) -> ShimServer:
        kw.setdefault("state", ShimState(sandbox_id=p.sandbox_id))
        s = ShimServer(p.shim_socket, flavour=flavour, **kw).start()
        self.servers.append(s)
        return s

    def server(self, sid) -> ShimServer:
        for s in self.servers:
            if s.state.sandbox_id == sid:
                return s
        raise KeyError(sid)

    def close(self):
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def node():
    n = Node()
    try:
        yield n
    finally:
        n.close()
