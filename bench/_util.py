"""Small helpers shared by bench scripts.

Every bench takes ``--smoke``: tiny sizes, one run, nothing written to RESULTS.md
(tests/test_bench_smoke.py runs each one that way, so a bench cannot rot unnoticed).
A tool a bench needs and cannot find ends it with exit 77 (SKIP) and "TOOL not
installed" on stderr (see require()).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

#: the exit code of a bench that cannot run here (a tool is missing)
SKIP = 77

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KATACTL = [os.path.join(ROOT, ".venv", "bin", "katactl")] if os.path.exists(
    os.path.join(ROOT, ".venv", "bin", "katactl")) else [sys.executable, "-m", "katactl"]


def timed(argv, runs: int = 15, env=None, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``runs`` executions of argv (after warm-up runs); stdout is
    discarded, and a failing run ends the bench (SystemExit with the tail of its stderr)."""
    e = dict(os.environ, **(env or {}))
    out = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e, check=False)
        dt = time.perf_counter() - t
        if p.returncode != 0:
            raise SystemExit(f"{argv[:6]} failed: {p.stderr.decode()[-300:]}")
        if i >= warmup:
            out.append(dt)
    return out


def median_ms(samples) -> float:
    return statistics.median(samples) * 1000


def interleaved(cmds: dict[str, tuple[list[str], dict | None]], runs: int, warmup: int = 2,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall-clock seconds per command, runs taken round-robin (one of each per round)
    so that a burst of load on the machine hits every command alike. ``cpu``, when given,
    gets each run's CPU seconds (user + system, the process and its children): the work,
    which waiting for a core under other jobs' load does not add to."""
    import resource

    out: dict[str, list[float]] = {name: [] for name in cmds}
    for i in range(warmup + runs):
        for name, (argv, env) in cmds.items():
            e = dict(os.environ, **(env or {}))
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e, check=False)
            dt = time.perf_counter() - t
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if p.returncode != 0:  # a broken command must not be timed as a fast one
                raise SystemExit(f"{name}: {argv[:6]} failed ({p.returncode}): {p.stderr.decode()[-300:]}")
            if i >= warmup:
                out[name].append(dt)
                if cpu is not None:
                    cpu.setdefault(name, []).append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return out


#: in a section of bench/RESULTS.md, the line after which the text is written by hand:
#: write_section() replaces what the script generated above it and keeps the rest
KEEP = "<!-- written by hand below: kept by --write -->"


