"""The co-location audit: read a node's isolation settings, compare them with
a :class:`~katactl.isolation.policy.Policy`, and return findings.

Each finding has a check id, a severity, the target, a message, the evidence
(node file and the value read there) and a fix hint. A feature the kernel
lacks is an ``info`` finding ("unsupported"), never an error. A check whose
input could not be read or parsed did not run: that is a finding of that check
with ``status: "unknown"`` at the check's severity, so ``--fail-on`` counts it:
an unverified node never passes silently. Otherwise ``status`` is ``"problem"``,
or ``"unsupported"`` for the ``*.unsupported`` info findings.
"""
from __future__ import annotations

import math

from katactl.errors import NotFound, UsageError
from katactl.isolation import cgroups as cg
from katactl.isolation import io as iomod
from katactl.isolation import report, resctrl, threads, weights
from katactl.isolation.policy import SEVERITIES, Policy
from katactl.values import parse_cpulist
from katactl.backends.base import NodeTransport


class Findings:
    def __init__(self, pol: Policy):
        self.pol = pol
        self.items: list[dict] = []

    def add(self, check: str, target: str, message: str, evidence: list[dict], fix: str, *,
            at_most: str | None = None, unknown: bool = False) -> None:
        """``at_most`` caps the check's (policy) severity for a milder case of it;
        ``unknown``: the check could not run (its input was unreadable), said so."""
        if not self.pol.enabled(check):
            return
        sev = self.pol.severity_of(check)
        if at_most is not None:
            sev = min(sev, at_most, key=SEVERITIES.index)
        status = "unknown" if unknown or check in (UNREADABLE, RDT_UNREADABLE) else "unsupported" if check.endswith(UNSUPPORTED) \
            else "problem"
        self.items.append({"check": check, "severity": sev, "status": status, "target": target, "message": message,
                           "evidence": evidence, "fix": fix})

    def unknown(self, check: str, target: str, what: str, evidence: list[dict], fix: str) -> None:
        self.add(check, target, f"not checked: {what}", evidence, fix, unknown=True)


#: the check id of a sandbox's threads or files that could not be read (always "unknown")
UNREADABLE = "kata.unreadable"
#: the check id of a resctrl file that could not be read or parsed (always "unknown")
RDT_UNREADABLE = "rdt.unreadable"
#: the suffix of the info findings for a feature the kernel lacks (status "unsupported": no problem)
UNSUPPORTED = ".unsupported"


def _ev(row: dict, fname: str, value) -> dict:
    return {"file": row.get("_files", {}).get(fname, fname), "value": value}


def _target(row: dict) -> str:
    if row.get("podRef"):
        return f"pod {row['podRef']}" + (f" ({row['level']})" if row["level"] not in ("pod",) else "")
    if row.get("podUid"):
        return f"pod uid {row['podUid']}" + (f" ({row['level']})" if row["level"] != "pod" else "")
    return row["path"]


def run(transport: NodeTransport, pol: Policy) -> dict:
    node = report.Node(transport)
    node.fs.require()
    f = Findings(pol)
    rows = report.kube_rows(node, ("cpu", "cpuset", "memory"))
    root_cpus = _root_cpus(node)
    _cpu_checks(f, pol, rows, root_cpus)
    _bvt_checks(f, pol, node, rows)
    _memcg_checks(f, pol, node, rows)
    _unreadable_knobs(f, pol, node, rows)
    _io_checks(f, pol, node, rows)
    tid_group = _rdt_checks(f, pol, node)
    _kata_checks(f, pol, node, tid_group)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    f.items.sort(key=lambda x: (-order[x["severity"]], x["check"], x["target"]))
    counts = {s: sum(1 for i in f.items if i["severity"] == s) for s in SEVERITIES}
    return {"policy": pol.source, "hierarchy": node.fs.mode, "pods": sum(r["level"] == "pod" for r in rows),
            "sandboxes": len(node.sandboxes), "counts": counts, "items": f.items}


def exceeds(items: list[dict], fail_on: str) -> bool:
    lim = SEVERITIES.index(fail_on)
    return any(SEVERITIES.index(i["severity"]) >= lim for i in items)


#: what each node's :func:`run` result contributes to the report's metadata
NODE_META = ("hierarchy", "pods", "sandboxes", "counts")


def merge(values: dict[str, dict], fail_on: str, pol: Policy, *, multi: bool = True) -> tuple[list[dict], dict, bool]:
    """One report from the :func:`run` results of the nodes that answered
    (``{node: result}``, in node order): (findings, metadata, failed).

    ``multi`` (several nodes were asked): each finding names its node and each
    node's facts go under ``nodes``; otherwise they sit in the metadata itself.
    The metadata counts the findings by severity and says whether the audit
    passed; ``failed``: a finding reaches ``fail_on``."""
    items: list[dict] = []
    nodes: dict[str, dict] = {}
    for n, v in values.items():
        nodes[n] = {k: v[k] for k in NODE_META}
        items += [({"node": n, **i} if multi else i) for i in v["items"]]
    failed = exceeds(items, fail_on)
    counts = {s: sum(1 for i in items if i["severity"] == s) for s in SEVERITIES}
    meta = {"policy": pol.source, "failOn": fail_on, "passed": not failed, "counts": counts,
            "unknown": sum(1 for i in items if i["status"] == "unknown")}
    if multi:
        meta["nodes"] = nodes
    else:
        for facts in nodes.values():
            meta.update(facts)
    return items, meta, failed


# -- cpu ---------------------------------------------------------------------------

def _root_cpus(node) -> set[int] | None:
    d = node.fs.dir("cpuset", "/")
    if d is None:
        return None
    for fname in ("cpuset.effective_cpus", "cpuset.cpus.effective", "cpuset.cpus"):
        try:
            return set(parse_cpulist(node.t.read_text(f"{d}/{fname}").strip()))
        except (OSError, UsageError):  # a missing or odd file just means "unknown"
            continue
    return None


def _pinned(row: dict, children: list[dict], root_cpus: set[int] | None) -> bool:
    if root_cpus is None:
        return False

    def strict(r):
        c = r.get("cpus")
        if not c:
            return False
        try:
            s = set(parse_cpulist(c))
        except UsageError:
            return False
        return bool(s) and s < root_cpus

    if strict(row):
        return True
    ctrs = [c for c in children if c["level"] == "container"]
    return bool(ctrs) and all(strict(c) for c in ctrs)


