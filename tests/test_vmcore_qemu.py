"""vmcore trigger and the runtime's panic handler against a real QEMU.

A real qemu-system-x86_64 (-S: no guest needed to dump RAM) serves the
sandbox's qmp.sock, held by a "runtime" client as Kata holds it, and an
extra-monitor.sock (Kata's extra_monitor_socket). The full guest-panic path
(inject-nmi on a booted guest) is in test_vmcore_lab.py.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time

import pytest

from katactl import vmcore
from katactl.backends.local import LocalTransport
from katactl.backends.qmp import QMPClient
from katactl.lab import layout
from tests.test_vmcore import DUMP_PATH, node_tree, sha

pytestmark = pytest.mark.qemu
QEMU = shutil.which("qemu-system-x86_64")
# short ids and a short root: unix socket paths must stay under 108 bytes
SB = "5a5a0000111122223333444455556666"
SB_BUSY = "6b6b0000111122223333444455556666"
SB_HUGE = "7c7c0000111122223333444455556666"
MEM_MIB = 64


def _wait_socket(path, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not appear")


@pytest.fixture(scope="module")
def qnode(tmp_path_factory):
    if not QEMU:
        pytest.skip("qemu-system-x86_64 not installed")
    import tempfile

    root = node_tree(tempfile.mkdtemp(prefix="kq", dir="/tmp"))
    sb = layout.write_go_sandbox(root, SB, memory_mib=MEM_MIB, extra_monitor_socket=True,
                                 hypervisor_path=QEMU, guest_memory_dump_path=DUMP_PATH,
                                 pod_name="web-0", pod_namespace="default", container_ids=(SB,))
    vm = sb.real(sb.vm_dir_node)
    qmp_sock, extra = os.path.join(vm, "qmp.sock"), os.path.join(vm, "extra-monitor.sock")
    proc = subprocess.Popen([QEMU, "-S", "-machine", "pc", "-accel", "tcg", "-m", f"{MEM_MIB}M",
                             "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
                             "-device", "pvpanic", "-no-shutdown",
                             "-qmp", f"unix:{qmp_sock},server=on,wait=off",
                             "-qmp", f"unix:{extra},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_socket(qmp_sock, proc)
        _wait_socket(extra, proc)
        t = LocalTransport(root)
        runtime = QMPClient.connect(t, sb.api_socket_node, timeout=30)  # Kata holds qmp.sock
        # a sandbox whose only monitor is held by the runtime
        b = layout.write_go_sandbox(root, SB_BUSY, memory_mib=MEM_MIB, guest_memory_dump_path=DUMP_PATH)
        # links to node paths (an absolute link target is the node's path under --host-root)
        os.symlink(f"{sb.vm_dir_node}/qmp.sock", b.real(f"{b.vm_dir_node}/qmp.sock"))
        # a sandbox too big for the dump filesystem
        h = layout.write_go_sandbox(root, SB_HUGE, memory_mib=1 << 30, guest_memory_dump_path=DUMP_PATH,
                                    extra_monitor_socket=True)
        os.symlink(f"{sb.vm_dir_node}/extra-monitor.sock", h.real(f"{h.vm_dir_node}/extra-monitor.sock"))
        yield {"root": root, "sb": sb, "runtime": runtime, "proc": proc}
        runtime.close()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def read_core(path, machine=(3, 62)):
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    assert head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    # ET_CORE; QEMU writes EM_386 while the vCPU is not in long mode (-S), EM_X86_64 once booted
    assert e_type == 4 and e_machine in machine
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    segs = [struct.unpack_from("<IIQQQQQQ", head, phoff + i * phentsize) for i in range(phnum)]
    loads = [s for s in segs if s[0] == 1]
    notes = [s for s in segs if s[0] == 4]
    end = max(s[2] + s[5] for s in segs)
    return {"loads": loads, "notes": notes, "end": end, "size": os.path.getsize(path)}


def test_trigger_elf_on_live_qemu_gives_valid_core(cli, qnode):
    root = qnode["root"]
    r = cli(["--host-root", root, "vmcore", "trigger", SB[:10], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "VmcoreTrigger" and d["changed"] is True and d["status"] == "completed"
    assert d["via"] == "qmp:extra-monitor.sock"      # qmp.sock is held by the runtime
    real = os.path.join(root, d["path"].lstrip("/"))
    assert os.stat(real).st_mode & 0o777 == 0o400      # QEMU's file: protocol creates it 0400
    core = read_core(real)
    assert core["loads"] and core["size"] >= core["end"]
    assert sum(s[5] for s in core["loads"]) >= MEM_MIB << 20   # all guest RAM (+ ROM regions)
    # the runtime's metadata beside it
    ddir = os.path.dirname(real)
    with open(os.path.join(ddir, "hypervisor.conf")) as f:
        assert json.load(f)["MemorySize"] == MEM_MIB
    with open(os.path.join(ddir, "hypervisor.version")) as f:
        assert f.read().startswith("QEMU emulator version")
    # the runtime copies its store dir: state/<sandbox-id>/persist.json (qemu.go dumpSandboxMetaInfo)
    assert os.path.isfile(os.path.join(ddir, "state", SB, "persist.json"))
    # and list sees it, with the pod
    r = cli(["--host-root", root, "vmcore", "list", "-o", "json"])
    it = [i for i in r.json()["items"] if i["path"] == d["path"]][0]
    assert it["status"] == "ok" and it["podRef"] == "default/web-0" and it["loadSegments"] == len(core["loads"])


def test_trigger_kdump_zlib(cli, qnode):
    r = cli(["--host-root", qnode["root"], "vmcore", "trigger", SB, "--format", "kdump-zlib", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    p = os.path.join(qnode["root"], r.json()["path"].lstrip("/"))
    assert p.endswith(".kdump")
    with open(p, "rb") as f:
        assert f.read(12) in (b"makedumpfile", b"KDUMP   \x01\x00\x00\x00"[:12])
    assert os.path.getsize(p) < MEM_MIB << 20          # compressed, mostly zero pages
    # QEMU ends the flattened stream with the end header (dump.c write_end_flat_header): ok;
    # the same dump cut short (QEMU killed, ENOSPC) is incomplete
    r = cli(["--host-root", qnode["root"], "vmcore", "list", "-o", "json"])
    [it] = [i for i in r.json()["items"] if i["path"] == r_path(p, qnode)]
    assert (it["format"], it["status"]) == ("kdump-flat", "ok")
    os.chmod(p, 0o600)
    os.truncate(p, os.path.getsize(p) - 4096)
    r = cli(["--host-root", qnode["root"], "vmcore", "list", "-o", "json"])
    [it] = [i for i in r.json()["items"] if i["path"] == r_path(p, qnode)]
    assert it["status"] == "incomplete"
    os.remove(p)


def r_path(p, qnode):
    """The node path of a file under the node's root."""
    return "/" + os.path.relpath(p, qnode["root"])


