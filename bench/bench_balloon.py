"""balloon set --wait vs a minimal raw QMP script, on the same real QEMU guest, same run.

Boots a one-sandbox lab (real QEMU, TCG), then alternates the guest between
256 MiB and 512 MiB:
- reference: a raw Python script (a fresh process, stdlib socket only) that
  talks QMP on extra-monitor.sock: greeting, qmp_capabilities, ``balloon``,
  poll ``query-balloon`` every 50 ms until within 4 MiB;
- ``katactl balloon set --target ... --wait`` (default path: the shim
  extension) and ``--path extra-monitor`` (the same monitor as the reference).
Prints a markdown section; --write records it in bench/RESULTS.md; --smoke: one move of
each kind, nothing written (the kernel is cached as for the tests: $KATACTL_TEST_CACHE).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._util import KATACTL, context, precompile, require, write_section  # noqa: E402

RAW = r'''
import json, socket, sys, time
path, target = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile("rwb")
def cmd(name, args=None):
    m = {"execute": name}
    if args: m["arguments"] = args
    f.write(json.dumps(m).encode() + b"\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
json.loads(f.readline())            # greeting
cmd("qmp_capabilities")
cmd("balloon", {"value": target})
while abs(cmd("query-balloon")["return"]["actual"] - target) > 4 << 20:
    time.sleep(0.05)
'''

MIB = 1 << 20
RUNS = 6
SETTLE = 1.5


def run(argv) -> float:
    # settle first (not timed): the lab's guest statistics are sampled once a second, and a
    # move right after another waits for a fresh sample before its used+margin check
    time.sleep(SETTLE)
    t = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{argv}: exit {p.returncode}: {p.stderr}")
    return dt


def main() -> None:
    import argparse

    global RUNS, SETTLE
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    require("qemu-system-x86_64")
    targets = (256, 512)
    if a.smoke:
        RUNS, SETTLE, targets = 1, 1.1, (256,)
    pre = None if a.smoke else precompile()
    from katactl.lab import control

    os.environ.setdefault("XDG_CACHE_HOME", os.environ.get("KATACTL_TEST_CACHE") or "/tmp/katactl-test-cache")
    root = tempfile.mkdtemp(prefix="kb-", dir="/tmp")
    os.rmdir(root)  # the lab creates its own directory
    st = control.up(root, specs=[{"name": "bench", "hypervisor": "qemu", "memory_mib": 512,
                                  "pod": "bench", "namespace": "lab"}], timeout=300, die_with_parent=True)
    try:
        sid = st["sandboxes"][0]["id"]
        em = os.path.join(root, f"run/vc/vm/{sid}/extra-monitor.sock")
        res: dict[str, list[float]] = {"raw": [], "ext": [], "em": []}
        warmup = 0 if a.smoke else 1
        for _ in range(warmup + RUNS):
            for target in targets:
                res["raw"].append(run([sys.executable, "-c", RAW, em, str(target * MIB)]))
            for target in (512,) if a.smoke else targets:  # smoke: one real move each way
                res["ext"].append(run([*KATACTL, "--host-root", root, "balloon", "set", "lab/bench",
                                       "--target", f"{target}Mi", "--wait", "-o", "json"]))
            for target in targets:
                res["em"].append(run([*KATACTL, "--host-root", root, "balloon", "set", "lab/bench",
                                      "--target", f"{target}Mi", "--wait", "--path", "extra-monitor",
                                      "-o", "json"]))
        for k in res:
            del res[k][:len(res[k]) // (warmup + RUNS) * warmup]  # the warm-up round's samples
        noop = [run([*KATACTL, "--host-root", root, "balloon", "set", "lab/bench", "--target",
                     f"{targets[-1]}Mi", "--wait", "-o", "json"]) for _ in range(RUNS)]
    finally:
        control.down(root)
    med = {k: statistics.median(v) for k, v in res.items()}
    base = med["raw"]
    if a.smoke:
        print(f"bench_balloon smoke ok: raw {base:.2f}s, katactl {med['ext']:.2f}s")
        return
    text = "\n".join([
        "## Balloon set --wait — bench/bench_balloon.py", "",
        f"One real QEMU guest (TCG, 512 MiB, Debian cloud kernel, busybox initramfs), alternating "
        f"256 MiB <-> 512 MiB, {RUNS} round trips each after a warm-up one (median of {2 * RUNS} moves); every row is a "
        f"fresh process, both sides; {SETTLE:g} s pause (untimed) before each move; {context(pre)}. "
        f"Lab boot: {st.get('bootSeconds', '?')} s.", "",
        "| what | median s | ratio to raw QMP script |",
        "|---|---:|---:|",
        f"| raw QMP script (a python3 process, stdlib socket, extra-monitor.sock) (reference) | {base:.3f} | 1.00x |",
        f"| `katactl balloon set --target N --wait` (shim extension) | {med['ext']:.3f} | {med['ext'] / base:.2f}x |",
        f"| `katactl balloon set --target N --wait --path extra-monitor` | {med['em']:.3f} | {med['em'] / base:.2f}x |",
        f"| `katactl balloon set` already at target (no-op, `changed: false`) | {statistics.median(noop):.3f} | "
        f"{statistics.median(noop) / base:.2f}x |", "",
        "The guest's balloon driver sets the pace (a move takes a few hundred ms under TCG); katactl adds "
        "its start-up (Typer, httpx), sandbox resolution, the path probe and the guest-usage safety check "
        "on top. Without the pause, a move issued within a second of the previous one waits up to 1.5 s "
        "in the lab shim for a guest statistics sample newer than the last move (virtio-balloon "
        "statistics carry whole-second timestamps)."]) + "\n"
    print(text)
    if a.write:
        write_section(text, "bench/bench_balloon.py")


if __name__ == "__main__":
    main()
