"""stage: unpack and verify a release beside the others (``releases/<v>``), crash-safe.

stage writes into ``releases/.staging-*`` and renames the finished, verified, fsynced
tree to ``releases/<v>`` (the release record is inside before the rename, so a
``releases/<v>`` dir is always complete). stage --force sets the old release aside and
renames the new one into place (katactl.upgrade.journal finishes a run killed between
the two renames); it never replaces a release a running process or live sandbox uses
(checked before the extraction and again just before the set-aside), nor one it cannot
prove unused.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import posixpath
import secrets

from katactl import audit
from katactl.errors import OperationFailed, Refused, UsageError
from katactl.upgrade import configedit, source as src
from katactl.upgrade.journal import client, recover
from katactl.upgrade.layout import CONFIG_SUBDIR, INSTALL_PREFIX, RELEASE_RECORD, SHIM_BINARIES, Layout, fault, \
    validate_version
from katactl.upgrade.lock import live, locked_audited
from katactl.upgrade.state import read_state, release_record, walk_files
from katactl.output import first_few
from katactl.upgrade.status import handler_pins, release_users
from katactl.backends.base import NodeTransport

DEFAULT_RESERVE = 256 << 20


@dataclasses.dataclass(frozen=True)
class StageRequest:
    """What ``upgrade stage`` was asked to do (its options, as given)."""
    source: str                     # a kata-static tarball or an unpacked tree
    version: str | None = None      # --as; else the source's VERSION file or its name
    sha256: str | None = None
    no_verify: bool = False
    reserve: int = DEFAULT_RESERVE  # bytes to leave free beside the release
    force: bool = False             # replace a release staged from another source
    dry_run: bool = False

    def audit_params(self) -> dict:
        return {"source": self.source, "version": self.version, "sha256": self.sha256,
                "noVerify": self.no_verify, "force": self.force}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A verified source, read before the node is locked."""
    source: str                 # absolute
    kind: str                   # src.check_source's: "dir" or an archive kind
    scan: src.Scan
    version: str
    source_sha: str
    base: dict                  # the result's common fields


def stage(transport: NodeTransport, layout: Layout, source: str, *, version: str | None = None, sha256: str | None = None,
          no_verify: bool = False, reserve: int = DEFAULT_RESERVE, force: bool = False,
          dry_run: bool = False, lock_timeout: float = 30.0, on_wait=None) -> dict:
    src.check_source_arg(source)
    req = StageRequest(source, version=version, sha256=sha256, no_verify=no_verify, reserve=reserve,
                       force=force, dry_run=dry_run)
    return locked_audited(transport, layout, "stage", req.audit_params(), lambda plan: _stage_locked(transport, layout, req, plan),
                          target=version or source, target_of=lambda r: r["version"], dry_run=dry_run,
                          lock_timeout=lock_timeout, on_wait=on_wait, prepare=lambda: _plan(transport, layout, req))


def check_args(version: str | None, sha256: str | None) -> None:
    """The syntax of --as and --sha256, which needs no file: a rollout's plan check runs it
    before any node is touched (katactl/rollout/steps.py)."""
    if version is not None:
        validate_version(version, "--as")
    if sha256 is not None and not src._HEX64.fullmatch(sha256):
        raise UsageError(f"invalid --sha256 {sha256!r}: expected 64 hex digits")


def _plan(transport: NodeTransport, layout: Layout, req: StageRequest) -> _Plan:
    """Check and verify the source (a local file or tree: no node access, no lock)."""
    version, sha256 = req.version, req.sha256
    source = os.path.abspath(os.path.expanduser(req.source))
    kind = src.check_source(source)
    check_args(version, sha256)
    if sha256 is not None and kind == "dir":
        raise UsageError("--sha256 checks a tarball; a directory source needs a SHA256SUMS manifest")
    verified: list[str] = []
    file_sha = None
    if kind != "dir":
        file_sha = src.file_sha256(source)
        for label, want in (("--sha256", sha256), ("sidecar", src.sidecar_sha256(source))):
            if want is None:
                continue
            if want.lower() != file_sha:
                raise Refused(f"{source}: sha256 mismatch ({label}): expected {want.lower()}, "
                              f"got {file_sha}")
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
    if not verified and not req.no_verify:
        raise Refused(f"{source}: nothing to verify it against",
                      hint="pass --sha256 HEX, put SOURCE.sha256 next to it, ship a SHA256SUMS "
                           "manifest inside, or --no-verify")
    v = version or sc.version_file or src.version_from_filename(source)
    if v is None:
        raise UsageError(f"cannot tell the release version of {source}: no VERSION file and the "
                         "name is not kata-static-<version>-<arch>.tar.*; pass --as VERSION")
    if version:
        origin = "--as"
    elif sc.version_file:
        origin = f"release version in the VERSION file of {source}"
    else:
        origin = f"release version in the file name {os.path.basename(source)!r}"
    validate_version(v, origin)
    source_sha = _tree_digest(source) if file_sha is None else file_sha  # None: a directory
    shims = [b for b in SHIM_BINARIES if b in {m.name for m in sc.members}]
    if not shims:
        raise Refused(f"{source}: no {' or '.join(SHIM_BINARIES)} inside; not a Kata release")
    base = {"node": transport.node, "version": v, "path": layout.release(v), "source": source, "sourceSha256": source_sha,
            "verifiedBy": verified or ["nothing (--no-verify)"], "files": len(sc.members),
            "bytes": sc.total_bytes}
    return _Plan(source, kind, sc, v, source_sha, base)


