"""katactl config view."""
from __future__ import annotations

import typer

from katactl.commands._common import finish, new_app, state
from katactl.output import Column, Result

app = new_app("Show effective settings and where each came from.")


@app.command("view")
def view(ctx: typer.Context) -> None:
    """Show every effective setting and its source (flag, env KATACTL_*, config file, default).

    The config file is $XDG_CONFIG_HOME/katactl/config.toml (override with
    KATACTL_CONFIG). Precedence: flags > environment > file (active profile,
    then top level) > built-in defaults.

    \b
    Examples:
      katactl config view
      KATACTL_REQUEST_TIMEOUT=10s katactl config view -o json
      katactl --profile prod config view
    """
    from katactl import config

    app_ctx = state(ctx)
    s = app_ctx.settings
    items = s.view()
    item = {"configFile": config.config_path(), "profile": s.profile,
            "nodeGroups": {k: list(v) for k, v in s.node_groups.items()}, "settings": items}
    if app_ctx.out.human or app_ctx.out.fmt == "name":
        finish(app_ctx, Result(kind="Config", items=items, columns=[
            Column("SETTING", "name"), Column("VALUE", "value"), Column("SOURCE", "source")]))
        app_ctx.out.info(f"config file: {item['configFile']}" + (f" (profile {s.profile})" if s.profile else ""))
        return
    finish(app_ctx, Result(kind="Config", item=item))
