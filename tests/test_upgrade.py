"""katactl upgrade: stage / switch / rollback / gc on real files (--host-root node trees)."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import threading

import pytest

from tests import upgrade_fixtures as fx
from tests._pty import run_on_pty

A, B, C = "3.1.0", "3.2.0", "3.3.0-rc0"


@pytest.fixture(scope="session")
def tarballs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tarballs")
    out = {
        "xz": fx.make_tarball(str(d), A, str(d), compression="xz", gnu_tar=bool(shutil.which("tar"))),
        "gz": fx.make_tarball(str(d), C, str(d), compression="gz"),
        "tar": fx.make_tarball(str(d), "3.0.9", str(d), compression="tar"),
        "nomanifest": fx.make_tarball(str(d), "3.4.0", str(d), compression="gz", manifest=False),
        "noversion": fx.make_tarball(str(d), "9.9.9", str(d), compression="gz", name="kata.tar.gz"),
    }
    if shutil.which("zstd"):
        out["zst"] = fx.make_tarball(str(d), B, str(d), compression="zst")
    else:  # zstd is needed for .tar.zst; the rest of the suite still runs with a .xz B
        out["zst"] = fx.make_tarball(str(d), B, str(d), compression="xz")
    out["dir"] = d
    return out


@pytest.fixture
def node(tmp_path):
    n = tmp_path / "node"
    (n / "proc").mkdir(parents=True)  # a node tree whose /proc shows no processes
    return n


def rel(node, v=""):
    return node / "opt/kata/releases" / v


def K(cli, node, *args):
    return cli(["--host-root", str(node), "upgrade", *args])


def J(cli, node, *args):
    r = K(cli, node, *args, "-o", "json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.json()


def current(node):
    try:
        return os.readlink(node / "opt/kata/current")
    except FileNotFoundError:
        return None


def nothing_staged(node):
    r = rel(node)
    return not r.exists() or [n for n in os.listdir(r) if n != ".katactl"] == []


# -- stage ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,version", [("xz", A), ("zst", B), ("gz", C), ("tar", "3.0.9")])
def test_stage_each_format_is_verified_rebased_and_idempotent(cli, node, tarballs, fmt, version):
    if fmt == "zst" and not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    d = J(cli, node, "stage", tarballs[fmt])
    assert d["kind"] == "UpgradeStage" and d["changed"] is True and d["dryRun"] is False
    assert d["version"] == version and d["verifiedBy"] == ["manifest SHA256SUMS"]
    r = rel(node, version)
    assert (r / "bin/containerd-shim-kata-v2").stat().st_mode & 0o111
    assert os.readlink(r / "share/kata-containers/vmlinux.container") == f"vmlinux-6.1.62-{version}"
    cfg = (r / "share/defaults/kata-containers/configuration-qemu.toml").read_text()
    assert f'kernel = "/opt/kata/releases/{version}/share/kata-containers/vmlinux.container"' in cfg
    assert f'valid_hypervisor_paths = ["/opt/kata/releases/{version}/bin/qemu-system-x86_64"]' in cfg
    assert os.path.islink(r / "share/defaults/kata-containers/configuration.toml")
    record = json.loads((r / ".katactl-release.json").read_text())
    assert record["version"] == version and len(record["sourceSha256"]) == 64
    assert not [n for n in os.listdir(rel(node)) if n.startswith(".staging")]
    again = J(cli, node, "stage", tarballs[fmt])
    assert again["changed"] is False


def test_stage_dry_run_writes_nothing(cli, node, tarballs):
    """Not even the releases directory: a node that never had a release is left as it was
    (free space is read on the nearest existing ancestor)."""
    d = J(cli, node, "stage", tarballs["xz"], "--dry-run")
    assert d["changed"] is True and d["dryRun"] is True
    assert not (node / "opt").exists()


@pytest.mark.parametrize("blocker", ["opt", "opt/kata", "opt/kata/releases"])
def test_stage_dry_run_fails_like_the_run_when_the_kata_root_is_blocked_by_a_file(cli, node, tarballs, blocker):
    """review5 diffA #5: a file where a directory of the kata root would be made the real run
    fail ('Not a directory', exit 1) while the dry run walked past it and said 0. The dry run
    now stops at the first existing component and fails the same way (and writes nothing)."""
    f = node / blocker
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"")
    before = sorted(p.relative_to(node) for p in node.rglob("*"))
    dry = K(cli, node, "stage", tarballs["xz"], "--dry-run", "-o", "json")
    assert sorted(p.relative_to(node) for p in node.rglob("*")) == before
    real = K(cli, node, "stage", tarballs["xz"], "-o", "json")
    assert real.exit_code == 1, real.stderr
    assert dry.exit_code == 1, dry.stdout
    assert dry.json()["message"] == real.json()["message"], (dry.stderr, real.stderr)
    assert "Traceback" not in dry.stderr + real.stderr


def test_stage_directory_with_version_file(cli, node, tmp_path):
    root = fx.build_tree(str(tmp_path / "src"), "4.0.0-dev", version_file=True)
    d = J(cli, node, "stage", root)
    assert d["version"] == "4.0.0-dev" and d["changed"] is True
    assert (rel(node, "4.0.0-dev") / "VERSION").read_text().strip() == "4.0.0-dev"
    assert J(cli, node, "stage", root)["changed"] is False


def _hardlinked_tarball(tmp_path, version, link, target, *, same_content=False):
    """A manifest-carrying kata-static tarball whose member ``link`` is a hard link to ``target``;
    the manifest lists ``link``'s own content: the fixture's, or ``target``'s (``same_content``)."""
    import tarfile

    root = fx.build_tree(str(tmp_path / "t"), version)
    if same_content:
        shutil.copy(f"{root}/{target}", f"{root}/{link}")
        fx.write_manifest(root)
    out = str(tmp_path / f"kata-static-{version}-amd64.tar.gz")
    with tarfile.open(out, "w:gz") as tf:
        for d, dirs, files in os.walk(tmp_path / "t/opt"):
            dirs.sort()
            for n in sorted(files):
                arc = "./" + os.path.relpath(os.path.join(d, n), tmp_path / "t")
                if arc != f"./opt/kata/{link}":
                    tf.add(os.path.join(d, n), arcname=arc, recursive=False)
        ti = tarfile.TarInfo(f"./opt/kata/{link}")
        ti.type, ti.linkname = tarfile.LNKTYPE, f"./opt/kata/{target}"
        tf.addfile(ti)
    return out


def test_stage_checks_a_hard_link_against_its_own_manifest_line(cli, node, tmp_path):
    """A hard link whose target's content is not what SHA256SUMS lists for the link itself
    is refused (it is not "verified by the manifest"); one with the listed content is staged."""
    link, target = "bin/kata-runtime", "bin/qemu-system-x86_64"
    tb = _hardlinked_tarball(tmp_path / "bad", "7.0.0", link, target)
    r = K(cli, node, "stage", tb, "-o", "json")
    assert r.exit_code == 5, (r.stdout, r.stderr)
    assert f"{link}: sha256 mismatch with SHA256SUMS" in r.stderr and r.stderr.count("\n") == 1
    assert nothing_staged(node)
    assert not [n for n in os.listdir(rel(node)) if n.startswith(".staging")]
    tb = _hardlinked_tarball(tmp_path / "good", "7.0.1", link, target, same_content=True)
    d = J(cli, node, "stage", tb)
    assert d["verifiedBy"] == ["manifest SHA256SUMS"]
    assert (rel(node, "7.0.1") / link).read_bytes() == (rel(node, "7.0.1") / target).read_bytes()


def test_stage_counts_a_hard_link_as_the_copy_it_writes(cli, node, tmp_path):
    """review 7 #5: hard-link members counted 0 bytes in the space check (and "bytes"), but
    each is written as a full copy of its target, so --reserve did not hold: the releases
    filesystem filled up. Now "bytes" (dry run, run and record alike) is what is written."""
    link, target = "bin/kata-runtime", "bin/qemu-system-x86_64"
    tb = _hardlinked_tarball(tmp_path, "7.0.2", link, target, same_content=True)
    tree = tmp_path / "t/opt/kata"
    assert os.path.getsize(tree / target) > 0
    sizes = [os.lstat(os.path.join(d, n)) for d, _, fs in os.walk(tree) for n in fs]
    want = sum(st.st_size for st in sizes if stat.S_ISREG(st.st_mode))  # the link: as its copy
    assert J(cli, node, "stage", tb, "--dry-run")["bytes"] == want
    assert J(cli, node, "stage", tb)["bytes"] == want
    assert json.loads((rel(node, "7.0.2") / ".katactl-release.json").read_text())["bytes"] == want

