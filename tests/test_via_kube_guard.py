"""--via kube ends the node commands it gives up on. A real kubelet does not end an exec whose
client went away (kubernetes/kubernetes#89031, opencontainers/runc#3359: the runtime only closes
its stdin), and neither does the stand-in (tests/kubeexec_server.py): what ends a command after
a timeout, a stream closed early or katactl's SIGTERM is katactl's guard (remote.GUARD), so the
tests look at the stand-in's live exec processes. The commands run in the node agent
DaemonSet's pod, which outlives katactl (an ephemeral pod's deletion would end them anyway)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from katactl.errors import TimeoutExpired
from tests.conftest_kube import kube_nodes
from tests.test_via_kube import IMAGE
from tests.test_vmcore import add_dump

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")


@pytest.fixture
def cluster(kube, tmp_path, monkeypatch, cli):
    kc = kube_nodes(kube, tmp_path, monkeypatch, ("tree-node",))
    src = add_dump(str(tmp_path / "tree-node"), size_segments=((0, 16 << 20),), data=os.urandom(4 << 20))
    r = cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    for _ in range(200):
        if cli(["node", "agent", "status", "-o", "json"]).exit_code == 0:
            break
        time.sleep(0.05)
    return {"kube": kube, "kc": kc, "src": src}


def marker() -> str:
    """A sleep argument no other process has (sleep takes a fraction)."""
    return f"3600.{os.getpid()}{time.monotonic_ns() % 10**6}"


def still_running(kube, argv0: str | None = None, word: str = "", but=()) -> list:
    """The stand-in's live exec processes (not among pids ``but``) running argv0 with word in
    an argument, once they had a moment to end (a bounded wait: a leak stays)."""
    for _ in range(100):
        left = [(pid, a) for pid, a in kube.exec_processes() if pid not in but
                and (argv0 is None or (a[:1] == [argv0] and any(word in w for w in a[1:])))]
        if not left:
            return []
        time.sleep(0.05)
    return left


def _transport():
    from katactl import config
    from katactl.backends.kubeexec import KubeExecTransport

    return KubeExecTransport.from_settings("tree-node", config.resolve({"via": "kube", "request_timeout": 10.0}))


def test_a_run_that_timed_out_leaves_no_node_process(cluster):
    """Nor do the guard's own processes stay after commands that ended by themselves (its
    watcher ends as the exec's stdin closes with the stream)."""
    kube, m = cluster["kube"], marker()
    before = {pid for pid, _ in kube.exec_processes()}
    t = _transport()
    try:
        with pytest.raises(TimeoutExpired):
            t.run(["sleep", m], timeout=1)
        r = t.run(["sh", "-c", "echo out; echo err >&2; exit 3"], raw=True)  # the transport goes on
        assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        assert b"".join(t.run_stream(["echo", "streamed"])) == b"streamed\n"
        with pytest.raises(FileNotFoundError):
            t.run(["katactl-no-such-program"])
    finally:
        t.close()
    assert still_running(kube, "sleep", m) == []
    assert still_running(kube, but=before) == []


def test_a_stream_closed_early_leaves_no_node_process(cluster):
    """Its command (a shell pipeline's last process, in the group the guard ends) had printed
    its first line and then waits quietly."""
    kube, m = cluster["kube"], marker()
    t = _transport()
    try:
        it = t.run_stream(["sh", "-c", 'echo start; exec sleep "$0"', m])
        assert next(it) == b"start\n"
        for _ in range(200):  # sh has printed; its exec of sleep follows
            if [a for _, a in kube.exec_processes() if a == ["sleep", m]]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the node command never started")
        it.close()
        assert still_running(kube, "sleep", m) == []
    finally:
        t.close()


def test_sigterm_to_katactl_mid_stream_leaves_no_node_process(cluster, tmp_path):
    """vmcore collect reading a dump (cat on the node, slowed by a small exec chunk) gets
    SIGTERM: katactl exits 130 and the node's cat ends, where it would otherwise block on its
    unread pipe for as long as the pod lives."""
    kube, src = cluster["kube"], cluster["src"]
    kube.exec_chunk = 256
    dump = os.path.relpath(src, kube.node_roots["tree-node"])
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", cluster["kc"], "--via", "kube",
                          "-N", "tree-node", "vmcore", "collect", "--to", str(tmp_path / "out"), "-o", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not [a for _, a in kube.exec_processes() if a[:1] == ["cat"] and a[-1].endswith(dump)]:
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert still_running(kube, "cat", dump) == []
