"""Shim metrics: parsing (prometheus_client's text parser, imported lazily),
family filtering, and the per-sandbox figures ``katactl top`` shows.

Sizes: ``kata_guest_meminfo`` is bytes (the agent's procfs crate converts the
kernel's kB); ``*_proc_status`` is bytes from the Go shim (prometheus/procfs
converts) but kB from runtime-rs, which sets the Rust procfs crate's ``Status``
fields unconverted (runtime-rs ``crates/shim/src/shim_metrics.rs``,
``hypervisor_metrics``); ``*_proc_stat`` utime/stime are clock ticks
(USER_HZ = 100 on Linux), so CPU % comes from deltas between scrapes.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Sequence
from concurrent.futures import ThreadPoolExecutor

from katactl.errors import KatactlError, ProtocolError, UsageError, as_katactl_error
from katactl.backends.base import NodeTransport
# imported with the module, not inside a live top's refresh (where a Ctrl-C may land)
from katactl.balloon import guest_used

USER_HZ = 100
PAGE_SIZE = 4096

#: the orders ``top`` can sort by (see sort_rows)
TOP_SORTS = ("cpu", "mem", "rss", "id", "pod")
TOP_FAMILIES = ("kata_guest_meminfo", "kata_guest_vm_stat", "kata_shim_proc_status",
                "kata_hypervisor_proc_status", "kata_shim_proc_stat", "kata_hypervisor_proc_stat")


def validate_prefixes(prefixes) -> list[str]:
    out = []
    for p in prefixes or ():
        if not p or not all(c.isalnum() or c in "_:" for c in p) or p[0].isdigit():
            raise UsageError(f"invalid metric family prefix {p!r}: expected a metric name prefix "
                             "like kata_guest_ or go_")
        out.append(p)
    return out


def _line_name(line: str) -> str | None:
    """The metric name a text-format line belongs to (None for blank/other comments)."""
    if not line:
        return None
    if line[0] == "#":
        parts = line.split(None, 3)
        if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
            return parts[2]
        return None
    end = len(line)
    for i, c in enumerate(line):
        if c in "{ \t":
            end = i
            break
    return line[:end]


def family_matches(name: str, prefixes: tuple[str, ...], renamed: bool = True) -> bool:
    """``--family``: the name the mode shows starts with a prefix, or the shim's own name
    (go_goroutines) does where kata-monitor's is shown (kata_shim_go_goroutines, see _rename:
    -o prom, --to, --all), so the shim's prefix selects the same families in every mode.
    Where the shim's names are shown (``renamed=False``: metrics SANDBOX, --raw), kata-monitor's
    are not matched: kata_ there keeps the kata_* families, not go_* by its renamed kata_shim_go_."""
    return name.startswith(prefixes) or (renamed and _rename(name).startswith(prefixes))


def filter_text(text: str, prefixes) -> str:
    """Keep only the lines (samples, HELP, TYPE) of families a prefix matches (family_matches)."""
    prefixes = tuple(prefixes or ())
    if not prefixes:
        return text
    keep = []
    for line in text.splitlines():
        name = _line_name(line)
        if name is not None and family_matches(name, prefixes, renamed=False):
            keep.append(line)
    return "\n".join(keep) + ("\n" if keep else "")


def parse(text: str, prefixes=None) -> list[dict]:
    """Flat samples: [{family, type, name, labels, value}] (prefix-filtered first)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = filter_text(text, prefixes)
    out = []
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.append({"family": fam.name, "type": fam.type, "name": s.name,
                            "labels": dict(s.labels), "value": s.value})
    except (ValueError, TypeError, IndexError) as e:
        raise ProtocolError(f"the shim's /metrics is not valid Prometheus text: {e}") from None
    return out


def _index(text: str) -> dict:
    """{(name, item_label): value text} of the top families (strict parser, as metrics --all:
    3x faster than prometheus_client's, which top and overhead paid per shim and scrape)."""
    idx = {}
    for f in parse_families(filter_text(text, TOP_FAMILIES)):
        for name, labels, value, _ts in f.samples:
            item = next((v for k, v in labels if k == "item"), None)
            idx[(name, item)] = value
    return idx


def top_sample(text: str, runtime: str | None = "go") -> dict:
    """The figures top needs from one scrape (None where a family is missing).
    ``runtime``: the shim's ("go" or "rs"), for the unit of ``*_proc_status``."""
    idx = _index(text)
    status_unit = 1024.0 if runtime == "rs" else 1.0

    def g(name, item):
        v = idx.get((name, item))
        if v is None:
            return None
        f = float(v)
        # NaN and +-Inf are valid exposition text but no size or tick count: that figure is
        # missing, not the node's table (int() of them raised, failing every row)
        return f if math.isfinite(f) else None

    def kb(name, item):
        v = g(name, item)
        return None if v is None else _finite(v * status_unit)

    def ticks(prefix):
        u, s = g(f"{prefix}_proc_stat", "utime"), g(f"{prefix}_proc_stat", "stime")
        return None if u is None and s is None else _finite((u or 0) + (s or 0))

    total, avail, free = g("kata_guest_meminfo", "mem_total"), g("kata_guest_meminfo", "mem_available"), \
        g("kata_guest_meminfo", "mem_free")
    inflate, deflate = g("kata_guest_vm_stat", "balloon_inflate"), g("kata_guest_vm_stat", "balloon_deflate")
    return {
        "t": time.monotonic(),
        "guestMemTotal": total,
        "guestMemAvailable": avail,
        "guestMemFree": free,
        "balloonInflatePages": inflate,
        "balloonDeflatePages": deflate,
        "shimRSS": kb("kata_shim_proc_status", "vmrss"),
        "hypervisorRSS": kb("kata_hypervisor_proc_status", "vmrss"),
        "_shimTicks": ticks("kata_shim"),
        "_hvTicks": ticks("kata_hypervisor"),
    }


