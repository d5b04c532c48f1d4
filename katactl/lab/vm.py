"""Real QEMU micro-VMs for the lab.

- a Debian cloud kernel fetched with ``apt-get download`` (cached under
  ``$XDG_CACHE_HOME/katactl/lab``), or a kernel given with ``--kernel``;
- the kernel modules the guest needs (``virtio_balloon``, ``pvpanic-mmio`` and
  their dependencies, read from each module's ``.modinfo``), extracted from the
  same package with ``dpkg-deb -x``;
- a busybox initramfs written here in the cpio "newc" format: its init loads
  the modules, sets ``kernel.unknown_nmi_panic=1`` (so QMP ``inject-nmi``
  panics the guest) and idles;
- the QEMU argv Kata uses for these features: ``-name sandbox-<id>`` (``,debug-threads=on``,
  which names the vCPU threads ``CPU <n>/TCG``, only where asked: Kata adds it only with
  ``enable_debug = true``, kata-containers src/runtime/pkg/govmm/qemu/qemu.go ``appendName``),
  ``virtio-balloon-pci`` as
  ``balloon0`` with deflate-on-oom and free-page-reporting, ``pvpanic`` with
  ``-no-shutdown``, ``qmp.sock`` plus ``extra-monitor.sock``, TCG.
"""
from __future__ import annotations

import dataclasses
import fcntl
import glob
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile

from katactl.errors import OperationFailed

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "/bin/busybox"
READY_MARK = "KATACTL_LAB_READY"
#: modules the guest loads, in dependency order (deps are added automatically)
GUEST_MODULES = ("virtio_pci", "virtio_balloon", "pvpanic-mmio", "pvpanic-pci")


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "katactl", "lab")


@dataclasses.dataclass
class GuestAssets:
    kernel: str
    initrd: str
    kernel_version: str
    modules: list[str]


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


# -- kernel -----------------------------------------------------------------
def _run(argv, cwd=None, timeout=300) -> str:
    try:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise OperationFailed(f"{argv[0]}: not installed") from None
    except subprocess.TimeoutExpired:
        raise OperationFailed(f"{' '.join(argv)}: did not finish within {timeout}s") from None
    if p.returncode != 0:
        raise OperationFailed(f"{' '.join(argv)} failed: {p.stderr.decode(errors='replace').strip()[-400:]}")
    return p.stdout.decode(errors="replace")


def _kernel_package() -> str:
    """linux-image-<ver>-cloud-amd64, the package the meta package points to."""
    out = _run(["apt-cache", "depends", KERNEL_META], timeout=60)
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise OperationFailed(f"apt-cache depends {KERNEL_META}: no kernel package found "
                          "(is the Debian archive in the apt sources? run apt-get update)")


def fetch_kernel(cache: str | None = None) -> tuple[str, str]:
    """(vmlinuz path, modules dir) of the Debian cloud kernel, downloading it once."""
    cache = cache or cache_dir()
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        found = _cached_kernel(cache)
        if found:
            return found
        pkg = _kernel_package()
        with tempfile.TemporaryDirectory(dir=cache, prefix=".dl-") as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt user must be able to write here when root
            _run(["apt-get", "download", pkg], cwd=tmp)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if not debs:
                raise OperationFailed(f"apt-get download {pkg}: no .deb produced")
            x = os.path.join(tmp, "x")
            _run(["dpkg-deb", "-x", debs[0], x])
            vmlinuz = glob.glob(os.path.join(x, "boot", "vmlinuz-*"))
            mods = glob.glob(os.path.join(x, "lib", "modules", "*"))
            if not vmlinuz or not mods:
                raise OperationFailed(f"{pkg}: no vmlinuz or modules in the package")
            kver = os.path.basename(mods[0])
            dest = os.path.join(cache, kver)
            os.makedirs(dest + ".tmp", exist_ok=True)
            shutil.copy2(vmlinuz[0], os.path.join(dest + ".tmp", "vmlinuz"))
            wanted = resolve_modules(mods[0], GUEST_MODULES)
            os.makedirs(os.path.join(dest + ".tmp", "modules"), exist_ok=True)
            for name, path in wanted:
                shutil.copy2(path, os.path.join(dest + ".tmp", "modules", name + ".ko"))
            with open(os.path.join(dest + ".tmp", "modules", "order"), "w") as f:
                f.write("".join(n + "\n" for n, _ in wanted))
            if os.path.exists(dest):
                shutil.rmtree(dest)
            os.rename(dest + ".tmp", dest)
        found = _cached_kernel(cache)
        assert found
        return found


def _cached_kernel(cache: str) -> tuple[str, str] | None:
    for d in sorted(glob.glob(os.path.join(cache, "*-cloud-amd64")), reverse=True):
        k, m = os.path.join(d, "vmlinuz"), os.path.join(d, "modules")
        try:
            with open(os.path.join(m, "order")) as f:
                have = {n.strip().replace("-", "_") for n in f}
        except FileNotFoundError:
            continue
        if os.path.isfile(k) and all(n.replace("-", "_") in have for n in GUEST_MODULES):
            return k, m
    return None


