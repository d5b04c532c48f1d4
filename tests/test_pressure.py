"""inspect pressure and the I/O settings/audit on cgroup v2 fixture trees (formats in
tests/fixtures_isolation.py, as Documentation/admin-guide/cgroup-v2.rst and
Documentation/accounting/psi.rst print them).

Counters move between the two samples because the wait between them
(pressure._sleep) writes the second sample's files; the clock (pressure._clock)
is a fake one second apart, so rates are exact without timing anything."""
from __future__ import annotations

import os
import shutil

import pytest

from katactl.isolation import pressure
from tests import fixtures_isolation as fx


def _node(root: str, **kw) -> dict:
    built = fx.build_node(root, mode="v2", online_pods=2, sandboxes=2, resctrl=False, **kw)
    fx.write_block_devices(root)
    fx.write_v2_root_io(root)
    return built


def _paths(built):
    online = [f"/kubepods/burstable/pod{u}" for u in built["online"]]
    sbs = []
    for i, sid in enumerate(built["vcpu_tids"]):
        uid = fx.pod_uid(i, "offline")
        sbs.append({"pod": f"/kubepods/besteffort/pod{uid}", "sandbox": f"/kubepods/besteffort/pod{uid}/kata_{sid}",
                    "overhead": f"/kata_overhead/{sid}", "id": sid})
    return online, sbs


def _signals(root, built, k):
    online, sbs = _paths(built)
    # online pod 0 suffers: CPU stall 30 % of a second, throttled 5 of 10 periods, memory.high hits
    fx.write_v2_signals(root, online[0], k, cpu_stall=300_000, throttled=5, periods=10, usage_usec=200_000,
                        events={"high": 4}, io_bytes={"8:16": 1 << 20})
    fx.write_v2_signals(root, online[1], k, usage_usec=100_000)
    # sandbox 0 burns 1.5 CPUs and does direct reclaim; sandbox 1 does 0.25
    for i, s in enumerate(sbs):
        use = 1_500_000 if i == 0 else 250_000
        fx.write_v2_signals(root, s["pod"], k, usage_usec=use, scan=1000 if i == 0 else 0,
                            events={"max": 2, "oom_kill": 1} if i == 0 else None, io_bytes={"8:16": (i + 1) << 22})
        fx.write_v2_signals(root, s["sandbox"], k, usage_usec=use - 100_000)
        fx.write_v2_signals(root, s["overhead"], k, usage_usec=100_000)
    fx.write_node_signals(root, k, cpu_stall=150_000, io_stall=10_000, scan=1000)


@pytest.fixture
def moving(monkeypatch):
    """Make the two samples one fake second apart, with the second sample's files written
    during the wait."""
    state = {"now": 100.0, "between": None}

    def clock():
        return state["now"]

    def sleep(secs):
        state["now"] += 1.0
        if state["between"]:
            state["between"]()

    monkeypatch.setattr(pressure, "_clock", clock)
    monkeypatch.setattr(pressure, "_sleep", sleep)
    return state


@pytest.fixture
def v2node(tmp_path, moving):
    root = str(tmp_path / "node")
    built = _node(root)
    _signals(root, built, 0)
    moving["between"] = lambda: _signals(root, built, 1)
    return root, built


def _run(cli, root, *args):
    r = cli(["--host-root", root, "inspect", "pressure", "-o", "json", *args])
    return r


def test_pressure_v2_rates_summary_and_evidence(cli, v2node):
    root, built = v2node
    online, sbs = _paths(built)
    r = _run(cli, root)
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "PressureReport" and d["interval"] == 1.0 and d["psi"] == "per cgroup"
    rows = {(i["role"], i["path"]): i for i in d["items"]}
    # the node, 2 online pods, 2 sandboxes x (pod, sandbox, overhead)
    assert len(d["items"]) == 1 + 2 + 6 and d["onlinePods"] == 2 and d["sandboxes"] == 2
    hit = rows[("pod", online[0])]
    assert hit["class"] == "online"
    cpu = hit["psi"]["cpu"]["some"]
    assert cpu["stallPercent"] == 30.0 and cpu["avg10"] == 1.5 and isinstance(cpu["avg300"], float)
    assert hit["psi"]["cpu"]["full"]["stallPercent"] == 15.0
    assert hit["cpu"] == {"periods": 10, "throttledPeriods": 5, "throttledPercent": 50.0,
                          "throttledMsPerSec": 250.0, "usageCores": 0.2}
    assert hit["memory"]["events"] == {"low": 0, "high": 4, "max": 0, "oom": 0, "oomKill": 0}
    assert hit["memory"]["usageBytes"] == 1 << 28
    assert hit["io"]["devices"] == [{"device": "8:16", "name": "sdb", "readBytesPerSec": 1048576.0,
                                     "writeBytesPerSec": 1048576.0, "readIops": 256.0, "writeIops": 256.0}]
    sb0 = rows[("pod", sbs[0]["pod"])]
    assert sb0["class"] == "offline" and sb0["sandbox"] == sbs[0]["id"] and sb0["podRef"] == "batch/batch-0"
    assert (sb0["pod"]["namespace"], sb0["pod"]["name"]) == ("batch", "batch-0") and "uid" in sb0["pod"]
    assert sb0["memory"]["pgscanDirectPerSec"] == 1000.0 and sb0["memory"]["pgstealDirectPerSec"] == 500.0
    assert sb0["memory"]["events"]["oomKill"] == 1 and sb0["memory"]["events"]["max"] == 2
    assert rows[("overhead", sbs[0]["overhead"])]["cpu"]["usageCores"] == 0.1
    node = rows[("node", None)]
    assert node["psi"]["cpu"]["some"]["stallPercent"] == 15.0 and node["psi"]["cpu"]["full"]["stallPercent"] == 0.0
    assert node["memory"]["pgscanDirectPerSec"] == 1000.0 and node["memory"]["allocstallPerSec"] == 3.0
    # diskstats: sectors x 512, partitions and loops left out
    assert [x["name"] for x in node["io"]["devices"]] == ["sda"]
    assert node["io"]["readBytesPerSec"] == 80 * 512 and node["io"]["readIops"] == 10.0
    for it in d["items"]:  # numbers, never strings with units
        for v in (it["psi"]["cpu"] or {}).get("some", {}).values():
            assert isinstance(v, (int, float))
    s = d["summary"]
    assert s["contended"] == "cpu"
    assert s["worstOnline"][0]["path"] == online[0] and s["worstOnline"][0]["evidence"]["metric"] == "cpu.throttled"
    assert s["worstOnline"][0]["evidence"]["file"].endswith(online[0] + "/cpu.stat")
    top = s["topSandboxes"]
    # pod cgroup (which holds kata_<id>) + kata_overhead/<id>
    assert [x["sandbox"] for x in top] == [sbs[0]["id"], sbs[1]["id"]]
    assert top[0]["value"] == 1.6 and top[0]["unit"] == "cores" and top[0]["podRef"] == "batch/batch-0"
    assert top[0]["pod"] == sb0["pod"]
    _signals(root, built, 0)
    r = cli(["--host-root", root, "inspect", "pressure"])  # the summary line (stderr) of the human view
    assert r.exit_code == 0, r.stderr
    assert "worst online: pod uid" in r.stderr and "cpu.throttled 50%" in r.stderr
    assert "top Kata sandboxes by cpu: batch/batch-0 1.60 cores, batch/batch-1 0.35 cores" in r.stderr


