"""node cordon/drain keep the safety contract through faults, races, signals and bad input:
whether katactl cordoned a node is read from the node (its record), a node katactl did not
find schedulable is never uncordoned, Ctrl-C/SIGTERM/SIGHUP restore and audit, kubectl's
filter chain and eviction retries, values checked before anything is touched. Against the
kube-apiserver stand-in (tests/kubeserver.py) over HTTPS, real katactl, and kubectl 1.33
where it is the reference."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from katactl import labelselector
from tests.conftest import CliResult


def node_cli(cli, kc, *args) -> CliResult:
    return cli(["--kubeconfig", kc, "node", *args])


def unschedulable(kube, name) -> bool:
    return bool(kube.get_obj("Node", name)["spec"].get("unschedulable"))


def record(kube, name) -> dict | None:
    raw = (kube.get_obj("Node", name)["metadata"].get("annotations") or {}).get("katactl.io/cordon")
    return json.loads(raw) if raw else None


def audit_entries(home) -> list[dict]:
    p = home / "state" / "katactl" / "audit.log"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def ds_blocked_node(kube, monkeypatch, name="n1"):
    """A node whose drain is refused (a DaemonSet pod, no --ignore-daemonsets) after the cordon:
    the DaemonSet's pod lands once the node is cordoned (DaemonSet pods tolerate
    node.kubernetes.io/unschedulable), so the filters the drain runs before its cordon pass and
    the ones after refuse (a refusal found before the cordon writes nothing: nothing to restore)."""
    kube.add_node(name)
    kube.add_daemonset("ds", "default", {"app": "ds"})
    orig = kube.handle

    def handle(method, path, query, body, user, accept):
        out = orig(method, path, query, body, user, accept)
        if method == "PATCH" and path == f"/api/v1/nodes/{name}" and unschedulable(kube, name) \
                and kube.get_obj("Pod", f"ds-{name}", "default") is None:
            kube.add_pod(f"ds-{name}", "default", name, {"app": "ds"}, owner=("DaemonSet", "ds"))
        return out

    monkeypatch.setattr(kube, "handle", handle)


# -- the cordon decision comes from the node ------------------------------------------------

def test_cordon_whose_answer_was_lost_reports_changed_and_audits(cli, kube, kc, _isolated_home):
    """The PATCH lands, its answer is cut, the client resends it and meets 409: the node
    carries this run's record, so this run cordoned it."""
    kube.add_node("n1")
    kube.cut(r"^/api/v1/nodes/n1", method="PATCH", times=1)
    r = node_cli(cli, kc, "cordon", "n1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True and r.json()["items"][0]["wasUnschedulable"] is False
    assert unschedulable(kube, "n1") and record(kube, "n1")["id"]
    assert [(e["action"], e["result"], e.get("changed")) for e in audit_entries(_isolated_home)] == \
        [("node.cordon", "requested", None), ("node.cordon", "ok", True)]


def test_drain_restores_a_cordon_whose_answer_was_lost(cli, kube, kc, _isolated_home, monkeypatch):
    ds_blocked_node(kube, monkeypatch)
    kube.cut(r"^/api/v1/nodes/n1", method="PATCH", times=1)
    r = node_cli(cli, kc, "drain", "n1")
    assert r.exit_code == 5, r.stderr
    assert not unschedulable(kube, "n1") and record(kube, "n1") is None
    [req, entry] = audit_entries(_isolated_home)
    assert req["result"] == "requested" and entry["result"] == "error" and entry["restored"] is True


def test_drain_restores_a_cordon_answered_after_the_request_timeout(cli, kube, kc, monkeypatch):
    """The server holds the PATCH past --request-timeout and applies it later: the drain
    sends it again (conditional on the resourceVersion: one of the two lands), and restores
    the node when the drain is refused. The late one meets 409 and changes nothing."""
    ds_blocked_node(kube, monkeypatch)
    kube.delay(r"^/api/v1/nodes/n1", 2, times=1, method="PATCH")
    r = cli(["--kubeconfig", kc, "--request-timeout", "1s", "node", "drain", "n1"])
    assert r.exit_code == 5, r.stderr
    time.sleep(2.5)  # the held PATCH is answered by now
    patches = [q for q in kube.requests if q["method"] == "PATCH" and q["path"].startswith("/api/v1/nodes/n1")]
    assert len(patches) >= 3  # held, resent, restore
    assert not unschedulable(kube, "n1") and record(kube, "n1") is None


def test_drain_never_uncordons_a_node_cordoned_between_its_read_and_its_patch(cli, kube, kc, monkeypatch):
    """Another SRE's kubectl cordon lands after cordon() read the node schedulable: our
    PATCH meets 409, the node is read again and found cordoned: recorded, left cordoned."""
    ds_blocked_node(kube, monkeypatch)
    orig = kube.handle
    done = []

    def handle(method, path, query, body, user, accept):
        if method == "PATCH" and path == "/api/v1/nodes/n1" and not done:
            done.append(1)
            orig("PATCH", path, {}, ("application/strategic-merge-patch+json", {"spec": {"unschedulable": True}}),
                 "admin", "")
        return orig(method, path, query, body, user, accept)

    monkeypatch.setattr(kube, "handle", handle)
    r = node_cli(cli, kc, "drain", "n1", "-o", "json")
    assert r.exit_code == 5, r.stderr
    assert unschedulable(kube, "n1")
    assert record(kube, "n1")["wasUnschedulable"] is True
    assert r.only_node_error()["details"]["drain"]["restored"] is False


def test_drain_leaves_a_node_whose_record_is_no_longer_its_own(cli, kube, kc, monkeypatch):
    """Between the drain's cordon and its restore, another katactl run records its own cordon
    on the node: the restore is not this drain's to make."""
    ds_blocked_node(kube, monkeypatch)
    orig = kube.handle

    def handle(method, path, query, body, user, accept):
        out = orig(method, path, query, body, user, accept)
        if method == "GET" and path.startswith("/api/v1/pods") and "spec.nodeName" in str(query):
            rec = json.dumps({"by": "other@host", "at": "2026-01-01T00:00:00Z", "reason": "", "id": "other",
                              "wasUnschedulable": False})
            orig("PATCH", "/api/v1/nodes/n1", {}, ("application/strategic-merge-patch+json",
                 {"metadata": {"annotations": {"katactl.io/cordon": rec}}}), "admin", "")
        return out

    monkeypatch.setattr(kube, "handle", handle)
    r = node_cli(cli, kc, "drain", "n1")
    assert r.exit_code == 5, r.stderr
    assert unschedulable(kube, "n1") and record(kube, "n1")["id"] == "other"
    assert "not this run's" in r.stderr


# -- signals --------------------------------------------------------------------------------

def _start_drain(kc, *nodes_, extra=()):
    return subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "-o", "jsonl", "node", "drain",
                             *nodes_, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _blocked_pods(kube, *nodes_):
    for n in nodes_:
        kube.add_node(n)
        kube.add_replicaset(f"rs-{n}", "default", 1, {"app": n})
        kube.add_pod(f"{n}-pod", "default", n, {"app": n}, owner=("ReplicaSet", f"rs-{n}"))
        kube.add_pdb(f"pdb-{n}", "default", {"app": n}, min_available=1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_mid_drain_restore_audit_and_exit_130(kube, kc, _isolated_home, sig):
    _blocked_pods(kube, "n1")
    p = _start_drain(kc, "n1")
    try:
        for line in p.stdout:
            if json.loads(line)["kind"] == "PodEvictionBlocked":
                break
        assert unschedulable(kube, "n1")
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert not unschedulable(kube, "n1") and "Traceback" not in err
    [req, entry] = audit_entries(_isolated_home)
    assert req["result"] == "requested"
    assert entry["action"] == "node.drain" and entry["result"] == "interrupted" and entry["restored"] is True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_mid_cordon_audit_and_exit_130(kube, kc, _isolated_home, sig):
    """Signalled while its PATCH is in flight: exit 130 and an audit entry saying so (the
    change may land: the node's record tells, and node uncordon undoes it)."""
    kube.add_node("n1")
    kube.delay(r"^/api/v1/nodes/n1", 3, times=1, method="PATCH")
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "node", "cordon", "n1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not any(q["method"] == "PATCH" for q in kube.requests):
            assert p.poll() is None
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    [req, entry] = audit_entries(_isolated_home)  # the PATCH had gone out: "requested" first
    assert req["result"] == "requested"
    assert entry["action"] == "node.cordon" and entry["result"] == "interrupted" and entry["error"] == "interrupted"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_interrupt_stops_every_parallel_drain_and_restores_every_node(kube, kc, _isolated_home, sig):
    _blocked_pods(kube, "n1", "n2")
    kube.add_node("n3")  # replacements go there
    p = _start_drain(kc, "n1", "n2", extra=("--parallel", "2"))
    try:
        seen = set()
        for line in p.stdout:
            ev = json.loads(line)
            if ev["kind"] == "PodEvictionBlocked":
                seen.add(ev["node"])
                if len(seen) == 2:
                    break
        p.send_signal(sig)  # once
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert not unschedulable(kube, "n1") and not unschedulable(kube, "n2")
    entries = audit_entries(_isolated_home)
    assert sorted(e["target"] for e in entries if e["result"] == "requested") == ["n1", "n2"]
    entries = [e for e in entries if e["result"] != "requested"]
    assert sorted(e["target"] for e in entries) == ["n1", "n2"]
    assert all(e["result"] == "interrupted" and e["restored"] is True for e in entries)


EXPIRED_THEN_HANGS = """#!/bin/sh
# answers with a token already expired (every request runs it again) until {flag} exists, then
# hangs as an SSO plugin waiting for a browser login would
if [ -e {flag} ]; then echo $$ >> {pids}; sleep 300 & echo $! >> {pids}; wait; fi
printf '{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"{token}",\
"expirationTimestamp":"2001-01-01T00:00:00Z"}}}}'
"""


def _hanging_plugin(kube, kc, tmp_path):
    """tmp_path/exec-kc: kc with an exec plugin that hangs once ``flag`` exists (its pids go to
    ``pids``). Returns (flag, pids)."""
    flag, pids = tmp_path / "hang", tmp_path / "pids"
    plugin = tmp_path / "plugin.sh"
    plugin.write_text(EXPIRED_THEN_HANGS.format(flag=flag, pids=pids, token=kube.tokens["admin"]))
    plugin.chmod(0o755)
    doc = json.loads(open(kc).read())
    doc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                                        "interactiveMode": "Never"}}
    (tmp_path / "exec-kc").write_text(json.dumps(doc))
    return flag, pids


