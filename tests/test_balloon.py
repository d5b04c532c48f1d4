"""balloon get/set on the session lab: real QEMU guests, CLH/FC API servers, every path."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from katactl.backends.qmp import QMPClient

from tests._audit import audit_entries

MIB = 1 << 20
TOL = 4 * MIB


def outcomes(target: str | None = None) -> list[dict]:
    """balloon.set's outcome entries; each follows the "requested" one written before the
    request was sent (review 6, finding 2)."""
    es = audit_entries("balloon.set", target)
    assert [e["result"] == "requested" for e in es] == [True, False] * (len(es) // 2), es
    assert all(e["requestSent"] is True for e in es[::2])
    return es[1::2]


def query_balloon(lab, name: str) -> int:
    """Ground truth from QEMU itself, over the sandbox's extra monitor."""
    sid = lab.id(name)
    with QMPClient.connect(lab.transport(), f"/run/vc/vm/{sid}/extra-monitor.sock") as q:
        return int(q.execute("query-balloon")["actual"])


def test_get_qemu_extension(lab, cli):
    r = cli(lab.args("balloon", "get", lab.pod("qemu-0"), "-o", "json"))
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["kind"] == "Balloon" and j["path"] == "extension" and j["hypervisor"] == "qemu"
    assert j["memoryBytes"] == 512 * MIB
    assert j["actualBytes"] == query_balloon(lab, "qemu-0")
    g = j["guest"]
    assert g is not None and 0 < g["totalBytes"] <= 512 * MIB and g["availableBytes"] > 0


