"""Parsing of user-supplied values: sizes, CPU lists, durations.

Every parser raises katactl.errors.UsageError with a message that names the
bad value and shows an accepted form, so the CLI can exit 2 in one line.
"""
from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, DecimalException

from katactl.errors import UsageError

#: Kubernetes resource.Quantity suffixes (apimachinery pkg/api/resource/suffix.go): binary
#: Ki..Ei, decimal k..E, and the fractions n, u, m (m is milli: memory "256m" is 0.256 bytes),
#: or a decimal exponent (1e9, 1E9)
_QTY = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suf>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?",
                  re.ASCII)
_SUFFIX = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
           "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
           "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
           "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
           "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}
QTY_HELP = "a Kubernetes quantity such as 250m, 0.5, 160Mi or 1G"
_SIZE_RE = re.compile(r"(?P<num>\d+(?:\.\d+)?|\.\d+) *(?P<unit>[a-zA-Z]*|[eE][+-]?\d+)", re.ASCII)
MAX_SIZE = 1 << 62

SIZE_HELP = ("a size such as 512Mi, 1.5Gi, 2G or 1073741824 (bytes); Kubernetes units: "
             "Ki Mi Gi Ti are binary (1Gi = 2^30), k M G T decimal (1G = 10^9)")
#: spelled-out byte units, any case (not Kubernetes', but unambiguous): KiB.. binary, KB.. decimal
_SPELLED = {"b": 1, **{f"{p}ib": 1 << (10 * i) for i, p in enumerate("kmgtpe", 1)},
            **{f"{p}b": 10 ** (3 * i) for i, p in enumerate("kmgtpe", 1)}}
#: units people type that mean something else (or two things): refused with the way out
_AMBIGUOUS = {"m": "m is milli in Kubernetes (256m = 0.256 bytes): write Mi (2^20 bytes) or M (10^6)",
              "K": "K is not a Kubernetes unit: write Ki (1024 bytes) or k (1000)",
              **{u: f"{u} is not a Kubernetes unit: write {u.upper()}i (binary) or {u.upper()} (decimal)"
                 for u in ("g", "t", "p")},
              "n": "n (nano) is a fraction of a byte", "u": "u (micro) is a fraction of a byte"}


def parse_quantity(text, *, what: str = "quantity") -> Decimal:
    """A Kubernetes resource quantity (apimachinery's resource.Quantity syntax, no sign):
    '250m' -> 0.25, '160Mi' -> 167772160, '1e3' -> 1000. For quantities Kubernetes wrote
    (a RuntimeClass's overhead); a memory size a user types is :func:`parse_size`."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise UsageError(f"invalid {what} {text!r}: expected {QTY_HELP}")
    s = str(text).strip(" ")  # a newline or tab is not a quantity
    m = _QTY.fullmatch(s)
    if not m:
        raise UsageError(f"invalid {what} {text!r}: expected {QTY_HELP}")
    suf = m.group("suf") or ""
    try:
        mult = _SUFFIX[suf] if suf in _SUFFIX else Decimal(10) ** int(suf[1:])
        v = Decimal(m.group("num")) * mult
    except (DecimalException, ValueError, OverflowError):  # decimal.Overflow past Emax (1e99999999)
        # the syntax was right: the examples of the hint would mislead (parse_size's callers
        # refuse 250m), the exponent is what is wrong
        raise UsageError(f"invalid {what} {text!r}: exponent out of range") from None
    if v > MAX_SIZE:
        raise UsageError(f"invalid {what} {text!r}: too large")
    return v


def parse_size(text: str, *, allow_zero: bool = False, what: str = "size") -> int:
    """A memory (or byte) size a user typed -> bytes, read as Kubernetes reads a memory
    quantity (apimachinery resource.Quantity): '512Mi' -> 536870912, '2G' -> 2000000000,
    '1e9' -> 10**9, a fraction of a unit rounded up to whole bytes ('0.1Ki' -> 103). Also the
    spelled-out KiB/MiB/GiB (binary) and B/KB/MB/GB (decimal), any case. Refused with a hint:
    'm' (milli in Kubernetes, MiB to many people), upper-case 'K' and lower-case 'g', 't',
    'p' (binary or decimal? other tools disagree), and a fractional byte count ('1.5')."""
    if text is None or not str(text).strip():
        raise UsageError(f"empty {what}: expected {SIZE_HELP}")
    s = str(text).strip(" ")  # a newline or tab is not part of a size (a pasted value, a bad template)
    if s.startswith("-"):
        raise UsageError(f"invalid {what} {text!r}: must not be negative")
    m = _SIZE_RE.fullmatch(s)
    if not m:
        raise UsageError(f"invalid {what} {text!r}: expected {SIZE_HELP}")
    num, unit = m.group("num"), m.group("unit")
    if unit in _AMBIGUOUS:
        raise UsageError(f"invalid {what} {text!r}: {_AMBIGUOUS[unit]}")
    if unit.lower() in _SPELLED:
        v = Decimal(num) * _SPELLED[unit.lower()]
        if v > MAX_SIZE:
            raise UsageError(f"invalid {what} {text!r}: too large")
    elif _QTY.fullmatch(num + unit):
        v = parse_quantity(num + unit, what=what)
    else:
        raise UsageError(f"invalid {what} {text!r}: unknown unit {unit!r} (use Ki, Mi, Gi, Ti (binary), "
                         "k, M, G, T (decimal), or KiB, MiB, GiB, B, MB, GB)")
    if v != v.to_integral_value() and (unit[:1] in ("", "b", "B", "e") or re.fullmatch(r"E[+-]?\d+", unit)):
        # a byte count (1.5, 1.5B, 1e-3): a fraction of a byte is a typo, not a round-up
        raise UsageError(f"invalid {what} {text!r}: a byte count must be a whole number")
    result = int(v.to_integral_value(rounding=ROUND_CEILING))  # Kubernetes rounds memory up (Quantity.Value)
    if result == 0 and not allow_zero:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    return result


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
