"""QEMU monitor answers that are valid JSON of the wrong shape, and balloon statistics a guest
did not send (review 8, findings 4 and 6): balloon get/set and vmcore trigger over a scripted QMP
monitor on a real socket (tests/_qmpserver.py), driven by katactl's real client."""
from __future__ import annotations

import contextlib
import os

import pytest

from katactl.lab.shimserver import Response
from tests._audit import audit_entries
from tests._katanode import node
from tests._qmpserver import QmpServer, sequence

SID = "5e1f00001111222233334444555566aa"
DUMP_PATH = "/var/crash/kata"


@contextlib.contextmanager
def qemu_node(script: dict | None = None, *, greeting=None, metrics: bytes | None = None):
    """A QEMU sandbox of 256 MiB whose qmp.sock is a QmpServer; a shim serving ``metrics`` as
    its /metrics when given (else no shim: the guest's usage comes from QEMU's statistics)."""
    with node() as n:
        kw = {}
        if metrics is not None:
            kw["flavour_kw"] = {"extra_routes": {(None, "/metrics"): lambda srv, req: Response(
                200, metrics, "text/plain; version=0.0.4")}}
        p = n.go(SID, serve=metrics is not None, memory_mib=256, guest_memory_dump_path=DUMP_PATH, **kw)
        os.makedirs(p.real(p.vm_dir_node), exist_ok=True)
        srv = QmpServer(p.api_socket, script, greeting=greeting)
        try:
            yield n, srv
        finally:
            srv.close()


def _stats(**over) -> dict:
    st = {"stat-total-memory": 240 << 20, "stat-free-memory": 100 << 20, "stat-available-memory": 150 << 20}
    return {"return": {"stats": {**st, **over}, "last-update": 1700000000}}


GET = ("balloon", "get", SID[:12], "--path", "qmp", "-o", "json")
SET = ("balloon", "set", SID[:12], "--path", "qmp", "--target", "200Mi", "--force", "-o", "json")


# -- wrong shapes are ProtocolErrors naming QMP (finding 4) -------------------------------------
@pytest.mark.parametrize("script,greeting,needle", [
    ({"query-balloon": {"error": "boom"}}, None, "qmp.sock: QMP query-balloon: error is str, not an object"),
    ({"query-balloon": {"error": None}}, None, "QMP query-balloon: error is null, not an object"),
    ({"query-balloon": {"error": ["x"]}}, None, "QMP query-balloon: error is list, not an object"),
    # within the 1 MiB line limit, deeper than json can decode
    ({"query-balloon": b"[" * 200_000 + b"]" * 200_000}, None, "qmp.sock: not QMP (JSON nested too deeply)"),
    ({"qom-get": _stats(**{"stat-total-memory": "lots"})}, None,
     "QMP qom-get guest-stats: stats.stat-total-memory is str 'lots', not an integer"),
    ({"qom-get": _stats(**{"stat-available-memory": 1.5e8})}, None,
     "QMP qom-get guest-stats: stats.stat-available-memory is float 150000000.0, not an integer"),
    ({"qom-get": {"return": {"stats": [], "last-update": 5}}}, None,
     "QMP qom-get guest-stats: stats is list, not an object"),
    ({"qom-get": {"return": {"stats": {}, "last-update": "now"}}}, None,
     "QMP qom-get guest-stats: last-update is str 'now', not an integer"),
    ({"qom-get": {"return": [1]}}, None, "QMP qom-get guest-stats: the answer is list, not an object"),
    ({}, {"QMP": 5}, "QMP greeting: QMP is int, not an object"),
    # an id that cannot key the reply (it crashed with "unexpected TypeError: unhashable type")
    ({"query-balloon": b'{"return": {"actual": 268435456}, "id": [1]}'}, None, "qmp.sock: not QMP (id is list)"),
    ({"query-balloon": b'{"return": {"actual": 268435456}, "id": {"a": 1}}'}, None,
     "qmp.sock: not QMP (id is dict)"),
], ids=["error-str", "error-null", "error-list", "deep-nesting", "stat-str", "stat-float", "stats-list",
        "last-update-str", "answer-list", "greeting", "id-list", "id-object"])
