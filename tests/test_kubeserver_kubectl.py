"""The kube-apiserver stand-in (tests/kubeserver.py), proven by real kubectl 1.33 over HTTPS, plus
unit tests of its API semantics (PDB arithmetic, eviction, patches, conflicts, dryRun, paging,
graceful deletion, controllers, faults) and of the protobuf decoder on bytes kubectl really sent."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import time

import httpx
import pytest

from tests import _protobuf
from tests.kubeserver import KubeStandIn, json_patch, merge_patch, strategic_merge_patch


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def kctl(kube, kubectl_133, tmp_path):
    """kctl(*args, user="admin") -> CompletedProcess of real kubectl 1.33 against the stand-in."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    env["HOME"] = str(home)

    def run(*args, user="admin", timeout=60):
        kc = kube.kubeconfig(tmp_path / f"kc-{user}", user=user)
        return subprocess.run([kubectl_133, "--kubeconfig", kc, "--cache-dir", str(tmp_path / "cache"), *args],
                              capture_output=True, text=True, env=env, timeout=timeout)
    return run


def client(kube: KubeStandIn, user="admin", token=None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=kube.ca_path)
    tok = token if token is not None else kube.tokens[user]
    return httpx.Client(base_url=kube.url, verify=ctx, headers={"Authorization": f"Bearer {tok}"}, timeout=10)


def pods_on(kube, node):
    return sorted(f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in kube.list_objs("Pod")
                  if p["spec"].get("nodeName") == node)


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def evict(c, ns, name, **delete_options):
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}}
    if delete_options:
        body["deleteOptions"] = delete_options
    return c.post(f"/api/v1/namespaces/{ns}/pods/{name}/eviction", json=body)


# -- real kubectl 1.33 ----------------------------------------------------------------------------


