"""Intel RDT through resctrl: groups, decoded schemata, monitoring.

Layout (Documentation/arch/x86/resctrl.rst): the mount root is the default
group; each top-level directory except ``info``, ``mon_groups`` and
``mon_data`` is a CTRL_MON group; ``mon_groups/<x>`` are monitor-only groups.
Each group has ``tasks``, ``cpus``, ``cpus_list``, ``schemata``, ``mode``,
``size`` and ``mon_data/mon_L3_<id>/{llc_occupancy,mbm_total_bytes,
mbm_local_bytes}``. Schemata lines: ``L3:0=fff;1=fff`` (hex capacity bitmasks
per cache id; ``L3DATA``/``L3CODE`` with CDP; ids may have gaps),
``MB:0=100;1= 50`` (the kernel pads to its data width). What an MB value means
depends on the mount and the vendor (resctrl.rst "Memory bandwidth Allocation
(default mode)", "... specified in MBps" and "Reading/writing the schemata file
(on AMD systems)"): Intel, percent (10..100); Intel mounted ``mba_MBps``, MBps
up to ``MBA_MAX_MBPS = U32_MAX`` (include/linux/resctrl.h), which every group
shows until someone writes a limit; AMD (and ``SMBA``), "multiples of one eighth
GB/s", unthrottled at 2048 (``MAX_MBA_BW_AMD``, later ``1 << eax``).
"""
from __future__ import annotations

import math
import re
import time

from katactl.errors import UsageError
from katactl.backends.base import NodeTransport

SPECIAL = {"info", "mon_groups", "mon_data"}
CACHE_RES = re.compile(r"^(L2|L3)(DATA|CODE)?$")
_LINE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*:\s*(.*?)\s*$")
_DOM = re.compile(r"^\s*([0-9]+)\s*=\s*([0-9A-Za-z]+)\s*$")
#: digits in a cache id: the kernel prints an int; a longer run is garbage, and past 4300
#: digits int() itself refuses it (ValueError)
_MAX_DIGITS = 9
#: the largest bandwidth value: MBA_MAX_MBPS (include/linux/resctrl.h), mba_MBps's default
U32_MAX = 4294967295
#: what an MB value counts, per mount and vendor (see the module docstring)
MB_UNITS = ("percent", "MBps", "GBps/8")
#: the key a decoded bandwidth domain carries its value under, per unit
_MB_KEY = {"percent": "percent", "MBps": "mbps", "GBps/8": "gbpsEighths"}


#: what a group in mode pseudo-locksetup shows for each resource: no allocation yet
#: (rdtgroup_schemata_show, fs/resctrl/ctrlmondata.c, formerly arch/x86/kernel/cpu/resctrl/;
#: resctrl.rst "Cache Pseudo-Locking")
UNINITIALIZED = "uninitialized"


class SchemataError(ValueError):
    """A schemata line that does not follow the kernel's format."""


def parse_schemata(text: str) -> list[dict]:
    """'L3:0=fff;1=fff\\nMB:0=100' -> [{"resource": "L3", "domains": {0: "fff", 1: "fff"}}, ...].

    Raises SchemataError naming the first malformed line (for user-given lines)."""
    lines, bad = parse_schemata_lines(text)
    if bad:
        raise SchemataError(bad[0]["error"])
    return lines


def parse_schemata_lines(text: str) -> tuple[list[dict], list[dict]]:
    """A node's schemata: (good lines, bad lines). Each resource line stands alone, as the
    kernel keeps it: a line katactl cannot parse is reported (``{"resource": RES or None,
    "error": ...}``) and loses only that resource, never the group's other lines."""
    out, bad = [], []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        m = _LINE.fullmatch(raw)
        try:
            out.append(_parse_line(n, raw, m))
        except SchemataError as e:
            bad.append({"resource": m.group(1).upper() if m else None, "error": str(e)})
    return out, bad


