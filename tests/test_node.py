"""katactl node list|check|cordon|uncordon|drain against the kube-apiserver stand-in
(tests/kubeserver.py: real HTTPS, real katactl client, kubectl-proven), through the
real CLI entry point."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CliResult
from tests.conftest_kube import drain_until_evicting


def node_cli(cli, kc, *args) -> CliResult:
    return cli(["--kubeconfig", kc, "node", *args])


def unschedulable(kube, name) -> bool:
    return bool(kube.get_obj("Node", name)["spec"].get("unschedulable"))


def pods_on(kube, node) -> set[str]:
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in kube.list_objs("Pod")
            if p["spec"].get("nodeName") == node}


def audit_entries(home) -> list[dict]:
    p = home / "state" / "katactl" / "audit.log"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# -- list ----------------------------------------------------------------------

def test_list_counts_pods_and_kata_pods_in_every_format(cli, kube, kc):
    seed = kube.seed_twin_nodes(3)
    kube.add_node("kata-1", labels={"katacontainers.io/kata-runtime": "true", "pool": "batch"})
    r = node_cli(cli, kc, "list", "-o", "json")
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "NodeList" and d["apiVersion"] == "katactl/v1"
    rows = {i["name"]: i for i in d["items"]}
    running = sum(len(v) for k, v in seed["twin-a"].items() if k != "terminal")
    assert rows["twin-a"]["pods"] == running  # Succeeded pods hold nothing: not counted
    assert rows["twin-a"]["kataPods"] == 1 and rows["twin-a"]["kata"] is False
    assert rows["kata-1"]["kata"] is True and rows["kata-1"]["kataHandlers"] == ["kata"]
    assert rows["twin-a"]["status"] == "Ready" and rows["twin-a"]["kubeletVersion"] == "v1.33.1"
    assert node_cli(cli, kc, "list", "-o", "name").stdout.split() == ["kata-1", "twin-a", "twin-b"]
    wide = node_cli(cli, kc, "list", "-o", "wide").stdout
    assert "KERNEL" in wide.splitlines()[0] and "6.1.0-28-amd64" in wide
    assert "kind: NodeList" in node_cli(cli, kc, "list", "-o", "yaml").stdout
    plain = node_cli(cli, kc, "list").stdout.splitlines()
    assert plain[0].split()[:4] == ["NAME", "STATUS", "KATA", "PODS"]
    # -l filters by node labels, NODE arguments pick nodes
    assert node_cli(cli, kc, "list", "-l", "pool=batch", "-o", "name").stdout.split() == ["kata-1"]
    assert node_cli(cli, kc, "list", "twin-b", "-o", "name").stdout.split() == ["twin-b"]


def test_list_pages_through_the_api(cli, kube, kc):
    for i in range(7):
        kube.add_node(f"n{i}")
        for j in range(80):
            kube.add_pod(f"p{i}-{j}", "default", f"n{i}", {"app": "x"}, owner=None)
    r = node_cli(cli, kc, "list", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert all(i["pods"] == 80 for i in r.json()["items"])
    pod_lists = [q for q in kube.requests if q["path"].startswith("/api/v1/pods")]
    assert len(pod_lists) >= 2 and any("continue=" in q["path"] for q in pod_lists)


# -- cordon / uncordon -----------------------------------------------------------

def test_cordon_records_and_uncordon_restores(cli, kube, kc, _isolated_home):
    kube.add_node("n1")
    r = node_cli(cli, kc, "cordon", "n1", "--reason", "kernel 6.1.119", "-o", "json")
    assert r.exit_code == 0, r.stderr
    item = r.json()["items"][0]
    assert r.json()["changed"] is True and item["wasUnschedulable"] is False
    node = kube.get_obj("Node", "n1")
    assert node["spec"]["unschedulable"] is True
    rec = json.loads(node["metadata"]["annotations"]["katactl.io/cordon"])
    assert rec["reason"] == "kernel 6.1.119" and rec["wasUnschedulable"] is False and "@" in rec["by"]
    # idempotent
    r = node_cli(cli, kc, "cordon", "n1", "-o", "json")
    assert r.exit_code == 0 and r.json()["changed"] is False
    r = node_cli(cli, kc, "uncordon", "n1", "-o", "json")
    assert r.exit_code == 0 and r.json()["changed"] is True
    node = kube.get_obj("Node", "n1")
    assert not node["spec"].get("unschedulable") and "katactl.io/cordon" not in (node["metadata"].get("annotations") or {})
    r = node_cli(cli, kc, "uncordon", "n1", "-o", "json")
    assert r.exit_code == 0 and r.json()["changed"] is False
    actions = [(e["action"], e["target"], e["result"], e.get("changed")) for e in audit_entries(_isolated_home)]
    # each change: "requested" before its PATCH, then the outcome; the no-ops: nothing
    assert actions == [("node.cordon", "n1", "requested", None), ("node.cordon", "n1", "ok", True),
                       ("node.uncordon", "n1", "requested", None), ("node.uncordon", "n1", "ok", True)]
    # the patches are strategic-merge patches, as kubectl's
    patches = [q for q in kube.requests if q["method"] == "PATCH"]
    assert patches and all(q["headers"].get("Content-Type", q["headers"].get("content-type", "")).startswith(
        "application/strategic-merge-patch+json") for q in patches)
    assert all(q["headers"].get("User-Agent", "").startswith("katactl/") for q in kube.requests)


def test_uncordon_refuses_a_node_that_was_cordoned_before_katactl(cli, kube, kc):
    kube.add_node("n1", unschedulable=True)
    r = node_cli(cli, kc, "cordon", "n1", "-o", "json")
    assert r.exit_code == 0 and r.json()["items"][0]["wasUnschedulable"] is True
    r = node_cli(cli, kc, "uncordon", "n1")
    assert r.exit_code == 5, r.stderr
    assert "already cordoned" in r.stderr and "--force" in r.stderr
    assert unschedulable(kube, "n1")
    r = node_cli(cli, kc, "uncordon", "n1", "--force")
    assert r.exit_code == 0 and not unschedulable(kube, "n1")


def test_uncordon_refuses_a_node_cordoned_without_a_katactl_record(cli, kube, kc, _isolated_home):
    """A node katactl did not cordon is never uncordoned by katactl (design.md): no record and
    no owner of spec.unschedulable named: refused (exit 5, one line, the --force hint), nothing
    sent; --force does what kubectl uncordon does."""
    kube.add_node("n1", unschedulable=True)
    kube.requests.clear()
    r = node_cli(cli, kc, "uncordon", "n1")
    assert r.exit_code == 5, r.stderr
    err, hint = r.stderr.splitlines()
    assert "cordoned by someone else" in err and "no katactl.io/cordon record" in err, err
    assert hint.startswith("hint:") and "--force" in hint
    assert unschedulable(kube, "n1") and [q for q in kube.requests if q["method"] != "GET"] == []
    r = node_cli(cli, kc, "uncordon", "n1", "--force", "-o", "json")
    assert r.exit_code == 0 and r.json()["changed"] is True and not unschedulable(kube, "n1")
    assert [(e["action"], e["result"]) for e in audit_entries(_isolated_home)] == \
        [("node.uncordon", "error"), ("node.uncordon", "requested"), ("node.uncordon", "ok")]


def test_dry_runs_change_nothing(cli, kube, kc, _isolated_home):
    kube.add_node("n1")
    before = len(kube.requests)
    r = node_cli(cli, kc, "cordon", "n1", "--dry-run", "-o", "json")
    assert r.exit_code == 0 and r.json()["dryRun"] is True and r.json()["changed"] is True
    assert not any(q["method"] != "GET" for q in kube.requests[before:])  # client: nothing sent
    r = node_cli(cli, kc, "cordon", "n1", "--dry-run=server", "-o", "json")
    assert r.exit_code == 0 and r.json()["dryRun"] is True
    sent = [q for q in kube.requests[before:] if q["method"] == "PATCH"]
    assert len(sent) == 1 and "dryRun=All" in sent[0]["path"]
    assert not unschedulable(kube, "n1") and audit_entries(_isolated_home) == []


def test_many_nodes_partial_failure_exit_4(cli, kube, kc):
    kube.add_node("n1")
    r = node_cli(cli, kc, "cordon", "n1", "ghost", "-o", "json")
    assert r.exit_code == 4, r.stderr
    d = r.json()
    assert [i["name"] for i in d["items"]] == ["n1"] and d["errors"][0]["node"] == "ghost"
    assert d["errors"][0]["error"]["exitCode"] == 3


@pytest.mark.parametrize("args,code,needle", [
    (["cordon", "ghost"], 3, "ghost"),
    (["cordon"], 2, "at least one node"),
    (["cordon", "Bad_Name"], 2, "invalid Kubernetes name"),
    (["cordon", "n1\n"], 2, "invalid Kubernetes name"),
    (["cordon", "../n1"], 2, "invalid Kubernetes name"),
    (["list", "-l", "pool in ("], 2, ""),
    (["drain", "n1", "--grace-period", "-5"], 2, "--grace-period"),
    (["drain", "n1", "--timeout", "soon"], 2, "--timeout"),
    (["drain", "n1", "--timeout", "-1s"], 2, "--timeout"),
    (["drain", "n1", "--parallel", "0"], 2, "--parallel"),
    (["drain", "n1", "--dry-run=maybe"], 2, "--dry-run"),
    (["drain", "n1", "--pod-selector", "app in ("], 2, ""),
    (["check", "n1", "--fail-on", "severe"], 2, "--fail-on"),
])
def test_bad_input_is_one_clear_line(cli, kube, kc, args, code, needle):
    kube.add_node("n1")
    r = node_cli(cli, kc, *args)
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr
    errs = [line for line in r.stderr.splitlines() if line.startswith("katactl: error:")]
    assert len(errs) == 1 and needle in errs[0], r.stderr
    assert not unschedulable(kube, "n1")


def test_readonly_user_is_auth_error_naming_user_and_verb(cli, kube, tmp_path):
    kube.add_node("n1")
    kc = kube.kubeconfig(tmp_path / "ro", user="readonly")
    r = node_cli(cli, kc, "cordon", "n1", "-o", "json")
    assert r.exit_code == 7, r.stderr
    assert "readonly" in r.stderr and "cannot patch" in r.stderr
    # one named node: the NodeCordon list, the node's failure in its errors (docs/output.md)
    assert r.only_node_error()["code"] == "AuthFailed" and not unschedulable(kube, "n1")
    # reads work
    assert node_cli(cli, kc, "list", "-o", "name").stdout.split() == ["n1"]


@pytest.mark.parametrize("content,code", [
    (None, 2),                                   # missing
    ("", 2),                                     # empty
    ("{not: [yaml", 2),                          # not YAML
    (b"\xff\xfe\x00garbage", 2),                 # not text
    ("apiVersion: v1\nkind: Config\ncurrent-context: nope\n", 2),  # missing context
    ("- a\n- b\n", 2),                           # not a mapping
])
def test_broken_kubeconfig_is_usage_error(cli, tmp_path, content, code):
    p = tmp_path / "kc"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    r = node_cli(cli, str(p), "list")
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr
    assert "kubeconfig" in r.stderr


def test_bad_ca_and_garbage_token_are_exit_7(cli, kube, tmp_path):
    kube.add_node("n1")
    r = node_cli(cli, kube.kubeconfig(tmp_path / "tok", token="garbage"), "list")
    assert r.exit_code == 7 and "Unauthorized" in r.stderr, r.stderr
    other = json.loads(open(kube.kubeconfig(tmp_path / "ca")).read())
    other["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(_stranger_ca()).decode()
    (tmp_path / "ca").write_text(json.dumps(other))
    r = node_cli(cli, str(tmp_path / "ca"), "list")
    assert r.exit_code == 7 and "Traceback" not in r.stderr, r.stderr
    assert "certificate" in r.stderr.lower() or "ssl" in r.stderr.lower()


def _stranger_ca() -> bytes:
    """A CA certificate that did not sign the stand-in's server certificate."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger-ca")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_context_namespace_and_kubeconfig_list_merge(cli, kube, tmp_path, monkeypatch):
    """KUBECONFIG with several paths is merged as kubectl merges it; --context picks one."""
    kube.add_node("n1")
    full = json.loads(open(kube.kubeconfig(tmp_path / "full")).read())
    a = {k: full[k] for k in ("apiVersion", "kind")} | {"clusters": full["clusters"], "users": full["users"],
                                                       "contexts": [], "current-context": "standin"}
    b = {k: full[k] for k in ("apiVersion", "kind")} | {"contexts": full["contexts"]}
    (tmp_path / "a").write_text(json.dumps(a))
    (tmp_path / "b").write_text(json.dumps(b))
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    r = cli(["node", "list", "-o", "name"])
    assert r.exit_code == 0 and r.stdout.split() == ["n1"], r.stderr
    r = cli(["--context", "nope", "node", "list"])
    assert r.exit_code == 2 and "nope" in r.stderr


