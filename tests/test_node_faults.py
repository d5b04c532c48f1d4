"""node cordon/uncordon/drain/check through API faults a real kube-apiserver produces, against
the stand-in (tests/kubeserver.py) over HTTPS with real katactl: one node's failure stays that
node's, eviction answers handled as kubectl's pkg/drain handles them (409 fatal for the pod;
429 and a 5xx carrying Retry-After retried, as client-go does), a PATCH answered 5xx after it
landed is read back, a cordon someone else made again is theirs, a check that could not run
says so, and an interrupted drain reports what it did."""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from tests.test_node_safety import ds_blocked_node, node_cli, record, unschedulable  # noqa: F401

EVICT_500 = r"^/api/v1/pods\?.*nodeName%3Dn1.*resourceVersion=0|^/api/v1/pods\?.*resourceVersion=0.*nodeName%3Dn1"




def pods_on(kube, node) -> set[str]:
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in kube.list_objs("Pod")
            if p["spec"].get("nodeName") == node}


def audit_entries(home) -> list[dict]:
    p = home / "state" / "katactl" / "audit.log"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def error_of(r) -> dict:
    """The one node's error of -o json: the Error object, or the list's only entry in errors."""
    d = r.json()
    return d if d.get("kind") == "Error" else d["errors"][0]["error"]


def node_with_pod(kube, n: str, pod: str | None = None) -> str:
    """A node running one ReplicaSet pod (its replacement goes to another schedulable node)."""
    pod = pod or f"web-{n}"
    kube.add_node(n)
    kube.add_replicaset(f"rs-{n}", "default", 1, {"app": n})
    kube.add_pod(pod, "default", n, {"app": n}, owner=("ReplicaSet", f"rs-{n}"))
    return pod


def foreign_set_unschedulable(kube, node: str, value: bool) -> None:
    """What kubectl cordon/uncordon send (a strategic merge patch of spec.unschedulable, field
    manager kubectl-cordon), over HTTPS as any other client."""
    with httpx.Client(verify=ssl.create_default_context(cafile=kube.ca_path)) as c:
        r = c.patch(f"{kube.url}/api/v1/nodes/{node}", params={"fieldManager": "kubectl-cordon"},
                    headers={"Authorization": f"Bearer {kube.tokens['admin']}",
                             "Content-Type": "application/strategic-merge-patch+json",
                             "User-Agent": "kubectl/v1.33.1 (linux/amd64) kubernetes/8adc0f0"},
                    content=json.dumps({"spec": {"unschedulable": True if value else None}}))
        r.raise_for_status()


# -- one node's failure is that node's ----------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--parallel", "2"]])
def test_one_nodes_api_errors_never_stop_the_other_nodes(cli, kube, kc, extra):
    """Every wait LIST of n1's pods answers 500: n1 fails (restored), n2 is drained, exit 4,
    no fake interrupt. n2's pod takes 6 s to go (600 s grace, scaled): in parallel, n2 is still
    waiting when n1 fails."""
    for n in ("n1", "n2"):
        node_with_pod(kube, n)
    kube.store[("pods", "default", "web-n2")]["spec"]["terminationGracePeriodSeconds"] = 600
    kube.add_node("a-spare")  # replacements go there (the stand-in's scheduler: the first by name)
    kube.inject("GET", EVICT_500, status=500, times=None)
    r = node_cli(cli, kc, "drain", "n1", "n2", *extra, "-o", "json")
    assert r.exit_code == 4, r.stdout + r.stderr
    d = r.json()
    assert [i["name"] for i in d["items"]] == ["n2"] and d["items"][0]["evicted"] == ["default/web-n2"]
    assert [(e["node"], e["error"]["exitCode"]) for e in d["errors"]] == [("n1", 1)]
    assert pods_on(kube, "n2") == set() and unschedulable(kube, "n2")
    assert not unschedulable(kube, "n1")  # restored: it was schedulable before


# -- evictions answered as kubectl's pkg/drain answers them ---------------------------------------