def _cpu_checks(f: Findings, pol: Policy, rows: list[dict], root_cpus) -> None:
    kids: dict[str, list[dict]] = {}
    for r in rows:
        pp = cg.pod_cgroup_path(r["path"])
        if pp and pp != r["path"]:
            kids.setdefault(pp, []).append(r)
    for r in rows:
        if r["level"] == "pod" and r["class"] == "online":
            if pol.cpu.accept_pinned and _pinned(r, kids.get(r["path"], []), root_cpus):
                continue  # pinned: its weight does not matter, readable or not
            sh, w = r.get("shares"), r.get("weight")
            if _weight_unread(f, "cpu.online-weight", r):
                continue
            if isinstance(sh, int) and sh < pol.cpu.online_min_shares:
                f.add("cpu.online-weight", _target(r),
                      f"online pod is not pinned and has cpu.shares {sh} < {pol.cpu.online_min_shares}",
                      [_ev(r, "cpu.shares", sh), _ev(r, "cpuset.cpus", r.get("cpus"))],
                      "give the pod integer CPU requests with the static CPU manager policy (pinned cpuset), "
                      f"or requests worth at least {pol.cpu.online_min_shares} shares")
            elif isinstance(w, int) and not weights.weight_at_least(w, pol.cpu.online_min_shares):
                f.add("cpu.online-weight", _target(r),
                      f"online pod is not pinned and has cpu.weight {w}, below {pol.cpu.online_min_shares} shares "
                      f"under both conversions ({weights.weight_kubelet(pol.cpu.online_min_shares)} kubelet, "
                      f"{weights.weight_runc(pol.cpu.online_min_shares)} runc)",
                      [_ev(r, "cpu.weight", w), _ev(r, "cpuset.cpus", r.get("cpus"))],
                      "pin the pod (static CPU manager) or raise its CPU requests")
        if r["class"] == "offline" and r["level"] in ("pod", "sandbox"):
            sh, w = r.get("shares"), r.get("weight")
            mx = pol.cpu.offline_max_shares
            if _weight_unread(f, "cpu.offline-weight", r):
                continue
            if isinstance(sh, int) and sh > mx:
                f.add("cpu.offline-weight", _target(r),
                      f"offline {'Kata sandbox' if r.get('sandbox') else 'pod'} cgroup has cpu.shares {sh} > {mx}",
                      [_ev(r, "cpu.shares", sh)],
                      f"run offline work as BestEffort (kubelet sets shares 2) or set cpu.shares <= {mx} "
                      "(koordinator batch resources)")
            elif isinstance(w, int) and not weights.weight_at_most(w, mx):
                f.add("cpu.offline-weight", _target(r),
                      f"offline cgroup has cpu.weight {w}, above {mx} shares under both conversions",
                      [_ev(r, "cpu.weight", w)], f"lower cpu.weight to at most {weights.weight_runc(mx)}")


def _weight_unread(f: Findings, check: str, r: dict) -> bool:
    """The row's CPU weight (cpu.shares on v1, cpu.weight on v2) could not be read: ``check``
    did not run for it (unknown)."""
    if isinstance(r.get("shares"), int) or isinstance(r.get("weight"), int):
        return False
    for u in r.get("unreadable", []):
        if u["file"].rsplit("/", 1)[-1] in ("cpu.shares", "cpu.weight"):
            _unknown_knob(f, check, r, u)
            return True
    return False


def _unknown_knob(f: Findings, check: str, r: dict, u: dict) -> None:
    name = u["file"].rsplit("/", 1)[-1]
    f.unknown(check, _target(r), f"{name} could not be read ({u['error']})",
              [{"file": u["file"], "value": None, "error": u["error"]}],
              f"check {u['file']} on the node (permissions, the kernel's format)")


# -- bvt ---------------------------------------------------------------------------

def _bvt_checks(f: Findings, pol: Policy, node, rows: list[dict]) -> None:
    sup = report.bvt_support(node)
    if not sup["supported"]:
        f.add("bvt.unsupported", node.t.node, f"BVT group identity unsupported: {sup['reason']}",
              [{"file": node.fs.dir("cpu", "/") or "cpu controller", "value": "no cpu.bvt_warp_ns"}],
              "nothing to do on this kernel; use an Alibaba Cloud Linux / Anolis kernel for group identity")
        return
    sw = sup["switch"]
    if pol.bvt.require_switch and sw["enabled"] is None:
        f.unknown("bvt.switch", node.t.node, f"whether group identity is switched on ({sw['note']})",
                  [{"file": sw["file"], "value": None}], "run katactl as root (sysctl kernel.sched_group_identity_enabled)")
    elif pol.bvt.require_switch and sw["value"] is not None and sw["value"] != 1:
        f.add("bvt.switch", node.t.node, "group identity is switched off: bvt values have no effect",
              [{"file": sw["file"], "value": sw["value"]}],
              "sysctl -w kernel.sched_group_identity_enabled=1 (and persist it in /etc/sysctl.d)")
    underclass = False
    for r in rows:
        v = r.get("bvtWarpNs")
        if v is None:
            continue
        underclass = underclass or v < 0
        exp = report.expected_bvt(r, pol)
        if exp is None or v == exp:
            continue
        if r["level"] in ("kubepods", "qos"):
            check = "bvt.tree"
        elif r["class"] == "offline":
            check = "bvt.offline"
        else:
            check = "bvt.online"
        note = " (identity does not inherit: the cgroup holding the vCPU threads needs it itself)" \
            if r["level"] == "sandbox" else ""
        same = bvt_class(v) == bvt_class(exp)
        if same:  # -2 where the policy says -1 (or 1 for 2): the class the policy wants, another value
            msg = (f"cpu.bvt_warp_ns is {v} ({bvt_class(v)}, as the policy's {exp}), not the policy's value"
                   + ("" if check != "bvt.tree" else " at the QoS level"))
        else:
            what = {"bvt.offline": "offline (Kata) cgroup is not underclass",
                    "bvt.online": "online pod is not high class", "bvt.tree": "QoS-level cgroup"}[check]
            msg = f"{what}: cpu.bvt_warp_ns is {v} ({bvt_class(v)}), policy wants {exp} ({bvt_class(exp)})"
        f.add(check, _target(r), msg + note, [_ev(r, "cpu.bvt_warp_ns", v)],
              f"echo {exp} > {r.get('_files', {}).get('cpu.bvt_warp_ns', 'cpu.bvt_warp_ns')} "
              "(koordinator's CPUQoS plugin does this for every pod)", at_most="low" if same else None)
    core = sup.get("coreSched")
    if core and core.get("error") and underclass:
        f.unknown("bvt.core-sched", node.t.node, f"whether core scheduling is on ({core['error']})",
                  [{"file": core["file"], "value": None}], "run katactl as root (sysctl kernel.sched_core)")
    elif core and core["value"] == 1 and underclass:
        f.add("bvt.core-sched", node.t.node,
              "core scheduling is on while cgroups use underclass bvt (-1 or -2): they conflict",
              [{"file": core["file"], "value": 1}], "sysctl -w kernel.sched_core=0 on co-location nodes")