def _stage_while_source_changes(node, change, *args):
    """``upgrade stage *args`` with the source changed by change() after stage has read and
    checked it, while it waits for the node lock we hold (as a tree still being rsynced,
    or a tarball replaced in place, would change under it); returns (exit code, stderr)."""
    state = rel(node, ".katactl")
    state.mkdir(parents=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        p = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", str(node), "upgrade", "stage",
                              *map(str, args), "--lock-timeout", "120"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stderr.readline()
        assert "waiting for the upgrade lock" in line, line
        change()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _, err = p.communicate(timeout=120)
    return p.returncode, line + err


def test_stage_refuses_a_directory_source_that_changes_after_its_check(node, tmp_path):
    """The symlink target written is the one validated: a tree whose symlink now escapes the
    release is refused, not staged as "verified by the manifest"."""
    root = fx.build_tree(str(tmp_path / "src"), "7.1.0")
    link = f"{root}/share/kata-containers/vmlinux.container"

    def change():
        os.remove(link)
        os.symlink("/etc/shadow", link)

    code, err = _stage_while_source_changes(node, change, root, "--as", "7.1.0")
    assert code == 5, err
    assert "changed while it was being staged" in err and "vmlinux.container" in err
    assert nothing_staged(node)
    assert not [n for n in os.listdir(rel(node)) if n.startswith(".staging")]


def test_stage_refuses_a_tarball_replaced_after_its_sha256_check(node, tmp_path):
    """The archive extracted is the one whose sha256 was verified: the extracting read is
    hashed too, so a tarball rewritten in place (same members and sizes, other bytes) is
    refused before the release is renamed into place."""
    import hashlib
    import tarfile

    tree = tmp_path / "t"
    fx.build_tree(str(tree), "7.2.0", manifest=False)
    tb = tmp_path / "kata-static-7.2.0-amd64.tar.gz"

    def pack():
        with tarfile.open(tb, "w:gz") as tf:
            tf.add(str(tree / "opt"), arcname="./opt")

    pack()
    sha = hashlib.sha256(tb.read_bytes()).hexdigest()
    kernel = tree / "opt/kata/share/kata-containers/vmlinux-6.1.62-7.2.0"

    def change():
        kernel.write_bytes(b"X" * kernel.stat().st_size)
        pack()

    code, err = _stage_while_source_changes(node, change, tb, "--sha256", sha)
    assert code == 5, err
    assert "changed while it was being staged" in err and f"verified {sha}" in err
    assert nothing_staged(node)
    assert not [n for n in os.listdir(rel(node)) if n.startswith(".staging")]


def test_stage_a_tarball_listing_a_directory_twice(cli, node, tmp_path):
    """tar archives may list a directory again (appending, incremental dumps): it is one
    directory, not a source that changed between the check and the extraction."""
    import tarfile

    fx.build_tree(str(tmp_path / "t"), "7.3.0")
    tb = tmp_path / "kata-static-7.3.0-amd64.tar.gz"
    with tarfile.open(tb, "w:gz") as tf:
        tf.add(str(tmp_path / "t/opt"), arcname="./opt")
        tf.add(str(tmp_path / "t/opt/kata/bin"), arcname="./opt/kata/bin", recursive=False)
    d = J(cli, node, "stage", tb)
    assert d["changed"] is True and d["verifiedBy"] == ["manifest SHA256SUMS"]


def test_stage_sha256_option_and_sidecar(cli, node, tarballs, tmp_path):
    tb = tarballs["nomanifest"]
    r = K(cli, node, "stage", tb)
    assert r.exit_code == 5 and "nothing to verify" in r.stderr
    good = fx.hashlib.sha256(open(tb, "rb").read()).hexdigest()
    bad = "0" * 64
    r = K(cli, node, "stage", tb, "--sha256", bad)
    assert r.exit_code == 5 and "sha256 mismatch" in r.stderr
    assert nothing_staged(node)
    d = J(cli, node, "stage", tb, "--sha256", good.upper())
    assert d["verifiedBy"] == ["sha256 (--sha256)"]
    # a sidecar file next to the tarball is honoured too
    copy = tmp_path / "kata-static-3.4.1-amd64.tar.gz"
    shutil.copy(tb, copy)
    (tmp_path / (copy.name + ".sha256")).write_text(f"{bad}  {copy.name}\n")
    r = K(cli, node, "stage", copy)
    assert r.exit_code == 5 and "sidecar" in r.stderr
    (tmp_path / (copy.name + ".sha256")).write_text(f"{good}  {copy.name}\n")
    assert J(cli, node, "stage", copy)["version"] == "3.4.1"
    d = J(cli, node, "stage", tarballs["nomanifest"], "--no-verify", "--as", "3.4.0-unverified")
    assert d["verifiedBy"] == ["nothing (--no-verify)"]


def test_stage_manifest_mismatch_refused(cli, node, tmp_path):
    root = fx.build_tree(str(tmp_path / "t"), "5.0.0")
    with open(os.path.join(root, "bin/kata-runtime"), "a") as f:
        f.write("# tampered after the manifest was written\n")
    tb = tmp_path / "kata-static-5.0.0-amd64.tar.gz"
    import tarfile

    with tarfile.open(tb, "w:gz") as tf:
        tf.add(str(tmp_path / "t/opt"), arcname="./opt")
    r = K(cli, node, "stage", tb, "-o", "json")
    assert r.exit_code == 5 and "sha256 mismatch" in r.stderr
    assert r.json()["kind"] == "Error"
    assert nothing_staged(node)
    assert not [n for n in os.listdir(rel(node)) if n.startswith(".staging")]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink-escape", "symlink-absolute",
                                  "symlink-write-through", "symlink-chain", "hardlink-escape",
                                  "device", "fifo", "file-then-dir", "file-then-child", "deep-path"])