def write_section(markdown: str, script: str, path: str | None = None) -> None:
    """Replace the section of bench/RESULTS.md (or ``path``) whose "## " heading names
    ``script`` (e.g. "bench/bench_startup.py"), up to the next "## ", or append it. A
    :data:`KEEP` line in the old section and what follows it (notes, before/after figures,
    profiles) stay, after the new text."""
    path = path or os.path.join(ROOT, "bench", "RESULTS.md")
    with open(path) as f:
        text = f.read()
    start = next((i for i in _heading_offsets(text) if script in text[i:text.find("\n", i)]), -1)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + markdown.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + 1)
        old = text[start:end + 1 if end >= 0 else len(text)]
        kept = old[old.find(KEEP):].rstrip("\n") + "\n" if KEEP in old else ""
        new = markdown.rstrip("\n") + "\n" + ("\n" + kept if kept else "")
        text = text[:start] + new + (text[end:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(text)


def publish(text: str, script: str, write: bool) -> None:
    """Print a bench's markdown section; with --write also put it into bench/RESULTS.md."""
    print(text)
    if write:
        write_section(text, script)


def _heading_offsets(text: str):
    if text.startswith("## "):
        yield 0
    i = text.find("\n## ")
    while i >= 0:
        yield i + 1
        i = text.find("\n## ", i + 1)


def bench_parser(smoke: str, runs: int = 5) -> argparse.ArgumentParser:
    """The options every bench takes: --runs, --write (into RESULTS.md), --smoke (``smoke``
    says what it shrinks to)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help=smoke)
    return ap


def add_rev_options(ap: argparse.ArgumentParser) -> None:
    """--at REV (time katactl as of a commit, not the working tree others may be editing) and
    --baseline REV (also time katactl as of that commit, interleaved: before/after in one run)."""
    ap.add_argument("--at", metavar="REV", help="time katactl as of this git revision, not the working tree")
    ap.add_argument("--baseline", metavar="REV", help="also time katactl as of this git revision")


def katactl_revs(a: argparse.Namespace, dest: str) -> dict[str, tuple[list[str], dict | None, str]]:
    """{"katactl": (argv prefix, env, label)} and, with --baseline, the same under "baseline",
    from :func:`add_rev_options`' options; archives are unpacked under ``dest``."""
    out: dict[str, tuple[list[str], dict | None, str]] = {"katactl": (KATACTL, None, "katactl")}
    for key, rev in (("katactl", a.at), ("baseline", a.baseline)):
        if rev:
            argv, env, short = katactl_at(rev, os.path.join(dest, key))
            out[key] = (argv, env, f"katactl at {short}")
    return out


def smoke_flag() -> bool:
    """--smoke on the command line (removed from sys.argv, for scripts with their own parsing)."""
    if "--smoke" in sys.argv:
        sys.argv.remove("--smoke")
        return True
    return False


#: the Debian package of a tool whose name differs (scripts/setup installs them)
_PACKAGES = {"parallel-ssh": "pssh", "sshd": "openssh-server", "/usr/sbin/sshd": "openssh-server",
             "ssh": "openssh-client", "scp": "openssh-client", "ssh-keygen": "openssh-client",
             "qemu-system-x86_64": "qemu-system-x86", "/usr/bin/time": "time", "unshare": "util-linux"}


def require(*tools: str) -> None:
    """End the bench with exit SKIP and 'TOOL not installed' when a tool is missing."""
    for t in tools:
        if not (shutil.which(t) or (os.path.isabs(t) and os.access(t, os.X_OK))):
            pkg = _PACKAGES.get(t)
            hint = f" (Debian package {pkg})" if pkg else ""
            print(f"{os.path.basename(sys.argv[0])}: {t} not installed{hint}", file=sys.stderr)
            raise SystemExit(SKIP)


def precompile() -> str:
    """Compile katactl's bytecode (python -m compileall), as an installed package has it:
    with PYTHONDONTWRITEBYTECODE=1 an editable install would otherwise compile every
    module on every start. Returns the sentence saying so, for the tables."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "katactl")],
                   stdout=subprocess.DEVNULL, check=False)
    flag = " (PYTHONDONTWRITEBYTECODE=1 is set here)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    return f"bytecode precompiled with `python -m compileall`{flag}"


#: the load average when the bench started (the one at the end counts the bench's own processes)
_LOAD_AT_START = os.getloadavg()


def context(precompiled: str | None = None) -> str:
    """Date, machine and load average: every table states them."""
    la, la0 = os.getloadavg(), _LOAD_AT_START
    s = (f"run of {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs shared with other jobs, "
         f"load average {la0[0]:.1f} / {la0[1]:.1f} / {la0[2]:.1f} (1/5/15 min) at the start, "
         f"{la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} at the end (the bench's own processes count)")
    return s + (f", {precompiled}" if precompiled else "")


def fastest_sha256() -> list[str]:
    """The fastest SHA-256 command here, argv prefix taking file names: openssl when
    installed (OpenSSL's SHA-NI/AVX2 code: ~4x coreutils sha256sum on this CPU)."""
    if shutil.which("openssl"):
        return ["openssl", "dgst", "-sha256"]
    return ["sha256sum"]


def run_rss(argv, env=None, stdout=subprocess.DEVNULL) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB) of one whole process (os.wait4); a failure ends the bench."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, env=env)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    p.returncode = rc
    if rc != 0:
        raise SystemExit(f"{argv[:6]} failed ({rc}): {err.decode(errors='replace')[-600:]}")
    return dt, ru.ru_maxrss


def katactl_at(rev: str, dest: str) -> tuple[list[str], dict, str]:
    """(argv prefix, env additions, short rev) running katactl as of git revision rev, from a
    `git archive` of its katactl/ in dest, with this interpreter (before/after in one run).
    The editable install's import hook and the cwd would win over PYTHONPATH: both dropped."""
    short = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], capture_output=True, text=True,
                           check=True).stdout.strip()
    arch = subprocess.run(["git", "-C", ROOT, "archive", short, "katactl"], stdout=subprocess.PIPE,
                          check=True).stdout
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", dest], input=arch, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", dest], stdout=subprocess.DEVNULL, check=False)
    boot = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in getattr(f, '__module__', '')]; "
            "sys.path[:] = [p for p in sys.path if p not in ('', '.')]; ")
    env = {"PYTHONPATH": dest}
    where = subprocess.run([sys.executable, "-c", boot + "import katactl; print(katactl.__file__)"],
                           capture_output=True, text=True, env=dict(os.environ, **env)).stdout
    assert where.startswith(dest), where
    return [sys.executable, "-c", boot + "from katactl.cli import main; sys.exit(main())"], env, short


def start_shims(root: str, n: int, prefix: str, servers: list, pids=None, **sandbox_kw) -> list:
    """``n`` running Go sandboxes ``<prefix><i:04d>`` under ``root`` (katactl.lab.layout, pods
    ``p<i>`` in namespace ``bench`` with uid ``uid-<sandbox id>``), each with a live lab shim server (katactl.lab.shimserver: real
    unix sockets, threaded, in this process). ``pids[i]`` is sandbox i's VMM pid (default:
    this process, so every sandbox is running). Each server is appended to ``servers`` as it
    starts (the caller stops them, even after a failure here); returns [(SandboxPaths,
    socket path)]."""
    from katactl.lab import layout
    from katactl.lab.shimserver import ShimServer, ShimState

    out = []
    for i in range(n):
        sid = f"{prefix}{i:04d}"
        p = layout.write_go_sandbox(root, sid, pid=pids[i] if pids else os.getpid(), pod_name=f"p{i}",
                                    pod_namespace="bench", pod_uid=f"uid-{sid}", **sandbox_kw)
        servers.append(ShimServer(p.shim_socket, flavour="go",
                                  state=ShimState(sandbox_id=sid, hypervisor_cpu_percent=i % 100)).start())
        out.append((p, p.shim_socket if p.shim_socket.startswith(root) else root + p.shim_socket))
    return out


@contextlib.contextmanager
def shim_node(n: int, prefix: str, pids=None, host_views: bool = False, **sandbox_kw):
    """A node root in /tmp (short: the shim socket paths must fit curl's sun_path) with
    :func:`start_shims`' sandboxes and live shims: yields (root, [(SandboxPaths, socket
    path)]). The host's /proc is linked into it (``host_views``: /proc, /sys/fs/cgroup and
    resctrl, katactl.lab.layout.link_host_views); all is stopped and removed after."""
    from katactl.lab import layout

    root = tempfile.mkdtemp(prefix="k", dir="/tmp")
    if host_views:
        layout.link_host_views(root)
    else:
        os.symlink("/proc", f"{root}/proc")
    servers: list = []
    try:
        yield root, start_shims(root, n, prefix, servers, pids, **sandbox_kw)
    finally:
        for s in servers:
            s.stop()
        if host_views:
            layout.unlink_host_views(root)
        shutil.rmtree(root, ignore_errors=True)
