"""What a rollout may act on, against the kube-apiserver stand-in (tests/kubeserver.py) through
the real CLI: a plan file's node selection against ambient defaults, the uncordon step and an
operator's cordon (design.md: a node katactl did not cordon is never uncordoned by katactl),
and an outcome that does not depend on which batch failed."""
from __future__ import annotations

import json

import pytest

from katactl.nodes import CORDON_ANNOTATION
from tests.test_node_faults import foreign_set_unschedulable
from tests.test_rollout import MUTATING, _cordon_as_rollout, _edit_state, events, fleet, ro, state_of, unschedulable


def _failing_pod(kube, node):
    """A pod under two PDBs: node check fails on its node (pdb-multiple, high)."""
    kube.add_pod(f"p-{node}", "default", node, {"app": "x"}, owner=("ReplicaSet", "rs"))
    kube.add_pdb("a", "default", {"matchLabels": {"app": "x"}}, min_available=0)
    kube.add_pdb("b", "default", {"matchLabels": {"app": "x"}}, min_available=0)


# -- the outcome does not depend on the batch that failed (docs/rollout.md, exit codes) ---------

@pytest.mark.parametrize("failing", ["n0", "n1"])
def test_a_failure_under_on_failure_stop_ends_stopped_in_any_batch(cli, kube, kc, failing):
    """Default policy (--on-failure stop, budget 0): 1 failed node is not 'within the budget',
    in the first batch or the last; Stopped (exit 1) can be resumed, CompletedWithFailures not."""
    fleet(kube, 2, zones=1)
    _failing_pod(kube, failing)
    r = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--step", "check", "--poll", "0.1", "-o", "json")
    d = r.json()
    assert (r.exit_code, d["phase"]) == (1, "Stopped"), (d["phase"], d["reason"])
    assert d["reason"] == f"node {failing} failed (--on-failure stop)"
    assert state_of(kube, "r1")["exitCode"] == 1


def test_a_failed_canary_ends_stopped_not_paused(cli, kube, kc):
    fleet(kube, 2, zones=1)
    _failing_pod(kube, "n0")
    r = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--canary", "1", "--step", "check", "--poll", "0.1", "-o", "json")
    assert r.json()["batches"] == 2 and r.json()["counts"]["failed"] == 1  # n0 was the canary
    assert (r.exit_code, r.json()["phase"]) == (1, "Stopped"), r.json()["reason"]


def test_a_last_batch_over_the_failure_budget_ends_stopped_and_within_it_completed(cli, kube, kc):
    fleet(kube, 3, zones=1)
    for n in ("n1", "n2"):
        kube.add_pod(f"p-{n}", "default", n, {"app": "x"}, owner=("ReplicaSet", "rs"))
    kube.add_pdb("a", "default", {"matchLabels": {"app": "x"}}, min_available=0)
    kube.add_pdb("b", "default", {"matchLabels": {"app": "x"}}, min_available=0)
    # n1, n2 fail in the last batch: 2 > budget 1
    r = ro(cli, kc, "run", "r2", "-N", "n0,n1,n2", "--canary", "1", "--canary-soak", "0s", "--max-unavailable", "2",
           "--on-failure", "skip", "--failure-budget", "1", "--step", "check", "--poll", "0.1", "-o", "json")
    assert (r.exit_code, r.json()["phase"]) == (1, "Stopped"), r.json()["reason"]
    assert "more than the failure budget (1)" in r.json()["reason"]
    # within the budget: finished, exit 4
    r = ro(cli, kc, "run", "r3", "-N", "n0,n1", "--on-failure", "skip", "--failure-budget", "1",
           "--step", "check", "--poll", "0.1", "-o", "json")
    assert (r.exit_code, r.json()["phase"]) == (4, "CompletedWithFailures"), r.json()["reason"]
    # the same run again (an Ansible retry) changes nothing and keeps exit 4: not a success
    again = ro(cli, kc, "run", "r3", "-N", "n0,n1", "--on-failure", "skip", "--failure-budget", "1",
               "--step", "check", "--poll", "0.1", "-o", "json")
    assert (again.exit_code, again.json()["changed"]) == (4, False), again.stderr
    assert "--retry-failed" in again.stderr
    # another plan under the finished rollout's name is refused, not reported done
    for other in (["-N", "n0,n1", "--step", "cordon", "--step", "uncordon"], ["-N", "n0,n1,n2", "--step", "check"]):
        r = ro(cli, kc, "run", "r3", *other, "--poll", "0.1", "-o", "json")
        assert r.exit_code == 5 and "this plan was not run" in r.stderr, (other, r.stderr)
    # ... but another pace (policy) for the same steps and nodes is the same, finished rollout
    r = ro(cli, kc, "run", "r3", "-N", "n0,n1", "--step", "check", "--soak", "1s", "-o", "json")
    assert (r.exit_code, r.json()["changed"]) == (4, False), r.stderr


