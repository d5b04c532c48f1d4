"""katactl top."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

import typer

from katactl.commands._common import fan_out_list, new_app, state

if TYPE_CHECKING:  # annotations only: a command's --help does not import the backends
    from katactl.backends.base import NodeTransport

app = new_app("Live per-sandbox CPU and memory; one snapshot with -o json/yaml or in a pipe.", single=True)


@contextlib.contextmanager
def terminate_seen() -> Iterator[list[int]]:
    """While inside, the SIGTERM/SIGHUP signals received (the list yielded). katactl.interrupt makes SIGTERM
    and SIGHUP a KeyboardInterrupt, as Ctrl-C; a live table's quit key is Ctrl-C alone, so a
    kill (timeout(1), systemd) or a closed terminal still ends it as interrupted, exit 130
    (design.md), never as a quiet 0. The handlers in place are kept and called; a signal
    ignored (nohup) stays ignored."""
    import signal
    import threading

    seen: list[int] = []
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            prev = signal.getsignal(sig)
            if callable(prev):
                def on(signum, frame, prev=prev):
                    seen.append(signum)
                    prev(signum, frame)
                old[sig] = signal.signal(sig, on)
    try:
        yield seen
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _columns():
    from katactl.output import Column
    from katactl.sandbox import pod_ref
    from katactl.values import format_size

    return [
        Column("ID", lambda it: it["id"][:13]),
        Column("POD", lambda it: pod_ref(it.get("pod"))),
        Column("CPU%", "cpuPercent.total"),
        Column("SHIM%", "cpuPercent.shim", wide=True),
        Column("HV%", "cpuPercent.hypervisor", wide=True),
        Column("GUEST-USED", "guestMemUsed", fmt=format_size),
        Column("GUEST-AVAIL", "guestMemAvailable", fmt=format_size),
        Column("GUEST-TOTAL", "guestMemTotal", fmt=format_size, wide=True),
        Column("BALLOON", "balloonBytes", fmt=format_size),
        Column("SHIM-RSS", "shimRSS", fmt=format_size),
        Column("HV-RSS", "hypervisorRSS", fmt=format_size),
        Column("ERROR", "error.message"),
        Column("NOTE", "note", wide=True),
    ]


@app.command()
def top(
    ctx: typer.Context,
    interval: str = typer.Option("2s", "--interval", "-d", metavar="DURATION",
                                 help="Refresh interval; also the CPU sampling window of a snapshot."),
    # the metavar lists metrics.TOP_SORTS (tests keep them in step; completions read it)
    sort: str = typer.Option("cpu", "--sort", metavar="cpu|mem|rss|id|pod",
                             help="Sort order: CPU %, guest memory used, shim+hypervisor RSS, id or pod."),
    once: bool = typer.Option(False, "--once", help="One snapshot even on a terminal."),
    iterations: Optional[int] = typer.Option(None, "--iterations", metavar="N",
                                             help="Stop after N refreshes (live mode)."),
) -> None:
    """Per-sandbox CPU % (shim + hypervisor, from proc_stat deltas), guest memory
    used/available (kata_guest_meminfo), balloon size (kata_guest_vm_stat
    balloon_inflate) and shim/hypervisor RSS. All shims are scraped concurrently.
    Guest used leaves out the pages the balloon holds, as 'balloon get' does.

    On a terminal the view refreshes every --interval until Ctrl-C, which ends
    it at once and quietly with exit 0 (its normal stop, as procps top and watch
    do); SIGTERM and SIGHUP end it as an interruption (exit 130). With -o
    json/yaml or in a pipe it prints one snapshot (two scrapes --interval
    apart), and Ctrl-C there is an interruption (exit 130).
    A shim that does not answer is a row with an error; the snapshot then exits
    4 (partial failure), or that error's code when no shim answered.

    \b
    Examples:
      katactl top
      katactl top --sort mem
      katactl top -o json --interval 1s | jq '.items[] | {id, cpu: .cpuPercent.total}'
      katactl -N node-1,node-2 top --once
    """
    from katactl import metrics
    from katactl.errors import UsageError
    from katactl.values import parse_duration

    app_ctx = state(ctx)
    if sort not in metrics.TOP_SORTS:
        raise UsageError(f"invalid --sort {sort!r} (choose from {', '.join(metrics.TOP_SORTS)})")
    if iterations is not None and iterations < 1:
        raise UsageError(f"invalid --iterations {iterations}: must be at least 1")
    ival = parse_duration(interval, what="--interval")
    if ival < 0.1:
        raise UsageError(f"invalid --interval {interval!r}: at least 100ms")
    timeout = min(float(app_ctx.settings.request_timeout), max(ival, 5.0))
    out = app_ctx.out
    live = out.stdout_tty and out.fmt in ("table", "wide") and not once
    if not live:
        def fn(transport: NodeTransport):
            return metrics.sort_rows(metrics.top_snapshot(transport, interval=ival, timeout=timeout), sort)

        fan_out_list(app_ctx, fn, kind="SandboxTopList", columns=_columns(), name_key="id",
                     item_error=lambda row: row.get("error"))
        return
    with terminate_seen() as seen:
        _live(app_ctx, ival, timeout, sort, iterations, seen)


def _live(app_ctx, ival: float, timeout: float, sort: str, iterations: int | None, seen: list[int]) -> None:
    """The Rich Live view: a frame per metrics.TopFleet refresh until --iterations or
    Ctrl-C, the live view's documented way to stop: exit 0, no message, at once (a
    scrape stuck on a shim is abandoned; katactl.cli.main does not wait for it).
    SIGTERM and SIGHUP are no quit key: exit 130, as everywhere."""
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text
    from rich import box

    from katactl import interrupt, metrics
    from katactl.output import Column, printable

    fleet = metrics.TopFleet(app_ctx.settings, timeout=timeout)
    try:
        rows, errors = fleet.refresh(sort)
    except KeyboardInterrupt:
        if seen:
            raise
        return
    if errors and len(fleet.nodes) == 1:  # one node: its failure is the command's, as without a TTY
        from katactl.fleet import FanOut

        FanOut(fleet.nodes, {}, errors).raise_if_only_node_failed()
    cols = [c for c in _columns() if app_ctx.out.fmt == "wide" or not c.wide]
    shown = ([Column("NODE", "node")] if fleet.multi else []) + cols
    console = Console(file=app_ctx.out.stdout, no_color=not app_ctx.out.color, highlight=False)

    def frame(rows, errors):
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold",
                  title=f"katactl top - {len(rows)} sandboxes - every {ival:g}s - {time.strftime('%H:%M:%S')}")
        for c in shown:
            t.add_column(c.header, overflow="fold")
        for r in rows:
            t.add_row(*[Text(c.value(r)) for c in shown])  # Text: data is never markup
        for n, e in errors.items():
            t.caption = Text.assemble(t.caption or "", f"{n}: {printable(e.message)}  ")
        return t

    n = 0
    try:
        with Live(frame(rows, errors), console=console, auto_refresh=False, screen=False) as lv:
            while iterations is None or n < iterations - 1:
                interrupt.sleep(ival)  # a Ctrl-C lost in a finalizer still ends the view
                rows, errors = fleet.refresh(sort)
                lv.update(frame(rows, errors), refresh=True)
                n += 1
    except KeyboardInterrupt:
        if seen:
            raise
        return
    if len(errors) == len(fleet.nodes):  # --iterations ended with no node answering: as `top --once`
        from katactl.errors import exit_code_for, outcome_exit_code

        for node, e in errors.items():
            app_ctx.out.error(f"{node}: {e.message}")
        raise typer.Exit(outcome_exit_code([exit_code_for(e) for e in errors.values()], 0))