def test_kubectl_get_selectors_and_chunks(kube, kctl):
    kube.seed_twin_nodes(3)
    r = kctl("get", "nodes")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:5] == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert "twin-a" in r.stdout and "twin-b" in r.stdout and "v1.33.1" in r.stdout
    r = kctl("get", "pods", "-A", "-o", "json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)["items"]
    assert len(items) == len(kube.list_objs("Pod")) and all(i["kind"] == "Pod" for i in items)
    r = kctl("get", "pods", "-A", "-l", "app in (db, lonely)", "-o", "name")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 6 and all(("db-" in n or "lonely-" in n) for n in r.stdout.split())
    r = kctl("get", "pods", "-A", "--field-selector", "spec.nodeName=twin-a,status.phase!=Running", "-o", "name")
    assert r.stdout.split() == ["pod/done-twin-a"], r.stderr
    kube.requests.clear()
    r = kctl("get", "pods", "-A", "--chunk-size", "4", "-o", "name")
    assert r.returncode == 0 and len(r.stdout.split()) == len(items)
    lists = [q["path"] for q in kube.requests if q["path"].startswith("/api/v1/pods?")]
    assert len(lists) == -(-len(items) // 4) and sum("continue=" in p for p in lists) == len(lists) - 1
    r = kctl("get", "pods", "-A", "--field-selector", "spec.bogus=1")
    assert r.returncode != 0 and "field label not supported: spec.bogus" in r.stderr


def test_kubectl_get_nodes_status_as_the_apiserver_prints_it(kube, kctl):
    """The server-side Table's STATUS is kube-apiserver's printNode (pkg/printers/internalversion/
    printers.go): a Ready condition not True (a kubelet that stopped posting: Unknown) is NotReady;
    Unknown only when the node has no Ready condition."""
    kube.add_node("a-ready")
    kube.add_node("b-unknown", ready=False)
    kube.add_node("c-cordoned", ready=False, unschedulable=True)
    bare = kube.add_node("d-nocond")
    bare["status"]["conditions"] = []
    kube.add(bare)
    r = kctl("get", "nodes", "--no-headers")
    assert r.returncode == 0, r.stderr
    status = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()}
    assert status == {"a-ready": "Ready", "b-unknown": "NotReady", "c-cordoned": "NotReady,SchedulingDisabled",
                      "d-nocond": "Unknown"}, r.stdout


def test_kubectl_auth_can_i_is_answered_from_the_stand_ins_authorizer(kube, kctl):
    """kubectl auth can-i POSTs a SelfSubjectAccessReview (protobuf): the stand-in answers it
    from the model its requests are refused by (the two users, less ``deny``)."""
    kube.deny("delete", "pods")
    answers = {(user, verb): kctl("auth", "can-i", verb, "pods", "-n", "kube-system", user=user).stdout.strip()
               for user in ("admin", "readonly") for verb in ("create", "delete", "list")}
    assert answers == {("admin", "create"): "yes", ("admin", "delete"): "no", ("admin", "list"): "yes",
                       ("readonly", "create"): "no", ("readonly", "delete"): "no", ("readonly", "list"): "yes"}
    assert kctl("auth", "can-i", "create", "pods", "--subresource=exec", "-n", "kube-system").stdout.strip() == "yes"
    review = [q for q in kube.requests if q["path"].endswith("/selfsubjectaccessreviews")][-1]
    assert review["content_type"] == "application/vnd.kubernetes.protobuf"
    assert review["body"]["spec"]["resourceAttributes"]["subresource"] == "exec"


def test_kubectl_cordon_uncordon_and_readonly(kube, kctl):
    kube.add_node("n1")
    r = kctl("cordon", "n1")
    assert r.returncode == 0 and "node/n1 cordoned" in r.stdout, r.stderr
    assert kube.get_obj("Node", "n1")["spec"]["unschedulable"] is True
    assert "Ready,SchedulingDisabled" in kctl("get", "nodes").stdout
    patch = [q for q in kube.requests if q["method"] == "PATCH"][-1]
    assert patch["content_type"] == "application/strategic-merge-patch+json"
    assert patch["body"] == {"spec": {"unschedulable": True}} and "kubectl" in patch["user_agent"]
    r = kctl("uncordon", "n1")
    assert r.returncode == 0 and "node/n1 uncordoned" in r.stdout
    assert not kube.get_obj("Node", "n1")["spec"].get("unschedulable")
    rv = kube.get_obj("Node", "n1")["metadata"]["resourceVersion"]
    r = kctl("cordon", "n1", user="readonly")
    assert "error: unable to cordon" in r.stderr
    assert 'nodes "n1" is forbidden: User "readonly" cannot patch resource "nodes" in API group "" ' \
           'at the cluster scope' in r.stderr
    node = kube.get_obj("Node", "n1")
    assert not node["spec"].get("unschedulable") and node["metadata"]["resourceVersion"] == rv


def test_kubectl_drain_evictable_node(kube, kctl):
    seeded = kube.seed_twin_nodes(5)["twin-a"]
    r = kctl("delete", "pdb", "db-twin-a", "-n", "guarded-twin-a", "--wait=false")
    assert r.returncode == 0, r.stderr
    r = kctl("drain", "twin-a", "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--grace-period", "0",
             "--timeout", "20s")
    assert r.returncode == 0, r.stderr
    assert "node/twin-a drained" in r.stdout
    left = pods_on(kube, "twin-a")
    assert left == sorted(seeded["daemonset"] + seeded["mirror"])
    assert kube.get_obj("Node", "twin-a")["spec"]["unschedulable"] is True
    # the ReplicaSet controller replaced the evicted pods, never on the cordoned node
    web = [p for p in kube.list_objs("Pod", "apps") if p["metadata"]["labels"].get("app") == "web-twin-a"]
    assert len(web) == len(seeded["evictable"]) and all(p["spec"]["nodeName"] == "twin-b" for p in web)
    assert not set(f"apps/{p['metadata']['name']}" for p in web) & set(seeded["evictable"])
    evictions = [q for q in kube.requests if q["path"].endswith("/eviction")]
    assert {q["body"]["deleteOptions"]["gracePeriodSeconds"] for q in evictions} == {0}
    assert all(q["body"]["kind"] == "Eviction" and q["body"]["apiVersion"] == "policy/v1" for q in evictions)


def test_kubectl_drain_blocked_by_pdb_times_out(kube, kctl):
    seeded = kube.seed_twin_nodes(5)["twin-a"]
    r = kctl("drain", "twin-a", "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--grace-period", "0",
             "--timeout", "3s")
    assert r.returncode != 0
    assert "Cannot evict pod as it would violate the pod's disruption budget." in r.stderr
    assert "global timeout reached: 3s" in r.stderr
    assert set(seeded["blocked"]) <= set(pods_on(kube, "twin-a"))
    assert not set(seeded["evictable"]) & set(pods_on(kube, "twin-a"))
    pdb = kube.get_obj("PodDisruptionBudget", "db-twin-a", "guarded-twin-a")
    assert pdb["status"]["disruptionsAllowed"] == 0 and pdb["status"]["currentHealthy"] == 2


def test_kubectl_drain_server_dry_run_changes_nothing(kube, kctl):
    kube.seed_twin_nodes(2)
    before = {(p["metadata"]["namespace"], p["metadata"]["name"]): p["metadata"]["resourceVersion"]
              for p in kube.list_objs("Pod")}
    r = kctl("drain", "twin-a", "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--dry-run=server",
             "--pod-selector", "app!=db")
    assert r.returncode == 0, r.stderr
    assert "(server dry run)" in r.stdout
    after = {(p["metadata"]["namespace"], p["metadata"]["name"]): p["metadata"]["resourceVersion"]
             for p in kube.list_objs("Pod")}
    assert after == before and not kube.get_obj("Node", "twin-a")["spec"].get("unschedulable")
    mutations = [q for q in kube.requests if q["method"] != "GET"]
    assert mutations and all("dryRun=All" in q["path"] or q["body"]["deleteOptions"]["dryRun"] == ["All"]
                             for q in mutations)
    assert any(q["method"] == "PATCH" and "dryRun=All" in q["path"] for q in mutations)


def test_kubectl_drain_refuses_without_flags(kube, kctl):
    seeded = kube.seed_twin_nodes(2)["twin-a"]
    before = pods_on(kube, "twin-a")
    r = kctl("drain", "twin-a")
    assert r.returncode == 1
    err = r.stderr
    assert ("cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): "
            + seeded["daemonset"][0]) in err
    assert "cannot delete Pods with local storage (use --delete-emptydir-data to override): " + seeded["emptydir"][0] in err
    assert "Pods that declare no controller (use --force to override): " + seeded["unreplicated"][0] in err
    assert pods_on(kube, "twin-a") == before
    assert not [q for q in kube.requests if q["path"].endswith("/eviction")]


def test_kubectl_protobuf_bodies_decode(kube, kctl):
    """kubectl 1.33 sends DeleteOptions (drain --disable-eviction), Namespace and PDB as protobuf;
    the decoder reads the bytes it really sent."""
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 2, {"app": "x"})
    for i in range(2):
        kube.add_pod(f"rs-{i}", node="n1", labels={"app": "x"}, owner=("ReplicaSet", "rs"))
    r = kctl("drain", "n1", "--disable-eviction", "--grace-period", "7", "--timeout", "20s")
    assert r.returncode == 0, r.stderr
    deletes = [q for q in kube.requests if q["method"] == "DELETE"]
    assert len(deletes) == 2
    for q in deletes:
        assert q["content_type"] == "application/vnd.kubernetes.protobuf" and q["raw"].startswith(b"k8s\x00")
        env = _protobuf.decode_envelope(q["raw"])
        assert (env["apiVersion"], env["kind"]) == ("v1", "DeleteOptions")
        assert _protobuf.decode_k8s(q["raw"]) == {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 7}
    r = kctl("create", "namespace", "team")
    assert r.returncode == 0, r.stderr
    r = kctl("create", "pdb", "guard", "-n", "team", "--selector", "app=x", "--max-unavailable", "25%")
    assert r.returncode == 0, r.stderr
    [ns_post] = [q for q in kube.requests if q["method"] == "POST" and q["path"].startswith("/api/v1/namespaces?")]
    assert _protobuf.decode_k8s(ns_post["raw"])["metadata"] == {"name": "team"}
    [pdb_post] = [q for q in kube.requests if "poddisruptionbudgets" in q["path"] and q["method"] == "POST"]
    d = _protobuf.decode_k8s(pdb_post["raw"])
    assert d["kind"] == "PodDisruptionBudget" and d["spec"] == {"selector": {"matchLabels": {"app": "x"}},
                                                                "maxUnavailable": "25%"}
    assert kube.get_obj("PodDisruptionBudget", "guard", "team")["spec"]["maxUnavailable"] == "25%"
    r = kctl("create", "pdb", "guard", "-n", "team", "--selector", "app=x", "--min-available", "1")
    assert r.returncode != 0 and "already exists" in r.stderr


