"""gc: remove the releases nothing uses (never the current, the rollback target unless
asked, one a containerd runtime handler pins, nor one a running process or live sandbox uses)."""
from __future__ import annotations

import secrets

from katactl.audit import changing
from katactl.upgrade import configedit
from katactl.upgrade.journal import recover_or_check
from katactl.upgrade.layout import Layout, fault
from katactl.upgrade.lock import live, locked_audited
from katactl.upgrade.state import UNMANAGED, read_history, read_state, releases, walk_files
from katactl.output import first_few
from katactl.upgrade.status import handler_pins, release_users
from katactl.backends.base import NodeTransport


def gc(transport: NodeTransport, layout: Layout, *, dry_run: bool = False, force: bool = False, keep_previous: bool = True,
       only=None, lock_timeout: float = 30.0, on_wait=None) -> dict:
    """Remove releases nothing uses. ``keep_previous`` keeps the last switch's ``from``
    (the rollback target). ``only`` (a set of versions: what the user confirmed after a
    dry run) limits the removal to those; a release that became removable since is
    kept and reported, never deleted unconfirmed."""
    def body() -> dict:
        recovered = recover_or_check(transport, layout, dry_run)
        st = read_state(transport, layout)
        hist = read_history(transport, layout)
        protected: dict[str, str] = {}
        for role in ("runtime", "agent"):
            if st[role] and st[role] not in (UNMANAGED, "mixed"):
                protected.setdefault(st[role], f"current {role}")
        if keep_previous and hist:
            for v in (hist[-1].get("from") or {}).values():
                if v:
                    protected.setdefault(v, "previous (the rollback target; --no-keep-previous to remove)")
        for v, handlers in handler_pins(transport, layout).items():
            protected.setdefault(v, f"pinned by containerd handler {', '.join(handlers)}")
        in_use, stats = release_users(transport, layout, force=force, verb="removed", escape="--force")
        # the current runtime release's configs may point at another release's assets, also by
        # their resolved path (/var/opt/kata/releases/V/... with /opt -> var/opt)
        if st["runtime"] and st["runtime"] != UNMANAGED:
            release_of = layout.config_paths(transport)
            for f in walk_files(transport, layout.config_dir(st["runtime"]), ".toml"):
                for _s, _k, val in configedit.asset_refs(transport.read_text(f)):
                    hit = release_of(val)
                    if hit:
                        protected.setdefault(hit[0], "referenced by the current configuration")
        removed, kept = [], []
        for v in releases(transport, layout):
            if v in protected:
                kept.append({"version": v, "reason": protected[v]})
            elif v in in_use:
                kept.append({"version": v, "reason": "in use: " + first_few(in_use[v])})
            elif only is not None and v not in only:
                kept.append({"version": v, "reason": "not in the confirmed plan (run gc again)"})
            else:
                removed.append(v)
        stale = [n for n in (transport.listdir(layout.releases) if transport.exists(layout.releases) else [])
                 if n.startswith((".staging-", ".trash-"))]
        if not dry_run:
            if removed or stale:  # what a run killed midway was removing (its outcome never comes)
                changing(target=",".join(removed) or "-", removing=removed)
            for v in removed:
                trash = f"{layout.releases}/.trash-{v}-{secrets.token_hex(4)}"
                with live(f"removed release {v}"):
                    transport.rename(layout.release(v), trash)
                fault("gc:after-trash")
                transport.remove(trash, recursive=True)
                if transport.exists(layout.backups(v)):
                    transport.remove(layout.backups(v), recursive=True)
            for n in stale:
                if transport.exists(f"{layout.releases}/{n}"):
                    transport.remove(f"{layout.releases}/{n}", recursive=True)
        return {"node": transport.node, "removed": removed, "kept": kept, "staleTempDirs": stale,
                "uninspectedProcesses": stats.get("unreadable", 0),
                "recovered": recovered, "changed": bool(removed or stale), "dryRun": dry_run}

    return locked_audited(transport, layout, "gc", {"force": force, "keepPrevious": keep_previous}, body, target="-",
                          dry_run=dry_run, lock_timeout=lock_timeout, on_wait=on_wait,
                          target_of=lambda r: ",".join(r["removed"]) or "-",
                          # nothing to remove, and nothing to create (not even the lock)
                          unstaged={"node": transport.node, "removed": [], "kept": [], "staleTempDirs": [],
                                    "uninspectedProcesses": 0, "recovered": None, "changed": False,
                                    "dryRun": dry_run})