# -- the uncordon step undoes only the rollout's own cordon --------------------------------------

@pytest.mark.parametrize("steps", [["wait-ready 60s", "uncordon"], ["uncordon", "cordon"]])
def test_an_uncordon_step_with_no_cordon_before_it_is_refused_at_plan_time(cli, kube, kc, steps):
    fleet(kube, 2)
    args = [x for s in steps for x in ("--step", s)]
    for verb in ("plan", "run"):
        r = ro(cli, kc, verb, "r1", "-N", "n0,n1", "--max-unavailable", "2", *args)
        assert r.exit_code == 2, r.stderr
        assert "uncordon undoes only a cordon this rollout made" in r.stderr and "cordon, drain" in r.stderr
    assert not [q for q in kube.requests if q["method"] in MUTATING]
    assert ro(cli, kc, "plan", "r1", "-N", "n0", "--step", "drain", "--step", "uncordon").exit_code == 0


def test_an_uncordon_step_without_the_nodes_cordon_id_leaves_an_operators_cordon(cli, kube, kc):
    """A stored plan (resume) is not checked again: its uncordon step, run for a node the
    rollout holds no cordon record of, leaves kubectl's cordon made meanwhile."""
    fleet(kube, 2, zones=1)
    r = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--canary", "1", "--step", "check", "--poll", "0.1", "-o", "json")
    assert r.json()["phase"] == "Paused", r.stderr
    other = next(i["name"] for i in r.json()["items"] if i["phase"] == "pending")
    _edit_state(kube, "r1", lambda st: st["plan"].update(steps=["check", "uncordon"]))
    foreign_set_unschedulable(kube, other, True)
    r = ro(cli, kc, "resume", "r1", "-o", "jsonl")
    assert r.exit_code == 0, r.stderr
    fin = [e for e in events(r.stdout) if e["kind"] == "NodeStepFinished" and e["text"] == "uncordon"]
    assert [(e["node"], e["result"], e["changed"]) for e in fin] == [(other, "ok", False)]
    assert fin[0]["message"] == "left as it is: the rollout has no cordon record of this node"
    assert unschedulable(kube)[other] is True


# -- a plan file's node selection against ambient defaults -------------------------------------

def _pools(kube, tmp_path):
    for i in range(2):
        kube.add_node(f"batch-{i}", labels={"pool": "batch"})
        kube.add_node(f"online-{i}", labels={"pool": "online"})
    f = tmp_path / "plan.yaml"
    f.write_text("apiVersion: katactl/v1\nkind: RolloutPlan\nname: r1\nselector: pool=batch\nsteps: [cordon]\n")
    return f


