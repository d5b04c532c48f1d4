"""katactl rollout: the size of a rollout's state, its layout over ConfigMaps and the CPU and
request bytes of one state save, by fleet size (issue 13: rollouts of tens of thousands of
nodes; saves happen per batch).

States: the plan of N nodes (names as a managed cluster gives them, three zones,
max-unavailable 50) and every node's record after its steps (tests/test_rollout_scale.py's
plan_of/finish_all: one result per step, with times and messages), a one-step plan (`check`)
and a five-step one (cordon, upgrade stage, upgrade switch, recycle-stale, check). That is
the largest the state gets.

- before: the whole state gzip-compressed in one ConfigMap (binaryData "state.json.gz", one
  PUT a save; katactl/rollout/store.py StateWriter without shards, as katactl still writes a
  state projected under SHARD_BYTES); it does not fit a ConfigMap (1,048,576 bytes) past
  ~12,000 nodes of five steps, and `rollout run` refused such plans at the start.
- now: the layout KubeStore.create picks (store.shard_layout): past SHARD_BYTES projected,
  the plan in its own ConfigMap, the node records in shards of a fixed number of records
  (batch order), the rollout's own fields in the main ConfigMap; a save PUTs the shards whose
  records changed, then the main ConfigMap.
- CPU per save (the saving thread's process time, median of the repetitions): encoding the
  state and the request bodies as the client sends them (json.dumps of each object), not
  the round trips. Two kinds of save: a batch start (50 records change) and one node's
  transition (1 record). Request bytes: the bodies of that save. The first save (create:
  everything encoded and compressed) and a load (decode) too.

Usage: .venv/bin/python bench/bench_rollout_state.py [--reps 15] [--write] [--smoke]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import context, publish  # noqa: E402
from katactl.rollout import engine  # noqa: E402
from katactl.rollout.store import (MAX_CONFIGMAP_BYTES, NODES_KEY, PART_LABEL, PLAN_KEY,  # noqa: E402
                                   SHARD_BYTES, STATE_KEY, KubeStore, StateWriter, dumps, shard_layout,
                                   state_of_configmap, state_of_configmaps)
from tests.test_rollout_scale import STEPS_5, finish_all, plan_of  # noqa: E402

NS = "kube-system"


class _Save:
    """One rollout's saves as KubeStore.save builds them (its objects, without the round
    trips): ``shard_nodes`` 0 is the one-ConfigMap form."""

    def __init__(self, st: dict, shard_nodes: int):
        self.st, self.name = st, st["name"]
        self.store = KubeStore(None, NS, shard_bytes=SHARD_BYTES)
        self.store._layout[self.name] = shard_nodes
        self.w = StateWriter(st, shard_nodes)

    def save(self, dirty) -> list[bytes]:
        """The request bodies of one save (``dirty`` None: the first, everything)."""
        snap = self.w.snapshot(self.st, None if dirty is None else set(dirty))
        s, name = self.store, self.name
        if not self.w.shard_nodes:
            # KubeStore._obj's ConfigMap, without its size check: the largest states here do not fit
            return [json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": s._meta(name, "x", None),
                                "data": {"control": "{}"},
                                "binaryData": {STATE_KEY: base64.b64encode(snap.gzip()).decode()}}).encode()]
        bodies = [json.dumps(s._part_obj(name, "plan", PLAN_KEY, self.w.plan_gzip())).encode()] if dirty is None else []
        for k, blob in snap.shards().items():
            bodies.append(json.dumps(s._part_obj(name, f"nodes-{k}", NODES_KEY, blob)).encode())
            snap.sent(k)
        return bodies + [json.dumps(s._obj(name, None, {}, snap.head(), self.w)).encode()]

    def objects(self) -> tuple[dict, list[dict]]:
        """The ConfigMaps as stored (main, parts) after a first save."""
        bodies = [json.loads(b) for b in self.save(None)]
        for b in bodies:
            b["metadata"].setdefault("labels", {})
        return bodies[-1], bodies[:-1]


def _cpu(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return statistics.median(out) * 1000


def measure(nodes: int, steps: list[str], reps: int) -> dict:
    plan = plan_of(nodes, steps)
    st = engine.new_state(plan)
    t = time.process_time()
    size, fig = shard_layout(st)  # what 'rollout run' works out before it starts
    layout_ms = (time.process_time() - t) * 1000
    finish_all(st, plan)
    batch = plan.batches[len(plan.batches) // 2]
    one = batch[:1]
    old, new = _Save(st, 0), _Save(st, size)
    one_cm = len(base64.b64decode(json.loads(old.save(None)[0])["binaryData"][STATE_KEY]))
    main, parts = new.objects()
    shard_sizes = [len(base64.b64decode(p["binaryData"][NODES_KEY])) for p in parts
                   if p["metadata"]["labels"].get(PART_LABEL, "").startswith("nodes-")]
    plan_size = next((len(base64.b64decode(p["binaryData"][PLAN_KEY])) for p in parts
                      if p["metadata"]["labels"].get(PART_LABEL) == "plan"), 0)
    old_cm = json.loads(old.save(None)[0])
    assert state_of_configmaps(main, parts) == state_of_configmap(old_cm) == json.loads(dumps(st))  # read back
    sent = {k: sum(len(b) for b in v) for k, v in
            (("batch_old", old.save(batch)), ("batch_new", new.save(batch)),
             ("one_old", old.save(one)), ("one_new", new.save(one)))}
    return {
        "nodes": nodes, "steps": len(steps), "one_cm": one_cm, "projected": fig["total"], "layout_ms": layout_ms,
        "shard_nodes": size, "shards": len(shard_sizes), "largest_shard": max(shard_sizes, default=0),
        "plan": plan_size, "main": sum(len(v) for v in (main.get("data") or {}).values()), **sent,
        "first_old": _cpu(lambda: _Save(st, 0).save(None), max(3, reps // 5)),
        "first_new": _cpu(lambda: _Save(st, size).save(None), max(3, reps // 5)),
        "batch_old_ms": _cpu(lambda: old.save(batch), reps), "batch_new_ms": _cpu(lambda: new.save(batch), reps),
        "one_old_ms": _cpu(lambda: old.save(one), reps), "one_new_ms": _cpu(lambda: new.save(one), reps),
        "load_old": _cpu(lambda: state_of_configmap(old_cm), max(3, reps // 5)),
        "load_new": _cpu(lambda: state_of_configmaps(main, parts), max(3, reps // 5)),
    }


def _kb(n: int) -> str:
    return f"{n / 1000:,.0f} KB" if n >= 10_000 else f"{n:,} B"


def render(rows: list[dict], ctx: str) -> str:
    out = ["## Rollout state size and CPU per save — bench/bench_rollout_state.py", "",
           "The state of a rollout with every node's steps recorded (the largest it gets; one result per step "
           "per node, names `cn-hangzhou.10.x.y.z`, three zones, max-unavailable 50). \"before\": the whole state "
           "gzip-compressed in one ConfigMap (`binaryData.state.json.gz`, one PUT a save), the only form before "
           "shards (and still the form of a state projected under 128 KiB); \"now\": the layout katactl picks "
           "(katactl/rollout/store.py shard_layout: past 128 KiB projected, the plan in its own ConfigMap, the node "
           "records in shards of a fixed number of records, the rollout's own fields in the main ConfigMap; a save "
           "PUTs the changed shards, then the main one). A ConfigMap holds 1,048,576 bytes (data + binaryData "
           "values, binaryData decoded). CPU = the saving thread's process time to encode the state and the "
           "request bodies (not the round trips), median; sent = the bytes of that save's request bodies. "
           f"{ctx}.", "",
           "| nodes | steps | one ConfigMap (before) | layout now: records a shard × shards | largest shard "
           "| plan ConfigMap | layout at start ms | first save ms before / now "
           "| batch-start save (50 records) ms before / now | sent before / now "
           "| one-node save ms before / now | sent before / now | load ms before / now |",
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fits = "fits" if r["one_cm"] <= MAX_CONFIGMAP_BYTES else "**does not fit**"
        pct = 100 * r["one_cm"] / MAX_CONFIGMAP_BYTES
        lay = (f"{r['shard_nodes']:,} × {r['shards']}" if r["shard_nodes"] else "one ConfigMap (as before)")
        shard = f"{_kb(r['largest_shard'])} ({100 * r['largest_shard'] / MAX_CONFIGMAP_BYTES:.0f}%)" \
            if r["shard_nodes"] else "-"
        out.append(
            f"| {r['nodes']:,} | {r['steps']} | {_kb(r['one_cm'])} ({pct:.0f}%, {fits}) | {lay} | {shard} | "
            f"{_kb(r['plan']) if r['plan'] else '-'} | {r['layout_ms']:.0f} | "
            f"{r['first_old']:.1f} / {r['first_new']:.1f} | {r['batch_old_ms']:.1f} / {r['batch_new_ms']:.1f} | "
            f"{_kb(r['batch_old'])} / {_kb(r['batch_new'])} | {r['one_old_ms']:.1f} / {r['one_new_ms']:.1f} | "
            f"{_kb(r['one_old'])} / {_kb(r['one_new'])} | {r['load_old']:.1f} / {r['load_new']:.1f} |")
    big = max(rows, key=lambda r: r["nodes"])
    per_plan = big["plan"] / big["nodes"] if big["plan"] else 0
    if per_plan:
        out += ["", f"Capacity now: the node records have no ceiling (shards are added as the fleet grows, each "
                f"projected under 128 KiB, 12% of a ConfigMap: room for retried steps' results); the plan "
                f"(every node's name, zone and batch: {per_plan:.1f} bytes a node compressed at "
                f"{big['nodes']:,} nodes) must fit one ConfigMap, so `rollout run` refuses (exit 5) a plan of "
                f"more than ~{int((MAX_CONFIGMAP_BYTES - 16 * 1024) / per_plan):,} nodes (names like these); before "
                "shards it refused ~31,500 nodes with one step and ~12,300 with five."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2,000 nodes, 3 repetitions, nothing written")
    a = ap.parse_args()
    sizes = [2_000] if a.smoke else [500, 10_000, 20_000, 40_000]
    reps = 3 if a.smoke else a.reps
    rows = [measure(n, steps, reps) for n in sizes for steps in (["check"], STEPS_5)]
    if a.smoke:  # the code paths ran; no figures from a smoke run
        render(rows, context())
        assert any(r["shard_nodes"] for r in rows)
        print(f"bench_rollout_state smoke ok: {len(rows)} states encoded and read back")
        return
    publish(render(rows, context()), "bench/bench_rollout_state.py", a.write)


if __name__ == "__main__":
    main()
