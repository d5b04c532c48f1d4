"""--via kube against SSH on the same node roots, same run.

Starts N real sshd nodes on loopback (tests/conftest_sshd.SshLab, each with a node tree of
sandboxes written by katactl.lab.layout) and the kube-apiserver stand-in (tests/kubeserver.py,
pods/exec in tests/kubeexec_server.py) whose nodes have the same trees as their roots and a
running katactl node agent pod each. Measures:

1. ``katactl sandbox list -o json`` across all nodes, a fresh process each (connects, pod lookups
   and execs included): ``--via kube`` vs over SSH, runs interleaved. Target: kube within 1.5x.
2. streaming a large file from one node to a local file, as ``vmcore collect`` does
   (``open_stream``: ``cat`` over the exec WebSocket) vs ``scp`` of the same file; throughput
   and the katactl process's peak RSS. Target: >= 0.8x scp, RSS <= 150 MiB.

Needs root (the exec stand-in uses unshare --mount). The stand-in is Python, in this process: its
cost is the server's, not katactl's, but it shares the machine's 2 cores with katactl.

Run: .venv/bin/python bench/bench_via_kube.py [--nodes 32] [--sandboxes 10] [--gib 1] [--runs 5] [--write]
Prints a markdown section on stdout (--write also puts it into bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._util import context, interleaved, median_ms, precompile, require, write_section  # noqa: E402
from tests.conftest_sshd import SshLab  # noqa: E402
from tests.kubeserver import KubeStandIn  # noqa: E402

KATACTL = [sys.executable, "-m", "katactl"]

STREAM = r"""
import resource, sys, time
from katactl import config
from katactl.fleet import open_transport
s = config.resolve({"via": sys.argv[1], "ssh_config": sys.argv[4] or None, "request_timeout": 60.0})
t0 = time.perf_counter()
n = 0
with open_transport(sys.argv[2], s) as t, open(sys.argv[3], "wb") as f:
    for b in t.open_stream("/big.bin", 0, 4 << 20):
        f.write(b); n += len(b)
