"""vmcore end to end on the lab's real QEMU guests (tests/conftest_lab.py).

inject-nmi -> the guest panics (kernel.unknown_nmi_panic=1) -> the lab plays the
Go runtime's handler (katactl.vmcore.runtime_panic_dump) -> vmcore list shows
the dump -> vmcore collect copies it with a verified manifest. vmcore trigger
on healthy guests gives valid ELF cores. Cloud Hypervisor: the lab's
protocol-faithful API server (its vm.coredump writes only an ELF header).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from katactl.backends.qmp import QMPClient
from tests.test_vmcore import sha
from tests.test_vmcore_qemu import read_core

pytestmark = pytest.mark.qemu


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def panicked(lab):
    """The session lab's ``panic`` sandbox, panicked once and dumped by the lab's runtime
    handler. Order-independent: whichever test asks first injects the NMI; later ones
    (and a guest that panicked already) reuse that dump. Nothing else uses ``panic``."""
    sb = lab.sb("panic")
    if sb["status"] == "running" and not sb.get("panic"):
        with QMPClient.connect(lab.transport(), f"/run/vc/vm/{sb['id']}/extra-monitor.sock", timeout=10) as q:
            q.execute("inject-nmi")
    done = _wait(lambda: (lab.sb("panic").get("panic") or {}).get("status") in ("done", "refused", "failed")
                 and lab.sb("panic")["panic"], 120, "the lab's panic dump")
    assert done["status"] == "done", done
    return {"id": sb["id"], "path": done["path"]}


def test_guest_panic_dump_is_what_the_runtime_writes(lab, panicked):
    sid, path = panicked["id"], panicked["path"]
    assert path.startswith(f"/var/crash/kata/{sid}/vmcore-") and path.endswith(".elf")
    # Go's Format("20060102150405.999"): no trailing zeros in the fraction
    whole, dot, frac = os.path.basename(path)[len("vmcore-"):-len(".elf")].partition(".")
    assert len(whole) == 14 and whole.isdigit() and (not dot or (frac.isdigit() and not frac.endswith("0")))
    real = lab.real(path)
    core = read_core(real, machine=(62,))                 # a booted x86-64 guest
    assert core["size"] >= core["end"] and sum(s[5] for s in core["loads"]) >= 256 << 20
    # the runtime's metadata
    d = os.path.dirname(real)
    assert open(os.path.join(d, "hypervisor.version")).read().startswith("QEMU emulator version")
    assert json.load(open(os.path.join(d, "hypervisor.conf")))["MemorySize"] == 256
    assert os.path.isfile(os.path.join(d, "state", sid, "persist.json"))  # EnsureDir(state), then cp -ar


def test_guest_panic_dump_list_collect(cli, lab, panicked, tmp_path):
    path = panicked["path"]
    real = lab.real(path)
    r = cli(lab.args("vmcore", "list", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    [it] = [i for i in r.json()["items"] if i["path"] == path]
    assert it["podRef"] == lab.pod("panic") and it["pod"] == lab.sb("panic")["pod"] and it["status"] == "ok" and it["collected"] is False
    assert it["time"].endswith("Z") and it["time"].replace("-", "").replace(":", "").replace("T", "")[:14] == \
        os.path.basename(path)[len("vmcore-"):][:14]          # the lab node has no /etc/localtime: UTC

    out = tmp_path / "crash"
    r = cli(lab.args("vmcore", "collect", lab.pod("panic"), "--to", str(out), "-o", "json"))
    assert r.exit_code == 0, r.stderr
    [c] = [i for i in r.json()["items"] if i["source"] == path]
    assert c["verified"] is True and c["sha256"] == sha(real)
    dest = os.path.dirname(c["to"])
    p = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=dest, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert os.path.exists(os.path.join(dest, "state", panicked["id"], "persist.json"))
    r = cli(lab.args("vmcore", "list", "-o", "json"))
    assert [i for i in r.json()["items"] if i["path"] == path][0]["collected"] is True
    r = cli(lab.args("vmcore", "collect", lab.pod("panic"), "--to", str(out), "-o", "json"))
    assert r.exit_code == 0 and r.json()["changed"] is False


def test_trigger_healthy_guest_via_shim_extension(cli, lab):
    sid = lab.id("qemu-0")
    r = cli(lab.args("vmcore", "trigger", lab.pod("qemu-0"), "-o", "json"))
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["via"] == "shim-extension" and d["sandbox"] == sid and d["node"] == "localhost"
    core = read_core(lab.real(d["path"]), machine=(62,))
    assert core["loads"] and core["size"] >= core["end"]
    assert sum(s[5] for s in core["loads"]) >= 512 << 20
    ddir = os.path.dirname(lab.real(d["path"]))
    for f in ("hypervisor.conf", "hypervisor.version", f"state/{sid}/persist.json"):
        assert os.path.isfile(os.path.join(ddir, f)), f
    # the guest keeps running after the dump
    with QMPClient.connect(lab.transport(), f"/run/vc/vm/{sid}/extra-monitor.sock", timeout=10) as q:
        assert q.execute("query-status")["status"] == "running"
    # clean up the 512 MiB core
    r = cli(lab.args("vmcore", "rm", d["path"], "--yes"))
    assert r.exit_code == 0, r.stderr


def test_trigger_kdump_via_shim_extension_is_named_like_katactls(cli, lab):
    """The lab's shim extension names a kdump-zlib dump .kdump, as katactl's own trigger does."""
    r = cli(lab.args("vmcore", "trigger", lab.pod("qemu-0"), "--format", "kdump-zlib", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["via"] == "shim-extension" and d["path"].endswith(".kdump"), d
    assert os.path.basename(d["path"]).startswith("vmcore-")
    with open(lab.real(d["path"]), "rb") as f:
        assert f.read(12) in (b"makedumpfile", b"KDUMP   \x01\x00\x00\x00")
    r = cli(lab.args("vmcore", "list", "-o", "json"))
    assert [i["format"] for i in r.json()["items"] if i["path"] == d["path"]] in (["kdump"], ["kdump-flat"])
    assert cli(lab.args("vmcore", "rm", d["path"], "--yes")).exit_code == 0


def test_trigger_without_extension_uses_extra_monitor(cli, lab):
    r = cli(lab.args("vmcore", "trigger", lab.id("qemu-em"), "--format", "kdump-zlib", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["via"] == "qmp:extra-monitor.sock"
    with open(lab.real(d["path"]), "rb") as f:
        assert f.read(12) in (b"makedumpfile", b"KDUMP   \x01\x00\x00\x00")
    cli(lab.args("vmcore", "rm", d["path"], "--yes"))


def test_trigger_held_monitor_is_refused(cli, lab):
    r = cli(lab.args("vmcore", "trigger", lab.id("held")))
    assert r.exit_code == 5 and "held by another client" in r.stderr


def test_a_held_monitor_whose_queue_is_full_is_held_not_unreachable(cli, lab):
    """QEMU's monitor listens with a backlog of one: clients queued behind its holder (closing
    does not dequeue them) fill it, and connect() then fails with EAGAIN. That is the
    monitor being held (exit 5, the same words), not 'Resource temporarily unavailable'."""
    import socket

    d = os.open(lab.real(f"/run/vc/vm/{lab.id('held')}"), os.O_RDONLY | os.O_DIRECTORY)
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(f"/proc/self/fd/{d}/qmp.sock")  # sun_path is too short for the lab's path
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        else:
            pytest.fail("the held monitor's connection queue never filled")
        r = cli(lab.args("vmcore", "trigger", lab.id("held")))
        assert r.exit_code == 5 and "held by another client" in r.stderr, r.stderr
        r = cli(lab.args("balloon", "get", lab.pod("held"), "-o", "json"))
        assert "held by another client" in r.json()["details"]["attempts"][-1]["result"]
    finally:
        for s in fillers:
            s.close()
        os.close(d)


def test_trigger_clh_without_guest_debug(cli, lab):
    r = cli(lab.args("vmcore", "trigger", lab.id("clh-0")))
    assert r.exit_code == 1 and "guest_debug" in r.stderr


def test_trigger_firecracker_has_no_dump_api(cli, lab):
    r = cli(lab.args("vmcore", "trigger", lab.id("fc-0")))
    assert r.exit_code == 1 and "no guest memory dump API" in r.stderr


def _dump_done(lab, sid: str) -> bool:
    with QMPClient.connect(lab.transport(), f"/run/vc/vm/{sid}/extra-monitor.sock", timeout=10) as q:
        return q.execute("query-dump")["status"] == "completed" and q.execute("query-status")["running"]


def test_trigger_stopped_waiting_says_where_qemu_goes_on_dumping(cli, lab, _isolated_home):
    """Review 7 #2: a trigger stopped by --timeout (or Ctrl-C, SIGTERM) once QEMU had started
    the dump was audited changed:false with no dump, and the error named no file, while QEMU
    went on writing it with the guest paused (dump/dump.c dump_init: vm_stop; dump_cleanup:
    vm_start; qapi/dump.json has no cancel). A booted lab guest (running: QEMU pauses it)."""
    from katactl import vmcore
    from katactl.errors import Interrupted
    from tests.test_vmcore import _audit_entries

    sid = lab.id("qemu-em")
    r = cli(lab.args("vmcore", "trigger", sid, "--timeout", "1ms", "-o", "json"))
    assert r.exit_code == 6, (r.stdout, r.stderr)
    err = r.json()
    path = err["details"]["path"]
    assert err["code"] == "Timeout" and err["details"]["acknowledged"] is True
    assert f"QEMU goes on writing the dump into {path}; the guest stays paused until it is finished" in err["message"]
    _wait(lambda: _dump_done(lab, sid), 300, "QEMU to finish the dump and resume the guest")
    r = cli(lab.args("vmcore", "list", "-o", "json"))
    assert [i["status"] for i in r.json()["items"] if i["path"] == path] == ["ok"]

    # Ctrl-C (SIGTERM arrives as the same KeyboardInterrupt) while the trigger waits for the dump
    def ctrl_c(done, total):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as ei:
        vmcore.trigger(lab.transport(), sid, vmcore.TriggerOptions(progress=ctrl_c))
    e = ei.value
    path2 = e.details["path"]
    assert e.exit_code == 130 and path2 != path and f"into {path2}; the guest stays paused" in e.message
    _wait(lambda: _dump_done(lab, sid), 300, "QEMU to finish the second dump")
    audits = [a for a in _audit_entries(_isolated_home) if a["action"] == "vmcore.trigger"]
    assert [a["result"] for a in audits[::2]] == ["requested", "requested"]  # each before its request
    audits = audits[1::2]
    assert [(a["result"], a["changed"], a["dump"], a["requestSent"]) for a in audits] == [
        ("timeout", True, path, True), ("interrupted", True, path2, True)]
    for p in (path, path2):
        assert cli(lab.args("vmcore", "rm", p, "--yes")).exit_code == 0
