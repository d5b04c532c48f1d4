"""katactl audit on fixture node trees: findings, evidence, severities, exit codes, policy errors."""
from __future__ import annotations

import os

import pytest

from tests.fixtures_isolation import build_node

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "docs", "audit-policy.example.toml")


def _audit(cli, root, *args):
    r = cli(["--host-root", root, "audit", "-o", "json", *args])
    assert r.stdout, r.stderr
    return r, r.json()


@pytest.fixture(scope="module")
def clean_node(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clean"))
    build_node(root, online_pods=3, sandboxes=2, sandbox_cgroup_only=True)
    return root


def test_clean_node_passes(cli, clean_node):
    r, d = _audit(cli, clean_node, "--fail-on", "info")
    assert r.exit_code == 0, d["items"]
    assert d["kind"] == "AuditReport" and d["passed"] is True and d["items"] == []
    assert d["pods"] == 5 and d["sandboxes"] == 2 and d["hierarchy"] == "v1"
    assert d["policy"].startswith("built-in defaults")


def test_example_policy_is_the_defaults(cli, clean_node):
    from katactl.isolation import policy

    p = policy.load(EXAMPLE)
    assert p.cpu == policy.CpuPolicy() and p.bvt == policy.BvtPolicy() and p.memcg == policy.MemcgPolicy()
    assert p.rdt == policy.RdtPolicy() and p.kata == policy.KataPolicy() and not p.severity and not p.disable
    r, d = _audit(cli, clean_node, "--policy", EXAMPLE)
    assert r.exit_code == 0 and d["policy"] == EXAMPLE


def _checks(d):
    return {i["check"] for i in d["items"]}


@pytest.mark.parametrize("kw,check,severity,evidence_file", [
    ({"offline_bvt": 0}, "bvt.offline", "high", "cpu.bvt_warp_ns"),
    ({"sandbox_bvt": 0}, "bvt.offline", "high", "cpu.bvt_warp_ns"),
    ({"switch": 0}, "bvt.switch", "high", "/proc/sys/kernel/sched_group_identity_enabled"),
    ({"core_sched": 1}, "bvt.core-sched", "medium", "/proc/sys/kernel/sched_core"),
    ({"offline_shares": 1024}, "cpu.offline-weight", "high", "cpu.shares"),
    ({"online_shares": 256}, "cpu.online-weight", "medium", "cpu.shares"),
    ({"be_l3": "7f"}, "rdt.be-l3", "high", "/sys/fs/resctrl/BE/schemata"),
    ({"offline_priority": 12}, "memcg.priority-order", "medium", "memory.priority"),
    ({"sandbox_cgroup_only": False}, "kata.sandbox-cgroup-only", "medium", "persist.json"),
    ({"vcpu_outside": True}, "kata.vcpu-cgroup", "high", "/task/"),
    ({"vcpus_in_be": False}, "rdt.offline-threads", "medium", "/task/"),
])
def test_each_violation_is_found_with_evidence(cli, tmp_path, kw, check, severity, evidence_file):
    root = str(tmp_path)
    base = {"online_pods": 2, "sandboxes": 1, "sandbox_cgroup_only": True}
    base.update(kw)
    build_node(root, **base)
    r, d = _audit(cli, root, "--fail-on", "critical")
    assert r.exit_code == 0
    found = [i for i in d["items"] if i["check"] == check]
    assert found, d["items"]
    f = found[0]
    assert f["severity"] == severity and f["fix"] and f["message"]
    assert any(evidence_file in e["file"] for e in f["evidence"]), f["evidence"]
    assert all("value" in e for e in f["evidence"])
    r, _ = _audit(cli, root, "--fail-on", severity)
    assert r.exit_code == 8
    assert d["counts"][severity] >= 1


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_vcpu_outside_the_sandbox_cgroup_on_each_hierarchy(cli, tmp_path, mode):
    """On a cgroup2-only host /proc/<pid>/task/<tid>/cgroup is the one line "0::<path>"
    (cgroup-v2.rst "Processes"): the vCPU threads' place is read from it there."""
    root = str(tmp_path)
    info = build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, mode=mode, vcpu_outside=True,
                      alinux=mode == "v1", resctrl=False)
    (sid,) = info["vcpu_tids"]
    tid = info["vcpu_tids"][sid][0]
    with open(os.path.join(root, f"proc/{tid - 1}/task/{tid}/cgroup")) as f:
        text = f.read()
    assert text == (f"0::/kata_overhead/{sid}\n" if mode == "v2" else
                    f"1:cpu:/kata_overhead/{sid}\n3:memory:/kata_overhead/{sid}\n")
    r, d = _audit(cli, root, "--fail-on", "high")
    (f,) = [i for i in d["items"] if i["check"] == "kata.vcpu-cgroup"]
    assert r.exit_code == 8 and f["status"] == "problem", d["items"]
    assert f"/kata_overhead/{sid}" in str(f["evidence"])


