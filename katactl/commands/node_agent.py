"""katactl node agent: the node pods --via kube reaches nodes through (install, status,
uninstall, gc). The library is katactl.nodeagent."""
from __future__ import annotations

from typing import Optional

import typer

from katactl.commands._common import finish, new_app, state

app = new_app("Node pods for --via kube: install, status, uninstall, gc.")

DRY_RUN_HELP = "Change nothing; say what would change."


def _ns(app_ctx) -> str:
    from katactl.backends.kube import seg

    return seg(app_ctx.settings.agent_namespace)


def _audited(action: str, target: str, params: dict, fn):
    from katactl import nodes

    return nodes.audited(action, target, params, fn)


@app.command()
def install(
    ctx: typer.Context,
    image: Optional[str] = typer.Option(None, "--image", metavar="IMAGE",
                                        help="Agent image with python3 (default: --agent-image)."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
) -> None:
    """Apply the katactl node agent DaemonSet in --agent-namespace.

    One privileged pod per node (hostPID, hostNetwork, the host's / at /host,
    every taint tolerated, no ServiceAccount token), labelled
    app.kubernetes.io/name=katactl-node-agent so --via kube finds the pod of
    each node. Idempotent: the same image again reports changed: false; another
    image updates the pod template.

    \b
    Examples:
      katactl node agent install --image registry.example/katactl-agent:1
      katactl --agent-namespace ops node agent install --image python:3.12-slim -o json
    """
    from katactl import nodeagent
    from katactl.backends import kube
    from katactl.errors import UsageError
    from katactl.output import Result

    app_ctx = state(ctx)
    image = image or app_ctx.settings.agent_image
    if not image:
        raise UsageError("node agent install needs --image IMAGE (an image with python3)")
    ns = _ns(app_ctx)
    params = {"image": image, "namespace": ns, "dryRun": dry_run}
    with kube.client(app_ctx.settings) as api:
        res = _audited("node.agent.install", f"{ns}/{nodeagent.DS_NAME}", params,
                       lambda: {**nodeagent.install(api, ns, image, dry_run=dry_run), "dryRun": dry_run})
    item = {"namespace": ns, "name": nodeagent.DS_NAME, "image": image, **res}
    finish(app_ctx, Result.mutation("NodeAgentInstall", item))


@app.command()
def status(ctx: typer.Context) -> None:
    """The agent DaemonSet and, per node it selects, its pod and any ephemeral node pods.

    A node's agent pod is ready when it runs the DaemonSet's image (a pod
    not replaced since the image changed is not). Exit 0 when every node has
    a ready agent pod, 8 when some have none (a check that found problems),
    3 when the agent is not installed.

    \b
    Examples:
      katactl node agent status
      katactl node agent status -o json | jq '.items[] | select(.ready | not) | .node'
    """
    from katactl import nodeagent
    from katactl.backends import kube
    from katactl.errors import NotFound
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    ns = _ns(app_ctx)
    with kube.client(app_ctx.settings) as api:
        st = nodeagent.status(api, ns)
    if not st["installed"] and not any(i["ephemeral"] for i in st["items"]):
        raise NotFound(f"the katactl node agent is not installed in namespace {ns}",
                       hint="katactl node agent install --image IMAGE (or use --agent-image for ephemeral pods)")
    cols = [Column("NODE", "node"), Column("POD", lambda i: (i.get("pod") or {}).get("name")), Column("READY", "ready"), Column("PHASE", "phase"),
            Column("IMAGE", "image", wide=True), Column("EPHEMERAL", lambda i: ",".join(i["ephemeral"]) or "-")]
    summary = (f"agent {'installed' if st['installed'] else 'not installed'} in {ns}"
               f"{' (image ' + st['image'] + ')' if st['image'] else ''}: {st['ready']}/{st['nodes']} nodes ready"
               + (f", {st['outdated']} with another image" if st["outdated"] else ""))
    res = Result(kind="NodeAgentStatus", items=st["items"], columns=cols, name_key="node", summary=summary)
    code = 8 if st["installed"] and st["ready"] < st["nodes"] else 0
    finish(app_ctx, res, code)


@app.command()
def uninstall(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
) -> None:
    """Delete the agent DaemonSet (and so its pods). Idempotent.

    \b
    Examples:
      katactl node agent uninstall --yes
    """
    from katactl import nodeagent
    from katactl.backends import kube
    from katactl.output import Result

    app_ctx = state(ctx)
    ns = _ns(app_ctx)
    target = f"{ns}/{nodeagent.DS_NAME}"
    if not dry_run:
        app_ctx.require_confirmation(f"Delete DaemonSet {target} and its pods?", "node agent uninstall")
    with kube.client(app_ctx.settings) as api:
        res = _audited("node.agent.uninstall", target, {"namespace": ns, "dryRun": dry_run},
                       lambda: {**nodeagent.uninstall(api, ns, dry_run=dry_run), "dryRun": dry_run})
    finish(app_ctx, Result.mutation("NodeAgentUninstall", {"namespace": ns, "name": nodeagent.DS_NAME, **res}))


@app.command()
def gc(
    ctx: typer.Context,
    older_than: str = typer.Option("3h", "--older-than", metavar="DURATION",
                                   help="Only pods older than this (pods that ended go at any age)."),
    dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
) -> None:
    """Delete ephemeral node pods (katactl-node-<node>-xxxxx) left behind by runs
    that were killed before they could delete their own.

    Only katactl's own pods (a pod merely wearing the label is left alone), and
    not one a run may still be using: it must have ended, or be older than
    --older-than (default 3h; a pod stops by itself after 6h) and not be from
    a katactl still running on this host. Every pod is tried: the ones that
    could not be deleted are listed as errors (exit 4 when others were).

    \b
    Examples:
      katactl node agent gc --dry-run
      katactl --agent-namespace ops node agent gc --older-than 30m --yes -o json
    """
    from katactl import audit, nodeagent
    from katactl.backends import kube
    from katactl.errors import exit_code_for, outcome_exit_code
    from katactl.output import Column, Result
    from katactl.values import parse_duration

    app_ctx = state(ctx)
    ns = _ns(app_ctx)
    age = parse_duration(older_than, what="--older-than", allow_zero=True)
    failed: list = []
    with kube.client(app_ctx.settings) as api:
        found = nodeagent.gc_candidates(api, ns, age)
        if found and not dry_run:
            app_ctx.require_confirmation(f"Delete {len(found)} ephemeral node pod(s) in {ns}?", "node agent gc")
        if dry_run or not found:
            items = found
        else:
            params = {"namespace": ns, "pods": [c["name"] for c in found], "dryRun": False}
            audit.require_writable()
            try:
                items, failed = nodeagent.gc(api, ns, candidates=found)
            except BaseException as e:
                audit.record_unfinished("node.agent.gc", ns, node=ns, params=params, exc=e, sent=True)
                raise
            # what went and what did not, apart: "pods" alone would read as all of them gone
            audit.record("node.agent.gc", ns, node=ns, params=params, changed=bool(items),
                         result="ok" if not failed else "partial" if items else "error",
                         deleted=[c["name"] for c in items],
                         failed=[{"name": c["name"], "error": e.message} for c, e in failed])
    cols = [Column("NAME", "name"), Column("NODE", "node"), Column("PHASE", "phase"),
            Column("CREATED-BY", "createdBy")]
    errors = [{"target": f"{ns}/{c['name']}", "name": c["name"], "error": e.to_dict()} for c, e in failed]
    finish(app_ctx, Result(kind="NodeAgentGC", items=items, columns=cols, changed=bool(items) and not dry_run,
                           dry_run=dry_run, errors=errors),
           outcome_exit_code([exit_code_for(e) for _, e in failed], len(items)))