@pytest.mark.parametrize("rule,code,violations", [
    ("cpu.some>10", 8, 2),             # the online pod (30 %) and the node (15 %)
    ("cpu.some>20", 8, 1),
    ("cpu.some>=30,memory.full>1", 8, 1),
    ("cpu.some>50", 0, 0),
    ("cpu.throttled>40", 8, 1),
    ("memory.direct-reclaim>10", 8, 1),  # the node (sandbox 0's reclaim is not an online pod's)
    ("memory.oom>0", 0, 0),              # only the sandbox had an OOM kill
    ("cpu.some.avg10>1", 8, 2),
])
def test_fail_on(cli, v2node, rule, code, violations):
    root, _ = v2node
    r = _run(cli, root, "--fail-on", rule)
    assert r.exit_code == code, r.stderr
    fo = r.json()["failOn"]
    assert len(fo["violations"]) == violations and fo["passed"] is (code == 0)


def test_fail_on_verdict_stays_top_level_with_a_node_selection(cli, v2node):
    """Review 8 (new user) #6: `katactl -N node-7 inspect pressure --fail-on ... -o json` had no
    top-level failOn (only nodes.<NODE>.failOn): `jq -e .failOn.passed` was null. Like audit's
    passed, the verdict over the selection is top-level, its findings tagged with the node."""
    root, built = v2node
    one = _run(cli, root, "--fail-on", "cpu.some>10").json()["failOn"]
    _signals(root, built, 0)  # the counters move again in the next run's wait
    r = cli(["--host-root", root, "-N", "localhost", "inspect", "pressure", "-o", "json", "--fail-on", "cpu.some>10"])
    assert r.exit_code == 8, r.stderr
    d = r.json()
    assert d["failOn"]["passed"] is False and d["failOn"]["rules"] == ["cpu.some>10"]
    assert [(v["node"], v["target"]) for v in d["failOn"]["violations"]] == \
        [("localhost", v["target"]) for v in one["violations"]]
    assert d["nodes"]["localhost"]["failOn"]["violations"] == one["violations"]
    r = cli(["--host-root", root, "-N", "localhost", "inspect", "pressure", "-o", "json", "--fail-on", "cpu.some>50"])
    assert r.exit_code == 0 and r.json()["failOn"]["passed"] is True, r.stderr
    # a node that failed was not checked: no pass (exit 4: the node's failure is the answer)
    r = cli(["--host-root", root, "-N", "localhost,127.0.0.1:1", "--request-timeout", "5s", "inspect", "pressure",
             "-o", "json", "--fail-on", "cpu.some>50"])
    assert r.exit_code == 4, r.stderr
    d = r.json()
    assert d["failOn"]["passed"] is False and d["failOn"]["violations"] == [] and d["errors"]
    assert d["nodes"]["localhost"]["failOn"]["passed"] is True
    r = cli(["--host-root", root, "-N", "localhost", "inspect", "pressure", "-o", "json"])
    assert "failOn" not in r.json() and "failOn" not in r.json()["nodes"]["localhost"]


def test_fail_on_explicit_targets_cover_sandboxes(cli, v2node):
    root, built = v2node
    _, sbs = _paths(built)
    r = _run(cli, root, sbs[0]["id"][:10], "--fail-on", "memory.oom>0")
    assert r.exit_code == 8, r.stderr
    d = r.json()
    assert {i["role"] for i in d["items"]} == {"pod", "sandbox", "overhead"}
    assert [v["target"] for v in d["failOn"]["violations"]] == ["batch/batch-0 (pod)"]


def test_targets_node_path_uid(cli, v2node):
    root, built = v2node
    online, _ = _paths(built)
    r = _run(cli, root, "node", online[1], built["online"][0])
    assert r.exit_code == 0, r.stderr
    roles = [(i["role"], i["path"]) for i in r.json()["items"]]
    assert roles == [("node", None), ("cgroup", online[1]), ("pod", online[0])]


def test_table_and_wide(cli, v2node):
    root, _ = v2node
    r = cli(["--host-root", root, "inspect", "pressure", "-o", "wide"])
    assert r.exit_code == 0, r.stderr
    head = r.stdout.splitlines()[0].split()
    assert head[:6] == ["TARGET", "ROLE", "CLASS", "CPU-SOME%", "MEM-SOME%", "IO-SOME%"] and "PATH" in head


def test_vanishing_and_unreadable_cgroups(cli, tmp_path, moving):
    root = str(tmp_path / "node")
    built = _node(root)
    online, sbs = _paths(built)
    _signals(root, built, 0)

    def between():
        _signals(root, built, 1)
        shutil.rmtree(fx.v2_dir(root, sbs[1]["overhead"]))       # the sandbox went away mid-sample
        os.unlink(fx.v2_dir(root, online[1]) + "/memory.stat")   # a knob this kernel lacks
        with open(fx.v2_dir(root, online[1]) + "/cpu.stat", "w") as f:
            f.write("garbage without numbers\n")
    moving["between"] = between
    r = _run(cli, root)
    assert r.exit_code == 0, r.stderr
    rows = {(i["role"], i["path"]): i for i in r.json()["items"]}
    assert rows[("overhead", sbs[1]["overhead"])]["gone"] is True
    o1 = rows[("pod", online[1])]
    assert "memory.stat" in o1["unsupported"]
    assert o1["unreadable"][0]["file"].endswith("/cpu.stat") and o1["cpu"] is None
    assert "Traceback" not in r.stderr


def test_v1_fixture_without_psi_is_node_only(cli, tmp_path, moving):
    root = str(tmp_path / "node")
    fx.build_node(root, mode="v1", online_pods=1, sandboxes=1, resctrl=False)
    fx.write_node_signals(root, 0, cpu_stall=100_000)
    moving["between"] = lambda: fx.write_node_signals(root, 1, cpu_stall=100_000)
    r = _run(cli, root)
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["psi"].startswith("node only")
    pod = next(i for i in d["items"] if i["class"] == "online")
    assert pod["psi"] == {"cpu": None, "memory": None, "io": None}
    assert "psi.cpu" in pod["unsupported"] and "memory.pressure_level" in pod["memory"]["pressureLevel"]


