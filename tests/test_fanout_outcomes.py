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


# -- metrics --all --to FILE: the file's fate does not depend on -o ---------------------------
@pytest.mark.parametrize("fmt", ["plain", "json"])
@pytest.mark.parametrize("nodes", [DOWN, f"{DOWN},{DOWN2}"])
def test_metrics_to_file_with_no_node_answering_keeps_the_file_whatever_o_says(cli, tmp_path, fmt, nodes):
    """-o json replaced FILE with a scrape-error exposition and printed nothing; -o plain kept it."""
    f = tmp_path / "kata.prom"
    f.write_text("kata_good 1\n")
    r = cli(["-o", fmt, "-N", nodes, "metrics", "--all", "--to", f])
    assert r.exit_code == 7, r.stderr
    assert f.read_text() == "kata_good 1\n"
    assert f"{f} is left as it was" in r.stderr and "wrote" not in r.stderr, r.stderr
    for n in nodes.split(","):
        assert f"{n}: cannot connect" in r.stderr
    if fmt == "json":
        d = r.json()
        assert d["kind"] == "Error" and d["exitCode"] == 7 and DOWN in d["message"], d
    else:
        assert r.stdout == ""
    # one node answering: the file is written, the failed node's scrape error in it
    (tmp_path / "root").mkdir()
    r = cli(["-o", fmt, "-N", f"localhost,{DOWN}", "--host-root", tmp_path / "root", "metrics", "--all", "--to", f])
    assert r.exit_code == 4, r.stderr
    assert f'katactl_scrape_error{{sandbox_id="",cri_uid="",cri_name="",cri_namespace="",node="{DOWN}"}} 1' \
        in f.read_text()


# -- a selection naming localhost is a selection --------------------------------------------
@pytest.mark.parametrize("how", ["-N", "group", "file"])
def test_a_selection_of_localhost_has_the_fleet_shape(cli, tmp_path, _isolated_home, how):
    """-N localhost (an Ansible inventory's) gave the Error object where -N a gives the List."""
    if how == "-N":
        sel = ["-N", "localhost"]
    elif how == "group":
        (_isolated_home / "config" / "katactl").mkdir(parents=True)
        (_isolated_home / "config" / "katactl" / "config.toml").write_text('[node_groups]\nlocal = ["localhost"]\n')
        sel = ["-N", "@local"]
    else:
        (tmp_path / "nodes").write_text("localhost\n")
        sel = ["--nodes-from", tmp_path / "nodes"]
    r = cli(["--host-root", tmp_path / "nope", "-o", "json", *sel, "inspect", "bvt"])
    assert r.exit_code == 2, r.stderr
    d = r.json()
    assert d["kind"] == "BvtReport" and d["errors"][0]["node"] == "localhost", d
    (tmp_path / "root").mkdir()
    ok = cli(["--host-root", tmp_path / "root", "-o", "json", *sel, "upgrade", "status"])
    assert ok.json()["kind"] == "UpgradeStatusList", ok.stdout
    assert cli(["--host-root", tmp_path / "root", "-o", "json", "upgrade", "status"]).json()["kind"] == "UpgradeStatus"


# -- -o yaml: the Error object as json has it --------------------------------------------------
@pytest.mark.parametrize("args", [["--host-root", "/nonexistent", "sandbox", "list"], ["sandbox", "list", "--bogus"],
                                  ["-N", DOWN, "sandbox", "inspect", "abc"]])
def test_yaml_prints_the_error_object(cli, args):
    import yaml

    r = cli(["-o", "yaml", *args])
    j = cli(["-o", "json", *args])
    assert r.exit_code == j.exit_code != 0
    assert yaml.safe_load(r.stdout) == j.json(), r.stdout
    assert r.stderr.count("katactl: error:") == 1


# -- a sandbox looked for on nodes that all failed: every node named ----------------------------
@pytest.mark.parametrize("cmd", [["sandbox", "inspect", "abc"], ["metrics", "abc"], ["balloon", "get", "abc"]])
def test_a_sandbox_search_with_every_node_down_names_every_node(cli, cmd):
    """Only the first node's error was raised, without its name (an ssh_config alias's address)."""
    r = cli(["-o", "json", "-N", f"{DOWN},{DOWN2}", *cmd])
    assert r.exit_code == 7, r.stderr
    d = r.json()
    assert d["kind"] == "Error" and d["code"] == "Unreachable", d
    assert d["message"].startswith(f"{DOWN}: ") and f"; {DOWN2}: " in d["message"], d
    assert set(d["details"]["notSearched"]) == set(d["details"]["nodes"]) == {DOWN, DOWN2}, d
    line = [ln for ln in cli(["-N", f"{DOWN},{DOWN2}", *cmd]).stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and DOWN in line[0] and DOWN2 in line[0], line


def test_nodes_failing_differently_give_exit_1(cli, tmp_path):
    r = cli(["-o", "json", "--host-root", tmp_path / "nope", "-N", f"localhost,{DOWN}", "sandbox", "inspect", "abc"])
    assert r.exit_code == 1, r.stderr
    d = r.json()
    assert d["code"] == "Failed" and d["exitCode"] == 1 and "localhost: " in d["message"], d


# -- -l checked before any API call, for every command -------------------------------------
@pytest.mark.parametrize("sel", ["a,", "a=b=c", "a in (b"])
@pytest.mark.parametrize("cmd", [["node", "list"], ["rollout", "plan", "r1", "--step", "cordon"],
                                 ["rollout", "run", "r1", "--step", "cordon", "--yes"]])
def test_a_bad_selector_is_a_usage_error_before_the_api(cli, tmp_path, sel, cmd):
    """node list and rollout handed -l to the API: exit 7 with the API down."""
    kc = tmp_path / "kubeconfig"
    kc.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
                  "contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\nusers: [{name: u, user: {}}]\n")
    r = cli(["--kubeconfig", kc, "-l", sel, *cmd])
    assert r.exit_code == 2, r.stderr
    assert "invalid label selector" in r.stderr


def test_a_bad_selector_in_a_rollout_plan_file_is_a_usage_error(cli, tmp_path):
    f = tmp_path / "plan.yaml"
    f.write_text("name: r1\nselector: 'a=b=c'\nsteps: [cordon]\n")
    r = cli(["--kubeconfig", tmp_path / "none", "rollout", "plan", "-f", f])
    assert r.exit_code == 2, r.stderr
    assert "selector" in r.stderr and "a=b=c" in r.stderr


# -- live top with its only node down ------------------------------------------------------
@pytest.mark.parametrize("nodes", [DOWN, f"{DOWN},{DOWN2}"])
def test_live_top_with_no_node_answering_exits_as_top_once(nodes):
    """The live view exited 0 with the failure only inside the frame."""
    import sys

    from tests._pty import run_on_pty

    rc, text = run_on_pty([sys.executable, "-m", "katactl", "-N", nodes, "top", "--interval", "0.2s",
                           "--iterations", "2"], COLUMNS="160", LINES="40")
    assert rc == 7, text
    assert f"{DOWN}: cannot connect" in text and "Traceback" not in text, text
