"""What a command says when the nodes it was pointed at did not answer (review 7 fixesB):
no pass for what was never checked, dryRun as asked, the same shape for every selection,
the error named after its node(s)."""
from __future__ import annotations

import pytest

DOWN = "127.0.0.1:2"  # nothing listens on port 2: connection refused at once
DOWN2 = "127.0.0.1:3"


@pytest.mark.parametrize("args", [["upgrade", "switch", "3.9", "--dry-run"], ["upgrade", "gc", "--dry-run"],
                                  ["upgrade", "rollback", "--dry-run"]])
@pytest.mark.parametrize("nodes", [DOWN, f"{DOWN},{DOWN2}"])
def test_a_dry_run_whose_nodes_all_failed_still_says_dry_run(cli, args, nodes):
    """dryRun was any() of the items: none when every node failed, so false."""
    r = cli(["-N", nodes, "-o", "json", *args])
    assert r.exit_code == 7, r.stderr
    d = r.json()
    assert d["kind"].endswith("List") and d["items"] == [] and d["dryRun"] is True, d


@pytest.mark.parametrize("args", [["cordon", "nope", "--dry-run"], ["uncordon", "nope", "--dry-run"],
                                  ["drain", "nope", "--dry-run"]])
def test_a_node_dry_run_on_a_missing_node_says_dry_run(cli, kube, kc, args):
    r = cli(["--kubeconfig", kc, "-o", "json", "node", *args])
    assert r.exit_code == 3, r.stderr
    d = r.json()
    assert d["items"] == [] and d["dryRun"] is True and d["errors"][0]["node"] == "nope", d


@pytest.mark.parametrize("nodes", [DOWN, f"{DOWN},{DOWN2}"])
def test_overhead_of_nodes_not_measured_is_no_pass(cli, nodes):
    """failed: false beside exit 7 told a playbook the unreachable node was within its overhead."""
    r = cli(["-N", nodes, "-o", "json", "overhead"])
    assert r.exit_code == 7, r.stderr
    d = r.json()
    assert d["kind"] == "OverheadReport" and d["failed"] is None and d["errors"], d


def test_vmcore_rm_of_nodes_that_failed_says_no_nothing_to_delete(cli):
    r = cli(["-N", f"{DOWN},{DOWN2}", "vmcore", "rm", "abc", "--yes"])
    assert r.exit_code == 7
    assert "nothing to delete" not in r.stderr and "No matching" not in r.stderr, r.stderr
    assert r.stderr.count("error: 127.0.0.1:") == 2, r.stderr


def test_node_check_of_nodes_not_found_is_no_pass(cli, kube, kc):
    r = cli(["--kubeconfig", kc, "node", "check", "nope", "nope2"])
    assert r.exit_code == 3, r.stderr
    assert "passed" not in r.stderr and "node check incomplete" in r.stderr, r.stderr
    assert "2 node(s) not checked" in r.stderr
