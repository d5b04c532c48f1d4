"""katactl rollout plan | run | status | list | pause | resume | abort."""
from __future__ import annotations

from typing import List, Optional

import typer

from katactl.commands._common import finish, new_app, state

app = new_app("Rolling node operations: batches, soak, failure budget, alert gate, windows, a cluster lock, "
              "crash-safe resume.")

NAME_ARG = typer.Argument(..., metavar="NAME", help="Rollout name (lowercase letters, digits, '-').")
STATE_HELP = ("Where the lock and state live: kube (Lease + ConfigMap in --lock-namespace), file (the XDG "
              "state dir, for SSH-only fleets) or auto (kube when a step or -l needs the Kubernetes API).")


def _policy_options():
    return dict(
        max_unavailable=typer.Option(None, "--max-unavailable", metavar="N|P%",
                                     help="Nodes out of service at once, counting nodes already unschedulable "
                                          "or NotReady (default 1)."),
        canary=typer.Option(None, "--canary", metavar="N",
                            help="Run the first N nodes alone, then stop for 'rollout resume' (or --canary-soak)."),
        canary_soak=typer.Option(None, "--canary-soak", metavar="DURATION",
                                 help="After the canary, wait this long and go on instead of stopping."),
        batch_growth=typer.Option(None, "--batch-growth/--no-batch-growth",
                                  help="Batches of 1, 2, 4, ... up to --max-unavailable."),
        soak=typer.Option(None, "--soak", metavar="DURATION",
                          help="After a node's steps, wait, then (with --state kube) run node check before "
                               "it counts as done."),
        failure_budget=typer.Option(None, "--failure-budget", metavar="N|P%",
                                    help="Stop the rollout when more nodes than this failed (default 0)."),
        on_failure=typer.Option(None, "--on-failure", metavar="stop|skip|continue",
                                help="A failed step: stop the rollout, skip the node's other steps, or continue "
                                     "with them (default stop; skip when --failure-budget > 0)."),
        window=typer.Option(None, "--window", metavar="'DAYS HH:MM-HH:MM [TZ]'",
                            help="Start nodes only inside this maintenance window (repeatable)."),
        alert_gate=typer.Option(None, "--alert-gate", metavar="URL",
                                help="Alertmanager: start no node while a matching alert fires (API v2)."),
        alert_filter=typer.Option(None, "--alert-filter", metavar="MATCHER",
                                  help="Alertmanager matcher such as severity=critical (repeatable, all must match)."),
        spread_by=typer.Option(None, "--spread-by", metavar="LABEL",
                               help="A batch takes at most its share of each value of this node label "
                                    "(default topology.kubernetes.io/zone; '' for none)."),
        step_timeout=typer.Option(None, "--step-timeout", metavar="DURATION",
                                  help="Deadline of a drain step without its own --timeout (0: none); also "
                                       "how long a failing uncordon of a node the rollout cordoned is retried "
                                       "(default 1m)."),
        gate_timeout=typer.Option(None, "--gate-timeout", metavar="DURATION",
                                  help="Stop (exit 6) when the gate stays closed this long (default 0: wait)."),
        poll=typer.Option(None, "--poll", metavar="DURATION",
                          help="How often the gate and pause/abort requests are re-checked (default 5s)."),
    )


_P = _policy_options()


def _merge_plan_input(app_ctx, plan_file, steps, opts: dict) -> dict:
    """The plan file's fields, overridden by the flags given."""
    from katactl.rollout import plan as plan_mod

    d = plan_mod.load_file(plan_file) if plan_file else {"policy": {}}
    pol = dict(d.get("policy") or {})
    keymap = {"max_unavailable": "maxUnavailable", "canary": "canary", "canary_soak": "canarySoak",
              "batch_growth": "batchGrowth", "soak": "soak", "failure_budget": "failureBudget",
              "on_failure": "onFailure", "window": "windows", "alert_gate": "alertGate",
              "alert_filter": "alertFilters", "spread_by": "spreadBy", "step_timeout": "stepTimeout",
              "gate_timeout": "gateTimeout", "poll": "poll"}
    for k, v in opts.items():
        if v is not None and v != []:
            pol[keymap[k]] = v
    d["policy"] = pol
    if steps:
        d["steps"] = list(steps)
    # a reviewed plan's nodes give way only to a selection typed now: KATACTL_* or the config
    # file's defaults, left from another task, must not silently roll other nodes
    s = app_ctx.settings
    given = [k for k in ("nodes", "nodes_from", "selector") if s.values.get(k)]
    if any(s.sources.get(k) == "flag" for k in given):
        d["nodes"], d["nodesFrom"], d["selector"] = None, None, None
    elif given and any(d.get(k) for k in ("nodes", "nodesFrom", "selector")):
        from katactl.errors import UsageError

        k = given[0]
        raise UsageError(f"-f {plan_file} selects the nodes, and so does {k} from {s.sources[k]}: only -N, "
                         f"--nodes-from or -l typed on the command line override a plan file's selection",
                         hint=f"unset it ({s.sources[k]}), or type the selection on the command line")
    return d