def test_offline_vcpu_identity_note_and_fix_hint(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, sandbox_bvt=0)
    _, d = _audit(cli, root)
    f = [i for i in d["items"] if i["check"] == "bvt.offline"][0]
    assert "does not inherit" in f["message"] and f["fix"].startswith("echo -1 > /sys/fs/cgroup/cpu/kubepods/")


@pytest.mark.parametrize("kw", [{"sandbox_bvt": -2}, {"offline_bvt": -2}])
def test_bvt_minus_2_is_underclass_a_low_policy_mismatch(cli, tmp_path, kw):
    """-1 and -2 are both underclass (colocation-host.md): -2 where the policy says -1 is the
    right class, a low 'differs from the policy' finding, never 'is not underclass' (high)."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, **kw)
    r, d = _audit(cli, root)
    assert r.exit_code == 0, d["items"]
    fs = [i for i in d["items"] if i["check"].startswith("bvt.")]
    assert fs and all(i["severity"] == "low" for i in fs), fs
    assert all("not underclass" not in i["message"] for i in fs)
    assert all("-2 (underclass, as the policy's -1), not the policy's value" in i["message"] for i in fs), fs


def test_bvt_class_by_sign_online_1_is_high_class(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    pol = tmp_path / "p.toml"
    pol.write_text("[bvt]\nonline = 1\n")  # the fixture's online pods sit at 2: high class too
    r, d = _audit(cli, root, "--policy", str(pol))
    fs = [i for i in d["items"] if i["check"] == "bvt.online"]
    assert r.exit_code == 0 and fs and {i["severity"] for i in fs} == {"low"}, d["items"]
    assert "2 (high class, as the policy's 1)" in fs[0]["message"]


@pytest.mark.parametrize("offline_bvt", [-1, -2])
def test_core_sched_conflicts_with_any_underclass(cli, tmp_path, offline_bvt):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, offline_bvt=offline_bvt, core_sched=1)
    r, d = _audit(cli, root)
    f = [i for i in d["items"] if i["check"] == "bvt.core-sched"]
    assert f and f[0]["severity"] == "medium" and r.exit_code == 8, d["items"]
    assert "underclass" in f[0]["message"]


def test_unnamed_qemu_vcpus_are_unreadable_not_passed(cli, tmp_path):
    """Kata's QEMU without debug-threads=on (enable_debug off, the default) leaves its vCPU threads
    unnamed; no QMP monitor answers on the fixture and sandbox_cgroup_only = true: which threads
    are the vCPUs is unknown, and the misplaced ones may be among them: kata.unreadable, not a pass."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, named_vcpus=False, vcpu_outside=True)
    r, d = _audit(cli, root, "--fail-on", "low")
    un = [i for i in d["items"] if i["check"] == "kata.unreadable"]
    assert r.exit_code == 8 and len(un) == 1, d["items"]
    assert "vCPU threads not identified" in un[0]["message"] and "debug-threads" in un[0]["message"]
    # the I/O thread sits in the sandbox cgroup, the vCPUs outside; the vCPUs in BE, the I/O thread not
    assert "in the sandbox cgroup" in un[0]["message"] and "resctrl group 'BE'" in un[0]["message"]
    assert "extra_monitor_socket" in un[0]["fix"]
    assert not {"kata.vcpu-cgroup", "rdt.offline-threads"} & _checks(d)
    # no thread of the VMM in BE: its vCPUs are not, whichever they are
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, named_vcpus=False, vcpus_in_be=False)
    r, d = _audit(cli, root)
    f = [i for i in d["items"] if i["check"] == "rdt.offline-threads"]
    assert r.exit_code == 8 and f and "none of the VMM's 3 other threads" in f[0]["message"], d["items"]


