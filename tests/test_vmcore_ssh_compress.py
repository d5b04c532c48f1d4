"""vmcore collect --compress on the node (--compress-on), over real OpenSSH sshd nodes.

vcz has zstd, gzip, nice and ionice on its PATH (this machine's); vcn's sshd sets
a PATH (sshd_config SetEnv) where every program of /usr/bin is but zstd and gzip.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest

from katactl import config, vmcore
from katactl.errors import OperationFailed
from katactl.vmcore import collection
from tests.test_vmcore import SID, TS, add_dump, node_tree, sha

MISSING = {"zstd", "gzip", "gunzip", "zcat", "zstdcat", "zstdmt", "unzstd", "pzstd"}
SIZE = 24 << 20


def _dump_bytes() -> bytes:
    """QEMU-like: 1 MiB blocks, ~30 % random data, the rest zero pages."""
    rnd = os.urandom(1 << 20)
    return b"".join((rnd[i:] + rnd[:i]) if (i * 7) % 10 < 3 else bytes(1 << 20) for i in range(SIZE >> 20))


@pytest.fixture(scope="module")
def cnodes(sshd_lab, tmp_path_factory):
    if not (shutil.which("zstd") and shutil.which("gzip")):
        pytest.skip("zstd and gzip are needed on the node")
    nobin = tmp_path_factory.mktemp("nobin")
    for d in ("/usr/bin", "/bin"):
        for name in os.listdir(d) if os.path.isdir(d) else ():
            if name not in MISSING and not (nobin / name).exists():
                os.symlink(os.path.join(d, name), nobin / name)
    if "vcz" not in sshd_lab.nodes:
        sshd_lab.add_node("vcz", known="plain")
        sshd_lab.add_node("vcn", known="plain", env={"PATH": str(nobin)})
        sshd_lab.write_config()
        sshd_lab.wait_ready()
    data = _dump_bytes()
    out = {"lab": sshd_lab}
    for n in ("vcz", "vcn"):
        root = str(sshd_lab.nodes[n].root)
        node_tree(root)
        out[n] = add_dump(root, size_segments=((0, SIZE),), data=data)
    out["sha"] = hashlib.sha256(open(out["vcz"], "rb").read()).hexdigest()
    return out


def _args(c, node, *a):
    return ["-N", node, "--ssh-config", str(c["lab"].config), "vmcore", "collect", *a]


def _settings(c):
    return config.resolve({"ssh_config": str(c["lab"].config), "request_timeout": 10.0})


def _transport(c, node):
    from katactl.backends.ssh import SSHTransport

    return SSHTransport.from_settings(node, _settings(c))


def _content(path: str) -> bytes:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as g:
            return g.read()
    return subprocess.run(["zstd", "-q", "-dc", path], capture_output=True, check=True).stdout


def _no_compressor_left(path: str, timeout: float = 15.0) -> bool:
    """No process on this machine (the nodes' too) still reads path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["pgrep", "-f", path], capture_output=True)
        if r.returncode == 1:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("algo,ext", [("zstd", ".zst"), ("gzip", ".gz")])
def test_auto_compresses_on_the_node(cli, cnodes, tmp_path, algo, ext):
    out = tmp_path / "o"
    r = cli(_args(cnodes, "vcz", "--to", str(out), "--compress", algo, "--verify", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["compressedOn"] == "node" and it["compress"] == algo and it["changed"] is True
    assert it["to"] == str(out / "vcz" / SID / f"vmcore-{TS}.elf{ext}")
    # only the compressed bytes crossed the wire, and they are the stored file
    assert it["transferredBytes"] == it["storedSize"] == os.path.getsize(it["to"]) < SIZE // 2
    assert it["verified"] is True and it["verification"] == "node-sha256sum" and it["resumed"] is False
    assert hashlib.sha256(_content(it["to"])).hexdigest() == cnodes["sha"]
    assert sha(it["to"]) == it["sha256"]
    d = out / "vcz" / SID
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=d).returncode == 0
    entry = json.loads((d / "manifest.json").read_text())["files"][f"vmcore-{TS}.elf{ext}"]
    assert entry["sha256"] == it["sha256"] and entry["source"]["sha256"] == cnodes["sha"]
    assert entry["compress"] == algo and entry["size"] == it["storedSize"]
    assert not list(d.glob("*.partial*"))
    r = cli(_args(cnodes, "vcz", "--to", str(out), "--compress", algo, "-o", "json"))
    assert r.exit_code == 0 and r.json()["changed"] is False, r.stderr
    # compressing here instead lands on the same name: already collected
    r = cli(_args(cnodes, "vcz", "--to", str(out), "--compress", algo, "--compress-on", "local", "-o", "json"))
    assert r.exit_code == 0 and r.json()["changed"] is False, r.stderr


def test_node_compressor_runs_at_idle_priority(cnodes):
    with _transport(cnodes, "vcz") as t:
        tool = collection.node_compressor(t, "zstd")
    assert tool["argv"] == ["ionice", "-c3", "nice", "-n", "19", "zstd", "-q", "-c", "-3", "-T1", "--"]
    assert "zstandard" in tool["version"].lower()


def test_local_and_node_compression_agree(cnodes, tmp_path):
    """--compress-on local over SSH: the old way (raw bytes on the wire), the same content."""
    with _transport(cnodes, "vcz") as t:
        [loc] = vmcore.collect(t, [], vmcore.CollectOptions(to=str(tmp_path / "l"), compress="zstd",
                                                            compress_on="local"),
                               index=vmcore.CollectIndex(str(tmp_path / "idx")))
    assert loc["compressedOn"] == "local" and loc["transferredBytes"] == os.path.getsize(cnodes["vcz"])
    assert hashlib.sha256(_content(loc["to"])).hexdigest() == cnodes["sha"]


def _interrupt_at(nbytes):
    def stop(dump, done, total):
        if done >= nbytes:
            raise KeyboardInterrupt
    return stop


def _interrupted(c, tmp_path, algo="zstd", at=12 << 20):
    with _transport(c, "vcz") as t:
        with pytest.raises(KeyboardInterrupt):
            vmcore.collect(t, [], vmcore.CollectOptions(to=str(tmp_path / "o"), compress=algo,
                                                        progress=_interrupt_at(at)),
                           index=vmcore.CollectIndex(str(tmp_path / "idx")))
    ext = {"zstd": ".zst", "gzip": ".gz"}[algo]
    final = tmp_path / "o" / "vcz" / SID / f"vmcore-{TS}.elf{ext}"
    return final, str(final) + ".partial", str(final) + ".partial.json"


def _collect(c, tmp_path, algo="zstd", **kw):
    with _transport(c, "vcz") as t:
        [res] = vmcore.collect(t, [], vmcore.CollectOptions(to=str(tmp_path / "o"), compress=algo, **kw),
                               index=vmcore.CollectIndex(str(tmp_path / "idx")))
    return res


@pytest.mark.parametrize("algo", ["zstd", "gzip"])
def test_interrupted_then_resumed_sends_only_the_rest(cnodes, tmp_path, algo):
    final, part, side = _interrupted(cnodes, tmp_path, algo)
    assert not final.exists()
    kept = json.loads(open(side).read())["dstOffset"]
    assert 0 < kept == os.path.getsize(part)
    assert json.loads(open(side).read())["source"]["compressor"]["argv"][-1] == cnodes["vcz"]
    assert _no_compressor_left(cnodes["vcz"])    # closing the channel stopped the node's compressor
    res = _collect(cnodes, tmp_path, algo)
    assert res["compressedOn"] == "node" and res["resumed"] is True
    assert res["verification"] == "node-sha256sum" and res["verified"] is True
    assert res["transferredBytes"] == res["storedSize"] - kept       # the prefix was not sent again
    assert hashlib.sha256(_content(res["to"])).hexdigest() == cnodes["sha"]
    assert sha(res["to"]) == res["sha256"]
    assert not os.path.exists(part) and not os.path.exists(side)
    d = final.parent
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=d).returncode == 0
    assert json.loads((d / "manifest.json").read_text())["files"][final.name]["source"]["sha256"] == cnodes["sha"]


def test_killed_between_checkpoints_resumes_from_the_checkpoint(cnodes, tmp_path):
    """kill -9 leaves bytes past the last checkpoint (maybe torn): they are rewritten."""
    final, part, side = _interrupted(cnodes, tmp_path)
    st = json.loads(open(side).read())
    st["dstOffset"] = st["dstOffset"] // 2
    with open(side, "w") as f:
        json.dump(st, f)
    with open(part, "r+b") as f:
        f.seek(st["dstOffset"] + 10)
        f.write(b"torn write")
    res = _collect(cnodes, tmp_path)
    assert res["resumed"] is True and res["transferredBytes"] == res["storedSize"] - st["dstOffset"]
    assert hashlib.sha256(_content(res["to"])).hexdigest() == cnodes["sha"]


def test_partial_from_another_compressor_restarts_with_a_note(cnodes, tmp_path):
    final, part, side = _interrupted(cnodes, tmp_path)
    st = json.loads(open(side).read())
    st["source"]["compressor"]["version"] = "zstd v0.0.1 (another build)"
    with open(side, "w") as f:
        json.dump(st, f)
    res = _collect(cnodes, tmp_path)
    assert res["resumed"] is False and "another compressor" in res["note"]
    assert res["transferredBytes"] == res["storedSize"]
    assert hashlib.sha256(_content(res["to"])).hexdigest() == cnodes["sha"]


def test_corrupt_stored_prefix_is_discarded(cnodes, tmp_path):
    final, part, side = _interrupted(cnodes, tmp_path)
    with open(part, "r+b") as f:      # bit rot in the kept prefix
        f.seek(os.path.getsize(part) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(OperationFailed):
        _collect(cnodes, tmp_path)
    assert not os.path.exists(part) and not os.path.exists(side) and not final.exists()
    res = _collect(cnodes, tmp_path)
    assert res["resumed"] is False and hashlib.sha256(_content(res["to"])).hexdigest() == cnodes["sha"]


def test_auto_resumes_a_partial_compressed_here(cnodes, tmp_path, monkeypatch):
    """A partial compressed here (segments) is continued here, not thrown away."""
    monkeypatch.setattr(collection, "SEGMENT", 4 << 20)
    with _transport(cnodes, "vcz") as t:
        with pytest.raises(KeyboardInterrupt):
            vmcore.collect(t, [], vmcore.CollectOptions(to=str(tmp_path / "o"), compress="zstd", compress_on="local",
                                                        progress=_interrupt_at(12 << 20)),
                           index=vmcore.CollectIndex(str(tmp_path / "idx")))
    res = _collect(cnodes, tmp_path)
    assert res["compressedOn"] == "local" and res["resumed"] is True
    assert hashlib.sha256(_content(res["to"])).hexdigest() == cnodes["sha"]


def test_node_without_the_compressor(cli, cnodes, tmp_path):
    """auto falls back to compressing here; --compress-on node fails clearly, writing nothing."""
    out = tmp_path / "o"
    r = cli(_args(cnodes, "vcn", "--to", str(out), "--compress", "zstd", "--compress-on", "node", "-o", "json"))
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    doc = r.json()  # -N vcn: the list of a node selection, the node's failure in its errors
    assert doc["kind"] == "VmcoreCollectList" and doc["errors"][0]["node"] == "vcn"
    assert "zstd is not installed on node vcn" in doc["errors"][0]["error"]["message"]
    assert "--compress-on auto" in r.stderr
    assert not (out / "vcn" / SID / f"vmcore-{TS}.elf.zst").exists()
    assert not list((out / "vcn" / SID).glob("*.partial*")) if (out / "vcn" / SID).exists() else True
    r = cli(_args(cnodes, "vcn", "--to", str(out), "--compress", "zstd", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["compressedOn"] == "local" and it["transferredBytes"] == os.path.getsize(cnodes["vcn"])
    assert hashlib.sha256(_content(it["to"])).hexdigest() == cnodes["sha"]
    # the same node with gzip missing too: gzip falls back as well
    r = cli(_args(cnodes, "vcn", "--to", str(tmp_path / "g"), "--compress", "gzip", "--dry-run", "-o", "json"))
    assert r.exit_code == 0 and r.json()["items"][0]["compressedOn"] == "local", r.stderr


def test_dry_run_says_where(cli, cnodes, tmp_path):
    r = cli(_args(cnodes, "vcz", "--to", str(tmp_path / "o"), "--compress", "gzip", "--dry-run", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["compressedOn"] == "node" and it["dryRun"] is True and not (tmp_path / "o").exists()


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """zstd, gzip and openssl first on PATH as wrappers that log the priority they really
    run at (their own nice value and ionice class, inherited from whoever started them)
    and their arguments, then exec the real program."""
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    log = tmp_path / "prio.log"
    for prog in ("zstd", "gzip", "openssl"):
        real = shutil.which(prog)
        assert real, f"{prog} is installed here (.ci/run)"
        (wrap / prog).write_text(f'#!/bin/sh\necho "{prog} nice=$(nice) io=$(ionice) args=$*" >> {log}\n'
                                 f'exec {real} "$@"\n')
        (wrap / prog).chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrap}:{os.environ['PATH']}")

    def runs(prog):
        lines = log.read_text().splitlines() if log.exists() else []
        # the compressing runs: not version probes, not decompressions (-d, -dc)
        return [ln for ln in lines if ln.startswith(prog + " ") and "--version" not in ln
                and not any(a.startswith("-d") for a in ln.split("args=", 1)[1].split())]
    return runs


@pytest.mark.parametrize("compress_on", ["auto", "node"])
@pytest.mark.parametrize("algo", ["zstd", "gzip"])
def test_local_node_compresses_at_idle_priority(cli, tmp_path, watched, algo, compress_on):
    """review5 #6: katactl on the node itself (--host-root, the DaemonSet) compressed with
    zstd -T0 at normal priority (NI 0, ionice none) on every core, and hashed the dump
    (--verify) the same way; a remote node got ionice -c3 nice -n 19, one thread. Observed
    on the real processes."""
    root = node_tree(tmp_path / "n")
    src = add_dump(root, size_segments=((0, 4 << 20),), data=os.urandom(1 << 20))
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "--compress", algo,
             "--compress-on", compress_on, "--verify", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["compressedOn"] == "node" and _content(it["to"]) == open(src, "rb").read()
    [run] = watched(algo)
    assert "nice=19 io=idle" in run and (algo != "zstd" or "-T1" in run.split()), run
    [h] = watched("openssl")
    assert "nice=19 io=idle" in h and "dgst -sha256" in h, h


def test_local_node_in_process_compression_uses_one_core(cli, tmp_path, watched):
    """--compress-on local on the node itself: katactl's own process compresses (here
    with the zstd binary: no zstandard package), on one core, not -T0."""
    from katactl.vmcore.streams import zstd_backend

    if zstd_backend()[0] != "binary":
        pytest.skip("the zstandard package compresses in-process here")
    root = node_tree(tmp_path / "n")
    src = add_dump(root, size_segments=((0, 4 << 20),), data=os.urandom(1 << 20))
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "--compress", "zstd",
             "--compress-on", "local", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["compressedOn"] == "local" and _content(it["to"]) == open(src, "rb").read()
    [run] = watched("zstd")
    assert "-T1" in run.split() and "-T0" not in run.split(), run


# -- the transport piece: run_stream ------------------------------------------------
def test_ssh_run_stream(cnodes):
    with _transport(cnodes, "vcz") as t:
        assert b"".join(t.run_stream(["head", "-c", "3000000", "/dev/zero"], chunk_size=1 << 16)) == bytes(3000000)
        with pytest.raises(FileNotFoundError):
            list(t.run_stream(["no-such-program-here"]))
        with pytest.raises(OSError, match="nope"):
            list(t.run_stream(["sh", "-c", "echo data; echo nope >&2; exit 3"]))
        it = t.run_stream(["cat", "/dev/zero"])   # closed early: the channel (and cat) go away
        next(it)
        it.close()
        assert t.run(["true"]).returncode == 0


def test_local_run_stream(tmp_path):
    from katactl.backends.local import LocalTransport

    t = LocalTransport(str(tmp_path))
    assert b"".join(t.run_stream(["head", "-c", "3000000", "/dev/zero"])) == bytes(3000000)
    with pytest.raises(FileNotFoundError):
        list(t.run_stream(["no-such-program-here"]))
    with pytest.raises(OSError, match="nope"):
        list(t.run_stream(["sh", "-c", "echo nope >&2; exit 3"]))


def _alive(pid: int) -> bool:
    """pid runs (a zombie nobody reaped yet has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _pids(path, n: int, proc=None, timeout: float = 60.0) -> list[int]:
    """The n pids a wrapper wrote to path, once it has (a bounded wait, not a time assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text().split() if path.exists() else []
        if len(got) >= n:
            return [int(x) for x in got]
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path}: no {n} pids")


def _ended(pids: list[int], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, 9)
    return not left


def test_local_run_stream_cancel_ends_its_whole_process_group(tmp_path):
    """Review 7 #5: closing the stream while its reader thread is blocked reading (the
    process wrote nothing yet) killed nothing: the join gave up after 5 s, and a pipeline's
    processes went on. cancel() (Prefetch.close calls it) ends the process group."""
    from katactl.backends.local import LocalTransport
    from katactl.vmcore.streams import Prefetch

    pidfile = tmp_path / "pids"
    s = Prefetch(LocalTransport(str(tmp_path)).run_stream(
        ["sh", "-c", 'sleep 600 & echo $! > "$1"; echo $$ >> "$1"; wait', "sh", str(pidfile)]))
    pids = _pids(pidfile, 2)
    s.close()
    assert _ended(pids), "the stream's processes outlived its close()"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stop_or_kill_ends_the_local_nodes_compressor(tmp_path, _isolated_home, sig):
    """Review 7 #5: katactl on the node itself (--host-root) with --compress-on node, stopped
    by SIGTERM (systemd, Ansible, timeout(1)) while the compressor has not written yet (idle
    priority on a busy node; here a zstd that starts a child and waits): katactl exited 130,
    the compressor and its child went on with PPID 1. SIGKILL runs no cleanup of katactl's:
    the group's watcher sees its pipe end. Real processes, a real katactl."""
    import signal
    import sys

    real = shutil.which("zstd")
    if not real:
        pytest.skip("zstd not installed")
    slow = tmp_path / "slow"
    slow.mkdir()
    pidfile = tmp_path / "pids"
    (slow / "zstd").write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do case "$a" in --version|-d) exec {real} "$@";; esac; done\n'
        f'sleep 600 & echo $! >> {pidfile}\necho $$ >> {pidfile}\nwait\nexec {real} "$@"\n')
    (slow / "zstd").chmod(0o755)
    root = node_tree(tmp_path / "n")
    add_dump(root, size_segments=((0, 4 << 20),), data=os.urandom(1 << 20))
    env = dict(os.environ, PATH=f"{slow}:{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "collect", "--to",
                             str(tmp_path / "o"), "--compress", "zstd", "--compress-on", "node", "-o", "json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = _pids(pidfile, 2, proc)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == "SIGTERM":
        assert proc.returncode == 130, err
        assert json.loads(out)["code"] == "Interrupted"
    assert _ended(pids), "the compressor outlived katactl"