def _finite(v: float) -> float | None:
    """A figure computed from finite samples, None when it overflowed (1e308 kB x 1024 is inf:
    that figure is missing, not the node's table, as for a non-finite sample)."""
    return v if math.isfinite(v) else None


def _pct(a, b, dt) -> float | None:
    if a is None or b is None or dt <= 0:
        return None
    return _finite(max(0.0, (b - a) / USER_HZ / dt * 100.0))


def balloon_bytes(cur: dict) -> int | None:
    """The balloon's size from a sample's kata_guest_vm_stat (inflated minus deflated pages)."""
    inflate, deflate = cur["balloonInflatePages"], cur["balloonDeflatePages"]
    pages = None if inflate is None else _finite(inflate - (deflate or 0))
    return None if pages is None else max(0, int(pages)) * PAGE_SIZE


def sandbox_guest_used(sb, cur: dict, balloon: int | None, *, resident: bool = False) -> int | None:
    """Guest memory used, by the rule ``balloon get`` reports (katactl.balloon.guest_used):
    with VIRTIO_BALLOON_F_DEFLATE_ON_OOM (always, on Kata's QEMU) the guest driver leaves
    ballooned pages in MemTotal (linux drivers/virtio/virtio_balloon.c fill_balloon calls
    adjust_managed_page_count only without it), so MemTotal - MemAvailable counts them as used
    and they are subtracted.
    The VM's memory comes from the sandbox's state (persist.json MemorySize + HotpluggedMemory,
    runtime-rs default_memory); unknown, nothing is subtracted.
    ``resident``: MemTotal - MemFree instead (page cache counted: it is resident in the VMM
    too), the figure overhead takes out of the VMM's RSS."""
    total, avail = cur["guestMemTotal"], cur["guestMemFree" if resident else "guestMemAvailable"]
    if total is None or avail is None:
        return None
    mib = sb.total_memory_mib
    mem = mib << 20 if mib and balloon is not None else None
    return guest_used({"guest": {"total": int(total), "available": int(avail)},
                       "memory": mem, "actual": None if mem is None else mem - balloon}, sb.hypervisor)


def vmm_in_shim(sb) -> bool:
    """The VMM runs inside the shim process (runtime-rs Dragonball: sandbox.find_rs_vmms), so
    the shim's figures are the VMM's too (hypervisor_persist.rs has no pid, and Dragonball
    exports no kata_hypervisor_proc_*: src/dragonball/src/hypervisor_metrics.rs)."""
    return (sb.runtime == "rs" and sb.hypervisor == "dragonball") or bool(
        sb.hypervisor_pid and sb.hypervisor_pid == sb.shim_pid)


def top_row(sb, cur: dict | None, prev: dict | None = None, error: KatactlError | None = None) -> dict:
    """One row of ``top``: the sandbox, its figures, CPU % from prev -> cur. A VMM inside the
    shim (vmm_in_shim) is counted once, as the shim: no hypervisor figures of its own."""
    in_shim = vmm_in_shim(sb)
    row = {"id": sb.id, "pod": sb.pod, "hypervisor": sb.hypervisor, "runtime": sb.runtime, "vmmInShim": in_shim}
    if error is not None or cur is None:
        row["error"] = error.to_dict() if error is not None else {"message": "no data"}
        return row

    def i(v):
        return None if v is None else int(v)

    inflate = cur["balloonInflatePages"]
    balloon = balloon_bytes(cur)
    used = sandbox_guest_used(sb, cur, balloon)
    dt = (cur["t"] - prev["t"]) if prev else 0.0
    shim_cpu = _pct(prev and prev["_shimTicks"], cur["_shimTicks"], dt) if prev else None
    hv_cpu = _pct(prev and prev["_hvTicks"], cur["_hvTicks"], dt) if prev and not in_shim else None
    row.update({
        "guestMemTotal": i(cur["guestMemTotal"]),
        "guestMemUsed": used,
        "guestMemAvailable": i(cur["guestMemAvailable"]),
        "balloonInflatePages": i(inflate),
        "balloonBytes": balloon,
        "shimRSS": i(cur["shimRSS"]),
        "hypervisorRSS": None if in_shim else i(cur["hypervisorRSS"]),
        "cpuPercent": {
            "shim": None if shim_cpu is None else round(shim_cpu, 1),
            "hypervisor": None if hv_cpu is None else round(hv_cpu, 1),
            "total": None if shim_cpu is None and hv_cpu is None
            else round((shim_cpu or 0) + (hv_cpu or 0), 1),
        },
        "note": cur.get("_note"),
    })
    return row


def scrape(transport: NodeTransport, sb, timeout: float) -> str:
    from katactl.backends.shim import ShimClient

    with ShimClient.for_sandbox(transport, sb, timeout=timeout) as c:
        return c.metrics_text()


def scrape_all(transport: NodeTransport, sandboxes, *, timeout: float, workers: int = 32) -> dict:
    """{sandbox id: sample dict | KatactlError}, scraping concurrently."""
    def one(sb):
        try:
            return sb.id, top_sample(scrape(transport, sb, timeout), sb.runtime)
        except Exception as e:  # one shim's failure is that row's data
            return sb.id, as_katactl_error(e)

    return _each_sandbox(one, sandboxes, workers)


