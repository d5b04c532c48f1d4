"""Real processes across an A/B switch.

Stand-in shims and hypervisors are real processes executed from release A's
binaries (copies of the Python interpreter living in the release) that map
A's guest kernel and keep A's image open, like QEMU does. They keep running
across a switch to B; ``status`` attributes each process and sandbox to the
right release; ``gc`` keeps A while they run and removes it once they exit.

The node is a --host-root tree whose /proc is this machine's /proc (a symlink),
so persist.json written by the lab layout and the real processes meet.
"""
from __future__ import annotations

import os

import pytest

from katactl.lab import layout
from tests import upgrade_fixtures as fx

A, B = "3.1.0", "3.2.0"


@pytest.fixture
def lab(tmp_path, cli):
    node = tmp_path / "node"
    node.mkdir()
    os.symlink("/proc", node / "proc")
    for v in (A, B):
        tb = fx.make_tarball(str(tmp_path), v, str(tmp_path), compression="gz")
        r = cli(["--host-root", str(node), "upgrade", "stage", tb])
        assert r.exit_code == 0, r.stderr
    procs = []
    yield node, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def K(cli, node, *args):
    r = cli(["--host-root", str(node), "upgrade", *args, "-o", "json"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.json()


def start_sandbox(node, procs, release: str, sid: str):
    """A shim and a hypervisor from `release`, plus its persist.json (configured paths from
    the release's own configuration, as the runtime records them)."""
    relnode = f"/opt/kata/releases/{release}"
    real = lambda p: str(node) + p  # noqa: E731
    kernel = f"{relnode}/share/kata-containers/vmlinux.container"
    image = f"{relnode}/share/kata-containers/kata-containers.img"
    shim = fx.start_standin(real(f"{relnode}/bin/containerd-shim-kata-v2"), "-namespace", "k8s.io",
                            "-address", "/run/containerd/containerd.sock", "-id", sid)
    hv = fx.start_standin(real(f"{relnode}/bin/qemu-system-x86_64"), "-name", f"sandbox-{sid}",
                          "-kernel", real(kernel), real(image))
    procs += [shim, hv]
    layout.write_go_sandbox(str(node), sid, pid=hv.pid, kernel=kernel, image=image,
                            hypervisor_path=f"{relnode}/bin/qemu-system-x86_64",
                            pod_name=f"batch-{sid[:4]}", pod_namespace="offline")
    return shim, hv


def test_running_sandboxes_survive_switch_status_attributes_gc_waits(cli, lab):
    node, procs = lab
    K(cli, node, "switch", A)
    sid_a = layout.sandbox_id_for(1)
    shim_a, hv_a = start_sandbox(node, procs, A, sid_a)

    d = K(cli, node, "switch", B)
    assert d["changed"] and d["to"] == {"runtime": B, "agent": B}
    assert shim_a.poll() is None and hv_a.poll() is None  # nothing was stopped

    sid_b = layout.sandbox_id_for(2)
    shim_b, hv_b = start_sandbox(node, procs, B, sid_b)

    st = K(cli, node, "status")
    assert st["current"] == {"runtime": B, "agent": B}
    assert st["previous"] == {"runtime": A, "agent": A}
    by_pid = {p["pid"]: p for p in st["processes"]}
    assert by_pid[shim_a.pid]["releases"] == [A] and by_pid[shim_a.pid]["role"] == "shim"
    assert by_pid[hv_a.pid]["releases"] == [A] and by_pid[hv_a.pid]["role"] == "hypervisor"
    assert set(by_pid[hv_a.pid]["via"][A]) >= {"exe", "maps", "fd", "cmdline"}
    assert by_pid[hv_b.pid]["releases"] == [B] and by_pid[shim_b.pid]["releases"] == [B]
    sbs = {s["id"]: s for s in st["sandboxes"]}
    a = sbs[sid_a]
    assert (a["shimPid"], a["shimRelease"], a["hypervisorRelease"], a["assetsRelease"]) == \
        (shim_a.pid, A, A, A)
    assert a["pod"] == f"offline/batch-{sid_a[:4]}" and a["hypervisorRunning"] is True
    assert sbs[sid_b]["shimRelease"] == B and sbs[sid_b]["assetsRelease"] == B
    rels = {r["version"]: r for r in st["releases"]}
    assert sorted(rels[A]["processes"]) == sorted([shim_a.pid, hv_a.pid])
    assert rels[A]["sandboxes"] == [sid_a] and rels[A]["inUse"] and rels[A]["state"] == ["previous"]

    # the table views name the releases too
    r = cli(["--host-root", str(node), "upgrade", "status", "--sandboxes"])
    assert r.exit_code == 0
    row = [line.split() for line in r.stdout.splitlines() if line.startswith(sid_a)][0]
    assert row[1:] == [f"offline/batch-{sid_a[:4]}", str(shim_a.pid), A, str(hv_a.pid), A, A]

    # gc keeps A while its processes run
    d = K(cli, node, "gc", "--no-keep-previous", "--dry-run")
    assert d["removed"] == []
    reason = {k["version"]: k["reason"] for k in d["kept"]}[A]
    assert reason.startswith("in use:") and str(hv_a.pid) in reason
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == []
    assert (node / "opt/kata/releases" / A).is_dir()

    # only the hypervisor left: still in use (it maps A's kernel)
    shim_a.kill()
    shim_a.wait()
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == []
    hv_a.kill()
    hv_a.wait()
    d = K(cli, node, "gc", "--no-keep-previous", "--dry-run")
    assert d["removed"] == [A] and (node / "opt/kata/releases" / A).is_dir()
    d = K(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == [A] and d["changed"] is True
    assert not (node / "opt/kata/releases" / A).exists()
    assert shim_b.poll() is None and hv_b.poll() is None
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["changed"] is False
    st = K(cli, node, "status")
    stale = {s["id"]: s for s in st["sandboxes"]}[sid_a]
    assert stale["hypervisorRunning"] is False and stale["releases"] == []


def test_process_running_deleted_binary_still_counts(cli, lab, tmp_path):
    """A process whose release binary was deleted under it (exe '(deleted)') still pins the release."""
    node, procs = lab
    K(cli, node, "switch", B)
    exe = str(node) + f"/opt/kata/releases/{A}/bin/cloud-hypervisor"
    p = fx.start_standin(exe)
    procs.append(p)
    os.remove(exe)
    st = K(cli, node, "status")
    mine = [x for x in st["processes"] if x["pid"] == p.pid][0]
    assert mine["releases"] == [A] and mine["exe"].endswith("(deleted)")
    d = K(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == []
    p.kill()
    p.wait()
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == [A]
