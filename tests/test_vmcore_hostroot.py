"""vmcore under --host-root: the node tree's symlinks resolve inside the root, as the node itself
resolves them (review 11, vmcore finding 2: this host's kernel followed an absolute link from
*its* /, so dumps went missing, this host's files were copied into --to, and rm deleted outside
the root)."""
from __future__ import annotations

import os
import shutil

from tests.test_vmcore import SID, TS, add_dump, node_tree, sha


def _dumps_in(out) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs
                  if f.startswith("vmcore-"))


def test_a_dump_dir_behind_an_absolute_symlink_is_listed_collected_and_removed(cli, tmp_path):
    """/var/crash -> /data/crash: crash dumps on a bigger disk, a common node layout."""
    root = node_tree(tmp_path / "node")
    add_dump(root, data=os.urandom(4096))
    os.makedirs(f"{root}/data")
    shutil.move(f"{root}/var/crash", f"{root}/data/crash")
    os.symlink("/data/crash", f"{root}/var/crash")
    src = f"{root}/data/crash/kata/{SID}/vmcore-{TS}.elf"
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [item] = r.json()["items"]
    assert (item["name"], item["status"]) == (f"{SID}/vmcore-{TS}.elf", "ok")
    assert item["hypervisorVersion"].startswith("QEMU emulator version 7.2.22")
    out = tmp_path / "out"
    r = cli(["--host-root", root, "vmcore", "collect", "--to", out, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [copied] = _dumps_in(out)
    assert sha(out / copied) == sha(src)
    r = cli(["--host-root", root, "vmcore", "rm", SID[:8], "--yes", "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is True, r.stderr
    assert not os.path.exists(src) and os.path.islink(f"{root}/var/crash")


def test_a_dump_and_its_metadata_linked_to_an_absolute_path_are_the_nodes_never_this_hosts(cli, tmp_path):
    """hypervisor.version -> /.../version and vmcore-X.elf -> /.../secret, both absolute: the node's
    file at that path is read (version), a link to a file only this host has is refused (the
    dump); this host's files never reach the listing or --to."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("HOST-SECRET\n")
    (host / "version").write_text("HOST-VERSION\n")
    root = node_tree(tmp_path / "node")
    add_dump(root)
    d = f"{root}/var/crash/kata/{SID}"
    os.symlink(host / "secret", f"{d}/vmcore-20250101000000.elf")
    os.unlink(f"{d}/hypervisor.version")
    os.symlink(host / "version", f"{d}/hypervisor.version")
    os.makedirs(f"{root}{host}")
    with open(f"{root}{host}/version", "w") as f:
        f.write("QEMU emulator version 9.9.9 (the node's)\n")
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    assert r.exit_code == 0 and "HOST-" not in r.stdout, r.stdout
    items = {i["file"]: i for i in r.json()["items"]}
    assert {i["hypervisorVersion"] for i in items.values()} == {"QEMU emulator version 9.9.9 (the node's)"}
    assert items[f"vmcore-{TS}.elf"]["status"] == "ok" and items["vmcore-20250101000000.elf"]["status"] != "ok"
    out = tmp_path / "out"
    r = cli(["--host-root", root, "vmcore", "collect", "--to", out, "-o", "json"])
    assert r.exit_code == 4, (r.stdout, r.stderr)  # the one dump copied, the dangling one refused
    assert _dumps_in(out) == [os.path.join("node-a", SID, f"vmcore-{TS}.elf")]
    for dirpath, _, files in os.walk(out):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                assert b"HOST-" not in fh.read(), f


def test_rm_through_an_absolute_symlink_deletes_nothing_outside_the_root(cli, tmp_path):
    """/var/crash -> an absolute directory the node does not have (this host's, here): nothing of
    this host's is removed."""
    outside = tmp_path / "host-crash"
    root = node_tree(tmp_path / "node")
    add_dump(root)
    shutil.move(f"{root}/var/crash", outside)
    os.symlink(outside, f"{root}/var/crash")
    r = cli(["--host-root", root, "vmcore", "rm", SID[:4], "--yes", "-o", "json"])
    assert r.exit_code in (0, 3), (r.stdout, r.stderr)  # the node has no such dump
    assert os.path.exists(outside / "kata" / SID / f"vmcore-{TS}.elf")


def test_trigger_lays_out_the_dump_dir_behind_an_absolute_symlink_in_the_root(tmp_path):
    """What a process of this host is handed (cp -ar of the state, QEMU's dump file) is the node's
    path resolved inside the root: `cp -ar` was given root/var/crash/..., which this host's kernel
    followed to *its* /data/crash."""
    from katactl.backends.local import LocalTransport
    from katactl.lab import layout
    from katactl.vmcore.capture import prepare_dump_dir
    from katactl.vmcore.dumps import real_path

    root = node_tree(tmp_path / "n")
    layout.write_go_sandbox(root, SID, memory_mib=512, container_ids=(SID,))
    os.makedirs(f"{root}/data/crash")
    os.makedirs(f"{root}/var", exist_ok=True)
    os.symlink("/data/crash", f"{root}/var/crash")
    t = LocalTransport(root)
    d, _ = prepare_dump_dir(t, SID, "/var/crash/kata")
    assert os.path.isfile(f"{root}/data/crash/kata/{SID}/state/{SID}/persist.json")
    assert real_path(t, f"{d}/vmcore-{TS}.elf") == f"{root}/data/crash/kata/{SID}/vmcore-{TS}.elf"
