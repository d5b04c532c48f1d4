"""--via kube against the faults of a real path to kube-apiserver: an idle-cutting hop (a cloud
load balancer), kube-apiserver >= 1.30's v5 stream translator reporting kubelet-side failures
after the upgrade, foreign and shared node pods. The stand-in (tests/kubeserver.py with
tests/kubeexec_server.py) over real sockets; the hop is a small loopback TCP proxy."""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time

import pytest

from tests.conftest_kube import kube_nodes
from tests.test_via_kube import IMAGE, agent_pods, kube_args

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")


@pytest.fixture
def cluster(kube, tmp_path, monkeypatch):
    kc = kube_nodes(kube, tmp_path, monkeypatch, ("tree-node",))
    return {"kube": kube, "kc": kc, "root": str(tmp_path / "tree-node")}


class IdleCutProxy:
    """A TCP hop that closes a connection idle (no byte either way) for ``idle`` seconds, as an
    ELB/Azure LB does; ``cut()`` closes every open connection now; a new connection is
    accepted but not answered for ``hold`` seconds (an API server that does not answer)."""

    def __init__(self, target: tuple[str, int], idle: float):
        self.target, self.idle = target, idle
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.port = self.ls.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.hold = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(c,), daemon=True).start()

    def _pipe(self, c):
        if self.hold:
            time.sleep(self.hold)
        u = socket.create_connection(self.target)
        self.conns += [c, u]
        last = time.monotonic()
        try:
            while True:
                r, _, _ = select.select([c, u], [], [], 0.1)
                if not r and time.monotonic() - last > self.idle:
                    break
                for s in r:
                    b = s.recv(65536)
                    if not b:
                        raise OSError
                    (u if s is c else c).sendall(b)
                    last = time.monotonic()
        except (OSError, ValueError):  # ValueError: the proxy's close() closed a socket under select
            pass
        for s in (c, u):
            self._close(s)

    @staticmethod
    def _close(s):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self):
        for s in list(self.conns):
            self._close(s)

    def close(self):
        self.ls.close()
        self.cut()


@pytest.fixture
def hop(cluster, tmp_path, monkeypatch):
    """The cluster reached through an idle-cutting hop (7 s: above client-go's 5 s ping)."""
    kube = cluster["kube"]
    p = IdleCutProxy(("127.0.0.1", kube.port), idle=7.0)
    doc = json.load(open(cluster["kc"]))
    doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{p.port}"
    (tmp_path / "kc-hop").write_text(json.dumps(doc))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kc-hop"))
    yield p
    p.close()


def _transport(**extra):
    from katactl import config
    from katactl.backends.kubeexec import KubeExecTransport

    return KubeExecTransport.from_settings("tree-node", config.resolve({"via": "kube", "agent_image": IMAGE,
                                                                        "request_timeout": 10.0, **extra}))


def test_a_quiet_exec_outlives_an_idle_cutting_hop(cluster, hop):
    """Pings (client-go's heartbeat) keep a command that prints nothing for longer than the
    hop's idle timeout alive, as kubectl exec survives it."""
    from katactl import nodeagent

    t = _transport()
    try:
        r = t.run(["sh", "-c", "sleep 9; echo done"], timeout=60)
        assert (r.returncode, r.stdout) == (0, b"done\n")
    finally:
        t.close()
        nodeagent.cleanup()


def _pingers() -> set:
    return {t for t in threading.enumerate() if t.name == "katactl-ws-ping"}


def test_a_stream_dropped_unread_ends_its_exec_and_its_pinger(cluster):
    """The pinger does not keep a channel alive: a stream generator dropped before its first
    read (its caller failed first) is collected, its WebSocket shut, and its node command ended
    by katactl's guard (the stand-in, as the kubelet, leaves an exec whose client went away
    running)."""
    import gc

    from katactl import nodeagent
    from tests.test_via_kube_guard import marker, still_running

    kube, m = cluster["kube"], marker()
    t = _transport()
    try:
        before = _pingers()
        g = t.run_stream(["sh", "-c", 'sleep "$0"; echo late', m], timeout=120)
        [pinger] = _pingers() - before
        for _ in range(200):  # the exec starts once its upgrade was answered
            if [a for _, a in kube.exec_processes() if a == ["sleep", m]]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the node command never started")
        del g
        gc.collect()
        pinger.join(30)
        assert not pinger.is_alive()
        assert still_running(kube, "sleep", m) == []
    finally:
        t.close()
        nodeagent.cleanup()


