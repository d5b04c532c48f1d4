"""Tree walks over SSH are batched: one scan_dirs per depth level (about two SFTP round
trips for every directory of that level together), never a stat per entry.

Counts transport calls (each one at least an SFTP round trip), not time: a tree walk
in katactl.upgrade (release configuration) and katactl.vmcore (a dump's state/, the
copy of a sandbox's state when `cp -ar` cannot run) must cost the same number of calls
for 3 entries as for 60 at the same depth."""
from __future__ import annotations

import collections
import os

import pytest

from katactl import config

#: transport methods that reach the node; nested ones (listdir -> scan_dir -> scan_dirs,
#: exists -> stat, walk -> scan_dirs) count once, as the outermost call
CALLS = ("walk", "scan_dirs", "scan_dir", "listdir", "stat", "stat_many", "exists", "is_dir", "readlink",
         "read_bytes", "read_text", "read_many", "open_stream")


class Calls:
    """Counts the outermost calls of ``names`` on one transport instance."""

    def __init__(self, t, names=CALLS):
        self.n: collections.Counter = collections.Counter()
        self.depth = 0
        for name in names:
            if hasattr(t, name):
                setattr(t, name, self._wrap(name, getattr(t, name)))

    def _wrap(self, name, fn):
        def call(*a, **kw):
            if self.depth == 0:
                self.n[name] += 1
            self.depth += 1
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1
        return call

    def total(self) -> int:
        return sum(self.n.values())


@pytest.fixture
def ssh(sshd_lab):
    from katactl.backends.ssh import SSHTransport

    settings = config.resolve({"ssh_config": str(sshd_lab.config), "request_timeout": 10.0})
    opened = []

    def open_(node="node1"):
        t = SSHTransport.from_settings(node, settings)
        opened.append(t)
        return t, sshd_lab.nodes[node].root

    yield open_
    for t in opened:
        t.close()


def _files(root, rel_dirs, n, suffix=".txt", data=b"x"):
    for i in range(n):
        d = os.path.join(root, rel_dirs[i % len(rel_dirs)])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:03d}{suffix}"), "wb") as f:
            f.write(data)


def test_walk_is_one_scan_per_level(ssh, tmp_path):
    from katactl.backends.local import LocalTransport

    t, root = ssh()
    top = f"/walk-{os.getpid()}"
    base = os.path.join(root, top.lstrip("/"))
    _files(base, ["a", "a/b", "a/b/c", "d", "a.x"], 60)
    os.symlink("a", os.path.join(base, "link"))
    os.symlink("loop", os.path.join(base, "loop"))
    c = Calls(t)
    got = t.walk(top)
    assert c.n == {"walk": 1}
    # the same entries, in the same order (parents first, names sorted), as locally and as
    # a recursive listing gives them
    local = LocalTransport(str(root)).walk(top)
    assert [(p, s.is_dir, s.is_link, s.size) for p, s in got] == \
        [(p, s.is_dir, s.is_link, s.size) for p, s in local]
    want = []

    def rec(d):
        for n in sorted(os.listdir(os.path.join(root, d.lstrip("/")))):
            p = f"{d}/{n}"
            want.append(p)
            real = os.path.join(root, p.lstrip("/"))
            if os.path.isdir(real) and not os.path.islink(real):
                rec(p)
    rec(top)
    assert [p for p, _ in got] == want
    assert {p: s.is_link for p, s in got}[f"{top}/link"] is True
    assert t.walk(top + "/nonexistent") == [] and t.walk(f"{top}/a/f000.txt") == []
    # inside: one scan_dirs per depth level that has directories (top; a, a.x, d; b; c)
    t2, _ = ssh()
    inner = Calls(t2, names=("scan_dirs", "scan_dir", "listdir", "stat", "stat_many"))
    assert t2.walk(top) == got
    assert inner.n == {"scan_dirs": 4}, inner.n


def _release(root, kata_root, version, extra):
    """releases/<v> with two configuration files and ``extra`` other entries in nested
    directories below the configuration directory; current -> releases/<v>."""
    rel = os.path.join(root, kata_root.lstrip("/"), "releases", version)
    cfg = os.path.join(rel, "share/defaults/kata-containers")
    os.makedirs(os.path.join(cfg, "config.d"), exist_ok=True)
    for name in ("configuration-qemu.toml", "config.d/50-x.toml"):
        with open(os.path.join(cfg, name), "w") as f:
            f.write(f'[hypervisor.qemu]\nkernel = "{kata_root}/releases/{version}/share/kata-containers/vmlinux"\n')
    _files(cfg, ["doc", "doc/old", "doc/old/older"], extra)
    os.symlink(f"releases/{version}", os.path.join(root, kata_root.lstrip("/"), "current"))


