"""katactl overhead: Pod overhead declared (RuntimeClass) vs measured (shim, VMM, helpers)."""
from __future__ import annotations

from typing import List, Optional

import typer

from katactl.commands._common import new_app, render_final, state

app = new_app("Pod overhead declared (RuntimeClass) versus measured (shim, VMM, helpers).", single=True)


def _columns():
    from katactl.output import Column
    from katactl.values import format_size

    def mem(key):
        return lambda it: format_size(((it.get(key) or {}).get("memoryBytes")))

    def cpu(key):
        def f(it):
            v = (it.get(key) or {}).get("cpuMillis")
            if v is None and key == "measured" and it.get("vcpusUnknown"):
                return "?vcpu"  # guest CPU cannot be told apart: not measured (see notes)
            return None if v is None else f"{v}m"
        return f

    return [
        Column("POD", lambda it: it.get("podRef") or it["id"][:13]),
        Column("ID", lambda it: it["id"][:13], wide=True),
        Column("RUNTIMECLASS", "runtimeClass"),
        Column("DECL-CPU", cpu("declared")),
        Column("MEAS-CPU", cpu("measured")),
        Column("DECL-MEM", mem("declared")),
        Column("MEAS-MEM", mem("measured")),
        Column("RATIO", lambda it: None if (it.get("ratio") or {}).get("max") is None
               else f"{it['ratio']['max']:.2f}"),
        Column("GUEST-MEM", "guestMemoryBytes", fmt=format_size),
        Column("SOURCE", lambda it: f"{(it.get('declared') or {}).get('source') or '-'}/"
                                    f"{(it.get('measured') or {}).get('source') or '-'}", wide=True),
        Column("PROCS", lambda it: ",".join(f"{p['role']}:{p['pid'] if p['pid'] is not None else '?'}"
                                            for p in it.get("processes") or []), wide=True),
        Column("SEVERITY", "severity"),
        Column("MESSAGE", "message", wide=True),
    ]