def _build_plan(app_ctx, name: str | None, d: dict, lock_namespace, lock_ttl, backend_opt):
    """(Plan, api or None)."""
    import dataclasses

    from katactl.backends import kube
    from katactl.errors import Refused, UsageError
    from katactl.fleet import select_nodes
    from katactl.rollout import plan as plan_mod
    from katactl.rollout.policy import Policy, check_canary

    if d.get("name") and name and d["name"] != name:
        raise UsageError(f"the rollout is named {name!r} but the plan file says name: {d['name']!r}")
    name = plan_mod.check_name(name or d.get("name"))
    steps = plan_mod.parse_steps(d.get("steps") or [])
    plan_mod.check_uncordon_steps(steps)
    policy = Policy.from_dict(d.get("policy") or {})
    backend = backend_opt or d.get("stateBackend") or "auto"
    if backend not in plan_mod.BACKENDS:
        raise UsageError(f"invalid --state {backend!r}: choose from {', '.join(plan_mod.BACKENDS)}")
    lock_ns = lock_namespace or d.get("lockNamespace") or "kube-system"
    kube.seg(lock_ns)
    ttl = plan_mod.lock_ttl(lock_ttl, d.get("lockTTL"))
    settings = app_ctx.settings
    selector = settings.selector or d.get("selector")
    if d.get("nodes") or d.get("nodesFrom"):
        vals = dict(settings.values)
        vals.update(nodes=tuple(d.get("nodes") or ()), nodes_from=d.get("nodesFrom"), selector=None)
        settings_names = dataclasses.replace(settings, values=vals)
    else:
        vals = dict(settings.values)
        vals["selector"] = None
        settings_names = dataclasses.replace(settings, values=vals)
    names = select_nodes(settings_names) if (settings_names.nodes or settings_names.nodes_from) else []
    if names and selector:
        raise UsageError("give the nodes either by name (-N, --nodes-from) or by -l SELECTOR, not both")
    if not names and not selector:
        raise UsageError("select the nodes: -N NAMES, --nodes-from FILE or -l SELECTOR (or nodes/selector in -f)")
    if backend == "auto":
        backend = "kube" if plan_mod.needs_kube(steps) or selector else "file"
    if backend == "file" and plan_mod.needs_kube(steps):
        raise UsageError("--state file is for SSH-only fleets: these steps need the Kubernetes API: "
                         + ", ".join(s.text for s in steps if s.kind == "kube"))
    if backend == "file" and selector:
        raise UsageError("-l SELECTOR needs the Kubernetes API: use --state kube, or -N/--nodes-from")
    api = None
    if backend == "kube":
        api = kube.client(settings)
        for n in names:
            kube.seg(n)
        meta: dict = {}
        infos = plan_mod.node_infos(api, names or None, selector, policy.spread_by, meta)
    else:
        infos = [plan_mod.NodeInfo(n) for n in names]
    check_canary(policy, len(infos))
    p = plan_mod.Plan(name, infos, steps, policy, plan_mod.make_batches(infos, policy), backend, lock_ns, ttl,
                      {"selector": selector, "nodes": names or None})
    if api is not None:
        p.listed_at = meta.get("resourceVersion")
    out_now = [n.name for n in infos if n.out]
    todo = [n.name for n in infos if not n.out]
    if len(out_now) > p.max_unavailable or (out_now and todo and len(out_now) >= p.max_unavailable):
        raise Refused(f"the plan would exceed --max-unavailable {p.max_unavailable} from the start: "
                      f"{len(out_now)} selected node(s) are already unschedulable or NotReady "
                      f"({', '.join(out_now[:10])}{', ...' if len(out_now) > 10 else ''})",
                      hint="raise --max-unavailable, or bring those nodes back first")
    return p, api


def _open_store(app_ctx, plan_or_backend, lock_ns: str = "kube-system", ttl: float = 60.0, api=None):
    from katactl.rollout import store as store_mod

    backend = plan_or_backend if isinstance(plan_or_backend, str) else plan_or_backend.backend
    store: store_mod.Store
    if backend == "file":
        store = store_mod.FileStore()
    else:
        from katactl.backends import kube

        store = store_mod.KubeStore(api or kube.client(app_ctx.settings), lock_ns, ttl)
        store.on_wait = app_ctx.out.info
    store.on_warning = app_ctx.out.warn
    return store


def _find_store(app_ctx, name: str | None, backend: str, lock_ns: str):
    """The store that holds rollout NAME (auto: a local state file, else the cluster)."""
    import os

    from katactl.errors import UsageError
    from katactl.rollout import store as store_mod

    if backend not in ("auto", "kube", "file"):
        raise UsageError(f"invalid --state {backend!r}: choose from auto, kube, file")
    if backend == "auto":
        fs = store_mod.FileStore()
        backend = "file" if name and os.path.exists(fs._path(name)) else "kube"
    return _open_store(app_ctx, backend, lock_ns)


def _events(app_ctx, live=None):
    out = app_ctx.out

    def ev(kind: str, **data) -> None:
        out.event(kind, **data)
        if live is not None:
            live.event(kind, data)
            return
        node = data.get("node")
        if kind == "BatchStarted":
            out.info(f"rollout/{data['rollout']}: batch {data['batch']}/{data['batches']}: {', '.join(data['nodes'])}")
        elif kind == "NodeStepFinished" and data.get("result") != "ok":
            out.warn(f"node/{node}: step {data['step']} '{data['text']}' failed: {data.get('error')}")
        elif kind == "NodeStepFinished":
            out.debug(f"node/{node}: step {data['step']} '{data['text']}': {data.get('message')}")
        elif kind == "NodeFinished":
            out.info(f"node/{node}: done")
        elif kind == "NodeFailed":
            out.warn(f"node/{node}: failed: {data['error']['message']}")
        elif kind == "NodeUncordoned":
            out.info(f"node/{node}: uncordoned (the rollout had cordoned it)")
        elif kind == "NodeSoaking":
            out.info(f"node/{node}: soaking {data['seconds']:g}s")
        elif kind == "GateClosed":
            out.warn(f"rollout/{data['rollout']}: gate closed: {data['message']}")
        elif kind == "GateOpened":
            out.info(f"rollout/{data['rollout']}: gate open again")
        elif kind == "Warning":
            out.warn(f"{'node/' + node + ': ' if node else ''}{data['message']}")
        elif kind in ("RolloutPaused", "RolloutFinished"):
            out.info(f"rollout/{data['rollout']}: {data['phase']}{': ' + data['reason'] if data.get('reason') else ''}")
    return ev