def test_a_mutation_after_the_helper_stream_was_cut_while_idle_is_done(cluster, hop):
    """A helper stream found closed before the request was written: the rename goes on a new
    helper (nothing was sent on the dead one, so it cannot have happened twice)."""
    from katactl import nodeagent

    root = cluster["root"]
    os.makedirs(os.path.join(root, "kt"))
    open(os.path.join(root, "kt/a"), "w").close()
    t = _transport()
    try:
        assert t.stat("/kt").is_dir   # the helper is up
        hop.cut()                      # ... and its connection goes away while it sits idle
        time.sleep(0.2)
        t.rename("/kt/a", "/kt/b")
        assert os.path.exists(os.path.join(root, "kt/b"))
    finally:
        t.close()
        nodeagent.cleanup()


# -- kube-apiserver >= 1.30: kubelet-side failures after the 101 (the v5 stream translator) -------
APP = {"app.kubernetes.io/name": "katactl-node-agent", "katactl.io/agent-kind": "daemonset"}


def ds_pod(kube, node, name=None, phase="Running"):
    """A pod of katactl's agent DaemonSet on ``node`` (its container named "agent")."""
    if kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system") is None:
        kube.add_daemonset("katactl-node-agent", "kube-system", APP)
    o = kube.add_pod(name or f"katactl-node-agent-{node}", "kube-system", node=node, labels=APP,
                     owner=("DaemonSet", "katactl-node-agent"), phase=phase)
    o["spec"]["containers"][0]["name"] = "agent"
    for c in o["status"].get("containerStatuses") or []:
        c["name"] = "agent"
    return kube.add(o)


def test_kubelet_unreachable_behind_the_v5_translator_is_exit_7(cli, cluster):
    kube = cluster["kube"]
    kube.add_node("down-node")      # Ready, but its kubelet cannot be dialled (no root)
    ds_pod(kube, "down-node")
    r = cli(["--via", "kube", "-N", "down-node", "sandbox", "list", "-o", "json"])
    assert r.exit_code == 7, r.stdout
    msg = r.only_node_error()["message"]
    assert "cannot reach its kubelet" in msg and "error dialing backend" in msg
    r = cli(["--via", "kube", "-N", "down-node", "vmcore", "list", "-o", "json"])  # through the file helper
    assert r.exit_code == 7 and "error dialing backend" in r.only_node_error()["message"], r.stdout


def test_a_failed_node_pod_behind_the_v5_translator_is_replaced(cluster):
    """The pod's container ended (Failed: still in storage, no 404): the translator says
    "container not found" after the 101; the exec, a helper read and a mutation go on through a
    new pod, and the failed one is deleted at the end."""
    from katactl import nodeagent

    kube, root = cluster["kube"], cluster["root"]
    os.makedirs(os.path.join(root, "kt"))
    open(os.path.join(root, "kt/a"), "w").close()

    def fail(name):
        o = kube.get_obj("Pod", name, "kube-system")
        o["status"]["phase"] = "Failed"
        kube.add(o)

    try:
        t = _transport()
        first = t.agent.name
        fail(first)
        assert t.run(["true"]).returncode == 0
        assert t.agent.name != first
        t.close()
        t = _transport()
        second = t.agent.name
        fail(second)
        t.rename("/kt/a", "/kt/b")     # the helper's first request, on a pod that ended
        assert os.path.exists(os.path.join(root, "kt/b")) and t.agent.name != second
        t.close()
    finally:
        nodeagent.cleanup()
    assert agent_pods(kube) == []
    assert {e["protocol"] for e in kube.exec_log} == {"v5.channel.k8s.io"}


