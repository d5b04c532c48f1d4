"""switch and rollback: move a node's ``current`` runtime and agent between staged
releases (crash-safe through the journal: katactl.upgrade.journal)."""
from __future__ import annotations

import posixpath

from katactl.audit import changing
from katactl.errors import NotFound, Refused, UsageError
from katactl.upgrade import compiled, configedit
from katactl.upgrade.journal import apply, commit, named_files, recover_or_check
from katactl.upgrade.layout import COMPONENTS, SHIM_BINARIES, Layout, fault, validate_version
from katactl.upgrade.lock import locked_audited
from katactl.upgrade.state import UNMANAGED, pair, read_history, read_state, release_record, releases, walk_files
from katactl.backends.base import NodeTransport


def switch(transport: NodeTransport, layout: Layout, version: str, component: str = "all", *, dry_run: bool = False,
           force: bool = False, run_binaries: bool = True, lock_timeout: float = 30.0,
           on_wait=None) -> dict:
    validate_version(version)
    if component not in COMPONENTS:
        raise UsageError(f"invalid --component {component!r} (choose from {', '.join(COMPONENTS)})")
    return locked_audited(
        transport, layout, "switch", {"version": version, "component": component, "force": force},
        lambda: _switch_locked(transport, layout, version, component, dry_run, force, run_binaries),
        target=version, dry_run=dry_run, lock_timeout=lock_timeout, on_wait=on_wait,
        unstaged=NotFound(f"release {version} is not staged on {transport.node} (no {layout.releases})",
                          hint=f"katactl upgrade stage SOURCE --as {version}"))


def _switch_locked(transport: NodeTransport, layout, version, component, dry_run, force, run_binaries) -> dict:
    recovered = recover_or_check(transport, layout, dry_run)
    fault("switch:locked")
    staged = releases(transport, layout)
    if version not in staged or release_record(transport, layout, version) is None:
        raise NotFound(f"release {version} is not staged on {transport.node} "
                       f"(staged: {', '.join(staged) or 'none'})",
                       hint=f"katactl upgrade stage SOURCE --as {version}")
    layout.check_release_inside(transport, version)
    cur = read_state(transport, layout)
    if cur["runtime"] == UNMANAGED:
        raise Refused(f"{layout.current} exists but is not a symlink into {layout.releases}; "
                      "katactl will not replace it", hint="move it aside or use another --kata-root")
    if component == "all":
        to = {"runtime": version, "agent": version}
    elif component == "runtime":
        if cur["agent"] == "mixed":
            raise Refused("the current configuration mixes guest assets of several releases; "
                          "switch --component agent first")
        to = {"runtime": version, "agent": cur["agent"] or version}
    else:
        if not cur["runtime"]:
            raise Refused("no current runtime release yet; switch --component all first")
        to = {"runtime": cur["runtime"], "agent": version}
    frm = pair(cur)
    base = {"node": transport.node, "action": "switch", "component": component, "from": frm, "to": to,
            "recovered": recovered}
    if to == frm:
        # a re-run converges: the QEMU data link this release needs (missing on a node an
        # older katactl switched, or removed) is created as a switch to it would
        steps = compiled.link_datadirs(transport, layout, to["runtime"], dry_run)
        return {**base, "changed": bool(steps), "dryRun": dry_run, "steps": steps, "preflight": [],
                "message": f"already on runtime {to['runtime']}, agent {to['agent']}"}
    checks = _checked_preflight(transport, layout, to, component, run_binaries, force,
                                hint="fix the release, or --force to switch anyway")
    steps = apply(transport, layout, frm, to, dry_run=True)
    if dry_run:
        return {**base, "changed": True, "dryRun": True, "steps": steps, "preflight": checks}
    entry = commit(transport, layout, "switch", component, frm, to)
    return {**base, "changed": True, "dryRun": False, "steps": steps, "preflight": checks,
            "historyId": entry["id"]}


def _checked_preflight(transport: NodeTransport, layout: Layout, to: dict, component: str, run_binaries: bool, force: bool,
                       hint: str | None = None) -> list[dict]:
    """The preflight checks; Refused when one fails, unless force."""
    checks = _preflight(transport, layout, to, component, run_binaries)
    failed = [c for c in checks if not c["ok"]]
    if failed and not force:
        raise Refused("preflight failed: " + "; ".join(f"{c['check']}: {c['detail']}" for c in failed),
                      hint=hint)
    return checks


