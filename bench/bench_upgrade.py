"""Bench: `katactl upgrade stage` of a kata-static-sized tarball vs GNU tar.

Reference: `tar -xf` (the way kata-deploy installs a release) followed by `sync`
(katactl fsyncs every file), and `sha256sum` of the tarball (katactl hashes it
for the release record). katactl additionally validates every member in a
first pass, which reads (and decompresses) the archive twice. Wall-clock
median of 3 runs and the peak RSS of the process (katactl streams each member
through a 1 MiB buffer: its peak does not grow with the file sizes).

Usage: .venv/bin/python bench/bench_upgrade.py  (markdown on stdout)
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import KATACTL  # noqa: E402
from tests import upgrade_fixtures as fx  # noqa: E402

IMAGE_MB, KERNEL_MB, SMALL_FILES = 96, 12, 400


def build(base: str) -> str:
    root = fx.build_tree(base, "3.99.0", manifest=False)
    assets = os.path.join(root, "share", "kata-containers")
    for name, mb in (("kata-ubuntu-3.99.0.img", IMAGE_MB), ("vmlinux-6.1.62-3.99.0", KERNEL_MB)):
        with open(os.path.join(assets, name), "wb") as f:
            for i in range(mb * 16):  # half random, half zeros: compresses like a real image
                f.write(os.urandom(1 << 16) if i % 2 else bytes(1 << 16))
    lib = os.path.join(root, "libexec", "misc")
    os.makedirs(lib)
    for i in range(SMALL_FILES):
        with open(os.path.join(lib, f"f{i:04d}"), "wb") as f:
            f.write(os.urandom(2048))
    fx.write_manifest(root)
    return root


def run(argv, env=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) measured by GNU time (a fork of this
    interpreter would inherit its RSS into ru_maxrss)."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss=%M", *argv], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t
    err = p.stderr.decode()
    if p.returncode != 0:
        raise SystemExit(f"failed: {argv}: {err[-400:]}")
    kb = int(err.rsplit("maxrss=", 1)[1].split()[0])
    return dt, kb // 1024


def main() -> None:
    work = tempfile.mkdtemp(prefix="bench-upgrade-")
    try:
        build(os.path.join(work, "tree"))
        rows = []
        for comp, tar_flag in (("zst", "--zstd"), ("gz", "-z")):
            tb = os.path.join(work, f"kata-static-3.99.0-amd64.tar.{comp}")
            subprocess.run(["tar", "-C", os.path.join(work, "tree"), "-c", tar_flag, "-f", tb, "."],
                           check=True)
            size = os.path.getsize(tb) >> 20
            k, r = [], []
            for i in range(3):
                node = os.path.join(work, f"node-{comp}-{i}")
                k.append(run([*KATACTL, "--host-root", node, "upgrade", "stage", tb, "--reserve", "0"],
                             env=dict(os.environ, KATACTL_AUDIT_LOG=os.path.join(work, "audit.log"))))
                dest = os.path.join(work, f"ref-{comp}-{i}")
                os.makedirs(dest)
                t = time.perf_counter()
                a = run(["tar", "-C", dest, "-x", tar_flag, "-f", tb])
                b = run(["sync", "-f", dest])
                c = run(["sha256sum", tb])
                r.append((time.perf_counter() - t, max(a[1], b[1], c[1])))
                shutil.rmtree(node)
                shutil.rmtree(dest)
            km, rm = statistics.median(x[0] for x in k), statistics.median(x[0] for x in r)
            rows.append((comp, size, km, max(x[1] for x in k), rm, max(x[1] for x in r)))
        print("## Upgrade stage — bench/bench_upgrade.py\n")
        print(f"kata-static-like release: {IMAGE_MB} MiB image, {KERNEL_MB} MiB kernel, "
              f"{SMALL_FILES + 20} files; median of 3 runs, same machine, same run.\n")
        print("| tarball | MiB | katactl stage s | katactl peak RSS MiB | tar -x + sync + sha256sum s "
              "| reference peak RSS MiB | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for comp, size, km, kr, rm, rr in rows:
            print(f"| .tar.{comp} | {size} | {km:.2f} | {kr} | {rm:.2f} | {rr} | {km / rm:.2f}x |")
        print("\nkatactl decompresses twice (validate everything before writing anything), fsyncs "
              "each file and streams every member through a 1 MiB buffer (peak RSS does not grow with "
              "the release's file sizes).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