def test_trigger_dry_run_dumps_nothing(cli, qnode):
    before = _dumps(qnode["root"], SB)
    r = cli(["--host-root", qnode["root"], "vmcore", "trigger", SB, "--dry-run", "-o", "json"])
    assert r.exit_code == 0 and r.json()["dryRun"] is True
    assert _dumps(qnode["root"], SB) == before


def _dumps(root, sid):
    d = os.path.join(root, DUMP_PATH.lstrip("/"), sid)
    return sorted(n for n in os.listdir(d) if n.startswith("vmcore-")) if os.path.isdir(d) else []


def test_trigger_refused_when_monitor_is_held(cli, qnode):
    r = cli(["--host-root", qnode["root"], "vmcore", "trigger", SB_BUSY])
    assert r.exit_code == 5, r.stderr
    assert "held by another client" in r.stderr and "extra_monitor_socket" in r.stderr


def test_trigger_refused_without_twice_guest_memory_free(cli, qnode):
    r = cli(["--host-root", qnode["root"], "vmcore", "trigger", SB_HUGE])
    assert r.exit_code == 5 and "2 x guest memory" in r.stderr
    assert _dumps(qnode["root"], SB_HUGE) == []


@pytest.mark.parametrize("args,code", [(["--format", "raw"], 2), (["--format", ""], 2),
                                       (["--format", "kdump-zlib", "--paging"], 2),
                                       (["--timeout", "soon"], 2)])
def test_trigger_bad_values(cli, qnode, args, code):
    r = cli(["--host-root", qnode["root"], "vmcore", "trigger", SB, *args])
    assert r.exit_code == code and "Traceback" not in r.stderr


def test_trigger_unknown_sandbox(cli, qnode):
    r = cli(["--host-root", qnode["root"], "vmcore", "trigger", "ffff"])
    assert r.exit_code == 3


def test_runtime_panic_dump_writes_what_the_runtime_writes(cli, qnode, tmp_path):
    root = qnode["root"]
    t = LocalTransport(root)
    path = vmcore.runtime_panic_dump(t, SB, qnode["runtime"], DUMP_PATH, False)
    assert path.startswith(f"{DUMP_PATH}/{SB}/vmcore-") and path.endswith(".elf")
    real = os.path.join(root, path.lstrip("/"))
    core = read_core(real)
    assert sum(s[5] for s in core["loads"]) >= MEM_MIB << 20
    ddir = os.path.dirname(real)
    with open(os.path.join(root, f"run/vc/sbs/{SB}/persist.json")) as f:
        hvc = json.load(f)["Config"]["HypervisorConfig"]
    with open(os.path.join(ddir, "hypervisor.conf")) as f:
        conf = json.load(f)
    # hypervisor.conf is the runtime's in-memory HypervisorConfig: persist.json's plus the
    # settings persist does not keep, such as the dump path itself
    assert conf.pop("GuestMemoryDumpPath") == DUMP_PATH and conf == hvc
    # list -> collect with a verified manifest
    r = cli(["--host-root", root, "vmcore", "collect", f"{SB}/{os.path.basename(path)}", "--to",
             str(tmp_path / "c"), "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [it] = r.json()["items"]
    assert it["verified"] and it["sha256"] == sha(real)
    p = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=os.path.dirname(it["to"]), capture_output=True)
    assert p.returncode == 0
