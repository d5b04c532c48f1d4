"""vmcore collect run twice, at once or one after the other, into the same --to: real files,
a real second katactl process, the per-dump lock and the manifest's lock (review 7 #1, #4, #7)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from katactl import vmcore
from katactl.backends.local import LocalTransport
from katactl.values import format_size
from tests.test_vmcore import DUMP_PATH, SID, TS, add_dump, node_tree, sha

TS2 = "20240102030406.5"
#: the keys of a collect item, whether it copied or found the dump collected already
ITEM_KEYS = {"name", "node", "nodeDir", "source", "to", "size", "compress", "compressedOn", "changed", "sha256", "verified",
             "verification", "resumed", "storedSize", "transferredBytes", "deleted"}


def _katactl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "katactl", *args], capture_output=True, text=True)


def test_a_second_collect_of_a_dump_being_copied_is_refused_and_leaves_the_copy_alone(tmp_path, _isolated_home):
    """Review 7 #1: B, started while A copies the same dump into the same --to, resumed from
    A's growing partial and cut it back: A then committed, checksummed and indexed a corrupt
    file as verified. B (a real second katactl) is refused now, and A's copy is whole."""
    root = node_tree(tmp_path / "n")
    src = add_dump(root, size_segments=((0, 24 << 20),), data=os.urandom(16 << 20))
    out = tmp_path / "out"
    dest = out / "node-a" / SID
    part = dest / f"vmcore-{TS}.elf.partial"
    seen: dict = {}

    def progress(dump, done, total):
        if done >= 8 << 20 and "b" not in seen:      # A is mid-copy, holding its partial
            before = os.path.getsize(part)
            seen["b"] = _katactl("--host-root", root, "vmcore", "collect", "--to", str(out), "-o", "json")
            seen["sizes"] = (before, os.path.getsize(part))

    [a] = vmcore.collect(LocalTransport(root), [], vmcore.CollectOptions(to=str(out), progress=progress),
                         index=vmcore.CollectIndex())
    b = seen["b"]
    assert b.returncode == 5, (b.stdout, b.stderr)
    [line] = [x for x in b.stderr.splitlines() if not x.startswith("hint:")]   # one line (and its hint)
    assert f"another collect (pid {os.getpid()}) is copying this dump into {dest}" in line
    assert json.loads(b.stdout)["code"] == "Refused"
    before, after = seen["sizes"]
    assert after >= before                          # B never cut A's partial back
    assert a["verified"] is True and a["sha256"] == sha(a["to"]) == sha(src)
    p = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not list(dest.glob("*.lock")) and not list(dest.glob("*.partial*"))
    # once A is done, the same collect is a no-op
    r = _katactl("--host-root", root, "vmcore", "collect", "--to", str(out), "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["changed"] is False, r.stderr


def test_two_dumps_of_one_sandbox_collected_at_once_both_stay_in_the_manifest(tmp_path):
    """Two collects of different dumps of one sandbox into one --to: each rewrote the manifest
    it had read before its copy, so the one that finished last dropped the other's entry."""
    root = node_tree(tmp_path / "n")
    src1 = add_dump(root, size_segments=((0, 12 << 20),), data=os.urandom(1 << 20))
    src2 = add_dump(root, ts=TS2, data=os.urandom(4096))
    out = str(tmp_path / "out")
    t = LocalTransport(root)
    inner: list = []

    def progress(dump, done, total):
        if done and not inner:      # while the first copies: the whole second collect
            inner.extend(vmcore.collect(t, [f"{SID}/vmcore-{TS2}.elf"], vmcore.CollectOptions(to=out),
                                        index=vmcore.CollectIndex()))

    vmcore.collect(t, [f"{SID}/vmcore-{TS}.elf"], vmcore.CollectOptions(to=out, progress=progress),
                   index=vmcore.CollectIndex())
    assert inner and inner[0]["changed"] is True
    dest = os.path.join(out, "node-a", SID)
    files = json.load(open(os.path.join(dest, "manifest.json")))["files"]
    assert {f"vmcore-{TS}.elf", f"vmcore-{TS2}.elf"} <= set(files)
    sums = open(os.path.join(dest, "SHA256SUMS")).read()
    assert f"{sha(src1)}  vmcore-{TS}.elf" in sums and f"{sha(src2)}  vmcore-{TS2}.elf" in sums


def test_a_noop_collect_item_has_the_shape_of_a_copy(cli, tmp_path):
    """Review 7 #7: the second collect's item lacked storedSize, verification, resumed and
    transferredBytes (the table showed SIZE -)."""
    root = node_tree(tmp_path / "n")
    add_dump(root, data=os.urandom(4096))
    out = str(tmp_path / "out")
    first = cli(["--host-root", root, "vmcore", "collect", "--to", out, "--verify", "-o", "json"])
    assert first.exit_code == 0, first.stderr
    second = cli(["--host-root", root, "vmcore", "collect", "--to", out, "-o", "json"])
    assert second.exit_code == 0, second.stderr
    [a], [b] = first.json()["items"], second.json()["items"]
    assert set(a) == set(b) == ITEM_KEYS
    assert b["changed"] is False and b["resumed"] is False and b["transferredBytes"] == 0
    for k in ("storedSize", "sha256", "verification", "verified", "to", "compressedOn"):
        assert b[k] == a[k], k
    assert a["verification"] == "node-sha256sum"
    r = cli(["--host-root", root, "vmcore", "collect", "--to", out])
    assert r.exit_code == 0 and format_size(a["storedSize"]) in r.stdout, r.stdout


def test_delete_after_run_again_is_a_noop(cli, tmp_path, _isolated_home):
    """Review 7 #4: collect REF --delete-after run again (an Ansible re-run) exited 3 (the
    dump is gone from the node) though --to holds its verified copy. Now: changed false,
    the item of a copy; a ref that was never collected is still not found."""
    root = node_tree(tmp_path / "n")
    src = add_dump(root, data=os.urandom(4096))
    out = str(tmp_path / "out")
    for ref in (SID[:4], f"{SID}/vmcore-{TS}.elf", f"vmcore-{TS}.elf", "default/web-0"):
        if not os.path.exists(src):
            add_dump(root, data=os.urandom(4096))
        first = cli(["--host-root", root, "vmcore", "collect", ref, "--to", out, "--delete-after", "-o", "json"])
        assert first.exit_code == 0, first.stderr
        [a] = first.json()["items"]
        assert a["deleted"] is True and not os.path.exists(src)
        again = cli(["--host-root", root, "vmcore", "collect", ref, "--to", out, "--delete-after", "-o", "json"])
        assert again.exit_code == 0, (ref, again.stdout, again.stderr)
        d = again.json()
        assert d["changed"] is False
        [b] = d["items"]
        assert set(b) - {"note"} == ITEM_KEYS and b["changed"] is False and b["deleted"] is False
        assert (b["name"], b["to"], b["sha256"], b["storedSize"]) == (a["name"], a["to"], a["sha256"],
                                                                         a["storedSize"])
        assert "no longer on the node" in b["note"]
        shutil.rmtree(os.path.join(out, "node-a"))
    r = cli(["--host-root", root, "vmcore", "collect", "3f2a", "--to", out, "--delete-after"])
    assert r.exit_code == 3 and "no vmcore matches '3f2a'" in r.stderr
    r = cli(["--host-root", root, "vmcore", "collect", "nope", "--to", out])
    assert r.exit_code == 3
    assert not os.path.exists(os.path.join(root, DUMP_PATH.lstrip("/"), SID))
