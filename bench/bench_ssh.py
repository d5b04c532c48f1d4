"""SSH fan-out and streaming: katactl vs OpenSSH ssh, parallel-ssh and scp, same run.

Starts N real sshd nodes on loopback (tests/conftest_sshd.SshLab: throw-away
keys, each node with its own node tree of sandboxes written by
katactl.lab.layout), then measures

1. ``katactl -N ... sandbox list -o json`` across all nodes (a fresh process,
   connects included) against
   - a sequential loop of ``ssh NODE <reads>`` (one connection per node, the
     same files: directory listings + every persist.json + bundle config.json),
   - ``parallel-ssh -p N`` running the same reads on every node at once;
2. streaming a 1 GiB file from a node to a local file: a fresh Python process
   that imports katactl, connects (SSHTransport) and streams (open_stream: ``cat``
   over an exec channel) against ``scp``, both timed as whole processes (start-up
   and connection included), plus paramiko SFTP with prefetch on a smaller file
   for reference; peak RSS of the katactl side.

Equal work: OpenSSH (ssh, parallel-ssh, scp) is given the key exchange and cipher
katactl's paramiko negotiates with these sshds (the first of paramiko's kex list
that OpenSSH knows: curve25519-sha256@libssh.org with OpenSSH 9.2, whose own
default sntrup761x25519 costs ~0.1 s of CPU per connection; aes128-gcm, katactl's
first cipher), and parallel-ssh runs with -p N as katactl runs N nodes at once.

With ``--baseline REV`` the same fan-out also runs with the katactl of git
revision REV (``git archive`` into a temp dir, run with the same interpreter):
before/after in one run.

Run: .venv/bin/python bench/bench_ssh.py [--nodes 32] [--sandboxes 10] [--gib 1] [--baseline REV]
     [--write] [--smoke]
Prints a markdown section on stdout (--smoke: 2 nodes, a 4 MiB stream, one run, nothing written).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._util import KATACTL, context, precompile, require, write_section  # noqa: E402
from tests.conftest_sshd import SshLab  # noqa: E402

#: katactl's first cipher (katactl/backends/ssh.py: _T._preferred_ciphers)
CIPHER = "aes128-gcm@openssh.com"


def same_kex() -> str:
    """The key exchange paramiko negotiates with this machine's OpenSSH: the first of
    paramiko's preferences that OpenSSH knows (``ssh -Q kex``)."""
    import paramiko

    known = set(subprocess.run(["ssh", "-Q", "kex"], capture_output=True, text=True).stdout.split())
    return next(k for k in paramiko.Transport._preferred_kex if k in known)

