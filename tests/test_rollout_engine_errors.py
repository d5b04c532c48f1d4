"""The engine when the API fails mid-run: no node step may outlive the rollout's lock or
the API clients it uses, a failed read of the control record is a warning (pause/abort is
seen at the next poll), and no label-writer thread outlives the run. The store is a small
in-memory one (these are the engine's rules, not a backend's); steps are made slow so the
failure lands while they run."""
from __future__ import annotations

import time

import pytest

from katactl.errors import OperationFailed
from katactl.rollout import engine, steps
from tests.test_rollout_scale import plan_of


class _Store:
    kind = "file"

    def __init__(self, log, control_fails_after=None):
        self.log, self.control_calls, self.control_fails_after = log, 0, control_fails_after

    def mark_node(self, node, name, info):
        pass

    def save(self, name, snap, written=None, taken=None):
        pass

    def renew(self):
        return True

    def release(self):
        self.log.append("lock released")

    def control(self, name):
        self.control_calls += 1
        if self.control_fails_after is not None and self.control_calls > self.control_fails_after:
            raise OperationFailed("Kubernetes API: GET configmap: timed out")
        return {}


@pytest.fixture
def slow_steps(monkeypatch):
    log: list[str] = []

    def run(self, ctx):
        log.append(f"start {ctx.node}")
        time.sleep(0.6)
        log.append(f"end {ctx.node}")
        return {"changed": True}

    monkeypatch.setattr(steps.Step, "run", run)
    return log


def _engine(store, n=2, events=None):
    plan = plan_of(n, ["check"])
    e = engine.Engine(plan, store, engine.new_state(plan), api=None, settings=None,
                      events=events or (lambda kind, **d: None))
    return e


def _threads_of(e):
    """The engine's own threads still alive (other tests' engines may have theirs)."""
    return [t.name for t in [*e._markers, *e.threads.values()] if t.is_alive()]


def test_a_failed_control_read_mid_run_is_a_warning(slow_steps):
    warnings = []
    store = _Store(slow_steps, control_fails_after=1)
    e = _engine(store, events=lambda kind, **d: warnings.append(d.get("message")) if kind == "Warning" else None)
    out = e.run()
    assert out["phase"] == "Succeeded", out
    assert store.control_calls > 1 and any("control record" in (w or "") for w in warnings)


def test_an_error_in_the_main_loop_waits_for_running_steps_before_releasing(slow_steps, monkeypatch):
    store = _Store(slow_steps)
    e = _engine(store)
    real_check = e._check_budget

    def check_budget():  # called on every turn of the batch loop
        if any(x.startswith("start") for x in slow_steps):  # steps are running: the API fails
            raise OperationFailed("Kubernetes API: GET nodes: timed out")
        return real_check()

    monkeypatch.setattr(e, "_check_budget", check_budget)
    with pytest.raises(OperationFailed):
        e.run()
    assert "lock released" in slow_steps
    released = slow_steps.index("lock released")
    started = [i for i, x in enumerate(slow_steps) if x.startswith("start")]
    ended = [i for i, x in enumerate(slow_steps) if x.startswith("end")]
    assert started and len(ended) == len(started) and max(ended) < released, slow_steps
    time.sleep(0.2)
    assert _threads_of(e) == []


def test_label_writers_leave_with_the_run(slow_steps):
    e = _engine(_Store(slow_steps), n=3)
    e.run()
    deadline = time.monotonic() + 2
    while _threads_of(e) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert e._markers and _threads_of(e) == []
