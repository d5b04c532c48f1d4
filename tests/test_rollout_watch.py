"""The rollout's node watch (katactl/rollout/nodeview.py over KubeAPI.watch) against the
kube-apiserver stand-in over HTTPS: the watch client's events (label selector leaving as
DELETED, bookmarks, the ERROR 410 of a too-old resourceVersion, the server's end, an abort),
and ``rollout run`` seeing a node cordoned by someone else through the watch (no node list
after the start), after a 410 (one list again) and after the server dropped the watch."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from katactl.backends.kube import KubeAPI, WatchExpired
from katactl.errors import UnreachableError
from katactl.rollout import engine, nodeview
from tests.test_rollout import fleet
from tests.test_rollout_engine_errors import _Store
from tests.test_rollout_scale import plan_of


@pytest.fixture
def api(kube_api):
    return kube_api


def _rv(api, selector=None) -> str:
    meta: dict = {}
    for _ in api.list_pages("/api/v1/nodes", meta=meta, labelSelector=selector):
        pass
    return meta["resourceVersion"]


def _node_lists(kube) -> list[str]:
    return [r["path"] for r in kube.requests if r["method"] == "GET" and r["path"].startswith("/api/v1/nodes?")
            and "watch=true" not in r["path"]]


# -- the client -----------------------------------------------------------------------

def test_watch_events_selector_leaving_is_deleted_and_the_server_end_returns(kube, api):
    kube.add_node("a", labels={"pool": "x"})
    kube.add_node("b", labels={"pool": "x"})
    rv = _rv(api, "pool=x")
    got: list[tuple[str, str, str]] = []
    opened = threading.Event()

    def read():
        for ev in api.watch("/api/v1/nodes", resource_version=rv, timeout_seconds=3, on_open=opened.set,
                            labelSelector="pool=x"):
            o = ev["object"]
            got.append((ev["type"], o["metadata"].get("name"), o["metadata"]["resourceVersion"]))
    t = threading.Thread(target=read)
    t.start()
    assert opened.wait(10)
    kube.add_node("c", labels={"pool": "x"})
    api.patch("/api/v1/nodes/a", {"spec": {"unschedulable": True}})
    left = api.patch("/api/v1/nodes/b", {"metadata": {"labels": {"pool": "y"}}})
    api.patch("/api/v1/nodes/b", {"metadata": {"labels": {"pool": "x"}}})
    api.delete("/api/v1/nodes/c")
    t.join(20)  # the server ends the watch at timeoutSeconds: the generator returns
    assert not t.is_alive()
    changes = [(ty, n) for ty, n, _ in got if ty != "BOOKMARK"]
    assert changes == [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b"), ("ADDED", "b"), ("DELETED", "c")]
    # the node that left the selection: its previous content at the change's resourceVersion
    assert [x[2] for x in got if x[:2] == ("DELETED", "b")] == [left["metadata"]["resourceVersion"]]
    # and a bookmark 2 s before the server's end, where the next watch may start
    assert got[-1][0] == "BOOKMARK" and int(got[-1][2]) >= int(got[-2][2])
    assert [r for r in kube.requests if "watch=true" in r["path"]][0]["path"].count("allowWatchBookmarks=true") == 1


def test_watch_bookmarks_and_a_too_old_resource_version(kube, api):
    kube.add_node("a")
    rv = _rv(api)
    kube.bookmark_interval = 0.2
    api.patch("/api/v1/namespaces/default", {"metadata": {"labels": {"x": "1"}}})  # not a node: no event
    marks = []
    for ev in api.watch("/api/v1/nodes", resource_version=rv, timeout_seconds=5):
        marks.append(ev)
        if len(marks) == 2:
            break
    assert [m["type"] for m in marks] == ["BOOKMARK", "BOOKMARK"]
    assert marks[0]["object"]["kind"] == "Node" and int(marks[-1]["object"]["metadata"]["resourceVersion"]) > int(rv)
    kube.compact()
    api.patch("/api/v1/nodes/a", {"spec": {"unschedulable": True}})
    with pytest.raises(WatchExpired) as ei:
        list(api.watch("/api/v1/nodes", resource_version=rv, timeout_seconds=5))
    assert ei.value.status == 410 and "too old resource version" in ei.value.message


def test_abort_watches_ends_a_blocked_read_and_refuses_new_ones(kube, api):
    kube.add_node("a")
    rv = _rv(api)
    opened = threading.Event()
    box: dict = {}

    def read():
        try:
            list(api.watch("/api/v1/nodes", resource_version=rv, timeout_seconds=300, on_open=opened.set))
        except Exception as e:  # noqa: BLE001
            box["error"] = e
    t = threading.Thread(target=read)
    t.start()
    assert opened.wait(10)
    api.abort_watches()
    t.join(10)  # without the abort the read would wait for the server's 300 s
    assert not t.is_alive() and isinstance(box.get("error"), UnreachableError)
    with pytest.raises(UnreachableError, match="aborted"):
        list(api.watch("/api/v1/nodes", resource_version=rv, timeout_seconds=300))


# -- the view and the engine ----------------------------------------------------------------

def test_node_view_follows_the_selection_and_stops(kube, api):
    fleet(kube, 3)
    changes = threading.Semaphore(0)
    v = nodeview.NodeView(lambda: KubeAPI(api.host, api.headers, api.tls, api.timeout), {"n0", "n1", "n2", "gone"},
                          "pool=batch", poll=300.0, on_change=changes.release)
    v.start()
    while changes.acquire(blocking=False):  # the first list's
        pass
    try:
        assert v.fresh() and v.snapshot()[1] == {"gone"} and v.seconds == nodeview.WATCH_MAX
        api.patch("/api/v1/nodes/n1", {"spec": {"unschedulable": True}})
        api.patch("/api/v1/nodes/n2", {"metadata": {"labels": {"pool": "other"}}})  # leaves the selection
        for _ in range(2):
            assert changes.acquire(timeout=10)
        assert v.snapshot()[1] == {"gone", "n1", "n2"} and v.fresh()
        assert v.stats["lists"] == 1
    finally:
        v.stop()  # its 60 s watch is cut, not waited out
    assert not v.alive()


def test_node_view_is_not_fresh_once_broken_longer_than_poll_or_silent(kube, api):
    """The safety rule: the view may be used only while the watch is healthy. A break noticed
    makes it stale after --poll; a server not heard from (a connection dead without a word)
    makes it stale after max(poll, T + 1); a watch opened again makes it fresh again."""
    fleet(kube, 2)
    now = [1000.0]
    v = nodeview.NodeView(lambda: KubeAPI(api.host, api.headers, api.tls, api.timeout), {"n0", "n1"}, "pool=batch",
                          poll=5.0, clock=lambda: now[0])
    assert (v.seconds, v.stale_after) == (2, 5.0)
    assert not v.fresh()  # not listed yet
    kube.inject("GET", r"watch=true", status=503, times=10**6)
    v.start()
    try:
        kube.cut_watches()
        while v.stats["errors"] < 1:  # the watch again, refused: a break noticed
            threading.Event().wait(0.02)
        now[0] += 4.9
        assert v.fresh()  # broken for less than --poll: as old as a list could be
        now[0] += 0.2
        assert not v.fresh()
        kube.clear_faults()
        while not v.fresh():  # watching again (the backoff is at most 5 s)
            threading.Event().wait(0.02)
        now[0] += 5.1  # nothing heard since (the server's end of a 2 s watch would have been)
        assert not v.fresh()
    finally:
        v.stop()
    assert not v.alive()


def test_engine_close_leaves_no_watch_thread(kube, api):
    plan = plan_of(2, ["check"])
    for n in plan.nodes:
        kube.add_node(n.name)
    e = engine.Engine(plan, _Store([]), engine.new_state(plan), api=api, settings=None)
    out = e.run()
    assert out["phase"] == "Succeeded", out
    assert e.view is not None and not e.view.alive()
    assert not [t for t in threading.enumerate() if t.name == "katactl-rollout-nodewatch" and t.is_alive()
                and t is getattr(e.view, "_thread", None)]
    assert any("watch=true" in r["path"] for r in kube.requests)


def _run(kc, name, *args):
    return subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "rollout", "run", name,
                             "-l", "pool=batch", "--max-unavailable", "2", "-o", "jsonl", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until(p, kind, node=None) -> list[dict]:
    ev = []
    for line in p.stdout:
        ev.append(json.loads(line))
        if ev[-1]["kind"] == kind and (node is None or ev[-1].get("node") == node):
            return ev
    raise AssertionError(f"no {kind} {node or ''}: {ev[-3:]}")


def _finish(p, ev) -> list[dict]:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return ev + [json.loads(x) for x in out.splitlines() if x.strip()]


def _overlap(ev, a, b) -> bool:
    """Whether nodes a and b were in their steps at the same time."""
    i = {(e["kind"], e.get("node")): k for k, e in enumerate(ev)}
    return not (i[("NodeFinished", a)] < i[("NodeStepStarted", b)] or i[("NodeFinished", b)] < i[("NodeStepStarted", a)])


@pytest.mark.parametrize("fault", ["none", "cut", "expired"])
def test_run_sees_a_node_cordoned_by_someone_else_through_the_watch(kube, kc, api, fault):
    """n5 (batch 3) is cordoned by someone else while batch 1 runs: batch 2 (n2, n3) may then
    have one node out at a time (n5 counts), and learns it from the watch: no node list
    after the plan's (the view starts from that list's resourceVersion). The watch dropped by the server first: it watches again from its last
    resourceVersion (still no list). Its history compacted first: one list again (410)."""
    fleet(kube, 6)
    kube.delay(r"^/api/v1/nodes/n0(\?|$)", 2.0, method="GET")  # n0's check holds batch 1
    p = _run(kc, f"w-{fault}", "--step", "check", "--poll", "4")
    ev = _until(p, "NodeStepStarted", "n0")
    assert [b for e in ev if e["kind"] == "BatchStarted" for b in e["nodes"]] == ["n0", "n1"]
    lists_at_start = len(_node_lists(kube))
    if fault == "cut":
        kube.cut_watches()
    elif fault == "expired":
        kube.compact(cut=True)
    api.patch("/api/v1/nodes/n5", {"spec": {"unschedulable": True}})  # someone else's cordon
    ev = _finish(p, ev)
    assert not _overlap(ev, "n2", "n3"), [(e["kind"], e.get("node")) for e in ev]
    assert kube.get_obj("Node", "n5")["spec"]["unschedulable"] is True  # not ours to uncordon
    lists = _node_lists(kube)
    assert lists_at_start == 1  # the plan's: the view watches from its resourceVersion
    assert len(lists) == (2 if fault == "expired" else 1), lists


def test_kubectl_133_get_watch_follows_the_stand_ins_events(kube, kc, api, kubectl_133, tmp_path):
    """Real kubectl 1.33 `get nodes --watch` (list, then watch from the list's resourceVersion)
    shows the stand-in's events as the real server's: a cordon as MODIFIED, a node whose labels
    stop matching the selector as DELETED."""
    kube.add_node("a", labels={"pool": "x"})
    kube.add_node("b", labels={"pool": "x"})
    p = subprocess.Popen([kubectl_133, "--kubeconfig", kc, "--cache-dir", str(tmp_path / "cache"), "get", "nodes",
                          "-l", "pool=x", "--watch", "--output-watch-events", "-o",
                          "custom-columns=EVENT:.type,NAME:.object.metadata.name,UNSCHED:.object.spec.unschedulable"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    rows: list[list[str]] = []
    more = threading.Condition()

    def read():
        for line in p.stdout:
            with more:
                rows.append(line.split())
                more.notify_all()
    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        with more:
            assert more.wait_for(lambda: len(rows) >= 3, 30), rows  # header, a, b
        while not any("watch=true" in r["path"] for r in list(kube.requests)):
            assert p.poll() is None, p.stderr.read()
            threading.Event().wait(0.05)
        api.patch("/api/v1/nodes/a", {"spec": {"unschedulable": True}})
        api.patch("/api/v1/nodes/b", {"metadata": {"labels": {"pool": "y"}}})
        with more:
            assert more.wait_for(lambda: len(rows) >= 5, 30), rows
    finally:
        p.terminate()
        p.wait(10)
    assert rows == [["EVENT", "NAME", "UNSCHED"], ["ADDED", "a", "<none>"], ["ADDED", "b", "<none>"],
                    ["MODIFIED", "a", "true"], ["DELETED", "b", "<none>"]]
