"""pods/exec over WebSocket in the kube-apiserver stand-in (tests/kubeexec_server.py), proven with
real kubectl 1.33: stdin, stdout and stderr, a non-zero exit code, a large stdout, the node root at
/host inside the exec, RBAC (create on pods/exec), and the error answers."""
from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")


@pytest.fixture
def node_root(tmp_path):
    root = tmp_path / "node-a"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "katactl-node").write_text("I am node-a\n")
    return root


@pytest.fixture
def kx(kube, kubectl_133, tmp_path, node_root):
    """kx(*args, user="admin", input=None) -> CompletedProcess (bytes) of kubectl 1.33."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    env["HOME"] = str(home)
    kube.add_node("node-a")
    kube.set_node_root("node-a", str(node_root))
    kube.add_pod("agent", "default", node="node-a")

    def run(*args, user="admin", input=None, timeout=120):
        kc = kube.kubeconfig(tmp_path / f"kc-{user}", user=user)
        return subprocess.run([kubectl_133, "--kubeconfig", kc, "--cache-dir", str(tmp_path / "cache"), *args],
                              capture_output=True, env=env, timeout=timeout, input=input)
    return run


def test_exec_sees_the_node_root_at_host(kx, kube):
    r = kx("exec", "agent", "--", "cat", "/host/etc/katactl-node")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"I am node-a\n"
    (entry,) = kube.exec_log
    assert entry["protocol"] == "v5.channel.k8s.io" and entry["argv"] == ["cat", "/host/etc/katactl-node"]
    req = [q for q in kube.requests if "/exec" in q["path"]][0]
    assert req["method"] == "GET" and "command=cat" in req["path"]
    # the bind mount is private to the exec: nothing of the node root shows at /host here
    assert not os.path.exists("/host/etc/katactl-node")


def test_exec_stdin_reaches_the_process_and_eof_ends_it(kx):
    data = os.urandom(300_000)
    r = kx("exec", "-i", "agent", "--", "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_exec_nonzero_exit_code_and_stderr(kx):
    r = kx("exec", "agent", "--", "sh", "-c", "echo out; echo oops >&2; exit 7")
    assert r.returncode == 7
    assert r.stdout == b"out\n"
    assert b"oops" in r.stderr
    assert b"command terminated with exit code 7" in r.stderr


def test_exec_large_stdout(kx):
    n = 24 << 20
    r = kx("exec", "agent", "--", "head", "-c", str(n), "/dev/urandom")
    assert r.returncode == 0, r.stderr[-500:]
    assert len(r.stdout) == n


def test_exec_missing_program(kx):
    r = kx("exec", "agent", "--", "no-such-program-xyz")
    assert r.returncode != 0
    assert b"executable file not found" in r.stderr


def test_exec_needs_create_on_pods_exec(kx):
    r = kx("exec", "agent", "--", "true", user="readonly")
    assert r.returncode != 0
    assert b'cannot create resource "pods/exec"' in r.stderr


def test_exec_pod_not_running_and_missing(kx, kube):
    kube.add_pod("pending", "default", node="node-a", phase="Pending")
    r = kx("exec", "pending", "--", "true")
    assert r.returncode != 0
    r = kx("exec", "nosuch", "--", "true")
    assert r.returncode != 0 and b'pods "nosuch" not found' in r.stderr


def test_exec_killed_by_a_signal_is_128_plus_the_signal(kx):
    """containerd's reaper reports 128 + signal; kubectl (errorDecoderV4: ParseUint) takes only that."""
    r = kx("exec", "agent", "--", "sh", "-c", "kill -9 $$")
    assert r.returncode == 137, r.stderr
