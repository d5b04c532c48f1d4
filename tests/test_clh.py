"""Cloud Hypervisor API: our client against the protocol-faithful lab server (real unix socket)."""
from __future__ import annotations

import time

import pytest

from katactl.backends.clh import ClhClient, ClhError
from katactl.backends.local import LocalTransport
from katactl.errors import NotFound, UnreachableError
from katactl.lab.clh_server import ClhServer
from tests._apiservers import server_factory

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
