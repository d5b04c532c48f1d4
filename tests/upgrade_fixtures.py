"""Builders for kata-static style release trees and tarballs (upgrade tests, benches).

A release tree looks like kata-static's ``opt/kata``:

    opt/kata/bin/containerd-shim-kata-v2      a copy of this Python interpreter
    opt/kata/bin/qemu-system-x86_64           another copy (the "hypervisor")
    opt/kata/bin/kata-runtime                 a /bin/sh script answering --version / check
    opt/kata/share/kata-containers/vmlinux-6.1.62-<v>, vmlinux.container -> it
    opt/kata/share/kata-containers/kata-ubuntu-<v>.img, kata-containers.img -> it
    opt/kata/share/kata-containers/kata-alpine-<v>-initrd.img, kata-containers-initrd.img -> it
    opt/kata/share/defaults/kata-containers/configuration-{qemu,clh}.toml, configuration.toml -> qemu

The interpreter copies are real ELF executables living in the release, so a
process started from them has /proc/PID/exe inside the release; with
PYTHONHOME set they run any ``-c`` program (see ``start_standin``).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile

QEMU_TOML = """\
# Copyright (c) 2017-2019 Intel Corporation
# kata-static configuration-qemu.toml (abridged)
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel = "/opt/kata/share/kata-containers/vmlinux.container"
image = "/opt/kata/share/kata-containers/kata-containers.img"
machine_type = "q35"
valid_hypervisor_paths = ["/opt/kata/bin/qemu-system-x86_64"]
kernel_params = ""
default_vcpus = 1
default_memory = 2048
# initrd = "/opt/kata/share/kata-containers/kata-containers-initrd.img"

[agent.kata]
dial_timeout = 45

[runtime]
enable_pprof = false
"""

CLH_TOML = """\
[hypervisor.clh]
path = "/opt/kata/bin/cloud-hypervisor"
kernel = "/opt/kata/share/kata-containers/vmlinux.container"
initrd = "/opt/kata/share/kata-containers/kata-containers-initrd.img"
valid_hypervisor_paths = ["/opt/kata/bin/cloud-hypervisor"]

[runtime]
internetworking_model = "tcfilter"
"""

RUNTIME_SH = """#!/bin/sh
case "$1" in
  --version) echo "kata-runtime  : {v}"; echo "   commit   : 0000"; exit 0;;
  check) echo "No newer release available"; exit 0;;
