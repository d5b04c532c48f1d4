"""katactl lab up | status | down."""
from __future__ import annotations

from typing import Optional

import typer

from katactl.commands._common import finish, new_app, require_audit, state

app = new_app("A local Kata-like node (real QEMU micro-VMs where installed) to try every command on.")

ROOT_HELP = ("Lab directory (default /tmp/katactl-lab-UID with your numeric uid, /tmp/katactl-lab "
             "for root; KATACTL_LAB_ROOT when set).")


def _columns():
    from katactl.output import Column
    from katactl.values import format_size

    return [Column("NAME", "name"), Column("SANDBOX", lambda i: i["id"][:12]), Column("POD", "podRef"),
            Column("HYPERVISOR", "hypervisor"), Column("STATUS", "status"),
            Column("MEMORY", "memoryBytes", fmt=format_size),
            Column("QEMU-PID", "qemuPid", wide=True), Column("ID", "id", wide=True)]


def _render(app_ctx, st: dict, *, mutating: bool = False) -> None:
    """A lab's state (from up: a mutation carrying changed/dryRun; from status: not)."""
    from katactl.output import Result

    item = {k: v for k, v in st.items() if k not in ("apiVersion", "kind")}
    res = Result.mutation("Lab", item) if mutating else Result(kind="Lab", item=item)
    items = st.get("sandboxes") or []
    if st.get("status") == "planned":
        summary = (f"dry run: would start a lab at {st.get('root')} with {len(items)} sandbox(es)"
                   + (" (after removing a dead lab's leftovers)" if st.get("removesDeadLab") else ""))
    elif st.get("status") == "dead":  # the error names the way out (lab down, then up)
        summary = f"lab dead at {st.get('root')}: {st.get('error')}"
    else:
        summary = (f"lab {st.get('status')} at {st.get('root')} (daemon pid {st.get('pid')}); "
                   f"use: katactl --host-root {st.get('root')} sandbox list")
    if app_ctx.out.human or app_ctx.out.fmt == "name":
        finish(app_ctx, Result(kind="LabSandboxList", items=items, columns=_columns(), name_key="id",
                               summary=summary, changed=res.changed, dry_run=res.dry_run))
        return
    finish(app_ctx, res)


def _busy(root: str) -> str:
    return f"waiting for another 'katactl lab up' or 'lab down' at {root} to finish..."


