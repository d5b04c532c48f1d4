"""Pure parsers and formulas of katactl.isolation."""
from __future__ import annotations

import pytest

from katactl.errors import UsageError
from katactl.isolation import cgroups as cg
from katactl.isolation import policy, resctrl, weights


@pytest.mark.parametrize("shares,kubelet,runc", [
    (2, 1, 1), (1024, 39, 100), (102, 4, 17), (2048, 79, 174), (262144, 10000, 10000), (512, 20, 59),
])
def test_shares_to_weight_both_formulas(shares, kubelet, runc):
    assert weights.weight_kubelet(shares) == kubelet
    assert weights.weight_runc(shares) == runc
    assert weights.weight_view(shares)["agree"] is (kubelet == runc)


def test_weight_inverse_roundtrips():
    for s in (2, 3, 100, 1024, 5000, 262144):
        assert weights.weight_kubelet(weights.shares_kubelet(weights.weight_kubelet(s))) == weights.weight_kubelet(s)
        assert weights.weight_runc(weights.shares_runc(weights.weight_runc(s))) == weights.weight_runc(s)
    # v2 weight 100 is 1024 shares under runc's formula, ~2622 under kubelet's
    assert weights.shares_view(100)["runc"] <= 1024 <= weights.shares_view(100)["kubelet"]
    assert weights.weight_at_most(1, 2) and not weights.weight_at_most(39, 2)
    assert weights.weight_at_least(39, 1024) and weights.weight_at_least(100, 1024)


def test_koordinator_mask_from_percent():
    assert resctrl.mask_from_percent(0x7ff, 0, 30) == 0xf      # the reference's example
    assert resctrl.mask_from_percent(0x7ff, 0, 100) == 0x7ff
    assert resctrl.mask_from_percent(0xfffff, 0, 30) == 0x3f


def test_schemata_parse_and_decode_cdp_and_gaps():
    text = "    L3DATA:0=7f0;2=00f\n    L3CODE:0=7ff;2=7ff\n      MB:0=100;2= 50\n"
    lines = resctrl.parse_schemata(text)
    assert [line["resource"] for line in lines] == ["L3DATA", "L3CODE", "MB"]
    assert sorted(lines[0]["domains"]) == [0, 2]            # gap in cache ids kept
    dec = resctrl.decode_schemata(lines, {"L3": {"cbmMask": 0x7ff, "minCbmBits": 1}})
    d0 = dec[0]["domains"][0]
    assert d0 == {"id": 0, "mask": "0x7f0", "ways": 7, "bits": "4-10", "contiguous": True, "totalWays": 11,
                  "percent": 63.6, "startPercent": 36.4, "endPercent": 100.0}
    assert dec[0]["cdp"] and dec[0]["domains"][1]["ways"] == 4
    assert dec[2]["domains"] == [{"id": 0, "percent": 100}, {"id": 2, "percent": 50}]
    assert resctrl.summarize(dec)["L3DATA"] == "0=0x7f0(7w 63.6%);2=0xf(4w 36.4%)"
    assert resctrl.max_cache_percent(dec) == (100.0, "L3CODE:0=7ff")


def test_decode_flags_bad_masks():
    assert "non-contiguous" in resctrl.decode_mask(0x505, 0x7ff)["problem"]
    assert "outside cbm_mask" in resctrl.decode_mask(0xfff, 0x7ff)["problem"]
    assert "min_cbm_bits" in resctrl.decode_mask(0x1, 0x7ff, min_cbm_bits=2)["problem"]
    assert resctrl.decode_mask(0, 0x7ff)["problem"] == "empty mask"


def test_sparse_masks_allow_a_non_contiguous_mask():
    """info/<res>/sparse_masks = 1: the CPU takes non-contiguous CBMs (resctrl.rst "sparse_masks")."""
    assert "problem" not in resctrl.decode_mask(0x505, 0x7ff, sparse=True)
    dec = resctrl.decode_schemata(resctrl.parse_schemata("L3:0=505"), {"L3": {"cbmMask": 0x7ff, "sparseMasks": 1}})
    assert "problem" not in dec[0]["domains"][0] and dec[0]["domains"][0]["contiguous"] is False