def test_evil_tarballs_refused_and_nothing_written(cli, node, tmp_path, kind):
    tb = fx.evil_tarball(str(tmp_path / "kata-static-6.6.6-amd64.tar.gz"), kind)
    before = set(os.listdir("/tmp"))
    r = K(cli, node, "stage", tb, "--no-verify")
    assert r.exit_code == 5, (kind, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") <= 2
    assert ".staging" not in r.stderr  # the archive's fault is named, not a temp path
    assert not os.path.exists("/tmp/katactl-pwned") and not os.path.exists("/tmp/katactl-pwned-abs")
    assert set(os.listdir("/tmp")) - before == set() or all(
        not n.startswith("katactl-pwned") for n in set(os.listdir("/tmp")) - before)
    assert nothing_staged(node)


@pytest.mark.parametrize("args,code,msg", [
    (["/nonexistent/kata.tar.xz"], 2, "no such file"),
    ([""], 2, "empty SOURCE"),                      # not "the current directory"
    (["  "], 2, "empty SOURCE"),
    (["@TEXT@"], 2, "not a tar archive"),
    (["@NOVERSION@"], 2, "--as VERSION"),
    (["@XZ@", "--as", "../x"], 2, "invalid --as"),
    (["@XZ@", "--as", "current"], 2, "invalid --as"),
    (["@XZ@", "--as", ""], 2, "invalid --as"),
    (["@XZ@", "--as", "a b"], 2, "invalid --as"),
    (["@XZ@", "--as", "x" * 65], 2, "invalid --as"),
    (["@XZ@", "--as", "1.0\n"], 2, "invalid --as"),       # created releases/1.0\n ($ before a newline)
    (["@XZ@", "--sha256", "a" * 64 + "\n"], 2, "invalid --sha256"),
    (["@XZ@", "--sha256", "abc"], 2, "invalid --sha256"),
    (["@XZ@", "--reserve", "lots"], 2, "--reserve"),
    (["@XZ@", "--reserve", "-1Gi"], 2, "--reserve"),
    (["@XZ@", "--reserve", "1000Ti"], 5, "not enough space"),
    (["@XZ@", "--lock-timeout", "soon"], 2, "--lock-timeout"),
    (["@XZ@", "--lock-timeout="], 2, "empty --lock-timeout"),  # not "the default"
    (["@TRUNC@"], 1, "corrupt or truncated"),
])
def test_stage_bad_input_corpus(cli, node, tarballs, tmp_path, args, code, msg):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 200)
    trunc = tmp_path / "kata-static-7.0.0-amd64.tar.xz"
    data = open(tarballs["xz"], "rb").read()
    trunc.write_bytes(data[: len(data) // 2])
    subst = {"@TEXT@": str(text), "@NOVERSION@": tarballs["noversion"], "@XZ@": tarballs["xz"],
             "@TRUNC@": str(trunc)}
    r = K(cli, node, "stage", *[subst.get(a, a) for a in args], "--no-verify")
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert nothing_staged(node)


@pytest.mark.parametrize("version", [b"\x01" * (512 << 10), b"v" * 5000, b"../../etc\n"])
def test_stage_an_invalid_version_file_is_one_short_line_naming_it(cli, node, tmp_path, version):
    """review 7 #6: a VERSION of 2 MiB of \\x01 was echoed whole, repr'd: one 4 MB line on
    stderr (and in -o json, and the audit log). The error shows at most a short excerpt and
    says the value came from the archive's VERSION file."""
    import tarfile

    tree = fx.build_tree(str(tmp_path / "t"), "6.0.0", manifest=False, version_file=True)
    with open(os.path.join(tree, "VERSION"), "wb") as f:
        f.write(version)
    tb = str(tmp_path / "kata.tar.gz")
    with tarfile.open(tb, "w:gz") as tf:
        tf.add(str(tmp_path / "t"), arcname=".")
    for args in ((), ("--dry-run",)):
        r = K(cli, node, "stage", tb, "--no-verify", *args, "-o", "json")
        assert r.exit_code == 2, (r.stdout[:300], r.stderr[:300])
        assert "invalid release version in the VERSION file of " + tb in r.stderr, r.stderr[:300]
        assert len(r.stderr) < 500 and len(r.stdout) < 1000, (len(r.stderr), len(r.stdout))
    assert nothing_staged(node)

#: runs argv as its child and prints the child's peak RSS (KiB). Measured one process away from
#: pytest: a child spawned by pytest itself inherits pytest's peak (hundreds of MiB late in the
#: suite) in its ru_maxrss, since exec records the old (v)forked mm's high-water mark
#: (linux fs/exec.c exec_mmap, setmax_mm_hiwater_rss)
_PEAK_RSS = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
             "_, st, ru = os.wait4(p.pid, 0)\n"
             "print(ru.ru_maxrss)\n"
             "sys.exit(os.waitstatus_to_exitcode(st))\n")


def _stage_rss(node, *args) -> tuple[int, int, str]:
    """Exit code, peak RSS in bytes and stderr of a katactl stage subprocess."""
    p = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "katactl", "--host-root", str(node),
                        "upgrade", "stage", *args], capture_output=True, text=True)
    return p.returncode, int(p.stdout) * 1024, p.stderr


@pytest.mark.parametrize("where", ["share/kata-containers/VERSION", "VERSION", "SHA256SUMS"])
def test_stage_reads_at_most_a_megabyte_of_version_or_manifest(node, tmp_path, where):
    """review 7 #4: a member called VERSION or SHA256SUMS was read whole into memory, anywhere
    in the archive: a 92 KB sparse tarball took katactl to 3 GiB RSS, even with --dry-run.
    Now a nested one is an ordinary file, never read (the dry run passes), and one at the
    release root larger than 1 MiB is refused (exit 5) without being read."""
    tree = fx.build_tree(str(tmp_path / "t"), "6.0.0", manifest=False, version_file=True)
    with open(os.path.join(tree, where), "ab") as f:
        f.truncate(1 << 30)  # a hole: GNU tar --sparse stores it in a few blocks
    tb = str(tmp_path / "kata-static-6.0.0-amd64.tar")
    subprocess.run(["tar", "-C", str(tmp_path / "t"), "--sparse", "-cf", tb, "."], check=True)
    assert os.path.getsize(tb) < 1 << 20
    code, rss, err = _stage_rss(node, tb, "--no-verify", "--reserve", "0", "--dry-run")
    if "/" in where:
        assert code == 0, err
    else:
        assert code == 5 and f"opt/kata/{where} is larger than 1 MiB" in err, err
        assert len(err.splitlines()) == 1
    assert rss < 256 << 20, rss
    assert nothing_staged(node)


def test_stage_refuses_a_root_manifest_just_over_a_megabyte(cli, node, tmp_path):
    """The limit is exact: a manifest of 1 MiB + 1 bytes is refused, not silently cut (the
    cut manifest would then have blamed files that it does list)."""
    import tarfile

    tree = fx.build_tree(str(tmp_path / "t"), "6.0.0", manifest=True, version_file=True)
    sums = os.path.join(tree, "SHA256SUMS")
    with open(sums, "ab") as f:
        f.write(b"#" * ((1 << 20) + 1 - os.path.getsize(sums) - 1) + b"\n")
    assert os.path.getsize(sums) == (1 << 20) + 1
    tb = str(tmp_path / "kata-static-6.0.0-amd64.tar.gz")
    with tarfile.open(tb, "w:gz") as tf:
        tf.add(str(tmp_path / "t"), arcname=".")
    r = K(cli, node, "stage", tb)
    assert r.exit_code == 5 and "SHA256SUMS is larger than 1 MiB; a release's manifest" in r.stderr, r.stderr
    with open(sums, "r+b") as f:
        f.truncate(1 << 20)  # comment lines only past the entries: exactly the limit is read
    with tarfile.open(tb, "w:gz") as tf:
        tf.add(str(tmp_path / "t"), arcname=".")
    assert J(cli, node, "stage", tb)["verifiedBy"] == ["manifest SHA256SUMS"]

def _many_members(tmp_path, n: int) -> str:
    """A kata-static-shaped .tar.gz of a shim and n empty files (~9 bytes each compressed)."""
    import io
    import tarfile

    out = str(tmp_path / "kata-static-6.0.0-amd64.tar.gz")
    with tarfile.open(out, "w:gz", compresslevel=1) as tf:
        ti = tarfile.TarInfo("./opt/kata/bin/containerd-shim-kata-v2")
        ti.size, ti.mode = 3, 0o755
        tf.addfile(ti, io.BytesIO(b"#!\n"))
        for i in range(n):
            tf.addfile(tarfile.TarInfo(f"./opt/kata/share/f/{i:08d}"))
    return out


def test_stage_refuses_an_archive_of_more_than_max_members(cli, node, tmp_path):
    """review 8 (upgrade) #7: memory grew with the member count, unbounded (a 3.7 MB .tar.gz
    of 400,001 empty files: 503 MB RSS, dry run). More than 100,000 members is refused while
    scanning: exit 5, one line."""
    from katactl.upgrade.source import MAX_MEMBERS

    assert MAX_MEMBERS == 100_000
    r = K(cli, node, "stage", _many_members(tmp_path, MAX_MEMBERS), "--no-verify", "--dry-run")
    assert r.exit_code == 5, r.stderr
    assert r.stderr.splitlines() == [f"katactl: error: {tmp_path}/kata-static-6.0.0-amd64.tar.gz: more than "
                                     "100,000 members; a Kata release has a few hundred files"]
    assert nothing_staged(node)


