"""vmcore collect --makedumpfile: the node's temp file, --delete-after.

The real makedumpfile (installed here) cannot filter the test dumps (they have no
usable VMCOREINFO; the lab's QEMU 7.2 dumps neither), so these tests put a stand-in
program named makedumpfile first on the node's PATH. It behaves as the real one does
where katactl depends on it: ``-v`` prints a version; ``-c -d LEVEL IN OUT`` refuses an
existing OUT (makedumpfile.c check_dump_file: "Can't open the dump file (OUT). File
exists", exit 1), then writes OUT (here: a copy of the first MiB of IN); SLOW=1 makes it
take its time after writing, like the filtering of a big dump.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

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


def test_stale_temp_file_is_swept_a_fresh_one_refused(cli, tmp_path, mdf):
    """A temp file left by a collect killed with -9 (or an SSH drop) made every later
    --makedumpfile collect of that dump fail (makedumpfile refuses an existing output) and
    took room on the crash disk: the next collect removes it once it is stale; a fresh one
    may belong to a collect still running, and is refused (exit 5), not removed."""
    root, src = mdf
    name = f"vmcore-{TS}.kdump"
    tmp = os.path.join(os.path.dirname(src), f".katactl-{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(b"left by a collect killed with -9")
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "--makedumpfile"])
    assert r.exit_code == 5 and "may be writing it" in r.stderr, r.stderr
    assert os.path.exists(tmp)
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "--makedumpfile", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["changed"] is True and os.path.getsize(it["to"]) == 1 << 20
    assert _tmps(src) == []


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
