"""katactl rollout run: its own overhead and its Kubernetes API requests per node (issue 13, "Speed").

A 500-node rollout with a cheap node step (`--step check`), `--max-unavailable 50`, against the
kube-apiserver stand-in (tests/kubeserver.py, HTTPS on loopback, in this process, grace 0).
katactl runs as a subprocess with `-o jsonl`; the bench reads its events as they come.

- wall: the whole `katactl rollout run` process (start-up, plan, lock, state, every node, release).
- steps' time: the `seconds` of every NodeStepFinished event (the step's own time, measured by
  katactl around step.run()).
- ideal schedule: ceil(nodes / max-unavailable) x the median step time (batches of 50 back to
  back, nothing else); katactl's overhead = wall - ideal, as a % of ideal (target: <= 10%).
- steps' critical path: the sum over batches of the batch's slowest step (what the steps alone
  would take with nothing else, at the speed they ran); wall - that = the time katactl spends
  outside the steps. Both are reported: on 2 shared cores the steps themselves slow down with the
  machine's load (and with katactl's own CPU: one GIL), which moves the ideal too.
- katactl CPU: the rollout process's user + system time (os.wait4).
- requests: the stand-in's request log, classified by method and path. The step's own requests are
  measured separately: `katactl node check NODE` run alone against the same stand-in (the request
  kinds it sends, per node); everything else in the rollout's log is the rollout's own
  (target: <= 10 per node beyond the steps').
- --baseline DIR: a checkout of an earlier katactl (git worktree add DIR COMMIT); its runs and this
  tree's alternate (baseline, current, baseline, ...) so that the machine's load hits both alike.

Usage: .venv/bin/python bench/bench_rollout.py [--nodes 500] [--max-unavailable 50] [--poll 0.1]
       [--pods-per-node 0] [--runs 3] [--baseline DIR] [--step STEP ...] [--write] [--dump FILE] [--smoke]
(--smoke: 6 nodes, max-unavailable 2, one run, nothing written)
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import KATACTL, context, precompile, publish  # noqa: E402
from tests.kubeserver import KubeStandIn  # noqa: E402


class _TimedLog(list):
    """The stand-in's request log, each entry stamped (monotonic) when it is appended."""

    def append(self, entry):
        entry["t"] = time.monotonic()
        super().append(entry)


def kind_of(method: str, path: str) -> str:
    """A request's kind, for the profile: method + resource (+ "(one)" for a named object)."""
    p = path.split("?")[0]
    q = path.partition("?")[2]
    if p in ("/api", "/apis", "/api/v1", "/version") or re.match(r"^/apis/[^/]+(/[^/]+)?$", p):
        return f"{method} discovery"
    if "/leases" in p:
        return f"{method} Lease"
    if "/configmaps" in p:
        return f"{method} ConfigMap"
    if re.match(r"^/api/v1/nodes/[^/]+$", p):
        return f"{method} node (one)"
    if p == "/api/v1/nodes":
        what = "watch" if "watch=true" in q else "list"
        return f"{method} nodes ({what}{', selector' if 'labelSelector' in q else ''})"
    if p.endswith("/pods"):
        return f"{method} pods (list{', fieldSelector' if 'fieldSelector' in q else ''})"
    if "runtimeclasses" in p:
        return f"{method} RuntimeClasses (list)"
    if "poddisruptionbudgets" in p:
        return f"{method} PDBs (list)"
    return f"{method} {re.sub(r'/[^/]*-[0-9]+', '/NAME', p)}"


def seed(srv: KubeStandIn, nodes: int, pods_per_node: int) -> list[str]:
    srv.add_runtimeclass("kata", "kata", {"cpu": "250m", "memory": "160Mi"})
    names = [f"node-{i:04d}" for i in range(nodes)]
    for i, n in enumerate(names):
        srv.add_node(n, labels={"pool": "bench", "topology.kubernetes.io/zone": f"z{i % 3}"})
        srv.add_replicaset(f"rs-{n}", "bench", pods_per_node, {"app": n}) if pods_per_node else None
        for k in range(pods_per_node):
            srv.add_pod(f"p-{n}-{k}", "bench", n, {"app": n}, owner=("ReplicaSet", f"rs-{n}"),
                        runtime_class="kata" if k % 2 == 0 else None)
    return names