@pytest.mark.parametrize("args", [GET, SET], ids=["get", "set"])
def test_wrong_shape_answers_are_protocol_errors(cli, script, greeting, needle, args):
    """Never katactl's "unexpected <Exception>" internal-bug message (exit 1 all the same):
    a ProtocolError naming the monitor, the command and the field (backends/shape.py)."""
    with qemu_node(script, greeting=greeting) as (n, _):
        r = cli(["--host-root", n.root, *args])
    assert r.exit_code in (1, 7), (r.stdout, r.stderr)
    j = r.json()
    assert "unexpected" not in j["message"] and needle in j["message"], j
    # a greeting that is not QMP: that path cannot be used, which is said as for any other path
    assert j["code"] == ("Unreachable" if greeting else "ProtocolError"), j


# -- a statistic the guest did not send (finding 6) --------------------------------------------
@pytest.mark.parametrize("absent", [2 ** 64 - 1, -1], ids=["uint64", "int64"])
def test_a_statistic_the_guest_did_not_send_is_absent(cli, absent):
    """QEMU keeps -1 in its uint64_t stats[] for each statistic the guest did not send (qemu
    hw/virtio/virtio-balloon.c reset_stats) and visits it as uint64: 18446744073709551615 (older
    QEMUs: -1). A guest without MemAvailable (Linux < 3.14) has no usage figure: not 16 EiB
    available, and `set` says why it cannot check the shrink."""
    with qemu_node({"qom-get": _stats(**{"stat-available-memory": absent, "stat-free-memory": absent})}) as (n, _):
        r = cli(["--host-root", n.root, *GET])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.json()["guest"] == {"totalBytes": 240 << 20, "usedBytes": None, "availableBytes": None,
                                     "freeBytes": None, "source": "qmp"}
        r = cli(["--host-root", n.root, *SET[:-3], "-o", "json"])
    assert r.exit_code == 5, (r.stdout, r.stderr)
    assert "memory usage is unknown (the guest does not report MemAvailable)" in r.json()["message"], r.json()


def test_no_memtotal_is_no_guest_statistics(cli):
    with qemu_node({"qom-get": _stats(**{"stat-total-memory": 2 ** 64 - 1})}) as (n, _):
        r = cli(["--host-root", n.root, *GET])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert r.json()["guest"] is None


# -- a non-finite sample in the shim's metrics (finding 2) --------------------------------------
@pytest.mark.parametrize("value", [b"+Inf", b"-Inf"])  # NaN was skipped already
def test_non_finite_meminfo_falls_back_to_qemus_statistics(cli, value):
    """kata_guest_meminfo's mem_total +Inf (valid Prometheus text) is no figure: balloon takes
    QEMU's statistics instead, as when the shim gives none (it crashed with OverflowError)."""
    body = (b'kata_guest_meminfo{item="mem_total"} %s\nkata_guest_meminfo{item="mem_available"} 1e8\n'
            % value)
    with qemu_node(metrics=body) as (n, _):
        r = cli(["--host-root", n.root, *GET])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        g = r.json()["guest"]
        assert g["source"] == "qmp" and g["totalBytes"] == 240 << 20 and g["availableBytes"] == 150 << 20, g
        r = cli(["--host-root", n.root, *SET])
    assert r.exit_code == 0, (r.stdout, r.stderr)


# -- vmcore trigger (finding 4) -----------------------------------------------------------------
TRIGGER = ("vmcore", "trigger", SID[:12], "--dump-path", DUMP_PATH, "--timeout", "30s", "-o", "json")


