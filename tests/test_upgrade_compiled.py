"""katactl upgrade and what kata-static compiles in: QEMU's non-relocatable data directory,
the dm-verity root hash bound to a release's image, and a handler's default configuration
search (real files under --host-root node trees, real tarballs)."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile

import pytest

from tests import upgrade_fixtures as fx

A, B, C = "5.1.0", "5.2.0", "5.3.0"
COCO = "share/defaults/kata-containers/configuration-qemu-coco-dev.toml"


def _tarball(d, version: str, *, firmware: bool = True, verity: bool = True) -> str:
    """kata-static-<v> with QEMU firmware in share/kata-qemu/qemu (as configure-hypervisor.sh's
    --datadir installs it) and a measured-rootfs configuration carrying its image's root hash."""
    src = os.path.join(d, f"src-{version}")
    root = fx.build_tree(src, version, manifest=False)
    if firmware:
        q = os.path.join(root, "share/kata-qemu/qemu")
        os.makedirs(q)
        for n in ("bios-256k.bin", "linuxboot_dma.bin", "kvmvapic.bin"):
            with open(os.path.join(q, n), "w") as f:
                f.write(f"{n} of {version}\n")
    a = os.path.join(root, "share/kata-containers")
    with open(os.path.join(a, f"kata-ubuntu-{version}-confidential.img"), "wb") as f:
        f.write(b"CONF IMAGE " + version.encode())
    os.symlink(f"kata-ubuntu-{version}-confidential.img", os.path.join(a, "kata-containers-confidential.img"))
    kvp = f'kernel_verity_params = "{_hash(version)}"\n' if verity else ""
    with open(os.path.join(root, COCO), "w") as f:
        f.write('[hypervisor.qemu]\npath = "/opt/kata/bin/qemu-system-x86_64"\n'
                'kernel = "/opt/kata/share/kata-containers/vmlinux.container"\n'
                'image = "/opt/kata/share/kata-containers/kata-containers-confidential.img"\n'
                f"{kvp}confidential_guest = true\n\n[runtime]\nenable_pprof = false\n")
    fx.write_manifest(root)
    out = os.path.join(d, f"kata-static-{version}-amd64.tar.gz")
    with tarfile.open(out, "w:gz") as tf:
        tf.add(os.path.join(src, "opt"), arcname="./opt")
    return out


def _hash(version: str) -> str:
    return f"root_hash={hashlib.sha256(b'CONF IMAGE ' + version.encode()).hexdigest()},salt=00,data_blocks=1"


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tb"))
    return {A: _tarball(d, A), B: _tarball(d, B), C: _tarball(d, C, verity=False)}


@pytest.fixture
def node(tmp_path, cli, tarballs):
    n = tmp_path / "node"
    (n / "proc").mkdir(parents=True)
    for t in tarballs.values():
        _j(cli, n, "stage", t)
    return n


def _k(cli, node, *args):
    return cli(["--host-root", str(node), "upgrade", *args])


