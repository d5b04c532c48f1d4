"""katactl inspect cgroup|bvt|memcg|rdt|threads: host isolation as it really is."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import typer

from katactl.commands._common import new_app, state

if TYPE_CHECKING:  # annotations only: a command's --help does not import the backends
    from katactl.backends.base import NodeTransport

app = new_app("Show host isolation settings (cgroups, I/O, BVT, memcg QoS, RDT, vCPU threads) and live pressure.")


def _node_report(app_ctx, fn, *, kind: str, columns, summary_fn=None) -> None:
    """Run fn(node) -> {"meta", "items"} on every selected node and render it.

    One node: items as a table (meta in JSON next to items, a summary line on
    stderr). Many nodes: items tagged with their node, metas under "nodes".
    """
    from katactl.commands._common import _progress_cb, finish
    from katactl.errors import ExitCode
    from katactl.fleet import run_on_nodes
    from katactl.isolation.report import Node
    from katactl.output import Result

    fo = run_on_nodes(app_ctx.settings, lambda t: fn(Node(t)), progress=_progress_cb(app_ctx))
    fo.raise_if_single_failure()
    if not fo.multi:
        v = fo.values[fo.nodes[0]]
        res = Result(kind=kind, items=v["items"], item=v["meta"], columns=columns,
                     summary=summary_fn(v["meta"], v["items"]) if summary_fn else None)
    else:
        items, metas = [], {}
        for n in fo.nodes:
            if n in fo.values:
                metas[n] = fo.values[n]["meta"]
                items += [{"node": n, **i} for i in fo.values[n]["items"]]
        res = Result(kind=kind, items=items, item={"nodes": metas}, columns=columns, errors=fo.error_items(),
                     multi_node=True)
    code = fo.exit_code()
    # what could not be read (a malformed schemata file, an unreadable info/ file, a knob file
    # under an item's "unreadable"): one warning each, and the command fails unless something
    # worse already decides its exit code; an unknown is never shown as a pass
    node_metas: dict[str | None, dict] = {None: fo.values[fo.nodes[0]]["meta"]} if not fo.multi else \
        {n: fo.values[n]["meta"] for n in fo.nodes if n in fo.values}
    bad: list[tuple[str | None, str]] = [(n, e) for n, m in node_metas.items() for e in m.get("errors") or []]
    bad += [(i.get("node"), e) for i in res.items or [] for e in i.get("errors") or []]
    bad += [(i.get("node"), f"{u['file']}: {u['error']}") for i in res.items or [] for u in i.get("unreadable") or []]
    for node, e in bad:
        app_ctx.out.warn(f"{node}: {e}" if node else e)
    if code == ExitCode.OK and bad:
        code = ExitCode.FAILED
    finish(app_ctx, res, code)


@app.command("cgroup")
def cgroup_cmd(
    ctx: typer.Context,
    target: Optional[str] = typer.Argument(None, metavar="TARGET",
                                           help="A sandbox (id, prefix, NS/POD), a pod uid, a cgroup path, "
                                                "or a cgroupfs directory."),
    pid: Optional[int] = typer.Option(None, "--pid", metavar="PID", help="The cgroups of this process instead."),
) -> None:
    """Show a cgroup's CPU, cpuset and memory settings in every hierarchy.

    Reads cgroup v1, v2 and hybrid mounts (kubelet cgroupfs and systemd
    layouts): cpuset cpus/effective/mems, cpu.shares or cpu.weight with both
    shares<->weight formulas (kubelet 1024->39, runc 1024->100), quota/period,
    burst, cpu.bvt_warp_ns, memory limits and the memcg QoS knobs. For a Kata
    sandbox: its pod cgroup, its sandbox cgroup and kata_overhead/<id>. Knobs
    the kernel lacks are listed under "unsupported".

    \b
    Examples:
      katactl inspect cgroup 3f2a9c                 # a sandbox by id prefix
      katactl inspect cgroup batch/spark-exec-1     # a sandbox by NAMESPACE/POD
      katactl inspect cgroup /kubepods/besteffort/pod4b1e...
      katactl inspect cgroup /sys/fs/cgroup/cpu/kubepods/burstable
      katactl inspect cgroup --pid 4242 -o json
    """
    from katactl.commands._common import fan_out_one
    from katactl.errors import UsageError
    from katactl.isolation.report import Node, inspect_cgroup

    if (target is None) == (pid is None):
        raise UsageError("give exactly one of TARGET or --pid PID")
    if pid is not None and pid <= 0:
        raise UsageError(f"invalid --pid {pid}: must be a positive process id")
    fan_out_one(state(ctx), lambda t: inspect_cgroup(Node(t), target, pid), kind="CgroupInspection")


def _supported_summary(what: str):
    def f(meta, items):
        if not meta.get("supported"):
            return f"{what}: unsupported on this node: {meta.get('reason')}"
        extra = meta.get("reason")
        return f"{what}: {len(items)} cgroups" + (f" ({extra})" if extra else "")
    return f


@app.command("bvt")
def bvt_cmd(ctx: typer.Context) -> None:
    """Show BVT group identity (cpu.bvt_warp_ns) across the kubepods tree.

    The switch kernel.sched_group_identity_enabled, then each kubepods,
    QoS-level, pod and sandbox cgroup with its QoS class, online/offline class,
    its bvt value and what koordinator would set (LS 2, BE -1, kubepods 0).
    A knob file that cannot be read or parsed is a warning (exit 1) and its
    row unknown. On kernels without group identity: "unsupported", exit 0.

    \b
    Examples:
      katactl inspect bvt
      katactl inspect bvt -o json | jq '.items[] | select(.ok == false)'
    """
    from katactl.isolation.policy import Policy
    from katactl.isolation.report import inspect_bvt
    from katactl.output import Column

    cols = [Column("CGROUP", "path"), Column("LEVEL", "level"), Column("QOS", "qos"), Column("CLASS", "class"),
            Column("POD", "podRef"), Column("BVT", "bvtWarpNs"), Column("EXPECTED", "expected"), Column("OK", "ok"),
            Column("IDENTITY", "identity", wide=True), Column("SHARES", "shares", wide=True),
            Column("WEIGHT", "weight", wide=True)]

    def summary(meta, items):
        if not meta.get("supported"):
            return f"BVT unsupported on this node: {meta.get('reason')}"
        sw = meta["switch"]
        onoff = "UNKNOWN" if sw["enabled"] is None else "enabled" if sw["enabled"] else "DISABLED"
        shown = sw["value"] if sw["value"] is not None else "unreadable" if sw["enabled"] is None else "absent"
        unknown = sum(1 for i in items if i.get("ok") is None and i.get("expected") is not None)
        return (f"group identity {onoff} ({sw['file']}={shown}); "
                f"{sum(1 for i in items if i.get('ok') is False)} cgroups differ from koordinator's values"
                + (f", {unknown} unknown" if unknown else ""))

    _node_report(state(ctx), lambda n: inspect_bvt(n, Policy()), kind="BvtReport", columns=cols,
                 summary_fn=summary)


@app.command("memcg")
def memcg_cmd(ctx: typer.Context) -> None:
    """Show memcg priorities, OOM settings and watermarks across the kubepods tree.

    memory.priority / use_priority_oom / wmark_* are Alibaba Cloud Linux knobs;
    where the kernel lacks them they show as "-" and are listed as unsupported.
    A knob file that cannot be read or parsed is a warning (exit 1).

    \b
    Examples:
      katactl inspect memcg
      katactl inspect memcg -o wide
    """
    from katactl.isolation.report import inspect_memcg
    from katactl.output import Column
    from katactl.values import format_size

    def sz(v):
        return v if isinstance(v, str) else format_size(v)

    cols = [Column("CGROUP", "path"), Column("QOS", "qos"), Column("CLASS", "class"), Column("POD", "podRef"),
            Column("PRIO", "priority"), Column("PRIO-OOM", "usePriorityOom"), Column("OOM-GROUP", "oomGroup"),
            Column("WMARK%", "wmarkRatio"), Column("MIN-ADJ", "wmarkMinAdj"),
            Column("LIMIT", "limit", fmt=sz), Column("USAGE", "usage", fmt=sz),
            Column("HIGH", "high", wide=True, fmt=sz), Column("LOW", "low", wide=True, fmt=sz),
            Column("MIN", "min", wide=True, fmt=sz), Column("SCALE", "wmarkScaleFactor", wide=True),
            Column("WMARK-HIGH", "wmarkHigh", wide=True, fmt=sz), Column("WMARK-LOW", "wmarkLow", wide=True, fmt=sz)]
    _node_report(state(ctx), inspect_memcg, kind="MemcgReport", columns=cols,
                 summary_fn=_supported_summary("memcg QoS"))


@app.command("rdt")
def rdt_cmd(
    ctx: typer.Context,
    interval: str = typer.Option("0", "--interval", metavar="DURATION",
                                 help="Sample mon_data twice this far apart for bandwidth rates (0 = no rates)."),
    decode: Optional[List[str]] = typer.Option(None, "--decode", metavar="LINE",
                                               help="Only decode this schemata line (repeatable), no node access."),
    cbm_mask: Optional[str] = typer.Option(None, "--cbm-mask", metavar="HEX",
                                           help="With --decode: the cache's full mask (info/L3/cbm_mask)."),
) -> None:
    """Show resctrl (Intel RDT) groups with decoded schemata, like pqos -s.

    Per group: L3 masks as ways and % of info/L3/cbm_mask (CDP L3DATA/L3CODE
    lines separately), MB (% on Intel, MBps when mounted mba_MBps, GB/s on
    AMD), tasks, cpus, mon_data LLC occupancy and, with --interval, memory
    bandwidth rates; and which sandboxes' threads sit in which group. A
    schemata line or a file that cannot be read or parsed is a warning (exit
    1) and costs only that resource or file; a pseudo-locksetup group's
    resources show "uninitialized". Without a resctrl mount: "unsupported",
    exit 0.

    \b
    Examples:
      katactl inspect rdt
      katactl inspect rdt --interval 1s -o wide
      katactl inspect rdt --decode 'L3:0=7f0;1=ff' --cbm-mask 7ff
    """
    from katactl.errors import UsageError
    from katactl.output import Column, Result
    from katactl.values import format_size

    app_ctx = state(ctx)
    if decode:
        from katactl.commands._common import finish
        from katactl.isolation import resctrl

        rows = resctrl.decode_lines(decode, cbm_mask)
        cols = [Column("RESOURCE", "resource"), Column("ID", "id"), Column("MASK", "mask"), Column("WAYS", "ways"),
                Column("BITS", "bits"), Column("SHARE%", "percent"), Column("PROBLEM", "problem")]
        finish(app_ctx, Result(kind="SchemataDecode", items=rows, columns=cols))
        return
    if cbm_mask is not None:
        raise UsageError("--cbm-mask only goes with --decode")
    from katactl.isolation.report import inspect_rdt, rdt_interval

    secs = rdt_interval(interval)  # a usage error once, before any node is asked

    def rate(v):
        return format_size(v) + "/s"

    def mon(key, fmt=format_size):
        def get(item):
            vals = [d.get(key) for d in (item.get("mon") or {}).values() if isinstance(d.get(key), int)]
            return fmt(sum(vals)) if vals else None
        return get

    def sbs(item):
        s = item.get("sandboxes")
        if s is None:
            return None
        return ",".join(f"{x['id'][:12]}({x['vcpus']}v)" for x in s) or None

    cols = [Column("GROUP", "name"), Column("TYPE", "type", wide=True), Column("MODE", "mode"),
            Column("L3", lambda i: i.get("summary", {}).get("L3")),
            Column("L3DATA", lambda i: i.get("summary", {}).get("L3DATA"), wide=True),
            Column("L3CODE", lambda i: i.get("summary", {}).get("L3CODE"), wide=True),
            Column("MB", lambda i: i.get("summary", {}).get("MB")),
            Column("TASKS", "tasks"), Column("CPUS", "cpusList"),
            Column("LLC", mon("llc_occupancy")), Column("MBM-TOTAL", mon("mbm_total_rate", rate), wide=True),
            Column("MBM-LOCAL", mon("mbm_local_rate", rate), wide=True), Column("SANDBOXES", sbs),
            Column("ERRORS", "errors", wide=True)]

    def summary(meta, items):
        if not meta.get("supported"):
            return f"RDT unsupported on this node: {meta.get('reason')}"
        l3 = meta["info"].get("L3", {})
        return (f"resctrl at {meta['root']}: {len(items)} groups; L3 cbm_mask {l3.get('cbmMask', '-')} "
                f"({l3.get('ways', '?')} ways), closids {l3.get('numClosids', '-')}")

    _node_report(app_ctx, lambda n: inspect_rdt(n, secs), kind="RdtReport", columns=cols, summary_fn=summary)


@app.command("threads")
def threads_cmd(
    ctx: typer.Context,
    sandbox: Optional[str] = typer.Argument(None, metavar="SANDBOX",
                                            help="Sandbox id, unique id prefix, or NAMESPACE/POD."),
    pid: Optional[int] = typer.Option(None, "--pid", metavar="PID", help="Any process instead of a sandbox's VMM."),
) -> None:
    """Show a sandbox hypervisor's threads: vCPUs, affinity, cgroup, resctrl group, policy, nice.

    vCPU threads are recognised per hypervisor: QEMU "CPU <n>/KVM",
    Cloud Hypervisor "vcpu<n>", Firecracker "fc_vcpu <n>".

    \b
    Examples:
      katactl inspect threads 3f2a9c
      katactl inspect threads batch/spark-exec-1 -o wide
      katactl inspect threads --pid 4242 -o json
    """
    from katactl.errors import UsageError
    from katactl.isolation.report import inspect_threads
    from katactl.output import Column

    if (sandbox is None) == (pid is None):
        raise UsageError("give exactly one of SANDBOX or --pid PID")
    if pid is not None and pid <= 0:
        raise UsageError(f"invalid --pid {pid}: must be a positive process id")
    cols = [Column("TID", "tid"), Column("NAME", "name"), Column("ROLE", "role"), Column("VCPU", "vcpu"),
            Column("AFFINITY", "affinity"), Column("CGROUP", lambda i: i["cgroups"].get("cpu") or i["cgroups"].get("unified")),
            Column("RESCTRL", "resctrlGroup"), Column("POLICY", "policy"), Column("NICE", "nice"),
            Column("CPUSET-CG", lambda i: i["cgroups"].get("cpuset"), wide=True),
            Column("MEMORY-CG", lambda i: i["cgroups"].get("memory"), wide=True),
            Column("LAST-CPU", "lastCpu", wide=True)]

    def summary(meta, items):
        sb = meta.get("sandbox")
        head = f"sandbox {sb['id'][:12]} ({sb['hypervisor']}) " if sb else ""
        vc = (f"{meta['vcpuThreads']} vCPU" if meta["vcpuThreads"] is not None
              else f"vCPUs unknown ({meta.get('vcpuNote')})")
        return f"{head}pid {meta['pid']}: {meta['threads']} threads, {vc}; resctrl {meta['resctrl']}"

    _node_report(state(ctx), lambda n: inspect_threads(n, sandbox, pid), kind="ThreadList", columns=cols,
                 summary_fn=summary)


def _pressure_columns():
    from katactl.isolation.pressure import worst_throttling
    from katactl.output import Column
    from katactl.values import format_size

    def psi(res, line="some"):
        return lambda i: ((((i.get("psi") or {}).get(res) or {}).get(line) or {}).get("stallPercent"))

    def rate(v):
        return format_size(int(v)) + "/s"

    return [Column("TARGET", "target"), Column("ROLE", "role"), Column("CLASS", "class"),
            Column("CPU-SOME%", psi("cpu")), Column("MEM-SOME%", psi("memory")), Column("IO-SOME%", psi("io")),
            Column("MEM-FULL%", psi("memory", "full"), wide=True), Column("IO-FULL%", psi("io", "full"), wide=True),
            Column("CPU-FULL%", psi("cpu", "full"), wide=True),
            # a pod's worst: its own cgroup's or a container's (its own limit, not in the pod's cpu.stat)
            Column("THROTTLED%", lambda i: worst_throttling(i)[0]), Column("CPUS", "cpu.usageCores"),
            Column("DIRECT-SCAN/s", "memory.pgscanDirectPerSec"),
            Column("REFAULT/s", lambda i: (i.get("memory") or {}).get("refaultFilePerSec"), wide=True),
            Column("OOM", "memory.events.oomKill", wide=True), Column("MAX-HITS", "memory.events.max", wide=True),
            Column("IO-READ", "io.readBytesPerSec", fmt=rate), Column("IO-WRITE", "io.writeBytesPerSec", fmt=rate),
            Column("PATH", "path", wide=True)]


@app.command("pressure")
def pressure_cmd(
    ctx: typer.Context,
    targets: Optional[List[str]] = typer.Argument(None, metavar="[TARGET]...",
                                                  help="node, a sandbox (id, prefix, NS/POD), a pod uid, a cgroup "
                                                       "path or cgroupfs directory (default: the node, every online "
                                                       "pod and every Kata sandbox)."),
    interval: str = typer.Option("1s", "--interval", "-d", metavar="DURATION",
                                 help="Time between the two samples (and between refreshes with --watch), "
                                      "100ms to 60s."),
    watch: bool = typer.Option(False, "--watch", "-w",
                               help="Refresh every --interval until interrupted (Ctrl-C, SIGTERM)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", metavar="N",
                                             help="With --watch: stop after N refreshes."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", metavar="RULES",
                                          help="Exit 8 when a rule holds for an online pod or the node (for any "
                                               "target when TARGETs are given), e.g. 'cpu.some>10,memory.full>1'."),
) -> None:
    """Show live interference signals: PSI, CPU throttling, direct reclaim, OOM and I/O rates.

    Two samples --interval apart, for the node (/proc/pressure, /proc/vmstat,
    /proc/diskstats), every online pod, and every Kata sandbox's pod cgroup,
    sandbox cgroup and kata_overhead/<id>: PSI some/full avg10/60/300 and the
    % of the interval stalled (the rate of PSI "total"), cpu.stat throttled
    periods and time (a pod's containers' too, each under its own limit: the
    pod's throttling is the worst of them), memory.events / failcnt /
    oom_kill deltas, direct reclaim (pgscan_direct, pgsteal_direct) and
    refault rates, and I/O bytes and IOPS per device (io.stat,
    blkio.throttle.io_service_bytes). Alinux latency histograms
    (cpuacct.wait_latency, memory.direct_reclaim_*_latency) are added where
    the kernel has them. Files a kernel lacks are listed under
    "unsupported", never an error; a cgroup that vanishes mid-sample is marked
    "gone". With --watch, a target that appears between refreshes is "new":
    its rates are null until the next refresh.

    The summary names the worst-hit online pods and the Kata sandboxes using
    the most of the contended resource, with the evidence.

    --fail-on metrics (numbers are % unless noted): cpu|memory|io.some|full
    (stalled % of the interval), <res>.<some|full>.avg10|avg60|avg300,
    cpu.throttled (% of periods), cpu.throttled-ms (per second),
    memory.direct-reclaim (pages/s), memory.refault (/s), memory.oom (kills),
    memory.max (limit hits). Operators: > >= < <=.

    A rule that cannot be measured for a target it applies to (an unreadable
    file; a TARGET named that lacks the signal, e.g. PSI on cgroup v1) is
    listed under failOn.unknown and fails the gate as a violation does. With
    the default targets, a metric the online pods cannot have on this node
    (cgroup v1 without per-cgroup PSI, a kernel without the counter) or the
    node has no value for (cpu.throttled, memory.max; cpu.full, undefined
    system-wide) is skipped with one warning (failOn.skipped); a rule measured
    on no target at all (no online pod, only the node for a metric it lacks,
    every target gone) is unknown.

    Exit codes: 0, 8 when a --fail-on rule holds or cannot be measured (with
    --watch: at any refresh, whatever else happened), 2 bad input, 4 some
    nodes failed, 130 when --watch is interrupted (Ctrl-C ends the live table
    on a terminal with 0, as top does; SIGTERM and SIGHUP are 130 there too).

    \b
    Examples:
      katactl inspect pressure                       # is it the batch VMs?
      katactl inspect pressure --watch --interval 2s
      katactl inspect pressure batch/spark-exec-1 node -o json
      katactl -N node-1 inspect pressure --fail-on 'cpu.some>10,memory.full>1'
    """
    from katactl.commands._common import _progress_cb, finish
    from katactl.errors import ExitCode, UsageError
    from katactl.fleet import run_on_nodes
    from katactl.isolation import pressure as lib
    from katactl.output import Result

    app_ctx = state(ctx)
    ival = lib.parse_interval(interval)
    rules = lib.parse_rules(fail_on)
    if iterations is not None and (not watch or iterations < 1):
        raise UsageError("--iterations N needs --watch and N >= 1")
    refs = list(targets or [])
    for r in refs:
        if not r.strip() or "\0" in r:
            raise UsageError(f"invalid TARGET {r!r}")
    sessions: dict = {}
    warned: set = set()
    cols = _pressure_columns()

    def one(transport: NodeTransport):
        s = sessions.setdefault(transport.node, lib.Session(ival, refs))
        return s.refresh(transport, rules)

    def result(fanout) -> tuple[Result, int, bool]:
        """(result, exit code, whether a --fail-on rule held or could not be measured)."""
        if not fanout.multi:
            v = fanout.values[fanout.nodes[0]]
            res = Result(kind="PressureReport", items=v["items"], item=v["meta"], columns=cols, name_key="target",
                         summary=lib.summary_line(v["meta"]))
            metas = {fanout.nodes[0]: v["meta"]}
        else:
            items, metas = [], {}
            for n in fanout.nodes:
                if n in fanout.values:
                    metas[n] = fanout.values[n]["meta"]
                    items += [{"node": n, **i} for i in fanout.values[n]["items"]]
            # each node's report under nodes.<NODE>; the gate's verdict over them all stays
            # top-level (jq .failOn.passed whatever the selection), as audit keeps passed
            top = {"failOn": lib.merge_fail_on(metas, rules, incomplete=bool(fanout.errors))} if rules else {}
            res = Result(kind="PressureReport", items=items, item={**top, "nodes": metas}, columns=cols,
                         errors=fanout.error_items(), multi_node=True, name_key="target",
                         summary="; ".join(f"{n}: {lib.summary_line(m)}" for n, m in metas.items()))
        code = fanout.exit_code()
        for n, m in metas.items():  # once each (--watch): a rule that could not be measured
            for u in (m.get("failOn") or {}).get("unknown", []):
                key = (n, u["target"], u["rule"])
                if key not in warned:
                    warned.add(key)
                    app_ctx.out.warn(f"{n + ': ' if fanout.multi else ''}--fail-on {u['rule']} not measured for "
                                     f"{u['target']} ({u['reason']}): the gate fails")
            for sk in (m.get("failOn") or {}).get("skipped", []):
                skey = (n, "skipped", sk["rule"], sk["reason"])
                if skey not in warned:
                    warned.add(skey)
                    t = sk["targets"]
                    app_ctx.out.warn(f"{n + ': ' if fanout.multi else ''}--fail-on {sk['rule']} skipped for "
                                     f"{t[0] if len(t) == 1 else f'{len(t)} targets'} ({sk['reason']})")
        failed = any(not (m.get("failOn") or {}).get("passed", True) for m in metas.values())
        if failed and code == ExitCode.OK:
            code = ExitCode.CHECK_FAILED
        return res, code, failed

    if not watch:
        fo = run_on_nodes(app_ctx.settings, one, progress=_progress_cb(app_ctx))
        fo.raise_if_single_failure()
        res, code, _ = result(fo)
        finish(app_ctx, res, code)
        return
    from katactl.commands.top import terminate_seen

    with terminate_seen() as seen:
        _pressure_watch(app_ctx, one, result, ival, iterations, seen)


def _pressure_watch(app_ctx, one, result, ival: float, iterations, seen: list[int]) -> None:
    """--watch: a Rich live table on a terminal, else one rendering per refresh (one
    JSON line each with -o jsonl). The exit code is 8 if a --fail-on rule held (or could
    not be measured) at any refresh, also when a node failed too, else 4 if a node failed.
    Ctrl-C on a terminal ends the live table quietly (its quit key, as ``top`` and
    ``watch``); SIGTERM and SIGHUP (timeout(1), systemd, a closed terminal) anywhere, and
    Ctrl-C elsewhere, are an interruption, exit 130, as in ``katactl top``: a gate cut
    short never reads as passed. A rule that already held keeps exit 8: the gate's
    answer was found before the interruption."""
    import time

    import typer as _typer

    from katactl import interrupt
    from katactl.errors import ExitCode
    from katactl.fleet import run_on_nodes

    out = app_ctx.out
    live = out.stdout_tty and out.fmt in ("table", "wide")
    worst = ExitCode.OK
    held = False
    n = 0
    lv = None
    interrupted = False
    try:
        if live:
            from rich.console import Console
            from rich.live import Live

            lv = Live(console=Console(file=out.stdout, no_color=not out.color, highlight=False),
                      auto_refresh=False, screen=False)
            lv.start()
        while iterations is None or n < iterations:
            t0 = time.monotonic()
            fo = run_on_nodes(app_ctx.settings, one)
            if n == 0:
                fo.raise_if_single_failure()
            res, code, failed = result(fo)
            held = held or failed
            if code and worst == ExitCode.OK:
                worst = code
            if lv is not None:  # live
                lv.update(_pressure_frame(app_ctx, res, ival), refresh=True)
            else:
                out.render(res)
                out.stdout.flush()
            n += 1
            if iterations is not None and n >= iterations:
                break
            # the first refresh took its own two samples; later ones compare with the last
            interrupt.sleep(max(0.0, ival - (time.monotonic() - t0)) if n > 1 else ival)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if lv is not None:
            lv.stop()
    if held:
        raise _typer.Exit(int(ExitCode.CHECK_FAILED))
    if interrupted and (seen or not live):
        raise KeyboardInterrupt  # katactl.cli.main: one line (JSON error with -o json), exit 130
    if worst:
        raise _typer.Exit(int(worst))


def _pressure_frame(app_ctx, res, ival: float):
    import time

    from rich import box
    from rich.table import Table
    from rich.text import Text

    from katactl.output import Column

    cols = [c for c in res.columns if app_ctx.out.fmt == "wide" or not c.wide]
    if res.multi_node:
        cols = [Column("NODE", "node")] + cols
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold",
              title=f"katactl inspect pressure - every {ival:g}s - {time.strftime('%H:%M:%S')}",
              caption=Text(res.summary or ""))
    for c in cols:
        t.add_column(c.header, overflow="fold")
    for r in res.items:
        t.add_row(*[Text(c.value(r)) for c in cols])
    return t
