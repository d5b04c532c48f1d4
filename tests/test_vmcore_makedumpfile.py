"""vmcore collect --makedumpfile: the node's temp file, --delete-after.

The real makedumpfile (installed here) cannot filter the test dumps (they have no
usable VMCOREINFO; the lab's QEMU 7.2 dumps neither), so these tests put a stand-in
program named makedumpfile first on the node's PATH. It behaves as the real one does
where katactl depends on it: ``-v`` prints a version; ``-c -d LEVEL IN OUT`` refuses an
existing OUT (makedumpfile.c check_dump_file: "Can't open the dump file (OUT). File
exists", exit 1), then writes OUT (here: a copy of the first MiB of IN); SLOW=1 makes it
take its time after writing, like the filtering of a big dump; GO=FILE makes it wait, after
writing, until FILE exists.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest

import katactl.vmcore.collection as collection

from tests.test_vmcore import DUMP_PATH, SID, TS, _audit_entries, add_dump, node_tree, sha

STAND_IN = r"""#!/bin/sh
[ "$1" = "-v" ] && { echo "makedumpfile: version 1.7.2 (stand-in)"; exit 0; }
if [ -e "$5" ]; then
  echo "check_dump_file: Can't open the dump file ($5). File exists" >&2
  echo "makedumpfile Failed." >&2
  exit 1
fi
head -c 1048576 "$4" > "$5"
[ -n "$SLOW" ] && exec sleep 60
if [ -n "$GO" ]; then while [ ! -e "$GO" ]; do sleep 0.05; done; fi
exit 0
"""


@pytest.fixture
def mdf(tmp_path, monkeypatch):
    """A node with one 4 MiB dump, and the stand-in makedumpfile first on PATH."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "makedumpfile").write_text(STAND_IN)
    (b / "makedumpfile").chmod(0o755)
    monkeypatch.setenv("PATH", f"{b}:{os.environ['PATH']}")
    root = node_tree(tmp_path / "node")
    src = add_dump(root, size_segments=((0x100000, 4 << 20),), data=os.urandom(4096))
    return root, src


def _tmps(src):
    return [n for n in os.listdir(os.path.dirname(src)) if n.startswith(".katactl-")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_filter_leaves_no_temp_file_on_the_node(tmp_path, mdf, monkeypatch, sig):
    """review5 #3: Ctrl-C (SIGINT to the process group, as a terminal sends it) while
    makedumpfile ran left <dump dir>/.katactl-<name>.tmp on the node's crash disk for good."""
    root, src = mdf
    monkeypatch.setenv("SLOW", "1")
    proc = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "collect",
                             "--to", str(tmp_path / "o"), "--makedumpfile", "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _tmps(src) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _tmps(src), proc.communicate()
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (130, -sig, 128 + sig), err
    assert _tmps(src) == []


def test_stale_temp_files_are_swept_by_the_node_clock_young_ones_left_alone(cli, tmp_path, mdf, monkeypatch):
    """review5 diffA #1: a temp file (all collects of a dump shared one name) younger than 10
    minutes was refused (exit 5) though its collect may be long dead, and its age was this
    client's clock minus the node's mtime: a client clock 15 minutes ahead removed a file
    another collect's makedumpfile was writing. Each collect has its own name now: a young
    foreign one is left alone and blocks nothing; old ones (by the node's clock) go, with a
    node-clock probe left by a killed collect. The client's clock runs 15 minutes ahead here."""
    root, src = mdf
    d = os.path.dirname(src)
    name = f"vmcore-{TS}.kdump"
    young = os.path.join(d, f".katactl-{name}.tmp")            # an older katactl's name, 5 minutes old
    old = os.path.join(d, f".katactl-{name}.0123456789ab.tmp")
    probe = os.path.join(d, f".katactl-{name}.0123456789ab.clock")
    for p in (young, old):
        with open(p, "wb") as f:
            f.write(b"left by a collect killed with -9")
    os.mkdir(probe)
    t = time.time()
    os.utime(young, (t - 300, t - 300))
    os.utime(old, (t - 3600, t - 3600))
    os.utime(probe, (t - 3600, t - 3600))
    ahead = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    ahead.time = lambda: time.time() + 900
    monkeypatch.setattr(collection, "time", ahead)
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "--makedumpfile", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["changed"] is True and os.path.getsize(it["to"]) == 1 << 20
    assert _tmps(src) == [os.path.basename(young)]


def test_a_long_copy_keeps_its_temp_file_from_another_collect(cli, tmp_path, mdf):
    """review5 diffA #1 (a): collect A copies its filtered temp file slowly (--bwlimit; reading
    does not modify it), so after 10 minutes it looked stale; collect B of the same dump removed
    it and wrote its own there, and A's cleanup removed B's. A collect now touches its own
    temp file while it uses it (HEARTBEAT, lowered in A's process; the file's backdated mtime
    stands for "A's copy has run for more than 10 minutes"), and B uses its own."""
    root, src = mdf
    code = ("import sys, katactl.vmcore.collection as c; c.HEARTBEAT = 0.05; "
            "from katactl.__main__ import run; sys.argv = ['katactl', *sys.argv[1:]]; run()")
    a = subprocess.Popen([sys.executable, "-c", code, "--host-root", root, "vmcore", "collect", "--to",
                          str(tmp_path / "a"), "--makedumpfile", "--bwlimit", "256Ki", "-o", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        tmp = None
        deadline = time.monotonic() + 60
        while a.poll() is None and time.monotonic() < deadline:
            names = _tmps(src)
            # makedumpfile done (the stand-in writes 1 MiB and exits): A copies at 256 KiB/s (4 s)
            if names and names[0].endswith(".tmp") and os.path.getsize(os.path.join(os.path.dirname(src), names[0])) == 1 << 20:
                tmp = os.path.join(os.path.dirname(src), names[0])
                break
            time.sleep(0.02)
        assert tmp, a.communicate()
        os.utime(tmp, (time.time() - 3600, time.time() - 3600))
        while a.poll() is None and time.monotonic() < deadline and os.stat(tmp).st_mtime < time.time() - 600:
            time.sleep(0.02)
        assert os.stat(tmp).st_mtime >= time.time() - 600, "A's temp file was not touched while in use"
        r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "b"), "--makedumpfile"])
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert r.exit_code == 0, r.stderr
    assert a.returncode == 0, err
    assert json.loads(out)["items"][0]["changed"] is True
    assert _tmps(src) == []


