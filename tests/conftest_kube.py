"""Kubernetes API stand-in fixtures (a pytest plugin, listed in tests/conftest.py).

- ``kube_server`` (session): one KubeStandIn (tests/kubeserver.py) for the whole run (one per
  pytest-xdist worker process: it lives in the tests' process, which inspect and fault it
  directly), HTTPS on loopback, pod grace periods scaled by 0.01 (a 30 s grace takes 0.3 s).
- ``kube`` (function): the same server after ``reset()`` (empty store but the default
  namespaces, no faults, empty request log, default knobs).
- ``kc`` (function): a kubeconfig file for ``kube`` (admin), in the test's tmp_path.
- ``kube_api`` (function): a KubeAPI on that kubeconfig, closed after the test.
- ``kubectl_133``: path of a real kubectl 1.33, or skip "kubectl 1.33 not installed".
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.kubeserver import KubeStandIn

KUBECTL_133_DEFAULT = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33"


def find_kubectl_133() -> str | None:
    if os.access(KUBECTL_133_DEFAULT, os.X_OK):
        return KUBECTL_133_DEFAULT
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(["dpkg", "-L", "kubectl"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if line.endswith("kubectl.1.33") and os.access(line, os.X_OK):
                return line
    # pkgs.k8s.io's v1.33 package (what scripts/setup adds where no other source has kubectl)
    found = shutil.which("kubectl")
    if found:
        try:
            out = subprocess.run([found, "version", "--client"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if "Client Version: v1.33." in out:
            return found
    return None


@pytest.fixture(scope="session")
def kube_server():
    srv = KubeStandIn(grace_scale=0.01)
    yield srv
    srv.close()


@pytest.fixture
def kube(kube_server):
    kube_server.reset()
    yield kube_server
    kube_server.reset()


@pytest.fixture
def kc(kube, tmp_path):
    return kube.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def kube_api(kc):
    from katactl.backends.kube import KubeAPI
    from katactl.config import resolve

    api = KubeAPI.from_settings(resolve({"kubeconfig": kc}, environ={}))
    yield api
    api.close()


def kube_nodes(kube, tmp_path, monkeypatch, names, roots: dict | None = None) -> str:
    """Nodes ``names`` in the stand-in, each with its root (``roots``, else a Kata node tree
    made under tmp_path/<name>), and KUBECONFIG set for them: the kubeconfig's path."""
    from tests.test_vmcore import node_tree

    for n in names:
        root = (roots or {}).get(n) or node_tree(str(tmp_path / n))
        kube.add_node(n)
        kube.set_node_root(n, str(root))
    kc = kube.kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", kc)
    return kc


@pytest.fixture(scope="session")
def kubectl_133():
    path = find_kubectl_133()
    if not path:
        pytest.skip("kubectl 1.33 not installed")
    return path


def drain_until_evicting(kube, kc, node: str = "twin-a") -> subprocess.Popen:
    """A real ``katactl node drain`` of seed_twin_nodes' ``node`` (its PDB blocks an eviction),
    returned once it printed PodEvictionBlocked: cordoned and evicting, the change under way.
    The caller signals it and kills it at the end."""
    import json
    import sys

    kube.seed_twin_nodes(5)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "-o", "jsonl", "node", "drain",
                          node, "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                          "--grace-period", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.stdout is not None
    for line in p.stdout:
        if json.loads(line)["kind"] == "PodEvictionBlocked":
            return p
    p.kill()
    raise AssertionError(f"the drain ended before an eviction was blocked: {p.communicate()[1]}")