def test_set_target_wait_then_idempotent_then_release(lab, cli):
    pod = lab.pod("qemu-0")
    r = cli(lab.args("balloon", "set", pod, "--target", "256Mi", "--wait", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["changed"] is True and j["dryRun"] is False and j["converged"] is True
    assert query_balloon(lab, "qemu-0") <= 256 * MIB + TOL
    # again: already there
    r = cli(lab.args("balloon", "set", pod, "--target", "256Mi", "--wait", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is False
    # the audit log has the change (and only one balloon.set for the two runs)
    sets = outcomes()
    assert len(sets) == 1 and sets[0]["params"]["targetBytes"] == 256 * MIB and sets[0]["target"] == lab.id("qemu-0")
    # release gives everything back
    r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert query_balloon(lab, "qemu-0") >= 512 * MIB - TOL


def test_reclaim_and_plain_output(lab, cli):
    pod = lab.pod("qemu-0")
    r = cli(lab.args("balloon", "set", pod, "--reclaim", "100Mi", "--wait"))
    assert r.exit_code == 0, r.stderr
    assert "changed: true" in r.stdout and "path: extension" in r.stdout
    assert abs(query_balloon(lab, "qemu-0") - 412 * MIB) <= TOL
    r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "-o", "json"))
    assert r.exit_code == 0


def test_extra_monitor_path_when_no_extension(lab, cli):
    pod = lab.pod("qemu-em")
    r = cli(lab.args("balloon", "set", pod, "--target", "300Mi", "--wait", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["path"] == "extra-monitor"
    assert j["attempts"][0]["path"] == "extension" and "404" in j["attempts"][0]["result"]
    assert abs(query_balloon(lab, "qemu-em") - 300 * MIB) <= TOL
    r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "-o", "json"))
    assert r.exit_code == 0


def test_dry_run_changes_nothing(lab, cli):
    before = query_balloon(lab, "qemu-0")
    r = cli(lab.args("balloon", "set", lab.pod("qemu-0"), "--target", "200Mi", "--dry-run", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["dryRun"] is True and j["changed"] is True and j["requestedTargetBytes"] == 200 * MIB
    time.sleep(0.3)
    assert query_balloon(lab, "qemu-0") == before


def test_no_balloon_device(lab, cli):
    r = cli(lab.args("balloon", "set", lab.pod("nob"), "--target", "128Mi", "-o", "json"))
    assert r.exit_code == 1
    j = r.json()
    assert j["code"] == "NoBalloon" and "no balloon device" in j["message"]
    assert "reclaim_guest_freed_memory" in j["hint"]
    assert j["changed"] is False  # a failed mutation says so (review 11, item 3)


def test_qmp_sock_held_is_busy(lab, cli):
    r = cli(lab.args("balloon", "get", lab.pod("qemu-0"), "--path", "qmp"))
    assert r.exit_code == 7
    assert "held by another client" in r.stderr


def test_free_qmp_sock_is_used(lab, cli):
    r = cli(lab.args("balloon", "get", lab.pod("free"), "-o", "json"))
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["path"] == "qmp" and j["memoryBytes"] == 256 * MIB
    assert [a["path"] for a in j["attempts"]] == ["extension", "hypervisor-api", "extra-monitor"]


def test_exact_explanation_when_no_path(lab, cli):
    r = cli(lab.args("balloon", "get", lab.pod("held"), "-o", "json"))
    assert r.exit_code == 7
    j = r.json()
    attempts = j["details"]["attempts"]
    assert [a["path"] for a in attempts] == ["extension", "hypervisor-api", "extra-monitor", "qmp"]
    assert "held by another client" in attempts[-1]["result"]
    assert "extra_monitor_socket" in j["hint"] and "shim-extension" in j["hint"]


def test_wait_timeout_exit_6(lab, cli):
    # no guest driver: QEMU keeps the request pending, actual never moves
    r = cli(lab.args("balloon", "set", lab.pod("free"), "--target", "200Mi", "--wait", "--timeout", "1s",
                     "-o", "json"))
    assert r.exit_code == 6, r.stderr
    j = r.json()
    assert j["code"] == "Timeout"
    # the target was sent: the failure says the run changed the VM (review 11, item 3; the
    # README's Ansible changed_when reads it)
    assert j["changed"] is True and j["details"]["changed"] is True and j["details"]["requestSent"] is True, j
    # the audit entry tells the run's outcome, not "ok" for a target set (issue 16, 18)
    e = audit_entries("balloon.set")[-1]
    assert e["result"] == "timeout" and e["changed"] is True and "not reached" in e["error"]
    assert len([x for x in outcomes() if x["params"].get("targetBytes") == 200 << 20]) == 1


@pytest.mark.parametrize("hv", ["clh-0", "fc-0"])
@pytest.mark.parametrize("via", ["extension", "hypervisor-api"])
def test_clh_fc_target_conversion(lab, cli, hv, via):
    pod = lab.pod(hv)
    r = cli(lab.args("balloon", "set", pod, "--target", "700Mi", "--wait", "--path", via, "-o", "json"))
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["path"] == via and j["memoryBytes"] == 1024 * MIB
    assert abs(j["actualBytes"] - 700 * MIB) <= TOL
    # the hypervisor's own number is the balloon size: memory - target
    sb = lab.sb(hv)
    t = lab.transport()
    if hv == "clh-0":
        from katactl.backends.clh import ClhClient

        with ClhClient(t, sb["apiSocket"]) as c:
            assert c.info()["config"]["balloon"]["size"] == 324 * MIB
    else:
        from katactl.backends.fc import FcClient

        with FcClient(t, sb["apiSocket"]) as c:
            assert c.balloon()["amount_mib"] == 324
    r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "--path", via, "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert abs(r.json()["actualBytes"] - 1024 * MIB) <= TOL


@pytest.mark.parametrize("args,code,needle", [
    (["--target", "0"], 2, "greater than zero"),
    (["--target", "-1G"], 2, "negative"),
    (["--target", "10Zi"], 2, "unknown unit"),
    (["--target", "1Gi", "--reclaim", "100Mi"], 2, "exactly one"),
    ([], 2, "exactly one"),
    (["--release", "--reclaim", "1Mi"], 2, "exactly one"),
    (["--target", "abc"], 2, "invalid --target"),
    (["--target", "1Gi", "--path", "telepathy"], 2, "--path"),
    (["--target", "1Gi", "--timeout", "soon", "--wait"], 2, "--timeout"),
    (["--target", "1Gi", "--tolerance", "-3"], 2, "--tolerance"),
    (["--target", "1Ti"], 5, "above the VM's memory"),
    (["--target", "16Mi"], 5, "below the guest's used memory"),
])
def test_bad_input_corpus(lab, cli, args, code, needle):
    before = query_balloon(lab, "qemu-0")
    r = cli(lab.args("balloon", "set", lab.pod("qemu-0"), *args))
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert query_balloon(lab, "qemu-0") == before


@pytest.mark.parametrize("ref,code", [("lab/no-such-pod", 3), ("ffffffffffff", 3), ("../etc", 2)])
def test_unknown_sandbox(lab, cli, ref, code):
    r = cli(lab.args("balloon", "set", ref, "--target", "256Mi", "-o", "json"))
    assert r.exit_code == code, r.stderr
    assert r.json()["kind"] == "Error"


def test_vm_exits_mid_wait(lab):
    sb = lab.sb("doomed")
    # --force: a guest that never booted has no statistics, so shrinking it needs --force
    p = subprocess.Popen([sys.executable, "-m", "katactl", *lab.args(
        "balloon", "set", sb["podRef"], "--target", "200Mi", "--force", "--wait", "--timeout", "60s", "-o", "jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # kill QEMU once the wait has started (the balloon is pending: no guest driver); the first
    # progress event says so (the audit entry is written with the final outcome, at the end)
    first = p.stdout.readline()
    if not first or json.loads(first)["kind"] != "BalloonProgress":
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"the wait never started: {first} {out} {err}")
    os.kill(sb["qemuPid"], signal.SIGKILL)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, (out, err)
    j = json.loads(out.splitlines()[-1])
    assert j["code"] == "VMGone" and "went away" in j["message"]


# -- --force and the safety checks, on Cloud Hypervisor (simulated guest) -------------------
def clh_view(lab, name: str = "clh-0") -> dict:
    """Cloud Hypervisor's own view: the balloon size it was asked for and the memory the guest has."""
    from katactl.backends.clh import ClhClient

    with ClhClient(lab.transport(), lab.sb(name)["apiSocket"]) as c:
        info = c.info()
    return {"balloon": info["config"]["balloon"]["size"], "guest": info["memory_actual_size"]}


def test_force_below_used_plus_margin(lab, cli):
    pod, sid = lab.pod("clh-0"), lab.id("clh-0")
    r = cli(lab.args("balloon", "get", pod, "-o", "json"))
    assert r.exit_code == 0, r.stderr
    used = r.json()["guest"]["usedBytes"]
    # the premise: 128Mi is below what the guest uses plus the default margin (64Mi)
    assert used is not None and 128 * MIB < used + 64 * MIB
    before = clh_view(lab)
    try:
        r = cli(lab.args("balloon", "set", pod, "--target", "128Mi", "--wait", "-o", "json"))
        assert r.exit_code == 5, (r.stdout, r.stderr)
        j = r.json()
        assert j["code"] == "Refused" and "below the guest's used memory" in j["message"] and "--force" in j["hint"]
        assert clh_view(lab) == before
        assert audit_entries("balloon.set", sid) == []

        r = cli(lab.args("balloon", "set", pod, "--target", "128Mi", "--force", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        j = r.json()
        assert j["changed"] is True and j["converged"] is True and j["requestedTargetBytes"] == 128 * MIB
        # Cloud Hypervisor is asked for the balloon size (1Gi - 128Mi) and the guest got there
        assert clh_view(lab) == {"balloon": 896 * MIB, "guest": 128 * MIB}
        entries = outcomes(sid)
        assert len(entries) == 1, entries
        e = entries[0]
        assert e["changed"] is True and e["result"] == "ok"
        assert e["params"]["targetBytes"] == 128 * MIB and e["params"]["force"] is True
    finally:
        r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert clh_view(lab) == {"balloon": 0, "guest": 1024 * MIB}


def test_wait_progress_on_a_terminal_only(lab, katactl_bin):
    """`balloon set --wait` shows a progress bar on a terminal's stderr (stdout piped stays
    pure JSON); with stderr piped it shows nothing."""
    from tests._pty import run_stderr_on_pty

    pod, sid = lab.pod("clh-0"), lab.id("clh-0")
    bar = f"balloon {sid[:12]}"
    try:
        code, out, screen = run_stderr_on_pty([sys.executable, "-m", "katactl", *lab.args(
            "balloon", "set", pod, "--target", "512Mi", "--wait", "-o", "json")])
        assert code == 0, (out, screen)
        assert bar in screen, screen
        j = json.loads(out)
        assert j["changed"] is True and j["converged"] is True and "\x1b" not in out
        assert clh_view(lab) == {"balloon": 512 * MIB, "guest": 512 * MIB}

        r = katactl_bin(lab.args("balloon", "set", pod, "--target", "600Mi", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
        assert r.json()["changed"] is True and clh_view(lab)["guest"] == 600 * MIB
        assert r.stderr == ""
    finally:
        r = katactl_bin(lab.args("balloon", "set", pod, "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert clh_view(lab) == {"balloon": 0, "guest": 1024 * MIB}


# -- Firecracker: amount_mib is whole MiB of balloon (review 5, finding 2) ---------------------
def fc_amount_mib(lab, name: str = "fc-0") -> int:
    """Firecracker's own number: the balloon size it was asked for, in whole MiB."""
    from katactl.backends.fc import FcClient

    with FcClient(lab.transport(), lab.sb(name)["apiSocket"]) as c:
        return c.balloon()["amount_mib"]


@pytest.mark.parametrize("via", ["hypervisor-api", "extension"])
def test_fc_target_not_whole_mib_is_idempotent_and_converges(lab, cli, via):
    """A target that is not a whole MiB is compared and waited on as the target Firecracker
    really gets (the request rounded down to whole MiB of guest memory): the first run
    converges even with --tolerance 0, a re-run is changed:false and writes no audit entry.
    Through the shim extension too, whose targetBytes is the un-rounded request
    (docs/shim-extension.md; review 5 diffA, finding 3)."""
    pod, sid = lab.pod("fc-0"), lab.id("fc-0")
    want = 300_000_000
    eff = 1024 * MIB - 738 * MIB  # ceil((1Gi - want) / MiB) = 738 MiB of balloon
    # Firecracker reports the balloon it has; the extension the last target requested
    recorded = eff if via == "hypervisor-api" else want
    base = ("balloon", "set", pod, "--target", str(want), "--path", via, "--wait", "--timeout", "10s")
    try:
        r = cli(lab.args(*base, "--dry-run", "-o", "json"))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        assert j["changed"] is True and j["requestedTargetBytes"] == want and j["effectiveTargetBytes"] == eff

        r = cli(lab.args(*base, "--tolerance", "0", "-o", "json"))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        assert j["changed"] is True and j["converged"] is True
        assert j["requestedTargetBytes"] == want and j["effectiveTargetBytes"] == eff
        assert j["path"] == via and j["targetBytes"] == recorded and j["actualBytes"] == eff
        assert any("not the requested 300000000 bytes" in w for w in j["warnings"]), j["warnings"]
        assert fc_amount_mib(lab) == 738

        for tol in ("64Ki", "0"):  # again: nothing to do, whatever the tolerance
            r = cli(lab.args(*base, "--tolerance", tol, "-o", "json"))
            assert r.exit_code == 0, (r.stdout, r.stderr)
            j = r.json()
            assert j["changed"] is False and j["converged"] is True and j["effectiveTargetBytes"] == eff
            assert j["targetBytes"] == recorded
        entries = outcomes(sid)
        assert len(entries) == 1, entries
        assert entries[0]["params"]["targetBytes"] == want and entries[0]["params"]["effectiveTargetBytes"] == eff
    finally:
        r = cli(lab.args("balloon", "set", pod, "--release", "--path", via, "--wait", "--tolerance", "0", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert fc_amount_mib(lab) == 0


# -- virtio-balloon: 4 KiB pages (review 5 diffA, unverified suspicion 2) --------------------------
@pytest.mark.parametrize("via", ["extension", "extra-monitor"])
def test_qemu_target_not_whole_page_is_idempotent_and_converges(lab, cli, via):
    """QEMU asks the guest for whole 4 KiB pages of balloon, rounded down (qemu
    hw/virtio/virtio-balloon.c virtio_balloon_to_target): a target that is not a whole page
    converges, with --tolerance 0, to the page-rounded target query-balloon then reports, and
    a re-run is changed:false with no audit entry."""
    pod, sid = lab.pod("qemu-0"), lab.id("qemu-0")
    want = 300_000_000
    eff = 512 * MIB - ((512 * MIB - want) >> 12 << 12)  # 57829 pages of balloon
    assert eff == 300_003_328
    base = ("balloon", "set", pod, "--target", str(want), "--path", via, "--wait", "--timeout", "30s",
            "--tolerance", "0", "-o", "json")
    try:
        r = cli(lab.args(*base))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        assert j["path"] == via and j["changed"] is True and j["converged"] is True
        assert j["requestedTargetBytes"] == want and j["effectiveTargetBytes"] == eff and j["actualBytes"] == eff
        assert any("4 KiB pages" in w and "not the requested 300000000 bytes" in w for w in j["warnings"])
        assert query_balloon(lab, "qemu-0") == eff

        r = cli(lab.args(*base))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        assert j["changed"] is False and j["converged"] is True and j["effectiveTargetBytes"] == eff
        entries = outcomes(sid)
        # a QEMU monitor cannot tell the target: the re-run sends it again, and says so (changed: false)
        assert [e["changed"] for e in entries] == ([True] if via == "extension" else [True, False]), entries
        assert entries[0]["params"]["targetBytes"] == want and entries[0]["params"]["effectiveTargetBytes"] == eff
    finally:
        r = cli(lab.args("balloon", "set", pod, "--release", "--path", via, "--wait", "--tolerance", "0", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert query_balloon(lab, "qemu-0") == 512 * MIB


@pytest.mark.parametrize("via", ["hypervisor-api", "extension"])
def test_clh_effective_target_is_whole_pages(lab, cli, via):
    """Cloud Hypervisor too sets whole 4 KiB pages of balloon (cloud-hypervisor
    virtio-devices/src/balloon.rs Balloon::resize): the effective target says so."""
    r = cli(lab.args("balloon", "set", lab.pod("clh-0"), "--target", "300000000", "--path", via, "--dry-run",
                     "-o", "json"))
    assert r.exit_code == 0, (r.stdout, r.stderr)
    j = r.json()
    assert j["requestedTargetBytes"] == 300_000_000 and j["effectiveTargetBytes"] == 300_003_328
    assert any("Cloud Hypervisor: 4 KiB pages" in w for w in j["warnings"]), j["warnings"]


def test_clh_page_rounded_target_converges_and_reruns_are_no_ops(lab, cli):
    """The lab's Cloud Hypervisor rounds the balloon to whole pages as the real one does
    (config.balloon.size keeps the request): waiting on the effective target converges even
    with --tolerance 0, and a re-run changes nothing."""
    pod = lab.pod("clh-0")
    before = cli(lab.args("balloon", "get", pod, "-o", "json")).json()["targetBytes"]
    try:
        for changed in (True, False):
            r = cli(lab.args("balloon", "set", pod, "--target", "300000000", "--path", "hypervisor-api",
                             "--wait", "--tolerance", "0", "--timeout", "30s", "-o", "json"))
            assert r.exit_code == 0, (r.stdout, r.stderr)
            j = r.json()
            assert j["changed"] is changed and j["effectiveTargetBytes"] == 300_003_328, j
    finally:
        cli(lab.args("balloon", "set", pod, "--target", str(before), "--wait", "--timeout", "30s"))


# -- --reclaim is relative (review 5, finding 8) ------------------------------------------------
def test_reclaim_is_relative_documented_and_warned(lab, cli):
    """--reclaim takes SIZE from the current target on every run: the help says so (it is
    not the idempotent kind), a non-interactive run warns; --target stays idempotent."""
    r = cli(["balloon", "set", "--help"])
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "Re-running after success is a no-op" not in text
    assert "--reclaim is not: it is relative to the current target and takes SIZE again on every run" in text
    assert "not idempotent; use --target in automation" in text
    assert "through a QEMU monitor, which cannot report its target, the request is sent again" in text
    pod, sid = lab.pod("clh-0"), lab.id("clh-0")
    try:
        for n in (1, 2):  # stdin is not a terminal here, as under Ansible
            r = cli(lab.args("balloon", "set", pod, "--reclaim", "64Mi", "--wait", "-o", "json"))
            assert r.exit_code == 0, (r.stdout, r.stderr)
            j = r.json()
            assert j["changed"] is True and j["requestedTargetBytes"] == (1024 - 64 * n) * MIB
            assert "warning: --reclaim is relative: every run takes 64Mi more (not idempotent)" in r.stderr
        r = cli(lab.args("balloon", "set", pod, "--target", "896Mi", "--wait", "-o", "json"))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.json()["changed"] is False and "--reclaim" not in r.stderr
        assert len(outcomes(sid)) == 2
    finally:
        r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert clh_view(lab) == {"balloon": 0, "guest": 1024 * MIB}


# -- QEMU cannot report its target (review 6, finding 1) ------------------------------------
def qmp_run(lab, name: str, *cmds: tuple) -> list:
    """Commands on the sandbox's extra monitor, as another client would send them."""
    with QMPClient.connect(lab.transport(), f"/run/vc/vm/{lab.id(name)}/extra-monitor.sock") as q:
        return [q.execute(c, a) for c, a in cmds]


def test_qemu_release_overrides_a_pending_target(lab, cli):
    """A target another client asked for while the guest could not act on it (paused here, as
    before its virtio_balloon driver loads) is invisible in query-balloon's actual: --release
    must still send `balloon`, or the guest shrinks after katactl reported success."""
    pod, sid = lab.pod("qemu-em"), lab.id("qemu-em")
    assert query_balloon(lab, "qemu-em") == 512 * MIB
    try:
        qmp_run(lab, "qemu-em", ("stop", None), ("balloon", {"value": 256 * MIB}))
        r = cli(lab.args("balloon", "set", pod, "--release", "--path", "extra-monitor", "-o", "json"))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        # the guest already had it all: nothing changed in what it has, but the request was sent
        assert j["changed"] is False and j["targetBytes"] == 512 * MIB and j["previousTargetBytes"] is None
        [e] = outcomes(sid)
        assert e["changed"] is False
    finally:
        qmp_run(lab, "qemu-em", ("cont", None))
    for _ in range(30):  # the guest acts on its config change within a few polls when one is pending
        assert query_balloon(lab, "qemu-em") == 512 * MIB
        time.sleep(0.1)


def test_qemu_small_balloon_is_not_counted_as_used(lab, cli):
    """The guest's MemTotal is below the VM's 512 MiB (what its kernel reserves), so a 32 MiB
    balloon leaves MemTotal at or below the guest's memory less the balloon. Kata's QEMU balloon
    is deflate-on-oom=on all the same: its pages are in MemTotal and not available, so they are
    not the guest's used memory (review 6 fixes1, finding 3: it was counted, 26 -> 58 MiB)."""
    pod = lab.pod("qemu-em")
    get = ("balloon", "get", pod, "--path", "extra-monitor", "-o", "json")
    r = cli(lab.args(*get))
    assert r.exit_code == 0, r.stderr
    before = r.json()["guest"]
    try:
        r = cli(lab.args("balloon", "set", pod, "--target", "480Mi", "--force", "--wait", "--path", "extra-monitor",
                         "-o", "json"))
        assert r.exit_code == 0, r.stderr
        for _ in range(100):  # QEMU's guest statistics (polled every second) after the balloon's move
            r = cli(lab.args(*get))
            assert r.exit_code == 0, r.stderr
            j = r.json()
            if j["guest"]["availableBytes"] <= before["availableBytes"] - 24 * MIB:
                break
            time.sleep(0.2)
    finally:
        assert cli(lab.args("balloon", "set", pod, "--release", "--wait", "--path", "extra-monitor")).exit_code == 0
    g = j["guest"]
    # the premise: the balloon's pages left MemAvailable, MemTotal does not show them (the old
    # rule's test: MemTotal above the guest's memory less the balloon)
    assert g["availableBytes"] <= before["availableBytes"] - 24 * MIB, (before, j)
    assert j["actualBytes"] <= 480 * MIB + TOL and g["totalBytes"] <= j["actualBytes"] + TOL, j
    assert abs(g["usedBytes"] - before["usedBytes"]) < 16 * MIB, (before, g)


def test_qemu_move_under_tolerance_is_sent(lab, cli):
    """A move smaller than --tolerance is sent on QEMU as on Cloud Hypervisor; targetBytes is
    what was requested (QEMU cannot report it: null in get and --dry-run), and a re-run is
    changed:false."""
    pod = lab.pod("qemu-em")
    base = ("balloon", "set", pod, "--target", "510Mi", "--path", "extra-monitor", "-o", "json")
    try:
        r = cli(lab.args(*base, "--dry-run"))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.json()["changed"] is True and r.json()["targetBytes"] is None
        r = cli(lab.args(*base, "--wait", "--tolerance", "0", "--timeout", "30s"))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        assert j["changed"] is True and j["targetBytes"] == 510 * MIB and j["actualBytes"] == 510 * MIB
        assert query_balloon(lab, "qemu-em") == 510 * MIB
        r = cli(lab.args(*base))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        assert r.json()["changed"] is False and r.json()["targetBytes"] == 510 * MIB
    finally:
        # --tolerance 0: the wait must see the guest's last MiB back before the check below
        r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "--tolerance", "0", "-o", "json"))
        assert r.exit_code == 0, r.stderr
    assert query_balloon(lab, "qemu-em") == 512 * MIB


@contextlib.contextmanager
def stand_in(lab, name: str, make, socket: str = "apiSocket"):
    """``make(path)``'s server in place of the sandbox's API (or shim) socket (a peer the
    lab's stand-ins do not play); the lab's socket back afterwards."""
    real = lab.real(lab.sb(name)[socket])
    os.rename(real, real + ".lab")
    srv = None
    try:
        srv = make(real)
        yield srv
    finally:
        if srv is not None:
            srv.close()
        if os.path.exists(real):
            os.unlink(real)
        os.rename(real + ".lab", real)


def test_fc_without_statistics_is_idempotent_from_its_target(lab, cli):
    """Firecracker reports no actual size without balloon statistics (its default: enabled
    only by stats_polling_interval_s > 0 before boot): a re-run is decided on GET /balloon's
    amount_mib, changed:false with nothing sent and nothing audited (review 6, finding 3)."""
    from katactl.lab.fc_server import FcServer

    pod, sid = lab.pod("fc-0"), lab.id("fc-0")
    with stand_in(lab, "fc-0", lambda p: FcServer(p, 1024 * MIB, stats_interval=0)):
        base = ("balloon", "set", pod, "--target", "300Mi", "--force", "--path", "hypervisor-api", "-o", "json")
        for changed in (True, False, False):
            r = cli(lab.args(*base))
            assert r.exit_code == 0, (r.stdout, r.stderr)
            j = r.json()
            assert j["changed"] is changed and j["actualBytes"] is None and j["targetBytes"] == 300 * MIB
        assert [e["changed"] for e in outcomes(sid)] == [True]
        assert fc_amount_mib(lab) == 724


def test_fc_without_statistics_refuses_wait_before_sending(lab, cli):
    """--wait cannot see a Firecracker balloon without statistics move (GET /balloon/statistics
    is 400 StatsNotFound, firecracker src/vmm/src/vmm_config/balloon.rs): refused (exit 5)
    before the PATCH and the audit entry, --dry-run alike (review 11, item 2). It sent the
    PATCH first and failed with exit 1 after: a change reported as a plain failure."""
    from katactl.lab.fc_server import FcServer

    pod, sid = lab.pod("fc-0"), lab.id("fc-0")
    with stand_in(lab, "fc-0", lambda p: FcServer(p, 1024 * MIB, stats_interval=0)):
        before = fc_amount_mib(lab)
        for extra in ((), ("--dry-run",)):
            r = cli(lab.args("balloon", "set", pod, "--target", "300Mi", "--force", "--path", "hypervisor-api",
                             "--wait", *extra, "-o", "json"))
            assert r.exit_code == 5, (extra, r.stdout, r.stderr)
            j = r.json()
            assert j["code"] == "Refused" and "cannot --wait" in j["message"] and j["changed"] is False, j
            assert fc_amount_mib(lab) == before
    assert audit_entries("balloon.set", sid) == []


# -- the audit entry of a change that may have landed (review 6, finding 2) --------------------
def test_kill_9_during_wait_leaves_the_request_in_the_log(lab):
    """The entry is written before the request is sent: kill -9 during --wait (nothing of
    katactl runs after it) still leaves the change QEMU got in the log."""
    sb = lab.sb("free")  # no guest: the request stays pending, the wait never ends by itself
    p = subprocess.Popen([sys.executable, "-m", "katactl", *lab.args(
        "balloon", "set", sb["podRef"], "--target", "150Mi", "--force", "--wait", "--timeout", "60s", "-o", "jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        assert first and json.loads(first)["kind"] == "BalloonProgress", (first, p.stderr.read())
    finally:
        p.kill()
        p.communicate()
    assert p.returncode == -signal.SIGKILL
    e = audit_entries("balloon.set", sb["id"])[-1]
    assert e["result"] == "requested" and e["requestSent"] is True and e["params"]["targetBytes"] == 150 * MIB


def _scripted_http(path: str, answer):
    """A unix-socket HTTP/1.1 peer: ``answer(method, url)`` gives (status, JSON-able body),
    None to leave that request unanswered (the connection held open), or "close" to close
    the connection unanswered."""
    from tests._microhttp import read_request, unix_server

    def serve(c):
        try:
            while True:
                head = read_request(c)
                if b"\r\n\r\n" not in head:
                    return
                method, url = head.split(b" ", 2)[:2]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = head.split(b"\r\n\r\n", 1)[1]
                while len(body) < length:
                    body += c.recv(length - len(body))
                a = answer(method.decode(), url.decode())
                if a == "close":
                    return
                if a is None:
                    c.recv(1)  # until the client goes
                    return
                status, obj = a
                data = json.dumps(obj).encode() if obj is not None else b""
                c.sendall(b"HTTP/1.1 %d \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(data), data))
        except OSError:
            pass
        finally:
            c.close()

    srv = unix_server(path, serve)
    return srv


def _clh_info(memory: int, balloon: int, actual: int) -> dict:
    return {"config": {"memory": {"size": memory}, "balloon": {"size": balloon}}, "state": "Running",
            "memory_actual_size": actual, "device_tree": {}}


def test_ctrl_c_while_the_set_request_is_in_flight_is_audited(lab):
    """Ctrl-C while Cloud Hypervisor has the vm.resize and has not answered: the change may
    have landed, so the log has it (requested, then interrupted with requestSent)."""
    import threading

    pod, sid = lab.pod("clh-0"), lab.id("clh-0")
    got = threading.Event()

    def answer(method, url):
        if url.endswith("vm.resize"):
            got.set()
            return None
        return (200, {"version": "48.0"} if url.endswith("vmm.ping") else _clh_info(1024 * MIB, 0, 1024 * MIB))

    with stand_in(lab, "clh-0", lambda p: _scripted_http(p, answer)):
        p = subprocess.Popen([sys.executable, "-m", "katactl", *lab.args(
            "balloon", "set", pod, "--target", "300Mi", "--force", "--path", "hypervisor-api", "-o", "json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert got.wait(60), p.communicate(timeout=60)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 130, (out, err)
    j = json.loads(out)
    assert j["code"] == "Interrupted" and j["changed"] is True and j["details"]["requestSent"] is True, j
    es = audit_entries("balloon.set", sid)
    assert [(e["result"], e["requestSent"]) for e in es] == [("requested", True), ("interrupted", True)], es
    assert es[1]["params"]["targetBytes"] == 300 * MIB


# -- --wait --timeout is a deadline (review 6, finding 4) --------------------------------------
def test_wait_timeout_is_a_deadline_for_each_poll(lab):
    """Cloud Hypervisor takes the vm.resize, then stops answering vm.info: the wait ends at
    its --timeout with its own Timeout (the actual size last seen, the target), not after a
    poll's whole --request-timeout with the poll's error. No wall-clock assert: the request
    timeout is 600 s and the run is bounded at 60 s, so a poll that does not honour the
    deadline fails by TimeoutExpired, never by a close call."""
    pod, sid = lab.pod("clh-0"), lab.id("clh-0")
    resized = []

    def answer(method, url):
        if url.endswith("vm.resize"):
            resized.append(url)
            return (204, None)
        if url.endswith("vm.info") and resized:
            return None
        return (200, {"version": "48.0"} if url.endswith("vmm.ping") else _clh_info(1024 * MIB, 0, 1024 * MIB))

    with stand_in(lab, "clh-0", lambda p: _scripted_http(p, answer)):
        r = subprocess.run([sys.executable, "-m", "katactl", "--request-timeout", "600s", *lab.args(
            "balloon", "set", pod, "--target", "400Mi", "--force", "--path", "hypervisor-api", "--wait",
            "--timeout", "1s", "-o", "json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 6, (r.stdout, r.stderr)
    j = json.loads(r.stdout)
    assert j["code"] == "Timeout" and "balloon at an unknown size, target 400Mi not reached within 1s" in j["message"]
    assert j["details"] == {"actualBytes": None, "targetBytes": 400 * MIB, "changed": True, "requestSent": True}
    assert [e["result"] for e in audit_entries("balloon.set", sid)] == ["requested", "timeout"]


# -- valid JSON of the wrong shape (review 6, finding 6) -----------------------------------------
def _routes(table: dict):
    """answer() for _scripted_http: the first (status, body) whose URL suffix matches."""
    def answer(method, url):
        for suffix, a in table.items():
            if url.split("?")[0].endswith(suffix):
                return a
        return (404, None)
    return answer


CLH_OK = {"vmm.ping": (200, {"version": "48.0"})}
FC_OK = {"/machine-config": (200, {"vcpu_count": 1, "mem_size_mib": 1024}),
         "/balloon": (200, {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1})}


@pytest.mark.parametrize("name,socket,table,needle", [
    ("clh-0", "apiSocket", {**CLH_OK, "vm.info": (200, [])}, "GET vm.info: the answer is list, not an object"),
    ("clh-0", "apiSocket", {**CLH_OK, "vm.info": (200, {"config": {"memory": {"size": "512M"}}})},
     "GET vm.info: config.memory.size is str '512M', not an integer"),
    ("clh-0", "apiSocket", {**CLH_OK, "vm.info": (200, {"config": {"memory": None, "balloon": {"size": 0}},
                                                        "memory_actual_size": 0})},
     "GET vm.info: config.memory is null, not an object"),
    ("fc-0", "apiSocket", {"/machine-config": (200, [1])}, "GET /machine-config: the answer is list, not an object"),
    ("fc-0", "apiSocket", {**FC_OK, "/balloon/statistics": (200, [])},
     "GET /balloon/statistics: the answer is list, not an object"),
    ("qemu-0", "shimSocket", {"/ext/v1/capabilities": (200, {"features": ["balloon"]}),
                              "/ext/v1/balloon": (200, {"memoryBytes": "1G"})},
     "GET /ext/v1/balloon: memoryBytes is str '1G', not an integer"),
])
def test_wrong_shape_answers_are_protocol_errors(lab, cli, name, socket, table, needle):
    """The peer's bad answer is a ProtocolError (exit 1) naming the endpoint and the field,
    never katactl's "unexpected" internal-bug message, nor a 0-byte VM reported as fact."""
    via = "extension" if socket == "shimSocket" else "hypervisor-api"
    with stand_in(lab, name, lambda p: _scripted_http(p, _routes(table)), socket):
        r = cli(lab.args("balloon", "get", lab.pod(name), "--path", via, "-o", "json"))
    assert r.exit_code == 1, (r.stdout, r.stderr)
    j = r.json()
    assert j["code"] == "ProtocolError" and needle in j["message"], j


def test_extension_error_string_is_the_message(lab, cli):
    """A shim answering {"error": "..."} (a string, not docs/shim-extension.md's object): its
    words are the error, not an internal-bug message."""
    table = {"/ext/v1/capabilities": (200, {"features": ["balloon"]}),
             "/ext/v1/balloon": (500, {"error": "hypervisor exploded"})}
    with stand_in(lab, "qemu-0", lambda p: _scripted_http(p, _routes(table)), "shimSocket"):
        r = cli(lab.args("balloon", "get", lab.pod("qemu-0"), "--path", "extension", "-o", "json"))
    assert r.exit_code == 1, (r.stdout, r.stderr)
    j = r.json()
    assert j["code"] == "Failed" and j["message"].endswith("extension answered 500: hypervisor exploded"), j


def test_fc_without_balloon_hint_is_firecrackers(lab, cli):
    """Neither Kata runtime gives Firecracker a balloon (fc.go, runtime-rs fc_api.rs send no
    PUT /balloon): the hint must not send the SRE to reclaim_guest_freed_memory, which
    Firecracker ignores (review 6, unverified suspicion 2)."""
    from katactl.lab.fc_server import FcServer

    with stand_in(lab, "fc-0", lambda p: FcServer(p, 1024 * MIB, balloon=False)):
        r = cli(lab.args("balloon", "get", lab.pod("fc-0"), "--path", "hypervisor-api", "-o", "json"))
    assert r.exit_code == 1, (r.stdout, r.stderr)
    j = r.json()
    assert j["code"] == "NoBalloon" and "reclaim_guest_freed_memory does not apply to Firecracker" in j["hint"], j


def test_shim_gone_mid_wait_is_not_the_vm_gone(lab, cli):
    """The shim's socket goes away during --wait (the shim restarted, or a relay to the node
    dropped): katactl lost its path to the balloon (exit 7); it must not say the VM went
    away, which it cannot know (review 6, unverified suspicion 3)."""
    pod = lab.pod("qemu-0")
    state = {"memoryBytes": 512 * MIB, "targetBytes": 512 * MIB, "actualBytes": 512 * MIB, "guest": None}
    box = {}

    def answer(method, url):
        if url.endswith("/ext/v1/capabilities"):
            return (200, {"features": ["balloon"]})
        if not url.startswith("/ext/v1/balloon"):
            return (404, None)
        if method == "PUT":
            box["put"] = True
            return (200, {**state, "targetBytes": 300 * MIB})
        if box.get("put"):  # the shim goes away: its socket with it
            os.unlink(box["path"])
            box["srv"].close()
            return "close"
        return (200, state)

    def make(path):
        box["path"], box["srv"] = path, _scripted_http(path, answer)
        return box["srv"]

    with stand_in(lab, "qemu-0", make, "shimSocket"):
        r = cli(lab.args("balloon", "set", pod, "--target", "300Mi", "--force", "--path", "extension", "--wait",
                         "--timeout", "30s", "-o", "json"))
    assert r.exit_code == 7, (r.stdout, r.stderr)
    j = r.json()
    assert j["code"] != "VMGone" and "went away" not in j["message"], j
    assert "lost the extension path while waiting for the balloon" in j["message"], j


def test_qemu_reclaim_says_what_it_counted_from(lab, cli):
    """Through a QEMU monitor the target is unknown: --reclaim counts from the guest's current
    memory and says so (a pending target would not show), and the request is sent."""
    pod = lab.pod("qemu-em")
    try:
        r = cli(lab.args("balloon", "set", pod, "--reclaim", "2Mi", "--path", "extra-monitor", "--wait",
                         "--tolerance", "0", "-o", "json"))
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        assert j["changed"] is True and j["requestedTargetBytes"] == 510 * MIB and j["targetBytes"] == 510 * MIB
        assert "--reclaim counted from the guest's current memory (512Mi)" in " ".join(j["warnings"]), j["warnings"]
        assert query_balloon(lab, "qemu-em") == 510 * MIB
    finally:
        r = cli(lab.args("balloon", "set", pod, "--release", "--wait", "-o", "json"))
        assert r.exit_code == 0, r.stderr


def test_extension_empty_guest_is_no_statistics(lab, cli):
    table = {"/ext/v1/capabilities": (200, {"features": ["balloon"]}),
             "/ext/v1/balloon": (200, {"memoryBytes": 512 * MIB, "targetBytes": 512 * MIB,
                                       "actualBytes": 512 * MIB, "guest": {}})}
    with stand_in(lab, "qemu-0", lambda p: _scripted_http(p, _routes(table)), "shimSocket"):
        r = cli(lab.args("balloon", "get", lab.pod("qemu-0"), "--path", "extension", "-o", "json"))
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert r.json()["guest"] is None and r.json()["targetBytes"] == 512 * MIB


@pytest.mark.parametrize("args,needle", [
    (["get", "abc", "--path", "bogus"], "invalid --path 'bogus'"),
    (["set", "abc", "--target", "1Gi", "--path", "bogus"], "invalid --path 'bogus'"),
    # the global --via, wherever it is written: balloon no longer shadows it after the subcommand
    (["get", "abc", "--via", "bogus"], "invalid value 'bogus' for --via (choose from ssh, kube)"),
    (["get", "abc", "--via", "extension"], "invalid value 'extension' for --via"),
    (["set", "abc", "--target", "300Mi", "--timeout", "10m"], "--timeout needs --wait"),
    # Kubernetes' milli, not MiB (review 11, item 7): refused, never 0.256 bytes nor 256 MiB
    (["set", "abc", "--target", "256m"], "m is milli in Kubernetes"),
    (["set", "abc", "--reclaim", "1K"], "write Ki (1024 bytes) or k (1000)"),
])
def test_bad_path_via_and_timeout_are_usage_errors_before_any_node_is_contacted(cli, args, needle):
    """balloon's own --via (a path) shadowed the global --via ssh|kube after the subcommand,
    and `balloon get` did not check it: `--via kube` or `--via bogus` ended in exit 7 from
    a connection that should never have been made (review 7, finding 9). Its path option is
    --path now. `set --timeout` without --wait was silently ignored (finding 12). The node is
    unreachable: exit 2, not 7, shows nothing was contacted."""
    r = cli(["--request-timeout", "1s", "-N", "127.0.0.1:2", "-o", "json", "balloon", *args])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert needle in r.json()["message"], r.json()


def test_old_balloon_via_value_points_at_path(cli):
    r = cli(["-N", "127.0.0.1:2", "balloon", "get", "abc", "--via", "extra-monitor"])
    assert r.exit_code == 2
    assert "hint:" in r.stderr and "--path extra-monitor" in r.stderr, r.stderr


# -- the extra monitor's protocol, from the VMM's command line (review 11, item 5) -------------
@pytest.mark.parametrize("flag,spelling", [("-monitor", "unix:path={},server=on,wait=off"),  # govmm today
                                           ("-monitor", "unix:{},server,nowait")])           # older govmm
def test_hmp_extra_monitor_is_known_from_the_vmm_command_line(cli, tmp_path, flag, spelling):
    """The Go runtime never persists ExtraMonitorSocket (virtcontainers dumpConfig), so with no
    Kata configuration readable an HMP extra-monitor.sock was probed as QMP: exit 7 with "not
    QMP (bad JSON line ...)". govmm passes -monitor for hmp and -qmp for qmp (kata-containers
    src/runtime/pkg/govmm/qemu/qemu.go appendQMPSockets): the VMM's /proc/PID/cmdline says it,
    and the HMP monitor is not even connected to."""
    import socket
    import tempfile
    import threading

    from katactl.lab import layout as L

    root = str(tmp_path)
    sid = L.sandbox_id_for(5, "hmp")
    node_sock = f"/run/vc/vm/{sid}/extra-monitor.sock"
    # the VMM: a real process with QEMU's command line (it waits on its stdin)
    vmm = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-name", "sandbox-x",
                            flag, spelling.format(node_sock)], stdin=subprocess.PIPE)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        p = L.write_go_sandbox(root, sid, hypervisor="qemu", pid=vmm.pid, extra_monitor_socket=True)
        L.link_host_views(root)
        # an HMP monitor on it, as QEMU serves -monitor (bound short, then moved: sun_path is 108 bytes)
        short = tempfile.mktemp(prefix="hmp", dir="/tmp")
        srv.bind(short)
        srv.listen(4)
        os.makedirs(os.path.dirname(p.real(node_sock)), exist_ok=True)
        os.rename(short, p.real(node_sock))
        accepted = []

        def serve():
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                accepted.append(c)
                c.sendall(b"QEMU 8.2.2 monitor - type 'help' for more information\r\n(qemu) ")

        threading.Thread(target=serve, daemon=True).start()
        r = cli(["--host-root", root, "--request-timeout", "2s", "balloon", "get", sid[:12], "-o", "json"])
        assert r.exit_code == 7, (r.stdout, r.stderr)
        attempts = {a["path"]: a["result"] for a in r.json()["details"]["attempts"]}
        assert attempts["extra-monitor"] == "extra-monitor.sock speaks hmp, not QMP", attempts
        assert accepted == []
    finally:
        srv.close()
        vmm.kill()
        vmm.communicate()


# -- --reclaim beyond the current target (review 13 mutate, finding 4) ------------------------------
@pytest.mark.parametrize("reclaim", ["512Mi", "256Mi", "1Pi"])
def test_reclaim_beyond_the_current_target_is_a_usage_error(cli, reclaim, _isolated_home):
    """A --reclaim of the whole current target or more was refused as a safety check (exit 5,
    which --force cannot override) naming a negative size ("target -256Mi leaves the guest no
    memory"): it is a value that cannot be applied, exit 2, naming the reclaim and the target.
    A Cloud Hypervisor stand-in (real API socket) whose 256Mi guest has no balloon yet."""
    from katactl.lab import layout
    from katactl.lab.clh_server import ClhServer

    sid = "c1c1c1c1d2d2d2d2e3e3e3e3f4f4f4f4"
    root = tempfile.mkdtemp(prefix="kb", dir="/tmp")  # a unix socket's path is short
    sb = layout.write_go_sandbox(root, sid, hypervisor="clh", memory_mib=256)
    srv = ClhServer(sb.real(sb.api_socket_node), 256 * MIB)
    try:
        for extra in (["--force", "--dry-run"], ["--force"], []):
            r = cli(["--host-root", root, "balloon", "set", sid[:8], "--reclaim", reclaim, *extra, "-o", "json"])
            assert r.exit_code == 2, (extra, r.stdout, r.stderr)
            j = json.loads(r.stdout)
            assert j["message"] == f"--reclaim {reclaim} is not less than the current target 256Mi", j
            assert "-" not in j["message"].split("--reclaim")[1], j
        assert srv.guest.balloon_target() == 0  # nothing was sent
    finally:
        srv.close()
        shutil.rmtree(root, ignore_errors=True)
    assert audit_entries("balloon.set") == []
