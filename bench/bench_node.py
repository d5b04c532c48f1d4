"""katactl node list / node drain against kubectl on the same kube-apiserver stand-in.

Same server (tests/kubeserver.py, HTTPS on loopback, in this process), same run,
interleaved rounds, wall-clock and peak RSS of each whole process (os.wait4).

- list: `katactl node list -o json` (nodes + every pod, to count pods and Kata pods
  per node) against `kubectl get nodes` + `kubectl get pods -A` (the table views an
  SRE would type; both pages of 500) and against the same two with `-o json` (the
  full objects katactl reads). Pods are served in pages of 500 to both.
- drain: a 110-pod node, grace 0, `--ignore-daemonsets --delete-emptydir-data --force`,
  kubectl drain on one twin and katactl node drain on the other, per round.

Usage: .venv/bin/python bench/bench_node.py [--nodes 5000] [--pods 100000] [--runs 3] [--write] [--smoke]
(--smoke: 5 nodes, 50 pods, a 5-pod drain, one round, nothing written)
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import KATACTL, SKIP, publish  # noqa: E402
from tests.conftest_kube import find_kubectl_133  # noqa: E402
from tests.kubeserver import KubeStandIn  # noqa: E402


def run(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB) of one process; stdout discarded, failure ends the bench."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    err = p.stderr.read().decode() if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{argv[:6]} failed ({p.returncode}): {err[-400:]}")
    return dt, ru.ru_maxrss


def seed_cluster(srv: KubeStandIn, nodes: int, pods: int) -> None:
    srv.add_runtimeclass("kata", "kata", {"cpu": "250m", "memory": "160Mi"})
    for i in range(nodes):
        srv.add_node(f"node-{i:05d}", labels={"katacontainers.io/kata-runtime": "true"} if i % 2 else None)
    for j in range(pods):
        srv.add_pod(f"p-{j:06d}", f"ns-{j % 50}", f"node-{j % nodes:05d}", {"app": f"a{j % 100}"},
                    runtime_class="kata" if j % 3 == 0 else None)


def seed_drain_pair(srv: KubeStandIn, r: int, pods: int = 110) -> tuple[str, str]:
    names = []
    for who in ("kubectl", "katactl"):
        node = f"drain-{who}-{r}"
        srv.add_node(node)
        rs = f"rs-{who}-{r}"
        srv.add_replicaset(rs, "bench", pods, {"app": rs})
        for k in range(pods):
            srv.add_pod(f"{rs}-{k:03d}", "bench", node, {"app": rs}, owner=("ReplicaSet", rs))
        names.append(node)
    return names[0], names[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--pods", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="record the section in bench/RESULTS.md")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    drain_pods = 110
    if a.smoke:
        a.nodes, a.pods, a.runs, a.write, drain_pods = 5, 50, 1, False, 5
    kubectl = find_kubectl_133()
    if not kubectl:
        print("bench_node.py: kubectl 1.33 not installed", file=sys.stderr)
        raise SystemExit(SKIP)
    srv = KubeStandIn(grace_scale=0.0)
    tmp = tempfile.mkdtemp()
    kc = srv.kubeconfig(os.path.join(tmp, "kc"))
    t0 = time.perf_counter()
    seed_cluster(srv, a.nodes, a.pods)
    # replacements of drained ReplicaSet pods land on the first schedulable node by name:
    # this one, not the other twin (which would then have twice the pods to drain)
    srv.add_node("aaa-spare")
    print(f"seeded {a.nodes} nodes, {a.pods} pods in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    k = [kubectl, "--kubeconfig", kc]
    list_cmds = {
        "katactl node list -o json": [[*KATACTL, "--kubeconfig", kc, "node", "list", "-o", "json"]],
        "kubectl get nodes + get pods -A": [[*k, "get", "nodes"], [*k, "get", "pods", "-A"]],
        "kubectl get nodes -o json + get pods -A -o json": [[*k, "get", "nodes", "-o", "json"],
                                                             [*k, "get", "pods", "-A", "-o", "json"]],
    }
    wall: dict[str, list[float]] = {n: [] for n in list_cmds}
    rss: dict[str, list[int]] = {n: [] for n in list_cmds}
    for _ in range(a.runs):
        for name, argvs in list_cmds.items():
            samples = [run(x) for x in argvs]
            wall[name].append(sum(s[0] for s in samples))
            rss[name].append(max(s[1] for s in samples))
    drain_wall: dict[str, list[float]] = {"kubectl drain": [], "katactl node drain": []}
    flags = ["--ignore-daemonsets", "--delete-emptydir-data", "--force", "--grace-period", "0"]
    for r in range(a.runs):
        n_kubectl, n_katactl = seed_drain_pair(srv, r, drain_pods)
        drain_wall["kubectl drain"].append(run([*k, "drain", n_kubectl, *flags])[0])
        drain_wall["katactl node drain"].append(
            run([*KATACTL, "--kubeconfig", kc, "node", "drain", n_katactl, *flags, "-o", "json"])[0])
    srv.close()
    if a.smoke:
        print(f"bench_node smoke ok: {len(wall)} list commands, {len(drain_wall)} drains")
        return

    ref = statistics.median(wall["kubectl get nodes + get pods -A"])
    ref_rss = max(rss["kubectl get nodes + get pods -A"])
    lines = ["## Node list and drain vs kubectl — bench/bench_node.py", "",
             f"{a.nodes:,} nodes and {a.pods:,} pods served by the kube-apiserver stand-in "
             f"(tests/kubeserver.py, HTTPS, pages of 500, in the bench process) to both tools; "
             f"{a.runs} interleaved rounds, median wall-clock of whole processes, peak RSS per process "
             f"(os.wait4). kubectl 1.33. Run of {datetime.date.today().isoformat()} "
             f"(load average {os.getloadavg()[0]:.1f}).", "",
             "| what | median s | ratio | peak RSS MiB | RSS ratio |", "|---|---:|---:|---:|---:|"]
    for name in list_cmds:
        m = statistics.median(wall[name])
        peak = max(rss[name])
        lines.append(f"| {name} | {m:.2f} | {m / ref:.2f}x | {peak / 1024:.0f} | {peak / ref_rss:.2f}x |")
    dref = statistics.median(drain_wall["kubectl drain"])
    lines += ["", "Drain of a 110-pod node (ReplicaSet pods, grace 0), one twin each per round:", "",
              "| what | median s | ratio |", "|---|---:|---:|"]
    for name, v in drain_wall.items():
        lines.append(f"| {name} | {statistics.median(v):.2f} | {statistics.median(v) / dref:.2f}x |")
    lines += ["", "Requests per drain (counted in the stand-in's log): kubectl sends 110 evictions and "
              "one GET per pod while it waits (231 in all); katactl sends the same evictions "
              "concurrently and confirms deletions with one LIST of the node's pods per second.",
              "", "The stand-in is Python: at this size its JSON encoding dominates every row, so the list "
              "ratios say mostly that katactl asks for no more than kubectl does; the RSS column is "
              "the client's own."]
    publish("\n".join(lines), "bench/bench_node.py", a.write)


if __name__ == "__main__":
    main()