def test_kubectl_delete_waits_through_a_watch(kube, kctl):
    """kubectl delete waits for the pod with a list+watch; the graceful deletion ends in DELETED."""
    kube.add_node("n1")
    kube.add_pod("p", node="n1")
    kube.add_pod("stuck", node="n1", annotations={"test.katactl.io/stuck-terminating": "true"})
    r = kctl("delete", "pod", "p", "--grace-period", "30")
    assert r.returncode == 0 and 'pod "p" deleted' in r.stdout, r.stderr
    assert kube.get_obj("Pod", "p") is None
    assert any("watch=true" in q["path"] for q in kube.requests)
    r = kctl("delete", "pod", "stuck", "--timeout", "1s")
    assert r.returncode != 0 and "timed out" in r.stderr
    assert kube.get_obj("Pod", "stuck")["metadata"]["deletionTimestamp"]


# -- protobuf decoder units -----------------------------------------------------------------------


def test_protobuf_eviction_fields():
    pre = _protobuf.field_bytes(1, "uid-1") + _protobuf.field_bytes(2, "42")
    opts = (_protobuf.field_varint(1, 0) + _protobuf.field_bytes(2, pre) + _protobuf.field_varint(3, 1)
            + _protobuf.field_bytes(4, "Foreground") + _protobuf.field_bytes(5, "All"))
    meta = _protobuf.field_bytes(1, "p") + _protobuf.field_bytes(3, "ns")
    raw = _protobuf.field_bytes(1, meta) + _protobuf.field_bytes(2, opts)
    d = _protobuf.decode_k8s(_protobuf.envelope("policy/v1", "Eviction", raw))
    assert d == {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "p", "namespace": "ns"},
                 "deleteOptions": {"gracePeriodSeconds": 0, "preconditions": {"uid": "uid-1", "resourceVersion": "42"},
                                   "orphanDependents": True, "propagationPolicy": "Foreground", "dryRun": ["All"]}}
    neg = _protobuf.field_varint(1, -1)  # int64 -1 is ten varint bytes
    assert _protobuf.decode_message("DeleteOptions", neg) == {"gracePeriodSeconds": -1}
    for bad in (b"k8s", b"xxxx" + raw, b"k8s\x00\x0a\x05ab", b"k8s\x00\x0b"):
        with pytest.raises(_protobuf.ProtobufError):
            _protobuf.decode_k8s(bad)
    with pytest.raises(_protobuf.ProtobufError, match="no protobuf schema"):
        _protobuf.decode_k8s(_protobuf.envelope("v1", "Pod", b""))


