"""Parsing of user-supplied values: sizes, CPU lists, durations.

Every parser raises katactl.errors.UsageError with a message that names the
bad value and shows an accepted form, so the CLI can exit 2 in one line.
"""
from __future__ import annotations

import math
import re

from katactl.errors import UsageError

_BINARY = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40, "pi": 1 << 50, "ei": 1 << 60}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15, "e": 10**18}
# Plain-unit aliases people type in runbooks ("512M", "2G", "1GB", "1GiB", "512MB").
_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$", re.ASCII)
MAX_SIZE = 1 << 62

SIZE_HELP = "a size such as 512Mi, 2G, 1.5Gi or 1073741824 (bytes)"


def parse_size(text: str, *, allow_zero: bool = False, what: str = "size") -> int:
    """'512Mi' -> 536870912. Kubernetes suffixes (Ki Mi Gi, k M G) and the
    common plain forms (K, M, G, KB, MB, GiB) are accepted; plain M/G are
    binary (as in QEMU's -m and free -h), Kubernetes' lower-case k is 1000."""
    if text is None or not str(text).strip():
        raise UsageError(f"empty {what}: expected {SIZE_HELP}")
    s = str(text).strip()
    if s.startswith("-"):
        raise UsageError(f"invalid {what} {text!r}: must not be negative")
    m = _SIZE_RE.match(s)
    if not m:
        raise UsageError(f"invalid {what} {text!r}: expected {SIZE_HELP}")
    num, unit = m.group("num"), m.group("unit")
    mult = _unit_multiplier(unit)
    if mult is None:
        raise UsageError(f"invalid {what} {text!r}: unknown unit {unit!r} (use Ki, Mi, Gi, Ti or K, M, G, T)")
    value = float(num) * mult
    if not math.isfinite(value) or value > MAX_SIZE:
        raise UsageError(f"invalid {what} {text!r}: too large")
    result = int(round(value))
    if "." in num and mult == 1:  # '1.5' and '1.5B' alike (1.5B became 2 bytes)
        raise UsageError(f"invalid {what} {text!r}: a byte count must be a whole number")
    if result == 0 and not allow_zero:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    return result


def _unit_multiplier(unit: str) -> int | None:
    if unit == "":
        return 1
    if unit == "k":  # Kubernetes decimal kilo
        return 1000
    u = unit.lower()
    if u in ("b",):
        return 1
    if u.endswith("ib") and u[:-1] in _BINARY:  # KiB, MiB, GiB
        return _BINARY[u[:-1]]
    if u in _BINARY:
        # Kubernetes "Mi" / plain "mi"
        return _BINARY[u]
    if len(unit) == 1 and u in _DECIMAL:
        # "512M", "2G", "1T": binary, as QEMU -m and kubectl users expect for memory;
        # Kubernetes' decimal "M"/"G" differ by <7 %, and memory sizes are binary in practice.
        return _BINARY[u + "i"]
    if u.endswith("b") and len(u) == 2 and u[0] in _DECIMAL:  # "MB", "GB": decimal
        return _DECIMAL[u[0]]
    return None


def format_size(n: int | float | None, *, precision: int = 1) -> str:
    """536870912 -> '512Mi' (exact binary units print without decimals)."""
    if n is None:
        return "-"
    n = int(n)
    sign = "-" if n < 0 else ""
    a = abs(n)
    for unit, mult in (("Ei", 1 << 60), ("Pi", 1 << 50), ("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if a >= mult:
            q = a / mult
            if a % mult == 0:
                return f"{sign}{a // mult}{unit}"
            return f"{sign}{q:.{precision}f}{unit}"
    return f"{sign}{a}B"


_CPU_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$", re.ASCII)
MAX_CPU = 8191


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0,1,2,3,8,10,11] (the kernel's cpuset list format)."""
    if text is None:
        raise UsageError("empty CPU list: expected a list such as 0-3,8,10-11")
    s = str(text).strip()
    if s == "":
        return []
    cpus: set[int] = set()
    for part in s.split(","):
        part = part.strip()
        m = _CPU_RANGE.fullmatch(part)
        if not m:
            raise UsageError(f"invalid CPU list {_clip(s)}: bad element {_clip(part)} (expected N or N-M, e.g. 0-3,8)")
        if max(len(g) for g in m.groups("")) > len(str(MAX_CPU)):
            # beyond MAX_CPU anyway, and int() refuses a run of over 4300 digits (ValueError)
            raise UsageError(f"invalid CPU list {_clip(s)}: CPU {_clip(part)} exceeds {MAX_CPU}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"invalid CPU list {_clip(s)}: range {_clip(part)} runs backwards")
        if hi > MAX_CPU:
            raise UsageError(f"invalid CPU list {_clip(s)}: CPU {hi} exceeds {MAX_CPU}")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def _clip(s: str, n: int = 40) -> str:
    """s quoted for a one-line message, a long one cut short."""
    return repr(s) if len(s) <= n else repr(s[:n]) + f"... ({len(s)} characters)"


def format_cpulist(cpus) -> str:
    """[0,1,2,3,8] -> '0-3,8'."""
    out: list[str] = []
    cpus = sorted(set(cpus))
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_BARE_SECONDS = re.compile(r"^\d+(?:\.\d+)?$", re.ASCII)
DURATION_HELP = "a duration such as 30s, 5m, 1h30m or 250ms (a bare number means seconds)"


def parse_duration(text: str, *, allow_zero: bool = False, what: str = "duration") -> float:
    """'1h30m' -> 5400.0 seconds; a bare number is seconds."""
    if text is None or not str(text).strip():
        raise UsageError(f"empty {what}: expected {DURATION_HELP}")
    s = str(text).strip().lower()
    if s.startswith("-"):
        raise UsageError(f"invalid {what} {text!r}: must not be negative")
    try:
        if not _BARE_SECONDS.fullmatch(s):  # float() would take 1e3, 1_0 and non-ASCII digits
            raise ValueError
        value = float(s)
    except ValueError:
        pos, value = 0, 0.0
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            value += float(m.group(1)) * scale[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise UsageError(f"invalid {what} {text!r}: expected {DURATION_HELP}") from None
    if value == 0 and not allow_zero:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    if value > 366 * 86400:
        raise UsageError(f"invalid {what} {text!r}: longer than a year")
    return value


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def local_dir(text, *, what: str, empty_hint: str = "give a directory") -> str:
    """A local directory argument, absolute. It may not exist yet (callers create it),
    but it may not be, or lie under, something that is not a directory."""
    import os

    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"invalid {what} '': {empty_hint}")
    if "\0" in text:
        raise UsageError(f"invalid {what} {text!r}: contains a NUL byte")
    path = os.path.abspath(text)
    p = path
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"invalid {what} {text}: " + ("not a directory" if p == path else f"{p} is not a directory"))
    return path