def test_pseudo_locksetup_schemata_is_uninitialized_not_malformed():
    """A group in mode pseudo-locksetup shows "<res>:uninitialized" per resource (rdtgroup_schemata_show)."""
    lines, bad = resctrl.parse_schemata_lines("L3:uninitialized\nMB:uninitialized\n")
    assert bad == [] and [ln["uninitialized"] for ln in lines] == [True, True]
    dec = resctrl.decode_schemata(lines, {"L3": {"cbmMask": 0x7ff}})
    assert [d["domains"] for d in dec] == [[], []] and all(d["uninitialized"] for d in dec)
    assert resctrl.summarize(dec) == {"L3": "uninitialized", "MB": "uninitialized"}
    assert resctrl.max_cache_percent(dec) == (None, None)


@pytest.mark.parametrize("bad", [
    "L3", "L3:", "L3:0", "L3:0=", "L3:=ff", "L3:x=ff", "L3:0=fg", "L3:0=ff;0=f", "MB:0=ten",
    "L3:0=ff;;1=ff", ":0=ff", "L3 0=ff", "L3:0=ff,1=ff", "L3:-1=ff",
    # past Python's 4300-digit int() limit (ValueError, not ours), too large, not ASCII
    "L3:" + "9" * 5000 + "=7ff", "L3:1234567890=7ff", "MB:0=" + "9" * 5000, "MB:0=4294967296",
    "L3:\u0661=ff", "MB:0=\u00b2", "MB:0=\u0661",
])
def test_malformed_schemata_lines(bad):
    with pytest.raises(resctrl.SchemataError) as e:
        resctrl.parse_schemata("L3:0=7ff\n" + bad)
    assert "line 2" in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize("value,shown", [("9" * 5000, "9" * 5000), ("42", 42)])
def test_unknown_resource_keeps_text_unless_small_number(value, shown):
    (ln,) = resctrl.decode_schemata(resctrl.parse_schemata(f"XY:0={value}"), {})
    assert ln["domains"] == [{"id": 0, "percent": shown}]


@pytest.mark.parametrize("path,level,qos,uid,driver", [
    ("/kubepods", "kubepods", None, None, "cgroupfs"),
    ("/kubepods/burstable", "qos", "burstable", None, "cgroupfs"),
    ("/kubepods/pod1234", "pod", "guaranteed", "1234", "cgroupfs"),
    ("/kubepods/besteffort/podab-cd/kata_xyz", "sandbox", "besteffort", "ab-cd", "cgroupfs"),
    ("/kubepods/burstable/podab/0123abcd", "container", "burstable", "ab", "cgroupfs"),
    ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poda_b_c.slice", "pod", "besteffort", "a-b-c", "systemd"),
    ("/kubepods.slice/kubepods-poda_b.slice/cri-containerd-abc1.scope", "container", "guaranteed", "a-b", "systemd"),
    ("/kubepods.slice/kubepods-burstable.slice", "qos", "burstable", None, "systemd"),
    ("/kata_overhead/abc", "overhead", None, None, None),
    ("/system.slice/ssh.service", "other", None, None, None),
])
def test_classify_kubelet_layouts(path, level, qos, uid, driver):
    c = cg.classify(path)
    assert (c["level"], c["qos"], c["podUid"], c["driver"]) == (level, qos, uid, driver)


def test_expand_systemd_and_pod_path():
    assert cg.expand_systemd("kubepods-burstable-pod1_2.slice:cri-containerd:ab") == \
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice/cri-containerd-ab.scope"
    assert cg.expand_systemd("/kubepods/besteffort/podx/kata_y") == "/kubepods/besteffort/podx/kata_y"
    assert cg.pod_cgroup_path("/kubepods/besteffort/podx/kata_y") == "/kubepods/besteffort/podx"
    assert cg.pod_cgroup_path("/kata_overhead/y") is None


