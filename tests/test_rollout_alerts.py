"""The alert gate against a real Alertmanager (Debian prometheus-alertmanager, API v2) on a
loopback port: a matching firing alert stops new nodes (GateClosed with the alert), a
non-matching one does not, and a silence opens the gate again (silences are honoured)."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest_sshd import free_port
from tests.test_rollout import fleet

AM = "/usr/bin/prometheus-alertmanager"


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory):
    if not os.access(AM, os.X_OK):
        pytest.skip("prometheus-alertmanager not installed")
    d = tmp_path_factory.mktemp("am")
    (d / "am.yml").write_text('route:\n  receiver: "null"\n  group_wait: 1s\nreceivers:\n  - name: "null"\n')
    port = free_port()
    p = subprocess.Popen([AM, f"--config.file={d / 'am.yml'}", f"--storage.path={d / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                         stdout=subprocess.DEVNULL, stderr=open(d / "am.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    yield url
    p.terminate()
    p.wait(10)


def test_matching_alert_holds_new_nodes_until_silenced(kube, tmp_path, alertmanager):
    kc = kube.kubeconfig(tmp_path / "kubeconfig")
    fleet(kube, 2)
    now = dt.datetime.now(dt.timezone.utc)
    post = [{"labels": {"alertname": "KataNodeDown", "severity": "critical", "team": "kata"}},
            {"labels": {"alertname": "DiskAlmostFull", "severity": "warning"}}]
    assert httpx.post(f"{alertmanager}/api/v2/alerts", json=post).status_code == 200
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "rollout", "run", "ra",
                          "-l", "pool=batch", "--step", "check", "--alert-gate", alertmanager,
                          "--alert-filter", "severity=critical", "--poll", "0.2", "-o", "jsonl"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ev = []
        for line in p.stdout:
            ev.append(json.loads(line))
            if ev[-1]["kind"] == "GateClosed":
                break
        closed = ev[-1]
        assert closed["kind"] == "GateClosed" and closed["reason"] == "alerts"
        assert [a["labels"]["alertname"] for a in closed["alerts"]] == ["KataNodeDown"]  # the warning is filtered
        time.sleep(0.6)
        assert not [q for q in kube.requests if q["method"] == "PATCH"]  # no node started
        silence = {"matchers": [{"name": "alertname", "value": "KataNodeDown", "isRegex": False}],
                   "startsAt": now.isoformat(), "endsAt": (now + dt.timedelta(hours=1)).isoformat(),
                   "createdBy": "katactl-test", "comment": "maintenance"}
        assert httpx.post(f"{alertmanager}/api/v2/silences", json=silence).status_code == 200
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    ev += [json.loads(x) for x in out.splitlines()]
    kinds = [e["kind"] for e in ev]
    assert "GateOpened" in kinds and kinds.index("GateOpened") < kinds.index("NodeStepStarted")
    assert p.returncode == 0, err
    assert ev[-1]["phase"] == "Succeeded"


def test_unreachable_alertmanager_closes_the_gate(cli, kube, tmp_path):
    kc = kube.kubeconfig(tmp_path / "kubeconfig")
    fleet(kube, 1)
    r = cli(["--kubeconfig", kc, "rollout", "run", "rb", "-l", "pool=batch", "--step", "check",
             "--alert-gate", f"http://127.0.0.1:{free_port()}", "--gate-timeout", "0.3s", "--poll", "0.1",
             "--request-timeout", "1s", "-o", "jsonl"])
    assert r.exit_code == 6
    ev = [json.loads(x) for x in r.stdout.splitlines()]
    assert ev[[e["kind"] for e in ev].index("GateClosed")]["reason"] == "alertmanager-error"


def test_the_first_gate_check_is_made_on_a_machine_up_for_less_than_poll():
    """The engine's clock is monotonic (it counts from boot): on a machine up for 5 s with
    --poll 60s the gate must still be asked before the first node starts. Here it is closed
    (Alertmanager unreachable): nothing starts, and --gate-timeout ends the run."""
    from katactl.rollout import engine
    from tests.test_rollout_engine_errors import _Store
    from tests.test_rollout_scale import plan_of

    plan = plan_of(2, ["check"])
    plan.policy.poll, plan.policy.gate_timeout = 60.0, 0.5
    plan.policy.alert_gate = f"http://127.0.0.1:{free_port()}"
    now = [5.0]  # booted 5 s ago

    def clock():
        now[0] += 0.01
        return now[0]

    ev: list[tuple[str, dict]] = []
    e = engine.Engine(plan, _Store([]), engine.new_state(plan), api=None, settings=None, clock=clock,
                      events=lambda kind, **d: ev.append((kind, d)))
    out = e.run()
    kinds = [k for k, _ in ev]
    assert "GateClosed" in kinds and "NodeStepStarted" not in kinds, kinds
    assert out["phase"] == "Stopped" and out["exitCode"] == 6, out


#: matchers as an operator types them for amtool or the Alertmanager UI, each matching the
#: alert posted below: Alertmanager reads a backslash other than \" \\ \n as itself, quoted or
#: not (pkg/labels/parse.go ParseMatcher), and runs the value with Go's RE2
TYPED = [r'instance=~"db-\d+"', r"instance=~db-\d+", r'msg=~"a\.b"', r"team=~[[:alpha:]]+",
         r'team=~"\pL+"', r"instance=~\Qdb-12\E", r"instance=~db-12\z", r'zone=~"\p{Greek}+"', r'team!~"[[:digit:]]+"']


def test_a_filter_keeps_every_alert_alertmanager_matched(alertmanager):
    """katactl's gate counts exactly the alerts Alertmanager answers for the filter as typed.
    Before, a quoted value lost its backslashes (db-\\d+ was sent as db-d+: no alert, the
    gate open while db-12 fired), the client-side re-check ran RE2's [[:alpha:]] with
    Python's re and dropped the alert Alertmanager matched, and \\z, \\pL, \\Q..\\E were
    refused at plan time."""
    from katactl.rollout import gate
    from katactl.rollout.policy import Policy

    alert = {"alertname": "DbDown", "instance": "db-12", "msg": "a.b", "team": "db", "zone": "αβ",
             "case": "typed"}
    assert httpx.post(f"{alertmanager}/api/v2/alerts", json=[{"labels": alert}]).status_code == 200
    for typed in TYPED:
        filters = [typed, "case=typed"]
        am = httpx.get(f"{alertmanager}/api/v2/alerts", params=[("filter", f) for f in filters], timeout=10)
        assert am.status_code == 200 and [a["labels"] for a in am.json()] == [alert], (typed, am.text)
        state = gate.check(Policy.from_dict({"alertGate": alertmanager, "alertFilters": filters}))
        assert not state.open and [a["labels"] for a in state.alerts] == [alert], (typed, state)


def test_the_re_check_drops_only_what_an_equality_matcher_rules_out():
    """An Alertmanager that ignored the filter: = and != are re-checked (as Alertmanager
    compares them); a regex is not run with Python's re, so the alert counts as firing."""
    import http.server
    import threading

    alerts = [{"labels": {"alertname": a, "team": "db"}, "status": {"state": "active"}} for a in ("A", "B")]

    class Ignoring(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(alerts).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    from katactl.rollout.gate import firing_alerts
    from katactl.rollout.policy import parse_matcher

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ignoring)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        got = firing_alerts(url, [parse_matcher("alertname!=B"), parse_matcher("team=~[[:digit:]]+")])
        assert [a["labels"]["alertname"] for a in got] == ["A"]
    finally:
        srv.shutdown()
        srv.server_close()
