"""--via kube through the cluster's proxy: the pods/exec WebSockets take the kube client's proxy
decision (kube.proxy_for) and tunnel TLS to the API server through HTTP CONNECT, as kubectl's
exec does. The kube-apiserver stand-in (tests/kubeexec_server.py) is reachable only through a real
CONNECT proxy on loopback (tests/test_kube_client.py's ConnectProxy); the same exec by real
kubectl 1.33 through the same proxy-url is the reference."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from tests.test_kube_client import ConnectProxy, _write, proxied_kubeconfigs
from tests.test_via_kube import IMAGE, strip_node
from tests.test_vmcore import add_dump, node_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # nothing listens here: only the proxy reaches the API
    s.close()
    return port


@pytest.fixture
def proxied(kube, tmp_path):
    """(kubeconfig whose server only the proxy can reach, the same without proxy-url, proxy)."""
    dead = _dead_port()
    proxy = ConnectProxy({f"localhost:{dead}": ("127.0.0.1", kube.port)})
    doc = json.loads(open(kube.kubeconfig(tmp_path / "kc0")).read())
    doc["clusters"][0]["cluster"]["server"] = f"https://localhost:{dead}"
    direct = _write(tmp_path / "direct", doc)
    doc["clusters"][0]["cluster"]["proxy-url"] = proxy.url
    kc = _write(tmp_path / "kc", doc)
    yield kc, direct, proxy, f"localhost:{dead}"
    proxy.close()


def test_via_kube_sandbox_list_through_the_proxy_url_like_kubectl_exec(cli, kube, tmp_path, proxied, kubectl_133):
    kc, direct, proxy, target = proxied
    root = tmp_path / "tree-node"
    node_tree(str(root))
    add_dump(str(root))  # one Go/QEMU sandbox (and its dump)
    kube.add_node("tree-node")
    kube.set_node_root("tree-node", str(root))
    args = ["--via", "kube", "-N", "tree-node", "--agent-image", IMAGE, "sandbox", "list", "-o", "json"]
    ref = cli(["--host-root", str(root), "sandbox", "list", "-o", "json"])
    assert ref.exit_code == 0, ref.stderr
    r = cli(["--kubeconfig", direct, "--request-timeout", "3s", *args])
    assert r.exit_code == 7, r.stderr  # without the proxy the server is out of reach
    r = cli(["--kubeconfig", kc, *args])
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"] and strip_node(r.json()) == strip_node(ref.json())
    # the execs happened, and every connection (API requests and WebSockets) was a CONNECT
    # tunnel to the server's own name: the certificate was checked inside it
    assert kube.exec_log and all(e["protocol"] == "v5.channel.k8s.io" for e in kube.exec_log)
    assert len(proxy.log) > 1 and set(proxy.log) == {f"CONNECT {target} HTTP/1.1"}
    # the reference: kubectl 1.33's exec (a v5 WebSocket) through the same proxy-url, the same way
    kube.add_pod("agent", "default", node="tree-node")
    proxy.log.clear()
    kube.exec_log.clear()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE") and "proxy" not in k.lower()}
    env["HOME"] = str(tmp_path)
    (root / "etc" / "katactl-node").write_text("I am tree-node\n")
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "exec", "agent", "--", "cat", "/host/etc/katactl-node"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout == "I am tree-node\n", p.stderr
    assert [e["protocol"] for e in kube.exec_log] == ["v5.channel.k8s.io"]
    assert proxy.log and set(proxy.log) == {f"CONNECT {target} HTTP/1.1"}


def test_via_kube_refuses_a_proxy_it_cannot_tunnel_through(cli, kube, tmp_path):
    """An https:// proxy-url (TLS to the proxy) serves the API client but not the WebSockets:
    a one-line usage error before any node is touched."""
    kube.add_node("tree-node")
    doc = json.loads(open(kube.kubeconfig(tmp_path / "kc0")).read())
    doc["clusters"][0]["cluster"]["proxy-url"] = "https://127.0.0.1:1"
    kc = _write(tmp_path / "kc", doc)
    r = cli(["--kubeconfig", kc, "--via", "kube", "-N", "tree-node", "--agent-image", IMAGE, "sandbox", "list"])
    assert r.exit_code == 2, r.stderr
    assert "http:// (HTTP CONNECT) proxy only" in r.stderr and "Traceback" not in r.stderr
    assert not [q for q in kube.requests if q["method"] == "POST"]


def test_via_kube_takes_the_environment_proxy_as_kubectl_does(cli, kube, tmp_path, monkeypatch, kubectl_133):
    """No proxy-url: HTTPS_PROXY carries the execs to a name only the proxy knows, and never to a
    loopback server (websocket-client's own reading of the environment would proxy that one too)."""
    root = tmp_path / "tree-node"
    node_tree(str(root))
    add_dump(str(root))  # one Go/QEMU sandbox (and its dump)
    (root / "etc" / "katactl-node").write_text("I am tree-node\n")
    kube.add_node("tree-node")
    kube.set_node_root("tree-node", str(root))
    kube.add_pod("agent", "default", node="tree-node")
    name = f"kubeapi.test:{kube.port}"
    proxy = ConnectProxy({name: ("127.0.0.1", kube.port)})  # refuses any other target
    try:
        loopback, named = proxied_kubeconfigs(kube, tmp_path, name, proxy, monkeypatch)
        args = ["--via", "kube", "-N", "tree-node", "--agent-image", IMAGE, "sandbox", "list", "-o", "json"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env["HOME"] = str(tmp_path)
        exec_cat = ["exec", "agent", "--", "cat", "/host/etc/katactl-node"]
        for kc, proxied in ((named, True), (loopback, False)):
            proxy.log.clear()
            kube.exec_log.clear()
            r = cli(["--kubeconfig", kc, *args])
            assert r.exit_code == 0 and r.json()["items"], r.stderr
            assert kube.exec_log
            assert set(proxy.log) == ({f"CONNECT {name} HTTP/1.1"} if proxied else set())
            proxy.log.clear()
            p = subprocess.run([kubectl_133, "--kubeconfig", kc, *exec_cat], capture_output=True, text=True,
                               env=env, timeout=120)
            assert p.returncode == 0 and p.stdout == "I am tree-node\n", p.stderr
            assert set(proxy.log) == ({f"CONNECT {name} HTTP/1.1"} if proxied else set())
    finally:
        proxy.close()
