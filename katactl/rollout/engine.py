"""The rolling engine: batches of nodes through their steps under the policy,
every transition persisted (store.save) before it is acted on.

Threads: the caller's thread schedules (gate, max-unavailable, pause/abort
requests, failure budget); one thread per node in progress runs its steps; one
thread renews the lock; one watches the selected nodes (nodeview.NodeView: what
max-unavailable counts, without a node list per batch); a few write the nodes'
progress labels (write-behind: they only show progress, so a newer phase
replaces one not yet written). The
state is a plain JSON-able dict (see docs/rollout.md, "Lock and state"); saves are
group-committed: the state is serialized under the state lock (only the node
records changed since the last save are serialized again: store.StateWriter)
and compressed and written outside it (only the chunks of records that changed
are compressed again; of a sharded state, only their shards are written), so other threads go on changing the state meanwhile, and
a change that another thread's save already carried is not written again. The nodes the
scheduler starts together are marked running in one save, before any of their
steps runs.

Node lifecycle: pending -> running (steps; ``step`` = the next step to run)
-> [soaking] -> done | failed | aborted. A node's cordon state is observed and
recorded (``wasUnschedulable``) in the same save that marks it running, before
any step acts, and replaced by what the rollout's cordon itself found. When its
steps end (done, failed or aborted), a node the rollout cordoned is uncordoned; a
node that was unschedulable before is never touched.
"The rollout cordoned it" is read from the node, never from ``wasUnschedulable``:
katactl's cordon record (katactl/nodes.py cordon) carries the ``id`` the node's state
record holds in ``cordonId`` (made and saved when the node is marked running, before
any step, and given to cordon(): a kill between the cordon PATCH and the next save
leaves a record the state already names), with ``wasUnschedulable`` false, and the
server's managedFields (when it keeps them) do not say someone else set
spec.unschedulable since (kubectl uncordon + cordon leave our record). Never the
record's reason text: an operator's cordon may carry the same words. A state saved
before cordon ids (no ``cordonId``) names no record: its nodes count as not ours
(left cordoned, with a warning). An uncordon that fails is retried with
backoff (for --step-timeout, else RESTORE_WINDOW); then the node is failed
(``leftCordoned`` says why; it counts against the failure budget), and the
scheduler, while such a node holds back the rollout, says so and tries again
every --poll (a node whose only failure that was is done once uncordoned). A
rollout does not finish (Succeeded, CompletedWithFailures) while a node it
cordoned stays cordoned: it stops, and resume tries again.

kill -9 at any point, then resume: a running node re-runs from its recorded
step (katactl's node steps are idempotent), or from the step that cordons when it
is not cordoned by the rollout any more; a soaking node soaks the rest
(``soakedSeconds``); done nodes are not redone; every other node whose record says
this rollout cordoned it is uncordoned (idempotent), as abort does for every node,
and the running ones too when the resumed run stops before starting any node.

The lock: renewed every third of --lock-ttl. When no renewal has succeeded for
two thirds of it (client-go tools/leaderelection/leaderelection.go renew(): stop
leading when renewal fails within RenewDeadline), or the lease is found to be
another's, the run stops acting as the holder before the lease can expire: no node
starts, running steps are interrupted (as abort --now: a drain restores its own
cordon), nodes whose steps were cut are uncordoned while their record is still this
rollout's and the lease not yet expired (their next run starts again at the step
that cordons), the state is saved if the API lets it, and the run ends Stopped,
exit 1 ("lost the cluster lock"); resume continues.

Test hook (documented for the kill -9 tests, inert unless set):
``KATACTL_TEST_KILL_AT=save:N`` SIGKILLs this process right after the Nth
state save of the run, ``step:N`` right after the Nth step acted and before
its result is saved, ``shard:N`` right after the Nth write of a shard of a
sharded state (store.KubeStore), before the rest of that save.
"""
from __future__ import annotations

import collections
import os
import threading
import time
import uuid
from typing import Callable

from katactl import audit
from katactl.errors import ExitCode, Interrupted, KatactlError, OperationFailed, as_katactl_error
from katactl.rollout import gate as gate_mod
from katactl.rollout.nodeview import NodeView
from katactl.rollout.plan import NodeInfo, Plan, info_of
from katactl.rollout.steps import DEFAULT_FAIL_ON, StepContext, run_check
from katactl.rollout.store import StaleState, StateWriter

#: phases of a rollout; the ones a rollout can be resumed from
RESUMABLE = ("Running", "Interrupted", "Paused", "Stopped")
FINAL = ("Succeeded", "CompletedWithFailures", "Aborted")
NODE_ACTIVE = ("running", "soaking")
#: threads writing the nodes' progress labels (a round trip each; with the saver, the scheduler and the
#: lease renewal they stay within the store client's 16 connections)
MARKERS = 8
#: seconds a progress label waits before it is written (a newer phase meanwhile replaces it)
MARK_DELAY = 0.5
#: seconds between the saves of a soaking node's progress (soakedSeconds)
SOAK_SAVE_EVERY = 30.0
#: seconds a failing uncordon of a node the rollout cordoned is retried (without --step-timeout)
RESTORE_WINDOW = 60.0


def _now() -> str:
    return audit.now_iso()


def new_state(plan: Plan) -> dict:
    return {"apiVersion": "katactl/v1", "kind": "RolloutState", "name": plan.name, "phase": "Running",
            "reason": None, "createdAt": _now(), "updatedAt": _now(), "startedAt": time.time(),
            "finishedAt": None, "batch": 0, "holder": None, "exitCode": None, "plan": plan.to_dict(),
            "nodes": {n.name: {"phase": "pending", "batch": i, "step": 0, "attempts": 0, "wasUnschedulable": None,
                               "results": [], "error": None, "startedAt": None, "finishedAt": None}
                      for i, b in enumerate(plan.batches) for n in [NodeInfo(x) for x in b]}}


class _KillHook:
    def __init__(self):
        spec = os.environ.get("KATACTL_TEST_KILL_AT", "")
        kind, _, n = spec.partition(":")
        self.kind, self.n = (kind, int(n)) if kind in ("save", "step", "shard") and n.isdigit() else (None, 0)
        self.counts = {"save": 0, "step": 0, "shard": 0}
        self.lock = threading.Lock()

    def hit(self, kind: str) -> None:
        if self.kind != kind:
            return
        with self.lock:
            self.counts[kind] += 1
            if self.counts[kind] == self.n:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)


