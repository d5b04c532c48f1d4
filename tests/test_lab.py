"""katactl lab: the node it builds, its shim sockets, its panic handler, up/status/down."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
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


def test_up_again_is_a_noop_another_spec_is_refused(lab, cli):
    from katactl.lab import control
    from tests.conftest_lab import LAB_SPECS

    st = control.up(lab.root, specs=[dict(s) for s in LAB_SPECS])  # the same spec: nothing to do
    assert st["changed"] is False and st["pid"] == lab.state["pid"]
    assert control.up(lab.root, specs=[dict(s) for s in LAB_SPECS], dry_run=True)["changed"] is False
    # the CLI's defaults (2 QEMU sandboxes) are not this lab: refused, not a silent no-op
    for extra in ([], ["--dry-run"], ["--hypervisor", "qemu", "--sandboxes", "1"]):
        r = cli(["lab", "up", "--root", lab.root, *extra, "-o", "json"])
        assert r.exit_code == 5, (extra, r.stdout, r.stderr)
        assert "another spec" in r.json()["message"] and "lab down" in r.stderr
    assert lab.refresh()["pid"] == st["pid"] and control._alive(st["pid"])


def test_lab_looks_like_a_node_to_every_command(lab, cli):
    """The host's /proc and /sys/fs/cgroup are linked under the root: pid liveness,
    threads, cgroup checks and upgrade's process scan all work on the lab."""
    assert os.readlink(lab.real("/proc")) == "/proc"
    assert os.readlink(lab.real("/sys/fs/cgroup")) == "/sys/fs/cgroup"
    assert ("/sys/fs/resctrl" in lab.state["hostViews"]) == os.path.ismount("/sys/fs/resctrl")
    q = lab.sb("qemu-0")
    r = cli(lab.args("sandbox", "list", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    item = {i["id"]: i for i in r.json()["items"]}[q["id"]]
    assert item["state"] == "running" and "not checked" not in (item.get("reason") or "")
    r = cli(lab.args("inspect", "threads", lab.pod("qemu-0"), "-o", "json"))
    assert r.exit_code == 0, r.stderr
    main = [t for t in r.json()["items"] if t["role"] == "main"]
    assert [t["tid"] for t in main] == [q["qemuPid"]]
    # qemu-0 runs as Kata's QEMU with enable_debug: "-name sandbox-<id>,debug-threads=on" names
    # its vCPU threads "CPU <n>/TCG" (or /KVM); inspect threads finds them through the lab's /proc
    with open(f"/proc/{q['qemuPid']}/cmdline", "rb") as f:
        assert f"sandbox-{q['id']},debug-threads=on".encode() in f.read().split(b"\0")
    assert r.json()["vcpuThreads"] >= 1, r.json()
    vcpus = [t for t in r.json()["items"] if t["role"] == "vcpu"]
    assert vcpus and all(t["vcpu"] == 0 for t in vcpus), vcpus
    assert r.json()["vcpusBy"] == "names"
    for args in (["inspect", "bvt"], ["inspect", "memcg"]):
        r = cli(lab.args(*args, "-o", "json"))
        assert r.exit_code == 0, (args, r.stderr)
    r = cli(lab.args("audit", "-o", "json"))
    assert r.exit_code in (0, 8), r.stderr  # it ran: clean, or found problems on this host
    r = cli(lab.args("upgrade", "gc", "--dry-run", "-o", "json"))
    assert r.exit_code == 0, r.stderr  # /proc is visible: not refused


def _comms(pid: int) -> dict[int, str]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/comm") as f:
            out[int(t)] = f.read().strip()
    return out


def test_unnamed_vcpus_of_a_real_qemu(lab, cli):
    """qemu-em runs as Kata starts QEMU by default ('-name sandbox-<id>', no debug-threads=on):
    its vCPU thread keeps QEMU's own comm. katactl asks QMP query-cpus-fast on its
    extra-monitor.sock for the thread ids, as Kata's runtime (GetThreadIDs) does."""
    from katactl.backends.qmp import QMPClient
    from katactl.lab import layout

    q = lab.sb("qemu-em")
    with open(f"/proc/{q['qemuPid']}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert f"sandbox-{q['id']}".encode() in argv and not any(b"debug-threads" in a for a in argv)
    comms = _comms(q["qemuPid"])
    assert not any(c.startswith("CPU ") for c in comms.values()), comms
    c = QMPClient.connect(lab.transport(), f"{layout.GO_VM}/{q['id']}/extra-monitor.sock")
    try:
        want = {cpu["thread-id"] for cpu in c.execute("query-cpus-fast")}
    finally:
        c.close()
    r = cli(lab.args("inspect", "threads", lab.pod("qemu-em"), "-o", "json"))
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["vcpusBy"] == "qmp" and d["vcpuThreads"] == 1, d
    (v,) = [t for t in d["items"] if t["role"] == "vcpu"]
    assert {v["tid"]} == want and v["vcpu"] == 0 and comms[v["tid"]] == v["name"] != "CPU 0/TCG"
    # overhead subtracts that thread: the VMM's CPU is measured, nothing is unknown
    r = cli(lab.args("overhead", "-o", "json", "--interval", "0.3s", "--runtime-class-overhead",
                     "cpu=250m,memory=160Mi", "--fail-on", "critical", lab.pod("qemu-em")))
    assert r.exit_code in (0, 8), r.stderr
    (it,) = r.json()["items"]
    assert it["vcpusUnknown"] is None and it["measured"]["cpuMillis"] is not None, it


def test_unknown_vcpus_of_a_real_qemu(lab, cli):
    """'held': no debug-threads, no extra monitor, qmp.sock held by the lab (as the runtime holds
    it), and its threads are not in its sandbox cgroup: the vCPUs are unknown, and every command
    says so instead of taking the guest's CPU for the VMM's (overhead) or passing (audit)."""
    q = lab.sb("held")
    r = cli(lab.args("inspect", "threads", lab.pod("held"), "-o", "json"))
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["vcpuThreads"] is None and d["vcpusBy"] is None, d
    assert "debug-threads" in d["vcpuNote"] and "qmp.sock" in d["vcpuNote"]
    assert not [t for t in d["items"] if t["role"] == "vcpu"]
    r = cli(lab.args("inspect", "threads", lab.pod("held")))
    assert "vCPUs unknown (" in r.stderr + r.stdout
    r = cli(lab.args("overhead", "-o", "json", "--interval", "0.3s", "--runtime-class-overhead",
                     "cpu=1m,memory=64Gi", lab.pod("held")))
    assert r.exit_code == 0, r.stderr  # a CPU ratio of guest time would be 'critical' (exit 8)
    (it,) = r.json()["items"]
    assert it["measured"]["cpuMillis"] is None and it["vcpusUnknown"] and it["severity"] is None, it
    vmm = [p for p in it["processes"] if p["role"] == "vmm"][0]
    assert vmm["pid"] == q["qemuPid"] and vmm["cpuMillis"] is None
    # audit: none of its threads is in its sandbox cgroup (the lab makes none), so neither are its
    # vCPUs, whichever they are: found, where a name-only search saw no vCPU and passed
    r = cli(lab.args("audit", "-o", "json", "--fail-on", "critical"))
    held = {i["check"]: i for i in r.json()["items"] if q["id"][:12] in i["target"]}
    assert "none of the VMM's" in held["kata.vcpu-cgroup"]["message"], r.json()["items"]


def test_shim_volume_on_the_lab(lab, cli):
    import base64

    sb = lab.sb("clh-0")
    (vol,) = sb["volumes"]
    d = lab.real("/run/kata-containers/shared/direct-volumes/" + base64.urlsafe_b64encode(vol.encode()).decode())
    assert json.load(open(os.path.join(d, "mountInfo.json")))["volume-type"] == "block"
    assert os.path.exists(os.path.join(d, sb["id"]))
    r = cli(lab.args("shim", "volume", "stats", lab.pod("clh-0"), vol, "-o", "json"))
    assert r.exit_code == 0, r.stderr
    before = r.json()
    # the shim is asked about mountInfo.json's device, not the host path (kata-volume.go Stats)
    assert before["device"] == json.load(open(os.path.join(d, "mountInfo.json")))["device"] != vol
    r = cli(lab.args("shim", "volume", "resize", lab.pod("clh-0"), vol, "2Gi", "--yes", "-o", "json"))
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True
    r = cli(lab.args("shim", "volume", "stats", lab.pod("clh-0"), vol, "-o", "json"))
    assert r.exit_code == 0 and r.json() != before
    r = cli(lab.args("shim", "volume", "stats", lab.pod("clh-0"), "/mnt/no-such-volume"))
    assert r.exit_code == 3 and "/mnt/no-such-volume is not registered" in r.stderr


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
    # upstream's persist.json (virtcontainers dumpConfig) holds none of these: the
    # configuration file does (test_kata_configuration_is_kata_deploys)
    assert not {"ReclaimGuestFreedMemory", "GuestMemoryDumpPath", "ExtraMonitorSocket"} & set(hc)
    assert hc["MemorySize"] == 512
    for name in ("qmp.sock", "extra-monitor.sock", "pid"):
        assert os.path.exists(lab.real(f"/run/vc/vm/{sid}/{name}")), name
    cfg = glob.glob(lab.real(f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{sid}/config.json"))
    ann = json.load(open(cfg[0]))["annotations"]
    assert ann["io.kubernetes.cri.sandbox-name"] == "qemu-0"
    assert ann["io.kubernetes.cri.sandbox-namespace"] == "lab"


def test_kata_configuration_is_kata_deploys(lab, cli):
    """The lab holds what a kata-deploy node holds (issue 18 item 10): containerd's config
    importing kata-deploy.toml, one handler per hypervisor with its own configuration and
    config.d, and the bundle files containerd and the Go shim write (shim-binary-path,
    shim.pid). sandbox inspect finds each sandbox's handler file and drop-ins through
    containerd; vmcore finds guest_memory_dump_path in the kata-qemu handler's config.d,
    which the node-wide search (/etc, then the build's defaults) never reads."""
    from katactl import katacfg
    from katactl.backends.local import LocalTransport

    assert not os.path.exists(lab.real("/etc/kata-containers/configuration.toml"))
    rt = "/opt/kata/share/defaults/kata-containers/runtimes"
    for name, hv in (("qemu-0", "qemu"), ("clh-0", "clh"), ("fc-0", "fc")):
        sid = lab.id(name)
        bundle = lab.real(f"/run/containerd/io.containerd.runtime.v2.task/k8s.io/{sid}")
        assert open(f"{bundle}/shim-binary-path").read() == "/opt/kata/bin/containerd-shim-kata-v2"
        assert open(f"{bundle}/shim.pid").read() == str(lab.state["pid"])  # the daemon plays the shim
        r = cli(lab.args("sandbox", "inspect", sid, "-o", "json"))
        assert r.exit_code == 0, r.stderr
        kc = r.json()["kataConfig"]
        assert kc["source"] == "containerd" and kc["runtimeHandler"] == f"kata-{hv}" and kc["error"] is None, kc
        assert kc["file"] == f"{rt}/{hv}/configuration-{hv}.toml"
        assert kc["dropIns"] == [f"{rt}/{hv}/config.d/50-lab.toml"]
        assert r.json()["shimPid"] == lab.state["pid"]
    r = cli(lab.args("sandbox", "inspect", lab.id("qemu-0"), "-o", "json"))
    assert r.json()["guestMemoryDumpPath"] == "/var/crash/kata"
    node_wide = katacfg.load(LocalTransport(lab.root))  # kata-static's configuration.toml link
    assert node_wide.resolved.endswith("/configuration-qemu.toml")
    assert not node_wide.hypervisor.get("guest_memory_dump_path")
    r = cli(lab.args("vmcore", "list", "-o", "json"))
    assert r.exit_code == 0, r.stderr


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



def test_metrics_meminfo_never_predates_a_balloon_move_made_elsewhere(lab, cli):
    """The real agent reads /proc/meminfo at each scrape; the lab serves QEMU's balloon
    statistics, so after a move it did not make (here over the extra monitor) it must not
    pair a sample from before the move with the new balloon (review 8, finding 9: right after
    a release the guest looked ~300 MiB fuller than it was)."""
    pod = lab.pod("qemu-em")

    def meminfo():
        r = cli(lab.args("metrics", pod, "--family", "kata_guest_meminfo", "--family", "kata_guest_vm_stat",
                         "-o", "json"))
        assert r.exit_code == 0, r.stderr
        return {s["labels"]["item"]: s["value"] for s in r.json()["items"]}

    def balloon(*a):
        r = cli(lab.args("balloon", "set", pod, *a, "--force", "--wait", "--path", "extra-monitor", "-o", "json"))
        assert r.exit_code == 0, r.stderr

    before = meminfo()["mem_available"]
    try:
        balloon("--target", "200Mi")
        for _ in range(100):  # the lab's figures at 200Mi: the balloon's pages out of MemAvailable
            if meminfo().get("mem_available", before) < before - 200 * MIB:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the guest statistics never showed the balloon")
    finally:
        balloon("--release")
    v = meminfo()  # at once: QEMU's newest statistics are from before the release
    assert v["balloon_inflate"] == 0
    assert "mem_available" not in v or v["mem_available"] > before - 64 * MIB, (before, v)


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
    assert os.path.exists(os.path.join(d, "state", os.path.basename(d), "persist.json"))  # state/<id>/


# -- a small lab of our own: up/down leave nothing behind; bad input ----------------
def audit_actions(home) -> list[str]:
    p = home / "state" / "katactl" / "audit.log"
    return [json.loads(x)["action"] for x in p.read_text().splitlines()] if p.exists() else []


def test_remove_tree_unlinks_host_views_never_follows_links(tmp_path):
    """lab down must not delete through the links to /proc and /sys/fs/cgroup (nor any other)."""
    from katactl.lab import layout
    from katactl.lab.daemon import LAB_DIR, remove_tree

    outside = tmp_path / "outside"
    (outside / "cgroup" / "kids").mkdir(parents=True)
    (outside / "precious").write_text("x")
    root = tmp_path / "lab"
    (root / LAB_DIR).mkdir(parents=True)
    assert layout.link_host_views(str(root))[:2] == ["/proc", "/sys/fs/cgroup"]
    layout.unlink_host_views(str(root))
    (root / "sys/fs").mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "cgroup", root / "sys/fs/cgroup")  # stand-ins for the host's trees
    os.symlink(outside, root / "proc")
    (root / "run").mkdir()
    os.symlink(outside / "precious", root / "run" / "link")
    os.symlink(outside / "cgroup", root / "run" / "dirlink")
    remove_tree(str(root))
    assert not os.path.lexists(root)
    assert (outside / "precious").read_text() == "x" and (outside / "cgroup" / "kids").is_dir()


def test_up_down_leaves_nothing(cli, _isolated_home):
    import tempfile

    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    up = ["lab", "up", "--root", root, "--hypervisor", "fc", "--sandboxes", "2", "-o", "json"]
    r = cli([*up, "--dry-run"])
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["dryRun"] is True and j["changed"] is True and j["status"] == "planned"
    assert [s["hypervisor"] for s in j["sandboxes"]] == ["fc", "fc"]
    assert os.listdir(root) == [] and audit_actions(_isolated_home) == []
    r = cli(up)
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["changed"] is True and j["dryRun"] is False and len(j["sandboxes"]) == 2
    pid = j["pid"]
    assert audit_actions(_isolated_home) == ["lab.up", "lab.up"]  # "requested" before the start, then "ok"
    r = cli(["--host-root", root, "balloon", "set", j["sandboxes"][0]["id"][:10], "--reclaim", "128Mi",
             "--wait", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert cli(up).json()["changed"] is False  # same spec again: a no-op, not audited
    r = cli(["lab", "down", "--root", root, "--dry-run", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["dryRun"] is True and j["changed"] is True and j["removed"] == [root]
    assert [s["pid"] for s in j["stopped"]] == [pid]
    from katactl.lab.control import _alive

    assert _alive(pid) and os.path.isdir(os.path.join(root, ".katactl-lab"))
    r = cli(["lab", "down", "--root", root, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] is True
    assert not os.path.exists(root)
    assert not _alive(pid)
    # each change twice: "requested" before it starts, then the outcome
    assert audit_actions(_isolated_home) == ["lab.up", "lab.up", "balloon.set", "balloon.set", "lab.down", "lab.down"]
    r = cli(["lab", "down", "--root", root, "-o", "json"])
    assert r.exit_code == 0 and r.json()["changed"] is False
    assert audit_actions(_isolated_home)[-1] == "lab.down" and len(audit_actions(_isolated_home)) == 6
    r = cli(["lab", "status", "--root", root])
    assert r.exit_code == 3


#: what the lab itself may create directly under /tmp: the shim server's short bind
#: directories ("ks...", see katactl/lab/shimserver.py) and, in tests, "kl-" lab roots
LAB_TMP_PREFIXES = ("ks", "kl-")


def lab_tmp_entries(mine: str) -> set[str]:
    """/tmp entries with the lab's prefixes, except other labs' roots (labs of concurrent
    test sessions: a .katactl-lab directory naming another root)."""
    out = set()
    for e in os.listdir("/tmp"):
        if not e.startswith(LAB_TMP_PREFIXES):
            continue
        try:
            with open(os.path.join("/tmp", e, ".katactl-lab", "config.json")) as f:
                if json.load(f).get("root") != mine:
                    continue
        except (OSError, ValueError):
            pass
        out.add(e)
    return out


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
def test_qemu_lab_down_leaves_nothing(cli, monkeypatch):
    """A one-sandbox QEMU lab: down stops the daemon and every process under it (QEMU
    included), removes the root, and leaves no temporary files and no process naming the root."""
    import tempfile

    import psutil

    from katactl.lab import control

    # the session lab's kernel cache (tests/conftest_lab.py): no second download
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("KATACTL_TEST_CACHE") or "/tmp/katactl-test-cache")
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    os.rmdir(root)
    before = lab_tmp_entries(root)
    try:
        # 96Mi: 80Mi boots the lab's Debian cloud kernel, 64Mi does not
        r = cli(["lab", "up", "--root", root, "--hypervisor", "qemu", "--sandboxes", "1", "--memory", "96Mi",
                 "-o", "json"])
        assert r.exit_code == 0, r.stderr
        j = r.json()
        (sb,) = j["sandboxes"]
        daemon = psutil.Process(j["pid"])
        procs = [daemon, *daemon.children(recursive=True)]
        assert sb["qemuPid"] in [p.pid for p in procs]  # QEMU runs under the daemon
        r = cli(["lab", "down", "--root", root, "-o", "json"])
        assert r.exit_code == 0, r.stderr
        assert {s["pid"] for s in r.json()["stopped"]} == {j["pid"], sb["qemuPid"]}
    finally:
        control.down(root)

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert [p.pid for p in procs if alive(p)] == []
    assert not os.path.lexists(root)
    assert lab_tmp_entries(root) - before == set()
    naming_root = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(root in a for a in p.info["cmdline"] or ()) and alive(p):
            naming_root.append((p.pid, p.info["cmdline"]))
    assert naming_root == []


def test_up_root_too_long(tmp_path, cli):
    root = str(tmp_path / ("x" * 60))
    r = cli(["lab", "up", "--root", root, "--hypervisor", "fc", "--sandboxes", "1"])
    assert r.exit_code == 2 and "too long" in r.stderr
    assert not os.path.exists(os.path.join(root, ".katactl-lab", "state.json"))


@pytest.mark.parametrize("args,code,msg", [
    (["--hypervisor", "vmware"], 2, "invalid hypervisor"), (["--sandboxes", "0"], 2, "--sandboxes"),
    (["--sandboxes", "99"], 2, "--sandboxes"), (["--memory", "10Zi"], 2, "--memory"),
    (["--memory", "1Mi"], 2, "--memory"), (["--kernel", "/nonexistent/vmlinuz"], 2, "no such file"),
    (["--kernel", "/tmp"], 2, "not a file"), (["--kernel", ""], 2, "invalid --kernel"),
])
def test_up_bad_input(tmp_path, cli, args, code, msg):
    root = str(tmp_path / "bad")
    r = cli(["lab", "up", "--root", root, *args])
    assert r.exit_code == code, r.stderr
    # validated before anything is printed: one line, not "starting the lab..." first
    assert r.stderr.startswith("katactl: error:") and len(r.stderr.splitlines()) == 1, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(root)


@pytest.mark.parametrize("sub", ["up", "status", "down"])
@pytest.mark.parametrize("root,msg", [("/etc/passwd", "not a directory"), ("/etc/passwd/lab", "not a directory"),
                                      ("", "invalid --root ''")])
def test_bad_root(cli, sub, root, msg, _isolated_home):
    """A file, a path under a file, or '' (never the default lab: 'lab down --root ""' must not
    stop it): exit 2 with one line, nothing created, nothing stopped, nothing audited."""
    from katactl.lab import control

    default = control.default_root()
    had_default = os.path.exists(default)
    r = cli(["lab", sub, "--root", root])
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert r.stderr.startswith("katactl: error:") and len(r.stderr.splitlines()) == 1, r.stderr
    assert msg in r.stderr
    assert os.path.exists(default) == had_default and audit_actions(_isolated_home) == []
    r = cli(["lab", sub, "--root", root, "-o", "json"])
    assert r.exit_code == 2 and r.json()["kind"] == "Error" and r.json()["exitCode"] == 2


def test_up_refuses_a_non_empty_dir(cli):
    import pathlib
    import shutil
    import tempfile

    d = pathlib.Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))  # short: a long root is a usage error first
    try:
        (d / "precious").write_text("x")
        r = cli(["lab", "up", "--root", str(d), "--hypervisor", "clh", "--sandboxes", "1"])
        assert r.exit_code == 5, r.stderr
        assert (d / "precious").read_text() == "x" and os.listdir(d) == ["precious"]
    finally:
        shutil.rmtree(d)


def test_library_up_down_audit_themselves(_isolated_home):
    """control.up/down (no CLI) write the audit log: a start, a stop, a failed start;
    never a dry run, a no-op, or an input refused before anything was touched."""
    import tempfile

    from katactl import audit
    from katactl.errors import TimeoutExpired, UsageError
    from katactl.lab import control

    audit.configure(None)  # the default log, under this test's isolated home
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    try:
        control.up(root, sandboxes=1, hypervisor="fc", dry_run=True)
        with pytest.raises(UsageError):
            control.up(root, sandboxes=99, hypervisor="fc")
        assert audit_actions(_isolated_home) == []
        st = control.up(root, sandboxes=1, hypervisor="fc")
        assert control.up(root, sandboxes=1, hypervisor="fc")["changed"] is False
        assert control.down(root, dry_run=True)["changed"] is True
        control.down(root)
        assert control.down(root)["changed"] is False
        with pytest.raises(TimeoutExpired):  # gives up before the daemon can say "ready"
            control.up(root, sandboxes=1, hypervisor="fc", timeout=0)
    finally:
        control.down(root)
    log = _isolated_home / "state" / "katactl" / "audit.log"
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    # each start and stop: "requested" before it touches anything, then the outcome
    assert [(e["action"], e["result"]) for e in entries][:4] == [
        ("lab.up", "requested"), ("lab.up", "ok"), ("lab.down", "requested"), ("lab.down", "ok")]
    assert entries[0]["params"] == entries[1]["params"]
    entries = [e for e in entries if e["result"] != "requested"]
    assert entries[0]["params"] == {"sandboxes": 1, "hypervisor": "fc", "kernel": None, "memoryMiB": 512}
    assert entries[0]["daemonPid"] == st["pid"] and entries[0]["target"] == root
    assert entries[1]["stopped"] == [{"pid": st["pid"], "what": "lab daemon"}]
    assert entries[2]["action"] == "lab.up" and entries[2]["result"].startswith("error: ")
    assert len(entries) == 3


def test_status_of_a_dead_lab_fails(cli, tmp_path):
    """A lab whose daemon is gone: the state is shown (status dead, the way out) and the exit code is 1."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()  # a pid that no longer runs
    (tmp_path / ".katactl-lab").mkdir()
    (tmp_path / ".katactl-lab" / "state.json").write_text(json.dumps(
        {"root": str(tmp_path), "pid": p.pid, "status": "ready", "sandboxes": []}))
    r = cli(["lab", "status", "--root", str(tmp_path), "-o", "json"])
    assert r.exit_code == 1, r.stderr
    assert r.json()["status"] == "dead" and "lab down" in r.json()["error"]


def test_status_of_a_dead_lab_shows_its_sandboxes_stale(cli, tmp_path):
    """Review 8 (new user) #10: after the daemon died, `lab status` listed every sandbox as
    `running` (what the daemon last recorded) and pointed at `sandbox list`, which says stale."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    (tmp_path / ".katactl-lab").mkdir()
    sbs = [{"name": f"clh-{i}", "id": f"{i}" * 64, "pod": f"lab/batch-clh-{i}", "hypervisor": "clh",
            "status": "running", "memoryBytes": 512 << 20} for i in range(2)]
    (tmp_path / ".katactl-lab" / "state.json").write_text(json.dumps(
        {"root": str(tmp_path), "pid": p.pid, "status": "ready", "sandboxes": sbs}))
    r = cli(["lab", "status", "--root", str(tmp_path)])
    assert r.exit_code == 1, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
    assert [(row[0], row[4]) for row in rows] == [("clh-0", "stale"), ("clh-1", "stale")], r.stdout
    assert "running" not in r.stdout
    assert f"katactl lab down --root {tmp_path} cleans up, then katactl lab up --root {tmp_path} starts it again" \
        in r.stderr, r.stderr
    assert "sandbox list" not in r.stderr
    r = cli(["lab", "status", "--root", str(tmp_path), "-o", "json"])
    assert [(s["status"], s["recordedStatus"]) for s in r.json()["sandboxes"]] == [("stale", "running")] * 2


# -- lab down signals only what the lab started (issue 16 finding 2, issue 20) --------------
def _state_naming(root, pid, **extra):
    (root / ".katactl-lab").mkdir()
    (root / ".katactl-lab" / "state.json").write_text(json.dumps(
        {"root": str(root), "pid": pid, "status": "ready", "sandboxes": [], **extra}))


@pytest.fixture()
def bystander():
    """An unrelated process that a lab state file names (a reused or edited pid)."""
    import subprocess

    p = subprocess.Popen(["sleep", "300"], start_new_session=True)  # leads its own group, like the daemon
    yield p
    p.kill()
    p.wait()


@pytest.mark.parametrize("recorded", [False, True], ids=["old-state", "identity-recorded"])
def test_down_never_signals_an_unrelated_process(cli, tmp_path, bystander, _isolated_home, recorded):
    from katactl.procfacts import local_identity

    extra = {}
    if recorded:  # the lab daemon's identity as recorded: same pid, but another start time and argv
        me = local_identity(bystander.pid)
        extra["daemon"] = {"pid": bystander.pid, "createTime": me.create_time - 600,
                           "cmdline": [sys.executable, "-m", "katactl.lab.daemon", "--root", str(tmp_path)]}
    _state_naming(tmp_path, bystander.pid, **extra)
    for args in (["--dry-run"], []):
        r = cli(["lab", "down", "--root", str(tmp_path), "-o", "json", *args])
        assert r.exit_code == 5, r.stderr
        j = r.json()
        assert j["code"] == "Refused" and f"pid {bystander.pid}" in j["message"]
        assert "sleep 300" in j["message"] and "--force" in j["hint"]
        time.sleep(0.2)
        assert bystander.poll() is None  # still running: never signalled
        assert (tmp_path / ".katactl-lab" / "state.json").exists()  # nothing removed
    r = cli(["lab", "status", "--root", str(tmp_path), "-o", "json"])
    assert r.exit_code == 1 and r.json()["status"] == "dead" and "--force" in r.json()["error"]
    # --force removes the lab's files and still signals nothing
    r = cli(["lab", "down", "--root", str(tmp_path), "--force", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    j = r.json()
    assert j["stopped"] == [] and j["skipped"][0]["pid"] == bystander.pid and j["changed"] is True
    assert not tmp_path.exists()
    time.sleep(0.2)
    assert bystander.poll() is None


def test_up_does_not_take_an_unrelated_process_for_a_running_lab(tmp_path, bystander):
    from katactl.lab import control

    _state_naming(tmp_path, bystander.pid)
    assert control.is_running(str(tmp_path)) is False
    assert control.status(str(tmp_path))["status"] == "dead"


def test_down_never_kills_a_reused_qemu_pid(tmp_path, bystander, _isolated_home):
    """A sandbox's qemuPid that is now another process (even one named like QEMU by an
    older state file's check) is not killed: its recorded start time differs."""
    from katactl.lab import control
    from katactl.procfacts import local_identity

    me = local_identity(bystander.pid)
    gone = __import__("subprocess").Popen(["true"])
    gone.wait()
    _state_naming(tmp_path, gone.pid, sandboxes=[
        {"name": "qemu-0", "qemuPid": bystander.pid,
         "qemu": {"pid": bystander.pid, "createTime": me.create_time - 600, "cmdline": list(me.cmdline)}}])
    r = control.down(str(tmp_path))
    assert r["stopped"] == [] and not tmp_path.exists()
    time.sleep(0.2)
    assert bystander.poll() is None


# -- the QEMU's identity is the one it was started with (review 5, finding 1) -------------
def test_launched_identity_waits_for_the_exec():
    """A child stopped between fork and exec shows its parent's command line (and, inside
    exec, an empty one): the daemon records a QEMU's identity only once the child is past
    exec, so the record matches the running process."""
    import signal
    import threading

    from katactl.lab.daemon import launched_identity
    from katactl.procfacts import local_identity

    argv = [shutil.which("sleep") or "/bin/sleep", "300"]
    pid = os.fork()
    if pid == 0:  # the child: freeze before exec, as a just-forked QEMU would be
        try:
            os.kill(os.getpid(), signal.SIGSTOP)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    try:
        os.waitpid(pid, os.WUNTRACED)  # stopped, not yet exec'd
        early = local_identity(pid)  # what the daemon used to record right after Popen
        assert early is not None and early.cmdline != tuple(argv)
        with pytest.raises(RuntimeError, match="did not get past exec"):
            launched_identity(pid, timeout=0.1)
        got: list = []
        t = threading.Thread(target=lambda: got.append(launched_identity(pid, timeout=60)))
        t.start()
        os.kill(pid, signal.SIGCONT)
        t.join()
        (ident,) = got
        assert ident.cmdline == tuple(argv) and ident.create_time == early.create_time
        now = local_identity(pid)
        assert ident.same_process(now) and not early.same_process(now)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("recorded", [[], ["/bin/sh", "/usr/local/bin/qemu-system-x86_64", "300"]],
                         ids=["mid-exec", "wrapper"])
def test_down_kills_a_qemu_recorded_mid_exec(recorded, tmp_path, _isolated_home):
    """A state holds the QEMU's identity with an argv QEMU never showed: empty (read mid-exec
    by an older daemon), or a wrapper script's interpreter (the daemon lost before QEMU's own
    argv was recorded): 'lab down' still knows its QEMU by its start time and its name."""
    import subprocess

    from katactl.lab import control
    from katactl.procfacts import local_identity

    fake = tmp_path / "bin" / "qemu-system-x86_64"  # a QEMU by name: sleep under that name
    fake.parent.mkdir()
    os.symlink(shutil.which("sleep") or "/bin/sleep", fake)
    q = subprocess.Popen([str(fake), "300"], start_new_session=True)
    try:
        me = local_identity(q.pid)
        gone = subprocess.Popen(["true"])
        gone.wait()
        root = tmp_path / "lab"
        root.mkdir()
        _state_naming(root, gone.pid, sandboxes=[
            {"name": "qemu-0", "qemuPid": q.pid,
             "qemu": {"pid": q.pid, "createTime": me.create_time, "cmdline": recorded}}])
        r = control.down(str(root))
        assert r["stopped"] == [{"pid": q.pid, "what": "qemu (qemu-0)"}] and not root.exists()
        assert q.wait(30) == -9
    finally:
        q.kill()
        q.wait()


def _gone(pid: int, bound: float = 60) -> bool:
    """Whether pid ends within a (generous) bound: a SIGKILLed orphan goes once init reaps it."""
    from katactl.lab.control import _alive

    deadline = time.monotonic() + bound
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
def test_down_after_the_daemon_was_killed_stops_its_qemus(cli, monkeypatch, _isolated_home):
    """kill -9 of the lab daemon leaves its QEMUs running: 'lab down' stops every one of
    them (each recorded with the argv it was started with) and removes the lab."""
    import signal
    import tempfile

    from katactl.lab import control
    from katactl.procfacts import ProcIdentity, local_identity

    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("KATACTL_TEST_CACHE") or "/tmp/katactl-test-cache")
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    os.rmdir(root)
    # guestless QEMUs (-S): each start is a fresh chance for the identity race, no boot to wait for
    specs = [{"name": f"q{i}", "hypervisor": "qemu", "memory_mib": 64, "pod": f"q{i}", "namespace": "lab",
              "guest": False, "balloon": False, "extension": False, "extra_monitor": False} for i in range(4)]
    qemus: dict[int, ProcIdentity] = {}
    try:
        st = control.up(root, specs=specs, timeout=120)
        for s in st["sandboxes"]:
            rec = ProcIdentity.from_dict(s["qemu"])
            with open(f"/proc/{s['qemuPid']}/cmdline", "rb") as f:
                argv = tuple(a.decode() for a in f.read().split(b"\0")[:-1])
            assert rec is not None and rec.cmdline == argv and rec.cmdline[0].endswith("qemu-system-x86_64")
            qemus[s["qemuPid"]] = rec
        assert len(qemus) == 4
        os.kill(st["pid"], signal.SIGKILL)
        assert _gone(st["pid"])
        assert all(rec.same_process(local_identity(pid)) for pid, rec in qemus.items())  # orphaned, running
        r = cli(["lab", "down", "--root", root, "-o", "json"])
        assert r.exit_code == 0, r.stderr
        assert sorted(s["pid"] for s in r.json()["stopped"]) == sorted(qemus)
        assert not os.path.lexists(root)
        assert [pid for pid in qemus if not _gone(pid)] == []
    finally:
        for pid, rec in qemus.items():  # never leave a VM behind, whatever failed above
            if rec.same_process(local_identity(pid)):
                os.kill(pid, signal.SIGKILL)
        control.down(root, force=True)


# -- an interrupted 'lab up' undoes its start; a re-run waits for a starting lab (review 5, 3) ---
def _lab_up_process(root: str) -> subprocess.Popen:
    """'katactl lab up' of one booting QEMU sandbox, as a real process (real signals)."""
    return subprocess.Popen([sys.executable, "-m", "katactl", "lab", "up", "--root", root, "--sandboxes", "1",
                             "--memory", "96Mi", "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _frozen_starting_qemu(root: str, up: subprocess.Popen, bound: float = 120) -> int:
    """Wait until the lab's state names its QEMU, then SIGSTOP it: the guest cannot boot,
    so the lab stays 'starting' however fast this machine is. Its pid."""
    import signal

    from katactl.lab import control

    deadline = time.monotonic() + bound
    while True:
        st = control.read_state(root) or {}
        q = next((s.get("qemuPid") for s in st.get("sandboxes", []) if s.get("qemuPid")), None)
        if q:
            assert st["status"] == "starting", st
            os.kill(q, signal.SIGSTOP)
            return q
        assert up.poll() is None and time.monotonic() < deadline, (up.poll(), st)
        time.sleep(0.02)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_up_stops_what_it_started(sig, monkeypatch, _isolated_home):
    """Ctrl-C or SIGTERM while 'lab up' waits for a booting lab: exit 130 with the JSON error,
    the daemon and its QEMU stopped, the directory removed, and an audit record saying so."""
    import signal
    import tempfile

    from katactl.lab import control

    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("KATACTL_TEST_CACHE") or "/tmp/katactl-test-cache")
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    os.rmdir(root)
    up = _lab_up_process(root)
    try:
        q = _frozen_starting_qemu(root, up)
        daemon = control.read_state(root)["pid"]
        up.send_signal(getattr(signal, sig))
        os.kill(q, signal.SIGCONT)
        out, err = up.communicate(timeout=120)
        assert up.returncode == 130, (out, err)
        assert json.loads(out)["code"] == "Interrupted"
        assert _gone(daemon) and _gone(q)
        assert not os.path.lexists(root)
        log = _isolated_home / "state" / "katactl" / "audit.log"
        (req, entry) = [json.loads(x) for x in log.read_text().splitlines()]
        assert (req["action"], req["result"], req["target"]) == ("lab.up", "requested", root)
        assert (entry["action"], entry["result"], entry["target"]) == ("lab.up", "interrupted", root)
        assert entry["daemonPid"] == daemon and entry["undone"] is True and entry["changed"] is False
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
        control.down(root)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
def test_up_again_while_starting_waits_for_ready(monkeypatch, _isolated_home):
    """A second 'lab up' while the first is starting the lab does not report it as done: it
    waits for ready (changed: false) as the first one does, and gives up after its timeout
    without touching a lab another 'lab up' is starting."""
    import signal
    import tempfile

    from katactl.errors import TimeoutExpired
    from katactl.lab import control

    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("KATACTL_TEST_CACHE") or "/tmp/katactl-test-cache")
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")
    os.rmdir(root)
    up = _lab_up_process(root)
    try:
        q = _frozen_starting_qemu(root, up)
        again = dict(sandboxes=1, hypervisor="qemu", memory_mib=96)
        with pytest.raises(TimeoutExpired, match="another 'katactl lab up' or 'lab down' is still at work"):
            control.up(root, **again, timeout=0.5)  # frozen: it cannot become ready meanwhile
        assert control.read_state(root)["status"] == "starting" and up.poll() is None
        assert control.up(root, **again, dry_run=True)["changed"] is False  # a dry run never waits
        os.kill(q, signal.SIGCONT)
        st = control.up(root, **again, timeout=120)
        assert st["status"] == "ready" and st["changed"] is False
        assert [s["status"] for s in st["sandboxes"]] == ["running"]
        out, err = up.communicate(timeout=120)
        assert up.returncode == 0, err
        assert json.loads(out)["changed"] is True and json.loads(out)["pid"] == st["pid"]
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
        control.down(root)


def test_root_help_tells_every_users_default(cli, monkeypatch):
    """--root's help states the default a non-root user gets (/tmp/katactl-lab-UID), and no
    example reaches a lab through the default root's path: it differs per user."""
    import re

    from katactl.lab import control

    for sub in ("up", "status", "down"):
        r = cli(["lab", sub, "--help"])
        assert r.exit_code == 0, r.stderr
        text = " ".join(r.stdout.split())
        assert "default /tmp/katactl-lab-UID with your numeric uid, /tmp/katactl-lab for root" in text
        assert "KATACTL_LAB_ROOT" in text
        hosts = re.findall(r"--host-root (\S+)", r.stdout)
        assert all(f"--root {h}" in r.stdout for h in hosts), (sub, hosts)  # a lab the example started
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    assert control.default_root() == "/tmp/katactl-lab-1000"
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert control.default_root() == "/tmp/katactl-lab"


# -- two 'lab up' together start one daemon (review diffB, finding 2) ---------------------
_GATE = '''\
import os, time
_gate = os.environ.get("KATACTL_TEST_DAEMON_GATE")
if _gate:
    with open("/proc/self/cmdline", "rb") as _f:
        if b"katactl.lab.daemon" in _f.read().split(b"\\0"):
            open(_gate + ".waiting", "w").close()
            while not os.path.exists(_gate):
                time.sleep(0.01)
'''


def _daemons_for(root: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"katactl.lab.daemon" in argv and root.encode() in argv:
            out.append(int(d))
    return out


def test_two_ups_together_start_one_daemon(tmp_path, _isolated_home):
    """A second 'lab up' landing after the first wrote config.json but before its daemon's
    first state.json (interpreter start and imports) took the lab for a dead one: it removed
    it and started a second daemon, and 'lab down' left one running. Now it waits for the
    first (saying so), then finds its lab ready: one daemon, changed: false.

    The first up's daemon is held in that window by a sitecustomize gate (real processes,
    no clock): the gate opens only once the second up has said it waits, or has ended."""
    import tempfile

    from katactl.lab import control

    gatedir = tmp_path / "gate"
    gatedir.mkdir()
    (gatedir / "sitecustomize.py").write_text(_GATE)
    gate = str(tmp_path / "open")
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    os.rmdir(root)
    argv = [sys.executable, "-m", "katactl", "-o", "json", "lab", "up", "--root", root, "--hypervisor", "clh",
            "-s", "1"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, str(gatedir)]),
               KATACTL_TEST_DAEMON_GATE=gate)
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        while not os.path.exists(gate + ".waiting"):  # the first daemon, in its window
            assert first.poll() is None, first.communicate()
            time.sleep(0.01)
        assert os.path.exists(os.path.join(root, ".katactl-lab", "config.json"))
        assert control.read_state(root) is None
        second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert second.stderr is not None
        said = second.stderr.readline()  # '' once it ended without waiting
        open(gate, "w").close()
        out1, err1 = first.communicate(timeout=120)
        out2, err2 = second.communicate(timeout=120)
        assert "waiting for another 'katactl lab up' or 'lab down'" in said, (said, err2)
        assert first.returncode == 0 and second.returncode == 0, (err1, said + err2)
        j1, j2 = json.loads(out1), json.loads(out2)
        assert (j1["changed"], j1["removedDeadLab"], j2["changed"]) == (True, False, False)
        assert j1["status"] == j2["status"] == "ready" and j1["pid"] == j2["pid"]
        assert _daemons_for(root) == [j1["pid"]]
        r = control.down(root)
        assert r["stopped"][0]["pid"] == j1["pid"] and _gone(j1["pid"])
        assert _daemons_for(root) == []
    finally:
        open(gate, "w").close()
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
        for pid in _daemons_for(root):
            os.kill(pid, 9)
        control.down(root, force=True)


def test_down_waits_for_an_up_at_work(tmp_path, _isolated_home):
    """'lab down' waits (saying so) while an 'up' holds the root's lock, then decides."""
    from katactl.lab import control

    root = str(tmp_path / "lab")
    with control.root_lock(root, 10, create=True):
        down = subprocess.Popen([sys.executable, "-m", "katactl", "-o", "json", "lab", "down", "--root", root],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert down.stderr is not None
        said = down.stderr.readline()  # '' had it ended without waiting
        assert down.poll() is None
    out, err = down.communicate(timeout=60)
    assert "waiting for another 'katactl lab up' or 'lab down'" in said, (said, err)
    assert down.returncode == 0 and json.loads(out)["changed"] is False, err


# -- qemu-system-x86_64 on PATH may be a wrapper script (review diffB, finding 3) --------------
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
def test_up_through_a_qemu_wrapper_script(cli, tmp_path, monkeypatch, _isolated_home):
    """A site wrapper on PATH (``exec /usr/bin/qemu-system-x86_64 "$@"``) shows /bin/sh, then
    the real binary, never the argv the daemon launched: 'lab up' used to wait 10 s for that
    argv and fail. The lab comes up, records the QEMU as /proc shows it, and 'lab down' after
    the daemon was killed still knows that QEMU as the lab's and stops it."""
    import signal
    import tempfile

    from katactl.lab import control
    from katactl.procfacts import ProcIdentity, local_identity

    real = os.path.realpath(shutil.which("qemu-system-x86_64") or "")
    wrapper = tmp_path / "bin" / "qemu-system-x86_64"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\n# a site wrapper (logging, accel flags)\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("KATACTL_TEST_CACHE") or "/tmp/katactl-test-cache")
    root = tempfile.mkdtemp(prefix="kl-", dir="/tmp")  # short: unix socket paths are limited
    os.rmdir(root)
    specs = [{"name": "q0", "hypervisor": "qemu", "memory_mib": 64, "pod": "q0", "namespace": "lab",
              "guest": False, "balloon": False, "extension": False, "extra_monitor": False}]
    rec = None
    try:
        st = control.up(root, specs=specs, timeout=120)
        (sb,) = st["sandboxes"]
        rec = ProcIdentity.from_dict(sb["qemu"])
        assert rec is not None and rec.same_process(local_identity(sb["qemuPid"]))
        assert rec.cmdline[0] == real  # the binary the wrapper exec'd, as /proc shows it
        os.kill(st["pid"], signal.SIGKILL)
        assert _gone(st["pid"])
        r = cli(["lab", "down", "--root", root, "-o", "json"])
        assert r.exit_code == 0, r.stderr
        assert [s["pid"] for s in r.json()["stopped"]] == [sb["qemuPid"]]
        assert _gone(sb["qemuPid"]) and not os.path.lexists(root)
    finally:
        if rec is not None and rec.same_process(local_identity(rec.pid)):
            os.kill(rec.pid, signal.SIGKILL)
        control.down(root, force=True)