def test_protobuf_eviction_over_the_wire_and_unknown_kind_415(kube):
    kube.add_node("n1")
    kube.add_pod("p", node="n1")
    opts = _protobuf.field_varint(1, 0) + _protobuf.field_bytes(5, "All")
    raw = _protobuf.field_bytes(1, _protobuf.field_bytes(1, "p")) + _protobuf.field_bytes(2, opts)
    with client(kube) as c:
        r = c.post("/api/v1/namespaces/default/pods/p/eviction",
                   content=_protobuf.envelope("policy/v1", "Eviction", raw),
                   headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
        assert r.status_code == 201 and r.json()["status"] == "Success"
        assert kube.get_obj("Pod", "p") is not None  # dryRun from the protobuf deleteOptions
        r = c.post("/api/v1/namespaces/default/pods", content=_protobuf.envelope("v1", "Pod", b""),
                   headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
        assert r.status_code == 415 and r.json()["reason"] == "UnsupportedMediaType"


# -- API semantics --------------------------------------------------------------------------------


def test_auth_401_403_and_discovery(kube):
    with client(kube, token="nope") as c:
        r = c.get("/api/v1/nodes")
        assert r.status_code == 401 and r.json()["reason"] == "Unauthorized"
    kube.add_node("n1")
    kube.add_pod("p", node="n1")
    with client(kube, "readonly") as c:
        assert c.get("/api/v1/nodes").status_code == 200
        r = evict(c, "default", "p")
        assert r.status_code == 403
        assert r.json()["message"] == ('pods "p" is forbidden: User "readonly" cannot create resource "pods/eviction" '
                                       'in API group "" in the namespace "default"')
        r = c.post("/apis/coordination.k8s.io/v1/namespaces/default/leases", json={"metadata": {"name": "l"}})
        assert r.json()["message"].startswith('leases.coordination.k8s.io is forbidden: User "readonly" cannot create')
    with client(kube) as c:
        res = {r["name"]: r for r in c.get("/api/v1").json()["resources"]}
        assert res["pods/eviction"]["group"] == "policy" and res["pods/eviction"]["version"] == "v1"
        assert res["pods"]["shortNames"] == ["po"] and res["nodes"]["namespaced"] is False
        groups = {g["name"] for g in c.get("/apis").json()["groups"]}
        assert groups == {"apps", "policy", "coordination.k8s.io", "node.k8s.io", "authorization.k8s.io"}
        assert c.get("/apis/node.k8s.io/v1").json()["resources"][0]["namespaced"] is False
        assert c.get("/version").json()["gitVersion"].startswith("v1.33")
        assert c.get("/api/v1/widgets").status_code == 404


def test_pdb_arithmetic(kube):
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 4, {"app": "a"})
    for i in range(3):
        kube.add_pod(f"a{i}", node="n1", labels={"app": "a"}, owner=("ReplicaSet", "rs"))
    kube.add_pod("a3", node="n1", labels={"app": "a"}, owner=("ReplicaSet", "rs"), ready=False)

    def st(**spec):
        pdb = kube.add_pdb("p", "default", {"app": "a"}, **spec)
        s = kube.get_obj("PodDisruptionBudget", "p")["status"]
        kube.store.pop(("poddisruptionbudgets", "default", "p"))
        assert s["observedGeneration"] == pdb["metadata"]["generation"]
        return s["currentHealthy"], s["desiredHealthy"], s["disruptionsAllowed"], s["expectedPods"]

    assert st(min_available=2) == (3, 2, 1, 4)           # int minAvailable: expected = matched pods
    assert st(min_available=3) == (3, 3, 0, 4)
    assert st(min_available="50%") == (3, 2, 1, 4)       # percent of the RS scale (4), rounded up
    assert st(min_available="60%") == (3, 3, 0, 4)
    assert st(max_unavailable=1) == (3, 3, 0, 4)         # 4 - 1 = 3 desired; the NotReady pod counts against
    assert st(max_unavailable=2) == (3, 2, 1, 4)
    assert st(max_unavailable="50%") == (3, 2, 1, 4)
    kube.add_daemonset("ds", "default", {"app": "d"})
    kube.add_pod("d0", node="n1", labels={"app": "d"}, owner=("DaemonSet", "ds"))
    pdb = kube.add_pdb("pd", "default", {"app": "d"}, max_unavailable=1)
    s = kube.get_obj("PodDisruptionBudget", "pd")["status"]
    assert s["disruptionsAllowed"] == 0 and s["conditions"][0]["reason"] == "SyncFailed"
    assert pdb["metadata"]["generation"] == 1


def test_eviction_semantics(kube):
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 3, {"app": "a"})
    for i in range(3):
        kube.add_pod(f"a{i}", node="n1", labels={"app": "a"}, owner=("ReplicaSet", "rs"))
    kube.add_pod("pending", labels={"app": "a"}, phase="Pending", ready=False)
    kube.add_pdb("p", "default", {"app": "a"}, min_available=2)
    with client(kube) as c:
        assert evict(c, "default", "ghost").status_code == 404
        r = c.post("/api/v1/namespaces/default/pods/a0/eviction",
                   json={"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "other"}})
        assert r.status_code == 400 and "does not match" in r.json()["message"]
        r = evict(c, "default", "a0", dryRun=["All"])
        assert r.status_code == 201 and kube.get_obj("Pod", "a0")["metadata"].get("deletionTimestamp") is None
        assert kube.get_obj("PodDisruptionBudget", "p")["status"]["disruptionsAllowed"] == 1
        r = evict(c, "default", "a0", gracePeriodSeconds=0)
        assert r.status_code == 201 and r.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                                       "status": "Success", "code": 201}
        assert kube.get_obj("Pod", "a0") is None
        # the replacement is Ready at once, so the budget recovers; pin it to 0 by pausing the controller
        kube.pdb_controller_paused = True
        pdb = kube.store[("poddisruptionbudgets", "default", "p")]
        pdb["status"]["disruptionsAllowed"] = 0
        r = evict(c, "default", "a1")
        assert r.status_code == 429 and r.headers.get("Retry-After") is None
        s = r.json()
        assert s["reason"] == "TooManyRequests"
        assert s["message"] == "Cannot evict pod as it would violate the pod's disruption budget."
        assert s["details"]["causes"][0]["reason"] == "DisruptionBudget"
        assert "The disruption budget p needs 2 healthy pods" in s["details"]["causes"][0]["message"]
        assert evict(c, "default", "pending").status_code == 201  # Pending pods skip the PDB check
        pdb["metadata"]["generation"] = 2
        r = evict(c, "default", "a1")
        assert r.status_code == 429 and r.headers["Retry-After"] == "10"
        assert "still being processed" in r.json()["details"]["causes"][0]["message"]
        kube.pdb_controller_paused = False
        kube.add_pdb("p2", "default", {"app": "a"}, max_unavailable=1)
        r = evict(c, "default", "a1")
        assert r.status_code == 500 and r.json()["message"] == (
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.")


def test_patch_kinds_conflicts_and_dry_run(kube):
    kube.add_node("n1", labels={"a": "1"}, taints=[{"key": "k", "effect": "NoSchedule"}])
    with client(kube) as c:
        def patch(ctype, body, **params):
            return c.patch("/api/v1/nodes/n1", content=json.dumps(body), headers={"Content-Type": ctype},
                           params=params)
        r = patch("application/strategic-merge-patch+json",
                  {"metadata": {"labels": {"b": "2", "a": None}}, "spec": {"unschedulable": True}})
        assert r.status_code == 200 and r.json()["metadata"]["labels"].get("b") == "2"
        assert "a" not in r.json()["metadata"]["labels"] and r.json()["spec"]["unschedulable"] is True
        r = patch("application/merge-patch+json", {"spec": {"taints": None, "unschedulable": None}})
        assert r.status_code == 200 and "taints" not in r.json()["spec"] and "unschedulable" not in r.json()["spec"]
        rv = r.json()["metadata"]["resourceVersion"]
        r = patch("application/json-patch+json", [{"op": "add", "path": "/metadata/annotations/x", "value": "y"},
                                                  {"op": "test", "path": "/metadata/labels/b", "value": "2"}])
        assert r.status_code == 200 and r.json()["metadata"]["annotations"]["x"] == "y"
        assert int(r.json()["metadata"]["resourceVersion"]) > int(rv)
        r = patch("application/json-patch+json", [{"op": "test", "path": "/metadata/labels/b", "value": "3"}])
        assert r.status_code == 422
        r = patch("text/plain", {"x": 1})
        assert r.status_code == 415 and r.json()["reason"] == "UnsupportedMediaType"
        r = patch("application/merge-patch+json", {"metadata": {"resourceVersion": "1"}, "spec": {"unschedulable": True}})
        assert r.status_code == 409 and r.json()["reason"] == "Conflict"
        before = kube.get_obj("Node", "n1")
        r = patch("application/merge-patch+json", {"spec": {"unschedulable": True}}, dryRun="All")
        assert r.status_code == 200 and r.json()["spec"]["unschedulable"] is True
        assert kube.get_obj("Node", "n1") == before

        base = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "lock"},
                 "spec": {"holderIdentity": "a", "leaseDurationSeconds": 30,
                          "acquireTime": "2025-01-01T00:00:00.000000Z", "renewTime": "2025-01-01T00:00:00.000000Z"}}
        r = c.post(base, json={**lease, "spec": {**lease["spec"], "renewTime": "2025-01-01T00:00:00Z"}})
        assert r.status_code == 400 and "2006-01-02T15:04:05.000000Z07:00" in r.json()["message"]
        r = c.post(base, json=lease, params={"dryRun": "All"})
        assert r.status_code == 201 and kube.get_obj("Lease", "lock") is None
        r = c.post(base, json=lease)
        assert r.status_code == 201
        got = r.json()
        assert got["metadata"]["uid"] and got["metadata"]["creationTimestamp"]
        r = c.post(base, json=lease)
        assert r.status_code == 409 and r.json()["message"] == 'leases.coordination.k8s.io "lock" already exists'
        r = c.put(f"{base}/lock", json=lease)
        assert r.status_code == 422 and "must be specified for an update" in r.json()["message"]
        upd = {**got, "spec": {**got["spec"], "holderIdentity": "b"}}
        r = c.put(f"{base}/lock", json=upd)
        assert r.status_code == 200 and r.json()["spec"]["holderIdentity"] == "b"
        r = c.put(f"{base}/lock", json=upd)  # the old resourceVersion again
        assert r.status_code == 409 and r.json()["message"] == (
            'Operation cannot be fulfilled on leases.coordination.k8s.io "lock": the object has been modified; '
            'please apply your changes to the latest version and try again')
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}
        assert c.post("/api/v1/namespaces/default/configmaps", json=cm).status_code == 201
        r = c.put("/api/v1/namespaces/default/configmaps/c", json={**cm, "data": {"k": "w"}})
        assert r.status_code == 200  # configmaps allow unconditional updates
        assert c.post("/api/v1/namespaces/nope/configmaps", json=cm).status_code == 404


