"""kill -9 in the middle of a change leaves its ``requested`` audit entry (review 13, mutate 1).

A real katactl subprocess is SIGKILLed once its change has started: at an upgrade fault
point (KATACTL_FAULT, katactl/upgrade/layout.py), while the kube stand-in refuses a drain's
eviction (a PodDisruptionBudget), while the Cloud Hypervisor stand-in holds vm.coredump,
while a lab's daemon ignores the SIGTERM of 'lab down', while a lab's daemon is held before
it is ready. No finally-block runs then: only an entry written *before* the change can say
it happened. A dry run and a no-op write none (docs/configuration.md "The audit log")."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests._audit import audit_entries
from tests.conftest_kube import drain_until_evicting
from tests.test_upgrade_crash import A, B, node_on, run, tbs, templates  # noqa: F401 - fixtures
from tests.test_vmcore_hardening import CLH_SID, clh_node  # noqa: F401 - fixture


def results(action: str) -> list[tuple[str, str, bool | None]]:
    return [(e["target"], e["result"], e.get("changed")) for e in audit_entries(action)]


# -- upgrade: SIGKILL at its fault points ------------------------------------------------

def test_stage_killed_after_its_rename_left_a_requested_entry(katactl_bin, tmp_path, tbs):  # noqa: F811
    node = tmp_path / "node"
    node.mkdir()
    assert run(katactl_bin, node, "stage", tbs[B], "--dry-run").exit_code == 0
    assert run(katactl_bin, node, "stage", tbs[B], fault="stage:after-record").exit_code == -9
    assert audit_entries() == []  # a dry run, and a run killed before anything was in place: nothing logged
    assert run(katactl_bin, node, "stage", tbs[B], fault="stage:after-rename").exit_code == -9
    [e] = audit_entries()
    assert (e["action"], e["target"], e["result"], e["requestSent"]) == ("upgrade.stage", B, "requested", True)
    r = run(katactl_bin, node, "stage", tbs[B])
    assert r.exit_code == 0 and json.loads(r.stdout)["changed"] is False, r.stderr
    # the re-run has nothing to do: its own entry says so, and writes no "requested"
    assert results("upgrade.stage") == [(B, "requested", None), (B, "ok", False)]


@pytest.mark.parametrize("args,point,target", [
    (("switch", B), "switch:after-history", B),
    (("switch", B), "switch:after-journal", B),  # the journal is on the node: the next run finishes it
    (("rollback",), "switch:after-flip", A),
    (("gc", "--yes", "--no-keep-previous"), "gc:after-trash", A),
])
def test_switch_rollback_gc_killed_midway_left_a_requested_entry(katactl_bin, tmp_path, templates,  # noqa: F811
                                                                 args, point, target):
    node = node_on(templates, tmp_path, A)
    if args[0] in ("rollback", "gc"):
        assert run(katactl_bin, node, "switch", B).exit_code == 0
    before = len(audit_entries())
    assert run(katactl_bin, node, *args, "--dry-run").exit_code == 0
    assert len(audit_entries()) == before  # a dry run: no entry
    assert run(katactl_bin, node, *args, fault=point).exit_code == -9
    [e] = audit_entries()[before:]
    assert (e["action"], e["target"], e["result"]) == (f"upgrade.{args[0]}", target, "requested")
    if args[0] == "gc":
        assert e["removing"] == [A]  # what the killed run was removing: its outcome never came


# -- node drain: SIGKILL while an eviction is refused -------------------------------------

def test_drain_killed_while_an_eviction_is_blocked_left_a_requested_entry(kube, kc):
    p = drain_until_evicting(kube, kc)  # cordoned, evicting: the change is under way
    try:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -9
    assert kube.get_obj("Node", "twin-a")["spec"].get("unschedulable")  # left cordoned by the killed run
    [e] = audit_entries("node.drain")
    assert (e["target"], e["node"], e["result"], e["requestSent"]) == ("twin-a", "twin-a", "requested", True)


def test_cordon_writes_requested_then_its_outcome_and_a_no_op_nothing(cli, kube, kc):
    kube.add_node("n1")
    for _ in range(2):
        r = cli(["--kubeconfig", kc, "node", "cordon", "n1", "-o", "json"])
        assert r.exit_code == 0, r.stderr
    r = cli(["--kubeconfig", kc, "node", "uncordon", "n1", "--dry-run", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert results("node.cordon") == [("n1", "requested", None), ("n1", "ok", True)]
    assert audit_entries("node.uncordon") == []


# -- vmcore trigger: SIGKILL while Cloud Hypervisor writes the dump -----------------------

def test_trigger_killed_while_the_dump_is_written_left_a_requested_entry(clh_node):  # noqa: F811
    root = clh_node()
    [srv] = clh_node.servers
    posted, release = srv.hold_coredump()
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "trigger",
                          CLH_SID[:6], "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert posted.wait(60), "the trigger never sent its request"
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    finally:
        release.set()
        p.kill()
    assert p.returncode == -9
    [e] = audit_entries("vmcore.trigger")
    assert (e["target"], e["result"], e["requestSent"]) == (CLH_SID, "requested", True)


# -- lab down / lab up: SIGKILL once the processes are being signalled or started ---------

STUBBORN = """
import signal, sys, time
def term(*_):
    open(sys.argv[1], "w").close()
