"""vmcore collect under faults: the source vanishes or changes mid-copy, the destination
fills (a real small tmpfs), the copy is killed and resumed (a real katactl subprocess)."""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from katactl import vmcore
from katactl.backends.local import LocalTransport
from katactl.errors import OperationFailed
from katactl.vmcore import collection
from tests.test_vmcore import SID, TS, add_dump, node_tree, sha


def _opts(tmp_path, **kw):
    return vmcore.CollectOptions(to=str(tmp_path / "out"), **kw)


def _idx(tmp_path):
    return vmcore.CollectIndex(str(tmp_path / "index.jsonl"))


def _dest(tmp_path, suffix=""):
    return tmp_path / "out" / "node-a" / SID / f"vmcore-{TS}.elf{suffix}"


def _interrupted_collect(t, tmp_path, at: int, **kw) -> None:
    """A collect stopped (as by Ctrl-C) once ``at`` bytes have been copied: it leaves a partial."""
    def stop(dump, done, total):
        if done >= at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vmcore.collect(t, [], _opts(tmp_path, progress=stop, **kw), index=_idx(tmp_path))


@pytest.fixture
def big(tmp_path):
    """A 24 MiB dump with real data spread through it."""
    root = node_tree(tmp_path / "n")
    src = add_dump(root, size_segments=((0, 24 << 20),), data=os.urandom(12 << 20))
    return root, src


def test_source_vanishes_mid_copy(tmp_path, big):
    root, src = big
    seen = []

    def progress(dump, done, total):
        seen.append(done)
        if len(seen) == 3:
            os.unlink(src)          # deleted on the node while we stream it

    with pytest.raises(OperationFailed, match="vanished during the copy"):
        vmcore.collect(LocalTransport(root), [], _opts(tmp_path, progress=progress), index=_idx(tmp_path))
    assert not _dest(tmp_path).exists()                       # never presented as complete
    assert (tmp_path / "out/node-a" / SID / f"vmcore-{TS}.elf.partial").exists()
    assert not (tmp_path / "out/node-a" / SID / "manifest.json").exists()


def test_source_truncated_mid_copy(tmp_path, big):
    root, src = big

    def progress(dump, done, total):
        if 0 < done < 8 << 20 and os.path.getsize(src) > 8 << 20:
            os.truncate(src, 8 << 20)

    with pytest.raises(OperationFailed, match="shrank during the copy"):
        vmcore.collect(LocalTransport(root), [], _opts(tmp_path, progress=progress), index=_idx(tmp_path))
    assert not _dest(tmp_path).exists()


def test_source_rewritten_mid_copy(tmp_path, big):
    root, src = big

    def progress(dump, done, total):
        if done > 0:
            os.utime(src, (1, 1))     # a second writer touched it

    with pytest.raises(OperationFailed, match="changed during the copy"):
        vmcore.collect(LocalTransport(root), [], _opts(tmp_path, progress=progress), index=_idx(tmp_path))
    assert not _dest(tmp_path).exists()


@pytest.fixture
def small_fs(tmp_path):
    """A real 3 MiB tmpfs (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {p.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_collected_dump_is_a_no_op_in_a_read_only_destination(cli, tmp_path, big):
    """Review 7 (fixes): the copy's lock file came first and failed (EROFS), so re-checking a
    collection mounted read-only (an archive, a snapshot) was exit 1 instead of changed: false."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    root, _ = big
    to, ro = tmp_path / "to", tmp_path / "ro"
    ro.mkdir()
    first = cli(["--host-root", root, "vmcore", "collect", "--to", str(to), "-o", "json"])
    assert first.exit_code == 0, first.stderr
    p = subprocess.run(["mount", "--bind", str(to), str(ro)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot bind-mount: {p.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True)
        again = cli(["--host-root", root, "vmcore", "collect", "--to", str(ro), "-o", "json"])
        assert again.exit_code == 0, again.stderr
        assert [i["changed"] for i in again.json()["items"]] == [False]
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_destination_fills_mid_copy(cli, tmp_path, big, small_fs):
    root, src = big
    # incompressible data: gzip output outgrows the 3 MiB filesystem mid-stream
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs), "--compress", "gzip", "-o", "json"])
    assert r.exit_code == 1, r.stderr
    assert "is full" in r.stderr and "resume" in r.stderr and "Traceback" not in r.stderr
    assert r.json()["kind"] == "Error"
    dest = small_fs / "node-a" / SID
    assert not (dest / f"vmcore-{TS}.elf.gz").exists() and not (dest / "manifest.json").exists()
    assert os.path.exists(src)