def _preflight(transport: NodeTransport, layout: Layout, to: dict, component: str, run_binaries: bool) -> list[dict]:
    checks: list[dict] = []
    rel = layout.release(to["runtime"])
    if component in ("all", "runtime"):
        shims = [f"{rel}/{b}" for b in SHIM_BINARIES if transport.exists(f"{rel}/{b}")]
        checks.append({"check": "shim binary", "ok": bool(shims),
                       "detail": shims[0] if shims else f"none of {', '.join(SHIM_BINARIES)} in {rel}"})
        cfgs = walk_files(transport, layout.config_dir(to["runtime"]), ".toml")
        checks.append({"check": "configuration", "ok": bool(cfgs),
                       "detail": f"{len(cfgs)} file(s) in {layout.config_dir(to['runtime'])}"})
    # every component: the configuration the switch leaves live must name only files there
    checks += _named_files_checks(transport, layout, to, component)
    if component in ("all", "runtime"):
        checks += compiled.datadir_check(transport, layout, to["runtime"])
        if not run_binaries:
            checks.append({"check": "binaries run", "ok": True, "skipped": True,
                           "detail": "not run (--no-preflight-exec)"})
        elif transport.host_root:
            checks.append({"check": "binaries run", "ok": True, "skipped": True,
                           "detail": "not run: --host-root (a mounted node's binaries are not executed here)"})
        else:
            for b in [s for s in shims[:1]] + [p for p in (f"{rel}/bin/kata-runtime",) if transport.exists(p)]:
                checks.append(_run_check(transport, [b, "--version"], required=True))
            kr = f"{rel}/bin/kata-runtime"
            if transport.exists(kr):
                checks.append(_run_check(transport, [kr, "check", "--check-version-only"], required=False))
    return checks


def _named_files_checks(transport: NodeTransport, layout: Layout, to: dict, component: str) -> list[dict]:
    """``guest assets`` (kernel, image, initrd) and, when the runtime changes, ``hypervisor``
    (its binary, jailer, firmware: configedit.HOST_FILE_KEYS): each file under a release that
    the configuration names once switched must exist there. The runtime resolves them when it
    loads the configuration, so one missing fails every new sandbox, never the switch. Only
    the configuration files the runtime will read (:func:`_configs_in_use`) refuse the switch:
    a release ships one file per hypervisor and flavour (kata-static: qemu, clh, fc, the
    confidential, GPU and s390x ones), and an asset missing from a file nothing reads is a
    warning."""
    groups: list[tuple[str, tuple[str, ...]]] = [("guest assets", configedit.ASSET_KEYS)]
    if component in ("all", "runtime"):
        groups.append(("hypervisor", configedit.HOST_FILE_KEYS))
    named = named_files(transport, layout, to, tuple(k for _, keys in groups for k in keys))
    in_use = _configs_in_use(transport, layout, to["runtime"])
    dropin_dirs = {posixpath.join(posixpath.dirname(f), "config.d") for f in in_use}

    def read(f: str) -> bool:  # a file the runtime reads, or a drop-in it applies on top of one
        return f in in_use or posixpath.dirname(f) in dropin_dirs

    checks = []
    for check, keys in groups:
        mine = [n for n in named if n[0] in keys]
        lacks: list[str] = []
        unread: list[str] = []
        for key, path, v, fs in mine:
            if transport.exists(path):
                continue
            readers = [f for f in fs if read(f)]
            (lacks if readers else unread).append(f"release {v} lacks {key} {path} ({', '.join(readers or fs)})")
        checks.append({"check": check, "ok": not lacks,
                       "detail": "; ".join(lacks) or f"{len(mine)} file(s) named, all present"})
        if unread:
            checks.append({"check": f"{check} (files nothing reads)", "ok": True, "warning": True,
                           "detail": "; ".join(unread)})
    return checks


#: what the runtimes read when nothing names a file (no Kata handler in containerd's
#: configuration: CRI-O's crio.conf, or none readable): the Go shim's and runtime-rs's default
#: file in a kata-static tree (katacfg's search paths)
_DEFAULT_CONFIGS = ("configuration.toml", "runtime-rs/configuration.toml")


