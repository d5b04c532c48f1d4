"""katactl balloon get | set SANDBOX."""
from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Optional

import typer

from katactl.commands._common import SANDBOX_HELP, finish, new_app, sandbox_ref, state

if TYPE_CHECKING:  # annotations only: a command's --help does not import the backends
    from katactl.backends.base import NodeTransport

app = new_app("Memory elasticity: a sandbox's balloon (guest-visible memory target, or reclaim N).")

PATH_METAVAR = "auto|extension|hypervisor-api|extra-monitor|qmp"  # balloon.PATHS: a test keeps them equal
# --path, not --via: the global --via ssh|kube says how the node is reached, and a leaf
# option of the same name would shadow it after the subcommand (one meaning per flag)
PATH_HELP = "Force one path: extension, hypervisor-api, extra-monitor, qmp (default: the first that works)."


def _check_path(path: str) -> None:
    """A bad --path is exit 2 before any node is contacted."""
    from katactl import balloon
    from katactl.errors import UsageError

    if path not in ("auto",) + balloon.PATHS:
        raise UsageError(f"invalid --path {path!r} (choose from auto, {', '.join(balloon.PATHS)})")


def _columns():
    from katactl.output import Column
    from katactl.values import format_size

    return [Column("SANDBOX", lambda i: (i.get("sandbox") or "")[:12]), Column("POD", "podRef"),
            Column("HYPERVISOR", "hypervisor"), Column("PATH", "path"),
            Column("MEMORY", "memoryBytes", fmt=format_size), Column("TARGET", "targetBytes", fmt=format_size),
            Column("ACTUAL", "actualBytes", fmt=format_size),
            Column("GUEST-USED", "guest.usedBytes", fmt=format_size),
            Column("GUEST-AVAILABLE", "guest.availableBytes", fmt=format_size)]


def _human(item: dict) -> dict:
    """The describe() view for table/plain output: sizes readable, internals hidden."""
    from katactl.values import format_size

    g = item.get("guest") or {}
    out = {"sandbox": item.get("sandbox"), "pod": item.get("podRef"), "hypervisor": item.get("hypervisor"),
           "path": item.get("path"), "memory": format_size(item.get("memoryBytes")),
           "target": format_size(item.get("targetBytes")) if item.get("targetBytes") is not None
           else "unknown (QEMU does not report it)",
           "actual": format_size(item.get("actualBytes")),
           "guest": ({k: format_size(v) for k, v in (("total", g.get("totalBytes")), ("used", g.get("usedBytes")),
                                                      ("available", g.get("availableBytes"))) if v is not None}
                     if g else "no statistics")}
    for k in ("changed", "dryRun", "converged"):
        if item.get(k) is not None:
            out[k] = item[k]
    return out


@app.command("get")
def get(ctx: typer.Context,
        target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
        path: str = typer.Option("auto", "--path", metavar=PATH_METAVAR, help=PATH_HELP)) -> None:
    """Show a sandbox's balloon: target, actual guest memory, guest used/available, and the path used.

    Paths, in order: the shim's katactl extension, the hypervisor's API (Cloud
    Hypervisor, Firecracker), QEMU's extra-monitor.sock, a free qmp.sock.

    \b
    Examples:
      katactl balloon get 3f2a
      katactl balloon get batch/train-0 -o json
      # a lab started with: katactl lab up --root /tmp/mylab
      katactl --host-root /tmp/mylab balloon get lab/batch-qemu-0 --path extra-monitor
    """
    from katactl import balloon, sandbox
    from katactl.output import Result

    app_ctx = state(ctx)
    _check_path(path)
    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.request_timeout)
    node, sb, item = sandbox.on_sandbox(settings, ref, lambda t, s: balloon.get(t, s, via=path, timeout=timeout),
                                        require_live=False)
    _render(app_ctx, Result(kind="Balloon", item={"node": node, **item}, name_key="sandbox"))


def _render(app_ctx, res) -> None:
    """A balloon's state: the item's warnings first; a readable view on a terminal."""
    from katactl.output import Result

    for w in res.item.get("warnings") or []:
        app_ctx.out.warn(w)
    if app_ctx.out.human:
        finish(app_ctx, Result(kind=res.kind, item=_human(res.item), changed=res.changed, dry_run=res.dry_run))
        return
    finish(app_ctx, res)


@contextlib.contextmanager
def _unchanged_on_failure():
    """A failed ``balloon set`` reports ``changed`` as its success does (docs/output.md
    "Failures"): false, unless balloon.set says the request was sent."""
    from katactl.errors import Interrupted, KatactlError

    try:
        yield
    except KatactlError as e:
        if e.changed is None:
            e.changed = False
        raise
    except KeyboardInterrupt:  # before the request (after it, balloon.set made it an Interrupted)
        err = Interrupted("interrupted")
        err.changed = False
        raise err from None


