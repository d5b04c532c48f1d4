"""Paths compiled into kata-static binaries, which do not follow ``<root>/current``.

A kata-static tarball is built for PREFIX ``/opt/kata``, and some of its binaries keep
absolute paths under that prefix whatever directory they are unpacked into:

- QEMU is configured ``--prefix=/opt/kata --datadir=/opt/kata/share/<hypervisor>
  --disable-relocatable`` (kata-containers tools/packaging/scripts/configure-hypervisor.sh;
  static-build/qemu/build-base-qemu.sh: ``prefix=/opt/kata``, HYPERVISOR_NAME ``kata-qemu``
  or ``kata-qemu-<suffix>``, e.g. ``kata-qemu-snp-experimental``). Not relocatable, QEMU
  reads its firmware (bios-256k.bin, linuxboot_dma.bin, kvmvapic.bin, ...) from the fixed
  ``/opt/kata/share/kata-qemu*/qemu`` wherever its binary lives; kata-deploy itself adds
  ``-L <dest>/share/kata-<qemu>/qemu/`` through a wrapper when it installs elsewhere
  (tools/packaging/kata-deploy/binary/src/artifacts/install.rs ``adjust_qemu_cmdline``).
  So in the A/B layout ``<root>/share/kata-qemu*`` is a relative symlink through
  ``current`` (``../current/share/kata-qemu``): it follows every switch and rollback with
  no second rename. (QEMU's libexecdir holds only qemu-bridge-helper, which
  static-build/qemu.blacklist removes; nothing else of kata-static is compiled this way.)
- The Go shim's default configuration search is ``/etc/kata-containers/configuration.toml``,
  then ``<PREFIX>/share/defaults/kata-containers/configuration.toml``
  (src/runtime/pkg/katautils/config-settings.go.in, Makefile ``CONFIG_PATH``); runtime-rs
  searches fixed paths too (katacfg.RS_SEARCH). Neither is under ``current``: a handler
  without ConfigPath follows a switch only when the file it finds links into ``current``.
"""
from __future__ import annotations

import os
import posixpath
import secrets

from katactl.backends.base import NodeTransport
from katactl.errors import KatactlError, OperationFailed
from katactl.upgrade.layout import INSTALL_PREFIX, Layout
from katactl.upgrade.state import UNMANAGED

#: HYPERVISOR_NAME of kata-static's QEMU builds: share/<name>/qemu is their datadir
QEMU_DATADIR_PREFIX = "kata-qemu"


def qemu_datadirs(transport: NodeTransport, layout: Layout, version: str) -> list[str]:
    """The names of release ``version``'s non-relocatable QEMU data directories
    (``share/kata-qemu``, ``share/kata-qemu-snp-experimental``, ...)."""
    share = f"{layout.release(version)}/share"
    try:
        names = transport.listdir(share)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n.startswith(QEMU_DATADIR_PREFIX) and transport.is_dir(f"{share}/{n}"))


def link_target(transport: NodeTransport, layout: Layout, name: str) -> str:
    """What ``<root>/share/<name>`` points to: relative, through ``current``
    (``../current/share/<name>``), written from the directory the link really lands in: the
    kernel resolves a relative target from there, so with ``<root>/share`` a symlink to
    another disk's directory the plain ``../current`` would lead nowhere."""
    from katactl.katacfg import realpath

    try:
        share, root = realpath(transport, f"{layout.root}/share"), realpath(transport, layout.root)
    except (OSError, KatactlError):  # unresolvable: the layout's own shape
        return f"../current/share/{name}"
    return posixpath.relpath(f"{root}/current/share/{name}", share)


