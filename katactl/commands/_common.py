"""Helpers shared by command modules (thin: no I/O logic here)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import typer

if TYPE_CHECKING:  # at run time imported where used: --help of a command loads neither
    from katactl.context import AppContext
    from katactl.output import Column, Result


#: the help of every SANDBOX argument resolved through sandbox_ref
SANDBOX_HELP = "Sandbox id, unique id prefix, NAMESPACE/POD or pod/NAMESPACE/NAME."


def new_app(help: str, *, single: bool = False) -> typer.Typer:
    """A command-group Typer with katactl's conventions (plain help, -h)."""
    app = typer.Typer(
        help=help,
        no_args_is_help=not single,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    if not single:
        # A callback keeps a group a group even while it has one subcommand.
        app.callback()(lambda: None)
    return app


def state(ctx: typer.Context) -> AppContext:
    root = ctx.find_root()
    if root.obj is None:  # settings deferred by a --help that turned out to be a value
        from katactl.cli import _DEFERRED, build_context

        build_context(root, *root.meta.pop(_DEFERRED))
    return root.obj


def finish(app_ctx: AppContext, result: Result, exit_code: int = 0) -> None:
    """Render and leave with the given exit code."""
    render_final(app_ctx, result)
    if exit_code:
        raise typer.Exit(int(exit_code))


def render_final(app_ctx: AppContext, result: Result) -> None:
    """Render the command's last result. With --via kube in -o json/yaml/jsonl, the run's
    ephemeral node pods are deleted first and those left are ``errors`` entries of this one
    document (cli.settle_node_pods), not a failure stdout would not show."""
    from katactl.output import STRUCTURED_FORMATS

    if app_ctx.settings.via == "kube" and app_ctx.out.fmt in STRUCTURED_FORMATS:
        import dataclasses

        from katactl.cli import settle_node_pods

        left = settle_node_pods()
        if left:
            result = dataclasses.replace(result, errors=[*result.errors, *left])
    app_ctx.out.render(result)


def sandbox_ref(app_ctx: AppContext, text: str):
    """Parse a SANDBOX argument; for pod/NS/NAME, narrow the node selection to the
    pod's node (found through the Kubernetes API). Returns (settings, ref string):
    pass the settings to fan_out_*(settings=...) and the ref to sandbox.resolve."""
    from katactl import targets

    ref = targets.parse_sandbox_ref(app_ctx.settings, text)
    return targets.settings_for_ref(app_ctx.settings, ref), ref.ref


def fan_out_list(app_ctx: AppContext, fn: Callable[[Any], list[dict]], *, kind: str,
                 columns: list[Column], name_key: str = "name", summary: str | None = None,
                 settings=None, item_error: Callable[[dict], dict | None] | None = None) -> None:
    """Run fn(transport) on every selected node; render the merged list.

    One node: its failure is the command's failure (its own exit code).
    Many nodes: per-node errors are reported, the rest rendered; the exit code
    follows errors.outcome_exit_code: 4 when some nodes failed and others
    answered, the failures' common code when all failed the same way, else 1.
    item_error returns the error of an item that stands for a failed target
    (e.g. a shim that did not answer): such items count like failed nodes.
    """
    from katactl.errors import ExitCode, outcome_exit_code
    from katactl.fleet import run_on_nodes
    from katactl.output import Result

    fo = run_on_nodes(settings or app_ctx.settings, fn, progress=_progress_cb(app_ctx))
    fo.raise_if_single_failure()
    items = fo.items()
    if not items and fo.errors and summary is None:
        # "No sandboxes found." would claim it of the nodes that failed too: say which
        # answered, and nothing when none did (their errors are the whole story)
        from katactl.output import plural_noun

        answered = len(fo.nodes) - len(fo.errors)
        summary = f"No {plural_noun(kind)} found on the {answered} node(s) that answered." if answered else ""
    result = Result(kind=kind, items=items, columns=columns, errors=fo.error_items(),
                    multi_node=fo.multi, name_key=name_key, summary=summary)
    code = fo.exit_code()
    if not code and item_error is not None:
        failed = [e.get("exitCode", ExitCode.FAILED) for e in map(item_error, items) if e]
        code = outcome_exit_code(failed, len(items) - len(failed))
    finish(app_ctx, result, code)


def fan_out_one(app_ctx: AppContext, fn: Callable[[Any], dict], *, kind: str,
                columns: list[Column] | None = None, mutating: bool = False, dry_run: bool = False,
                settings=None) -> None:
    """Like fan_out_list for commands producing one object per node.

    On a single node the object is rendered as itself; on many, as a list with
    a NODE column. Either way each object names its node (`-o name` prints it).
    Mutating results carry changed/dryRun at top level; a mutation (not ``dry_run``) is
    refused (exit 5) before any node is touched when its audit log cannot be written.
    """
    from katactl.fleet import run_on_nodes

    if mutating:
        require_audit(dry_run)
    fo = run_on_nodes(settings or app_ctx.settings, fn, progress=_progress_cb(app_ctx))
    render_per_node(app_ctx, fo, kind=kind, columns=columns, mutating=mutating, dry_run=dry_run)


def require_audit(dry_run: bool) -> None:
    """The mutating commands' one audit check, before their first change (and their first
    contact): katactl.audit.require_writable, with the same open record() writes with."""
    from katactl import audit

    audit.require_writable(dry_run=dry_run)


def render_per_node(app_ctx: AppContext, fanout, *, kind: str, columns: list[Column] | None = None,
                    mutating: bool = False, dry_run: bool = False) -> None:
    """Render a FanOut of one object per node (see fan_out_one) and exit with its code.
    A mutation's ``dryRun`` is the command's flag: with every node failed there is no item
    to take it from, and the run could have changed nothing either way."""
    from katactl.output import Result

    fanout.raise_if_single_failure()
    if not fanout.multi:
        item = {"node": fanout.nodes[0], **fanout.values[fanout.nodes[0]]}
        finish(app_ctx, Result.mutation(kind, item, name_key="node") if mutating
               else Result(kind=kind, item=item, name_key="node"))
        return
    items = fanout.items()
    changed = any(i.get("changed") for i in items) if mutating else None
    result = Result(kind=kind + "List", items=items, columns=columns or [], errors=fanout.error_items(),
                    multi_node=True, changed=changed, dry_run=dry_run if mutating else None, name_key="node")
    finish(app_ctx, result, fanout.exit_code())


def _progress_cb(app_ctx: AppContext):
    out = app_ctx.out
    if not out.stderr_tty or out.quiet:
        return None

    def cb(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{done}/{total} nodes", end=end, file=out.stderr, flush=True)

    return cb