def _each_sandbox(one, sandboxes, workers: int) -> dict:
    """dict(one(sb) for sb in sandboxes), ``workers`` shims at a time. On Ctrl-C the pool
    is abandoned, never awaited: a scrape stuck on a shim must not hold the exit (the CLI
    leaves without it)."""
    if not sandboxes:
        return {}
    ex = ThreadPoolExecutor(max_workers=max(1, min(workers, len(sandboxes))), thread_name_prefix="katactl-scrape")
    try:
        out = dict(ex.map(one, sandboxes))
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return out


def fill_from_processes(transport: NodeTransport, sandboxes, samples: dict) -> None:
    """Where a shim's metrics lack its hypervisor's RSS or CPU time (a shim that does not
    export ``kata_hypervisor_proc_*``), take them from the node's process facts
    (katactl.procfacts: psutil on this host, /proc through the transport on another); never
    for a VMM inside the shim (vmm_in_shim), which the shim's own figures already count.
    A runtime-rs shim whose /metrics cannot answer for its VMM (NoHypervisorMetrics: an
    upstream gap that fails every scrape) gets a sample of process facts alone, the shim's
    and the VMM's, without guest figures, its error as the row's note."""
    from katactl.backends.shim import NoHypervisorMetrics

    gap = [sb for sb in sandboxes if sb.shim_pid and isinstance(samples.get(sb.id), NoHypervisorMetrics)]
    need = [sb for sb in sandboxes if sb.hypervisor_pid and not vmm_in_shim(sb)
            and isinstance(samples.get(sb.id), dict)
            and (samples[sb.id]["hypervisorRSS"] is None or samples[sb.id]["_hvTicks"] is None)]
    pids = {sb.hypervisor_pid for sb in need} | {p for sb in gap for p in (sb.shim_pid, sb.hypervisor_pid) if p}
    if not pids:
        return
    from katactl import procfacts

    try:
        stats = procfacts.for_transport(transport).stats(sorted(pids))
    except (OSError, KatactlError):
        return  # the shim's figures stay as they are: a row without these, not a failed row
    t = time.monotonic()
    for sb in gap:
        shim = stats.get(sb.shim_pid)
        if shim is None:
            continue  # the shim is gone: its error stays
        hv = None if vmm_in_shim(sb) or not sb.hypervisor_pid else stats.get(sb.hypervisor_pid)
        samples[sb.id] = {
            "t": t, **dict.fromkeys(("guestMemTotal", "guestMemAvailable", "guestMemFree",
                                     "balloonInflatePages", "balloonDeflatePages")),
            "shimRSS": float(shim.rss), "_shimTicks": shim.cpu_seconds * USER_HZ,
            "hypervisorRSS": None if hv is None else float(hv.rss),
            "_hvTicks": None if hv is None else hv.cpu_seconds * USER_HZ,
            "_note": samples[sb.id].message}
    for sb in need:
        st, cur = stats.get(sb.hypervisor_pid), samples[sb.id]
        if st is None:
            continue
        if cur["hypervisorRSS"] is None:
            cur["hypervisorRSS"] = float(st.rss)
        if cur["_hvTicks"] is None:
            cur["_hvTicks"] = st.cpu_seconds * USER_HZ


class TopSession:
    """Keeps the previous scrape per sandbox so each refresh has CPU deltas."""

    def __init__(self, transport: NodeTransport | None, *, timeout: float, workers: int = 32,
                 include_stale: bool = False):
        """transport: None for a fleet's session, which is given each refresh's transport."""
        self.transport = transport
        self.timeout = timeout
        self.workers = workers
        self.include_stale = include_stale
        self.prev: dict[str, dict | None] = {}

    def _transport(self) -> NodeTransport:
        if self.transport is None:
            raise RuntimeError("internal: TopSession refreshed before it was given a transport")
        return self.transport

    def sandboxes(self):
        from katactl import sandbox

        sbs = sandbox.discover(self._transport(), timeout=min(self.timeout, 1.0))
        return [s for s in sbs if s.state == "running" or self.include_stale]

    def refresh(self, sbs=None) -> list[dict]:
        sbs = self.sandboxes() if sbs is None else sbs
        transport = self._transport()
        res = scrape_all(transport, sbs, timeout=self.timeout, workers=self.workers)
        fill_from_processes(transport, sbs, res)
        rows = []
        for sb in sbs:
            r = res.get(sb.id)
            if isinstance(r, KatactlError):
                rows.append(top_row(sb, None, error=r))
                self.prev.pop(sb.id, None)
            else:
                rows.append(top_row(sb, r, self.prev.get(sb.id)))
                self.prev[sb.id] = r
        return rows


def top_snapshot(transport: NodeTransport, *, interval: float = 1.0, timeout: float = 10.0, workers: int = 32) -> list[dict]:
    """Two scrapes ``interval`` apart (CPU % needs a delta); the second's rows."""
    s = TopSession(transport, timeout=timeout, workers=workers)
    sbs = s.sandboxes()
    if not sbs:
        return []
    s.refresh(sbs)
    if interval > 0:
        from katactl import interrupt

        interrupt.sleep(interval)  # a Ctrl-C lost in a finalizer still ends it
    return s.refresh(sbs)