# -- API faults -----------------------------------------------------------------

def test_retries_429_and_503_bursts_honouring_retry_after(cli, kube, kc):
    kube.add_node("n1")
    kube.inject("GET", r"^/api/v1/nodes", status=429, times=1, retry_after=1)
    kube.inject("GET", r"^/api/v1/nodes", status=503, times=2)
    t0 = time.monotonic()
    r = node_cli(cli, kc, "list", "-o", "name")
    assert r.exit_code == 0 and r.stdout.split() == ["n1"], r.stderr
    assert time.monotonic() - t0 >= 1.0  # waited as Retry-After asked
    kube.inject("GET", r"^/api/v1/nodes", status=503, times=50)
    r = node_cli(cli, kc, "list")
    assert r.exit_code == 1 and "503" in r.stderr


def test_connection_cut_mid_list_is_retried(cli, kube, kc):
    kube.add_node("n1")
    for j in range(30):
        kube.add_pod(f"p{j}", "default", "n1", {"app": "x"})
    kube.cut(r"^/api/v1/pods", times=1)
    r = node_cli(cli, kc, "list", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"][0]["pods"] == 30


def test_api_down_is_exit_7(cli, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = tmp_path / "kc"
    p.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "u"}}]}))
    r = cli(["--kubeconfig", str(p), "--request-timeout", "2s", "node", "cordon", "n1", "-o", "json"])
    assert r.exit_code == 7, r.stderr
    assert r.only_node_error()["exitCode"] == 7


