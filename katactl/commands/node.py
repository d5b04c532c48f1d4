"""katactl node: Kubernetes node operations (list, check, cordon, uncordon, drain)."""
from __future__ import annotations

from typing import List, Optional

import typer

from katactl.commands._common import finish, new_app, require_audit, state

app = new_app("Kubernetes nodes: list, check, cordon, uncordon, drain (kubectl drain's semantics, Kata-aware).")
app.add_typer(__import__("katactl.commands.node_agent", fromlist=["app"]).app, name="agent")  # node agent install|status|uninstall|gc

NODES_ARG = typer.Argument(None, metavar="NODE...", help="Kubernetes node names (also -N, --nodes-from, -l).")
DRY_RUN_HELP = ("Change nothing. --dry-run (or =client) sends no change; --dry-run=server has the "
                "API server validate every change and store none.")


def _dry_run(flag: bool, server: bool) -> str | None:
    return "server" if server else ("client" if flag else None)


def _targets(app_ctx, names: Optional[List[str]], *, required: bool = True) -> list[str]:
    """NODE arguments plus -N/--nodes-from/-l, deduplicated, in order."""
    from katactl.backends.kube import seg
    from katactl.errors import UsageError
    from katactl.fleet import select_nodes

    out: dict[str, None] = {}
    for n in list(names or []) + select_nodes(app_ctx.settings):
        for part in n.split(","):
            if part:  # no strip: "n1\n" is a bad name, not n1
                out.setdefault(seg(part), None)
    if required and not out:
        raise UsageError("name at least one node (NODE..., -N, --nodes-from or -l SELECTOR)")
    return list(out)


def _one_root(app_ctx, targets: list[str], flag: str | None) -> None:
    """--host-root is one node's root: it cannot stand for several nodes."""
    from katactl.errors import UsageError

    if flag and app_ctx.settings.host_root and len(targets) > 1:
        raise UsageError(f"{flag} with --host-root reads one node's root: name one node, or reach "
                         "several over SSH")


def _render(app_ctx, fanout, *, kind: str, columns, mutating: bool, dry_run: bool = False) -> None:
    """One node: its result (or its error, with its own exit code); several: a list
    with per-node errors and exit 4 on partial failure. A mutation's ``dryRun`` is the
    command's flag, also when no node answered."""
    from katactl.output import Result

    fanout.raise_if_single_failure()
    items = [{"name": n, **{k: v for k, v in fanout.values[n].items() if k != "name"}}
             for n in fanout.nodes if n in fanout.values]
    errors = []
    for n in fanout.nodes:
        if n in fanout.errors:
            err = fanout.errors[n]
            entry: dict = {"node": n, "error": err.to_dict()}
            partial = err.details.get("drain")
            if mutating and isinstance(partial, dict):
                # a drain that failed half-way (pods evicted, the cordon kept) changed the cluster
                entry["changed"] = bool(partial.get("changed"))
            errors.append(entry)
    changed = any(i.get("changed") for i in items + errors) if mutating else None
    finish(app_ctx, Result(kind=kind, items=items, columns=columns, errors=errors, changed=changed,
                           dry_run=dry_run if mutating else None), fanout.exit_code())