class Engine:
    def __init__(self, plan: Plan, store, state: dict, *, api, settings,
                 events: Callable[..., None] = lambda kind, **d: None, clock=time.monotonic):
        self.plan, self.store, self.state = plan, store, state
        self.api, self.settings, self.emit = api, settings, events
        #: times every interval and deadline (gate and control polls, soaks, --gate-timeout): a
        #: wall-clock step (NTP, a VM resumed) must not stretch or skip them; time.time() only
        #: for the timestamps written to the state
        self.clock = clock
        self.lock = threading.RLock()          # the state dict
        self.save_lock = threading.Lock()      # one save at a time
        self.store_lock = threading.Lock()     # the store's caches (resourceVersion, control)
        self.seq = 0
        self.persisted = 0
        self._dirty: set[str] = set(state["nodes"])  # records changed since the last save's snapshot
        writer = getattr(store, "writer", None)  # (a store of the tests' may lay out nothing)
        self._writer = writer(state) if writer else StateWriter(state)
        self._marks: dict[str, tuple[dict, float]] = {}  # node -> (label not yet written, when due)
        self._flushing = False
        self._marks_cv = threading.Condition()
        self._marking: set[str] = set()        # nodes whose label is being written
        self._markers: list[threading.Thread] = []
        self.stop = threading.Event()          # Ctrl-C, abort --now: steps stop
        self.hurry = threading.Event()         # Ctrl-C: no more waiting to retry an uncordon either
        self.wake = threading.Event()
        self.threads: dict[str, threading.Thread] = {}
        self.out_nodes: set[str] = set()       # nodes in their steps (out of service by us)
        self.obs: dict[str, NodeInfo] = {}
        # out of service as last observed: worked out once per list, not for each node started
        self.obs_out: set[str] = set(state["nodes"])
        # "never": -inf, not 0.0 (the monotonic clock counts from boot: a machine up for less
        # than --poll would skip the first gate check and control read)
        self.obs_at = float("-inf")
        self.obs_dirty = True
        self.view: NodeView | None = None     # the watched selection (started by run())
        self.gate = gate_mod.GateState(True)
        self.gate_at = float("-inf")
        self.gate_closed_since: float | None = None
        self.control_at = float("-inf")
        self.stopping: tuple[str, int] | None = None   # (reason, exit code)
        self.pausing: str | None = None
        self.aborting = False
        self.lost_lock = False
        self.lost_why = ""
        # when the last renewal that succeeded was sent (the acquire: just before the engine)
        self._renewed = time.monotonic()
        #: renewals failing this long (client-go's RenewDeadline, 10s of a 15s lease): the lock is lost
        self.renew_deadline = plan.lock_ttl * 2 / 3
        self.hook = _KillHook()
        self._apis: list = []                  # the node threads' clients (see _take_api)
        self._free_apis: list = []
        self._apis_lock = threading.Lock()
        self.cordons = any(s.definition.cordons for s in plan.steps)
        #: the first step that cordons (a node uncordoned after losing the lock starts again there)
        self.first_cordon = next((i for i, s in enumerate(plan.steps) if s.definition.cordons), 0)
        self._theirs_told: set[str] = set()     # nodes _theirs() warned about
        #: nodes restore() left cordoned by design (not the rollout's cordon, as far as it can
        #: tell) -> why; those holding the rollout back are said once (_left_cordoned_blocking)
        self._kept: dict[str, str] = {}
        self._kept_told: set[str] = set()
        self._left_tried: dict[str, float] = {}  # node left cordoned -> when the scheduler last tried it
        self._done = threading.Event()

    # -- persistence --------------------------------------------------------------
    def _mutate(self, fn=None, nodes=None) -> int:
        """Apply ``fn`` to the state; ``nodes``: the node records it changes (None: any)."""
        with self.lock:
            if fn:
                fn()
            self._dirty.update(self.state["nodes"] if nodes is None else nodes)
            self.seq += 1
            self.state["updatedAt"] = _now()
            return self.seq

    def save(self, seq: int | None = None) -> None:
        """Persist the state (at least up to change ``seq``)."""
        seq = self.seq if seq is None else seq
        with self.save_lock:
            if self.persisted >= seq:
                return  # another thread's save carried this change
            with self.lock:
                snap = self._writer.snapshot(self.state, self._dirty)
                upto = self.seq
            # compression and the round trip hold only the store: the state goes on changing
            # meanwhile, and those changes wait for the next save (one for all of them)
            with self.store_lock:
                self.store.save(self.plan.name, snap, written=lambda: self.hook.hit("shard"),
                                taken=self.lease_may_be_taken)
            self.persisted = upto
        self.hook.hit("save")

    def transition(self, fn, nodes=None) -> None:
        """Change the state and make the change durable before returning."""
        self.save(self._mutate(fn, nodes))

    def ev(self, kind: str, **data) -> None:
        self.emit(kind, rollout=self.plan.name, **data)

    # -- observation ------------------------------------------------------------------
    def _selector(self) -> str | None:
        return self.plan.selection.get("selector") if not self.plan.selection.get("nodes") else None

    def observe(self, force: bool = False) -> None:
        """Refresh the selected nodes' availability: from the watched view while it is
        fresh (NodeView.fresh), else with one paged node list (at most every poll interval,
        and after the run's own changes)."""
        if self.api is None:
            return
        if self.view is not None and self.view.fresh():
            self.obs, self.obs_out = self.view.snapshot()
            self.obs_at, self.obs_dirty = self.clock(), False
            return
        if not force and not self.obs_dirty and self.clock() - self.obs_at < self.plan.policy.poll:
            return
        names = set(self.state["nodes"])
        sel = self._selector()
        obs = {}
        for page in self.api.list_pages("/api/v1/nodes", labelSelector=sel):
            for n in page:
                if n["metadata"]["name"] in names:
                    obs[n["metadata"]["name"]] = info_of(n, None)
        out = {n for n in names if n not in obs or obs[n].out}
        self.obs, self.obs_out, self.obs_at, self.obs_dirty = obs, out, self.clock(), False

    def unavailable(self) -> set[str]:
        """Nodes of the selection out of service now: ours in their steps, and the
        ones found unschedulable or not Ready (a node gone from the API counts too)."""
        return self.out_nodes | self.obs_out if self.api is not None else set(self.out_nodes)

    def room_for(self, node: str) -> bool:
        self.observe()
        return len(self.unavailable() | {node}) <= self.plan.max_unavailable

    def check_gate(self, force: bool = False) -> gate_mod.GateState:
        pol = self.plan.policy
        if not pol.windows and not pol.alert_gate:
            return self.gate
        if not force and self.clock() - self.gate_at < pol.poll:
            return self.gate
        g = gate_mod.check(pol, timeout=self.settings.request_timeout if self.settings else 10.0)
        self.gate_at = self.clock()
        if not g.open and (self.gate.open or g.message != self.gate.message):
            if self.gate_closed_since is None:
                self.gate_closed_since = self.clock()
            self.state["gate"] = g.to_dict()
            self.ev("GateClosed", reason=g.reason, message=g.message, alerts=g.alerts,
                    windows=[str(w) for w in pol.windows] if g.reason == "window" else None)
        elif g.open and not self.gate.open:
            self.gate_closed_since = None
            self.state["gate"] = g.to_dict()
            self.ev("GateOpened")
        self.gate = g
        return g

    def poll_control(self, force: bool = False) -> None:
        if not force and self.clock() - self.control_at < self.plan.policy.poll:
            return
        self.control_at = self.clock()
        try:
            with self.store_lock:
                ctl = self.store.control(self.plan.name)
        except KatactlError as e:
            if force:
                raise
            # a pause or abort is seen at the next poll; one failed read must not end the run
            self.ev("Warning", message=f"cannot read the rollout's control record: {e.message}")
            return
        self.apply_control(ctl)

    def apply_control(self, ctl: dict) -> None:
        if ctl.get("abort") and not self.aborting:
            self.aborting = True
            self.ev("RolloutAborting", now=bool(ctl.get("now")), by=ctl.get("by"))
            if ctl.get("now"):
                self.stop.set()
        elif ctl.get("pause") and not self.pausing and not self.aborting:
            self.pausing = f"paused by {ctl.get('by') or 'rollout pause'}"
            self.ev("RolloutPausing", by=ctl.get("by"))

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        st = self.state
        resumed = st.get("startedRuns", 0) > 0
        renewer = threading.Thread(target=self._renew_loop, name="katactl-rollout-lease", daemon=True)
        renewer.start()
        try:
            if self.api is not None:
                # a plan just listed (rollout run) seeds the view: no second list of the nodes
                seed = (self.plan.listed_at, self.plan.nodes) if self.plan.listed_at and not resumed else None
                self.view = NodeView(self._new_api, set(st["nodes"]), self._selector(), self.plan.policy.poll,
                                     on_change=self.wake.set,
                                     on_warning=lambda m: self.ev("Warning", message=m), seed=seed)
                self.view.start()
            self.transition(lambda: st.update(phase="Running", reason=None, startedRuns=st.get("startedRuns", 0) + 1,
                                              finishedAt=None, exitCode=None), ())
            self.ev("RolloutResumed" if resumed else "RolloutStarted", nodes=len(st["nodes"]),
                    batches=len(self.plan.batches), maxUnavailable=self.plan.max_unavailable,
                    failureBudget=self.plan.failure_budget, steps=[s.text for s in self.plan.steps],
                    backend=self.store.kind)
            self.poll_control(force=True)
            if resumed:  # a new run has cordoned nothing yet
                self.reconcile()
            self._check_budget()
            while not (self.stopping or self.pausing or self.aborting) and st["batch"] < len(self.plan.batches):
                bi = st["batch"]
                self.run_batch(bi)
                # run_batch ends when its last thread does: a failure then (the last node of
                # the last batch too) stops the run as one in its middle would
                self._check_budget()
                if self.stopping or self.pausing or self.aborting or self.lost_lock:
                    break
                # no save of its own: the next one (the next batch's start, or the end) carries
                # it, and a resume that misses it finds that batch finished and moves on
                self._mutate(lambda bi=bi: st.update(batch=bi + 1), ())
                self.ev("BatchFinished", batch=bi + 1)
                if self.plan.policy.canary and bi == 0 and st["batch"] < len(self.plan.batches):
                    if self.plan.policy.canary_soak is None:
                        self.pausing = "canary finished: 'katactl rollout resume' continues"
                        break
                    self.ev("CanarySoaking", seconds=self.plan.policy.canary_soak)
                    self._sleep(self.plan.policy.canary_soak)
            self._wait_all()
            if self.lost_lock:
                return self._lost_lock_finish()
            return self.finish()
        except KeyboardInterrupt:
            _interrupt_plugins()
            self.stop.set()
            self.hurry.set()
            self._wait_all(interrupt_ok=True)
            self.transition(lambda: st.update(phase="Interrupted", reason="interrupted (Ctrl-C or SIGTERM)",
                                              exitCode=int(ExitCode.INTERRUPTED)), ())
            self.ev("RolloutInterrupted")
            self.flush_marks(timeout=5.0)
            audit.record("rollout.run", self.plan.name, params={"rollout": self.plan.name}, result="interrupted")
            raise Interrupted(f"rollout {self.plan.name} interrupted: state saved, "
                              f"'katactl rollout resume {self.plan.name}' continues it") from None
        finally:
            if self._alive():
                # left by an error: no step may outlive the lock or the clients it uses (a
                # zombie step would go on saving state another 'rollout resume' then owns)
                self.stop.set()
                self._wait_all(interrupt_ok=True)
                self.flush_marks(timeout=5.0)
            self.close()
            try:
                self.store.release()
            except KatactlError as e:  # the lease expires by itself: the run's own outcome stands
                self.ev("Warning", message=f"cannot release the rollout lock (it expires after --lock-ttl): "
                                           f"{e.message}")
            for c in self._apis:
                c.close()

    def close(self) -> None:
        """The run is over: the lease renewer and the label writers leave (the writers once
        nothing is queued); the node watch ends (its thread is joined)."""
        self._done.set()
        with self._marks_cv:
            self._marks_cv.notify_all()
        if self.view is not None:
            self.view.stop()

    def _renew_loop(self) -> None:
        period = max(0.5, self.plan.lock_ttl / 3)
        wait = period
        while not self._done.wait(wait):
            sent = time.monotonic()
            try:
                ok = self.store.renew()
            except KatactlError as e:
                if self.lease_lost():
                    return
                left = self.renew_deadline - (time.monotonic() - self._renewed)
                self.ev("Warning", message=f"cannot renew the rollout lock: {e.message} (the run stops in "
                                           f"{max(0.0, left):.1f}s unless a renewal succeeds)")
                wait = max(0.1, min(period / 3, left))  # client-go's RetryPeriod: sooner than a renewal
                continue
            if not ok:
                self._lose_lock("another katactl took it")
                return
            self._renewed, wait = sent, period

    def lease_lost(self) -> bool:
        """Whether the run must stop acting as the lock's holder (see the module's docstring)."""
        if not self.lost_lock and time.monotonic() - self._renewed > self.renew_deadline:
            self._lose_lock(f"no renewal succeeded for {self.renew_deadline:.3g}s "
                            f"(of its --lock-ttl {self.plan.lock_ttl:g}s)")
        return self.lost_lock

    def lease_may_be_taken(self) -> bool:
        """Whether another katactl may hold the lock by now (ours lost, its lease maybe expired):
        then no node is restored and no save overwrites a state written since."""
        return self.lost_lock and time.monotonic() >= self._renewed + self.plan.lock_ttl

    def _lose_lock(self, why: str) -> None:
        with self.lock:
            if self.lost_lock:
                return
            self.lost_lock, self.lost_why = True, why
        self.ev("Warning", message=f"lost the cluster lock: {why}: stopping (running steps are interrupted)")
        self.stop.set()
        self.wake.set()

    def _lost_lock_finish(self) -> dict:
        """The lock is lost and no step runs: restore the nodes whose steps were cut (only while
        the lease cannot have been taken yet), then stop, saving the state if the API lets us."""
        expires = self._renewed + self.plan.lock_ttl
        for n in [n for n in self.threads if self.state["nodes"][n]["phase"] == "running"]:
            rec = self.state["nodes"][n]
            if self.lease_may_be_taken():
                self.ev("Warning", node=n, message="the lease has expired: left as it is ('katactl rollout "
                                                   f"resume|abort {self.plan.name}' restores it)")
                continue
            if self.restore(n, rec, until=expires) is None and rec["step"] > self.first_cordon:
                # no longer cordoned by us: its next run starts again at the step that cordons
                self._mutate(lambda rec=rec: rec.update(step=self.first_cordon), (n,))
        self.aborting = False  # an abort asked meanwhile: 'rollout abort' takes over once the lease is free
        why = (f"lost the cluster lock: {self.lost_why}; 'katactl rollout resume {self.plan.name}' continues"
               + (f" ({self.stopping[0]})" if self.stopping else ""))
        self.stopping = (why, int(ExitCode.FAILED))
        try:
            return self.finish()
        except StaleState:
            # another katactl's state (a 'rollout abort' took over): it is the one that counts
            raise OperationFailed(f"rollout {self.plan.name}: lost the cluster lock: {self.lost_why}; its state "
                                  "was not saved: another katactl has written it since the lease may have expired",
                                  hint=f"'katactl rollout status {self.plan.name}' shows it") from None
        except KatactlError as e:
            raise OperationFailed(f"rollout {self.plan.name}: {why}; the state could not be saved: {e.message}",
                                  hint="the nodes' records still say what to restore: resume or abort it "
                                       "once the API answers") from None

    def _sleep(self, seconds: float) -> None:
        """The canary soak: ends early on a stop, an abort or a pause (no node runs: the run
        stops as Paused at once, and resume goes on without the rest of the soak)."""
        end = self.clock() + seconds
        while self.clock() < end and not (self.stopping or self.aborting or self.pausing or self.stop.is_set()):
            if self.lease_lost():
                return
            self.poll_control()
            self.stop.wait(min(0.5, max(0.0, end - self.clock()), self.plan.policy.poll))

    def reconcile(self) -> None:
        """On resume: uncordon every node this rollout cordoned whose steps are not going
        on (a kill may have come between a node's save and its restore, or its restore
        failed): any phase but running (those go on, and are restored when they end),
        unless this run stops, pauses or aborts before starting any node: then the running
        ones are restored too. A running node past its cordon that is not (any more) cordoned
        by this rollout starts again at the step that cordons: what follows a drain assumes a
        cordoned, drained node."""
        found = self.cordoned_by_us()
        self.restore_all(skip=("running",), among=found)
        self._check_budget()  # (after that restore: a node failed only for its cordon is done once restored)
        goes_on = not (self.stopping or self.pausing or self.aborting)
        if not goes_on:
            self.restore_all(among=[n for n in found if self.state["nodes"][n]["phase"] == "running"])
        for n, rec in self.state["nodes"].items():
            if self.cordons and rec["phase"] == "running" and rec["step"] > self.first_cordon \
                    and (not goes_on or not found.get(n)):
                self._mutate(lambda rec=rec: rec.update(step=self.first_cordon), (n,))

    def run_batch(self, bi: int) -> None:
        st = self.state
        names = self.plan.batches[bi]
        todo = [n for n in names if st["nodes"][n]["phase"] in ("pending",) + NODE_ACTIVE]
        if not todo:
            return
        self.ev("BatchStarted", batch=bi + 1, batches=len(self.plan.batches), nodes=names)
        # nodes a previous run left in progress first: most are out already
        pending = collections.deque(sorted(todo, key=lambda n: st["nodes"][n]["phase"] == "pending"))
        while pending or self._alive():
            if not self.lease_lost():
                self.poll_control()
            self._check_budget()
            if self.stopping or self.pausing or self.aborting or self.lost_lock:
                pending.clear()
            starting: list[str] = []
            while pending:
                n = pending[0]
                if not self._out_already(n):
                    g = self.check_gate()
                    if not g.open:
                        gt = self.plan.policy.gate_timeout
                        if gt and self.gate_closed_since is not None \
                                and self.clock() - self.gate_closed_since > gt:
                            self.stopping = (f"the gate stayed closed longer than --gate-timeout {gt:g}s: "
                                             f"{g.message}", int(ExitCode.TIMEOUT))
                        break
                    if not self.room_for(n):
                        self._left_cordoned_blocking()
                        break
                starting.append(pending.popleft())
                self.out_nodes.add(n)  # counted by room_for for the next one
            if starting:
                self.start(starting)
                continue
            if self.stopping and pending:
                continue  # drop them at once
            self.wake.wait(min(0.2, self.plan.policy.poll))
            self.wake.clear()

    def _out_already(self, n: str) -> bool:
        """Whether starting node ``n`` takes nothing more out of service: a soaking one (its
        steps are over), or a running one (left by a previous run) that is out now. A running
        node killed before its cordon is not: it waits for room and the gate like a pending one
        (keeping its cordonId)."""
        phase = self.state["nodes"][n]["phase"]
        if phase == "soaking":
            return True
        if phase != "running":
            return False
        self.observe()
        return n in self.unavailable()

    def _alive(self) -> bool:
        return any(t.is_alive() for t in self.threads.values())

    def _wait_all(self, interrupt_ok: bool = False) -> None:
        while self._alive():
            try:
                self.wake.wait(0.2)
                self.wake.clear()
                if not interrupt_ok and not self.lease_lost():
                    self.poll_control()
            except KeyboardInterrupt:
                _interrupt_plugins()
                self.stop.set()
                self.hurry.set()
                interrupt_ok = True
        for t in self.threads.values():
            t.join()

    def _check_budget(self) -> None:
        if self.stopping:
            return
        failed = [n for n, r in self.state["nodes"].items() if r["phase"] == "failed"]
        if not failed:
            return
        codes = [self.state["nodes"][n].get("exitCode") for n in failed]
        code = int(ExitCode.TIMEOUT) if int(ExitCode.TIMEOUT) in codes else int(ExitCode.FAILED)
        if self.plan.policy.on_failure == "stop":
            self.stopping = (f"node {failed[0]} failed (--on-failure stop)", code)
        elif len(failed) > self.plan.failure_budget:
            self.stopping = (f"{len(failed)} node(s) failed, more than the failure budget "
                             f"({self.plan.failure_budget})", code)

    # -- one node ------------------------------------------------------------------------------
    def start(self, names: list[str]) -> None:
        """Mark these nodes running in one save, then start their threads: no step runs
        before its node's record says so durably."""
        nodes = self.state["nodes"]
        before = {n: dict(nodes[n]) for n in names}

        def begin():
            for n in names:
                rec = nodes[n]
                if rec["phase"] == "pending":
                    obs = self.obs.get(n)
                    rec.update(phase="running", startedAt=_now(),
                               wasUnschedulable=bool(obs.unschedulable) if obs else False)
                if self.cordons and not rec.get("cordonId"):
                    rec["cordonId"] = uuid.uuid4().hex  # saved before the cordon that writes it
                rec["attempts"] += 1
        try:
            self.transition(begin, names)
        except KatactlError as e:  # none of them started: leave them as they were, and stop
            with self.lock:
                for n in names:
                    nodes[n].clear()
                    nodes[n].update(before[n])
                self._dirty.update(names)
            self.out_nodes.difference_update(names)
            self.stopping = (f"cannot save the rollout state: {e.message}", int(e.exit_code))
            return
        for n in names:
            t = threading.Thread(target=self._node_thread, args=(n,), name=f"katactl-rollout-{n}", daemon=True)
            self.threads[n] = t
            t.start()

    def _take_api(self):
        """A client of the node thread's own (None without the API), kept for the next node:
        threads sharing one connection pool queue for its 16 connections, and httpcore's pool
        can close a connection under a request another thread was just given (the request
        then hangs for its whole timeout: encode/httpcore#1110)."""
        if self.api is None:
            return None
        with self._apis_lock:
            if self._free_apis:
                return self._free_apis.pop()
        c = self._new_api()
        with self._apis_lock:
            self._apis.append(c)
        return c

    def _new_api(self):
        """A client like the engine's, with its own connection pool."""
        from katactl.backends.kube import KubeAPI

        a = self.api
        return KubeAPI(a.host, a.headers, a.tls, a.timeout, user=a.user, namespace=a.namespace)

    def _node_thread(self, n: str) -> None:
        api = self._take_api()
        try:
            self.run_node(n, api)
        except BaseException as e:  # noqa: BLE001 - a node's failure is data
            err = as_katactl_error(e) if not isinstance(e, KeyboardInterrupt) else Interrupted("interrupted")
            if not (self.stop.is_set() and isinstance(err, Interrupted)):
                rec = self.state["nodes"][n]
                try:
                    self.transition(lambda: rec.update(phase="failed", error=err.message,
                                                       exitCode=int(err.exit_code), finishedAt=_now()), (n,))
                except Exception:  # noqa: BLE001
                    pass
                self.ev("NodeFailed", node=n, error=err.to_dict())
        finally:
            if api is not None:
                with self._apis_lock:
                    self._free_apis.append(api)
            self.out_nodes.discard(n)
            self.obs_dirty = True
            self.wake.set()

    def run_node(self, n: str, api=None) -> None:
        """A started node (marked running by start()) through its steps, soak and end."""
        st, pol = self.state, self.plan.policy
        rec = st["nodes"][n]
        self._mark(n, rec)
        if rec["phase"] == "running":
            failure = self._steps(n, rec, api)
            if failure == "interrupted":
                return
            if failure == "aborted":
                self.transition(lambda: rec.update(phase="aborted", finishedAt=_now()), (n,))
                self.restore_or_record(n, rec, api)
                self._mark(n, rec)
                return
            if failure is not None:
                self.transition(lambda: rec.update(phase="failed", error=failure.message,
                                                   exitCode=int(failure.exit_code), finishedAt=_now()), (n,))
                self.restore_or_record(n, rec, api)
                self._mark(n, rec)
                self.ev("NodeFailed", node=n, error=failure.to_dict())
                return
            why = self.restore(n, rec, api)
            if why is not None:
                if self.hurry.is_set():
                    return  # interrupted: still running, its restore is tried again on resume
                msg = f"its steps finished, but {why}"
                self.transition(lambda: rec.update(phase="failed", error=msg, exitCode=int(ExitCode.FAILED),
                                                   leftCordoned=why, restoreOnly=True, finishedAt=_now()), (n,))
                self._mark(n, rec)
                self.ev("NodeFailed", node=n, error=OperationFailed(msg).to_dict(), leftCordoned=True)
                return
            if pol.soak:
                self.transition(lambda: rec.update(phase="soaking", soakStartedAt=time.time(), soakedSeconds=0.0),
                                (n,))
                self._mark(n, rec)
        self.out_nodes.discard(n)
        self.obs_dirty = True
        self.wake.set()
        if rec["phase"] == "soaking":
            # the soak is measured as elapsed seconds (monotonic, saved as it goes): a resume on a
            # machine whose clock is ahead or behind neither skips nor stretches it
            soaked = rec.get("soakedSeconds")
            if not isinstance(soaked, (int, float)):  # (a state saved before soakedSeconds)
                soaked = time.time() - (rec.get("soakStartedAt") or time.time())
            left = min(pol.soak, max(0.0, pol.soak - soaked))
            self.ev("NodeSoaking", node=n, seconds=round(left, 1))
            start, end = self.clock(), self.clock() + left
            saved = start
            while self.clock() < end:
                if self.stop.wait(min(0.5, end - self.clock())):
                    self._soaked(n, rec, pol.soak - left + self.clock() - start)
                    return  # interrupted: soak the rest on resume
                if self.aborting:
                    return  # a soak is no step: abort does not wait for it (finish() marks it aborted)
                if self.clock() - saved >= SOAK_SAVE_EVERY:
                    saved = self.clock()
                    self._soaked(n, rec, pol.soak - left + saved - start)
            if api is not None:
                try:
                    res = run_check(api, n, self._fail_on())
                except KatactlError as e:
                    msg, code = f"after soak: {e.message}", int(e.exit_code)
                    self.transition(lambda: rec.update(phase="failed", error=msg, exitCode=code, finishedAt=_now()),
                                    (n,))
                    self._mark(n, rec)
                    self.ev("NodeFailed", node=n, error=e.to_dict(), afterSoak=True)
                    return
                self.ev("NodeSoaked", node=n, message=res["message"])
        if rec["phase"] != "done":  # (else the last step's save said so)
            self.transition(lambda: rec.update(phase="done", finishedAt=_now(), error=None), (n,))
        self._mark(n, rec)
        self.ev("NodeFinished", node=n, attempts=rec["attempts"])

    def _soaked(self, n: str, rec: dict, seconds: float) -> None:
        """Save how long the node has soaked (a kill loses at most SOAK_SAVE_EVERY of it)."""
        try:
            self.transition(lambda: rec.update(soakedSeconds=round(seconds, 1)), (n,))
        except KatactlError as e:  # the soak goes on; resume soaks a little longer
            self.ev("Warning", node=n, message=f"cannot save the soak's progress: {e.message}")

    def _fail_on(self) -> str:
        for s in self.plan.steps:
            if s.name == "check":
                return s.args.fail_on
        return DEFAULT_FAIL_ON

    def _steps(self, n: str, rec: dict, api):
        """Run the node's remaining steps. Returns None (all done), a KatactlError (failed),
        "aborted" or "interrupted"."""
        pol = self.plan.policy
        failure = None
        ctx = StepContext(node=n, api=api, settings=self.settings, rollout=self.plan.name, stop=self.stop,
                          events=lambda kind, **d: self.ev(kind, **d), timeout=pol.step_timeout,
                          cordon_id=rec.get("cordonId"))
        while rec["step"] < len(self.plan.steps):
            i = rec["step"]
            if self.stop.is_set():
                return "aborted" if self.aborting else "interrupted"
            if self.aborting:
                return "aborted"
            step = self.plan.steps[i]
            self.ev("NodeStepStarted", node=n, step=i + 1, steps=len(self.plan.steps), text=step.text)
            t0 = time.monotonic()
            err = None
            try:
                res = step.run(ctx)
            except KeyboardInterrupt:
                self.stop.set()
                return "interrupted"
            except Exception as e:  # noqa: BLE001 - a step's failure is the node's
                err = as_katactl_error(e)
                res = None
            if err is not None and self.stop.is_set() and isinstance(err, Interrupted):
                return "aborted" if self.aborting else "interrupted"
            self.hook.hit("step")
            took = round(time.monotonic() - t0, 3)
            result = {"step": i + 1, "text": step.text, "ok": err is None, "seconds": took, "at": _now()}
            if err is None:
                result.update(changed=bool(res.get("changed")), message=res.get("message"))
            else:
                result.update(error=err.message, exitCode=int(err.exit_code))

            # the last step done and nothing to do before the node counts as done (no cordon to
            # restore, no soak): one save records both
            finished = err is None and failure is None and i + 1 == len(self.plan.steps) \
                and not self.cordons and not pol.soak

            found = res.get("wasUnschedulable") if res and step.definition.cordons else None

            def record(result=result, advance=err is None or pol.on_failure == "continue", i=i, finished=finished,
                       found=found):
                rec["results"] = (rec["results"] + [result])[-20:]
                if found is not None:  # what the cordon itself found (the node may have changed since start)
                    rec["wasUnschedulable"] = bool(found)
                if advance:
                    rec["step"] = i + 1
                if finished:
                    rec.update(phase="done", finishedAt=_now(), error=None)
            self.transition(record, (n,))
            self.ev("NodeStepFinished", node=n, step=i + 1, text=step.text,
                    result="ok" if err is None else "failed", **{k: v for k, v in result.items()
                                                                  if k in ("changed", "message", "error",
                                                                           "exitCode", "seconds")})
            audit.record("rollout.step", n, node=n, params={"rollout": self.plan.name, "step": step.text},
                         result="ok" if err is None else "error", changed=bool(res and res.get("changed")),
                         **({"error": err.message} if err else {}))
            if err is not None:
                failure = failure or err
                if pol.on_failure != "continue":
                    return failure
        return failure

    @staticmethod
    def ours(node: dict, rec: dict) -> bool:
        """Whether the node's cordon record (katactl/nodes.py cordon) is the one this rollout's
        cordon wrote: its ``id`` is the node's ``cordonId``, and ``wasUnschedulable`` false (it
        was schedulable when we cordoned it). A state without a cordonId names no record."""
        from katactl import nodes

        rec_c = nodes.cordon_record(node) or {}
        # and the server does not say someone else set spec.unschedulable since (a kubectl
        # uncordon + cordon leaves our record on the node)
        return bool(rec.get("cordonId")) and rec_c.get("id") == rec["cordonId"] \
            and rec_c.get("wasUnschedulable") is False and nodes.unschedulable_set_by_katactl(node) is not False

    @staticmethod
    def _legacy(node: dict, rec: dict) -> bool:
        """A node of a state saved before cordon ids that carries a katactl cordon record made
        while it was schedulable: maybe ours, maybe not; restore() leaves it, saying so."""
        from katactl import nodes

        rec_c = nodes.cordon_record(node) or {}
        return not rec.get("cordonId") and rec_c.get("wasUnschedulable") is False

    def restore(self, n: str, rec: dict, api=None, *, until: float | None = None) -> str | None:
        """Uncordon the node if this rollout cordoned it (its record says so, and the
        rollout found it schedulable); never a node that was unschedulable before the
        rollout touched it. A plan without a step that cordons (cordon, drain,
        recycle-stale) cordoned nothing: no request then. A failing uncordon is tried
        again with backoff until ``until`` (monotonic; default: --step-timeout, else
        RESTORE_WINDOW from now) or Ctrl-C. Returns None when the node is as it should
        be, else why it is left cordoned."""
        api = api or self.api
        # decided from the node's cordon record, not from ``wasUnschedulable``: that is what was
        # observed when the node started, and the node may have been uncordoned since (before our
        # cordon found it schedulable and cordoned it)
        if api is None or not self.cordons:
            return None
        if until is None:
            until = time.monotonic() + (self.plan.policy.step_timeout or RESTORE_WINDOW)
        delay = 0.5
        while True:
            try:
                self._restore_once(n, rec, api)
                return None
            except KatactlError as e:
                err = e
            if self.hurry.is_set() or time.monotonic() + delay > until:
                break
            self.ev("Warning", node=n, message=f"cannot uncordon the node yet ({err.message}): "
                                               f"trying again in {delay:g}s")
            if self.hurry.wait(delay):
                break
            delay = min(delay * 2, 8.0)
        return f"left cordoned: the rollout cordoned it and could not uncordon it ({err.message})"

    def _restore_once(self, n: str, rec: dict, api) -> None:
        from katactl import nodes
        from katactl.errors import NotFound

        try:
            node = nodes.get_node(api, n)
        except NotFound:
            return  # gone: nothing to restore
        if not (node.get("spec") or {}).get("unschedulable"):
            rec_c = nodes.cordon_record(node) or {}
            if rec.get("cordonId") and rec_c.get("id") == rec["cordonId"]:
                # our record outlived our cordon (kubectl uncordon keeps it): removed, by its id,
                # so that no later cordon is taken for ours
                nodes.uncordon(api, n, record_id=rec["cordonId"])
            self._restored(n, rec, changed=False)
            return
        if not self.ours(node, rec):
            rec_c = nodes.cordon_record(node) or {}
            if rec.get("cordonId") and rec_c.get("id") == rec["cordonId"] and rec_c.get("wasUnschedulable") is False \
                    or self._taken_over(rec, rec_c):
                self._theirs(n, node)
                self._restored(n, rec, changed=False)
                return
            if (rec.get("cordonId") and rec_c.get("id") == rec["cordonId"]) or \
                    (rec.get("wasUnschedulable") and rec_c.get("wasUnschedulable") is not False):
                # our cordon found it cordoned, or it was when it started and no katactl cordon since
                self._restored(n, rec, changed=False)
                return
            # a record without an id was written by a katactl from before cordon ids (a state of
            # then, resumed: the cordon step run again finds it, under a cordonId of now)
            legacy = not rec.get("cordonId") or (rec_c and "id" not in rec_c and rec_c.get("wasUnschedulable") is False)
            self._kept[n] = "the rollout's state (saved by an older katactl) names no cordon record" if legacy \
                else "cordoned during the rollout, not by it"
            self.ev("Warning", node=n, message=f"{self._kept[n]}: left cordoned ('katactl node uncordon {n}' if the "
                    "rollout cordoned it)" if legacy else f"{self._kept[n]}: left cordoned")
            self._restored(n, rec, changed=False)
            return
        # conditional on our record still being on it: a cordon since is not undone
        r = nodes.uncordon(api, n, record_id=rec["cordonId"])
        if r.get("changed"):
            audit.record("rollout.uncordon", n, node=n, params={"rollout": self.plan.name}, changed=True)
            self.ev("NodeUncordoned", node=n)
        self._restored(n, rec, changed=bool(r.get("changed")))

    def _restored(self, n: str, rec: dict, *, changed: bool) -> None:
        """A node once left cordoned is not any more: a node that failed only for that is done."""
        if not rec.get("leftCordoned"):
            return

        def clear():
            rec.pop("leftCordoned", None)
            if rec.pop("restoreOnly", None) and rec["phase"] == "failed":
                rec.update(phase="done", error=None, exitCode=None)
        self.transition(clear, (n,))
        self._mark(n, rec)

    def restore_or_record(self, n: str, rec: dict, api=None, *, until: float | None = None) -> bool:
        """restore(); a node left cordoned gets why in its record (and an event). True when restored."""
        left = self.restore(n, rec, api, until=until)
        if left is None:
            return True

        def note():
            err, old = rec.get("error") or "", rec.get("leftCordoned")
            rec.update(leftCordoned=left, error=err.replace(old, left) if old and old in err
                       else "; ".join(x for x in (err, left) if x))
        self.transition(note, (n,))
        self.ev("Warning", node=n, message=left)
        return False

    def cordoned_by_us(self) -> dict[str, bool]:
        """The rollout's nodes its cordon record says it cordoned (True), from one node list
        (all nodes: one whose labels changed since may have left the selector); the ones of
        an older state that may be (True: restore() leaves those, saying so); and the
        schedulable ones still carrying this rollout's record (False: restore() removes it)."""
        from katactl import nodes

        if self.api is None or not self.cordons:
            return {}
        names, found = self.state["nodes"], {}
        for page in self.api.list_pages("/api/v1/nodes"):
            for node in page:
                n = node["metadata"]["name"]
                if n not in names:
                    continue
                if (node.get("spec") or {}).get("unschedulable"):
                    if self.ours(node, names[n]) or self._legacy(node, names[n]):
                        found[n] = True
                    elif names[n].get("cordonId") and (c := nodes.cordon_record(node) or {}).get("id") == \
                            names[n]["cordonId"] and c.get("wasUnschedulable") is False:
                        self._theirs(n, node)  # our record, another's cordon since (see ours)
                    elif self._taken_over(names[n], nodes.cordon_record(node) or {}):
                        self._theirs(n, node)
                elif names[n].get("cordonId") and (nodes.cordon_record(node) or {}).get("id") == names[n]["cordonId"]:
                    found[n] = False
        return found

    def would_uncordon(self, skip=()) -> list[str]:
        """The nodes a restore would uncordon now (a dry run's answer): cordoned under this
        rollout's own record (ours()), in a phase but ``skip``. Changes nothing."""
        if self.api is None or not self.cordons:
            return []
        recs = self.state["nodes"]
        return sorted(node["metadata"]["name"] for page in self.api.list_pages("/api/v1/nodes") for node in page
                      if node["metadata"]["name"] in recs and recs[node["metadata"]["name"]]["phase"] not in skip
                      and (node.get("spec") or {}).get("unschedulable")
                      and self.ours(node, recs[node["metadata"]["name"]]))

    @staticmethod
    def _taken_over(rec: dict, rec_c: dict) -> bool:
        """Whether an operator's ``node cordon`` took this rollout's cordon record over (nodes.cordon)."""
        old = rec_c.get("supersedes")
        return bool(rec.get("cordonId")) and isinstance(old, dict) and old.get("id") == rec["cordonId"]

    def _theirs(self, n: str, node: dict) -> None:
        """Say (once) that a node this rollout cordoned is left cordoned: the server says
        another manager set spec.unschedulable since (kubectl uncordon + cordon keeps our
        record), or an operator's node cordon took our record over, so the cordon is theirs
        to undo."""
        from katactl import nodes

        rec_c = nodes.cordon_record(node) or {}
        by = f"{rec_c.get('by')} (katactl node cordon)" if self._taken_over(self.state["nodes"][n], rec_c) \
            else nodes.unschedulable_manager(node)
        self._kept[n] = f"cordoned again since the rollout cordoned it, by {by}"
        if n not in self._theirs_told:
            self._theirs_told.add(n)
            self.ev("Warning", node=n, message=f"{self._kept[n]}: left cordoned (theirs to undo)")

    def restore_all(self, skip=(), among=None) -> list[str]:
        """Uncordon every node of the rollout whose cordon record says this rollout
        cordoned it (``among``: of cordoned_by_us(), already listed), whatever its phase but
        ``skip``; the ones left cordoned get why in their record. Returns those restored."""
        restored = []
        until = time.monotonic() + (self.plan.policy.step_timeout or RESTORE_WINDOW)
        for n in self.cordoned_by_us() if among is None else among:
            rec = self.state["nodes"][n]
            if rec["phase"] in skip:
                continue
            if self.restore_or_record(n, rec, until=until):
                restored.append(n)
        return restored

    def _left_cordoned_blocking(self) -> None:
        """No room for the next node: if nodes the rollout failed to uncordon are what
        holds it back, say so (once each) and try them again every --poll."""
        for n in sorted(self.unavailable()):
            rec = self.state["nodes"].get(n)
            if rec and n in self._kept and n not in self.out_nodes and not rec.get("leftCordoned"):
                # left cordoned by design: it may stay so for good, and the rollout with it
                if n not in self._kept_told:
                    self._kept_told.add(n)
                    self.ev("Warning", node=n, message=f"{self._kept[n]}; left cordoned, it counts as "
                            "unavailable and holds the rollout back until it is uncordoned "
                            f"('katactl node uncordon {n}' if nobody needs it cordoned)")
                continue
            if not rec or not rec.get("leftCordoned") or n in self.out_nodes:
                continue
            last = self._left_tried.get(n)
            if last is None:
                self.ev("Warning", node=n, message=f"{rec['leftCordoned']}: it counts as unavailable and holds "
                                                   f"the rollout back; trying again every {self.plan.policy.poll:g}s "
                                                   f"('katactl node uncordon {n}' lets the rollout go on)")
            elif time.monotonic() - last < self.plan.policy.poll:
                continue
            self._left_tried[n] = time.monotonic()
            if self.restore(n, rec, until=time.monotonic()) is None:
                self.obs_dirty = True
                self.wake.set()

    def _mark(self, n: str, rec: dict) -> None:
        """Queue the node's progress label/annotation for the marker threads: they are
        for people (kubectl get nodes -L), the state is what resume reads, so they are
        not worth a round trip on the node's path. A label waits MARK_DELAY before it is
        written, and one replaced by a newer phase meanwhile is never written (a node
        whose steps take less than that gets one label, not two)."""
        info = {"phase": rec["phase"], "step": rec["step"], "steps": len(self.plan.steps),
                "batch": rec["batch"] + 1, "at": _now()}
        with self._marks_cv:
            # a replaced label keeps its place and time: the queue stays in time order
            due = self._marks[n][1] if n in self._marks else time.monotonic() + MARK_DELAY
            self._marks[n] = (info, due)
            if len(self._markers) < min(MARKERS, len(self._marks) + len(self._marking)):
                t = threading.Thread(target=self._mark_loop, name="katactl-rollout-marks", daemon=True)
                self._markers.append(t)
                t.start()
            self._marks_cv.notify_all()

    def _mark_loop(self) -> None:
        while True:
            with self._marks_cv:
                # one writer per node at a time, so its labels are written in order
                while True:
                    n = next((m for m in self._marks if m not in self._marking), None)
                    if n is None:
                        if self._done.is_set():
                            return  # the run is over and nothing is queued
                        self._marks_cv.wait()
                        continue
                    wait = self._marks[n][1] - time.monotonic()
                    if wait <= 0 or self._flushing:
                        break
                    self._marks_cv.wait(wait)
                info = self._marks.pop(n)[0]
                self._marking.add(n)
            try:
                self.store.mark_node(n, self.plan.name, info)
            except KatactlError as e:
                self.ev("Warning", node=n, message=f"cannot record progress on the node: {e.message}")
            finally:
                with self._marks_cv:
                    self._marking.discard(n)
                    self._marks_cv.notify_all()

    def flush_marks(self, timeout: float = 30.0) -> None:
        """Wait until every queued progress label is written (at most ``timeout``: they
        are not worth holding up the end of a run whose API went away)."""
        end = time.monotonic() + timeout
        with self._marks_cv:
            self._flushing = True
            self._marks_cv.notify_all()
            while (self._marks or self._marking) and time.monotonic() < end:
                self._marks_cv.wait(max(0.0, end - time.monotonic()))
            self._flushing = False

    # -- the end -----------------------------------------------------------------------------
    def abort_all(self) -> None:
        """Abort with nothing running: mark unfinished nodes aborted, restore every node
        the rollout cordoned, whatever its phase."""
        for n, rec in self.state["nodes"].items():
            if rec["phase"] in NODE_ACTIVE:
                self.transition(lambda rec=rec: rec.update(phase="aborted", finishedAt=_now()), (n,))
                self._mark(n, rec)
        self.restore_all()

    def left_cordoned(self) -> list[str]:
        return sorted(n for n, r in self.state["nodes"].items() if r.get("leftCordoned"))

    def finish(self) -> dict:
        st = self.state
        counts = collections.Counter(r["phase"] for r in st["nodes"].values())
        if self.aborting:
            self.abort_all()
            phase, reason, code = "Aborted", "aborted by 'katactl rollout abort'", 0
            left = self.left_cordoned()
            if left:
                reason += (f"; could not uncordon {', '.join(left)}: 'katactl rollout abort "
                           f"{self.plan.name}' again tries again")
                code = int(ExitCode.FAILED)
        elif self.stopping:
            phase, (reason, code) = "Stopped", self.stopping
        elif self.pausing:
            phase, reason, code = "Paused", self.pausing, 0
        elif counts.get("failed"):
            phase, reason, code = "CompletedWithFailures", f"{counts['failed']} node(s) failed", int(ExitCode.PARTIAL)
        else:
            phase, reason, code = "Succeeded", None, 0
        left = self.left_cordoned()
        if left and phase != "Aborted":
            # not finished while a node it cordoned stays cordoned: resume tries them again
            if phase in FINAL:
                phase, reason, code = "Stopped", None, int(ExitCode.FAILED)
            reason = (f"{reason}; " if reason else "") + (
                f"left cordoned (the uncordon failed): {', '.join(left)}: 'katactl rollout resume "
                f"{self.plan.name}' tries again")
        self.transition(lambda: st.update(phase=phase, reason=reason, exitCode=code,
                                          finishedAt=_now() if phase in FINAL else None), ())
        # (each kind spelled out: tests/test_rollout_commands.py checks them against docs/rollout.md)
        self.ev("RolloutPaused" if phase == "Paused" else "RolloutFinished", phase=phase, reason=reason,
                counts=dict(collections.Counter(r["phase"] for r in st["nodes"].values())))
        audit.record("rollout.run", self.plan.name, params={"rollout": self.plan.name}, result=phase,
                     changed=True, reason=reason)
        self.flush_marks()
        return summary(st)


