"""status (the read-only report of a node's releases and what uses them) and
release_users (which releases running processes and live sandboxes use: gc, stage --force)."""
from __future__ import annotations

import posixpath

from katactl.errors import Refused
from katactl.upgrade import compiled, procscan
from katactl.upgrade.journal import read_journal
from katactl.upgrade.layout import Layout
from katactl.upgrade.state import pair, read_history, read_state, release_record, releases
from katactl.backends.base import NodeTransport


SWITCHING = "switching"


def _in_progress(transport: NodeTransport, pending: dict | None) -> dict | None:
    """What a pending journal says about the node, as status reports it: which switch
    is under way (or was interrupted), and how many of its recorded configuration
    renames are done. None without a journal."""
    if not pending:
        return None
    frm, to = pending.get("from") or {}, pending.get("to") or {}
    configs = pending.get("configs") or []
    done = sum(1 for p in configs if isinstance(p.get("tmp"), str) and not transport.exists(p["tmp"]))
    return {"action": pending.get("action"), "component": pending.get("component"),
            "from": frm, "to": to, "configFiles": len(configs), "configFilesRenamed": done}


def _under(path: str, d: str) -> bool:
    return path == d or path.startswith(d.rstrip("/") + "/")


def handler_configs(transport: NodeTransport, layout: Layout) -> list[dict]:
    """Which configuration each Kata runtime handler in containerd's config reads, and
    whether a switch changes it. A switch replaces ``<root>/current`` only, so a handler
    whose ``ConfigPath`` lies elsewhere (kata-deploy's default,
    ``/opt/kata/share/defaults/kata-containers/runtimes/<shim>/...``) keeps reading the same
    file, and an agent switch edits files that handler never reads. ``follows``:
    ``current`` (through the link), ``release`` (pinned to one release: ``release`` names
    it), ``outside`` (neither), ``default-search`` (no ConfigPath: the runtime's own search
    applies, see katacfg). ``shimPath``: the shim binary containerd starts, its
    ``runtime_path``, else ``containerd-shim-<name>-v2`` of its runtime_type found on
    containerd's PATH (katacfg.BINARY_DIRS, as containerd's shim.BinaryName and exec lookup
    do; None when none is there); ``shimFollows`` (current | release | outside) and
    ``runtimeRelease`` (the release it is pinned to, else None) say where that leads.
    ``assetReleases``: the releases whose guest assets the configuration it reads names (an
    agent switch points a release's configuration at another's). Nothing readable in
    containerd's config: an empty list."""
    from katactl import katacfg

    cc = katacfg.containerd_config(transport)
    out = []
    for h in sorted(cc.handlers.values(), key=lambda h: h.name):
        kata = "kata" in (h.runtime_type or "") or "kata" in posixpath.basename(h.runtime_path or "")
        if not kata:
            continue
        shim = h.runtime_path
        if not shim and h.binary_name:
            cands = [f"{d}/{h.binary_name}" for d in katacfg.BINARY_DIRS]
            there = katacfg.exists_many(transport, cands)
            shim = next((c for c in cands if there[c]), None)
        shim_follows, shim_release = _follows(transport, layout, shim) if shim else (None, None)
        row: dict = {"handler": h.name, "configPath": h.config_path, "definedIn": h.defined_in,
                     "follows": "default-search", "release": None, "runtimePath": h.runtime_path,
                     "shimPath": shim, "shimFollows": shim_follows, "runtimeRelease": shim_release}
        if h.config_path:
            row["follows"], row["release"] = _follows(transport, layout, h.config_path)
        else:  # the shim's compiled-in search: a switch moves it only through a link into current
            row.update(compiled.default_search(transport, layout, h.runtime_path))
        row["assetReleases"] = _asset_releases(transport, layout, h.config_path or row.get("reads"))
        out.append(row)
    return out


def _asset_releases(transport: NodeTransport, layout: Layout, path: str | None) -> list[str]:
    """The releases whose guest assets the Kata configuration ``path`` (and its drop-ins)
    names, as ``--kata-root`` names them or resolved (Layout.config_paths); [] when there is
    none or it cannot be read (status reports that elsewhere)."""
    from katactl import katacfg
    from katactl.errors import KatactlError
    from katactl.upgrade import configedit

    if not path:
        return []
    found: dict[str, None] = {}
    try:
        real = katacfg.realpath(transport, path)
        texts = [katacfg._read_regular(transport, real, path)]
        texts += [t for _p, t in katacfg._dropins(transport, real, "go")]
    except (OSError, KatactlError):
        return []
    release_of = layout.config_paths(transport)
    for text in texts:
        for _s, _k, val in configedit.asset_refs(text):
            hit = release_of(val)
            if hit:
                found[hit[0]] = None
    return list(found)


def handler_pins(transport: NodeTransport, layout: Layout) -> dict[str, list[str]]:
    """``{release: [handler, ...]}``: the releases a Kata runtime handler pins (the shim it
    starts or its ``ConfigPath`` under ``releases/<v>/``) or whose guest assets the
    configuration it reads names (pinned or following current): every new pod of that
    handler starts from them, so gc and stage --force leave them alone."""
    pins: dict[str, list[str]] = {}
    for h in handler_configs(transport, layout):
        for v in dict.fromkeys((h["runtimeRelease"], h["release"] if h["follows"] == "release" else None,
                                *h["assetReleases"])):
            if v:
                pins.setdefault(v, []).append(h["handler"])
    return pins