def _parse_line(n: int, raw: str, m: re.Match | None) -> dict:
    if not m:
        raise SchemataError(f"line {n} {_clip(raw)}: expected RESOURCE:ID=VALUE;ID=VALUE")
    res, body = m.group(1).upper(), m.group(2)
    if body == UNINITIALIZED:
        return {"resource": res, "domains": {}, "uninitialized": True, "line": raw.strip()}
    if not body:
        raise SchemataError(f"line {n} {_clip(raw)}: no domains after '{m.group(1)}:'")
    doms: dict[int, str] = {}
    for part in body.split(";"):
        dm = _DOM.fullmatch(part)
        if not dm:
            raise SchemataError(f"line {n} {_clip(raw)}: bad domain {_clip(part)} (expected ID=VALUE)")
        if len(dm.group(1)) > _MAX_DIGITS:
            raise SchemataError(f"line {n} {_clip(raw)}: cache id {_clip(dm.group(1))} is too large")
        did, val = int(dm.group(1)), dm.group(2)
        if did in doms:
            raise SchemataError(f"line {n} {_clip(raw)}: cache id {did} appears twice")
        if CACHE_RES.fullmatch(res):
            if not re.fullmatch(r"[0-9a-fA-F]+", val):
                raise SchemataError(f"line {n} {_clip(raw)}: mask {_clip(val)} for id {did} is not hexadecimal")
        elif res.startswith("MB") or res == "SMBA":
            if not _is_u32(val):
                raise SchemataError(f"line {n} {_clip(raw)}: bandwidth {_clip(val)} for id {did} is not a number "
                                    f"from 0 to {U32_MAX}")
        doms[did] = val
    return {"resource": res, "domains": doms, "line": raw.strip()}


def _is_u32(val: str) -> bool:
    return val.isascii() and val.isdigit() and len(val) <= len(str(U32_MAX)) and int(val) <= U32_MAX


def _clip(s: str, n: int = 40) -> str:
    """s for a one-line message: quoted, and a long run (a 5000-digit id) cut short."""
    s = s.strip()
    return repr(s) if len(s) <= n else repr(s[:n]) + f"... ({len(s)} characters)"