def datadir_state(transport: NodeTransport, layout: Layout, name: str) -> dict:
    """Where QEMU's compiled-in ``/opt/kata/share/<name>`` leads: ``state`` is ``current``
    (through the link: fine), ``missing`` (nothing there: katactl can create the link),
    ``directory`` (a real directory, e.g. a kata-deploy install's firmware left under the
    kata root: used by every release's QEMU, never switched) or ``elsewhere``."""
    from katactl.upgrade.status import _follows

    compiled = f"{INSTALL_PREFIX}/share/{name}"
    ours = f"{layout.root}/share/{name}"
    row = {"name": name, "path": compiled, "link": ours, "state": "elsewhere"}
    follows, _ = _follows(transport, layout, compiled)
    if follows == "current":
        row["state"] = "current"
        return row
    try:
        st = transport.stat(ours, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        # only ours to create when the compiled-in path reaches it
        if _reaches(transport, layout, compiled):
            row.update(state="missing", target=link_target(transport, layout, name))
        return row
    if st.is_dir and not st.is_link:
        row["state"] = "directory"
    return row


def _reaches(transport: NodeTransport, layout: Layout, compiled: str) -> bool:
    """Whether the compiled-in path is ``<root>/share/<name>`` on the node, and a link made
    there stays in the node's tree (under a root SSH or --via kube maps, an absolute symlink
    would lead out)."""
    from katactl.katacfg import realpath, rooted_escape

    if rooted_escape(transport, f"{layout.root}/share"):
        return False
    if compiled == f"{layout.root}/share/{posixpath.basename(compiled)}":
        return True
    try:
        return realpath(transport, posixpath.dirname(compiled)) == realpath(transport, f"{layout.root}/share")
    except (OSError, KatactlError):  # unresolvable: not ours to decide
        return False


def datadir_warning(row: dict, layout: Layout) -> str | None:
    """One line for a QEMU data directory that does not follow ``current``; None when it does."""
    s, path = row["state"], row["path"]
    if s == "current":
        return None
    head = f"QEMU of {layout.current} reads its firmware from {path}/qemu (compiled in, not relocatable)"
    if s == "missing":
        return f"{head}, which does not exist: QEMU sandboxes cannot start; the next upgrade switch or " \
               f"rollback creates {row['link']} -> {row['target']}"
    if s == "directory":
        return f"{head}, a real directory (another install's firmware) that no switch or rollback " \
               f"changes; once nothing uses it, move it aside: the next switch links it through current " \
               "(docs/upgrade.md)"
    return f"{head}, which does not lead to {layout.current}/share/{row['name']}; link it there (docs/upgrade.md)"


def link_datadirs(transport: NodeTransport, layout: Layout, version: str, dry_run: bool) -> list[str]:
    """Create each missing ``<root>/share/kata-qemu*`` link of release ``version`` (lock
    held): a temp symlink renamed into place, so the link appears whole. Never replaces
    anything: a directory or another link there is reported by the preflight and status.
    Returns the steps (planned or done)."""
    from katactl.upgrade.lock import live

    steps = []
    for name in qemu_datadirs(transport, layout, version):
        row = datadir_state(transport, layout, name)
        if row["state"] != "missing":
            continue
        link, target = row["link"], row["target"]
        steps.append(f"link {link} -> {target}")
        if dry_run:
            continue
        transport.mkdir(f"{layout.root}/share")
        tmp = f"{layout.root}/share/.{name}.katactl-{os.getpid()}-{secrets.token_hex(3)}"
        transport.symlink(target, tmp)
        with live(steps[-1]):
            transport.rename(tmp, link)
        transport.fsync_dir(f"{layout.root}/share")
        if datadir_state(transport, layout, name)["state"] != "current":  # done only if QEMU gets there
            transport.remove(link)
            raise OperationFailed(f"{link} -> {target} does not lead QEMU's {row['path']} to "
                                  f"{layout.current}/share/{name}; removed it",
                                  hint=f"link {row['path']} to {layout.current}/share/{name} by hand "
                                       "(docs/upgrade.md)")
    return steps


def datadir_check(transport: NodeTransport, layout: Layout, version: str) -> list[dict]:
    """Preflight rows: a data directory that does not follow ``current`` is a warning (the
    switch goes on: on a node migrated from kata-deploy, its handlers may still start QEMU
    from that install, which needs that directory)."""
    out = []
    for name in qemu_datadirs(transport, layout, version):
        row = datadir_state(transport, layout, name)
        if row["state"] in ("current", "missing"):  # missing: this switch creates the link
            detail = f"{row['path']} -> {layout.current}/share/{name}" if row["state"] == "current" \
                else f"{row['link']} -> {row['target']} (created by this switch)"
            out.append({"check": f"QEMU data {name}", "ok": True, "detail": detail})
            continue
        out.append({"check": f"QEMU data {name}", "ok": True, "warning": True,
                    "detail": datadir_warning(row, layout)})
    return out


def clean_link_tmps(transport: NodeTransport, layout: Layout) -> None:
    """Remove temp links a killed switch left in ``<root>/share`` (never read by anyone)."""
    share = f"{layout.root}/share"
    try:
        names = transport.listdir(share)
    except (FileNotFoundError, NotADirectoryError):
        return
    for n in names:
        if n.startswith(f".{QEMU_DATADIR_PREFIX}") and ".katactl-" in n:
            transport.remove(f"{share}/{n}")


def default_search(transport: NodeTransport, layout: Layout, runtime_path: str | None) -> dict:
    """For a Kata handler without ConfigPath: the files its shim searches (compiled in),
    the first that exists (``reads``) and whether that one follows ``current``."""
    from katactl import katacfg
    from katactl.upgrade.status import _follows

    if runtime_path and "/runtime-rs/" in runtime_path:
        paths = list(katacfg.RS_SEARCH)
    else:
        prefix = None
        if runtime_path:
            try:
                prefix = katacfg.build_prefix(katacfg.realpath(transport, runtime_path))
            except (OSError, KatactlError):  # unresolvable: the node-wide answer below
                prefix = None
        if prefix is None:
            prefix = katacfg.node_prefix(transport)[0]
        paths = list(katacfg.search_paths("go", prefix))
    found = katacfg.exists_many(transport, paths)
    reads = next((p for p in paths if found[p]), None)
    follows = _follows(transport, layout, reads)[0] if reads else None
    return {"searchPaths": paths, "reads": reads, "readsFollows": follows}


def datadir_rows(transport: NodeTransport, layout: Layout, runtime: str | None) -> list[dict]:
    """status: where each QEMU data directory of the current runtime release leads."""
    if not runtime or runtime == UNMANAGED:
        return []
    return [datadir_state(transport, layout, n) for n in qemu_datadirs(transport, layout, runtime)]
