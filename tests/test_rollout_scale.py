"""A rollout of 10,000 nodes and more keeps its state in one ConfigMap (issue 13).

kube-apiserver refuses a ConfigMap whose data + binaryData values pass 1 MiB (422, ValidateConfigMap
in kubernetes pkg/apis/core/validation/validation.go); the stand-in (tests/kubeserver.py) does the
same. The state of a 10,000-node rollout (the plan, and every node's record after its steps: the
largest the state gets) saves through the real KubeStore over HTTPS and loads back as it was, also
after saves that changed only a few records (the state is compressed chunk by chunk). A rollout
whose state an earlier katactl wrote (plain JSON in data "state") resumes."""
from __future__ import annotations

import base64
import json
import random
import ssl

import httpx
import pytest

from katactl.errors import OperationFailed, Refused
from katactl.rollout import engine
from katactl.rollout.plan import NodeInfo, Plan, make_batches, parse_steps
from katactl.rollout.policy import Policy, parse_count
from katactl.rollout.store import (CM_PREFIX, MAX_CONFIGMAP_BYTES, STATE_KEY, KubeStore, dumps,
                                   state_of_configmap)

NS = "kube-system"
STEPS_5 = ["cordon", "upgrade stage /srv/kata/kata-static-3.10.0-amd64.tar.zst --sha256 " + "3f" * 32,
           "upgrade switch 3.10.0", "recycle-stale --ignore-daemonsets --timeout 10m", "check --fail-on high"]


@pytest.fixture
def api(kube_api):
    return kube_api


def _raw(kube) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=kube.ca_path)
    return httpx.Client(base_url=kube.url, verify=ctx, headers={"Authorization": f"Bearer {kube.tokens['admin']}"},
                        timeout=30)


def _cm(name: str, data: dict, binary: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": NS},
            "data": data, "binaryData": {k: base64.b64encode(v).decode() for k, v in (binary or {}).items()}}


def test_stand_in_refuses_a_configmap_over_1_mib_as_kube_apiserver_does(kube):
    """data + binaryData (decoded) may total 1,048,576 bytes; one more is a 422 Invalid
    Status on the whole object (field "[]"), on create and on update."""
    half = MAX_CONFIGMAP_BYTES // 2
    with _raw(kube) as c:
        r = c.post(f"/api/v1/namespaces/{NS}/configmaps", json=_cm("fits", {"a": "x" * half}, {"b": b"\0" * half}))
        assert r.status_code == 201, r.text
        for method, path, name in (("POST", f"/api/v1/namespaces/{NS}/configmaps", "big"),
                                   ("PUT", f"/api/v1/namespaces/{NS}/configmaps/fits", "fits")):
            body = _cm(name, {"a": "x" * half}, {"b": b"\0" * (half + 1)})
            if method == "PUT":
                body["metadata"]["resourceVersion"] = r.json()["metadata"]["resourceVersion"]
            bad = c.request(method, path, json=body)
            assert bad.status_code == 422, (method, bad.text)
            why = "Too long: must have at most 1048576 bytes"
            assert bad.json() == {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f'ConfigMap "{name}" is invalid: []: {why}', "reason": "Invalid",
                "details": {"name": name, "kind": "ConfigMap",
                            "causes": [{"reason": "FieldValueTooLong", "message": why, "field": "[]"}]},
                "code": 422}
    assert len(kube.get_obj("ConfigMap", "fits", NS)["data"]["a"]) == half  # the update changed nothing


def plan_of(n: int, steps: list[str]) -> Plan:
    """A plan of ``n`` nodes (also bench/bench_rollout_state.py's)."""
    rnd = random.Random(n)
    # names as a managed cluster gives them (region.IP), three zones
    infos = [NodeInfo(f"cn-hangzhou.10.{i // 250}.{i % 250}.{rnd.randint(1, 254)}", f"cn-hangzhou-{'hjk'[i % 3]}")
             for i in range(n)]
    pol = Policy(max_unavailable=parse_count("50", "--max-unavailable", allow_zero=False), poll=0.1)
    return Plan(f"scale-{n}", infos, parse_steps(steps), pol, make_batches(infos, pol), "kube", NS)