class LiveView:
    """The TTY view: batch, gate, counts, and the nodes in progress (Rich, on stderr)."""

    def __init__(self, out, name: str, total: int):
        self.out, self.name, self.total = out, name, total
        self.phase: dict[str, str] = {}
        self.batch = "-"
        self.gate = "open"
        import time

        self.t0 = time.monotonic()

    def __enter__(self):
        from rich.console import Console
        from rich.live import Live

        self._live = Live(get_renderable=self.render, console=Console(file=self.out.stderr), transient=True,
                          refresh_per_second=4)
        self._live.__enter__()
        return self

    def __exit__(self, *exc):
        return self._live.__exit__(*exc)

    def event(self, kind: str, data: dict) -> None:
        n: str = data.get("node") or ""  # the Node* events always name their node
        if kind == "BatchStarted":
            self.batch = f"{data['batch']}/{data['batches']}"
        elif kind == "NodeStepStarted":
            self.phase[n] = f"step {data['step']}/{data['steps']}: {data['text']}"
        elif kind == "NodeSoaking":
            self.phase[n] = "soaking"
        elif kind == "NodeFinished":
            self.phase[n] = "done"
        elif kind == "NodeFailed":
            self.phase[n] = "FAILED: " + data["error"]["message"][:60]
        elif kind == "GateClosed":
            self.gate = f"CLOSED ({data['message']})"
        elif kind == "GateOpened":
            self.gate = "open"

    def render(self):
        import time

        from rich.table import Table
        from rich.text import Text

        from katactl.values import format_duration

        done = sum(1 for v in self.phase.values() if v == "done")
        failed = sum(1 for v in self.phase.values() if v.startswith("FAILED"))
        t = Table(title=Text(f"rollout {self.name}  batch {self.batch}  {done}/{self.total} done, {failed} failed  "
                             f"elapsed {format_duration(time.monotonic() - self.t0)}  gate {self.gate}"),
                  show_edge=False, title_justify="left")
        t.add_column("NODE")
        t.add_column("PHASE")
        active = [(k, v) for k, v in self.phase.items() if v != "done"][-20:]
        for k, v in active:
            t.add_row(Text(k), Text(v))
        return t


def _run_engine(app_ctx, plan, store, state, api) -> None:
    from katactl.rollout.engine import Engine

    out = app_ctx.out
    live = LiveView(out, plan.name, len(plan.nodes)) if (out.stderr_tty and out.human and not out.quiet) else None
    # SIGTERM/SIGHUP arrive as Ctrl-C (cli.py): the engine's Ctrl-C path
    engine = Engine(plan, store, state, api=api, settings=app_ctx.settings, events=_events(app_ctx, live))
    if live:
        with live:
            summ = engine.run()
    else:
        summ = engine.run()
    _render_summary(app_ctx, summ, changed=True)


def _render_summary(app_ctx, summ: dict, *, changed: bool | None, dry_run: bool = False) -> None:
    from katactl.output import Column, Result

    items = summ.pop("nodes")
    cols = [Column("NODE", "name"), Column("BATCH", "batch"), Column("PHASE", "phase"),
            Column("STEP", lambda i: f"{i['step']}/{i['steps']}"), Column("ATTEMPTS", "attempts", wide=True),
            Column("WAS-CORDONED", "wasUnschedulable", wide=True), Column("ERROR", "error")]
    c = summ["counts"]
    line = (f"rollout {summ['name']}: {summ['phase']}{' (' + summ['reason'] + ')' if summ.get('reason') else ''}; "
            f"{c['done']} done, {c['failed']} failed, {c['pending']} pending")
    finish(app_ctx, Result(kind="Rollout", items=items, item=summ, columns=cols, changed=changed, dry_run=dry_run,
                           summary=line), summ.get("exitCode") or 0)


def _plan_result(app_ctx, p, *, dry_run: bool) -> None:
    from katactl.output import Column, Result

    rows = p.describe_nodes()
    meta = {"name": p.name, "backend": p.backend, "nodes": len(p.nodes), "batches": p.batches,
            "maxUnavailable": p.max_unavailable, "failureBudget": p.failure_budget,
            "alreadyUnavailable": [n.name for n in p.nodes if n.out],
            "steps": [s.text for s in p.steps], "policy": p.policy.to_dict(),
            "lock": f"Lease {p.lock_namespace}/katactl-rollout" if p.backend == "kube" else "file"}
    cols = [Column("NODE", "name"), Column("BATCH", "batch"), Column("ZONE", "zone"),
            Column("NOW", lambda i: ("unschedulable" if i["unschedulable"] else "schedulable")
                   + ("" if i["ready"] else ",NotReady")),
            Column("STEPS", lambda i: " ; ".join(i["steps"]))]
    summary = (f"rollout {p.name}: {len(p.nodes)} node(s) in {len(p.batches)} batch(es), at most "
               f"{p.max_unavailable} out of service at once, failure budget {p.failure_budget}")
    finish(app_ctx, Result(kind="RolloutPlan", items=rows, item=meta, columns=cols, summary=summary,
                           changed=False if dry_run else None, dry_run=True if dry_run else None))


