"""Which Kata configuration each sandbox's runtime used (issue 18 item 7), on kata-deploy
shaped nodes: containerd's per-handler ConfigPath with its own config.d, KATA_CONF_FILE in
the shim's environment, /etc, then the build's own defaults."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from katactl import sandbox
from katactl.backends.local import LocalTransport
from katactl.lab import layout

QEMU = """[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel = "/opt/kata/share/kata-containers/vmlinux.container"
image = "/opt/kata/share/kata-containers/kata-containers.img"
guest_memory_dump_path = ""
[runtime]
enable_pprof = false
"""
COCO = QEMU.replace("kata-containers.img", "kata-containers-confidential.img")
CLH = """[hypervisor.clh]
path = "/opt/kata/bin/cloud-hypervisor"
kernel = "/opt/kata/share/kata-containers/vmlinux.container"
[runtime]
enable_pprof = true
"""
DB = '[hypervisor.dragonball]\nkernel = "/opt/kata/share/kata-containers/vmlinux.container"\n'
DUMP = '[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/kata"\n'


def _node(root, version=3, dropins=None):
    """kata-deploy's layout for four handlers, and an /etc/kata-containers file that must
    not be what those sandboxes used (it was, before)."""
    hs = layout.write_kata_deploy(root, {"qemu": QEMU, "qemu-coco-dev": COCO, "clh": CLH, "dragonball": DB},
                                  dropins=dropins if dropins is not None else {"qemu": {"50-dump.toml": DUMP}},
                                  containerd_version=version)
    etc = os.path.join(root, "etc/kata-containers/configuration.toml")
    os.makedirs(os.path.dirname(etc))
    with open(etc, "w") as f:
        f.write('[hypervisor.qemu]\nguest_memory_dump_path = "/wrong"\n[runtime]\nenable_pprof = true\n')
    return hs


def _go(root, sid, hs, handler, **kw):
    p = layout.write_go_sandbox(root, sid, **kw)
    layout.write_shim_binary_path(root, p.bundle_node, hs[handler].runtime_path)
    return p


def _by_id(root):
    return {s.id: s for s in sandbox.discover(LocalTransport(root), check=False)}


@pytest.mark.parametrize("version", [2, 3])
def test_each_sandbox_uses_its_handlers_configpath_and_config_d(tmp_path, version):
    """kata-deploy gives every Go handler the same runtime_path: the handler is the one whose
    configuration has the sandbox's hypervisor and its persisted assets."""
    root = str(tmp_path)
    hs = _node(root, version)
    _go(root, "q00001", hs, "kata-qemu")
    _go(root, "c00002", hs, "kata-qemu-coco-dev",
        image="/opt/kata/share/kata-containers/kata-containers-confidential.img")
    _go(root, "h00003", hs, "kata-clh", hypervisor="clh")
    sbs = _by_id(root)
    q = sbs["q00001"].kata_config
    assert q["runtimeHandler"] == "kata-qemu" and q["source"] == "containerd" and q["error"] is None
    assert q["file"] == "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml"
    assert q["dropIns"] == ["/opt/kata/share/defaults/kata-containers/runtimes/qemu/config.d/50-dump.toml"]
    assert q["sourceDetail"] == ("ConfigPath of runtime handler kata-qemu in "
                                 "/opt/kata/containerd/config.d/kata-deploy.toml")
    assert sbs["q00001"].guest_memory_dump_path == "/var/crash/kata" and sbs["q00001"].enable_pprof is False
    c = sbs["c00002"].kata_config
    assert c["runtimeHandler"] == "kata-qemu-coco-dev" and c["dropIns"] == []
    assert sbs["c00002"].guest_memory_dump_path is None
    h = sbs["h00003"]
    assert h.kata_config["runtimeHandler"] == "kata-clh" and h.enable_pprof is True
    assert h.to_dict()["kataConfig"] == h.kata_config


def test_runtime_rs_handler_and_its_own_defaults(tmp_path):
    root = str(tmp_path)
    hs = _node(root)
    p = layout.write_rs_sandbox(root, "rs0001", hypervisor="dragonball")
    layout.write_shim_binary_path(root, p.bundle_node, hs["kata-dragonball"].runtime_path)
    layout.write_rs_sandbox(root, "rs0002", hypervisor="dragonball")  # no shim-binary-path: containerd < 1.6
    sbs = _by_id(root)
    assert sbs["rs0001"].kata_config["file"] == (
        "/opt/kata/share/defaults/kata-containers/runtime-rs/runtimes/dragonball/configuration-dragonball.toml")
    assert sbs["rs0001"].kata_config["runtimeHandler"] == "kata-dragonball"
    # runtime-rs's own list (kata-types default.rs) holds none of these files
    e = sbs["rs0002"].kata_config
    assert e["runtimeHandler"] is None and "runtime-rs/configuration.toml" in e["error"]


def test_a_per_handler_shim_binary_names_its_handler(tmp_path):
    """Older kata-deploy and hand-made setups: no runtime_path, containerd looks
    containerd-shim-kata-fc-v2 up in PATH and records that path."""
    root = str(tmp_path)
    cfg = "/opt/kata/share/defaults/kata-containers/configuration-fc.toml"
    os.makedirs(os.path.join(root, "etc/containerd"))
    with open(os.path.join(root, "etc/containerd/config.toml"), "w") as f:
        f.write('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-fc]\n'
                'runtime_type = "io.containerd.kata-fc.v2"\n'
                f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-fc.options]\nConfigPath = "{cfg}"\n')
    os.makedirs(os.path.dirname(os.path.join(root, cfg.lstrip("/"))))
    with open(os.path.join(root, cfg.lstrip("/")), "w") as f:
        f.write('[hypervisor.firecracker]\n[runtime]\nenable_pprof = true\n')
    p = layout.write_go_sandbox(root, "fc0001", hypervisor="fc")
    layout.write_shim_binary_path(root, p.bundle_node, "/usr/local/bin/containerd-shim-kata-fc-v2")
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    assert sb.kata_config["runtimeHandler"] == "kata-fc" and sb.kata_config["file"] == cfg
    assert sb.enable_pprof is True


@pytest.mark.parametrize("runtime", ["go", "rs"])
def test_a_directory_in_config_d_breaks_the_sandboxs_config_as_the_runtime_says(tmp_path, runtime, cli):
    """Before: the directory was skipped and the configuration reported as if fine."""
    root = str(tmp_path)
    shim = "qemu" if runtime == "go" else "dragonball"
    hs = _node(root, dropins={})
    d = os.path.join(root, hs[f"kata-{shim}"].config_dir.lstrip("/"), "config.d", "60-dir")
    os.makedirs(d)
    if runtime == "go":
        p = layout.write_go_sandbox(root, "brk001", pod_name="brk", pod_namespace="ns")
    else:
        p = layout.write_rs_sandbox(root, "brk001", hypervisor="dragonball", pod_name="brk", pod_namespace="ns")
    layout.write_shim_binary_path(root, p.bundle_node, hs[f"kata-{shim}"].runtime_path)
    node_p = hs[f"kata-{shim}"].config_dir + "/config.d/60-dir"
    want = (f'error reading file "{node_p}": read {node_p}: is a directory' if runtime == "go"
            else f"{node_p}: drop-in cfg file can only be a regular file or a symlink")
    r = cli(["--host-root", root, "sandbox", "inspect", "ns/brk", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    k = r.json()["kataConfig"]
    assert k["error"] == want and k["runtimeHandler"] == f"kata-{shim}" and k["source"] == "containerd"
    assert k["file"] == hs[f"kata-{shim}"].config_path
    # unknown without a configuration; runtime-rs has no pprof whatever its configuration says
    assert r.json()["pprofEnabled"] is (None if runtime == "go" else False)
    r = cli(["--host-root", root, "sandbox", "inspect", "ns/brk"])
    assert r.exit_code == 0 and want in r.stdout and "runtimeHandler: kata-" in r.stdout


def test_annotation_wins(tmp_path):
    root = str(tmp_path)
    hs = _node(root)
    _w = os.path.join(root, "srv/pod.toml")
    os.makedirs(os.path.dirname(_w))
    with open(_w, "w") as f:
        f.write('[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/pod"\n')
    _go(root, "an0001", hs, "kata-qemu", extra_annotations={"io.katacontainers.config_path": "/srv/pod.toml"})
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    assert (sb.kata_config["source"], sb.kata_config["file"]) == ("annotation", "/srv/pod.toml")
    assert sb.guest_memory_dump_path == "/var/crash/pod"


def test_runtime_rs_ignores_the_config_path_annotation_and_has_no_pprof(tmp_path):
    """runtime-rs's load_config (src/runtime-rs/crates/runtimes/src/manager.rs) picks
    KATA_CONF_FILE, else containerd's ConfigPath, else the defaults: the
    io.katacontainers.config_path annotation never chooses its file (it only feeds per-key
    overrides). Before, the annotation's file was reported as the one used, and its
    enable_pprof = true too, for a runtime without any pprof endpoint."""
    root = str(tmp_path)
    hs = _node(root)
    evil = os.path.join(root, "etc/evil/configuration.toml")
    os.makedirs(os.path.dirname(evil))
    with open(evil, "w") as f:
        f.write('[hypervisor.dragonball]\nguest_memory_dump_path = "/var/crash/kata"\n[runtime]\nenable_pprof = true\n')
    p = layout.write_rs_sandbox(root, "rsan01", hypervisor="dragonball", extra_annotations={
        "io.katacontainers.config_path": "/etc/evil/configuration.toml",
        "io.katacontainers.config.runtime.enable_pprof": "true"})
    layout.write_shim_binary_path(root, p.bundle_node, hs["kata-dragonball"].runtime_path)
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    k = sb.kata_config
    assert (k["file"], k["source"], k["runtimeHandler"]) == (
        hs["kata-dragonball"].config_path, "containerd", "kata-dragonball"), k
    assert sb.enable_pprof is False and sb.to_dict()["pprofEnabled"] is False


def _shim_process(env: dict):
    """A real process standing for the shim: its /proc/<pid>/environ is what is read."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env=dict(os.environ, **env))


def test_kata_conf_file_from_the_shims_environment(tmp_path):
    """Go: ConfigPath beats KATA_CONF_FILE; runtime-rs: KATA_CONF_FILE beats ConfigPath;
    without a handler both read the environment."""
    root = str(tmp_path)
    hs = _node(root)
    layout.link_host_views(root)
    env_cfg = "/srv/env.toml"
    os.makedirs(os.path.join(root, "srv"))
    with open(os.path.join(root, "srv/env.toml"), "w") as f:
        f.write('[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/env"\n'
                '[hypervisor.dragonball]\n')
    proc = _shim_process({"KATA_CONF_FILE": env_cfg})
    try:
        a = _go(root, "go0001", hs, "kata-qemu")                     # handler known: ConfigPath
        b = layout.write_go_sandbox(root, "go0002")                  # no shim-binary-path: env
        c = layout.write_rs_sandbox(root, "rs0003", hypervisor="dragonball")
        layout.write_shim_binary_path(root, c.bundle_node, hs["kata-dragonball"].runtime_path)
        for p in (a, b, c):
            layout.write_shim_pid(root, p.bundle_node, proc.pid)
        sbs = _by_id(root)
        assert sbs["go0001"].kata_config["source"] == "containerd"
        for sid in ("go0002", "rs0003"):
            k = sbs[sid].kata_config
            assert (k["source"], k["file"]) == ("KATA_CONF_FILE", env_cfg), sid
            assert k["sourceDetail"] == f"environment of shim pid {proc.pid}"
        assert sbs["go0002"].guest_memory_dump_path == "/var/crash/env"
        assert sbs["rs0003"].kata_config["runtimeHandler"] == "kata-dragonball"
    finally:
        proc.kill()
        proc.wait()
        layout.unlink_host_views(root)


def test_go_default_is_the_shims_own_build_never_both_prefixes(tmp_path):
    """No handler, no KATA_CONF_FILE: /etc, else <PREFIX>/share/defaults of the binary
    containerd started (a /usr/local/bin shim is the Makefile's PREFIX /usr)."""
    root = str(tmp_path)
    for prefix, mem in (("/usr", 1024), ("/opt/kata", 4096)):
        path = os.path.join(root, prefix.lstrip("/"), "share/defaults/kata-containers/configuration.toml")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(f'[hypervisor.qemu]\nguest_memory_dump_path = "/var/crash/{mem}"\n')
    a = layout.write_go_sandbox(root, "usr001")
    layout.write_shim_binary_path(root, a.bundle_node, "/usr/local/bin/containerd-shim-kata-v2")
    b = layout.write_go_sandbox(root, "opt002")
    layout.write_shim_binary_path(root, b.bundle_node, "/opt/kata/bin/containerd-shim-kata-v2")
    sbs = _by_id(root)
    assert sbs["usr001"].guest_memory_dump_path == "/var/crash/1024"
    assert sbs["usr001"].kata_config["source"] == "build-default"
    assert sbs["usr001"].kata_config["sourceDetail"] == "PREFIX /usr of /usr/local/bin/containerd-shim-kata-v2"
    assert sbs["opt002"].guest_memory_dump_path == "/var/crash/4096"


def test_handlers_that_cannot_be_told_apart_are_said_so(tmp_path):
    root = str(tmp_path)
    hs = layout.write_kata_deploy(root, {"qemu": QEMU, "qemu-tdx": QEMU.replace("false", "true")})
    _go(root, "amb001", hs, "kata-qemu")
    [sb] = sandbox.discover(LocalTransport(root), check=False)
    assert sb.kata_config["error"].startswith("cannot tell which runtime handler started this sandbox: "
                                              "kata-qemu, kata-qemu-tdx run /opt/kata/bin/containerd-shim-kata-v2")
    assert sb.enable_pprof is None


def test_the_lab_layout_is_what_kata_deploy_writes(tmp_path):
    root = str(tmp_path)
    hs = layout.write_kata_deploy(root, {"qemu": QEMU}, dropins={"qemu": {"50-dump.toml": DUMP}})
    h = hs["kata-qemu"]
    assert (h.runtime_path, h.config_path) == (
        "/opt/kata/bin/containerd-shim-kata-v2",
        "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml")
    import tomllib

    main = tomllib.load(open(os.path.join(root, "etc/containerd/config.toml"), "rb"))
    assert main["version"] == 3 and main["imports"] == ["/opt/kata/containerd/config.d/kata-deploy.toml"]
    dropin = tomllib.load(open(os.path.join(root, "opt/kata/containerd/config.d/kata-deploy.toml"), "rb"))
    t = dropin["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["kata-qemu"]
    assert t["runtime_type"] == "io.containerd.kata-qemu.v2" and t["options"]["ConfigPath"] == h.config_path
    assert t["pod_annotations"] == ["io.katacontainers.*"] and t["privileged_without_host_devices"] is True
    assert json.dumps(t)  # plain data