# -- drain -----------------------------------------------------------------------

@pytest.mark.parametrize("dry", [[], ["--dry-run=server"]])
def test_drain_refusals_list_every_pod_and_change_nothing(cli, kube, kc, _isolated_home, dry):
    """The filters run before the cordon (kubectl's order is cordon, then filter): a refused
    drain sends no PATCH at all, not a cordon and its undoing; neither does a server dry run."""
    seed = kube.seed_twin_nodes(5)["twin-a"]
    before = pods_on(kube, "twin-a")
    kube.requests.clear()
    r = node_cli(cli, kc, "drain", "twin-a", *dry, "-o", "json")
    assert r.exit_code == 5, r.stderr
    msg = r.only_node_error()["message"]
    for ref in seed["daemonset"] + seed["emptydir"] + seed["unreplicated"]:
        assert ref in msg
    assert "use --ignore-daemonsets" in msg and "use --delete-emptydir-data" in msg and "use --force" in msg
    assert [q for q in kube.requests if q["method"] != "GET"] == []
    assert not unschedulable(kube, "twin-a") and pods_on(kube, "twin-a") == before
    assert "katactl.io/cordon" not in (kube.get_obj("Node", "twin-a")["metadata"].get("annotations") or {})
    assert r.only_node_error()["details"]["drain"]["restored"] is False and "uncordoned again" not in r.stderr
    if not dry:
        [entry] = audit_entries(_isolated_home)
        assert (entry["action"], entry["result"], entry["restored"]) == ("node.drain", "error", False)


def test_drain_refused_on_a_cordoned_node_leaves_it_and_records_nothing(cli, kube, kc):
    """A node someone cordoned, refused by the filters: no cordon record written either."""
    kube.add_node("n1", unschedulable=True)
    kube.add_pod("bare", "default", "n1")  # no controller: refused without --force
    kube.requests.clear()
    r = node_cli(cli, kc, "drain", "n1")
    assert r.exit_code == 5 and "default/bare" in r.stderr, r.stderr
    assert [q for q in kube.requests if q["method"] != "GET"] == []
    assert unschedulable(kube, "n1") and not kube.get_obj("Node", "n1")["metadata"].get("annotations")


