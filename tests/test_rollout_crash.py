"""kill -9 of 'katactl rollout run' at every state transition, then 'rollout resume':
the invariants hold (max-unavailable never exceeded, replayed from the stand-in's
request log; no node left cordoned by the rollout; the lock released; nodes finished
before the kill not redone). The kill comes from the engine's documented test hook
KATACTL_TEST_KILL_AT (save:N = right after the Nth state save, step:N = right after
the Nth step acted, before its result is saved).

Each kill point gets its own nodes and lock namespace on the shared stand-in, so the
runs go in parallel (the invariants are per cluster = per lock namespace here)."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest


from katactl.rollout.store import LEASE, SHARD_BYTES_ENV
from tests.test_rollout_scale import load_state

MAX_SAVES = 24


def _setup(kube, i: int) -> list[str]:
    kube.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"lk{i}"}})
    names = [f"k{i}-{j}" for j in range(3)]
    for j, n in enumerate(names):
        kube.add_node(n, labels={"kill": str(i)}, unschedulable=(j == 2))  # k{i}-2: cordoned by someone else
    return names


def _args(i: int, names) -> list[str]:
    return ["-N", ",".join(names), "--max-unavailable", "2", "--step", "cordon", "--step", "check",
            "--poll", "0.05", "--lock-ttl", "3s", "--lock-namespace", f"lk{i}"]


def _max_out(kube, names) -> int:
    cur = {n: n.endswith("-2") for n in names}
    worst = sum(cur.values())
    for r in kube.requests:
        if r["method"] == "PATCH" and r["path"].startswith("/api/v1/nodes/"):
            node = r["path"].split("/")[4].split("?")[0]
            spec = (r["body"] or {}).get("spec") or {}
            if node in cur and "unschedulable" in spec:
                cur[node] = bool(spec["unschedulable"])
                worst = max(worst, sum(cur.values()))
    return worst


def test_kill_9_at_every_transition_then_resume_converges(kube, kc, katactl_bin):
    points = [f"save:{n}" for n in range(1, MAX_SAVES + 1)] + [f"step:{s}" for s in range(1, 7)]
    killed = _kill_then_resume(kube, kc, katactl_bin, points, {})
    saves_killed = [points[i] for i in killed if points[i].startswith("save:")]
    assert len(saves_killed) > 8 and f"save:{MAX_SAVES}" not in saves_killed  # every save was a kill point
    assert all(f"step:{s}" in [points[i] for i in killed] for s in range(1, 7))


def test_kill_9_between_the_shard_writes_of_a_save_then_resume_converges(kube, kc, katactl_bin):
    """A sharded state (one node record a shard: KATACTL_ROLLOUT_SHARD_BYTES=1) killed right
    after each shard write, before the rest of that save (other shards, the main
    ConfigMap): each record is whole, the state loads (the main ConfigMap never claims
    more than its shards hold), and resume converges with the same invariants."""
    points = [f"shard:{n}" for n in range(1, MAX_SAVES + 1)]
    killed = _kill_then_resume(kube, kc, katactl_bin, points, {SHARD_BYTES_ENV: "1"})
    assert len(killed) > 8 and f"shard:{MAX_SAVES}" not in [points[i] for i in killed]


def _kill_then_resume(kube, kc, katactl_bin, points: list[str], env: dict) -> list[int]:
    """Run one rollout per kill point (killed there), then resume each: the invariants hold.
    Returns the indexes of the points that killed their run."""
    nodes = {i: _setup(kube, i) for i in range(len(points))}
    base = ["--kubeconfig", kc, "rollout"]

    def kill(i):
        return katactl_bin([*base, "run", f"rc{i}", *_args(i, nodes[i]), "-o", "jsonl"],
                           env={**env, "KATACTL_TEST_KILL_AT": points[i]})

    with ThreadPoolExecutor(8) as ex:
        first = list(ex.map(kill, range(len(points))))
    killed = [i for i, r in enumerate(first) if r.exit_code != 0]
    for i in killed:
        assert first[i].exit_code == -9, (points[i], first[i].exit_code, first[i].stderr)

    done_before = {}
    for i in killed:
        st = load_state(kube, f"rc{i}", f"lk{i}")
        done_before[i] = set() if st is None else {n for n, v in st["nodes"].items() if v["phase"] == "done"}

    def again(i):
        cm = kube.get_obj("ConfigMap", f"katactl-rollout-rc{i}", f"lk{i}")
        if cm is None:  # killed before the state existed: nothing to resume, run again
            return katactl_bin([*base, "run", f"rc{i}", *_args(i, nodes[i]), "-o", "jsonl"], env=env)
        return katactl_bin([*base, "resume", f"rc{i}", "--lock-namespace", f"lk{i}", "-o", "jsonl"], env=env)

    with ThreadPoolExecutor(8) as ex:
        second = dict(zip(killed, ex.map(again, killed), strict=True))
    for i, res in second.items():
        at = points[i]
        assert res.exit_code == 0, (at, res.stderr)
        ev = [json.loads(x) for x in res.stdout.splitlines()]
        assert ev[-1]["kind"] == "Rollout" and ev[-1]["phase"] == "Succeeded", at
        assert not {e["node"] for e in ev if e["kind"] == "NodeStepStarted"} & done_before[i], at
        a, b, c = nodes[i]
        got = {n: bool(kube.get_obj("Node", n)["spec"].get("unschedulable")) for n in nodes[i]}
        assert got == {a: False, b: False, c: True}, (at, got)
        assert _max_out(kube, nodes[i]) <= 2, at
        assert kube.get_obj("Lease", LEASE, f"lk{i}")["spec"]["holderIdentity"] == "", at
        st = load_state(kube, f"rc{i}", f"lk{i}")
        assert all(v["phase"] == "done" for v in st["nodes"].values()), at
    return killed


# -- kills with a change by an operator between the kill and the resume ----------------------

def _ro(katactl_bin, kc, *args, env=None):
    return katactl_bin(["--kubeconfig", kc, "rollout", *args], env=env or {})


def _record(kube, node) -> dict | None:
    raw = (kube.get_obj("Node", node)["metadata"].get("annotations") or {}).get("katactl.io/cordon")
    return json.loads(raw) if raw else None


def test_resume_uncordons_a_node_its_cordon_found_schedulable_though_it_was_cordoned_when_started(
        kube, kc, kube_api, katactl_bin):
    """n0 was cordoned by an operator when the rollout marked it running; killed after the first
    step, the operator uncordons n0; the resumed run's cordon finds it schedulable and cordons it:
    it must uncordon it at the end (its cordon record says so), not go by the stale observation."""
    kube.add_node("n0", unschedulable=True)
    steps = ["--step", "check", "--step", "cordon", "--step", "check"]
    r = _ro(katactl_bin, kc, "run", "r1", "-N", "n0", *steps, "--poll", "0.05", "--lock-ttl", "3s",
            env={"KATACTL_TEST_KILL_AT": "step:1"})
    assert r.exit_code == -9, r.stderr
    kube_api.patch("/api/v1/nodes/n0", {"spec": {"unschedulable": None}})  # the operator's kubectl uncordon
    r = _ro(katactl_bin, kc, "resume", "r1", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["phase"] == "Succeeded"
    assert not kube.get_obj("Node", "n0")["spec"].get("unschedulable")
    assert _record(kube, "n0") is None


def _run_until(kc, args: list[str], kind: str) -> subprocess.CompletedProcess:
    """'rollout run' (-o jsonl) killed -9 right after its first event of ``kind``."""
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "rollout", "run", *args,
                          "-o", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if json.loads(line).get("kind") == kind:
                break
    finally:
        p.kill()
        p.wait()
    return p


def test_resume_that_stops_at_once_restores_the_nodes_it_does_not_continue(kube, kc, katactl_bin):
    """Killed after n0 failed (--on-failure stop) while n1's drain was held by a PDB (cordoned by
    the rollout): the resumed run stops at once, and must uncordon n1 rather than leave it
    cordoned for good; n1 starts again at the cordon when the rollout is resumed after that."""
    kube.add_node("n0", ready=False)
    kube.add_node("n1")
    kube.add_replicaset("web", "default", 1, {"app": "web"})
    kube.add_pod("web-1", node="n1", labels={"app": "web"}, owner=("ReplicaSet", "web"))
    kube.add_pdb("web", "default", {"matchLabels": {"app": "web"}}, min_available=1)
    _run_until(kc, ["r1", "-N", "n0,n1", "--max-unavailable", "2", "--step", "cordon", "--step",
                    "drain --ignore-daemonsets", "--step", "wait-ready 0.2s", "--poll", "0.05", "--lock-ttl", "3s"],
               "NodeFailed")
    assert kube.get_obj("Node", "n1")["spec"].get("unschedulable")
    r = _ro(katactl_bin, kc, "resume", "r1", "-o", "json")
    assert r.exit_code == 6 and r.json()["phase"] == "Stopped", r.stderr
    assert not kube.get_obj("Node", "n1")["spec"].get("unschedulable")
    assert _record(kube, "n1") is None
    st = load_state(kube, "r1", "kube-system")
    assert st["nodes"]["n1"]["phase"] == "running" and st["nodes"]["n1"]["step"] == 0


def _kubectl_cordon(kube_api, node: str, on: bool) -> None:
    """What kubectl cordon|uncordon sends: spec only (katactl's cordon record stays), under its
    own field manager."""
    from katactl.backends.kube import PATCH_TYPES

    kube_api.request("PATCH", f"/api/v1/nodes/{node}", params={"fieldManager": "kubectl-cordon"},
                     body={"spec": {"unschedulable": True if on else None}}, content_type=PATCH_TYPES["strategic"])


@pytest.mark.parametrize("verb", ["abort", "resume"])
def test_a_stale_cordon_record_does_not_make_an_operators_later_cordon_the_rollouts(kube, kc, kube_api,
                                                                                     katactl_bin, verb):
    """Killed after n0's cordon; the operator uncordons n0 with kubectl (katactl's record stays on
    it), then cordons it for their own maintenance: abort and resume leave it cordoned (the
    server says who set spec.unschedulable last: not katactl)."""
    kube.add_node("n0")
    r = _ro(katactl_bin, kc, "run", "r1", "-N", "n0", "--step", "cordon", "--step", "check", "--poll", "0.05",
            env={"KATACTL_TEST_KILL_AT": "step:1"})
    assert r.exit_code == -9, r.stderr
    assert _record(kube, "n0") is not None
    _kubectl_cordon(kube_api, "n0", False)
    _kubectl_cordon(kube_api, "n0", True)
    r = _ro(katactl_bin, kc, verb, "r1")
    assert r.exit_code == 0, r.stderr
    assert kube.get_obj("Node", "n0")["spec"].get("unschedulable") is True
    assert "node/n0: uncordoned" not in r.stderr
    assert "cordoned again since the rollout cordoned it, by kubectl-cordon" in r.stderr  # not silently


@pytest.mark.parametrize("verb", ["abort", "resume"])
@pytest.mark.parametrize("mode", ["ancient-changes", "apply"])
def test_the_rollouts_cordon_is_undone_whoever_else_the_server_lists_for_it(kube, kc, katactl_bin, verb, mode):
    """Killed after n0's cordon; nobody touched spec.unschedulable since, but the server lists
    another manager for it first: katactl's Update entry merged into "ancient-changes" (more
    than 10 Update managers: apimachinery managedfields/internal/capmanagers.go), or a
    server-side apply of the same value sharing the field (Apply entries sort first). The
    rollout cordoned n0: abort and resume uncordon it."""
    kube.add_node("n0")
    r = _ro(katactl_bin, kc, "run", "r1", "-N", "n0", "--step", "cordon", "--step", "check", "--poll", "0.05",
            env={"KATACTL_TEST_KILL_AT": "step:1"})
    assert r.exit_code == -9, r.stderr
    with kube._lock:
        md = kube.store[("nodes", "", "n0")]["metadata"]
        mfs = md.get("managedFields") or []
        assert [m["manager"] for m in mfs] == ["katactl"], mfs
        if mode == "ancient-changes":
            mfs[0]["manager"] = "ancient-changes"
        else:
            mfs.insert(0, {"manager": "node-gitops", "operation": "Apply", "apiVersion": "v1",
                           "time": "2026-12-05T06:00:00Z", "fieldsType": "FieldsV1",
                           "fieldsV1": {"f:spec": {"f:unschedulable": {}}}})
        md["managedFields"] = mfs
    r = _ro(katactl_bin, kc, verb, "r1")
    assert r.exit_code == 0, r.stderr
    assert not kube.get_obj("Node", "n0")["spec"].get("unschedulable"), r.stderr
    assert _record(kube, "n0") is None


def test_a_node_found_schedulable_loses_the_rollouts_stale_cordon_record(kube, kc, kube_api, katactl_bin):
    """Killed after n0's cordon; the operator uncordons it with kubectl: abort removes the rollout's
    record left on it (by its id), so nothing later takes a cordon for the rollout's."""
    kube.add_node("n0")
    r = _ro(katactl_bin, kc, "run", "r1", "-N", "n0", "--step", "cordon", "--step", "check", "--poll", "0.05",
            env={"KATACTL_TEST_KILL_AT": "step:1"})
    assert r.exit_code == -9, r.stderr
    _kubectl_cordon(kube_api, "n0", False)
    r = _ro(katactl_bin, kc, "abort", "r1")
    assert r.exit_code == 0, r.stderr
    assert _record(kube, "n0") is None and not kube.get_obj("Node", "n0")["spec"].get("unschedulable")


