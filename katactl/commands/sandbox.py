"""katactl sandbox list | inspect."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

from katactl.commands._common import SANDBOX_HELP, fan_out_list, finish, new_app, sandbox_ref, state

if TYPE_CHECKING:  # annotations only: a command's --help does not import the backends
    from katactl.backends.base import NodeTransport

app = new_app("List and inspect Kata sandboxes on node(s), mapped to their pods.")

def _columns():
    from katactl.output import Column
    from katactl.sandbox import pod_ref
    from katactl.values import format_size

    def mem(it):
        tot = it.get("totalMemoryMiB")
        return None if tot is None else format_size(tot << 20)

    return [
        Column("ID", lambda it: it["id"][:13]),
        Column("POD", lambda it: pod_ref(it.get("pod"))),
        Column("STATE", "state"),
        Column("HYPERVISOR", "hypervisor"),
        Column("PID", "hypervisorPid"),
        Column("VCPUS", "vcpus", fmt=lambda v: f"{v:g}"),
        Column("MEMORY", mem),
        Column("AGE", "age"),
        Column("RUNTIME", "runtime", wide=True),
        Column("FULL-ID", "id", wide=True),
        Column("API-SOCKET", "sockets.api", wide=True),
        Column("CGROUP", "cgroup.sandbox", wide=True),
        Column("HANDLER", "kataConfig.runtimeHandler", wide=True),
        Column("KATA-CONFIG", lambda it: (it.get("kataConfig") or {}).get("error") and "broken"
               or (it.get("kataConfig") or {}).get("file"), wide=True),
        Column("REASON", "reason", wide=True),
    ]


@app.command("list")
def list_(
    ctx: typer.Context,
    state_filter: Optional[str] = typer.Option(None, "--state", metavar="STATE",
                                               help="Only sandboxes in STATE: running, stale or unknown."),
    no_check: bool = typer.Option(False, "--no-check",
                                  help="Skip the liveness check (state 'unknown' unless unreadable)."),
) -> None:
    """List sandboxes (Go runtime /run/vc/sbs and runtime-rs /run/kata) with their pods.

    STATE is 'running' when the hypervisor PID lives and the shim socket
    answers, 'stale' when either is gone, 'unknown' (with a REASON, see -o wide)
    when the state file cannot be read or the check cannot tell (the socket did
    not accept in time, the node could not be asked). -n NAMESPACE keeps one pod
    namespace.

    \b
    Examples:
      katactl sandbox list
      katactl sandbox list -o wide --state stale
      katactl sandbox list -n batch -o name
      katactl --host-root /host sandbox list -o json
      katactl -N node-1,node-2 sandbox list
    """
    from katactl import sandbox
    from katactl.gcpause import paused

    app_ctx = state(ctx)
    sandbox.check_state(state_filter)  # a usage error once, before any node is asked
    ns = app_ctx.settings.namespace
    timeout = min(float(app_ctx.settings.request_timeout), 1.0)

    def fn(transport: NodeTransport):
        with paused():  # one pause for discovery and the items (katactl.gcpause says why)
            return [sb.to_dict() for sb in sandbox.discover(transport, check=not no_check, timeout=timeout,
                                                            state=state_filter, namespace=ns)]

    fan_out_list(app_ctx, fn, kind="SandboxList", columns=_columns(), name_key="id")


@app.command("inspect")
def inspect(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
    raw: bool = typer.Option(False, "--raw", help="Include the runtime's state file (persist.json/state.json)."),
) -> None:
    """Show everything known about one sandbox: pod, hypervisor, sockets, memory, cgroups.

    kataConfig is the Kata configuration its runtime used: the file, its config.d
    drop-ins, and where the choice came from (source: annotation, containerd (the
    runtime handler's ConfigPath), KATA_CONF_FILE (the shim's environment), etc, or
    build-default); error says why the runtime would refuse it, or why it cannot be told.

    \b
    Examples:
      katactl sandbox inspect 3f2a
      katactl sandbox inspect batch/train-0 -o json
      katactl sandbox inspect pod/batch/train-0
      katactl sandbox inspect 3f2a --raw -o json | jq .stateFileContent.HypervisorState
    """
    from katactl import sandbox
    from katactl.output import Result

    app_ctx = state(ctx)
    settings, ref = sandbox_ref(app_ctx, target)
    node, sb = sandbox.locate(settings, ref)
    item = {"node": node, **sb.to_dict()}
    if raw:
        item["stateFileContent"] = sb.raw
        item["annotations"] = sb.annotations
    finish(app_ctx, Result(kind="Sandbox", item=item))
