"""Fixture node trees for the isolation tests and bench (no resctrl, no Alinux kernel here).

Laid out exactly as ../shared/reference/colocation-host.md describes: v1
controllers under /sys/fs/cgroup/<controller> (or v2 at /sys/fs/cgroup, or
hybrid with /sys/fs/cgroup/unified), kubelet cgroupfs/systemd layouts, the
Alinux knobs (cpu.bvt_warp_ns, memory.priority, memory.wmark_*), the
sched_group_identity switch, resctrl with info/, schemata (CDP, gaps in cache
ids) and mon_data, and /proc/<pid>/task/<tid> entries for hypervisor threads.
Read with ``--host-root ROOT``.
"""
from __future__ import annotations

import os
import uuid

V1_CONTROLLERS = ("cpu", "cpuset", "memory", "blkio")
MOUNT_OPTS = {"cpu": "cpu", "cpuset": "cpuset", "memory": "memory", "blkio": "blkio"}


def _w(root: str, node_path: str, content) -> None:
    p = os.path.join(root, node_path.lstrip("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "w") as f:
        f.write(f"{content}\n" if not isinstance(content, str) or not content.endswith("\n") else content)


def write_mountinfo(root: str, mode: str = "v1", resctrl: bool = True, resctrl_opts: str = "") -> None:
    lines = ["24 1 0:22 / / rw,relatime - ext4 /dev/vda1 rw"]
    n = 30
    if mode in ("v1", "hybrid"):
        lines.append(f"{n} 24 0:{n} / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755")
        for c in V1_CONTROLLERS:
            n += 1
            lines.append(f"{n} 30 0:{n} / /sys/fs/cgroup/{c} rw,nosuid,nodev,noexec,relatime shared:{n} - "
                         f"cgroup cgroup rw,{MOUNT_OPTS[c]}")
        if mode == "hybrid":
            n += 1
            lines.append(f"{n} 30 0:{n} / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw")
    else:
        lines.append(f"{n} 24 0:{n} / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
                     "rw,nsdelegate,memory_recursiveprot")
        _w(root, "/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc")
    if resctrl:
        n += 1
        opts = "rw" + ("," + resctrl_opts if resctrl_opts else "")
        lines.append(f"{n} 24 0:{n} / /sys/fs/resctrl rw,relatime shared:{n} - resctrl resctrl {opts}")
    _w(root, "/proc/self/mountinfo", "\n".join(lines) + "\n")


V1_FILES = {
    "cpu.shares": ("cpu", "cpu.shares"), "cpu.quota": ("cpu", "cpu.cfs_quota_us"),
    "cpu.period": ("cpu", "cpu.cfs_period_us"), "cpu.burst": ("cpu", "cpu.cfs_burst_us"),
    "cpu.bvt": ("cpu", "cpu.bvt_warp_ns"), "cpuset.cpus": ("cpuset", "cpuset.cpus"),
    "cpuset.effective": ("cpuset", "cpuset.effective_cpus"), "cpuset.mems": ("cpuset", "cpuset.mems"),
    "memory.limit": ("memory", "memory.limit_in_bytes"), "memory.usage": ("memory", "memory.usage_in_bytes"),
    "memory.priority": ("memory", "memory.priority"), "memory.use_priority_oom": ("memory", "memory.use_priority_oom"),
    "memory.wmark_ratio": ("memory", "memory.wmark_ratio"), "memory.wmark_min_adj": ("memory", "memory.wmark_min_adj"),
    "memory.wmark_scale_factor": ("memory", "memory.wmark_scale_factor"),
    "memory.wmark_high": ("memory", "memory.wmark_high"), "memory.wmark_low": ("memory", "memory.wmark_low"),
}
V2_FILES = {
    "cpu.weight": "cpu.weight", "cpu.max": "cpu.max", "cpu.burst": "cpu.max.burst", "cpu.bvt": "cpu.bvt_warp_ns",
    "cpuset.cpus": "cpuset.cpus", "cpuset.effective": "cpuset.cpus.effective", "cpuset.mems": "cpuset.mems",
    "memory.limit": "memory.max", "memory.usage": "memory.current", "memory.high": "memory.high",
    "memory.low": "memory.low", "memory.min": "memory.min", "memory.oom.group": "memory.oom.group",
    "memory.priority": "memory.priority", "memory.use_priority_oom": "memory.use_priority_oom",
    "memory.wmark_ratio": "memory.wmark_ratio", "memory.wmark_min_adj": "memory.wmark_min_adj",
    "memory.wmark_scale_factor": "memory.wmark_scale_factor",
}


def write_cgroup(root: str, mode: str, path: str, values: dict, tasks: list[int] = ()) -> None:
    """Write knob files of one cgroup. ``values`` uses the logical keys above;
    keys that do not exist in that cgroup version are skipped (as the kernel would)."""
    path = "/" + path.strip("/")
    rel = "" if path == "/" else path
    if mode in ("v1", "hybrid"):
        for c in V1_CONTROLLERS:
            os.makedirs(os.path.join(root, f"sys/fs/cgroup/{c}{rel}".lstrip("/")), exist_ok=True)
            _w(root, f"/sys/fs/cgroup/{c}{rel}/tasks", "".join(f"{t}\n" for t in tasks) or "")
            _w(root, f"/sys/fs/cgroup/{c}{rel}/cgroup.procs", "".join(f"{t}\n" for t in tasks[:1]) or "")
        for k, v in values.items():
            if k in V1_FILES:
                c, f = V1_FILES[k]
                _w(root, f"/sys/fs/cgroup/{c}{rel}/{f}", v)
        if mode == "hybrid":
            os.makedirs(os.path.join(root, f"sys/fs/cgroup/unified{rel}".lstrip("/")), exist_ok=True)
            _w(root, f"/sys/fs/cgroup/unified{rel}/cgroup.procs", "".join(f"{t}\n" for t in tasks[:1]) or "")
    else:
        os.makedirs(os.path.join(root, f"sys/fs/cgroup{rel}".lstrip("/")), exist_ok=True)
        _w(root, f"/sys/fs/cgroup{rel}/cgroup.procs", "".join(f"{t}\n" for t in tasks[:1]) or "")
        _w(root, f"/sys/fs/cgroup{rel}/cgroup.threads", "".join(f"{t}\n" for t in tasks) or "")
        for k, v in values.items():
            if k in V2_FILES:
                _w(root, f"/sys/fs/cgroup{rel}/{V2_FILES[k]}", v)


def write_switch(root: str, value: int | None = 1, core_sched: int | None = 0) -> None:
    if value is not None:
        _w(root, "/proc/sys/kernel/sched_group_identity_enabled", value)
    if core_sched is not None:
        _w(root, "/proc/sys/kernel/sched_core", core_sched)


#: info/MB as each vendor's kernel fills it (arch/x86/kernel/cpu/resctrl/core.c): Intel
#: __get_mem_config_intel (linear delay: min_bw = bw_gran = 100 - max_delay, here 10; MBA is
#: not enabled without a linear delay), AMD __rdt_get_mem_config_amd ("AMD does not use
#: delay": delay_linear false, min_bw 0, bw_gran 1). Intel mounted mba_MBps shows the same info.
MB_INFO = {"intel": {"min_bandwidth": 10, "bandwidth_gran": 10, "delay_linear": 1, "thread_throttle_mode": "max"},
           "amd": {"min_bandwidth": 0, "bandwidth_gran": 1, "delay_linear": 0}}
#: the MB value every group shows until one is written: Intel MAX_MBA_BW 100 (%); mba_MBps
#: MBA_MAX_MBPS = U32_MAX (include/linux/resctrl.h); AMD MAX_MBA_BW_AMD 0x800 (1/8 GB/s)
MB_DEFAULT = {"percent": 100, "mbps": 4294967295, "amd": 2048}
#: the MB data width (r->data_width): Intel 3, AMD 4 ("Max value is 2048, Data width should be 4")
MB_WIDTH = {"percent": 3, "mbps": 3, "amd": 4}


def schemata_text(lines: list[tuple[str, dict[int, int]]], *, cbm_bits: int = 11, mb: str = "percent") -> str:
    """A schemata file as the kernel prints it (rdtgroup_schemata_show / show_doms): each
    name right-aligned to the longest one ("%*s:"), then ``id=value`` joined by ';' with the
    resource's format_str: caches "%d=%0*x" (width (cbm_len + 3) / 4), MB "%d=%*u"."""
    width = max(len(n) for n, _ in lines)
    out = []
    for name, doms in lines:
        if name.startswith(("L2", "L3")):
            vals = [f"{i}={v:0{(cbm_bits + 3) // 4}x}" for i, v in doms.items()]
        else:
            vals = [f"{i}={v:{MB_WIDTH[mb]}d}" for i, v in doms.items()]
        out.append(f"{name:>{width}}:" + ";".join(vals))
    return "\n".join(out) + "\n"


def write_resctrl(root: str, groups: dict[str, dict], *, cbm_mask: str = "7ff", cdp: bool = False,
                  cache_ids=(0, 2), mon: bool = True, mb: str = "percent") -> None:
    """A resctrl tree. groups: name ("/" = default) -> {schemata, tasks, cpus_list, mode, mon_groups, mon}.
    ``mb``: what MB values count: "percent" (Intel), "mbps" (Intel mounted mba_MBps), "amd"."""
    base = "/sys/fs/resctrl"
    l3 = ["L3DATA", "L3CODE"] if cdp else ["L3"]
    for res in l3:
        _w(root, f"{base}/info/{res}/cbm_mask", cbm_mask)
        _w(root, f"{base}/info/{res}/min_cbm_bits", 1)
        _w(root, f"{base}/info/{res}/num_closids", 8 if cdp else 16)
        _w(root, f"{base}/info/{res}/shareable_bits", "0")
        _w(root, f"{base}/info/{res}/bit_usage", ";".join(f"{i}=SSSSSSSSSSS" for i in cache_ids))
    for fname, v in MB_INFO["amd" if mb == "amd" else "intel"].items():
        _w(root, f"{base}/info/MB/{fname}", v)
    _w(root, f"{base}/info/MB/num_closids", 8)
    if mon:
        _w(root, f"{base}/info/L3_MON/num_rmids", 144)
        _w(root, f"{base}/info/L3_MON/mon_features", "llc_occupancy\nmbm_total_bytes\nmbm_local_bytes\n")
    _w(root, f"{base}/info/last_cmd_status", "ok")
    for name, g in groups.items():
        d = base if name == "/" else f"{base}/{name}"
        _write_group(root, d, g, cache_ids, mon)
        for mname, mg in (g.get("mon_groups") or {}).items():
            _write_group(root, f"{d}/mon_groups/{mname}", mg, cache_ids, mon, ctrl=False)
        os.makedirs(os.path.join(root, (d + "/mon_groups").lstrip("/")), exist_ok=True)


def _write_group(root, d, g, cache_ids, mon, ctrl=True):
    _w(root, f"{d}/tasks", "".join(f"{t}\n" for t in g.get("tasks", [])) or "")
    _w(root, f"{d}/cpus_list", g.get("cpus_list", ""))
    if ctrl:
        _w(root, f"{d}/schemata", g["schemata"])
        _w(root, f"{d}/mode", g.get("mode", "shareable"))
        _w(root, f"{d}/size", "")
    if mon:
        for i in cache_ids:
            m = (g.get("mon") or {}).get(i, {})
            _w(root, f"{d}/mon_data/mon_L3_{i:02d}/llc_occupancy", m.get("llc", 1 << 20))
            _w(root, f"{d}/mon_data/mon_L3_{i:02d}/mbm_total_bytes", m.get("total", 1 << 30))
            _w(root, f"{d}/mon_data/mon_L3_{i:02d}/mbm_local_bytes", m.get("local", 1 << 29))


def write_threads(root: str, pid: int, threads: list[tuple[int, str, dict]], affinity: str = "0-3",
                  mode: str = "v1") -> None:
    """/proc/<pid>/task/<tid>/{comm,stat,status,cgroup}; threads: (tid, comm, {controller: path}).
    ``mode="v2"``: a cgroup2-only host, where the kernel prints the one line ``0::<path>``
    (kernel/cgroup/cgroup.c proc_cgroup_show; Documentation/admin-guide/cgroup-v2.rst
    "Processes": "0::/test-cgroup/test-cgroup-nested"), from "unified" or else "cpu". A v2
    domain cgroup holds whole processes (cgroup-v2.rst "Threads": only a threaded subtree splits
    one, and Kata makes none): threads of one process in two cgroups are refused."""
    if mode == "v2" and len({cgs.get("unified", cgs.get("cpu")) for _, _, cgs in threads}) > 1:
        raise ValueError(f"pid {pid}: cgroup v2 domain cgroups hold whole processes, not threads of one "
                         "process in several cgroups")
    for tid, comm, cgs in threads:
        b = f"/proc/{pid}/task/{tid}"
        _w(root, b + "/comm", comm)
        nice = 0
        fields = ["S"] + ["0"] * 15 + [str(nice)] + ["0"] * 19 + ["1", "0", "0"] + ["0"] * 10
        _w(root, b + "/stat", f"{tid} ({comm}) " + " ".join(fields))
        _w(root, b + "/status", f"Name:\t{comm}\nPid:\t{tid}\nCpus_allowed_list:\t{affinity}\n")
        lines = []
        if mode == "v2":
            lines.append(f"0::{cgs.get('unified', cgs.get('cpu'))}")
        else:
            for i, c in enumerate(("cpu", "cpuset", "memory"), 1):
                if c in cgs:
                    lines.append(f"{i}:{c}:{cgs[c]}")
            if "unified" in cgs:
                lines.append(f"0::{cgs['unified']}")
        _w(root, b + "/cgroup", "\n".join(lines) + "\n")
        if tid == pid:
            _w(root, f"/proc/{pid}/cgroup", "\n".join(lines) + "\n")
            _w(root, f"/proc/{pid}/comm", comm)


def pod_uid(i: int, kind: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}/{i}"))


def build_node(root: str, *, online_pods: int = 3, sandboxes: int = 2, mode: str = "v1", alinux: bool = True,
               resctrl: bool = True, cdp: bool = False, switch: int | None = 1, core_sched: int = 0,
               offline_bvt: int = -1, sandbox_bvt: int | None = None, offline_shares: int = 2,
               online_shares: int = 1024, online_priority: int = 12, offline_priority: int = 0,
               be_l3: str = "f", sandbox_cgroup_only: bool = False, vcpus: int = 2,
               vcpu_outside: bool = False, vcpus_in_be: bool = True, hypervisor: str = "qemu",
               named_vcpus: bool = True, mb: str = "percent") -> dict:
    """A co-location node: online burstable pods (runc) and offline Kata sandboxes in besteffort.
    ``named_vcpus=False``: QEMU's vCPU threads keep its comm, as without debug-threads=on.
    ``mb``: "percent" (Intel), "mbps" (Intel, resctrl mounted mba_MBps) or "amd" (an AMD
    CPU: vendor_id AuthenticAMD, MB in eighths of GB/s); every group at the kernel's default.

    Returns {"online": [pod uids], "sandboxes": [SandboxPaths], "vcpu_tids": {sid: [tids]}}.
    """
    from katactl.lab import layout

    write_mountinfo(root, mode, resctrl=resctrl, resctrl_opts="mba_MBps" if mb == "mbps" else "")
    vendor = "AuthenticAMD" if mb == "amd" else "GenuineIntel"
    _w(root, "/proc/cpuinfo", f"processor\t: 0\nvendor_id\t: {vendor}\n"
                              "flags\t\t: fpu sse cat_l3 cdp_l3 mba cqm_llc cqm_occup_llc\n")
    if alinux:
        write_switch(root, switch, core_sched)
    ali = {"memory.use_priority_oom": 1, "memory.wmark_ratio": 95, "memory.wmark_scale_factor": 50,
           "memory.wmark_min_adj": 0, "memory.wmark_high": 1 << 30, "memory.wmark_low": 1 << 29} if alinux else {}

    def bvt(v):
        return {"cpu.bvt": v} if alinux else {}

    def cpu(shares):
        return {"cpu.shares": shares} if mode != "v2" else {"cpu.weight": 1 + ((shares - 2) * 9999) // 262142}

    base = {"cpuset.cpus": "0-3", "cpuset.effective": "0-3", "cpuset.mems": "0", "cpu.period": 100000,
            "cpu.quota": -1, "cpu.max": "max 100000", "memory.limit": 9223372036854771712 if mode != "v2" else "max",
            "memory.usage": 1 << 30}
    write_cgroup(root, mode, "/", {**base, **cpu(1024)})
    write_cgroup(root, mode, "/kubepods", {**base, **cpu(4096), **bvt(0), **ali,
                                           **({"memory.priority": 0} if alinux else {})})
    write_cgroup(root, mode, "/kubepods/burstable", {**base, **cpu(2048), **bvt(2), **ali,
                                                     **({"memory.priority": online_priority} if alinux else {})})
    write_cgroup(root, mode, "/kubepods/besteffort", {**base, **cpu(2), **bvt(offline_bvt), **ali,
                                                      **({"memory.priority": offline_priority} if alinux else {})})
    online = []
    for i in range(online_pods):
        uid = pod_uid(i, "online")
        online.append(uid)
        vals = {**base, **cpu(online_shares), **bvt(2), **ali,
                **({"memory.priority": online_priority, "memory.wmark_min_adj": -25} if alinux else {})}
        write_cgroup(root, mode, f"/kubepods/burstable/pod{uid}", vals)
        write_cgroup(root, mode, f"/kubepods/burstable/pod{uid}/{uuid.uuid5(uuid.NAMESPACE_URL, uid).hex}",
                     {**vals, "memory.usage": 1 << 28}, tasks=[50000 + i])
    sbs, vcpu_tids = [], {}
    for i in range(sandboxes):
        sid = layout.sandbox_id_for(i)
        uid = pod_uid(i, "offline")
        pid = 200000 + i * 100
        pod_cg = f"/kubepods/besteffort/pod{uid}"
        sb_cg = f"{pod_cg}/kata_{sid}" if not sandbox_cgroup_only else f"{pod_cg}/{sid}"
        ov_cg = f"/kata_overhead/{sid}"
        sp = layout.write_go_sandbox(root, sid, hypervisor=hypervisor, pid=pid, pod_name=f"batch-{i}",
                                     pod_namespace="batch", pod_uid=uid, sandbox_cgroup_only=sandbox_cgroup_only,
                                     cgroup_path=sb_cg, vcpus=vcpus)
        sbs.append(sp)
        vals = {**base, **cpu(offline_shares), **bvt(offline_bvt), **ali,
                **({"memory.priority": offline_priority, "memory.wmark_min_adj": 50} if alinux else {})}
        names = {"qemu": "CPU {}/KVM" if named_vcpus else "qemu-system-x86", "clh": "vcpu{}",
                 "fc": "fc_vcpu {}"}[hypervisor]
        vt = [pid + 1 + k for k in range(vcpus)]
        vcpu_tids[sid] = vt
        in_sb = ov_cg if vcpu_outside else sb_cg
        # v2: a domain cgroup holds whole processes. Kata's AddThread writes each vCPU's TID to the
        # sandbox cgroup's cgroup.procs and the kernel moves the whole VMM with it (kata-containers
        # src/runtime/pkg/resourcecontrol/cgroups.go LinuxCgroup.AddThread -> cgroupsv2 Manager.AddProc);
        # v1's AddTask writes tasks: only the vCPU threads move
        main_cg = in_sb if mode == "v2" else sb_cg if sandbox_cgroup_only else ov_cg
        ths = [(pid, "qemu-system-x86" if hypervisor == "qemu" else hypervisor, {"cpu": main_cg, "memory": main_cg}),
               (pid + 50, "IO iothread1", {"cpu": main_cg, "memory": main_cg})]
        ths += [(t, names.format(k), {"cpu": in_sb, "memory": in_sb}) for k, t in enumerate(vt)]
        write_threads(root, pid, ths, mode=mode)
        write_cgroup(root, mode, pod_cg, vals)
        sbv = dict(vals)
        if sandbox_bvt is not None and alinux:
            sbv["cpu.bvt"] = sandbox_bvt
        if mode == "v2":
            sb_tasks = [t for t, _, c in ths if c["cpu"] == sb_cg]
            ov_tasks = [t for t, _, c in ths if c["cpu"] == ov_cg]
        else:
            sb_tasks, ov_tasks = (vt if not sandbox_cgroup_only else [pid] + vt), [pid, pid + 50]
        write_cgroup(root, mode, sb_cg, sbv, tasks=sb_tasks)
        if not sandbox_cgroup_only:
            write_cgroup(root, mode, ov_cg, {**base, **cpu(1024), **bvt(0)}, tasks=ov_tasks)
    if resctrl:
        all_vcpus = [t for v in vcpu_tids.values() for t in v]
        mbv = {0: MB_DEFAULT[mb], 2: MB_DEFAULT[mb]}

        def sch(mask: str) -> str:
            m = {0: int(mask, 16), 2: int(mask, 16)}
            return schemata_text(([("L3DATA", m), ("L3CODE", m)] if cdp else [("L3", m)]) + [("MB", mbv)], mb=mb)

        write_resctrl(root, {
            "/": {"schemata": sch("7ff"), "tasks": [1, 2], "cpus_list": "0-3"},
            "LS": {"schemata": sch("7ff"), "tasks": [50000]},
            "BE": {"schemata": sch(be_l3), "tasks": all_vcpus if vcpus_in_be else [],
                   "mon_groups": {"batch": {"tasks": all_vcpus[:1]}}},
        }, cdp=cdp, mb=mb)
    return {"online": online, "sandboxes": sbs, "vcpu_tids": vcpu_tids}


# -- I/O settings and pressure signals (cgroup v2 files, /proc, /sys/dev/block) -------------
#
# Formats as the kernel prints them: Documentation/admin-guide/cgroup-v2.rst ("IO Interface
# Files": io.stat "8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0",
# io.max "8:16 rbps=2097152 wbps=max riops=max wiops=120", io.weight "default 100" then
# "8:16 200", io.latency "8:16 target=75", io.cost.qos "8:16 enable=1 ctrl=user rpct=95.00
# rlat=75000 wpct=95.00 wlat=150000 min=50.00 max=150.00", io.cost.model "8:16 ctrl=auto
# model=linear rbps=... rseqiops=... rrandiops=... wbps=... wseqiops=... wrandiops=...";
# cpu.stat in usec; memory.events low/high/max/oom/oom_kill/oom_group_kill), and
# Documentation/accounting/psi.rst ("some avg10=0.00 avg60=0.00 avg300=0.00 total=0" and a
# "full" line, total in microseconds; the system-level cpu "full" line is all zeros).

DEVICES = {"8:0": "sda", "8:16": "sdb", "7:0": "loop0"}


def write_block_devices(root: str, devices: dict[str, str] = DEVICES, scheduler: str = "mq-deadline") -> None:
    for mm, name in devices.items():
        maj, mi = mm.split(":")
        _w(root, f"/sys/dev/block/{mm}/uevent", f"MAJOR={maj}\nMINOR={mi}\nDEVNAME={name}\nDEVTYPE=disk\n")
        scheds = ["mq-deadline", "kyber", "bfq", "none"]
        _w(root, f"/sys/dev/block/{mm}/queue/scheduler",
           " ".join(f"[{s}]" if s == scheduler else s for s in scheds) + "\n")


def v2_dir(root: str, path: str) -> str:
    rel = "" if path.strip("/") == "" else "/" + path.strip("/")
    return os.path.join(root, f"sys/fs/cgroup{rel}".lstrip("/"))


def write_v2_io(root: str, path: str, *, weight: int = 100, dev_weights: dict | None = None,
                io_max: dict | None = None, latency: dict | None = None, bfq_weight: int | None = None,
                bfq_dev_weights: dict | None = None) -> None:
    """io.weight (iocost) and io.bfq.weight (BFQ; ``bfq_weight`` defaults to ``weight``: the
    cgroup set alike for either) as block/bfq-cgroup.c bfq_io_show_weight prints them:
    ``default N`` then ``MAJ:MIN N`` lines."""
    d = "/sys/fs/cgroup" + ("" if path.strip("/") == "" else "/" + path.strip("/"))
    _w(root, f"{d}/io.weight", f"default {weight}\n" + "".join(f"{mm} {w}\n" for mm, w in (dev_weights or {}).items()))
    _w(root, f"{d}/io.bfq.weight", f"default {weight if bfq_weight is None else bfq_weight}\n"
       + "".join(f"{mm} {w}\n" for mm, w in (bfq_dev_weights or {}).items()))
    _w(root, f"{d}/io.max", "".join(f"{mm} {v}\n" for mm, v in (io_max or {}).items()) or "")
    _w(root, f"{d}/io.latency", "".join(f"{mm} target={v}\n" for mm, v in (latency or {}).items()) or "")


def write_v2_root_io(root: str, qos_enable: int = 1) -> None:
    _w(root, "/sys/fs/cgroup/io.cost.qos",
       f"8:16 enable={qos_enable} ctrl=user rpct=95.00 rlat=75000 wpct=95.00 wlat=150000 min=50.00 max=150.00\n")
    _w(root, "/sys/fs/cgroup/io.cost.model",
       "8:16 ctrl=auto model=linear rbps=174019176 rseqiops=41708 rrandiops=370 wbps=178075866 "
       "wseqiops=42705 wrandiops=378\n")


def psi_text(some_total: int, full_total: int, avg10: float = 0.0, full: bool = True) -> str:
    s = f"some avg10={avg10:.2f} avg60={avg10 / 2:.2f} avg300={avg10 / 10:.2f} total={some_total}\n"
    if full:
        s += f"full avg10={avg10 / 2:.2f} avg60={avg10 / 4:.2f} avg300={avg10 / 20:.2f} total={full_total}\n"
    return s


def write_v2_signals(root: str, path: str, k: int, *, cpu_stall: int = 0, mem_stall: int = 0, io_stall: int = 0,
                     throttled: int = 0, periods: int = 0, usage_usec: int = 0, scan: int = 0,
                     events: dict | None = None, io_bytes: dict | None = None, mem_current: int = 1 << 28) -> None:
    """Sample ``k`` (0, 1, ...) of a cgroup's v2 signal files: every counter grows by its
    argument per sample, so two samples show exactly that delta."""
    d = "/sys/fs/cgroup" + ("" if path.strip("/") == "" else "/" + path.strip("/"))
    base = 1_000_000
    _w(root, f"{d}/cpu.pressure", psi_text(base + k * cpu_stall, base // 2 + k * cpu_stall // 2, 1.5 if cpu_stall else 0))
    _w(root, f"{d}/memory.pressure", psi_text(base + k * mem_stall, base // 2 + k * mem_stall // 2))
    _w(root, f"{d}/io.pressure", psi_text(base + k * io_stall, base // 2 + k * io_stall // 2))
    _w(root, f"{d}/cpu.stat",
       f"usage_usec {50_000_000 + k * usage_usec}\nuser_usec {40_000_000 + k * usage_usec}\n"
       f"system_usec 10000000\nnr_periods {1000 + k * periods}\nnr_throttled {100 + k * throttled}\n"
       f"throttled_usec {2_000_000 + k * throttled * 50_000}\nnr_bursts 0\nburst_usec 0\n")
    ev = events or {}
    _w(root, f"{d}/memory.events", "".join(f"{n} {10 + k * ev.get(n, 0)}\n"
                                           for n in ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")))
    _w(root, f"{d}/memory.current", mem_current)
    _w(root, f"{d}/memory.stat",
       f"anon 1000000\nfile 2000000\nkernel 100000\nshmem 0\npgscan {500 + k * scan * 2}\n"
       f"pgsteal {400 + k * scan // 2}\npgscan_kswapd {500 + k * scan}\npgscan_direct {0 + k * scan}\n"
       f"pgsteal_kswapd 400\npgsteal_direct {0 + k * scan // 2}\nworkingset_refault_anon {k * scan // 4}\n"
       f"workingset_refault_file {7 + k * scan // 4}\npgfault 123456\npgmajfault {12 + k}\n")
    lines = []
    for mm, per in (io_bytes or {"8:0": 0}).items():
        lines.append(f"{mm} rbytes={4096 * 1000 + k * per} wbytes={8192 * 1000 + k * per} rios={1000 + k * per // 4096} "
                     f"wios={2000 + k * per // 4096} dbytes=0 dios=0")
    _w(root, f"{d}/io.stat", "\n".join(lines) + "\n")


def write_node_signals(root: str, k: int, *, cpu_stall: int = 0, io_stall: int = 0, scan: int = 0) -> None:
    base = 5_000_000
    _w(root, "/proc/pressure/cpu", f"some avg10=2.00 avg60=1.00 avg300=0.20 total={base + k * cpu_stall}\n"
                                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    _w(root, "/proc/pressure/memory", psi_text(base, base // 2))
    _w(root, "/proc/pressure/io", psi_text(base + k * io_stall, base // 2 + k * io_stall // 2))
    _w(root, "/proc/vmstat", f"nr_free_pages 100000\npgscan_kswapd 1000\npgscan_direct {10 + k * scan}\n"
                             f"pgsteal_direct {5 + k * scan // 2}\nworkingset_refault_anon 0\n"
                             f"workingset_refault_file {100 + k}\npgmajfault 50\nallocstall_normal {k * 2}\n"
                             f"allocstall_movable {k}\noom_kill 0\n")
    _w(root, "/proc/diskstats",
       f"   8       0 sda {1000 + k * 10} 0 {8000 + k * 80} 500 {2000 + k * 20} 0 {16000 + k * 160} 900 0 1000 1400"
       " 0 0 0 0 40 2\n"
       f"   8       1 sda1 10 0 80 5 20 0 160 9 0 10 14 0 0 0 0 0 0\n"
       f"   7       0 loop0 5 0 40 1 0 0 0 0 0 2 1 0 0 0 0 0 0\n")


#: the blkio files every v1 cgroup shows (Documentation/admin-guide/cgroup-v1/blkio-controller.rst):
#: a throttle file with no line is no limit; the stats end with the "Total N" line
V1_BLKIO_DEFAULTS = {"blkio.throttle.read_bps_device": "", "blkio.throttle.write_bps_device": "",
                     "blkio.throttle.read_iops_device": "", "blkio.throttle.write_iops_device": "",
                     "blkio.throttle.io_service_bytes_recursive": "Total 0\n",
                     "blkio.throttle.io_serviced_recursive": "Total 0\n"}


def write_v1_blkio(root: str, path: str, files: dict[str, str] | None = None) -> None:
    """A v1 cgroup's blkio files: the kernel's empty defaults where none was written yet, then
    ``files`` ({file name: content}), e.g. ``blkio.throttle.write_bps_device: "8:16 1048576"``."""
    d = "/sys/fs/cgroup/blkio" + ("" if path.strip("/") == "" else "/" + path.strip("/"))
    for fname, text in V1_BLKIO_DEFAULTS.items():
        if not os.path.exists(os.path.join(root, f"{d}/{fname}".lstrip("/"))):
            _w(root, f"{d}/{fname}", text)
    for fname, text in (files or {}).items():
        _w(root, f"{d}/{fname}", text)
