"""katactl vmcore list | collect | trigger | rm."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import typer

from katactl.commands._common import SANDBOX_HELP, fan_out_list, finish, new_app, require_audit, sandbox_ref, state

if TYPE_CHECKING:  # annotations only: a command's --help does not import the backends
    from katactl.backends.base import NodeTransport

app = new_app("Guest memory dumps (vmcores): list, collect, trigger, rm.")

DUMP_PATH_HELP = ("Dump directory (default: guest_memory_dump_path of the Kata configurations in use: "
                  "each sandbox's, each runtime handler's ConfigPath, the node's default).")
KATA_CONFIG_HELP = ("Kata configuration file (default: each sandbox's and runtime handler's own, "
                    "as the runtime finds it; drop-ins merged).")


def _columns():
    from katactl.output import Column
    from katactl.values import format_size

    return [Column("NAME", "name"), Column("POD", "podRef"), Column("SIZE", "size", fmt=format_size),
            Column("TIME", "time"), Column("FORMAT", "format", wide=True), Column("STATUS", "status"),
            Column("HYPERVISOR", "hypervisorVersion", wide=True), Column("COLLECTED", "collected")]


def _check_paths(dump_path: Optional[str], kata_config: Optional[str]) -> None:
    """--dump-path and --kata-config, when given, are absolute ('' is not "the default")."""
    from katactl import vmcore

    if dump_path is not None:
        vmcore.check_abs(dump_path, "--dump-path")
    if kata_config is not None:
        vmcore.check_abs(kata_config, "--kata-config")


@app.command("list")
def list_cmd(
    ctx: typer.Context,
    dump_path: Optional[str] = typer.Option(None, "--dump-path", metavar="DIR", help=DUMP_PATH_HELP),
    kata_config: Optional[str] = typer.Option(None, "--kata-config", metavar="FILE", help=KATA_CONFIG_HELP),
) -> None:
    """List the vmcores under guest_memory_dump_path on the node(s).

    Each <sandbox-id>/vmcore-*.elf (or .kdump) with its size, time, pod (from
    the saved state/ and the bundle's CRI annotations, or /var/log/pods),
    hypervisor version, status (ok; incomplete while still being written, or cut
    short; unreadable when a flattened dump's end could not be read) and whether
    this machine has collected it.

    \b
    Examples:
      katactl vmcore list
      katactl -N node-1,node-2 vmcore list -o wide
      katactl --host-root /host vmcore list -o json
    """
    from katactl import vmcore

    app_ctx = state(ctx)
    _check_paths(dump_path, kata_config)
    index = vmcore.CollectIndex()
    fan_out_list(app_ctx, lambda t: vmcore.list_dumps(t, dump_path=dump_path, kata_config=kata_config,
                                                      index=index),
                 kind="VmcoreList", columns=_columns())


@app.command("collect")
def collect_cmd(
    ctx: typer.Context,
    refs: Optional[List[str]] = typer.Argument(None, metavar="[SANDBOX|DUMP]...",
                                               help="Sandbox id (prefix), NAMESPACE/POD, or SANDBOX/vmcore-X.elf; none = all."),
    to: str = typer.Option(..., "--to", metavar="DIR", help="Local directory; dumps go to DIR/<node>/<sandbox-id>/."),
    compress: str = typer.Option("none", "--compress", metavar="ALGO", help="none, gzip or zstd."),
    compress_on: str = typer.Option("auto", "--compress-on", metavar="WHERE",
                                    help="Where --compress runs: auto (on the node when it has the compressor, "
                                         "else in katactl), node (fail if it cannot) or local (in katactl, "
                                         "while streaming)."),
    makedumpfile: bool = typer.Option(False, "--makedumpfile", help="Filter and compress on the node with makedumpfile -c -d LEVEL first."),
    dump_level: int = typer.Option(31, "--dump-level", metavar="N", help="makedumpfile dump level (0-31)."),
    delete_after: bool = typer.Option(False, "--delete-after", help="Delete the node's dump once the copy is verified against the node's sha256."),
    verify: bool = typer.Option(False, "--verify", help="Also check every copy against a SHA-256 computed on the node (openssl, python3 or sha256sum)."),
    bwlimit: Optional[str] = typer.Option(None, "--bwlimit", metavar="RATE", help="Limit read rate, bytes/s (e.g. 50Mi)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be collected."),
    force: bool = typer.Option(False, "--force", help="Copy even when the destination may not have the room "
                                                      "(zero pages become holes: a copy often takes far less)."),
    dump_path: Optional[str] = typer.Option(None, "--dump-path", metavar="DIR", help=DUMP_PATH_HELP),
    kata_config: Optional[str] = typer.Option(None, "--kata-config", metavar="FILE", help=KATA_CONFIG_HELP),
) -> None:
    """Copy dumps and their metadata into DIR/<node>/<sandbox-id>/ with a sha256 manifest.

    Copies hypervisor.conf, hypervisor.version and state/ too, and writes
    SHA256SUMS (check with 'sha256sum -c') and manifest.json. Files are 0600.
    Streams with bounded memory; an interrupted collect resumes when run
    again (a partial file is kept as NAME.partial and never presented as
    complete). Collecting an already collected dump changes nothing.
    Zero pages are written as holes; an uncompressed copy is refused (exit
    5) when the destination has less free space than the dump's allocated
    size on the node, which is an upper bound: --force copies anyway.

    With --compress, the node compresses its own dump when it has zstd/gzip
    (--compress-on auto, the default): zstd -3 -T1 or gzip -1 under ionice
    -c3 and nice -n 19 (so online pods keep CPU and disk), about 3x fewer
    bytes on the wire, nothing written on the node. That holds where katactl
    runs on the node itself too (--host-root, the node agent). katactl
    decompresses the stream on the fly to record the original's sha256 as
    well; --bwlimit then limits the compressed bytes. An interrupted copy
    resumes: the node re-runs the compressor and sends only the missing end.
    The node's sha256 (--verify, --delete-after, a resume) runs at idle
    priority too.

    \b
    Examples:
      katactl vmcore collect --to /srv/crash
      katactl -N node-1 vmcore collect 3f2a --to ./dumps --compress zstd
      katactl -N node-1 vmcore collect --to ./dumps --compress zstd --compress-on node --bwlimit 50Mi
      katactl vmcore collect default/web-0 --to ./dumps --delete-after
    """
    from katactl import vmcore
    from katactl.errors import exit_code_for, outcome_exit_code
    from katactl.fleet import run_on_nodes
    from katactl.output import Column, Result
    from katactl.values import format_size, parse_size

    app_ctx = state(ctx)
    bps = parse_size(bwlimit, what="--bwlimit") if bwlimit is not None else None
    out = app_ctx.out
    bar_holder: dict = {}

    def progress(dump, done, total):
        bar = bar_holder.get("bar")
        if bar is not None:
            bar.update(completed=done, total=total, description=dump["file"])
        out.event("VmcoreProgress", name=dump["name"], completed=done, total=total)

    opts = vmcore.CollectOptions(to=to, compress=compress, compress_on=compress_on, makedumpfile=makedumpfile,
                                 dump_level=dump_level,
                                 delete_after=delete_after, dry_run=dry_run, bwlimit=bps,
                                 verify_source=verify, force=force, progress=progress)
    opts.validate()  # --to too: before any node is asked
    _check_paths(dump_path, kata_config)
    for ref in refs or []:
        vmcore.check_ref(ref)
    index = vmcore.CollectIndex()
    require_audit(dry_run)  # each collect (and --delete-after) is audited: no untraceable change

    def one_node(transport: NodeTransport):
        return vmcore.collect(transport, refs or [], opts, dump_path=dump_path, kata_config=kata_config, index=index,
                              keep_going=True)

    with out.progress("collect", total=None, unit="bytes") as bar:
        bar_holder["bar"] = bar
        fo = run_on_nodes(app_ctx.settings, one_node)
    fo.raise_if_single_failure()
    items = fo.items()
    failed = [i for i in items if i.get("error")]
    ok = [i for i in items if not i.get("error")]
    # a dump's error names the dump (its message) and its node (fan-out results carry the node)
    errors = fo.error_items() + [{"node": i["node"], "target": i["name"], "error": i["error"]} for i in failed]
    # targets: every dump, and every node (a node with nothing to collect succeeded)
    idle = [n for n in fo.nodes if n in fo.values and not fo.values[n]]
    code = outcome_exit_code([exit_code_for(e) for e in fo.errors.values()]
                             + [i["error"]["exitCode"] for i in failed], len(ok) + len(idle))
    cols = [Column("NAME", "name"), Column("TO", "to"), Column("SIZE", "storedSize", fmt=format_size),
            Column("SHA256", lambda i: (i.get("sha256") or "")[:16] or None),
            Column("VERIFIED", "verified"), Column("CHANGED", "changed"), Column("DELETED", "deleted", wide=True)]
    result = Result(kind="VmcoreCollectList", items=ok, columns=cols, errors=errors, multi_node=fo.multi,
                    changed=any(i.get("changed") for i in ok), dry_run=dry_run,
                    summary=None if ok or errors else "No vmcores to collect.")
    finish(app_ctx, result, code)


@app.command("trigger")
def trigger_cmd(
    ctx: typer.Context,
    sandbox: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
    fmt: str = typer.Option("elf", "--format", metavar="FORMAT", help="elf or kdump-zlib."),
    detach: bool = typer.Option(False, "--detach", help="Start the dump and return at once."),
    paging: Optional[bool] = typer.Option(None, "--paging/--no-paging",
                                          help="Walk guest page tables (default: guest_memory_dump_paging)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the path and the hypervisor, dump nothing."),
    dump_path: Optional[str] = typer.Option(None, "--dump-path", metavar="DIR", help=DUMP_PATH_HELP),
    kata_config: Optional[str] = typer.Option(None, "--kata-config", metavar="FILE", help=KATA_CONFIG_HELP),
    wait: Optional[str] = typer.Option(None, "--timeout", metavar="DURATION",
                                       help="Deadline for the dump to finish (default 1h; exit 6)."),
) -> None:
    """Dump the memory of a live sandbox into Kata's layout (the guest pauses meanwhile).

    Writes <dump_path>/<sandbox-id>/vmcore-<time>.elf (or .kdump) with the
    same hypervisor.conf, hypervisor.version and state/ the runtime writes
    after a panic. Uses the shim extension when offered, else Cloud
    Hypervisor's vm.coredump (needs the guest_debug feature), else QEMU's
    dump-guest-memory (extra-monitor.sock, or qmp.sock when free). Refused
    (exit 5) unless the filesystem has 2 x guest memory free.

    Not idempotent, on purpose: every run takes a new dump (changed: true)
    and pauses the guest while the hypervisor writes its whole memory. In
    automation, run it once per incident (not as a converging task); use
    --dry-run to check the path first. Every dump is in the audit log.

    \b
    Examples:
      katactl vmcore trigger 3f2a
      katactl vmcore trigger default/web-0 --format kdump-zlib --detach
      katactl -N node-1,node-2 vmcore trigger pod/batch/train-0 --dry-run
    """
    from katactl import sandbox as sbmod
    from katactl import vmcore
    from katactl.errors import UsageError
    from katactl.output import Result
    from katactl.values import parse_duration

    app_ctx = state(ctx)
    if fmt not in vmcore.FORMATS:
        raise UsageError(f"invalid --format {fmt!r} (choose {', '.join(vmcore.FORMATS)})")
    _check_paths(dump_path, kata_config)
    timeout = parse_duration(wait, what="--timeout") if wait is not None else 3600.0   # '' is no default
    settings, ref = sandbox_ref(app_ctx, sandbox)
    out = app_ctx.out
    holder: dict = {}

    def progress(done, total):
        if holder.get("bar") is not None:
            holder["bar"].update(completed=done, total=total)
        out.event("VmcoreProgress", completed=done, total=total)

    opts = vmcore.TriggerOptions(format=fmt, detach=detach, paging=paging, dump_path=dump_path,
                                 kata_config=kata_config, dry_run=dry_run, timeout=timeout, progress=progress)
    require_audit(dry_run)

    def fn(transport: NodeTransport, sb):
        with out.progress(f"dump {sb.id[:12]}", total=None, unit="bytes") as bar:
            holder["bar"] = bar
            return vmcore.trigger(transport, sb, opts)

    node, _sb, item = sbmod.on_sandbox(settings, ref, fn, require_live=False)
    finish(app_ctx, Result.mutation("VmcoreTrigger", {"node": node, **item}))


@app.command("rm")
def rm_cmd(
    ctx: typer.Context,
    refs: List[str] = typer.Argument(..., metavar="DUMP...",
                                     help="SANDBOX/vmcore-X.elf, vmcore-X.elf, or a sandbox id (all its dumps); "
                                          "SANDBOX may be a unique id prefix."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be deleted."),
    force: bool = typer.Option(False, "--force", help="Delete incomplete dumps too (one the hypervisor is still "
                                                      "writing frees its space only once it is closed)."),
    dump_path: Optional[str] = typer.Option(None, "--dump-path", metavar="DIR", help=DUMP_PATH_HELP),
    kata_config: Optional[str] = typer.Option(None, "--kata-config", metavar="FILE", help=KATA_CONFIG_HELP),
) -> None:
    """Delete dumps from the node (asks on a TTY; needs --yes otherwise).

    The sandbox's directory (metadata, state/) goes too once its last dump
    is deleted. Each DUMP is resolved on its own: one that names nothing
    (deleted already) is reported with changed: false and the others are
    still deleted; a prefix of several sandboxes is exit 3. An incomplete
    dump (still being written, or cut short) is refused (exit 5) without
    --force.

    \b
    Examples:
      katactl vmcore rm 3f2a4c/vmcore-20240102030405.123.elf
      katactl vmcore rm 3f2a --yes
    """
    from katactl import vmcore
    from katactl.output import Column, Result
    from katactl.planapply import plan_confirm_apply
    from katactl.values import format_size

    app_ctx = state(ctx)
    _check_paths(dump_path, kata_config)
    for ref in refs:
        vmcore.check_ref(ref)  # malformed: a usage error before any node is asked

    def plan(transport: NodeTransport) -> tuple[list, list]:
        # each ref on its own: a re-run after a partial rm still deletes the rest
        gone: list[str] = []

        def nothing_left(ref: str) -> bool:
            gone.append(ref)
            return True

        dumps = vmcore.resolve_dumps(transport, refs, dump_path=dump_path, kata_config=kata_config,
                                     missing=nothing_left)
        return dumps, gone

    plans: dict = {}

    def confirm(planned: dict) -> None:
        plans.update(planned)
        targets = [d for ds, _ in planned.values() for d in ds]
        if targets and not dry_run:
            uncollected = sum(1 for d in targets if not d["collected"])
            q = (f"Delete {len(targets)} vmcore(s) ({format_size(sum(d['size'] or 0 for d in targets))})"
                 + (f", {uncollected} never collected" if uncollected else "") + "?")
            app_ctx.require_confirmation(q, "deleting vmcores")

    def unmatched(gone: list[str]) -> list[dict]:
        return [{"name": ref, "changed": False, "note": "no vmcore matches: nothing to delete"} for ref in gone]

    require_audit(dry_run)
    # a node that failed while the dumps were listed is part of the outcome (named, exit 4)
    fo = plan_confirm_apply(app_ctx.settings, plan, confirm,
                            lambda t, p: vmcore.remove_dumps(t, p[0], dry_run=dry_run, force=force) + unmatched(p[1]),
                            needs_apply=lambda p: bool(p[0]))
    for n, (dumps, gone) in plans.items():
        if not dumps and gone:   # nothing to delete there: its refs are still reported
            fo.values[n] = unmatched(gone)
    fo.raise_if_single_failure()
    items = fo.items()
    cols = [Column("NAME", "name"), Column("SIZE", "size", fmt=format_size), Column("COLLECTED", "collected"),
            Column("CHANGED", "changed")]
    finish(app_ctx, Result(kind="VmcoreRemoveList", items=items, columns=cols, errors=fo.error_items(),
                           multi_node=fo.multi, changed=any(i.get("changed") for i in items), dry_run=dry_run,
                           summary=None if items else _nothing_to_delete(fo)),
           fo.exit_code())


def _nothing_to_delete(fo) -> str:
    """Say "nothing to delete" only of the nodes that answered: a node that failed may hold some."""
    if not fo.errors:
        return "No matching vmcores: nothing to delete."
    answered = len(fo.nodes) - len(fo.errors)
    return f"No matching vmcores on the {answered} node(s) that answered." if answered else ""
