"""stage / switch / rollback / status / gc: the A/B upgrade operations.

Crash safety. The only *live* changes are single atomic steps:
- stage writes into ``releases/.staging-*`` and renames the finished,
  verified, fsynced tree to ``releases/<v>`` (the release record is inside
  before the rename, so a ``releases/<v>`` dir is always complete);
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
  (forward when the new tree is complete, else the old one is put back). It never
  replaces a release a running process or live sandbox uses (checked before the
  extraction and again just before the set-aside), nor one it cannot prove unused.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets

from katactl import audit
from katactl.errors import NotFound, OperationFailed, Refused, UsageError
from katactl.upgrade import configedit, procscan, source as src
from katactl.upgrade.layout import (COMPONENTS, CONFIG_SUBDIR, INSTALL_PREFIX, RELEASE_RECORD,
                                    SHIM_BINARIES, Layout, fault, validate_version)
from katactl.upgrade.lock import node_lock

DEFAULT_RESERVE = 256 << 20


# -- small helpers ---------------------------------------------------------------
def _audit(action: str, target: str, transport, params: dict, changed: bool | None,
           result: str = "ok") -> None:
    audit.record(f"upgrade.{action}", target, node=transport.node, params=params, result=result,
                 changed=changed)


def _read_json(t, path: str):
    """A node's JSON state file (journal, release record); None when absent. A file that is
    not JSON (or nests deeper than the parser goes) is exit 1 naming it."""
    try:
        data = t.read_bytes(path, limit=4 << 20)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise OperationFailed(f"{path}: corrupt JSON") from None


#: a journal's or history entry's keys holding {"runtime": str|None, "agent": str|None}
_PAIR_KEYS = ("from", "to")


def _check_entry(entry, where: str) -> dict:
    """A journal or history entry as switch/rollback/status use it: an object whose
    ``from``/``to`` are {runtime, agent} objects of strings, ``configs`` a list of
    objects; anything else is OperationFailed naming the file and the key."""
    if not isinstance(entry, dict):
        raise OperationFailed(f"{where}: not a JSON object (a {type(entry).__name__})")
    for k in _PAIR_KEYS:
        v = entry.get(k)
        if v is None:
            continue
        if not isinstance(v, dict):
            raise OperationFailed(f"{where}: {k!r} is not an object")
        for role in ("runtime", "agent"):
            if v.get(role) is not None and not isinstance(v.get(role), str):
                raise OperationFailed(f"{where}: '{k}.{role}' is not a string")
    for k in ("id", "action", "component", "time"):
        if entry.get(k) is not None and not isinstance(entry.get(k), str):
            raise OperationFailed(f"{where}: {k!r} is not a string")
    configs = entry.get("configs")
    if configs is not None and (not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs)):
        raise OperationFailed(f"{where}: 'configs' is not a list of objects")
    return entry


def read_journal(t, L: Layout) -> dict | None:
    """The pending journal (an interrupted switch/rollback), validated; None without one."""
    j = _read_json(t, L.journal)
    if j is None:
        return None
    _check_entry(j, L.journal)
    for i, c in enumerate(j.get("configs") or []):
        path = c.get("path")
        # recovery renames tmp over path: only a release's own configuration file, ever
        if not (isinstance(path, str) and posixpath.normpath(path) == path
                and path.startswith(L.releases + "/") and c.get("tmp") == _config_tmp(path)):
            raise OperationFailed(f"{L.journal}: 'configs[{i}]' is not a configuration file of a release "
                                  "with its temp file beside it")
    return j


def _sync_entries(t, paths) -> None:
    """Make new directory entries (dirs, symlinks) durable: one fsync per parent directory."""
    for d in sorted({posixpath.dirname(p) for p in paths}):
        t.fsync_dir(d)


def _verified(chunks, expect: str | None, what: str):
    """Pass chunks through, hashing them; after the last one raise Refused on a sha256
    mismatch, so write_stream_atomic never renames a bad file into place."""
    h = hashlib.sha256()
    for b in chunks:
        h.update(b)
        yield b
    got = h.hexdigest()
    if got != expect:
        raise Refused(f"{what} (expected {expect}, got {got})")


def _walk(t, top: str):
    """(path, stat) of everything below top, depth first, symlinks not followed."""
    try:
        names = t.listdir(top)
    except (FileNotFoundError, NotADirectoryError):
        return
    for n in names:
        p = f"{top}/{n}"
        s = t.stat(p, follow_symlinks=False)
        yield p, s
        if s.is_dir:
            yield from _walk(t, p)


def _walk_files(t, top: str, suffix: str = "") -> list[str]:
    return [p for p, s in _walk(t, top) if not s.is_dir and not s.is_link and p.endswith(suffix)]


def releases(t, L: Layout) -> list[str]:
    try:
        names = t.listdir(L.releases)
    except FileNotFoundError:
        return []
    return [n for n in names if not n.startswith(".") and t.is_dir(f"{L.releases}/{n}")]


def release_record(t, L: Layout, v: str) -> dict | None:
    return _read_json(t, f"{L.release(v)}/{RELEASE_RECORD}")


def _lock(t, L, lock_timeout, on_wait):
    return node_lock(t, L, timeout=lock_timeout, on_wait=on_wait)


# -- state -------------------------------------------------------------------------
UNMANAGED = "<unmanaged>"


def read_state(t, L: Layout) -> dict:
    """{"runtime": v|None|UNMANAGED, "agent": v|None|"mixed", "link": target}."""
    runtime = None
    link = None
    try:
        s = t.stat(L.current, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        s = None
    if s is not None:
        if not s.is_link:
            return {"runtime": UNMANAGED, "agent": None, "agents": [], "link": None}
        link = t.readlink(L.current)
        absolute = posixpath.normpath(link if link.startswith("/") else posixpath.join(L.root, link))
        runtime = L.version_of_path(absolute + "/") if absolute.startswith(L.releases + "/") else None
        if runtime is None or "/" in absolute[len(L.releases) + 1:]:
            runtime = UNMANAGED
    agent = None
    if runtime and runtime != UNMANAGED:
        vs = set()
        for f in _walk_files(t, L.config_dir(runtime), ".toml"):
            try:
                text = t.read_text(f)
            except OSError:
                continue
            for _sec, _key, value in configedit.asset_refs(text):
                v = L.version_of_path(value)
                if v:
                    vs.add(v)
        agents = sorted(vs)
        agent = agents[0] if len(vs) == 1 else ("mixed" if vs else None)
    else:
        agents = []
    return {"runtime": runtime, "agent": agent, "link": link, "agents": agents}


def _pair(s: dict) -> dict:
    return {"runtime": s.get("runtime"), "agent": s.get("agent")}


def read_history(t, L: Layout) -> list[dict]:
    """The switch history, oldest first. It is rewritten atomically, so a line that is
    not an entry is damage, not a torn write: exit 1 naming the file and line (rollback
    would otherwise pick the wrong target, status report a wrong previous release)."""
    try:
        raw = t.read_bytes(L.history)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{L.history}: line {n}"
        try:
            entry = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            raise OperationFailed(f"{where}: not a JSON history entry",
                                  hint="the switch history is damaged; repair or move the file aside") from None
        out.append(_check_entry(entry, where))
    return out


def _append_history(t, L: Layout, entry: dict) -> None:
    try:
        old = t.read_bytes(L.history)
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    t.write_bytes_atomic(L.history, old + (json.dumps(entry, sort_keys=True) + "\n").encode())


# -- configuration edits -------------------------------------------------------------
def _agent_edits(t, L: Layout, in_release: str, agent: str) -> list[tuple[str, str, str]]:
    """(file, old text, new text) pointing in_release's configs at agent's guest assets."""
    edits = []
    missing = []
    target_root = L.release(agent)

    def mapper(value: str):
        v = L.version_of_path(value)
        if v:
            rel = value[len(L.release(v)) + 1:]
        elif value.startswith(INSTALL_PREFIX + "/") and not value.startswith(L.releases + "/"):
            rel = value[len(INSTALL_PREFIX) + 1:]
        else:
            return None  # an asset outside the releases: not ours to move
        new = f"{target_root}/{rel}"
        if new != value and not t.exists(new):
            missing.append(f"{rel} (referenced by {f})")
        return new

    for f in _walk_files(t, L.config_dir(in_release), ".toml"):
        old = t.read_text(f)
        new, _ = configedit.set_agent(old, mapper)
        if new != old:
            edits.append((f, old, new))
    if missing:
        raise Refused(f"release {agent} lacks guest asset(s) the configuration needs: "
                      + ", ".join(sorted(set(missing))))
    return edits


#: a configuration file's next version, written beside it before the renames; hidden and
#: not ending in .toml, so neither Kata nor katactl reads it as a configuration
CONFIG_TMP_SUFFIX = ".katactl-new"


def _config_tmp(f: str) -> str:
    d, n = posixpath.split(f)
    return f"{d}/.{n}{CONFIG_TMP_SUFFIX}"


def _is_config_tmp(name: str) -> bool:
    return name.startswith(".") and (name.endswith(CONFIG_TMP_SUFFIX)
                                     or (name.startswith(".katactl-") and name.endswith(".tmp")))


def _write_edits(t, L: Layout, release: str, edits, journal: dict | None = None) -> None:
    """Replace several configuration files as close to "all at once" as separate files allow.

    Phase 1 changes nothing live: a backup of every old file, and every new file written
    (temp file, fsync) beside its target. Then the plan is recorded in the journal, and
    phase 2 renames the new files into place back to back. A run killed in phase 2 is
    finished by _recover from the journal (roll forward)."""
    plan = []
    for f, old, new in edits:
        rel = f[len(L.release(release)) + 1:]
        b = f"{L.backups(release)}/{rel}"
        t.mkdir(posixpath.dirname(b))
        t.write_bytes_atomic(b, old.encode())
        mode = t.stat(f).mode & 0o777
        data = new.encode()
        tmp = _config_tmp(f)
        t.write_bytes_atomic(tmp, data, mode=mode)
        plan.append({"path": f, "tmp": tmp, "sha256": hashlib.sha256(data).hexdigest()})
    if not plan:
        return
    fault("switch:after-config-tmp")
    if journal is not None:
        t.write_bytes_atomic(L.journal, json.dumps({**journal, "configs": plan}).encode())
        fault("switch:after-intent")
    for i, p in enumerate(plan, 1):
        t.rename(p["tmp"], p["path"])
        fault("switch:after-config-rename", i)


def _finish_config_renames(t, journal: dict) -> int:
    """Phase 2 of an interrupted _write_edits: rename the recorded temp files that are
    still there (checked against their recorded sha256). Returns how many were renamed."""
    n = 0
    for p in journal.get("configs") or []:
        tmp, path = p.get("tmp"), p.get("path")
        if not (isinstance(tmp, str) and isinstance(path, str) and t.exists(tmp)):
            continue
        if hashlib.sha256(t.read_bytes(tmp)).hexdigest() != p.get("sha256"):
            t.remove(tmp)  # not what was planned: _apply recomputes the edit
            continue
        t.rename(tmp, path)
        n += 1
    return n


def _clean_config_tmps(t, L: Layout, versions) -> None:
    """Remove configuration temp files an interrupted run left (never read by anyone)."""
    for v in versions:
        if not v:
            continue
        # one walk (each directory listed once: over SSH every listdir is a round trip)
        for p, s in list(_walk(t, L.config_dir(v))):
            if not s.is_dir and _is_config_tmp(posixpath.basename(p)):
                t.remove(p)


def _flip(t, L: Layout, version: str) -> None:
    tmp = f"{L.root}/.current.katactl-{os.getpid()}-{secrets.token_hex(3)}"
    t.symlink(L.link_target(version), tmp)
    fault("switch:after-tmp-link")
    t.rename(tmp, L.current)
    fault("switch:after-flip")


def _apply(t, L: Layout, cur: dict, to: dict, dry_run: bool, journal: dict | None = None) -> list[str]:
    """Move the node from state cur to state to; returns the steps (planned or done).
    ``journal``: the pending entry, extended with the configuration renames before
    the first one (so an interrupted set of renames is finished by _recover)."""
    steps: list[str] = []
    if to["runtime"] != cur["runtime"]:
        edits = _agent_edits(t, L, to["runtime"], to["agent"]) if to["agent"] else []
        steps += [f"point {len(edits)} config file(s) of release {to['runtime']} at agent {to['agent']}"] \
            if edits else []
        steps.append(f"switch {L.current} -> {L.link_target(to['runtime'])}")
        if dry_run:
            return steps
        _write_edits(t, L, to["runtime"], edits, journal)
        fault("switch:after-prepare")
        _flip(t, L, to["runtime"])
    elif to["agent"] != cur["agent"]:
        edits = _agent_edits(t, L, to["runtime"], to["agent"])
        steps.append(f"point {len(edits)} live config file(s) of release {to['runtime']} "
                     f"at agent {to['agent']}")
        if dry_run:
            return steps
        _write_edits(t, L, to["runtime"], edits, journal)
        fault("switch:after-config")
    return steps


def _recover(t, L: Layout) -> str | None:
    """Finish what a killed stage --force or switch/rollback left (lock held)."""
    notes = [m for m in (_recover_replaced(t, L), _recover_switch(t, L)) if m]
    return "; ".join(notes) or None


def _recover_or_check(t, L: Layout, dry_run: bool) -> str | None:
    """switch/rollback/gc's first step: _recover for a real run; a dry run changes nothing
    but reads the journal recovery would act on, so it fails where the real run would.
    Both then read the history (switch appends to it, rollback and gc decide by it): a
    damaged one stops the command before anything moves."""
    if dry_run:
        j = read_journal(t, L)
        note = f"would first finish an interrupted {j.get('action')} ({L.journal})" if j else None
    else:
        note = _recover(t, L)
    read_history(t, L)
    return note


def _recover_replaced(t, L: Layout) -> str | None:
    """A stage --force killed between its two renames left releases/<v> missing, the old
    tree in .replaced-<v>-<tok> and the new one in .staging-<v>-<tok>: roll forward when
    the new tree is complete (its record is written last), else put the old one back."""
    try:
        names = t.listdir(L.releases)
    except (FileNotFoundError, NotADirectoryError):
        return None
    notes = []
    for n in names:
        if not n.startswith(".replaced-") or n.count("-") < 2:
            continue
        v, tok = n[len(".replaced-"):].rsplit("-", 1)
        old, new, dest = f"{L.releases}/{n}", f"{L.releases}/.staging-{v}-{tok}", L.release(v)
        if not t.exists(dest):
            if t.exists(f"{new}/{RELEASE_RECORD}"):
                t.rename(new, dest)
                notes.append(f"completed an interrupted replacement of release {v}")
            else:
                t.rename(old, dest)
                notes.append(f"restored release {v} (an interrupted replacement had not finished)")
                continue
        t.remove(old, recursive=True)
    return "; ".join(notes) or None


def _recover_switch(t, L: Layout) -> str | None:
    """Finish what a killed switch/rollback left in the journal (lock held)."""
    try:
        names = t.listdir(L.root)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for n in names:
        if n.startswith(".current.katactl-"):
            t.remove(f"{L.root}/{n}")
    j = read_journal(t, L)
    if j is None:
        return None
    to, frm = j.get("to") or {}, j.get("from") or {}
    # a recorded set of configuration renames is finished first: all old or all new
    finished = _finish_config_renames(t, j)
    _clean_config_tmps(t, L, {to.get("runtime"), frm.get("runtime")})
    cur = _pair(read_state(t, L))
    if j.get("id") and any(h.get("id") == j["id"] for h in read_history(t, L)[-50:]):
        t.remove(L.journal)  # killed after the history entry: only the journal was left
        return None
    if cur == to:
        outcome = "rolled forward" if finished else "completed"
    elif cur == frm:
        t.remove(L.journal)
        return f"discarded an interrupted {j.get('action')} that had not switched anything"
    else:
        _apply(t, L, cur, to, dry_run=False, journal=j)
        outcome = "rolled forward"
    entry = {k: v for k, v in j.items() if k != "configs"}
    entry["recovered"] = True
    _append_history(t, L, entry)
    t.remove(L.journal)
    return f"{outcome} an interrupted {j.get('action')} to runtime {to.get('runtime')}, agent {to.get('agent')}"


def _preflight(t, L: Layout, to: dict, component: str, run_binaries: bool) -> list[dict]:
    checks: list[dict] = []
    rel = L.release(to["runtime"])
    if component in ("all", "runtime"):
        shims = [f"{rel}/{b}" for b in SHIM_BINARIES if t.exists(f"{rel}/{b}")]
        checks.append({"check": "shim binary", "ok": bool(shims),
                       "detail": shims[0] if shims else f"none of {', '.join(SHIM_BINARIES)} in {rel}"})
        cfgs = _walk_files(t, L.config_dir(to["runtime"]), ".toml")
        checks.append({"check": "configuration", "ok": bool(cfgs),
                       "detail": f"{len(cfgs)} file(s) in {L.config_dir(to['runtime'])}"})
        if not run_binaries:
            checks.append({"check": "binaries run", "ok": True, "skipped": True,
                           "detail": "not run (--no-preflight-exec)"})
        elif t.host_root:
            checks.append({"check": "binaries run", "ok": True, "skipped": True,
                           "detail": "not run: --host-root (a mounted node's binaries are not executed here)"})
        else:
            for b in [s for s in shims[:1]] + [p for p in (f"{rel}/bin/kata-runtime",) if t.exists(p)]:
                checks.append(_run_check(t, [b, "--version"], required=True))
            kr = f"{rel}/bin/kata-runtime"
            if t.exists(kr):
                checks.append(_run_check(t, [kr, "check", "--check-version-only"], required=False))
    return checks


def _run_check(t, argv: list[str], required: bool) -> dict:
    name = " ".join([argv[0].rsplit("/", 1)[-1], *argv[1:]])
    try:
        r = t.run(argv, timeout=30)
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


# -- switch / rollback -------------------------------------------------------------------
def switch(t, L: Layout, version: str, component: str = "all", *, dry_run: bool = False,
           force: bool = False, run_binaries: bool = True, lock_timeout: float = 30.0,
           on_wait=None) -> dict:
    validate_version(version)
    if component not in COMPONENTS:
        raise UsageError(f"invalid --component {component!r} (choose from {', '.join(COMPONENTS)})")
    params = {"version": version, "component": component, "force": force}
    if not t.is_dir(L.releases):  # nothing staged: say so without creating the lock's directory
        e = NotFound(f"release {version} is not staged on {t.node} (no {L.releases})",
                     hint=f"katactl upgrade stage SOURCE --as {version}")
        if not dry_run:
            _audit("switch", version, t, params, None, result=f"error: {e}")
        raise e
    return _locked_audited(
        t, L, "switch", params, lambda: _switch_locked(t, L, version, component, dry_run, force, run_binaries),
        target=version, dry_run=dry_run, lock_timeout=lock_timeout, on_wait=on_wait)


def _locked_audited(t, L: Layout, action: str, params: dict, body, *, target: str, dry_run: bool,
                    lock_timeout: float, on_wait, target_of=None) -> dict:
    """body() for a dry run; otherwise body() under the node's upgrade lock, with an audit
    record of the outcome (an error too). The record's target is ``target``, or
    ``target_of(result)`` once the result is known."""
    if dry_run:
        return body()
    try:
        with _lock(t, L, lock_timeout, on_wait):
            res = body()
    except Exception as e:
        _audit(action, target, t, params, None, result=f"error: {e}")
        raise
    _audit(action, target_of(res) if target_of else target, t, params, res["changed"])
    return res


def _switch_locked(t, L, version, component, dry_run, force, run_binaries) -> dict:
    recovered = _recover_or_check(t, L, dry_run)
    fault("switch:locked")
    staged = releases(t, L)
    if version not in staged or release_record(t, L, version) is None:
        raise NotFound(f"release {version} is not staged on {t.node} "
                       f"(staged: {', '.join(staged) or 'none'})",
                       hint=f"katactl upgrade stage SOURCE --as {version}")
    cur = read_state(t, L)
    if cur["runtime"] == UNMANAGED:
        raise Refused(f"{L.current} exists but is not a symlink into {L.releases}; "
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
    frm = _pair(cur)
    base = {"node": t.node, "action": "switch", "component": component, "from": frm, "to": to,
            "recovered": recovered}
    if to == frm:
        return {**base, "changed": False, "dryRun": dry_run, "steps": [], "preflight": [],
                "message": f"already on runtime {to['runtime']}, agent {to['agent']}"}
    checks = _checked_preflight(t, L, to, component, run_binaries, force,
                                hint="fix the release, or --force to switch anyway")
    steps = _apply(t, L, frm, to, dry_run=True)
    if dry_run:
        return {**base, "changed": True, "dryRun": True, "steps": steps, "preflight": checks}
    entry = _commit(t, L, "switch", component, frm, to)
    return {**base, "changed": True, "dryRun": False, "steps": steps, "preflight": checks,
            "historyId": entry["id"]}


def _checked_preflight(t, L: Layout, to: dict, component: str, run_binaries: bool, force: bool,
                       hint: str | None = None) -> list[dict]:
    """The preflight checks; Refused when one fails, unless force."""
    checks = _preflight(t, L, to, component, run_binaries)
    failed = [c for c in checks if not c["ok"]]
    if failed and not force:
        raise Refused("preflight failed: " + "; ".join(f"{c['check']}: {c['detail']}" for c in failed),
                      hint=hint)
    return checks


def _commit(t, L: Layout, action: str, component: str | None, frm: dict, to: dict, **extra) -> dict:
    """Move the node from ``frm`` to ``to``, crash-safe: journal, apply, history, drop
    the journal (an interrupted switch is finished by _recover). Returns the history entry."""
    entry = {"id": secrets.token_hex(6), "time": audit.now_iso(), "user": audit.current_user(), "client": _client(),
             "node": t.node, "action": action, "component": component, "from": frm, "to": to, **extra}
    t.write_bytes_atomic(L.journal, json.dumps(entry).encode())
    fault("switch:after-journal")
    _apply(t, L, frm, to, dry_run=False, journal=entry)
    _append_history(t, L, entry)
    fault("switch:after-history")
    t.remove(L.journal)
    return entry


def _client() -> str:
    import socket

    return socket.gethostname()


def rollback(t, L: Layout, *, dry_run: bool = False, force: bool = False, run_binaries: bool = True,
             lock_timeout: float = 30.0, on_wait=None) -> dict:
    if not t.is_dir(L.releases):  # no history without it: say so without creating the lock's directory
        e = NotFound(f"no switch history on {t.node}: nothing to roll back (no {L.releases})")
        if not dry_run:
            _audit("rollback", "-", t, {"force": force}, None, result=f"error: {e}")
        raise e

    def body() -> dict:
        recovered = _recover_or_check(t, L, dry_run)
        hist = read_history(t, L)
        cur = _pair(read_state(t, L))
        switches = [h for h in hist if h.get("action") in ("switch", "rollback")]
        if not switches:
            raise NotFound(f"no switch history on {t.node}: nothing to roll back")
        last = switches[-1]
        base = {"node": t.node, "action": "rollback", "recovered": recovered, "from": cur}
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
            if release_record(t, L, v) is None:
                raise NotFound(f"release {v} (the rollback target) is no longer staged")
        checks = _checked_preflight(t, L, to, "runtime" if to["runtime"] != cur["runtime"] else "agent",
                                    run_binaries, force, hint="fix the release, or --force to roll back anyway")
        steps = _apply(t, L, cur, to, dry_run=True)
        if dry_run:
            return {**base, "to": to, "changed": True, "dryRun": True, "steps": steps,
                    "preflight": checks}
        entry = _commit(t, L, "rollback", last.get("component"), cur, to, rollbackOf=last.get("id"))
        return {**base, "to": to, "changed": True, "dryRun": False, "steps": steps,
                "preflight": checks, "historyId": entry["id"]}

    return _locked_audited(t, L, "rollback", {"force": force}, body, target="-", dry_run=dry_run,
                           lock_timeout=lock_timeout, on_wait=on_wait,
                           target_of=lambda r: str((r.get("to") or {}).get("runtime")))


# -- stage --------------------------------------------------------------------------------
def stage(t, L: Layout, source: str, *, version: str | None = None, sha256: str | None = None,
          no_verify: bool = False, reserve: int = DEFAULT_RESERVE, force: bool = False,
          dry_run: bool = False, lock_timeout: float = 30.0, on_wait=None) -> dict:
    src.check_source_arg(source)
    params = {"source": source, "version": version, "sha256": sha256, "noVerify": no_verify,
              "force": force}
    try:
        res = _stage(t, L, source, version, sha256, no_verify, reserve, force, dry_run,
                     lock_timeout, on_wait)
    except Exception as e:
        if not dry_run:
            _audit("stage", version or source, t, params, None, result=f"error: {e}")
        raise
    if not dry_run:
        _audit("stage", res["version"], t, params, res["changed"])
    return res


def _stage(t, L, source, version, sha256, no_verify, reserve, force, dry_run, lock_timeout, on_wait):
    source = os.path.abspath(os.path.expanduser(source))
    kind = src.check_source(source)
    if version is not None:
        validate_version(version, "--as")
    if sha256 is not None:
        if kind == "dir":
            raise UsageError("--sha256 checks a tarball; a directory source needs a SHA256SUMS manifest")
        if not src._HEX64.fullmatch(sha256):
            raise UsageError(f"invalid --sha256 {sha256!r}: expected 64 hex digits")
    verified: list[str] = []
    source_sha = None
    if kind != "dir":
        source_sha = src.file_sha256(source)
        for label, want in (("--sha256", sha256), ("sidecar", src.sidecar_sha256(source))):
            if want is None:
                continue
            if want.lower() != source_sha:
                raise Refused(f"{source}: sha256 mismatch ({label}): expected {want.lower()}, "
                              f"got {source_sha}")
            verified.append(f"sha256 ({label})")
    sc = src.scan(source, kind)
    if sc.manifest is not None:
        files = {m.name for m in sc.members if m.kind in ("file", "hardlink")} - {sc.manifest_name}
        unlisted = sorted(files - set(sc.manifest))
        absent = sorted(set(sc.manifest) - files)
        if unlisted or absent:
            raise Refused(f"{source}: manifest {sc.manifest_name} does not match the content "
                          f"(unlisted: {unlisted[:5]}, missing: {absent[:5]})")
        verified.append(f"manifest {sc.manifest_name}")
    if not verified and not no_verify:
        raise Refused(f"{source}: nothing to verify it against",
                      hint="pass --sha256 HEX, put SOURCE.sha256 next to it, ship a SHA256SUMS "
                           "manifest inside, or --no-verify")
    v = version or sc.version_file or src.version_from_filename(source)
    if v is None:
        raise UsageError(f"cannot tell the release version of {source}: no VERSION file and the "
                         "name is not kata-static-<version>-<arch>.tar.*; pass --as VERSION")
    validate_version(v, "release version")
    if kind == "dir":
        source_sha = _tree_digest(source)
    shims = [b for b in SHIM_BINARIES if b in {m.name for m in sc.members}]
    if not shims:
        raise Refused(f"{source}: no {' or '.join(SHIM_BINARIES)} inside; not a Kata release")
    dest = L.release(v)
    base = {"node": t.node, "version": v, "path": dest, "source": source, "sourceSha256": source_sha,
            "verifiedBy": verified or ["nothing (--no-verify)"], "files": len(sc.members),
            "bytes": sc.total_bytes}

    def locked() -> dict:
        recovered = None
        if not dry_run:
            fault("stage:locked")
            recovered = _recover(t, L)  # a killed stage --force, switch or rollback first
            _clean_stale(t, L, (".staging-",))
        existing = release_record(t, L, v) if t.exists(dest) else None
        replace = False
        if t.exists(dest):
            if existing and existing.get("sourceSha256") == source_sha:
                return {**base, "changed": False, "dryRun": dry_run, "recovered": recovered,
                        "message": f"release {v} is already staged from the same source"}
            if not force:
                raise Refused(f"release {v} is already staged from a different source "
                              f"({(existing or {}).get('source', 'unknown, no release record')})",
                              hint="stage under another --as VERSION, or --force to replace it")
            st = read_state(t, L)
            if v == st["runtime"] or v in st["agents"]:
                raise Refused(f"release {v} is in use as the current {'runtime' if v == st['runtime'] else 'agent'}; "
                              "it cannot be replaced")
            _refuse_if_running(t, L, v)
            replace = True
        t.mkdir(L.releases)
        free = t.statvfs_free(L.releases)
        need = sc.total_bytes + reserve
        if free < need:
            from katactl.values import format_size

            raise Refused(f"not enough space in {L.releases} on {t.node}: release needs "
                          f"{format_size(sc.total_bytes)} + {format_size(reserve)} reserve, "
                          f"{format_size(free)} free", hint="run 'katactl upgrade gc' or lower --reserve")
        if dry_run:
            return {**base, "changed": True, "dryRun": True, "replace": replace}
        fault("stage:after-scan")
        tok = secrets.token_hex(4)
        tmp = f"{L.releases}/.staging-{v}-{tok}"
        aside = f"{L.releases}/.replaced-{v}-{tok}"  # _recover_replaced pairs them by tok
        try:
            _extract(t, L, source, kind, sc, tmp, v)
            record = {"version": v, "source": os.path.basename(source), "sourceKind": kind,
                      "sourceSha256": source_sha, "verifiedBy": base["verifiedBy"],
                      "files": len(sc.members), "bytes": sc.total_bytes, "stagedAt": audit.now_iso(),
                      "stagedBy": audit.current_user(), "client": _client(), "stripPrefix": sc.strip,
                      "installPrefix": INSTALL_PREFIX}
            t.write_bytes_atomic(f"{tmp}/{RELEASE_RECORD}", json.dumps(record, indent=2).encode())
            fault("stage:after-record")
            if replace:
                _refuse_if_running(t, L, v)  # again: a process may have started it meanwhile
                t.rename(dest, aside)
                fault("stage:after-set-aside")
                t.rename(tmp, dest)
                t.remove(aside, recursive=True)
            else:
                t.rename(tmp, dest)
            fault("stage:after-rename")
        except BaseException:
            try:
                if replace and t.exists(aside) and not t.exists(dest):
                    t.rename(aside, dest)  # failed between the renames: the old release back
                if t.exists(tmp):
                    t.remove(tmp, recursive=True)
            except OSError:
                pass
            raise
        return {**base, "changed": True, "dryRun": False, "replaced": replace, "recovered": recovered}

    if dry_run:
        return locked()
    with _lock(t, L, lock_timeout, on_wait):
        return locked()


def _refuse_if_running(t, L: Layout, v: str) -> None:
    """stage --force must not replace files under running shims, hypervisors or guests:
    Refused when a running process or live sandbox uses release v, or when that cannot
    be known (the same detection as gc)."""
    escape = f"stage this source under another version (--as VERSION) instead of replacing {v}"
    users = release_users(t, L, verb="replaced", escape=escape)[0].get(v)
    if users:
        raise Refused(f"release {v} is in use by running sandboxes or processes on {t.node}; "
                      "replacing it would change files under them",
                      hint=f"used by {_who(users)}: wait until they end ('katactl upgrade status "
                           f"--sandboxes' shows them), or {escape}",
                      details={"release": v, "usedBy": users})


def _tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for m in src.iter_members(path, "dir"):
        name = src.normalize(m.raw, path)
        if m.kind == "file":
            fh = hashlib.sha256()
            for b in m.chunks():
                fh.update(b)
            h.update(f"F {name} {m.mode & 0o777:o} ".encode() + fh.hexdigest().encode())
        elif m.kind == "symlink":
            h.update(f"L {name} {m.linkname}".encode())
        else:
            h.update(f"D {name}".encode())
        h.update(b"\n")
    return h.hexdigest()


def _extract(t, L, source, kind, sc, tmp, version) -> None:
    t.mkdir(tmp, parents=False)
    made = {tmp}
    by_raw = {m.raw: m for m in sc.members}
    files_total = sum(1 for m in sc.members if m.kind == "file") or 1
    done = 0
    synced: list[str] = []

    def ensure_dir(d: str) -> None:
        missing = []
        while d not in made:  # iterative: no recursion depth to run out of
            missing.append(d)
            d = posixpath.dirname(d)
        for d in reversed(missing):
            if not t.exists(d):
                t.mkdir(d, parents=False)
                synced.append(d)
            made.add(d)

    for m in src.iter_members(source, kind):
        want = by_raw.get(m.raw)
        if want is None:
            continue  # prefix dirs
        dest = f"{tmp}/{want.name}"
        ensure_dir(posixpath.dirname(dest))
        if m.kind == "dir":
            ensure_dir(dest)
        elif m.kind == "file":
            # streamed: one chunk in memory, not the whole member
            chunks = m.chunks()
            if sc.manifest is not None and want.name != sc.manifest_name:
                chunks = _verified(chunks, sc.manifest.get(want.name),
                                   f"{source}: {want.name}: sha256 mismatch with {sc.manifest_name}")
            t.write_stream_atomic(dest, chunks, mode=(m.mode & 0o777) or 0o644)
            done += 1
            if done == files_total // 2 + 1:
                fault("stage:mid-extract")
        elif m.kind == "symlink":
            t.symlink(m.linkname, dest)
            synced.append(dest)
        elif m.kind == "hardlink":
            t.write_stream_atomic(dest, t.open_stream(f"{tmp}/{want.linkname}"),
                                  mode=(m.mode & 0o777) or 0o644)
    # configs name the release's own binaries and assets
    for f in _walk_files(t, f"{tmp}/{CONFIG_SUBDIR}", ".toml"):
        text = t.read_text(f)
        new = configedit.rebase(text, INSTALL_PREFIX, L.release(version))
        if new != text:
            t.write_bytes_atomic(f, new.encode(), mode=t.stat(f).mode & 0o777)
    _sync_entries(t, synced)
    fault("stage:after-extract")


def _clean_stale(t, L: Layout, prefixes) -> list[str]:
    removed = []
    try:
        names = t.listdir(L.releases)
    except FileNotFoundError:
        return removed
    for n in names:
        if n.startswith(prefixes):
            t.remove(f"{L.releases}/{n}", recursive=True)
            removed.append(n)
    return removed


# -- status / gc ---------------------------------------------------------------------------------
SWITCHING = "switching"


def _in_progress(t, pending: dict | None) -> dict | None:
    """What a pending journal says about the node, as status reports it: which switch
    is under way (or was interrupted), and how many of its recorded configuration
    renames are done. None without a journal."""
    if not pending:
        return None
    frm, to = pending.get("from") or {}, pending.get("to") or {}
    configs = pending.get("configs") or []
    done = sum(1 for p in configs if isinstance(p.get("tmp"), str) and not t.exists(p["tmp"]))
    return {"action": pending.get("action"), "component": pending.get("component"),
            "from": frm, "to": to, "configFiles": len(configs), "configFilesRenamed": done}


def status(t, L: Layout) -> dict:
    """Read-only: never takes the lock nor changes anything. A node in the middle of a
    switch (a journal, and a configuration naming only the switch's old and new agent)
    reports agent "switching", not "mixed"; the next stage/switch/rollback/gc finishes it."""
    st = read_state(t, L)
    pending = read_journal(t, L)
    progress = _in_progress(t, pending)
    switching = None
    if progress and st["agent"] == "mixed" and \
            set(st["agents"]) <= {progress["from"].get("agent"), progress["to"].get("agent")}:
        switching = progress
        st = {**st, "agent": SWITCHING}
    hist = read_history(t, L)
    last = hist[-1] if hist else None
    procs, stats = procscan.scan(t, L)
    sbs = procscan.attribute(t, L, procs, procscan.sandboxes(t))
    rels = []
    for v in releases(t, L):
        rec = release_record(t, L, v) or {}
        users = [p.pid for p in procs if v in p.releases]
        sb_ids = [s["id"] for s in sbs if v in s["releases"]]
        roles = [r for r, on in (("runtime", st["runtime"] == v), ("agent", st["agent"] == v)) if on]
        if switching:
            roles += [r for r, on in (("agent-old", switching["from"].get("agent") == v),
                                      ("agent-new", switching["to"].get("agent") == v)) if on]
        if last and (last.get("from") or {}).get("runtime") == v and not roles:
            roles.append("previous")
        rels.append({"version": v, "state": roles or (["incomplete"] if not rec else []),
                     "stagedAt": rec.get("stagedAt"), "source": rec.get("source"),
                     "processes": users, "sandboxes": sb_ids, "inUse": bool(users or sb_ids)})
    return {"node": t.node, "kataRoot": L.root, "current": _pair(st),
            "previous": (last or {}).get("from"), "lastSwitch": last,
            "pending": pending, "inProgress": progress, "releases": rels, "sandboxes": sbs,
            "processes": [p.to_dict() for p in procs], "scan": stats}


def release_users(t, L: Layout, *, force: bool = False, verb: str, escape: str) -> tuple[dict, dict]:
    """Which releases running processes and live sandboxes use, for gc and stage --force:
    ``{version: ["pid 81234 (containerd-shim)", "sandbox 4f1c...", ...]}`` and the scan
    statistics. When that cannot be known (``/proc`` not listable, a Kata-looking process
    not inspectable), Refused unless ``force``: nothing proves the release is unused.
    ``verb`` says what would happen to such a release, ``escape`` ends the hint."""
    procs, stats = procscan.scan(t, L)
    if stats.get("error") and not force:
        raise Refused(f"cannot list /proc on {t.node}: which releases running processes use is "
                      "unknown", hint="with --host-root, the node's /proc must be visible under it; "
                                      f"or {escape}")
    hidden = stats.get("unreadableKata") or []
    if hidden and not force:
        raise Refused(f"cannot inspect {len(hidden)} Kata process(es) on {t.node} (pids "
                      f"{', '.join(map(str, hidden[:5]))}; not root?); a release they run could be "
                      f"{verb}", hint=f"run as root, or {escape}")
    sbs = procscan.attribute(t, L, procs, procscan.sandboxes(t))
    in_use: dict[str, list] = {}
    for p in procs:
        for v in p.releases:
            in_use.setdefault(v, []).append(f"pid {p.pid} ({p.comm})")
    for s in sbs:
        for v in s["releases"]:
            in_use.setdefault(v, []).append(f"sandbox {s['id'][:12]}")
    return in_use, stats


def _who(users: list[str], n: int = 5) -> str:
    return ", ".join(users[:n]) + (f" and {len(users) - n} more" if len(users) > n else "")


def gc(t, L: Layout, *, dry_run: bool = False, force: bool = False, keep_previous: bool = True,
       only=None, lock_timeout: float = 30.0, on_wait=None) -> dict:
    """Remove releases nothing uses. ``keep_previous`` keeps the last switch's ``from``
    (the rollback target). ``only`` (a set of versions: what the user confirmed after a
    dry run) limits the removal to those; a release that became removable since is
    kept and reported, never deleted unconfirmed."""
    if not t.is_dir(L.releases):
        # no releases directory: nothing to remove, and nothing to create (not even the lock)
        res = {"node": t.node, "removed": [], "kept": [], "staleTempDirs": [], "uninspectedProcesses": 0,
               "recovered": None, "changed": False, "dryRun": dry_run}
        if not dry_run:
            _audit("gc", "-", t, {"force": force, "keepPrevious": keep_previous}, False)
        return res

    def body() -> dict:
        recovered = _recover_or_check(t, L, dry_run)
        st = read_state(t, L)
        hist = read_history(t, L)
        protected: dict[str, str] = {}
        for role in ("runtime", "agent"):
            if st[role] and st[role] not in (UNMANAGED, "mixed"):
                protected.setdefault(st[role], f"current {role}")
        if keep_previous and hist:
            for v in (hist[-1].get("from") or {}).values():
                if v:
                    protected.setdefault(v, "previous (the rollback target; --no-keep-previous to remove)")
        in_use, stats = release_users(t, L, force=force, verb="removed", escape="--force")
        # the current runtime release's configs may point at another release's assets
        if st["runtime"] and st["runtime"] != UNMANAGED:
            for f in _walk_files(t, L.config_dir(st["runtime"]), ".toml"):
                for _s, _k, val in configedit.asset_refs(t.read_text(f)):
                    v = L.version_of_path(val)
                    if v:
                        protected.setdefault(v, "referenced by the current configuration")
        removed, kept = [], []
        for v in releases(t, L):
            if v in protected:
                kept.append({"version": v, "reason": protected[v]})
            elif v in in_use:
                kept.append({"version": v, "reason": "in use: " + _who(in_use[v])})
            elif only is not None and v not in only:
                kept.append({"version": v, "reason": "not in the confirmed plan (run gc again)"})
            else:
                removed.append(v)
        stale = [n for n in (t.listdir(L.releases) if t.exists(L.releases) else [])
                 if n.startswith((".staging-", ".trash-"))]
        if not dry_run:
            for v in removed:
                trash = f"{L.releases}/.trash-{v}-{secrets.token_hex(4)}"
                t.rename(L.release(v), trash)
                fault("gc:after-trash")
                t.remove(trash, recursive=True)
                if t.exists(L.backups(v)):
                    t.remove(L.backups(v), recursive=True)
            for n in stale:
                if t.exists(f"{L.releases}/{n}"):
                    t.remove(f"{L.releases}/{n}", recursive=True)
        return {"node": t.node, "removed": removed, "kept": kept, "staleTempDirs": stale,
                "uninspectedProcesses": stats.get("unreadable", 0),
                "recovered": recovered, "changed": bool(removed or stale), "dryRun": dry_run}

    return _locked_audited(t, L, "gc", {"force": force, "keepPrevious": keep_previous}, body, target="-",
                           dry_run=dry_run, lock_timeout=lock_timeout, on_wait=on_wait,
                           target_of=lambda r: ",".join(r["removed"]) or "-")
