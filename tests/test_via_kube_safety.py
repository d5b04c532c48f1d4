"""--via kube leaves nothing behind and says what went wrong: SIGTERM/SIGHUP while node pods
start (several nodes, pods created in worker threads), a node-pod create answered 5xx or timed
out, a drain meeting katactl's own node pod, an exec-plugin token renewed for the pods/exec
upgrade, a PodSecurity refusal. Real processes and signals, the kube-apiserver stand-in
(tests/kubeserver.py with tests/kubeexec_server.py) over real sockets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from katactl.errors import UnreachableError
from tests.conftest_kube import kube_nodes
from tests.test_via_kube import IMAGE, agent_pods, kube_args

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")

POD_CREATE = r"/namespaces/kube-system/pods$"


@pytest.fixture
def cluster(kube, tmp_path, monkeypatch):
    return {"kube": kube, "kc": kube_nodes(kube, tmp_path, monkeypatch, ("node-a", "node-b"))}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("nodes", [("node-a",), ("node-a", "node-b")])
def test_sigterm_and_sighup_while_node_pods_start_delete_them_exit_130_json(cluster, sig, nodes):
    kube = cluster["kube"]
    kube.kubelet_start_delay = 60  # the pods stay Pending (an image pull) until the signal
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", cluster["kc"], *kube_args(*nodes),
                          "sandbox", "list", "-o", "json", "--request-timeout", "60s"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while len(agent_pods(kube)) < len(nodes):  # every worker thread created its pod
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert json.loads(out)["code"] == "Interrupted" and json.loads(out)["exitCode"] == 130
    assert agent_pods(kube) == []


def test_a_second_sigterm_while_node_pods_are_deleted_does_not_leave_them(cluster):
    """systemd and supervisors repeat SIGTERM: one landing while katactl deletes its node pods
    (after the first) must not end it halfway, with privileged pods left on the nodes."""
    kube = cluster["kube"]
    kube.kubelet_start_delay = 60
    kube.delay(r"/namespaces/kube-system/pods/", 2, times=1, method="DELETE")
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", cluster["kc"], *kube_args("node-a"),
                          "sandbox", "list", "-o", "json", "--request-timeout", "60s"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not agent_pods(kube):
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        while not any(q["method"] == "DELETE" for q in kube.requests):  # the deletion is under way
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert agent_pods(kube) == []


def test_pod_create_answered_504_but_applied_is_used_and_deleted(cli, cluster):
    kube = cluster["kube"]
    kube.inject("POST", POD_CREATE, status=504, applied=True)
    r = cli([*kube_args("node-a"), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    posts = [q for q in kube.requests if q["method"] == "POST" and q["path"].endswith("/pods")]
    assert len(posts) == 1  # never sent twice: the name was looked for and found
    assert kube.list_objs("Pod", "kube-system") == []


def test_pod_create_landing_after_the_client_gave_up_is_deleted(cli, cluster):
    kube = cluster["kube"]
    kube.delay(POD_CREATE, 3, times=1, method="POST")  # lands after our 1 s + 1 s look
    start = time.monotonic()
    r = cli([*kube_args("node-a"), "sandbox", "list", "-o", "json", "--request-timeout", "1s"])
    assert r.exit_code == 7, r.stderr
    assert "timed out" in r.only_node_error()["message"]
    # once the stand-in carried the create out (3 s after it came), nothing of it is left:
    # the cleanup watched for it and deleted it
    time.sleep(max(0.0, start + 3.5 - time.monotonic()))
    assert agent_pods(kube) == []


def test_drain_skips_katactl_node_pods_with_a_warning(cli, kube, kc):
    kube.add_node("n1")
    kube.add_pod("katactl-node-n1-abcde", "kube-system", "n1",
                 {"app.kubernetes.io/name": "katactl-node-agent", "katactl.io/agent-kind": "ephemeral"},
                 annotations={"katactl.io/created-by": "sre@bastion"})
    kube.add_pod("katactl-node-agent-x7k2p", "kube-system", "n1",
                 {"app.kubernetes.io/name": "katactl-node-agent", "katactl.io/agent-kind": "daemonset"},
                 owner=("DaemonSet", "katactl-node-agent"))
    for force in ([], ["--force"]):
        r = cli(["--kubeconfig", kc, "node", "drain", "n1", "--timeout", "10s", *force, "-o", "json"])
        assert r.exit_code == 0, r.stderr
        item = r.json()["items"][0] if "items" in r.json() else r.json()
        assert {s["podRef"] for s in item["skipped"]} == {"kube-system/katactl-node-n1-abcde",
                                                       "kube-system/katactl-node-agent-x7k2p"}
        assert ("warning: node/n1: ignoring katactl node agent Pods: kube-system/katactl-node-agent-x7k2p, "
                "kube-system/katactl-node-n1-abcde") in r.stderr
        assert len(kube.list_objs("Pod", "kube-system")) == 2  # neither evicted
        cli(["--kubeconfig", kc, "node", "uncordon", "n1"])


def test_drain_does_not_skip_pods_that_only_wear_the_agent_label(cli, kube, kc):
    """Only katactl's own node pods are skipped: in the agent namespace, and owned by its
    DaemonSet or an ephemeral pod with katactl's created-by annotation. A workload that
    merely carries the label is drained (or refused) like any other pod."""
    kube.add_node("n1")
    agent = {"app.kubernetes.io/name": "katactl-node-agent"}
    kube.add_pod("payments-7d9f", "prod", "n1", agent)  # bare, elsewhere
    kube.add_pod("lookalike", "kube-system", "n1", {**agent, "katactl.io/agent-kind": "ephemeral"})  # no annotation
    kube.add_pod("ds-lookalike", "kube-system", "n1", {**agent, "katactl.io/agent-kind": "daemonset"},
                 owner=("ReplicaSet", "other"))
    r = cli(["--kubeconfig", kc, "node", "drain", "n1", "--timeout", "10s", "-o", "json"])
    assert r.exit_code == 5, r.stderr
    assert "cannot delete Pods that declare no controller (use --force to override): " \
        "kube-system/lookalike, prod/payments-7d9f" in r.stderr
    assert "ignoring katactl node agent Pods" not in r.stderr
    r = cli(["--kubeconfig", kc, "node", "drain", "n1", "--timeout", "10s", "--force", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert not [p for ns in ("prod", "kube-system") for p in kube.list_objs("Pod", ns)
                if p["spec"].get("nodeName") == "n1" and not p["metadata"].get("deletionTimestamp")]


def test_exec_upgrade_renews_a_plugin_token_answered_401(cluster, tmp_path):
    from katactl import config, nodeagent
    from katactl.backends.kubeexec import KubeExecTransport

    kube = cluster["kube"]
    tok = tmp_path / "token"
    tok.write_text("t1")
    plugin = tmp_path / "plugin.sh"
    plugin.write_text('#!/bin/sh\necho "{\\"apiVersion\\":\\"client.authentication.k8s.io/v1\\",'
                      '\\"kind\\":\\"ExecCredential\\",\\"status\\":{\\"token\\":\\"$(cat %s)\\"}}"\n' % tok)
    plugin.chmod(0o755)
    old = kube.tokens["admin"]
    kube.tokens["admin"] = "t1"
    d = json.loads(open(cluster["kc"]).read())
    d["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                                      "interactiveMode": "Never"}}
    open(cluster["kc"], "w").write(json.dumps(d))
    settings = config.resolve({"kubeconfig": cluster["kc"], "agent_image": IMAGE, "via": "kube"}, environ={})
    t = KubeExecTransport.from_settings("node-a", settings)
    try:
        assert t.run(["true"]).returncode == 0
        # the cluster now takes only a new token (revoked, rotated): the upgrade meets 401
        kube.tokens["admin"] = "t2"
        tok.write_text("t2")
        assert t.run(["true"]).returncode == 0
    finally:
        t.close()
        nodeagent.cleanup()
        kube.tokens["admin"] = old
    assert agent_pods(kube) == []


def test_podsecurity_refusal_is_admission_with_the_namespace_hint(cli, cluster):
    kube = cluster["kube"]
    msg = ('pods "katactl-node-node-a-abcde" is forbidden: violates PodSecurity "baseline:latest": host '
           'namespaces (hostNetwork=true, hostPID=true, hostIPC=true)')
    kube.inject("POST", POD_CREATE, status=403, times=1,
                body={"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": msg,
                      "reason": "Forbidden", "code": 403})
    r = cli([*kube_args("node-a"), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 1, r.stderr
    e = r.only_node_error()
    assert "refused by admission, not RBAC" in e["message"] and "violates PodSecurity" in e["message"]
    assert "--agent-namespace" in e["hint"] and "pod-security.kubernetes.io/enforce=privileged" in e["hint"]
    assert "\n" not in e["message"]


def test_rollout_drain_step_through_kube_skips_its_own_node_pod(cli, cluster, tmp_path):
    from tests import upgrade_fixtures as fx

    kube = cluster["kube"]
    tb = fx.make_tarball(str(tmp_path), "3.3.0", str(tmp_path), compression="gz")
    for drain in ("drain", "drain --force"):
        r = cli([*kube_args("node-a"), "rollout", "run", f"rk{len(drain)}", "--poll", "0.1",
                 "--step", f"upgrade stage {tb} --kata-root /opt/kata-rk", "--step", drain,
                 "--step", "upgrade switch 3.3.0 --kata-root /opt/kata-rk", "-o", "json"])
        assert r.exit_code == 0, r.stderr
        assert r.json()["phase"] == "Succeeded"
        assert "ignoring katactl node agent Pods: kube-system/katactl-node-node-a-" in r.stderr
        assert not [q for q in kube.requests if q["path"].endswith("/eviction")]  # its own pod stayed
        assert agent_pods(kube) == []


def test_sigterm_while_the_pod_create_is_held_deletes_it_when_it_lands(cluster):
    kube = cluster["kube"]
    kube.delay(POD_CREATE, 2, times=1, method="POST")
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", cluster["kc"], *kube_args("node-a"),
                          "sandbox", "list", "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not any(q["method"] == "POST" for q in kube.requests):
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        sent = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert json.loads(out)["code"] == "Interrupted"
    time.sleep(max(0.0, sent + 2.5 - time.monotonic()))  # the stand-in has carried the create out
    assert agent_pods(kube) == []


def test_a_second_node_pod_after_a_create_of_unknown_outcome_deletes_both(cluster):
    """A create timed out and not found; the same run asks for the node's pod again (a next
    step) and creates another: the first one landing late is deleted too, not only the latest."""
    from types import SimpleNamespace

    from katactl import nodeagent
    from katactl.backends.kube import KubeAPI

    kube = cluster["kube"]
    settings = SimpleNamespace(kubeconfig=cluster["kc"], context=None, request_timeout=1.0,
                               agent_namespace="kube-system", agent_image=IMAGE, namespace=None)
    api = KubeAPI.from_settings(settings)
    kube.delay(POD_CREATE, 4, times=1, method="POST")  # lands after our 1 s + 1 s look
    try:
        with pytest.raises(UnreachableError, match="timed out"):
            nodeagent.agent_pod(api, settings, "node-a")
        second = nodeagent.agent_pod(api, settings, "node-a")
        for _ in range(200):  # until the stand-in carried the first create out
            if len(agent_pods(kube)) == 2:
                break
            time.sleep(0.05)
        assert second.name in agent_pods(kube) and len(agent_pods(kube)) == 2
    finally:
        left = nodeagent.cleanup()
        api.close()
    assert left == []
    assert agent_pods(kube) == []