def _stage_locked(transport: NodeTransport, layout: Layout, req: StageRequest, plan: _Plan) -> dict:
    """Stage plan's release (under the lock unless a dry run)."""
    dry_run, force, reserve = req.dry_run, req.force, req.reserve
    source, kind, sc, v = plan.source, plan.kind, plan.scan, plan.version
    source_sha, base = plan.source_sha, plan.base
    dest = layout.release(v)
    recovered = None
    if not dry_run:
        fault("stage:locked")
        recovered = recover(transport, layout)  # a killed stage --force, switch or rollback first
        _clean_stale(transport, layout, (".staging-",))
    try:
        existing = release_record(transport, layout, v) if transport.exists(dest) else None
    except OperationFailed:
        if not force:
            raise
        existing = None  # a damaged record: what --force replaces, as a release of unknown source
    replace = False
    if transport.exists(dest):
        if existing and existing.get("sourceSha256") == source_sha:
            return {**base, "changed": False, "dryRun": dry_run, "recovered": recovered,
                    "message": f"release {v} is already staged from the same source"}
        if not force:
            raise Refused(f"release {v} is already staged from a different source "
                          f"({(existing or {}).get('source', 'unknown, no release record')})",
                          hint="stage under another --as VERSION, or --force to replace it")
        st = read_state(transport, layout)
        if v == st["runtime"] or v in st["agents"]:
            raise Refused(f"release {v} is in use as the current {'runtime' if v == st['runtime'] else 'agent'}; "
                          "it cannot be replaced")
        _refuse_if_running(transport, layout, v)
        replace = True
    if dry_run:
        # creates nothing; layout.state (under releases): the real run's first mkdir, the lock's
        free = transport.statvfs_free(_nearest_dir(transport, layout.state))
    else:
        transport.mkdir(layout.releases)
        free = transport.statvfs_free(layout.releases)
    need = sc.total_bytes + reserve
    if free < need:
        from katactl.values import format_size

        raise Refused(f"not enough space in {layout.releases} on {transport.node}: release needs "
                      f"{format_size(sc.total_bytes)} + {format_size(reserve)} reserve, "
                      f"{format_size(free)} free", hint="run 'katactl upgrade gc' or lower --reserve")
    if dry_run:
        return {**base, "changed": True, "dryRun": True, "replace": replace}
    fault("stage:after-scan")
    tok = secrets.token_hex(4)
    tmp = f"{layout.releases}/.staging-{v}-{tok}"
    aside = f"{layout.releases}/.replaced-{v}-{tok}"  # _recover_replaced pairs them by tok
    try:
        _extract(transport, layout, plan, tmp)
        record = {"version": v, "source": os.path.basename(source), "sourceKind": kind,
                  "sourceSha256": source_sha, "verifiedBy": base["verifiedBy"],
                  "files": len(sc.members), "bytes": sc.total_bytes, "stagedAt": audit.now_iso(),
                  "stagedBy": audit.current_user(), "client": client(), "stripPrefix": sc.strip,
                  "installPrefix": INSTALL_PREFIX, "imageBound": _image_bound(transport, f"{tmp}/{CONFIG_SUBDIR}")}
        transport.write_bytes_atomic(f"{tmp}/{RELEASE_RECORD}", json.dumps(record, indent=2).encode())
        fault("stage:after-record")
        audit.changing(target=v)  # (a replacement's first change is the set-aside, no live step)
        if replace:
            _refuse_if_running(transport, layout, v)  # again: a process may have started it meanwhile
            transport.rename(dest, aside)
            fault("stage:after-set-aside")
            with live(f"replaced release {v}"):
                transport.rename(tmp, dest)
            transport.remove(aside, recursive=True)
        else:
            with live(f"staged release {v}"):
                transport.rename(tmp, dest)
        fault("stage:after-rename")
    except BaseException:
        try:
            if replace and transport.exists(aside) and not transport.exists(dest):
                transport.rename(aside, dest)  # failed between the renames: the old release back
            if transport.exists(tmp):
                transport.remove(tmp, recursive=True)
        except OSError:
            pass
        raise
    return {**base, "changed": True, "dryRun": False, "replaced": replace, "recovered": recovered}