def test_mountinfo_parsing_escapes_and_namespaces():
    text = ("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:2 - cgroup cgroup rw,cpu,cpuacct\n"
            "41 31 0:38 /kubepods/pod1 /sys/fs/cgroup/my\\040dir rw - cgroup2 cgroup2 rw\n"
            "50 24 0:40 / /sys/fs/resctrl rw - resctrl resctrl rw,cdp,mba_MBps\n")
    ms = cg.parse_mountinfo(text)
    assert [m.fstype for m in ms] == ["cgroup", "cgroup2", "resctrl"]
    assert ms[0].controllers == {"cpu", "cpuacct"}
    assert ms[1].mountpoint == "/sys/fs/cgroup/my dir" and ms[1].root == "/kubepods/pod1"
    assert "mba_MBps" in ms[2].options
    from katactl.backends.local import LocalTransport

    fs = cg.CgroupFS(LocalTransport("/nonexistent-root"), ms)
    assert fs.mode == "hybrid" and fs.dir("cpu", "/a") == "/sys/fs/cgroup/cpu,cpuacct/a"
    assert fs._join(ms[1], "/kubepods/pod1/c") == "/sys/fs/cgroup/my dir/c"


def test_policy_defaults_follow_koordinator():
    p = policy.Policy()
    assert (p.bvt.online, p.bvt.offline, p.bvt.kubepods) == (2, -1, 0)
    assert p.rdt.be_l3_max_percent == 30 and p.rdt.be_mb_max_percent == 100
    assert (p.memcg.wmark_ratio, p.memcg.wmark_min_adj_online, p.memcg.wmark_min_adj_offline) == (95, -25, 50)


@pytest.mark.parametrize("data,needle", [
    ({"bvt": {"offlin": -1}}, "'bvt.offlin'"),
    ({"bvt": {"offline": "x"}}, "'bvt.offline' must be an integer"),
    ({"bvt": {"offline": True}}, "'bvt.offline' must be an integer"),
    ({"bvt": {"offline": -3}}, "'bvt.offline' must be between -2 and 2"),
    ({"bvt": 1}, "'bvt' must be a table"),
    ({"rdt": {"be_l3_max_percent": "30%"}}, "'rdt.be_l3_max_percent' must be a number"),
    ({"rdt": {"be_l3_max_percent": 130}}, "between 0 and 100"),
    ({"rdt": {"be_group": ""}}, "'rdt.be_group' must not be empty"),
    ({"kata": {"require_sandbox_cgroup_only": "yes"}}, "must be true or false"),
    ({"cpuu": {}}, "'cpuu'"),
    ({"severity": {"bvt.offline": "huge"}}, "'severity.bvt.offline'"),
    ({"severity": {"nope": "low"}}, "'severity.nope'"),
    ({"severity": "high"}, "'severity' must be a table"),
    ({"disable": "memcg.wmark"}, "'disable' must be a list"),
    ({"disable": ["memcg.wmarks"]}, "'memcg.wmarks'"),
])
def test_policy_corpus(data, needle):
    with pytest.raises(UsageError) as e:
        policy.from_dict(data, "p.toml")
    assert needle in e.value.message and e.value.message.startswith("p.toml")


def _node_audit(*severities: str, pods: int = 1) -> dict:
    items = [{"check": f"c{i}", "severity": s, "status": "problem", "target": "t", "message": "m", "evidence": [],
              "fix": "f"}
             for i, s in enumerate(severities)]
    return {"policy": "defaults", "hierarchy": "v2", "pods": pods, "sandboxes": 0,
            "counts": {s: severities.count(s) for s in policy.SEVERITIES}, "items": items}