@app.command()
def overhead(
    ctx: typer.Context,
    targets: Optional[List[str]] = typer.Argument(None, metavar="[SANDBOX]...",
                                                  help="Sandbox ids, unique id prefixes or NAMESPACE/POD (default: all)."),
    runtime_class_overhead: Optional[str] = typer.Option(
        None, "--runtime-class-overhead", metavar="cpu=Q,memory=Q",
        help="Declared overhead to compare with (e.g. cpu=250m,memory=160Mi); wins over the "
             "Kubernetes API and the config file's runtime_class_overhead."),
    interval: str = typer.Option("1s", "--interval", "-d", metavar="DURATION",
                                 help="CPU sampling window (two samples this far apart), as top's."),
    margin: str = typer.Option("10%", "--margin", metavar="PERCENT",
                               help="Headroom over the fleet's p95 in the suggested podFixed."),
    fail_on: str = typer.Option("medium", "--fail-on", metavar="SEVERITY",
                                help="Exit 8 when a pod is this far over its declared overhead or "
                                     "further: info, low (>1x), medium (>1.25x), high (>1.5x), critical (>2x)."),
) -> None:
    """Per Kata pod: the RuntimeClass and its declared podFixed CPU and memory, the
    measured overhead, the guest-visible memory, and the ratio measured/declared.

    Declared: the pod's spec.overhead (else its RuntimeClass's overhead.podFixed)
    through the Kubernetes API when a kubeconfig is configured; else
    --runtime-class-overhead or runtime_class_overhead in the config file. An API
    that fails (down, refused, forbidden) is a warning, not a failure: declared
    then comes from runtime_class_overhead when set (noted on each item), else
    is unknown; the measurement stands.

    Measured: the RSS and CPU of the shim, the hypervisor (without the vCPU
    threads' CPU and without the guest memory the guest uses) and virtiofsd and
    other helpers of the sandbox; where sandbox_cgroup_only = false, the
    kata_overhead/<id> cgroup's CPU usage is the CPU figure and the processes
    its breakdown (its memory holds the guest's RAM: shown, not counted). On
    cgroup v2 the runtime's vCPU move takes the whole VMM to the sandbox
    cgroup: the CPU of each member outside kata_overhead (the VMM's without its
    vCPU threads) is added to the cgroup's. CPU is a rate over --interval. QEMU
    names its vCPU threads only with debug-threads=on (Kata's enable_debug);
    otherwise they are asked over QMP (query-cpus-fast on extra-monitor.sock;
    never the runtime's qmp.sock), else, on cgroup v1, taken from the sandbox
    cgroup (sandbox_cgroup_only = false); where they stay unknown the CPU is
    not measured (MEAS-CPU ?vcpu, a note on the item).

    Severity by measured/declared: low above 1x, medium above 1.25x, high above
    1.5x, critical above 2x; a pod using what it declares none of is at least
    medium; an unknown declaration is info. The node summary sums the
    under-reservation (measured beyond declared); the suggestion per RuntimeClass
    is the podFixed covering the fleet's p95 plus --margin.

    Exit codes: 0 nothing at or above --fail-on, 8 otherwise, 4 some nodes failed,
    3 a SANDBOX matches none or (an id prefix) several, 2 bad input.

    \b
    Examples:
      katactl overhead
      katactl overhead --runtime-class-overhead cpu=250m,memory=160Mi
      katactl -l kata=true overhead -o json | jq '.items[] | {podRef, ratio}'
      katactl -N @batch overhead --margin 20% -o json | jq .suggestions
      katactl overhead batch/train-0 --interval 5s --fail-on high
    """
    from katactl import overhead as lib
    from katactl.commands._common import _progress_cb
    from katactl.errors import ExitCode, UsageError
    from katactl.fleet import run_on_nodes
    from katactl.output import Result
    from katactl.sandbox import parse_ref
    from katactl.values import format_size, parse_duration

    app_ctx = state(ctx)
    settings = app_ctx.settings
    lib.check_fail_on(fail_on)
    marg = lib.parse_margin(margin)
    ival = parse_duration(interval, what="--interval")
    if ival < 0.1:
        raise UsageError(f"invalid --interval {interval!r}: at least 100ms")
    if ival > 600:
        raise UsageError(f"invalid --interval {interval!r}: at most 10m")
    refs = [t for t in targets or []]
    for r in refs:
        parse_ref(r)
    declared = lib.declared_source(settings, runtime_class_overhead,
                                   getattr(settings, "runtime_class_overhead", None),
                                   configured_from=settings.sources.get("runtime_class_overhead", "config"))
    timeout = min(float(settings.request_timeout), 10.0)
    try:
        fo = run_on_nodes(settings, lambda t: lib.measure_node(t, interval=ival, refs=refs, declared=declared,
                                                               timeout=timeout),
                          progress=_progress_cb(app_ctx))
    finally:
        if declared.api is not None:
            declared.api.close()
    for w in declared.warnings:
        app_ctx.out.warn(w)
    fo.raise_if_single_failure()
    by_node = {n: fo.values[n] for n in fo.nodes if n in fo.values}
    if refs:
        _refuse_ambiguous(fo, by_node, refs)
        from katactl.errors import NotFound

        found = [it for its in by_node.values() for it in its]
        missing = [r for r in refs if not any(_match(it, r) for it in found)]
        if missing and not fo.errors:
            raise NotFound(f"no running sandbox matches {', '.join(map(repr, missing))}",
                           hint="list them with 'katactl sandbox list'")
    items, meta, failed = lib.report(by_node, fail_on=fail_on, margin=marg)
    if fo.errors and not failed:  # a node not measured is no pass: unknown (its error is in errors)
        meta["failed"] = None
    if not fo.multi:
        for it in items:
            it.pop("node", None)
    over = sum(n["overDeclared"] for n in meta["nodes"])
    under = {f: sum(n["underReserved"][f] for n in meta["nodes"]) for f in ("cpuMillis", "memoryBytes")}
    summary = (f"{len(items)} Kata pod(s), {over} over their declared overhead; under-reserved "
               f"cpu {under['cpuMillis']}m, memory {format_size(under['memoryBytes'])}"
               + (f" (--fail-on {fail_on}: FAILED)" if failed else "")
               + (f"; {len(fo.errors)} node(s) not measured" if fo.errors else "")) if items else None
    res = Result(kind="OverheadReport", items=items, item=meta, columns=_columns(), errors=fo.error_items(),
                 multi_node=fo.multi, name_key="podRef", summary=summary)
    code = fo.exit_code()
    if failed and code == ExitCode.OK:
        code = ExitCode.CHECK_FAILED
    render_final(app_ctx, res)
    if app_ctx.out.human and items:
        for s in meta["suggestions"]:
            p = s["suggestedPodFixed"]
            if p["cpu"] or p["memory"]:
                app_ctx.out.info(f"suggest RuntimeClass {s['runtimeClass']}: overhead.podFixed cpu={p['cpu'] or '-'} "
                                 f"memory={p['memory'] or '-'} (p95 of {s['pods']} pod(s) + {margin})")
    if code:
        raise typer.Exit(int(code))


def _refuse_ambiguous(fo, by_node: dict, refs: list[str]) -> None:
    """An id prefix names one sandbox, as for every command (katactl.sandbox.locate): several
    on one node (that node's Ambiguous) or on several nodes is exit 3."""
    from katactl.errors import Ambiguous

    for n, e in fo.errors.items():
        if isinstance(e, Ambiguous):
            raise Ambiguous(f"{n}: {e.message}", hint=e.hint, details=e.details)
    for r in refs:
        if "/" in r:
            continue
        hits = [(n, it["id"]) for n, its in by_node.items() for it in its if it["id"].startswith(r)]
        if len({n for n, _ in hits}) > 1 and not any(i == r for _, i in hits):
            where = ", ".join(f"{n}:{i[:12]}" for n, i in hits[:10])
            raise Ambiguous(f"{r!r} matches {len(hits)} sandboxes on several nodes: {where}",
                            hint="give more characters of the id, or narrow the node selection with -N NODE",
                            details={"candidates": [{"node": n, "id": i} for n, i in hits]})


def _match(it: dict, ref: str) -> bool:
    if "/" in ref:
        parts = ref.split("/")
        return it.get("podRef") == "/".join(parts[-2:])
    return it["id"].startswith(ref)