@pytest.mark.parametrize("where", ["env-selector", "env-nodes", "config-nodes", "profile-selector"])
def test_a_plan_files_selection_is_not_replaced_by_env_or_config_defaults(cli, kube, kc, tmp_path, monkeypatch,
                                                                          _isolated_home, where):
    f = _pools(kube, tmp_path)
    cfg = _isolated_home / "config" / "katactl" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    if where == "env-selector":
        monkeypatch.setenv("KATACTL_SELECTOR", "pool=online")
        src = "env KATACTL_SELECTOR"
    elif where == "env-nodes":
        monkeypatch.setenv("KATACTL_NODES", "online-0")
        src = "env KATACTL_NODES"
    elif where == "config-nodes":
        cfg.write_text('nodes = ["online-0", "online-1"]\n')
        src = str(cfg)
    else:
        cfg.write_text('profile = "p"\n[profiles.p]\nselector = "pool=online"\n')
        src = f"{cfg} [profiles.p]"
    for verb in ("plan", "run"):
        r = ro(cli, kc, verb, "-f", f, "-o", "json")
        assert r.exit_code == 2, (r.stdout, r.stderr)
        assert f"-f {f} selects the nodes" in r.stderr and f"from {src}:" in r.stderr, r.stderr
    assert not [q for q in kube.requests if q["method"] in MUTATING]
    # typed on the command line, a selection overrides the file's (and the ambient one is not used)
    monkeypatch.delenv("KATACTL_SELECTOR", raising=False)
    monkeypatch.delenv("KATACTL_NODES", raising=False)
    cfg.unlink(missing_ok=True)
    r = ro(cli, kc, "plan", "-f", f, "-N", "online-1", "-o", "json")
    assert r.exit_code == 0 and [i["name"] for i in r.json()["items"]] == ["online-1"], r.stderr


def test_a_plan_file_without_a_selection_takes_the_ambient_one(cli, kube, kc, tmp_path, monkeypatch):
    _pools(kube, tmp_path)
    f = tmp_path / "nosel.yaml"
    f.write_text("name: r1\nsteps: [cordon]\n")
    monkeypatch.setenv("KATACTL_SELECTOR", "pool=online")
    r = ro(cli, kc, "plan", "-f", f, "-o", "json")
    assert r.exit_code == 0 and [i["name"] for i in r.json()["items"]] == ["online-0", "online-1"], r.stderr
    # and a selection typed with a plan file that has one overrides it, the ambient one set too
    r = ro(cli, kc, "plan", "-f", tmp_path / "plan.yaml", "-l", "pool=online", "-o", "json")
    assert r.exit_code == 0 and [i["name"] for i in r.json()["items"]] == ["online-0", "online-1"], r.stderr


# -- an operator's node cordon during a rollout outlives it --------------------------------------

@pytest.mark.parametrize("verb", ["abort", "resume"])
def test_an_operators_node_cordon_of_a_node_the_rollout_holds_is_left_cordoned(cli, kube, kc, verb):
    """docs/rollout.md: a node cordoned meanwhile by another `katactl node cordon` is left
    cordoned. The operator's cordon takes the rollout's record over (a new id), so the
    rollout's restore, by its own id, leaves it, with a warning."""
    fleet(kube, 2, zones=1)
    r = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--canary", "1", "--step", "cordon", "--step", "check",
           "--poll", "0.1", "-o", "json")
    assert r.json()["phase"] == "Paused", r.stderr
    other = next(i["name"] for i in r.json()["items"] if i["phase"] == "pending")
    _cordon_as_rollout(kube, "r1", other)  # the rollout holds it, between its cordon and its check
    _edit_state(kube, "r1", lambda st: st["nodes"][other].update(phase="running", step=1, wasUnschedulable=False))
    c = cli(["--kubeconfig", kc, "node", "cordon", other, "--reason", "hw-failure: keep out", "-o", "json"])
    assert c.exit_code == 0 and c.json()["changed"] is True, c.stdout
    a = ro(cli, kc, verb, "r1", "-o", "json")
    assert a.exit_code == 0, a.stderr
    assert unschedulable(kube)[other] is True
    rec = json.loads(kube.get_obj("Node", other)["metadata"]["annotations"][CORDON_ANNOTATION])
    assert rec["reason"] == "hw-failure: keep out" and rec["supersedes"]["id"] == f"cid-r1-{other}"
    warn = [line for line in a.stderr.splitlines() if "left cordoned" in line]
    assert len(warn) == 1 and "cordoned again since the rollout cordoned it, by " in warn[0], a.stderr
    assert "(katactl node cordon): left cordoned (theirs to undo)" in warn[0], warn