@app.command("plan")
def plan_cmd(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, metavar="NAME", help="Rollout name (or name: in -f)."),
    plan_file: Optional[str] = typer.Option(None, "-f", "--filename", metavar="FILE",
                                            help="Plan file (YAML or JSON; see docs/rollout.md)."),
    step: Optional[List[str]] = typer.Option(None, "--step", "-s", metavar="STEP",
                                             help="A step, as typed (repeatable, run in order)."),
    lock_namespace: Optional[str] = typer.Option(None, "--lock-namespace", metavar="NAMESPACE",
                                                 help="Namespace of the Lease and state ConfigMap (default kube-system)."),
    lock_ttl: Optional[str] = typer.Option(None, "--lock-ttl", metavar="DURATION",
                                           help="Lease duration; renewed every third of it (default 60s)."),
    state_backend: Optional[str] = typer.Option(None, "--state", metavar="auto|kube|file", help=STATE_HELP),
    max_unavailable: Optional[str] = _P["max_unavailable"], canary: Optional[int] = _P["canary"],
    canary_soak: Optional[str] = _P["canary_soak"], batch_growth: Optional[bool] = _P["batch_growth"],
    soak: Optional[str] = _P["soak"], failure_budget: Optional[str] = _P["failure_budget"],
    on_failure: Optional[str] = _P["on_failure"], window: Optional[List[str]] = _P["window"],
    alert_gate: Optional[str] = _P["alert_gate"], alert_filter: Optional[List[str]] = _P["alert_filter"],
    spread_by: Optional[str] = _P["spread_by"], step_timeout: Optional[str] = _P["step_timeout"],
    gate_timeout: Optional[str] = _P["gate_timeout"], poll: Optional[str] = _P["poll"],
) -> None:
    """Compute and print the batches, their order, and each node's steps; change nothing.

    Steps: built-in cordon, uncordon, drain [drain flags], recycle-stale,
    check [--fail-on SEV], wait-ready [TIMEOUT]; node-local katactl commands as
    typed (upgrade stage|switch|rollback|gc, audit, vmcore collect), run
    through the library over the node's transport (SSH), never a shell.

    \b
    Examples:
      katactl rollout plan kata-3-10 -l pool=batch --max-unavailable 10% --canary 1 \\
          --step cordon --step 'upgrade switch 3.10.0' --step uncordon
      katactl rollout plan -f kata-3.10.yaml -o json
    """
    app_ctx = state(ctx)
    d = _merge_plan_input(app_ctx, plan_file, step, {k: v for k, v in locals().items() if k in _P})
    p, api = _build_plan(app_ctx, name, d, lock_namespace, lock_ttl, state_backend)
    if api is not None:
        api.close()
    _plan_result(app_ctx, p, dry_run=False)


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, metavar="NAME", help="Rollout name (or name: in -f)."),
    plan_file: Optional[str] = typer.Option(None, "-f", "--filename", metavar="FILE",
                                            help="Plan file (YAML or JSON; see docs/rollout.md)."),
    step: Optional[List[str]] = typer.Option(None, "--step", "-s", metavar="STEP",
                                             help="A step, as typed (repeatable, run in order)."),
    lock_namespace: Optional[str] = typer.Option(None, "--lock-namespace", metavar="NAMESPACE",
                                                 help="Namespace of the Lease and state ConfigMap (default kube-system)."),
    lock_ttl: Optional[str] = typer.Option(None, "--lock-ttl", metavar="DURATION",
                                           help="Lease duration; renewed every third of it (default 60s)."),
    state_backend: Optional[str] = typer.Option(None, "--state", metavar="auto|kube|file", help=STATE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (as 'rollout plan'), or what the run of "
                                 "an existing rollout would answer (refused, or a finished one's no-op); change nothing."),
    max_unavailable: Optional[str] = _P["max_unavailable"], canary: Optional[int] = _P["canary"],
    canary_soak: Optional[str] = _P["canary_soak"], batch_growth: Optional[bool] = _P["batch_growth"],
    soak: Optional[str] = _P["soak"], failure_budget: Optional[str] = _P["failure_budget"],
    on_failure: Optional[str] = _P["on_failure"], window: Optional[List[str]] = _P["window"],
    alert_gate: Optional[str] = _P["alert_gate"], alert_filter: Optional[List[str]] = _P["alert_filter"],
    spread_by: Optional[str] = _P["spread_by"], step_timeout: Optional[str] = _P["step_timeout"],
    gate_timeout: Optional[str] = _P["gate_timeout"], poll: Optional[str] = _P["poll"],
) -> None:
    """Run a rollout: batches of nodes through the steps, under the policy.

    One rollout per cluster at a time (a Lease); the state is saved after
    every transition (a ConfigMap and a node label/annotation, or a local
    state file for SSH-only fleets), so after kill -9 'rollout resume NAME'
    converges. A node the rollout cordoned is uncordoned when its steps end;
    a node already unschedulable is never uncordoned. Re-running a finished
    rollout is a no-op (changed: false).

    Exit codes: 0 all nodes done (or paused: after the canary, or by 'rollout
    pause'); 4 done with failed nodes within the budget; 1 stopped by the
    failure budget or --on-failure stop; 5 refused (lock held, or the plan
    exceeds --max-unavailable from the start); 6 a step or the gate timed
    out; 130 interrupted (state saved, resumable).

    \b
    Examples:
      katactl rollout run kata-3-10 -l pool=batch --max-unavailable 10% --canary 1 --soak 10m \\
          --step 'upgrade stage /srv/kata/kata-static-3.10.0-amd64.tar.zst --sha256 HEX' \\
          --step 'upgrade switch 3.10.0' --step 'recycle-stale --ignore-daemonsets --timeout 10m' \\
          --step 'check --fail-on high' \\
          --alert-gate http://alertmanager:9093 --alert-filter severity=critical \\
          --window 'Mon-Fri 02:00-05:00 Asia/Shanghai' -o jsonl
      katactl rollout run -f kata-3.10.yaml
    """
    from katactl import audit
    from katactl.rollout import engine

    app_ctx = state(ctx)
    d = _merge_plan_input(app_ctx, plan_file, step, {k: v for k, v in locals().items() if k in _P})
    p, api = _build_plan(app_ctx, name, d, lock_namespace, lock_ttl, state_backend)
    if not dry_run:
        audit.require_writable()  # no untraceable change (exit 5 unless --no-audit), before the lock
    store = _open_store(app_ctx, p, p.lock_namespace, p.lock_ttl, api)
    # a read: a dry run answers as the run would (an Ansible check mode predicts its exit
    # code), with no lock taken and nothing written
    existing = store.load(p.name)
    if existing is not None and existing.get("phase") in ("Succeeded", "CompletedWithFailures"):
        _refuse_another_plan(p, existing)
        app_ctx.out.info(f"rollout {p.name} already finished ({existing['phase']}): nothing to do"
                         + (f"; 'katactl rollout resume {p.name} --retry-failed' retries its failed nodes"
                            if existing["phase"] == "CompletedWithFailures" else ""))
        _render_finished(app_ctx, store, existing, dry_run)
        return
    if existing is not None:
        from katactl.errors import Refused

        raise Refused(f"rollout {p.name} already exists (phase {existing.get('phase')})",
                      hint=f"'katactl rollout resume {p.name}' continues it; 'rollout abort {p.name}' ends it")
    if dry_run:
        _plan_result(app_ctx, p, dry_run=True)
        return
    store.acquire(p.name)
    try:
        st = engine.new_state(p)
        from katactl.rollout.store import holder_identity

        st["holder"] = holder_identity(p.name)
        store.create(st)
    except BaseException:
        store.release()
        raise
    audit.record("rollout.start", p.name, params={"steps": [s.text for s in p.steps], "nodes": len(p.nodes),
                                                  "policy": p.policy.to_dict(), "backend": p.backend},
                 changed=True)
    _run_engine(app_ctx, p, store, st, api)