def test_patch_functions():
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None}, "l": [2]}) == {"a": {"c": 2}, "l": [2]}
    t = {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]},
         "metadata": {"finalizers": ["f1"]}}
    p = {"spec": {"containers": [{"name": "b", "image": "z"}, {"name": "c", "image": "w"}]},
         "metadata": {"finalizers": ["f2"]}}
    out = strategic_merge_patch(t, p)
    assert [(x["name"], x["image"]) for x in out["spec"]["containers"]] == [("a", "x"), ("b", "z"), ("c", "w")]
    assert out["metadata"]["finalizers"] == ["f1", "f2"]
    out = strategic_merge_patch(t, {"spec": {"containers": [{"name": "a", "$patch": "delete"}]}})
    assert [x["name"] for x in out["spec"]["containers"]] == ["b"]
    doc = json_patch({"a": [1, 2]}, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "remove", "path": "/a/0"},
                                     {"op": "move", "from": "/a", "path": "/b"}, {"op": "copy", "from": "/b", "path": "/c"}])
    assert doc == {"b": [2, 3], "c": [2, 3]}
    with pytest.raises(KeyError):
        json_patch({}, [{"op": "replace", "path": "/x", "value": 1}])


def test_pagination_and_selectors(kube):
    for i in range(7):
        kube.add_node(f"n{i}", labels={"pool": "a" if i % 2 else "b"})
    kube.add_node("n9", unschedulable=True)
    with client(kube) as c:
        names, cont, pages = [], None, 0
        while True:
            q = {"limit": 3, **({"continue": cont} if cont else {})}
            d = c.get("/api/v1/nodes", params=q).json()
            pages += 1
            names += [n["metadata"]["name"] for n in d["items"]]
            assert int(d["metadata"]["resourceVersion"]) > 0 and d["kind"] == "NodeList"
            cont = d["metadata"].get("continue")
            if not cont:
                break
            assert d["metadata"]["remainingItemCount"] == 8 - len(names)
        assert pages == 3 and names == sorted(names) and len(names) == 8
        d = c.get("/api/v1/nodes", params={"labelSelector": "pool=a"}).json()
        assert [n["metadata"]["name"] for n in d["items"]] == ["n1", "n3", "n5"]
        d = c.get("/api/v1/nodes", params={"labelSelector": "pool notin (a),pool"}).json()
        assert len(d["items"]) == 4
        d = c.get("/api/v1/nodes", params={"fieldSelector": "spec.unschedulable==true"}).json()
        assert [n["metadata"]["name"] for n in d["items"]] == ["n9"]
        d = c.get("/api/v1/nodes", params={"fieldSelector": "metadata.name!=n0"}).json()
        assert len(d["items"]) == 7
        assert c.get("/api/v1/nodes", params={"labelSelector": "a in ("}).status_code == 400
        assert c.get("/api/v1/nodes", params={"continue": "!!"}).status_code == 400