def _configs_in_use(transport: NodeTransport, layout: Layout, version: str) -> set[str]:
    """The configuration files of release ``version`` (relative to its configuration
    directory) that the runtime will read once it is ``current``: each file a containerd Kata
    handler reads through ``current``, else the runtimes' default files; each with the file it
    names through a link *in that release* (its configuration.toml may link to another
    hypervisor's file than the current release's does)."""
    from katactl import katacfg
    from katactl.errors import KatactlError
    from katactl.upgrade.layout import CONFIG_SUBDIR
    from katactl.upgrade.status import handler_configs

    try:
        rows = handler_configs(transport, layout)
    except (OSError, KatactlError):
        rows = []
    wanted: set[str] = set()
    for h in rows:
        path, follows = ((h["configPath"], h["follows"]) if h["configPath"]
                         else (h.get("reads"), h.get("readsFollows")))
        if not path or follows != "current":
            continue
        d, name = posixpath.split(path)
        try:  # the directory only: the file's own link is followed in the new release, below
            hit = layout.split_release_path(katacfg.realpath(transport, d), layout.real_releases(transport))
        except (OSError, KatactlError):
            continue
        if hit and (hit[1] == CONFIG_SUBDIR or hit[1].startswith(CONFIG_SUBDIR + "/")):
            wanted.add(posixpath.join(hit[1][len(CONFIG_SUBDIR):].lstrip("/"), name))
    if not rows:
        wanted.update(_DEFAULT_CONFIGS)
    top = layout.config_dir(version)
    out = set(wanted)
    for rel in wanted:
        try:
            hit = layout.split_release_path(katacfg.realpath(transport, f"{top}/{rel}"),
                                            layout.real_releases(transport))
        except (OSError, KatactlError):
            continue
        if hit and hit[0] == version and hit[1].startswith(CONFIG_SUBDIR + "/"):
            out.add(hit[1][len(CONFIG_SUBDIR) + 1:])
    return out


def _run_check(transport: NodeTransport, argv: list[str], required: bool) -> dict:
    name = " ".join([argv[0].rsplit("/", 1)[-1], *argv[1:]])
    try:
        r = transport.run(argv, timeout=30)
        text = (r.stdout or r.stderr).decode("utf-8", "replace").strip()
        ok = r.returncode == 0
        detail = (text.splitlines()[0] if text else "") if ok else \
            f"exit {r.returncode}: {(text.splitlines() or [''])[-1]}"
    except Exception as e:  # a binary that cannot start is a failed check, not a crash
        ok, detail = False, str(e)
    d = {"check": name, "ok": ok, "detail": detail}
    if not required and not ok:
        d["warning"] = True
        d["ok"] = True
    return d


def rollback(transport: NodeTransport, layout: Layout, *, dry_run: bool = False, force: bool = False, run_binaries: bool = True,
             lock_timeout: float = 30.0, on_wait=None) -> dict:
    def body() -> dict:
        recovered = recover_or_check(transport, layout, dry_run)
        hist = read_history(transport, layout)
        cur = pair(read_state(transport, layout))
        switches = [h for h in hist if h.get("action") in ("switch", "rollback")]
        if not switches:
            raise NotFound(f"no switch history on {transport.node}: nothing to roll back")
        last = switches[-1]
        base = {"node": transport.node, "action": "rollback", "recovered": recovered, "from": cur}
        if last.get("action") == "rollback":
            return {**base, "to": cur, "changed": False, "dryRun": dry_run, "steps": [],
                    "message": f"the last switch was already rolled back (at {last.get('time')}); "
                               "use 'upgrade switch VERSION' to move on"}
        to = last.get("from") or {}
        if not to.get("runtime"):
            # nothing to go back to is "not found" (exit 3), as with no switch at all: no
            # safety check refused anything (design.md's exit codes; docs/upgrade.md)
            raise NotFound("the last switch was the first one on this node; there is no earlier "
                           "release to roll back to")
        if cur != last.get("to") and not force:
            raise Refused(f"the node is on runtime {cur['runtime']}, agent {cur['agent']}, not where "
                          f"the last switch left it ({last['to']}); refusing to guess",
                          hint="use 'upgrade switch VERSION', or --force")
        for v in {to["runtime"], to.get("agent")} - {None}:
            if release_record(transport, layout, v) is None:
                raise NotFound(f"release {v} (the rollback target) is no longer staged")
            layout.check_release_inside(transport, v)
        checks = _checked_preflight(transport, layout, to, "runtime" if to["runtime"] != cur["runtime"] else "agent",
                                    run_binaries, force, hint="fix the release, or --force to roll back anyway")
        steps = apply(transport, layout, cur, to, dry_run=True)
        if dry_run:
            return {**base, "to": to, "changed": True, "dryRun": True, "steps": steps,
                    "preflight": checks}
        changing(target=str(to["runtime"]))  # named as the outcome names it (target_of)
        entry = commit(transport, layout, "rollback", last.get("component"), cur, to, rollbackOf=last.get("id"))
        return {**base, "to": to, "changed": True, "dryRun": False, "steps": steps,
                "preflight": checks, "historyId": entry["id"]}

    return locked_audited(transport, layout, "rollback", {"force": force}, body, target="-", dry_run=dry_run,
                          lock_timeout=lock_timeout, on_wait=on_wait,
                          target_of=lambda r: str((r.get("to") or {}).get("runtime")),
                          unstaged=NotFound(f"no switch history on {transport.node}: nothing to roll back "
                                            f"(no {layout.releases})"))