def bvt_class(v: int) -> str:
    """cpu.bvt_warp_ns by sign: 2 and 1 high class, 0 normal, -1 and -2 underclass
    (Alibaba Cloud Linux / Anolis group identity)."""
    return "high class" if v > 0 else "underclass" if v < 0 else "normal"


# -- memcg ---------------------------------------------------------------------------

def _memcg_checks(f: Findings, pol: Policy, node, rows: list[dict]) -> None:
    sup = report.memcg_support(node)
    if not sup["supported"]:
        return
    feats = sup["features"]
    if sup.get("unsupported"):
        f.add("memcg.unsupported", node.t.node, f"memcg QoS partly unsupported: {sup['reason']}",
              [{"file": node.fs.dir("memory", "/kubepods") or "memory controller",
                "value": "missing " + ",".join(sup["unsupported"])}],
              "nothing to do on this kernel; Alibaba Cloud Linux / Anolis kernels provide these knobs")
    if pol.memcg.check_priority and feats.get("memory.priority"):
        ranked = [r for r in rows if r["level"] in ("pod", "qos") and isinstance(r.get("priority"), int)
                  and r["class"] in ("online", "offline")]
        on = [r for r in ranked if r["class"] == "online"]
        off = [r for r in ranked if r["class"] == "offline"]
        if on and off:
            lo = min(on, key=lambda r: r["priority"])
            hi = max(off, key=lambda r: r["priority"])
            if lo["priority"] <= hi["priority"]:
                f.add("memcg.priority-order", _target(hi),
                      f"offline memcg priority {hi['priority']} is not below online priority {lo['priority']} "
                      f"({_target(lo)}): under memory pressure online pods may be OOM-killed first",
                      [_ev(hi, "memory.priority", hi["priority"]), _ev(lo, "memory.priority", lo["priority"])],
                      "give offline cgroups a lower memory.priority than online ones (0..12, higher survives)")
        kp = next((r for r in rows if r["level"] == "kubepods"), None)
        if kp is not None and feats.get("memory.use_priority_oom") and kp.get("usePriorityOom") == 0:
            f.add("memcg.priority-order", _target(kp), "priority OOM is off at the kubepods level: "
                  "memory.priority is ignored by the OOM killer",
                  [_ev(kp, "memory.use_priority_oom", 0)], "echo 1 > memory.use_priority_oom on kubepods")
    if pol.memcg.check_wmark and feats.get("memory.wmark_ratio"):
        for r in rows:
            if r["level"] != "pod" or r["class"] not in ("online", "offline"):
                continue
            ev, bad = [], []
            if isinstance(r.get("wmarkRatio"), int) and r["wmarkRatio"] != pol.memcg.wmark_ratio:
                bad.append(f"wmark_ratio {r['wmarkRatio']} != {pol.memcg.wmark_ratio}")
                ev.append(_ev(r, "memory.wmark_ratio", r["wmarkRatio"]))
            want = pol.memcg.wmark_min_adj_online if r["class"] == "online" else pol.memcg.wmark_min_adj_offline
            if isinstance(r.get("wmarkMinAdj"), int) and r["wmarkMinAdj"] != want:
                bad.append(f"wmark_min_adj {r['wmarkMinAdj']} != {want}")
                ev.append(_ev(r, "memory.wmark_min_adj", r["wmarkMinAdj"]))
            if bad:
                f.add("memcg.wmark", _target(r), f"{r['class']} pod async reclaim: " + "; ".join(bad), ev,
                      "set the pod's memory.wmark_ratio / memory.wmark_min_adj as koordinator's MemoryQoS does")


# -- knobs that could not be read ---------------------------------------------------

def _knob_check(name: str, r: dict, pol: Policy, bvt: bool, feats: dict) -> str | None:
    """The check that needed the knob file ``name`` of row ``r`` (None: no check reads it
    there); ``bvt``: the kernel has group identity; ``feats``: its Alinux memcg knobs. A CPU
    weight is not here: cpu.online-weight does not need a pinned pod's (_weight_unread)."""
    lvl, cls = r["level"], r["class"]
    if name == "cpu.bvt_warp_ns":
        if report.expected_bvt(r, pol) is None or not bvt:
            return None
        return "bvt.tree" if lvl in ("kubepods", "qos") else "bvt.offline" if cls == "offline" else "bvt.online"
    if name == "memory.priority" and pol.memcg.check_priority and feats.get(name):
        return "memcg.priority-order" if lvl in ("pod", "qos") and cls in ("online", "offline") else None
    if name == "memory.use_priority_oom" and pol.memcg.check_priority and feats.get(name):
        return "memcg.priority-order" if lvl == "kubepods" else None
    if name in ("memory.wmark_ratio", "memory.wmark_min_adj") and pol.memcg.check_wmark and feats.get(name):
        return "memcg.wmark" if lvl == "pod" and cls in ("online", "offline") else None
    return None


def _unreadable_knobs(f: Findings, pol: Policy, node, rows: list[dict]) -> None:
    """A knob a check needs that could not be read or parsed (report.kube_rows puts those
    under ``unreadable``): that check did not run for that cgroup, which is never a pass."""
    if not any(r.get("unreadable") for r in rows):
        return
    bvt, feats = report.bvt_support(node)["supported"], report.memcg_support(node)["features"]
    for r in rows:
        for u in r.get("unreadable", []):
            name = u["file"].rsplit("/", 1)[-1]
            check = _knob_check(name, r, pol, bvt, feats)
            if check is not None:
                _unknown_knob(f, check, r, u)


