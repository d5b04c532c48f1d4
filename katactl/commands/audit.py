"""katactl audit: check a node's co-location isolation against a policy."""
from __future__ import annotations

from typing import Optional

import typer

from katactl.commands._common import new_app, state

app = new_app("Check co-location isolation (CPU, BVT, memcg, RDT, Kata cgroups) against a policy.", single=True)


@app.command()
def audit(
    ctx: typer.Context,
    policy: Optional[str] = typer.Option(None, "--policy", "-p", metavar="FILE",
                                         help="TOML policy (default: koordinator's defaults; "
                                              "see docs/audit-policy.example.toml)."),
    fail_on: str = typer.Option("medium", "--fail-on", metavar="SEVERITY",
                                help="Exit 8 when a finding has this severity or higher: "
                                     "info, low, medium, high, critical."),
    list_checks: bool = typer.Option(False, "--list-checks", help="List the checks and their severities."),
) -> None:
    """Audit the co-location isolation policy on the node(s).

    Checks: online pods pinned or high-weight; offline Kata sandboxes
    low-weight with bvt -1 on the cgroup holding their vCPUs; the BVT switch;
    BE L3 share <= 30 %; memcg priorities ordered online > offline;
    watermarks; vCPU threads inside the sandbox cgroup; and
    sandbox_cgroup_only=false leaving the shim and virtiofsd (on cgroup v1 the
    VMM's non-vCPU threads too) in kata_overhead outside the offline limits. Each finding has a severity, the evidence
    (file and value) and a fix hint. Kernel features that are missing (no BVT,
    no resctrl) are "info" findings with status "unsupported", not errors. The
    I/O weight compared is the one a disk obeys: io.bfq.weight (v1:
    blkio.bfq.weight[_device]) where its scheduler is bfq, io.weight where
    iocost is on. A check whose input could not be read or parsed is a
    finding of that check with status "unknown" (at its severity): an
    unverified node never passes silently.

    Exit codes: 0 no finding at or above --fail-on, 8 otherwise (unknown
    ones included), 2 bad policy.

    \b
    Examples:
      katactl audit
      katactl audit --policy /etc/katactl/audit-policy.toml --fail-on high
      katactl -N @batch-nodes audit -o json     # for Ansible: parse .items
      katactl audit --list-checks
    """
    from katactl.commands._common import _progress_cb, finish
    from katactl.errors import ExitCode, UsageError
    from katactl.fleet import run_on_nodes
    from katactl.isolation import audit as lib
    from katactl.isolation import policy as pol_mod
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    if fail_on not in pol_mod.SEVERITIES:
        raise UsageError(f"invalid --fail-on {fail_on!r}: choose from {', '.join(pol_mod.SEVERITIES)}")
    pol = pol_mod.load(policy)
    if list_checks:
        rows = [{"check": c, "severity": pol.severity_of(c), "enabled": pol.enabled(c), "meaning": m}
                for c, (_, m) in pol_mod.CHECKS.items()]
        finish(app_ctx, Result(kind="AuditCheckList", items=rows, name_key="check",
                               columns=[Column("CHECK", "check"), Column("SEVERITY", "severity"),
                                        Column("ENABLED", "enabled"), Column("MEANING", "meaning")]))
        return
    cols = [Column("SEVERITY", "severity"), Column("CHECK", "check"), Column("TARGET", "target"),
            Column("MESSAGE", "message"),
            Column("EVIDENCE", lambda i: "; ".join(f"{e['file']}{'#' + e['key'] if e.get('key') else ''}="
                                                   f"{e['value']}" for e in i["evidence"]), wide=True),
            Column("FIX", "fix", wide=True)]
    fo = run_on_nodes(app_ctx.settings, lambda t: lib.run(t, pol), progress=_progress_cb(app_ctx))
    fo.raise_if_single_failure()
    items, meta, failed = lib.merge({n: fo.values[n] for n in fo.nodes if n in fo.values}, fail_on, pol,
                                    multi=fo.multi)
    if fo.errors:  # a node that could not be audited is no pass (its error is in errors)
        meta["passed"] = False
    counts = meta["counts"]
    verdict = "FAILED" if failed else "incomplete" if fo.errors else "passed"
    summary = (f"audit {verdict} (--fail-on {fail_on}): "
               + ", ".join(f"{counts[s]} {s}" for s in reversed(pol_mod.SEVERITIES) if counts[s])
               + (f" ({meta['unknown']} not checked: status unknown)" if meta["unknown"] else "")
               if items else f"audit {'incomplete' if fo.errors else 'passed'}: no findings "
               f"(policy: {pol.source})" + (f"; {len(fo.errors)} node(s) not audited" if fo.errors else ""))
    res = Result(kind="AuditReport", items=items, item=meta, columns=cols, errors=fo.error_items(),
                 multi_node=fo.multi, name_key="check", summary=summary)
    code = fo.exit_code()
    if failed and code == ExitCode.OK:
        code = ExitCode.CHECK_FAILED
    finish(app_ctx, res, code)