@pytest.mark.parametrize("script,needle", [
    ({"query-dump-guest-memory-capability": {"return": ["elf"]}},
     "QMP query-dump-guest-memory-capability: the answer is list, not an object"),
    ({"query-dump-guest-memory-capability": {"return": {"formats": "elf"}}},
     "QMP query-dump-guest-memory-capability: formats is not a list of strings"),
    ({"query-dump": {"return": {"status": 3}}}, "QMP query-dump: status is int, not a string"),
    ({"query-dump": {"error": "busy"}}, "QMP query-dump: error is str, not an object"),
], ids=["caps-list", "formats-str", "status-int", "error-str"])
def test_trigger_wrong_shape_before_the_dump_is_a_protocol_error(cli, script, needle):
    """Before dump-guest-memory is sent: a ProtocolError, nothing left behind, nothing dumped."""
    with qemu_node(script) as (n, srv):
        r = cli(["--host-root", n.root, *TRIGGER])
        assert r.exit_code == 1, (r.stdout, r.stderr)
        j = r.json()
        assert j["code"] == "ProtocolError" and needle in j["message"], j
        assert "dump-guest-memory" not in srv.calls
        assert not os.path.exists(os.path.join(n.root, DUMP_PATH.lstrip("/"), SID))


@pytest.mark.parametrize("answer,needle", [
    ({"return": {"status": "active", "completed": 1, "total": "big"}}, "QMP query-dump: total is str 'big'"),
    ({"return": ["active"]}, "QMP query-dump: the answer is list, not an object"),
    (b"[" * 200_000 + b"]" * 200_000, "not QMP (JSON nested too deeply)"),
    (b'{"return": {"status": "active", "completed": 1, "total": 9}, "id": [1]}', "not QMP (id is list)"),
], ids=["total-str", "answer-list", "deep-nesting", "id-list"])
def test_trigger_wrong_shape_after_the_dump_started_keeps_its_directory(cli, answer, needle):
    """Once QEMU took dump-guest-memory, it writes the dump whatever katactl can read next:
    its directory must stay (the clean-up of a failed trigger removed it under QEMU) and the
    audit log must say a dump was made (changed: true, the path), as for a stopped wait."""
    ok = {"return": {"status": "none", "completed": 0, "total": 0}}
    with qemu_node({"query-dump": sequence(ok, answer)}) as (n, srv):
        r = cli(["--host-root", n.root, *TRIGGER])
        assert r.exit_code == 1, (r.stdout, r.stderr)
        j = r.json()
        assert "dump-guest-memory" in srv.calls
        path = j["details"]["path"]
        assert j["code"] == "ProtocolError" and needle in j["message"], j
        assert f"QEMU goes on writing the dump into {path}" in j["message"], j
        d = os.path.join(n.root, os.path.dirname(path).lstrip("/"))
        assert os.path.isdir(d) and os.path.exists(os.path.join(d, "hypervisor.conf")), d
    requested, e = audit_entries("vmcore.trigger", SID)  # before the dump request, then the outcome
    assert requested["result"] == "requested" and requested["requestSent"] is True, requested
    assert (e["result"], e["changed"], e["dump"], e["requestSent"]) == ("error", True, path, True), e


def test_the_labs_shim_extension_reads_qemus_absent_statistic_as_absent(tmp_path):
    """The lab's shim extension (katactl/lab/daemon.py) answers /ext/v1/balloon's guest figures
    from QEMU's guest-stats as katactl does: a statistic the guest did not send is null there
    too, not 16 EiB."""
    from katactl.backends.local import LocalTransport
    from katactl.backends.qmp import QMPClient
    from katactl.lab.daemon import LabSandbox

    sock = str(tmp_path / "qmp.sock")
    srv = QmpServer(sock, {"qom-get": _stats(**{"stat-available-memory": 2 ** 64 - 1})})
    sb = LabSandbox(None, {"name": "qemu-0", "id": SID})  # type: ignore[arg-type]
    try:
        with QMPClient.connect(LocalTransport(), sock) as q:
            sb.qmp = q
            assert sb._qemu_guest_stats() == {"totalBytes": 240 << 20, "freeBytes": 100 << 20,
                                              "availableBytes": None, "lastUpdate": 1700000000}
    finally:
        srv.close()
