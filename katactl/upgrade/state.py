"""What an A/B Kata installation on a node is in, read-only: the releases, the
current runtime and agent, the switch history. Every reader takes a NodeTransport and
a Layout; a damaged state file is OperationFailed naming the file (and key)."""
from __future__ import annotations

import json
import posixpath

from katactl.errors import OperationFailed
from katactl.upgrade import configedit
from katactl.upgrade.layout import RELEASE_RECORD, Layout
from katactl.backends.base import NodeTransport

UNMANAGED = "<unmanaged>"


def read_json(transport: NodeTransport, path: str):
    """A node's JSON state file (journal, release record); None when absent. A file that is
    not JSON (or nests deeper than the parser goes) is exit 1 naming it."""
    try:
        data = transport.read_bytes(path, limit=4 << 20)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise OperationFailed(f"{path}: corrupt JSON") from None


#: a journal's or history entry's keys holding {"runtime": str|None, "agent": str|None}
_PAIR_KEYS = ("from", "to")


def check_entry(entry, where: str) -> dict:
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


def walk_files(transport: NodeTransport, top: str, suffix: str = "") -> list[str]:
    """The files (not directories, not symlinks) below top whose names end in suffix, in one
    batched walk (over SSH about two round trips per depth level)."""
    return [p for p, s in transport.walk(top) if not s.is_dir and not s.is_link and p.endswith(suffix)]


def releases(transport: NodeTransport, layout: Layout) -> list[str]:
    try:
        names = transport.listdir(layout.releases)
    except FileNotFoundError:
        return []
    return [n for n in names if not n.startswith(".") and transport.is_dir(f"{layout.releases}/{n}")]


def release_record(transport: NodeTransport, layout: Layout, v: str) -> dict | None:
    """A release's record; None when it has none (not staged by katactl, or incomplete). JSON
    that is not an object (``[1,2]``, ``null``) is exit 1 naming the file: callers read keys."""
    path = f"{layout.release(v)}/{RELEASE_RECORD}"
    try:
        data = transport.read_bytes(path, limit=4 << 20)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        rec = json.loads(data)
    except (ValueError, RecursionError):
        raise OperationFailed(f"{path}: corrupt JSON") from None
    if not isinstance(rec, dict):
        raise OperationFailed(f"{path}: not a JSON object (a {type(rec).__name__})",
                              hint="the release record is damaged; replace the release with "
                                   "'katactl upgrade stage SOURCE --force'")
    return rec


def read_state(transport: NodeTransport, layout: Layout) -> dict:
    """{"runtime": v|None|UNMANAGED, "agent": v|None|"mixed", "link": target}."""
    runtime = None
    link = None
    try:
        s = transport.stat(layout.current, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        s = None
    if s is not None:
        if not s.is_link:
            return {"runtime": UNMANAGED, "agent": None, "agents": [], "link": None}
        link = transport.readlink(layout.current)
        absolute = posixpath.normpath(link if link.startswith("/") else posixpath.join(layout.root, link))
        runtime = layout.version_of_path(absolute + "/") if absolute.startswith(layout.releases + "/") else None
        if runtime is None or "/" in absolute[len(layout.releases) + 1:]:
            runtime = UNMANAGED
    agent = None
    if runtime and runtime != UNMANAGED:
        vs = set()
        release_of = layout.config_paths(transport)  # an asset named by its resolved path is V's too
        for f in walk_files(transport, layout.config_dir(runtime), ".toml"):
            try:
                text = transport.read_text(f)
            except OSError:
                continue
            for _sec, _key, value in configedit.asset_refs(text):
                hit = release_of(value)
                if hit:
                    vs.add(hit[0])
        agents = sorted(vs)
        agent = agents[0] if len(vs) == 1 else ("mixed" if vs else None)
    else:
        agents = []
    return {"runtime": runtime, "agent": agent, "link": link, "agents": agents}


def pair(s: dict) -> dict:
    return {"runtime": s.get("runtime"), "agent": s.get("agent")}


def read_history(transport: NodeTransport, layout: Layout) -> list[dict]:
    """The switch history, oldest first. It is rewritten atomically, so a line that is
    not an entry is damage, not a torn write: exit 1 naming the file and line (rollback
    would otherwise pick the wrong target, status report a wrong previous release)."""
    try:
        raw = transport.read_bytes(layout.history)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{layout.history}: line {n}"
        try:
            entry = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            raise OperationFailed(f"{where}: not a JSON history entry",
                                  hint="the switch history is damaged; repair or move the file aside") from None
        out.append(check_entry(entry, where))
    return out