def test_stage_scan_keeps_no_tarinfo_per_member(tmp_path):
    """The scan drops tarfile's list of every member read (TarFile.members, which stream
    mode fills too) and the TarInfo each scanned member's reader held: ~1.1 KiB per member
    at peak before, ~0.45 KiB now (tracemalloc, 20,001 members)."""
    import tracemalloc

    from katactl.upgrade import source as src

    tb = _many_members(tmp_path, 20_000)
    tracemalloc.start()
    try:
        sc = src.scan(tb, "gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(sc.members) == 20_001
    assert peak / 20_001 < 700, peak / 20_001


def test_stage_same_version_other_source_refused_then_forced(cli, node, tarballs):
    J(cli, node, "stage", tarballs["xz"])
    r = K(cli, node, "stage", tarballs["gz"], "--as", A)
    assert r.exit_code == 5 and "different source" in r.stderr
    d = J(cli, node, "stage", tarballs["gz"], "--as", A, "--force")
    assert d["changed"] is True and d["replaced"] is True
    J(cli, node, "switch", A)
    r = K(cli, node, "stage", tarballs["xz"], "--as", A, "--force")
    assert r.exit_code == 5 and "in use" in r.stderr


# -- switch / rollback ------------------------------------------------------------------
@pytest.fixture
def staged(cli, node, tarballs):
    for k in ("xz", "zst", "gz"):
        J(cli, node, "stage", tarballs[k])
    return node


def agent_of(node, release):
    cfg = (rel(node, release) / "share/defaults/kata-containers/configuration-qemu.toml").read_text()
    line = [x for x in cfg.splitlines() if x.startswith("kernel")][0]
    return line.split("/releases/")[1].split("/")[0]


def test_switch_all_runtime_agent_and_rollback(cli, staged):
    node = staged
    d = J(cli, node, "switch", A, "--dry-run")
    assert d["changed"] is True and d["dryRun"] is True and current(node) is None
    d = J(cli, node, "switch", A)
    assert d["changed"] and d["from"] == {"runtime": None, "agent": None}
    assert current(node) == f"releases/{A}"
    assert J(cli, node, "switch", A)["changed"] is False  # switching to the current version
    # runtime only: B's binaries, A's guest assets
    d = J(cli, node, "switch", B, "--component", "runtime")
    assert d["to"] == {"runtime": B, "agent": A}
    assert current(node) == f"releases/{B}" and agent_of(node, B) == A
    clh = (rel(node, B) / "share/defaults/kata-containers/configuration-clh.toml").read_text()
    assert f"/releases/{A}/share/kata-containers/kata-containers-initrd.img" in clh
    assert f'path = "/opt/kata/releases/{B}/bin/cloud-hypervisor"' in clh  # binaries stay B's
    # agent only: live config of B now points at B's assets; backup kept outside config.d
    d = J(cli, node, "switch", B, "-c", "agent")
    assert d["to"] == {"runtime": B, "agent": B} and agent_of(node, B) == B
    backup = rel(node, ".katactl/backups") / B / "share/defaults/kata-containers/configuration-qemu.toml"
    assert f"/releases/{A}/" in backup.read_text()
    st = J(cli, node, "status")
    assert st["current"] == {"runtime": B, "agent": B} and st["previous"] == {"runtime": B, "agent": A}
    # rollback undoes the last switch only, once
    d = J(cli, node, "rollback")
    assert d["changed"] and d["to"] == {"runtime": B, "agent": A} and agent_of(node, B) == A
    d = J(cli, node, "rollback")
    assert d["changed"] is False and "already rolled back" in d["message"]
    d = J(cli, node, "switch", C)
    assert d["to"] == {"runtime": C, "agent": C}
    d = J(cli, node, "rollback", "--dry-run")
    assert d["dryRun"] and d["to"] == {"runtime": B, "agent": A} and current(node) == f"releases/{C}"
    d = J(cli, node, "rollback")
    assert current(node) == f"releases/{B}" and agent_of(node, B) == A
    hist = [json.loads(x) for x in (rel(node, ".katactl") / "history.jsonl").read_text().splitlines()]
    assert [h["action"] for h in hist] == ["switch", "switch", "switch", "rollback", "switch", "rollback"]
    assert all(h["user"] and h["time"] and "from" in h and "to" in h for h in hist)
    audit = [json.loads(x) for x in open(os.path.join(os.environ["XDG_STATE_HOME"], "katactl", "audit.log"))]
    acts = [a["action"] for a in audit]
    assert "upgrade.stage" in acts and "upgrade.switch" in acts and "upgrade.rollback" in acts
    assert any(a["action"] == "upgrade.switch" and a.get("changed") is False for a in audit)
    # each change: "requested" before its first live step, then the outcome (the no-op: only that)
    assert [a["result"] for a in audit if a["action"] == "upgrade.rollback" and a["result"] != "ok"] == \
        ["requested", "requested"]


@pytest.mark.parametrize("args,code,msg", [
    (["switch", "9.9.9"], 3, "not staged"),
    (["switch", "../etc"], 2, "invalid version"),
    (["switch", "current"], 2, "invalid version"),
    (["switch", A + "\n"], 2, "invalid version"),
    (["switch", A, "--component", "kernel"], 2, "invalid --component"),
    (["switch", A, "--component", "agent"], 5, "switch --component all first"),
    (["rollback"], 3, "nothing to roll back"),
    (["switch", A, "--kata-root", "relative/dir"], 2, "absolute"),
    (["switch", A, "--kata-root", "/"], 2, "must not be /"),
    (["switch", A, "--lock-timeout="], 2, "empty --lock-timeout"),
    (["rollback", "--lock-timeout= "], 2, "empty --lock-timeout"),
])
def test_switch_bad_input_corpus(cli, staged, args, code, msg):
    r = K(cli, staged, *args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert current(staged) is None


def test_rollback_after_first_switch_and_drift(cli, staged):
    node = staged
    J(cli, node, "switch", A)
    for extra in (["--dry-run"], []):  # nothing to roll back to: 3, as docs/upgrade.md says (was 5)
        r = K(cli, node, "rollback", *extra)
        assert r.exit_code == 3 and "first one" in r.stderr
    J(cli, node, "switch", B)
    # someone moved the symlink by hand: rollback refuses to guess
    os.remove(node / "opt/kata/current")
    os.symlink(f"releases/{C}", node / "opt/kata/current")
    r = K(cli, node, "rollback")
    assert r.exit_code == 5 and "refusing to guess" in r.stderr
    d = J(cli, node, "rollback", "--force")
    assert d["to"] == {"runtime": A, "agent": A} and current(node) == f"releases/{A}"


def test_unmanaged_current_is_refused(cli, staged):
    (staged / "opt/kata/current").mkdir()
    r = K(cli, staged, "switch", A)
    assert r.exit_code == 5 and "not a symlink" in r.stderr


def _handlers(node, *configs):
    """containerd Kata handlers reading ``configs`` (file names in the kata-static
    configuration directory) through current: the files a switch's preflight holds it to."""
    cri = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
    (node / "etc/containerd").mkdir(parents=True, exist_ok=True)
    (node / "etc/containerd/config.toml").write_text("version = 2\n" + "".join(
        f'[{cri}.kata-{i}]\nruntime_type = "io.containerd.kata.v2"\n[{cri}.kata-{i}.options]\n'
        f'ConfigPath = "/opt/kata/current/share/defaults/kata-containers/{c}"\n' for i, c in enumerate(configs)))


def test_switch_agent_refused_when_assets_missing(cli, staged):
    _handlers(staged, "configuration-clh.toml")
    J(cli, staged, "switch", A)
    os.remove(rel(staged, B) / "share/kata-containers/kata-containers-initrd.img")
    r = K(cli, staged, "switch", B, "--component", "agent")
    assert r.exit_code == 5 and "kata-containers-initrd.img" in r.stderr
    assert agent_of(staged, A) == A


@pytest.mark.parametrize("component,gone,named", [
    ("all", "share/kata-containers/vmlinux-6.1.62-{v}", "kernel share/kata-containers/vmlinux.container"),
    ("all", "share/kata-containers/kata-ubuntu-{v}.img", "image share/kata-containers/kata-containers.img"),
    ("all", "bin/qemu-system-x86_64", "path bin/qemu-system-x86_64"),
    ("runtime", "bin/cloud-hypervisor", "path bin/cloud-hypervisor"),
])
def test_switch_refused_when_the_release_lacks_a_file_its_configuration_names(cli, staged, component, gone, named):
    """review 13 docs #1: the preflight checked the shim and that some configuration exists, and
    the guest assets only when an agent switch moved them: a release whose configuration names a
    kernel (or QEMU) it does not ship became `current` (exit 0), and every new pod failed to boot.
    Now refused (exit 5, --dry-run too) unless --force, naming the key, the file and the config."""
    _handlers(staged, "configuration-qemu.toml", "configuration-clh.toml")
    J(cli, staged, "switch", A)
    os.remove(rel(staged, B) / gone.format(v=B))  # vmlinux.container etc. are links: now dangling
    for extra in (["--dry-run"], []):
        r = K(cli, staged, "switch", B, "-c", component, *extra)
        assert r.exit_code == 5, (r.stdout, r.stderr)
        key, path = named.split()
        assert "preflight failed" in r.stderr and f"release {B} lacks {key} /opt/kata/releases/{B}/{path} (" \
            in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) <= 2 and "Traceback" not in r.stderr
    assert current(staged) == f"releases/{A}"
    d = J(cli, staged, "switch", B, "-c", component, "--force")
    failed = [c for c in d["preflight"] if not c["ok"]]
    assert [c["check"] for c in failed] == ["guest assets" if "path" not in named else "hypervisor"], failed
    assert d["changed"] is True and current(staged) == f"releases/{B}"


def test_runtime_switch_needs_only_the_guest_assets_it_keeps(cli, staged):
    """--component runtime keeps the current agent's guest assets: the new release's own kernel
    is not named by the configuration it leaves live, so its absence refuses nothing."""
    J(cli, staged, "switch", A)
    os.remove(rel(staged, B) / f"share/kata-containers/vmlinux-6.1.62-{B}")
    d = J(cli, staged, "switch", B, "-c", "runtime")
    assert d["to"] == {"runtime": B, "agent": A} and all(c["ok"] for c in d["preflight"]), d["preflight"]
    checks = {c["check"]: c for c in d["preflight"]}
    assert checks["guest assets"]["ok"] and checks["hypervisor"]["ok"]


def test_agent_switch_forced_past_a_missing_asset(cli, staged):
    """The agent path's own refusal (before the preflight had the check) ignored --force."""
    _handlers(staged, "configuration-clh.toml")
    J(cli, staged, "switch", A)
    os.remove(rel(staged, B) / f"share/kata-containers/kata-alpine-{B}-initrd.img")
    r = K(cli, staged, "switch", B, "-c", "agent", "--dry-run")
    assert r.exit_code == 5 and f"release {B} lacks initrd /opt/kata/releases/{B}/share/kata-containers/" \
        "kata-containers-initrd.img (configuration-clh.toml)" in r.stderr, r.stderr
    d = J(cli, staged, "switch", B, "-c", "agent", "--force")
    assert d["changed"] is True and agent_of(staged, A) == B
    assert [c["check"] for c in d["preflight"] if not c["ok"]] == ["guest assets"]


def test_a_missing_file_refuses_only_in_a_configuration_a_handler_reads(cli, staged):
    """A release ships a configuration per hypervisor and flavour (kata-static: qemu, clh, fc,
    the confidential and GPU ones), not every one of them with all it names: with containerd's
    Kata handlers known, a file missing from a configuration none of them reads through
    current is a warning, and one missing from the configuration they read refuses."""
    cri = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
    (staged / "etc/containerd").mkdir(parents=True)
    (staged / "etc/containerd/config.toml").write_text(
        f'version = 2\n[{cri}.kata-qemu]\nruntime_type = "io.containerd.kata.v2"\n'
        f'[{cri}.kata-qemu.options]\n'
        'ConfigPath = "/opt/kata/current/share/defaults/kata-containers/configuration-qemu.toml"\n')
    J(cli, staged, "switch", A)
    os.remove(rel(staged, B) / "bin/cloud-hypervisor")  # named by configuration-clh.toml only
    d = J(cli, staged, "switch", B, "--dry-run")
    checks = {c["check"]: c for c in d["preflight"]}
    assert checks["hypervisor"]["ok"] and "warning" not in checks["hypervisor"], checks
    warned = checks["hypervisor (files nothing reads)"]
    assert warned["ok"] and warned["warning"] and "configuration-clh.toml" in warned["detail"], warned
    os.remove(rel(staged, B) / "bin/qemu-system-x86_64")  # the file the handler's configuration names
    r = K(cli, staged, "switch", B, "--dry-run")
    assert r.exit_code == 5 and f"release {B} lacks path /opt/kata/releases/{B}/bin/qemu-system-x86_64 " \
        "(configuration-qemu.toml)" in r.stderr, r.stderr


def test_preflight_holds_the_switch_to_the_files_the_runtime_will_read(cli, staged):
    """review 13 diffA 1-3: with no Kata handler in containerd's configuration (CRI-O), every
    configuration file counted, and a file for another architecture (upstream's amd64 build
    ships runtime-rs/configuration-qemu-se-runtime-rs.toml, naming s390x's kernel) refused every
    switch; the runtime reads its default configuration.toml there. A drop-in in config.d beside
    a file the runtime reads is read too; and configuration.toml is followed in the release
    switched to, whose link may name another hypervisor's file."""
    J(cli, staged, "switch", A)
    cfg = rel(staged, B) / "share/defaults/kata-containers"
    (cfg / "runtime-rs").mkdir(exist_ok=True)
    (cfg / "runtime-rs/configuration-qemu-se-runtime-rs.toml").write_text(
        f'[hypervisor.qemu]\nkernel = "/opt/kata/releases/{B}/share/kata-containers/kata-containers-se.img"\n')
    d = J(cli, staged, "switch", B, "--dry-run")  # nothing reads it: a warning
    checks = {c["check"]: c for c in d["preflight"]}
    assert checks["guest assets"]["ok"] and "kata-containers-se.img" in \
        checks["guest assets (files nothing reads)"]["detail"], d["preflight"]
    # a drop-in beside the file read: its kernel counts
    (cfg / "config.d").mkdir(exist_ok=True)
    (cfg / "config.d/50-kernel.toml").write_text(
        f'[hypervisor.qemu]\nkernel = "/opt/kata/releases/{B}/share/kata-containers/vmlinux-missing"\n')
    r = K(cli, staged, "switch", B, "--dry-run")
    assert r.exit_code == 5 and "vmlinux-missing (config.d/50-kernel.toml)" in r.stderr, r.stderr
    os.remove(cfg / "config.d/50-kernel.toml")
    # B's configuration.toml names clh (A's names qemu), and B lacks cloud-hypervisor
    os.remove(rel(staged, B) / "bin/cloud-hypervisor")
    assert J(cli, staged, "switch", B, "--dry-run")["changed"] is True
    os.remove(cfg / "configuration.toml")
    os.symlink("configuration-clh.toml", cfg / "configuration.toml")
    r = K(cli, staged, "switch", B, "--dry-run")
    assert r.exit_code == 5 and f"lacks path /opt/kata/releases/{B}/bin/cloud-hypervisor" in r.stderr, r.stderr


def test_lock_held_times_out_then_waits(cli, staged, katactl_bin):
    node = staged
    J(cli, node, "switch", A)
    lock = rel(node, ".katactl/lock")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        r = K(cli, node, "switch", B, "--lock-timeout", "0.3")
        assert r.exit_code == 6 and "holds the lock" in r.stderr
        assert current(node) == f"releases/{A}"
        p = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", str(node), "upgrade",
                              "switch", B, "--lock-timeout", "60", "-o", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # it is waiting (not failing, not switching) while we hold the lock: once it says so
        # (review 8 #8: the check ran before the child had even imported katactl); a child
        # that does not wait ends without saying it, and readline() returns ""
        said = p.stderr.readline()
        assert said == "waiting for the upgrade lock, held by another katactl\n", said
        assert p.poll() is None and current(node) == f"releases/{A}"
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, said + err
    assert json.loads(out)["changed"] is True and current(node) == f"releases/{B}"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused(cli, staged, tmp_path, kind):
    """review 8 (upgrade) #6: the flock file was opened following symlinks, then truncated:
    a symlink planted at releases/.katactl/lock (absolute: under --host-root it names a file
    of this host) had katactl empty that file. Now a symlink or FIFO there is exit 5, one
    line naming the lock file, and the file it points to keeps its content."""
    J(cli, staged, "switch", A)
    lock = rel(staged, ".katactl/lock")
    os.remove(lock)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    if kind == "symlink":
        os.symlink(victim, lock)
    else:
        os.mkfifo(lock)
    r = K(cli, staged, "switch", B)
    assert r.exit_code == 5, r.stderr
    assert "/opt/kata/releases/.katactl/lock on localhost is not a regular file" in r.stderr.splitlines()[0]
    assert "Traceback" not in r.stderr
    assert victim.read_text() == "precious data\n" and current(staged) == f"releases/{A}"
    assert not rel(staged, ".katactl/lock.d").exists()


def test_two_concurrent_switches_never_half_switch(staged, katactl_bin):
    node = staged
    results = {}

    def run(v):
        results[v] = katactl_bin(["--host-root", str(node), "upgrade", "switch", v, "-o", "json"])

    ts = [threading.Thread(target=run, args=(v,)) for v in (A, B)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(r.exit_code == 0 for r in results.values()), {v: r.stderr for v, r in results.items()}
    final = os.readlink(node / "opt/kata/current").split("/")[-1]
    assert final in (A, B) and agent_of(node, final) == final
    hist = [json.loads(x) for x in (rel(node, ".katactl") / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["to"] == {"runtime": final, "agent": final}
    assert not (rel(node, ".katactl") / "pending.json").exists()


def test_exec_preflight_on_real_root(cli, tmp_path, tarballs):
    """No --host-root: the kata root is a real path, so preflight runs the new binaries."""
    root = tmp_path / "real/opt/kata"
    broken = fx.make_tarball(str(tmp_path), "8.0.0", str(tmp_path), compression="gz", broken_runtime=True)
    for tb in (tarballs["xz"], broken):
        r = cli(["upgrade", "stage", tb, "--kata-root", str(root), "-o", "json"])
        assert r.exit_code == 0, r.stderr
    r = cli(["upgrade", "switch", A, "--kata-root", str(root), "-o", "json"])
    assert r.exit_code == 0, r.stderr
    checks = {c["check"]: c for c in r.json()["preflight"]}
    assert checks["containerd-shim-kata-v2 --version"]["ok"]
    assert checks["kata-runtime --version"]["detail"].startswith("kata-runtime  : 3.1.0")
    assert checks["kata-runtime check --check-version-only"]["ok"]
    r = cli(["upgrade", "switch", "8.0.0", "--kata-root", str(root)])
    assert r.exit_code == 5 and "preflight failed" in r.stderr and "kata-runtime --version" in r.stderr
    assert os.readlink(root / "current") == f"releases/{A}"
    r = cli(["upgrade", "switch", "8.0.0", "--kata-root", str(root), "--force", "-o", "json"])
    assert r.exit_code == 0 and os.readlink(root / "current") == "releases/8.0.0"


def test_gc_removes_unused_keeps_current_and_agent(cli, staged):
    node = staged
    J(cli, node, "switch", A)
    J(cli, node, "switch", B, "--component", "runtime")  # B runtime uses A's assets
    d = J(cli, node, "gc", "--dry-run")
    assert d["removed"] == [C] and d["dryRun"] is True and rel(node, C).exists()
    kept = {k["version"]: k["reason"] for k in d["kept"]}
    assert kept == {A: "current agent", B: "current runtime"}
    d = J(cli, node, "gc", "--yes")
    assert d["removed"] == [C] and d["changed"] is True and not rel(node, C).exists()
    assert J(cli, node, "gc", "--yes")["changed"] is False
    J(cli, node, "switch", B, "-c", "agent")
    d = J(cli, node, "gc", "--yes")  # the rollback target (A) is kept by default
    assert d["removed"] == [] and {k["version"]: k["reason"] for k in d["kept"]}[A].startswith("previous")
    assert J(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == [A]


def test_gc_and_stage_force_keep_a_release_a_containerd_handler_pins(cli, staged, tarballs):
    """review 8 (upgrade) #2: gc deleted a release a runtime handler still named (its
    runtime_path or ConfigPath under releases/<v>), although status warned about it: every
    new pod of that RuntimeClass then failed to start. Such a release is kept ("pinned by
    containerd handler X"), also through a symlink (a shim linked into /usr/local/bin), and
    stage --force refuses to replace it (exit 5)."""
    J(cli, staged, "switch", A)
    cri = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
    (staged / "etc/containerd").mkdir(parents=True)
    (staged / "etc/containerd/config.toml").write_text(
        "version = 2\n"
        f'[{cri}.kata-bin]\nruntime_type = "io.containerd.kata.v2"\n'
        'runtime_path = "/usr/local/bin/containerd-shim-kata-v2"\n'
        f'[{cri}.kata-bin.options]\nConfigPath = "/opt/kata/current/share/defaults/kata-containers/configuration.toml"\n'
        f'[{cri}.kata-cfg]\nruntime_type = "io.containerd.kata.v2"\n'
        'runtime_path = "/opt/kata/current/bin/containerd-shim-kata-v2"\n'
        f'[{cri}.kata-cfg.options]\nConfigPath = "/opt/kata/releases/{C}/share/defaults/kata-containers/configuration.toml"\n')
    (staged / "usr/local/bin").mkdir(parents=True)
    (staged / "usr/local/bin/containerd-shim-kata-v2").symlink_to(f"/opt/kata/releases/{B}/bin/containerd-shim-kata-v2")
    rows = {h["handler"]: h for h in J(cli, staged, "status")["runtimeHandlers"]}
    assert rows["kata-bin"]["runtimeRelease"] == B and rows["kata-cfg"]["runtimeRelease"] is None
    d = J(cli, staged, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == [] and d["changed"] is False
    assert {k["version"]: k["reason"] for k in d["kept"]} == {
        A: "current runtime", B: "pinned by containerd handler kata-bin", C: "pinned by containerd handler kata-cfg"}
    assert (rel(staged, B) / "bin/containerd-shim-kata-v2").exists() and rel(staged, C).is_dir()
    r = K(cli, staged, "stage", tarballs["gz"], "--as", B, "--force")
    assert r.exit_code == 5, r.stderr
    assert r.stderr.startswith(f"katactl: error: release {B} is pinned by containerd handler kata-bin on localhost")
    os.remove(staged / "etc/containerd/config.toml")  # nothing names them any more
    assert sorted(J(cli, staged, "gc", "--no-keep-previous", "--yes")["removed"]) == sorted([B, C])


@pytest.mark.parametrize("with_proc", [True, False])
@pytest.mark.parametrize("args", [["gc", "--dry-run"], ["gc", "--yes"], ["gc"], ["switch", "9.9.9"],
                                  ["rollback"], ["switch", "9.9.9", "--dry-run"]])
def test_no_releases_dir_creates_nothing(cli, node, with_proc, args, _isolated_home):
    """A node with no releases directory: gc has nothing to remove (changed: false, even
    without a readable /proc); switch/rollback find nothing (exit 3). None of them
    creates releases/.katactl just to take the lock."""
    if not with_proc:
        os.rmdir(node / "proc")
    r = K(cli, node, *args, "-o", "json")
    if args[0] == "gc":
        assert r.exit_code == 0, (r.stdout, r.stderr)
        d = r.json()
        assert d["changed"] is False and d["removed"] == [] and d["dryRun"] is ("--dry-run" in args)
    else:
        assert r.exit_code == 3 and r.json()["exitCode"] == 3, (r.stdout, r.stderr)
    assert not (node / "opt").exists()


def test_gc_refuses_without_proc(cli, staged):
    import shutil as sh

    sh.rmtree(staged / "proc")
    r = K(cli, staged, "gc")
    assert r.exit_code == 5 and "/proc" in r.stderr
    assert J(cli, staged, "gc", "--force", "--yes")["removed"] == sorted([A, B, C])


def _audit_actions(home):
    p = home / "state" / "katactl" / "audit.log"
    return [json.loads(x)["action"] for x in p.read_text().splitlines()] if p.exists() else []


def test_gc_needs_yes_without_a_tty_and_deletes_nothing(cli, staged, _isolated_home):
    J(cli, staged, "switch", A)
    r = K(cli, staged, "gc", "-o", "json")
    assert r.exit_code == 5 and "--yes" in r.stderr
    assert r.json()["kind"] == "Error" and r.json()["exitCode"] == 5
    assert "release(s) needs confirmation" in r.json()["message"] and "gc --dry-run" in r.json()["hint"]
    assert rel(staged, B).is_dir() and rel(staged, C).is_dir()
    assert "upgrade.gc" not in _audit_actions(_isolated_home)
    d = J(cli, staged, "gc", "--dry-run")  # a dry run asks nothing
    assert d["removed"] == [B, C] and d["dryRun"] is True
    d = J(cli, staged, "gc", "--yes")
    assert d["removed"] == [B, C] and not rel(staged, B).exists()
    assert _audit_actions(_isolated_home).count("upgrade.gc") == 2  # "requested", then the outcome
    # nothing left to remove: no question, a no-op
    d = J(cli, staged, "gc")
    assert d["changed"] is False and d["removed"] == []


def test_gc_removes_at_most_the_confirmed_plan(staged):
    """What appeared removable after the user confirmed is kept, never deleted unasked."""
    from katactl import upgrade
    from katactl.backends.local import LocalTransport

    t, layout = LocalTransport(str(staged)), upgrade.Layout("/opt/kata")
    upgrade.switch(t, layout, A, run_binaries=False)
    d = upgrade.gc(t, layout, only={C})
    assert d["removed"] == [C] and not rel(staged, C).exists()
    assert {k["version"]: k["reason"] for k in d["kept"]}[B].startswith("not in the confirmed plan")
    assert rel(staged, B).is_dir()


def test_gc_asks_on_a_tty(staged):
    J_ = [sys.executable, "-m", "katactl", "--host-root", str(staged), "upgrade"]
    subprocess.run(J_ + ["switch", A, "-o", "json"], check=True, capture_output=True)
    rc, text = run_on_pty(J_ + ["gc"], b"n\n")
    assert rc == 5 and "Delete 2 release(s)" in text and B in text and C in text
    assert rel(staged, B).is_dir() and rel(staged, C).is_dir()
    rc, text = run_on_pty(J_ + ["gc"], b"y\n")
    assert rc == 0, text
    assert not rel(staged, B).exists() and not rel(staged, C).exists() and rel(staged, A).is_dir()


def test_status_table_and_json(cli, staged):
    J(cli, staged, "switch", A)
    r = K(cli, staged, "status")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "STATE", "PROCESSES", "SANDBOXES"]
    assert any(line.split()[:2] == [A, "runtime,agent"] for line in lines)
    d = J(cli, staged, "status")
    assert d["kind"] == "UpgradeStatus" and d["current"] == {"runtime": A, "agent": A}
    assert sorted(x["version"] for x in d["releases"]) == sorted([A, B, C])


@pytest.mark.parametrize("raw", [b"[1]", b"null", b"\xff\xfe", b"{", b'"x"', b'{"pid": "1"}'])
def test_a_foreign_or_torn_lock_file_is_not_an_owner(raw):
    from katactl.upgrade import lock

    assert lock._stale(raw) is False  # never provably stale: wait, never break it
    assert lock._describe(raw) in ("another katactl", "pid 1 on None (user None, since None)")


def test_gc_name_output_is_the_node(cli, staged):
    J(cli, staged, "switch", A)
    for extra in (["--dry-run"], ["--yes"]):
        r = K(cli, staged, "gc", *extra, "-o", "name")
        assert r.exit_code == 0 and r.stdout == "localhost\n", (extra, r.stdout, r.stderr)


def test_status_name_output_is_the_node(cli, staged, tmp_path):
    """review 13 docs #2: `upgrade status -o name` printed the release versions (nothing at all on
    a node without releases), where docs/output.md says an upgrade command's -o name prints the
    node (as switch and gc do); and the table of a node without releases said "No upgrade
    statuses found." though -o json has its UpgradeStatus object: it says there are no releases."""
    J(cli, staged, "switch", A)
    for extra in ([], ["--sandboxes"]):
        r = K(cli, staged, "status", *extra, "-o", "name")
        assert r.exit_code == 0 and r.stdout == "localhost\n", (extra, r.stdout, r.stderr)
    bare = tmp_path / "bare"
    (bare / "proc").mkdir(parents=True)
    r = K(cli, bare, "status", "-o", "name")
    assert r.exit_code == 0 and r.stdout == "localhost\n", (r.stdout, r.stderr)
    assert J(cli, bare, "status")["current"] == {"runtime": None, "agent": None}
    r = K(cli, bare, "status")
    assert r.exit_code == 0 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr == "localhost: no releases under /opt/kata/releases (katactl upgrade stage SOURCE)\n", r.stderr


def test_stage_symlink_chain_work_is_bounded(katactl_bin, node, tmp_path):
    """issue 16 #7: a 60-link doubling chain is refused (exit 5) after a bounded number of
    links followed, as the kernel's ELOOP, instead of 2^60 steps (a subprocess: a hang fails)."""
    tb = fx.evil_tarball(str(tmp_path / "kata-static-6.6.6-amd64.tar.gz"), "symlink-doubling")
    r = katactl_bin(["--host-root", node, "upgrade", "stage", tb, "--no-verify"], timeout=60)
    assert r.exit_code == 5, r.stderr
    assert "symlinks" in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert nothing_staged(node)


def _cut_archives(tarballs, d) -> dict[str, str]:
    """Archives cut or damaged the ways a download or a disk cuts them (issue 16 #3, #17)."""
    import gzip
    import lzma
    import tarfile

    # no SHA256SUMS: what is cut off cannot be noticed as missing from a manifest
    src = fx.make_tarball(str(d), "7.0.0", str(d), compression="tar", manifest=False)
    plain = open(src, "rb").read()
    with tarfile.open(src) as tf:
        offsets = [ti.offset for ti in tf.getmembers()]
    mid = offsets[len(offsets) // 2]
    bad_header = bytearray(plain)
    bad_header[mid + 148:mid + 156] = b"9999999\0"  # a wrong header checksum in the middle
    last = plain.rstrip(b"\0")
    last_boundary = offsets[-1] + 512 + ((len(last) - offsets[-1] - 512 + 511) // 512) * 512
    gz = gzip.compress(plain)
    xz = lzma.compress(plain)
    out = {
        "tar-cut-in-header": plain[:mid + 100],
        "tar-cut-at-member-boundary": plain[:mid],
        "tar-no-end-marker": plain[:last_boundary],
        "tar-corrupt-header": bytes(bad_header),
        "gz-cut-mid-stream": gz[:len(gz) // 2],
        "gz-no-trailer": gz[:-8],
        "xz-no-trailer": xz[:-12],
    }
    if shutil.which("zstd"):
        zst = subprocess.run(["zstd", "-q", "-c", src], capture_output=True, check=True).stdout
        out["zst-cut-mid-stream"] = zst[:len(zst) // 2]
        out["zst-cut-after-frame-header"] = zst[:12]   # said "empty file"
        out["zst-no-checksum"] = zst[:-3]
    paths = {}
    for k, data in out.items():
        ext = {"tar": "tar", "gz": "tar.gz", "xz": "tar.xz", "zst": "tar.zst"}[k.split("-")[0]]
        p = d / f"{k}.{ext}"
        p.write_bytes(data)
        paths[k] = str(p)
    return paths


def test_stage_truncated_or_corrupt_archive_is_not_a_release(cli, node, tarballs, tmp_path):
    """A cut or damaged archive stages nothing, even with --no-verify: exit 1, one line."""
    for kind, path in _cut_archives(tarballs, tmp_path).items():
        r = K(cli, node, "stage", path, "--no-verify", "--as", "7.0.0")
        assert r.exit_code == 1, (kind, r.stdout, r.stderr)
        assert "corrupt or truncated archive" in r.stderr, (kind, r.stderr)
        assert "empty file" not in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") <= 2
        assert nothing_staged(node), kind
        assert not rel(node).exists() or not [n for n in os.listdir(rel(node)) if n.startswith(".staging")]
    # the intact ones still stage
    for fmt in ("tar", "gz", "xz"):
        assert J(cli, node, "stage", tarballs[fmt])["changed"] is True


_DEEP = b"[" * 100000 + b"]" * 100000
_CORRUPT_STATE = [
    ("pending.json", b"{not json"),
    ("pending.json", b"[1, 2]"),
    ("pending.json", b'{"action": "switch", "to": "3.2.0"}'),
    ("pending.json", b'{"action": "switch", "from": {"runtime": 5}}'),
    ("pending.json", b'{"action": "switch", "configs": [{"path": "/etc/passwd", "tmp": "/tmp/x"}]}'),
    ("pending.json", b"\xff\xfe\x00garbage"),
    ("pending.json", _DEEP),
    ("history.jsonl", b'{"action": "switch", "from": 5, "to": {"runtime": "3.1.0"}}\n'),
    ("history.jsonl", b'"just a string"\n'),
    ("history.jsonl", b'{"action": "switch", "from": {"runtime": ["x"]}}\n'),
    ("history.jsonl", b"\xff\xfe\n"),
    ("history.jsonl", _DEEP + b"\n"),
]


@pytest.mark.parametrize("name,data", _CORRUPT_STATE, ids=lambda x: x if isinstance(x, str) else None)
def test_corrupt_journal_or_history_is_a_clear_error_and_dry_runs_agree(cli, staged, name, data):
    """issue 16 #9/#13: a damaged pending.json or history.jsonl ended in 'unexpected
    AttributeError/RecursionError', and switch --dry-run said 0 where the real run says 1.
    Now every command that reads it exits 1 naming the file, and changes nothing."""
    node = staged
    J(cli, node, "switch", A)
    before = current(node)
    (rel(node, ".katactl") / name).write_bytes(data)
    for args in (["switch", B, "--dry-run"], ["switch", B], ["rollback", "--dry-run"], ["rollback"],
                 ["gc", "--dry-run"], ["gc", "--yes"], ["status"]):
        r = K(cli, node, *args, "-o", "json")
        assert r.exit_code == 1, (args, r.stdout, r.stderr)
        assert name in r.stderr and "unexpected" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.json()["kind"] == "Error"
        assert current(node) == before
    assert os.path.exists("/etc/passwd") and (rel(node, ".katactl") / name).read_bytes() == data



@pytest.mark.parametrize("data", [b"[1, 2]", b'"3.1.0"', b"null", b"7"])
def test_a_release_record_that_is_not_an_object_is_a_clear_error(cli, staged, tarballs, data):
    """review 7 #8: a record that is JSON but not an object ended in "AttributeError: 'list'
    object has no attribute 'get'". Every reader exits 1 naming the file; stage --force
    replaces such a release (its source is unknown)."""
    node = staged
    record = rel(node, A) / ".katactl-release.json"
    record.write_bytes(data)
    for args in (["status"], ["switch", A], ["switch", A, "--dry-run"], ["stage", tarballs["xz"]],
                 ["stage", tarballs["xz"], "--dry-run"]):
        r = K(cli, node, *args, "-o", "json")
        assert r.exit_code == 1, (args, r.stdout, r.stderr)
        assert f"{record.relative_to(node).as_posix()}: not a JSON object" in r.stderr, (args, r.stderr)
        assert "Error:" not in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 2
        assert r.json()["kind"] == "Error"
        assert current(node) is None and record.read_bytes() == data
    d = J(cli, node, "stage", tarballs["xz"], "--force")
    assert d["changed"] is True and d["replaced"] is True
    assert json.loads(record.read_text())["version"] == A

def test_status_names_handlers_whose_configuration_does_not_follow_current(cli, staged):
    """A switch replaces <root>/current only: a kata-deploy handler pointed at its own copy
    under /opt/kata/share/... keeps its configuration, and status says so (json + warning)."""
    J(cli, staged, "switch", A)
    cfg = staged / "etc" / "containerd"
    cfg.mkdir(parents=True, exist_ok=True)
    cri = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
    (cfg / "config.toml").write_text(
        "version = 2\n"
        f'[{cri}.runc]\nruntime_type = "io.containerd.runc.v2"\n'
        f'[{cri}.kata]\nruntime_type = "io.containerd.kata.v2"\n'
        f'[{cri}.kata.options]\nConfigPath = "/opt/kata/current/share/defaults/kata-containers/configuration-qemu.toml"\n'
        f'[{cri}.kata-qemu]\nruntime_type = "io.containerd.kata-qemu.v2"\n'
        f'[{cri}.kata-qemu.options]\n'
        'ConfigPath = "/opt/kata/share/defaults/kata-containers/runtimes/qemu/configuration-qemu.toml"\n'
        f'[{cri}.kata-pinned]\nruntime_type = "io.containerd.kata-pinned.v2"\n'
        f'[{cri}.kata-pinned.options]\nConfigPath = "/opt/kata/releases/{B}/share/defaults/kata-containers/configuration.toml"\n'
        f'[{cri}.kata-search]\nruntime_type = "io.containerd.kata-search.v2"\n'
        f'[{cri}.kata-linked]\nruntime_type = "io.containerd.kata-linked.v2"\n'
        f'[{cri}.kata-linked.options]\nConfigPath = "/etc/kata-containers/configuration.toml"\n')
    etc = staged / "etc" / "kata-containers"
    etc.mkdir(parents=True, exist_ok=True)
    # a link into current (absolute, a node path): follows current, though fully resolved
    # it names one release
    (etc / "configuration.toml").symlink_to("/opt/kata/current/share/defaults/kata-containers/configuration-qemu.toml")
    d = J(cli, staged, "status")
    rows = {h["handler"]: h for h in d["runtimeHandlers"]}
    assert set(rows) == {"kata", "kata-qemu", "kata-pinned", "kata-search", "kata-linked"}  # runc is not Kata
    assert rows["kata-linked"]["follows"] == "current"
    assert rows["kata"]["follows"] == "current"
    assert rows["kata-qemu"]["follows"] == "outside"
    assert (rows["kata-pinned"]["follows"], rows["kata-pinned"]["release"]) == ("release", B)
    assert rows["kata-search"]["follows"] == "default-search" and rows["kata-search"]["configPath"] is None
    r = K(cli, staged, "status")
    assert r.exit_code == 0
    warned = [ln for ln in r.stderr.splitlines() if "upgrade switch does not change" in ln]
    assert len(warned) == 2 and any("kata-qemu" in w for w in warned) and any(f"release {B} only" in w for w in warned)



@pytest.mark.parametrize("link", ["opt", "opt/kata", "opt/kata/releases"])
@pytest.mark.parametrize("args, code", [(["stage", "TARBALL"], 0), (["stage", "TARBALL", "--dry-run"], 0),
                                        (["switch", A], 3), (["rollback"], 3), (["gc", "--yes"], 0), (["status"], 0)])
def test_a_kata_root_through_an_absolute_symlink_is_the_nodes_under_a_host_root(cli, node, tarballs, link, args,
                                                                               code):
    """/opt/kata -> /data/kata in the node's tree is the node's /data/kata under --host-root, as on
    the node: a stage lands there, nothing is written at this host's /data/kata (which a stage
    once wrote, then katactl refused such a root, exit 2; nothing is staged yet, so switch and
    rollback find nothing: exit 3)."""
    outside = f"/katactl-escape-{os.getpid()}-{secrets.token_hex(4)}"
    real = f"{outside}/kata"
    (node / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink({"opt": outside, "opt/kata": real}.get(link, real + "/releases"), node / link)
    (node / real.lstrip("/")).mkdir(parents=True)
    args = [tarballs["xz"] if a == "TARBALL" else a for a in args]
    try:
        r = K(cli, node, *args)
        assert r.exit_code == code, (r.stdout, r.stderr)
        assert not os.path.lexists(outside)
        staged = (node / real.lstrip("/") / "releases" / A / ".katactl-release.json").is_file()
        assert staged == (args[0] == "stage" and "--dry-run" not in args)
    finally:
        if os.path.lexists(outside):  # the bug wrote to this host: clean up (the asserts failed)
            shutil.rmtree(outside)


def test_a_host_root_of_slash_follows_absolute_symlinks_as_this_host_does(cli, tmp_path, tarballs):
    """--host-root / is this host's own resolution: nothing leaves the tree, nothing is refused."""
    real = tmp_path / "data-kata"
    real.mkdir()
    os.symlink(real, tmp_path / "kata")
    r = cli(["--host-root", "/", "upgrade", "stage", tarballs["xz"], "--dry-run",
             "--kata-root", str(tmp_path / "kata")])
    assert r.exit_code == 0, (r.stdout, r.stderr)


def test_a_release_that_is_an_absolute_symlink_is_not_switched_to_under_a_host_root(cli, staged, tmp_path):
    """releases/V -> /elsewhere/V in the node's tree, /elsewhere/V whole on *this* host only: the
    preflight checked this host's copy and pointed the node's `current` at a release it lacks.
    The link resolves inside the node's tree now, where it dangles: not staged (exit 3)."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(rel(staged, B), outside / B, symlinks=True)
    shutil.rmtree(rel(staged, B))
    os.symlink(outside / B, rel(staged, B))
    before = current(staged)
    r = K(cli, staged, "switch", B)
    assert r.exit_code == 3, (r.stdout, r.stderr)
    assert f"release {B} is not staged" in r.stderr
    assert current(staged) == before
    # the node's own copy at that path is the release (before: refused, exit 5)
    shutil.copytree(outside / B, staged / str(outside / B).lstrip("/"), symlinks=True)
    shutil.rmtree(outside)
    r = K(cli, staged, "switch", B)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert current(staged) == f"releases/{B}" and not outside.exists()