@app.command("list")
def list_(ctx: typer.Context, names: Optional[List[str]] = NODES_ARG) -> None:
    """List nodes with their readiness, Kata capability and Kata pods.

    KATA is the kata-deploy label katacontainers.io/kata-runtime=true, with
    the Kata RuntimeClass handlers that may run there (-o wide); KATA-PODS
    counts pods whose RuntimeClass handler is a Kata one; CORDONED-BY is
    who cordoned the node, from katactl's cordon record while it describes the
    node's cordon (katactl's user, or who had cordoned it before katactl). -l
    SELECTOR filters by node labels.

    \b
    Examples:
      katactl node list
      katactl node list -l node-role/kata=true -o wide
      katactl node list -o json | jq '.items[] | select(.kataPods > 0) | .name'
    """
    from katactl import nodes
    from katactl.backends import kube
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    settings = app_ctx.settings
    explicit = _targets(app_ctx, names, required=False) if (names or settings.nodes or settings.nodes_from) else None
    with kube.client(settings) as api:
        rows = nodes.list_nodes(api, explicit, None if explicit else settings.selector)
    cols = [Column("NAME", "name"), Column("STATUS", "status"),
            Column("KATA", lambda i: ("yes" if i["kata"] else "-")),
            Column("HANDLERS", "kataHandlers", wide=True),
            Column("PODS", "pods"), Column("KATA-PODS", "kataPods"),
            Column("CORDONED-BY", "cordonedBy"), Column("AGE", "age"),
            Column("VERSION", "kubeletVersion", wide=True), Column("KERNEL", "kernel", wide=True),
            Column("RUNTIME", "containerRuntime", wide=True), Column("INTERNAL-IP", "internalIP", wide=True),
            Column("TAINTS", "taints", wide=True)]
    finish(app_ctx, Result(kind="NodeList", items=rows, columns=cols))