def test_resume_of_a_node_killed_before_its_cordon_waits_for_room(kube, kc, kube_api, katactl_bin):
    """Killed right after m0 was marked running, before its cordon; an operator cordons m2
    (of the same selection): with --max-unavailable 1 the resumed run must not cordon m0
    until m2 is back (m0 is not out yet: it needs room like a pending node)."""
    names = ["m0", "m1", "m2"]
    for n in names:
        kube.add_node(n)
    args = ["-N", ",".join(names), "--max-unavailable", "1", "--step", "cordon", "--step", "check", "--poll", "0.05"]
    r = _ro(katactl_bin, kc, "run", "r1", *args, env={"KATACTL_TEST_KILL_AT": "save:2"})
    assert r.exit_code == -9, r.stderr
    st = load_state(kube, "r1", "kube-system")
    assert st["nodes"]["m0"]["phase"] == "running" and st["nodes"]["m0"]["step"] == 0
    _kubectl_cordon(kube_api, "m2", True)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "rollout", "resume", "r1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import time

        time.sleep(1.0)  # (the resumed run is under way, waiting for room)
        _kubectl_cordon(kube_api, "m2", False)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    cur = {n: False for n in names}
    worst = 0
    for q in kube.requests:
        if q["method"] == "PATCH" and q["path"].startswith("/api/v1/nodes/"):
            spec = (q["body"] or {}).get("spec") or {}
            if "unschedulable" in spec:
                cur[q["path"].split("/")[4].split("?")[0]] = bool(spec["unschedulable"])
                worst = max(worst, sum(cur.values()))
    assert worst <= 1


