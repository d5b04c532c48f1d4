"""katacfg: the runtime's search order, symlinks and config.d drop-ins, over real node trees."""
from __future__ import annotations

import os

import pytest

from katactl import katacfg
from katactl.backends.local import LocalTransport
from katactl.errors import NotFound, OperationFailed


def _w(root, node_path, text):
    p = os.path.join(str(root), node_path.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(text)
    return p


BASE = """
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
default_memory = 2048
guest_memory_dump_path = ""
kernel_params = "a=1"
[runtime]
enable_pprof = false
"""


def test_etc_wins_over_usr_share(tmp_path):
    _w(tmp_path, "/usr/share/defaults/kata-containers/configuration.toml", BASE)
    _w(tmp_path, "/etc/kata-containers/configuration.toml", BASE.replace("2048", "4096"))
    cfg = katacfg.load(LocalTransport(str(tmp_path)))
    assert cfg.path == "/etc/kata-containers/configuration.toml"
    assert cfg.hypervisor["default_memory"] == 4096 and cfg.runtime == "go"


def _shim(root, node_path):
    """A placeholder shim binary at node_path (its location tells the build's PREFIX)."""
    p = _w(root, node_path, "#!/bin/sh\n")
    os.chmod(p, 0o755)
    return p


def test_build_default_is_the_installed_shims_prefix_only(tmp_path):
    """Before: /usr/share/defaults and /opt/kata/share/defaults were both searched, whichever
    build the node ran. The Go runtime knows one PREFIX (src/runtime/Makefile)."""
    t = LocalTransport(str(tmp_path))
    _w(tmp_path, "/usr/share/defaults/kata-containers/configuration.toml", BASE.replace("2048", "1"))
    _w(tmp_path, "/opt/kata/share/defaults/kata-containers/configuration.toml", BASE)
    _shim(tmp_path, "/opt/kata/bin/containerd-shim-kata-v2")
    cfg = katacfg.load(t)
    assert cfg.path.startswith("/opt/kata/") and cfg.origin == "build-default"
    assert cfg.origin_detail == "PREFIX /opt/kata of /opt/kata/bin/containerd-shim-kata-v2"


@pytest.mark.parametrize("shim,prefix", [("/usr/local/bin/containerd-shim-kata-v2", "/usr"),
                                         ("/usr/bin/containerd-shim-kata-v2", "/usr"),
                                         (None, "/usr")])
def test_a_usr_build_never_reads_opt_kata(tmp_path, shim, prefix):
    t = LocalTransport(str(tmp_path))
    _w(tmp_path, "/opt/kata/share/defaults/kata-containers/configuration.toml", BASE)
    if shim:
        _shim(tmp_path, shim)
    assert katacfg.node_prefix(t)[0] == prefix
    with pytest.raises(NotFound, match="/usr/share/defaults") as e:
        katacfg.load(t, runtime="go")
    assert "/opt/kata" not in e.value.message


def test_build_prefix():
    assert katacfg.build_prefix("/opt/kata/bin/containerd-shim-kata-v2") == "/opt/kata"
    assert katacfg.build_prefix("/usr/local/bin/containerd-shim-kata-v2") == "/usr"  # Makefile default
    # a kata-static release in katactl's A/B layout: its compiled-in PREFIX, wherever it lives
    assert katacfg.build_prefix("/opt/kata/releases/3.1.0/bin/containerd-shim-kata-v2") == "/opt/kata"
    assert katacfg.build_prefix("/srv/kata/releases/3.1.0/bin/containerd-shim-kata-v2") == "/opt/kata"
    assert katacfg.build_prefix("/containerd-shim-kata-v2") is None


def test_dropins_lexical_order_and_table_merge(tmp_path):
    _w(tmp_path, "/usr/share/defaults/kata-containers/configuration.toml", BASE)
    d = "/usr/share/defaults/kata-containers/config.d"
    _w(tmp_path, f"{d}/20-dump.toml", '[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/b"\n')
    _w(tmp_path, f"{d}/10-dump.toml", '[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/a"\n'
                                        'guest_memory_dump_paging = true\n')
    _w(tmp_path, f"{d}/30-runtime.toml", '[runtime]\nenable_pprof = true\n')
    cfg = katacfg.load(LocalTransport(str(tmp_path)))
    assert [os.path.basename(p) for p in cfg.dropins] == ["10-dump.toml", "20-dump.toml", "30-runtime.toml"]
    hv = cfg.hypervisor
    assert hv["guest_memory_dump_path"] == "/var/crash/b"     # later file wins
    assert hv["guest_memory_dump_paging"] is True             # merged key by key
    assert hv["default_memory"] == 2048 and hv["kernel_params"] == "a=1"
    assert cfg.get("runtime.enable_pprof") is True


def test_dropins_follow_the_resolved_symlink(tmp_path):
    # kata-deploy: configuration.toml -> configuration-qemu.toml in another dir
    real = "/opt/kata/share/defaults/kata-containers/configuration-qemu.toml"
    _w(tmp_path, real, BASE)
    _w(tmp_path, "/opt/kata/share/defaults/kata-containers/config.d/50.toml",
       '[hypervisor.qemu]\ndefault_memory = 512\n')
    _w(tmp_path, "/etc/kata-containers/config.d/50.toml", '[hypervisor.qemu]\ndefault_memory = 1\n')
    link = os.path.join(tmp_path, "etc/kata-containers/configuration.toml")
    os.symlink(real, link)  # absolute target: a node path, resolved under the host root
    cfg = katacfg.load(LocalTransport(str(tmp_path)))
    assert cfg.path == "/etc/kata-containers/configuration.toml" and cfg.resolved == real
    assert cfg.hypervisor["default_memory"] == 512


def test_runtime_rs_paths(tmp_path):
    _w(tmp_path, "/usr/share/defaults/kata-containers/runtime-rs/configuration.toml",
       '[hypervisor.dragonball]\ndefault_memory = 256\n')
    cfg = katacfg.load(LocalTransport(str(tmp_path)))
    assert cfg.runtime == "rs" and cfg.hypervisor_name == "dragonball"
    with pytest.raises(NotFound):
        katacfg.load(LocalTransport(str(tmp_path)), runtime="go")


def test_explicit_path_and_missing(tmp_path):
    t = LocalTransport(str(tmp_path))
    with pytest.raises(NotFound):
        katacfg.load(t)
    with pytest.raises(NotFound):
        katacfg.load(t, "/nope/configuration.toml")
    _w(tmp_path, "/x/c.toml", BASE)
    assert katacfg.load(t, "/x/c.toml").hypervisor_name == "qemu"


@pytest.mark.parametrize("bad", ["[hypervisor.qemu\n", "a = \n", "x = 'unterminated\n", "\x00"])
def test_invalid_toml_is_one_clear_error(tmp_path, bad):
    _w(tmp_path, "/etc/kata-containers/configuration.toml", bad)
    with pytest.raises(OperationFailed, match="invalid TOML"):
        katacfg.load(LocalTransport(str(tmp_path)))


def test_bad_dropin_names_the_file(tmp_path):
    _w(tmp_path, "/etc/kata-containers/configuration.toml", BASE)
    _w(tmp_path, "/etc/kata-containers/config.d/99-bad.toml", "[[[")
    with pytest.raises(OperationFailed, match="99-bad.toml"):
        katacfg.load(LocalTransport(str(tmp_path)))


def test_symlink_loop(tmp_path):
    d = os.path.join(tmp_path, "etc/kata-containers")
    os.makedirs(d)
    os.symlink("b.toml", os.path.join(d, "configuration.toml"))
    os.symlink("configuration.toml", os.path.join(d, "b.toml"))
    with pytest.raises(OperationFailed, match="symbolic links"):
        katacfg.load(LocalTransport(str(tmp_path)))


def test_merge_semantics():
    assert katacfg.merge({"a": {"x": 1, "y": 2}, "l": [1]}, {"a": {"y": 3}, "l": [2]}) == \
        {"a": {"x": 1, "y": 3}, "l": [2]}


# -- config.d as each runtime reads it --------------------------------------------
def test_a_directory_in_config_d_is_the_go_runtimes_error(tmp_path):
    """Before: skipped silently. Go katautils.decodeDropIns os.ReadFile()s every entry."""
    _w(tmp_path, "/etc/kata-containers/configuration.toml", BASE)
    _w(tmp_path, "/etc/kata-containers/config.d/10-ok.toml", "[runtime]\nenable_pprof = true\n")
    os.makedirs(os.path.join(tmp_path, "etc/kata-containers/config.d/20-sub"))
    p = "/etc/kata-containers/config.d/20-sub"
    with pytest.raises(OperationFailed) as e:
        katacfg.load(LocalTransport(str(tmp_path)))
    assert e.value.message == f'error reading file "{p}": read {p}: is a directory'


def test_a_directory_in_config_d_is_runtime_rs_error_too(tmp_path):
    """kata-types drop_in.rs: DirEntry::file_type().is_file() or the load fails."""
    d = "/etc/kata-containers/runtime-rs"
    _w(tmp_path, f"{d}/configuration.toml", "[hypervisor.dragonball]\ndefault_memory = 256\n")
    os.makedirs(os.path.join(tmp_path, d.lstrip("/"), "config.d/sub"))
    with pytest.raises(OperationFailed, match="config.d/sub: drop-in cfg file can only be a regular file"):
        katacfg.load(LocalTransport(str(tmp_path)), runtime="rs")


def test_a_symlinked_dropin_go_follows_runtime_rs_refuses(tmp_path):
    """Go reads through the link; runtime-rs's DirEntry::file_type() does not follow it."""
    for base, table in (("/etc/kata-containers", "qemu"), ("/etc/kata-containers/runtime-rs", "dragonball")):
        _w(tmp_path, f"{base}/configuration.toml", f"[hypervisor.{table}]\ndefault_memory = 256\n")
        _w(tmp_path, f"/srv/{table}.toml", f"[hypervisor.{table}]\ndefault_memory = 512\n")
        os.makedirs(os.path.join(tmp_path, base.lstrip("/"), "config.d"))
        os.symlink(f"/srv/{table}.toml", os.path.join(tmp_path, base.lstrip("/"), "config.d/50.toml"))
    t = LocalTransport(str(tmp_path))
    assert katacfg.load(t, runtime="go").hypervisor["default_memory"] == 512
    with pytest.raises(OperationFailed, match="does not follow a symlinked drop-in"):
        katacfg.load(t, runtime="rs")


def test_a_dangling_dropin_is_an_error(tmp_path):
    _w(tmp_path, "/etc/kata-containers/configuration.toml", BASE)
    os.makedirs(os.path.join(tmp_path, "etc/kata-containers/config.d"))
    os.symlink("/nowhere.toml", os.path.join(tmp_path, "etc/kata-containers/config.d/50.toml"))
    with pytest.raises(OperationFailed, match="no such file or directory"):
        katacfg.load(LocalTransport(str(tmp_path)))


# -- containerd's runtime handlers --------------------------------------------------
V3_KATA = """
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata-qemu]
runtime_type = "io.containerd.kata-qemu.v2"
runtime_path = "/opt/kata/bin/containerd-shim-kata-v2"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata-qemu.options]
ConfigPath = "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml"
"""


def test_containerd_v3_imports_glob_relative_and_later_file_wins(tmp_path):
    _w(tmp_path, "/etc/containerd/config.toml",
       'version = 3\nimports = ["conf.d/*.toml", "/opt/kata/containerd/config.d/kata-deploy.toml"]\n'
       '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]\n'
       'runtime_type = "io.containerd.runc.v2"\n')
    _w(tmp_path, "/opt/kata/containerd/config.d/kata-deploy.toml", "version = 3\n" + V3_KATA)
    # an import in the v2 layout: containerd 2 migrates it, so its runtimes count too
    _w(tmp_path, "/etc/containerd/conf.d/10-old.toml",
       'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-clh]\n'
       'runtime_type = "io.containerd.kata-clh.v2"\n')
    # loaded after conf.d (imports in order), so its ConfigPath for kata-clh wins
    _w(tmp_path, "/etc/containerd/conf.d/20-path.toml",
       'version = 3\n[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata-clh.options]\n'
       'ConfigPath = "/etc/kata-clh.toml"\n')
    cd = katacfg.containerd_config(LocalTransport(str(tmp_path)))
    assert cd.error is None and cd.path == "/etc/containerd/config.toml"
    assert cd.files == ["/etc/containerd/config.toml", "/etc/containerd/conf.d/10-old.toml",
                        "/etc/containerd/conf.d/20-path.toml", "/opt/kata/containerd/config.d/kata-deploy.toml"]
    q, c = cd.handlers["kata-qemu"], cd.handlers["kata-clh"]
    assert q.config_path.endswith("runtimes/qemu/configuration-qemu.toml") and q.binary_name == "containerd-shim-kata-qemu-v2"
    assert q.defined_in == "/opt/kata/containerd/config.d/kata-deploy.toml"
    assert (c.runtime_type, c.config_path, c.defined_in) == ("io.containerd.kata-clh.v2", "/etc/kata-clh.toml",
                                                            "/etc/containerd/conf.d/20-path.toml")


def test_containerd_table_of_another_version_is_not_read(tmp_path):
    """A version 2 file's runtimes live under io.containerd.grpc.v1.cri, not the v3 plugin."""
    _w(tmp_path, "/etc/containerd/config.toml", "version = 2\n" + V3_KATA)
    assert katacfg.containerd_config(LocalTransport(str(tmp_path))).handlers == {}


@pytest.mark.parametrize("text", ["version = 3\nimports = [", "\x00"])
def test_containerd_config_broken_is_reported_not_raised(tmp_path, text):
    _w(tmp_path, "/etc/containerd/config.toml", text)
    cd = katacfg.containerd_config(LocalTransport(str(tmp_path)))
    assert cd.handlers == {} and "invalid TOML" in cd.error


def test_no_containerd_config(tmp_path):
    cd = katacfg.containerd_config(LocalTransport(str(tmp_path)))
    assert (cd.path, cd.handlers, cd.error) == (None, {}, None)


class _CountingTransport(LocalTransport):
    """Counts the node round trips a remote transport would make for stats."""

    def __init__(self, root):
        super().__init__(root)
        self.trips = 0

    def stat(self, *a, **k):
        self.trips += 1
        return super().stat(*a, **k)

    def stat_many(self, *a, **k):
        self.trips += 1
        return super().stat_many(*a, **k)


def test_exists_many_agrees_with_exists_through_links(tmp_path):
    """exists_many answers a whole search list from one stat_many, and falls back to the
    careful walk where a symlink lies on a path's way: same answers as exists()."""
    _w(tmp_path, "/opt/kata/releases/3.1/share/defaults/kata-containers/configuration.toml", BASE)
    os.symlink("releases/3.1", tmp_path / "opt/kata/current")
    os.makedirs(tmp_path / "etc", exist_ok=True)
    os.symlink("/opt/kata/current/share", tmp_path / "etc/kshare")        # absolute, inside the node
    os.symlink("nowhere", tmp_path / "etc/dangling")
    os.symlink("loop", tmp_path / "etc/loop")
    os.symlink("loop", tmp_path / "etc/loop2")
    os.replace(tmp_path / "etc/loop2", tmp_path / "etc/loop")               # a link to itself
    paths = ["/opt/kata/current/share/defaults/kata-containers/configuration.toml",
             "/etc/kshare/defaults/kata-containers/configuration.toml",
             "/opt/kata/releases/3.1/share/defaults/kata-containers/configuration.toml",
             "/opt/kata/releases/3.2/share/defaults/kata-containers/configuration.toml",
             "/etc/dangling", "/etc/loop", "/etc/loop/x", "/etc/../opt/kata/current", "/", "/etc",
             "/opt/kata/releases/3.1/share/defaults/kata-containers/configuration.toml/below"]
    t = LocalTransport(str(tmp_path))
    assert katacfg.exists_many(t, paths) == {p: katacfg.exists(t, p) for p in paths}
    assert katacfg.exists_many(t, paths)[paths[1]] is True and katacfg.exists_many(t, paths)[paths[3]] is False


def test_resolution_costs_a_few_round_trips_not_one_per_path_component(tmp_path):
    """A node's configuration lookup (containerd's config, the shim binary's prefix, each
    runtime's search list) is answered in batches: over SSH every stat call is a round
    trip, and a fan-out of 32 nodes paid some 33 sequential ones per node."""
    from tests._katanode import node
    from katactl import sandbox

    with node() as n:
        for i in range(4):
            n.go(f"g{i}", serve=False, pid=2 ** 22 + i)
        n.rs("r0", serve=False, pid=2 ** 22 + 9)
        t = _CountingTransport(n.root)
        sbs = sandbox.discover(t, check=False)
        assert len(sbs) == 5 and all("kataConfig" in s.to_dict() for s in sbs)
        assert t.trips <= 6, t.trips


@pytest.mark.parametrize("runtime", ["go", "rs"])
def test_an_absolute_config_d_link_is_resolved_inside_the_node(tmp_path, runtime):
    """config.d -> /srv/kata-dropins: a node path. Its drop-ins are read from the node's
    /srv, never from the host's (runtime-rs read <dir>/config.d/<name> unresolved, so the
    host followed the absolute link)."""
    node = tmp_path / "node"
    host_dir = tmp_path / "host-dropins"  # what the absolute link names on the host
    _w(node, "/etc/kata-containers/configuration.toml", BASE)
    _w(node, f"{host_dir}/10-x.toml", '[hypervisor.qemu]\ndefault_memory = 111\n')  # the node's copy
    host_dir.mkdir()
    (host_dir / "10-x.toml").write_text('[hypervisor.qemu]\ndefault_memory = 999\n')  # the host's
    os.symlink(str(host_dir), node / "etc/kata-containers/config.d")
    cfg = katacfg.load_file(LocalTransport(str(node)), "/etc/kata-containers/configuration.toml", runtime)
    assert cfg.hypervisor["default_memory"] == 111


def test_an_oversized_configuration_is_refused_not_cut(tmp_path):
    """A 5 MiB comment before the real keys: read up to the cap and parsed, the keys after
    the cut were silently lost. Now the file is reported as too large."""
    _w(tmp_path, "/etc/kata-containers/configuration.toml",
       "#" + "x" * (5 << 20) + "\n" + BASE)
    with pytest.raises(OperationFailed, match="larger than 4 MiB"):
        katacfg.load(LocalTransport(str(tmp_path)))


def test_containerd_imports_past_the_file_cap_are_an_error_not_a_silent_cut(tmp_path):
    """More files through imports than katactl reads: the handlers defined past the cap
    would be missing without a word; now the configuration says why it was not read."""
    n = katacfg.MAX_CONTAINERD_FILES + 5
    _w(tmp_path, "/etc/containerd/config.toml", 'version = 2\nimports = ["/etc/containerd/conf.d/*.toml"]\n')
    for i in range(n):
        _w(tmp_path, f"/etc/containerd/conf.d/{i:04d}.toml", "version = 2\n")
    cc = katacfg.containerd_config(LocalTransport(str(tmp_path)))
    assert cc.handlers == {} and cc.error and "more than" in cc.error


def test_a_containerd_import_glob_matching_too_much_is_an_error(tmp_path):
    """An import like '/*/*/*.toml' would list the whole node (one round trip per directory
    over SSH): past the cap of paths it is an error on containerd's configuration."""
    _w(tmp_path, "/etc/containerd/config.toml", 'version = 2\nimports = ["/srv/*/*.toml"]\n')
    for i in range(katacfg.MAX_CONTAINERD_FILES + 10):
        os.makedirs(tmp_path / f"srv/d{i:04d}", exist_ok=True)
    cc = katacfg.containerd_config(LocalTransport(str(tmp_path)))
    assert cc.handlers == {} and cc.error and "matches more than" in cc.error


def test_node_facts_discover_the_sandboxes_once(tmp_path):
    """node check --node-facts wants the release attribution and the dump directories; both
    need the node's sandboxes, and each used to discover them again (every persist.json read
    twice, twice the round trips over SSH)."""
    from tests._katanode import node
    from katactl import nodes

    reads: dict[str, int] = {}

    class Counting(LocalTransport):
        def read_many(self, paths, limit=None):
            for p in paths:
                reads[p] = reads.get(p, 0) + 1
            return super().read_many(paths, limit)

    with node() as n:
        for i in range(3):
            n.go(f"f{i}", serve=False, pid=2 ** 22 + i)
        facts = nodes.kata_facts(Counting(n.root))
    assert "staleSandboxes" in facts
    persist = {p: c for p, c in reads.items() if p.endswith("/persist.json")}
    assert len(persist) == 3 and set(persist.values()) == {1}, persist


@pytest.mark.parametrize("link, target, leaves", [
    ("opt", "/data", True),            # absolute: this host's kernel restarts at *its* /
    ("opt", "../../../data", True),    # relative, climbing above the node's /: the kernel goes on up
    ("opt", "var/opt", False),         # relative inside the tree (Fedora CoreOS): followed in place
    ("opt/kata", "../srv/kata", False),
])
def test_rooted_escape_names_links_the_host_kernel_would_follow_out_of_the_tree(tmp_path, link, target, leaves):
    root = tmp_path / "node"
    for d in ("var/opt/kata", "srv/kata", "data/kata", "opt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    p = root / link
    if p.is_dir():
        p.rmdir()
    os.symlink(target, p)

    class MappedRoot(LocalTransport):
        """Declares what SSH and --via kube do: that machine's kernel resolves root + path (its
        lstat and readlink answers are the links' own, the same either way)."""
        resolves_in_root = False

    esc = katacfg.rooted_escape(MappedRoot(str(root)), "/opt/kata/releases")
    assert (esc is not None) == leaves, esc
    if leaves:
        assert esc[0] == f"/{link}" and esc[1] == target and esc[2] == "/data/kata/releases"
    assert katacfg.rooted_escape(MappedRoot("/"), "/opt/kata/releases") is None  # this host's own /
    assert katacfg.rooted_escape(LocalTransport(str(root)), "/opt/kata/releases") is None  # resolves in the root