def _release_stale(store, name: str) -> None:
    """A finished rollout whose process died after its last save (before it released the
    lock): take the lock (only possible when its holder is gone) and release it."""
    from katactl.errors import Refused

    from katactl.rollout.store import held_by

    if not held_by(store.lock_holder(), name):
        return
    try:
        store.acquire(name, wait=False)
    except Refused:
        return
    store.release()


def _refuse_another_plan(p, existing: dict) -> None:
    """``rollout run NAME`` again is a no-op only for the same rollout: another plan under a
    finished rollout's name (other steps or nodes) would otherwise be reported done without
    running (exit 5: the name is taken). The policy (pacing, gates, budget) is how the steps
    were run, not what was done: a re-run that only changes it is the same, finished rollout."""
    import json

    from katactl.errors import Refused
    from katactl.output import first_few

    old = existing.get("plan") or {}
    new = json.loads(json.dumps(p.to_dict()))  # as stored: tuples are lists
    differ = ["steps"] if old.get("steps") != new["steps"] else []
    was, now = set(old.get("nodes") or {}), set(new["nodes"])
    if was != now:
        # which ones: a selector re-run (-l pool=x) after the autoscaler changed the pool is
        # another plan too, and the operator must see why
        differ.append("nodes (" + "; ".join(f"{what} {first_few(sorted(ns), 3)}" for what, ns in
                                            (("added", now - was), ("removed", was - now)) if ns) + ")")
    if differ:
        raise Refused(f"rollout {p.name} already finished ({existing.get('phase')}) with other "
                      f"{', '.join(differ)}: this plan was not run",
                      hint="give the new rollout another NAME")



def _render_finished(app_ctx, store, st: dict, dry_run: bool = False) -> None:
    """A rollout that already ended: release a lock its dead process left, and show it
    (changed: false). Succeeded is exit 0; CompletedWithFailures keeps its exit code (4):
    a re-run (an Ansible retry) must not turn failed nodes into success."""
    from katactl.rollout import engine

    if not dry_run:
        _release_stale(store, st["name"])
    summ = engine.summary(st)
    summ["exitCode"] = (summ.get("exitCode") or 4) if st["phase"] == "CompletedWithFailures" else 0
    _render_summary(app_ctx, summ, changed=False, dry_run=dry_run)


DRY_RUN = typer.Option(False, "--dry-run", help="Say what it would do; change nothing.")


def _state_opts():
    return (typer.Option("kube-system", "--lock-namespace", metavar="NAMESPACE",
                         help="Namespace of the Lease and state ConfigMaps."),
            typer.Option("auto", "--state", metavar="auto|kube|file",
                         help="Where to look: auto (a local state file for NAME, else the cluster), kube, file."))


_LNS, _STATE = _state_opts()


def _load(app_ctx, name: str, backend: str, lock_ns: str):
    from katactl.errors import NotFound
    from katactl.rollout.plan import check_name

    check_name(name)
    store = _find_store(app_ctx, name, backend, lock_ns)
    st = store.load(name)
    if st is None:
        raise NotFound(f"no rollout named {name!r} ({'state file' if store.kind == 'file' else 'ConfigMap ' + lock_ns + '/katactl-rollout-' + name})")
    return store, st


