"""katactl version."""
from __future__ import annotations

import typer

from katactl.commands._common import fan_out_one, new_app, state

app = new_app("Show client versions; with --node/--host-root, the node's Kata versions too.", single=True)


@app.command()
def version(ctx: typer.Context) -> None:
    """Show the katactl client version, Python and dependency versions.

    With -N NODE or --host-root, also the node's Kata runtime, shim and
    hypervisor versions, each the first line of its --version output, with
    the client's versions alongside (client). Under --host-root
    the node's binaries are another machine's programs and are not run: each
    found is reported as "present at PATH" instead of a version.

    \b
    Examples:
      katactl version
      katactl version -o json
      katactl -N node-1,node-2 version
    """
    from katactl import versions

    app_ctx = state(ctx)
    s = app_ctx.settings
    if not s.nodes and not s.nodes_from and not s.selector and not s.host_root:
        app_ctx.out.render(_client_result())
        return
    client = versions.client_versions()
    fan_out_one(app_ctx, lambda t: {"client": client, **versions.node_versions(t)}, kind="NodeVersion",
                columns=_node_columns())


def _client_result():
    from katactl import versions
    from katactl.output import Result

    return Result(kind="Version", item=versions.client_versions(), name_key="client")  # -o name: the version


def _node_columns():
    from katactl.output import Column

    return [Column("CLIENT", "client.client"), Column("RUNTIME", "runtime"), Column("SHIM", "shim"), Column("QEMU", "qemu"),
            Column("CLOUD-HYPERVISOR", "cloudHypervisor")]