@pytest.mark.parametrize("extra", [3, 60])
def test_upgrade_config_walk_does_not_grow_with_entries(ssh, extra):
    from katactl import upgrade
    from katactl.upgrade import Layout

    t, root = ssh()
    kata_root = f"/opt/kata-walk-{extra}-{os.getpid()}"
    _release(root, kata_root, "3.1.0", extra)
    c = Calls(t)
    st = upgrade.read_state(t, Layout(kata_root))
    assert st["runtime"] == "3.1.0" and st["agent"] == "3.1.0"
    # stat + readlink of current, one walk, one read per configuration file
    assert c.n["stat"] + c.n["readlink"] + c.n["walk"] <= 3 and "listdir" not in c.n, c.n
    assert c.total() == 5, c.n


@pytest.fixture
def vmc(sshd_lab):
    if "vmc" not in sshd_lab.nodes:
        sshd_lab.add_node("vmc", known="plain")
        sshd_lab.write_config()
        sshd_lab.wait_ready()
    return sshd_lab.nodes["vmc"].root


@pytest.mark.parametrize("extra", [3, 60])
def test_vmcore_state_copy_does_not_grow_with_entries(ssh, vmc, tmp_path, extra):
    from katactl.vmcore import collection
    from tests.test_vmcore import DUMP_PATH, SID, add_dump, node_tree

    node_tree(str(vmc))
    add_dump(str(vmc))
    d = f"{DUMP_PATH}/{SID}"
    _files(os.path.join(vmc, d.lstrip("/"), "state", SID), ["x", "x/y"], extra, suffix=".json", data=b"{}")
    t, _ = ssh("vmc")
    c = Calls(t)
    out = tmp_path / "out"
    out.mkdir()
    entries = collection._copy_metadata(t, d, str(out), "vmcore-test.elf", collection.CollectOptions(to=str(out)))
    local = os.path.join(vmc, d.lstrip("/"))
    assert sorted(entries) == sorted(["hypervisor.conf", "hypervisor.version"] + [
        os.path.relpath(os.path.join(dp, f), local) for dp, _, fs in os.walk(os.path.join(local, "state")) for f in fs])
    assert (out / "state" / SID / "x" / "y").is_dir()
    # one stat_many (hypervisor.conf, .version: regular files only are read), one walk of state/
    # (a missing one walks nothing), one read_many for the small files
    assert c.n == {"stat_many": 1, "walk": 1, "read_many": 1}, c.n


@pytest.mark.parametrize("extra", [3, 60])
def test_vmcore_state_copy_without_cp_does_not_grow_with_entries(ssh, vmc, extra):
    """prepare_dump_dir copies the sandbox's state itself when `cp -ar` cannot run on the
    node: listing and reading cost the same for 3 files as for 60 (writes are one each)."""
    from katactl.backends.base import RunResult
    from katactl.sandbox import GO_SBS
    from katactl.vmcore import capture

    sid = f"{extra:02d}" + "ab" * 31
    state = os.path.join(vmc, GO_SBS.lstrip("/"), sid)
    _files(state, ["", "p", "p/q"], extra, suffix=".json", data=b"{}")
    t, _ = ssh("vmc")
    run = t.run
    t.run = lambda argv, **kw: (RunResult(tuple(argv), 1, b"", b"cp: not here") if argv[0] == "/bin/cp"
                                else run(argv, **kw))
    dump_path = f"/var/crash/walk-{extra}-{os.getpid()}"
    c = Calls(t)
    d, _ = capture.prepare_dump_dir(t, sid, dump_path, persist={})
    def files(top):
        return sorted(os.path.relpath(os.path.join(dp, f), top) for dp, _, fs in os.walk(top) for f in fs)

    assert files(os.path.join(vmc, d.lstrip("/"), "state", sid)) == files(state) and len(files(state)) == extra
    assert "stat" not in c.n and "listdir" not in c.n and "open_stream" not in c.n, c.n
    # one walk, one read_many; the directory checks are the dump path's missing parents (made
    # 0750 one by one, as the runtime's MkdirAll), never one per file of the 60
    assert c.n["walk"] == 1 and c.n["read_many"] == 1 and set(c.n) <= {"is_dir", "exists", "walk", "read_many"}, c.n
    assert c.n["is_dir"] + c.n["exists"] <= 12, c.n
