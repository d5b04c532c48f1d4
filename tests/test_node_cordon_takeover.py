"""node cordon over a cordon katactl made for a drain or a rollout (which undo their own
cordon by its record's id): an operator's cordon takes the record over, so it outlives them;
over an operator's standing cordon it stays idempotent. Against the kube-apiserver stand-in."""
from __future__ import annotations

import json

from katactl.nodes import CORDON_ANNOTATION

ROLLOUT_REC = {"by": "ci@runner", "at": "2026-01-01T00:00:00Z", "reason": "katactl rollout r1",
               "wasUnschedulable": False, "id": "cid-r1-n1"}


def node_cli(cli, kc, *args):
    return cli(["--kubeconfig", kc, "node", *args])


def record(kube, node="n1") -> dict | None:
    raw = (kube.get_obj("Node", node)["metadata"].get("annotations") or {}).get(CORDON_ANNOTATION)
    return json.loads(raw) if raw else None


def cordoned_by_katactl_for(kube, rec: dict, node="n1") -> None:
    """A node as a rollout's cordon step (or a drain) leaves it while it runs."""
    kube.add_node(node, unschedulable=True, annotations={CORDON_ANNOTATION: json.dumps(rec)})


def test_node_cordon_takes_over_a_rollouts_cordon_and_node_uncordon_lifts_it(cli, kube, kc):
    cordoned_by_katactl_for(kube, ROLLOUT_REC)
    r = node_cli(cli, kc, "cordon", "n1", "--reason", "hw-failure: keep out", "-o", "json")
    assert r.exit_code == 0, r.stderr
    item = r.json()["items"][0]
    assert item["changed"] is True and item["wasUnschedulable"] is True
    assert item["message"].startswith("cordoned: took over katactl's cordon by ci@runner (katactl rollout r1)")
    rec = record(kube)
    assert rec["id"] != ROLLOUT_REC["id"] and rec["held"] is True and rec["reason"] == "hw-failure: keep out"
    assert rec["supersedes"] == {k: ROLLOUT_REC[k] for k in ("id", "by", "at", "reason")}
    # katactl had cordoned a schedulable node: still so, node uncordon lifts it as it lifted the rollout's
    assert rec["wasUnschedulable"] is False and "cordonedBefore" not in rec
    # the operator's standing cordon: a repeated node cordon (any --reason) leaves it as it is
    for again in ([], ["--reason", "another reason"]):
        kube.requests.clear()
        r = node_cli(cli, kc, "cordon", "n1", *again, "-o", "json")
        assert r.exit_code == 0 and r.json()["changed"] is False, r.stderr
        assert r.json()["items"][0]["message"] == "already cordoned by katactl"
        assert record(kube) == rec and not [q for q in kube.requests if q["method"] != "GET"]
    lst = node_cli(cli, kc, "list", "-o", "json").json()["items"][0]
    assert lst["cordonedBy"] == rec["by"] and lst["cordon"]["reason"] == "hw-failure: keep out"
    # the rollout's restore (uncordon by its record id) leaves it
    from katactl import nodes
    from katactl.backends.kube import KubeAPI
    from katactl.config import resolve

    with KubeAPI.from_settings(resolve({"kubeconfig": kc}, environ={})) as api:
        r2 = nodes.uncordon(api, "n1", record_id=ROLLOUT_REC["id"])
    assert r2["changed"] is False and kube.get_obj("Node", "n1")["spec"]["unschedulable"] is True
    u = node_cli(cli, kc, "uncordon", "n1", "-o", "json")
    assert u.exit_code == 0 and u.json()["changed"] is True, u.stderr
    assert not kube.get_obj("Node", "n1")["spec"].get("unschedulable") and record(kube) is None


def test_a_taken_over_cordon_of_a_node_cordoned_before_katactl_keeps_that_owner(cli, kube, kc):
    """The rollout's record said someone else had cordoned the node first: the new record says
    so too, and node uncordon still refuses without --force."""
    cordoned_by_katactl_for(kube, {**ROLLOUT_REC, "wasUnschedulable": True, "cordonedBefore": "kubectl-cordon"})
    r = node_cli(cli, kc, "cordon", "n1", "--reason", "disk", "-o", "json")
    assert r.exit_code == 0 and r.json()["changed"] is True, r.stderr
    rec = record(kube)
    assert rec["wasUnschedulable"] is True and rec["cordonedBefore"] == "kubectl-cordon"
    u = node_cli(cli, kc, "uncordon", "n1")
    assert u.exit_code == 5 and "kubectl-cordon" in u.stderr, u.stderr


def test_a_dry_run_takeover_writes_nothing(cli, kube, kc):
    cordoned_by_katactl_for(kube, ROLLOUT_REC)
    kube.requests.clear()
    r = node_cli(cli, kc, "cordon", "n1", "--dry-run", "-o", "json")
    assert r.exit_code == 0 and r.json()["items"][0]["message"] == "would take over katactl's cordon", r.stderr
    assert record(kube) == ROLLOUT_REC and not [q for q in kube.requests if q["method"] != "GET"]
