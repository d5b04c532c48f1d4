"""katactl config view."""
from __future__ import annotations

import typer

from katactl.commands._common import finish, new_app, state

app = new_app("Show effective settings and where each came from.")


@app.command("view")
def view(ctx: typer.Context) -> None:
    """Show every effective setting and its source (flag, env KATACTL_*, config file, default),
    and the Kubernetes context in use: context, cluster, server, user, namespace and proxy,
    with the kubeconfig file each comes from (read from the files only: no API request).

    The config file is $XDG_CONFIG_HOME/katactl/config.toml (override with
    KATACTL_CONFIG). Precedence: flags > environment > file (active profile,
    then top level) > built-in defaults.

    \b
    Examples:
      katactl config view
      KATACTL_REQUEST_TIMEOUT=10s katactl config view -o json
      katactl --profile prod config view
    """
    from katactl.backends import kube
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    s = app_ctx.settings
    items = s.view()
    k8s = kube.context_in_use(s)
    item = {"configFile": s.config_file, "configFileExists": s.config_file_exists, "profile": s.profile,
            "nodeGroups": {k: list(v) for k, v in s.node_groups.items()}, "settings": items,
            "kubernetes": k8s}
    if k8s["error"]:
        err = k8s["error"]  # most errors name the kubeconfig already
        app_ctx.out.warn(err if err.startswith("kubeconfig") else f"kubeconfig: {err}")
    if app_ctx.out.human or app_ctx.out.fmt == "name":
        # the context as rows of the same table: one record per line, its source beside it
        if not k8s["files"] and not k8s["error"]:
            rows = [{"name": "kube.context", "value": None, "source": f"none ({k8s['sources']['files']})"}]
        else:
            rows = [{"name": f"kube.{part}", "value": k8s[part], "source": k8s["sources"].get(part, "-")}
                    for part in ("context", "cluster", "server", "user", "namespace", "proxy")]
        # node groups as rows too: -N @group's expansion, checkable on a terminal
        finish(app_ctx, Result(kind="Config", items=items + s.group_view() + rows, columns=[
            Column("SETTING", "name"), Column("VALUE", "value"), Column("SOURCE", "source")]))
        # a file that is not there is no source: say so, or a mistyped XDG_CONFIG_HOME looks in use
        absent = "" if s.config_file_exists else " (does not exist: no setting comes from it)"
        app_ctx.out.info(f"config file: {s.config_file}{absent}" + (f" (profile {s.profile})" if s.profile else ""))
        if k8s["files"]:
            app_ctx.out.info(f"kubeconfig: {', '.join(k8s['files'])} ({k8s['sources']['files']})")
        return
    finish(app_ctx, Result(kind="Config", item=item))