# -- io ----------------------------------------------------------------------------
#
# The kernel's hierarchy semantics, which the checks below follow:
# - limits: cgroup v2 io.max binds the whole subtree, v1 blk-throttle binds the cgroup's own
#   threads only (linux block/blk-throttle.c throtl_pd_init: "If on the default hierarchy ...
#   limits on a given throtl_grp are applied to the whole subtree ... If not on the default
#   hierarchy, the broken flat hierarchy behavior is retained ... Limits of a group don't
#   interact with limits of other groups regardless of the position of the group"; v1's
#   Documentation/admin-guide/cgroup-v1/blkio-controller.rst "Hierarchical Cgroups": without
#   "sane_behavior" throttling treats "all groups at same level");
# - weights (io.weight, io.bfq.weight, blkio.*weight*) count among siblings only
#   (Documentation/admin-guide/cgroup-v2.rst "IO Interface Files": "the relative amount IO time
#   the cgroup can use in relation to its siblings"; "Weights": the parent's share is divided
#   by the active children's weights).

def _io_checks(f: Findings, pol: Policy, node, rows: list[dict]) -> None:
    t, fs = node.t, node.fs
    ver = fs.version_of("blkio") or (2 if fs.v2 is not None and "io" in fs.v2_controllers else None)
    if ver is None:
        f.add("io.unsupported", t.node, "I/O isolation unsupported: no blkio (v1) or io (v2) controller",
              [{"file": fs.mount_list(), "value": "no blkio mount, no io in cgroup.controllers"}],
              "mount the blkio controller (v1) or enable io in the parent's cgroup.subtree_control (v2)")
        return
    devn = node.devices
    got: dict[str, tuple[dict | None, list[dict]]] = {}

    def io_at(path: str) -> dict | None:
        if path not in got:
            log = cg.ReadLog()
            got[path] = (iomod.read_io(t, fs, path, devn, log), log.unreadable)
        return got[path][0]

    ios: dict[str, dict] = {}
    for r in rows:
        if r["level"] in ("pod", "sandbox", "overhead") and r["class"] in ("online", "offline"):
            v = io_at(r["path"])
            if v is not None:
                ios[r["path"]] = v
    by_path = {r["path"]: r for r in rows}
    d = fs.dir("blkio", "/") if ver == 1 else fs._join(fs.v2, "/")
    sched = iomod.schedulers(t, devn)
    root = iomod.read_io(t, fs, "/", devn) or {}
    qos_on = {e["device"] for e in root.get("costQos", []) if e.get("enable") == 1}
    real = [mm for mm, name in devn.items() if not name.startswith(("loop", "ram", "zram", "dm-"))]
    bfq_on = {mm for mm in real if sched.get(mm) == "bfq"}

    def w_of(path, mm=None, kind="weight"):
        return iomod.effective_weight(io_at(path), mm, kind)

    def ev(path, what, value):
        return {"file": f"{fs.dir('blkio', path) if ver == 1 else fs._join(fs.v2, path)}/{what}", "value": value}

    pods = [r for r in rows if r["level"] == "pod" and r["path"] in ios]
    off_rows = [r for r in rows if r["class"] == "offline" and r["level"] in ("pod", "sandbox")]
    # The weight a disk obeys: BFQ's on a disk whose scheduler is bfq (io.bfq.weight;
    # blkio.bfq.weight[_device] on v1: Documentation/block/bfq-iosched.rst), io.weight where
    # iocost is on (io.cost.qos enable=1). A disk with neither obeys none (io.weight-ineffective
    # below): then the weights are compared as set, io.weight first.
    def has(path, kind):
        return isinstance(w_of(path, None, kind), int)

    kinds: dict[str, set[str] | None] = {k: devs for k, devs in (("weight", qos_on), ("bfqWeight", bfq_on)) if devs}
    if not kinds:
        kinds = {next((k for k in iomod.WEIGHT_KINDS if any(has(r["path"], k) for r in pods + off_rows)),
                      "weight"): None}
    # An offline pod and an online pod compete through the children of their nearest common
    # ancestor: kubepods/besteffort against kubepods/burstable (or a Guaranteed pod), or the two
    # pods themselves when they are siblings. Only an offline-only cgroup against an online one
    # is compared; a sandbox cgroup's weight counts only inside its pod.
    # Pods under two different parents part at or above those parents: one pair per two parents.
    rivals: dict[str, set[str]] = {}
    by_parent: dict[str, dict[str, list[str]]] = {"offline": {}, "online": {}}
    for r in pods:
        if r["class"] in by_parent:
            by_parent[r["class"]].setdefault(r["path"].rsplit("/", 1)[0], []).append(r["path"])
    for po, offs in by_parent["offline"].items():
        for pn, ons in by_parent["online"].items():
            pairs = [(o, n) for o in offs for n in ons] if po == pn else [_sibling_pair(offs[0], ons[0])]
            for pair in pairs:
                if pair and (by_path.get(pair[0]) or {}).get("class") == "offline" \
                        and (by_path.get(pair[1]) or {}).get("class") == "online":
                    rivals.setdefault(pair[0], set()).add(pair[1])
    for kind, on in kinds.items():
        if not pol.io.check_weight_order:
            break
        bfq = kind == "bfqWeight"
        dflt_file = ("io.bfq.weight" if bfq else "io.weight") if ver == 2 else ("blkio.bfq.weight" if bfq else
                                                                             "blkio.weight")
        dev_file = ("io.bfq.weight" if bfq else "io.weight") if ver == 2 else ("blkio.bfq.weight_device" if bfq else
                                                                            "blkio.weight_device")
        span = "1..1000" if bfq else "1..10000" if ver == 2 else "10..1000"
        for a in sorted(rivals):
            online = sorted(b for b in rivals[a] if has(b, kind))
            if not (has(a, kind) and online):
                continue
            # a device's own line (io.weight "8:16 200", blkio.bfq.weight_device) overrides the
            # default for that device (cgroup-v2.rst "IO Interface Files"): compare per device too
            own = sorted({e["device"] for p in [a, *online] for e in (io_at(p) or {}).get("devices", [])
                          if isinstance(e.get(kind), int) and (on is None or e["device"] in on)},
                         key=lambda mm: tuple(int(x) for x in mm.split(":")))
            ra = by_path[a]
            what = "QoS class" if ra["level"] == "qos" else "Kata pod" if ra.get("sandbox") else "pod"
            for mm in [None, *own]:
                lo = min(online, key=lambda b: w_of(b, mm, kind))
                if w_of(a, mm, kind) < w_of(lo, mm, kind):
                    continue
                where = f" on {devn.get(mm, mm)} ({mm})" if mm else ""
                f.add("io.offline-weight", _target(ra),
                      f"offline {what} {'BFQ ' if bfq else ''}I/O weight{where} {w_of(a, mm, kind)} is not below "
                      f"its online sibling {_target(by_path[lo])}'s {w_of(lo, mm, kind)} (weights count among "
                      "siblings only)",
                      [ev(p, dev_file if mm else dflt_file, f"{mm} {w_of(p, mm, kind)}" if mm else w_of(p, None, kind))
                       for p in (a, lo)],
                      (f"lower {a}'s {dflt_file} (e.g. 10; {span}) or raise {lo}'s")
                      if not mm else f"echo '{mm} 10' > {dev_file} in {a}, or remove its device line")

    held: dict[str, list[str]] = {}

    def holders(r: dict) -> list[str]:
        """The cgroups whose own limits bind a pod's threads on v1 (flat): those of the pod's
        subtree and of its sandbox's /kata_overhead/<id> that hold threads (Kata moves only
        the vCPU TIDs on v1: kata-containers src/runtime/pkg/resourcecontrol/cgroups.go
        AddThread -> tasks), else where they will be. On v2 the pod, whose io.max and its
        ancestors' bind the whole subtree, the VMM included (a v2 AddThread moves the process),
        and its sandbox's /kata_overhead/<id> (sandbox_cgroup_only=false): the shim and
        virtiofsd, which does the guest's virtio-fs file I/O, stay there, outside kubepods
        (kata-containers docs/design/host-cgroups.md, src/runtime/virtcontainers/sandbox.go
        setupResourceController)."""
        pod = r["path"]
        if ver == 2:
            return [pod, *overhead_of(r)]
        if pod not in held:
            below = [x["path"] for x in rows if x["path"].startswith(pod + "/")]
            busy = [c for c in [pod, *below, *overhead_of(r)] if _holds_tasks(t, fs.dir("blkio", c)) is not False]
            held[pod] = busy or below + overhead_of(r) or [pod]
        return held[pod]

    def overhead_of(r: dict) -> list[str]:
        return [x["path"] for x in rows if x["level"] == "overhead" and r.get("sandbox")
                and x.get("sandbox") == r["sandbox"]]

    def chain(path: str) -> list[str]:
        """The cgroups whose limit binds ``path``: itself on v1, it and its ancestors on v2."""
        parts = [p for p in cg.norm_cgpath(path).split("/") if p]
        return ["/" + "/".join(parts[:i]) for i in range(len(parts), 0, -1)] if ver == 2 else [path]

    def unthrottled(r: dict, mm: str) -> tuple[list[str], list[dict]]:
        """(holders no limit on ``mm`` binds, files that could not be read on their chains)."""
        bad, unread = [], []
        for h in holders(r):
            c = chain(h)
            if not any(_throttled_on(io_at(p), mm) for p in c):
                bad.append(h)
                unread += [u for p in c for u in got[p][1] if u["file"].endswith(THROTTLE_FILES)]
        return bad, unread

    def throttle_evidence(r: dict, bad: list[str], mm: str) -> list[dict]:
        fname = "blkio.throttle.read_bps_device" if ver == 1 else "io.max"
        own = [r["path"], *[h for h in bad if h != r["path"]]]
        paths = own if ver == 1 else [p for h in own for p in chain(h)]
        return [ev(p, fname, [e for e in (io_at(p) or {}).get("devices", []) if e["device"] == mm] or "no line")
                for p in paths]

    def throttle_fix(r: dict, bad: list[str], mm: str) -> str:
        if ver == 2:
            return (f"echo '{mm} wbps=<bytes/s> rbps=<bytes/s>' > io.max in "
                    + (" and ".join(f"{h} or an ancestor" for h in bad) + " (/kata_overhead: every sandbox's shim "
                       "and virtiofsd; or set sandbox_cgroup_only = true)"
                       if bad != [r["path"]] else
                       "the pod cgroup or an ancestor (kubepods/besteffort: every BestEffort pod below it)"))
        return (f"echo '{mm} <bytes/s>' > blkio.throttle.write_bps_device (and read_bps/iops) in "
                f"{', '.join(bad)}: on cgroup v1 a limit binds only the threads in that cgroup itself; Kata "
                "creates its cgroups with the sandbox (or move to cgroup v2, where io.max on kubepods/besteffort "
                "limits every pod below it)")

    specs = [s.strip() for s in pol.io.offline_devices.split(",") if s.strip()]
    off_pods = [r for r in rows if r["class"] == "offline" and r["level"] == "pod" and r["path"] in ios]
    targets = [mm for mm in devn if any(iomod.match_device(s, mm, devn) for s in specs)]
    # /kata_overhead/<id> is outside the pod's counters: on v1 it holds the VMM's I/O threads,
    # on v2 the shim and virtiofsd
    used = {r["path"]: iomod.devices_used(t, fs, r["path"]) for r in rows
            if r["level"] in ("pod", "overhead") and r["class"] in ("online", "offline")} if off_pods else {}
    if specs:
        if not targets:
            f.add("io.offline-throttle", t.node,
                  f"none of the offline data devices {', '.join(specs)} exists on the node",
                  [{"file": "/sys/dev/block", "value": sorted(devn.values())}],
                  "fix [io] offline_devices in the policy (device names or MAJ:MIN)")
        for r in off_pods:
            for mm in targets:
                bad, unread = unthrottled(r, mm)
                if not bad:
                    continue
                dev = f"{devn.get(mm, mm)} ({mm})"
                evid = throttle_evidence(r, bad, mm)
                if unread:
                    f.unknown("io.offline-throttle", _target(r), f"the throttle on {dev} could not be read",
                              unread, "run katactl with read access to the node's cgroup files")
                elif ver == 1 and _throttled_on(io_at(r["path"]), mm):
                    f.add("io.offline-throttle", _target(r),
                          f"offline pod's throttle on {dev} is on the pod cgroup, which cgroup v1 does not apply "
                          f"to the cgroups below it (blk-throttle is flat): none in {', '.join(bad)}",
                          evid, throttle_fix(r, bad, mm))
                else:
                    f.add("io.offline-throttle", _target(r),
                          f"offline pod has no bps/iops throttle on the offline data device {dev}"
                          + (f" in {', '.join(bad)}" if bad != [r["path"]] else "")
                          + (f", nor has any cgroup above {'it' if len(bad) == 1 else 'them'}" if ver == 2 else "")
                          + (" (sandbox_cgroup_only=false: the shim and virtiofsd, the guest's virtio-fs file I/O, "
                             "run there, outside kubepods)" if ver == 2 and bad != [r["path"]] else ""),
                          evid, throttle_fix(r, bad, mm))
    if pol.io.check_shared_devices and off_pods:
        for r in off_pods:
            srcs = [r["path"], *overhead_of(r)]
            mine: dict[str, tuple[str, int]] = {}
            for s in srcs:
                for mm, n in (used.get(s) or {}).items():
                    if n > mine.get(mm, ("", 0))[1]:
                        mine[mm] = (s, n)
            for mm in sorted(mine):
                bad, unread = unthrottled(r, mm)
                if ver == 2:  # io.stat counts each holder's subtree: only one that used mm does I/O on it
                    bad = [h for h in bad if mm in (used.get(h) or {})]
                if not bad:
                    continue
                sharers = [o for o in pods if o["class"] == "online" and mm in (used.get(o["path"]) or {})]
                if not sharers:
                    continue
                stat = "blkio.throttle.io_service_bytes_recursive" if ver == 1 else "io.stat"
                evid = [ev(mine[mm][0], stat, f"{mm} {mine[mm][1]} bytes"),
                        ev(sharers[0]["path"], stat, f"{mm} {(used.get(sharers[0]['path']) or {})[mm]} bytes")]
                dev = f"{devn.get(mm, mm)} ({mm})"
                if unread:
                    f.unknown("io.shared-device", _target(r), f"the throttle on {dev} could not be read",
                              evid + unread, "run katactl with read access to the node's cgroup files")
                    continue
                names = ", ".join(_target(o) for o in sharers[:3]) + (" ..." if len(sharers) > 3 else "")
                f.add("io.shared-device", _target(r),
                      f"offline pod does unthrottled I/O on {dev}, which online "
                      f"{'pods use' if len(sharers) > 1 else 'pod uses'} too: {names}",
                      evid + throttle_evidence(r, bad, mm),
                      "give offline work its own data disk, or throttle it on this device: "
                      + throttle_fix(r, bad, mm))
    weighted_rows = [r for r in pods + off_rows if any(has(r["path"], k) for k in iomod.WEIGHT_KINDS)]
    if (pol.io.check_weight_effective and any(r["class"] == "online" for r in weighted_rows)
            and any(r["class"] == "offline" for r in weighted_rows)):
        # the disks online and offline work meet on (shared, or the offline data disks): weights
        # must take effect there, whatever another disk (the system disk) uses
        off_used = {mm for r in off_pods for s in [r["path"], *overhead_of(r)] for mm in used.get(s) or {}}
        on_used = {mm for r in pods if r["class"] == "online" for mm in used.get(r["path"]) or {}}
        meet = [mm for mm in real if mm in set(targets) | (off_used & on_used)]
        idle = [mm for mm in (meet or real) if mm not in bfq_on | qos_on]
        if idle and (meet or len(idle) == len(real)):
            names = ", ".join(f"{devn.get(mm, mm)} ({mm})" for mm in idle[:4])
            f.add("io.weight-ineffective", t.node,
                  (f"I/O weights are set but {names}, where online and offline pods meet, "
                   f"use{'s' if len(idle) == 1 else ''} neither bfq nor io.cost (iocost): they have no effect there")
                  if meet else
                  "I/O weights are set but no disk uses bfq or io.cost (iocost): they have no effect",
                  [{"file": f"/sys/dev/block/{mm}/queue/scheduler", "value": sched.get(mm)} for mm in idle[:4]]
                  + [{"file": f"{d}/{'blkio.cost.qos' if ver == 1 else 'io.cost.qos'}",
                      "value": sorted(qos_on) or "not enabled"}],
                  "echo bfq > /sys/block/<disk>/queue/scheduler, or enable iocost: "
                  f"echo '<maj:min> enable=1' > {d}/{'blkio.cost.qos' if ver == 1 else 'io.cost.qos'}")


