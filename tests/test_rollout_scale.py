"""A rollout of 10,000 nodes and more keeps its state in one ConfigMap (issue 13).

kube-apiserver refuses a ConfigMap whose data + binaryData values pass 1 MiB (422, ValidateConfigMap
in kubernetes pkg/apis/core/validation/validation.go); the stand-in (tests/kubeserver.py) does the
same. The state of a 10,000-node rollout (the plan, and every node's record after its steps: the
largest the state gets) saves through the real KubeStore over HTTPS and loads back as it was, also
after saves that changed only a few records (the state is compressed chunk by chunk). A rollout
whose state an earlier katactl wrote (plain JSON in data "state") resumes."""
from __future__ import annotations

import base64
import gzip
import json
import random
import ssl

import httpx
import pytest

from katactl.errors import OperationFailed, Refused
from katactl.rollout import engine
from katactl.rollout.plan import NodeInfo, Plan, make_batches, parse_steps
from katactl.rollout.policy import Policy, parse_count
from katactl.backends.kube import KubeAPI
from katactl.config import resolve
from katactl.rollout.store import (CM_PREFIX, MAX_CONFIGMAP_BYTES, NODE_LABEL, PART_LABEL, SHARD_BYTES, STATE_KEY,
                                   SHARD_BYTES_ENV, KubeStore, dumps, state_of_configmap, state_of_configmaps)

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


def load_state(kube, name: str, ns: str = NS) -> dict | None:
    """A rollout's state as the stand-in holds it: one ConfigMap, or a sharded one's parts."""
    main = kube.get_obj("ConfigMap", CM_PREFIX + name, ns)
    if main is None:
        return None
    parts = [cm for cm in kube.list_objs("ConfigMap", ns) if (cm["metadata"].get("labels") or {}).get(NODE_LABEL) == name
             and PART_LABEL in cm["metadata"]["labels"]]
    return state_of_configmaps(main, parts)


def _parts(kube, name: str, ns: str = NS) -> dict[str, dict]:
    """The parts of a sharded state, by their part label."""
    return {cm["metadata"]["labels"][PART_LABEL]: cm for cm in kube.list_objs("ConfigMap", ns)
            if (cm["metadata"].get("labels") or {}).get(NODE_LABEL) == name
            and PART_LABEL in cm["metadata"]["labels"]}


def _state_puts(kube, since: int) -> list[str]:
    """The names of the state ConfigMaps PUT since request ``since``."""
    return [q["path"].rsplit("/", 1)[1] for q in kube.requests[since:]
            if q["method"] == "PUT" and "/configmaps/" in q["path"]]