@pytest.mark.parametrize("args,kept", [
    (["--force"], True),
    (["--compress", "gzip", "--compress-on", "local"], False),
    (["--compress", "zstd", "--compress-on", "node"], False),
])
def test_a_full_destination_says_what_the_partial_holds(cli, tmp_path, big, small_fs, args, kept):
    """Review 7 #6: every case said "0 of N bytes copied" beside a partial of ~3 MiB, and a
    compressed partial with no complete segment (or checkpoint) was kept though a resume
    drops it: it only kept the disk full. Now the bytes named are those in the file, and
    such a partial goes (with its record)."""
    if "zstd" in args and not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    root, src = big
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs), *args, "-o", "json"])
    assert r.exit_code == 1, r.stderr
    msg = r.json()["message"]
    assert "is full" in msg and "Traceback" not in r.stderr
    dest = small_fs / "node-a" / SID
    [part] = [p for p in dest.iterdir() if p.name.endswith(".partial")] if kept else [None]
    if kept:
        n = os.path.getsize(part)
        assert 0 < n and f"the partial copy {part.name} holds {n} bytes of the {os.path.getsize(src)}-byte dump" in msg
        assert (dest / (part.name + ".json")).exists()
    else:
        m = re.search(r"is full: (\d+) bytes of (gzip|zstd) data of the (\d+)-byte dump were written, none of "
                      r"them resumable \(.+\); the partial copy was removed", msg)
        assert m and int(m.group(1)) > 0 and int(m.group(3)) == os.path.getsize(src), msg
        assert not [p for p in dest.iterdir() if ".partial" in p.name]
        assert "from the start" in r.json()["hint"]


def test_destination_too_small_is_refused_up_front(cli, tmp_path, big, small_fs):
    root, _ = big
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs)])
    assert r.exit_code == 5 and "bytes free" in r.stderr
    # checked before anything of that dump is written: no metadata, no sidecar, no directory
    assert list(small_fs.rglob("*")) == []


def _wait_partial(part, proc, minimum, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if os.path.getsize(part) >= minimum:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    return False


def test_killed_then_resumed(tmp_path, big, _isolated_home):
    """kill -9 a real katactl mid-copy (rate-limited), then run it again: it resumes."""
    root, src = big
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "collect", "--to", str(out),
            "-o", "json"]
    proc = subprocess.Popen(argv + ["--bwlimit", "8Mi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = out / "node-a" / SID / f"vmcore-{TS}.elf.partial"
    try:
        assert _wait_partial(part, proc, 3 << 20), proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    size_at_kill = os.path.getsize(part)
    assert 0 < size_at_kill < os.path.getsize(src)
    final = out / "node-a" / SID / f"vmcore-{TS}.elf"
    assert not final.exists()
    # list does not call it collected
    r = subprocess.run([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "list", "-o", "json"],
                       capture_output=True, text=True)
    assert json.loads(r.stdout)["items"][0]["collected"] is False
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    [it] = json.loads(r.stdout)["items"]
    assert it["resumed"] is True and it["verification"] == "node-sha256sum" and it["verified"] is True
    assert sha(final) == sha(src) == it["sha256"]
    assert not part.exists() and not (out / "node-a" / SID / f"vmcore-{TS}.elf.partial.json").exists()


def test_corrupt_partial_is_detected_and_discarded(tmp_path, big):
    root, src = big
    t = LocalTransport(root)

    _interrupted_collect(t, tmp_path, 6 << 20)
    part = str(_dest(tmp_path)) + ".partial"
    with open(part, "r+b") as f:       # bit rot in the kept prefix
        f.seek(5 << 20)
        b = f.read(1)
        f.seek(5 << 20)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(OperationFailed, match="mismatch after resume"):
        vmcore.collect(t, [], _opts(tmp_path), index=_idx(tmp_path))
    assert not os.path.exists(part) and not _dest(tmp_path).exists()
    [res] = vmcore.collect(t, [], _opts(tmp_path), index=_idx(tmp_path))
    assert res["resumed"] is False and sha(res["to"]) == sha(src)


def test_resume_after_source_changed_starts_over(tmp_path, big):
    root, src = big
    t = LocalTransport(root)

    _interrupted_collect(t, tmp_path, 4 << 20)
    os.chmod(src, 0o600)
    with open(src, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"new bytes")
    [res] = vmcore.collect(t, [], _opts(tmp_path), index=_idx(tmp_path))
    assert res["resumed"] is False and sha(res["to"]) == sha(src)


@pytest.mark.parametrize("algo", ["gzip", "zstd"])
def test_compressed_resume_at_segment(tmp_path, big, monkeypatch, algo):
    if algo == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    monkeypatch.setattr(collection, "SEGMENT", 4 << 20)
    root, src = big
    t = LocalTransport(root)

    # compressed in katactl's process (on a local node auto runs the node's compressor)
    _interrupted_collect(t, tmp_path, 10 << 20, compress=algo, compress_on="local")
    suffix = {"gzip": ".gz", "zstd": ".zst"}[algo]
    side = json.loads(open(str(_dest(tmp_path, suffix)) + ".partial.json").read())
    assert side["srcOffset"] >= 8 << 20 and side["srcOffset"] % (4 << 20) == 0   # whole segments only
    [res] = vmcore.collect(t, [], _opts(tmp_path, compress=algo, compress_on="local"), index=_idx(tmp_path))
    assert res["resumed"] is True and res["verified"] is True
    if algo == "gzip":
        with gzip.open(res["to"], "rb") as g:
            data = g.read()
    else:
        data = subprocess.run(["zstd", "-dc", res["to"]], capture_output=True, check=True).stdout
    assert hashlib.sha256(data).hexdigest() == sha(src)
    assert sha(res["to"]) == res["sha256"]


def test_resume_without_sha256sum_on_node_rehashes_the_prefix(tmp_path, big, monkeypatch):
    root, src = big
    t = LocalTransport(root)

    _interrupted_collect(t, tmp_path, 8 << 20)
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))          # the node has no sha256sum
    [res] = vmcore.collect(t, [], _opts(tmp_path), index=_idx(tmp_path))
    assert res["resumed"] is True and res["verification"] == "prefix-rehash"
    assert sha(res["to"]) == sha(src)


