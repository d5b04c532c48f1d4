"""The co-location audit policy: a TOML file whose defaults follow koordinator.

Unknown keys and wrong types are usage errors that name the key, so a typo in
a policy never silently turns a check off. See docs/audit-policy.example.toml.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from katactl.errors import UsageError

SEVERITIES = ("info", "low", "medium", "high", "critical")

#: check id -> (default severity, one-line meaning)
CHECKS: dict[str, tuple[str, str]] = {
    "cpu.online-weight": ("medium", "online pods are cpuset-pinned or have a high CPU weight"),
    "cpu.offline-weight": ("high", "offline Kata sandboxes / BE pods have a low CPU weight"),
    "bvt.unsupported": ("info", "the kernel has no BVT group identity"),
    "bvt.switch": ("high", "kernel.sched_group_identity_enabled is on"),
    "bvt.tree": ("medium", "kubepods / QoS-level cgroups carry koordinator's bvt values"),
    "bvt.online": ("medium", "online pods are high class (bvt 2)"),
    "bvt.offline": ("high", "offline Kata sandboxes are underclass (bvt -1 or -2) on the cgroup holding their vCPUs"),
    "bvt.core-sched": ("medium", "core scheduling is off where underclass bvt (-1, -2) is used"),
    "memcg.unsupported": ("info", "the kernel has no Alinux memcg QoS knobs"),
    "memcg.priority-order": ("medium", "online memcg priorities are above offline ones, with priority OOM on"),
    "memcg.wmark": ("low", "async reclaim watermarks follow koordinator"),
    "rdt.unsupported": ("info", "resctrl is not mounted"),
    "rdt.be-group": ("medium", "a BE resctrl group exists when offline sandboxes run"),
    "rdt.be-l3": ("high", "the BE group's L3 share is at most the policy's percentage"),
    "rdt.be-mb": ("low", "the BE group's memory bandwidth is at most the policy's percentage"),
    "rdt.offline-threads": ("medium", "offline sandboxes' vCPU threads sit in the BE group"),
    "rdt.unreadable": ("low", "every resctrl file could be read and parsed"),
    "io.unsupported": ("info", "neither the blkio (v1) nor the io (v2) controller is available"),
    "io.offline-weight": ("medium", "offline cgroups have a lower I/O weight than their online siblings "
                                    "(kubepods/besteffort below kubepods/burstable)"),
    "io.offline-throttle": ("high", "offline pods are throttled (bps or iops) on the offline data devices where "
                                    "the kernel applies it (v1: each cgroup holding the VM's threads; v2: io.max "
                                    "of the pod or an ancestor)"),
    "io.shared-device": ("high", "no online pod shares a device with an offline sandbox that has no throttle there"),
    "io.weight-ineffective": ("low", "I/O weights take effect (bfq scheduler or io.cost.qos enabled on the device)"),
    "kata.vcpu-cgroup": ("high", "every vCPU thread is inside its sandbox cgroup"),
    "kata.sandbox-cgroup-only": ("medium", "sandbox_cgroup_only=true keeps the VMM inside the offline limits"),
    "kata.unreadable": ("low", "a sandbox's threads or cgroups could be read"),
}


@dataclasses.dataclass
class CpuPolicy:
    online_min_shares: int = 1024
    offline_max_shares: int = 2
    accept_pinned: bool = True


@dataclasses.dataclass
class BvtPolicy:
    online: int = 2     # koordinator LSR = LS = 2
    offline: int = -1   # koordinator BE = -1
    kubepods: int = 0   # kubepods root stays 0
    require_switch: bool = True


@dataclasses.dataclass
class MemcgPolicy:
    check_priority: bool = True
    check_wmark: bool = True
    wmark_ratio: int = 95            # koordinator WmarkRatio (LS/LSR/BE)
    wmark_min_adj_online: int = -25  # koordinator WmarkMinAdj LS/LSR
    wmark_min_adj_offline: int = 50  # koordinator WmarkMinAdj BE


@dataclasses.dataclass
class RdtPolicy:
    be_group: str = "BE"
    be_l3_max_percent: float = 30.0   # koordinator BE L3 0-30 %
    be_mb_max_percent: float = 100.0  # koordinator MBA 100 %
    check_threads: bool = True


@dataclasses.dataclass
class IoPolicy:
    check_weight_order: bool = True
    offline_devices: str = ""     # comma list of names (vdb, /dev/vdb) or MAJ:MIN; "" = no such check
    check_shared_devices: bool = True
    check_weight_effective: bool = True


@dataclasses.dataclass
class KataPolicy:
    require_sandbox_cgroup_only: bool = True
    vcpus_in_sandbox_cgroup: bool = True


@dataclasses.dataclass
class Policy:
    cpu: CpuPolicy = dataclasses.field(default_factory=CpuPolicy)
    bvt: BvtPolicy = dataclasses.field(default_factory=BvtPolicy)
    memcg: MemcgPolicy = dataclasses.field(default_factory=MemcgPolicy)
    rdt: RdtPolicy = dataclasses.field(default_factory=RdtPolicy)
    io: IoPolicy = dataclasses.field(default_factory=IoPolicy)
    kata: KataPolicy = dataclasses.field(default_factory=KataPolicy)
    severity: dict[str, str] = dataclasses.field(default_factory=dict)
    disable: list[str] = dataclasses.field(default_factory=list)
    source: str = "built-in defaults (koordinator)"

    def severity_of(self, check: str) -> str:
        return self.severity.get(check, CHECKS[check][0])

    def enabled(self, check: str) -> bool:
        return check not in self.disable

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d


_RANGES: dict[str, tuple[float, float]] = {
    "cpu.online_min_shares": (2, 262144), "cpu.offline_max_shares": (2, 262144),
    "bvt.online": (-2, 2), "bvt.offline": (-2, 2), "bvt.kubepods": (-2, 2),
    "memcg.wmark_ratio": (0, 100), "memcg.wmark_min_adj_online": (-25, 50),
    "memcg.wmark_min_adj_offline": (-25, 50),
    "rdt.be_l3_max_percent": (0, 100), "rdt.be_mb_max_percent": (0, 100),
}

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_value(where: str, key: str, value: Any, typ) -> Any:
    name = f"{where}.{key}"
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise UsageError(f"policy key {name!r} must be {_TYPE_NAMES.get(typ, typ.__name__)}, got {value!r}")
    if name in _RANGES:
        lo, hi = _RANGES[name]
        if not lo <= value <= hi:
            raise UsageError(f"policy key {name!r} must be between {lo:g} and {hi:g}, got {value!r}")
    if typ is str and not value.strip():
        raise UsageError(f"policy key {name!r} must not be empty")
    if name == "io.offline_devices":
        import re

        for d in value.split(","):
            if not re.fullmatch(r"(/dev/)?[A-Za-z0-9_.-]+|\d+:\d+", d.strip()):
                raise UsageError(f"policy key {name!r}: {d.strip()!r} is not a device name or MAJ:MIN")
    return value


def from_dict(data: dict, source: str = "<dict>") -> Policy:
    pol = Policy(source=source)
    sections = {f.name: f for f in dataclasses.fields(Policy) if f.name not in ("source",)}
    for sec, body in data.items():
        if sec not in sections:
            raise UsageError(f"{source}: unknown policy section or key {sec!r} "
                             f"(known: {', '.join(sorted(sections))})")
        if sec == "severity":
            if not isinstance(body, dict):
                raise UsageError(f"{source}: policy key 'severity' must be a table of check = severity")
            for check, sev in body.items():
                if check not in CHECKS:
                    raise UsageError(f"{source}: unknown check {('severity.' + check)!r} "
                                     f"(checks: {', '.join(CHECKS)})")
                if sev not in SEVERITIES:
                    raise UsageError(f"{source}: policy key 'severity.{check}' must be one of "
                                     f"{', '.join(SEVERITIES)}, got {sev!r}")
                pol.severity[check] = sev
            continue
        if sec == "disable":
            if not isinstance(body, list) or not all(isinstance(x, str) for x in body):
                raise UsageError(f"{source}: policy key 'disable' must be a list of check ids")
            for c in body:
                if c not in CHECKS:
                    raise UsageError(f"{source}: unknown check {c!r} in 'disable' (checks: {', '.join(CHECKS)})")
            pol.disable = list(body)
            continue
        if not isinstance(body, dict):
            raise UsageError(f"{source}: policy key {sec!r} must be a table ([{sec}])")
        obj = getattr(pol, sec)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for k, v in body.items():
            if k not in fields:
                raise UsageError(f"{source}: unknown policy key {sec + '.' + k!r} "
                                 f"(known in [{sec}]: {', '.join(fields)})")
            declared = fields[k].type
            typ = {"int": int, "float": float, "bool": bool, "str": str}[declared] \
                if isinstance(declared, str) else declared
            try:
                setattr(obj, k, _check_value(sec, k, v, typ))
            except UsageError as e:
                raise UsageError(f"{source}: {e.message}") from None
    return pol


def load(path: str | None) -> Policy:
    """Load a policy file from the *client* machine (the operator's file), or defaults."""
    if path is None:
        return Policy()
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    from katactl.config import read_input

    try:
        raw = read_input(path, "policy file")
    except FileNotFoundError:
        raise UsageError(f"policy file {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"policy file {path}: is a directory") from None
    except OSError as e:
        raise UsageError(f"policy file {path}: cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"policy file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"policy file {path}: invalid TOML: {e}") from None
    return from_dict(data, source=path)