# -- which node pods are used -------------------------------------------------------------------
def test_another_runs_ephemeral_pod_is_not_used(cluster):
    """Run B does not exec in run A's ephemeral pod (A deletes it at its end): B makes its own."""
    from katactl import config, nodeagent
    from katactl.backends import kube as kubeapi

    kube = cluster["kube"]
    with kubeapi.client(config.resolve({})) as api:
        other = api.create("/api/v1/namespaces/kube-system/pods",
                           nodeagent.ephemeral_manifest("tree-node", IMAGE, "kube-system"))["metadata"]["name"]
    deadline = time.monotonic() + 10
    while kube.get_obj("Pod", other, "kube-system")["status"]["phase"] != "Running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        t = _transport()
        assert t.run(["true"]).returncode == 0
        assert t.agent.name != other
        t.close()
    finally:
        nodeagent.cleanup()
    assert agent_pods(kube) == [other]   # A's pod is A's to delete
    assert all(e["pod"] != f"kube-system/{other}" for e in kube.exec_log)


@pytest.mark.parametrize("kind", ["daemonset", None])
def test_a_pod_only_wearing_the_agent_label_is_not_execd_into(cli, cluster, kind):
    kube = cluster["kube"]
    labels = {"app.kubernetes.io/name": "katactl-node-agent"} | ({"katactl.io/agent-kind": kind} if kind else {})
    o = kube.add_pod("impostor", "kube-system", node="tree-node", labels=labels)
    o["spec"]["containers"][0]["name"] = "agent"
    kube.add(o)
    r = cli(["--via", "kube", "-N", "tree-node", "sandbox", "list", "-o", "json"])
    assert r.exit_code == 2, r.stdout     # no katactl node pod and no --agent-image
    assert not kube.exec_log


def test_an_installed_agent_whose_pod_does_not_run_is_exit_6_with_its_state(cli, cluster):
    """Waited for until --request-timeout, as an ephemeral pod is (issue 14: not Running within
    the timeout -> exit 6 with its status and events)."""
    kube = cluster["kube"]
    o = ds_pod(kube, "tree-node", phase="Pending")
    o["status"]["containerStatuses"] = [{"name": "agent", "ready": False, "restartCount": 0, "image": IMAGE,
                                         "state": {"waiting": {"reason": "ImagePullBackOff"}}}]
    kube.add(o)
    r = cli(["--request-timeout", "1s", "--via", "kube", "-N", "tree-node", "sandbox", "list", "-o", "json"])
    assert r.exit_code == 6, r.stdout
    msg = r.only_node_error()["message"]
    assert "not Running within 1s" in msg and "phase Pending" in msg and "ImagePullBackOff" in msg


# -- node agent gc ------------------------------------------------------------------------------
def test_agent_gc_leaves_pods_in_use_and_pods_not_katactls(cli, cluster):
    from katactl import config, nodeagent
    from katactl.backends import kube as kubeapi

    kube = cluster["kube"]
    base = "/api/v1/namespaces/kube-system/pods"
    with kubeapi.client(config.resolve({})) as api:
        def pod(created_by=None):
            m = nodeagent.ephemeral_manifest("tree-node", IMAGE, "kube-system")
            if created_by:
                m["metadata"]["annotations"][nodeagent.CREATED_BY] = created_by
            return api.create(base, m)["metadata"]["name"]

        live = pod()   # this process: a live katactl on this host
        dead = pod(f"root@{socket.gethostname()} pid {2**22 + 7} at 2026-01-01T00:00:00Z")
        ended = pod()
        deadline = time.monotonic() + 10
        while kube.get_obj("Pod", ended, "kube-system")["status"]["phase"] != "Running":  # the kubelet started it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        o = kube.get_obj("Pod", ended, "kube-system")
        o["status"]["phase"] = "Failed"
        kube.add(o)
    impostor = kube.add_pod("impostor", "kube-system", node="tree-node",
                            labels={"app.kubernetes.io/name": "katactl-node-agent",
                                    "katactl.io/agent-kind": "ephemeral"})["metadata"]["name"]
    r = cli(["node", "agent", "gc", "--dry-run", "-o", "json"])   # default --older-than 3h: all are young
    assert r.exit_code == 0, r.stdout
    assert [i["name"] for i in r.json()["items"]] == [ended]
    r = cli(["node", "agent", "gc", "--older-than", "0s", "--yes", "-o", "json"])
    assert r.exit_code == 0, r.stdout
    assert sorted(i["name"] for i in r.json()["items"]) == sorted([ended, dead])
    assert agent_pods(kube) == sorted([live, impostor])
    r = cli(["node", "agent", "gc", "--older-than", "soon", "--yes", "-o", "json"])
    assert r.exit_code == 2 and "--older-than" in r.json()["message"]