@app.command()
def cordon(
    ctx: typer.Context,
    names: Optional[List[str]] = NODES_ARG,
    reason: Optional[str] = typer.Option(None, "--reason", metavar="TEXT", help="Why (kept in the record)."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    dry_run_server: bool = typer.Option(False, "--dry-run-server", hidden=True),
) -> None:
    """Mark nodes unschedulable, as kubectl cordon does, and record it.

    The record (annotation katactl.io/cordon: who, when, why, and whether the
    node was already cordoned) lets 'node uncordon' and failed drains restore
    exactly what was there: a node someone else cordoned stays cordoned.
    Idempotent: a node already under a 'node cordon' record reports changed:
    false, whatever --reason. A cordon katactl made for a drain or a rollout
    (undone at their end) is taken over: a new record naming the old one, so
    the drain or rollout leaves the node cordoned.

    \b
    Examples:
      katactl node cordon node-1 --reason "kernel 6.1.119"
      katactl node cordon -l pool=batch --dry-run=server -o json
    """
    _cordon_cmd(ctx, names, "cordon", dry_run, dry_run_server, reason=reason)


@app.command()
def uncordon(
    ctx: typer.Context,
    names: Optional[List[str]] = NODES_ARG,
    force: bool = typer.Option(False, "--force", help="Uncordon even a node katactl did not cordon."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    dry_run_server: bool = typer.Option(False, "--dry-run-server", hidden=True),
) -> None:
    """Make nodes schedulable again, unless katactl did not cordon them.

    Refused (exit 5, naming who) unless --force: a node whose katactl record
    says it was already cordoned before katactl cordoned it; one someone
    cordoned again after katactl's cordon (its managedFields name another
    owner of spec.unschedulable); one cordoned without a katactl record (kubectl
    cordon: the owner of spec.unschedulable in its managedFields, or nobody
    named). --force does what kubectl uncordon does.

    \b
    Examples:
      katactl node uncordon node-1
      katactl node uncordon node-1 --force
    """
    _cordon_cmd(ctx, names, "uncordon", dry_run, dry_run_server, force=force)


def _cordon_cmd(ctx, names, action: str, dry_run: bool, dry_run_server: bool, **kw) -> None:
    from katactl import nodes
    from katactl.backends import kube
    from katactl.output import Column

    app_ctx = state(ctx)
    targets = _targets(app_ctx, names)
    dry = _dry_run(dry_run, dry_run_server)
    op = getattr(nodes, action)
    held = {"held": True} if action == "cordon" else {}  # an operator's cordon: see nodes.cordon
    params = {**{k: v for k, v in kw.items() if v}, "dryRun": dry}
    require_audit(bool(dry))  # once, before the API: not a refusal per node
    with kube.client(app_ctx.settings) as api:
        fo = nodes.for_each_node(targets, lambda n: nodes.audited(
            f"node.{action}", n, params, lambda: op(api, n, dry_run=dry or False, **kw, **held)))
    cols = [Column("NAME", "name"), Column("CHANGED", "changed"), Column("MESSAGE", "message")]
    _render(app_ctx, fo, kind="NodeCordon" if action == "cordon" else "NodeUncordon", columns=cols,
            mutating=True, dry_run=bool(dry))


@app.command()
def drain(
    ctx: typer.Context,
    names: Optional[List[str]] = NODES_ARG,
    ignore_daemonsets: bool = typer.Option(False, "--ignore-daemonsets", help="Ignore DaemonSet-managed pods."),
    delete_emptydir_data: bool = typer.Option(False, "--delete-emptydir-data",
                                              help="Evict pods using emptyDir (their data is lost)."),
    force: bool = typer.Option(False, "--force", help="Evict pods that declare no controller too."),
    grace_period: int = typer.Option(-1, "--grace-period", metavar="SECONDS",
                                     help="Termination grace for each pod (-1: the pod's own)."),
    timeout: str = typer.Option("0s", "--timeout", metavar="DURATION",
                                help="Deadline of the whole drain of a node (0s: none); exit 6."),
    pod_selector: Optional[str] = typer.Option(None, "--pod-selector", metavar="SELECTOR",
                                               help="Only pods matching this label selector."),
    skip_wait: int = typer.Option(0, "--skip-wait-for-delete-timeout", metavar="SECONDS",
                                  help="Skip pods deleting for longer than this (NotReady nodes)."),
    disable_eviction: bool = typer.Option(False, "--disable-eviction",
                                          help="Delete instead of evict: bypasses PodDisruptionBudgets."),
    kata_only: bool = typer.Option(False, "--kata-only",
                                   help="Evict only Kata pods; runc services stay where they are."),
    stale_release: bool = typer.Option(False, "--stale-release",
                                       help="Evict only Kata pods whose sandbox runs a release other than "
                                            "'current' (reads the node over SSH, or --host-root)."),
    kata_root: str = typer.Option("/opt/kata", "--kata-root", metavar="DIR",
                                  help="Kata install root on the node, for --stale-release."),
    keep_cordoned: bool = typer.Option(False, "--keep-cordoned",
                                       help="On failure, leave the node cordoned (default: restore)."),
    reason: Optional[str] = typer.Option(None, "--reason", metavar="TEXT", help="Why (kept in the cordon record)."),
    parallel: int = typer.Option(1, "--parallel", metavar="N", help="Nodes drained at once (default 1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
    dry_run_server: bool = typer.Option(False, "--dry-run-server", hidden=True),
) -> None:
    """Cordon nodes and evict their pods, with kubectl drain's semantics.

    The same filters in the same order: mirror pods skipped; DaemonSet pods
    refused unless --ignore-daemonsets; emptyDir pods unless
    --delete-emptydir-data; pods without a controller unless --force. A
    refusal lists every offending pod (exit 5) and changes nothing: unlike
    kubectl, the filters run before the cordon (and again after it). Evictions
    go through policy/v1, concurrently, and are sent again until --timeout
    (exit 6), after the server's Retry-After (else 5 s), when a
    PodDisruptionBudget refuses them, when the API server throttles them (a
    429 naming no budget: shown in the server's words) or when a server
    error carries Retry-After; any other refusal (a 409 too) fails that pod,
    as with kubectl. A pod is gone when the API
    answers 404 or another UID. On failure, timeout, Ctrl-C, SIGTERM or SIGHUP
    the node is uncordoned again if this drain cordoned it (--keep-cordoned to
    keep it), and the audit log says so (exit 130 when interrupted). Several
    nodes go one after another (--parallel N to overlap; one Ctrl-C stops all;
    one node's failure stops none).

    \b
    Examples:
      katactl node drain node-1 --ignore-daemonsets --timeout 10m
      katactl node drain node-1 --kata-only --ignore-daemonsets --dry-run
      katactl node drain -l pool=batch --ignore-daemonsets --delete-emptydir-data -o jsonl
      katactl node drain node-1 --kata-only --stale-release    # after 'upgrade switch'
    """
    import dataclasses
    import threading

    from katactl import nodes
    from katactl.backends import kube
    from katactl.errors import UsageError
    from katactl.output import Column
    from katactl.values import parse_duration

    app_ctx = state(ctx)
    nodes.check_drain_values(grace_period=grace_period, skip_wait=skip_wait, pod_selector=pod_selector)
    if parallel < 1:
        raise UsageError(f"invalid --parallel {parallel}: 1 or more")
    deadline = parse_duration(timeout, what="--timeout", allow_zero=True)
    targets = _targets(app_ctx, names)
    _one_root(app_ctx, targets, "--stale-release" if stale_release else None)
    opts = nodes.DrainOptions(ignore_daemonsets=ignore_daemonsets, delete_emptydir_data=delete_emptydir_data,
                              force=force, grace_period=grace_period, timeout=deadline,
                              pod_selector=pod_selector, skip_wait_for_delete_timeout=skip_wait,
                              disable_eviction=disable_eviction, dry_run=_dry_run(dry_run, dry_run_server),
                              kata_only=kata_only or stale_release, keep_cordoned=keep_cordoned, reason=reason,
                              agent_namespace=app_ctx.settings.agent_namespace)
    out = app_ctx.out
    params = {**{k: v for k, v in vars(opts).items() if v not in (None, False, 0, -1) and k not in ("dry_run", "agent_namespace")},
              "dryRun": opts.dry_run}
    stop = threading.Event()

    counts = {"done": 0, "total": 0}
    bar = out.progress("evicting pods", total=0, unit="pods")

    def events(kind: str, **data) -> None:
        out.event(kind, **data)
        if kind == "Warning":
            out.warn(f"node/{data['node']}: {data['message']}")
        elif kind == "PodEvictionBlocked":
            out.info(f"node/{data['node']}: eviction of {data['podRef']} blocked: "
                     f"{data.get('budget') or data['message']} (will retry after {data['retryAfter']:g}s)")
        elif kind == "NodeDraining":
            counts["total"] += data["pods"]
            bar.update(total=counts["total"])
        elif kind == "PodDeleted":
            counts["done"] += 1
            bar.update(completed=counts["done"])
            if not out.stderr_tty:  # on a terminal the bar counts them
                out.info(f"node/{data['node']}: pod/{data['podRef']} evicted")
        elif kind == "NodeRestored":
            out.info(f"node/{data['node']}: uncordoned again (it was schedulable before)")

    def drain_one(api, n: str) -> dict:
        node_opts = opts
        if stale_release:
            with nodes.node_transport(app_ctx.settings, n) as t:
                node_opts = dataclasses.replace(opts, only_pods=nodes.stale_release_pods(t, kata_root)[0])
        return nodes.drain(api, n, node_opts, events=events, stop=stop)

    require_audit(bool(opts.dry_run))
    # Ctrl-C, SIGTERM or SIGHUP (cli.py): every drain stops, restores its node and audits it, then exit 130
    with kube.client(app_ctx.settings) as api, bar:
        fo = nodes.for_each_node(targets, lambda n: nodes.audited(
            "node.drain", n, params, lambda: drain_one(api, n)), parallel=parallel, stop=stop)
    for n in fo.nodes:
        if n in fo.values:
            r = fo.values[n]
            out.info(f"node/{n}: drained ({len(r['evicted'])} evicted, {len(r['skipped'])} skipped)"
                     + (" (dry run)" if r["dryRun"] else ""))
    cols = [Column("NAME", "name"), Column("EVICTED", lambda i: len(i["evicted"])),
            Column("SKIPPED", lambda i: len(i["skipped"])), Column("CHANGED", "changed"),
            Column("PODS", "evicted", wide=True)]
    _render(app_ctx, fo, kind="NodeDrain", columns=cols, mutating=True, dry_run=bool(opts.dry_run))


@app.command()
def check(
    ctx: typer.Context,
    names: Optional[List[str]] = NODES_ARG,
    fail_on: str = typer.Option("high", "--fail-on", metavar="SEVERITY",
                                help="Exit 8 when a finding has this severity or higher: "
                                     "info, low, medium, high, critical."),
    node_facts: bool = typer.Option(False, "--node-facts",
                                    help="Also read the node itself (over SSH, or --host-root): Kata release, "
                                         "sandboxes on other releases, uncollected vmcores."),
    kata_root: str = typer.Option("/opt/kata", "--kata-root", metavar="DIR", help="Kata install root on the node."),
    ignore_daemonsets: bool = typer.Option(False, "--ignore-daemonsets",
                                           help="Check for a drain with --ignore-daemonsets."),
    delete_emptydir_data: bool = typer.Option(False, "--delete-emptydir-data",
                                              help="Check for a drain with --delete-emptydir-data."),
    force: bool = typer.Option(False, "--force", help="Check for a drain with --force."),
) -> None:
    """Read-only maintenance preflight: what would make a drain of these nodes fail.

    Reports a NotReady node; pods a 'node drain' with the same filter flags
    (--ignore-daemonsets, --delete-emptydir-data, --force) would refuse, and
    why: high, so that with the default --fail-on a check that passes is a drain
    its filters let through (pods it would skip or delete with a warning: info);
    PodDisruptionBudgets allowing 0 disruptions now,
    with their numbers (budgets it may not list: a high finding, pdb-unknown);
    pods under several budgets (the eviction API refuses them); pods stuck terminating; Kata pods with their RuntimeClass and
    declared overhead (or its absence). With --node-facts, also the node's
    Kata release, sandboxes still on another release, and guest memory dumps
    not collected yet. Changes nothing.

    Exit codes: 0 no finding at or above --fail-on, 8 otherwise.

    \b
    Examples:
      katactl node check node-1 --ignore-daemonsets && katactl node drain node-1 --ignore-daemonsets
      katactl node check -l pool=batch --fail-on medium -o json
      katactl node check node-1 --node-facts
    """
    from katactl import nodes
    from katactl.backends import kube
    from katactl.errors import ExitCode, UsageError
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    if fail_on not in nodes.SEVERITIES:
        raise UsageError(f"invalid --fail-on {fail_on!r}: choose from {', '.join(nodes.SEVERITIES)}")
    targets = _targets(app_ctx, names)
    _one_root(app_ctx, targets, "--node-facts" if node_facts else None)

    drain = nodes.DrainOptions(ignore_daemonsets=ignore_daemonsets, delete_emptydir_data=delete_emptydir_data,
                               force=force, agent_namespace=app_ctx.settings.agent_namespace)

    def check_one(api, n: str) -> list[dict]:
        findings = nodes.check(api, n, drain)
        if node_facts:
            with nodes.node_transport(app_ctx.settings, n) as t:
                findings += nodes.check_node_facts(n, nodes.kata_facts(t, kata_root))
        return findings

    with kube.client(app_ctx.settings) as api:
        fo = nodes.for_each_node(targets, lambda n: check_one(api, n))
    fo.raise_if_single_failure()
    items = [{"node": n, **f} for n in fo.nodes if n in fo.values for f in fo.values[n]]
    rank = nodes.SEVERITIES.index(fail_on)
    failed = any(nodes.SEVERITIES.index(f["severity"]) >= rank for f in items)
    errors = [{"node": n, "error": fo.errors[n].to_dict()} for n in fo.nodes if n in fo.errors]
    cols = [Column("NODE", "node"), Column("SEVERITY", "severity"), Column("CHECK", "check"),
            Column("TARGET", "target"), Column("MESSAGE", "message")]
    # a node that could not be checked is no pass (its error follows on stderr)
    verdict = "FAILED" if failed else "incomplete" if errors else "passed"
    summary = (f"node check {verdict} (--fail-on {fail_on}): {len(items)} finding(s)"
               + (f"; {len(errors)} node(s) not checked" if errors else ""))
    code = fo.exit_code() or (ExitCode.CHECK_FAILED if failed else 0)
    finish(app_ctx, Result(kind="NodeCheckReport", items=items, columns=cols, errors=errors, name_key="target",
                           summary=summary), code)