@app.command("up")
def up(ctx: typer.Context,
       sandboxes: int = typer.Option(2, "--sandboxes", "-s", metavar="N", help="How many sandboxes (1-16)."),
       hypervisor: str = typer.Option("qemu", "--hypervisor", metavar="qemu|clh|fc|mixed",
                                      help="qemu, clh, fc, or mixed (one of each in turn)."),
       root: Optional[str] = typer.Option(None, "--root", metavar="DIR", help=ROOT_HELP),
       kernel: Optional[str] = typer.Option(None, "--kernel", metavar="FILE",
                                            help="Guest kernel (default: the Debian cloud kernel, fetched once)."),
       memory: str = typer.Option("512Mi", "--memory", metavar="SIZE", help="Memory of each VM."),
       dry_run: bool = typer.Option(False, "--dry-run",
                                    help="Show the sandboxes that would be started; start nothing.")) -> None:
    """Start a lab node: Kata's /run/vc layout, shim sockets, real QEMU micro-VMs.

    QEMU sandboxes are real VMs (TCG) with a virtio-balloon and pvpanic; the lab
    daemon holds each qmp.sock as the Kata runtime does, serves each shim
    management socket (with the katactl extension and a direct volume), and
    dumps guest memory on a guest panic as the Go runtime does. Cloud
    Hypervisor and Firecracker sandboxes are protocol-faithful API servers. The
    host's /proc and /sys/fs/cgroup (and /sys/fs/resctrl when mounted) are
    linked under the root, so inspect, audit and upgrade see real processes.

    Re-running with the same options is a no-op (changed: false); a lab with
    other options already running there is refused (exit 5): 'lab down' first.

    \b
    Examples:
      katactl lab up
      katactl lab up --sandboxes 3 --hypervisor mixed
      katactl lab up --dry-run -o json
      katactl lab up --root /tmp/mylab
      katactl --host-root /tmp/mylab sandbox list
      katactl --host-root /tmp/mylab balloon set lab/batch-qemu-0 --target 256Mi --wait
      katactl lab down --root /tmp/mylab
    """
    from katactl.errors import UsageError
    from katactl.lab import control
    from katactl.values import parse_size

    app_ctx = state(ctx)
    mem = parse_size(memory, what="--memory")
    if mem % (1 << 20):
        raise UsageError(f"invalid --memory {memory!r}: must be a whole number of MiB")
    # every input checked before a word is printed or a file touched
    root, _, _ = control.plan(root, sandboxes=sandboxes, hypervisor=hypervisor, kernel=kernel,
                              memory_mib=mem >> 20)
    if dry_run:
        st = control.up(root, sandboxes=sandboxes, hypervisor=hypervisor, kernel=kernel, memory_mib=mem >> 20,
                        dry_run=True)
        _render(app_ctx, st, mutating=True)
        return
    require_audit(dry_run=False)
    if not app_ctx.out.machine and not control.is_running(root):
        app_ctx.out.info("starting the lab (the first run downloads a Debian cloud kernel)...")
    st = control.up(root, sandboxes=sandboxes, hypervisor=hypervisor, kernel=kernel, memory_mib=mem >> 20,
                    on_wait=lambda: app_ctx.out.info(_busy(root)))
    _render(app_ctx, st, mutating=True)


@app.command("status")
def status(ctx: typer.Context,
           root: Optional[str] = typer.Option(None, "--root", metavar="DIR", help=ROOT_HELP)) -> None:
    """Show the lab's sandboxes and the daemon's state (exit 3 when there is no lab).

    \b
    Examples:
      katactl lab status
      katactl lab status -o json
    """
    from katactl.errors import ExitCode
    from katactl.lab import control

    app_ctx = state(ctx)
    st = control.status(root)
    _render(app_ctx, st)
    if st.get("status") == "dead":
        raise typer.Exit(int(ExitCode.FAILED))


@app.command("down")
def down(ctx: typer.Context,
         root: Optional[str] = typer.Option(None, "--root", metavar="DIR", help=ROOT_HELP),
         dry_run: bool = typer.Option(False, "--dry-run",
                                      help="Show the processes that would be stopped and the directory "
                                           "that would be removed; change nothing."),
         force: bool = typer.Option(False, "--force",
                                    help="When the recorded daemon pid is now another process, remove the "
                                         "lab's files anyway (that process is never signalled).")) -> None:
    """Stop the lab: its VMs and daemon end, and its directory is removed.

    Only a directory carrying the lab's marker (.katactl-lab) is removed; the
    links to the host's /proc and /sys/fs/cgroup are unlinked, never followed.
    No lab there: a no-op (changed: false).

    Only processes the lab started are signalled: the daemon's pid must still
    be the same process (start time and command line recorded at start), else
    exit 5 and nothing is touched (--force: remove the files, signal nothing).

    \b
    Examples:
      katactl lab down
      katactl lab down --dry-run
      katactl lab down --root /tmp/mylab
    """
    from katactl.lab import control
    from katactl.output import Result

    app_ctx = state(ctx)
    root = control.lab_root(root)
    require_audit(dry_run)
    r = control.down(root, dry_run=dry_run, force=force, on_wait=lambda: app_ctx.out.info(_busy(root)))
    res = Result.mutation("LabDown", r)
    res.summary = (f"no lab at {r['root']}: nothing to do" if not res.changed else
                   f"dry run: would stop {len(r['stopped'])} process(es) and remove {r['root']}" if res.dry_run
                   else None)
    finish(app_ctx, res)
