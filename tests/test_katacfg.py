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


def test_usr_share_then_kata_deploy(tmp_path):
    _w(tmp_path, "/opt/kata/share/defaults/kata-containers/configuration.toml", BASE)
    t = LocalTransport(str(tmp_path))
    assert katacfg.load(t).path.startswith("/opt/kata/")
    _w(tmp_path, "/usr/share/defaults/kata-containers/configuration.toml", BASE)
    assert katacfg.load(t).path.startswith("/usr/share/")


def test_dropins_lexical_order_and_table_merge(tmp_path):
    _w(tmp_path, "/usr/share/defaults/kata-containers/configuration.toml", BASE)
    d = "/usr/share/defaults/kata-containers/config.d"
    _w(tmp_path, f"{d}/20-dump.toml", '[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/b"\n')
    _w(tmp_path, f"{d}/10-dump.toml", '[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/a"\n'
                                        'guest_memory_dump_paging = true\n')
    _w(tmp_path, f"{d}/30-runtime.toml", '[runtime]\nenable_pprof = true\n')
    os.makedirs(os.path.join(tmp_path, d.lstrip("/"), "subdir"))
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