def test_eviction_answered_409_fails_that_pod_as_kubectl_does(cli, kube, kc):
    """kubectl (pkg/drain/drain.go evictPods): an error other than NotFound, 429 or a terminating
    namespace's 403 ends that pod's eviction. A 409 is no proof the pod went: katactl sent no
    precondition."""
    pod = node_with_pod(kube, "kb")
    kube.add_node("spare")
    kube.inject("POST", rf"/pods/{pod}/eviction", status=409, times=1)
    r = node_cli(cli, kc, "drain", "kb", "--timeout", "20s", "-o", "json")
    assert r.exit_code == 1, r.stdout + r.stderr
    assert f"default/{pod}: injected fault (409)" in error_of(r)["message"], r.stdout
    assert pods_on(kube, "kb") == {f"default/{pod}"} and not unschedulable(kube, "kb")
    assert len([q for q in kube.requests if q["path"].endswith("/eviction")]) == 1


def test_eviction_answered_5xx_with_retry_after_is_sent_again(cli, kube, kc):
    """client-go (rest/request.go checkWait) retries a 5xx carrying Retry-After, as kubectl's
    eviction does; eviction.go answers so (504, Retry-After 10) after PDB update conflicts."""
    pod = node_with_pod(kube, "kb")
    kube.add_node("spare")
    kube.inject("POST", rf"/pods/{pod}/eviction", status=503, retry_after=1, times=1)
    r = node_cli(cli, kc, "drain", "kb", "--timeout", "30s", "-o", "json")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.json()["items"][0]["evicted"] == [f"default/{pod}"]
    assert len([q for q in kube.requests if q["path"].endswith("/eviction")]) == 2
    assert "will retry after 1s" in r.stderr


#: what API Priority and Fairness answers a request it throttles (apiserver pkg/endpoints/handlers/
#: responsewriters tooManyRequests): reason TooManyRequests, no DisruptionBudget cause, Retry-After
APF_429 = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "Too many requests, please try again later.", "reason": "TooManyRequests",
           "details": {"retryAfterSeconds": 1}, "code": 429}


def test_throttled_evictions_are_not_blamed_on_a_budget_and_wait_the_delay_said(cli, kube, kc, kubectl_133):
    """A 429 without a DisruptionBudget cause is throttling, not a budget (eviction.go marks its
    refusals so): the server's words, as kubectl says them ("error when evicting pods/%q -n %q
    (will retry after 5s): ..."), with the Retry-After actually waited; nothing listed as blocked.
    kubectl 1.33 (client-go honouring Retry-After) sends its eviction as many times."""
    kube.add_node("spare")
    twin = node_with_pod(kube, "ka")
    kube.inject("POST", rf"/pods/{twin}/eviction", status=429, retry_after=1, times=2, body=APF_429)
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "drain", "ka", "--timeout", "30s"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "budget" not in p.stderr, p.stderr
    assert len([q for q in kube.requests if q["path"].endswith(f"/pods/{twin}/eviction")]) == 3
    pod = node_with_pod(kube, "kb")
    kube.inject("POST", rf"/pods/{pod}/eviction", status=429, retry_after=1, times=2, body=APF_429)
    r = node_cli(cli, kc, "drain", "kb", "--timeout", "30s", "-o", "json")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert r.json()["items"][0]["evicted"] == [f"default/{pod}"] and r.json()["items"][0]["blocked"] == []
    assert f'error when evicting pods/"{pod}" -n "default" (will retry after 1s): Too many requests, please ' \
           "try again later." in r.stderr, r.stderr
    assert r.stderr.count("will retry after") == 1 and "budget" not in r.stderr, r.stderr
    assert len([q for q in kube.requests if q["path"].endswith(f"/pods/{pod}/eviction")]) == 3
    # never answered otherwise: the timeout names the throttling, not a budget
    pod = node_with_pod(kube, "kc")
    kube.inject("POST", rf"/pods/{pod}/eviction", status=429, retry_after=1, times=100, body=APF_429)
    r = node_cli(cli, kc, "drain", "kc", "--timeout", "2s", "-o", "json")
    assert r.exit_code == 6, r.stdout + r.stderr
    err = error_of(r)
    assert f"default/{pod}: timed out (throttled by the API server: Too many requests, please try again " \
           "later.)" in err["message"] and "budget" not in err["message"], err
    assert err["details"]["drain"]["blocked"] == []