def _sigterm_once_plugins_hang(p, pids) -> str:
    """Wait until two plugin processes hang (their pids in ``pids``), SIGTERM katactl, and
    check it exits 130 having killed them with their group (zombies reaped by init are dead
    too). Returns its stderr."""
    hung: list[int] = []
    while len(hung) < 2:
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
        hung = [int(x) for x in pids.read_text().split()] if pids.exists() else []
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    for pid in hung:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] \
            == "Z", "the plugin outlived the interrupt"
    return err


def _kill_pids(pids) -> None:
    for pid in ([int(x) for x in pids.read_text().split()] if pids.exists() else []):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("revoked", [False, True])
def test_interrupt_kills_an_exec_plugin_hanging_in_a_drain_worker_and_restores(kube, kc, tmp_path, _isolated_home,
                                                                               revoked):
    """The credentials expire mid-drain; their refresh runs the plugin in a worker thread (the
    drain's, or an eviction's), in its own process group, which neither the signal nor the
    terminal's Ctrl-C reaches: the interrupted main thread kills it. The restore then sends the
    token held (expired for the client, the server decides); when the server refuses that too
    (revoked), the plugin it needs is bounded (5 s, said so), not --request-timeout."""
    _blocked_pods(kube, "n1")
    flag, pids = _hanging_plugin(kube, kc, tmp_path)
    p = _start_drain(str(tmp_path / "exec-kc"), "n1", extra=("--request-timeout", "300s"))
    try:
        for line in p.stdout:
            if json.loads(line)["kind"] == "PodEvictionBlocked":
                break
        flag.touch()
        if revoked:
            kube.tokens["admin"] = "revoked-meanwhile"
        # the next request (an eviction sent again, 5 s on) refreshes
        err = _sigterm_once_plugins_hang(p, pids)
    finally:
        p.kill()
        _kill_pids(pids)
    [req, entry] = audit_entries(_isolated_home)
    assert req["result"] == "requested" and entry["result"] == "interrupted"
    if not revoked:
        assert not unschedulable(kube, "n1") and entry["restored"] is True
    else:
        assert unschedulable(kube, "n1") and entry["restored"] is False
        assert "did not answer within 5s (bounded after the interrupt)" in err, err