def _follows(transport: NodeTransport, layout: Layout, path: str, max_links: int = 40) -> tuple[str, str | None]:
    """("current" | "release" | "outside", the release) for a node path, its symlinks
    followed one at a time (inside the node) until one step lands under ``current`` or a
    release: /etc/kata-containers/configuration.toml -> /opt/kata/current/... follows
    current, though fully resolved it would name one release."""
    path = posixpath.normpath(path)
    for _ in range(max_links + 1):
        if _under(path, layout.current):
            return "current", None
        v = layout.version_of_path(path)
        if v:
            return "release", v
        parts = [q for q in path.split("/") if q]
        prefixes = ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]
        stats = transport.stat_many(prefixes, follow_symlinks=False)
        link = None
        for q in prefixes:
            st = stats.get(q)
            if st is not None and not isinstance(st, OSError) and st.is_link:
                link = q
                break
        if link is None:
            return "outside", None
        try:
            target = transport.readlink(link)
        except OSError:
            return "outside", None
        rest = path[len(link):]
        path = posixpath.normpath(posixpath.join(posixpath.dirname(link), target) + rest)
    return "outside", None


def status(transport: NodeTransport, layout: Layout, sandboxes: list | None = None) -> dict:
    """Read-only: never takes the lock nor changes anything. A node in the middle of a
    switch (a journal, and a configuration naming only the switch's old and new agent)
    reports agent "switching", not "mixed"; the next stage/switch/rollback/gc finishes it."""
    layout.check_inside(transport)
    st = read_state(transport, layout)
    pending = read_journal(transport, layout)
    progress = _in_progress(transport, pending)
    switching = None
    if progress and st["agent"] == "mixed" and \
            set(st["agents"]) <= {progress["from"].get("agent"), progress["to"].get("agent")}:
        switching = progress
        st = {**st, "agent": SWITCHING}
    hist = read_history(transport, layout)
    last = hist[-1] if hist else None
    procs, stats = procscan.scan(transport, layout)
    sbs = procscan.attribute(transport, layout, procs, procscan.sandboxes(transport, sandboxes))
    gap = scan_gap(stats, None)  # then a release nobody seems to use may be in use
    if gap:
        stats = {**stats, "gap": gap}
    rels = []
    for v in releases(transport, layout):
        rec = release_record(transport, layout, v) or {}
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
                     "processes": users, "sandboxes": sb_ids,
                     "inUse": True if users or sb_ids else None if gap else False})
    return {"node": transport.node, "kataRoot": layout.root, "current": pair(st),
            "previous": (last or {}).get("from"), "lastSwitch": last,
            "pending": pending, "inProgress": progress, "releases": rels, "sandboxes": sbs,
            "processes": [p.to_dict() for p in procs], "scan": stats,
            "runtimeHandlers": handler_configs(transport, layout),
            "qemuData": compiled.datadir_rows(transport, layout, st["runtime"])}


def release_users(transport: NodeTransport, layout: Layout, *, force: bool = False, verb: str, escape: str) -> tuple[dict, dict]:
    """Which releases running processes and live sandboxes use, for gc and stage --force:
    ``{version: ["pid 81234 (containerd-shim)", "sandbox 4f1c...", ...]}`` and the scan
    statistics. When that cannot be known (``/proc`` not listable, a Kata-looking process
    not inspectable), Refused unless ``force``: nothing proves the release is unused.
    ``verb`` says what would happen to such a release, ``escape`` ends the hint."""
    procs, stats = procscan.scan(transport, layout)
    if stats.get("error") and not force:
        raise Refused(scan_gap(stats, transport.node) or "", hint="with --host-root, the node's /proc must be visible under it; "
                                      f"or {escape}")
    gap = scan_gap(stats, transport.node)
    if gap and not force:
        raise Refused(f"{gap}; a release they run could be {verb}", hint=f"run as root, or {escape}")
    sbs = procscan.attribute(transport, layout, procs, procscan.sandboxes(transport))
    in_use: dict[str, list] = {}
    for p in procs:
        for v in p.releases:
            in_use.setdefault(v, []).append(f"pid {p.pid} ({p.comm})")
    for s in sbs:
        for v in s["releases"]:
            in_use.setdefault(v, []).append(f"sandbox {s['id'][:12]}")
    return in_use, stats


def scan_gap(stats: dict, node: str | None) -> str | None:
    """Why the process scan may have missed users of a release (procscan.scan's statistics),
    or None when it saw every process: gc and stage --force refuse then, status shows the
    counts as unknown. ``node`` None: the text for JSON, whose item names its node already
    (the same for -N, --host-root and --via kube)."""
    on = f" on {node}" if node else ""
    if stats.get("error"):
        return f"cannot list /proc{on}: which releases running processes use is unknown"
    hidden = stats.get("unreadableKata") or []
    if hidden:
        return (f"cannot inspect {len(hidden)} Kata process(es){on} (pids "
                f"{', '.join(map(str, hidden[:5]))}; not root?)")
    return None

