"""The journal and crash recovery of switch and rollback (and of a killed stage --force).

Crash safety. The only *live* changes are single atomic steps:
- switch (``all`` or ``runtime``) first edits the *target* release's own
  configuration (not live: nothing reads it until ``current`` points there),
  then replaces ``current`` with rename(2) of a fresh temp symlink;
- switch ``--component agent`` rewrites the current release's configuration
  files. Several independent files cannot be replaced in one atomic step, so it
  is done in two phases: every new file is first written next to its target as
  a hidden temp file and fsynced (nothing live changes), the list is recorded in
  the journal, and then the files are renamed into place back to back (each
  rename(2) atomic, so every single file is always wholly old or wholly new).
  Backups of the old files go to ``releases/.katactl/backups/``.
A journal (``pending.json``) is written before the first live step and
removed after the history entry; any later stage/switch/rollback/gc that takes
the lock finds it and completes (or discards) the interrupted operation first
(a recorded set of configuration renames is always finished: rolled forward),
so the history always tells the truth; ``status`` reports such a node as
"switching", not "mixed".
- stage --force sets the old release aside (``releases/.replaced-<v>-<tok>``)
  and renames the new one (``releases/.staging-<v>-<tok>``) into place; a run
  killed between the two renames is finished by the next stage/switch/rollback/gc
  (forward when the new tree is complete, else the old one is put back).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets

from katactl import audit
from katactl.errors import OperationFailed, Refused
from katactl.upgrade import compiled, configedit
from katactl.upgrade.lock import done, journal_on_node, live
from katactl.upgrade.layout import INSTALL_PREFIX, RELEASE_RECORD, Layout, fault
from katactl.upgrade.state import check_entry, pair, read_history, read_json, read_state, release_record, walk_files
from katactl.backends.base import NodeTransport


def read_journal(transport: NodeTransport, layout: Layout) -> dict | None:
    """The pending journal (an interrupted switch/rollback), validated; None without one."""
    j = read_json(transport, layout.journal)
    if j is None:
        return None
    check_entry(j, layout.journal)
    for i, c in enumerate(j.get("configs") or []):
        path = c.get("path")
        # recovery renames tmp over path: only a release's own configuration file, ever
        if not (isinstance(path, str) and posixpath.normpath(path) == path
                and path.startswith(layout.releases + "/") and c.get("tmp") == _config_tmp(path)):
            raise OperationFailed(f"{layout.journal}: 'configs[{i}]' is not a configuration file of a release "
                                  "with its temp file beside it")
    return j


def _append_history(transport: NodeTransport, layout: Layout, entry: dict) -> None:
    try:
        old = transport.read_bytes(layout.history)
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    transport.write_bytes_atomic(layout.history, old + (json.dumps(entry, sort_keys=True) + "\n").encode())


# -- configuration edits -------------------------------------------------------------
def _agent_edits(transport: NodeTransport, layout: Layout, in_release: str, agent: str) -> list[tuple[str, str, str]]:
    """(file, old text, new text) pointing in_release's configs at agent's guest assets (that
    they exist is the preflight's check: named_files)."""
    edits = []
    target_root = layout.release(agent)
    release_of = layout.config_paths(transport)  # assets named by their resolved path move too

    def mapper(value: str):
        hit = release_of(value)
        if hit:
            rel = hit[1]
        elif value.startswith(INSTALL_PREFIX + "/") and not value.startswith(layout.releases + "/"):
            rel = value[len(INSTALL_PREFIX) + 1:]
        else:
            return None  # an asset outside the releases: not ours to move
        return f"{target_root}/{rel}"

    own = _image_bound_of(transport, layout, agent)
    unknown = []
    for f in walk_files(transport, layout.config_dir(in_release), ".toml"):
        old = transport.read_text(f)
        rel = f[len(layout.config_dir(in_release)) + 1:]
        try:
            new, _, unk = configedit.set_agent(old, mapper, lambda sec, rel=rel: own(rel, sec))
        except configedit.EditError as e:  # checked before any rename: nothing is installed
            raise Refused(f"{f}: {e}; katactl will not install it",
                          hint="write the key as a plain one-line string (kata-static's form), then retry") from None
        unknown += [f"{sec} of {rel}" for sec in unk]
        if new != old:
            edits.append((f, old, new))
    if unknown:
        raise Refused(f"release {agent}'s own {', '.join(configedit.IMAGE_BOUND_KEYS)} for "
                      f"{', '.join(unknown)} is unknown (its configuration names another release's image "
                      "and its release record predates katactl recording them); its image would be paired "
                      "with another image's dm-verity root hash",
                      hint=f"re-stage release {agent} (katactl upgrade stage SOURCE --force) while it is "
                           "not in use")
    return edits


def named_files(transport: NodeTransport, layout: Layout, to: dict,
                keys: tuple[str, ...]) -> list[tuple[str, str, str, list[str]]]:
    """(key, node path, its release, the configuration files naming it) of every file under a
    release (as given or resolved: Layout.config_paths) that release ``to["runtime"]``'s
    configuration names by one of ``keys`` once a switch to ``to`` has edited it (its guest
    assets pointed at ``to["agent"]``'s): what the preflight checks exists. A path outside the
    releases is the host's, not a release's to contain."""
    edited = {f: new for f, _old, new in _agent_edits(transport, layout, to["runtime"], to["agent"])}
    release_of = layout.config_paths(transport)
    top = layout.config_dir(to["runtime"])
    named: dict[tuple[str, str, str], list[str]] = {}
    for f in walk_files(transport, top, ".toml"):
        text = edited[f] if f in edited else transport.read_text(f)
        for _sec, key, value in configedit.asset_refs(text, keys):
            hit = release_of(value)
            if hit:
                named.setdefault((key, value, hit[0]), []).append(f[len(top) + 1:])
    return [(k, p, v, sorted(set(fs))) for (k, p, v), fs in sorted(named.items())]


def _image_bound_of(transport: NodeTransport, layout: Layout, agent: str):
    """``(config rel path, section) -> {key: value} | None``: release ``agent``'s own image-bound
    values (its dm-verity root hashes), as recorded when it was staged. A release staged
    before katactl recorded them: read from its configuration, where that section still names
    the release's own assets; else None (unknown)."""
    rec = release_record(transport, layout, agent) or {}
    recorded = rec.get("imageBound")
    if isinstance(recorded, dict):
        def from_record(rel: str, sec: str):
            v = (recorded.get(rel) or {}).get(sec)
            return {k: x for k, x in v.items() if isinstance(x, str)} if isinstance(v, dict) else None
        return from_record

    cache: dict[str, str | None] = {}

    def from_config(rel: str, sec: str):
        if rel not in cache:
            try:
                cache[rel] = transport.read_text(f"{layout.config_dir(agent)}/{rel}")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                cache[rel] = None
        text = cache[rel]
        if text is None:
            return None
        refs = [v for s, _k, v in configedit.asset_refs(text) if s == sec]
        if not refs or any(layout.version_of_path(v) != agent for v in refs):
            return None
        return (configedit.image_bound(text) or {}).get(sec)
    return from_config


#: a configuration file's next version, written beside it before the renames; hidden and
#: not ending in .toml, so neither Kata nor katactl reads it as a configuration
CONFIG_TMP_SUFFIX = ".katactl-new"


def _config_tmp(f: str) -> str:
    d, n = posixpath.split(f)
    return f"{d}/.{n}{CONFIG_TMP_SUFFIX}"


def _is_config_tmp(name: str) -> bool:
    return name.startswith(".") and (name.endswith(CONFIG_TMP_SUFFIX)
                                     or (name.startswith(".katactl-") and name.endswith(".tmp")))


def _write_edits(transport: NodeTransport, layout: Layout, release: str, edits, journal: dict | None = None) -> None:
    """Replace several configuration files as close to "all at once" as separate files allow.

    Phase 1 changes nothing live: a backup of every old file, and every new file written
    (temp file, fsync) beside its target. Then the plan is recorded in the journal, and
    phase 2 renames the new files into place back to back. A run killed in phase 2 is
    finished by recover from the journal (roll forward)."""
    plan = []
    for f, old, new in edits:
        rel = f[len(layout.release(release)) + 1:]
        b = f"{layout.backups(release)}/{rel}"
        transport.mkdir(posixpath.dirname(b))
        transport.write_bytes_atomic(b, old.encode())
        mode = transport.stat(f).mode & 0o777
        data = new.encode()
        tmp = _config_tmp(f)
        transport.write_bytes_atomic(tmp, data, mode=mode)
        plan.append({"path": f, "tmp": tmp, "sha256": hashlib.sha256(data).hexdigest()})
    if not plan:
        return
    fault("switch:after-config-tmp")
    if journal is not None:
        transport.write_bytes_atomic(layout.journal, json.dumps({**journal, "configs": plan}).encode())
        fault("switch:after-intent")
    for i, p in enumerate(plan, 1):
        with live(f"replaced {p['path']}"):
            transport.rename(p["tmp"], p["path"])
        fault("switch:after-config-rename", i)


def _finish_config_renames(transport: NodeTransport, journal: dict) -> int:
    """Phase 2 of an interrupted _write_edits: rename the recorded temp files that are
    still there (checked against their recorded sha256). Returns how many were renamed."""
    n = 0
    for p in journal.get("configs") or []:
        tmp, path = p.get("tmp"), p.get("path")
        if not (isinstance(tmp, str) and isinstance(path, str) and transport.exists(tmp)):
            continue
        if hashlib.sha256(transport.read_bytes(tmp)).hexdigest() != p.get("sha256"):
            transport.remove(tmp)  # not what was planned: apply recomputes the edit
            continue
        transport.rename(tmp, path)
        n += 1
    return n


def _clean_config_tmps(transport: NodeTransport, layout: Layout, versions) -> None:
    """Remove configuration temp files an interrupted run left (never read by anyone)."""
    for v in versions:
        if not v:
            continue
        for p, s in transport.walk(layout.config_dir(v)):
            if not s.is_dir and _is_config_tmp(posixpath.basename(p)):
                transport.remove(p)


def _flip(transport: NodeTransport, layout: Layout, version: str) -> None:
    tmp = f"{layout.root}/.current.katactl-{os.getpid()}-{secrets.token_hex(3)}"
    transport.symlink(layout.link_target(version), tmp)
    fault("switch:after-tmp-link")
    with live(f"switched {layout.current} to {layout.link_target(version)}"):
        transport.rename(tmp, layout.current)
    fault("switch:after-flip")


def apply(transport: NodeTransport, layout: Layout, cur: dict, to: dict, dry_run: bool, journal: dict | None = None) -> list[str]:
    """Move the node from state cur to state to; returns the steps (planned or done).
    ``journal``: the pending entry, extended with the configuration renames before
    the first one (so an interrupted set of renames is finished by recover)."""
    steps: list[str] = []
    if to["runtime"] != cur["runtime"]:
        edits = _agent_edits(transport, layout, to["runtime"], to["agent"]) if to["agent"] else []
        steps += [f"point {len(edits)} config file(s) of release {to['runtime']} at agent {to['agent']}"] \
            if edits else []
        # QEMU's non-relocatable datadir: a link through current, so the flip moves it too
        steps += compiled.link_datadirs(transport, layout, to["runtime"], dry_run)
        steps.append(f"switch {layout.current} -> {layout.link_target(to['runtime'])}")
        if dry_run:
            return steps
        _write_edits(transport, layout, to["runtime"], edits, journal)
        fault("switch:after-prepare")
        _flip(transport, layout, to["runtime"])
    elif to["agent"] != cur["agent"]:
        edits = _agent_edits(transport, layout, to["runtime"], to["agent"])
        steps += compiled.link_datadirs(transport, layout, to["runtime"], dry_run)
        steps.append(f"point {len(edits)} live config file(s) of release {to['runtime']} "
                     f"at agent {to['agent']}")
        if dry_run:
            return steps
        _write_edits(transport, layout, to["runtime"], edits, journal)
        fault("switch:after-config")
    return steps


# -- crash recovery ------------------------------------------------------------------
def recover(transport: NodeTransport, layout: Layout) -> str | None:
    """Finish what a killed stage --force or switch/rollback left (lock held)."""
    notes = [m for m in (_recover_replaced(transport, layout), _recover_switch(transport, layout)) if m]
    return "; ".join(notes) or None


def recover_or_check(transport: NodeTransport, layout: Layout, dry_run: bool) -> str | None:
    """switch/rollback/gc's first step: recover for a real run; a dry run changes nothing
    but reads the journal recovery would act on, so it fails where the real run would.
    Both then read the history (switch appends to it, rollback and gc decide by it): a
    damaged one stops the command before anything moves."""
    if dry_run:
        j = read_journal(transport, layout)
        note = f"would first finish an interrupted {j.get('action')} ({layout.journal})" if j else None
    else:
        note = recover(transport, layout)
    read_history(transport, layout)
    return note


def _recover_replaced(transport: NodeTransport, layout: Layout) -> str | None:
    """A stage --force killed between its two renames left releases/<v> missing, the old
    tree in .replaced-<v>-<tok> and the new one in .staging-<v>-<tok>: roll forward when
    the new tree is complete (its record is written last), else put the old one back."""
    try:
        names = transport.listdir(layout.releases)
    except (FileNotFoundError, NotADirectoryError):
        return None
    notes = []
    for n in names:
        if not n.startswith(".replaced-") or n.count("-") < 2:
            continue
        v, tok = n[len(".replaced-"):].rsplit("-", 1)
        old, new, dest = f"{layout.releases}/{n}", f"{layout.releases}/.staging-{v}-{tok}", layout.release(v)
        if not transport.exists(dest):
            if transport.exists(f"{new}/{RELEASE_RECORD}"):
                notes.append(f"completed an interrupted replacement of release {v}")
                with live(notes[-1]):
                    transport.rename(new, dest)
            else:
                notes.append(f"restored release {v} (an interrupted replacement had not finished)")
                with live(notes[-1]):
                    transport.rename(old, dest)
                continue
        transport.remove(old, recursive=True)
    return "; ".join(notes) or None


def _recover_switch(transport: NodeTransport, layout: Layout) -> str | None:
    """Finish what a killed switch/rollback left in the journal (lock held)."""
    try:
        names = transport.listdir(layout.root)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for n in names:
        if n.startswith(".current.katactl-"):
            transport.remove(f"{layout.root}/{n}")
    compiled.clean_link_tmps(transport, layout)
    j = read_journal(transport, layout)
    if j is None:
        return None
    to, frm = j.get("to") or {}, j.get("from") or {}
    # a recorded set of configuration renames is finished first: all old or all new
    finished = _finish_config_renames(transport, j)
    _clean_config_tmps(transport, layout, {to.get("runtime"), frm.get("runtime")})
    cur = pair(read_state(transport, layout))
    if j.get("id") and any(h.get("id") == j["id"] for h in read_history(transport, layout)[-50:]):
        transport.remove(layout.journal)  # killed after the history entry: only the journal was left
        return None
    if cur == to:
        outcome = "rolled forward" if finished else "completed"
    elif cur == frm:
        transport.remove(layout.journal)
        return f"discarded an interrupted {j.get('action')} that had not switched anything"
    else:
        apply(transport, layout, cur, to, dry_run=False, journal=j)
        outcome = "rolled forward"
    entry = {k: v for k, v in j.items() if k != "configs"}
    entry["recovered"] = True
    _append_history(transport, layout, entry)
    transport.remove(layout.journal)
    note = f"{outcome} an interrupted {j.get('action')} to runtime {to.get('runtime')}, agent {to.get('agent')}"
    done(note)
    return note


# -- a switch, journaled -------------------------------------------------------------
def commit(transport: NodeTransport, layout: Layout, action: str, component: str | None, frm: dict, to: dict, **extra) -> dict:
    """Move the node from ``frm`` to ``to``, crash-safe: journal, apply, history, drop
    the journal (an interrupted switch is finished by recover). Returns the history entry."""
    entry = {"id": secrets.token_hex(6), "time": audit.now_iso(), "user": audit.current_user(), "client": client(),
             "node": transport.node, "action": action, "component": component, "from": frm, "to": to, **extra}
    journal_on_node(True)
    transport.write_bytes_atomic(layout.journal, json.dumps(entry).encode())
    fault("switch:after-journal")
    apply(transport, layout, frm, to, dry_run=False, journal=entry)
    _append_history(transport, layout, entry)
    fault("switch:after-history")
    transport.remove(layout.journal)
    journal_on_node(False)
    return entry


def client() -> str:
    import socket

    return socket.gethostname()
