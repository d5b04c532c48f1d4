"""katactl upgrade stage | switch | rollback | status | gc."""
from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Optional

import typer

from katactl.commands._common import fan_out_list, fan_out_one, new_app, render_per_node, require_audit, state

if TYPE_CHECKING:  # annotations only: a command's --help does not import the backends
    from katactl.backends.base import NodeTransport

app = new_app("A/B upgrade of the Kata runtime and agent, without stopping sandboxes.")

ROOT_OPT = typer.Option("/opt/kata", "--kata-root", metavar="DIR", envvar="KATACTL_KATA_ROOT",
                        help="Kata install root on the node: releases/ and the current symlink live here.")
DRY_OPT = typer.Option(False, "--dry-run", help="Show what would change; change nothing.")
LOCK_OPT = typer.Option(None, "--lock-timeout", metavar="DURATION",
                        help="How long to wait for another upgrade operation on the node (default: --request-timeout).")


def _common(ctx, kata_root: str, lock_timeout: Optional[str]):
    from katactl.upgrade import Layout
    from katactl.values import parse_duration

    app_ctx = state(ctx)
    layout = Layout(kata_root)
    # "" is a bad value (exit 2), not "not given"
    lt = parse_duration(lock_timeout, what="--lock-timeout", allow_zero=True) if lock_timeout is not None \
        else app_ctx.settings.request_timeout

    def on_wait(holder: str) -> None:
        app_ctx.out.info(f"waiting for the upgrade lock, held by {holder}")

    return app_ctx, layout, lt, on_wait


def _mutate(ctx, kata_root: str, lock_timeout: Optional[str], kind: str, columns, op, *, dry_run: bool) -> None:
    """Run ``op(t, layout, lock_timeout=, on_wait=)`` on every selected node (a mutating
    fan-out: refused before any node when the audit log cannot be written); warn when it
    first finished a switch an earlier run left half done."""
    app_ctx, layout, lt, on_wait = _common(ctx, kata_root, lock_timeout)

    def fn(transport: NodeTransport):
        r = op(transport, layout, lock_timeout=lt, on_wait=on_wait)
        if isinstance(r, dict) and r.get("recovered"):
            app_ctx.out.warn(r["recovered"])
        return r

    fan_out_one(app_ctx, fn, kind=kind, mutating=True, dry_run=dry_run, columns=columns)


