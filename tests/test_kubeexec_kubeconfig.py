"""--via kube opens one transport per node, concurrently (fleet.run_on_nodes), and each loads
the kubeconfig. The kubernetes loader writes certificate-authority-data to a temp file that it
registers in its per-process cache before writing it (kubernetes/config/kube_config.py,
_create_temp_file_with_content): a concurrent load of the same kubeconfig could get the still
empty file and fail with "[X509: NO_CERTIFICATE_OR_CRL_FOUND]" (bench_via_kube on a loaded
machine: `--via kube sandbox list` exit 4, some nodes failed). The test runs in a fresh process
(the loader's cache is per process) and makes the loader's write slow, as a loaded machine does."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = 8

OPEN_ALL = r"""
import json, sys, threading, time
from kubernetes.config import kube_config
from katactl import config
from katactl.backends.kubeexec import KubeExecTransport

def slow_write_open(path, mode="r", *a, **kw):
    f = open(path, mode, *a, **kw)
    if "w" in mode:
        time.sleep(0.3)  # the temp file is registered and still empty a while
    return f

kube_config.open = slow_write_open  # the loader's module global, before the builtin
settings = config.resolve({"via": "kube"})
nodes = sys.argv[1:]
start = threading.Barrier(len(nodes))
errors = []

def one(node):
    start.wait()
    try:
        KubeExecTransport.from_settings(node, settings).close()
    except Exception as e:
        errors.append(f"{node}: {e}")

threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(errors))
"""


def agent_pod(kube, node):
    """A pod of katactl's node agent DaemonSet on ``node`` (nodeagent.is_agent_pod holds)."""
    labels = {"app.kubernetes.io/name": "katactl-node-agent", "katactl.io/agent-kind": "daemonset"}
    if kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system") is None:
        kube.add_daemonset("katactl-node-agent", "kube-system", labels)
    kube.add_pod(f"katactl-node-agent-{node}", "kube-system", node=node, labels=labels,
                 owner=("DaemonSet", "katactl-node-agent"))


def test_concurrent_transports_load_the_kubeconfig_whole(kube, tmp_path):
    names = [f"n{i:02d}" for i in range(NODES)]
    for n in names:
        kube.add_node(n)
        agent_pod(kube, n)
    env = dict(os.environ, KUBECONFIG=kube.kubeconfig(tmp_path / "kubeconfig"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg"), XDG_STATE_HOME=str(tmp_path / "state"))
    p = subprocess.run([sys.executable, "-c", OPEN_ALL, *names], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout) == [], p.stdout


def test_a_changed_kubeconfig_is_loaded_again(kube, tmp_path, monkeypatch):
    """The transports of one fan-out share a kubeconfig load; a kubeconfig rewritten since (a
    rotated token) is read again at once, not after the shared load expires."""
    from katactl import config
    from katactl.backends.kubeexec import KubeExecTransport
    from katactl.errors import AuthError

    kube.add_node("n00")
    agent_pod(kube, "n00")
    path = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig(path))
    settings = config.resolve({"via": "kube"})
    KubeExecTransport.from_settings("n00", settings).close()
    kube.kubeconfig(path, token="revoked-token")
    with pytest.raises(AuthError):
        KubeExecTransport.from_settings("n00", settings).close()