def test_a_temp_file_removed_under_a_collect_is_a_failure_not_not_found(tmp_path, mdf):
    """review5 diffA #1: a collect whose temp file was removed on the node (by another collect
    of the same dump, then sharing its name) failed with exit 3, "target not found", and the raw
    ENOENT of the temp path: the dump is there, the collect lost a race (exit 1)."""
    root, src = mdf
    go = tmp_path / "go"
    env = dict(os.environ, GO=str(go))
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "collect", "--to",
                          str(tmp_path / "o"), "--makedumpfile"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 60
        while not [n for n in _tmps(src) if n.endswith(".tmp")] and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        [name] = [n for n in _tmps(src) if n.endswith(".tmp")]
        os.unlink(os.path.join(os.path.dirname(src), name))
        go.touch()
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, err
    assert "was removed on node" in err and "no such file" not in err.lower(), err


def test_delete_after_works_with_makedumpfile(cli, tmp_path, mdf, _isolated_home):
    """review5 #4: --makedumpfile --delete-after filtered and copied, then refused (exit 5,
    'no source checksum recorded') on every run: the node now hashes the original first."""
    root, src = mdf
    want = sha(src)
    out = tmp_path / "o"
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(out), "--makedumpfile", "--delete-after",
             "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["deleted"] is True and it["changed"] is True and not os.path.exists(src)
    d = out / "node-a" / SID
    entry = json.loads((d / "manifest.json").read_text())["files"][f"vmcore-{TS}.kdump"]
    assert entry["source"]["sha256"] == want and entry["compress"] == "makedumpfile"
    assert not os.path.exists(os.path.join(root, DUMP_PATH.lstrip("/"), SID))
    [e] = [e for e in _audit_entries(_isolated_home) if e["action"] == "vmcore.collect"]
    assert e["result"] == "ok" and e["deleted"] is True


def test_delete_after_a_plain_makedumpfile_collect_says_why_not(cli, tmp_path, mdf):
    """A dump collected with --makedumpfile alone has no checksum of the original: a later
    --delete-after cannot tie the copy to it and says so (and what to do), keeping the dump."""
    root, src = mdf
    out = str(tmp_path / "o")
    assert cli(["--host-root", root, "vmcore", "collect", "--to", out, "--makedumpfile"]).exit_code == 0
    r = cli(["--host-root", root, "vmcore", "collect", "--to", out, "--makedumpfile", "--delete-after"])
    assert r.exit_code == 5 and "no checksum of the original" in r.stderr and "vmcore rm" in r.stderr, r.stderr
    assert os.path.exists(src)