@app.command("stage")
def stage(
    ctx: typer.Context,
    source: str = typer.Argument(..., metavar="SOURCE",
                                 help="kata-static tarball (.tar.xz, .tar.zst, .tar.gz) or directory, on this machine."),
    as_version: Optional[str] = typer.Option(None, "--as", metavar="VERSION",
                                             help="Release version (default: VERSION file inside, or the kata-static file name)."),
    sha256: Optional[str] = typer.Option(None, "--sha256", metavar="HEX", help="Expected sha256 of the tarball."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Stage even without any checksum to verify against."),
    reserve: str = typer.Option("256Mi", "--reserve", metavar="SIZE",
                                help="Free space that must remain on the releases filesystem afterwards."),
    force: bool = typer.Option(False, "--force", help="Replace a staged release unless it is current or in use."),
    kata_root: str = ROOT_OPT,
    lock_timeout: Optional[str] = LOCK_OPT,
    dry_run: bool = DRY_OPT,
) -> None:
    """Unpack and verify a release next to the others, without touching what runs.

    The source is read on this machine and streamed to each node. Every member
    is validated (no absolute paths, no '..', no devices, no symlink leaving the
    release), checked against --sha256, a SOURCE.sha256 file next to it, or a
    SHA256SUMS manifest inside, written into a temp dir on the releases
    filesystem, fsynced, and renamed into KATA_ROOT/releases/VERSION. Refused
    when the filesystem would keep less than --reserve free. Re-staging the same
    source is a no-op (changed: false). --force replaces a release staged from
    another source, never one that is current or that running sandboxes use.

    \b
    Examples:
      katactl upgrade stage kata-static-3.9.0-amd64.tar.xz --sha256 3f2a...
      katactl upgrade stage ./build/opt/kata --as 3.9.0-dev1 --no-verify
      katactl -N @canary upgrade stage kata-static-3.9.0-amd64.tar.zst --dry-run -o json
    """
    from katactl import upgrade
    from katactl.upgrade.source import check_source_arg
    from katactl.values import parse_size

    check_source_arg(source)
    res_bytes = parse_size(reserve, allow_zero=True, what="--reserve")
    _mutate(ctx, kata_root, lock_timeout, "UpgradeStage", _mut_columns("version"),
            lambda t, layout, **kw: upgrade.stage(t, layout, source, version=as_version, sha256=sha256,
                                                  no_verify=no_verify, reserve=res_bytes, force=force,
                                                  dry_run=dry_run, **kw), dry_run=dry_run)


@app.command("switch")
def switch(
    ctx: typer.Context,
    version: str = typer.Argument(..., metavar="VERSION", help="A staged release."),
    component: str = typer.Option("all", "--component", "-c", metavar="runtime|agent|all",
                                  help="runtime = shim/runtime/hypervisor binaries (the current symlink); "
                                       "agent = guest kernel/image/initrd in the configuration; all = both."),
    force: bool = typer.Option(False, "--force", help="Switch even when the preflight checks fail."),
    no_preflight_exec: bool = typer.Option(False, "--no-preflight-exec",
                                           help="Do not run the new binaries' --version checks."),
    kata_root: str = ROOT_OPT,
    lock_timeout: Optional[str] = LOCK_OPT,
    dry_run: bool = DRY_OPT,
) -> None:
    """Make a staged release the one new sandboxes use; running sandboxes keep theirs.

    Preflight: the shim binary and configuration exist, so does every file the
    switched configuration names in a release (kernel, image, initrd; with the
    runtime, the hypervisor, jailer and firmware), the new binaries answer
    --version, 'kata-runtime check --check-version-only' (a warning only). The
    runtime switch is one atomic rename of KATA_ROOT/current; the agent switch
    rewrites kernel/image/initrd in the configuration atomically (backups under
    releases/.katactl/backups). A lock serialises concurrent switches; every
    switch is appended to releases/.katactl/history.jsonl and the audit log.

    \b
    Examples:
      katactl upgrade switch 3.9.0
      katactl upgrade switch 3.9.0 --component agent --dry-run
      katactl -N @pool-a upgrade switch 3.9.0 -o json
    """
    from katactl import upgrade

    _mutate(ctx, kata_root, lock_timeout, "UpgradeSwitch", _switch_columns(),
            lambda t, layout, **kw: upgrade.switch(t, layout, version, component, dry_run=dry_run, force=force,
                                                   run_binaries=not no_preflight_exec, **kw), dry_run=dry_run)


@app.command("rollback")
def rollback(
    ctx: typer.Context,
    force: bool = typer.Option(False, "--force",
                               help="Roll back even if the node is not where the last switch left it."),
    no_preflight_exec: bool = typer.Option(False, "--no-preflight-exec",
                                           help="Do not run the old binaries' --version checks."),
    kata_root: str = ROOT_OPT,
    lock_timeout: Optional[str] = LOCK_OPT,
    dry_run: bool = DRY_OPT,
) -> None:
    """Undo the last switch (switch back to what it switched from).

    Running again after a rollback is a no-op (changed: false); to go forward
    again, 'upgrade switch VERSION'.

    \b
    Examples:
      katactl upgrade rollback --dry-run
      katactl -N node-7 upgrade rollback -o json
    """
    from katactl import upgrade

    _mutate(ctx, kata_root, lock_timeout, "UpgradeRollback", _switch_columns(),
            lambda t, layout, **kw: upgrade.rollback(t, layout, dry_run=dry_run, force=force,
                                                     run_binaries=not no_preflight_exec, **kw), dry_run=dry_run)


@app.command("status")
def status(
    ctx: typer.Context,
    sandboxes: bool = typer.Option(False, "--sandboxes", "-s",
                                   help="One row per sandbox: which release its shim, hypervisor and assets come from."),
    kata_root: str = ROOT_OPT,
) -> None:
    """Current and previous release, and who still runs which release.

    A process uses a release when its executable, a mapped file, an open file or
    an argument lies under releases/VERSION (from /proc/PID/exe, maps, fd,
    cmdline); sandboxes are matched through persist.json / state.json.

    \b
    Examples:
      katactl upgrade status
      katactl upgrade status --sandboxes
      katactl -N @pool-a upgrade status -o json
    """
    from katactl.output import Column
    from katactl.upgrade import compiled

    app_ctx, layout, _lt, _ow = _common(ctx, kata_root, None)
    # -o name is the JSON object's node, as for every upgrade command (docs/output.md)
    if app_ctx.out.human:
        if sandboxes:
            fan_out_list(app_ctx, lambda t: _status(app_ctx, t, layout)["sandboxes"], kind="UpgradeSandboxList",
                         columns=[
                             Column("SANDBOX", "id"), Column("POD", "podRef"), Column("SHIM-PID", "shimPid"), Column("SHIM", "shimRelease"),
                             Column("HV-PID", "hypervisorPid"), Column("HYPERVISOR", "hypervisorRelease"),
                             Column("ASSETS", "assetsRelease"), Column("RUNTIME", "runtime", wide=True)])
            return

        def rows(transport: NodeTransport):
            s = _status(app_ctx, transport, layout)
            p = s.get("inProgress")
            if p:
                to = p.get("to") or {}
                renamed = (f" ({p['configFilesRenamed']} of {p['configFiles']} configuration files renamed)"
                           if p.get("configFiles") else "")
                app_ctx.out.warn(f"{transport.node}: a {p.get('action')} to runtime {to.get('runtime')}, agent "
                                 f"{to.get('agent')} is in progress or was interrupted{renamed}; "
                                 "the next upgrade stage/switch/rollback/gc completes it")
            for h in s["runtimeHandlers"]:
                if h["follows"] in ("outside", "release"):
                    where = f"release {h['release']} only" if h["release"] else f"outside {layout.current}"
                    app_ctx.out.warn(f"{transport.node}: runtime handler {h['handler']} reads {h['configPath']} "
                                     f"({where}): upgrade switch does not change what it runs; point its "
                                     f"ConfigPath under {layout.current}/ (docs/upgrade.md)")
                elif h["follows"] == "default-search" and h.get("readsFollows") != "current":
                    paths = ", ".join(h.get("searchPaths") or [])
                    reads = f"reads {h['reads']} (compiled-in search: {paths})" if h.get("reads") \
                        else f"finds none of its compiled-in search paths ({paths})"
                    app_ctx.out.warn(f"{transport.node}: runtime handler {h['handler']} has no ConfigPath: its shim "
                                     f"{reads}, not under {layout.current}: a switch never reaches it; set its "
                                     f"ConfigPath under {layout.current}/ (docs/upgrade.md)")
                if not h.get("runtimePath") and h.get("shimPath") and h.get("shimFollows") != "current":
                    where = f"release {h['runtimeRelease']} only" if h.get("runtimeRelease") \
                        else f"outside {layout.current}"
                    app_ctx.out.warn(f"{transport.node}: runtime handler {h['handler']} has no runtime_path: "
                                     f"containerd starts {h['shimPath']} (found on its PATH), which leads to "
                                     f"{where}: a switch does not change that shim; link it to "
                                     f"{layout.current}/bin/{posixpath.basename(h['shimPath'])} (docs/upgrade.md)")
            for q in s.get("qemuData") or []:
                msg = compiled.datadir_warning(q, layout)
                if msg:
                    app_ctx.out.warn(f"{transport.node}: {msg}")
            if not s["releases"]:  # its UpgradeStatus is not "none found": it has no release yet
                app_ctx.out.info(f"{transport.node}: no releases under {layout.releases} "
                                 "(katactl upgrade stage SOURCE)")
            gap = s["scan"].get("gap")
            return [dict(r, nprocs=_count(r["processes"], gap), nsbs=_count(r["sandboxes"], gap)) for r in s["releases"]]

        fan_out_list(app_ctx, rows, kind="UpgradeStatus", summary="", columns=[
            Column("VERSION", "version"), Column("STATE", "state"), Column("PROCESSES", "nprocs"),
            Column("SANDBOXES", "nsbs"), Column("STAGED", "stagedAt", wide=True),
            Column("SOURCE", "source", wide=True), Column("PIDS", "processes", wide=True)])
        return
    fan_out_one(app_ctx, lambda t: _status(app_ctx, t, layout), kind="UpgradeStatus",
                columns=[Column("RUNTIME", "current.runtime"), Column("AGENT", "current.agent")])


def _status(app_ctx, transport: NodeTransport, layout) -> dict:
    """upgrade.status, warning (as gc refuses) when processes went unseen: counts and inUse
    are then lower bounds, not "unused"."""
    from katactl import upgrade

    s = upgrade.status(transport, layout)
    gap = s["scan"].get("gap")
    if gap:
        app_ctx.out.warn(f"{transport.node}: {gap}; the PROCESSES and SANDBOXES counts are lower bounds ('?': none seen, "
                         "'N+': at least N), and upgrade gc refuses without --force")
    return s


def _count(seen: list, gap: str | None) -> int | str:
    return len(seen) if not gap else f"{len(seen)}+" if seen else "?"


@app.command("gc")
def gc(
    ctx: typer.Context,
    keep_previous: bool = typer.Option(True, "--keep-previous/--no-keep-previous",
                                       help="Keep the release the last switch came from (the rollback target); "
                                            "the default."),
    force: bool = typer.Option(False, "--force", help="Proceed even if some processes cannot be inspected."),
    kata_root: str = ROOT_OPT,
    lock_timeout: Optional[str] = LOCK_OPT,
    dry_run: bool = DRY_OPT,
) -> None:
    """Remove releases that nothing uses any more (asks on a TTY; needs --yes otherwise).

    Kept: the current runtime and agent releases, the release the last switch
    came from (the rollback target; --no-keep-previous removes it too), releases
    the current configuration references, releases a containerd runtime
    handler pins (runtime_path or ConfigPath under releases/VERSION), and every
    release a running process or sandbox still uses. gc first works out what would go on every node,
    asks once, and then removes at most that. --dry-run lists what would go,
    without asking.

    \b
    Examples:
      katactl upgrade gc --dry-run
      katactl upgrade gc --yes
      katactl upgrade gc --no-keep-previous --yes
      katactl -N @pool-a upgrade gc --yes -o json
    """
    from katactl import upgrade
    from katactl.fleet import LOCAL
    from katactl.planapply import plan_confirm_apply

    if dry_run:
        _mutate(ctx, kata_root, lock_timeout, "UpgradeGC", _gc_columns(),
                lambda t, layout, **kw: upgrade.gc(t, layout, dry_run=True, force=force,
                                                   keep_previous=keep_previous, **kw), dry_run=True)
        return
    app_ctx, layout, lt, on_wait = _common(ctx, kata_root, lock_timeout)

    def confirm(planned: dict) -> None:  # one question for all of it
        doomed = {n: p["removed"] for n, p in planned.items() if p["removed"]}
        if doomed:
            count = sum(len(v) for v in doomed.values())
            multi = list(planned) != [LOCAL]
            where = "; ".join(f"{n}: {', '.join(v)}" for n, v in doomed.items()) if multi \
                else ", ".join(next(iter(doomed.values())))
            app_ctx.require_confirmation(f"Delete {count} release(s) ({where})?", f"deleting {count} release(s)",
                                         hint="katactl upgrade gc --dry-run lists what would go")

    def apply(transport: NodeTransport, p):  # remove at most what was shown (and the temp dirs of killed stages/gcs)
        r = upgrade.gc(transport, layout, force=force, keep_previous=keep_previous, only=set(p["removed"]),
                       lock_timeout=lt, on_wait=on_wait)
        if r.get("recovered"):
            app_ctx.out.warn(r["recovered"])
        return r

    require_audit(dry_run=False)
    # what would go on every node (no lock, no change), asked once, then removed per node
    fo = plan_confirm_apply(app_ctx.settings, lambda t: upgrade.gc(t, layout, dry_run=True, force=force,
                                                                   keep_previous=keep_previous),
                            confirm, apply)
    render_per_node(app_ctx, fo, kind="UpgradeGC", columns=_gc_columns(), mutating=True, dry_run=False)


def _mut_columns(key):
    from katactl.output import Column

    return [Column("VERSION", key), Column("CHANGED", "changed"), Column("DRY-RUN", "dryRun")]


def _switch_columns():
    from katactl.output import Column

    return [Column("RUNTIME", "to.runtime"), Column("AGENT", "to.agent"), Column("FROM", "from.runtime"),
            Column("CHANGED", "changed")]


def _gc_columns():
    from katactl.output import Column

    return [Column("REMOVED", "removed"), Column("CHANGED", "changed")]