# -- node agent install against a defaulting API server -------------------------------------------
def test_agent_install_again_is_a_no_op_though_the_server_defaults_the_template(cli, cluster):
    kube = cluster["kube"]
    assert cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"]).json()["action"] == "created"
    tmpl = kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system")["spec"]["template"]["spec"]
    assert tmpl["containers"][0]["imagePullPolicy"] == "IfNotPresent" and tmpl["schedulerName"]  # defaulted
    for image, action in ((IMAGE, "unchanged"), ("python:3.13-slim", "updated"), ("python:3.13-slim", "unchanged")):
        r = cli(["node", "agent", "install", "--image", image, "-o", "json"])
        assert r.exit_code == 0 and (r.json()["action"], r.json()["changed"]) == (action, action == "updated"), r.stdout
    assert len([q for q in kube.requests if q["method"] == "PATCH"]) == 1


NARROWINGS = {  # an operator's or a policy controller's edit of the stored template
    "readonly-host": lambda s: s["containers"][0]["volumeMounts"][0].update(readOnly=True),
    "subpath-host": lambda s: s["containers"][0]["volumeMounts"][0].update(subPath="etc"),
    "one-taint-effect": lambda s: s["tolerations"][0].update(effect="NoSchedule"),
    "unprivileged": lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=False,
                                                                           capabilities={"drop": ["ALL"]}),
    "node-selector": lambda s: s.update(nodeSelector={"pool": "gpu"}),
    "pull-policy": lambda s: s["containers"][0].update(imagePullPolicy="Never"),
}


@pytest.mark.parametrize("image,policy", [("busybox", "Always"), ("busybox:latest", "Always"),
                                          ("reg:5000/busybox", "Always"), ("busybox:1.36", "IfNotPresent"),
                                          ("busybox@sha256:" + "a" * 64, "IfNotPresent"),
                                          ("busybox:latest@sha256:" + "a" * 64, "Always")])