def _nearest_dir(transport: NodeTransport, path: str) -> str:
    """path, or its nearest existing ancestor: the filesystem path would be created on. The
    walk stops at the first component that exists (following symlinks, as mkdir does); when
    that is not a directory the real run's mkdir fails there, and so does this: ENOTDIR
    (exit 1) for the component below it, or EEXIST for path itself."""
    below: OSError | None = None
    while True:
        try:
            st = transport.stat(path)
        except (FileNotFoundError, NotADirectoryError) as e:  # missing, or under a non-directory
            if path == "/":
                raise
            below, path = e, posixpath.dirname(path)
            continue
        if st.is_dir:
            return path
        if below is None:  # path itself is a file: mkdir -p says it exists
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        # below's name as the transport gives it (a --host-root path); ENOTDIR even where the
        # transport said ENOENT (sftp-server maps ENOTDIR to SSH2_FX_NO_SUCH_FILE)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), below.filename)


def _refuse_if_running(transport: NodeTransport, layout: Layout, v: str) -> None:
    """stage --force must not replace files under running shims, hypervisors or guests:
    Refused when a running process or live sandbox uses release v, or when that cannot
    be known (the same detection as gc), or a containerd runtime handler pins it."""
    escape = f"stage this source under another version (--as VERSION) instead of replacing {v}"
    pins = handler_pins(transport, layout).get(v)
    if pins:  # every new pod of those handlers starts from this release
        raise Refused(f"release {v} is pinned by containerd handler {', '.join(pins)} on {transport.node}; "
                      "replacing it would change what that handler's new pods run", hint=escape)
    users = release_users(transport, layout, verb="replaced", escape=escape)[0].get(v)
    if users:
        raise Refused(f"release {v} is in use by running sandboxes or processes on {transport.node}; "
                      "replacing it would change files under them",
                      hint=f"used by {first_few(users)}: wait until they end ('katactl upgrade status "
                           f"--sandboxes' shows them), or {escape}",
                      details={"release": v, "usedBy": users})


class _TreeDigest:
    """A directory source's sourceSha256: each member's name, kind, file mode and content
    hash, or symlink target, in walk order."""

    def __init__(self, root: str):
        self.root, self.h = root, hashlib.sha256()

    def add(self, m: src.Member, file_sha: str | None = None) -> None:
        name = src.normalize(m.raw, self.root)
        if m.kind == "file":
            self.h.update(f"F {name} {m.mode & 0o777:o} ".encode() + (file_sha or "").encode())
        elif m.kind == "symlink":
            self.h.update(f"L {name} {m.linkname}".encode())
        else:
            self.h.update(f"D {name}".encode())
        self.h.update(b"\n")

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _tree_digest(path: str) -> str:
    t = _TreeDigest(path)
    for m in src.iter_members(path, "dir"):
        fh = None
        if m.kind == "file":
            h = hashlib.sha256()
            for b in m.iter_chunks():
                h.update(b)
            fh = h.hexdigest()
        t.add(m, fh)
    return t.hexdigest()


