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