def test_the_image_pull_policy_default_is_the_servers(kube, image, policy):
    """ParseImageName's tag decides imagePullPolicy's default; install sees it as no change."""
    from katactl import nodeagent
    from tests.kubeserver import RESOURCES

    want = nodeagent.daemonset_manifest(image, "kube-system")
    stored = json.loads(json.dumps(want))
    kube._exec_default(RESOURCES["daemonsets"], stored)
    assert stored["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == policy
    assert nodeagent._undefaulted(stored["spec"]["template"]) == nodeagent._undefaulted(want["spec"]["template"])


@pytest.mark.parametrize("edit", sorted(NARROWINGS))
def test_agent_install_again_repairs_a_template_narrowed_since(cli, cluster, edit):
    """Only what the API server defaults may differ from katactl's template: anything else
    (here a narrowing that breaks the agent) is put back by the next install, which is then
    a no-op again."""
    kube = cluster["kube"]
    assert cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"]).json()["action"] == "created"
    fresh = kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system")["spec"]["template"]
    ds = kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system")
    NARROWINGS[edit](ds["spec"]["template"]["spec"])
    kube.add(ds)
    for action in ("updated", "unchanged"):
        r = cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"])
        assert r.exit_code == 0 and r.json()["action"] == action, r.stdout
    assert kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system")["spec"]["template"] == fresh


# -- timeouts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", [None, 3600])
def test_the_exec_upgrade_is_bounded_by_the_request_timeout_and_is_unreachable(cluster, hop, timeout):
    """The API server not answering the upgrade within --request-timeout is exit 7, as a REST
    call; a command's own long timeout (makedumpfile's hour) is not the upgrade's."""
    from katactl import nodeagent
    from katactl.errors import UnreachableError

    t = _transport(request_timeout=2.0)
    try:
        hop.hold = 30.0
        with pytest.raises(UnreachableError) as e:
            t.run(["true"], timeout=timeout)
        assert "pods/exec did not answer within 2s" in e.value.message
    finally:
        hop.hold = 0.0
        t.close()
        nodeagent.cleanup()


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("root, why", [("/hots", "no such directory"), ("/host/etc/hostname", "not a directory")])
def test_a_host_root_that_is_no_directory_in_the_node_pod_is_exit_2(cli, cluster, root, why):
    open(os.path.join(cluster["root"], "etc/hostname"), "w").close()
    for args in (["sandbox", "list"], ["vmcore", "list"]):
        r = cli([*kube_args("tree-node"), "--host-root", root, *args, "-o", "json"])
        assert r.exit_code == 2, r.stdout
        assert f"--host-root {root}: {why} in node pod kube-system/" in r.only_node_error()["message"]
    assert agent_pods(cluster["kube"]) == []


def test_v4_only_server_runs_a_command_given_input_once(cluster):
    from katactl import nodeagent

    kube = cluster["kube"]
    kube.exec_protocols = ("v4.channel.k8s.io",)
    t = _transport()
    try:
        for i in range(5):
            r = t.run(["sh", "-c", f"echo call{i} >> /host/runs.log; cat"], input=b"x" * 10)
            assert (r.returncode, r.stdout) == (0, b"x" * 10)
    finally:
        t.close()
        nodeagent.cleanup()
    assert open(os.path.join(cluster["root"], "runs.log")).read().split() == [f"call{i}" for i in range(5)]
    assert [e["argv"][:1] for e in kube.exec_log if e["argv"][0] == "sh"] == []   # only under the feeder


@pytest.mark.parametrize("refusal", ["forbidden", "no-namespace"])
def test_a_node_pod_create_refused_outright_sends_no_delete_and_no_warning(cli, cluster, tmp_path, monkeypatch,
                                                                        refusal):
    kube = cluster["kube"]
    args = [*kube_args("tree-node"), "sandbox", "list", "-o", "json"]
    if refusal == "forbidden":
        monkeypatch.setenv("KUBECONFIG", kube.kubeconfig(tmp_path / "ro", user="readonly"))
    else:
        args = ["--agent-namespace", "nosuch", *args]
    r = cli(args)
    assert (r.exit_code, r.only_node_error()["code"]) == ((7, "AuthFailed") if refusal == "forbidden" else (3, "NotFound")), r.stdout
    assert "could not delete" not in r.stderr and "warning" not in r.stderr, r.stderr
    assert not [q for q in kube.requests if q["method"] == "DELETE"]


def test_a_non_utf8_path_streams_through_an_exec_argv(cluster):
    """A name the helper lists (surrogate-escaped, as os.listdir gives it) streams through
    ``cat`` too: the argv goes to the query as its bytes, percent-encoded."""
    from katactl import nodeagent

    d = os.path.join(os.fsencode(cluster["root"]), b"d")
    os.makedirs(d)
    with open(os.path.join(d, b"f\xff.bin"), "wb") as f:
        f.write(b"payload")
    t = _transport()
    try:
        [name] = t.listdir("/d")
        assert name == "f\udcff.bin"
        assert b"".join(t.open_stream(f"/d/{name}")) == b"payload"
    finally:
        t.close()
        nodeagent.cleanup()
