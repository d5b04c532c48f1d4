"""Collecting a >= 1 GiB vmcore locally with katactl, against cp of the same file.

Same run, same machine, warm page cache for both. The dump is QEMU-like: a
fully allocated ELF core (QEMU writes zero pages too), ~30 % of its 1 MiB
blocks random data, the rest zeros. Measured with /usr/bin/time -v (wall
clock, peak RSS) on real processes:

- ``cp SRC DST`` and ``cp SRC DST && sync -f DST`` (katactl fsyncs before it
  renames the verified copy into place, so the second is the like-for-like);
- ``katactl --host-root ROOT vmcore collect --to DIR`` (streams, hashes,
  verifies, writes the manifest, fsyncs);
- compressed: ``--compress gzip`` / ``--compress zstd`` against ``gzip -c -1 -n`` /
  ``zstd -q -c -3 -T1`` of the same file under ``ionice -c3 nice -n 19``: the command and
  priority katactl runs on the node (here: this machine, --host-root;
  katactl/vmcore/collection.py NODE_COMPRESSOR), so both compress on one idle core;
- over SSH (one real sshd on loopback): against ``scp``; and ``--compress zstd``
  compressed on the node (``--compress-on node``: ``zstd -3 -T1`` under
  ionice/nice there, decompressed here to hash the original) against compressed
  here (``--compress-on local``), with ``ssh node zstd -3 -T1 -c FILE > out`` as
  the OpenSSH reference; bytes over the wire are the dump's payload bytes
  katactl received (``transferredBytes`` in its JSON; SSH framing adds ~1 %).

Equal work (issue 17): the dump is 70 % zeros and katactl writes them as holes, hashes
(sha256) and fsyncs, so the reference is ``cp --sparse=always`` + ``openssl dgst -sha256``
(the fastest SHA-256 here) of the copy + ``sync -f``, one shell process; over SSH
``ssh node cat FILE | dd conv=sparse`` (the exec-channel ``cat`` katactl uses, same key
exchange and cipher as katactl's paramiko, zero blocks written as holes as katactl does:
ssh_sparse_copy()) + openssl + sync. Plain ``cp`` and ``scp`` rows stay for reference.
Every table: one untimed warm-up round, then the runs interleaved (one of each per round).

Usage: .venv/bin/python bench/bench_vmcore.py [--size-mib N] [--runs N] [--dir DIR] [--at REV] [--write] [--smoke]
Prints a markdown section on stdout (--smoke: an 8 MiB dump, one run, nothing written).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import context, fastest_sha256, katactl_revs, precompile, require, write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KATACTL = os.path.join(ROOT, ".venv", "bin", "katactl")
if not os.path.exists(KATACTL):
    KATACTL = None
SID = "b0b0b0b0c1c1c1c1d2d2d2d2e3e3e3e3"
DUMP = "/var/crash/kata"


def make_node(root: str, size: int) -> str:
    cfgdir = os.path.join(root, "etc/kata-containers")
    os.makedirs(cfgdir, exist_ok=True)
    with open(os.path.join(cfgdir, "configuration.toml"), "w") as f:
        f.write(f'[hypervisor.qemu]\ndefault_memory = 1024\nguest_memory_dump_path = "{DUMP}"\n')
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc/hostname"), "w") as f:
        f.write("bench-node\n")
    d = os.path.join(root, DUMP.lstrip("/"), SID)
    os.makedirs(os.path.join(d, "state"), exist_ok=True)
    with open(os.path.join(d, "hypervisor.conf"), "w") as f:
        f.write('{"MemorySize": 1024}')
    with open(os.path.join(d, "hypervisor.version"), "w") as f:
        f.write("QEMU emulator version 7.2.22\n")
    with open(os.path.join(d, "state/persist.json"), "w") as f:
        f.write('{"PersistVersion": 2}')
    path = os.path.join(d, "vmcore-20260101000000.5.elf")
    hdr_len = 64 + 56
    seg = size - hdr_len
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 0, hdr_len, 0, 0, seg, seg, 0)
    rnd = [os.urandom(1 << 20) for _ in range(8)]
    zero = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(ehdr + phdr)
        left, i = seg, 0
        while left > 0:
            block = rnd[i % 8] if (i * 7) % 10 < 3 else zero     # ~30 % data
            b = block[:min(left, len(block))]
            f.write(b)
            left -= len(b)
            i += 1
    return path


def timev(argv, env=None, stdout: list | None = None) -> tuple[float, int, float]:
    """(wall seconds, peak RSS KiB, user+sys CPU seconds) of argv under /usr/bin/time -v
    (its stdout appended to ``stdout`` when given)."""
    p = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    if stdout is not None:
        stdout.append(p.stdout)
    if p.returncode != 0:
        msg = [ln for ln in p.stderr.splitlines() if not ln.startswith("\t") and "Command being timed" not in ln]
        raise SystemExit(f"{' '.join(argv[:6])} ... failed (exit {p.returncode}): " + "\n".join(msg[-20:]))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    wall = (int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    return wall, rss, cpu


#: the node's idle priority, as katactl/vmcore/collection.py's IDLE_PRIORITY applies it
IDLE = ("ionice", "-c3", "nice", "-n", "19")


def idle_prefix() -> list[str]:
    """IDLE where both programs exist here, else what exists of it (katactl does the same)."""
    out = []
    for tool, args in (("ionice", IDLE[:2]), ("nice", IDLE[2:])):
        if shutil.which(tool):
            out += args
    return out


def ssh_sparse_copy(config: str, opts: list[str], node: str, src: str, dst: str, sha: str) -> list[str]:
    """argv copying ``node:src`` to ``dst`` the way katactl does over SSH: ``cat`` on an
    exec channel, zero blocks left as holes (dd conv=sparse: katactl's copy of the bench's
    dump occupies ~30 % of its size), then the copy hashed and fsynced. bash for pipefail:
    a failed ssh must not pass for a fast copy."""
    import shlex

    return ["bash", "-o", "pipefail", "-c",
            f'ssh -F "$0" {shlex.join(opts)} "$1" cat -- "$2" | dd of="$3" bs=64K conv=sparse status=none '
            f'&& {sha} "$3" >/dev/null && sync -f "$3"', config, node, src, dst]


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--no-ssh", action="store_true", help="skip the SSH comparison")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--at", metavar="REV", help="time katactl as of this git revision, not the working tree")
    a = ap.parse_args()
    require("cp", "sync", "/usr/bin/time")
    if a.smoke:
        a.size_mib, a.runs = 8, 1
    warmup = 0 if a.smoke else 1    # untimed rounds before the timed ones, in every table
    pre = None if a.smoke else precompile()
    sha = " ".join(fastest_sha256())
    eqname = f"cp --sparse=always + {sha.split()[0]} sha256 + sync"
    size = a.size_mib << 20
    work = tempfile.mkdtemp(prefix="katactl-bench-vmcore-", dir=a.dir)
    try:
        root = os.path.join(work, "node")
        src = make_node(root, size)
        env = dict(os.environ, XDG_STATE_HOME=os.path.join(work, "state"),
                   XDG_CONFIG_HOME=os.path.join(work, "config"), NO_COLOR="1")
        kat = [KATACTL] if KATACTL else [sys.executable, "-m", "katactl"]
        if a.at:
            a.baseline = None
            kat, at_env, label = katactl_revs(a, os.path.join(work, "revs"))["katactl"]
            pre = f"{pre}; {label} (--at)"
            env.update(at_env or {})
        dst = os.path.join(work, "cp.out")
        out = os.path.join(work, "collected")

        def rm_cp():
            if os.path.exists(dst):
                os.unlink(dst)

        def rm_out():
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)

        stored = os.path.join(out, "bench-node", SID, "vmcore-20260101000000.5.elf")
        cmds = [("cp", ["cp", src, dst], rm_cp, None),
                ("cp + sync", ["sh", "-c", 'cp "$0" "$1" && sync -f "$1"', src, dst], rm_cp, None),
                (eqname, ["sh", "-c", f'cp --sparse=always "$0" "$1" && {sha} "$1" >/dev/null && sync -f "$1"',
                          src, dst], rm_cp, None),
                ("katactl vmcore collect", [*kat, "--host-root", root, "vmcore", "collect", "--to", out,
                                            "-o", "json"], rm_out, None)]
        idle = " ".join(idle_prefix())
        refs = {}
        for algo, ref, ext in (("gzip", ["gzip", "-c", "-1", "-n"], ".gz"), ("zstd", ["zstd", "-q", "-c", "-3", "-T1"], ".zst")):
            if not shutil.which(ref[0]):
                continue
            refs[algo] = f"{idle} {' '.join(ref)}".strip()
            # equal work: katactl hashes the original and the stored file, and fsyncs
            cmds.append((f"ref {algo}", ["sh", "-c", f'{refs[algo]} "$0" > "$1" && {sha} "$0" "$1" >/dev/null '
                                         '&& sync -f "$1"', src, dst], rm_cp, dst))
            cmds.append((f"katactl {algo}", [*kat, "--host-root", root, "vmcore", "collect", "--to", out,
                                             "--compress", algo, "-o", "json"], rm_out, stored + ext))
        samples: dict = {name: [] for name, _, _, _ in cmds}
        sizes: dict = {}
        for i in range(warmup + a.runs):  # warm-up, then interleaved: a busy machine slows every command alike
            for name, argv, cleanup, result in cmds:
                cleanup()
                warm(src)
                subprocess.run(["sync"])
                t = timev(argv, env=env)
                if i >= warmup:
                    samples[name].append(t)
                if result:
                    sizes[name] = os.path.getsize(result)
                if name == "katactl vmcore collect":
                    on_disk = os.stat(stored).st_blocks * 512
        med = {name: (statistics.median(x[0] for x in ss), max(x[1] for x in ss), statistics.median(x[2] for x in ss))
               for name, ss in samples.items()}
        rows = {name: med[name] for name, _, _, result in cmds if not name.startswith(("ref ", "katactl ")) or
                name == "katactl vmcore collect"}
        rm_cp()
        comp = {algo: (*med[f"katactl {algo}"][:2], sizes[f"katactl {algo}"], *med[f"ref {algo}"][:2],
                       sizes[f"ref {algo}"], refs[algo]) for algo in refs}
        rm_out()
        ssh_rows, zrows = bench_ssh(work, root, src, kat, env, a.runs, sha, warmup) if not a.no_ssh else ({}, {})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if a.smoke:
        print(f"bench_vmcore smoke ok: {len(rows)} local rows, {len(ssh_rows)} ssh rows, {len(zrows)} zstd rows")
        return
    buf: list[str] = []

    def out(*args) -> None:
        buf.append(" ".join(str(x) for x in args) + "\n")

    mib = size / (1 << 20)
    base = rows["cp"][0]
    base_eq = rows[eqname][0]
    out("## vmcore collect — bench/bench_vmcore.py\n")
    out(f"{a.size_mib} MiB QEMU-like ELF dump (fully allocated, ~30 % data blocks, the rest zeros), warm page "
        f"cache, local disk ({a.dir}), median of {a.runs} interleaved runs, whole processes, peak RSS from "
        f"/usr/bin/time -v; {context(pre)}. Equal-work reference: `{eqname}` (holes for zero blocks, the "
        "copy hashed, fsynced), one shell process.\n")
    out("| command | wall s | MiB/s | throughput vs equal-work ref | vs plain cp | CPU s (user+sys) | peak RSS MiB |")
    out("|---|---:|---:|---:|---:|---:|---:|")
    for name, (w, r, c) in rows.items():
        out(f"| {name} | {w:.2f} | {mib / w:.0f} | {base_eq / w:.2f}x | {base / w:.2f}x | {c:.2f} | {r / 1024:.0f} |")
    out(f"\nkatactl's copy occupies {on_disk / (1 << 20):.0f} MiB on disk (zero blocks written as holes; "
          f"plain cp's copy: {mib:.0f} MiB). katactl also verifies and writes the manifest.\n")
    if ssh_rows:
        b = ssh_rows["scp"][0]
        bs = ssh_rows[SSH_EQ][0]
        out("Over SSH (one real sshd on loopback; katactl: paramiko, `cat` on an exec channel; scp/ssh with "
            "the same key exchange and cipher: `" + " ".join(SSH_OPTS) + "`):\n")
        out("| command | wall s | MiB/s | throughput vs the equal-work ref | vs plain scp | CPU s (user+sys) | peak RSS MiB |")
        out("|---|---:|---:|---:|---:|---:|---:|")
        for name, (w, r, c) in ssh_rows.items():
            out(f"| {name.replace('|', chr(92) + '|')} | {w:.2f} | {mib / w:.0f} | {bs / w:.2f}x | {b / w:.2f}x | {c:.2f} | {r / 1024:.0f} |")
        alloc = ", ".join(f"{k.replace('|', chr(92) + '|')} {v / (1 << 20):.0f} MiB" for k, v in SSH_ALLOCATED.items())
        out(f"\nOn disk ({alloc}): both leave the zero blocks as holes. scp's CPU column counts only the local "
            "scp process, the equal-work reference's its ssh, dd and openssl; sshd's encryption runs in sshd.\n")
    if zrows:
        import time as _time

        ref = zrows[next(iter(zrows))][0]
        loc = zrows["katactl --compress zstd --compress-on local"][0]
        out(f"Over SSH with `--compress zstd` ({_time.strftime('%Y-%m-%d')}): compressed on the node "
              "(`zstd -q -c -3 -T1` under `ionice -c3 nice -n 19`, its stdout streamed; katactl decompresses "
              "it on the fly to hash the original) or here (`cat` on the node, zstd here). Wire MiB: the "
              "dump's bytes received; CPU: katactl's process (and its local zstd), not the node's compressor.\n")
        out("| command | wall s | vs ssh+zstd ref | vs --compress-on local | wire MiB | stored MiB | "
              "CPU s (user+sys) | peak RSS MiB |")
        out("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, (w, r, c, wire, stored) in zrows.items():
            out(f"| {name.replace('|', chr(92) + '|')} | {w:.2f} | {ref / w:.2f}x | {loc / w:.2f}x | {wire / (1 << 20):.1f} | "
                  f"{stored / (1 << 20):.1f} | {c:.2f} | {r / 1024:.0f} |")
        out()
    if comp:
        out(f"Compressed locally (--host-root: katactl runs the node's compressor on this machine, one thread at "
            f"idle priority), in the same interleaved rounds; the references run the same compressor command at "
            f"the same priority (`{idle_prefix_text()}`).\n")
        out("| compression | katactl wall s | katactl size MiB | katactl RSS MiB | reference | ref wall s | ref size MiB |")
        out("|---|---:|---:|---:|---|---:|---:|")
        for algo, (w, r, sz, wr, _rr, rs, refname) in comp.items():
            out(f"| {algo} | {w:.2f} | {sz / (1 << 20):.1f} | {r / 1024:.0f} | `{refname}` + {sha.split()[0]} "
                f"sha256 of both + sync | {wr:.2f} | "
                  f"{rs / (1 << 20):.1f} |")
        out()
    text = "".join(buf)
    print(text)
    if a.write:
        write_section(text, "bench/bench_vmcore.py")


SSH_EQ = "ssh cat | dd conv=sparse + sha256 + sync"
SSH_OPTS: list[str] = []
#: bytes on disk of the last SSH copies: {row name: st_blocks * 512}, for the table
SSH_ALLOCATED: dict[str, int] = {}


def idle_prefix_text() -> str:
    return " ".join(idle_prefix()) or "(no ionice or nice here)"


def bench_ssh(work: str, root: str, src: str, kat: list, env: dict, runs: int, sha: str, warmup: int) -> tuple:
    """katactl -N node vmcore collect over a real sshd on loopback, against scp of the same file."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not (os.path.exists(sshd) and shutil.which("scp") and shutil.which("ssh-keygen")):
        return {}, {}
    from pathlib import Path

    sys.path.insert(0, ROOT)
    from tests.conftest_sshd import SshLab
    from bench.bench_ssh import CIPHER, same_kex

    SSH_OPTS[:] = ["-o", f"KexAlgorithms={same_kex()}", "-c", CIPHER]
    opts = " ".join(SSH_OPTS)

    lab = SshLab(Path(work) / "sshlab")
    try:
        lab.add_node("vmnode", known="plain", tree=False)
        # the node serves our node tree (SetEnv KATACTL_HOST_ROOT in its Host block)
        lab._blocks[-1] += f"\n  SetEnv KATACTL_HOST_ROOT={root}"
        lab.write_config()
        lab.wait_ready()
        out = os.path.join(work, "ssh-collected")
        dst = os.path.join(work, "scp.out")
        collect = [*kat, "-N", "vmnode", "--ssh-config", str(lab.config), "vmcore", "collect", "--to", out,
                   "-o", "json"]
        zref = "ssh node zstd -3 -T1 -c | tee file | zstd -d | sha256, sha256 file, sync"
        samples: dict = {"scp": [], SSH_EQ: [], "katactl -N node vmcore collect": []}
        sparse = SSH_ALLOCATED
        zsamples: dict = {zref: [], "katactl --compress zstd --compress-on local": [],
                          "katactl --compress zstd --compress-on node": []} if shutil.which("zstd") else {}
        for i in range(warmup + runs):
            for name in [*samples, *zsamples]:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(os.path.join(work, "state"), ignore_errors=True)
                if os.path.exists(dst):
                    os.unlink(dst)
                warm(src)
                subprocess.run(["sync"])
                if name == "scp":
                    argv = ["scp", "-q", "-F", str(lab.config), *SSH_OPTS, f"vmnode:{src}", dst]
                elif name == SSH_EQ:
                    argv = ssh_sparse_copy(str(lab.config), SSH_OPTS, "vmnode", src, dst, sha)
                elif name == zref:
                    argv = ["sh", "-c", f'ssh -F "$0" {opts} vmnode zstd -q -c -3 -T1 -- "$1" | tee "$2" | zstd -d -q '
                            f'| {sha} >/dev/null && {sha} "$2" >/dev/null && sync -f "$2"', str(lab.config), src, dst]
                elif name in zsamples:
                    argv = [*collect, "--compress", "zstd", "--compress-on", name.rsplit(" ", 1)[1]]
                else:
                    argv = collect
                got: list = []
                t = timev(argv, env=env, stdout=got)
                if name == SSH_EQ:
                    sparse[name] = os.stat(dst).st_blocks * 512
                elif name == "katactl -N node vmcore collect":
                    import json

                    [item] = json.loads(got[0])["items"]
                    sparse[name] = os.stat(item["to"]).st_blocks * 512
                if i < warmup:
                    continue
                if name in samples:
                    samples[name].append(t)
                    continue
                if name == zref:
                    wire = stored = os.path.getsize(dst)
                else:
                    import json

                    [item] = json.loads(got[0])["items"]
                    wire, stored = item["transferredBytes"], item["storedSize"]
                zsamples[name].append((*t, wire, stored))
        med = {k: (statistics.median(x[0] for x in v), max(x[1] for x in v), statistics.median(x[2] for x in v))
               for k, v in samples.items()}
        zmed = {k: (statistics.median(x[0] for x in v), max(x[1] for x in v), statistics.median(x[2] for x in v),
                    statistics.median(x[3] for x in v), statistics.median(x[4] for x in v))
                for k, v in zsamples.items()}
        return med, zmed
    finally:
        lab.stop()


if __name__ == "__main__":
    main()