@pytest.mark.parametrize("nodes,steps", [(20_000, STEPS_5), (2_000, ["check"])], ids=["20000x5steps", "2000x1step"])
def test_a_large_rollouts_state_saves_and_loads_back(kube, api, nodes, steps):
    """The state of a 20,000-node rollout of five steps (~1.3 MB compressed once every node
    has its results: more than one ConfigMap holds; before: refused at the start) is
    sharded: the plan in one ConfigMap, the node records in shards under SHARD_BYTES,
    the rollout's own fields in the main one; it saves through the real KubeStore over
    HTTPS from its creation to every node done and loads back as it was. A save PUTs
    only the shards whose records changed, then the main ConfigMap. A small rollout
    keeps its state in one ConfigMap, as before."""
    plan = plan_of(nodes, steps)
    st = engine.new_state(plan)
    store = KubeStore(api, NS)
    store.create(st)
    assert store.load(plan.name) == st
    e = engine.Engine(plan, store, st, api=None, settings=None)
    e.transition(lambda: finish_all(st, plan))  # the largest the state gets
    cm = kube.get_obj("ConfigMap", CM_PREFIX + plan.name, NS)
    parts = _parts(kube, plan.name)
    assert KubeStore(api, NS).load(plan.name) == st
    if nodes == 2_000:
        assert not parts and "state" not in cm["data"]
        assert len(base64.b64decode(cm["binaryData"][STATE_KEY])) < SHARD_BYTES
        return
    shards = sorted((k for k in parts if k.startswith("nodes-")), key=lambda k: int(k[6:]))
    assert len(shards) >= 10 and set(parts) == {"plan", *shards}
    assert "binaryData" not in cm and set(cm["data"]) == {"control", "head", "shards"}
    sizes = [len(base64.b64decode(parts[k]["binaryData"]["nodes.json.gz"])) for k in shards]
    assert sum(sizes) > MAX_CONFIGMAP_BYTES and max(sizes) < 1.2 * SHARD_BYTES, sizes
    for k, p in parts.items():
        assert p["metadata"]["name"] == f"{CM_PREFIX}{plan.name}.{k}"
        assert p["metadata"]["labels"][NODE_LABEL] == plan.name

    # a batch in the middle fails, one node of the first batch is retried, the rollout's
    # own fields change: only the shards of those records are written again
    shard_of = {n: k for k in shards for n in json.loads(gzip.decompress(
        base64.b64decode(parts[k]["binaryData"]["nodes.json.gz"])))["nodes"]}
    mid = plan.batches[len(plan.batches) // 2]
    before = len(kube.requests)
    e.transition(lambda: [st["nodes"][n].update(phase="failed", error="boom", exitCode=1) for n in mid], mid)
    puts = _state_puts(kube, before)
    assert puts[-1] == CM_PREFIX + plan.name
    assert sorted(puts[:-1]) == sorted(f"{CM_PREFIX}{plan.name}.{k}" for k in {shard_of[n] for n in mid})
    first = plan.batches[0][0]
    before = len(kube.requests)
    e.transition(lambda: st["nodes"][first].update(attempts=2), [first])
    assert _state_puts(kube, before) == [f"{CM_PREFIX}{plan.name}.nodes-0", CM_PREFIX + plan.name]
    before = len(kube.requests)
    e.transition(lambda: st.update(phase="CompletedWithFailures", batch=len(plan.batches)), ())
    assert _state_puts(kube, before) == [CM_PREFIX + plan.name]
    assert KubeStore(api, NS).load(plan.name) == json.loads(dumps(st))
    assert engine.summary(KubeStore(api, NS).load(plan.name))["counts"]["failed"] == len(mid)


def test_a_save_that_fails_between_two_shard_writes_leaves_whole_records_and_the_next_save_completes_it(kube, api):
    """Two shards' records change in one save; the second shard's PUT is refused: the first
    shard holds its new records, the second and the main ConfigMap the old ones (each record
    whole, the state loads). The next save, whatever it changes, writes the shard left out."""
    plan = plan_of(6, ["check"])
    st = engine.new_state(plan)
    store = KubeStore(api, NS, shard_bytes=1)  # one record a shard
    store.create(st)
    e = engine.Engine(plan, store, st, api=None, settings=None)
    e.transition(lambda: None)
    a, b = [n for batch in plan.batches for n in batch][:2]
    kube.inject("PUT", rf"/configmaps/{CM_PREFIX}{plan.name}\.nodes-1$", status=422)
    with pytest.raises(OperationFailed):
        e.transition(lambda: [st["nodes"][n].update(phase="running", attempts=1) for n in (a, b)] and
                     st.update(batch=1), (a, b))
    got = load_state(kube, plan.name)
    assert got["nodes"][a]["phase"] == "running" and got["nodes"][b]["phase"] == "pending"
    assert got["batch"] == 0  # the main ConfigMap: not ahead of its shards
    e.transition(lambda: st.update(reason="next"), ())
    assert load_state(kube, plan.name) == json.loads(dumps(st))


def test_a_plan_too_large_even_for_shards_is_refused_before_it_starts(kube, api):
    """120,000 nodes: the plan alone (every node's name, zone and batch: ~9.5 bytes a node
    compressed) would not fit its ConfigMap: refused (exit 5) before anything is written."""
    plan = plan_of(120_000, ["check"])
    st = engine.new_state(plan)
    with pytest.raises(Refused, match=r"its plan of 120,000 nodes is [\d,]+ bytes compressed; a ConfigMap "
                                      r"holds 1,048,576") as e:
        KubeStore(api, NS).create(st)
    assert "split the fleet" in e.value.hint
    assert not [cm for cm in kube.list_objs("ConfigMap", NS) if cm["metadata"]["name"].startswith(CM_PREFIX)]


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


def _fleet(kube, n: int) -> None:
    for i in range(n):
        kube.add_node(f"s{i}", labels={"pool": "batch", "topology.kubernetes.io/zone": f"z{i % 2}"})


def _ro(cli, kc, *args):
    return cli(["--kubeconfig", kc, "rollout", *args])


def test_a_sharded_rollout_runs_shows_in_status_and_list_and_resumes(cli, kube, kc, monkeypatch):
    """With a small shard size (KATACTL_ROLLOUT_SHARD_BYTES; the default shards a state
    projected past 128 KiB), five nodes are sharded as a large fleet is: a canary run
    pauses, status and list read the state from its parts, resume finishes it without
    redoing the canary, and every node the rollout cordoned is uncordoned."""
    monkeypatch.setenv(SHARD_BYTES_ENV, "150")
    _fleet(kube, 5)
    r = _ro(cli, kc, "run", "big", "-l", "pool=batch", "--canary", "1", "--max-unavailable", "2",
            "--step", "cordon", "--step", "check", "--poll", "0.1", "-o", "json")
    assert r.exit_code == 0 and r.json()["phase"] == "Paused", r.stderr
    main = kube.get_obj("ConfigMap", CM_PREFIX + "big", NS)
    layout = json.loads(main["data"]["shards"])
    assert "binaryData" not in main and layout["count"] == -(-5 // layout["nodes"]) > 1, layout
    assert set(_parts(kube, "big")) == {"plan", *(f"nodes-{k}" for k in range(layout["count"]))}
    canary = [n for n, v in load_state(kube, "big")["nodes"].items() if v["phase"] == "done"]
    assert len(canary) == 1

    s = _ro(cli, kc, "status", "big", "-o", "json")
    assert s.exit_code == 0, s.stderr
    assert s.json()["counts"] == {"pending": 4, "running": 0, "soaking": 0, "done": 1, "failed": 0, "aborted": 0}
    assert len(s.json()["items"]) == 5
    s = _ro(cli, kc, "status", "-o", "json")
    assert s.exit_code == 0 and s.json()["name"] == "big", s.stderr
    ls = _ro(cli, kc, "list", "--state", "kube", "-o", "json")
    assert ls.exit_code == 0, ls.stderr
    assert [(i["name"], i["nodes"], i["done"], i["phase"]) for i in ls.json()["items"]] == [("big", 5, 1, "Paused")]

    # what 'rollout abort' polls while it waits: the main ConfigMap alone, no shard read
    store = KubeStore(KubeAPI.from_settings(resolve({"kubeconfig": kc}, environ={})), NS)
    before = len(kube.requests)
    assert store.phase("big") == "Paused" and store.phase("nope") is None
    assert [q["method"] + " " + q["path"].rsplit("/", 1)[1] for q in kube.requests[before:]] == \
        [f"GET {CM_PREFIX}big", f"GET {CM_PREFIX}nope"]
    store.api.close()

    r = _ro(cli, kc, "resume", "big", "-o", "jsonl")
    assert r.exit_code == 0, r.stderr
    ev = [json.loads(x) for x in r.stdout.splitlines()]
    assert ev[-1]["phase"] == "Succeeded" and ev[-1]["counts"]["done"] == 5
    assert canary[0] not in {x["node"] for x in ev if x["kind"] == "NodeStepStarted"}
    assert all(v["phase"] == "done" for v in load_state(kube, "big")["nodes"].values())
    assert not any(n["spec"].get("unschedulable") for n in kube.list_objs("Node"))


def test_a_rollout_started_in_one_configmap_resumes_in_it(cli, kube, kc, monkeypatch):
    """A rollout the previous katactl started (its whole state in one ConfigMap) resumes in
    that form, even where a new one of its size would be sharded: the layout is the state's."""
    _fleet(kube, 3)
    r = _ro(cli, kc, "run", "old", "-l", "pool=batch", "--canary", "1", "--step", "check", "--poll", "0.1",
            "-o", "json")
    assert r.exit_code == 0 and r.json()["phase"] == "Paused", r.stderr
    monkeypatch.setenv(SHARD_BYTES_ENV, "1")
    r = _ro(cli, kc, "resume", "old", "-o", "json")
    assert r.exit_code == 0 and r.json()["phase"] == "Succeeded", r.stderr
    assert not _parts(kube, "old")
    cm = kube.get_obj("ConfigMap", CM_PREFIX + "old", NS)
    assert all(v["phase"] == "done" for v in state_of_configmap(cm)["nodes"].values())


def test_parts_a_killed_create_left_are_written_over(cli, kube, kc, monkeypatch):
    """kill -9 in the middle of a sharded create leaves parts without their main ConfigMap
    (it is written last): 'rollout run' again writes over them; a main ConfigMap whose
    shard is gone is one error line (exit 1), not a rollout of fewer nodes."""
    monkeypatch.setenv(SHARD_BYTES_ENV, "1")
    _fleet(kube, 3)
    kube.add(_cm(f"{CM_PREFIX}k.nodes-1", {}, {"nodes.json.gz": b"left by a killed create"})
             | {"metadata": {"name": f"{CM_PREFIX}k.nodes-1", "namespace": NS,
                             "labels": {"app.kubernetes.io/managed-by": "katactl", NODE_LABEL: "k",
                                        PART_LABEL: "nodes-1"}}})
    r = _ro(cli, kc, "run", "k", "-l", "pool=batch", "--step", "check", "--poll", "0.1", "-o", "json")
    assert r.exit_code == 0 and r.json()["phase"] == "Succeeded", r.stderr
    assert set(_parts(kube, "k")) == {"plan", "nodes-0", "nodes-1", "nodes-2"}
    assert all(v["phase"] == "done" for v in load_state(kube, "k")["nodes"].values())

    with _raw(kube) as c:
        assert c.delete(f"/api/v1/namespaces/{NS}/configmaps/{CM_PREFIX}k.nodes-2").status_code == 200
    s = _ro(cli, kc, "status", "k")
    assert s.exit_code == 1, s.stderr
    assert f"ConfigMap {NS}/{CM_PREFIX}k: ConfigMap {CM_PREFIX}k.nodes-2 is missing: the state is incomplete" \
        in s.stderr and "Traceback" not in s.stderr


def test_a_bad_shard_size_is_one_error_line(cli, kube, kc, monkeypatch):
    monkeypatch.setenv(SHARD_BYTES_ENV, "2MiB")
    r = _ro(cli, kc, "list", "--state", "kube")
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert "invalid KATACTL_ROLLOUT_SHARD_BYTES='2MiB': bytes, from 1 to 1032192" in r.stderr
    assert "Traceback" not in r.stderr
