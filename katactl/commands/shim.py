"""katactl shim agent-url | iptables get|set | volume stats|resize."""
from __future__ import annotations

import typer

from katactl.commands._common import finish, new_app, sandbox_ref, state

app = new_app("The other shim management endpoints: agent-url, iptables, direct-volume.")
iptables_app = new_app("Guest iptables rules through the shim (iptables-save text).")
volume_app = new_app("Direct-assigned volumes through the shim: stats, resize.")
app.add_typer(iptables_app, name="iptables")
app.add_typer(volume_app, name="volume")

SANDBOX_HELP = "Sandbox id, unique id prefix, NAMESPACE/POD or pod/NAMESPACE/NAME."


def _client_call(app_ctx, target: str, fn, require_live: bool = True):
    from katactl import sandbox
    from katactl.backends.shim import ShimClient

    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.timeout)

    def run(t, sb):
        with ShimClient.for_sandbox(t, sb, timeout=timeout) as c:
            return fn(c)

    return sandbox.on_sandbox(settings, ref, run, require_live=require_live)


@app.command("agent-url")
def agent_url(ctx: typer.Context,
              target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP)) -> None:
    """Print the kata-agent URL the shim talks to (vsock://CID:1024, hvsock://...).

    \b
    Examples:
      katactl shim agent-url 3f2a
      katactl shim agent-url batch/train-0 -o json
    """
    from katactl.output import Result

    app_ctx = state(ctx)
    node, sb, url = _client_call(app_ctx, target, lambda c: c.agent_url())
    if app_ctx.out.fmt in ("plain", "table", "wide", "name"):
        app_ctx.out.stdout.write(url + "\n")
        return
    finish(app_ctx, Result(kind="AgentURL", item={"node": node, "sandbox": sb.id, "agentURL": url}))


@iptables_app.command("get")
def iptables_get(ctx: typer.Context,
                 target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                 v6: bool = typer.Option(False, "--v6", help="IPv6 rules (ip6tables).")) -> None:
    """Print the guest's iptables rules (iptables-save format).

    \b
    Examples:
      katactl shim iptables get 3f2a > rules.v4
      katactl shim iptables get 3f2a --v6
    """
    from katactl.output import Result

    app_ctx = state(ctx)
    node, sb, rules = _client_call(app_ctx, target, lambda c: c.iptables_get(v6))
    if app_ctx.out.fmt in ("plain", "table", "wide", "name"):
        app_ctx.out.stdout.write(rules if rules.endswith("\n") or not rules else rules + "\n")
        return
    finish(app_ctx, Result(kind="IPTables", item={"node": node, "sandbox": sb.id, "v6": v6, "rules": rules}))


@iptables_app.command("set")
def iptables_set(ctx: typer.Context,
                 target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                 file: str = typer.Argument(..., metavar="FILE", help="iptables-save text ('-' = stdin)."),
                 v6: bool = typer.Option(False, "--v6", help="IPv6 rules (ip6tables)."),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing.")) -> None:
    """Replace the guest's iptables rules (iptables-restore semantics).

    Idempotent: when the guest already has exactly these rules nothing is
    sent and the result says changed: false. Rules larger than 8 MiB are
    refused (the limit get reads back). Every attempt, failed ones too, goes
    to the audit log.

    \b
    Examples:
      katactl shim iptables set 3f2a rules.v4
      katactl shim iptables set 3f2a rules.v6 --v6 --dry-run
      iptables-save | katactl shim iptables set batch/train-0 -
    """
    import sys

    from katactl import sandbox, shim_ops
    from katactl.output import Result

    app_ctx = state(ctx)
    src = "stdin" if file == "-" else file
    data = shim_ops.read_rules(file, getattr(sys.stdin, "buffer", sys.stdin))
    shim_ops.validate_rules(data, src)  # usage errors before resolving the sandbox
    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.timeout)
    _, _, res = sandbox.on_sandbox(settings, ref, lambda t, sb: shim_ops.iptables_set(
        t, sb, data, v6=v6, dry_run=dry_run, timeout=timeout, source=src))
    changed, dry = res.pop("changed"), res.pop("dryRun")
    finish(app_ctx, Result(kind="IPTablesSet", item=res, changed=changed, dry_run=dry))


@volume_app.command("stats")
def volume_stats(ctx: typer.Context,
                 target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                 path: str = typer.Argument(..., metavar="VOLUME_PATH",
                                            help="The direct volume's path (as passed to the shim).")) -> None:
    """Usage of a direct-assigned volume inside the guest (bytes and inodes).

    \b
    Examples:
      katactl shim volume stats 3f2a /dev/mapper/vol-1
      katactl shim volume stats 3f2a /dev/mapper/vol-1 -o json
    """
    from katactl.output import Column, Result
    from katactl.shim_ops import check_volume_path

    app_ctx = state(ctx)
    check_volume_path(path)
    node, sb, st = _client_call(app_ctx, target, lambda c: c.volume_stats(path))
    usage = []
    for u in st.get("usage") or []:
        if isinstance(u, dict):
            unit = {1: "bytes", 2: "inodes", "BYTES": "bytes", "INODES": "inodes"}.get(u.get("unit"), u.get("unit"))
            usage.append({"unit": unit, "total": u.get("total"), "used": u.get("used"),
                          "available": u.get("available")})
    cols = [Column("UNIT", "unit"), Column("TOTAL", "total"), Column("USED", "used"),
            Column("AVAILABLE", "available")]
    finish(app_ctx, Result(kind="VolumeStats", item={"node": node, "sandbox": sb.id, "path": path,
                                                     "condition": st.get("volume_condition")},
                           items=usage, columns=cols, name_key="unit"))


@volume_app.command("resize")
def volume_resize(ctx: typer.Context,
                  target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                  path: str = typer.Argument(..., metavar="VOLUME_PATH", help="The direct volume's path."),
                  size: str = typer.Argument(..., metavar="SIZE", help="New size: 10Gi, 500M, bytes."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing.")) -> None:
    """Resize a direct-assigned volume in the guest to SIZE (after growing it on the host).

    The guest only reports its filesystem's size, which is always smaller
    than the device (metadata, journal), so the resize is sent unless the
    filesystem already holds SIZE; changed says whether it grew (re-running
    after success reports changed: false). With --dry-run, changed says
    whether the resize would be sent. Every attempt is audited.

    \b
    Examples:
      katactl shim volume resize 3f2a /dev/mapper/vol-1 20Gi
      katactl shim volume resize 3f2a /dev/mapper/vol-1 20Gi --dry-run -o json
    """
    from katactl import sandbox, shim_ops
    from katactl.output import Result
    from katactl.values import parse_size

    app_ctx = state(ctx)
    shim_ops.check_volume_path(path)
    nbytes = parse_size(size, what="volume size")
    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.timeout)
    _, _, res = sandbox.on_sandbox(settings, ref, lambda t, sb: shim_ops.volume_resize(
        t, sb, path, nbytes, dry_run=dry_run, timeout=timeout))
    changed, dry = res.pop("changed"), res.pop("dryRun")
    finish(app_ctx, Result(kind="VolumeResize", item=res, changed=changed, dry_run=dry))