READS = ("cd \"$KATACTL_HOST_ROOT\" && ls run/vc/sbs run/kata run/containerd/io.containerd.runtime.v2.task/k8s.io "
         "2>/dev/null; cat run/vc/sbs/*/persist.json "
         "run/containerd/io.containerd.runtime.v2.task/k8s.io/*/config.json 2>/dev/null")


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(argv, env=None, check=True):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if check and p.returncode != 0:
        raise SystemExit(f"{argv[:6]}... failed ({p.returncode}): {p.stderr.decode()[-800:]}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--sandboxes", type=int, default=10)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", metavar="REV", help="also time katactl as of this git revision")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    require("sshd" if shutil.which("sshd") else "/usr/sbin/sshd", "ssh", "scp", "ssh-keygen", "parallel-ssh")
    if a.smoke:
        a.nodes, a.sandboxes, a.gib, a.runs = 2, 2, 4 / 1024, 1
    pre = None if a.smoke else precompile()
    kex = same_kex()
    eq = ["-o", f"KexAlgorithms={kex}", "-c", CIPHER]

    base = Path(tempfile.mkdtemp(prefix="katactl-bench-ssh-"))
    lab = SshLab(base)
    try:
        from katactl.lab import layout

        names = [f"n{i:02d}" for i in range(a.nodes)]
        for n in names:
            lab.add_node(n)
            layout.write_many(str(lab.nodes[n].root), a.sandboxes)
        lab.write_config()
        lab.wait_ready()
        hosts = base / "hosts"
        hosts.write_text("\n".join(names) + "\n")
        env = dict(os.environ, XDG_CONFIG_HOME=str(base / "xdg"), XDG_STATE_HOME=str(base / "xdg-state"),
                   NO_COLOR="1")

        kat = [*KATACTL, "--ssh-config", str(lab.config), "--parallel", str(a.nodes),
               "--nodes-from", str(hosts), "sandbox", "list", "-o", "json"]
        # sanity: the same number of sandboxes everywhere
        import json

        doc = json.loads(run(kat + ["--no-check"], env=env).stdout)
        assert len(doc["items"]) == a.nodes * a.sandboxes, len(doc["items"])

        def loop():
            for n in names:
                run(["ssh", "-F", str(lab.config), *eq, n, READS])

        pssh_out = base / "pssh-out"

        def pssh():
            run(["parallel-ssh", "-h", str(hosts), "-p", str(a.nodes), "-t", "60", "-o", str(pssh_out),
                 "-x", f"-F {lab.config} {' '.join(eq)}", READS])

        cases = [
            ("katactl sandbox list -o json --no-check", lambda: run(kat + ["--no-check"], env=env)),
            ("katactl sandbox list -o json (with liveness check)", lambda: run(kat, env=env)),
        ]
        if a.baseline:
            from bench._util import katactl_at

            prefix, extra, rev = katactl_at(a.baseline, str(base / "baseline"))
            old_env = dict(env, **extra)
            old_kat = [*prefix, *kat[len(KATACTL):]]
            cases += [
                (f"katactl @ {rev} (baseline) --no-check", lambda: run(old_kat + ["--no-check"], env=old_env)),
                (f"katactl @ {rev} (baseline) with liveness check", lambda: run(old_kat, env=old_env)),
            ]
        runs = a.runs
        allcases = [*cases, (f"parallel-ssh -p {a.nodes} (same reads, same kex and cipher)", pssh),
                    ("sequential ssh loop (same reads, same kex and cipher)", loop)]
        samples: dict[str, list[float]] = {label: [] for label, _ in allcases}
        for _label, fn in allcases:
            if not a.smoke:
                fn()  # warm-up (page cache, sshd)
        for r in range(runs):  # interleaved rounds; the slow ssh loop in every other round
            for label, fn in allcases:
                if "loop" in label and r % 2 and runs > 1:
                    continue
                samples[label].append(timed(fn, 1)[0])
        rows = {label: statistics.median(v) for label, v in samples.items()}

        # -- streaming ------------------------------------------------------------
        node = names[0]
        size = (int(a.gib * (1 << 30)) >> 20) << 20  # whole MiB: the file is written 1 MiB at a time
        big = lab.nodes[node].root / "var" / "crash" / "vmcore.bin"
        big.parent.mkdir(parents=True, exist_ok=True)
        with open(big, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        dst = base / "copy.bin"
        def child(where: str, boot: str = "") -> str:
            return (
                "import sys,resource,time\n" + boot +
                f"sys.path.insert(0, {where!r})\n"
                "from katactl import config\n"
                "from katactl.backends.ssh import SSHTransport\n"
                f"t = SSHTransport.from_settings({node!r}, config.resolve({{'ssh_config': {str(lab.config)!r}}}))\n"
                "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "t0 = time.perf_counter()\n"
                f"with open({str(dst)!r}, 'wb') as f:\n"
                "    for b in t.open_stream('/var/crash/vmcore.bin'):\n"
                "        f.write(b)\n"
                "el = time.perf_counter() - t0\n"
                "print(el, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0, "
                "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
            )

        def cpu() -> float:
            r = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped processes, their own children included
            return r.ru_utime + r.ru_stime

        streamers = [("katactl", [sys.executable, "-c", child(ROOT)], env)]
        if a.baseline:
            # the baseline's tree first on sys.path, the editable install's finder dropped (katactl_at)
            boot = ("sys.meta_path[:] = [f for f in sys.meta_path "
                    "if 'editable' not in getattr(f, '__module__', '')]\n")
            streamers.append((rev, [sys.executable, "-c", child(str(base / "baseline"), boot)], old_env))
        st_runs = 1 if a.smoke else 5
        kat_t: dict[str, list[float]] = {k: [] for k, _, _ in streamers}
        kat_in: dict[str, list[float]] = {k: [] for k, _, _ in streamers}
        kat_cpu: dict[str, list[float]] = {k: [] for k, _, _ in streamers}
        rss_delta, rss_peak = [], []
        scp_t, scp_cpu = [], []
        st_warmup = 0 if a.smoke else 1
        for _ in range(st_warmup + st_runs):
            for key, argv, e in streamers:
                c, t = cpu(), time.perf_counter()
                out = run(argv, env=e).stdout.decode().split()
                kat_t[key].append(time.perf_counter() - t)  # the whole process: start-up, imports, connect
                kat_cpu[key].append(cpu() - c)
                kat_in[key].append(float(out[0]))
                if key == "katactl":
                    rss_delta.append(int(out[1]))
                    rss_peak.append(int(out[2]))
                assert dst.stat().st_size == size
                dst.unlink()
            c, t = cpu(), time.perf_counter()
            run(["scp", "-q", "-F", str(lab.config), *eq, f"{node}:{big}", str(dst)])
            scp_t.append(time.perf_counter() - t)
            scp_cpu.append(cpu() - c)
            assert dst.stat().st_size == size
            dst.unlink()
        for lst in (*kat_t.values(), *kat_in.values(), *kat_cpu.values(), rss_delta, rss_peak, scp_t, scp_cpu):
            del lst[:st_warmup]  # the warm-up round's samples
        # SFTP (paramiko, prefetch) on a 32 MiB slice, for reference
        small = lab.nodes[node].root / "var" / "crash" / "small.bin"
        sftp_size = min(32 << 20, size)
        with open(big, "rb") as src, open(small, "wb") as out_f:
            out_f.write(src.read(sftp_size))
        sftp_child = (
            f"import sys,time\nsys.path.insert(0, {ROOT!r})\n"
            "from katactl import config\nfrom katactl.backends.ssh import SSHTransport\n"
            f"t = SSHTransport.from_settings({node!r}, config.resolve({{'ssh_config': {str(lab.config)!r}}}))\n"
            "s = t._conn.sftp()\nt0 = time.perf_counter()\n"
            f"s.get({str(small)!r}, {str(dst)!r}, prefetch=True)\n"
            "print(time.perf_counter() - t0)\n")
        sftp_s = float(run([sys.executable, "-c", sftp_child], env=env).stdout.split()[0])
        dst.unlink()

        # -- report ---------------------------------------------------------------------
        if a.smoke:
            print(f"bench_ssh smoke ok: {len(rows)} fan-out rows, stream {statistics.median(kat_t['katactl']):.2f}s")
            return
        ks = rows["katactl sandbox list -o json --no-check"]
        loop_s = rows["sequential ssh loop (same reads, same kex and cipher)"]
        pssh_s = rows[f"parallel-ssh -p {a.nodes} (same reads, same kex and cipher)"]
        lines = ["## SSH fan-out and streaming — bench/bench_ssh.py", "",
                 f"{a.nodes} real OpenSSH 9.2 sshd nodes on loopback (one machine: the sshds, the clients and "
                 f"the bench share its cores), {a.sandboxes} Go-runtime sandboxes per node "
                 f"(katactl.lab.layout), each node serving its own tree. Median of {runs} interleaved rounds "
                 f"after a warm-up (the ssh loop: every other round). Every row is a fresh process "
                 "(start-up, imports and all connects included); ssh/parallel-ssh use the same ssh_config, "
                 f"keys and known_hosts, and the key exchange and cipher paramiko negotiates (`-o "
                 f"KexAlgorithms={kex} -c {CIPHER}`; OpenSSH's default sntrup761x25519 costs ~0.1 s of CPU "
                 "per connection). The shell side reads the same files (directory listings, every "
                 f"persist.json and bundle config.json) but parses nothing; {context(pre)}.", "",
                 "| what | seconds | ratio to katactl --no-check |", "|---|---:|---:|"]
        for label, v in rows.items():
            lines.append(f"| {label} | {v:.3f} | {v / ks:.2f}x |")
        lines += ["", f"- vs the sequential ssh loop: **{loop_s / ks:.1f}x faster**",
                  f"- vs parallel-ssh -p {a.nodes}: katactl takes **{ks / pssh_s:.2f}x** its time (goal <= 1.0x)",
                  ""]
        gib = size / (1 << 30)
        med = statistics.median
        smed = med(scp_t)
        lines += [f"Streaming a {gib:g} GiB file from a node into a local file, median of {st_runs} "
                  f"(interleaved runs after a warm-up round, page cache warm on the node), all as whole processes, cipher {CIPHER}, "
                  f"kex {kex}; CPU: user+sys of the process and its children (scp's includes its ssh; sshd's "
                  "encryption on the node side is in neither):", "",
                  "| what | seconds | MiB/s | ratio to scp throughput | CPU s |", "|---|---:|---:|---:|---:|"]
        for key, _, _ in streamers:
            kmed, kin = med(kat_t[key]), med(kat_in[key])
            who = "" if key == "katactl" else f" (katactl @ {key}, baseline)"
            lines += [f"| python process{who}: import katactl, SSHTransport connect, open_stream (`cat` over an "
                      f"exec channel) to a file | {kmed:.2f} | {size / kmed / (1 << 20):.0f} | {smed / kmed:.2f}x | "
                      f"{med(kat_cpu[key]):.2f} |",
                      f"| the same{who}, the stream alone (timed in-process after connecting) | {kin:.2f} | "
                      f"{size / kin / (1 << 20):.0f} | {smed / kin:.2f}x | - |"]
        lines += [f"| scp (OpenSSH, reference) | {smed:.2f} | {size / smed / (1 << 20):.0f} | 1.00x | "
                  f"{med(scp_cpu):.2f} |",
                  f"| paramiko SFTP get with prefetch ({sftp_size >> 20} MiB, for reference) | {sftp_s:.2f} | "
                  f"{sftp_size / sftp_s / (1 << 20):.0f} | {(sftp_size / sftp_s) / (size / smed):.2f}x | - |", "",
                  f"Peak RSS of the streaming katactl process: {max(rss_peak) / 1024:.0f} MiB "
                  f"(grew by {max(rss_delta) / 1024:.0f} MiB while streaming {gib:g} GiB: bounded by the "
                  "16 MiB channel window and 1 MiB chunks)."]
        text = "\n".join(lines) + "\n"
        print(text)
        if a.write:
            write_section(text, "bench/bench_ssh.py")
    finally:
        lab.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