@pytest.mark.parametrize("program", ["openssl", "python3"])
def test_resume_hashes_on_the_node_with_openssl_or_python3_without_sha256sum(tmp_path, big, monkeypatch, program):
    """The node's fastest SHA-256 (OpenSSL's, ~4x coreutils here) serves a node that has
    no sha256sum: a full node-side hash, not a prefix re-read through the transport."""
    root, src = big
    t = LocalTransport(root)

    _interrupted_collect(t, tmp_path, 8 << 20)
    only = tmp_path / "bin"
    only.mkdir()
    # (python3 on PATH may be a pyenv shim, a shell script: link the interpreter itself)
    real = os.path.realpath(sys.executable) if program == "python3" else shutil.which(program)
    assert real, f"{program} is installed here (.ci/run)"
    (only / program).symlink_to(real)
    monkeypatch.setenv("PATH", str(only))          # the node has this program and no sha256sum
    [res] = vmcore.collect(t, [], _opts(tmp_path), index=_idx(tmp_path))
    assert res["resumed"] is True and res["verification"] == "node-sha256sum" and res["verified"] is True
    assert sha(res["to"]) == sha(src) == res["sha256"]


def test_verify_flag_checks_fresh_copy_against_node(cli, tmp_path, big):
    root, src = big
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "--verify", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["verification"] == "node-sha256sum" and it["sha256"] == sha(src)


def test_ctrl_c_is_in_the_audit_log(tmp_path, big, _isolated_home):
    """review5 #7: Ctrl-C (SIGINT to a real katactl mid-copy) exited 130 and kept the partial,
    but wrote no audit entry (KeyboardInterrupt is no Exception)."""
    from tests.test_vmcore import _audit_entries

    root, _ = big
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "collect", "--to",
                             str(out), "--bwlimit", "8Mi", "-o", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    part = out / "node-a" / SID / f"vmcore-{TS}.elf.partial"
    try:
        assert _wait_partial(part, proc, 3 << 20), proc.communicate()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and part.exists()
    [e] = _audit_entries(_isolated_home)
    assert e["action"] == "vmcore.collect" and e["target"] == f"{SID}/vmcore-{TS}.elf"
    assert e["result"] == "interrupted" and e["changed"] is False


def test_sparse_source_that_fits_is_copied(cli, tmp_path, small_fs):
    """review5 #9: the check compared the apparent size (24 MiB) with the free space although
    the copy is written sparse: a dump whose data fits (1 MiB on disk here) was refused with
    a false 'needs 25165824 more'. The need is now the source's allocated size."""
    root = node_tree(tmp_path / "n")
    src = add_dump(root, size_segments=((0, 24 << 20),), data=os.urandom(1 << 20))
    assert os.stat(src).st_blocks * 512 < 2 << 20                  # sparse on the node
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs), "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert sha(it["to"]) == sha(src) and os.stat(it["to"]).st_blocks * 512 < 2 << 20