def sort_rows(rows: list[dict], key: str = "cpu") -> list[dict]:
    """top rows busiest first (cpu: total CPU %, mem: guest memory used, rss: shim +
    hypervisor RSS), or by id or NAMESPACE/POD; ties (and rows without data) by id."""
    if key not in TOP_SORTS:
        raise UsageError(f"invalid sort key {key!r} (choose from {', '.join(TOP_SORTS)})")

    def k(r):
        if key == "cpu":
            return -((r.get("cpuPercent") or {}).get("total") or 0)
        if key == "mem":
            return -(r.get("guestMemUsed") or 0)
        if key == "rss":
            return -((r.get("hypervisorRSS") or 0) + (r.get("shimRSS") or 0))
        if key == "pod":
            p = r.get("pod") or {}
            return f"{p.get('namespace')}/{p.get('name')}"
        return r["id"]
    return sorted(rows, key=lambda r: (k(r), r["id"]))


class TopFleet:
    """A live ``top`` over the node selection (katactl.fleet: -N, --nodes-from, -l;
    none = this host): one TopSession per node, so every refresh after the first
    has CPU deltas.

    Each refresh goes through fleet.run_on_nodes (at most --parallel nodes at
    once; a transport per node and refresh, SSH connections are pooled), so a
    node that fails is an entry in the errors, never an abort, and is asked
    again next time."""

    def __init__(self, settings, *, timeout: float, workers: int = 32):
        from katactl.fleet import LOCAL, select_nodes

        self.settings = settings
        picked = select_nodes(settings)
        self.nodes = picked or [LOCAL]
        self.multi = bool(picked)  # any selection, -N localhost too (fleet.FanOut.multi)
        self._sessions = {n: TopSession(None, timeout=timeout, workers=workers) for n in self.nodes}

    def refresh(self, sort: str = "cpu") -> tuple[list[dict], dict[str, KatactlError]]:
        """(rows of every node, tagged with its node and sorted; {node: error})."""
        from katactl.fleet import run_on_nodes

        def one(transport: NodeTransport):
            s = self._sessions[transport.node]
            s.transport = transport  # this refresh's transport
            return s.refresh()

        fo = run_on_nodes(self.settings, one, nodes=self.nodes, selected=self.multi)
        return sort_rows(fo.items(), sort), dict(fo.errors)