def test_a_budget_refusal_says_the_delay_it_waits(cli, kube, kc):
    """eviction.go's 429 for a budget allowing no disruption carries no Retry-After: kubectl's
    5 s; for a budget the controller has not observed yet, Retry-After 10: the line says the
    delay waited, with the budget's own words (also under blocked)."""
    pod = node_with_pod(kube, "kb")
    kube.add_pdb("pdb-kb", "default", {"app": "kb"}, min_available=1)
    r = node_cli(cli, kc, "drain", "kb", "--timeout", "1s", "-o", "json")
    assert r.exit_code == 6, r.stdout + r.stderr
    assert f"eviction of default/{pod} blocked: The disruption budget pdb-kb needs 1 healthy pods and has 1 " \
           "currently (will retry after 5s)" in r.stderr, r.stderr
    assert error_of(r)["details"]["drain"]["blocked"][0]["budget"].startswith("The disruption budget pdb-kb")
    pod = node_with_pod(kube, "kn")
    kube.pdb_controller_paused = True  # generation 1, observedGeneration 0
    kube.add_pdb("pdb-kn", "default", {"app": "kn"}, min_available=1)
    r = node_cli(cli, kc, "drain", "kn", "--timeout", "1s", "-o", "json")
    assert r.exit_code == 6, r.stdout + r.stderr
    assert f"eviction of default/{pod} blocked: The disruption budget pdb-kn is still being processed by the " \
           "server. (will retry after 10s)" in r.stderr, r.stderr


@pytest.mark.parametrize("status,retry_after,rc", [(409, None, 1), (503, 1, 0)])
def test_eviction_faults_end_as_with_kubectl_1_33(cli, kube, kc, kubectl_133, status, retry_after, rc):
    """The same fault on twin nodes' evictions: kubectl 1.33 drains ka, katactl kb."""
    for n in ("ka", "kb"):
        node_with_pod(kube, n)
    kube.add_node("a-spare")
    kube.inject("POST", r"/pods/web-ka/eviction", status=status, retry_after=retry_after, times=1)
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "drain", "ka", "--timeout", "20s"], capture_output=True,
                       text=True, timeout=60)
    kube.inject("POST", r"/pods/web-kb/eviction", status=status, retry_after=retry_after, times=1)
    r = node_cli(cli, kc, "drain", "kb", "--timeout", "20s")
    assert (p.returncode, r.exit_code) == (rc, rc), (p.stderr, r.stderr)
    assert {x.replace("ka", "kb") for x in pods_on(kube, "ka")} == pods_on(kube, "kb")
    evictions = [q["path"].split("/")[-2] for q in kube.requests if q["path"].endswith("/eviction")]
    assert evictions.count("web-ka") == evictions.count("web-kb")


def test_eviction_answered_5xx_without_retry_after_stays_fatal(cli, kube, kc):
    pod = node_with_pod(kube, "kb")
    kube.inject("POST", rf"/pods/{pod}/eviction", status=503, times=1)
    r = node_cli(cli, kc, "drain", "kb", "--timeout", "30s")
    assert r.exit_code == 1, r.stderr
    assert len([q for q in kube.requests if q["path"].endswith("/eviction")]) == 1


def test_eviction_403_that_is_not_rbac_is_that_pods_failure_not_an_auth_error(cli, kube, kc):
    """eviction.go answers 403 'pdb disruptions allowed is negative': the pod fails (exit 1, as
    kubectl's rc 1), in the server's words, naming no user."""
    pod = node_with_pod(kube, "kb")
    kube.add_pdb("pdb", "default", {"app": "kb"}, max_unavailable=1)
    kube.pdb_controller_paused = True
    kube.store[("poddisruptionbudgets", "default", "pdb")]["status"]["disruptionsAllowed"] = -1
    r = node_cli(cli, kc, "drain", "kb", "-o", "json")
    assert r.exit_code == 1, r.stdout + r.stderr
    msg = error_of(r)["message"]
    assert "pdb disruptions allowed is negative" in msg and "user" not in msg.lower(), msg
    assert pods_on(kube, "kb") == {f"default/{pod}"} and not unschedulable(kube, "kb")


def test_eviction_denied_by_rbac_is_still_exit_7(cli, kube, kc):
    node_with_pod(kube, "kb")
    kube.deny("create", "pods/eviction")
    r = node_cli(cli, kc, "drain", "kb")
    assert r.exit_code == 7, r.stderr
    assert 'cannot create resource "pods/eviction"' in r.stderr