@app.command("status")
def status_cmd(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, metavar="[NAME]",
                                         help="Rollout name (default: the one holding the lock, else the latest)."),
    lock_namespace: str = _LNS,
    state_backend: str = _STATE,
) -> None:
    """A rollout's phase, batch, gate, counts and every node's phase and step.

    \b
    Examples:
      katactl rollout status kata-3-10
      katactl rollout status kata-3-10 -o json | jq '.items[] | select(.phase=="failed")'
      kubectl get nodes -L katactl.io/rollout,katactl.io/rollout-phase
    """
    from katactl.errors import NotFound
    from katactl.rollout import engine
    from katactl.rollout.store import held_by, parse_time

    app_ctx = state(ctx)
    if name:
        store, st = _load(app_ctx, name, state_backend, lock_namespace)
        holder = store.lock_holder()
    else:
        found, errors = _list_stores(app_ctx, state_backend, lock_namespace)
        for e in errors:
            app_ctx.out.warn(f"{e['target']}: {e['error']['message']}")
        # the running one (holding its store's lock), else the latest: by time, not by string
        # (updatedAt carries its writer's UTC offset; an unreadable one counts as the oldest)
        cands = [(held_by(h, s["name"]), parse_time(s.get("updatedAt")), s, h) for _, h, sts in found for s in sts]
        if not cands:
            raise NotFound("no rollouts")
        _, _, st, holder = max(cands, key=lambda c: (c[0], c[1] is not None, c[1] or 0.0))
    summ = engine.summary(st)
    summ["lock"] = holder
    summ["exitCode"] = 0
    _render_summary(app_ctx, summ, changed=None)


@app.command("list")
def list_cmd(ctx: typer.Context, lock_namespace: str = _LNS, state_backend: str = _STATE) -> None:
    """Rollouts (with state in the cluster, or in local state files) and their phase.

    \b
    Examples:
      katactl rollout list
      katactl rollout list --state file -o json
    """
    from katactl.output import Column, Result
    from katactl.rollout import engine, store as store_mod

    app_ctx = state(ctx)
    found, errors = _list_stores(app_ctx, state_backend, lock_namespace)
    items = []
    for s, holder, sts in found:
        for st in sts:
            summ = engine.summary(st)
            c = summ["counts"]
            items.append({"name": summ["name"], "state": s.kind, "phase": summ["phase"],
                          "batch": f"{summ['batch']}/{summ['batches']}", "done": c["done"], "failed": c["failed"],
                          "nodes": len(summ["nodes"]), "updatedAt": summ["updatedAt"], "reason": summ["reason"],
                          "locked": store_mod.held_by(holder, summ["name"])})
    cols = [Column("NAME", "name"), Column("PHASE", "phase"), Column("BATCH", "batch"), Column("DONE", "done"),
            Column("FAILED", "failed"), Column("NODES", "nodes"), Column("STATE", "state"),
            Column("LOCKED", "locked"), Column("UPDATED", "updatedAt", wide=True), Column("REASON", "reason", wide=True)]
    finish(app_ctx, Result(kind="RolloutList", items=items, columns=cols, errors=errors), 4 if errors else 0)


def _list_stores(app_ctx, backend: str, lock_ns: str) -> tuple[list, list[dict]]:
    """Every rollout of the stores --state names: ([(store, lock holder, states)], errors).
    auto: the local state files, and the cluster when a kubeconfig is there. A store that
    fails while another answers is an ``errors`` entry (an SSH-only machine with an
    unreachable cluster in its kubeconfig still lists its own rollouts); all failing: the
    first failure."""
    import os

    from katactl.errors import KatactlError, UsageError
    from katactl.rollout import store as store_mod

    if backend not in ("auto", "kube", "file"):
        raise UsageError(f"invalid --state {backend!r}: choose from auto, kube, file")
    kinds = ["file"] if backend in ("auto", "file") else []
    if backend == "kube" or (backend == "auto" and (app_ctx.settings.kubeconfig or os.environ.get("KUBECONFIG")
                                                    or os.path.exists(os.path.expanduser("~/.kube/config")))):
        kinds.append("kube")
    found, errors, first = [], [], None
    for kind in kinds:
        try:
            s = store_mod.FileStore() if kind == "file" else _open_store(app_ctx, "kube", lock_ns)
            found.append((s, s.lock_holder(), s.list()))
        except KatactlError as e:
            first = first or e
            errors.append({"target": "local state files" if kind == "file" else f"ConfigMaps in {lock_ns}",
                           "state": kind, "error": e.to_dict()})
    if first is not None and not found:
        raise first
    return found, errors


@app.command("pause")
def pause_cmd(ctx: typer.Context, name: str = NAME_ARG, lock_namespace: str = _LNS,
              state_backend: str = _STATE, dry_run: bool = DRY_RUN) -> None:
    """Ask a rollout to start no new node; running nodes finish, then it stops (Paused).

    Resume with 'katactl rollout resume NAME'. Idempotent; a finished rollout
    is a no-op (changed: false).

    \b
    Examples:
      katactl rollout pause kata-3-10
    """
    from katactl import audit
    from katactl.output import Result
    from katactl.rollout.store import held_by, holder_identity

    app_ctx = state(ctx)
    store, st = _load(app_ctx, name, state_backend, lock_namespace)
    if st["phase"] in ("Succeeded", "CompletedWithFailures", "Aborted"):
        # it starts no new node, which is what pause asks: already in the requested state
        # (as resume and abort answer a finished rollout); nothing written, no audit entry
        finish(app_ctx, Result.mutation("RolloutPause", {
            "name": name, "changed": False, "dryRun": dry_run, "running": held_by(store.lock_holder(), name),
            "message": f"rollout {name} already finished ({st['phase']}): nothing to pause"}))
        return
    if not dry_run:
        audit.require_writable()
    before = store.control(name)
    changed = not before.get("pause")
    if not dry_run:
        store.set_control(name, {"pause": True, "by": holder_identity(name).rsplit("/", 1)[0]})
    if changed and not dry_run:
        audit.record("rollout.pause", name, params={"rollout": name}, changed=True)
    running = held_by(store.lock_holder(), name)
    msg = ("pause requested: the running rollout starts no new node and stops when its running nodes finish"
           if running else "paused: the rollout is not running; 'rollout resume' continues it")
    if dry_run:
        msg = "dry run: " + (("would ask the running rollout to pause" if running else
                              "would mark the rollout paused (it is not running)") if changed
                             else "a pause is already requested: nothing to do")
    finish(app_ctx, Result.mutation("RolloutPause", {"name": name, "changed": changed, "dryRun": dry_run,
                                                     "running": running, "message": msg}))