def test_audit_merge_one_node_and_many():
    from katactl.isolation import audit

    pol = policy.Policy()
    items, meta, failed = audit.merge({"n1": _node_audit("low", "info")}, "medium", pol, multi=False)
    assert not failed and meta["passed"] is True and "nodes" not in meta
    assert meta["hierarchy"] == "v2" and meta["pods"] == 1 and meta["failOn"] == "medium"
    assert [i.get("node") for i in items] == [None, None]
    items, meta, failed = audit.merge({"n1": _node_audit("low"), "n2": _node_audit("high", pods=3)}, "high", pol)
    assert failed and meta["passed"] is False
    assert [i["node"] for i in items] == ["n1", "n2"]
    assert meta["counts"] == {"info": 0, "low": 1, "medium": 0, "high": 1, "critical": 0}
    assert meta["nodes"]["n2"] == {"hierarchy": "v2", "pods": 3, "sandboxes": 0,
                                   "counts": {"info": 0, "low": 0, "medium": 0, "high": 1, "critical": 0}}
    assert audit.merge({"n1": _node_audit("high")}, "critical", pol, multi=False)[2] is False
    assert audit.merge({}, "info", pol)[:2] == ([], {"policy": pol.source, "failOn": "info", "passed": True,
                                                     "counts": dict.fromkeys(policy.SEVERITIES, 0), "unknown": 0,
                                                     "nodes": {}})


@pytest.mark.parametrize("text,mask", [("7ff", 0x7ff), ("0x7FF", 0x7ff), ("FFFFF", 0xfffff)])
def test_cbm_mask_parsing(text, mask):
    assert resctrl.parse_cbm_mask(text) == mask


@pytest.mark.parametrize("text", ["", "0", "0x", "xyz", "-1", "0x0", "7f f",
                                  # int(x, 16) took these (review 10): a sign, "_", not a run of ones, over 64 bits
                                  "7_ff", "+7ff", "abc", "7fe", "0x505", "f" * 17])
def test_cbm_mask_corpus(text):
    with pytest.raises(UsageError, match="--cbm-mask"):
        resctrl.parse_cbm_mask(text)


def test_decode_lines_one_row_per_domain():
    rows = resctrl.decode_lines(["L3:0=7f0;1=505", "MB:0=50"], "7ff")
    assert [(r["resource"], r["id"]) for r in rows] == [("L3", 0), ("L3", 1), ("MB", 0)]
    assert rows[0]["ways"] == 7 and "non-contiguous" in rows[1]["problem"]
    assert resctrl.decode_lines(["L3:0=7f0"], 0x7ff) == rows[:1]
    with pytest.raises(UsageError, match="--cbm-mask"):
        resctrl.decode_lines(["L3:0=f"], "zz")


@pytest.mark.parametrize("value,secs", [("0", 0.0), ("50ms", 0.05), ("1m", 60.0), (2, 2.0)])
def test_rdt_interval(value, secs):
    from katactl.isolation import report

    assert report.rdt_interval(value) == secs


@pytest.mark.parametrize("value,needle", [("61s", "at most 60s"), ("5m", "at most 60s"), (61.0, "at most 60s"),
                                          ("soon", "--interval"), (-1, "negative")])
def test_rdt_interval_corpus(value, needle):
    from katactl.isolation import report

    with pytest.raises(UsageError, match=needle):
        report.rdt_interval(value)


@pytest.mark.parametrize("lines", [[""], ["  "], ["", ""]])
def test_rdt_decode_empty_is_a_usage_error(cli, lines):
    """issue 16 #19: 'inspect rdt --decode ""' exited 0 with nothing."""
    r = cli(["inspect", "rdt", *[a for ln in lines for a in ("--decode", ln)], "--cbm-mask", "7ff"])
    assert r.exit_code == 2 and "empty --decode" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_vcpu_identification_never_connects_to_the_runtimes_qmp_sock(tmp_path):
    """qmp.sock is the runtime's for the sandbox's life and QEMU accepts nobody else
    meanwhile: a connection would stay queued (filling its one-deep backlog) however soon
    katactl closed it. Read-only commands ask only the extra monitor."""
    import select
    import socket
    import types

    from katactl.backends.local import LocalTransport
    from katactl.isolation import threads

    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.bind(str(tmp_path / "qmp.sock"))
    held.listen(1)  # like QEMU's monitor: never accepts while its client holds it
    try:
        sb = types.SimpleNamespace(id="x", extra_monitor_socket=None, api_socket="/qmp.sock")
        got, why = threads.qmp_vcpus(LocalTransport(str(tmp_path)), sb)
        assert got is None and "extra_monitor_socket" in why
        assert select.select([held], [], [], 0)[0] == []  # nobody queued on qmp.sock
    finally:
        held.close()