@app.command("set")
def set_(ctx: typer.Context,
         target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
         size: Optional[str] = typer.Option(None, "--target", "-t", metavar="SIZE",
                                            help="Guest-visible memory to keep, e.g. 1Gi, 768Mi (Kubernetes units: Gi Mi binary, G M decimal)."),
         reclaim: Optional[str] = typer.Option(None, "--reclaim", metavar="SIZE",
                                               help="Take SIZE more from the current target. Relative: every run takes SIZE "
                                                    "again (not idempotent; use --target in automation)."),
         release: bool = typer.Option(False, "--release", help="Deflate the balloon: give all memory back."),
         wait: bool = typer.Option(False, "--wait", "-w",
                                   help="Wait until the guest's memory reaches the target. Refused (exit 5) where "
                                        "the hypervisor does not report it (Firecracker without balloon statistics)."),
         wait_timeout: Optional[str] = typer.Option(None, "--timeout", metavar="DURATION",
                                                    help="How long --wait waits (default 60s; exit 6 when "
                                                         "exceeded). Needs --wait."),
         tolerance: str = typer.Option("4Mi", "--tolerance", metavar="SIZE",
                                       help="How close to the target counts as reached."),
         margin: str = typer.Option("64Mi", "--margin", metavar="SIZE",
                                    help="Refuse targets below the guest's used memory plus SIZE."),
         force: bool = typer.Option(False, "--force", help="Skip the used+margin and VM-size safety checks."),
         dry_run: bool = typer.Option(False, "--dry-run", help="Check and report; change nothing."),
         path: str = typer.Option("auto", "--path", metavar=PATH_METAVAR, help=PATH_HELP)) -> None:
    """Set the memory a sandbox's guest keeps (one meaning on every hypervisor).

    --target is the guest-visible memory; katactl converts it per hypervisor
    (QEMU takes the guest size; Cloud Hypervisor and Firecracker the balloon
    size). --reclaim takes memory away from the current target; --release
    gives everything back. Refuses (exit 5) a target below the guest's used
    memory plus --margin or above the VM's memory, unless --force. When the
    guest's usage is unknown (no guest statistics, or statistics older than
    the balloon's last move), it refuses to shrink the guest unless --force.
    The balloon moves in whole units (Firecracker: MiB; QEMU and Cloud
    Hypervisor: 4 KiB pages): the target really set, reported as
    effectiveTargetBytes and waited for, is the request rounded to them.
    Re-running --target or --release after success reports changed: false
    and sends nothing (through a QEMU monitor, which cannot report its
    target, the request is sent again: harmless). --reclaim is not: it is
    relative to the current target and takes SIZE again on every run (use
    --target in scripts and Ansible). Every request sent goes to the audit
    log, before it is sent and again with its outcome.

    \b
    Examples:
      katactl balloon set 3f2a --target 1Gi --wait
      katactl balloon set batch/train-0 --reclaim 512Mi --dry-run -o json
      katactl balloon set 3f2a --release --wait --timeout 2m
    """
    from katactl import balloon, sandbox
    from katactl.errors import UsageError
    from katactl.output import Result
    from katactl.values import parse_duration, parse_size

    with _unchanged_on_failure():  # every failure says changed: false, unless the request was sent
        app_ctx = state(ctx)
        chosen = [n for n, v in (("--target", size is not None), ("--reclaim", reclaim is not None),
                                 ("--release", release)) if v]
        if len(chosen) != 1:
            raise UsageError("give exactly one of --target SIZE, --reclaim SIZE or --release"
                             + (f" (got {', '.join(chosen)})" if chosen else ""))
        tgt = parse_size(size, what="--target") if size is not None else None
        rec = parse_size(reclaim, what="--reclaim") if reclaim is not None else None
        tol = parse_size(tolerance, what="--tolerance", allow_zero=True)
        mar = parse_size(margin, what="--margin", allow_zero=True)
        if wait_timeout is not None and not wait:
            # a deadline for a wait that never happens would be silently ignored (kubectl
            # refuses such pairs too): the caller meant --wait, or meant nothing
            raise UsageError("--timeout needs --wait (it is how long --wait waits)",
                             hint="add --wait, or drop --timeout")
        wt = parse_duration(wait_timeout if wait_timeout is not None else "60s", what="--timeout")
        _check_path(path)
        settings, ref = sandbox_ref(app_ctx, target)
        timeout = float(app_ctx.settings.request_timeout)
        out = app_ctx.out
        if rec is not None and not dry_run and not sys.stdin.isatty():
            # a script or Ansible re-run would shrink the guest again each time
            out.warn(f"--reclaim is relative: every run takes {reclaim} more (not idempotent); "
                     "use --target SIZE in automation")

        def run(transport: NodeTransport, sb):
            with out.progress(f"balloon {sb.id[:12]}", total=None, unit="bytes") as bar:
                def progress(ev):
                    out.event("BalloonProgress", sandbox=sb.id, **ev)
                    span = abs(ev["startBytes"] - ev["targetBytes"]) or 1
                    bar.update(completed=span - abs(ev["actualBytes"] - ev["targetBytes"]), total=span)

                return balloon.set(transport, sb, target=tgt, reclaim=rec, release=release, wait=wait, wait_timeout=wt,
                                   tolerance=tol, margin=mar, force=force, dry_run=dry_run, via=path,
                                   timeout=timeout, progress=progress)

        node, sb, item = sandbox.on_sandbox(settings, ref, run, require_live=False)
    _render(app_ctx, Result.mutation("BalloonChange", {"node": node, **item}, name_key="sandbox"))