def _sibling_pair(a: str, b: str) -> tuple[str, str] | None:
    """The children of ``a``'s and ``b``'s nearest common ancestor on their paths (the two
    cgroups whose weights decide between them), None when one path contains the other."""
    pa, pb = ([p for p in cg.norm_cgpath(x).split("/") if p] for x in (a, b))
    i = 0
    while i < min(len(pa), len(pb)) and pa[i] == pb[i]:
        i += 1
    if i >= len(pa) or i >= len(pb):
        return None
    return "/" + "/".join(pa[:i + 1]), "/" + "/".join(pb[:i + 1])


def _holds_tasks(t: NodeTransport, d: str | None) -> bool | None:
    """Whether a v1 cgroup directory lists threads in ``tasks``; None when that is unknown."""
    if d is None:
        return None
    try:
        return bool(t.read_text(f"{d}/tasks").split())
    except OSError:
        return None


#: the files that hold a cgroup's bps/iops limits (v1 blkio, v2 io)
THROTTLE_FILES = ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device",
                  "blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device", "/io.max")


def _throttled_on(io: dict | None, mm: str) -> bool:
    """A finite bps/iops limit on device ``mm`` in this cgroup's own files."""
    return any(e["device"] == mm and e.get("throttled") for e in (io or {}).get("devices", []))


