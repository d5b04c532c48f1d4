"""Cloud Hypervisor API: our client against the protocol-faithful lab server (real unix socket)."""
from __future__ import annotations

import json
import time

import pytest

from katactl.backends.clh import ClhClient, ClhError
from katactl.backends.local import LocalTransport
from katactl.errors import NotFound, ProtocolError, UnreachableError
from katactl.lab.clh_server import ClhServer
from tests._apiservers import server_factory
from tests._microhttp import micro_http

MIB = 1 << 20


@pytest.fixture
def clh(tmp_path):
    yield from server_factory(tmp_path, ClhServer, ClhClient, "clh")


def test_ping_and_info(clh):
    s, c = clh()
    p = c.ping()
    assert p["version"].startswith("48") and "features" in p and p["pid"] > 0
    info = c.info()
    assert info["state"] == "Running" and info["config"]["memory"]["size"] == 1024 * MIB
    assert info["memory_actual_size"] == 1024 * MIB


def test_desired_balloon_is_the_balloon_size(clh):
    s, c = clh()
    c.resize(desired_balloon=256 * MIB)
    deadline = time.monotonic() + 5
    while c.info()["memory_actual_size"] != 768 * MIB:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    st = c.balloon_state()
    assert st == {"memory": 1024 * MIB, "hasBalloon": True, "balloonTarget": 256 * MIB,
                  "balloonActual": 256 * MIB, "state": "Running"}


@pytest.mark.parametrize("version,status,json_body", [(40, 500, False), (48, 500, True), (53, 400, True)])
def test_error_status_and_body_by_version(clh, version, status, json_body):
    s, c = clh(balloon=False, version=version)
    with pytest.raises(ClhError) as ei:
        c.resize(desired_balloon=MIB)
    assert ei.value.status == status
    assert any("balloon" in m.lower() for m in ei.value.messages)


def test_balloon_larger_than_memory(clh):
    s, c = clh()
    with pytest.raises(ClhError) as ei:
        c.resize(desired_balloon=2048 * MIB)
    assert "exceeds" in str(ei.value)


def test_unknown_endpoint_and_coredump_without_guest_debug(clh, tmp_path):
    s, c = clh()
    with pytest.raises(NotFound):
        c._call("GET", "vm.nonsense")
    with pytest.raises(NotFound):
        c.coredump(str(tmp_path / "core"))
    s2, c2 = clh(features=("kvm", "guest_debug"))
    c2.coredump(str(tmp_path / "core"))
    assert (tmp_path / "core").read_bytes()[:4] == b"\x7fELF"
    with pytest.raises(ClhError):  # refuses an existing file
        c2.coredump(str(tmp_path / "core"))


def test_wrong_method_is_400(clh):
    s, c = clh()
    r = c._c.request("GET", "/api/v1/vm.resize", what="t")
    assert r.status_code == 400


def test_no_server():
    with pytest.raises(UnreachableError):
        ClhClient(LocalTransport(), "/nonexistent/clh-api.sock", timeout=1).ping()


def _vm_info(devices: int) -> bytes:
    """vm.info (vmm/src/api/mod.rs VmInfoResponse) of a VM with ``devices`` PCI devices in its
    device_tree (vmm/src/device_tree.rs DeviceNode: id, resources, parent, children, pci_bdf)."""
    tree = {f"_disk{i}": {"id": f"_disk{i}", "resources": [{"PciBar": {"index": 0, "base": 2 ** 40 + i * 4096,
                                                                       "size": 524288, "type_": "Mmio64",
                                                                       "prefetchable": False}}],
                          "parent": "_pci0", "children": [], "pci_bdf": f"0000:00:{i % 32:02x}.0"}
            for i in range(devices)}
    return json.dumps({"config": {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 1 << 30}},
                       "state": "Running", "memory_actual_size": 1 << 30, "device_tree": tree}).encode()


def test_answers_are_capped(tmp_path):
    """An answer past the 16 MiB limit (JsonUnixClient.answer_limit, declared by Content-Length) is a
    ProtocolError (exit 1) naming it, read no further, and its connection is closed;
    a vm.info of 6,000 devices (~1.3 MiB, beyond any real VM) is well within it."""
    big = _vm_info(6000)
    assert 1 << 20 < len(big) < (16 << 20) >> 3
    _, srv = micro_http(str(tmp_path / "big.sock"), "Cloud Hypervisor API", big)
    with ClhClient(LocalTransport(), str(tmp_path / "big.sock"), timeout=5) as c:
        assert len(c.info()["device_tree"]) == 6000
    srv.close()

    huge = _vm_info(80_000)
    assert len(huge) > 16 << 20
    accepted, srv = micro_http(str(tmp_path / "huge.sock"), "Cloud Hypervisor API", huge)
    with ClhClient(LocalTransport(), str(tmp_path / "huge.sock"), timeout=5) as c:
        for _ in range(2):
            with pytest.raises(ProtocolError) as e:
                c.info()
            assert str(e.value) == (f"{tmp_path}/huge.sock GET vm.info: answered {len(huge)} bytes, "
                                    "more than the 16 MiB limit")
            assert e.value.exit_code == 1
    assert len(accepted) == 2  # a cut answer's connection is never reused
    srv.close()