def _modinfo(path: str) -> dict[str, str]:
    """key=value pairs of a .ko's .modinfo section (what modinfo(8) prints)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x28\xb5" or data[:3] == b"\xfd7z":
        raise OperationFailed(f"{path}: compressed modules are not supported")
    out: dict[str, str] = {}
    for m in re.finditer(rb"(?:(?<=\0)|^)(name|depends|vermagic)=([^\0]*)\0", data):
        out.setdefault(m.group(1).decode(), m.group(2).decode(errors="replace"))
    return out


def resolve_modules(moddir: str, names) -> list[tuple[str, str]]:
    """[(name, path)] for names and their dependencies, dependencies first."""
    index: dict[str, str] = {}
    for p in glob.glob(os.path.join(moddir, "**", "*.ko"), recursive=True):
        n = os.path.basename(p)[:-3]
        index[n] = p
        index[n.replace("-", "_")] = p
    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(n: str, depth=0):
        key = n.replace("-", "_")
        if key in seen:
            return
        if depth > 20 or key not in index:
            raise OperationFailed(f"kernel module {n} not found under {moddir}")
        seen.add(key)
        deps = _modinfo(index[key]).get("depends", "")
        for d in filter(None, deps.split(",")):
            visit(d, depth + 1)
        order.append((os.path.basename(index[key])[:-3], index[key]))

    for n in names:
        visit(n)
    return order


# -- initramfs ----------------------------------------------------------------
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/order 2>/dev/null); do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "katactl-lab: insmod $m failed"
done
echo 1 > /proc/sys/kernel/unknown_nmi_panic
echo 1 > /proc/sys/kernel/panic_on_oops
echo "katactl-lab: balloon=$(ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -c virtio) pvpanic=$(ls /sys/bus/platform/drivers/pvpanic-mmio 2>/dev/null | grep -c QEMU)"
echo %s
while :; do sleep 3600; done
""" % READY_MARK


class _Newc:
    """Minimal cpio newc writer (what the kernel unpacks as an initramfs)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1):
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join("%08X" % v for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * ((4 - (110 + len(nameb)) % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - len(data) % 4) % 4))

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name, data: bytes, perm=0o644):
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(dest: str, modules_dir: str | None) -> list[str]:
    """Write the initramfs to dest; return the module names it will load."""
    if not os.path.exists(BUSYBOX):
        raise OperationFailed(f"{BUSYBOX} not found: install busybox-static")
    c = _Newc()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        c.dir(d)
    with open(BUSYBOX, "rb") as f:
        c.file("bin/busybox", f.read(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", INIT_SCRIPT.encode(), 0o755)
    names: list[str] = []
    if modules_dir and os.path.isfile(os.path.join(modules_dir, "order")):
        with open(os.path.join(modules_dir, "order")) as f:
            names = [n.strip() for n in f if n.strip()]
        for n in names:
            with open(os.path.join(modules_dir, n + ".ko"), "rb") as f:
                c.file(f"lib/modules/{n}.ko", f.read())
        c.file("lib/modules/order", "".join(n + "\n" for n in names).encode())
    data = c.finish()
    tmp = dest + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, dest)
    return names


def prepare_assets(workdir: str, kernel: str | None = None, modules_dir: str | None = None) -> GuestAssets:
    """Kernel (fetched or given) + a fresh initramfs in workdir."""
    if kernel:
        if not os.path.isfile(kernel):
            raise OperationFailed(f"--kernel {kernel}: " + ("not a file" if os.path.exists(kernel) else "no such file"))
        kver = os.path.basename(kernel)
    else:
        kernel, modules_dir = fetch_kernel()
        kver = os.path.basename(os.path.dirname(kernel))
    os.makedirs(workdir, exist_ok=True)
    initrd = os.path.join(workdir, "initramfs.cpio")
    names = build_initramfs(initrd, modules_dir)
    return GuestAssets(kernel=kernel, initrd=initrd, kernel_version=kver, modules=names)


# -- QEMU -----------------------------------------------------------------------
def qemu_argv(assets: GuestAssets, vm_dir: str, *, name: str, memory_mib: int = 512,
              balloon: bool = True, pvpanic: bool = True, extra_monitor: bool = True,
              debug_threads: bool = False, qemu: str | None = None) -> list[str]:
    """The QEMU command line of one lab micro-VM (sockets and logs in vm_dir)."""
    qemu = qemu or qemu_binary() or "qemu-system-x86_64"
    argv = [
        # as Kata's Go runtime: debug-threads=on (its enable_debug) names the vCPU threads
        # "CPU <n>/TCG" (or /KVM); without it they keep QEMU's own comm
        qemu, "-name", f"sandbox-{name}" + (",debug-threads=on" if debug_threads else ""), "-uuid", _uuid_for(name),
        "-machine", "pc", "-accel", "tcg", "-cpu", "qemu64",
        "-m", f"{memory_mib}M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-vga", "none", "-net", "none",
        "-kernel", assets.kernel, "-initrd", assets.initrd,
        "-append", "console=ttyS0 panic=0 loglevel=4 tsc=reliable no_timer_check "
                   "i8042.noaux i8042.nokbd i8042.nopnp noreplace-smp",
        "-serial", f"file:{os.path.join(vm_dir, 'console.log')}",
        "-qmp", f"unix:{os.path.join(vm_dir, 'qmp.sock')},server=on,wait=off",
        "-pidfile", os.path.join(vm_dir, "pid"),
    ]
    if extra_monitor:
        argv += ["-qmp", f"unix:{os.path.join(vm_dir, 'extra-monitor.sock')},server=on,wait=off"]
    if balloon:
        argv += ["-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on"]
    if pvpanic:
        argv += ["-device", "pvpanic", "-no-shutdown"]
    return argv


def _uuid_for(name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, "katactl-lab:" + name))


def console_ready(vm_dir: str) -> bool:
    try:
        with open(os.path.join(vm_dir, "console.log"), "rb") as f:
            return READY_MARK.encode() in f.read()
    except FileNotFoundError:
        return False
