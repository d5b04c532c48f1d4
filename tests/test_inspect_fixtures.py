"""inspect bvt|memcg|rdt|threads|cgroup on fixture node trees (Alinux knobs and resctrl
laid out as the reference describes; this kernel has neither)."""
from __future__ import annotations

import os

import pytest

from tests.fixtures_isolation import build_node, write_resctrl


@pytest.fixture(scope="module")
def node_v1(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("node-v1"))
    return root, build_node(root, online_pods=3, sandboxes=2)


@pytest.fixture(scope="module")
def node_v2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("node-v2"))
    return root, build_node(root, mode="v2", online_pods=2, sandboxes=1, hypervisor="clh", cdp=True)


@pytest.fixture(scope="module")
def node_plain(tmp_path_factory):
    """A stock kernel: no Alinux knobs, no resctrl."""
    root = str(tmp_path_factory.mktemp("node-plain"))
    return root, build_node(root, alinux=False, resctrl=False, online_pods=1, sandboxes=1)


def test_bvt_tree_with_qos_and_expected(cli, node_v1):
    root, info = node_v1
    r = cli(["--host-root", root, "inspect", "bvt", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "BvtReport" and d["supported"] is True
    assert d["switch"] == {"file": "/proc/sys/kernel/sched_group_identity_enabled", "value": 1, "enabled": True,
                           "note": None}
    by = {i["path"]: i for i in d["items"]}
    assert by["/kubepods"]["bvtWarpNs"] == 0 and by["/kubepods/besteffort"]["expected"] == -1
    sb = info["sandboxes"][0].sandbox_id
    kata = [i for i in d["items"] if i["level"] == "sandbox" and i["sandbox"] == sb][0]
    assert kata["class"] == "offline" and kata["bvtWarpNs"] == -1 and kata["ok"] is True and kata["podRef"] == "batch/batch-0"
    assert (kata["pod"]["namespace"], kata["pod"]["name"]) == ("batch", "batch-0") and "uid" in kata["pod"]
    online = [i for i in d["items"] if i["level"] == "pod" and i["qos"] == "burstable"]
    assert len(online) == 3 and all(i["bvtWarpNs"] == 2 and i["class"] == "online" for i in online)


def test_bvt_unsupported_is_not_an_error(cli, node_plain):
    root, _ = node_plain
    r = cli(["--host-root", root, "inspect", "bvt", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["supported"] is False and "cpu.bvt_warp_ns" in d["reason"] and d["items"] == []
    r = cli(["--host-root", root, "inspect", "bvt"])
    assert r.exit_code == 0 and "unsupported" in r.stderr


def test_memcg_priorities_and_watermarks(cli, node_v1):
    root, _ = node_v1
    r = cli(["--host-root", root, "inspect", "memcg", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["supported"] and "unsupported" not in d
    pods = [i for i in d["items"] if i["level"] == "pod"]
    on = [p for p in pods if p["class"] == "online"]
    off = [p for p in pods if p["class"] == "offline"]
    assert {p["priority"] for p in on} == {12} and {p["priority"] for p in off} == {0}
    assert {p["wmarkMinAdj"] for p in on} == {-25} and {p["wmarkMinAdj"] for p in off} == {50}
    assert all(p["wmarkRatio"] == 95 and p["usePriorityOom"] == 1 for p in pods)
    assert pods[0]["limit"] == "max" and pods[0]["wmarkHigh"] == 1 << 30


def test_memcg_on_stock_kernel_lists_missing_knobs(cli, node_plain):
    root, _ = node_plain
    r = cli(["--host-root", root, "inspect", "memcg", "-o", "json"])
    assert r.exit_code == 0
    d = r.json()
    assert "memory.priority" in d["unsupported"] and all(i["priority"] is None for i in d["items"])
    r = cli(["--host-root", root, "inspect", "memcg"])
    assert "PRIO" in r.stdout and "lacks the Alinux memcg QoS knobs" in r.stderr


def test_rdt_groups_decoded_with_sandboxes(cli, node_v1):
    root, info = node_v1
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["supported"] and d["info"]["L3"]["cbmMask"] == "0x7ff" and d["info"]["L3"]["ways"] == 11
    g = {x["name"]: x for x in d["items"]}
    assert set(g) == {"/", "LS", "BE", "BE/mon_groups/batch"}
    be = g["BE"]
    assert be["summary"]["L3"] == "0=0xf(4w 36.4%);2=0xf(4w 36.4%)"   # gap in cache ids: 0 and 2
    assert [x["id"] for x in be["schemata"][0]["domains"]] == [0, 2]
    assert be["tasks"] == 4 and be["mon"]["mon_L3_02"]["llc_occupancy"] == 1 << 20
    assert {s["id"] for s in be["sandboxes"]} == {s.sandbox_id for s in info["sandboxes"]}
    assert all(s["vcpus"] == 2 for s in be["sandboxes"])
    assert all(s["podRef"] == f"{s['pod']['namespace']}/{s['pod']['name']}" for s in be["sandboxes"])
    assert g["BE/mon_groups/batch"]["type"] == "mon" and g["BE/mon_groups/batch"]["parent"] == "BE"
    r = cli(["--host-root", root, "inspect", "rdt"])
    assert r.exit_code == 0 and "0=0xf(4w 36.4%)" in r.stdout and "11 ways" in r.stderr


def test_rdt_cdp_and_rates(cli, node_v2):
    root, _ = node_v2
    r = cli(["--host-root", root, "inspect", "rdt", "--interval", "50ms", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    g = {x["name"]: x for x in r.json()["items"]}
    res = [ln["resource"] for ln in g["BE"]["schemata"]]
    assert res == ["L3DATA", "L3CODE", "MB"] and all(ln["cdp"] for ln in g["BE"]["schemata"][:2])
    assert g["BE"]["mon"]["mon_L3_00"]["mbm_total_rate"] == 0   # counters did not move in a fixture


def test_rdt_unsupported_without_mount(cli, node_plain):
    root, _ = node_plain
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 0
    d = r.json()
    assert d["supported"] is False and "resctrl is not mounted" in d["reason"] and d["cpuFlags"]["cat_l3"] is True


def test_rdt_malformed_schemata_in_tree(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, sandboxes=1, online_pods=0)
    write_resctrl(root, {"/": {"schemata": "L3:0=7ff;2=7ff\n"}, "BE": {"schemata": "L3:0=zz;2=f\n"}})
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 1  # the report is printed, the bad file makes the run fail
    g = {x["name"]: x for x in r.json()["items"]}
    assert "not hexadecimal" in g["BE"]["errors"][0] and "/sys/fs/resctrl/BE/schemata" in g["BE"]["errors"][0]
    assert r.stderr.count("warning: /sys/fs/resctrl/BE/schemata: line 1") == 1
    r = cli(["--host-root", root, "inspect", "rdt"])
    assert r.exit_code == 1 and r.stderr.count("warning: /sys/fs/resctrl/BE/schemata: line 1") == 1
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("mb,unit,key,value,shown", [
    ("percent", "percent", "percent", 100, "0=100%;2=100%"),
    ("mbps", "MBps", "mbps", 4294967295, "0=4294967295MBps;2=4294967295MBps"),   # MBA_MAX_MBPS = U32_MAX
    ("amd", "GBps/8", "gbpsEighths", 2048, "0=256GB/s;2=256GB/s"),            # MAX_MBA_BW_AMD, 1/8 GB/s
])
def test_rdt_mb_values_per_mount_and_vendor(cli, tmp_path, mb, unit, key, value, shown):
    """The kernel's default MB line of each mode reads as a valid value in its unit."""
    root = str(tmp_path)
    build_node(root, sandboxes=1, online_pods=0, mb=mb)
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    be = next(g for g in d["items"] if g["name"] == "BE")
    (ln,) = [x for x in be["schemata"] if x["resource"] == "MB"]
    assert d["mbUnit"] == unit and ln["unit"] == unit and "errors" not in be
    assert [x[key] for x in ln["domains"]] == [value, value] and be["summary"]["MB"] == shown
    assert "_bad" not in be


def test_rdt_bad_line_keeps_the_groups_other_lines(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, sandboxes=1, online_pods=0)
    write_resctrl(root, {"/": {"schemata": "L3:0=7ff;2=7ff\n"}, "BE": {"schemata": "L3:0=00f;2=00f\nMB:0=ten\n"}})
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 1, r.stderr
    be = next(g for g in r.json()["items"] if g["name"] == "BE")
    assert [x["resource"] for x in be["schemata"]] == ["L3"] and be["summary"]["L3"].startswith("0=0xf(4w")
    assert len(be["errors"]) == 1 and "line 2 'MB:0=ten'" in be["errors"][0]


def test_rdt_and_audit_survive_a_5000_digit_schemata_and_cpuset(cli, tmp_path):
    """Past Python's 4300-digit int() limit a node file was a ValueError that ended the whole
    node's inspect rdt / audit (exit 1, "unexpected ValueError"): now it is that file's problem."""
    root = str(tmp_path)
    build_node(root, sandboxes=1, online_pods=1)
    write_resctrl(root, {"/": {"schemata": "L3:0=7ff\n"}, "BE": {"schemata": "L3:" + "9" * 5000 + "=7ff\n"}})
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 1, r.stderr   # as for any malformed schemata: the report, then fail
    g = {x["name"]: x for x in r.json()["items"]}
    assert "cache id" in g["BE"]["errors"][0] and "too large" in g["BE"]["errors"][0]
    assert "ValueError" not in r.stderr and "Traceback" not in r.stderr
    r = cli(["--host-root", root, "audit", "-o", "json"])
    assert r.exit_code in (0, 8) and r.json()["kind"] != "Error", r.stdout + r.stderr
    with open(os.path.join(root, "sys/fs/cgroup/cpuset/cpuset.effective_cpus"), "w") as f:
        f.write("9" * 5000 + "\n")
    r = cli(["--host-root", root, "audit", "-o", "json"])
    assert r.exit_code in (0, 8) and r.json()["kind"] != "Error", r.stdout + r.stderr


@pytest.mark.parametrize("args,code,needle", [
    (["--decode", "L3:" + "9" * 5000 + "=ff", "--cbm-mask", "7ff"], 2, "too large"),
    (["--decode", "MB:0=" + "9" * 5000, "--cbm-mask", "7ff"], 2, "not a number from 0 to 4294967295"),
    (["--decode", "L3:0=fg"], 2, "not hexadecimal"),
    (["--decode", "L3"], 2, "expected RESOURCE:ID=VALUE"),
    (["--decode", "L3:0=f", "--cbm-mask", "xyz"], 2, "--cbm-mask"),
    (["--decode", "L3:0=f", "--cbm-mask", "0"], 2, "--cbm-mask"),
    (["--decode", "L3:0=f", "--cbm-mask", "7_ff"], 2, "--cbm-mask"),
    (["--decode", "L3:0=f", "--cbm-mask", "abc"], 2, "not a run of ones"),
    (["--cbm-mask", "7ff"], 2, "only goes with --decode"),
    (["--interval", "soon"], 2, "--interval"),
    (["--interval", "5m"], 2, "at most 60s"),
])
def test_rdt_bad_input(cli, args, code, needle):
    r = cli(["inspect", "rdt", *args])
    assert r.exit_code == code and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and len(r.stderr) < 400


def _eisdir(root: str, node_path: str) -> None:
    """Reading the file fails (EISDIR), as a kernel's -EIO/-ENODEV on a resctrl file would."""
    p = os.path.join(root, node_path.lstrip("/"))
    os.remove(p)
    os.mkdir(p)


@pytest.mark.parametrize("path", ["BE/tasks", "BE/cpus_list", "BE/mode", "info/L3/cbm_mask",
                                  "BE/mon_data/mon_L3_00/llc_occupancy"])
def test_rdt_and_audit_survive_one_unreadable_resctrl_file(cli, tmp_path, path):
    """One resctrl file that cannot be read was an Error (exit 1) for the whole inspect rdt and
    audit (review 10): now it is that file's warning, and an unknown rdt.unreadable finding."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    f = f"/sys/fs/resctrl/{path}"
    _eisdir(root, f)
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 1 and r.json()["kind"] == "RdtReport", r.stdout + r.stderr
    assert r.stderr.count(f"warning: {f}: Is a directory") == 1, r.stderr
    assert len(r.json()["items"]) == 4
    r = cli(["--host-root", root, "audit", "--fail-on", "low", "-o", "json"])
    d = r.json()
    assert r.exit_code == 8 and d["kind"] == "AuditReport", r.stdout + r.stderr
    (un,) = [i for i in d["items"] if i["check"] == "rdt.unreadable"]
    assert un["status"] == "unknown" and f in un["message"] and un["evidence"][0]["file"] == f
    others = {i["check"]: i["status"] for i in d["items"] if i["check"] != "rdt.unreadable"}
    if path == "BE/tasks":  # which vCPU threads sit in BE is unknown: never a pass, nor a problem
        assert others == {"rdt.offline-threads": "unknown"}, d["items"]
    elif path == "info/L3/cbm_mask":
        assert others == {"rdt.be-l3": "unknown"}, d["items"]
    else:
        assert others == {}, d["items"]


def test_rdt_pseudo_locksetup_group(cli, tmp_path):
    """A group in mode pseudo-locksetup prints "L3:uninitialized" (rdtgroup_schemata_show,
    fs/resctrl/ctrlmondata.c): a valid state, not a malformed file (review 10)."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    d = os.path.join(root, "sys/fs/resctrl/PL")
    os.makedirs(d)
    for name, text in {"schemata": "L3:uninitialized\nMB:uninitialized\n", "mode": "pseudo-locksetup\n",
                       "tasks": "", "cpus_list": "\n", "size": "L3:0=0;2=0\nMB:0=0;2=0\n"}.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr
    pl = next(g for g in r.json()["items"] if g["name"] == "PL")
    assert pl["mode"] == "pseudo-locksetup" and "errors" not in pl
    assert pl["summary"] == {"L3": "uninitialized", "MB": "uninitialized"}
    assert [(x["resource"], x["uninitialized"], x["domains"]) for x in pl["schemata"]] == \
        [("L3", True, []), ("MB", True, [])]
    r = cli(["--host-root", root, "audit", "--fail-on", "low", "-o", "json"])
    assert r.exit_code == 0 and r.json()["items"] == [], r.stdout


@pytest.mark.parametrize("text,needle", [("-7ff", "not a hex mask"), ("abc", "not a run of ones"),
                                         ("7_ff", "not a hex mask")])
def test_rdt_bad_cbm_mask_on_the_node(cli, tmp_path, text, needle):
    """info/L3/cbm_mask went through int(x, 16): '-7ff' made inspect rdt a raw ValueError (exit 1,
    no report), 'abc' passed as 12 ways (review 10). Now: the report, a warning, exit 1."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    with open(os.path.join(root, "sys/fs/resctrl/info/L3/cbm_mask"), "w") as f:
        f.write(text + "\n")
    r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
    assert r.exit_code == 1 and r.json()["kind"] == "RdtReport", r.stdout + r.stderr
    info = r.json()["info"]["L3"]
    assert "cbmMask" not in info and info["cbmMaskRaw"] == text and needle in r.json()["errors"][0]
    assert r.stderr.count("warning: /sys/fs/resctrl/info/L3/cbm_mask: ") == 1, r.stderr
    r = cli(["--host-root", root, "audit", "-o", "json"])
    st = {i["check"]: i["status"] for i in r.json()["items"]}
    assert r.exit_code == 8 and st == {"rdt.be-l3": "unknown", "rdt.unreadable": "unknown"}, r.stdout


def test_rdt_sparse_masks_node(cli, tmp_path):
    """info/L3/sparse_masks = 1 (resctrl.rst): a non-contiguous mask is no problem there."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1)
    with open(os.path.join(root, "sys/fs/resctrl/LS/schemata"), "w") as f:
        f.write("L3:0=505;2=505\n")

    def problems():
        r = cli(["--host-root", root, "inspect", "rdt", "-o", "json"])
        ls = next(g for g in r.json()["items"] if g["name"] == "LS")
        return [d.get("problem") for d in ls["schemata"][0]["domains"]]

    assert all("non-contiguous" in p for p in problems())
    with open(os.path.join(root, "sys/fs/resctrl/info/L3/sparse_masks"), "w") as f:
        f.write("1\n")
    assert problems() == [None, None]


def test_bvt_and_memcg_warn_about_unreadable_knobs(cli, tmp_path):
    """An unreadable cpu.bvt_warp_ns or a garbage memory.priority was hidden: "-", exit 0 and
    "0 cgroups differ" (review 10). Now a warning each, exit 1, and the row counted unknown."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1)
    bvt = "/sys/fs/cgroup/cpu/kubepods/besteffort/cpu.bvt_warp_ns"
    _eisdir(root, bvt)
    prio = "/sys/fs/cgroup/memory/kubepods/besteffort/memory.priority"
    with open(os.path.join(root, prio.lstrip("/")), "w") as f:
        f.write("garbage\n")
    r = cli(["--host-root", root, "inspect", "bvt"])
    assert r.exit_code == 1 and r.stderr.count(f"warning: {bvt}: Is a directory") == 1, r.stderr
    assert "0 cgroups differ from koordinator's values, 1 unknown" in r.stderr
    r = cli(["--host-root", root, "inspect", "bvt", "-o", "json"])
    row = next(i for i in r.json()["items"] if i["path"] == "/kubepods/besteffort")
    assert r.exit_code == 1 and row["ok"] is None and row["unreadable"] == [{"file": bvt, "error": "Is a directory"}]
    r = cli(["--host-root", root, "inspect", "memcg", "-o", "json"])
    assert r.exit_code == 1 and r.stderr.count(f"warning: {prio}: unexpected content 'garbage'") == 1, r.stderr
    assert r.json()["kind"] == "MemcgReport"


def test_rdt_decode_offline(cli):
    r = cli(["inspect", "rdt", "--decode", "L3:0=7f0;1=505", "--cbm-mask", "0x7ff", "-o", "json"])
    assert r.exit_code == 0
    rows = r.json()["items"]
    assert rows[0]["ways"] == 7 and rows[0]["percent"] == 63.6 and "non-contiguous" in rows[1]["problem"]


def test_threads_per_hypervisor(cli, node_v1, node_v2):
    root, info = node_v1
    r = cli(["--host-root", root, "inspect", "threads", "batch/batch-1", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    sid = info["sandboxes"][1].sandbox_id
    vc = [t for t in d["items"] if t["role"] == "vcpu"]
    assert [t["tid"] for t in vc] == info["vcpu_tids"][sid] and [t["vcpu"] for t in vc] == [0, 1]
    assert all(t["resctrlGroup"] == "BE" and t["cgroups"]["cpu"].endswith(f"kata_{sid}") for t in vc)
    io = [t for t in d["items"] if t["name"] == "IO iothread1"][0]
    assert io["cgroups"]["cpu"] == f"/kata_overhead/{sid}" and io["resctrlGroup"] == "/"
    root2, info2 = node_v2
    r = cli(["--host-root", root2, "inspect", "threads", info2["sandboxes"][0].sandbox_id[:8], "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["sandbox"]["hypervisor"] == "clh" and d["vcpuThreads"] == 2


@pytest.mark.parametrize("args,code,needle", [
    ([], 2, "exactly one of SANDBOX or --pid"),
    (["x", "--pid", "1"], 2, "exactly one"),
    (["--pid", "0"], 2, "positive"),
    (["--pid", "-4"], 2, ""),
    (["--pid", "abc"], 2, ""),
    (["--pid", "999999999"], 3, "does not exist"),
    (["no-such-sandbox"], 3, ""),
    (["../etc"], 2, ""),
])
def test_threads_bad_input(cli, args, code, needle):
    r = cli(["inspect", "threads", *args])
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_inspect_cgroup_v2_fixture_weight_and_sandbox(cli, node_v2):
    root, info = node_v2
    sid = info["sandboxes"][0].sandbox_id
    r = cli(["--host-root", root, "inspect", "cgroup", sid, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["hierarchy"] == "v2"
    roles = {e["role"]: e for e in d["cgroups"]}
    assert set(roles) == {"pod", "sandbox", "overhead"}
    sb = roles["sandbox"]
    assert sb["cpu"]["weight"] == 1 and sb["cpu"]["sharesFromWeight"]["kubelet"] == 2
    assert sb["cpu"]["bvtWarpNs"] == -1 and sb["cpu"]["quotaUs"] == "max" and sb["cpu"]["periodUs"] == 100000
    assert sb["memory"]["priority"] == 0 and sb["memory"]["limit"] == "max"
    assert sb["layout"]["level"] == "sandbox" and sb["layout"]["qos"] == "besteffort"
    ov = roles["overhead"]
    assert ov["cpu"]["weight"] == 39 and ov["cpu"]["sharesFromWeight"] == {"kubelet": 1024, "runc": 1, "agree": False} \
        or ov["cpu"]["sharesFromWeight"]["kubelet"] <= 1024
    # a pod by uid
    uid = info["online"][0]
    r = cli(["--host-root", root, "inspect", "cgroup", f"pod/{uid}", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["cgroups"][0]["path"] == f"/kubepods/burstable/pod{uid}"


def test_inspect_cgroup_systemd_layout(cli, tmp_path):
    from tests.fixtures_isolation import write_cgroup, write_mountinfo

    root = str(tmp_path)
    write_mountinfo(root, "v2", resctrl=False)
    uid = "1b2c3d4e-0000-1111-2222-333344445555"
    pod = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    for p in ("/", "/kubepods.slice", "/kubepods.slice/kubepods-burstable.slice", pod):
        write_cgroup(root, "v2", p, {"cpu.weight": 100, "cpu.max": "200000 100000", "memory.limit": 1 << 30})
    write_cgroup(root, "v2", pod + "/cri-containerd-abc123.scope", {"cpu.weight": 79})
    r = cli(["--host-root", root, "inspect", "cgroup", uid, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    e = r.json()["cgroups"][0]
    assert e["path"] == pod and e["layout"] == {"driver": "systemd", "level": "pod", "qos": "burstable", "podUid": uid}
    assert e["cpu"]["limitCpus"] == 2.0 and e["cpu"]["sharesFromWeight"]["runc"] <= 1024
    r = cli(["--host-root", root, "inspect", "memcg", "-o", "json"])
    levels = [i["level"] for i in r.json()["items"]]
    assert levels == ["kubepods", "qos", "pod", "container"]


def test_unreadable_knob_is_reported_not_fatal(cli, tmp_path):
    root = str(tmp_path)
    info = build_node(root, online_pods=1, sandboxes=0, resctrl=False)
    uid = info["online"][0]
    p = os.path.join(root, f"sys/fs/cgroup/cpu/kubepods/burstable/pod{uid}/cpu.shares")
    os.remove(p)
    os.mkdir(p)  # reading it fails with EISDIR
    with open(os.path.join(root, f"sys/fs/cgroup/memory/kubepods/burstable/pod{uid}/memory.priority"), "w") as f:
        f.write("high\n")  # malformed content
    r = cli(["--host-root", root, "inspect", "cgroup", f"/kubepods/burstable/pod{uid}", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    e = r.json()["cgroups"][0]
    assert e["cpu"]["shares"] is None and e["memory"]["priority"] is None
    bad = {u["file"].rsplit("/", 1)[1]: u["error"] for u in e["unreadable"]}
    assert bad["cpu.shares"] == "Is a directory" and "unexpected content 'high'" in bad["memory.priority"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_permission_denied_knob_as_unprivileged_user(katactl_bin, tmp_path):
    """A real EACCES: the subprocess runs as nobody against a 0600 knob file."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("setpriv"):
        pytest.skip("setpriv missing")
    import pathlib
    import tempfile

    base = tempfile.mkdtemp(prefix="katactl-eacces-", dir="/tmp")  # pytest's tmp is 0700 to nobody
    request_cleanup = shutil.rmtree
    root = pathlib.Path(base) / "n"
    info = build_node(str(root), online_pods=1, sandboxes=0, resctrl=False)
    uid = info["online"][0]
    os.chmod(base, 0o755)
    for dp, _dns, fns in os.walk(root):
        os.chmod(dp, 0o755)
        for fn in fns:
            os.chmod(os.path.join(dp, fn), 0o644)
    knob = root / f"sys/fs/cgroup/cpu/kubepods/burstable/pod{uid}/cpu.shares"
    os.chmod(knob, 0o600)
    env = dict(os.environ, HOME="/tmp", XDG_STATE_HOME="/tmp", XDG_CONFIG_HOME="/nonexistent")
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "katactl", "--host-root", str(root), "inspect", "cgroup",
                        f"/kubepods/burstable/pod{uid}", "-o", "json"], capture_output=True, text=True,
                       env=env, cwd="/", timeout=60)
    request_cleanup(base, ignore_errors=True)
    if p.returncode != 0 and "No module named" in p.stderr:
        pytest.skip("the venv is not readable by nobody")
    assert p.returncode == 0, p.stderr
    import json

    e = json.loads(p.stdout)["cgroups"][0]
    assert {"file": f"/sys/fs/cgroup/cpu/kubepods/burstable/pod{uid}/cpu.shares",
            "error": "Permission denied"} in e["unreadable"]


def test_symlinked_v1_controller_path(cli, tmp_path):
    """v1 with cpu and cpuacct co-mounted at /sys/fs/cgroup/cpu,cpuacct and systemd's
    symlinks cpu -> cpu,cpuacct, cpuacct -> cpu,cpuacct (CentOS 7, Alinux 2, Ubuntu 18.04):
    the usual /sys/fs/cgroup/cpu/... path names the cgroup in that mount."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=0, resctrl=False)
    cg = os.path.join(root, "sys/fs/cgroup")
    os.rename(f"{cg}/cpu", f"{cg}/cpu,cpuacct")
    os.symlink("cpu,cpuacct", f"{cg}/cpu")
    os.symlink("cpu,cpuacct", f"{cg}/cpuacct")
    mi = os.path.join(root, "proc/self/mountinfo")
    text = open(mi).read().replace("/sys/fs/cgroup/cpu rw,", "/sys/fs/cgroup/cpu,cpuacct rw,").replace(
        "cgroup cgroup rw,cpu\n", "cgroup cgroup rw,cpu,cpuacct\n")
    assert "cpu,cpuacct rw," in text and "rw,cpu,cpuacct" in text
    with open(mi, "w") as f:
        f.write(text)
    for target in ("/sys/fs/cgroup/cpu/kubepods/burstable", "/sys/fs/cgroup/cpuacct/kubepods/burstable",
                   "/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable", "/kubepods/burstable"):
        r = cli(["--host-root", root, "inspect", "cgroup", target, "-o", "json"])
        assert r.exit_code == 0, (target, r.stderr)
        (e,) = r.json()["cgroups"]
        assert e["path"] == "/kubepods/burstable" and e["cpu"]["shares"] == 2048, target
    r = cli(["--host-root", root, "inspect", "cgroup", "/sys/fs/cgroup/cpu/nope"])
    assert r.exit_code == 3 and "no such cgroup" in r.stderr
