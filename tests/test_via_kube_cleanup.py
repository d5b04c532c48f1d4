"""--via kube's ephemeral node pods at both ends of their life: the RBAC check before the first
create (a SelfSubjectAccessReview per verb), the wait for them to start (one watch, not a GET
every 100 ms), and their deletion at the end (concurrent, under one deadline; a second Ctrl-C
names the pods left and the exit retries them; pods left turn a success into a failure). Real
processes and signals, the kube-apiserver stand-in (tests/kubeserver.py with
tests/kubeexec_server.py) over real sockets."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest_kube import kube_nodes
from tests.test_via_kube import agent_pods, kube_args

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")

NODES = ("node-a", "node-b", "node-c")
NODE_POD = r"/namespaces/kube-system/pods/katactl-node-"
SSAR = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


@pytest.fixture
def cluster(kube, tmp_path, monkeypatch):
    return {"kube": kube, "kc": kube_nodes(kube, tmp_path, monkeypatch, NODES)}


def _requests(kube, method, path_part):
    return [q for q in kube.requests if q["method"] == method and path_part in q["path"]]


@pytest.mark.parametrize("verb,resource", [("create", "pods"), ("delete", "pods"), ("create", "pods/exec")])
def test_a_user_who_may_not_create_or_delete_pods_is_exit_7_before_any_pod(cli, cluster, verb, resource):
    """Without delete, the pod would stay privileged on the node after a run that said 0;
    without exec, it would be started for nothing."""
    kube = cluster["kube"]
    kube.deny(verb, resource)
    r = cli([*kube_args("node-a", "node-b"), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 7, r.stderr
    errors = r.json()["errors"]
    assert [e["error"]["code"] for e in errors] == ["AuthFailed", "AuthFailed"]
    assert f"cannot {verb} {resource} in namespace kube-system" in errors[0]["error"]["message"]
    assert not _requests(kube, "POST", "/namespaces/kube-system/pods")  # no pod was created
    assert agent_pods(kube) == []
    # asked once for the fan-out, not per node, in order, up to the refusal
    asked = [(lambda a: (a["verb"], a["resource"] + ("/" + a["subresource"] if a.get("subresource") else "")))(
        q["body"]["spec"]["resourceAttributes"]) for q in _requests(kube, "POST", SSAR)]
    order = [("create", "pods"), ("delete", "pods"), ("create", "pods/exec")]
    assert asked == order[:order.index((verb, resource)) + 1]


@pytest.mark.parametrize("nodes, code", [(("node-a",), 1), (("node-a", "node-b"), 4)])
def test_pods_the_cleanup_could_not_delete_turn_exit_0_into_a_failure(cli, cluster, nodes, code):
    """RBAC allows the delete but something else refuses it (an admission webhook, a policy
    engine): the pods stay, and the run must not say 0. stdout's one document says so too: an
    ``errors`` entry per node whose pod was left, next to the results, which stand."""
    kube = cluster["kube"]
    kube.inject("DELETE", NODE_POD, status=403, times=len(nodes))
    r = cli([*kube_args(*nodes), "upgrade", "status", "-o", "json"])
    assert r.exit_code == code, r.stderr
    doc = r.json()  # one document: json.loads refuses a second
    assert doc["kind"] == "UpgradeStatusList" and [i["node"] for i in doc["items"]] == list(nodes)
    left = agent_pods(kube)
    assert len(left) == len(nodes)
    by_node = {e["node"]: e["error"] for e in doc["errors"]}
    assert sorted(by_node) == list(nodes)
    for node, err in by_node.items():
        name = err["details"]["pod"]
        assert name in left and name.startswith(f"katactl-node-{node}-")  # the pod of that node
        assert err["code"] == "NodePodLeft" and err["exitCode"] == 1
        assert err["message"].startswith(f"could not delete ephemeral node pod kube-system/{name}: ")
        assert err["hint"] == "katactl node agent gc removes it"
        assert f"could not delete ephemeral node pod kube-system/{name}" in r.stderr
    assert f"katactl: error: {len(nodes)} ephemeral node pod(s) could not be deleted" in r.stderr


def test_pods_left_are_one_yaml_document_and_a_jsonl_line(cli, cluster):
    """-o yaml and -o jsonl: the pod left is in the result's ``errors`` as well."""
    import yaml

    kube = cluster["kube"]
    for fmt in ("yaml", "jsonl"):
        kube.inject("DELETE", NODE_POD, status=403)
        r = cli([*kube_args("node-a"), "sandbox", "list", "-o", fmt])
        assert r.exit_code == 1, r.stderr
        docs = list(yaml.safe_load_all(r.stdout)) if fmt == "yaml" else [
            __import__("json").loads(line) for line in r.stdout.splitlines()]
        assert [d["kind"] for d in docs] == ["SandboxList"]
        assert [(e["node"], e["error"]["code"]) for e in docs[0]["errors"]] == [("node-a", "NodePodLeft")]