def test_unnamed_qemu_vcpus_by_the_sandbox_cgroup(cli, tmp_path):
    """sandbox_cgroup_only = false: the runtime moves exactly the vCPU threads into the sandbox
    cgroup, so those are the vCPUs: their resctrl group is checked as named ones are."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, named_vcpus=False, vcpus_in_be=False)
    r, d = _audit(cli, root)
    f = [i for i in d["items"] if i["check"] == "rdt.offline-threads"]
    assert f and f[0]["message"].startswith("2 of 2 vCPU threads"), d["items"]
    assert "kata.unreadable" not in _checks(d) and "kata.vcpu-cgroup" not in _checks(d)
    # every thread outside the sandbox cgroup (none moved): the vCPUs are outside, whichever they are
    root2 = str(tmp_path / "n2")
    build_node(root2, online_pods=1, sandboxes=1, named_vcpus=False, vcpu_outside=True)
    r, d = _audit(cli, root2)
    f = [i for i in d["items"] if i["check"] == "kata.vcpu-cgroup"]
    assert r.exit_code == 8 and f and "none of the VMM's 3 other threads" in f[0]["message"], d["items"]


def test_qmp_thread_ids_mark_the_vcpus_only_when_they_are_the_vmms(tmp_path):
    """identify_vcpus with a QMP query-cpus-fast answer: its thread-ids become the vCPU rows (with
    their cpu-index); ids that are no thread of the VMM (another pid namespace) mark nothing."""
    from katactl import sandbox
    from katactl.backends.local import LocalTransport
    from katactl.isolation import threads

    info = build_node(str(tmp_path), online_pods=0, sandboxes=1, sandbox_cgroup_only=True, named_vcpus=False)
    t = LocalTransport(host_root=str(tmp_path))
    (sb,) = sandbox.discover(t, check=False)
    (vt,) = info["vcpu_tids"].values()
    rows = threads.list_threads(t, sb.hypervisor_pid, hypervisor="qemu")
    assert threads.identify_vcpus(t, sb, rows, qmp=({vt[1]: 1, vt[0]: 0}, "extra-monitor.sock")) == \
        {"by": "qmp", "note": None}
    assert [(r["tid"], r["vcpu"]) for r in rows if r["role"] == "vcpu"] == [(vt[0], 0), (vt[1], 1)]
    rows = threads.list_threads(t, sb.hypervisor_pid, hypervisor="qemu")
    got = threads.identify_vcpus(t, sb, rows, qmp=({4242: 0}, "extra-monitor.sock"))
    assert got["by"] is None and "are no threads of pid" in got["note"], got
    assert not [r for r in rows if r["role"] == "vcpu"]


def test_be_l3_fix_gives_koordinator_mask(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=0, sandboxes=1, sandbox_cgroup_only=True, be_l3="7f", cdp=True)
    _, d = _audit(cli, root)
    fs = [i for i in d["items"] if i["check"] == "rdt.be-l3"]
    assert {e["evidence"][0]["value"] for e in fs} == {"L3DATA:0=7f", "L3DATA:2=7f", "L3CODE:0=7f", "L3CODE:2=7f"}
    assert "L3DATA:0=f (0-30% of cbm_mask 7ff)" in fs[0]["fix"] or "=f (0-30%" in fs[0]["fix"]


def test_unsupported_features_are_info_not_errors(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, alinux=False, resctrl=False, sandbox_cgroup_only=True)
    r, d = _audit(cli, root)
    assert r.exit_code == 0
    sev = {i["check"]: i["severity"] for i in d["items"]}
    assert sev == {"bvt.unsupported": "info", "memcg.unsupported": "info", "rdt.unsupported": "info"}
    # a feature the kernel lacks is no problem found (docs/output.md: status)
    assert {i["status"] for i in d["items"]} == {"unsupported"} and d["unknown"] == 0
    r, _ = _audit(cli, root, "--fail-on", "info")
    assert r.exit_code == 8


def test_v2_node_weights_through_both_formulas(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, mode="v2", online_pods=2, sandboxes=1, sandbox_cgroup_only=True)
    r, d = _audit(cli, root, "--fail-on", "low")
    assert r.exit_code == 0, d["items"]
    root2 = str(tmp_path / "b")
    build_node(root2, mode="v2", online_pods=1, sandboxes=1, sandbox_cgroup_only=True, online_shares=256,
               offline_shares=4096)
    _, d = _audit(cli, root2)
    assert {"cpu.online-weight", "cpu.offline-weight"} <= _checks(d)


def test_severity_override_and_disable(cli, tmp_path):
    root = str(tmp_path / "n")
    build_node(root, online_pods=1, sandboxes=1)  # sandbox_cgroup_only=false -> medium finding
    pol = tmp_path / "p.toml"
    pol.write_text('[severity]\n"kata.sandbox-cgroup-only" = "critical"\n')
    r, d = _audit(cli, root, "--policy", pol, "--fail-on", "critical")
    assert r.exit_code == 8 and d["counts"]["critical"] == 1 and d["passed"] is False
    pol.write_text('disable = ["kata.sandbox-cgroup-only"]\n')
    r, d = _audit(cli, root, "--policy", pol)
    assert r.exit_code == 0 and "kata.sandbox-cgroup-only" not in _checks(d)


def test_table_output_and_list_checks(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1)
    r = cli(["--host-root", root, "audit", "-o", "wide"])
    assert r.exit_code == 8
    assert r.stdout.splitlines()[0].split()[:4] == ["SEVERITY", "CHECK", "TARGET", "MESSAGE"]
    assert "persist.json#Config.SandboxCgroupOnly=False" in r.stdout
    assert "audit FAILED (--fail-on medium)" in r.stderr
    r = cli(["audit", "--list-checks", "-o", "json"])
    assert r.exit_code == 0 and len(r.json()["items"]) >= 15


@pytest.mark.parametrize("content,needle", [
    ("[bvt]\nofline = -1\n", "unknown policy key 'bvt.ofline'"),
    ("[bvt]\noffline = \"-1\"\n", "'bvt.offline' must be an integer"),
    ("[rdt]\nbe_l3_max_percent = true\n", "'rdt.be_l3_max_percent' must be a number"),
    ("[cpu]\nonline_min_shares = 1\n", "between 2 and 262144"),
    ("[memcg]\ncheck_wmark = 1\n", "'memcg.check_wmark' must be true or false"),
    ("bvt = 2\n", "'bvt' must be a table"),
    ("[nope]\n", "'nope'"),
    ("[bvt\n", "invalid TOML"),
    ("\xff\xfe", "not UTF-8"),
    ("[severity]\n\"bvt.offline\" = \"urgent\"\n", "'severity.bvt.offline'"),
])
def test_bad_policy_files(cli, tmp_path, content, needle):
    p = tmp_path / "bad.toml"
    p.write_bytes(content.encode("latin-1"))
    r = cli(["audit", "--policy", p])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and str(p) in r.stderr and "Traceback" not in r.stderr
    r = cli(["audit", "--policy", p, "-o", "json"])
    assert r.exit_code == 2 and r.json()["kind"] == "Error" and r.json()["exitCode"] == 2


@pytest.mark.parametrize("args,needle", [
    (["--policy", "/nonexistent/p.toml"], "no such file"),
    (["--policy", "/"], "is a directory"),
    (["--fail-on", "severe"], "invalid --fail-on"),
    (["--fail-on", ""], "invalid --fail-on"),
])
def test_bad_audit_args(cli, args, needle):
    r = cli(["audit", *args])
    assert r.exit_code == 2 and needle in r.stderr


def test_no_cgroup_fs_is_not_found(cli, tmp_path):
    r = cli(["--host-root", tmp_path, "audit"])
    assert r.exit_code == 3 and "no cgroup filesystem" in r.stderr


# -- a check whose input cannot be read is "unknown", never a pass (review 7) ----------------

def _rdt_items(d):
    return [i for i in d["items"] if i["check"].startswith("rdt.") or i["check"] == "kata.unreadable"]


def test_mba_mbps_default_schemata_keeps_the_l3_check(cli, tmp_path):
    """resctrl mounted mba_MBps: every group's MB value is MBA_MAX_MBPS = U32_MAX (10 digits)
    until written; it is a valid value, and the BE group's whole-LLC mask is still found."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, mb="mbps", be_l3="7ff")
    with open(os.path.join(root, "sys/fs/resctrl/BE/schemata")) as f:
        assert "MB:0=4294967295;2=4294967295" in f.read()
    r, d = _audit(cli, root, "--fail-on", "high")
    assert r.exit_code == 8 and d["passed"] is False, d["items"]
    (l3, l3b) = [i for i in d["items"] if i["check"] == "rdt.be-l3"]
    assert l3["status"] == "problem" and "11 of 11 L3 ways" in l3["message"]
    assert "kata.unreadable" not in _checks(d)
    # the percent policy cannot be compared with MBps: said so only when the policy limits MB
    pol = tmp_path / "p.toml"
    pol.write_text("[rdt]\nbe_mb_max_percent = 50.0\n")
    _, d = _audit(cli, root, "--policy", str(pol))
    (mb,) = [i for i in d["items"] if i["check"] == "rdt.be-mb"]
    assert mb["status"] == "unknown" and "MBps" in mb["message"]