# -- kubectl's filter chain --------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--force", "--ignore-daemonsets"],                           # refused: the orphan has an emptyDir
    ["--ignore-daemonsets"],                                      # refused: orphaned, no --force
    ["--force", "--ignore-daemonsets", "--delete-emptydir-data"],  # evicted
])
def test_orphaned_daemonset_pod_goes_through_the_chain_as_with_kubectl(cli, kube, kc, kubectl_133, flags):
    """An orphaned DaemonSet pod allowed by --force meets the local storage filter next
    (kubectl drain.go filterPods stops only on !Delete): kubectl 1.33 on twin-a, katactl on
    twin-b, same verdict, same message, same pods left."""
    for n in ("twin-a", "twin-b"):
        kube.add_node(n)
        kube.add_pod(f"orphan-{n}", "default", n, {"app": "gone"}, owner=("DaemonSet", "deleted-ds"), empty_dir=True)
    kube.add_node("spare")
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "drain", "twin-a", *flags, "--timeout", "20s"],
                       capture_output=True, text=True, timeout=60)
    r = node_cli(cli, kc, "drain", "twin-b", *flags, "--timeout", "20s")
    left = {n: [o["metadata"]["name"].replace(n, "N") for o in kube.list_objs("Pod")
                if o["spec"].get("nodeName") == n] for n in ("twin-a", "twin-b")}
    assert left["twin-a"] == left["twin-b"]
    if p.returncode == 0:
        assert r.exit_code == 0, r.stderr
        assert left["twin-b"] == []
    else:
        assert r.exit_code == 5, r.stderr
        want = [ln for ln in p.stderr.splitlines() if ln.startswith("cannot delete")]
        assert want and all(w.replace("twin-a", "twin-b") in r.stderr for w in want), (p.stderr, r.stderr)


