"""cpu.shares (cgroup v1) <-> cpu.weight (cgroup v2).

Two shares->weight formulas are in use, and an audit must accept both:

- *kubelet* (KEP-2254; kubelet, koordinator, runc < 1.3.2):
  ``1 + (shares - 2) * 9999 / 262142`` (integer arithmetic; 1024 -> 39)
- *runc* (runc >= 1.3.2, crun >= 1.23):
  ``ceil(10 ** ((L*L + 125*L) / 612 - 7/34))`` with ``L = log2(shares)`` (1024 -> 100)
"""
from __future__ import annotations

import math

SHARES_MIN, SHARES_MAX = 2, 262144
WEIGHT_MIN, WEIGHT_MAX = 1, 10000


def clamp_shares(shares: int) -> int:
    return max(SHARES_MIN, min(SHARES_MAX, int(shares)))


def weight_kubelet(shares: int) -> int:
    """KEP-2254 / kubelet / koordinator formula."""
    s = clamp_shares(shares)
    return 1 + ((s - 2) * 9999) // 262142


def weight_runc(shares: int) -> int:
    """runc >= 1.3.2 / crun >= 1.23 formula."""
    if shares <= 0:
        return 0
    if shares <= 2:
        return 1
    if shares >= SHARES_MAX:
        return WEIGHT_MAX
    l2 = math.log2(shares)
    return min(WEIGHT_MAX, math.ceil(10 ** ((l2 * l2 + 125 * l2) / 612.0 - 7.0 / 34.0)))


def shares_kubelet(weight: int) -> int:
    """Inverse of the kubelet formula (what kubelet would have set as shares)."""
    w = max(WEIGHT_MIN, min(WEIGHT_MAX, int(weight)))
    return 2 + -(-((w - 1) * 262142) // 9999)  # smallest shares that map back to w


def shares_runc(weight: int) -> int:
    """Smallest shares value that runc maps to ``weight`` (or just above it)."""
    w = max(WEIGHT_MIN, min(WEIGHT_MAX, int(weight)))
    lo, hi = SHARES_MIN, SHARES_MAX
    while lo < hi:
        mid = (lo + hi) // 2
        if weight_runc(mid) >= w:
            hi = mid
        else:
            lo = mid + 1
    return lo


def weight_view(shares: int) -> dict:
    """Both conversions of a v1 shares value; ``agree`` is False where they differ."""
    a, b = weight_kubelet(shares), weight_runc(shares)
    return {"kubelet": a, "runc": b, "agree": a == b}


def shares_view(weight: int) -> dict:
    """What a v2 weight means in shares under each formula."""
    a, b = shares_kubelet(weight), shares_runc(weight)
    return {"kubelet": a, "runc": b, "agree": a == b}


def weight_at_most(weight: int, max_shares: int) -> bool:
    """True if a v2 weight is no higher than max_shares under either formula."""
    return weight <= max(weight_kubelet(max_shares), weight_runc(max_shares))


def weight_at_least(weight: int, min_shares: int) -> bool:
    """True if a v2 weight reaches min_shares under either formula."""
    return weight >= min(weight_kubelet(min_shares), weight_runc(min_shares))
