"""katactl shim agent-url | iptables get|set | volume stats|resize."""
from __future__ import annotations

import typer

from katactl.commands._common import SANDBOX_HELP, finish, new_app, sandbox_ref, state

app = new_app("The other shim management endpoints: agent-url, iptables, direct-volume.")
iptables_app = new_app("Guest iptables rules through the shim (iptables-save text).")
volume_app = new_app("Direct-assigned volumes through the shim: stats, resize.")
app.add_typer(iptables_app, name="iptables")
app.add_typer(volume_app, name="volume")


def _on_sandbox(app_ctx, target: str, op, *args, **kw) -> dict:
    """op(transport, sandbox, *args, timeout=--timeout, **kw), a shim_ops function, run on
    the node holding SANDBOX; its result."""
    from katactl import sandbox

    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.request_timeout)
    return sandbox.on_sandbox(settings, ref, lambda t, sb: op(t, sb, *args, timeout=timeout, **kw))[2]


def _finish_mutation(app_ctx, kind: str, res: dict) -> None:
    from katactl.output import Result

    finish(app_ctx, Result.mutation(kind, res))


def _text_out(app_ctx) -> bool:
    """Text output (not json/yaml): the endpoint's own text is the data."""
    return app_ctx.out.human or app_ctx.out.fmt == "name"


@app.command("agent-url")
def agent_url(ctx: typer.Context,
              target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP)) -> None:
    """Print the kata-agent URL the shim talks to (vsock://CID:1024, hvsock://...).

    \b
    Examples:
      katactl shim agent-url 3f2a
      katactl shim agent-url batch/train-0 -o json
    """
    from katactl import shim_ops
    from katactl.output import Result, printable

    app_ctx = state(ctx)
    res = _on_sandbox(app_ctx, target, shim_ops.agent_url)
    if _text_out(app_ctx):
        # one value from the shim, not a document read back by tools: escape what it sent
        app_ctx.out.text(printable(res["agentURL"]))
        return
    finish(app_ctx, Result(kind="AgentURL", item=res))


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
    from katactl import shim_ops
    from katactl.output import Result

    app_ctx = state(ctx)
    res = _on_sandbox(app_ctx, target, shim_ops.iptables_get, v6=v6)
    if _text_out(app_ctx):
        app_ctx.out.text(res["rules"])
        return
    finish(app_ctx, Result(kind="IPTables", item=res))


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

    from katactl import shim_ops

    app_ctx = state(ctx)
    src = "stdin" if file == "-" else file
    data = shim_ops.read_rules(file, getattr(sys.stdin, "buffer", sys.stdin))
    shim_ops.validate_rules(data, src)  # usage errors before resolving the sandbox
    res = _on_sandbox(app_ctx, target, shim_ops.iptables_set, data, v6=v6, dry_run=dry_run, source=src)
    _finish_mutation(app_ctx, "IPTablesSet", res)


#: what VOLUME_PATH is, for both volume commands
VOLUME_PATH_HELP = ("The volume's path on the host, as the CSI driver published it and registered it with "
                    "'kata-runtime direct-volume add' (not the device, not the guest path).")


@volume_app.command("stats")
def volume_stats(ctx: typer.Context,
                 target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                 path: str = typer.Argument(..., metavar="VOLUME_PATH", help=VOLUME_PATH_HELP)) -> None:
    """Usage of a direct-assigned volume inside the guest (bytes and inodes).

    Like 'kata-runtime direct-volume stats', katactl reads the volume's
    mountInfo.json (under /run/kata-containers/shared/direct-volumes on the
    node, in a directory named by VOLUME_PATH in base64) and asks the shim
    about its device; exit 3 when the volume is not registered there.

    The device and the guest's volume condition (CSI VolumeCondition) follow
    the table on stderr. An abnormal condition is a warning and the exit code
    stays 0, as kubelet makes it an event and keeps the stats: in scripts,
    test .condition.abnormal in -o json.

    \b
    Examples:
      katactl shim volume stats 3f2a /mnt/disks/pvc-1
      katactl shim volume stats batch/train-0 /mnt/disks/pvc-1 -o json
    """
    from katactl import shim_ops
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    shim_ops.check_volume_path(path)  # a usage error before resolving the sandbox
    res = _on_sandbox(app_ctx, target, shim_ops.volume_stats, path)
    usage = res.pop("usage")
    cols = [Column("UNIT", "unit"), Column("TOTAL", "total"), Column("USED", "used"),
            Column("AVAILABLE", "available")]
    cond = res.get("condition")
    if isinstance(cond, dict) and cond.get("abnormal") is True:
        app_ctx.out.warn(f"volume {path} (device {res['device']}) is abnormal: {cond.get('message') or 'no message'}")
    # the table holds usage only: where the device and the condition are said in human formats
    summary = f"device {res['device']}, condition {_condition_text(cond)}"
    finish(app_ctx, Result(kind="VolumeStats", item=res, items=usage, columns=cols, name_key="unit",
                           summary=summary))


def _condition_text(cond) -> str:
    """A shim's volume_condition in words. An abnormal one's message is in the warning.

    CSI VolumeCondition (container-storage-interface spec.md, NodeGetVolumeStats):
    abnormal false is "available for use and operating optimally"; kubelet
    (pkg/kubelet/server/stats/volume_stat_calculator.go) turns abnormal into a
    VolumeConditionAbnormal Warning event on the pod and keeps the stats."""
    if not isinstance(cond, dict):
        return "not reported"
    ab, msg = cond.get("abnormal"), cond.get("message")
    if ab is True:
        return "abnormal"
    if ab is False:
        return f"normal ({msg})" if msg else "normal"
    return f"unknown (abnormal: {ab!r})"


@volume_app.command("resize")
def volume_resize(ctx: typer.Context,
                  target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                  path: str = typer.Argument(..., metavar="VOLUME_PATH", help=VOLUME_PATH_HELP),
                  size: str = typer.Argument(..., metavar="SIZE", help="New size: 10Gi, 500M, bytes."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing.")) -> None:
    """Resize a direct-assigned volume in the guest to SIZE (after growing it on the host).

    VOLUME_PATH is translated to the volume's device through its mountInfo.json,
    as for 'shim volume stats'. The guest only reports its filesystem's size, which is always smaller
    than the device (metadata, journal), so the resize is sent unless the
    filesystem already holds SIZE; changed says whether it grew (re-running
    after success reports changed: false). With --dry-run, changed says
    whether the resize would be sent. Every attempt is audited.

    \b
    Examples:
      katactl shim volume resize 3f2a /mnt/disks/pvc-1 20Gi
      katactl shim volume resize 3f2a /mnt/disks/pvc-1 20Gi --dry-run -o json
    """
    from katactl import shim_ops
    from katactl.values import parse_size

    app_ctx = state(ctx)
    shim_ops.check_volume_path(path)
    nbytes = parse_size(size, what="volume size")
    res = _on_sandbox(app_ctx, target, shim_ops.volume_resize, path, nbytes, dry_run=dry_run)
    _finish_mutation(app_ctx, "VolumeResize", res)
