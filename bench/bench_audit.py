"""Bench: `katactl audit -o json` on a node tree with 500 pods (300 online runc pods, 200 Kata
sandbox pods) and 200 sandboxes, against a shell `xargs cat` of exactly the files audit reads
(and a listing of the directories it lists), same run.

The tree is a fixture (tests/fixtures_isolation.py): cgroup v1 with the Alinux knobs,
resctrl with LS/BE groups, /proc/<pid>/task/<tid> for every hypervisor thread, Go
persist.json + containerd bundles per sandbox. Which files and directories audit touches is
recorded untimed, in-process, by :func:`audit_reads` (the tree holds ~46 % more files than
audit reads: tasks, cgroup.procs, /proc/N/comm of processes it never looks at), so the
reference does audit's I/O and nothing more. Prints a markdown section to stdout.

    .venv/bin/python bench/bench_audit.py [--runs N] [--at REV] [--baseline REV] [--write] [--smoke]

katactl and the reference are timed as whole processes, interleaved (one of each per round),
after a warm-up round.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench._util import add_rev_options, bench_parser, context, interleaved, katactl_revs, precompile, publish, require  # noqa: E402
from katactl.backends.local import LocalTransport  # noqa: E402
from tests.fixtures_isolation import build_node  # noqa: E402


class _Recording(LocalTransport):
    """A LocalTransport noting the local paths of every file read and directory listed
    (node path under the root: what a shell given the root reads)."""

    def __init__(self, root: str):
        super().__init__(root)
        self.files: dict[str, None] = {}
        self.dirs: dict[str, None] = {}

    def _local(self, path: str) -> str:
        return os.path.join(self.host_root, path.lstrip("/"))

    def read_bytes(self, path, limit=None):
        self.files[self._local(path)] = None
        return super().read_bytes(path, limit)

    def read_many(self, paths, limit=None):
        self.files.update(dict.fromkeys(map(self._local, paths)))
        return super().read_many(paths, limit)

    def open_stream(self, path, offset=0, chunk_size=1 << 20):
        self.files[self._local(path)] = None
        return super().open_stream(path, offset, chunk_size)

    def listdir(self, path):
        self.dirs[self._local(path)] = None
        return super().listdir(path)

    def list_dirs(self, paths):
        self.dirs.update(dict.fromkeys(map(self._local, paths)))
        return super().list_dirs(paths)

    def scan_dir(self, path, follow_symlinks=True):
        self.dirs[self._local(path)] = None
        return super().scan_dir(path, follow_symlinks)

    def list_kinds(self, paths):
        self.dirs.update(dict.fromkeys(map(self._local, paths)))
        return super().list_kinds(paths)


def audit_reads(root: str) -> tuple[list[str], list[str]]:
    """(files, directories) one `audit` of the node tree ``root`` reads and lists, as local
    paths that exist (a file audit tries and finds missing costs cat an error, not a read)."""
    from katactl.isolation import audit, policy

    t = _Recording(root)
    audit.run(t, policy.Policy())
    return [p for p in t.files if os.path.isfile(p)], [d for d in t.dirs if os.path.isdir(d)]


def main() -> None:
    ap = bench_parser("5 pods, one run, nothing written")
    ap.add_argument("--online", type=int, default=300)
    ap.add_argument("--sandboxes", type=int, default=200)
    add_rev_options(ap)
    a = ap.parse_args()
    require("find", "xargs", "cat", "ls")
    if a.smoke:
        a.online, a.sandboxes = 3, 2
    runs, warmup = (1, 0) if a.smoke else (a.runs, 1)
    pre = None if a.smoke else precompile()
    root = tempfile.mkdtemp(prefix="katactl-bench-audit-")
    try:
        t0 = time.perf_counter()
        build_node(root, online_pods=a.online, sandboxes=a.sandboxes, vcpus=2)
        build_s = time.perf_counter() - t0
        dirs = [os.path.join(root, d) for d in ("sys/fs/cgroup", "sys/fs/resctrl", "proc", "run/vc",
                                                "run/containerd")]
        nfiles = int(subprocess.run(f"find {' '.join(dirs)} -type f | wc -l", shell=True, capture_output=True,
                                    text=True).stdout)
        files, listed = audit_reads(root)
        lists = root + ".lists"
        os.makedirs(lists, exist_ok=True)
        for name, paths in (("files", files), ("dirs", listed)):
            with open(os.path.join(lists, name), "wb") as f:
                f.write(b"".join(p.encode() + b"\0" for p in paths))
        # ls -f: getdents only, no sort, no stat per entry (what os.listdir does)
        shell = (f"xargs -0 cat < {lists}/files > /dev/null && xargs -0 ls -f < {lists}/dirs > /dev/null")
        revs = katactl_revs(a, root + ".lists/revs")
        kat = [*revs["katactl"][0], "--host-root", root, "audit", "-o", "json", "--fail-on", "critical"]
        env = {"NO_COLOR": "1", **(revs["katactl"][1] or {})}
        p = subprocess.run(kat, capture_output=True, env=dict(os.environ, **env))
        if p.returncode not in (0, 8):
            sys.exit(f"audit failed: {p.stderr.decode()}")
        import json

        findings = len(json.loads(p.stdout)["items"])
        # audit exits 8 on findings: time it through a shell that maps 8 to 0 (interleaved() ends on a failure)
        def ok8(argv):
            return ["sh", "-c", '"$@"; rc=$?; [ $rc -eq 0 ] || [ $rc -eq 8 ]', "sh", *argv]

        cmds = {"katactl": (ok8(kat), env), "ref": (["sh", "-c", shell], None)}
        if "baseline" in revs:
            cmds["base"] = (ok8([*revs["baseline"][0], *kat[len(revs["katactl"][0]):]]),
                            {"NO_COLOR": "1", **(revs["baseline"][1] or {})})
        samples = interleaved(cmds, runs, warmup=warmup)
        inproc = []
        if not a.at:  # the library of this working tree, which --at does not time
            from katactl.isolation import audit, policy

            for _ in range(warmup + runs):
                t1 = time.perf_counter()
                audit.run(LocalTransport(root), policy.Policy())
                inproc.append(time.perf_counter() - t1)
        k, r = statistics.median(samples["katactl"]), statistics.median(samples["ref"])
        if a.smoke:
            print(f"bench_audit smoke ok: {nfiles} files, audit reads {len(files)} and lists {len(listed)} "
                  f"directories, {findings} findings")
            return
        text = "\n".join([
            "## audit (isolation policy check) — bench/bench_audit.py", "",
            f"Node tree: {a.online + a.sandboxes} pods ({a.online} online runc pods with one container each, "
            f"{a.sandboxes} Kata sandbox pods), {a.sandboxes} sandboxes (QEMU, 2 vCPUs, sandbox_cgroup_only=false), "
            f"cgroup v1 + Alinux knobs + resctrl; {nfiles} files (built in {build_s:.1f}s). "
            f"Median of {runs} interleaved runs after a warm-up, whole processes; {context(pre)}. "
            f"Findings reported: {findings}. The reference reads exactly the {len(files)} files audit reads "
            f"and lists the {len(listed)} directories it lists (recorded untimed, in-process: audit_reads() in "
            "the script), and parses nothing; audit's stat() calls are not in it. The in-process row is the "
            "library alone (after a warm-up call), for reference.", "",
            "| what | median s | ratio vs the reference |",
            "|---|---:|---:|",
            f"| `{revs['katactl'][2]} --host-root T audit -o json` (new process, incl. Python start-up) | {k:.3f} | "
            f"{k / r:.2f}x |",
            *([f"| `{revs['baseline'][2]} --host-root T audit -o json` (before) | "
               f"{statistics.median(samples['base']):.3f} | {statistics.median(samples['base']) / r:.2f}x |"]
              if "base" in samples else []),
            *([f"| `isolation.audit.run()` in-process (library only, for reference) | "
               f"{statistics.median(inproc[warmup:]):.3f} | {statistics.median(inproc[warmup:]) / r:.2f}x |"]
              if inproc else []),
            f"| `xargs -0 cat` of the {len(files)} files audit reads + `xargs -0 ls -f` of its {len(listed)} "
            f"directories (reference) | {r:.3f} | 1.00x |",
        ]) + "\n"
        publish(text, "bench/bench_audit.py", a.write)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root + ".lists", ignore_errors=True)


if __name__ == "__main__":
    main()
