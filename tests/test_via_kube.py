"""--via kube end to end: katactl reaches nodes through pods/exec (WebSocket) into node pods on the
kube-apiserver stand-in (tests/kubeexec_server.py), whose node roots are the session's QEMU lab
("lab-node") and a fixture tree ("tree-node"). The same commands with --host-root on the same
trees are the reference: --via kube must give the same JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest_kube import kube_nodes
from tests.test_vmcore import SID, TS, add_dump, node_tree, sha

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")

IMAGE = "python:3.12-slim"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree-node"
    node_tree(str(root))
    src = add_dump(str(root), size_segments=((0, 16 << 20),), data=os.urandom(12 << 20))
    return {"root": str(root), "src": src}


@pytest.fixture
def cluster(kube, tree, tmp_path, monkeypatch):
    kc = kube_nodes(kube, tmp_path, monkeypatch, ("tree-node",), roots={"tree-node": tree["root"]})
    return {"kube": kube, "kc": kc, "tree": tree}


def kube_args(*nodes, image=IMAGE):
    a = ["--via", "kube", "-N", ",".join(nodes)]
    return a + (["--agent-image", image] if image else [])


def agent_pods(kube):
    return sorted(p["metadata"]["name"] for p in kube.list_objs("Pod", "kube-system")
                  if not p["metadata"].get("deletionTimestamp"))


def node_argv(entry) -> list[str]:
    """An exec's command as katactl meant it: run() and streams go under the guard script
    (``sh -c GUARD sh ARGV...``, katactl/backends/remote.py)."""
    from katactl.backends.remote import GUARD

    a = entry["argv"]
    return a[4:] if a[:4] == ["sh", "-c", GUARD, "sh"] else a


def strip_node(d):
    """The JSON without the node's name (-N says tree-node, --host-root says localhost) and ages."""
    if isinstance(d, dict):
        return {k: strip_node(v) for k, v in d.items() if k not in ("node", "age", "ageSeconds")}
    if isinstance(d, list):
        return [strip_node(x) for x in d]
    return d


# -- the fixture-tree node -------------------------------------------------------------------------
def test_ephemeral_pod_same_json_as_host_root_and_deleted_at_the_end(cli, cluster):
    kube, tree = cluster["kube"], cluster["tree"]
    for args in (["vmcore", "list"], ["sandbox", "list"]):
        ref = cli(["--host-root", tree["root"], *args, "-o", "json"])
        r = cli([*kube_args("tree-node"), *args, "-o", "json"])
        assert r.exit_code == ref.exit_code, r.stderr
        got, want = strip_node(r.json()), strip_node(ref.json())
        assert got == want, [(k, a.get(k), b.get(k)) for a, b in zip(got["items"], want["items"], strict=False)
                             for k in set(a) | set(b) if a.get(k) != b.get(k)]
    # each run created one ephemeral pod on the node, used it, and deleted it at its end
    created = [q for q in kube.requests if q["method"] == "POST" and q["path"].startswith("/api/v1/namespaces/kube-system/pods")]
    assert len(created) == 2
    body = created[0]["body"]
    assert body["metadata"]["name"].startswith("katactl-node-tree-node-")
    spec = body["spec"]
    assert spec["nodeName"] == "tree-node" and spec["hostPID"] is True
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["containers"][0]["securityContext"] == {"privileged": True}
    assert spec["volumes"][0]["hostPath"]["path"] == "/"
    assert spec["containers"][0]["volumeMounts"][0]["mountPath"] == "/host"
    assert agent_pods(kube) == []
    # every exec went to that pod, v5
    assert kube.exec_log and all(e["protocol"] == "v5.channel.k8s.io" for e in kube.exec_log)
    assert all(e["pod"].startswith("kube-system/katactl-node-tree-node-") for e in kube.exec_log)