def _extract(transport: NodeTransport, layout: Layout, plan: _Plan, tmp: str) -> None:
    """Write plan's release into tmp from a second read of the source, which must be the
    source plan verified: each member as scanned (its validated kind, target and mode;
    refused when this read differs), and the whole read hashing to plan.source_sha (the
    archive file's sha256, or a directory's tree digest), checked before tmp is renamed
    into place (a tree still being written, a tarball replaced in place)."""
    source, kind, scanner = plan.source, plan.kind, plan.scan
    transport.mkdir(tmp, parents=False)
    made = {tmp}
    by_raw = {m.raw: m for m in scanner.members}
    pending = set(by_raw)
    files_total = sum(1 for m in scanner.members if m.kind == "file") or 1
    done = 0
    synced: list[str] = []
    archive_sha = hashlib.sha256() if kind != "dir" else None
    tree = _TreeDigest(source) if kind == "dir" else None

    def changed(what: str) -> Refused:
        return Refused(f"{source} changed while it was being staged ({what}); nothing was staged",
                       hint="stage it again once nothing writes to it")

    def ensure_dir(d: str) -> None:
        missing = []
        while d not in made:  # iterative: no recursion depth to run out of
            missing.append(d)
            d = posixpath.dirname(d)
        for d in reversed(missing):
            if not transport.exists(d):
                transport.mkdir(d, parents=False)
                synced.append(d)
            made.add(d)

    def checked(chunks, want: src.Member, digest=None):
        """chunks, exactly want.size of them (a file), and checked against want's manifest line"""
        if want.kind == "file":
            chunks = _counted(chunks, want.size, digest, lambda: changed(f"{want.raw!r} is no longer {want.size} bytes"))
        if scanner.manifest is None or want.name == scanner.manifest_name:
            return chunks
        return _verified(chunks, scanner.manifest.get(want.name),
                         f"{source}: {want.name}: sha256 mismatch with {scanner.manifest_name}")

    for m in src.iter_members(source, kind, archive_sha):
        want = by_raw.get(m.raw)
        if want is None:
            if m.kind != "dir":  # the scan dropped only the prefix dirs ("./", "opt", "opt/kata")
                raise changed(f"{m.raw!r} is new")
            if tree is not None:
                tree.add(m)
            continue
        if m.raw not in pending and want.kind != "dir":  # (a directory may be listed twice)
            raise changed(f"{m.raw!r} appears twice")
        pending.discard(m.raw)
        if m.kind != want.kind or (m.kind == "symlink" and m.linkname != want.linkname) \
                or (m.kind == "file" and m.size != want.size):
            raise changed(f"{m.raw!r} is not the {want.kind} that was checked")
        dest = f"{tmp}/{want.name}"
        ensure_dir(posixpath.dirname(dest))
        mode = (want.mode & 0o777) or 0o644
        if want.kind == "dir":
            ensure_dir(dest)
        elif want.kind == "file":
            # streamed: one chunk in memory, not the whole member
            fh = hashlib.sha256() if tree is not None else None
            transport.write_stream_atomic(dest, checked(m.iter_chunks(), want, fh), mode=mode)
            if tree is not None and fh is not None:
                tree.add(m, fh.hexdigest())
            done += 1
            if done == files_total // 2 + 1:
                fault("stage:mid-extract")
            continue
        elif want.kind == "symlink":
            transport.symlink(want.target(), dest)
            synced.append(dest)
        elif want.kind == "hardlink":
            # a copy of its (verified) target, checked against the link's *own* manifest line
            transport.write_stream_atomic(dest, checked(transport.open_stream(f"{tmp}/{want.linkname}"), want),
                                          mode=mode)
        if tree is not None:
            tree.add(m)
    if pending:
        raise changed(f"{sorted(pending)[0]!r} is gone")
    got = archive_sha.hexdigest() if archive_sha is not None else tree.hexdigest() if tree is not None else None
    if got != plan.source_sha:
        raise changed(f"sha256 {got}, verified {plan.source_sha}")
    # configs name the release's own binaries and assets
    for f in walk_files(transport, f"{tmp}/{CONFIG_SUBDIR}", ".toml"):
        text = transport.read_text(f)
        new = configedit.rebase(text, INSTALL_PREFIX, layout.release(plan.version))
        if new != text:
            transport.write_bytes_atomic(f, new.encode(), mode=transport.stat(f).mode & 0o777)
    _sync_entries(transport, synced)
    fault("stage:after-extract")


def _image_bound(transport: NodeTransport, config_dir: str) -> dict:
    """The release's own image-bound configuration values as staged (configedit.IMAGE_BOUND_KEYS:
    its dm-verity root hashes), ``{config path relative to config_dir: {section: {key: value}}}``
    (a file that is not TOML: absent). A switch moving another release's configuration to this
    release's image takes them from here: the release's own files may since name another's."""
    out = {}
    for f in walk_files(transport, config_dir, ".toml"):
        b = configedit.image_bound(transport.read_text(f))
        if b is not None:
            out[f[len(config_dir) + 1:]] = b
    return out


def _clean_stale(transport: NodeTransport, layout: Layout, prefixes) -> list[str]:
    removed: list[str] = []
    try:
        names = transport.listdir(layout.releases)
    except FileNotFoundError:
        return removed
    for n in names:
        if n.startswith(prefixes):
            transport.remove(f"{layout.releases}/{n}", recursive=True)
            removed.append(n)
    return removed


def _sync_entries(transport: NodeTransport, paths) -> None:
    """Make new directory entries (dirs, symlinks) durable: one fsync per parent directory."""
    for d in sorted({posixpath.dirname(p) for p in paths}):
        transport.fsync_dir(d)


def _counted(chunks, size: int, digest, short):
    """Pass chunks through (into digest, when given); short() is raised unless they are size bytes."""
    n = 0
    for b in chunks:
        n += len(b)
        if n > size:
            raise short()
        if digest is not None:
            digest.update(b)
        yield b
    if n != size:
        raise short()


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