def _j(cli, node, *args):
    r = _k(cli, node, *args, "-o", "json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.json()


def _snapshot(node) -> dict:
    out = {}
    for d, dirs, files in os.walk(node):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[p] = os.readlink(p) if os.path.islink(p) else (None if os.path.isdir(p) else open(p, "rb").read())
    return out


# -- finding 1: QEMU's compiled-in datadir -----------------------------------------------------------
def test_switch_links_the_qemu_datadir_through_current_and_rollback_follows(cli, node):
    fw = node / "opt/kata/share/kata-qemu/qemu/bios-256k.bin"  # where kata-static's QEMU reads it
    before = _snapshot(node)
    d = _j(cli, node, "switch", A, "--dry-run")
    assert "link /opt/kata/share/kata-qemu -> ../current/share/kata-qemu" in d["steps"]
    assert _snapshot(node) == before  # a dry run changes nothing
    d = _j(cli, node, "switch", A)
    assert {"check": "QEMU data kata-qemu", "ok": True,
            "detail": "/opt/kata/share/kata-qemu -> ../current/share/kata-qemu (created by this switch)"} \
        in d["preflight"]
    assert os.readlink(node / "opt/kata/share/kata-qemu") == "../current/share/kata-qemu"
    assert fw.read_text() == f"bios-256k.bin of {A}\n"
    d = _j(cli, node, "switch", B)
    assert not any(s.startswith("link ") for s in d["steps"])  # the link is not touched again
    assert fw.read_text() == f"bios-256k.bin of {B}\n"
    _j(cli, node, "rollback")
    assert fw.read_text() == f"bios-256k.bin of {A}\n"
    st = _j(cli, node, "status")
    assert [(q["name"], q["state"]) for q in st["qemuData"]] == [("kata-qemu", "current")]
    assert "firmware" not in _k(cli, node, "status").stderr
    audit = [json.loads(x) for x in open(os.path.join(os.environ["XDG_STATE_HOME"], "katactl", "audit.log"))]
    first = [a for a in audit if a["action"] == "upgrade.switch" and a["result"] == "ok"][0]
    assert "link /opt/kata/share/kata-qemu -> ../current/share/kata-qemu" in first["done"]


def test_a_real_qemu_datadir_of_another_install_is_kept_and_warned(cli, node):
    """A node migrated from kata-deploy: /opt/kata/share/kata-qemu is that install's firmware,
    which its handlers may still need. The switch goes on, leaves it, and says so."""
    old = node / "opt/kata/share/kata-qemu/qemu"
    old.mkdir(parents=True)
    (old / "bios-256k.bin").write_text("kata-deploy's\n")
    d = _j(cli, node, "switch", A)
    row = [c for c in d["preflight"] if c["check"] == "QEMU data kata-qemu"][0]
    assert row["ok"] is True and row["warning"] is True and "real directory" in row["detail"]
    assert (old / "bios-256k.bin").read_text() == "kata-deploy's\n" and not (old.parent).is_symlink()
    r = _k(cli, node, "status")
    assert r.exit_code == 0 and "/opt/kata/share/kata-qemu/qemu (compiled in, not relocatable), a real directory" \
        in r.stderr
    assert _j(cli, node, "status")["qemuData"][0]["state"] == "directory"
    # once it is moved aside, the next switch links it
    (node / "opt/kata/share/kata-qemu").rename(node / "opt/kata/share/kata-qemu.kata-deploy")
    r = _k(cli, node, "status")
    assert "which does not exist: QEMU sandboxes cannot start" in r.stderr
    _j(cli, node, "switch", B)
    assert (node / "opt/kata/share/kata-qemu/qemu/bios-256k.bin").read_text() == f"bios-256k.bin of {B}\n"


# -- finding 3: kernel_verity_params move with the image -----------------------------------------------
def _live(node, release) -> dict:
    text = (node / "opt/kata/releases" / release / COCO).read_text()
    return {ln.split(" = ")[0]: ln.split(" = ", 1)[1].strip('"') for ln in text.splitlines() if " = " in ln}


def test_component_switches_carry_the_target_images_own_verity_params(cli, node):
    _j(cli, node, "switch", A)
    _j(cli, node, "switch", B, "-c", "agent")
    cfg = _live(node, A)
    assert cfg["image"].startswith(f"/opt/kata/releases/{B}/") and cfg["kernel_verity_params"] == _hash(B)
    _j(cli, node, "switch", C, "-c", "agent")  # C's image has no root hash: the line goes
    cfg = _live(node, A)
    assert cfg["image"].startswith(f"/opt/kata/releases/{C}/") and "kernel_verity_params" not in cfg
    assert cfg["confidential_guest"] == "true"
    _j(cli, node, "switch", B, "-c", "agent")  # and comes back, after the image line
    assert _live(node, A)["kernel_verity_params"] == _hash(B)
    # a runtime switch points A's own configuration at B's image and hash...
    _j(cli, node, "switch", B)
    _j(cli, node, "switch", A, "-c", "runtime")
    assert _live(node, A)["kernel_verity_params"] == _hash(B)
    # ...and switching A fully back restores A's own, from its release record
    _j(cli, node, "switch", A)
    cfg = _live(node, A)
    assert cfg["image"].startswith(f"/opt/kata/releases/{A}/") and cfg["kernel_verity_params"] == _hash(A)


def test_a_release_staged_without_recorded_verity_params(cli, node):
    """An older katactl's release record has no imageBound: the release's own configuration
    is used while it still names its own image; otherwise the switch is refused (exit 5)."""
    for v in (A, B):
        rec = node / "opt/kata/releases" / v / ".katactl-release.json"
        data = json.loads(rec.read_text())
        del data["imageBound"]
        rec.write_text(json.dumps(data))
    _j(cli, node, "switch", A)
    _j(cli, node, "switch", B, "-c", "agent")
    assert _live(node, A)["kernel_verity_params"] == _hash(B)
    _j(cli, node, "switch", B)
    _j(cli, node, "switch", A, "-c", "runtime")  # A's own file now names B's image
    r = _k(cli, node, "switch", A, "-c", "agent")
    assert r.exit_code == 5 and "kernel_verity_params" in r.stderr and "stage SOURCE --force" in r.stderr
    assert _live(node, A)["kernel_verity_params"] == _hash(B)  # nothing changed


@pytest.mark.parametrize("written", [
    'kernel_verity_params = """\n{v}"""',      # a multi-line basic string
    "kernel_verity_params = '''\n{v}'''",   # a multi-line literal string
    '"kernel_verity_params" = "{v}"',          # a quoted key
])
@pytest.mark.parametrize("target", [B, C])  # C's image has no root hash: the whole value goes
def test_an_agent_switch_replaces_the_whole_verity_value_however_it_is_written(cli, node, written, target):
    """Operators edit these files: a value on several lines, or a quoted key, is one key to
    TOML; the switch leaves a file the runtime parses, with the target image's own hash."""
    import tomllib

    _j(cli, node, "switch", A)
    cfg = node / "opt/kata/releases" / A / COCO
    cfg.write_text(cfg.read_text().replace(f'kernel_verity_params = "{_hash(A)}"', written.format(v=_hash(A))))
    assert tomllib.loads(cfg.read_text())["hypervisor"]["qemu"]["kernel_verity_params"] == _hash(A)
    _j(cli, node, "switch", target, "-c", "agent")
    qemu = tomllib.loads(cfg.read_text())["hypervisor"]["qemu"]
    assert qemu["image"].startswith(f"/opt/kata/releases/{target}/")
    assert qemu.get("kernel_verity_params") == ({B: _hash(B), C: None}[target])
    assert qemu["confidential_guest"] is True


def test_an_edit_that_would_not_be_the_intended_toml_is_an_error():
    """The line-level edit is checked against tomllib's parse of its result: a form it does
    not follow (here a quoted table name it cannot match to the parse) is an EditError,
    which the switch turns into a refusal before any rename (journal._agent_edits)."""
    from katactl.upgrade import configedit

    old = f'[hypervisor."qemu"]\nimage = "/opt/kata/releases/{A}/img"\nkernel_verity_params = "{_hash(A)}"\n'
    with pytest.raises(configedit.EditError, match="kernel_verity_params"):
        configedit.set_agent(old, lambda v: v.replace(A, B), lambda sec: {"kernel_verity_params": _hash(B)})


# -- finding 5: a handler without ConfigPath ----------------------------------------------------------
def test_status_warns_about_a_handler_without_config_path_unless_its_search_finds_current(cli, node):
    _j(cli, node, "switch", A)
    (node / "etc/containerd").mkdir(parents=True)
    cri = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
    (node / "etc/containerd/config.toml").write_text(
        f'version = 2\n[{cri}.kata]\nruntime_type = "io.containerd.kata.v2"\n'
        'runtime_path = "/opt/kata/current/bin/containerd-shim-kata-v2"\n')
    r = _k(cli, node, "status")
    assert r.exit_code == 0
    assert "runtime handler kata has no ConfigPath: its shim finds none of its compiled-in search paths " \
           "(/etc/kata-containers/configuration.toml, /opt/kata/share/defaults/kata-containers/configuration.toml)" \
        in r.stderr
    h = _j(cli, node, "status")["runtimeHandlers"][0]
    assert h["follows"] == "default-search" and h["reads"] is None
    etc = node / "etc/kata-containers"
    etc.mkdir(parents=True)
    (etc / "configuration.toml").write_text("[runtime]\n")  # a plain file: never switched
    assert "its shim reads /etc/kata-containers/configuration.toml" in _k(cli, node, "status").stderr
    (etc / "configuration.toml").unlink()  # a link into current follows every switch
    (etc / "configuration.toml").symlink_to("../../opt/kata/current/share/defaults/kata-containers/"
                                            "configuration-qemu.toml")
    r = _k(cli, node, "status")
    assert r.exit_code == 0 and "ConfigPath" not in r.stderr
    assert _j(cli, node, "status")["runtimeHandlers"][0]["readsFollows"] == "current"


def test_an_agent_switch_creates_a_missing_link_too(cli, node):
    _j(cli, node, "switch", A)
    (node / "opt/kata/share/kata-qemu").unlink()  # e.g. a node switched by an older katactl
    d = _j(cli, node, "switch", B, "-c", "agent")
    assert "link /opt/kata/share/kata-qemu -> ../current/share/kata-qemu" in d["steps"]
    assert (node / "opt/kata/share/kata-qemu/qemu/bios-256k.bin").read_text() == f"bios-256k.bin of {A}\n"


@pytest.mark.parametrize("component", ["all", "runtime", "agent"])
def test_switching_to_the_current_release_creates_its_missing_link(cli, node, component):
    """status says the next switch creates a missing link: a re-run of the switch to the
    release already current (a rollout resumed) does, and changes nothing else."""
    _j(cli, node, "switch", A)
    link = node / "opt/kata/share/kata-qemu"
    link.unlink()  # a node an older katactl switched
    assert "the next upgrade switch or rollback creates" in _k(cli, node, "status").stderr
    before = _snapshot(node)
    d = _j(cli, node, "switch", A, "-c", component, "--dry-run")
    assert d["changed"] and d["steps"] == ["link /opt/kata/share/kata-qemu -> ../current/share/kata-qemu"]
    assert _snapshot(node) == before
    d = _j(cli, node, "switch", A, "-c", component)
    assert d["changed"] and d["steps"] == ["link /opt/kata/share/kata-qemu -> ../current/share/kata-qemu"]
    assert (link / "qemu/bios-256k.bin").read_text() == f"bios-256k.bin of {A}\n"
    audit = [json.loads(ln) for ln in open(os.path.join(os.environ["XDG_STATE_HOME"], "katactl", "audit.log"))]
    assert audit[-1]["action"] == "upgrade.switch" and audit[-1]["changed"] is True
    d = _j(cli, node, "switch", A, "-c", component)  # converged
    assert not d["changed"] and d["steps"] == []


def test_the_link_leads_to_current_when_the_share_directory_is_a_symlink(cli, node):
    """<root>/share moved to another disk (a relative symlink, inside the node's tree): the
    kernel resolves the link's relative target from its real directory, so the target is
    written from there, and QEMU's compiled-in path reaches current's firmware."""
    (node / "data/kata-share").mkdir(parents=True)
    (node / "opt/kata/share").symlink_to("../../data/kata-share")
    step = "link /opt/kata/share/kata-qemu -> ../../opt/kata/current/share/kata-qemu"
    d = _j(cli, node, "switch", A, "--dry-run")
    assert step in d["steps"] and any(step[5:] in c["detail"] for c in d["preflight"])
    assert step in _j(cli, node, "switch", A)["steps"]
    fw = node / "opt/kata/share/kata-qemu/qemu/bios-256k.bin"
    assert fw.read_text() == f"bios-256k.bin of {A}\n"
    assert _j(cli, node, "status")["qemuData"][0]["state"] == "current"
    _j(cli, node, "switch", B)
    assert fw.read_text() == f"bios-256k.bin of {B}\n"


def test_an_absolute_share_symlink_is_followed_in_the_nodes_tree_under_a_host_root(cli, node, tmp_path):
    """<root>/share -> /elsewhere/share in the node's tree is the node's /elsewhere/share under
    --host-root too (it resolves inside the root, as on the node): the firmware link is made
    there, and nothing at this host's /elsewhere/share (before: no link at all, status warned,
    since this host's kernel would have followed it to *this* host's directory)."""
    outside = tmp_path / "this-host" / "share"
    (node / "opt/kata/share").symlink_to(outside)
    (node / str(outside).lstrip("/")).mkdir(parents=True)
    d = _j(cli, node, "switch", A)
    assert not outside.exists() and any(s.startswith("link ") for s in d["steps"])
    assert (node / str(outside).lstrip("/") / "kata-qemu").is_symlink()
    assert _j(cli, node, "status")["qemuData"][0]["state"] == "current"


# -- what a containerd handler pins: its configuration's guest assets, its shim found on PATH ---------
CRI = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'


def test_gc_and_stage_force_keep_the_release_whose_assets_a_pinned_configuration_names(cli, node, tarballs):
    """A handler pinned to release A's configuration, which an agent switch pointed at B's
    image and kernel: gc keeps B too (the pinned handler's next pod boots B's image), and
    stage --force refuses to replace B (exit 5)."""
    _j(cli, node, "switch", A)
    _j(cli, node, "switch", B, "-c", "agent")  # A's configurations now name B's guest assets
    _j(cli, node, "switch", C)
    pinned = f"/opt/kata/releases/{A}/{COCO}"
    (node / "etc/containerd").mkdir(parents=True)
    (node / "etc/containerd/config.toml").write_text(
        f'version = 2\n[{CRI}.kata-pinned]\nruntime_type = "io.containerd.kata.v2"\n'
        f'runtime_path = "/opt/kata/releases/{A}/bin/containerd-shim-kata-v2"\n'
        f'[{CRI}.kata-pinned.options]\nConfigPath = "{pinned}"\n')
    assert _j(cli, node, "status")["runtimeHandlers"][0]["assetReleases"] == [B]
    d = _j(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == [] and {k["version"]: k["reason"] for k in d["kept"]} == {
        A: "pinned by containerd handler kata-pinned", B: "pinned by containerd handler kata-pinned",
        C: "current runtime"}
    assert (node / f"opt/kata/releases/{B}/share/kata-containers/kata-containers-confidential.img").exists()
    r = _k(cli, node, "stage", tarballs[C], "--as", B, "--force")
    assert r.exit_code == 5 and f"release {B} is pinned by containerd handler kata-pinned" in r.stderr


def test_a_handler_without_runtime_path_pins_the_shim_containerd_finds_on_its_path(cli, node, tarballs):
    """runtime_type io.containerd.kata.v2 and no runtime_path: containerd starts
    containerd-shim-kata-v2 from its PATH, here a link into release A. gc keeps A, stage
    --force refuses it, and status warns that a switch does not change that shim."""
    _j(cli, node, "switch", A)
    _j(cli, node, "switch", B)
    (node / "usr/local/bin").mkdir(parents=True)
    shim = node / "usr/local/bin/containerd-shim-kata-v2"
    shim.symlink_to(f"/opt/kata/releases/{A}/bin/containerd-shim-kata-v2")
    (node / "etc/containerd").mkdir(parents=True)
    (node / "etc/containerd/config.toml").write_text(
        f'version = 2\n[{CRI}.kata]\nruntime_type = "io.containerd.kata.v2"\n'
        f'[{CRI}.kata.options]\nConfigPath = "/opt/kata/current/share/defaults/kata-containers/configuration-qemu.toml"\n')
    h = _j(cli, node, "status")["runtimeHandlers"][0]
    assert (h["shimPath"], h["shimFollows"], h["runtimeRelease"]) == \
        ("/usr/local/bin/containerd-shim-kata-v2", "release", A)
    assert "runtime handler kata has no runtime_path: containerd starts /usr/local/bin/containerd-shim-kata-v2 " \
           f"(found on its PATH), which leads to release {A} only" in _k(cli, node, "status").stderr
    d = _j(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == [C] and {k["version"]: k["reason"] for k in d["kept"]}[A] == \
        "pinned by containerd handler kata"
    assert os.path.exists(str(node) + os.readlink(shim))
    r = _k(cli, node, "stage", tarballs[C], "--as", A, "--force")
    assert r.exit_code == 5 and f"release {A} is pinned by containerd handler kata" in r.stderr
    shim.unlink()  # linked through current: follows every switch, pins nothing, no warning
    shim.symlink_to("/opt/kata/current/bin/containerd-shim-kata-v2")
    assert "runtime_path" not in _k(cli, node, "status").stderr
    assert _j(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == [A]
