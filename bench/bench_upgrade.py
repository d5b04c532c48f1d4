"""Bench: `katactl upgrade stage` of a kata-static-sized tarball vs GNU tar.

Reference, one shell process: `tar -xf` (the way kata-deploy installs a release),
`sync -f` (katactl fsyncs every file) and the fastest SHA-256 here (`openssl dgst
-sha256`, not coreutils sha256sum: 4x slower on this CPU) of the tarball (katactl
hashes it for the release record). katactl additionally validates every member
in a first pass, which reads (and decompresses) the archive twice. Both timed as
whole processes, runs interleaved; peak RSS of the process (GNU time; katactl
streams each member through a 1 MiB buffer: its peak does not grow with file sizes).

Usage: .venv/bin/python bench/bench_upgrade.py [--runs 3] [--write] [--smoke]
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
from bench._util import KATACTL, context, fastest_sha256, precompile, require, write_section  # noqa: E402
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
    import argparse

    global IMAGE_MB, KERNEL_MB, SMALL_FILES
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a 2 MiB release, one run, nothing written")
    a = ap.parse_args()
    require("tar", "zstd", "gzip", "sync", "/usr/bin/time")
    if a.smoke:
        IMAGE_MB, KERNEL_MB, SMALL_FILES = 1, 1, 10
    runs, warmup = (1, 0) if a.smoke else (a.runs, 1)
    pre = None if a.smoke else precompile()
    sha = fastest_sha256()
    work = tempfile.mkdtemp(prefix="bench-upgrade-", dir="/var/tmp")
    env = dict(os.environ, KATACTL_AUDIT_LOG=os.path.join(work, "audit.log"), NO_COLOR="1")
    try:
        build(os.path.join(work, "tree"))
        rows = []
        for comp, tar_flag in (("zst", "--zstd"), ("gz", "-z")):
            tb = os.path.join(work, f"kata-static-3.99.0-amd64.tar.{comp}")
            subprocess.run(["tar", "-C", os.path.join(work, "tree"), "-c", tar_flag, "-f", tb, "."],
                           check=True)
            size = os.path.getsize(tb) / (1 << 20)
            k, r = [], []
            for i in range(warmup + runs):   # a warm-up round, then interleaved: katactl, then the reference
                node = os.path.join(work, f"node-{comp}-{i}")
                os.makedirs(node)  # --host-root must exist
                kt = run([*KATACTL, "--host-root", node, "upgrade", "stage", tb, "--reserve", "0"], env=env)
                dest = os.path.join(work, f"ref-{comp}-{i}")
                os.makedirs(dest)
                ref = f'tar -C "$1" -x {tar_flag} -f "$2" && sync -f "$1" && {" ".join(sha)} "$2" >/dev/null'
                rt = run(["sh", "-c", ref, "sh", dest, tb])
                if i >= warmup:
                    k.append(kt)
                    r.append(rt)
                shutil.rmtree(node)
                shutil.rmtree(dest)
            km, rm = statistics.median(x[0] for x in k), statistics.median(x[0] for x in r)
            rows.append((comp, size, km, max(x[1] for x in k), rm, max(x[1] for x in r)))
        if a.smoke:
            print(f"bench_upgrade smoke ok: {len(rows)} tarballs")
            return
        lines = ["## Upgrade stage — bench/bench_upgrade.py", "",
                 f"kata-static-like release: {IMAGE_MB} MiB image, {KERNEL_MB} MiB kernel, {SMALL_FILES + 20} "
                 f"files, on /var/tmp; median of {runs} interleaved runs after a warm-up round, whole processes; {context(pre)}. "
                 f"Reference, one shell: `tar -x` + `sync -f` + `{' '.join(sha)}` of the tarball (the fastest "
                 "SHA-256 here; coreutils sha256sum is ~4x slower on this CPU).", "",
                 f"| tarball | MiB | katactl stage s | katactl peak RSS MiB | tar -x + sync + {sha[0]} s "
                 "| reference peak RSS MiB | ratio |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for comp, size, km, kr, rm, rr in rows:
            lines.append(f"| .tar.{comp} | {size:.0f} | {km:.2f} | {kr} | {rm:.2f} | {rr} | {km / rm:.2f}x |")
        lines += ["", "katactl decompresses twice (validate everything before writing anything), fsyncs "
                  "each file and streams every member through a 1 MiB buffer (peak RSS does not grow with "
                  "the release's file sizes)."]
        text = "\n".join(lines) + "\n"
        print(text)
        if a.write:
            write_section(text, "bench/bench_upgrade.py")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
