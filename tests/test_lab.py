"""katactl lab: the node it builds, its shim sockets, its panic handler, up/status/down."""
from __future__ import annotations

import glob
import json
import os
import time

import pytest

from katactl.backends.qmp import QMPClient

MIB = 1 << 20


def test_status_json(lab, cli):
    r = cli(["lab", "status", "--root", lab.root, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["kind"] == "Lab" and j["status"] == "ready" and j["root"] == lab.root
    names = {s["name"] for s in j["sandboxes"]}
    assert {"qemu-0", "clh-0", "fc-0", "nob"} <= names


def test_up_again_is_a_noop(lab, cli):
    r = cli(["lab", "up", "--root", lab.root, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is False


def test_sandbox_list_sees_the_lab(lab, cli):
    r = cli(lab.args("sandbox", "list", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    items = {f"{i['pod']['namespace']}/{i['pod']['name']}": i for i in r.json()["items"]}
    q = items["lab/qemu-0"]
    assert q["state"] == "running" and q["hypervisor"] == "qemu"
    assert q["hypervisorPid"] == lab.sb("qemu-0")["qemuPid"]
    assert items["lab/clh-0"]["hypervisor"] == "clh" and items["lab/fc-0"]["hypervisor"] == "fc"
    # Firecracker's jailed socket uses the id truncated to 32 characters, as the Go runtime does
    fc = lab.sb("fc-0")
    assert fc["apiSocket"] == f"/run/vc/firecracker/{fc['id'][:32]}/root/run/firecracker.socket"


def test_layout_is_katas(lab):
    sid = lab.id("qemu-0")
    p = json.load(open(lab.real(f"/run/vc/sbs/{sid}/persist.json")))
    hc = p["Config"]["HypervisorConfig"]
    assert hc["ReclaimGuestFreedMemory"] is True and hc["GuestMemoryDumpPath"] == "/var/crash/kata"
    assert hc["ExtraMonitorSocket"] == "qmp" and hc["MemorySize"] == 512
    for name in ("qmp.sock", "extra-monitor.sock", "pid"):
        assert os.path.exists(lab.real(f"/run/vc/vm/{sid}/{name}")), name
    cfg = glob.glob(lab.real(f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{sid}/config.json"))
    ann = json.load(open(cfg[0]))["annotations"]
    assert ann["io.kubernetes.cri.sandbox-name"] == "qemu-0"
    assert ann["io.kubernetes.cri.sandbox-namespace"] == "lab"


def test_kata_configuration_names_the_dump_path(lab):
    """vmcore list finds guest_memory_dump_path through the node's configuration, as on a real node."""
    from katactl import katacfg
    from katactl.backends.local import LocalTransport

    cfg = katacfg.load(LocalTransport(lab.root))
    assert cfg.path == "/etc/kata-containers/configuration.toml"
    assert cfg.hypervisor_name == "qemu" and cfg.hypervisor["guest_memory_dump_path"] == "/var/crash/kata"


def test_metrics_are_real_guest_numbers(lab, cli):
    r = cli(lab.args("metrics", lab.pod("qemu-0"), "--family", "kata_guest_meminfo", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    vals = {s["labels"]["item"]: s["value"] for s in r.json()["items"]}
    # the guest's MemTotal: a bit under the VM's 512 MiB (kernel reserved), not a synthetic number
    assert 256 * MIB < vals["mem_total"] < 512 * MIB
    assert 0 < vals["mem_available"] < vals["mem_total"]
    r = cli(lab.args("metrics", lab.pod("qemu-0"), "--family", "kata_hypervisor_proc_status", "-o", "json"))
    rss = {s["labels"]["item"]: s["value"] for s in r.json()["items"]}["vmrss"]
    with open(f"/proc/{lab.sb('qemu-0')['qemuPid']}/status") as f:
        real = int([ln for ln in f if ln.startswith("VmRSS:")][0].split()[1]) * 1024
    assert abs(rss - real) < 64 * MIB


def test_extension_capabilities(lab):
    from katactl.backends.shim import ShimClient

    t = lab.transport()
    with ShimClient(t, lab.sb("qemu-0")["shimSocket"]) as s:
        caps = s.capabilities()
    assert caps["apiVersion"] == "katactl.io/shim-ext/v1" and set(caps["features"]) == {"balloon", "vmcore"}
    with ShimClient(t, lab.sb("qemu-em")["shimSocket"]) as s:
        assert s.capabilities() is None  # a shim without the extension: 404
    with ShimClient(t, lab.sb("nob")["shimSocket"]) as s:
        assert s.capabilities()["features"] == ["vmcore"]


@pytest.mark.parametrize("body,status", [(b"not json", 400), (b'{"targetBytes": "1"}', 400),
                                         (b'{"targetBytes": 1, "x": 2}', 400), (b'{"targetBytes": 0}', 400),
                                         (b'{"targetBytes": 99999999999999}', 400)])
def test_extension_rejects_bad_bodies(lab, body, status):
    from katactl.backends.shim import ShimClient

    with ShimClient(lab.transport(), lab.sb("qemu-0")["shimSocket"]) as s:
        code, raw = s.call("PUT", "/ext/v1/balloon", content=body)
    assert code == status
    assert "error" in json.loads(raw)


def test_guest_panic_runs_the_runtime_handler(lab):
    """inject-nmi -> GUEST_PANICKED -> the lab dumps as the Go runtime does."""
    sb = lab.sb("panic-lab")
    sid = sb["id"]
    if sb["status"] != "panicked":
        with QMPClient.connect(lab.transport(), f"/run/vc/vm/{sid}/extra-monitor.sock") as q:
            q.execute("inject-nmi")
            q.wait_event("GUEST_PANICKED", timeout=30)
    deadline = time.monotonic() + 120
    while (lab.sb("panic-lab").get("panic") or {}).get("status") in (None, "dumping"):
        assert time.monotonic() < deadline, "no dump"
        time.sleep(0.2)
    panic = lab.sb("panic-lab")["panic"]
    assert panic["status"] == "done", panic
    d = lab.real(f"/var/crash/kata/{sid}")
    cores = glob.glob(os.path.join(d, "vmcore-*.elf"))
    assert len(cores) == 1
    with open(cores[0], "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert json.load(open(os.path.join(d, "hypervisor.conf")))["MemorySize"] == 192
    assert b"QEMU emulator version" in open(os.path.join(d, "hypervisor.version"), "rb").read()
    assert os.path.exists(os.path.join(d, "state", "persist.json"))


# -- a small lab of our own: up/down leave nothing behind; bad input ----------------
def test_up_down_leaves_nothing(cli):
    import tempfile

    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    r = cli(["lab", "up", "--root", root, "--hypervisor", "fc", "--sandboxes", "2", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["changed"] is True and len(j["sandboxes"]) == 2
    pid = j["pid"]
    r = cli(["--host-root", root, "balloon", "set", j["sandboxes"][0]["id"][:10], "--reclaim", "128Mi",
             "--wait", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    r = cli(["lab", "down", "--root", root, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True
    assert not os.path.exists(root)
    from katactl.lab.control import _alive

    assert not _alive(pid)
    r = cli(["lab", "down", "--root", root, "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is False
    r = cli(["lab", "status", "--root", root])
    assert r.exit_code == 3


def test_up_root_too_long(tmp_path, cli):
    root = str(tmp_path / ("x" * 60))
    r = cli(["lab", "up", "--root", root, "--hypervisor", "fc", "--sandboxes", "1"])
    assert r.exit_code == 2 and "too long" in r.stderr
    assert not os.path.exists(os.path.join(root, ".katactl-lab", "state.json"))


@pytest.mark.parametrize("args,code", [
    (["--hypervisor", "vmware"], 2), (["--sandboxes", "0"], 2), (["--sandboxes", "99"], 2),
    (["--memory", "10Zi"], 2), (["--memory", "1Mi"], 2), (["--kernel", "/nonexistent/vmlinuz"], 2),
])
def test_up_bad_input(tmp_path, cli, args, code):
    root = str(tmp_path / "bad")
    r = cli(["lab", "up", "--root", root, *args])
    assert r.exit_code == code, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(os.path.join(root, ".katactl-lab", "state.json"))


def test_up_refuses_a_non_empty_dir(tmp_path, cli):
    (tmp_path / "precious").write_text("x")
    r = cli(["lab", "up", "--root", str(tmp_path), "--hypervisor", "clh", "--sandboxes", "1"])
    assert r.exit_code == 5
    assert (tmp_path / "precious").read_text() == "x"
