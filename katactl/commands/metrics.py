"""katactl metrics SANDBOX."""
from __future__ import annotations

from typing import List, Optional

import typer

from katactl.commands._common import SANDBOX_HELP, finish, new_app, sandbox_ref, state

app = new_app("A sandbox's shim /metrics: parsed, filtered by family, or raw Prometheus text.",
              single=True)


@app.command()
def metrics(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
    family: Optional[List[str]] = typer.Option(None, "--family", metavar="PREFIX",
                                               help="Keep metric families starting with PREFIX (repeatable)."),
    raw: bool = typer.Option(False, "--raw", help="Print the Prometheus text as the shim sent it."),
) -> None:
    """Scrape one sandbox's shim management socket (/metrics) and show the samples.

    Families: kata_shim_*, kata_hypervisor_*, kata_agent_*, kata_guest_*
    (kata_guest_meminfo, kata_guest_vm_stat ...), and for the Go shim its
    own go_* and process_* families.

    \b
    Examples:
      katactl metrics 3f2a
      katactl metrics batch/train-0 --family kata_guest_meminfo
      katactl metrics 3f2a --raw --family kata_hypervisor_ > hv.prom
      katactl metrics 3f2a -o json | jq '.items[] | select(.labels.item=="mem_available")'
    """
    from katactl import metrics as m
    from katactl import sandbox
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    prefixes = m.validate_prefixes(family)
    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.request_timeout)
    node, sb, text = sandbox.on_sandbox(settings, ref, lambda t, s: m.scrape(t, s, timeout))
    if raw:
        app_ctx.out.text(m.filter_text(text, prefixes))
        return
    samples = m.parse(text, prefixes)
    if prefixes and not samples:
        app_ctx.out.warn(f"no metric family starts with {', '.join(prefixes)}")
    cols = [Column("METRIC", "name"),
            Column("LABELS", lambda s: ",".join(f"{k}={v}" for k, v in s["labels"].items()) or None),
            Column("VALUE", "value", fmt=_fmt_value),
            Column("TYPE", "type", wide=True)]
    finish(app_ctx, Result(kind="MetricSampleList", item={"node": node, "sandbox": sb.id},
                           items=samples, columns=cols, name_key="name",
                           summary=None))


def _fmt_value(v) -> str:
    f = float(v)
    if f == f and abs(f) < 1e18 and f.is_integer():
        return str(int(f))
    return f"{f:g}"