def test_drain_evicts_waits_and_keeps_the_node_cordoned(cli, kube, kc, _isolated_home):
    seed = kube.seed_twin_nodes(5)["twin-a"]
    for p in seed["blocked"]:  # no PDB trouble in this one
        ns, name = p.split("/")
    kube.store.pop(("poddisruptionbudgets", "guarded-twin-a", "db-twin-a"), None)
    r = node_cli(cli, kc, "drain", "twin-a", "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                 "--grace-period", "0", "--timeout", "60s", "-o", "json")
    assert r.exit_code == 0, r.stderr
    item = r.json()["items"][0]
    want = seed["evictable"] + seed["emptydir"] + seed["unreplicated"] + seed["terminal"] + seed["kata"] + seed["blocked"]
    assert sorted(item["evicted"]) == sorted(want)
    skipped = {s["podRef"]: s["reason"] for s in item["skipped"]}
    assert set(skipped) == set(seed["daemonset"] + seed["mirror"])
    # the pod object of every katactl kind (review 11, finding 9), with its uid
    assert all(f"{s['pod']['namespace']}/{s['pod']['name']}" == s["podRef"] and s["pod"]["uid"]
               for s in item["skipped"])
    left = pods_on(kube, "twin-a")
    assert left == set(seed["daemonset"] + seed["mirror"])
    assert unschedulable(kube, "twin-a")
    evictions = [q for q in kube.requests if q["path"].endswith("/eviction")]
    assert len(evictions) == len(want)
    assert all(q["body"]["apiVersion"] == "policy/v1" and q["body"]["deleteOptions"]["gracePeriodSeconds"] == 0
               for q in evictions)
    entry = [e for e in audit_entries(_isolated_home) if e["action"] == "node.drain"]
    assert [e["result"] for e in entry] == ["requested", "ok"] and sorted(entry[1]["evicted"]) == sorted(want)


def test_drain_blocked_by_pdb_times_out_restores_and_reports(cli, kube, kc):
    seed = kube.seed_twin_nodes(5)["twin-a"]
    r = cli(["--kubeconfig", kc, "-o", "jsonl", "node", "drain", "twin-a", "--ignore-daemonsets",
             "--delete-emptydir-data", "--force", "--grace-period", "0", "--timeout", "2s"])
    assert r.exit_code == 6, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [d["kind"] for d in lines]
    assert "PodEvictionBlocked" in kinds and "NodeRestored" in kinds and kinds[-1] == "NodeDrain"
    assert lines[-1]["items"] == [] and lines[-1]["errors"][0]["error"]["code"] == "Timeout"
    blocked = {d["podRef"] for d in lines if d["kind"] == "PodEvictionBlocked"}
    assert blocked == set(seed["blocked"])
    assert all(d["pod"]["uid"] and f"{d['pod']['namespace']}/{d['pod']['name']}" == d["podRef"]
               for d in lines if d["kind"] in ("PodEvicting", "PodEvictionBlocked", "PodDeleted"))
    assert any("db-twin-a" in (d.get("budget") or "") for d in lines if d["kind"] == "PodEvictionBlocked")
    assert not unschedulable(kube, "twin-a")
    assert set(seed["blocked"]) <= pods_on(kube, "twin-a")
    assert lines[-1]["errors"][0]["error"]["details"]["drain"]["blocked"]


@pytest.mark.parametrize("evictable,keep,changed", [(True, True, True), (True, False, True), (False, True, True),
                                                     (False, False, False)])
def test_a_drain_that_fails_half_way_reports_what_it_changed(cli, kube, kc, evictable, keep, changed):
    """docs/output.md: every mutating command reports ``changed``. A drain that evicted a pod, or
    left its cordon on (--keep-cordoned), before a budget timed it out changed the cluster: the
    NodeDrain's ``changed`` and its node's ``errors[]`` entry say so (Ansible's changed_when), in
    a one-node run and beside a node that needed nothing; a drain undone whole (nothing evicted,
    the node uncordoned again) changed nothing."""
    for n in ("n1", "idle", "spare"):
        kube.add_node(n)
    kube.add_replicaset("ra", "default", 1, {"app": "a"})
    kube.add_pod("pa", "default", "n1", labels={"app": "a"}, owner=("ReplicaSet", "ra"))
    kube.add_pdb("pdb", "default", {"app": "a"}, min_available=1)
    assert node_cli(cli, kc, "cordon", "idle").exit_code == 0
    flags = ["--timeout", "2s", "-o", "json"] + (["--keep-cordoned"] if keep else [])
    for i, nodes in enumerate((["n1"], ["idle", "n1"])):
        assert node_cli(cli, kc, "uncordon", "n1").exit_code == 0
        if evictable:
            kube.add_replicaset(f"rb{i}", "default", 2, {"app": f"b{i}"})
            kube.add_pod(f"pb{i}", "default", "n1", labels={"app": f"b{i}"}, owner=("ReplicaSet", f"rb{i}"))
        r = node_cli(cli, kc, "drain", *nodes, *flags)
        assert r.exit_code == (6 if len(nodes) == 1 else 4), r.stdout + r.stderr
        d = r.json()
        err = next(e for e in d["errors"] if e["node"] == "n1")
        assert err["changed"] is err["error"]["details"]["drain"]["changed"] is changed, d
        assert d["changed"] is changed, d
        assert unschedulable(kube, "n1") is keep
        assert f"default/pb{i}" not in pods_on(kube, "n1")


def test_drain_of_a_node_cordoned_by_someone_else_leaves_it_cordoned(cli, kube, kc):
    kube.seed_twin_nodes(5)
    node = kube.get_obj("Node", "twin-a")
    kube.store[("nodes", "", "twin-a")]["spec"]["unschedulable"] = True
    assert node is not None
    r = node_cli(cli, kc, "drain", "twin-a")
    assert r.exit_code == 5
    assert unschedulable(kube, "twin-a")


def test_drain_kata_only_leaves_runc_services(cli, kube, kc):
    seed = kube.seed_twin_nodes(5)["twin-a"]
    r = node_cli(cli, kc, "drain", "twin-a", "--kata-only", "--grace-period", "0", "--timeout", "30s", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"][0]["evicted"] == seed["kata"]
    assert pods_on(kube, "twin-a") >= set(seed["evictable"] + seed["blocked"] + seed["unreplicated"])


def test_drain_disable_eviction_deletes_past_the_pdb(cli, kube, kc):
    seed = kube.seed_twin_nodes(5)["twin-a"]
    r = node_cli(cli, kc, "drain", "twin-a", "--disable-eviction", "--ignore-daemonsets",
                 "--delete-emptydir-data", "--force", "--grace-period", "0", "--timeout", "30s", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert set(seed["blocked"]) <= set(r.json()["items"][0]["evicted"])
    assert not any(q["path"].endswith("/eviction") for q in kube.requests)


def test_drain_server_dry_run_sends_dry_run_everywhere(cli, kube, kc):
    seed = kube.seed_twin_nodes(5)["twin-a"]
    kube.store.pop(("poddisruptionbudgets", "guarded-twin-a", "db-twin-a"), None)
    before = pods_on(kube, "twin-a")
    n = len(kube.requests)
    r = node_cli(cli, kc, "drain", "twin-a", "--ignore-daemonsets", "--delete-emptydir-data", "--force",
                 "--dry-run=server", "-o", "json")
    assert r.exit_code == 0, r.stderr
    # changed: what it would change (cordon --dry-run reports so too)
    assert r.json()["dryRun"] is True and r.json()["changed"] is True
    muts = [q for q in kube.requests[n:] if q["method"] != "GET"]
    assert muts and all("dryRun=All" in q["path"] or (q.get("body") or {}).get("deleteOptions", {}).get("dryRun")
                        == ["All"] for q in muts)
    assert pods_on(kube, "twin-a") == before and not unschedulable(kube, "twin-a")
    assert len(r.json()["items"][0]["evicted"]) == len(before) - len(seed["daemonset"] + seed["mirror"])


def test_drain_pod_under_two_pdbs_fails_that_pod(cli, kube, kc):
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 3, {"app": "a"})
    kube.add_pod("a-0", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    kube.add_pdb("one", "default", {"app": "a"}, max_unavailable=1)
    kube.add_pdb("two", "default", {"app": "a"}, max_unavailable=1)
    r = node_cli(cli, kc, "drain", "n1", "--timeout", "20s")
    assert r.exit_code == 1, r.stderr
    assert "more than one PodDisruptionBudget" in r.stderr
    assert not unschedulable(kube, "n1")
    r = node_cli(cli, kc, "check", "n1", "-o", "json")
    assert r.exit_code == 8 and any(f["check"] == "pdb-multiple" for f in r.json()["items"])


def test_empty_pdb_selector_guards_every_pod_of_its_namespace(cli, kube, kc):
    # policy/v1: an empty selector selects every pod of the namespace (a nil one none); the stand-in's
    # eviction and katactl's check must both see the guard, and a pod elsewhere is not guarded
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 1, {"app": "a"})
    kube.add_pod("a-0", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    kube.add_replicaset("rs", "other", 1, {"app": "b"})
    kube.add_pod("b-0", "other", "n1", {"app": "b"}, owner=("ReplicaSet", "rs"))
    kube.add_pdb("all", "default", {}, min_available=1)
    assert kube.get_obj("PodDisruptionBudget", "all")["status"]["expectedPods"] == 1
    r = node_cli(cli, kc, "check", "n1", "-o", "json")
    blocks = [f["target"] for f in r.json()["items"] if f["check"] == "pdb-blocks"]
    assert r.exit_code == 8 and blocks == ["default/a-0"], r.stdout
    r = node_cli(cli, kc, "drain", "n1", "--timeout", "2s")
    assert r.exit_code == 6 and "default/a-0" in r.stderr, r.stderr
    assert pods_on(kube, "n1") == {"default/a-0"}  # other/b-0 was evicted; the guarded pod stays
    assert not unschedulable(kube, "n1")


def test_drain_pod_that_never_terminates_times_out(cli, kube, kc):
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 1, {"app": "a"})
    kube.add_pod("a-0", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"),
                 annotations={"test.katactl.io/stuck-terminating": "true"})
    r = node_cli(cli, kc, "drain", "n1", "--timeout", "2s", "--grace-period", "1")
    assert r.exit_code == 6 and "default/a-0" in r.stderr, r.stderr
    # ... unless told to stop waiting for pods stuck deleting (deletionTimestamp is
    # now + grace, as the real server sets it: 1 s of grace + 1 s of skip)
    time.sleep(2.2)
    r = node_cli(cli, kc, "drain", "n1", "--timeout", "10s", "--skip-wait-for-delete-timeout", "1")
    assert r.exit_code == 0, r.stderr


def test_node_deleted_during_drain(cli, kube, kc):
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 1, {"app": "a"})
    kube.add_pod("a-0", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    kube.add_pdb("pdb", "default", {"app": "a"}, min_available=1)
    import threading

    threading.Timer(1.0, lambda: kube.store.pop(("nodes", "", "n1"), None)).start()
    r = node_cli(cli, kc, "drain", "n1", "--timeout", "3s")
    assert r.exit_code in (3, 6), r.stderr
    assert "Traceback" not in r.stderr and "n1" in r.stderr


def test_ctrl_c_mid_drain_restores_cordon_and_exits_130(kube, kc):
    p = drain_until_evicting(kube, kc)
    try:
        assert unschedulable(kube, "twin-a")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert not unschedulable(kube, "twin-a")
    assert "Traceback" not in err


# -- check -----------------------------------------------------------------------

def test_check_reports_blockers_with_numbers(cli, kube, kc):
    seed = kube.seed_twin_nodes(5)["twin-a"]
    r = node_cli(cli, kc, "check", "twin-a", "-o", "json")
    assert r.exit_code == 8, r.stderr
    items = r.json()["items"]
    by_check: dict[str, list] = {}
    for f in items:
        by_check.setdefault(f["check"], []).append(f)
    assert {f["target"] for f in by_check["pdb-blocks"]} == set(seed["blocked"])
    assert by_check["pdb-blocks"][0]["desiredHealthy"] == 2 and by_check["pdb-blocks"][0]["currentHealthy"] == 2
    assert {f["target"] for f in by_check["kata-pod"]} == set(seed["kata"])
    assert by_check["kata-pod"][0]["overhead"] == {"cpu": "250m", "memory": "160Mi"}
    filtered = {f["target"] for f in by_check["drain-filter"]}
    assert filtered == set(seed["daemonset"] + seed["emptydir"] + seed["unreplicated"])
    assert not any(q["method"] != "GET" for q in kube.requests)  # read-only
    r = node_cli(cli, kc, "check", "twin-a", "--fail-on", "critical")
    assert r.exit_code == 0


def _check_and_drain_node(kube):
    kube.add_node("n1")
    kube.add_node("spare")  # replacements land here
    kube.add_daemonset("ds", "default", {"app": "ds"})
    kube.add_pod("ds-n1", "default", "n1", {"app": "ds"}, owner=("DaemonSet", "ds"))
    kube.add_pod("bare", "default", "n1")  # no controller
    kube.add_replicaset("scratch", "default", 1, {"app": "scratch"})
    kube.add_pod("scratch-0", "default", "n1", {"app": "scratch"}, owner=("ReplicaSet", "scratch"), empty_dir=True)


@pytest.mark.parametrize("flags,refused", [
    ([], {"default/ds-n1", "default/bare", "default/scratch-0"}),
    (["--ignore-daemonsets"], {"default/bare", "default/scratch-0"}),
    (["--ignore-daemonsets", "--force"], {"default/scratch-0"}),
    (["--ignore-daemonsets", "--force", "--delete-emptydir-data"], set()),
])
def test_check_passes_exactly_when_a_drain_with_the_same_flags_passes_its_filters(cli, kube, kc, flags, refused):
    """`node check && node drain` agree: a pod the drain's filters refuse is a high finding
    (the default --fail-on); one the drain skips or deletes with a warning is info."""
    _check_and_drain_node(kube)
    r = node_cli(cli, kc, "check", "n1", *flags, "-o", "json")
    assert r.exit_code == (8 if refused else 0), r.stdout + r.stderr
    found = {f["target"]: f for f in r.json()["items"] if f["check"] == "drain-filter"}
    assert {t for t, f in found.items() if f["severity"] == "high"} == refused
    assert {t for t, f in found.items() if f["severity"] != "high"} == \
        {"default/ds-n1", "default/bare", "default/scratch-0"} - refused
    assert all(f["severity"] == "info" for t, f in found.items() if t not in refused)
    assert not any(q["method"] != "GET" for q in kube.requests)  # read-only
    r = node_cli(cli, kc, "drain", "n1", *flags, "--grace-period", "0", "--timeout", "60s")
    assert r.exit_code == (5 if refused else 0), r.stderr


# -- kubectl and katactl on twin nodes ------------------------------------------------

def test_kubectl_and_katactl_drain_twins_alike(cli, kube, kc, kubectl_133):
    """On twin nodes of one seed, kubectl drain and katactl node drain evict the same
    pods, skip the same pods and are blocked by the same PDB."""
    seeds = kube.seed_twin_nodes(11)
    kube.add_node("spare")  # replacements land here, not on the other twin
    flags = ["--ignore-daemonsets", "--delete-emptydir-data", "--force", "--grace-period", "0"]

    def twin(ref: str, node: str) -> str:
        return ref.replace(node, "N")

    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "drain", "twin-a", *flags, "--timeout", "3s"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "disruption budget" in p.stderr
    left_a = {twin(r, "twin-a") for r in pods_on(kube, "twin-a")}
    r = node_cli(cli, kc, "drain", "twin-b", *flags, "--timeout", "3s", "--keep-cordoned", "-o", "json")
    assert r.exit_code == 6, r.stderr
    left_b = {twin(r_, "twin-b") for r_ in pods_on(kube, "twin-b")}
    assert left_a == left_b
    blocked_b = {twin(b["podRef"], "twin-b") for b in r.only_node_error()["details"]["drain"]["blocked"]}
    assert blocked_b == {twin(x, "twin-a") for x in seeds["twin-a"]["blocked"]}
    # kubectl leaves the node cordoned after a failed drain; katactl did too, here, by request
    assert unschedulable(kube, "twin-a") and unschedulable(kube, "twin-b")
    ev_a = {twin(q["path"].split("/")[-2], "twin-a") for q in kube.requests
            if q["path"].endswith("/eviction") and "twin-a" in q["path"]}
    ev_b = {twin(q["path"].split("/")[-2], "twin-b") for q in kube.requests
            if q["path"].endswith("/eviction") and "twin-b" in q["path"]}
    assert ev_a == ev_b and ev_a


# -- what only the node knows: releases, stale sandboxes, dumps ---------------------------

def test_stale_release_drain_evicts_only_pods_on_the_old_release(cli, kube, kc, tmp_path):
    """Release A and B staged on a node root whose /proc is this machine's; a sandbox
    started on A keeps running across the switch to B, one started after runs B. Through
    the stand-in, `drain --stale-release` evicts only the A pod; `check --node-facts`
    names it."""
    from katactl.lab import layout
    from tests import upgrade_fixtures as fx
    from tests.test_upgrade_procs import A, B, start_sandbox

    node = tmp_path / "node"
    node.mkdir()
    os.symlink("/proc", node / "proc")
    for v in (A, B):
        tb = fx.make_tarball(str(tmp_path), v, str(tmp_path), compression="gz")
        assert cli(["--host-root", str(node), "upgrade", "stage", tb]).exit_code == 0
    procs: list = []
    try:
        assert cli(["--host-root", str(node), "upgrade", "switch", A]).exit_code == 0
        sid_a = layout.sandbox_id_for(1)
        start_sandbox(node, procs, A, sid_a)
        assert cli(["--host-root", str(node), "upgrade", "switch", B]).exit_code == 0
        sid_b = layout.sandbox_id_for(2)
        start_sandbox(node, procs, B, sid_b)

        kube.add_node("n1")
        kube.add_node("spare")
        kube.add_runtimeclass("kata", "kata", {"cpu": "250m", "memory": "160Mi"})
        for sid in (sid_a, sid_b):
            name = f"batch-{sid[:4]}"
            kube.add_replicaset(name, "offline", 1, {"app": name})
            kube.add_pod(name, "offline", "n1", {"app": name}, owner=("ReplicaSet", name), runtime_class="kata")
        kube.add_replicaset("web", "online", 1, {"app": "web"})
        kube.add_pod("web-0", "online", "n1", {"app": "web"}, owner=("ReplicaSet", "web"))

        r = cli(["--kubeconfig", kc, "--host-root", str(node), "node", "check", "n1", "--node-facts",
                 "--fail-on", "critical", "-o", "json"])
        assert r.exit_code == 0, r.stderr
        found = {f["check"]: f for f in r.json()["items"]}
        assert found["kata-release"]["message"].endswith(B)
        [stale] = found["kata-stale-sandboxes"]["sandboxes"]
        assert stale["id"] == sid_a and stale["podRef"] == f"offline/{stale['pod']['name']}"

        r = cli(["--kubeconfig", kc, "--host-root", str(node), "node", "drain", "n1", "--stale-release",
                 "--grace-period", "0", "--timeout", "30s", "-o", "json"])
        assert r.exit_code == 0, r.stderr
        item = r.json()["items"][0]
        assert item["evicted"] == [f"offline/batch-{sid_a[:4]}"]
        reasons = {s["podRef"]: s["reason"] for s in item["skipped"]}
        assert "current release" in reasons[f"offline/batch-{sid_b[:4]}"]
        assert "not a Kata pod" in reasons["online/web-0"]
        # --host-root is one node's root
        r = cli(["--kubeconfig", kc, "--host-root", str(node), "node", "drain", "n1", "spare", "--stale-release"])
        assert r.exit_code == 2 and "one node" in r.stderr
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_unwritable_audit_log_refuses_node_changes_unless_no_audit(cli, kube, kc, tmp_path, monkeypatch):
    kube.add_node("n1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(blocker / "audit.log"))  # under a regular file
    r = node_cli(cli, kc, "cordon", "n1")
    assert r.exit_code == 5 and "audit log" in r.stderr
    assert not unschedulable(kube, "n1")
    r = node_cli(cli, kc, "cordon", "n1", "--dry-run")  # a dry run changes nothing: allowed
    assert r.exit_code == 0
    r = cli(["--kubeconfig", kc, "--no-audit", "node", "cordon", "n1"])
    assert r.exit_code == 0 and unschedulable(kube, "n1")


def test_exec_credential_plugin_and_token_file(cli, kube, tmp_path):
    """kubeconfig users authenticated by an exec plugin (client.authentication.k8s.io/v1)
    or a tokenFile, as kubectl reads them; a failing plugin is a clear error."""
    kube.add_node("n1")
    base = json.loads(open(kube.kubeconfig(tmp_path / "base")).read())
    plugin = tmp_path / "cred.py"
    plugin.write_text("import json, sys\nprint(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1',"
                      " 'kind': 'ExecCredential', 'status': {'token': sys.argv[1]}}))\n")
    for user, ok in (({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                                "args": [str(plugin), kube.tokens["admin"]], "interactiveMode": "Never"}}, 0),
                     ({"tokenFile": str(tmp_path / "tok")}, 0),
                     ({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "/bin/false",
                                "interactiveMode": "Never"}}, None)):
        (tmp_path / "tok").write_text(kube.tokens["admin"])
        base["users"][0]["user"] = user
        (tmp_path / "kc").write_text(json.dumps(base))
        r = node_cli(cli, str(tmp_path / "kc"), "list", "-o", "name")
        if ok == 0:
            assert r.exit_code == 0 and r.stdout.split() == ["n1"], r.stderr
        else:
            assert r.exit_code == 7 and "credential plugin failed" in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1 and "ERROR:root" not in r.stderr


def test_drain_on_a_terminal_shows_progress_not_a_line_per_pod(kube, kc):
    from tests._pty import run_on_pty

    seed = kube.seed_twin_nodes(5)["twin-a"]
    kube.add_node("spare")
    kube.store.pop(("poddisruptionbudgets", "guarded-twin-a", "db-twin-a"), None)
    rc, text = run_on_pty([sys.executable, "-m", "katactl", "--kubeconfig", kc, "node", "drain", "twin-a",
                           "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--grace-period", "0"],
                          COLUMNS="120")
    assert rc == 0, text
    assert "evicting pods" in text
    assert "pod/apps/" not in text  # the bar counts them
    assert "EVICTED" in text and "twin-a" in text and seed["evictable"]


def test_nodes_drain_one_after_another_unless_parallel(cli, kube, kc):
    """Several nodes: the second is cordoned only after the first finished, unless
    --parallel overlaps them (read from the order of requests, not from the clock)."""
    for n in ("n1", "n2"):
        kube.add_node(n)
        kube.add_replicaset(f"rs-{n}", "default", 1, {"app": n})
        kube.add_pod(f"p-{n}", "default", n, {"app": n}, owner=("ReplicaSet", f"rs-{n}"))
        kube.add_pdb(f"pdb-{n}", "default", {"app": n}, min_available=1)  # blocks until --timeout

    def order(*extra):
        n0 = len(kube.requests)
        r = node_cli(cli, kc, "drain", "n1", "n2", "--timeout", "1s", *extra, "-o", "json")
        assert r.exit_code == 6, r.stderr
        assert [e["node"] for e in r.json()["errors"]] == ["n1", "n2"]
        reqs = kube.requests[n0:]
        cordon2 = next(i for i, q in enumerate(reqs) if q["method"] == "PATCH" and "/nodes/n2" in q["path"])
        last1 = max(i for i, q in enumerate(reqs) if "p-n1" in q["path"] or "/nodes/n1" in q["path"])
        return cordon2, last1

    cordon2, last1 = order()
    assert cordon2 > last1  # n1 was finished (and restored) before n2 was touched
    cordon2, last1 = order("--parallel", "2")
    assert cordon2 < last1  # overlapped
    assert not unschedulable(kube, "n1") and not unschedulable(kube, "n2")


def test_dry_run_server_only_where_the_api_can_validate(cli):
    r = cli(["vmcore", "trigger", "x", "--dry-run=server"])
    assert r.exit_code == 2 and "--dry-run=server is for commands" in r.stderr
    r = cli(["upgrade", "switch", "1.0", "--dry-run=maybe"])
    assert r.exit_code == 2 and "client, server or none" in r.stderr


def test_a_change_the_server_dropped_unanswered_is_resent_only_when_harmless(cli, kube, kc):
    """A server closing a reused connection without an answer (idle keep-alive): the cordon
    PATCH (sets the same values again) is resent; an eviction POST is not (it could evict twice)."""
    kube.add_node("n1")
    kube.drop(r"^/api/v1/nodes/n1", method="PATCH")
    r = node_cli(cli, kc, "cordon", "n1", "-o", "json")
    assert r.exit_code == 0 and r.json()["changed"] is True, r.stderr
    assert unschedulable(kube, "n1")
    assert len([q for q in kube.requests if q["method"] == "PATCH"]) == 2  # dropped, then resent

    kube.add_replicaset("rs", "default", 1, {"app": "a"})
    kube.add_pod("a-0", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    node_cli(cli, kc, "uncordon", "n1")
    kube.drop(r"/eviction$", method="POST")
    r = node_cli(cli, kc, "drain", "n1", "--grace-period", "0", "--timeout", "20s")
    assert r.exit_code == 1 and "default/a-0" in r.stderr and "without sending a response" in r.stderr, r.stderr
    assert len([q for q in kube.requests if q["path"].endswith("/eviction")]) == 1
    assert not unschedulable(kube, "n1")  # restored after the failure


def test_drain_dry_runs_need_no_audit_log_and_write_none(cli, kube, kc, tmp_path, monkeypatch, _isolated_home):
    """A dry run changes nothing: it neither needs a writable audit log nor writes to it
    (the drain's params named it dry_run, so the audit wrapper took it for a real run)."""
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 1, {"app": "a"})
    kube.add_pod("a-0", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    for mode in ("--dry-run", "--dry-run=server"):
        r = node_cli(cli, kc, "drain", "n1", mode, "-o", "json")
        assert r.exit_code == 0 and r.json()["dryRun"] is True, r.stderr
    assert audit_entries(_isolated_home) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(blocker / "audit.log"))
    assert node_cli(cli, kc, "drain", "n1", "--dry-run").exit_code == 0
    assert node_cli(cli, kc, "drain", "n1").exit_code == 5  # the real one is refused
    assert not unschedulable(kube, "n1")


def test_check_flags_a_pod_stuck_past_its_grace_period(cli, kube, kc):
    import datetime as dt

    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 2, {"app": "a"})
    for name, ago in (("stuck", 300), ("leaving", 5)):
        kube.add_pod(name, "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=ago)
        kube.store[("pods", "default", name)]["metadata"].update(
            deletionTimestamp=past.strftime("%Y-%m-%dT%H:%M:%SZ"), deletionGracePeriodSeconds=30)
    r = node_cli(cli, kc, "check", "n1", "-o", "json")
    stuck = [f["target"] for f in r.json()["items"] if f["check"] == "stuck-terminating"]
    assert stuck == ["default/stuck"] and r.exit_code == 8, r.stdout