def finish_all(st: dict, plan: Plan) -> None:
    """Every node through every step, as the engine records it (results, times)."""
    rnd = random.Random(7)
    for i, rec in enumerate(st["nodes"].values()):
        t = f"2026-12-05T02:{i // 600 % 60:02d}:{i // 10 % 60:02d}+0800"
        rec.update(phase="done", step=len(plan.steps), attempts=1, wasUnschedulable=False, startedAt=t,
                   finishedAt=t, error=None,
                   results=[{"step": k + 1, "text": s.text, "ok": True, "seconds": round(rnd.uniform(0.2, 90), 3),
                             "at": t, "changed": True, "message": f"{s.name}: ok ({rnd.randint(0, 40)} pod(s))"}
                            for k, s in enumerate(plan.steps)])


@pytest.mark.parametrize("nodes,steps", [(10_000, STEPS_5), (20_000, ["check"])], ids=["10000x5steps", "20000x1step"])
def test_a_large_rollouts_state_saves_and_loads_back(kube, api, nodes, steps):
    """The state of a 10,000-node rollout of five steps, and of a 20,000-node rollout of
    one, from its creation to every node done, fits its ConfigMap (before: 422 at
    creation, ~260 bytes a node of JSON before any step ran); saves that change a few
    records leave the rest as they were."""
    plan = plan_of(nodes, steps)
    st = engine.new_state(plan)
    store = KubeStore(api, NS)
    store.create(st)
    assert store.load(plan.name) == st
    e = engine.Engine(plan, store, st, api=None, settings=None)
    e.transition(lambda: finish_all(st, plan))  # the largest the state gets
    cm = kube.get_obj("ConfigMap", CM_PREFIX + plan.name, NS)
    size = len(base64.b64decode(cm["binaryData"][STATE_KEY]))
    assert size < 0.8 * MAX_CONFIGMAP_BYTES, size
    assert "state" not in cm["data"]
    assert KubeStore(api, NS).load(plan.name) == st

    # a batch in the middle fails, one node of the first batch is retried, the rollout's
    # own fields change: only their chunks are encoded again, the others are kept
    mid = plan.batches[len(plan.batches) // 2]
    e.transition(lambda: [st["nodes"][n].update(phase="failed", error="boom", exitCode=1) for n in mid], mid)
    first = plan.batches[0][0]
    e.transition(lambda: st["nodes"][first].update(attempts=2), [first])
    e.transition(lambda: st.update(phase="CompletedWithFailures", batch=len(plan.batches)), ())
    assert KubeStore(api, NS).load(plan.name) == json.loads(dumps(st))
    assert engine.summary(KubeStore(api, NS).load(plan.name))["counts"]["failed"] == len(mid)


def test_a_plan_whose_state_could_not_hold_every_nodes_results_is_refused_before_it_starts(kube, api):
    """15,000 nodes of five steps: the state fits at first (~20 bytes a node), but would
    not once every node has its results: refused (exit 5) before anything runs, not by a
    save in the middle of the fleet."""
    plan = plan_of(15_000, STEPS_5)
    st = engine.new_state(plan)
    with pytest.raises(Refused, match=r"would be about [\d,]+ bytes compressed; a ConfigMap holds 1,048,576") as e:
        KubeStore(api, NS).create(st)
    assert "split the fleet" in e.value.hint
    assert kube.get_obj("ConfigMap", CM_PREFIX + plan.name, NS) is None


def test_a_state_that_outgrows_its_configmap_is_a_save_error_not_a_usage_error(kube, api):
    """Should a state outgrow the projection (steps with long, varied messages), its save
    fails with exit 1 and the reason; the ConfigMap keeps the last state that fit."""
    plan = plan_of(2_000, ["check"])
    st = engine.new_state(plan)
    store = KubeStore(api, NS)
    store.create(st)
    e = engine.Engine(plan, store, st, api=None, settings=None)
    rnd = random.Random(1)
    noise = {n: rnd.randbytes(600).hex() for n in st["nodes"]}  # incompressible: 1,200 bytes a node
    with pytest.raises(OperationFailed, match=r"the state is [\d,]+ bytes compressed, more than a ConfigMap "
                                              r"holds \(1,048,576 bytes\)") as err:
        e.transition(lambda: [r.update(phase="failed", error=noise[n]) for n, r in st["nodes"].items()])
    assert err.value.exit_code == 1
    assert all(r["phase"] == "pending" for r in KubeStore(api, NS).load(plan.name)["nodes"].values())


def test_a_rollout_whose_state_an_earlier_katactl_wrote_resumes(cli, kube, kc):
    """An upgrade of katactl in the middle of a rollout: the ConfigMap holds the state as
    plain JSON in data "state" (the form before). status reads it, resume finishes the
    rollout without redoing the finished node, and its next save writes the new form."""
    for i in range(3):
        kube.add_node(f"n{i}", labels={"pool": "batch"})
    r = cli(["--kubeconfig", kc, "rollout", "run", "up", "-l", "pool=batch", "--canary", "1", "--max-unavailable", "2",
             "--step", "check", "--poll", "0.1", "-o", "json"])
    assert r.exit_code == 0 and r.json()["phase"] == "Paused", r.stderr
    cm = kube.get_obj("ConfigMap", CM_PREFIX + "up", NS)
    st = state_of_configmap(cm)
    canary = [n for n, v in st["nodes"].items() if v["phase"] == "done"]
    assert len(canary) == 1
    cm["data"] = {"state": dumps(st), "control": cm["data"]["control"]}  # as katactl wrote it before
    del cm["binaryData"]
    kube.add(cm)

    s = cli(["--kubeconfig", kc, "rollout", "status", "up", "-o", "json"])
    assert s.exit_code == 0 and s.json()["counts"]["done"] == 1 and s.json()["phase"] == "Paused", s.stderr
    before = len(kube.requests)
    r = cli(["--kubeconfig", kc, "rollout", "resume", "up", "-o", "jsonl"])
    assert r.exit_code == 0, r.stderr
    ev = [json.loads(x) for x in r.stdout.splitlines()]
    assert ev[-1]["phase"] == "Succeeded" and ev[-1]["counts"]["done"] == 3
    assert canary[0] not in {x["node"] for x in ev if x["kind"] == "NodeStepStarted"}
    cm = kube.get_obj("ConfigMap", CM_PREFIX + "up", NS)
    assert set(cm["data"]) == {"control"} and set(cm["binaryData"]) == {STATE_KEY}
    assert all(v["phase"] == "done" for v in state_of_configmap(cm)["nodes"].values())
    puts = [q for q in kube.requests[before:] if q["method"] == "PUT" and CM_PREFIX + "up" in q["path"]]
    assert puts and all("state" not in (q["body"].get("data") or {}) for q in puts)


def test_a_corrupt_state_is_one_error_line(cli, kube, kc):
    """binaryData that is not gzip: status says which ConfigMap and why (exit 1), no traceback."""
    kube.add(_cm(CM_PREFIX + "bad", {"control": "{}"}, {STATE_KEY: b"not gzip"}) |
             {"metadata": {"name": CM_PREFIX + "bad", "namespace": NS,
                           "labels": {"app.kubernetes.io/managed-by": "katactl", "katactl.io/rollout": "bad"}}})
    r = cli(["--kubeconfig", kc, "rollout", "status", "bad"])
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    assert f"ConfigMap {NS}/{CM_PREFIX}bad: binaryData 'state.json.gz' is not base64 gzip" in r.stderr
    assert "Traceback" not in r.stderr
