"""Firecracker API: our client against the protocol-faithful lab server (real unix socket)."""
from __future__ import annotations

import json
import time

import pytest

from katactl.backends.fc import FcClient, FcError
from katactl.backends.local import LocalTransport
from katactl.errors import ProtocolError
from katactl.lab.fc_server import FcServer
from tests._apiservers import server_factory
from tests._microhttp import micro_http

MIB = 1 << 20


@pytest.fixture
def fc(tmp_path):
    yield from server_factory(tmp_path, FcServer, FcClient, "fc")


def test_instance_and_machine_config(fc):
    s, c = fc()
    assert c.instance()["app_name"] == "Firecracker"
    assert c.machine_config()["mem_size_mib"] == 1024


def test_patch_amount_is_balloon_size(fc):
    s, c = fc()
    c.patch_balloon(300)
    assert c.balloon()["amount_mib"] == 300
    deadline = time.monotonic() + 5
    while c.balloon_statistics()["actual_mib"] != 300:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    st = c.balloon_state()
    assert st["memory"] == 1024 * MIB and st["balloonTarget"] == 300 * MIB and st["balloonActual"] == 300 * MIB


def test_errors_are_fault_messages(fc):
    s, c = fc()
    with pytest.raises(FcError) as ei:
        c.patch_balloon(4096)
    assert ei.value.status == 400 and "too large" in ei.value.fault
    r = c._c.request("PATCH", "/balloon", what="t", content=json.dumps({"amount_mib": 1, "bogus": 1}))
    assert r.status_code == 400 and "unknown field" in r.json()["fault_message"]
    r = c._c.request("PUT", "/balloon", what="t", content=json.dumps({"amount_mib": 1, "deflate_on_oom": True}))
    assert r.status_code == 400 and "after starting" in r.json()["fault_message"]
    r = c._c.request("GET", "/nonsense", what="t")
    assert r.status_code == 400 and "Invalid request method and/or path" in r.json()["fault_message"]


def test_no_driver_and_no_stats(fc):
    s, c = fc(stats_interval=0)
    s.guest.driver = False
    with pytest.raises(FcError) as ei:
        c.patch_balloon(10)
    assert "Device not activated yet." in ei.value.fault
    with pytest.raises(FcError):
        c.balloon_statistics()
    st = c.balloon_state()
    assert st["balloonActual"] is None  # unknown without statistics


def test_balloon_not_configured(fc):
    s, c = fc(balloon=False)
    assert c.balloon_state()["hasBalloon"] is False


def test_answers_are_capped(tmp_path):
    """Firecracker's answers are under 1 KiB; one past the 16 MiB limit (declared by
    micro_http's Content-Length) is a ProtocolError (exit 1) naming the limit, its connection
    closed, never the JSON it would take 16 MiB and more to hold."""
    stats = {"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0,
             "swap_in": 0, "swap_out": 0, "major_faults": 0, "minor_faults": 0, "free_memory": 1 << 29,
             "total_memory": 1 << 30, "available_memory": 1 << 29, "disk_caches": 0,
             "hugetlb_allocations": 0, "hugetlb_failures": 0, "padding": " " * (16 << 20)}
    body = json.dumps(stats).encode()
    accepted, srv = micro_http(str(tmp_path / "fc.sock"), "Firecracker API", body)
    with FcClient(LocalTransport(), str(tmp_path / "fc.sock"), timeout=5) as c:
        for _ in range(2):
            with pytest.raises(ProtocolError) as e:
                c.balloon_statistics()
            assert str(e.value) == (f"{tmp_path}/fc.sock GET /balloon/statistics: answered {len(body)} bytes, "
                                    "more than the 16 MiB limit")
            assert e.value.exit_code == 1
    assert len(accepted) == 2
    srv.close()
