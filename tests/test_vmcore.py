"""vmcore list / collect / rm over real node trees (--host-root), real files.

Shared helpers (node trees with Kata config, dumps and their metadata) are
imported by the other test_vmcore_*.py files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess

import pytest

from katactl import vmcore
from katactl.backends.local import LocalTransport
from katactl.lab import layout
from katactl.vmcore import collection

DUMP_PATH = "/var/crash/kata"
SID = "3f2a4c1b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a"
SID2 = "3f99aa00bb11cc22dd33ee44ff5566778899aabbccddeeff0011223344556677"
TS = "20240102030405.12"


def make_elf_core(path: str, segments=((0x100000, 1 << 20),), data=b"", note=b"VMCOREINFO\0") -> int:
    """A QEMU-like ELF64 core: a PT_NOTE and PT_LOAD segments; returns the size."""
    phnum = 1 + len(segments)
    off = 64 + 56 * phnum
    notes_off, note_sz = off, len(note)
    off += note_sz
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, notes_off, 0, 0, note_sz, note_sz, 0)
    seg_offs = []
    for paddr, size in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, off, paddr, paddr, size, size, 0)
        seg_offs.append(off)
        off += size
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(ehdr + phdrs + note)
        if data:
            f.seek(seg_offs[0])
            f.write(data)
        f.truncate(off)
    return off


def node_tree(root, *, dump_path=DUMP_PATH, via_dropin=True, pod_from="bundle"):
    """A Go/QEMU node with guest_memory_dump_path set (by a config.d drop-in)."""
    root = str(root)
    base = os.path.join(root, "usr/share/defaults/kata-containers")
    os.makedirs(os.path.join(base, "config.d"), exist_ok=True)
    with open(os.path.join(base, "configuration.toml"), "w") as f:
        # extra_monitor_socket: katactl offers the extra monitor (QMP) only when the
        # configuration says so; the Go runtime does not persist it
        f.write('[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\ndefault_memory = 2048\n'
                'extra_monitor_socket = "qmp"\n'
                f'guest_memory_dump_path = "{"" if via_dropin else dump_path}"\n')
    if via_dropin:
        with open(os.path.join(base, "config.d/50-vmcore.toml"), "w") as f:
            f.write(f'[hypervisor.qemu]\nguest_memory_dump_path = "{dump_path}"\n')
    with open(os.path.join(root, "etc_hostname"), "w") as f:
        f.write("")
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc/hostname"), "w") as f:
        f.write("node-a\n")
    return root


def add_dump(root, sid=SID, *, ts=TS, size_segments=((0x100000, 1 << 20),), data=b"", pod=("default", "web-0"),
             bundle=True, ext="elf", content: bytes | None = None):
    """A dump exactly as the Go runtime leaves it (virtcontainers/qemu.go dumpGuestMemory and
    dumpSandboxMetaInfo): EnsureDir(state) then `cp -ar /run/vc/sbs/<id> state` (so
    state/<id>/persist.json), hypervisor.conf (MarshalIndent, one space), .version, vmcore."""
    root = str(root)
    uid = "0d3c2b1a-1111-2222-3333-444455556666"
    sb = layout.write_go_sandbox(root, sid, pod_name=pod[1], pod_namespace=pod[0], pod_uid=uid,
                                 memory_mib=512, guest_memory_dump_path=DUMP_PATH, container_ids=(sid,),
                                 bundle=bundle)
    d = os.path.join(root, DUMP_PATH.lstrip("/"), sid)
    os.makedirs(d, exist_ok=True)
    os.makedirs(os.path.join(d, "state"), exist_ok=True)
    subprocess.run(["cp", "-ar", sb.real(sb.state_dir_node), os.path.join(d, "state")], check=True)
    with open(os.path.join(d, f"state/{sid}/persist.json")) as f:
        hv = json.load(f)["Config"]["HypervisorConfig"]
    hv["GuestMemoryDumpPath"] = DUMP_PATH  # the runtime's in-memory config has it
    with open(os.path.join(d, "hypervisor.conf"), "w") as f:
        json.dump(hv, f, indent=1)
    with open(os.path.join(d, "hypervisor.version"), "w") as f:
        f.write("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022\n")
    p = os.path.join(d, f"vmcore-{ts}.{ext}")
    if content is not None:
        with open(p, "wb") as f:
            f.write(content)
    else:
        make_elf_core(p, size_segments, data)
    os.chmod(p, 0o400)
    return p


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


@pytest.fixture
def tree(tmp_path):
    root = node_tree(tmp_path / "node")
    add_dump(root, size_segments=((0x100000, 4 << 20),), data=os.urandom(4096))
    return root


# -- list ---------------------------------------------------------------------
def test_list_reads_dump_path_from_dropin_and_shows_metadata(cli, tree):
    r = cli(["--host-root", tree, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "VmcoreList"
    [it] = d["items"]
    assert it["name"] == f"{SID}/vmcore-{TS}.elf" and it["sandbox"] == SID
    assert it["format"] == "elf" and it["status"] == "ok"
    # the pod object of sandbox list, and its "NS/NAME" (review 11, finding 9)
    assert it["podRef"] == "default/web-0" and set(it["pod"]) == {"name", "namespace", "uid"}
    assert (it["pod"]["namespace"], it["pod"]["name"]) == ("default", "web-0")
    assert it["time"] == "2024-01-02T03:04:05.120Z"   # no /etc/localtime on the node: UTC (Go's rule)
    assert it["hypervisorVersion"].startswith("QEMU emulator version 7.2")
    assert it["collected"] is False and it["loadSegments"] == 1
    assert it["guestMemory"] == 512 << 20
    assert it["size"] == os.path.getsize(os.path.join(tree, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf"))


@pytest.mark.parametrize("host_root", [True, False], ids=["host-root", "this-host"])
def test_an_entry_that_cannot_be_listed_hides_no_other_dump(cli, tree, host_root):
    """A symlink loop in the dump directory failed vmcore list, rm and collect for every dump
    of the node (exit 1, 'Too many levels of symbolic links'), with or without --host-root
    (review 12 hostroot 4)."""
    top = os.path.join(tree, DUMP_PATH.lstrip("/"))
    os.symlink("loopb", os.path.join(top, "loopa"))
    os.symlink("loopa", os.path.join(top, "loopb"))
    where, local = (["--host-root", tree], []) if host_root else ([], ["--dump-path", top])
    r = cli([*where, "vmcore", "list", *local, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert [it["sandbox"] for it in r.json()["items"]] == [SID]
    r = cli([*where, "vmcore", "rm", SID, "--yes", *local, "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is True, r.stdout + r.stderr


def test_list_plain_table(cli, tree):
    r = cli(["--host-root", tree, "vmcore", "list"])
    assert r.exit_code == 0, r.stderr
    head, row = r.stdout.splitlines()
    assert head.split()[:3] == ["NAME", "POD", "SIZE"] and "default/web-0" in row


def test_pod_from_pod_logs_when_bundle_is_gone(cli, tmp_path):
    root = node_tree(tmp_path / "n")
    add_dump(root, bundle=False)
    # the sandbox died: no bundle; the pod UID in the saved cgroup path maps through /var/log/pods
    os.makedirs(os.path.join(root, "var/log/pods/prod_api-7_0d3c2b1a-1111-2222-3333-444455556666"))
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    [it] = r.json()["items"]
    assert it["podRef"] == "prod/api-7" and it["podUid"] == "0d3c2b1a-1111-2222-3333-444455556666"
    assert it["pod"] == {"name": "api-7", "namespace": "prod", "uid": "0d3c2b1a-1111-2222-3333-444455556666"}


def test_incomplete_dump_is_flagged(cli, tmp_path):
    root = node_tree(tmp_path / "n")
    p = add_dump(root)
    os.chmod(p, 0o600)
    os.truncate(p, os.path.getsize(p) - 4096)   # QEMU still writing
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.json()["items"][0]["status"] == "incomplete"
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "out"), "-o", "json"])
    assert r.exit_code == 5 and "incomplete" in r.stderr


def flat_kdump(pages: int = 4) -> bytes:
    """A makedumpfile flattened stream as QEMU dump/dump.c writes it (kdump-zlib): the 4 KiB
    flat header (signature, type 1, version 1, big-endian), then (offset, size, data) records,
    then the end header, offset = buf_size = -1."""
    out = b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1)
    out = out.ljust(4096, b"\0")
    disk = b"KDUMP   " + os.urandom(4088)
    out += struct.pack(">qq", 0, len(disk)) + disk
    for i in range(pages):
        out += struct.pack(">qq", 8192 + i * 4096, 4096) + os.urandom(4096)
    return out + struct.pack(">qq", -1, -1)


def test_truncated_flattened_kdump_is_incomplete(cli, tmp_path):
    """review5 #5: a kdump-flat dump cut short (QEMU killed, ENOSPC) was listed ok and collected
    verified; only ELF dumps were checked. A complete one ends with the flat end header."""
    root = node_tree(tmp_path / "n")
    data = flat_kdump()
    p = add_dump(root, ext="kdump", content=data)
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    [it] = r.json()["items"]
    assert (it["format"], it["status"]) == ("kdump-flat", "ok")
    os.chmod(p, 0o600)
    for cut in (16, 8, 4096 + 100):
        with open(p, "wb") as f:
            f.write(data[:-cut])
        r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
        assert r.json()["items"][0]["status"] == "incomplete", cut
        r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "out"), "-o", "json"])
        assert r.exit_code == 5 and "no end marker of a flattened kdump stream" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


def test_kdump_and_other_files(cli, tmp_path):
    root = node_tree(tmp_path / "n")
    add_dump(root, ext="kdump", content=b"makedumpfile\0\0\0\0" + bytes(100))
    open(os.path.join(root, DUMP_PATH.lstrip("/"), SID, "notes.txt"), "w").close()
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    [it] = r.json()["items"]
    assert it["format"] == "kdump-flat" and it["file"].endswith(".kdump")


def test_list_without_dump_path_configured(cli, tmp_path):
    root = node_tree(tmp_path / "n", dump_path="")
    r = cli(["--host-root", root, "vmcore", "list"])
    assert r.exit_code == 3 and "guest_memory_dump_path is not set" in r.stderr
    assert "hint:" in r.stderr and "Traceback" not in r.stderr


def test_list_without_kata_config(cli, tmp_path):
    r = cli(["--host-root", str(tmp_path), "vmcore", "list"])
    assert r.exit_code == 3 and "no Kata configuration" in r.stderr


def test_list_dump_dir_missing_is_empty(cli, tmp_path):
    root = node_tree(tmp_path / "n")
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0 and r.json()["items"] == []


def test_go_timestamp_matches_go_format():
    import calendar
    import datetime

    utc = datetime.timezone.utc
    t = calendar.timegm((2024, 1, 2, 3, 4, 5, 0, 0, 0))
    assert vmcore.go_timestamp(t + 0.120, tz=utc) == "20240102030405.12"
    assert vmcore.go_timestamp(t, tz=utc) == "20240102030405"
    assert vmcore.go_timestamp(t + 0.5, tz=utc) == "20240102030405.5"
    # Go's .999 layout truncates (before: katactl rounded this up to ...06)
    assert vmcore.go_timestamp(t + 0.9996, tz=utc) == "20240102030405.999"
    assert vmcore.go_timestamp(t + 0.1239, tz=utc) == "20240102030405.123"
    assert vmcore.dump_timestamp("vmcore-20240102030405.elf") == "2024-01-02T03:04:05.000Z"
    # the lab plays the Go runtime: its names trim zeros too
    from katactl.lab import panic

    assert panic.vmcore_name(t + 0.5) == "vmcore-20240102030405.5.elf"
    assert panic.vmcore_name(t) == "vmcore-20240102030405.elf"
    # one naming for every dump katactl or the lab writes: kdump formats are .kdump
    assert vmcore.dump_name("kdump-zlib", t, tz=utc) == "vmcore-20240102030405.kdump"
    assert panic.vmcore_name(t, fmt="kdump-zlib") == vmcore.dump_name("kdump-zlib", t, tz=utc)


def _set_zone(root, zone):
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    shutil.copyfile(f"/usr/share/zoneinfo/{zone}", os.path.join(root, "etc/localtime"))


@pytest.mark.parametrize("zone,ts,want", [
    ("Asia/Tokyo", "20240102030405.12", "2024-01-01T18:04:05.120Z"),          # UTC+9
    ("America/New_York", "20240702030405", "2024-07-02T07:04:05.000Z"),      # summer: UTC-4
    ("America/New_York", "20240102030405.5", "2024-01-02T08:04:05.500Z"),    # winter: UTC-5
])
def test_list_time_is_utc_from_the_nodes_zone(cli, tmp_path, zone, ts, want):
    """The runtime names dumps in the node's local time without a zone; list says UTC."""
    if not os.path.exists(f"/usr/share/zoneinfo/{zone}"):
        pytest.fail("tzdata missing: /usr/share/zoneinfo (scripts/setup installs it)")
    root = node_tree(tmp_path / "n")
    add_dump(root, ts=ts)
    _set_zone(root, zone)
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["time"] == want
    # and a dump the CLI takes is named in that zone too (as the runtime would)
    import datetime

    tz = vmcore.node_zone(LocalTransport(root))
    t = datetime.datetime(2024, 7, 2, 7, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
    assert vmcore.dump_timestamp(f"vmcore-{vmcore.go_timestamp(t, tz=tz)}.elf", tz) == "2024-07-02T07:04:05.000Z"


@pytest.mark.parametrize("localtime", [b"", b"not a zone file", None])
def test_unreadable_zone_is_utc(tmp_path, localtime):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "etc"))
    if localtime is None:
        os.symlink("/nonexistent/zoneinfo/Nowhere/Town", os.path.join(root, "etc/localtime"))
    else:
        with open(os.path.join(root, "etc/localtime"), "wb") as f:
            f.write(localtime)
    import datetime

    assert vmcore.node_zone(LocalTransport(root)) == datetime.timezone.utc


