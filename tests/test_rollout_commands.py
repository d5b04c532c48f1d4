"""rollout pause|resume|abort|status|list as commands, against the kube-apiserver stand-in
(tests/kubeserver.py) through the real CLI: --dry-run changes nothing and writes no audit
entry, no-op resumes, elapsed time of a finished rollout, and where status/list look."""
from __future__ import annotations

import datetime
import json

from tests.test_rollout_alerts import alertmanager  # noqa: F401 (a fixture)
from tests.test_rollout import MUTATING, _cordon_as_rollout, _edit_state, fleet, ro, state_of, unschedulable


def _audit(home) -> list[dict]:
    f = home / "state/katactl/audit.log"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def test_resume_retry_failed_of_a_finished_rollout_without_failed_nodes_is_a_no_op(cli, kube, kc, _isolated_home):
    """Before, it took the lock, saved the state again and wrote rollout.resume and
    rollout.run audit entries, reporting changed: true."""
    fleet(kube, 2)
    assert ro(cli, kc, "run", "r1", "-N", "n0,n1", "--step", "cordon", "--poll", "0.1").exit_code == 0
    before = state_of(kube, "r1")
    log = len(_audit(_isolated_home))
    kube.requests.clear()
    r = ro(cli, kc, "resume", "r1", "--retry-failed", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is False and r.json()["phase"] == "Succeeded"
    assert "no failed node to retry" in r.stderr
    assert not [q for q in kube.requests if q["method"] in MUTATING]
    assert len(_audit(_isolated_home)) == log and state_of(kube, "r1") == before


def test_elapsed_seconds_of_a_finished_rollout_stop_at_its_end(cli, kube, kc):
    """elapsedSeconds was now - startedAt, growing for ever after the end; it is counted to
    finishedAt (the state is set to a known start and end, no clock is read)."""
    fleet(kube, 1)
    assert ro(cli, kc, "run", "r1", "-N", "n0", "--step", "cordon", "--poll", "0.1").exit_code == 0
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    _edit_state(kube, "r1", lambda st: st.update(startedAt=start.timestamp(),
                                                  finishedAt="2026-01-01T00:02:05+0000"))
    assert ro(cli, kc, "status", "r1", "-o", "json").json()["elapsedSeconds"] == 125.0


def test_pause_dry_run_changes_nothing(cli, kube, kc, _isolated_home):
    fleet(kube, 2)
    r = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--canary", "1", "--step", "cordon", "--poll", "0.1", "-o", "json")
    assert r.json()["phase"] == "Paused"
    log = len(_audit(_isolated_home))
    kube.requests.clear()
    d = ro(cli, kc, "pause", "r1", "--dry-run", "-o", "json")
    assert d.exit_code == 0, d.stderr
    p = d.json()
    assert p["kind"] == "RolloutPause" and p["changed"] is True and p["dryRun"] is True
    assert p["message"].startswith("dry run: would")
    assert not [q for q in kube.requests if q["method"] in MUTATING] and len(_audit(_isolated_home)) == log
    assert ro(cli, kc, "pause", "r1", "-o", "json").json()["changed"] is True  # not requested by the dry run
    assert ro(cli, kc, "pause", "r1", "--dry-run", "-o", "json").json()["changed"] is False


def test_abort_and_resume_dry_run_list_the_nodes_they_would_restore(cli, kube, kc, _isolated_home):
    """A rollout killed with n1 mid-steps (cordoned under its record), n2 done but still
    cordoned by it, n3 cordoned by an operator: abort --dry-run lists n1 and n2, resume
    --dry-run n2 (a running node goes on); neither changes anything or writes the audit log."""
    fleet(kube, 4)
    r = ro(cli, kc, "run", "r1", "-N", "n0,n1,n2,n3", "--canary", "1", "--step", "cordon", "--step", "check",
           "--poll", "0.1", "-o", "json")
    assert r.json()["phase"] == "Paused"
    _edit_state(kube, "r1", lambda st: (st.update(phase="Running"),
                                        st["nodes"]["n1"].update(phase="running", step=1, wasUnschedulable=False),
                                        st["nodes"]["n2"].update(phase="done", step=2, wasUnschedulable=False)))
    _cordon_as_rollout(kube, "r1", "n1")
    _cordon_as_rollout(kube, "r1", "n2")
    assert cli(["--kubeconfig", kc, "node", "cordon", "n3", "--reason", "disk"]).exit_code == 0
    before, nodes, log = state_of(kube, "r1"), unschedulable(kube), len(_audit(_isolated_home))
    kube.requests.clear()
    a = ro(cli, kc, "abort", "r1", "--dry-run", "-o", "json")
    assert a.exit_code == 0, a.stderr
    d = a.json()
    assert d["kind"] == "Rollout" and d["dryRun"] is True and d["changed"] is True and d["phase"] == "Running"
    assert d["wouldUncordon"] == ["n1", "n2"] and d["wouldAbort"] == ["n1", "n3"]
    res = ro(cli, kc, "resume", "r1", "--dry-run", "-o", "json")
    assert res.exit_code == 0, res.stderr
    assert res.json()["wouldUncordon"] == ["n2"] and res.json()["wouldRetry"] == []
    assert not [q for q in kube.requests if q["method"] in MUTATING]
    assert state_of(kube, "r1") == before and unschedulable(kube) == nodes
    assert len(_audit(_isolated_home)) == log
    # the real abort restores exactly those
    assert ro(cli, kc, "abort", "r1", "-o", "json").exit_code == 0
    assert unschedulable(kube) == {"n0": False, "n1": False, "n2": False, "n3": True}


def test_a_pause_during_the_canary_soak_stops_the_run_without_waiting_for_the_soak(kube, kc, cli):
    """No node runs during --canary-soak: 'rollout pause' then ends the run as Paused (before,
    the pause was honoured only once the whole soak had elapsed, holding the lock)."""
    import subprocess
    import sys

    fleet(kube, 2)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "rollout", "run", "r1", "-N", "n0,n1",
                          "--canary", "1", "--canary-soak", "1h", "--step", "cordon", "--poll", "0.05", "-o", "jsonl"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if json.loads(line).get("kind") == "CanarySoaking":
                break
        assert ro(cli, kc, "pause", "r1", "-o", "json").json()["running"] is True
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    last = json.loads(out.splitlines()[-1])
    assert last["phase"] == "Paused" and last["counts"] == {**last["counts"], "done": 1, "pending": 1}
    r = ro(cli, kc, "resume", "r1", "-o", "json")  # goes on with the rest, without the rest of the soak
    assert r.exit_code == 0 and r.json()["phase"] == "Succeeded", r.stderr


DEAD_KUBECONFIG = """apiVersion: v1
kind: Config
current-context: c
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
"""


def test_status_and_list_away_from_the_cluster_show_the_local_rollouts(cli, tmp_path, monkeypatch):
    """An SSH-only machine (file state): 'rollout status' without NAME failed with exit 2 when
    there was no kubeconfig ("kubeconfig: no configuration"), and 'rollout list' failed with
    exit 7 when the kubeconfig's cluster was unreachable, hiding the local rollouts."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.delenv("KUBECONFIG", raising=False)
    r = cli(["--host-root", str(tmp_path / "absent"), "rollout", "run", "fr1", "-N", "localhost", "--state", "file",
             "--step", "upgrade gc", "-o", "json"])
    assert r.json()["kind"] == "Rollout" and r.json()["counts"]["failed"] == 1, r.stderr
    s = cli(["rollout", "status", "-o", "json"])
    assert s.exit_code == 0, s.stderr
    assert s.json()["name"] == "fr1" and s.json()["backend"] == "file"
    dead = tmp_path / "dead.yaml"
    dead.write_text(DEAD_KUBECONFIG)
    base = ["--kubeconfig", str(dead), "--request-timeout", "2s", "rollout"]
    lst = cli([*base, "list", "-o", "json"])
    assert lst.exit_code == 4, lst.stderr  # incomplete: the cluster's rollouts are unknown
    d = lst.json()
    assert [(i["name"], i["state"]) for i in d["items"]] == [("fr1", "file")]
    [err] = d["errors"]
    assert err["state"] == "kube" and err["error"]["exitCode"] == 7
    assert "ConfigMaps in kube-system: " in lst.stderr
    s = cli([*base, "status", "-o", "json"])
    assert s.exit_code == 0 and s.json()["name"] == "fr1", s.stderr
    assert "ConfigMaps in kube-system: " in s.stderr  # said, not hidden
    only = cli([*base, "list", "--state", "kube", "-o", "json"])
    assert only.exit_code == 7, only.stderr  # the one store asked for fails: its failure


#: (value, whether Go's RE2 compiles it): Python's re accepts the first ones, and refuses
#: or reads otherwise \z, \pL, \Q..\E, [[:alpha:]]
RE2_CORPUS = [
    ("(?!Watchdog).*", False), ("Kata(?=Node)", False), ("(?<=kata)Down", False), ("(?<!x)Down", False),
    ("(a)\\1", False), ("(?P<n>a)(?P=n)", False), ("a++", False), ("a*+", False), ("a?+", False),
    ("a{2}+", False), ("(?>ab)", False), ("a\\Z", False), ("(?x)a b", False), ("a{1001}", False),
    ("(a)(?(1)b|c)", False), ("\\u0041", False), ("[[:word2:]]", False), ("[\\b]", False), ("\\8", False),
    ("db\\z", True), ("\\pL+", True), ("\\p{Greek}", True), ("[\\P{^Han}x]", True), ("\\Qa.b\\E", True),
    ("[[:alpha:]]+", True), ("[[:^space:]]", True), ("\\x{41}", True), ("a)|(b", True), ("(?U)a*", True),
    ("\\12", True), ("[\\d-z]", True),
    ("db|storage", True), ("(?i)watch.*", True), ("(?i:a)b", True), ("(?s).*", True), ("a*?b+?", True),
    ("[(?!]x", True), ("[]a+]+", True), ("\\(?!", True), ("x\\+\\+", True), ("a{2,1000}", True),
    ("(?P<n>a)b", True), ("\\d{3}", True), ("\\Aa", True),
]


def test_alert_filter_regexes_are_checked_as_alertmanager_compiles_them(cli, kube, kc, alertmanager):  # noqa: F811
    """Each value, sent to a real Alertmanager as a filter: it answers 400 exactly for the ones
    the plan refuses (exit 2, one line naming the construct). Before, a refused one passed the
    plan (Python's re accepts it) and the gate then stayed closed: alertmanager-error; and
    RE2's \\z (which the \\Z refusal suggests), \\pL and \\Q..\\E were refused."""
    import httpx

    from katactl.rollout.policy import Matcher

    fleet(kube, 1)
    for rx, re2 in RE2_CORPUS:
        matcher = str(Matcher("alertname", "=~", rx))
        am = httpx.get(f"{alertmanager}/api/v2/alerts", params={"filter": matcher}, timeout=10).status_code
        assert am == (200 if re2 else 400), (rx, am)
        r = ro(cli, kc, "plan", "p", "-N", "n0", "--step", "check", "--alert-gate", alertmanager,
               "--alert-filter", matcher)
        assert r.exit_code == (0 if re2 else 2), (rx, r.stderr)
        if not re2:
            assert r.stderr.count("\n") == 1 and "Go's RE2" in r.stderr, r.stderr


def test_the_plan_promises_the_node_check_after_a_soak_only_where_it_runs(cli, kube, kc):
    """With --state file there is no Kubernetes API to run node check with, and the run only
    soaks (NodeSoaking, then NodeFinished): the plan said '(soak 1s, then node check)'."""
    fleet(kube, 1)
    steps = {}
    for backend in ("file", "kube"):
        r = ro(cli, kc, "plan", "p", "-N", "n0", "--state", backend, "--soak", "1s", "--step", "upgrade gc",
               "-o", "json")
        assert r.exit_code == 0, r.stderr
        steps[backend] = r.json()["items"][0]["steps"][-1]
    assert steps == {"file": "(soak 1s)", "kube": "(soak 1s, then node check)"}


def _emitted() -> dict[str, set[str]]:
    """Every event kind the rollout can print, with the fields its calls name: the engine's
    self.ev("Kind", field=...) calls, and the node drain events a drain step forwards
    (steps._drain_events) as katactl/nodes.py emits them."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "katactl"
    out: dict[str, set[str]] = {}

    def calls(path, attr=None, name=None, only=None):
        for node in ast.walk(ast.parse((root / path).read_text())):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            f = node.func
            if not ((attr and isinstance(f, ast.Attribute) and f.attr == attr)
                    or (name and isinstance(f, ast.Name) and f.id == name)):
                continue
            first = node.args[0]
            kinds = [first] if isinstance(first, ast.Constant) else \
                [first.body, first.orelse] if isinstance(first, ast.IfExp) else []
            if attr == "ev" and not kinds and isinstance(first, ast.Name) and first.id == "kind":
                continue  # the step context's pass-through (below)
            assert kinds and all(isinstance(k, ast.Constant) for k in kinds), ast.unparse(node)
            for k in kinds:
                if only is None or k.value in only:
                    out.setdefault(k.value, set()).update(kw.arg for kw in node.keywords if kw.arg)

    calls("rollout/engine.py", attr="ev")
    steps = ast.parse((root / "rollout/steps.py").read_text())
    [fn] = [n for n in ast.walk(steps) if isinstance(n, ast.FunctionDef) and n.name == "_drain_events"]
    [tup] = [n for n in ast.walk(fn) if isinstance(n, ast.Tuple)]
    forwarded = {c.value for c in tup.elts}
    calls("nodes.py", name="events", only=forwarded)
    assert forwarded <= set(out), forwarded - set(out)
    return out


def _documented() -> dict[str, str]:
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs/rollout.md").read_text()
    table = text.split("### Events", 1)[1].split("\n\n")[2]
    out = {}
    for row in table.splitlines()[2:]:
        cells = row.split(" | ")
        for kind in re.findall(r"`(\w+)`", cells[0]):
            out[kind] = cells[1]
    return out


def test_the_documented_events_are_the_ones_the_rollout_emits_with_their_fields():
    """docs/output.md and docs/rollout.md each listed some: CanarySoaking, RolloutPausing,
    RolloutResumed, RolloutAborting, Warning, PodEvictionBlocked, NodeRestored and
    RolloutInterrupted were missing from one or both. Now docs/rollout.md has the one list."""
    emitted, documented = _emitted(), _documented()
    assert set(emitted) == set(documented)
    for kind, fields in emitted.items():
        missing = {f for f in fields - {"rollout"} if f"`{f}`" not in documented[kind]}
        assert not missing, (kind, missing)


def test_run_dry_run_of_an_existing_rollout_answers_as_the_run_would(cli, kube, kc, _isolated_home):
    """A dry run printed the plan as would-run (exit 0) where the run refuses another plan
    under a finished rollout's name (exit 5) or re-runs the same one as a no-op (exit 0/4,
    changed: false): an Ansible check mode must predict the exit code. Nothing is written,
    no lock taken, no audit entry. The refusal names the nodes added and removed (a selector's
    pool changed by the autoscaler)."""
    fleet(kube, 3)
    assert ro(cli, kc, "run", "r1", "-N", "n0,n1", "--step", "cordon", "--poll", "0.1").exit_code == 0
    log = len(_audit(_isolated_home))
    before = state_of(kube, "r1")
    kube.requests.clear()
    for extra in ([], ["--dry-run"]):
        r = ro(cli, kc, "run", "r1", "-N", "n0,n2", "--step", "cordon", "--poll", "0.1", *extra, "-o", "json")
        assert r.exit_code == 5, (extra, r.stdout, r.stderr)
        assert "with other nodes (added n2; removed n1): this plan was not run" in r.stderr, r.stderr
    d = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--step", "cordon", "--dry-run", "-o", "json")
    assert d.exit_code == 0, d.stderr
    assert (d.json()["kind"], d.json()["changed"], d.json()["dryRun"]) == ("Rollout", False, True)
    _edit_state(kube, "r1", lambda st: st.update(phase="CompletedWithFailures"))
    d = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--step", "cordon", "--dry-run", "-o", "json")
    assert (d.exit_code, d.json()["changed"]) == (4, False), d.stderr
    _edit_state(kube, "r1", lambda st: st.update(phase="Running"))
    d = ro(cli, kc, "run", "r1", "-N", "n0,n1", "--step", "cordon", "--dry-run")
    assert d.exit_code == 5 and "already exists (phase Running)" in d.stderr, d.stderr
    assert len(_audit(_isolated_home)) == log
    assert not [q for q in kube.requests if q["method"] in MUTATING]
    # a new rollout's dry run is still the plan
    d = ro(cli, kc, "run", "r2", "-N", "n2", "--step", "cordon", "--dry-run", "-o", "json")
    assert (d.exit_code, d.json()["kind"], d.json()["dryRun"]) == (0, "RolloutPlan", True), d.stderr
    assert state_of(kube, "r1")["plan"] == before["plan"]


def test_status_without_name_picks_the_latest_by_time_across_utc_offsets(cli, kube, kc):
    """updatedAt carries its writer's UTC offset: ra at 11:00Z written in +08:00 reads later
    as a string than rb at 12:00Z; an unreadable time counts as the oldest."""
    fleet(kube, 3)
    for name, node in (("ra", "n0"), ("rb", "n1"), ("rc", "n2")):
        assert ro(cli, kc, "run", name, "-N", node, "--step", "cordon", "--poll", "0.1").exit_code == 0
    _edit_state(kube, "ra", lambda st: st.update(updatedAt="2026-12-05T19:00:00+08:00"))
    _edit_state(kube, "rb", lambda st: st.update(updatedAt="2026-12-05T12:00:00+00:00"))
    _edit_state(kube, "rc", lambda st: st.update(updatedAt="not a time"))
    r = ro(cli, kc, "status", "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["name"] == "rb", r.json()["updatedAt"]


def test_pause_of_a_finished_rollout_is_a_no_op(cli, kube, kc, _isolated_home):
    """A finished rollout starts no new node, which is what pause asks: changed: false, exit 0,
    with and without --dry-run, as resume and abort answer (it was refused, exit 5); no request
    is written and no audit entry (review 13, finding 4)."""
    fleet(kube, 2)
    assert ro(cli, kc, "run", "r1", "-N", "n0,n1", "--step", "cordon", "--poll", "0.1").exit_code == 0
    assert ro(cli, kc, "run", "r2", "-N", "n0,n1", "--canary", "1", "--step", "cordon", "--poll", "0.1").exit_code == 0
    assert ro(cli, kc, "abort", "r2").exit_code == 0
    log = len(_audit(_isolated_home))
    kube.requests.clear()
    for name, phase in (("r1", "Succeeded"), ("r2", "Aborted")):
        for dry in ((), ("--dry-run",)):
            r = ro(cli, kc, "pause", name, *dry, "-o", "json")
            assert r.exit_code == 0, r.stderr
            p = r.json()
            assert p["kind"] == "RolloutPause" and p["changed"] is False and p["dryRun"] is bool(dry)
            assert p["running"] is False and f"already finished ({phase})" in p["message"], p
    assert not [q for q in kube.requests if q["method"] in MUTATING] and len(_audit(_isolated_home)) == log