def test_allocated_zero_pages_are_refused_then_forced(cli, tmp_path, small_fs):
    """A dump QEMU wrote in full (zero pages allocated, as dump.c writes them): its allocated
    size does not fit, so it is refused with a need stated as an upper bound; --force copies
    it anyway, and the copy (zero pages as holes) fits."""
    root = node_tree(tmp_path / "n")
    src = add_dump(root, size_segments=((0, 24 << 20),), data=os.urandom(1 << 20))
    os.chmod(src, 0o600)
    with open(src, "r+b") as f:                                     # allocate every zero page
        f.seek(1 << 20)
        f.write(bytes(os.path.getsize(src) - (1 << 20) - f.tell() + (1 << 20)))
    assert os.stat(src).st_blocks * 512 >= 24 << 20
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs)])
    assert r.exit_code == 5 and "may need up to" in r.stderr and "zero pages become holes" in r.stderr, r.stderr
    assert "--force" in r.stderr and list(small_fs.rglob("*")) == []
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs), "--force", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert sha(it["to"]) == sha(src)


def _fill(path, leave: int = 0) -> None:
    """Write to path until the filesystem is full (ENOSPC), then give back ``leave`` pages."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
        os.ftruncate(fd, os.fstat(fd).st_size - leave * 4096)
    finally:
        os.close(fd)


def _audit(home):
    log = home / "state" / "katactl" / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("compress,on,leave,kept", [("none", "local", 0, True), ("gzip", "local", 1, False),
                                                    ("gzip", "local", 2, True), ("gzip", "node", 1, True)])
def test_a_disk_full_while_the_manifest_is_written_keeps_a_resumable_copy(tmp_path, small_fs, _isolated_home,
                                                                          compress, on, leave, kept):
    """Review 11 #5: the disk filled after the dump was renamed into place, while SHA256SUMS
    and then manifest.json were written: a bare "No space left on device", the dump under its
    final name and in SHA256SUMS but no manifest.json (list: not collected), an audit entry
    changed: false, and a re-run copied all of it again. Now both manifest files are written
    before the dump is committed: nothing is presented as collected, the error names the
    destination, and the complete copy is kept as .partial for the re-run to resume from
    (nothing crosses the wire). A compressed copy is kept when its last checkpoint, all of it,
    was saved, else it is removed: a resume would start from zero. ``leave``: the pages given
    back once every byte of the dump went to the writer; the node's gzip output is on disk by
    then, gzip here still in its buffer (one page of it); the checkpoint needs one."""
    root = node_tree(tmp_path / "n")
    # compressed: 128 KiB of zeros, so that the compressed copy fits in one page
    src = (add_dump(root, size_segments=((0, 1 << 20),), data=os.urandom(1 << 20)) if compress == "none"
           else add_dump(root, size_segments=((0, 128 << 10),)))
    t = LocalTransport(root)
    dest = small_fs / "node-a" / SID
    stored = f"vmcore-{TS}.elf" + (".gz" if compress == "gzip" else "")
    filler = small_fs / "filler"

    def fill(dump, done, total):
        if done == total:           # every byte of the dump is handed to the writer: the disk fills now
            _fill(filler, leave)

    def opts(**kw):
        return vmcore.CollectOptions(to=str(small_fs), force=True, compress=compress, compress_on=on, **kw)

    with pytest.raises(OperationFailed) as ei:
        vmcore.collect(t, [], opts(progress=fill), index=_idx(tmp_path))
    e = ei.value
    assert f"destination {dest} is full" in e.message and "manifest" in e.message, e.message
    left = sorted(os.listdir(dest))
    assert stored not in left and "SHA256SUMS" not in left and "manifest.json" not in left, left
    assert not [n for n in left if n.endswith(".tmp")], left
    if kept:
        assert "resume" in (e.hint or ""), e.hint
        part = dest / f"{stored}.partial"
        if compress == "none":
            assert os.path.getsize(part) == os.path.getsize(src)
        else:       # its checkpoint covers all of it
            assert json.loads((dest / f"{stored}.partial.json").read_text())["dstOffset"] == os.path.getsize(part)
    else:
        assert "from the start" in (e.hint or "") and not [n for n in left if ".partial" in n], (e.hint, left)
    entry = _audit(_isolated_home)[-1]
    assert entry["result"] == "error" and entry["changed"] is False and "is full" in entry["error"]

    os.unlink(filler)
    [it] = vmcore.collect(t, [], opts(), index=_idx(tmp_path))
    assert it["changed"] and it["to"] == str(dest / stored)
    if kept:
        assert it["resumed"] and it["transferredBytes"] == 0 and it["verification"] == "node-sha256sum"
    else:
        assert not it["resumed"]
    with (gzip.open(it["to"]) if compress == "gzip" else open(it["to"], "rb")) as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha(src)
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest).returncode == 0
    assert stored in json.loads((dest / "manifest.json").read_text())["files"]


def test_a_failure_after_the_commit_is_audited_as_a_change(tmp_path, big, _isolated_home):
    """Review 11 #5: a collect that failed once the dump was in place (its index entry could
    not be written here) was audited changed: false, though the dump and its manifest were
    written."""
    root, src = big
    index = tmp_path / "index.jsonl"
    index.mkdir()                   # the index cannot be appended to
    with pytest.raises(OSError):
        vmcore.collect(LocalTransport(root), [], _opts(tmp_path), index=vmcore.CollectIndex(str(index)))
    assert sha(_dest(tmp_path)) == sha(src)
    [entry] = _audit(_isolated_home)
    assert entry["result"] == "error" and entry["changed"] is True


def test_a_dry_run_checks_free_space_like_the_real_run(cli, tmp_path, big, small_fs):
    """Review 11 #6: collect --dry-run said changed: true, exit 0, for an uncompressed copy the
    real run refuses (exit 5) for want of space."""
    root, _ = big
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs), "--dry-run", "-o", "json"])
    assert r.exit_code == 5 and "bytes free" in r.json()["message"], r.stdout
    assert list(small_fs.rglob("*")) == []
    # what the real run copies (--force, or compressed: no check) the dry run predicts as a change
    for args in (["--force"], ["--compress", "gzip"]):
        r = cli(["--host-root", root, "vmcore", "collect", "--to", str(small_fs), "--dry-run", *args, "-o", "json"])
        assert r.exit_code == 0, r.stderr
        assert [(i["changed"], i["dryRun"]) for i in r.json()["items"]] == [(True, True)]
    assert list(small_fs.rglob("*")) == []


def test_a_large_file_in_state_streams(tmp_path):
    """Review 11 #7: every file under the dump's state/ (node-controlled: the runtime's
    ``cp -ar`` of the sandbox's state) was read whole into memory, all at once: a 512 MiB
    file there cost 1 GiB of RSS. A large file streams now, small ones are read in batches. tracemalloc counts bytes, not time; in a
    process of its own, since it counts every thread's allocations."""
    root = node_tree(tmp_path / "n")
    src = add_dump(root)
    big_state = os.path.join(os.path.dirname(src), "state", "big.log")
    with open(big_state, "wb") as f:
        for _ in range(12):
            f.write(os.urandom(4 << 20))
    small = {}      # 24 MiB of small files: read in batches, not all at once
    for i in range(48):
        small[f"state/logs/{i:02d}.log"] = data = os.urandom(512 << 10)
        os.makedirs(os.path.join(os.path.dirname(src), "state", "logs"), exist_ok=True)
        with open(os.path.join(os.path.dirname(src), f"state/logs/{i:02d}.log"), "wb") as f:
            f.write(data)
    probe = (
        "import json, sys, tracemalloc\n"
        "from katactl import vmcore\n"
        "from katactl.backends.local import LocalTransport\n"
        "tracemalloc.start()\n"
        "[it] = vmcore.collect(LocalTransport(sys.argv[1]), [], vmcore.CollectOptions(to=sys.argv[2]),\n"
        "                      index=vmcore.CollectIndex(sys.argv[3]))\n"
        "peak = tracemalloc.get_traced_memory()[1]\n"
        "print(json.dumps({'peak': peak, 'to': it['to']}))\n")
    r = subprocess.run([sys.executable, "-c", probe, root, str(tmp_path / "out"), str(tmp_path / "i.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["peak"] < 24 << 20, f"peak {out['peak'] >> 20} MiB for 72 MiB in state/"
    dest = os.path.dirname(out["to"])
    assert sha(os.path.join(dest, "state", "big.log")) == sha(big_state)
    files = json.loads(open(os.path.join(dest, "manifest.json")).read())["files"]
    assert files["state/big.log"] == {"size": 48 << 20, "sha256": sha(big_state), "kind": "metadata"}
    for rel, data in small.items():
        assert files[rel]["sha256"] == hashlib.sha256(data).hexdigest() == sha(os.path.join(dest, rel))