dt = time.perf_counter() - t0
print(n, dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--sandboxes", type=int, default=10)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stream-rounds", type=int, default=5, help="interleaved rounds of the stream comparison")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2 nodes, a 4 MiB stream, one run, nothing written")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (the exec stand-in runs unshare --mount)")
    require("sshd" if shutil.which("sshd") else "/usr/sbin/sshd", "ssh", "scp", "ssh-keygen", "unshare")
    if a.smoke:
        a.nodes, a.sandboxes, a.gib, a.runs, a.write = 2, 2, 4 / 1024, 1, False
    pre = None if a.smoke else precompile()
    from bench.bench_ssh import CIPHER, same_kex

    eq = ["-o", f"KexAlgorithms={same_kex()}", "-c", CIPHER]
    from katactl.lab import layout

    base = Path(tempfile.mkdtemp(prefix="katactl-bench-kube-"))
    lab = SshLab(base)
    kube = KubeStandIn()
    try:
        names = [f"n{i:02d}" for i in range(a.nodes)]
        agent = {"app.kubernetes.io/name": "katactl-node-agent", "katactl.io/agent-kind": "daemonset"}
        kube.add_daemonset("katactl-node-agent", "kube-system", agent)
        for n in names:
            lab.add_node(n)
            root = str(lab.nodes[n].root)
            layout.write_many(root, a.sandboxes)
            kube.add_node(n)
            kube.set_node_root(n, root)
            # the agent DaemonSet's pod (--via kube uses no pod merely wearing its label)
            kube.add_pod(f"katactl-node-agent-{n}", "kube-system", node=n, labels=agent,
                         owner=("DaemonSet", "katactl-node-agent"))
            spec = kube.store[("pods", "kube-system", f"katactl-node-agent-{n}")]["spec"]
            spec["containers"][0]["name"] = "agent"
        lab.write_config()
        lab.wait_ready()
        hosts = base / "hosts"
        hosts.write_text("\n".join(names) + "\n")
        kc = kube.kubeconfig(base / "kubeconfig")
        env = {"XDG_CONFIG_HOME": str(base / "xdg"), "XDG_STATE_HOME": str(base / "xdg-state"), "NO_COLOR": "1",
               "KUBECONFIG": kc}
        common = ["--parallel", str(a.nodes), "--nodes-from", str(hosts), "sandbox", "list", "-o", "json"]
        ssh = [*KATACTL, "--ssh-config", str(lab.config), *common]
        kub = [*KATACTL, "--via", "kube", *common]
        for argv in (ssh, kub):  # sanity: every sandbox of every node
            p = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, **env))
            doc = json.loads(p.stdout)
            assert len(doc["items"]) == a.nodes * a.sandboxes, (len(doc["items"]), p.returncode, doc.get("errors"),
                                                                p.stderr[-500:])
        t = interleaved({"ssh": (ssh, env), "kube": (kub, env)}, a.runs, warmup=0 if a.smoke else 2)
        ms = {k: median_ms(v) for k, v in t.items()}

        # streaming
        n0 = names[0]
        big = lab.nodes[n0].root / "big.bin"
        size = int(a.gib * 1024) << 20
        with open(big, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        out = base / "out.bin"
        scp = shutil.which("scp")
        # rounds interleaved (kube, ssh, scp in each), medians: a burst of load hits all three
        rounds: dict[str, list] = {"kube": [], "ssh": [], "scp": []}
        for _ in range(1 if a.smoke else a.stream_rounds):
            for via in ("kube", "ssh"):
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-c", STREAM, via, n0, str(out), str(lab.config)],
                                   capture_output=True, text=True, env=dict(os.environ, **env), cwd=ROOT)
                whole = time.perf_counter() - t0  # the whole process, as scp is timed
                if p.returncode != 0:
                    raise SystemExit(p.stderr[-800:])
                nbytes, dt, rss = p.stdout.split()
                assert int(nbytes) == size
                rounds[via].append((size / whole / (1 << 20), int(rss) / 1024, size / float(dt) / (1 << 20)))
                out.unlink()
            if scp:
                t0 = time.perf_counter()
                subprocess.run([scp, "-q", "-F", str(lab.config), *eq, f"{n0}:{lab.nodes[n0].root}/big.bin",
                                str(out)], check=True)
                rounds["scp"].append(size / (time.perf_counter() - t0) / (1 << 20))
                out.unlink()
        res = {via: tuple(statistics.median(r[i] for r in rounds[via]) for i in range(3)) for via in ("kube", "ssh")}
        spread = {via: f"{min(r[0] for r in rounds[via]):.0f}-{max(r[0] for r in rounds[via]):.0f}"
                  for via in ("kube", "ssh")}
        scp_mibs = statistics.median(rounds["scp"]) if rounds["scp"] else None
        if rounds["scp"]:
            spread["scp"] = f"{min(rounds['scp']):.0f}-{max(rounds['scp']):.0f}"
        if a.smoke:
            print(f"bench_via_kube smoke ok: kube {ms['kube']:.0f} ms, ssh {ms['ssh']:.0f} ms")
            return
        md = [f"## bench/bench_via_kube.py: --via kube vs SSH ({time.strftime('%Y-%m-%d')})", "",
              f"{a.nodes} nodes x {a.sandboxes} sandboxes, median of {a.runs} interleaved runs, fresh process each;"
              " the kube-apiserver stand-in (Python, with pods/exec in a private mount namespace per exec)"
              f" runs on the same 2 cores; {context(pre)}. Streams are timed as whole processes (start-up and"
              f" connection included), medians of {a.stream_rounds} interleaved rounds (kube, SSH, scp in each), scp with katactl's key exchange and cipher (`{' '.join(eq)}`).", "",
              "| sandbox list | ms | ratio to SSH |", "|---|---|---|",
              f"| --via kube | {ms['kube']:.0f} | {ms['kube'] / ms['ssh']:.2f}x (target <= 1.5x) |",
              f"| over SSH | {ms['ssh']:.0f} | 1.00x |", "",
              f"| stream {a.gib:g} GiB to a local file | MiB/s (whole process) | min-max | MiB/s (stream alone) "
              "| peak RSS MiB |", "|---|---|---|---|---|",
              f"| --via kube (cat over the exec WebSocket) | {res['kube'][0]:.0f} | {spread['kube']} "
              f"| {res['kube'][2]:.0f} | {res['kube'][1]:.0f} |",
              f"| SSH (cat over an exec channel) | {res['ssh'][0]:.0f} | {spread['ssh']} | {res['ssh'][2]:.0f} "
              f"| {res['ssh'][1]:.0f} |"]
        if scp_mibs:
            md.append(f"| scp | {scp_mibs:.0f} | {spread['scp']} | - | - |")
            md += ["", f"kube/scp throughput: {res['kube'][0] / scp_mibs:.2f}x (target >= 0.8x)"]
        text = "\n".join(md) + "\n"
        print(text)
        if a.write:
            write_section(text, "bench/bench_via_kube.py")
    finally:
        kube.close()
        lab.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