@app.command("resume")
def resume_cmd(
    ctx: typer.Context,
    name: str = NAME_ARG,
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run the failed nodes' steps again too."),
    lock_namespace: str = _LNS,
    state_backend: str = _STATE,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the stored plan and say what resuming would do "
                                                          "(nodes to restore and to retry); change nothing."),
) -> None:
    """Continue a rollout that was paused, stopped, interrupted or killed.

    Takes the lock (refused, exit 5, while another process holds it), clears a
    pause request, and goes on from the saved state: finished nodes are not
    redone; a node interrupted mid-step runs that step again. A finished
    rollout is a no-op (changed: false), also with --retry-failed when no
    node failed.

    \b
    Examples:
      katactl rollout resume kata-3-10 --dry-run
      katactl rollout resume kata-3-10 -o jsonl
      katactl rollout resume kata-3-10 --retry-failed
    """
    from katactl import audit
    from katactl.errors import Refused, UsageError
    from katactl.rollout.plan import SHAPE_ERRORS, Plan, shape_error

    app_ctx = state(ctx)
    store, st = _load(app_ctx, name, state_backend, lock_namespace)
    if not dry_run:
        audit.require_writable()  # before the lock
    failed = sorted(n for n, r in st["nodes"].items() if r["phase"] == "failed")
    if st["phase"] in ("Succeeded", "CompletedWithFailures") and not (retry_failed and failed):
        app_ctx.out.info(f"rollout {name} already finished ({st['phase']})"
                         f"{', no failed node to retry' if retry_failed else ''}: nothing to do")
        _render_finished(app_ctx, store, st, dry_run)
        return
    if st["phase"] == "Aborted":
        raise Refused(f"rollout {name} was aborted: start a new rollout (another NAME) instead")
    hint = f"'katactl rollout abort {name}' restores its nodes from their cordon records"
    try:
        plan = Plan.from_dict(st["plan"])
    except UsageError as e:  # a step or value a later katactl refuses: abort still restores
        raise UsageError(f"the stored plan of rollout {name} no longer validates: {e.message}", hint=hint) from None
    except SHAPE_ERRORS as e:  # a field store.check_state does not check
        from katactl.errors import OperationFailed

        raise OperationFailed(f"the stored plan of rollout {name} is not a rollout plan ({shape_error(e)})",
                              hint=hint) from None
    if dry_run:
        _dry_run(app_ctx, plan, store, st, retry=failed if retry_failed else [])
        return
    if store.kind == "kube":
        store.ttl = plan.lock_ttl
    store.acquire(name)
    try:
        st = store.load(name)  # again, under the lock
        store.set_control(name, {"pause": None, "by": None})
        st.setdefault("startedRuns", 1)
        if retry_failed:
            # a failed node was restored (uncordoned) when it failed: pods may be back on it, so
            # its steps start again at the first one that cordons (a cordon or drain again is a no-op
            # on a node still cordoned and drained)
            cordon_at = next((i for i, s in enumerate(plan.steps) if s.definition.cordons), None)
            for rec in st["nodes"].values():
                if rec["phase"] == "failed":
                    rec.update(phase="running", error=None, exitCode=None)
                    if cordon_at is not None:
                        rec["step"] = min(rec["step"], cordon_at)
            first = min((r["batch"] for r in st["nodes"].values() if r["phase"] == "running"), default=st["batch"])
            st["batch"] = min(st["batch"], first)
        api = getattr(store, "api", None)
    except BaseException:
        store.release()
        raise
    audit.record("rollout.resume", name, params={"rollout": name, "retryFailed": retry_failed}, changed=True)
    _run_engine(app_ctx, plan, store, st, api)