@pytest.mark.parametrize("step", ["600", "-3600"])
def test_a_soak_resumed_on_a_machine_whose_clock_is_off_soaks_the_rest(kube, kc, tmp_path, step):
    """Killed -9 while n0 soaks 300 s; resumed where the wall clock is 10 min ahead (or an hour
    behind): the soak left is what the first run had not soaked (elapsed seconds are saved),
    not 0 s (skipped) nor an hour more."""
    import os
    from pathlib import Path

    kube.add_node("n0")
    _run_until(kc, ["r1", "-N", "n0", "--step", "check", "--soak", "300s", "--poll", "0.05"], "NodeSoaking")
    clock = tmp_path / "clock-step"
    clock.write_text(step)
    env = {**os.environ, "KATACTL_TEST_CLOCK_STEP_FILE": str(clock),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "clockstep"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "rollout", "resume", "r1", "-o", "jsonl"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert p.stdout is not None
        soak = next(e for e in map(json.loads, p.stdout) if e.get("kind") == "NodeSoaking")
    finally:
        p.kill()
        p.wait()
    assert 250 <= soak["seconds"] <= 300, soak


@pytest.mark.parametrize("step", [0, 1])
def test_a_legacy_node_left_cordoned_that_holds_the_resumed_rollout_back_is_said(kube, kc, katactl_bin, step):
    """A state saved before cordon ids, killed with n1 cordoned (katactl's record on it has no id),
    before its state saved the cordon step done (step 0: the resume runs it again) or after: the resumed run leaves n1 cordoned (it cannot tell it is the rollout's) with the
    older-katactl message, and since n1 fills --max-unavailable 1 and n2 waits for room, says
    that n1 holds the rollout back and how to free it (the run would wait without a word)."""
    import queue
    import threading

    from tests.test_rollout import _edit_state

    for n in ("n0", "n1", "n2"):
        kube.add_node(n)
    r = _ro(katactl_bin, kc, "run", "r1", "-N", "n0,n1,n2", "--canary", "1", "--step", "cordon", "--step", "check",
            "--poll", "0.05")
    assert r.exit_code == 0 and "Paused" in r.stderr, r.stderr
    _edit_state(kube, "r1", lambda st: st["nodes"]["n1"].update(phase="running", step=step, wasUnschedulable=False,
                                                                attempts=1, cordonId=None))
    obj = kube.get_obj("Node", "n1")
    obj["spec"]["unschedulable"] = True
    obj["metadata"].setdefault("annotations", {})["katactl.io/cordon"] = json.dumps(
        {"by": "t@h", "at": "2026-01-01T00:00:00Z", "reason": "katactl rollout r1", "wasUnschedulable": False})
    kube.add(obj)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "rollout", "resume", "r1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stderr], daemon=True).start()  # type: ignore[union-attr]
    seen = []
    try:
        while not any("holds the rollout back" in x for x in seen):
            seen.append(lines.get(timeout=20))
    except queue.Empty:
        pass
    finally:
        p.kill()
        p.wait()
    err = "".join(seen)
    assert "names no cordon record" in err and "cordoned during the rollout, not by it" not in err, err
    held = next(x for x in seen if "holds the rollout back" in x)
    assert held.startswith("warning: node/n1: the rollout's state") and "katactl node uncordon n1" in held, err
    assert kube.get_obj("Node", "n1")["spec"].get("unschedulable") is True  # what is restored is unchanged