def summary(st: dict) -> dict:
    """The ``kind: Rollout`` view of a state."""
    counts = collections.Counter(r["phase"] for r in st["nodes"].values())
    plan = st.get("plan") or {}
    nodes = []
    for name, r in st["nodes"].items():
        last = r["results"][-1] if r.get("results") else None
        nodes.append({"name": name, "phase": r["phase"], "batch": r["batch"] + 1, "step": r["step"],
                      "steps": len(plan.get("steps") or []), "attempts": r["attempts"],
                      "wasUnschedulable": r.get("wasUnschedulable"), "error": r.get("error"),
                      "leftCordoned": r.get("leftCordoned"),
                      "lastStep": last, "startedAt": r.get("startedAt"), "finishedAt": r.get("finishedAt")})
    nodes.sort(key=lambda x: (x["batch"], x["name"]))
    return {"name": st["name"], "phase": st["phase"], "reason": st.get("reason"),
            "backend": plan.get("backend"), "batch": min(st.get("batch", 0) + 1, len(plan.get("batches") or [])),
            "batches": len(plan.get("batches") or []), "maxUnavailable": plan.get("maxUnavailable"),
            "failureBudget": plan.get("failureBudget"), "steps": plan.get("steps"),
            "counts": {k: counts.get(k, 0) for k in ("pending", "running", "soaking", "done", "failed", "aborted")},
            "gate": st.get("gate") or {"open": True}, "createdAt": st.get("createdAt"),
            "updatedAt": st.get("updatedAt"), "finishedAt": st.get("finishedAt"),
            "elapsedSeconds": _elapsed(st),
            "exitCode": st.get("exitCode"), "nodes": nodes}


def _elapsed(st: dict) -> float:
    """Seconds from the start to the end (finishedAt) of a finished rollout, else to now."""
    import datetime

    if not isinstance(st.get("startedAt"), (int, float)):
        return 0.0
    end = time.time()
    try:
        if st.get("finishedAt"):
            end = datetime.datetime.fromisoformat(st["finishedAt"]).timestamp()
    except (TypeError, ValueError):  # (a hand-edited time: counted to now, as before)
        pass
    return round(max(0.0, end - st["startedAt"]), 1)


def _interrupt_plugins() -> None:
    """Kill the exec credential plugins the node threads wait on (a refresh in a drain's
    worker): a plugin hung on a browser login would hold the interrupt for --request-timeout,
    and the restores after it would run it again."""
    from katactl.backends.kube import interrupt_exec_plugins

    interrupt_exec_plugins()