esac
exit 2
"""


def _python_exe() -> str:
    return os.path.realpath(sys.executable)


def build_tree(base: str, version: str, *, manifest: bool = True, version_file: bool = False,
               broken_runtime: bool = False) -> str:
    """Create ``<base>/opt/kata`` for ``version``; returns the opt/kata path."""
    root = os.path.join(base, "opt", "kata")
    bin_ = os.path.join(root, "bin")
    assets = os.path.join(root, "share", "kata-containers")
    cfg = os.path.join(root, "share", "defaults", "kata-containers")
    for d in (bin_, assets, cfg, os.path.join(root, "libexec")):
        os.makedirs(d, exist_ok=True)
    for name in ("containerd-shim-kata-v2", "qemu-system-x86_64", "cloud-hypervisor"):
        shutil.copy2(_python_exe(), os.path.join(bin_, name))
    with open(os.path.join(bin_, "kata-runtime"), "w") as f:
        f.write("#!/bin/sh\nexit 1\n" if broken_runtime else RUNTIME_SH.format(v=version))
    os.chmod(os.path.join(bin_, "kata-runtime"), 0o755)
    files = {
        f"vmlinux-6.1.62-{version}": b"KERNEL " + version.encode() + b"\n" + os.urandom(4096),
        f"kata-ubuntu-{version}.img": b"IMAGE " + version.encode() + b"\n" + os.urandom(8192),
        f"kata-alpine-{version}-initrd.img": b"INITRD " + version.encode() + b"\n" + os.urandom(2048),
    }
    for n, data in files.items():
        with open(os.path.join(assets, n), "wb") as f:
            f.write(data)
    for link, target in (("vmlinux.container", f"vmlinux-6.1.62-{version}"),
                         ("kata-containers.img", f"kata-ubuntu-{version}.img"),
                         ("kata-containers-initrd.img", f"kata-alpine-{version}-initrd.img")):
        os.symlink(target, os.path.join(assets, link))
    with open(os.path.join(cfg, "configuration-qemu.toml"), "w") as f:
        f.write(QEMU_TOML)
    with open(os.path.join(cfg, "configuration-clh.toml"), "w") as f:
        f.write(CLH_TOML)
    os.symlink("configuration-qemu.toml", os.path.join(cfg, "configuration.toml"))
    if version_file:
        with open(os.path.join(root, "VERSION"), "w") as f:
            f.write(version + "\n")
    if manifest:
        write_manifest(root)
    return root


def write_manifest(root: str, name: str = "SHA256SUMS") -> None:
    lines = []
    for d, _dirs, fs in os.walk(root):
        for n in sorted(fs):
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p) or rel == name:
                continue
            with open(p, "rb") as f:
                lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  ./{rel}")
    with open(os.path.join(root, name), "w") as f:
        f.write("\n".join(sorted(lines, key=lambda x: x.split()[1])) + "\n")


def make_tarball(base: str, version: str, out_dir: str, *, compression: str = "xz",
                 name: str | None = None, gnu_tar: bool = False, **kw) -> str:
    """kata-static-<v>-amd64.tar.<comp> with ./opt/kata/... members."""
    tree = os.path.join(base, f"tree-{version}-{compression}")
    build_tree(tree, version, **kw)
    name = name or f"kata-static-{version}-amd64.tar" + ("" if compression == "tar" else f".{compression}")
    out = os.path.join(out_dir, name)
    if gnu_tar:  # like kata's release build: tar -C destdir -cJf tarball .  (a "./" member first)
        flag = {"xz": "-J", "gz": "-z", "tar": ""}[compression]
        subprocess.run(["tar", "-C", tree, "-c", *([flag] if flag else []), "-f", out, "."], check=True)
    elif compression == "zst":
        plain = out + ".tmp.tar"
        with tarfile.open(plain, "w") as tf:
            tf.add(os.path.join(tree, "opt"), arcname="./opt")
        subprocess.run(["zstd", "-q", "-f", "--rm", plain, "-o", out], check=True)
    else:
        mode = "w" if compression == "tar" else f"w:{compression}"
        with tarfile.open(out, mode) as tf:
            tf.add(os.path.join(tree, "opt"), arcname="./opt")
    return out


def _dir_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    return ti


def evil_tarball(path: str, kind: str) -> str:
    """A tarball that must be refused; ``kind`` names the attack."""
    def add_file(tf, name, data=b"x", mode=0o644):
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = mode
        tf.addfile(ti, io.BytesIO(data))

    def add_link(tf, name, target, typ=tarfile.SYMTYPE):
        ti = tarfile.TarInfo(name)
        ti.type = typ
        ti.linkname = target
        tf.addfile(ti)

    with tarfile.open(path, "w:gz") as tf:
        add_file(tf, "./opt/kata/bin/containerd-shim-kata-v2", b"#!/bin/sh\n", 0o755)
        if kind == "dotdot":
            add_file(tf, "./opt/kata/../../../../tmp/katactl-pwned", b"pwned")
        elif kind == "absolute":
            add_file(tf, "/tmp/katactl-pwned-abs", b"pwned")
        elif kind == "symlink-escape":
            add_link(tf, "./opt/kata/share/evil", "../../../../../../etc")
        elif kind == "symlink-absolute":
            add_link(tf, "./opt/kata/share/evil", "/etc/passwd")
        elif kind == "symlink-write-through":
            add_link(tf, "./opt/kata/share", ".")
            add_file(tf, "./opt/kata/share/x", b"through")
        elif kind == "symlink-chain":
            add_link(tf, "./opt/kata/a", ".")
            add_link(tf, "./opt/kata/b", "a/../x")
        elif kind == "file-then-dir":  # reported ENOTDIR on a .staging temp path
            add_file(tf, "./opt/kata/share/x", b"file")
            ti = tarfile.TarInfo("./opt/kata/share/x")
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
            add_file(tf, "./opt/kata/share/x/y", b"under")
        elif kind == "file-then-child":
            add_file(tf, "./opt/kata/share/x", b"file")
            add_file(tf, "./opt/kata/share/x/y", b"under")
        elif kind == "symlink-doubling":  # l_i -> l_{i-1}/../l_{i-1}: 2^n steps to resolve naively
            tf.addfile(_dir_info("./opt/kata/share/l0"))
            for i in range(1, 60):
                add_link(tf, f"./opt/kata/share/l{i}", f"l{i - 1}/../l{i - 1}")
        elif kind == "deep-path":  # ended in 'unexpected RecursionError'
            add_file(tf, "./opt/kata/share/" + "d/" * 2000 + "f", b"deep")
        elif kind == "hardlink-escape":
            add_link(tf, "./opt/kata/bin/passwd", "/etc/passwd", tarfile.LNKTYPE)
        elif kind == "device":
            ti = tarfile.TarInfo("./opt/kata/bin/null")
            ti.type = tarfile.CHRTYPE
            ti.devmajor, ti.devminor = 1, 3
            tf.addfile(ti)
        elif kind == "fifo":
            ti = tarfile.TarInfo("./opt/kata/bin/fifo")
            ti.type = tarfile.FIFOTYPE
            tf.addfile(ti)
        else:
            raise ValueError(kind)
    return path


STANDIN_CODE = r"""
import mmap, os, sys, time
paths = [a for a in sys.argv[1:] if a.startswith('/') and os.path.isfile(a)]
keep = []
for p in paths:
    f = open(p, 'rb')
    keep.append(f)
    try:
        keep.append(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
    except (ValueError, OSError):
        pass
print('ready', flush=True)
while True:
    time.sleep(3600)
"""


def start_standin(exe: str, *args: str) -> subprocess.Popen:
    """Run a release's interpreter copy as a long-lived stand-in that maps the
    files given as absolute-path args (kernel, image). Waits until it is up."""
    env = dict(os.environ, PYTHONHOME=sys.base_prefix, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    p = subprocess.Popen([exe, "-S", "-c", STANDIN_CODE, *args], stdout=subprocess.PIPE, env=env)
    line = p.stdout.readline()
    assert line.strip() == b"ready", f"stand-in {exe} did not start"
    return p