def test_graceful_deletion_stuck_pods_and_controllers(kube):
    kube.add_node("a")
    kube.add_node("b", unschedulable=True)
    kube.add_node("c")
    kube.add_replicaset("rs", "default", 1, {"app": "r"})
    kube.add_pod("r0", node="a", labels={"app": "r"}, owner=("ReplicaSet", "rs"))
    kube.add_daemonset("ds", "kube-system", {"app": "d"})
    kube.add_pod("d-a", "kube-system", node="a", labels={"app": "d"}, owner=("DaemonSet", "ds"))
    kube.add_pod("stuck", node="a", annotations={"test.katactl.io/stuck-terminating": "true"})
    kube.add_pod("plain", node="a")
    with client(kube) as c:
        r = c.request("DELETE", "/api/v1/namespaces/default/pods/plain",
                      json={"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "wrong"}})
        assert r.status_code == 409 and "Precondition failed: UID in precondition: wrong" in r.json()["message"]
        r = c.delete("/api/v1/namespaces/default/pods/plain")  # the pod's own 30 s, scaled by 0.01
        assert r.status_code == 200 and r.json()["metadata"]["deletionGracePeriodSeconds"] == 30
        assert kube.get_obj("Pod", "plain")["metadata"]["deletionTimestamp"]
        assert wait_for(lambda: kube.get_obj("Pod", "plain") is None)
        r = c.delete("/api/v1/namespaces/default/pods/stuck", params={"gracePeriodSeconds": 1})
        assert r.status_code == 200
        r = c.delete("/api/v1/namespaces/default/pods/r0", params={"gracePeriodSeconds": 0})
        assert r.status_code == 200 and kube.get_obj("Pod", "r0") is None
        [new] = [p for p in kube.list_objs("Pod", "default") if p["metadata"]["labels"].get("app") == "r"]
        assert new["metadata"]["name"].startswith("rs-") and new["spec"]["nodeName"] == "a"
        assert new["metadata"]["ownerReferences"][0]["name"] == "rs"
        c.patch("/api/v1/nodes/a", json={"spec": {"unschedulable": True}},
                headers={"Content-Type": "application/merge-patch+json"})
        c.delete(f"/api/v1/namespaces/default/pods/{new['metadata']['name']}", params={"gracePeriodSeconds": 0})
        [newer] = [p for p in kube.list_objs("Pod", "default") if p["metadata"]["labels"].get("app") == "r"]
        assert newer["spec"]["nodeName"] == "c"  # never the cordoned a or b
        c.delete("/api/v1/namespaces/kube-system/pods/d-a", params={"gracePeriodSeconds": 0})
        [ds] = kube.list_objs("Pod", "kube-system")
        assert ds["spec"]["nodeName"] == "a" and ds["metadata"]["name"] != "d-a"
        r = c.delete("/api/v1/namespaces/default/pods/ghost")
        assert r.status_code == 404 and r.json()["message"] == 'pods "ghost" not found'
    time.sleep(0.1)  # ten times the scaled grace: a stuck pod stays Terminating
    assert kube.get_obj("Pod", "stuck")["metadata"]["deletionTimestamp"]


def test_faults(kube):
    kube.add_node("n1")
    with client(kube) as c:
        kube.inject("GET", r"^/api/v1/nodes", status=503, times=1, retry_after=2)
        r = c.get("/api/v1/nodes")
        assert r.status_code == 503 and r.headers["Retry-After"] == "2" and r.json()["code"] == 503
        assert c.get("/api/v1/nodes").status_code == 200
        kube.inject(None, r"n1", status=500, body={"custom": True})
        assert c.get("/api/v1/nodes/n1").json() == {"custom": True}
        kube.cut(r"^/api/v1/nodes\?", times=1)
        with pytest.raises(httpx.HTTPError):
            c.get("/api/v1/nodes?limit=5")
        assert c.get("/api/v1/nodes?limit=5").status_code == 200
        kube.delay("/version", 0.05, times=1)
        assert c.get("/version").status_code == 200
    logged = [q for q in kube.requests if q["path"].startswith("/api/v1/nodes?limit=5")]
    assert len(logged) == 2 and logged[0]["headers"]["Authorization"].startswith("Bearer ")