def test_pods_are_deleted_at_once_under_one_deadline(cli, cluster, monkeypatch):
    """An API server slow to answer DELETEs: every pod's DELETE is sent at once and the run
    ends at the cleanup's one deadline, not one client timeout per pod (SIGTERM is ignored
    meanwhile), and says which pods it gave up on."""
    from katactl import nodeagent

    kube = cluster["kube"]
    monkeypatch.setattr(nodeagent, "CLEANUP_TIMEOUT", 1.0, raising=False)
    kube.delay(NODE_POD, 4, method="DELETE")
    r = cli([*kube_args(*NODES), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 4, r.stderr
    assert len(_requests(kube, "DELETE", NODE_POD)) == len(NODES)  # all sent before any answer came
    assert r.stderr.count("could not delete ephemeral node pod") == len(NODES), r.stderr


def test_a_delete_carried_out_but_answered_too_late_leaves_no_pod(cli, cluster, kube_api, monkeypatch):
    """The API server carries out the DELETE but its answer misses the cleanup's deadline (here:
    another client deleted the pod while katactl's DELETE waits): one GET at the deadline finds
    the pod gone, so nothing is reported left and the run says 0."""
    import threading

    from katactl import nodeagent

    kube = cluster["kube"]
    monkeypatch.setattr(nodeagent, "CLEANUP_TIMEOUT", 1.0, raising=False)
    kube.delay(NODE_POD, 4, times=1, method="DELETE")
    stop = threading.Event()

    def delete_while_katactl_waits():
        while not stop.is_set():
            sent = _requests(kube, "DELETE", NODE_POD)
            if sent:
                kube_api.delete(sent[0]["path"].split("?")[0], grace_period=0)
                return
            time.sleep(0.02)

    t = threading.Thread(target=delete_while_katactl_waits, daemon=True)
    t.start()
    try:
        r = cli([*kube_args("node-a"), "upgrade", "status", "-o", "json"])
    finally:
        stop.set()
        t.join()
    assert r.exit_code == 0, r.stderr
    assert "could not delete" not in r.stderr and not r.json().get("errors")
    assert agent_pods(kube) == []


def test_a_second_ctrl_c_while_pods_are_deleted_names_them_and_exit_retries(cluster):
    """Ctrl-C, then Ctrl-C again during the deletion: the pods whose DELETE was not answered
    are named (the user may walk away), and the exit tries them again."""
    kube = cluster["kube"]
    kube.kubelet_start_delay = 60  # the pods stay Pending (an image pull) until the signal
    kube.delay(NODE_POD, 3, method="DELETE")
    kube.drop(NODE_POD, times=1, method="DELETE")  # the first is never carried out
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", cluster["kc"],
                          *kube_args("node-a", "node-b"), "sandbox", "list", "-o", "json",
                          "--request-timeout", "60s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while len(agent_pods(kube)) < 2:
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        while not _requests(kube, "DELETE", NODE_POD):
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        pods = agent_pods(kube)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    [warning] = [line for line in err.splitlines() if "interrupted while deleting ephemeral node pods" in line]
    assert all(f"kube-system/{name}" in warning for name in pods) and "katactl node agent gc" in warning, warning
    assert agent_pods(kube) == []  # the dropped one too: the exit sent its DELETE again


def test_waiting_for_pods_to_start_watches_instead_of_polling(cli, cluster):
    """Two nodes whose image pull takes a while: each pod is read once and watched, not GET
    ten times a second per node for as long as the pull takes."""
    kube = cluster["kube"]
    kube.kubelet_start_delay = 1.5
    r = cli([*kube_args("node-a", "node-b"), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    for name in {q["path"].split(NODE_POD)[1].split("?")[0] for q in _requests(kube, "DELETE", NODE_POD)}:
        gets = [q for q in _requests(kube, "GET", f"{NODE_POD}{name}")]
        watches = [q for q in _requests(kube, "GET", "/namespaces/kube-system/pods?")
                   if "watch=true" in q["path"] and f"metadata.name%3Dkatactl-node-{name}" in q["path"]]
        assert len(gets) <= 2, [q["path"] for q in gets]
        assert len(watches) == 1, [q["path"] for q in watches]


@pytest.mark.parametrize("denied", [False, True])
def test_the_access_check_survives_cleanup_clearing_its_answer(kube, kube_api, monkeypatch, denied):
    """cleanup() clears the run's RBAC answers without the lock a worker may hold through a slow
    review: a worker whose answer is cleared just after it stored it still acts on that answer
    (no KeyError in an abandoned thread)."""
    from katactl import errors, nodeagent

    class ClearedAtOnce(dict):
        def __setitem__(self, k, v):
            super().__setitem__(k, v)
            self.clear()  # cleanup() on the main thread, between the worker's two lines

    monkeypatch.setattr(nodeagent, "_ACCESS", ClearedAtOnce())
    if denied:
        kube.deny("delete", "pods")
        with pytest.raises(errors.AuthError, match="cannot delete pods in namespace kube-system"):
            nodeagent.check_pod_access(kube_api, "kube-system")
    else:
        nodeagent.check_pod_access(kube_api, "kube-system")
    # create and delete pods (refused there when denied), else also create and get pods/exec
    assert [q["path"] for q in kube.requests if q["method"] == "POST"] == [SSAR] * (2 if denied else 4)