def check_alone(srv: KubeStandIn, kc: str, node: str, env: dict) -> collections.Counter:
    """The request kinds `katactl node check NODE` sends when run alone."""
    srv.requests.clear()
    p = subprocess.run([*KATACTL, "--kubeconfig", kc, "node", "check", node, "-o", "json"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode not in (0, 4):
        raise SystemExit(f"node check {node} failed ({p.returncode}): {p.stderr[-400:]}")
    return collections.Counter(kind_of(r["method"], r["path"]) for r in list(srv.requests))


def one_rollout(srv: KubeStandIn, kc: str, name: str, a, env: dict) -> dict:
    srv.requests.clear()
    argv = [*KATACTL, "--kubeconfig", kc, "rollout", "run", name, "-l", "pool=bench",
            *[x for s in a.step for x in ("--step", s)], "--max-unavailable", str(a.max_unavailable), "--poll", str(a.poll), "-o", "jsonl"]
    events: list[tuple[float, dict]] = []
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    th = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    th.start()
    for line in p.stdout:
        if line.strip():
            events.append((time.monotonic() - t0, json.loads(line)))
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    th.join()
    errs = [x for x in "".join(err).splitlines() if x.startswith(("warning:", "error:"))]
    reqs = [dict(method=r["method"], path=r["path"], t=r["t"] - t0) for r in list(srv.requests)]
    return {"wall": wall, "events": events, "requests": reqs, "rc": p.returncode, "errors": errs,
            "cpu": ru.ru_utime + ru.ru_stime}


def analyse(run: dict, n_nodes: int, max_unavail: int, check_kinds: collections.Counter) -> dict:
    ev = run["events"]
    fin = [e for _, e in ev if e.get("kind") == "NodeStepFinished"]
    secs = [e["seconds"] for e in fin]
    failed = [e for e in fin if e.get("result") != "ok"]
    batches = math.ceil(n_nodes / max_unavail)
    med = statistics.median(secs)
    ideal = batches * med
    t_started = next(t for t, e in ev if e.get("kind") in ("RolloutStarted", "RolloutResumed"))
    t_first_step = next(t for t, e in ev if e.get("kind") == "NodeStepStarted")
    t_last_fin = max((t for t, e in ev if e.get("kind") in ("NodeFinished", "NodeFailed")), default=0.0)
    t_end = max(t for t, _ in ev)
    # per batch: from its BatchStarted to its BatchFinished (the barrier), vs its slowest step
    bstart = {e["batch"]: t for t, e in ev if e.get("kind") == "BatchStarted"}
    bend = {e["batch"]: t for t, e in ev if e.get("kind") == "BatchFinished"}
    batch_spans = [bend[b] - bstart[b] for b in bstart if b in bend]
    batch_of = {n: e["batch"] for _, e in ev if e.get("kind") == "BatchStarted" for n in e["nodes"]}
    slowest: dict[int, float] = {}
    for e in fin:
        b = batch_of.get(e["node"], 0)
        slowest[b] = max(slowest.get(b, 0.0), e["seconds"])
    critical = sum(slowest.values())
    kinds = collections.Counter(kind_of(r["method"], r["path"]) for r in run["requests"])
    check_per_node = {k: v for k, v in check_kinds.items() if "discovery" not in k}
    steps_own = {k: min(kinds.get(k, 0), v * n_nodes) for k, v in check_per_node.items()}
    total = sum(kinds.values())
    own = sum(steps_own.values())
    rollout_kinds = collections.Counter({k: v - steps_own.get(k, 0) for k, v in kinds.items()})
    return {"rc": run["rc"], "errors": run["errors"], "wall": run["wall"], "n_steps": len(fin), "failed": len(failed), "median": med,
            "p90": statistics.quantiles(secs, n=10)[-1] if len(secs) >= 10 else max(secs), "max": max(secs),
            "sum": sum(secs), "batches": batches, "ideal": ideal, "overhead": run["wall"] - ideal,
            "startup": t_started, "to_first_step": t_first_step, "tail": t_end - t_last_fin,
            "after_exit_wait": run["wall"] - t_end, "batch_spans": batch_spans, "critical": critical,
            "cpu": run["cpu"], "stalled": sum(1 for x in secs if x > 5.0), "slack": run["wall"] - critical,
            "total_req": total, "steps_req": own, "rollout_req": total - own, "kinds": kinds,
            "rollout_kinds": rollout_kinds, "check_per_node": check_per_node}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--max-unavailable", type=int, default=50)
    ap.add_argument("--poll", default="0.1")
    ap.add_argument("--pods-per-node", type=int, default=0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", metavar="DIR", help="an earlier katactl checkout, run alternately with this one")
    ap.add_argument("--write", action="store_true", help="record the section in bench/RESULTS.md")
    ap.add_argument("--dump", metavar="FILE", help="write the last run's events and request log (JSON) there")
    ap.add_argument("--step", action="append", metavar="STEP",
                    help="a step (repeatable; default check; the requests counted as the step's own are "
                         "still those of `node check`)")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    a.step = a.step or ["check"]
    if a.smoke:
        a.nodes, a.max_unavailable, a.runs, a.write, a.pods_per_node, a.baseline = 6, 2, 1, False, 1, None
    pre = None if a.smoke else precompile()
    srv = KubeStandIn(grace_scale=0.0)
    srv.requests = _TimedLog()
    tmp = tempfile.mkdtemp(prefix="bench-rollout-")
    kc = srv.kubeconfig(os.path.join(tmp, "kc"))
    env = dict(os.environ, NO_COLOR="1", XDG_STATE_HOME=os.path.join(tmp, "state"),
               XDG_CONFIG_HOME=os.path.join(tmp, "xdg"), KATACTL_AUDIT_LOG=os.path.join(tmp, "audit.log"))
    trees = [("current", env)]
    base_rev = None
    if a.baseline:
        base = os.path.abspath(a.baseline)
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(base, "katactl")],
                       stdout=subprocess.DEVNULL, check=False)
        base_rev = subprocess.run(["git", "-C", base, "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip() or base
        trees.insert(0, ("baseline", dict(env, PYTHONPATH=base)))  # its katactl package first on sys.path
    names = seed(srv, a.nodes, a.pods_per_node)
    check_kinds = check_alone(srv, kc, names[0], env)
    results = []
    for r in range(a.runs):
        for tree, e in trees:
            run = one_rollout(srv, kc, f"{tree}-{r}", a, e)
            results.append({**analyse(run, a.nodes, a.max_unavailable, check_kinds), "tree": tree})
            if a.dump and tree == "current":
                with open(a.dump, "w") as f:
                    json.dump(run, f)
    srv.close()
    if a.smoke:
        if results[0]["rc"] != 0 or results[0]["n_steps"] != a.nodes * len(a.step):
            raise SystemExit(f"rollout run exited {results[0]['rc']}: {results[0]['errors'][-3:]}")
        x = results[0]
        print(f"bench_rollout smoke ok: {a.nodes} nodes in {x['wall']:.1f}s, "
              f"{x['total_req'] / a.nodes:.1f} requests per node")
        return

    cur = [x for x in results if x["tree"] == "current"]
    ok = [x for x in cur if x["rc"] == 0 and x["n_steps"] == a.nodes * len(a.step)]
    best = min(ok or cur, key=lambda x: x["wall"])
    trees_txt = (f"{a.runs} run(s) of this tree alternating with {a.runs} of the baseline (commit {base_rev}, "
                 "before the change measured)" if a.baseline else f"{a.runs} run(s)")
    lines = [
        "## Rollout overhead and API requests per node — bench/bench_rollout.py", "",
        "`katactl rollout run -l pool=bench " + " ".join(f"--step '{x}'" for x in a.step)
        + f" --max-unavailable {a.max_unavailable} "
        f"--poll {a.poll} -o jsonl` over {a.nodes} nodes ({a.pods_per_node} pods per node) of the kube-apiserver "
        f"stand-in (tests/kubeserver.py, HTTPS on loopback, in the bench process: its CPU is on the same "
        f"2 cores as katactl's). `--poll {a.poll}`: the scheduling loop re-checks its pause/abort "
        "requests (a ConfigMap GET) this often instead of every 5 s; no gate (no window, no Alertmanager). "
        f"State backend: kube (Lease + ConfigMap). {trees_txt}; {context(pre)}.", "",
        "Time: wall = the whole process; step = the `seconds` of each NodeStepFinished; ideal = "
        "ceil(nodes / max-unavailable) batches x the median step; overhead = wall - ideal (target <= 10%); "
        "critical path = the sum over batches of each batch's slowest step (the steps' own time at the speed "
        "they ran); katactl CPU = the process's user + system seconds; stalled = steps over 5 s.", "",
        "| run | tree | outcome | wall s | katactl CPU s | steps: median / p90 / max s | stalled | ideal s | "
        "overhead s | overhead % of ideal | critical path s | wall - critical path s | "
        "start-up to RolloutStarted s | after last NodeFinished s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, x in enumerate(results, 1):
        outcome = (f"ok, {x['n_steps'] // len(a.step)} nodes" if x["rc"] == 0 else
                   f"exit {x['rc']} after {x['n_steps']} steps: " + (x["errors"][0][:160] if x["errors"] else "?"))
        lines.append(f"| {i} | {x['tree']} | {outcome} | {x['wall']:.2f} | {x['cpu']:.2f} | "
                     f"{x['median']:.3f} / {x['p90']:.3f} / {x['max']:.3f} | {x['stalled']} | "
                     f"{x['ideal']:.2f} | {x['overhead']:.2f} | {100 * x['overhead'] / x['ideal']:.0f}% | "
                     f"{x['critical']:.2f} | {x['wall'] - x['critical']:.2f} | "
                     f"{x['startup']:.2f} | {x['tail'] + x['after_exit_wait']:.2f} |")
    spans = best["batch_spans"]
    lines += ["", f"Batches (fastest run of this tree): {len(spans)} of {a.max_unavailable}, BatchStarted to BatchFinished "
              f"median {statistics.median(spans):.2f} s, max {max(spans):.2f} s, sum {sum(spans):.2f} s, against "
              f"a median step of {best['median']:.3f} s; the steps' time summed over nodes is "
              f"{best['sum']:.1f} s ({best['sum'] / best['wall']:.1f} steps running on average).", ""]
    cpn = best["check_per_node"]
    lines += [f"Requests (fastest run of this tree): {best['total_req']:,} in all, {best['total_req'] / a.nodes:.1f} per node; "
              f"the step's own (`node check` alone sends {sum(cpn.values())} per node: "
              + ", ".join(f"{v} {k}" for k, v in sorted(cpn.items())) + f") {best['steps_req'] / a.nodes:.1f} "
              f"per node; **the rollout's own {best['rollout_req'] / a.nodes:.1f} per node** (target <= 10).", "",
              "| request (rollout's own, beyond the step's) | count | per node |", "|---|---:|---:|"]
    for k, v in best["rollout_kinds"].most_common():
        if v:
            lines.append(f"| {k} | {v:,} | {v / a.nodes:.2f} |")
    if a.baseline:
        def finished(tree):
            return [x for x in results if x["tree"] == tree and x["rc"] == 0 and x["n_steps"] == a.nodes * len(a.step)]

        def med(tree, k):
            return statistics.median(x[k] for x in finished(tree) or [x for x in results if x["tree"] == tree])
        b = min(finished("baseline") or [x for x in results if x["tree"] == "baseline"], key=lambda x: x["wall"])
        lines += ["", f"Medians of the runs that finished ({len(finished('baseline'))} of {a.runs} baseline, "
                  f"{len(finished('current'))} of {a.runs} this tree), baseline -> this tree: wall "
                  f"{med('baseline', 'wall'):.2f} -> {med('current', 'wall'):.2f} s, katactl CPU "
                  f"{med('baseline', 'cpu'):.2f} -> {med('current', 'cpu'):.2f} s, wall - critical path "
                  f"{med('baseline', 'slack'):.2f} -> {med('current', 'slack'):.2f} s; the baseline's fastest run sent "
                  f"{b['rollout_req'] / a.nodes:.1f} requests per node of its own ("
                  + ", ".join(f"{v / a.nodes:.2f} {k}" for k, v in b["rollout_kinds"].most_common(4) if v) + ")."]
    publish("\n".join(lines), "bench/bench_rollout.py", a.write)


if __name__ == "__main__":
    main()