@app.command("abort")
def abort_cmd(
    ctx: typer.Context,
    name: str = NAME_ARG,
    now: bool = typer.Option(False, "--now", help="Interrupt running steps (drains stop) instead of letting them finish."),
    timeout: str = typer.Option("10m", "--timeout", metavar="DURATION",
                                help="How long to wait for a running rollout to finish aborting (exit 6)."),
    lock_namespace: str = _LNS,
    state_backend: str = _STATE,
    dry_run: bool = typer.Option(False, "--dry-run", help="List the nodes abort would uncordon (cordoned under "
                                                          "the rollout's own record) and abort; change nothing."),
) -> None:
    """Stop a rollout for good: no new node starts; running steps finish (or stop
    with --now); every node the rollout cordoned is uncordoned; the lock is released.

    When the rollout is running elsewhere, the request is written to its state
    and this waits until it has aborted, or until its lease expires unrenewed (its
    process died elsewhere): abort then takes the lock over. When nothing runs it (killed, paused,
    stopped), abort does the restoring itself, even while another rollout holds
    the cluster lock. Exit 1 when a node it cordoned could not be uncordoned
    (aborting again tries again).

    \b
    Examples:
      katactl rollout abort kata-3-10 --dry-run
      katactl rollout abort kata-3-10
      katactl rollout abort kata-3-10 --now -o json
    """
    import time

    from katactl import audit
    from katactl.errors import TimeoutExpired
    from katactl.rollout import engine
    from katactl.rollout.plan import Plan
    from katactl.rollout.store import held_by, holder_identity
    from katactl.values import parse_duration

    app_ctx = state(ctx)
    wait = parse_duration(timeout, what="--timeout", allow_zero=True)
    store, st = _load(app_ctx, name, state_backend, lock_namespace)
    if st["phase"] in ("Succeeded", "CompletedWithFailures") or (st["phase"] == "Aborted" and not _left(st)):
        _render_finished(app_ctx, store, st, dry_run)
        return
    if dry_run:
        _dry_run(app_ctx, Plan.for_abort(st["plan"], app_ctx.out.warn), store, st, abort=True)
        return
    audit.require_writable()  # before the request and the lock
    store.set_control(name, {"abort": True, "now": now or None, "by": holder_identity(name).rsplit("/", 1)[0]})
    audit.record("rollout.abort", name, params={"rollout": name, "now": now}, changed=True)
    plan = Plan.for_abort(st["plan"], app_ctx.out.warn)
    lock, holder = _abort_lock(store, name)
    if lock == "alive":  # its own process holds the lock: it aborts itself
        app_ctx.out.info(f"rollout {name} is running elsewhere: abort requested, waiting for it")
        end = time.monotonic() + wait if wait else None
        while lock == "alive":
            phase = store.phase(name)  # the main record alone: a sharded state's shards are not read
            cur = store.lock_holder()
            if phase in ("Aborted", "Succeeded", "CompletedWithFailures") and not held_by(cur, name) \
                    and (st := store.load(name)):
                summ = engine.summary(st)
                summ["exitCode"] = 1 if _left(st) else 0
                _render_summary(app_ctx, summ, changed=True)
                return
            if not held_by(cur, name) or (cur or {}).get("expiresIn", 1) < 0:
                # its lease looks expired (a holder dead on another machine renews no more: store.acquire
                # takes it once seen unrenewed for its duration here) or was let go unfinished: abort
                # does the restoring itself
                lock, holder = _abort_lock(store, name)
                if lock != "alive":
                    app_ctx.out.info(f"rollout {name}'s lock was let go or expired unfinished: aborting it here")
                    break
            if end is not None and time.monotonic() > end:
                raise TimeoutExpired(f"rollout {name} has not finished aborting after {timeout}") from None
            time.sleep(0.3)
    if lock == "other":
        # another rollout holds the cluster lock, so NAME runs nowhere (a process of it that
        # lost the lock starts no node): its nodes are restored from their own records
        app_ctx.out.info(f"rollout {name} is not running (the cluster lock is held by {holder}): "
                         "restoring its nodes without the lock")
    try:
        st = store.load(name)
        e = engine.Engine(plan, store, st, api=getattr(store, "api", None), settings=app_ctx.settings,
                          events=_events(app_ctx))
        e.aborting = True
        try:
            summ = e.finish()
        finally:
            e.close()
    finally:
        if lock == "locked":
            store.release()
    summ["exitCode"] = 1 if e.left_cordoned() else 0
    _render_summary(app_ctx, summ, changed=True)


def _dry_run(app_ctx, plan, store, st: dict, *, retry=None, abort: bool = False) -> None:
    """resume/abort --dry-run: the stored rollout, what the command would restore (the nodes
    cordoned under the rollout's own record: by resume, those not running; by abort, all), what
    it would retry or abort; nothing is written, no lock is taken, no audit entry."""
    from katactl.rollout import engine

    e = engine.Engine(plan, store, st, api=getattr(store, "api", None), settings=app_ctx.settings)
    uncordon = e.would_uncordon(skip=() if abort else ("running",))
    summ = engine.summary(st)
    holder = store.lock_holder()
    summ.update(lock=holder, wouldUncordon=uncordon, exitCode=0)
    if abort:
        summ["wouldAbort"] = sorted(n for n, r in st["nodes"].items() if r["phase"] in ("pending",) + engine.NODE_ACTIVE)
    else:
        summ["wouldRetry"] = list(retry or ())
    what = "abort" if abort else "resume"
    app_ctx.out.info(f"dry run: would {what} rollout {st['name']} ({st['phase']}); uncordon "
                     f"{', '.join(uncordon) or 'no node'}"
                     + (f"; retry {', '.join(retry)}" if retry else "")
                     + (f"; the lock is held by {holder.get('holder')}" if holder else ""))
    _render_summary(app_ctx, summ, changed=True, dry_run=True)


def _left(st: dict) -> list[str]:
    """The nodes a rollout cordoned and could not uncordon (see engine.Engine.restore)."""
    return [n for n, r in st["nodes"].items() if r.get("leftCordoned")]


def _abort_lock(store, name: str) -> tuple[str, str | None]:
    """Take the lock to abort rollout NAME: ("locked", None); ("alive", None) when NAME's
    own process holds it; ("other", holder) when another rollout does (NAME runs nowhere)."""
    from katactl.errors import Refused
    from katactl.rollout.store import held_by

    for _ in range(3):
        try:
            store.acquire(name, wait=False)  # (abort's own loop waits, reading its progress)
            return "locked", None
        except Refused as e:
            holder = store.lock_holder()
            if holder is None:
                err = e
                continue  # released meanwhile: try again
            return ("alive", None) if held_by(holder, name) else ("other", str(holder.get("holder") or "?"))
    raise err
