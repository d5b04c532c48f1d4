"""One lab for the whole test session (a pytest plugin loaded by tests/conftest.py).

``lab`` boots a single lab node with real QEMU guests and protocol-faithful
Cloud Hypervisor / Firecracker servers, shared by every integration test that
needs a guest. Sandboxes (by name; ``lab.sb(name)`` gives the state entry,
``lab.id(name)`` the sandbox id, ``lab.pod(name)`` the NAMESPACE/POD ref):

- ``qemu-0``: booted guest, balloon, shim extension, extra-monitor.sock (QMP),
  ``debug-threads=on`` (named vCPU threads, as Kata's enable_debug gives)
- ``qemu-em``: booted guest, balloon, *no* shim extension, extra-monitor.sock; like every
  other QEMU here, no debug-threads (Kata's default): unnamed vCPU threads
- ``panic``: booted guest (256 MiB) reserved for the vmcore tests' guest panic; the
  first test to ``inject-nmi`` it consumes it (check ``lab.sb("panic")["status"]``)
- ``panic-lab``: booted guest (192 MiB) for test_lab's panic-handler test
- ``clh-0``, ``fc-0``: Cloud Hypervisor / Firecracker API servers (simulated guests)
- ``nob``: QEMU without guest (-S) and without a balloon device
- ``free``: QEMU without guest, balloon, nobody holds qmp.sock, no extension/extra monitor
- ``held``: QEMU without guest, balloon, qmp.sock held, no extension/extra monitor
- ``doomed``: QEMU without guest, balloon, extension: for "VM exits" tests (kill it)

The kernel is cached across sessions in ``$KATACTL_TEST_CACHE`` (default
``/tmp/katactl-test-cache``). Skipped only when qemu-system-x86_64 is missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import pytest

LAB_SPECS = [
    {"name": "qemu-0", "hypervisor": "qemu", "memory_mib": 512, "pod": "qemu-0", "namespace": "lab",
     "debug_threads": True},
    {"name": "qemu-em", "hypervisor": "qemu", "memory_mib": 512, "pod": "qemu-em", "namespace": "lab",
     "extension": False},
    {"name": "panic", "hypervisor": "qemu", "memory_mib": 256, "pod": "panic", "namespace": "lab"},
    {"name": "panic-lab", "hypervisor": "qemu", "memory_mib": 192, "pod": "panic-lab", "namespace": "lab"},
    {"name": "clh-0", "hypervisor": "clh", "memory_mib": 1024, "pod": "clh-0", "namespace": "lab"},
    {"name": "fc-0", "hypervisor": "fc", "memory_mib": 1024, "pod": "fc-0", "namespace": "lab"},
    {"name": "nob", "hypervisor": "qemu", "memory_mib": 256, "pod": "nob", "namespace": "lab",
     "guest": False, "balloon": False},
    {"name": "free", "hypervisor": "qemu", "memory_mib": 256, "pod": "free", "namespace": "lab",
     "guest": False, "hold_qmp": False, "extra_monitor": False, "extension": False},
    {"name": "held", "hypervisor": "qemu", "memory_mib": 256, "pod": "held", "namespace": "lab",
     "guest": False, "extra_monitor": False, "extension": False},
    {"name": "doomed", "hypervisor": "qemu", "memory_mib": 256, "pod": "doomed", "namespace": "lab",
     "guest": False},
]


class LabHandle:
    def __init__(self, root: str, state: dict):
        self.root = root
        self.state = state

    def refresh(self) -> dict:
        with open(os.path.join(self.root, ".katactl-lab", "state.json")) as f:
            self.state = json.load(f)
        return self.state

    def sb(self, name: str) -> dict:
        for s in self.refresh()["sandboxes"]:
            if s["name"] == name:
                return s
        raise KeyError(name)

    def id(self, name: str) -> str:
        return self.sb(name)["id"]

    def pod(self, name: str) -> str:
        return self.sb(name)["podRef"]

    def real(self, node_path: str) -> str:
        return os.path.join(self.root, node_path.lstrip("/"))

    def transport(self):
        from katactl.backends.local import LocalTransport

        return LocalTransport(host_root=self.root)

    def args(self, *a) -> list[str]:
        """CLI args with --host-root pointing at the lab."""
        return ["--host-root", self.root, *a]


@contextlib.contextmanager
def _audit_to(path: str):
    """control.up/down audit themselves: the session lab (set up outside any test's
    isolated home) writes to a log of its own, never the developer's."""
    from katactl import audit

    saved = audit._configured
    audit.configure(path)
    try:
        yield
    finally:
        audit.configure(saved)


@pytest.fixture(scope="session")
def lab():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    from katactl.lab import control

    cache = os.environ.get("KATACTL_TEST_CACHE") or "/tmp/katactl-test-cache"
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = cache
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")
    os.rmdir(root)  # the lab creates its own directory
    audit_log = tempfile.mkdtemp(prefix="katactl-lab-audit-") + "/audit.log"
    try:
        with _audit_to(audit_log):
            st = control.up(root, specs=[dict(s) for s in LAB_SPECS], timeout=300, die_with_parent=True)
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old
    handle = LabHandle(root, st)
    yield handle
    pids = [s.get("qemuPid") for s in handle.refresh()["sandboxes"] if s.get("qemuPid")] + [st["pid"]]
    with _audit_to(audit_log):
        control.down(root)
    shutil.rmtree(os.path.dirname(audit_log), ignore_errors=True)
    leftovers = [p for p in pids if control._alive(p)]
    assert not leftovers, f"lab down left processes behind: {leftovers}"
    assert not os.path.exists(root), f"lab down left {root} behind"