@pytest.mark.parametrize("name", ["vmcore-20241399999999.elf", "vmcore-00000000000000.1.elf"])
def test_impossible_dump_date_lists_without_time(cli, tmp_path, name):
    root = node_tree(tmp_path / "n")
    add_dump(root)
    d = os.path.join(root, DUMP_PATH.lstrip("/"), SID)
    shutil.copyfile(os.path.join(d, f"vmcore-{TS}.elf"), os.path.join(d, name))
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    times = {i["file"]: i["time"] for i in r.json()["items"]}
    assert times == {name: None, f"vmcore-{TS}.elf": "2024-01-02T03:04:05.120Z"}


# -- collect --------------------------------------------------------------------
def test_collect_copies_dump_metadata_and_manifest(cli, tree, tmp_path):
    out = tmp_path / "out"
    r = cli(["--host-root", tree, "vmcore", "collect", "--to", str(out), "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["changed"] is True and d["dryRun"] is False
    [it] = d["items"]
    dest = out / "node-a" / SID
    src = os.path.join(tree, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf")
    assert it["verified"] is True and it["sha256"] == sha(src)
    copied = dest / f"vmcore-{TS}.elf"
    assert sha(copied) == sha(src)
    for f in ("hypervisor.conf", "hypervisor.version", f"state/{SID}/persist.json",
              f"state/{SID}/{SID}/persist.json", "SHA256SUMS", "manifest.json"):
        assert (dest / f).is_file(), f
    assert stat.S_IMODE(os.stat(copied).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dest / f"state/{SID}/persist.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o700
    # the manifest checks with coreutils
    p = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    m = json.loads((dest / "manifest.json").read_text())
    assert m["podRef"] == "default/web-0" and m["pod"]["name"] == "web-0" and m["files"][f"vmcore-{TS}.elf"]["verified"] is True
    assert not list(dest.glob("*.partial*"))
    # dumps are mostly zero pages: the local copy stays sparse
    assert os.stat(copied).st_blocks * 512 < os.path.getsize(copied)
    # list now shows it collected
    r = cli(["--host-root", tree, "vmcore", "list", "-o", "json"])
    assert r.json()["items"][0]["collected"] is True


def test_second_collect_is_a_noop(cli, tree, tmp_path):
    out = str(tmp_path / "out")
    assert cli(["--host-root", tree, "vmcore", "collect", "--to", out]).exit_code == 0
    r = cli(["--host-root", tree, "vmcore", "collect", "--to", out, "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is False
    assert r.json()["items"][0]["changed"] is False


def test_collect_dry_run_writes_nothing(cli, tree, tmp_path):
    out = tmp_path / "out"
    r = cli(["--host-root", tree, "vmcore", "collect", "--to", str(out), "--dry-run", "-o", "json"])
    assert r.exit_code == 0 and r.json()["dryRun"] is True and r.json()["changed"] is True
    assert not out.exists()


@pytest.mark.parametrize("algo,opener", [("gzip", "gzip"), ("zstd", "zstd")])
def test_collect_compressed_decompresses_to_the_source(cli, tmp_path, algo, opener):
    if algo == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    root = node_tree(tmp_path / "n")
    src = add_dump(root, data=os.urandom(200_000))
    out = tmp_path / "out"
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(out), "--compress", algo, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    suffix = {"gzip": ".gz", "zstd": ".zst"}[algo]
    stored = out / "node-a" / SID / f"vmcore-{TS}.elf{suffix}"
    assert it["to"] == str(stored) and sha(stored) == it["sha256"]
    dec = subprocess.run([opener, "-dc", str(stored)], capture_output=True, check=True).stdout
    assert hashlib.sha256(dec).hexdigest() == sha(src)
    assert os.path.getsize(stored) < os.path.getsize(src)
    m = json.loads((stored.parent / "manifest.json").read_text())
    assert m["files"][stored.name]["source"]["sha256"] == sha(src)


def test_collect_compressed_multi_segment(tmp_path, monkeypatch):
    """Segments (gzip members) are independently decodable and concatenate to the source."""
    monkeypatch.setattr(collection, "SEGMENT", 3 << 20)
    root = node_tree(tmp_path / "n")
    src = add_dump(root, size_segments=((0, 10 << 20),), data=os.urandom(5 << 20))
    t = LocalTransport(root)
    [res] = vmcore.collect(t, [], vmcore.CollectOptions(to=str(tmp_path / "o"), compress="gzip"),
                           index=vmcore.CollectIndex(str(tmp_path / "idx")))
    import gzip

    with gzip.open(res["to"], "rb") as g:
        assert hashlib.sha256(g.read()).hexdigest() == sha(src)


def test_collect_selects_by_ref(cli, tmp_path):
    root = node_tree(tmp_path / "n")
    add_dump(root)
    add_dump(root, SID2, pod=("prod", "db-0"))
    out = str(tmp_path / "o")
    r = cli(["--host-root", root, "vmcore", "collect", "prod/db-0", "--to", out, "-o", "json"])
    assert [i["name"].split("/")[0] for i in r.json()["items"]] == [SID2]
    r = cli(["--host-root", root, "vmcore", "collect", "3f2a", "--to", out, "-o", "json"])
    assert [i["name"].split("/")[0] for i in r.json()["items"]] == [SID]
    r = cli(["--host-root", root, "vmcore", "collect", "3f", "--to", out])
    assert r.exit_code == 3 and "matches the dumps of 2 sandboxes" in r.stderr
    r = cli(["--host-root", root, "vmcore", "collect", "nope", "--to", out])
    assert r.exit_code == 3 and "no vmcore matches" in r.stderr


def test_delete_after_only_once_verified(cli, tree, tmp_path):
    src = os.path.join(tree, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf")
    r = cli(["--host-root", tree, "vmcore", "collect", "--to", str(tmp_path / "o"), "--delete-after", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["deleted"] is True and it["verified"] is True
    assert not os.path.exists(src) and not os.path.exists(os.path.dirname(src))  # last dump: dir goes
    assert os.path.exists(it["to"])
    r = cli(["--host-root", tree, "vmcore", "list", "-o", "json"])
    assert r.json()["items"] == []


def _audit_entries(home):
    log = home / "state" / "katactl" / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_collect_audit_log(cli, tree, tmp_path, _isolated_home):
    assert cli(["--host-root", tree, "vmcore", "collect", "--to", str(tmp_path / "o"), "--dry-run"]).exit_code == 0
    assert _audit_entries(_isolated_home) == []            # a dry run changes nothing: no entry
    cli(["--host-root", tree, "vmcore", "collect", "--to", str(tmp_path / "o")])
    [e] = _audit_entries(_isolated_home)
    assert e["action"] == "vmcore.collect" and e["changed"] is True and e["result"] == "ok"
    assert e["target"] == f"{SID}/vmcore-{TS}.elf" and e["node"] == "localhost" and e["sha256"]


def test_collect_audit_log_setting_and_failure(cli, tmp_path, _isolated_home, monkeypatch):
    """The library records its own entries (success and failure) where audit_log says."""
    root = node_tree(tmp_path / "n")
    add_dump(root)
    p = add_dump(root, SID2, pod=("prod", "db-0"))
    os.chmod(p, 0o600)
    os.truncate(p, os.path.getsize(p) - 4096)              # incomplete: refused
    log = tmp_path / "custom-audit.log"
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(log))
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "-o", "json"])
    assert r.exit_code == 4, r.stderr                      # one collected, one refused
    d = r.json()
    assert [i["name"] for i in d["items"]] == [f"{SID}/vmcore-{TS}.elf"]
    [err] = d["errors"]
    assert err["target"] == f"{SID2}/vmcore-{TS}.elf" and err["error"]["exitCode"] == 5
    entries = {e["target"]: e for e in map(json.loads, log.read_text().splitlines())}
    assert entries[f"{SID}/vmcore-{TS}.elf"]["result"] == "ok"
    bad = entries[f"{SID2}/vmcore-{TS}.elf"]
    assert bad["result"] == "error" and "incomplete" in bad["error"] and bad["changed"] is False
    assert not (_isolated_home / "state" / "katactl" / "audit.log").exists()


def test_collect_every_dump_failed_exit_code(cli, tmp_path):
    """All failed with the same code: that code (not 4: nothing succeeded)."""
    root = node_tree(tmp_path / "n")
    for sid in (SID, SID2):
        p = add_dump(root, sid)
        os.chmod(p, 0o600)
        os.truncate(p, os.path.getsize(p) - 4096)
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), "-o", "json"])
    assert r.exit_code == 5, r.stderr
    assert r.json()["items"] == [] and len(r.json()["errors"]) == 2
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o")])
    assert r.exit_code == 5 and r.stderr.count("incomplete") == 2 and "Traceback" not in r.stderr


def test_collect_library_keep_going(tmp_path):
    """Without the CLI: keep_going reports a failed dump as an item; without it, it raises."""
    from katactl.errors import Refused

    root = node_tree(tmp_path / "n")
    add_dump(root)
    p = add_dump(root, SID2, pod=("prod", "db-0"))
    os.chmod(p, 0o600)
    os.truncate(p, os.path.getsize(p) - 4096)
    t, opts = LocalTransport(root), vmcore.CollectOptions(to=str(tmp_path / "o"))
    idx = vmcore.CollectIndex(str(tmp_path / "idx"))
    with pytest.raises(Refused):
        vmcore.collect(t, [], opts, index=idx)
    res = vmcore.collect(t, [], opts, index=idx, keep_going=True)
    assert [("error" in r, r["name"].split("/")[0]) for r in res] == [(False, SID), (True, SID2)]
    with pytest.raises(Refused):                            # the only dump: its own error
        vmcore.collect(t, [SID2], opts, index=idx, keep_going=True)


@pytest.mark.parametrize("args,msg", [
    (["--compress", "xz"], "invalid --compress"),
    (["--compress", ""], "invalid --compress"),
    (["--bwlimit", "fast"], "invalid --bwlimit"),
    (["--bwlimit", "-1"], "--bwlimit"),
    (["--dump-level", "32"], "dump-level"),
    (["--dump-path", "relative/dir"], "must be an absolute path"),
    (["--kata-config", "etc/kata.toml"], "must be an absolute path"),
    (["--kata-config", ""], "must be an absolute path"),
    (["--dump-path", ""], "must be an absolute path"),
    (["--makedumpfile", "--compress", "gzip"], "makedumpfile"),
    (["--compress", "zstd", "--compress-on", "bogus"], "invalid --compress-on 'bogus'"),
    (["--compress", "gzip", "--compress-on", ""], "invalid --compress-on"),
    (["--compress-on", "node"], "--compress-on node needs --compress gzip or zstd"),
    (["--makedumpfile", "--compress-on", "node"], "--compress-on node needs"),
    # --to is checked before any node is asked (the last --to wins)
    (["--to", "/etc/passwd"], "not a directory"),
    (["--to", "/etc/passwd/crash"], "/etc/passwd is not a directory"),
    (["--to", "/proc/sys"], "under /proc or /sys"),
    (["--to", "/sys/kernel/new-dir"], "under /proc or /sys"),
    (["--to", ""], "--to must name a directory"),
    (["--to", "  "], "--to must name a directory"),
    (["--to", "a\0b"], "NUL"),
])
@pytest.mark.parametrize("with_dumps", [True, False])
def test_collect_bad_values(cli, tree, tmp_path, args, msg, with_dumps, _isolated_home):
    root = tree if with_dumps else node_tree(tmp_path / "empty")
    r = cli(["--host-root", root, "vmcore", "collect", "--to", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists() and _audit_entries(_isolated_home) == []


def test_collect_needs_to(cli, tree):
    r = cli(["--host-root", tree, "vmcore", "collect"])
    assert r.exit_code == 2 and "--to" in r.stderr


def test_makedumpfile_missing_is_clear(cli, tree, tmp_path, monkeypatch):
    """A node without makedumpfile: PATH (the node's environment) lacks it; always runs."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("makedumpfile") is None
    r = cli(["--host-root", tree, "vmcore", "collect", "--to", str(tmp_path / "o"), "--makedumpfile"])
    assert r.exit_code == 1, r.stderr
    assert "makedumpfile is not installed on node" in r.stderr and "hint: apt-get install makedumpfile" in r.stderr
    assert "Traceback" not in r.stderr and not list((tmp_path / "o").rglob("*.kdump"))


# -- rm ---------------------------------------------------------------------------
def test_rm_needs_yes_without_tty(cli, tree):
    r = cli(["--host-root", tree, "vmcore", "rm", SID[:8]])
    assert r.exit_code == 5 and "--yes" in r.stderr
    assert os.path.exists(os.path.join(tree, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf"))


def test_rm_dry_run_then_yes_then_idempotent(cli, tree):
    d = os.path.join(tree, DUMP_PATH.lstrip("/"), SID)
    r = cli(["--host-root", tree, "vmcore", "rm", f"vmcore-{TS}.elf", "--dry-run", "-o", "json"])
    assert r.exit_code == 0 and r.json()["dryRun"] is True and os.path.exists(d)
    r = cli(["--host-root", tree, "vmcore", "rm", f"{SID}/vmcore-{TS}.elf", "--yes", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True and not os.path.exists(d)   # last dump: the sandbox dir goes
    r = cli(["--host-root", tree, "vmcore", "rm", f"{SID}/vmcore-{TS}.elf", "--yes", "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is False


def test_rm_keeps_dir_with_other_dumps(cli, tree):
    add_dump(tree, ts="20240102030406.5")
    r = cli(["--host-root", tree, "vmcore", "rm", f"{SID}/vmcore-{TS}.elf", "-y"])
    assert r.exit_code == 0
    d = os.path.join(tree, DUMP_PATH.lstrip("/"), SID)
    assert os.listdir(d) and os.path.exists(os.path.join(d, "vmcore-20240102030406.5.elf"))


@pytest.mark.parametrize("ref", ["", "a\0b", "x" * 5000, "..", "../../etc/passwd", "../../etc", "/etc/passwd",
                                 "a\nb", f"{DUMP_PATH}/../{SID}/vmcore-{TS}.elf", f"../vmcore-{TS}.elf",
                                 f"/x/vmcore-{TS}.elf", f"{DUMP_PATH}/{SID}/core", "a/b/c"])
@pytest.mark.parametrize("cmd", [["rm", "--yes"], ["collect", "--to", "@OUT@"]])
def test_rm_collect_bad_refs(cli, tree, tmp_path, ref, cmd, _isolated_home):
    """A malformed reference is a usage error before any node is asked, never "nothing to
    delete" (exit 0) nor "not found" (exit 3)."""
    d = os.path.join(tree, DUMP_PATH.lstrip("/"), SID)
    before = sorted(os.listdir(d))
    r = cli(["--host-root", tree, "vmcore", cmd[0], ref, *[str(tmp_path / "o") if a == "@OUT@" else a
                                                           for a in cmd[1:]]])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert sorted(os.listdir(d)) == before and not (tmp_path / "o").exists()
    assert _audit_entries(_isolated_home) == []


@pytest.mark.parametrize("args", [["list"], ["rm", SID[:8], "--yes"], ["collect", "--to", "@OUT@"]])
def test_empty_dump_path_is_a_usage_error(cli, tree, tmp_path, args):
    """--dump-path '' is not "the default" (as --kata-config '' is not)."""
    args = [str(tmp_path / "o") if a == "@OUT@" else a for a in args]
    r = cli(["--host-root", tree, "vmcore", *args, "--dump-path", ""])
    assert r.exit_code == 2 and "--dump-path" in r.stderr and "absolute" in r.stderr, r.stderr
    assert os.path.exists(os.path.join(tree, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf"))


def test_no_config_needs_dump_path(cli, tmp_path):
    """No configuration.toml where the runtime looks (a snapshot): nothing on the node says
    where dumps go (the Go runtime's persist.json never holds GuestMemoryDumpPath), so
    katactl asks for --dump-path or --kata-config instead of guessing."""
    root = str(tmp_path / "n")
    add_dump(root)
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 3 and "--kata-config" in r.stderr, r.stderr
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json", "--dump-path", DUMP_PATH])
    assert r.exit_code == 0, r.stderr
    assert [i["sandbox"] for i in r.json()["items"]] == [SID]


@pytest.mark.parametrize("features,code", [(("kvm", "guest_debug"), 0), (("kvm",), 1)])
def test_trigger_cloud_hypervisor_coredump(cli, features, code, _isolated_home):
    """The lab's protocol-faithful Cloud Hypervisor API server on a real socket."""
    import tempfile

    from katactl.lab.clh_server import ClhServer

    root = node_tree(tempfile.mkdtemp(prefix="kc", dir="/tmp"))
    sid = "c1c1c1c1d2d2d2d2e3e3e3e3f4f4f4f4"
    sb = layout.write_go_sandbox(root, sid, hypervisor="clh", memory_mib=256, guest_memory_dump_path=DUMP_PATH)
    srv = ClhServer(sb.real(sb.api_socket_node), 256 << 20, features=features)
    try:
        r = cli(["--host-root", root, "vmcore", "trigger", sid[:6], "--dry-run", "-o", "json"])
        assert r.exit_code == code, r.stderr
        assert _audit_entries(_isolated_home) == []                      # a dry run: no entry
        r = cli(["--host-root", root, "vmcore", "trigger", sid[:6], "-o", "json"])
        assert r.exit_code == code, r.stderr
        entries = _audit_entries(_isolated_home)
        # a dump: "requested" before its directory and request, then the outcome; a refusal before: only that
        assert [(e["action"], e["target"], e["node"]) for e in entries] == \
            [("vmcore.trigger", sid, "localhost")] * (2 if code == 0 else 1)
        if code == 0:
            assert (entries[0]["result"], entries[0]["requestSent"]) == ("requested", True)
            entries = entries[1:]
            d = r.json()
            assert d["node"] == "localhost"            # always there, like balloon/shim/sandbox inspect
            assert d["via"] == "clh" and d["path"].startswith(f"{DUMP_PATH}/{sid}/vmcore-")
            assert d["changed"] is True and d["dryRun"] is False
            with open(os.path.join(root, d["path"].lstrip("/")), "rb") as f:
                assert f.read(4) == b"\x7fELF"
            assert os.path.isfile(os.path.join(root, DUMP_PATH.lstrip("/"), sid, "hypervisor.conf"))
            assert entries[0]["result"] == "ok" and entries[0]["dump"] == d["path"] and entries[0]["changed"]
            r = cli(["--host-root", root, "vmcore", "trigger", sid[:6], "--format", "kdump-zlib"])
            assert r.exit_code == 2 and "ELF dumps only" in r.stderr
            assert len(_audit_entries(_isolated_home)) == 2                # a usage error: no entry
        else:
            assert "guest_debug" in r.stderr
            assert entries[0]["result"] == "error" and "guest_debug" in entries[0]["error"]
            assert entries[0]["changed"] is False
    finally:
        srv.close()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_trigger_help_says_sandbox_forms_and_not_idempotent(cli):
    r = cli(["vmcore", "trigger", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    from katactl.commands._common import SANDBOX_HELP

    assert SANDBOX_HELP in text and "pod/batch/train-0" in text
    assert "Not idempotent" in text and "pauses the guest" in text


@pytest.mark.parametrize("args,msg", [
    ([""], "empty SANDBOX"),
    (["a\0b"], "NUL"),
    (["pod/batch"], "expected pod/NAMESPACE/NAME"),
    (["pod//x"], "expected pod/NAMESPACE/NAME"),
    (["pod/a/b/c"], "expected pod/NAMESPACE/NAME"),
    ([SID[:6], "--format", "xz"], "invalid --format"),
    ([SID[:6], "--format", ""], "invalid --format"),
    ([SID[:6], "--timeout", "soon"], "--timeout"),
    ([SID[:6], "--timeout", "-5s"], "--timeout"),
    ([SID[:6], "--dump-path", "var/crash"], "must be an absolute path"),
    ([SID[:6], "--dump-path", ""], "must be an absolute path"),
    ([SID[:6], "--kata-config", "kata.toml"], "must be an absolute path"),
])
def test_trigger_bad_input(cli, tree, args, msg, _isolated_home):
    r = cli(["--host-root", tree, "vmcore", "trigger", *args])
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert _audit_entries(_isolated_home) == []
    assert sorted(os.listdir(os.path.join(tree, DUMP_PATH.lstrip("/"), SID))) == [
        "hypervisor.conf", "hypervisor.version", "state", f"vmcore-{TS}.elf"]


def test_rm_audit_log(cli, tree, _isolated_home):
    assert cli(["--host-root", tree, "vmcore", "rm", SID[:8], "--yes", "--dry-run"]).exit_code == 0
    assert _audit_entries(_isolated_home) == []
    assert cli(["--host-root", tree, "vmcore", "rm", SID[:8], "--yes"]).exit_code == 0
    [e] = _audit_entries(_isolated_home)
    assert e["action"] == "vmcore.rm" and e["target"] == f"{SID}/vmcore-{TS}.elf" and e["changed"] is True
    assert e["result"] == "ok" and e["removedDir"] == f"{DUMP_PATH}/{SID}"


def test_rm_failure_is_audited(tmp_path, monkeypatch):
    """A deletion the node refuses (here: the dump became a directory after it was listed,
    unlink(2) says EISDIR, also for root) is an error entry in the audit log, and raised."""
    root = node_tree(tmp_path / "n")
    add_dump(root)
    odd = os.path.join(root, DUMP_PATH.lstrip("/"), SID, "vmcore-20240102030406.elf")
    with open(odd, "wb") as f:
        f.write(b"\x7fELF")
    log = tmp_path / "audit.log"
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(log))
    t = LocalTransport(root)
    [d] = vmcore.resolve_dumps(t, ["vmcore-20240102030406.elf"], index=vmcore.CollectIndex(str(tmp_path / "i")))
    os.remove(odd)
    os.makedirs(os.path.join(odd, "x"))
    with pytest.raises(OSError):
        vmcore.remove_dumps(t, [d])
    assert os.path.isdir(odd)
    [e] = [json.loads(line) for line in log.read_text().splitlines()]
    assert e["action"] == "vmcore.rm" and e["result"] == "error" and e["changed"] is False and e["error"]


def test_makedumpfile_failure_is_clear_and_leaves_nothing(cli, tree, tmp_path):
    if not shutil.which("makedumpfile"):
        pytest.skip("makedumpfile not installed")
    r = cli(["--host-root", tree, "vmcore", "collect", "--to", str(tmp_path / "o"), "--makedumpfile"])
    # a dump without a usable VMCOREINFO note cannot be filtered
    assert r.exit_code == 1 and "makedumpfile failed" in r.stderr and "VMCOREINFO" in r.stderr
    d = os.path.join(tree, DUMP_PATH.lstrip("/"), SID)
    assert not [n for n in os.listdir(d) if n.startswith(".katactl-")]
    assert not list((tmp_path / "o").rglob("*.kdump"))


def test_trigger_writes_the_runtimes_dump_layout(tmp_path):
    """katactl's own trigger lays out <dump>/<id>/ as the Go runtime does: state/<id>/persist.json
    (EnsureDir(state) before `cp -ar`), hypervisor.conf indented with one space. Before:
    state/persist.json, and dumps written by the runtime never mapped to a pod."""
    from katactl.backends.local import LocalTransport
    from katactl.vmcore.capture import prepare_dump_dir

    root = node_tree(tmp_path / "n")
    layout.write_go_sandbox(root, SID, memory_mib=512, container_ids=(SID,))
    d, _ = prepare_dump_dir(LocalTransport(root), SID, DUMP_PATH)
    real = os.path.join(root, d.lstrip("/"))
    assert os.path.isfile(os.path.join(real, "state", SID, "persist.json"))
    assert not os.path.exists(os.path.join(real, "state", "persist.json"))
    text = open(os.path.join(real, "hypervisor.conf")).read()
    assert text.startswith('{\n "') and json.loads(text)["GuestMemoryDumpPath"] == DUMP_PATH


def test_old_katactl_dump_layout_still_maps_to_the_pod(cli, tmp_path):
    """Dumps katactl's trigger wrote before (state/persist.json) keep their pod."""
    import shutil

    root = node_tree(tmp_path / "n")
    add_dump(root, bundle=False)
    d = os.path.join(root, DUMP_PATH.lstrip("/"), SID, "state")
    for name in os.listdir(os.path.join(d, SID)):
        shutil.move(os.path.join(d, SID, name), os.path.join(d, name + ".x"))
    os.rmdir(os.path.join(d, SID))
    for name in os.listdir(d):
        os.rename(os.path.join(d, name), os.path.join(d, name[:-2]))
    assert os.path.isfile(os.path.join(d, "persist.json"))
    os.makedirs(os.path.join(root, "var/log/pods/prod_api-7_0d3c2b1a-1111-2222-3333-444455556666"))
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    [it] = r.json()["items"]
    assert it["podRef"] == "prod/api-7" and it["pod"]["name"] == "api-7"


# -- a kata-deploy node: each runtime handler has its own configuration and config.d ----------
KD_QEMU = '[hypervisor.qemu]\npath = "/opt/kata/bin/qemu-system-x86_64"\nguest_memory_dump_path = ""\n'
KD_CLH = '[hypervisor.clh]\npath = "/opt/kata/bin/cloud-hypervisor"\n'
KD_DROPIN = f'[hypervisor.qemu]\nguest_memory_dump_path = "{DUMP_PATH}"\n'


def kata_deploy_node(root, *, sandbox=True):
    """kata-deploy's layout (layout.write_kata_deploy) where guest_memory_dump_path is set only
    in the kata-qemu handler's runtimes/qemu/config.d drop-in, with kata-static's default
    configuration.toml (no dump path) where the node-wide search looks, and a dump."""
    root = str(root)
    hs = layout.write_kata_deploy(root, {"qemu": KD_QEMU, "clh": KD_CLH},
                                  dropins={"qemu": {"50-dump.toml": KD_DROPIN}})
    default = os.path.join(root, "opt/kata/share/defaults/kata-containers/configuration.toml")
    os.symlink("configuration-qemu.toml", default)  # kata-static's link (the pristine copy)
    add_dump(root)
    bundle = f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{SID}"
    layout.write_shim_binary_path(root, bundle, hs["kata-qemu"].runtime_path)
    if not sandbox:  # the sandbox is gone; its dump stays
        shutil.rmtree(os.path.join(root, f"run/vc/sbs/{SID}"))
    return root, hs


@pytest.mark.parametrize("sandbox", [True, False])
def test_list_on_kata_deploy_reads_the_handlers_config_d(cli, tmp_path, sandbox):
    """issue 18 item 10: the node-wide search (/etc, then the build's defaults) misses a
    dump path set in a handler's runtimes/<shim>/config.d; the sandbox's own configuration
    (and, once it is gone, its handler's ConfigPath) has it."""
    root, hs = kata_deploy_node(tmp_path / "n", sandbox=sandbox)
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["path"] == f"{DUMP_PATH}/{SID}/vmcore-{TS}.elf" and it["podRef"] == "default/web-0"
    # --kata-config FILE stays the explicit override: that file (with its config.d) only
    r = cli(["--host-root", root, "vmcore", "list", "--kata-config", hs["kata-clh"].config_path])
    assert r.exit_code == 3 and "guest_memory_dump_path is not set in" in r.stderr
    assert "configuration-clh.toml" in r.stderr
    r = cli(["--host-root", root, "vmcore", "list", "--kata-config", hs["kata-qemu"].config_path, "-o", "json"])
    assert r.exit_code == 0 and len(r.json()["items"]) == 1, r.stderr


def test_list_collects_every_handlers_dump_path(tmp_path):
    """Two handlers with different dump directories: the dumps of both are listed."""
    root, _ = kata_deploy_node(tmp_path / "n")
    other = "/var/crash/kata-clh"
    base = os.path.join(root, "opt/kata/share/defaults/kata-containers/runtimes/clh/config.d")
    with open(os.path.join(base, "50-dump.toml"), "w") as f:
        f.write(f'[hypervisor.clh]\nguest_memory_dump_path = "{other}"\n')
    os.makedirs(os.path.join(root, other.lstrip("/"), SID2))
    shutil.copy(os.path.join(root, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf"),
                os.path.join(root, other.lstrip("/"), SID2, f"vmcore-{TS}.elf"))
    items = vmcore.list_dumps(LocalTransport(root))
    assert sorted(i["path"] for i in items) == sorted([f"{DUMP_PATH}/{SID}/vmcore-{TS}.elf",
                                                       f"{other}/{SID2}/vmcore-{TS}.elf"])


def test_runtime_rs_sandboxes_are_said_to_write_no_panic_dump(cli, tmp_path):
    """runtime-rs accepts guest_memory_dump_path and never uses it (no GUEST_PANICKED
    handler): a node whose only dump path is a runtime-rs one says so."""
    root = str(tmp_path / "n")
    layout.write_kata_deploy(root, {"dragonball": '[hypervisor.dragonball]\n'
                                    f'guest_memory_dump_path = "{DUMP_PATH}"\n'})
    layout.write_rs_sandbox(root, SID, hypervisor="dragonball", pid=os.getpid(), guest_memory_dump_path=DUMP_PATH)
    r = cli(["--host-root", root, "vmcore", "list"])
    assert r.exit_code == 3, r.stderr
    assert "runtime-rs writes no vmcore when a guest panics" in r.stderr
    assert f"sandbox {SID[:12]}" in r.stderr and "runtime handler kata-dragonball" in r.stderr
