"""What a rollout may act on, against the kube-apiserver stand-in (tests/kubeserver.py) through
the real CLI: a plan file's node selection against ambient defaults, the uncordon step and an
operator's cordon (design.md: a node katactl did not cordon is never uncordoned by katactl),
and an outcome that does not depend on which batch failed."""
from __future__ import annotations

import pytest

from tests.test_rollout import fleet, ro, state_of


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