def bits_of(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _ranges(bits: list[int]) -> str:
    from katactl.values import format_cpulist

    return format_cpulist(bits) if bits else "-"


def decode_mask(mask: int, cbm_mask: int | None, min_cbm_bits: int = 1, sparse: bool = False) -> dict:
    """A capacity bitmask -> ways, bit range and share of cbm_mask. ``sparse``: the node's
    info/<res>/sparse_masks is 1, so a non-contiguous mask is valid there."""
    bits = bits_of(mask)
    total = (cbm_mask or 0).bit_length() or None
    contiguous = not bits or bits == list(range(bits[0], bits[-1] + 1))
    d = {"mask": f"0x{mask:x}", "ways": len(bits), "bits": _ranges(bits), "contiguous": contiguous}
    if total:
        d["totalWays"] = total
        d["percent"] = round(100.0 * len(bits) / total, 1)
        d["startPercent"] = round(100.0 * bits[0] / total, 1) if bits else None
        d["endPercent"] = round(100.0 * (bits[-1] + 1) / total, 1) if bits else None
        if cbm_mask is not None and mask & ~cbm_mask:
            d["problem"] = f"mask sets bits outside cbm_mask 0x{cbm_mask:x}"
    if not bits:
        d["problem"] = "empty mask"
    elif not contiguous and not sparse:
        d["problem"] = "non-contiguous mask (Intel requires contiguous ways)"
    elif len(bits) < min_cbm_bits:
        d["problem"] = f"fewer than min_cbm_bits={min_cbm_bits} ways"
    return d


def mask_from_percent(cbm_mask: int, start_pct: float, end_pct: float) -> int:
    """koordinator's conversion: ways = bit length of cbm_mask; start = ceil(ways*start%),
    end = ceil(ways*end%); mask = (1<<end) - (1<<start)."""
    ways = cbm_mask.bit_length()
    start = math.ceil(ways * start_pct / 100.0)
    end = math.ceil(ways * end_pct / 100.0)
    return (1 << end) - (1 << start)


def decode_schemata(lines: list[dict], info: dict, mb_unit: str = "percent") -> list[dict]:
    """Parsed lines -> decoded lines (per domain: mask/ways/% or bandwidth in ``mb_unit``,
    one of :data:`MB_UNITS`: see :func:`mb_unit`)."""
    out = []
    for ln in lines:
        res = ln["resource"]
        m = CACHE_RES.fullmatch(res)
        doms = []
        extra: dict = {}
        if m:
            base = info.get(m.group(1), {})
            cbm = base.get("cbmMask")
            minb = base.get("minCbmBits") or 1
            sparse = base.get("sparseMasks") == 1
            for did in sorted(ln["domains"]):
                d = {"id": did, **decode_mask(int(ln["domains"][did], 16), cbm, minb, sparse)}
                doms.append(d)
            kind = "cache"
        else:
            kind = "bandwidth" if res.startswith("MB") or res == "SMBA" else "other"
            # SMBA exists on AMD only, in the same eighths of GB/s
            unit = "GBps/8" if res == "SMBA" else mb_unit
            for did in sorted(ln["domains"]):
                raw = ln["domains"][did]
                # a resource katactl does not know keeps its text unless it is a small number
                v = int(raw) if _is_u32(raw) else raw
                d = {"id": did, _MB_KEY[unit]: v}
                if unit == "GBps/8" and isinstance(v, int):
                    d["gbps"] = v / 8
                doms.append(d)
            if kind == "bandwidth":
                extra["unit"] = unit
        if ln.get("uninitialized"):
            extra["uninitialized"] = True
        out.append({"resource": res, "kind": kind, "cdp": res.endswith(("DATA", "CODE")), **extra, "domains": doms})
    return out


def summarize(decoded: list[dict]) -> dict:
    """Compact per-resource strings for tables: 'L3': '0=0xf(4w 36%);1=...'."""
    out = {}
    for ln in decoded:
        parts = []
        for d in ln["domains"]:
            if ln["kind"] == "cache":
                pct = f" {d['percent']:g}%" if "percent" in d else ""
                parts.append(f"{d['id']}={d['mask']}({d['ways']}w{pct})")
            else:
                if "gbps" in d:
                    parts.append(f"{d['id']}={d['gbps']:g}GB/s")
                elif "mbps" in d:
                    parts.append(f"{d['id']}={d['mbps']}MBps")
                else:
                    v = d.get("percent", d.get("gbpsEighths"))
                    parts.append(f"{d['id']}={v}{'%' if 'percent' in d else ''}")
        out[ln["resource"]] = UNINITIALIZED if ln.get("uninitialized") else ";".join(parts)
    return out


def max_cache_percent(decoded: list[dict]) -> tuple[float | None, str | None]:
    """The largest L3 share (any line, any cache id) and the line it came from."""
    best, where = None, None
    for ln in decoded:
        if ln["kind"] != "cache" or not ln["resource"].startswith("L3"):
            continue
        for d in ln["domains"]:
            p = d.get("percent")
            if p is not None and (best is None or p > best):
                best, where = p, f"{ln['resource']}:{d['id']}={d['mask'][2:]}"
    return best, where


# -- reading a resctrl tree ---------------------------------------------------

def _read(transport: NodeTransport, path: str, errors: list[str]) -> str | None:
    """A resctrl file's text; None when absent, or when it could not be read: then the reason
    joins ``errors``. The kernel fails single files (rdtgroup_cpus_show, rdtgroup_size_show:
    -ENODEV "Cache domain offline" for a pseudo-locked group, fs/resctrl/rdtgroup.c): that
    costs the file, never the whole tree."""
    try:
        return transport.read_text(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        errors.append(f"{path}: {e.strerror or e}")
        return None


_HEX = re.compile(r"(?:0[xX])?([0-9a-fA-F]+)")


def parse_cbm_hex(text: str) -> int:
    """A cache's full mask (info/<res>/cbm_mask, ``7ff`` or ``0x7ff``): hex digits only, and a
    run of ones from bit 0, as the kernel makes it (default_ctrl = BIT_MASK(cbm_len) - 1;
    resctrl.rst: "cbm_mask: The bitmask which is valid for this resource. This mask is
    equivalent to 100%"). Raises ValueError saying why."""
    t = text.strip()
    m = _HEX.fullmatch(t)
    if not m or len(m.group(1)) > 16:
        raise ValueError(f"{_clip(t)} is not a hex mask such as 7ff")
    mask = int(m.group(1), 16)
    if mask == 0 or mask & (mask + 1):
        raise ValueError(f"{_clip(t)} is not a run of ones from bit 0 such as 7ff")
    return mask


def _int_or_none(s: str | None):
    if s is None:
        return None
    s = s.strip()
    try:
        return int(s)
    except ValueError:
        return None


def read_info(transport: NodeTransport, root: str, errors: list[str] | None = None) -> dict:
    """info/: per resource its geometry. A file that cannot be read or parsed is left out
    and said in ``errors`` (cbm_mask keeps its text as ``cbmMaskRaw``)."""
    errors = [] if errors is None else errors
    info: dict = {}
    base = root + "/info"
    try:
        names = transport.listdir(base)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return info
    for res in names:
        d = f"{base}/{res}"
        if not transport.is_dir(d):
            if res == "last_cmd_status":
                info["lastCmdStatus"] = (_read(transport, d, errors) or "").strip()
            continue
        e: dict = {}
        cbm = _read(transport, d + "/cbm_mask", errors)
        if cbm is not None:
            try:
                e["cbmMask"] = parse_cbm_hex(cbm)
            except ValueError as err:
                e["cbmMaskRaw"] = cbm.strip()[:40]
                errors.append(f"{d}/cbm_mask: {err}")
        for fname, key in (("num_closids", "numClosids"), ("min_cbm_bits", "minCbmBits"),
                           ("min_bandwidth", "minBandwidth"), ("bandwidth_gran", "bandwidthGran"),
                           ("delay_linear", "delayLinear"), ("num_rmids", "numRmids"),
                           ("sparse_masks", "sparseMasks")):
            v = _int_or_none(_read(transport, f"{d}/{fname}", errors))
            if v is not None:
                e[key] = v
        sb = _read(transport, d + "/shareable_bits", errors)
        if sb is not None:
            e["shareableBits"] = ("0x" + sb.strip()) if sb.strip() else None
        bu = _read(transport, d + "/bit_usage", errors)
        if bu is not None:
            e["bitUsage"] = bu.strip()
        mf = _read(transport, d + "/mon_features", errors)
        if mf is not None:
            e["monFeatures"] = mf.split()
        info[res] = e
    for res in ("L3DATA", "L3CODE"):  # CDP: masks are checked against the L3 geometry
        if res in info and "L3" not in info:
            info["L3"] = info[res]
    return info


def list_groups(transport: NodeTransport, root: str) -> list[tuple[str, str, str | None]]:
    """(name, node dir, parent ctrl group) for the default group, CTRL_MON and MON groups."""
    out: list[tuple[str, str, str | None]] = [("/", root, None)]
    for ctrl_name, ctrl_dir in [("/", root)] + [(n, f"{root}/{n}") for n in _subdirs(transport, root) if n not in SPECIAL]:
        if ctrl_name != "/":
            out.append((ctrl_name, ctrl_dir, None))
        for mon in _subdirs(transport, ctrl_dir + "/mon_groups"):
            label = f"{'' if ctrl_name == '/' else ctrl_name}/mon_groups/{mon}"
            out.append((label, f"{ctrl_dir}/mon_groups/{mon}", ctrl_name))
    return out


def _subdirs(transport: NodeTransport, d: str) -> list[str]:
    try:
        return [n for n in transport.listdir(d) if transport.is_dir(f"{d}/{n}")]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def read_mon(transport: NodeTransport, gdir: str, errors: list[str] | None = None) -> dict:
    """{domain: {llc_occupancy, mbm_total_bytes, mbm_local_bytes}} (None = Unavailable or,
    said in ``errors``, unreadable)."""
    errors = [] if errors is None else errors
    out = {}
    for dom in _subdirs(transport, gdir + "/mon_data"):
        vals = {}
        for f in ("llc_occupancy", "mbm_total_bytes", "mbm_local_bytes"):
            raw = _read(transport, f"{gdir}/mon_data/{dom}/{f}", errors)
            if raw is not None:
                vals[f] = _int_or_none(raw)
        out[dom] = vals
    return out


def cpu_vendor(transport: NodeTransport) -> str | None:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, HygonGenuine), None if unknown."""
    try:
        raw = transport.read_text("/proc/cpuinfo", limit=1 << 16)
    except OSError:
        return None
    for line in raw.splitlines():
        if line.startswith("vendor_id"):
            return line.partition(":")[2].strip() or None
    return None


def mb_unit(transport: NodeTransport, info: dict, mba_mbps: bool) -> str:
    """What the node's MB values count (one of :data:`MB_UNITS`): MBps when mounted
    ``mba_MBps``; eighths of GB/s on AMD (and Hygon, which takes AMD's resctrl code),
    told by /proc/cpuinfo or, failing that, by info/MB as __rdt_get_mem_config_amd
    (arch/x86/kernel/cpu/resctrl/core.c) sets it: delay_linear 0 ("AMD does not use
    delay"; Intel MBA without a linear delay is not enabled at all), min_bandwidth 0,
    bandwidth_gran 1; percent otherwise."""
    if mba_mbps:
        return "MBps"
    vendor = cpu_vendor(transport)
    if vendor in ("AuthenticAMD", "HygonGenuine"):
        return "GBps/8"
    mb = info.get("MB") or {}
    if vendor is None and mb.get("delayLinear") == 0 and mb.get("minBandwidth") == 0:
        return "GBps/8"
    return "percent"


def read_tree(transport: NodeTransport, root: str, *, interval: float = 0.0, mba_mbps: bool = False) -> dict:
    """The whole resctrl tree: info + groups with decoded schemata and monitoring.

    With interval > 0 the mon_data byte counters are read twice and rates
    (bytes/s) reported. Malformed files are reported per group, never raised; a
    malformed schemata line costs only its resource (``_bad`` lists those
    resources, None for a line whose resource is unknown, for the audit).
    """
    node_errors: list[str] = []
    info = read_info(transport, root, node_errors)
    unit = mb_unit(transport, info, mba_mbps)
    groups = []
    for name, gdir, parent in list_groups(transport, root):
        g: dict = {"name": name, "type": "default" if name == "/" else ("mon" if parent is not None else "ctrl_mon"),
                   "dir": gdir, "errors": []}
        if parent is not None:
            g["parent"] = parent
        errs = g["errors"]
        n = len(errs)
        tasks_raw = _read(transport, gdir + "/tasks", errs) or ""
        try:
            g["tasks"] = [int(x) for x in tasks_raw.split()]
        except ValueError:
            g["tasks"] = []
            errs.append(f"{gdir}/tasks: not a list of thread ids")
        if len(errs) > n:  # which threads sit here is unknown (the audit says so)
            g["_tasksUnknown"] = True
        g["cpusList"] = (_read(transport, gdir + "/cpus_list", errs) or "").strip() or None
        g["mode"] = (_read(transport, gdir + "/mode", errs) or "").strip() or None
        if parent is None:
            n = len(errs)
            sch = _read(transport, gdir + "/schemata", errs)
            if len(errs) > n:
                g["_bad"] = [None]
            if sch is not None:
                lines, bad = parse_schemata_lines(sch)
                g["schemata"] = decode_schemata(lines, info, unit)
                if bad:
                    g["_bad"] = [b["resource"] for b in bad]
                    g["errors"] += [f"{gdir}/schemata: {b['error']}" for b in bad]
        g["mon"] = read_mon(transport, gdir, errs)
        groups.append(g)
    if interval > 0 and any(g["mon"] for g in groups):
        t0 = time.monotonic()
        time.sleep(interval)
        dt = time.monotonic() - t0
        for g in groups:
            later = read_mon(transport, g["dir"])
            for dom, vals in g["mon"].items():
                for f in ("mbm_total_bytes", "mbm_local_bytes"):
                    a, b = vals.get(f), later.get(dom, {}).get(f)
                    if isinstance(a, int) and isinstance(b, int):
                        vals[f.replace("_bytes", "_rate")] = round(max(0, b - a) / dt)
                if isinstance(later.get(dom, {}).get("llc_occupancy"), int):
                    vals["llc_occupancy"] = later[dom]["llc_occupancy"]
    for g in groups:
        if not g["errors"]:
            del g["errors"]
        if g.get("schemata") is not None:
            g["summary"] = summarize(g["schemata"])
    return {"root": root, "info": info, "mbUnit": unit, "groups": groups, "errors": node_errors}


def tid_groups(tree: dict) -> dict[int, str]:
    """tid -> resctrl group name (CTRL_MON group; MON groups refine monitoring only)."""
    out: dict[int, str] = {}
    for g in tree["groups"]:
        if g["type"] == "mon":
            continue
        for tid in g.get("tasks", []):
            out[tid] = g["name"]
    return out


def parse_cbm_mask(text: str) -> int:
    """A cache's full mask as the user gives it (``7ff``, ``0x7ff``), as :func:`parse_cbm_hex`."""
    try:
        return parse_cbm_hex(text)
    except ValueError as e:
        raise UsageError(f"invalid --cbm-mask: {e}") from None


def decode_lines(lines: list[str], cbm_mask: str | int | None, min_cbm_bits: int = 1) -> list[dict]:
    """For ``inspect rdt --decode``: user-given schemata lines, decoded against ``cbm_mask``
    (an int, or hex text as for :func:`parse_cbm_mask`), one row per domain
    (``{"resource": ..., "id": ..., "mask": ..., "ways": ..., ...}``). Bad input is a usage error."""
    if isinstance(cbm_mask, str):
        cbm_mask = parse_cbm_mask(cbm_mask)
    if not any(ln.strip() for ln in lines):
        raise UsageError("empty --decode: give a schemata line such as 'L3:0=7f0;1=ff'")
    try:
        parsed = parse_schemata("\n".join(lines))
    except SchemataError as e:
        raise UsageError(f"invalid schemata: {e}") from None
    info = {"L3": {"cbmMask": cbm_mask, "minCbmBits": min_cbm_bits},
            "L2": {"cbmMask": cbm_mask, "minCbmBits": min_cbm_bits}}
    return [{"resource": ln["resource"], **d} for ln in decode_schemata(parsed, info) for d in ln["domains"]]


def cpu_has_rdt(transport: NodeTransport) -> dict:
    """RDT flags from /proc/cpuinfo (what the CPU could do, mounted or not)."""
    raw = _read(transport, "/proc/cpuinfo", []) or ""
    flags: set[str] = set()
    for line in raw.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return {f: (f in flags) for f in ("cat_l3", "cdp_l3", "mba", "cqm_llc", "cqm_occup_llc",
                                      "cqm_mbm_total", "cqm_mbm_local")}