def test_amd_mb_is_eighths_of_gbps_not_percent(cli, tmp_path):
    """AMD: MB:0=2048 is the unthrottled default in 1/8 GB/s (resctrl.rst, AMD systems), not 2048 %."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, mb="amd")
    with open(os.path.join(root, "sys/fs/resctrl/BE/schemata")) as f:
        assert "MB:0=2048;2=2048" in f.read()
    r, d = _audit(cli, root, "--fail-on", "low")
    assert r.exit_code == 0 and d["items"] == [], d["items"]


def test_cpuinfo_missing_amd_told_by_info_mb(cli, tmp_path):
    """Without /proc/cpuinfo (a snapshot), info/MB tells AMD: delay_linear 0, min_bandwidth 0."""
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, mb="amd")
    os.remove(os.path.join(root, "proc/cpuinfo"))
    r, d = _audit(cli, root, "--fail-on", "low")
    assert r.exit_code == 0 and d["items"] == [], d["items"]


@pytest.mark.parametrize("bad_line,check,status", [
    ("MB:0=ten", "rdt.be-l3", "problem"),    # a bad MB line costs only MB: L3 still checked
    ("L3:0=zz;2=7ff", "rdt.be-l3", "unknown"),  # the L3 line itself: not checked, said so
])
def test_a_bad_schemata_line_loses_only_its_resource(cli, tmp_path, bad_line, check, status):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, be_l3="7ff")
    p = os.path.join(root, "sys/fs/resctrl/BE/schemata")
    good = [ln for ln in open(p).read().splitlines() if ln.split(":")[0].strip() != bad_line.split(":")[0]]
    with open(p, "w") as f:
        f.write("\n".join(good + [bad_line]) + "\n")
    r, d = _audit(cli, root, "--fail-on", "high")
    found = [i for i in d["items"] if i["check"] == check]
    assert r.exit_code == 8 and d["passed"] is False, d["items"]
    assert found and {i["status"] for i in found} == {status} and found[0]["severity"] == "high", found
    (un,) = [i for i in d["items"] if i["check"] == "rdt.unreadable"]
    assert un["status"] == "unknown" and bad_line.split(":")[0] in un["message"]


def test_be_l3_unknown_without_cbm_mask(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, be_l3="7ff")
    os.remove(os.path.join(root, "sys/fs/resctrl/info/L3/cbm_mask"))
    r, d = _audit(cli, root, "--fail-on", "high")
    (f,) = [i for i in d["items"] if i["check"] == "rdt.be-l3"]
    assert r.exit_code == 8 and f["status"] == "unknown" and "full mask is unknown" in f["message"], d["items"]


def _unreadable(path: str, how: str) -> None:
    os.remove(path)
    if how == "eisdir":
        os.mkdir(path)  # reading fails with EISDIR: read_value's OSError path, as EACCES/EIO
    else:
        with open(path, "w") as f:
            f.write("garbage\n")


@pytest.mark.parametrize("how", ["eisdir", "garbage"])
def test_unreadable_bvt_of_a_sandbox_is_unknown_not_passed(cli, tmp_path, how):
    """The sandbox cgroups' cpu.bvt_warp_ns = 2 gives high bvt.offline; unreadable, the same
    check must not pass: bvt.offline, status unknown, at its severity, exit 8."""
    import glob

    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=2, sandbox_cgroup_only=True)
    files = glob.glob(os.path.join(root, "sys/fs/cgroup/cpu/kubepods/besteffort/pod*/*/cpu.bvt_warp_ns"))
    assert len(files) == 2
    for p in files:
        _unreadable(p, how)
    r, d = _audit(cli, root, "--fail-on", "high")
    found = [i for i in d["items"] if i["check"] == "bvt.offline"]
    assert r.exit_code == 8 and d["passed"] is False and d["unknown"] == 2, d["items"]
    assert len(found) == 2 and all(i["status"] == "unknown" and i["severity"] == "high" for i in found)
    assert found[0]["evidence"][0]["file"].endswith("/cpu.bvt_warp_ns")
    assert ("Is a directory" if how == "eisdir" else "unexpected content 'garbage'") in found[0]["message"]


def test_unreadable_memcg_priority_is_unknown(cli, tmp_path):
    root = str(tmp_path)
    info = build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    _unreadable(os.path.join(root, f"sys/fs/cgroup/memory/kubepods/burstable/pod{info['online'][0]}/memory.priority"),
                "eisdir")
    r, d = _audit(cli, root)
    (f,) = [i for i in d["items"] if i["check"] == "memcg.priority-order"]
    assert r.exit_code == 8 and f["status"] == "unknown" and f["severity"] == "medium", d["items"]


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_unreadable_weight_of_a_pinned_online_pod_is_not_needed(cli, tmp_path, mode):
    """A pinned online pod (cpuset.cpus 1 of the node's 0-3) passes cpu.online-weight whatever
    its weight: an unreadable cpu.shares / cpu.weight there is no "unknown". Not pinned, it is."""
    root = str(tmp_path)
    info = build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, mode=mode, online_shares=100)
    uid = info["online"][0]
    v1 = mode == "v1"
    cpuset = f"sys/fs/cgroup/{'cpuset/' if v1 else ''}kubepods/burstable/pod{uid}"
    knob = f"sys/fs/cgroup/{'cpu/' if v1 else ''}kubepods/burstable/pod{uid}/{'cpu.shares' if v1 else 'cpu.weight'}"
    for name in ("cpuset.cpus", "cpuset.effective_cpus" if v1 else "cpuset.cpus.effective"):
        with open(os.path.join(root, cpuset, name), "w") as f:
            f.write("1\n")
    r, d = _audit(cli, root, "--fail-on", "medium")
    assert r.exit_code == 0 and "cpu.online-weight" not in _checks(d), d["items"]
    _unreadable(os.path.join(root, knob), "eisdir")
    r, d = _audit(cli, root, "--fail-on", "medium")
    assert r.exit_code == 0 and d["unknown"] == 0, d["items"]
    for name in ("cpuset.cpus", "cpuset.effective_cpus" if v1 else "cpuset.cpus.effective"):
        with open(os.path.join(root, cpuset, name), "w") as f:
            f.write("0-3\n")
    r, d = _audit(cli, root, "--fail-on", "medium")
    (f,) = [i for i in d["items"] if i["check"] == "cpu.online-weight"]
    assert r.exit_code == 8 and f["status"] == "unknown" and "Is a directory" in f["message"], d["items"]


def test_unreadable_bvt_switch_is_unknown_not_off(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    _unreadable(os.path.join(root, "proc/sys/kernel/sched_group_identity_enabled"), "eisdir")
    r, d = _audit(cli, root, "--fail-on", "high")
    (f,) = [i for i in d["items"] if i["check"] == "bvt.switch"]
    assert r.exit_code == 8 and f["status"] == "unknown" and "switched off" not in f["message"], d["items"]
    assert f["evidence"][0]["value"] is None
    r = cli(["--host-root", root, "inspect", "bvt", "-o", "json"])
    assert r.exit_code == 0 and r.json()["switch"]["enabled"] is None
    r = cli(["--host-root", root, "inspect", "bvt"])
    assert "group identity UNKNOWN" in r.stderr and "DISABLED" not in r.stderr


def test_a_vcpu_thread_that_exited_mid_walk_is_skipped(cli, tmp_path):
    """task/<tid>/comm read, then task/<tid>/cgroup gone (the thread exited): skipped, never
    "outside the sandbox cgroup"; a cgroup file that cannot be read is unknown."""
    root = str(tmp_path)
    info = build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    (sid,) = info["vcpu_tids"]
    tid = info["vcpu_tids"][sid][0]
    pid = tid - 1
    cg = os.path.join(root, f"proc/{pid}/task/{tid}/cgroup")
    os.remove(cg)
    r, d = _audit(cli, root, "--fail-on", "low")
    assert r.exit_code == 0 and d["items"] == [], d["items"]
    os.mkdir(cg)
    r, d = _audit(cli, root, "--fail-on", "high")
    (f,) = [i for i in d["items"] if i["check"] == "kata.vcpu-cgroup"]
    assert r.exit_code == 8 and f["status"] == "unknown" and "1 of 2 vCPU threads" in f["message"], d["items"]


def test_problem_findings_say_so(cli, tmp_path):
    root = str(tmp_path)
    build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True, switch=0)
    r, d = _audit(cli, root)
    (f,) = [i for i in d["items"] if i["check"] == "bvt.switch"]
    assert f["status"] == "problem" and d["unknown"] == 0 and "not checked" not in r.stderr


def test_vcpu_cgroups_seen_from_another_cgroup_namespace_are_unknown(cli, tmp_path):
    """Read from a private cgroup namespace, task/<tid>/cgroup holds "1:cpu:/../..": not the
    host path, so not "outside the sandbox cgroup" either: kata.vcpu-cgroup is unknown."""
    root = str(tmp_path)
    info = build_node(root, online_pods=1, sandboxes=1, sandbox_cgroup_only=True)
    (sid,) = info["vcpu_tids"]
    for tid in info["vcpu_tids"][sid]:
        with open(os.path.join(root, f"proc/{tid - 1 - info['vcpu_tids'][sid].index(tid)}/task/{tid}/cgroup"),
                  "w") as f:
            f.write("1:cpu:/../..\n2:cpuset:/../..\n3:memory:/../..\n")
    r, d = _audit(cli, root, "--fail-on", "high")
    (f,) = [i for i in d["items"] if i["check"] == "kata.vcpu-cgroup"]
    assert r.exit_code == 8 and f["status"] == "unknown" and "cgroup namespace" in f["message"], d["items"]


def test_a_node_that_could_not_be_audited_is_no_pass(cli):
    """Every node failed (connection refused): the report said passed: true beside exit 7."""
    r = cli(["-o", "json", "-N", "127.0.0.1:1", "audit"])
    assert r.exit_code == 7, r.stderr
    d = r.json()
    assert d["kind"] == "AuditReport" and d["passed"] is False and d["items"] == []
    assert [e["node"] for e in d["errors"]] == ["127.0.0.1:1"]