# -- rdt ---------------------------------------------------------------------------

def _offline_sandboxes(node) -> list:
    return list(node.sandboxes)  # co-location runs offline work in Kata


def _rdt_checks(f: Findings, pol: Policy, node) -> dict[int, str] | None:
    tree = node.rdt()
    if tree is None:
        f.add("rdt.unsupported", node.t.node, "RDT unsupported: resctrl is not mounted",
              [{"file": "/sys/fs/resctrl", "value": "not mounted"}],
              "mount -t resctrl resctrl /sys/fs/resctrl where the CPU has cat_l3/mba")
        return None
    groups = {g["name"]: g for g in tree["groups"]}
    for err in tree["errors"]:
        f.add(RDT_UNREADABLE, node.t.node, err, [{"file": err.partition(": ")[0], "value": None}],
              "check the resctrl mount (info/ is the kernel's)")
    for g in tree["groups"]:
        for err in g.get("errors", []):
            f.add(RDT_UNREADABLE, f"resctrl group {g['name']}", err, [{"file": err.partition(": ")[0], "value": None}],
                  "check the resctrl mount and the group's mode; rewrite a malformed schemata line")
    be = groups.get(pol.rdt.be_group)
    if be is None:
        if _offline_sandboxes(node):
            f.add("rdt.be-group", node.t.node,
                  f"no resctrl group {pol.rdt.be_group!r} while {len(node.sandboxes)} offline sandboxes run: "
                  "they share the whole LLC with online pods",
                  [{"file": tree["root"], "value": sorted(n for n in groups if n != "/")}],
                  f"create {tree['root']}/{pol.rdt.be_group} with L3 0-{pol.rdt.be_l3_max_percent:g}% "
                  "(koordinator's RDT plugin) and move offline tasks into it")
        return resctrl.tid_groups(tree)
    sch = be.get("schemata") or []
    cbm = tree["info"].get("L3", {}).get("cbmMask")
    lim = pol.rdt.be_l3_max_percent
    be_tgt, be_file = f"resctrl group {pol.rdt.be_group}", be["dir"] + "/schemata"
    bad = be.get("_bad") or []
    l3_lines = [ln for ln in sch if ln["kind"] == "cache" and ln["resource"].startswith("L3")]
    if be.get("schemata") is None or any(r is None or r.startswith("L3") for r in bad):
        f.unknown("rdt.be-l3", be_tgt, "the BE group's L3 share: its schemata "
                  + ("could not be read" if be.get("schemata") is None else "has an L3 line katactl cannot parse"),
                  [{"file": be_file, "value": [e for e in be.get("errors", []) if e.startswith(be_file)]}],
                  "check the resctrl mount; rewrite the BE group's L3 line")
    elif l3_lines and not isinstance(cbm, int):
        f.unknown("rdt.be-l3", be_tgt, "the BE group's L3 share: the cache's full mask is unknown",
                  [{"file": tree["root"] + "/info/L3/cbm_mask",
                    "value": tree["info"].get("L3", {}).get("cbmMaskRaw", "missing or unreadable")}],
                  "check the resctrl mount (info/L3/cbm_mask is the kernel's)")
    for ln in l3_lines:
        for d in ln["domains"]:
            total = d.get("totalWays")
            if not total:
                continue
            # koordinator's rounding: 0-30 % of 11 ways is ceil(3.3) = 4 ways (0xf)
            allowed = math.ceil(total * lim / 100.0)
            if d["ways"] > allowed:
                m = resctrl.mask_from_percent(cbm, 0, lim) if isinstance(cbm, int) else None
                f.add("rdt.be-l3", f"resctrl group {pol.rdt.be_group}",
                      f"BE group may use {d['ways']} of {total} L3 ways ({d['percent']:g}%) on cache id {d['id']} "
                      f"({ln['resource']}); policy allows {lim:g}% = {allowed} ways",
                      [{"file": be["dir"] + "/schemata", "value": f"{ln['resource']}:{d['id']}={d['mask'][2:]}"}],
                      f"write a smaller mask to {be['dir']}/schemata"
                      + (f", e.g. {ln['resource']}:{d['id']}={m:x} (0-{lim:g}% of cbm_mask {cbm:x})" if m else ""))
    mb_lines = [ln for ln in sch if ln["kind"] == "bandwidth" and ln["resource"] == "MB"]
    if pol.rdt.be_mb_max_percent < 100 and "MB" in bad:
        f.unknown("rdt.be-mb", be_tgt, "the BE group's memory bandwidth: its MB line cannot be parsed",
                  [{"file": be_file, "value": [e for e in be.get("errors", []) if e.startswith(be_file)]}],
                  "check the resctrl mount; rewrite the BE group's MB line")
    elif pol.rdt.be_mb_max_percent < 100 and mb_lines and tree["mbUnit"] != "percent":
        # MBps (mba_MBps) and AMD's eighths of GB/s are absolute: no percentage to compare with
        f.unknown("rdt.be-mb", be_tgt, f"the BE group's memory bandwidth is in {tree['mbUnit']} on this node, "
                  f"not a percentage: the policy's {pol.rdt.be_mb_max_percent:g}% cannot be compared",
                  [{"file": be_file, "value": mb_lines[0]["domains"]}],
                  "disable rdt.be-mb for these nodes, or leave [rdt] be_mb_max_percent at 100")
    for ln in mb_lines:
        for d in ln["domains"]:
            if "percent" in d and d["percent"] > pol.rdt.be_mb_max_percent:
                f.add("rdt.be-mb", be_tgt,
                      f"BE memory bandwidth {d['percent']}% on domain {d['id']} > {pol.rdt.be_mb_max_percent:g}%",
                      [{"file": be_file, "value": f"MB:{d['id']}={d['percent']}"}],
                      f"write MB:{d['id']}={int(pol.rdt.be_mb_max_percent)} to the BE schemata")
    return resctrl.tid_groups(tree)