# -- a mutation answered 5xx after it landed ------------------------------------------------------

def test_uncordon_answered_504_after_it_landed_reports_the_change_and_audits(cli, kube, kc, _isolated_home):
    """kube-apiserver's timeout filter answers 504 while the write lands; the client sends the
    PATCH again, which meets 409: the node, read back without katactl's record, says it landed."""
    kube.add_node("n1")
    assert node_cli(cli, kc, "cordon", "n1").exit_code == 0
    kube.inject("PATCH", r"^/api/v1/nodes/n1", status=504, applied=True, times=1)
    r = node_cli(cli, kc, "uncordon", "n1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True and r.json()["items"][0]["message"] == "uncordoned"
    assert not unschedulable(kube, "n1") and record(kube, "n1") is None
    assert [(e["action"], e["result"], e.get("changed")) for e in audit_entries(_isolated_home)] == \
        [("node.cordon", "requested", None), ("node.cordon", "ok", True),
         ("node.uncordon", "requested", None), ("node.uncordon", "ok", True)]


@pytest.mark.parametrize("status", [503, 504])
def test_uncordon_of_a_kubectl_cordon_whose_patch_did_not_land_fails_and_audits_so(cli, kube, kc, _isolated_home,
                                                                                  status):
    """A node kubectl cordoned has no katactl record: its absence on the re-read proves
    nothing. Every PATCH answered 5xx without landing: still cordoned, so exit 1, no
    changed, the audit entry an error."""
    kube.add_node("n1")
    foreign_set_unschedulable(kube, "n1", True)
    kube.inject("PATCH", r"^/api/v1/nodes/n1", status=status, times=50)
    r = node_cli(cli, kc, "uncordon", "n1", "--force", "-o", "json")
    assert r.exit_code == 1, r.stdout + r.stderr
    assert "still cordoned" in r.stderr and f"HTTP {status}" in r.stderr, r.stderr
    assert unschedulable(kube, "n1")
    [req, entry] = audit_entries(_isolated_home)  # the PATCH went out: "requested", then the outcome
    assert req["result"] == "requested"
    assert (entry["action"], entry["result"], entry.get("changed")) == ("node.uncordon", "error", None)
    assert "still cordoned" in entry["error"]


def test_uncordon_of_a_kubectl_cordon_meeting_409_is_sent_again(cli, kube, kc, _isolated_home):
    """One 409 (the node changed since the read): nothing landed; read again, sent again."""
    kube.add_node("n1")
    foreign_set_unschedulable(kube, "n1", True)
    kube.inject("PATCH", r"^/api/v1/nodes/n1", status=409, times=1)
    r = node_cli(cli, kc, "uncordon", "n1", "--force", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True and not unschedulable(kube, "n1")
    assert len([q for q in kube.requests if q["method"] == "PATCH" and "kubectl-cordon" not in q["path"]]) == 2


def test_uncordon_refuses_a_kubectl_cordon_naming_its_owner(cli, kube, kc):
    """kubectl cordon (no katactl record; managedFields: kubectl-cordon owns spec.unschedulable):
    refused, exit 5, naming the manager, nothing sent; another node katactl cordoned is still
    uncordoned (exit 4: partial)."""
    kube.add_node("n1")
    foreign_set_unschedulable(kube, "n1", True)
    kube.add_node("n2")
    assert node_cli(cli, kc, "cordon", "n2").exit_code == 0
    kube.requests.clear()
    r = node_cli(cli, kc, "uncordon", "n1", "-o", "json")
    assert r.exit_code == 5, r.stdout + r.stderr
    err = error_of(r)
    assert (err["code"], err["exitCode"]) == ("Refused", 5) and "--force" in err["hint"]
    assert err["message"].startswith("node n1 is cordoned by kubectl-cordon at "), err
    assert unschedulable(kube, "n1") and not [q for q in kube.requests if q["method"] != "GET"]
    r = node_cli(cli, kc, "uncordon", "n1", "n2", "-o", "json")
    assert r.exit_code == 4, r.stdout + r.stderr
    assert [i["name"] for i in r.json()["items"]] == ["n2"] and not unschedulable(kube, "n2")
    assert [e["node"] for e in r.json()["errors"]] == ["n1"] and unschedulable(kube, "n1")


def test_uncordon_refuses_a_kubectl_cordon_whose_record_is_unreadable(cli, kube, kc):
    """An unreadable katactl.io/cordon record proves nothing, as node check reads it: kubectl
    cordon (managedFields: kubectl-cordon) is refused as without a record, exit 5, nothing sent;
    --force uncordons and removes the record."""
    kube.add_node("n1", annotations={"katactl.io/cordon": "{not json"})
    foreign_set_unschedulable(kube, "n1", True)
    [f] = [f for f in node_cli(cli, kc, "check", "n1", "-o", "json").json()["items"] if f["check"] == "node-cordoned"]
    assert f["message"].startswith("node is already cordoned not by katactl (cordoned by kubectl-cordon"), f
    kube.requests.clear()
    r = node_cli(cli, kc, "uncordon", "n1", "-o", "json")
    assert r.exit_code == 5, r.stdout + r.stderr
    err = error_of(r)
    assert (err["code"], err["exitCode"]) == ("Refused", 5) and "--force" in err["hint"]
    assert err["message"].startswith("node n1 is cordoned by kubectl-cordon at "), err
    assert "record unreadable: not by katactl" in err["message"], err
    assert unschedulable(kube, "n1") and not [q for q in kube.requests if q["method"] != "GET"]
    r = node_cli(cli, kc, "uncordon", "n1", "--force")
    assert r.exit_code == 0, r.stderr
    assert not unschedulable(kube, "n1") and record(kube, "n1") is None


def test_uncordon_whose_record_was_removed_meanwhile_is_not_taken_for_landed(cli, kube, kc, monkeypatch):
    """katactl's cordon; before our uncordon PATCH arrives someone removes the record only
    (`kubectl annotate node n1 katactl.io/cordon-`): our PATCH meets 409 (stale
    resourceVersion). The record is gone but the node still cordoned: not ours to claim;
    decided anew (no record: as kubectl uncordon) and sent again."""
    kube.add_node("n1")
    assert node_cli(cli, kc, "cordon", "n1").exit_code == 0
    orig = kube.handle
    done: list[int] = []

    def handle(method, path, query, body, user, accept):
        if method == "PATCH" and path == "/api/v1/nodes/n1" and not done:
            done.append(1)
            orig("PATCH", path, {}, ("application/merge-patch+json",
                                     {"metadata": {"annotations": {"katactl.io/cordon": None}}}), "admin", "")
        return orig(method, path, query, body, user, accept)

    monkeypatch.setattr(kube, "handle", handle)
    r = node_cli(cli, kc, "uncordon", "n1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True
    assert not unschedulable(kube, "n1") and record(kube, "n1") is None
    assert len([q for q in kube.requests if q["method"] == "PATCH"]) == 3  # cordon, 409, sent again


def test_drain_restore_answered_504_after_it_landed_is_a_restore(cli, kube, kc, _isolated_home, monkeypatch):
    ds_blocked_node(kube, monkeypatch)  # refused after the cordon: exit 5
    kube.inject("PATCH", r"^/api/v1/nodes/n1", status=504, applied=True, times=1,
                match=lambda b: (b.get("metadata") or {}).get("annotations", {}).get("katactl.io/cordon", "") is None)
    r = node_cli(cli, kc, "drain", "n1", "-o", "json")
    assert r.exit_code == 5, r.stderr
    assert error_of(r)["details"]["drain"]["restored"] is True and "not this run's" not in r.stderr
    assert not unschedulable(kube, "n1") and record(kube, "n1") is None
    [req, entry] = audit_entries(_isolated_home)
    assert req["result"] == "requested" and entry["restored"] is True


# -- a cordon someone made again is theirs ------------------------------------------------------------

def test_a_cordon_made_again_by_someone_else_is_theirs_everywhere(cli, kube, kc):
    """katactl cordon -> kubectl uncordon -> another SRE's kubectl cordon: katactl's record is
    still on the node, but managedFields name kubectl-cordon as the owner of spec.unschedulable.
    list does not claim it, uncordon refuses (exit 5) without --force, cordon records it as
    someone else's."""
    kube.add_node("n1")
    assert node_cli(cli, kc, "cordon", "n1").exit_code == 0
    foreign_set_unschedulable(kube, "n1", False)
    foreign_set_unschedulable(kube, "n1", True)
    assert record(kube, "n1")["wasUnschedulable"] is False  # kubectl leaves katactl's record
    r = node_cli(cli, kc, "list", "-o", "json")
    assert r.json()["items"][0]["cordonedBy"] is None, r.stdout
    r = node_cli(cli, kc, "uncordon", "n1")
    assert r.exit_code == 5 and "kubectl-cordon" in r.stderr, r.stderr
    assert unschedulable(kube, "n1")
    r = node_cli(cli, kc, "cordon", "n1", "-o", "json")
    assert r.exit_code == 0 and r.json()["changed"] is True, r.stdout
    assert "not by katactl" in r.json()["items"][0]["message"]
    rec = record(kube, "n1")
    assert rec["wasUnschedulable"] is True and rec["cordonedBefore"].startswith("kubectl-cordon")
    assert node_cli(cli, kc, "list", "-o", "json").json()["items"][0]["cordonedBy"].startswith("kubectl-cordon")
    assert node_cli(cli, kc, "uncordon", "n1").exit_code == 5  # cordoned before katactl's, now
    r = node_cli(cli, kc, "uncordon", "n1", "--force")
    assert r.exit_code == 0, r.stderr
    assert not unschedulable(kube, "n1") and record(kube, "n1") is None


def test_check_reads_the_cordon_record_as_list_and_uncordon_do(cli, kube, kc):
    """kubectl cordon, then katactl cordon (it records the cordon as someone else's): list names
    kubectl, uncordon refuses, and check does not call it katactl's."""
    kube.add_node("n1")
    foreign_set_unschedulable(kube, "n1", True)
    assert node_cli(cli, kc, "cordon", "n1", "--reason", "maint").exit_code == 0
    assert node_cli(cli, kc, "list", "-o", "json").json()["items"][0]["cordonedBy"].startswith("kubectl-cordon")
    assert node_cli(cli, kc, "uncordon", "n1").exit_code == 5
    [f] = [f for f in node_cli(cli, kc, "check", "n1", "-o", "json").json()["items"] if f["check"] == "node-cordoned"]
    assert f["message"].startswith("node is already cordoned not by katactl (cordoned by kubectl-cordon"), f
    assert "maint" in f["message"]
    # without a record: who did, from managedFields
    kube.add_node("n2")
    foreign_set_unschedulable(kube, "n2", True)
    [f] = [f for f in node_cli(cli, kc, "check", "n2", "-o", "json").json()["items"] if f["check"] == "node-cordoned"]
    assert f["message"].startswith("node is already cordoned not by katactl (cordoned by kubectl-cordon"), f


# -- check: what it could not read ---------------------------------------------------------------------

def test_check_that_may_not_list_budgets_does_not_pass(cli, kube, kc):
    node_with_pod(kube, "n1")
    kube.deny("list", "poddisruptionbudgets")
    r = node_cli(cli, kc, "check", "n1", "-o", "json")
    assert r.exit_code == 8, r.stdout + r.stderr
    [f] = [f for f in r.json()["items"] if f["check"] == "pdb-unknown"]
    assert f["severity"] == "high" and "poddisruptionbudgets" in f["message"]


def test_check_that_may_not_list_runtimeclasses_says_how_it_told_kata_pods(cli, kube, kc):
    kube.add_node("n1")
    kube.add_runtimeclass("kata-qemu", "kata-qemu")
    kube.add_pod("vm", "default", "n1", {"app": "vm"}, owner=None, runtime_class="kata-qemu")
    kube.deny("list", "runtimeclasses")
    r = node_cli(cli, kc, "check", "n1", "--fail-on", "critical", "-o", "json")
    assert r.exit_code == 0, r.stdout + r.stderr
    checks = {f["check"]: f for f in r.json()["items"]}
    assert checks["runtimeclass-unknown"]["severity"] == "low"
    assert "kata-pod" in checks or "kata-overhead-missing" in checks  # still recognised by its name


# -- dry run reports the would-be change --------------------------------------------------------------

@pytest.mark.parametrize("dry", ["--dry-run", "--dry-run=server"])
def test_drain_dry_run_reports_changed_as_cordon_dry_run_does(cli, kube, kc, dry):
    node_with_pod(kube, "n1")
    c = node_cli(cli, kc, "cordon", "n1", dry, "-o", "json").json()
    d = node_cli(cli, kc, "drain", "n1", dry, "-o", "json").json()
    assert (c["changed"], c["dryRun"]) == (True, True)
    assert (d["changed"], d["dryRun"]) == (True, True), d
    assert not unschedulable(kube, "n1") and pods_on(kube, "n1") == {"default/web-n1"}


# -- an interrupted drain says what it did --------------------------------------------------------------

def test_interrupted_drain_json_carries_the_drain_and_audits_interrupted(kube, kc, _isolated_home):
    pod = node_with_pod(kube, "n1")
    kube.add_pdb("pdb", "default", {"app": "n1"}, min_available=1)  # blocks the eviction
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "-o", "json", "node", "drain",
                          "n1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while not any(q["path"].endswith(f"/pods/{pod}/eviction") for q in kube.requests):
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    d = json.loads(out)
    assert d["kind"] == "Error" and d["exitCode"] == 130
    assert d["details"]["drain"]["restored"] is True and d["details"]["drain"]["blocked"], d
    assert not unschedulable(kube, "n1")
    [req, entry] = audit_entries(_isolated_home)
    assert req["result"] == "requested" and entry["result"] == "interrupted" and entry["restored"] is True


# -- the wait for pods to go --------------------------------------------------------------------------

def test_a_pod_missing_from_a_lagging_watch_cache_is_not_gone_until_a_consistent_read_says_so(cli, kube, kc):
    """The per-second wait LIST (resourceVersion=0) is served from the watch cache; one behind
    etcd misses a pod created just before the drain. The drain picked its pods from a
    consistent list, so such a pod is evicted, and must be waited for, not counted gone."""
    kube.add_node("n1")
    kube.add_node("a-spare")
    kube.lag_watch_cache()  # the cache has not seen the pod below
    pod = "web-n1"
    kube.add_replicaset("rs-n1", "default", 1, {"app": "n1"})
    kube.add_pod(pod, "default", "n1", {"app": "n1"}, owner=("ReplicaSet", "rs-n1"))
    kube.store[("pods", "default", pod)]["spec"]["terminationGracePeriodSeconds"] = 300  # 3 s, scaled
    r = node_cli(cli, kc, "drain", "n1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"][0]["evicted"] == [f"default/{pod}"]
    assert kube.get_obj("Pod", pod) is None, "the drain ended while the pod was still terminating"


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_interrupted_drain_of_several_nodes_says_what_became_of_each(kube, kc, _isolated_home, parallel):
    """One after another: n1 is interrupted, n2 not started (never touched). In parallel: both
    interrupted and restored. -o json says so per node (details.nodes)."""
    for n in ("n1", "n2"):
        node_with_pod(kube, n)
        kube.add_pdb(f"pdb-{n}", "default", {"app": n}, min_available=1)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "-o", "json", "node", "drain",
                          "n1", "n2", "--parallel", parallel], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    want = 1 if parallel == "1" else 2
    try:
        deadline = time.monotonic() + 30
        while len({q["path"] for q in kube.requests if q["path"].endswith("/eviction")}) < want:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    doc = json.loads(out)
    assert [e["node"] for e in doc["details"]["nodes"]] == ["n1", "n2"]
    nodes = {e["node"]: e for e in doc["details"]["nodes"]}
    # an interrupted node's entry has the shape of an errors[] entry (docs/output.md)
    assert set(nodes["n1"]) == {"node", "error"}
    assert (nodes["n1"]["error"]["code"], nodes["n1"]["error"]["exitCode"]) == ("Interrupted", 130)
    assert nodes["n1"]["error"]["details"]["drain"]["restored"] is True
    if parallel == "1":
        assert nodes["n2"] == {"node": "n2", "notStarted": True}
        assert [(e["target"], e["result"]) for e in audit_entries(_isolated_home)] == \
            [("n1", "requested"), ("n1", "interrupted")]
    else:
        assert nodes["n2"]["error"]["details"]["drain"]["restored"] is True
    assert not unschedulable(kube, "n1") and not unschedulable(kube, "n2")