@pytest.mark.parametrize("args,needle", [
    (["--interval", "0"], "greater than zero"),
    (["--interval", "0s"], "greater than zero"),
    (["--interval", "-1s"], "negative"),
    (["--interval", "10ms"], "between 100ms and 60s"),
    (["--interval", "2h"], "between 100ms and 60s"),
    (["--interval", "99999999999999999999d"], "--interval"),
    (["--interval", "1x"], "invalid --interval"),
    (["--fail-on", ""], "empty --fail-on"),
    (["--fail-on", "cpu.some"], "invalid --fail-on rule"),
    (["--fail-on", "cpu.some>"], "invalid --fail-on rule"),
    (["--fail-on", "cpu.some>ten"], "invalid --fail-on rule"),
    (["--fail-on", "cpu.some=>10"], "invalid --fail-on rule"),
    (["--fail-on", "cpu.sum>10"], "unknown --fail-on metric"),
    (["--fail-on", "cpu.some>10,,io.full>1"], "invalid --fail-on rule"),
    (["--fail-on", "cpu.some>-1"], "invalid --fail-on rule"),
    (["--fail-on", "cpu.some>1e9"], "invalid --fail-on rule"),
    (["--iterations", "2"], "--iterations N needs --watch"),
    (["--watch", "--iterations", "0"], "--iterations N needs --watch"),
    (["/proc/self"], "outside the cgroup mounts"),
    (["node", "/sys/fs/cgroup/../../proc"], "outside the cgroup mounts"),
])
def test_bad_input_is_exit_2_one_line(cli, tmp_path, args, needle):
    root = str(tmp_path / "node")
    _node(root)
    r = cli(["--host-root", root, "inspect", "pressure", *args])
    assert r.exit_code == 2, (args, r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_bad_input_json_error_object(cli, tmp_path):
    root = str(tmp_path / "node")
    _node(root)
    r = cli(["--host-root", root, "inspect", "pressure", "-o", "json", "--fail-on", "x>1"])
    assert r.exit_code == 2 and r.json()["kind"] == "Error"


def test_unknown_sandbox_is_not_found(cli, tmp_path, moving):
    root = str(tmp_path / "node")
    _node(root)
    r = cli(["--host-root", root, "inspect", "pressure", "no-such-sandbox"])
    assert r.exit_code == 3 and "Traceback" not in r.stderr


def test_watch_jsonl_iterations(cli, v2node, moving):
    root, built = v2node
    k = {"n": 1}

    def between():
        _signals(root, built, k["n"])
        k["n"] += 1
    moving["between"] = between
    r = cli(["--host-root", root, "inspect", "pressure", "--watch", "--iterations", "3", "-o", "jsonl",
             "--interval", "100ms", "--fail-on", "cpu.some>20"])
    assert r.exit_code == 8, r.stderr
    import json

    docs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(docs) == 3 and all(d["kind"] == "PressureReport" for d in docs)


# -- I/O settings (inspect cgroup) and the I/O audit rules on v2 -----------------------------

def test_inspect_cgroup_io_v2(cli, tmp_path):
    root = str(tmp_path / "node")
    built = _node(root)
    online, sbs = _paths(built)
    fx.write_v2_io(root, sbs[0]["pod"], weight=10, dev_weights={"8:16": 20}, bfq_weight=100,
                   io_max={"8:16": "rbps=2097152 wbps=max riops=max wiops=120"}, latency={"8:0": 75})
    r = cli(["--host-root", root, "inspect", "cgroup", sbs[0]["id"][:10], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    pod = next(c for c in r.json()["cgroups"] if c["role"] == "pod")
    assert pod["io"]["version"] == 2 and pod["io"]["weight"] == 10 and pod["io"]["bfqWeight"] == 100
    devs = {e["device"]: e for e in pod["io"]["devices"]}
    assert devs["8:16"] == {"device": "8:16", "name": "sdb", "weight": 20, "readBps": 2097152, "writeBps": "max",
                            "readIops": "max", "writeIops": 120, "throttled": True}
    assert devs["8:0"] == {"device": "8:0", "name": "sda", "latencyTargetUs": 75, "throttled": False}
    sb = next(c for c in r.json()["cgroups"] if c["role"] == "sandbox")
    assert "io.weight" in sb["unsupported"] and sb["io"]["weight"] is None
    r = cli(["--host-root", root, "inspect", "cgroup", "/", "-o", "json"])
    (e,) = r.json()["cgroups"]
    assert e["io"]["costQos"] == [{"device": "8:16", "name": "sdb", "enable": 1, "ctrl": "user", "rpct": 95.0,
                                   "rlat": 75000, "wpct": 95.0, "wlat": 150000, "min": 50.0, "max": 150.0}]
    assert e["io"]["costModel"][0]["model"] == "linear" and e["io"]["costModel"][0]["rbps"] == 174019176


def _audit(cli, root, *args):
    r = cli(["--host-root", root, "audit", "-o", "json", "--fail-on", "info", *args])
    assert r.stdout, r.stderr
    return r, r.json()


def test_audit_io_rules_v2(cli, tmp_path):
    root = str(tmp_path / "node")
    built = _node(root)
    online, sbs = _paths(built)
    for p in online:
        fx.write_v2_io(root, p, weight=500)
        fx.write_v2_signals(root, p, 0, io_bytes={"8:16": 1})
    # weights count among siblings: the BE class not below the burstable one is io.offline-weight
    fx.write_v2_io(root, "/kubepods/burstable", weight=500)
    fx.write_v2_io(root, "/kubepods/besteffort", weight=500)
    fx.write_v2_io(root, sbs[0]["pod"], weight=10)
    fx.write_v2_io(root, sbs[0]["sandbox"], weight=10)
    fx.write_v2_io(root, sbs[1]["pod"], weight=10, io_max={"8:16": "rbps=max wbps=1048576 riops=max wiops=max"})
    fx.write_v2_io(root, sbs[1]["sandbox"], weight=10)
    # sandbox_cgroup_only=false: the shim and virtiofsd in kata_overhead/<id> need their own io.max
    fx.write_v2_io(root, sbs[1]["overhead"], io_max={"8:16": "rbps=max wbps=1048576 riops=max wiops=max"})
    fx.write_v2_signals(root, sbs[0]["pod"], 0, io_bytes={"8:16": 1})  # sda traffic shared, unthrottled
    fx.write_v2_signals(root, sbs[1]["pod"], 0, io_bytes={"8:16": 1})  # throttled there: fine
    fx.write_v2_root_io(root, qos_enable=0)
    pol = tmp_path / "p.toml"
    pol.write_text('[io]\noffline_devices = "sdb"\n')
    r, d = _audit(cli, root, "--policy", str(pol))
    assert r.exit_code == 8
    got = {(i["check"], i["target"]) for i in d["items"] if i["check"].startswith("io.")}
    assert got == {("io.offline-weight", "/kubepods/besteffort"),
                   ("io.offline-throttle", "pod batch/batch-0"),
                   ("io.shared-device", "pod batch/batch-0"),
                   ("io.weight-ineffective", "localhost")}, got
    w = next(i for i in d["items"] if i["check"] == "io.offline-weight")
    assert w["severity"] == "medium" and w["evidence"][0]["value"] == 500
    assert w["evidence"][0]["file"].endswith("/kubepods/besteffort/io.weight")
    sh = next(i for i in d["items"] if i["check"] == "io.shared-device")
    assert "sdb (8:16)" in sh["message"] and sh["severity"] == "high"
    # bfq on the disks, or iocost enabled: weights take effect
    fx.write_v2_root_io(root, qos_enable=1)
    fx.write_block_devices(root, {"8:0": "sda"}, scheduler="bfq")
    r, d = _audit(cli, root, "--policy", str(pol))
    assert "io.weight-ineffective" not in {i["check"] for i in d["items"]}


@pytest.mark.parametrize("body,needle", [
    ('[io]\noffline_devices = ""\n', "must not be empty"),
    ('[io]\noffline_devices = "sd b"\n', "not a device name"),
    ('[io]\noffline_devices = ["sdb"]\n', "must be a string"),
    ('[io]\ncheck_weight_order = 1\n', "true or false"),
    ('[io]\nmax_weight = 1\n', "unknown policy key"),
    ('[severity]\n"io.shared-device" = "urgent"\n', "must be one of"),
])
def test_io_policy_errors(cli, tmp_path, body, needle):
    root = str(tmp_path / "node")
    _node(root)
    pol = tmp_path / "p.toml"
    pol.write_text(body)
    r = cli(["--host-root", root, "audit", "--policy", str(pol)])
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_alinux_latency_histograms_when_present(cli, v2node):
    root, built = v2node
    online, _ = _paths(built)
    hist = "0-1ms: 10\n1-4ms: 2\n4-8ms: 0\n>=100ms: 0\ntotal(ms): 5\n"
    for p in ("/kubepods", online[0]):
        with open(fx.v2_dir(root, p) + "/memory.direct_reclaim_global_latency", "w") as f:
            f.write(hist)
    r = _run(cli, root, online[0], online[1])
    assert r.exit_code == 0, r.stderr
    a, b = r.json()["items"]
    assert a["extras"]["memory.direct_reclaim_global_latency"] == {"0-1ms": 0, "1-4ms": 0, "4-8ms": 0,
                                                                   ">=100ms": 0, "total(ms)": 0}
    assert "extras" not in b and "memory.direct_reclaim_global_latency" in b["unsupported"]


def _stacked_diskstats(root, k):
    """A node as LVM + zram leave it: sda and its partition, dm-0 (LVM on sda2: the same
    I/O again), zram0 (compressed swap in memory), mmcblk0 and its partition, loop0.
    Field layout of Documentation/admin-guide/iostats.rst (sectors of 512 bytes)."""
    def line(maj, mi, name, rios, rsect, wios, wsect):
        return f"{maj:4d} {mi:7d} {name} {rios} 0 {rsect} 1 {wios} 0 {wsect} 1 0 1 2 0 0 0 0 0 0\n"
    fx._w(root, "/proc/diskstats", "".join([
        line(8, 0, "sda", 100 + 10 * k, 800 + 80 * k, 0, 0),
        line(8, 2, "sda2", 100 + 10 * k, 800 + 80 * k, 0, 0),
        line(253, 0, "dm-0", 100 + 10 * k, 800 + 80 * k, 0, 0),
        line(252, 0, "zram0", 1000 + 500 * k, 8000 + 4000 * k, 0, 0),
        line(179, 0, "mmcblk0", 5 + 1 * k, 40 + 8 * k, 0, 0),
        line(179, 1, "mmcblk0p1", 5 + 1 * k, 40 + 8 * k, 0, 0),
        line(7, 0, "loop0", 5 + 5 * k, 40 + 40 * k, 0, 0)]))


@pytest.mark.parametrize("with_sys", [True, False], ids=["sysfs", "names-only"])
def test_node_io_counts_each_physical_disk_once(cli, tmp_path, moving, with_sys):
    """The node's I/O rate is the sum over its physical disks: a partition is counted by its
    disk, dm/md by the disks under them, zram is memory. With /sys/dev/block the kernel says
    which is which (DEVTYPE, the `device` link); without it, device names decide."""
    root = str(tmp_path / "node")
    fx.build_node(root, mode="v2", online_pods=1, sandboxes=1, resctrl=False)
    if with_sys:
        for mm, name, kind, backed in (("8:0", "sda", "disk", True), ("8:2", "sda2", "partition", False),
                                       ("253:0", "dm-0", "disk", False), ("252:0", "zram0", "disk", False),
                                       ("179:0", "mmcblk0", "disk", True), ("179:1", "mmcblk0p1", "partition", False),
                                       ("7:0", "loop0", "disk", False)):
            maj, mi = mm.split(":")
            fx._w(root, f"/sys/dev/block/{mm}/uevent", f"MAJOR={maj}\nMINOR={mi}\nDEVNAME={name}\nDEVTYPE={kind}\n")
            if backed:  # as in sysfs: a link to the device the disk sits on
                os.makedirs(os.path.join(root, "sys/devices/fake", name), exist_ok=True)
                os.symlink(f"../../../devices/fake/{name}", os.path.join(root, f"sys/dev/block/{mm}/device"))
    _stacked_diskstats(root, 0)
    moving["between"] = lambda: _stacked_diskstats(root, 1)
    r = _run(cli, root, "node")
    assert r.exit_code == 0, r.stderr
    node = next(i for i in r.json()["items"] if i["role"] == "node")
    assert [d["name"] for d in node["io"]["devices"]] == ["sda", "mmcblk0"]  # by maj:min
    assert node["io"]["readIops"] == 11.0 and node["io"]["readBytesPerSec"] == 88 * 512


def test_fail_on_unmeasured_is_unknown_not_passed(cli, tmp_path, moving):
    """cgroup v1 without PSI: a rule on a pod's PSI cannot be evaluated. ``cpu.some>=0`` holds
    for every measured value, so a pass could only come from not measuring: unknown, exit 8."""
    root = str(tmp_path / "node")
    built = fx.build_node(root, mode="v1", online_pods=1, sandboxes=1, resctrl=False)
    fx.write_node_signals(root, 0)
    moving["between"] = lambda: fx.write_node_signals(root, 1)
    path = f"/kubepods/burstable/pod{built['online'][0]}"
    r = _run(cli, root, path, "--fail-on", "cpu.some>=0")
    assert r.exit_code == 8, r.stderr
    fo = r.json()["failOn"]
    assert fo["passed"] is False and fo["violations"] == []
    assert fo["unknown"] == [{"target": f"pod uid {built['online'][0]}", "path": path, "metric": "cpu.some",
                              "rule": "cpu.some>=0", "reason": "unsupported here: psi.cpu"}]
    assert r.stderr.count("warning: --fail-on cpu.some>=0 not measured for pod uid") == 1
    # the node has PSI: measured; it has no CFS quota: cpu.throttled is skipped there, and with
    # the node the only target it was measured nowhere: unknown, not passed
    r = _run(cli, root, "node", "--fail-on", "cpu.some>=0,cpu.throttled>50")
    assert r.exit_code == 8, r.stderr
    assert [v["metric"] for v in r.json()["failOn"]["violations"]] == ["cpu.some"]
    assert [(u["rule"], u["reason"]) for u in r.json()["failOn"]["unknown"]] == [
        ("cpu.throttled>50", "measured on no target (the node has no CFS quota)")]
    assert [s["rule"] for s in r.json()["failOn"]["skipped"]] == ["cpu.throttled>50"]


# /proc/vmstat before 5.9 (mm/vmstat.c vmstat_text): one workingset_refault counter, split
# into workingset_refault_anon/_file by 170b04b7ae49 in 5.9
VMSTAT_54 = ("nr_free_pages 100000\nworkingset_nodes 10\nworkingset_refault {r}\nworkingset_activate 30\n"
             "workingset_restore 5\nworkingset_nodereclaim 0\npgmajfault 50\npgscan_kswapd 1000\n"
             "pgscan_direct 10\npgsteal_direct 5\nallocstall_normal 0\noom_kill 0\n")
# a 4.19 cgroup v1 memory.stat (mm/memcontrol.c memcg_stat_show): no workingset counter at all
MEMSTAT_V1_419 = ("cache 1000\nrss 2000\nrss_huge 0\nshmem 0\nmapped_file 0\ndirty 0\nwriteback 0\n"
                  "pgpgin 10\npgpgout 5\npgfault 100\npgmajfault 3\ninactive_anon 0\nactive_anon 2000\n"
                  "inactive_file 500\nactive_file 500\nunevictable 0\nhierarchical_memory_limit 9223372036854771712\n"
                  "total_cache 1000\ntotal_rss 2000\ntotal_pgfault 100\ntotal_pgmajfault 3\n")


def test_fail_on_refault_before_5_9_is_measured_or_unknown(cli, tmp_path, moving):
    """Before 5.9 the node's refaults are the one ``workingset_refault``: measured (10M/s
    here, a violation), never 0. A v1 memory.stat without any workingset counter is not 0
    refaults: unknown for a TARGET named, skipped with a warning for the default ones."""
    root = str(tmp_path / "node")
    built = fx.build_node(root, mode="v1", online_pods=1, sandboxes=0, resctrl=False)
    fx.write_node_signals(root, 0)
    fx._w(root, "/proc/vmstat", VMSTAT_54.format(r=5_000_000))
    for d in (f"/sys/fs/cgroup/memory/kubepods/burstable/pod{u}" for u in built["online"]):
        fx._w(root, d + "/memory.stat", MEMSTAT_V1_419)
    moving["between"] = lambda: fx._w(root, "/proc/vmstat", VMSTAT_54.format(r=15_000_000))
    r = _run(cli, root, "--fail-on", "memory.refault>1000")
    assert r.exit_code == 8, r.stderr
    fo = r.json()["failOn"]
    assert [(v["target"], v["value"]) for v in fo["violations"]] == [("node", 10_000_000.0)]
    assert fo["unknown"] == [] and [s["targets"] for s in fo["skipped"]] == [[f"pod uid {built['online'][0]}"]]
    assert "--fail-on memory.refault>1000 skipped for pod uid" in r.stderr
    path = f"/kubepods/burstable/pod{built['online'][0]}"
    r = _run(cli, root, path, "--fail-on", "memory.refault>1000")
    assert r.exit_code == 8, r.stderr
    fo = r.json()["failOn"]
    assert fo["violations"] == [] and [u["reason"] for u in fo["unknown"]] == [
        "unsupported here: memory.stat:workingset_refault"]


def test_fail_on_default_targets_on_v1_without_cgroup_psi(cli, tmp_path, moving):
    """cgroup v1 (no per-cgroup PSI), an idle node: the default targets' PSI rules are the
    node's (measured, passed); the pods, which cannot have PSI here, are skipped with one
    warning, not "unknown" (exit 0, not 8). A rule measured on no target stays unknown."""
    root = str(tmp_path / "node")
    built = fx.build_node(root, mode="v1", online_pods=2, sandboxes=1, resctrl=False)
    fx.write_node_signals(root, 0)
    moving["between"] = lambda: fx.write_node_signals(root, 1)
    r = _run(cli, root, "--fail-on", "cpu.some>10,memory.some>50,io.some>50")
    assert r.exit_code == 0, r.stderr
    fo = r.json()["failOn"]
    assert fo["passed"] is True and fo["unknown"] == [] and fo["violations"] == []
    pods = sorted(f"pod uid {u}" for u in built["online"])
    assert [(s["rule"], sorted(s["targets"]), s["reason"]) for s in fo["skipped"]] == [
        (f"{m}.some>{n}", pods, f"unsupported here: psi.{m}") for m, n in (("cpu", 10), ("memory", 50), ("io", 50))]
    assert r.stderr.count("skipped for 2 targets") == 3
    # cpu.full: the pods have no PSI, the node has no CPU full: nothing measured it
    r = _run(cli, root, "--fail-on", "cpu.full>10")
    assert r.exit_code == 8, r.stderr
    assert [(u["target"], u["reason"]) for u in r.json()["failOn"]["unknown"]] == [
        ("node", "measured on no target (online pods: unsupported here: psi.cpu)")]


@pytest.mark.parametrize("full_line", [True, False], ids=["5.13+", "before-5.13"])
def test_fail_on_node_cpu_full_is_skipped_on_every_kernel(cli, tmp_path, moving, full_line):
    """System-level CPU full is undefined (Documentation/accounting/psi.rst: "reported since
    5.13, so it is set to zero"; before, /proc/pressure/cpu has no full line): a node rule
    on it is skipped for the node with a warning on both kernels, not measured on one and
    skipped on the other. With the node the only target, the rule was measured nowhere:
    unknown (exit 8) on both, never passed."""
    root = str(tmp_path / "node")
    fx.build_node(root, mode="v2", online_pods=1, sandboxes=0, resctrl=False)

    def write(k):
        fx.write_node_signals(root, k)
        if not full_line:
            fx._w(root, "/proc/pressure/cpu", f"some avg10=2.00 avg60=1.00 avg300=0.20 total={5_000_000 + k}\n")
    write(0)
    moving["between"] = lambda: write(1)
    r = _run(cli, root, "node", "--fail-on", "cpu.full>50,cpu.full.avg10>50")
    assert r.exit_code == 8, r.stderr
    fo = r.json()["failOn"]
    assert fo["passed"] is False and fo["violations"] == []
    why = "measured on no target (CPU full is undefined at the system level (psi.rst: 0 since 5.13))"
    assert [(u["rule"], u["reason"]) for u in fo["unknown"]] == [("cpu.full>50", why), ("cpu.full.avg10>50", why)]
    assert [(s["rule"], s["targets"]) for s in fo["skipped"]] == [("cpu.full>50", ["node"]),
                                                                    ("cpu.full.avg10>50", ["node"])]
    assert "--fail-on cpu.full>50 skipped for node (CPU full is undefined at the system level" in r.stderr


def test_fail_on_cgroup_cpu_full_before_5_13(cli, tmp_path, moving):
    """Before 5.13 a cgroup's cpu.pressure has no "full" line either (psi.rst: CPU full "has
    been reported since 5.13"): the pods cannot have cpu.full, skipped with a warning; with
    the node's undefined too, the rule was measured nowhere: unknown, never passed."""
    root = str(tmp_path / "node")
    built = fx.build_node(root, mode="v2", online_pods=1, sandboxes=0, resctrl=False)
    pod = f"/kubepods/burstable/pod{built['online'][0]}"

    def write(k):
        fx.write_node_signals(root, k)
        fx.write_v2_signals(root, pod, k)
        fx._w(root, "/proc/pressure/cpu", f"some avg10=2.00 avg60=1.00 avg300=0.20 total={5_000_000 + k}\n")
        fx._w(root, f"/sys/fs/cgroup{pod}/cpu.pressure", fx.psi_text(1_000_000 + k, 0, full=False))
    write(0)
    moving["between"] = lambda: write(1)
    r = _run(cli, root, "--fail-on", "cpu.full>50,cpu.some>50")
    assert r.exit_code == 8, r.stderr
    fo = r.json()["failOn"]
    assert fo["violations"] == [] and [(u["rule"], u["reason"]) for u in fo["unknown"]] == [
        ("cpu.full>50", "measured on no target (online pods: unsupported here: psi.cpu.full)")]
    r = _run(cli, root, pod, "--fail-on", "cpu.full>50")
    assert r.exit_code == 8 and [u["reason"] for u in r.json()["failOn"]["unknown"]] == [
        "unsupported here: psi.cpu.full"], r.stderr


def test_fail_on_gone_target_is_not_unknown(cli, tmp_path, moving):
    root = str(tmp_path / "node")
    built = _node(root)
    _, sbs = _paths(built)
    _signals(root, built, 0)

    def between():
        _signals(root, built, 1)
        shutil.rmtree(fx.v2_dir(root, sbs[1]["overhead"]))
    moving["between"] = between
    r = _run(cli, root, sbs[1]["id"][:10], "--fail-on", "cpu.some>50")
    assert r.exit_code == 0, r.stderr
    assert r.json()["failOn"] == {"rules": ["cpu.some>50"], "passed": True, "violations": [], "unknown": [],
                                  "skipped": []}


def test_audit_io_weight_per_device(cli, tmp_path):
    """io.weight "default 10" + "8:16 1000" on kubepods/besteffort: on sdb the BE class outranks
    its sibling kubepods/burstable at "default 100" (a device line overrides the default for
    that device, cgroup-v2.rst "IO Interface Files"; weights count among siblings)."""
    root = str(tmp_path / "node")
    built = _node(root)
    online, sbs = _paths(built)
    fx.write_block_devices(root, scheduler="bfq")
    for p in online + ["/kubepods/burstable"]:
        fx.write_v2_io(root, p, weight=100)
    for p in ["/kubepods/besteffort"] + [x for s in sbs for x in (s["pod"], s["sandbox"])]:
        fx.write_v2_io(root, p, weight=10, dev_weights={"8:16": 1000})
    with open(fx.v2_dir(root, "/kubepods/besteffort") + "/io.weight") as f:
        assert f.read() == "default 10\n8:16 1000\n"
    r, d = _audit(cli, root)
    found = [i for i in d["items"] if i["check"] == "io.offline-weight"]
    assert r.exit_code == 8 and len(found) == 1 and found[0]["target"] == "/kubepods/besteffort", d["items"]
    assert "on sdb (8:16) 1000 is not below its online sibling /kubepods/burstable's 100" in found[0]["message"]
    assert found[0]["evidence"][0]["value"] == "8:16 1000" and found[0]["evidence"][1]["value"] == "8:16 100"
    assert found[0]["fix"].startswith("echo '8:16 10' > io.weight")
    # the online class's own line on sdb raises its weight there: no finding
    fx.write_v2_io(root, "/kubepods/burstable", weight=100, dev_weights={"8:16": 5000})
    r, d = _audit(cli, root)
    assert "io.offline-weight" not in {i["check"] for i in d["items"]}, d["items"]


def _bfq_node(tmp_path, qos_enable=0):
    root = str(tmp_path / "node")
    built = _node(root)
    fx.write_block_devices(root, scheduler="bfq")
    fx.write_v2_root_io(root, qos_enable=qos_enable)
    return root, *_paths(built)


def test_audit_bfq_weight_per_device_v2(cli, tmp_path):
    """bfq disks, iocost off: io.bfq.weight is the weight in effect (bfq-iosched.rst: "For
    cgroup v2, the file name is io.bfq.weight"), "default 10" + "8:16 1000" as runc writes a
    device weight: on sdb the BE class outranks its sibling, the burstable class."""
    root, online, sbs = _bfq_node(tmp_path)
    for p in online + ["/kubepods/burstable"]:
        fx.write_v2_io(root, p, weight=100)
    for p in ["/kubepods/besteffort"] + [x for s in sbs for x in (s["pod"], s["sandbox"])]:
        fx.write_v2_io(root, p, weight=10, bfq_dev_weights={"8:16": 1000})
    with open(fx.v2_dir(root, "/kubepods/besteffort") + "/io.bfq.weight") as f:
        assert f.read() == "default 10\n8:16 1000\n"
    r, d = _audit(cli, root)
    found = [i for i in d["items"] if i["check"] == "io.offline-weight"]
    assert r.exit_code == 8 and len(found) == 1, d["items"]
    assert "BFQ I/O weight on sdb (8:16) 1000 is not below its online sibling /kubepods/burstable's 100" \
        in found[0]["message"]
    assert found[0]["evidence"][0]["file"].endswith("/io.bfq.weight")
    assert found[0]["fix"].startswith("echo '8:16 10' > io.bfq.weight")


def test_audit_bfq_weight_not_iocost_weight_on_bfq_disks(cli, tmp_path):
    """A healthy node: bfq on every disk, iocost compiled in but off, io.bfq.weight offline 10
    under online 100, io.weight untouched "default 100" everywhere: io.weight is not in effect,
    so no finding. The same io.weight with iocost on is one."""
    root, online, sbs = _bfq_node(tmp_path)
    for p in online + ["/kubepods/burstable"]:
        fx.write_v2_io(root, p, weight=100)
    for p in ["/kubepods/besteffort"] + [x for s in sbs for x in (s["pod"], s["sandbox"])]:
        fx.write_v2_io(root, p, weight=100, bfq_weight=10)
    r, d = _audit(cli, root)
    assert not [i for i in d["items"] if i["check"].startswith("io.")], d["items"]
    fx.write_v2_root_io(root, qos_enable=1)
    r, d = _audit(cli, root)
    found = [i for i in d["items"] if i["check"] == "io.offline-weight"]
    assert len(found) == 1 and "BFQ" not in found[0]["message"], d["items"]
    assert found[0]["evidence"][0]["file"].endswith("/io.weight")


def test_audit_bfq_weight_device_v1(cli, tmp_path):
    """cgroup v1 with BFQ (blkio.weight went with CFQ in 5.0): blkio.bfq.weight is one number
    (block/bfq-cgroup.c bfq_io_show_weight_legacy) and blkio.bfq.weight_device holds "default N"
    and the device lines (bfq_io_show_weight)."""
    import glob

    root = str(tmp_path / "node")
    fx.build_node(root, mode="v1", online_pods=2, sandboxes=1, resctrl=False)
    fx.write_block_devices(root, scheduler="bfq")
    b = os.path.join(root, "sys/fs/cgroup/blkio/kubepods")
    for d, w, dev in ([(d, 100, "") for d in glob.glob(b + "/burstable/pod*") + [b + "/burstable"]]
                      + [(d, 10, "8:16 1000\n") for d in glob.glob(b + "/besteffort/pod*") + [b + "/besteffort"]
                         + glob.glob(b + "/besteffort/pod*/kata_*")]):
        with open(d + "/blkio.bfq.weight", "w") as f:
            f.write(f"{w}\n")
        with open(d + "/blkio.bfq.weight_device", "w") as f:
            f.write(f"default {w}\n{dev}")
    r, d = _audit(cli, root)
    found = [i for i in d["items"] if i["check"] == "io.offline-weight"]
    assert r.exit_code == 8 and len(found) == 1 and found[0]["target"] == "/kubepods/besteffort", d["items"]
    assert "BFQ I/O weight on sdb (8:16) 1000 is not below its online sibling /kubepods/burstable's 100" \
        in found[0]["message"]
    assert found[0]["evidence"][0] == {"file": found[0]["evidence"][0]["file"], "value": "8:16 1000"}
    assert found[0]["evidence"][0]["file"].endswith("/blkio.bfq.weight_device")
    assert found[0]["fix"].startswith("echo '8:16 10' > blkio.bfq.weight_device")


def test_watch_interrupted_exits_130(katactl_bin, tmp_path):
    """--watch outside a terminal (-o jsonl, Ansible, timeout(1)): SIGTERM and Ctrl-C end it
    as an interruption, exit 130 with the JSON error, never 0. A real subprocess and signal."""
    import json
    import signal
    import subprocess
    import sys

    root = str(tmp_path / "node")
    built = _node(root)
    _signals(root, built, 0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", root, "inspect", "pressure", "--watch",
                              "--interval", "100ms", "-o", "jsonl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        first = p.stdout.readline()  # one refresh rendered: the watch loop is running
        assert json.loads(first)["kind"] == "PressureReport"
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130, (sig, err)
        assert json.loads(out.splitlines()[-1])["kind"] == "Error" and "interrupted" in err
    # a rule that held before the interruption is the gate's answer: exit 8 stays
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--host-root", root, "inspect", "pressure", "--watch",
                          "--interval", "100ms", "-o", "jsonl", "node", "--fail-on", "cpu.some.avg10>=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(p.stdout.readline())["failOn"]["violations"]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 8, err



def test_watch_rule_held_is_8_also_when_a_node_failed(cli, v2node):
    """--watch: a rule that held is exit 8 even when another node failed (4 only without a
    held rule), at the end of --iterations and when SIGTERM ends it."""
    import json
    import signal
    import subprocess
    import sys

    root, _ = v2node
    nodes = ["--host-root", root, "-N", "localhost,127.0.0.1:1", "--request-timeout", "5s"]
    args = ["inspect", "pressure", "--watch", "--interval", "100ms", "-o", "jsonl", "--fail-on", "cpu.some.avg10>=0"]
    r = cli([*nodes, *args, "--iterations", "1"])
    assert r.exit_code == 8, r.stderr
    assert "127.0.0.1:1" in r.stderr
    r = cli([*nodes, *args[:-2], "--iterations", "1"])  # no rule: the node's failure is the answer
    assert r.exit_code == 4, r.stderr
    p = subprocess.Popen([sys.executable, "-m", "katactl", *nodes, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = json.loads(p.stdout.readline())  # one refresh: the rule held on localhost, 127.0.0.1:1 failed
    assert first["nodes"]["localhost"]["failOn"]["violations"] and first["errors"], first
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 8, err


@pytest.mark.parametrize("sig,code", [("SIGINT", 0), ("SIGTERM", 130), ("SIGHUP", 130)])
def test_live_watch_on_a_terminal_quits_only_on_ctrl_c(v2node, sig, code):
    """On a live terminal Ctrl-C is the table's quit key (0); SIGTERM (timeout(1), kill) and
    SIGHUP (the terminal closed) are an interruption, 130, as in every command. A real pty."""
    import signal
    import sys

    from tests._pty import read_some, start_on_pty, wait_reading

    root, _ = v2node
    p, master = start_on_pty([sys.executable, "-m", "katactl", "--host-root", root, "inspect", "pressure",
                              "--watch", "--interval", "100ms"], COLUMNS="200", LINES="40")
    out = b""
    try:
        while out.count(b"katactl inspect pressure") < 2:  # the second refresh: the loop is running
            data = read_some(master, 0.2)
            assert data is not None, out
            out += data
        p.send_signal(getattr(signal, sig))
        rc, rest = wait_reading(p, master, 60)  # a frame drawn meanwhile must not fill the pty
        out += rest
    finally:
        p.kill()
        p.wait()
        os.close(master)
    assert rc == code, out.decode(errors="replace")[-500:]


# -- review 13 (interf) findings 5, 8, 9 -------------------------------------------------------

def _container(built, i):
    """The container cgroup fx.build_node puts under online pod i."""
    import uuid

    uid = built["online"][i]
    return f"/kubepods/burstable/pod{uid}/{uuid.uuid5(uuid.NAMESPACE_URL, uid).hex}"


def test_container_throttling_in_a_multi_container_pod(cli, v2node, moving):
    """kubelet sets a pod's quota to the sum of its containers' limits and each container its
    own: a sidecar pod's container can be throttled by its limit while the pod cgroup's own
    cpu.stat counts none (nr_throttled counts that cgroup's quota only). The pod row reads its
    containers' cpu.stat too: the worst is the pod's throttling, with its file as evidence."""
    root, built = v2node
    online, _ = _paths(built)
    ctr = _container(built, 1)

    def write(k):
        _signals(root, built, k)
        fx.write_v2_signals(root, ctr, k, throttled=8, periods=10, usage_usec=100_000)
    write(0)
    moving["between"] = lambda: write(1)
    r = _run(cli, root, "--fail-on", "cpu.throttled>60")
    assert r.exit_code == 8, r.stderr
    d = r.json()
    row = next(i for i in d["items"] if i["path"] == online[1])
    assert row["cpu"]["throttledPercent"] == 0.0  # the pod cgroup's own quota: never hit
    (c,) = row["cpu"]["containers"]
    assert c["path"] == ctr and c["throttledPercent"] == 80.0 and c["throttledMsPerSec"] == 400.0
    assert c["file"].endswith(ctr + "/cpu.stat")
    (v,) = d["failOn"]["violations"]
    assert (v["path"], v["metric"], v["value"]) == (online[1], "cpu.throttled", 80.0)
    assert v["file"].endswith(ctr + "/cpu.stat")
    w = d["summary"]["worstOnline"][0]
    assert w["path"] == online[1] and w["evidence"]["metric"] == "cpu.throttled"
    assert w["evidence"]["value"] == 80.0 and w["evidence"]["file"].endswith(ctr + "/cpu.stat")
    write(0)
    r = cli(["--host-root", root, "inspect", "pressure"])
    assert r.exit_code == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith(f"pod uid {built['online'][1]}"))
    assert "80.0" in line.split(), line  # THROTTLED%: the worst container's


def test_watch_new_target_is_unmeasured_until_its_second_sample(tmp_path, moving):
    """--watch: a pod that appears between refreshes has no first sample from the previous
    refresh. Its rates are null (``new``), never ~0 from two reads a moment apart, and it is
    left out of --fail-on for that refresh; the next refresh measures it over the interval."""
    from katactl.backends.local import LocalTransport

    root = str(tmp_path / "node")
    built = _node(root)
    _signals(root, built, 0)
    moving["between"] = lambda: _signals(root, built, 1)
    t = LocalTransport(host_root=root)
    s = pressure.Session(1.0)
    rules = pressure.parse_rules("cpu.some>=0")
    first = s.refresh(t, rules)
    assert first["meta"]["onlinePods"] == 2
    new = f"/kubepods/burstable/pod{fx.pod_uid(7, 'online')}"
    fx.write_cgroup(root, "v2", new, {"cpu.weight": 39})

    def write(k):
        _signals(root, built, k)
        fx.write_v2_signals(root, new, k, cpu_stall=300_000, usage_usec=1_000_000)
    moving["now"] += 1.0  # --watch waits --interval between refreshes
    write(2)
    second = s.refresh(t, rules)
    rows = {i["path"]: i for i in second["items"]}
    assert rows[new]["new"] is True and rows[new]["cpu"]["usageCores"] is None
    assert rows[new]["psi"]["cpu"]["some"]["stallPercent"] is None
    assert rows[_paths(built)[0][0]]["cpu"]["usageCores"] == 0.2 and "new" not in rows[_paths(built)[0][0]]
    fo = second["meta"]["failOn"]
    assert fo["unknown"] == [] and new not in {v["path"] for v in fo["violations"]}
    moving["now"] += 1.0
    write(3)
    third = s.refresh(t, rules)
    row = next(i for i in third["items"] if i["path"] == new)
    assert "new" not in row and row["cpu"]["usageCores"] == 1.0
    assert row["psi"]["cpu"]["some"]["stallPercent"] == 30.0


def test_fail_on_no_online_pod_is_unknown(cli, tmp_path, moving):
    """No online pod on the node (or none katactl classifies): a pod-only rule is skipped for
    the node and measured on no target; that is unknown (exit 8), never a pass."""
    root = str(tmp_path / "node")
    fx.build_node(root, mode="v2", online_pods=0, sandboxes=1, resctrl=False)
    fx.write_node_signals(root, 0)
    moving["between"] = lambda: fx.write_node_signals(root, 1)
    r = _run(cli, root, "--fail-on", "cpu.throttled>5,memory.max>0,cpu.some>90")
    assert r.exit_code == 8, r.stderr
    fo = r.json()["failOn"]
    assert fo["passed"] is False and fo["violations"] == []
    assert [(u["rule"], u["target"], u["reason"]) for u in fo["unknown"]] == [
        ("cpu.throttled>5", "node", "measured on no target (no online pod; the node has no CFS quota)"),
        ("memory.max>0", "node", "measured on no target (no online pod; the node has no memory limit)")]
    assert "--fail-on cpu.throttled>5 not measured for node" in r.stderr


def test_fail_on_named_target_gone_is_unknown(cli, tmp_path, moving):
    """A TARGET named that vanished mid-sample: nothing was measured, the gate does not pass."""
    root = str(tmp_path / "node")
    built = _node(root)
    online, _ = _paths(built)
    _signals(root, built, 0)

    def between():
        _signals(root, built, 1)
        shutil.rmtree(fx.v2_dir(root, online[1]))
    moving["between"] = between
    r = _run(cli, root, online[1], "--fail-on", "cpu.some>50")
    assert r.exit_code == 8, r.stderr
    d = r.json()
    assert d["items"][0]["gone"] is True
    assert [(u["rule"], u["reason"]) for u in d["failOn"]["unknown"]] == [
        ("cpu.some>50", "measured on no target (every target vanished mid-sample)")]