# -- kata --------------------------------------------------------------------------

def _kata_checks(f: Findings, pol: Policy, node, tid_group: dict[int, str] | None) -> None:
    tree = node.rdt() if tid_group is not None else None  # the tree _rdt_checks read (cached)
    be = next((g for g in tree["groups"] if g["name"] == pol.rdt.be_group), None) if tree is not None else None
    be_exists = be is not None
    # the BE group's tasks unread: a thread not found there may be there after all
    be_tasks_unknown = be is not None and be.get("_tasksUnknown", False)
    be_tasks_file = be["dir"] + "/tasks" if be is not None else None
    vmm_threads: dict[str, list[dict]] = {}
    for sb in node.sandboxes:
        if sb.hypervisor_pid:
            try:
                vmm_threads[sb.id] = threads.list_threads(node.t, sb.hypervisor_pid, hypervisor=sb.hypervisor,
                                                          tid_groups=tid_group, controllers=("cpu", "unified"))
            except NotFound:
                pass
    qmp = threads.qmp_vcpus_many(node.t, [sb for sb in node.sandboxes if sb.id in vmm_threads and threads.needs_identity(
        sb.hypervisor, sum(th["role"] == "vcpu" for th in vmm_threads[sb.id]))])
    for sb in node.sandboxes:
        tgt = f"sandbox {sb.id[:12]}" + (f" (pod {sb.pod_ref})" if sb.pod_ref else "")
        sp, op = node.sandbox_cgroup(sb), node.overhead_cgroup(sb)
        if pol.kata.require_sandbox_cgroup_only and sb.sandbox_cgroup_only is False:
            ev = [{"file": sb.state_file, "key": "Config.SandboxCgroupOnly", "value": False},
                  {"file": sb.state_file, "key": "OverheadCgroupPath", "value": sb.overhead_cgroup_path}]
            if op:
                d = node.fs.dir("cpu", op)
                if d:
                    try:
                        n = len(node.t.read_text(d + "/tasks" if node.fs.version_of("cpu") == 1
                                                 else d + "/cgroup.threads").split())
                        ev.append({"file": d + ("/tasks" if node.fs.version_of("cpu") == 1 else "/cgroup.threads"),
                                   "value": f"{n} threads"})
                    except OSError:
                        pass
            # v2 moves whole processes: the runtime's vCPU move (the TID to cgroup.procs) takes the whole
            # VMM into the sandbox cgroup (katactl.isolation.threads); v1 moves the vCPU threads alone
            msg = (f"sandbox_cgroup_only=false: the shim and virtiofsd run in {op or 'kata_overhead'} outside the "
                   "pod's offline CPU/memory limits (cgroup v2: the whole VMM, I/O threads included, is in the "
                   "sandbox cgroup, moved with its vCPU threads)" if node.fs.version_of("cpu") == 2 else
                   "sandbox_cgroup_only=false: the VMM's non-vCPU threads (I/O, virtiofsd, shim) run in "
                   f"{op or 'kata_overhead'} outside the pod's offline CPU/memory limits")
            f.add("kata.sandbox-cgroup-only", tgt, msg,
                  ev, "set [runtime] sandbox_cgroup_only = true in the Kata configuration (new sandboxes)")
        if not sb.hypervisor_pid:
            if sb.vmm_note:
                # runtime-rs persists no VMM pid and it could not be found: say so, never skip silently
                f.add("kata.unreadable", tgt, f"{sb.vmm_note}: its VMM threads were not checked",
                      [{"file": f"{sb.bundle}/shim.pid" if sb.bundle else sb.state_file, "value": sb.shim_pid}],
                      "run katactl where the node's /proc is visible (a host-root without /proc cannot "
                      "show processes)")
            continue
        ths = vmm_threads.get(sb.id)
        if ths is None:
            f.add("kata.unreadable", tgt, f"hypervisor pid {sb.hypervisor_pid} is not running: threads not checked",
                  [{"file": f"/proc/{sb.hypervisor_pid}", "value": "missing"}], "katactl sandbox list (stale state?)")
            continue
        ident = threads.identify_vcpus(node.t, sb, ths, qmp=qmp.get(sb.id))
        vcpus = [th for th in ths if th["role"] == "vcpu"]
        if ident["by"] is None:
            # which threads are the vCPUs is unknown: a check every thread passes (or fails) holds
            # for the vCPUs too; anything else is unknown, said so, never passed
            vcpus = [th for th in ths if th["tid"] != sb.hypervisor_pid]
        unknown: list[str] = []
        if pol.kata.vcpus_in_sandbox_cgroup and sp:
            lost = [th for th in vcpus if th.get("cgroupError")]
            if lost:
                f.unknown("kata.vcpu-cgroup", tgt, f"whether {len(lost)} of {len(vcpus)} vCPU threads are in the "
                          f"sandbox cgroup {sp}: {lost[0]['cgroupError']}",
                          [{"file": f"/proc/{sb.hypervisor_pid}/task/{th['tid']}/cgroup", "value": None,
                            "error": th["cgroupError"]} for th in lost[:8]],
                          "run katactl as root in the host's cgroup namespace, where the node's /proc is visible")
            placed = [th for th in vcpus if not th.get("cgroupError")]
            outside = [th for th in placed if not threads.inside(threads.primary_cgroup(th), sp)]
            if ident["by"] is None and outside and len(outside) < len(placed):
                unknown.append(f"whether they are in the sandbox cgroup {sp}")
            elif outside:
                f.add("kata.vcpu-cgroup", tgt,
                      (f"{len(outside)} of {len(vcpus)} vCPU threads are outside the sandbox cgroup {sp}"
                       if ident["by"] is not None else
                       f"none of the VMM's {len(placed)} other threads (its vCPU threads among them) is in the "
                       f"sandbox cgroup {sp}"),
                      [{"file": f"/proc/{sb.hypervisor_pid}/task/{th['tid']}/cgroup",
                        "value": f"{th['name']}: {threads.primary_cgroup(th)}"} for th in outside[:8]],
                      "the runtime moves vCPU threads after boot; check the shim log, or restart the pod")
        if tid_group is not None and pol.rdt.check_threads and vcpus and be_exists:
            wrong = [th for th in vcpus if th.get("resctrlGroup") != pol.rdt.be_group]
            if wrong and be_tasks_unknown:
                f.unknown("rdt.offline-threads", tgt, f"whether {len(wrong)} vCPU threads are in resctrl group "
                          f"{pol.rdt.be_group!r}: its tasks file could not be read",
                          [{"file": be_tasks_file, "value": None}], "check the resctrl mount")
            elif ident["by"] is None and wrong and len(wrong) < len(vcpus):
                unknown.append(f"whether they are in resctrl group {pol.rdt.be_group!r}")
            elif wrong:
                f.add("rdt.offline-threads", tgt,
                      (f"{len(wrong)} of {len(vcpus)} vCPU threads are not in resctrl group {pol.rdt.be_group!r}"
                       if ident["by"] is not None else
                       f"none of the VMM's {len(vcpus)} other threads (its vCPU threads among them) is in resctrl "
                       f"group {pol.rdt.be_group!r}"),
                      [{"file": f"/proc/{sb.hypervisor_pid}/task/{th['tid']}", "value":
                        f"{th['name']}: resctrl group {th.get('resctrlGroup')}"} for th in wrong[:8]],
                      f"echo TID > /sys/fs/resctrl/{pol.rdt.be_group}/tasks for each vCPU thread "
                      "(koordinator's resctrl reconciler does this for BE pods)")
        if unknown:
            f.add("kata.unreadable", tgt,
                  f"vCPU threads not identified ({ident['note']}): not checked " + " nor ".join(unknown),
                  [{"file": f"/proc/{sb.hypervisor_pid}/task", "value": sorted({th["name"] for th in vcpus})}],
                  'set extra_monitor_socket = "qmp" in [hypervisor.qemu] (katactl asks QMP query-cpus-fast '
                  "for the vCPU thread ids, as the runtime does), or enable_debug = true (named vCPU threads)")
