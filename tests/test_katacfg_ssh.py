"""katacfg over a real SSH transport (OpenSSH sshd on loopback): containerd's handlers,
kata-deploy's per-handler configuration and its config.d, read through SFTP exactly as
locally; a directory in config.d is the runtime's error there too."""
from __future__ import annotations

import os
import shutil

import pytest

from katactl import config, katacfg
from katactl.backends.local import LocalTransport
from katactl.lab import layout

QEMU = '[hypervisor.qemu]\nkernel = "/k"\nimage = "/img"\n[runtime]\nenable_pprof = false\n'
CLH = '[hypervisor.clh]\nkernel = "/k"\n[runtime]\nenable_pprof = true\n'


@pytest.fixture
def node(sshd_lab):
    from katactl.backends.ssh import SSHTransport

    settings = config.resolve({"ssh_config": str(sshd_lab.config), "request_timeout": 10.0})
    t = SSHTransport.from_settings("node1", settings)
    root = str(sshd_lab.nodes["node1"].root)
    tag = f"k7-{os.getpid()}"
    made = [f"/opt/{tag}", f"/etc/{tag}", f"/run/{tag}"]
    yield t, root, tag
    t.close()
    for d in made:
        shutil.rmtree(os.path.join(root, d.lstrip("/")), ignore_errors=True)


def test_handlers_and_dropins_over_ssh_as_locally(node):
    t, root, tag = node
    hs = layout.write_kata_deploy(root, {"qemu": QEMU, "clh": CLH},
                                  dropins={"qemu": {"50-dump.toml": '[hypervisor.qemu]\nguest_memory_dump_path = "/x"\n'}},
                                  dest_dir=f"/opt/{tag}", containerd_config=f"/etc/{tag}/config.toml")
    bundles = {}
    for name in ("kata-qemu", "kata-clh"):
        bundles[name] = f"/run/{tag}/{name}"
        layout.write_shim_binary_path(root, bundles[name], hs[name].runtime_path)
    facts = [katacfg.SandboxFacts(runtime="go", hypervisor=hv, bundle=bundles[name], assets={"kernel": "/k"})
             for name, hv in (("kata-qemu", "qemu"), ("kata-clh", "clh"))]
    got = [r.to_dict() for r in katacfg.Resolver(t, f"/etc/{tag}/config.toml").resolve_many(facts)]
    local = [r.to_dict() for r in katacfg.Resolver(LocalTransport(root), f"/etc/{tag}/config.toml").resolve_many(facts)]
    assert got == local
    assert [g["runtimeHandler"] for g in got] == ["kata-qemu", "kata-clh"]
    assert got[0]["dropIns"] == [f"{hs['kata-qemu'].config_dir}/config.d/50-dump.toml"]
    assert got[1]["file"] == hs["kata-clh"].config_path and got[1]["source"] == "containerd"
    # a directory in config.d: the Go runtime's own error, over SSH too
    os.makedirs(os.path.join(root, hs["kata-clh"].config_dir.lstrip("/"), "config.d/sub"))
    [r] = katacfg.Resolver(t, f"/etc/{tag}/config.toml").resolve_many(facts[1:])
    p = f"{hs['kata-clh'].config_dir}/config.d/sub"
    assert r.config is None and r.error == f'error reading file "{p}": read {p}: is a directory'