signal.signal(signal.SIGTERM, term)
while True:
    time.sleep(1)
"""


def test_lab_down_killed_while_its_daemon_is_stopping_left_a_requested_entry(tmp_path):
    """The lab's daemon (a stand-in that outlives SIGTERM, as a busy one may for up to
    --timeout) has been signalled: the change has started when katactl dies."""
    from katactl.procfacts import local_identity

    root, marker = tmp_path / "lab", tmp_path / "got-term"
    d = subprocess.Popen([sys.executable, "-c", STUBBORN, str(marker)], start_new_session=True)
    try:
        ident = None
        while ident is None or "-c" not in ident.cmdline:  # past its exec
            ident = local_identity(d.pid)
        (root / ".katactl-lab").mkdir(parents=True)
        (root / ".katactl-lab" / "state.json").write_text(json.dumps(
            {"root": str(root), "pid": d.pid, "status": "ready", "sandboxes": [],
             "daemon": {"pid": d.pid, "createTime": ident.create_time, "cmdline": list(ident.cmdline)}}))
        p = subprocess.Popen([sys.executable, "-m", "katactl", "lab", "down", "--root", str(root)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while not marker.exists():  # SIGTERM delivered: katactl now waits for the daemon to go
                assert p.poll() is None, p.communicate()
                time.sleep(0.01)
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=30)
        finally:
            p.kill()
        assert p.returncode == -9
    finally:
        d.kill()
        d.wait()
    [e] = audit_entries("lab.down")
    assert (e["target"], e["result"], e["requestSent"]) == (str(root), "requested", True)


def _children(pid: int) -> list[int]:
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def test_lab_up_killed_while_its_daemon_starts_left_a_requested_entry(tmp_path):
    """The daemon is held (SIGSTOP) as soon as 'lab up' has forked it: katactl waits for it
    to be ready, and is killed there."""
    import tempfile

    from katactl.lab import control

    # short (unix socket paths are limited); not test_lab's "kl-": its lab-down test, maybe on the
    # other worker now, counts every kl- root in /tmp without a lab config yet as its own leftover
    root = tempfile.mkdtemp(prefix="kq-", dir="/tmp")
    p = subprocess.Popen([sys.executable, "-m", "katactl", "lab", "up", "--root", root, "--hypervisor", "fc",
                          "--sandboxes", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    try:
        while daemon is None:
            assert p.poll() is None, "lab up ended before it forked its daemon"
            kids = _children(p.pid)
            if kids:
                daemon = kids[0]
                os.kill(daemon, signal.SIGSTOP)
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=30) == -9  # (a daemon held mid-fork still has katactl's pipes: none given)
        [e] = audit_entries("lab.up")
        assert (e["target"], e["result"], e["requestSent"]) == (root, "requested", True)
    finally:
        p.kill()
        if daemon is not None:
            try:
                os.kill(daemon, signal.SIGCONT)
            except ProcessLookupError:
                pass
        control.down(root, force=True)