# -- evictions in a terminating namespace -------------------------------------------------------

def test_eviction_in_a_terminating_namespace_is_retried_until_the_pod_goes(cli, kube, kc):
    """NamespaceLifecycle admission answers 403 with details.causes[].reason
    NamespaceTerminating: kubectl retries every 5 s (reading the pod again) until the
    namespace's deletion takes the pod; not a permission error."""
    kube.add_node("n1")
    kube.add_node("n2")
    kube.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"},
              "status": {"phase": "Terminating"}})
    kube.add_replicaset("rs", "team", 1, {"app": "a"})
    kube.add_pod("a-1", "team", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    # the namespace controller deletes the namespace's pods a little later
    timer = threading.Timer(1.0, lambda: kube.handle("DELETE", "/api/v1/namespaces/team/pods/a-1", {}, None,
                                                     "admin", ""))
    timer.start()
    try:
        r = node_cli(cli, kc, "drain", "n1", "--timeout", "60s", "-o", "json")
    finally:
        timer.cancel()
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"][0]["evicted"] == ["team/a-1"]
    assert 'from terminating namespace "team" (will retry after 5s)' in r.stderr
    evictions = [q for q in kube.requests if q["path"].endswith("/pods/a-1/eviction")]
    assert len(evictions) == 1  # then the pod was read again: gone


# -- values checked before anything is touched --------------------------------------------------

SELECTORS = ["a=b", "a in (b)", "a in (b", "===", "a=b\n", "!a", "!a=b", "x in (foo,,baz),y,z notin ()",
             "a in ()", "a>1", "a>x", "a notin (in, notin)", "a==b,c!=d", "a=b,", "Bad Key!", "a=b c",
             "example.com/x=y", "Example.com/x=y", "a=" + "v" * 64, "a=-b", "a,,b", "a=(b)", "x in (a) y",
             "a/b/c", "/a", "a" * 64, "a!", "a=b=c", "!", "a in b", "a notin", "a<1,b>-2", "k in (a,)"]


def test_label_selector_syntax_as_kubectl_1_33_parses_it(kube, kc, kubectl_133):
    """kubectl drain --pod-selector runs labels.Parse in Complete(): its verdict on each
    selector is katactl's."""
    kube.add_node("n1")
    for sel in SELECTORS:
        p = subprocess.run([kubectl_133, "--kubeconfig", kc, "drain", "n1", "--pod-selector", sel,
                            "--dry-run=client"], capture_output=True, text=True, timeout=60)
        kubectl_ok = "must be a valid label selector" not in p.stderr
        try:
            labelselector.check(sel)
            ours = True
        except ValueError:
            ours = False
        assert ours == kubectl_ok, (sel, p.stderr)


@pytest.mark.parametrize("args,needle", [
    (["--pod-selector", "a in (b"], "must be a valid label selector"),
    (["--pod-selector", "===", "--dry-run"], "must be a valid label selector"),
    (["--grace-period", "9223372036854775808"], "invalid --grace-period"),
    (["--grace-period", "-2"], "invalid --grace-period"),
    (["--skip-wait-for-delete-timeout", "99999999999999999999"], "invalid --skip-wait-for-delete-timeout"),
])
def test_bad_drain_values_touch_nothing_and_audit_nothing(cli, kube, kc, _isolated_home, args, needle):
    kube.add_node("n1")
    r = node_cli(cli, kc, "drain", "n1", *args)
    assert r.exit_code == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any(q["method"] != "GET" for q in kube.requests) and not unschedulable(kube, "n1")
    assert audit_entries(_isolated_home) == []


def test_interrupt_kills_an_exec_plugin_hanging_in_a_rollout_and_restores(kube, kc, tmp_path):
    """As above, under `rollout run`: its engine's threads refresh credentials too; a SIGTERM
    waited out the hung plugin (--request-timeout, here 300 s). Now the run ends at once,
    interrupted and resumable (docs/rollout.md: its cordon stays, for resume or abort)."""
    _blocked_pods(kube, "n1")
    flag, pids = _hanging_plugin(kube, kc, tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", str(tmp_path / "exec-kc"),
                          "--request-timeout", "300s", "-o", "jsonl", "rollout", "run", "r1", "-N", "n1",
                          "--step", "cordon", "--step", "drain --ignore-daemonsets", "--step", "uncordon",
                          "--poll", "0.2", "--yes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for _line in p.stdout:
            if unschedulable(kube, "n1"):  # cordoned: the drain is on its blocked pod
                break
        flag.touch()
        err = _sigterm_once_plugins_hang(p, pids)  # the next request, from whichever thread, hangs
    finally:
        p.kill()
        _kill_pids(pids)
    assert "rollout r1 interrupted: state saved" in err, err