# -- one exposition of every sandbox, relabelled as kata-monitor does -------------------
# kata-containers src/runtime/pkg/kata-monitor/metrics.go (parsePrometheusMetrics): every
# sample of a shim's /metrics gets, appended in this order, sandbox_id, cri_uid, cri_name,
# cri_namespace; the shim's go_* and process_* families become kata_shim_go_* and
# kata_shim_process_*; families of every sandbox are merged by name (HELP/TYPE once).
# katactl adds node="..." after them for fleets, and katactl_scrape_error per sandbox.
MONITOR_LABELS = ("sandbox_id", "cri_uid", "cri_name", "cri_namespace")
SCRAPE_ERROR = "katactl_scrape_error"
#: 1 per (sandbox, family) whose samples the exposition left out: the shim types the family
#: differently from an earlier shim. Not katactl_scrape_error: the shim answered and its other
#: families are there (an alert on scrape errors would call a hot upgrade a dead shim).
FAMILY_CONFLICT = "katactl_family_conflict"
_NAME_RE = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_RE = None
_LABEL_RE = None
#: suffixes of a family's samples by type (text format 0.0.4)
_SUFFIXES = {"counter": ("", "_total"), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count"), "gauge": ("",), "untyped": ("",)}
#: the sample names a family of a type takes from the names of other families. Go's text
#: parser (prometheus/common expfmt/text_parse.go, setOrCreateCurrentMF) reads a HELP, TYPE
#: or sample of X_sum/X_count as summary or histogram X's and X_bucket as histogram X's, so
#: a family X_count next to summary X is a "second TYPE line" (or samples filed under the
#: wrong family); a counter's X_total sample makes a family X_total of its own, and a TYPE
#: X_total after it is refused the same way.
_TAKES = {"summary": ("_sum", "_count"), "histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}


def _regexes():
    global _SAMPLE_RE, _LABEL_RE, _FULLNAME_RE, _BAD_ESCAPE_RE, _LOOSE_RE
    if _SAMPLE_RE is None:
        import re

        # the value in Go's grammar (see _GO_FLOAT_TEXT) right here: one pass over the line
        sample = re.compile(rf"({_NAME_RE})(?:\{{(.*)\}})?[ \t]+({_GO_FLOAT_TEXT})(?:[ \t]+([+-]?[0-9]+))?[ \t]*")
        _LOOSE_RE = re.compile(rf"({_NAME_RE})(?:\{{(.*)\}})?[ \t]+(\S+)(?:[ \t]+(\S+))?[ \t]*")
        # label values: the escapes Go's readTokenAsLabelValue takes (\\ \" \n), no other
        _LABEL_RE = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\[\\"n])*)"[ \t]*(,|$)')
        _FULLNAME_RE = re.compile(_NAME_RE)
        # HELP: readTokenUntilNewline(true) takes \\ and \n (\" too since expfmt's UTF-8 names,
        # not in the parsers in the field: promtool 2.42 refuses it); a lone \ at the end neither
        _BAD_ESCAPE_RE = re.compile(r"\\(?:[^\\n]|$)")
        # the sentinel last: scrapes parse on 32 threads, and one that saw _SAMPLE_RE set
        # before the others were would fail (an AssertionError as that shim's scrape error)
        _SAMPLE_RE = sample
    return _SAMPLE_RE, _LABEL_RE


_FULLNAME_RE = None
_BAD_ESCAPE_RE = None
#: a sample line with any value and timestamp: which part of a line _SAMPLE_RE refused
_LOOSE_RE = None


class Family:
    __slots__ = ("name", "type", "help", "samples")

    def __init__(self, name: str, type_: str = "untyped", help_: str | None = None):
        self.name, self.type, self.help = name, type_, help_
        #: (name, labels, value, timestamp) in the shim's order
        self.samples: list[tuple[str, Sequence[tuple[str, str]], str, str | None]] = []


#: parsed label bodies: every shim of a node sends the same ones (item="vmrss", ...), so
#: ``metrics --all`` parses each once, not once per shim (a third of the parse time at 200)
_LABEL_CACHE: dict[str, tuple[tuple[str, str], ...]] = {}
_LABEL_CACHE_MAX = 1 << 16


def _labels(body: str) -> tuple[tuple[str, str], ...]:
    got = _LABEL_CACHE.get(body)
    if got is not None:
        return got
    _, lab = _regexes()
    out, pos = [], 0
    text = body.strip()
    while pos < len(text):
        m = lab.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"bad labels {{{text[:80]}}}")
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    names = [k for k, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate label in {{{text[:80]}}}")
    if "__name__" in names:
        raise ValueError('label name "__name__" is reserved')
    if len(_LABEL_CACHE) >= _LABEL_CACHE_MAX:
        _LABEL_CACHE.clear()
    got = _LABEL_CACHE[body] = tuple(out)
    return got


#: a sample value as Go's text parser reads it (expfmt text_parse.go parseFloat: no 'p',
#: 'P' or '_', then strconv.ParseFloat(s, 64)): ASCII decimal digits with an optional
#: sign, fraction and exponent, or inf/infinity with an optional sign, or nan (no sign), in
#: any case (strconv atof.go special). Python's float() also takes '1_000', Unicode digits
#: ('\u0661'), '-nan' and surrounding space, which the exposition must never carry.
_GO_FLOAT_TEXT = (r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                  r"|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?)|[nN][aA][nN]")
_GO_FLOAT = None
_INT64 = 1 << 63


def _go_float(v: str) -> bool:
    global _GO_FLOAT
    if _GO_FLOAT is None:
        import re

        _GO_FLOAT = re.compile(_GO_FLOAT_TEXT)
    return bool(_GO_FLOAT.fullmatch(v)) and _in_range(v)


def _in_range(v: str) -> bool:
    """Not ParseFloat's ErrRange: a finite literal beyond float64 (both round correctly, so
    Python's float() is inf exactly where Go's overflows; underflow to 0 is no error). Only
    an exponent or 309 digits can get there."""
    if len(v) < 309 and "e" not in v and "E" not in v:
        return True
    return v[-1] not in "0123456789." or abs(float(v)) != float("inf")


def _check_value(v: str) -> None:
    if not _go_float(v):
        raise ValueError(f"expected float as value, got {_clip(v)}")


def _check_timestamp(ts: str) -> None:
    """strconv.ParseInt(ts, 10, 64), as Go's text parser reads a timestamp."""
    digits = ts.lstrip("+-")
    if len(digits) > 19 or not -_INT64 <= int(ts) < _INT64:
        raise ValueError(f"expected integer as timestamp, got {_clip(ts)}")


def _clip(s: str, n: int = 40) -> str:
    return repr(s) if len(s) <= n else repr(s[:n]) + f"... ({len(s)} characters)"


def _clash(name: str, type_: str, types: dict[str, tuple[str, str]]) -> str | None:
    """The family of ``types`` ({name: (type, whose)}) whose sample names ``name`` (a family of
    ``type_``) takes or gives (see _TAKES), else None."""
    for s in _TAKES.get(type_, ()):
        if name + s in types:
            return name + s
    for s in ("_sum", "_count", "_bucket", "_total"):
        if name.endswith(s):
            got = types.get(name[: -len(s)])
            if got is not None and s in _TAKES.get(got[0], ()):
                return name[: -len(s)]
    return None


def _check_names(fams: list[Family]) -> None:
    """One shim's families, by the names they are rendered under (go_*/process_* renamed),
    must not take each other's samples (see _TAKES), nor be katactl's own family."""
    types: dict[str, tuple[str, str]] = {}
    for f in fams:
        name = _rename(f.name)
        if name in (SCRAPE_ERROR, FAMILY_CONFLICT):
            raise ValueError(f"family {name} is katactl's own")
        if name in types:
            continue
        other = _clash(name, f.type, types)
        if other is not None:
            raise ValueError(f"family {name} ({f.type}) and family {other} ({types[other][0]}) take each "
                             "other's sample names (Go's text parser refuses the pair)")
        types[name] = (f.type, "")


def parse_families(text: str, sink=None) -> list[Family]:
    """A shim's Prometheus text as families of (name, labels, value, timestamp) samples,
    strictly: a line that is not HELP, TYPE, a comment, blank or a valid sample is a
    ProtocolError (the whole shim is then a scrape error, never half its families).
    ``sink(family, name, labels, value, timestamp)`` takes each sample instead of the
    family's ``samples`` (:func:`parse_rendered`: rendered as read, never held parsed).

    Valid is what Go's text parser takes (prometheus/common expfmt/text_parse.go: kata-monitor
    decodes each shim with it, node_exporter and promtool read our exposition with it), for
    everything passed through as written: values, timestamps, label values, HELP; and no two
    families that would take each other's sample names once rendered (_check_names)."""
    sample_re, _ = _regexes()
    assert _FULLNAME_RE is not None and _BAD_ESCAPE_RE is not None and _LOOSE_RE is not None
    fams: dict[str, Family] = {}
    order: list[Family] = []
    cur: Family | None = None
    cur_names: frozenset[str] = frozenset()  # the sample names of cur's type
    f: Family | None

    def family(name: str) -> Family:
        f = fams.get(name)
        if f is None:
            f = fams[name] = Family(name)
            order.append(f)
        return f

    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            if line[0] == "#":
                parts = line[1:].strip().split(None, 2)
                if len(parts) >= 2 and parts[0] in ("HELP", "TYPE"):
                    if not _FULLNAME_RE.fullmatch(parts[1]):
                        raise ValueError(f"bad metric name {parts[1]!r}")
                    f = family(parts[1])
                    if parts[0] == "TYPE":
                        t = (parts[2] if len(parts) > 2 else "").strip()
                        if t not in _SUFFIXES:
                            raise ValueError(f"unknown type {t!r}")
                        if f.samples:
                            raise ValueError(f"TYPE of {f.name} after its samples")
                        f.type = t
                    else:
                        f.help = parts[2] if len(parts) > 2 else ""
                        if _BAD_ESCAPE_RE.search(f.help.replace("\\\\", "")):
                            raise ValueError(f"invalid escape in the HELP of {f.name}")
                    cur = f
                    cur_names = frozenset(f.name + x for x in _SUFFIXES[f.type])
                continue
            m = sample_re.fullmatch(line)
            if not m:
                loose = _LOOSE_RE.fullmatch(line)
                if loose is None:
                    raise ValueError("not a sample line")
                _check_value(loose.group(3))
                raise ValueError(f"expected integer as timestamp, got {_clip(loose.group(4) or '')}")
            name, body, value, ts = m.groups()
            if not _in_range(value):
                _check_value(value)
            if ts is not None:
                _check_timestamp(ts)
            labels = _labels(body) if body else ()
            if name in cur_names:
                f = cur
            else:
                f = None
                for s in ("_bucket", "_sum", "_count", "_total", ""):
                    base = name[: len(name) - len(s)] if s and name.endswith(s) else (name if not s else None)
                    if base and base in fams and any(name == base + x for x in _SUFFIXES[fams[base].type]):
                        f = fams[base]
                        break
                if f is None:
                    f = family(name)
            assert f is not None
            if f.type in ("summary", "histogram") and labels:
                # Go's parser reads a summary's quantile and a histogram's le as floats too
                special = "quantile" if f.type == "summary" else "le"
                for k, v in labels:
                    if k == special and not _go_float(v):  # an escape is no float either
                        raise ValueError(f"expected float as value for {special!r} label, got {_clip(v)}")
            if sink is None:
                f.samples.append((name, labels, value, ts))
            else:
                sink(f, name, labels, value, ts)
        except ValueError as e:
            raise ProtocolError(f"the shim's /metrics is not valid Prometheus text: line {n}: {e}") from None
    try:
        _check_names(order)
    except ValueError as e:
        raise ProtocolError(f"the shim's /metrics is not valid Prometheus text: {e}") from None
    return order


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _rename(name: str) -> str:
    return "kata_shim_" + name if name.startswith(("go_", "process_")) else name


def relabel(fams: list[Family], extra: list[tuple[str, str]]) -> list[Family]:
    """kata-monitor's relabelling of one sandbox's families: ``extra`` (sandbox_id, cri_uid,
    cri_name, cri_namespace[, node]) appended to every sample, before a histogram's ``le``
    or a summary's ``quantile`` (where Go's text encoder writes those); go_*/process_*
    renamed kata_shim_*. A shim's own label of the same name (runtime-rs labels some
    samples sandbox_id) is replaced by ours, not duplicated (kata-monitor would emit it twice,
    which Prometheus refuses)."""
    enc = tuple((k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in extra)
    names = {k for k, _ in extra}
    special = names | {"le", "quantile"}
    out = []
    for f in fams:
        nf = Family(_rename(f.name), f.type, f.help)
        renamed = nf.name != f.name  # go_*/process_*: every sample name of the family too
        add = nf.samples.append
        for name, labels, value, ts in f.samples:
            if renamed:
                name = "kata_shim_" + name
            if not any(k in special for k, _ in labels):  # the common case: ours appended
                add((name, (*labels, *enc), value, ts))
                continue
            keep = [(k, v) for k, v in labels if k not in names and k not in ("le", "quantile")]
            tail = [(k, v) for k, v in labels if k in ("le", "quantile") and k not in names]
            add((name, (*keep, *enc, *tail), value, ts))
        out.append(nf)
    return out


def sandbox_labels(sb, node: str | None = None) -> list[tuple[str, str]]:
    pod = sb.pod or {}
    out = [("sandbox_id", sb.id), ("cri_uid", pod.get("uid") or ""), ("cri_name", pod.get("name") or ""),
           ("cri_namespace", pod.get("namespace") or "")]
    if node is not None:
        out.append(("node", node))
    return out


def refuse_clashes(per_sandbox: list[tuple[list[tuple[str, str]], list[Family] | KatactlError]]
                   ) -> list[tuple[list[tuple[str, str]], list[Family] | KatactlError]]:
    """``per_sandbox`` (relabelled families) with a sandbox whose family would take the sample
    names of an earlier sandbox's other family, or give its own to it (summary X here, a
    family X_count there: see _TAKES), made a ProtocolError, its scrape error: merged, the two
    would make the whole exposition unparseable. (A family another shim types differently is
    no clash: see type_conflicts.)"""
    types: dict[str, tuple[str, str]] = {}
    out: list[tuple[list[tuple[str, str]], list[Family] | KatactlError]] = []
    for labels, fams in per_sandbox:
        if isinstance(fams, KatactlError):
            out.append((labels, fams))
            continue
        sid = dict(labels).get("sandbox_id", "")
        mine: dict[str, tuple[str, str]] = {}
        err: KatactlError | None = None
        for f in fams:
            if f.name in types or f.name in mine:
                continue
            other = _clash(f.name, f.type, types)
            if other is not None:
                err = ProtocolError(f"its family {f.name} ({f.type}) and family {other} ({types[other][0]}) of "
                                    f"sandbox {types[other][1][:12]} take each other's sample names "
                                    "(Go's text parser refuses the pair): left out")
                break
            mine[f.name] = (f.type, sid)
        if err is None:
            types.update(mine)
        out.append((labels, fams if err is None else err))
    return out


def type_conflicts(per_sandbox: list[tuple[list[tuple[str, str]], list[Family] | KatactlError]]
                   ) -> list[tuple[int, str, str, str, str]]:
    """(index in ``per_sandbox``, family, its type there, the type an earlier sandbox gave it,
    that sandbox's id) for each family a shim types differently from an earlier shim (old and
    new shims side by side during an upgrade). Only an exposition has to resolve it (one family
    has one TYPE: render_exposition keeps the first and leaves the later shim's samples of that
    family out); a JSON sample carries its own type."""
    first: dict[str, tuple[str, str]] = {}
    out: list[tuple[int, str, str, str, str]] = []
    for i, (labels, fams) in enumerate(per_sandbox):
        if isinstance(fams, KatactlError):
            continue
        sid = dict(labels).get("sandbox_id", "")
        for f in fams:
            got = first.setdefault(f.name, (f.type, sid))
            if got[0] != f.type:
                out.append((i, f.name, f.type, got[0], got[1]))
    return out


class RenderedFamily:
    """One shim's family already rendered as exposition lines, as it arrived (``metrics --all
    -o prom``): its parsed samples cost ~30x the body (tuples and strings per sample and
    label), this about the body. ``text`` has :data:`_EXTRA` where the sandbox's own labels
    go (they are known once every node answered: ``node`` only in a fleet's answer)."""
    __slots__ = ("name", "type", "help", "text", "timestamps")

    def __init__(self, name: str, type_: str, help_: str | None, text: str, timestamps: bool):
        self.name, self.type, self.help, self.text, self.timestamps = name, type_, help_, text, timestamps


#: stands for a sandbox's labels in a RenderedFamily's text: a shim text holding it stays
#: parsed (a label value may hold any character but ", \ and a newline)
_EXTRA = "\x00"


def parse_rendered(text: str, names: Sequence[str], *, timestamps: bool, prefixes: tuple[str, ...] = ()
                   ) -> list[RenderedFamily]:
    """A shim's text (strictly parsed as :func:`parse_families`, and holding no _EXTRA)
    rendered as :func:`relabel` then :func:`iter_exposition` would write it, with labels
    named ``names`` (the ones the sandbox's replace) to come: see :class:`RenderedFamily`.
    Each sample is rendered as it is read: no family holds parsed samples."""
    ours = set(names)
    special = ours | {"le", "quantile"}
    lines: dict[Family, list[str]] = {}

    def sink(f: Family, sname: str, labels, value: str, ts: str | None) -> None:
        if f.name.startswith(("go_", "process_")):  # kata_shim_*: every sample name of the family too
            sname = "kata_shim_" + sname
        if not any(k in special for k, _ in labels):
            lab = ",".join([*(f'{k}="{v}"' for k, v in labels), _EXTRA])
        else:
            keep = [f'{k}="{v}"' for k, v in labels if k not in ours and k not in ("le", "quantile")]
            tail = [f'{k}="{v}"' for k, v in labels if k in ("le", "quantile") and k not in ours]
            lab = ",".join([*keep, _EXTRA, *tail])
        ts = ts if timestamps else None
        got = lines.get(f)
        if got is None:
            got = lines[f] = []
        got.append(f"{sname}{{{lab}}} {value}" + (f" {ts}" if ts else ""))

    out = []
    for f in parse_families(text, sink):
        got = lines.pop(f, None)
        if not prefixes or family_matches(f.name, prefixes):
            out.append(RenderedFamily(_rename(f.name), f.type, f.help, "\n".join(got) + "\n" if got else "",
                                      timestamps))
    return out


def render_exposition(per_sandbox: list[tuple[list[tuple[str, str]], list[Family] | KatactlError]],
                      node_errors: Sequence[tuple[str, KatactlError]] = (), *, timestamps: bool = True) -> str:
    """:func:`iter_exposition` as one string."""
    return "".join(iter_exposition(per_sandbox, node_errors, timestamps=timestamps))


def iter_exposition(per_sandbox: list[tuple[list[tuple[str, str]], list | KatactlError]],
                    node_errors: Sequence[tuple[str, KatactlError]] = (), *, timestamps: bool = True):
    """One text exposition, in pieces (a family of a sandbox at a time: never the whole text
    at once): families merged by name (sorted), HELP/TYPE once (the first
    sandbox's; a family another shim types differently keeps the first type and loses that
    shim's samples of it: see type_conflicts), then katactl_scrape_error per sandbox (1: its
    shim did not answer or sent garbage) and per failed node, then katactl_family_conflict 1
    per (sandbox, family) left out. A sample's timestamp is kept as the shim wrote it (kata-monitor's
    expfmt round trip keeps ``TimestampMs``: src/runtime/pkg/kata-monitor/metrics.go), or dropped
    (``timestamps=False``, for node_exporter's textfile collector, which skips a whole file with
    one: node_exporter collector/textfile.go ``hasTimestamps``). A sandbox's families are
    relabelled :class:`Family` objects or :class:`RenderedFamily` ones (rendered with the
    same ``timestamps``), which get the sandbox's labels here."""
    merged: dict[str, list] = {}   # name -> [first family, (sandbox index, family)...]
    for i, (_, fams) in enumerate(per_sandbox):
        if isinstance(fams, KatactlError):
            continue
        for f in fams:
            m = merged.get(f.name)
            if m is None:
                merged[f.name] = m = [f]
            elif m[0].type != f.type:
                continue
            m.append((i, f))
    enc: dict[int, str] = {}
    for name in sorted(merged):
        first, *parts = merged[name]
        head = f"# HELP {name} {first.help}\n" if first.help is not None else ""
        yield head + f"# TYPE {name} {first.type}\n"
        for i, f in parts:
            if isinstance(f, RenderedFamily):
                if f.timestamps != timestamps:
                    raise ValueError("internal: a family rendered with the other timestamps setting")
                if f.text:
                    if i not in enc:
                        enc[i] = ",".join(f'{k}="{_escape(v)}"' for k, v in per_sandbox[i][0])
                    yield f.text.replace(_EXTRA, enc[i])
                continue
            lines = []
            for sname, labels, value, ts in f.samples:
                ts = ts if timestamps else None
                lab = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{sname}{{{lab}}} {value}" + (f" {ts}" if ts else "") if lab
                             else f"{sname} {value}" + (f" {ts}" if ts else ""))
            if lines:
                yield "\n".join(lines) + "\n"
    lines = []
    if per_sandbox or node_errors:
        lines.append(f"# HELP {SCRAPE_ERROR} 1 when katactl could not scrape the sandbox's shim "
                     "(no answer, or not Prometheus text), else 0.")
        lines.append(f"# TYPE {SCRAPE_ERROR} gauge")
        for labels, fams in per_sandbox:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{SCRAPE_ERROR}{{{lab}}} {1 if isinstance(fams, KatactlError) else 0}")
        for node, _ in node_errors:
            lines.append(f'{SCRAPE_ERROR}{{sandbox_id="",cri_uid="",cri_name="",cri_namespace="",'
                         f'node="{_escape(node)}"}} 1')
    conflicts = type_conflicts(per_sandbox)
    if conflicts:
        lines.append(f"# HELP {FAMILY_CONFLICT} 1 for a family left out of this sandbox's samples: its shim "
                     "types it differently from an earlier sandbox's (one family has one TYPE).")
        lines.append(f"# TYPE {FAMILY_CONFLICT} gauge")
        for i, name, *_ in conflicts:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in [*per_sandbox[i][0], ("family", name)])
            lines.append(f"{FAMILY_CONFLICT}{{{lab}}} 1")
    if lines:
        yield "\n".join(lines) + "\n"


class _ParseBudget:
    """At most ``limit`` bytes of shim text parsed at once, across nodes and shims: a parse
    holds ~30x its text until it is rendered (a body over the limit waits for the others and
    goes alone); the hundred-KiB bodies of real shims still go 32 at a time."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        n = min(n, self.limit)
        with self.cond:
            while self.used + n > self.limit:
                self.cond.wait()
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


_PARSE_BUDGET = _ParseBudget(16 << 20)  # backends/shim.py METRICS_LIMIT: one body at its limit


def scrape_families(transport: NodeTransport, sandboxes, *, timeout: float, workers: int = 32, prefixes=None,
                    render: tuple[Sequence[str], bool] | None = None) -> dict:
    """{sandbox id: [Family] | KatactlError}: every shim scraped concurrently and parsed
    strictly; prefixes keep the families they match (family_matches).
    ``render`` (the names of the labels to come, timestamps): each shim's families rendered
    as they arrive (:func:`parse_rendered`), never held parsed."""
    prefixes = tuple(prefixes or ())

    def one(sb):
        try:
            text = scrape(transport, sb, timeout)
            with _PARSE_BUDGET.hold(len(text)):
                if render is not None and _EXTRA not in text:  # else held parsed
                    return sb.id, parse_rendered(text, render[0], timestamps=render[1], prefixes=prefixes)
                fams = parse_families(text)
            if prefixes:
                fams = [f for f in fams if family_matches(f.name, prefixes)]
            return sb.id, fams
        except Exception as e:  # one shim's failure is that sandbox's scrape error
            return sb.id, as_katactl_error(e)

    return _each_sandbox(one, sandboxes, workers)


def scrape_node(transport: NodeTransport, *, timeout: float, prefixes=None, workers: int = 32,
                render: tuple[Sequence[str], bool] | None = None) -> list[dict]:
    """Every running sandbox of a node: [{sandbox, families | error}] (for metrics --all)."""
    from katactl import sandbox

    sbs = [s for s in sandbox.discover(transport, timeout=min(timeout, 1.0)) if s.state == "running"]
    got = scrape_families(transport, sbs, timeout=timeout, workers=workers, prefixes=prefixes, render=render)
    return [{"sandbox": sb, "result": got[sb.id]} for sb in sbs]