def test_vmcore_collect_verified_and_resumed_after_a_cut_stream(cli, cluster, tmp_path):
    kube, tree = cluster["kube"], cluster["tree"]
    out = tmp_path / "o"
    kube.exec_cut(r"(cat|tail) (--|-c \S+ --) .*vmcore-", after_bytes=5 << 20)  # the dump's stream, cut at 5 MiB
    r = cli([*kube_args("tree-node"), "vmcore", "collect", "--to", str(out), "--verify", "-o", "json"])
    assert r.exit_code != 0
    assert any(e["cut"] for e in kube.exec_log)
    r = cli([*kube_args("tree-node"), "vmcore", "collect", "--to", str(out), "--verify", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [c] = r.json()["items"]
    assert c["resumed"] is True
    assert c["to"] == str(out / "tree-node" / SID / f"vmcore-{TS}.elf")
    assert c["verified"] and c["verification"] == "node-sha256sum" and sha(c["to"]) == sha(tree["src"])
    tails = [e for e in kube.exec_log if node_argv(e)[0] == "tail"]
    assert tails, "the second run resumed with tail -c +N"
    assert agent_pods(kube) == []


def test_upgrade_stage_switch_status_like_host_root(cli, cluster, tmp_path):
    from tests import upgrade_fixtures as fx

    tree = cluster["tree"]
    tbs = {v: fx.make_tarball(str(tmp_path), v, str(tmp_path), compression="gz") for v in ("3.1.0", "3.2.0")}
    root = "/opt/kata-ut"

    def run(*args):
        r = cli([*kube_args("tree-node"), "upgrade", *args, "--kata-root", root, "-o", "json"])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        return r.json()

    for v in ("3.1.0", "3.2.0"):
        assert run("stage", tbs[v])["changed"] is True
    assert run("stage", tbs["3.1.0"])["changed"] is False
    assert run("switch", "3.2.0")["changed"] is True
    assert os.readlink(os.path.join(tree["root"], "opt/kata-ut/current")) == "releases/3.2.0"
    shim = os.path.join(tree["root"], "opt/kata-ut/releases/3.1.0/bin/containerd-shim-kata-v2")
    assert os.stat(shim).st_mode & 0o111 and os.path.getsize(shim) > 1000
    st = run("status")
    ref = cli(["--host-root", tree["root"], "upgrade", "status", "--kata-root", root, "-o", "json"])
    # one named node answers as a list; --host-root is this host's one object
    [item] = st["items"]
    want = {k: v for k, v in ref.json().items() if k not in ("apiVersion", "kind")}
    assert strip_node(item) == strip_node(want)


def test_agent_install_status_then_commands_use_the_daemonset_pod(cli, cluster):
    kube = cluster["kube"]
    r = cli(["node", "agent", "status", "-o", "json"])
    assert r.exit_code == 3
    r = cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True
    assert cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"]).json()["changed"] is False
    ds = kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system")
    assert ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "katactl-node-agent"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = cli(["node", "agent", "status", "-o", "json"])
        if r.exit_code == 0:
            break
        time.sleep(0.1)
    assert r.exit_code == 0, r.stdout
    [it] = r.json()["items"]
    assert it["node"] == "tree-node" and it["ready"] is True and it["pod"]["name"].startswith("katactl-node-agent-")
    assert it["pod"]["namespace"] == "kube-system" and it["podRef"] == f"kube-system/{it['pod']['name']}"
    # no --agent-image: the DaemonSet's pod is used, nothing is created or deleted
    n_pods = agent_pods(kube)
    r = cli([*kube_args("tree-node", image=None), "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert agent_pods(kube) == n_pods
    assert {e["pod"] for e in kube.exec_log} == {it["podRef"]}
    r = cli(["node", "agent", "uninstall", "--yes", "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is True
    assert cli(["node", "agent", "uninstall", "--yes", "-o", "json"]).json()["changed"] is False
    from tests._audit import audit_entries

    # a "requested" entry before each API change (create, delete: a kill -9 in flight leaves it
    # logged), then the outcome; the install that changed nothing wrote neither
    assert [e["result"] for e in audit_entries("node.agent.install")] == ["requested", "ok"]
    assert [(e["result"], e.get("changed")) for e in audit_entries("node.agent.uninstall")] == \
        [("requested", None), ("ok", True)]


def test_agent_pod_deleted_mid_run_is_replaced(cluster):
    from katactl import config, nodeagent
    from katactl.fleet import open_transport

    kube = cluster["kube"]
    settings = config.resolve({"via": "kube", "agent_image": IMAGE, "request_timeout": 10.0})
    try:
        with open_transport("tree-node", settings) as t:
            first = t.agent.name
            assert t.read_bytes("/usr/share/defaults/kata-containers/configuration.toml")
            kube.handle("DELETE", f"/api/v1/namespaces/kube-system/pods/{first}", {"gracePeriodSeconds": ["0"]},
                        None, "admin", "")
            # the helper's stream ends with its pod; reads go on through a new pod
            assert t.read_bytes("/usr/share/defaults/kata-containers/configuration.toml")
            old = [e for e in kube.exec_log if e["pod"] == f"kube-system/{first}"]
            assert old and all(e["exitCode"] is not None for e in old)   # killed with the pod
            assert t.run(["true"]).returncode == 0
            assert t.agent.name != first
    finally:
        nodeagent.cleanup()
    assert agent_pods(kube) == []


def test_v4_only_server(cluster):
    from katactl import config, nodeagent
    from katactl.fleet import open_transport

    kube = cluster["kube"]
    kube.exec_protocols = ("v4.channel.k8s.io",)
    settings = config.resolve({"via": "kube", "agent_image": IMAGE})
    try:
        with open_transport("tree-node", settings) as t:
            r = t.run(["sha256sum"], input=b"x" * 100_000)
            import hashlib

            assert r.stdout.split()[0].decode() == hashlib.sha256(b"x" * 100_000).hexdigest()
            assert t.run(["sh", "-c", "exit 5"]).returncode == 5
    finally:
        nodeagent.cleanup()
    assert {e["protocol"] for e in kube.exec_log} == {"v4.channel.k8s.io"}


def test_connect_unix_reasons_through_the_exec_relay(cluster, tmp_path):
    """The socket relay over pods/exec says missing / refused / not a socket as a reason
    (UnreachableError.reason), as the local and SSH transports do: discovery decides stale on it."""
    import socket

    from katactl import config, nodeagent
    from katactl.errors import NOT_A_SOCKET, SOCKET_MISSING, SOCKET_REFUSED, UnreachableError
    from katactl.fleet import open_transport

    d = os.path.join(cluster["tree"]["root"], "run/relay")
    os.makedirs(d)
    cwd = os.getcwd()
    os.chdir(d)  # a relative bind: the tmp path may exceed sun_path
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind("dead.sock")
        s.close()  # the file stays, nobody listens
    finally:
        os.chdir(cwd)
    open(os.path.join(d, "plain"), "w").close()
    settings = config.resolve({"via": "kube", "agent_image": IMAGE, "request_timeout": 10.0})
    try:
        with open_transport("tree-node", settings) as t:
            for path, reason in (("/run/relay/missing.sock", SOCKET_MISSING), ("/run/relay/dead.sock", SOCKET_REFUSED),
                                 ("/run/relay/plain", NOT_A_SOCKET)):
                with pytest.raises(UnreachableError) as e:
                    t.connect_unix(path, 5)
                assert e.value.reason == reason, (path, e.value.message)
    finally:
        nodeagent.cleanup()


# -- errors --------------------------------------------------------------------------------------
def test_no_agent_and_no_image_is_a_usage_error(cli, cluster):
    r = cli([*kube_args("tree-node", image=None), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 2
    assert "node agent install" in r.stdout and "--agent-image" in r.stdout


def test_pod_not_running_in_time_is_exit_6_with_status_and_events(cli, cluster):
    kube = cluster["kube"]
    kube.kubelet_starts_pods = False
    kube.set_node_root("tree-node", cluster["tree"]["root"])
    r = cli(["--request-timeout", "1s", *kube_args("tree-node"), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 6, r.stdout
    msg = r.only_node_error()["message"]
    assert "not Running within 1s" in msg and "ImagePullBackOff" in msg and "Scheduled" in msg
    assert agent_pods(kube) == []   # deleted even though the run failed


def test_exec_forbidden_is_exit_7_naming_the_verb(cli, cluster, tmp_path, monkeypatch):
    kube = cluster["kube"]
    r = cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"])
    assert r.exit_code == 0
    time.sleep(0.3)
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig(tmp_path / "ro", user="readonly"))
    r = cli([*kube_args("tree-node", image=None), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 7, r.stdout
    assert "create pods/exec" in r.only_node_error()["message"]


def test_node_not_ready_is_that_nodes_error(cli, cluster):
    kube = cluster["kube"]
    kube.add_node("dead-node", ready=False)
    r = cli([*kube_args("tree-node", "dead-node"), "vmcore", "list", "-o", "json"])
    assert r.exit_code == 4, r.stdout
    errs = r.json()["errors"]
    assert [e["node"] for e in errs] == ["dead-node"] and "NotReady" in errs[0]["error"]["message"]


def test_api_down_is_exit_7(cli, cluster, tmp_path, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    kc = json.loads(open(cluster["kc"]).read())
    kc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    (tmp_path / "down").write_text(json.dumps(kc))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "down"))
    r = cli(["--request-timeout", "2s", *kube_args("tree-node"), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 7, r.stdout


def test_help_and_completion_import_no_websocket():
    code = ("import sys; from katactl.cli import main\n"
            "try:\n    main(['node', 'agent', '--help'])\nexcept SystemExit: pass\n"
            "bad = [m for m in ('websocket', 'httpx', 'kubernetes', 'paramiko') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().splitlines()[-1] == "[]"


# -- the QEMU lab node ---------------------------------------------------------------------------
@pytest.fixture
def lab_cluster(cluster, lab):
    kube = cluster["kube"]
    kube.add_node("lab-node")
    kube.set_node_root("lab-node", lab.root)
    return {**cluster, "lab": lab}


@pytest.mark.qemu
def test_lab_same_json_as_host_root(cli, lab_cluster):
    lab = lab_cluster["lab"]
    for args in (["sandbox", "list"], ["sandbox", "inspect", lab.pod("qemu-0")], ["audit"]):
        ref = cli([*lab.args(*args), "-o", "json"])
        r = cli([*kube_args("lab-node"), *args, "-o", "json"])
        assert r.exit_code == ref.exit_code, (r.stdout[-2000:], r.stderr)
        got, want = strip_node(r.json()), strip_node(ref.json())
        if "items" in want and "items" in got and want.get("kind", "").endswith("List"):
            assert got == want, [(k, a.get(k), b.get(k)) for a, b in zip(got["items"], want["items"], strict=False)
                                 for k in set(a) | set(b) if a.get(k) != b.get(k)]
        elif want["kind"] != "AuditReport":
            assert got == want, [(x, got.get(x), want.get(x)) for x in set(got) | set(want) if got.get(x) != want.get(x)]
        else:  # audit: a named node answers in the fan-out shape (per-node metadata under "nodes")
            assert got["kind"] == "AuditReport"
            assert len(got["items"]) == len(want["items"]) > 0
            for a, b in zip(got["items"], want["items"], strict=True):
                a = {**a, "target": a["target"].replace("lab-node", "localhost")}  # a node-level finding
                assert a == b, [(x, a.get(x), b.get(x)) for x in set(a) | set(b) if a.get(x) != b.get(x)]
            assert got.get("counts") == want.get("counts")
    assert agent_pods(lab_cluster["kube"]) == []


@pytest.mark.qemu
def test_lab_balloon_set_wait_moves_the_qemu_guest(cli, lab_cluster):
    lab = lab_cluster["lab"]
    ref = lab.pod("qemu-0")
    try:
        r = cli([*kube_args("lab-node"), "balloon", "set", ref, "--target", "384Mi", "--wait", "-o", "json"])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        j = r.json()
        assert j["node"] == "lab-node" and j["changed"] is True and j["converged"] is True
        assert abs(j["actualBytes"] - (384 << 20)) <= 8 << 20
        r = cli([*lab.args("balloon", "get", ref, "-o", "json")])   # seen locally too
        assert abs(r.json()["actualBytes"] - (384 << 20)) <= 8 << 20
        # the shim management socket and QMP were reached through the relay in the node pod
        assert any(e["argv"][:2] == ["python3", "-I"] and "-c" in e["argv"] and e["argv"][-1].endswith(".sock")
                   for e in lab_cluster["kube"].exec_log)
    finally:
        cli([*lab.args("balloon", "set", ref, "--target", "512Mi", "--wait", "-o", "json")])


def test_rollout_node_steps_run_through_kube(cli, cluster, tmp_path):
    """A rollout whose node-local steps (upgrade stage, switch) reach the node through
    pods/exec: no SSH anywhere, the cordon/drain steps and the state in the same API."""
    from tests import upgrade_fixtures as fx

    kube, tree = cluster["kube"], cluster["tree"]
    kube.add_node("spare")
    tb = fx.make_tarball(str(tmp_path), "3.3.0", str(tmp_path), compression="gz")
    root = "/opt/kata-rk"
    r = cli([*kube_args("tree-node"), "rollout", "run", "via-kube", "--poll", "0.1",
             "--step", f"upgrade stage {tb} --kata-root {root}", "--step", "cordon",
             "--step", f"upgrade switch 3.3.0 --kata-root {root}", "--step", "uncordon", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["phase"] == "Succeeded" and d["counts"]["done"] == 1
    assert os.readlink(os.path.join(tree["root"], "opt/kata-rk/current")) == "releases/3.3.0"
    assert not kube.get_obj("Node", "tree-node")["spec"].get("unschedulable")
    execs = [q for q in kube.requests if "/exec" in q["path"]]
    assert execs and agent_pods(kube) == []  # the ephemeral pod went away with the run


def test_agent_gc_deletes_the_pods_listed_not_ones_made_since(cluster):
    """node agent gc deletes what it listed (and the user confirmed), not a pod created since."""
    from katactl import config, nodeagent
    from katactl.backends import kube as kubeapi

    def left_behind():  # by a run on another host (no age threshold below)
        m = nodeagent.ephemeral_manifest("tree-node", IMAGE, "kube-system")
        m["metadata"]["annotations"][nodeagent.CREATED_BY] = "root@gone-host pid 4242 at 2026-01-01T00:00:00Z"
        return m

    settings = config.resolve({})
    with kubeapi.client(settings) as api:
        base = "/api/v1/namespaces/kube-system/pods"
        old = api.create(base, left_behind())["metadata"]["name"]
        listed = nodeagent.gc_candidates(api, "kube-system", older_than=0)
        assert [c["name"] for c in listed] == [old]
        new = api.create(base, left_behind())["metadata"]["name"]
        assert [c["name"] for c in nodeagent.gc(api, "kube-system", candidates=listed)[0]] == [old]
        assert agent_pods(cluster["kube"]) == [new]
        assert [c["name"] for c in nodeagent.gc(api, "kube-system", older_than=0)[0]] == [new]
    assert agent_pods(cluster["kube"]) == []


# -- node pods: priority, waiting for the DaemonSet's pod, image, gc, access, Linux only ----------
def _pressure(kube, node, cond="DiskPressure"):
    """The node's kubelet reports ``cond`` (its eviction manager then admits critical pods only)."""
    with kube._lock:
        n = kube.store[("nodes", "", node)]
        n["status"]["conditions"].append({"type": cond, "status": "True", "reason": f"KubeletHas{cond}",
                                          "message": "kubelet has disk pressure"})


def _wait_agent_ready(cli):
    for _ in range(100):
        r = cli(["node", "agent", "status", "-o", "json"])
        if r.exit_code == 0:
            return r
        time.sleep(0.1)
    return r


def test_node_pods_are_node_critical_so_a_node_under_disk_pressure_admits_them(cli, cluster):
    """kubelet's eviction admit handler refuses every pod that is not critical on a node with
    DiskPressure, which is where vmcores filled /var/crash: katactl's pods are system-node-critical."""
    kube = cluster["kube"]
    _pressure(kube, "tree-node")
    r = cli([*kube_args("tree-node"), "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stdout
    [post] = [q for q in kube.requests if q["method"] == "POST" and q["path"] == "/api/v1/namespaces/kube-system/pods"]
    assert post["body"]["spec"]["priorityClassName"] == "system-node-critical"
    r = cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"])
    assert r.exit_code == 0, r.stdout
    tmpl = kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system")["spec"]["template"]["spec"]
    assert tmpl["priorityClassName"] == "system-node-critical"
    assert _wait_agent_ready(cli).exit_code == 0
    # the same template again is no change (the server's defaults are not a difference)
    assert cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"]).json()["changed"] is False


def test_a_daemonset_pod_still_starting_is_waited_for(cli, cluster):
    kube = cluster["kube"]
    kube.kubelet_start_delay = 1.0
    assert cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"]).exit_code == 0
    r = cli(["--request-timeout", "30s", *kube_args("tree-node", image=None), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0, r.stdout
    assert {e["pod"].split("/")[1][:len("katactl-node-agent-")] for e in kube.exec_log} == {"katactl-node-agent-"}


def test_a_node_the_daemonset_has_no_pod_on_yet_is_exit_6_after_the_timeout(cli, cluster, tmp_path):
    kube = cluster["kube"]
    assert cli(["node", "agent", "install", "--image", IMAGE, "-o", "json"]).exit_code == 0
    kube.add_node("new-node")  # joined after the DaemonSet: its controller has not made its pod yet
    kube.set_node_root("new-node", cluster["tree"]["root"])
    r = cli(["--request-timeout", "1s", *kube_args("new-node", image=None), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 6, r.stdout
    msg = r.only_node_error()["message"]
    assert "DaemonSet kube-system/katactl-node-agent" in msg and "within 1s" in msg


def test_agent_status_reports_a_pod_running_another_image_than_the_daemonset(cli, cluster):
    assert cli(["node", "agent", "install", "--image", "registry.example/katactl-agent:1"]).exit_code == 0
    assert _wait_agent_ready(cli).exit_code == 0
    r = cli(["node", "agent", "install", "--image", "registry.example/katactl-agent:2", "-o", "json"])
    assert r.json()["action"] == "updated"
    r = cli(["node", "agent", "status", "-o", "json"])   # the stand-in's pod keeps image 1
    assert r.exit_code == 8, r.stdout
    [it] = r.json()["items"]
    assert it["image"] == "registry.example/katactl-agent:1" and it["updated"] is False and it["ready"] is False
    r = cli(["node", "agent", "status", "-o", "wide"])
    assert r.exit_code == 8
    assert "IMAGE" in r.stdout and "registry.example/katactl-agent:1" in r.stdout
    assert "0/1 nodes ready" in r.stderr and "1 with another image" in r.stderr


def test_agent_gc_tries_every_pod_and_reports_what_it_deleted(cli, cluster):
    from tests._audit import audit_entries

    kube = cluster["kube"]
    names = [f"katactl-node-tree-node-aaaa{i}" for i in range(3)]
    for n in names:
        kube.add_pod(n, namespace="kube-system", node="tree-node", phase="Failed",
                     labels={"app.kubernetes.io/name": "katactl-node-agent", "katactl.io/agent-kind": "ephemeral"},
                     annotations={"katactl.io/created-by": "someone@elsewhere pid 1 at 2020-01-01T00:00:00Z"})
    kube.inject("DELETE", rf"pods/{names[1]}$", status=403, times=5)
    r = cli(["node", "agent", "gc", "--yes", "-o", "json"])
    assert r.exit_code == 4, r.stdout
    d = r.json()
    assert [i["name"] for i in d["items"]] == [names[0], names[2]] and d["changed"] is True
    [err] = d["errors"]
    assert err["name"] == names[1] and err["error"]["exitCode"] == 7
    assert agent_pods(kube) == [names[1]]
    [entry] = audit_entries("node.agent.gc")
    assert entry["deleted"] == [names[0], names[2]] and [f["name"] for f in entry["failed"]] == [names[1]]
    assert entry["result"] == "partial"


def test_no_pod_is_created_for_a_user_who_may_not_exec_into_it(cli, cluster):
    kube = cluster["kube"]
    kube.deny("create", "pods/exec")
    r = cli([*kube_args("tree-node"), "sandbox", "list", "-o", "json"])
    assert r.exit_code == 7, r.stdout
    assert "cannot create pods/exec in namespace kube-system" in r.only_node_error()["message"]
    assert not [q for q in kube.requests if q["method"] == "POST" and q["path"].endswith("/pods")]


def test_the_agent_daemonset_selects_linux_nodes_only(cli, cluster):
    from katactl import nodeagent

    kube = cluster["kube"]
    kube.add_node("win-node", labels={"kubernetes.io/os": "windows"},
                  taints=[{"key": "os", "value": "windows", "effect": "NoSchedule"}])
    assert cli(["node", "agent", "install", "--image", IMAGE]).exit_code == 0
    tmpl = kube.get_obj("DaemonSet", "katactl-node-agent", "kube-system")["spec"]["template"]["spec"]
    assert tmpl["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert {p["spec"]["nodeName"] for p in kube.list_objs("Pod", "kube-system")} == {"tree-node"}
    r = _wait_agent_ready(cli)
    assert r.exit_code == 0, r.stdout
    assert [i["node"] for i in r.json()["items"]] == ["tree-node"]
    # an ephemeral pod too: pinned with nodeName, it is held to it by kubelet's admission
    assert nodeagent.ephemeral_manifest("tree-node", IMAGE, "kube-system")["spec"]["nodeSelector"] == \
        {"kubernetes.io/os": "linux"}
    # a node the DaemonSet leaves out is said at once (it waited --request-timeout for a pod that
    # never comes, then exit 6)
    r = cli(["--via", "kube", "--request-timeout", "60s", "-N", "win-node", "sandbox", "list", "-o", "json"])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert "does not select node win-node: nodeSelector kubernetes.io/os=linux (the node has windows)" in \
        r.only_node_error()["message"], r.stdout
    assert not [q for q in kube.requests if q["method"] == "POST" and q["path"].endswith("/pods")]
