"""The one place that renders results and talks to the terminal.

Data goes to stdout, everything else (messages, warnings, progress) to stderr.
Formats: table (Rich, TTY only), plain (what "table" becomes when stdout is not
a TTY: no colour, no wrapping, one record per line), wide, json, yaml, name,
jsonl (events for automation), markdown (a GitHub pipe table with -o wide's
columns, for incident notes). Rich is imported only when a TTY table or a
progress bar is actually drawn, tabulate only for -o markdown: pipes and --help
never pay for them.
"""
from __future__ import annotations

import dataclasses
import json
import re
import os
import sys
import threading
from itertools import chain, compress, repeat
from operator import is_
from typing import Any, Callable

API_VERSION = "katactl/v1"
_EVENT_LOCK = threading.Lock()
FORMATS = ("table", "wide", "plain", "json", "yaml", "name", "jsonl", "markdown", "prom")
#: the commands that can answer in -o prom (one Prometheus text exposition)
PROM_COMMANDS = ("metrics",)
#: the formats that show a command's human view (a table, or an object described)
HUMAN_FORMATS = ("table", "plain", "wide", "markdown")
#: the formats of one structured document (plus events): failed nodes are data in it
STRUCTURED_FORMATS = ("json", "yaml", "jsonl")


@dataclasses.dataclass
class Column:
    header: str
    key: str | Callable[[dict], Any]
    wide: bool = False  # only with -o wide
    fmt: Callable[[Any], str] | None = None

    def value(self, item: dict) -> str:
        v = self.key(item) if callable(self.key) else _dig(item, self.key)
        if self.fmt is not None and v is not None:
            v = self.fmt(v)
        return _cell(v)


@dataclasses.dataclass
class Result:
    """What every command returns for rendering.

    kind:    JSON ``kind`` (SandboxList, BalloonStatus, ...).
    items:   for lists; ``item`` for a single object.
    changed/dry_run: set by mutating commands (always reported in JSON).
    errors:  per-node / per-target failures [{"node": ..., "error": {...}}].
    """

    kind: str
    items: list[dict] | None = None
    item: dict | None = None
    columns: list[Column] = dataclasses.field(default_factory=list)
    changed: bool | None = None
    dry_run: bool | None = None
    errors: list[dict] = dataclasses.field(default_factory=list)
    name_key: str = "name"
    multi_node: bool = False
    #: a one-line human summary printed to stderr in table/plain modes
    summary: str | None = None

    @classmethod
    def mutation(cls, kind: str, item: dict, **kw) -> "Result":
        """A mutating operation's one-object result: the item's own ``changed`` and
        ``dryRun`` become the top-level fields (``dryRun`` false when the item lacks
        it: every mutating command reports both). ``item`` itself is left as it is."""
        item = dict(item)
        return cls(kind=kind, item=item, changed=item.pop("changed", None),
                   dry_run=bool(item.pop("dryRun", False)), **kw)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"apiVersion": API_VERSION, "kind": self.kind}
        if self.items is not None:
            d["items"] = self.items
        if self.item is not None:
            d.update(self.item)
        if self.changed is not None:
            d["changed"] = self.changed
        if self.dry_run is not None:
            d["dryRun"] = self.dry_run
        if self.errors:
            d["errors"] = self.errors
        return d


def _shown(result: Result) -> dict:
    """The one object a human view describes: a mutation's changed (and dryRun when it was
    one) go back in, so a dry run, a change and a no-op read differently on a terminal."""
    item = result.item or {}
    if result.changed is None and not result.dry_run:
        return item
    return {**item, "changed": result.changed, **({"dryRun": True} if result.dry_run else {})}


def _dig(item: dict, key: str):
    cur: Any = item
    for part in key.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(x) for x in v) or "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return printable(str(v)) or "-"


#: Code points that must not reach a terminal or a reader raw, beyond C0: DEL and C1 (U+009B is
#: a one-byte CSI to many terminals, U+0085 a line end to some); the bidi controls (ALM, LRM,
#: RLM, U+202A-202E embeddings and overrides, U+2066-2069 isolates: "Trojan Source",
#: CVE-2021-42574, where `batch-\u202eexe.gnp` displays as batch-png.exe); the line and
#: paragraph separators (they split a record for Unicode-aware readers); and the invisible
#: zero-width ones (U+200B-200D, U+2060, U+FEFF), which make two names look alike.
_UNSAFE = "\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff"
# C0 controls and the above: a pod annotation or a shim's answer must neither break
# "one record per line" nor reach the terminal as an escape sequence (colours, titles, ...).
_CONTROLS = re.compile(f"[\\x00-\\x1f{_UNSAFE}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": " "}


def _escape(m: re.Match) -> str:
    c = m.group()
    o = ord(c)
    return _NAMED.get(c) or (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")


def printable(s: str) -> str:
    """s with control, bidi and separator characters shown as escapes (\\n, \\x1b, \\u202e);
    tabs become spaces."""
    return _CONTROLS.sub(_escape, s)


#: the same code points in JSON text: written as \\uXXXX (the same JSON value). Outside its
#: strings JSON text is ASCII, so replacing them anywhere in the text is exact.
_JSON_UNSAFE = re.compile(f"[{_UNSAFE}]")


def json_safe(text: str) -> str:
    """JSON text (json's or orjson's, ensure_ascii=False) with DEL, C1, bidi, separator and
    zero-width code points as \\uXXXX escapes: no option of either encoder does it. An ASCII
    text (the common case: Kubernetes names, ids, paths) costs str.isascii(), which CPython
    answers from the string's header, and a memchr for DEL: 0.1 ms for 10 MiB, where the
    regex scan of other text takes 30 ms (10,000 sandboxes; orjson itself takes 40)."""
    if text.isascii():
        return text.replace("\x7f", "\\u007f") if "\x7f" in text else text
    return _JSON_UNSAFE.sub(_json_escape, text)


def _json_escape(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def first_few(names: list[str], n: int = 5) -> str:
    """'a, b, c and 4 more': a list named in one line of a message."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def plural_noun(kind: str) -> str:
    """'SandboxList' -> 'sandboxes', 'MetricSampleList' -> 'metric samples'."""
    words = [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z][a-z0-9]*|[a-z0-9]+", kind.removesuffix("List"))] or ["item"]
    last = words[-1]
    if last.endswith(("s", "x", "sh", "ch")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(words[:-1] + [last])


def to_json(obj, indent: int | None = 2) -> str:
    """obj as JSON text. A NaN or an infinite float is ``null`` (see _floatval); unsafe
    code points are escapes (json_safe)."""
    if indent is None:
        return _dumps_line(obj, ensure_ascii=False)
    return "".join(json_chunks(obj, indent))


def _dumps_line(obj, *, ensure_ascii: bool) -> str:
    """json.dumps(obj) on one line by json's C encoder, which writes NaN/Infinity or raises,
    never null: where it raises, again over _finite(obj). json_safe() either way."""
    try:
        return json_safe(json.dumps(obj, default=_json_default, ensure_ascii=ensure_ascii, allow_nan=False))
    except ValueError as e:
        if not str(e).startswith("Out of range float"):
            raise  # a cycle
    return json_safe(json.dumps(_finite(obj), default=_json_default, ensure_ascii=ensure_ascii, allow_nan=False))


def _finite(o):
    """o with each non-finite float value None and each such key its text ("NaN"), as
    json_chunks writes them (for json's C encoder; containers and the default hook's
    objects are walked, anything else is left to json)."""
    t = type(o)
    if t is float:
        return o if o - o == 0 else None  # inf - inf and nan - nan are nan
    if t is dict or isinstance(o, dict):
        return {(_floatstr(k) if type(k) is float and k - k != 0 else k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float):
        return _finite(float(o))
    if isinstance(o, (set, frozenset)) or (dataclasses.is_dataclass(o) and not isinstance(o, type)):
        return _finite(_json_default(o))
    return o


def json_chunks(obj, indent: int = 2) -> list[str]:
    """The text of ``json.dumps(obj, indent=indent, ensure_ascii=False, default=...)``, the
    same characters but null for a NaN or infinite value (_floatval), as a list of pieces of a few dozen KiB (write them in order).

    json's C encoder cannot indent, and its pure-Python one runs every value through a
    chain of generators: for 10,000 sandboxes 1.6 million yields and as many small
    strings alive at once (1 s, ~100 MiB). This one appends to a list that is joined
    every few thousand pieces, and is done before anything is written (an error
    midway writes nothing).

    At indent 2 (``-o json``) a value orjson writes with the same characters is handed to
    it (see _orjson_chunks: ~3x faster than this encoder, the walk included); anything else
    takes this one."""
    if indent == 2:
        from katactl.gcpause import paused

        with paused():  # the walk's lists and views are no cycles (see gcpause)
            fast = _orjson_chunks(obj)
        if fast is not None:
            return list(map(json_safe, fast))
    from json.encoder import encode_basestring as enc_str  # the C one, as json.dumps uses

    pad = " " * indent
    chunks: list[str] = []
    parts: list[str] = []
    app = parts.append
    markers: dict[int, Any] = {}
    #: per indent: (the next indent, "," + it, {key: its text}); the keys' texts are made once
    #: per indent (a list's items repeat the same keys: sandbox list, 10,000 dicts of 37 keys)
    levels: dict[str, tuple[str, str, dict[str, str]]] = {}

    def mark(o) -> int:
        i = id(o)
        if i in markers:
            raise ValueError("Circular reference detected")
        markers[i] = o
        return i

    def enc(o, nl: str) -> None:
        if isinstance(o, str):
            app(enc_str(o))
        elif o is None:
            app("null")
        elif o is True:
            app("true")
        elif o is False:
            app("false")
        elif isinstance(o, int):
            app(int.__repr__(o))
        elif isinstance(o, float):
            app(_floatval(o))
        elif isinstance(o, (list, tuple)):
            if not o:
                app("[]")
                return
            i = mark(o)
            inner = nl + pad
            sep = "," + inner
            app("[" + inner)
            first = True
            for v in o:
                if first:
                    first = False
                else:
                    app(sep)
                if isinstance(v, str):
                    app(enc_str(v))
                else:
                    enc(v, inner)
                if len(parts) > 4096:
                    chunks.append("".join(parts))
                    parts.clear()
            app(nl + "]")
            del markers[i]
        elif isinstance(o, dict):
            if not o:
                app("{}")
                return
            i = mark(o)
            level = levels.get(nl)
            if level is None:
                level = levels[nl] = (nl + pad, "," + nl + pad, {})
            inner, sep, texts = level
            app("{")
            first = True
            for k, v in o.items():
                key = texts.get(k) if type(k) is str else None
                if key is None:
                    if isinstance(k, str):
                        pass
                    elif isinstance(k, float):
                        k = _floatstr(k)
                    elif k is True:
                        k = "true"
                    elif k is False:
                        k = "false"
                    elif k is None:
                        k = "null"
                    elif isinstance(k, int):
                        k = int.__repr__(k)
                    else:
                        raise TypeError(f"keys must be str, int, float, bool or None, not {k.__class__.__name__}")
                    key = sep + enc_str(k) + ": "
                    if len(texts) < 4096:  # bounded: a map of unique keys repeats none
                        texts[k] = key
                if first:
                    first = False
                    key = key[1:]  # no "," before the first key
                t = type(v)  # the common scalars here, without a call of enc() each
                if t is str:
                    app(key + enc_str(v))
                elif v is None:
                    app(key + "null")
                elif v is True:
                    app(key + "true")
                elif v is False:
                    app(key + "false")
                elif t is int:
                    app(key + int.__repr__(v))
                elif t is float:
                    app(key + _floatval(v))
                else:
                    app(key)
                    enc(v, inner)
            app(nl + "}")
            del markers[i]
        else:
            i = mark(o)
            enc(_json_default(o), nl)
            del markers[i]

    enc(obj, "\n")
    chunks.append("".join(parts))
    return list(map(json_safe, chunks))


#: the types orjson writes as json.dumps does (exact types: a subclass of one, an Enum, a
#: dataclass, a datetime... differ or go through _json_default, which orjson would not call
#: the same way); floats only where _orjson_float says
_ORJSON_SCALARS = frozenset({str, int, bool, type(None)})
_ORJSON_TYPES = _ORJSON_SCALARS | {float, dict, list, tuple}
_CONTAINERS = (dict, list, tuple)
_SEQUENCES = frozenset({list, tuple})
#: orjson refuses deeper values (json.dumps does not)
_ORJSON_DEPTH = 254


def _orjson_chunks(obj) -> list[str] | None:
    """json_chunks' text (``json.dumps(obj, indent=2, ensure_ascii=False)``'s, NaN and
    Infinity null) made by orjson, in pieces, or None when orjson's could differ. orjson
    writes the same characters (indentation, ": ", string escapes, float repr, null for
    NaN/Infinity) except for floats below 1e-4 (``1e-05`` is ``0.00001`` there), which
    _orjson_plain refuses with any type not in _ORJSON_TYPES; orjson itself refuses (TypeError) integers beyond 64 bits,
    non-str keys, lone surrogates and cycles, which json's path writes or refuses as before.

    A dict's long lists (a result's items) go to orjson _ORJSON_BATCH items at a time, each
    batch's text indented two more spaces (no raw newline can be inside a JSON string), the
    dict's keys (str only) one by one: one
    orjson text of a whole 10,000-sandbox list is a 30 MiB buffer, on top of the str it
    decodes to; the pieces are no more than the text itself."""
    if not _orjson_plain(obj):
        return None
    import orjson  # lazy: only -o json pays for it

    def text(v, indent: str = "") -> str:
        t = orjson.dumps(v, option=orjson.OPT_INDENT_2).decode()
        return t.replace("\n", "\n" + indent) if indent else t

    try:
        if type(obj) is not dict or not any(type(v) is list and len(v) > _ORJSON_BATCH for v in obj.values()):
            return [text(obj)]
        if not all(type(k) is str for k in obj):
            # orjson refuses a non-str key in a dict it writes, but writes a bare key as a
            # value (1 for "1", null for "null"): only json's path writes these keys right
            return None
        out = []
        for i, (k, v) in enumerate(obj.items()):
            out.append(("{" if i == 0 else ",") + "\n  " + text(k) + ": ")
            if type(v) is not list or len(v) <= _ORJSON_BATCH:
                out.append(text(v, "  "))
                continue
            out.append("[")
            for j in range(0, len(v), _ORJSON_BATCH):
                # "[" + "\n  item,\n  item" + "\n]": the items, two spaces further in
                out.append(("," if j else "") + text(v[j:j + _ORJSON_BATCH], "  ")[1:-4])
            out.append("\n  ]")
        out.append("\n}")
        return out
    except TypeError:  # orjson.JSONEncodeError
        return None


#: items per orjson call in a long list (~0.3 MiB of text for sandboxes: its buffer, its str
#: and the str indented are alive at once)
_ORJSON_BATCH = 128


def _orjson_plain(obj) -> bool:
    """Every value in obj is of _ORJSON_TYPES, and every float _orjson_float.

    One level at a time, in C loops (map, zip, compress: a Python loop per value would
    cost most of what orjson saves), by column: a level's dicts of one size are read as
    the column of their first values, of their second... (a list of records has one kind
    of value per column: a column of scalars is done with one set(map(type, col)))."""
    cols: list = [(obj,)]
    for _ in range(_ORJSON_DEPTH + 1):
        found: list[tuple[list, list]] = []  # each column's (dicts, lists and tuples)
        for col in cols:
            kinds = set(map(type, col))
            if kinds <= _ORJSON_SCALARS:
                continue
            if not kinds <= _ORJSON_TYPES:
                return False
            if float in kinds and not all(map(_orjson_float, compress(col, map(is_, map(type, col), repeat(float))))):
                return False
            if kinds.isdisjoint(_CONTAINERS):
                continue
            if kinds.isdisjoint(_SEQUENCES):
                found.append((list(compress(col, map(is_, map(type, col), repeat(dict)))), []))
            else:
                found.append(([o for o in col if type(o) is dict], [o for o in col if type(o) in _SEQUENCES]))
        if not found:
            return True
        cols = []
        for dicts, seqs in found:
            if len(set(map(len, dicts))) == 1:
                cols += zip(*map(dict.values, dicts), strict=True)  # one size: checked above
            elif dicts:
                cols.append([*chain.from_iterable(map(dict.values, dicts))])
            if seqs:
                cols.append([*chain.from_iterable(seqs)])
    return False  # deeper than orjson goes, or a cycle


def _orjson_float(v: float) -> bool:
    """orjson writes v as _floatval does: 0, at least 1e-4 in magnitude (below, repr's
    exponent has two digits, orjson's one; checked on 10^6 random floats), or NaN or
    infinite (null)."""
    return not abs(v) < 1e-4 or v == 0


def _floatval(o: float) -> str:
    """A float value's JSON text: NaN, Infinity and -Infinity are ``null``. RFC 8259 has no
    such numbers (json's NaN/Infinity fail JSON.parse, Go's encoding/json, serde_json);
    null is what JSON.stringify, serde_json, orjson and jq write for them, and keeps the field
    a number-or-null (docs/output.md)."""
    if o - o == 0:  # finite (inf - inf and nan - nan are nan)
        return float.__repr__(o)
    return "null"


def _floatstr(o: float) -> str:
    """json's float text for a key (a string there: "NaN", "Infinity", "-Infinity")."""
    if o != o:
        return "NaN"
    if o == float("inf"):
        return "Infinity"
    if o == float("-inf"):
        return "-Infinity"
    return float.__repr__(o)


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    return str(o)


class Output:
    """Terminal I/O for one invocation (like httpie's Environment + hatch's Application)."""

    def __init__(self, fmt: str | None = None, *, color: bool | None = None, quiet: bool = False,
                 verbose: int = 0, stdout=None, stderr=None):
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.stdout_tty = _isatty(self.stdout)
        self.stderr_tty = _isatty(self.stderr)
        #: colour switched off by the user (--no-color, no_color, KATACTL_NO_COLOR): the
        #: progress bar on stderr must honour it too, not only NO_COLOR (which Rich reads)
        self.no_color = color is False
        if color is None:
            color = self.stdout_tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.color = color
        self.quiet = quiet
        self.verbose = verbose
        self.fmt = self.effective_format(fmt)

    def effective_format(self, fmt: str | None) -> str:
        fmt = fmt or "table"
        if fmt == "table" and not self.stdout_tty:
            return "plain"
        return fmt

    @property
    def machine(self) -> bool:
        return self.fmt in ("json", "yaml", "jsonl", "name")

    @property
    def human(self) -> bool:
        """A human view (table, plain, wide, markdown), not a data format."""
        return self.fmt in HUMAN_FORMATS

    # -- messages (stderr) --------------------------------------------------
    # Messages are one line each and may quote data: printable() keeps both true.
    def info(self, msg: str) -> None:
        if not self.quiet:
            print(printable(msg), file=self.stderr)

    def warn(self, msg: str) -> None:
        print(f"warning: {printable(msg)}", file=self.stderr)

    def error(self, msg: str) -> None:
        print(f"error: {printable(msg)}", file=self.stderr)

    def debug(self, msg: str) -> None:
        if self.verbose:
            print(f"debug: {printable(msg)}", file=self.stderr)

    def event(self, kind: str, **data) -> None:
        """One JSON-lines event on stdout (only with -o jsonl). Events come from worker
        threads (a drain's evictions): each line is written whole, under a lock, so two
        events never interleave on one line."""
        if self.fmt == "jsonl":
            line = _dumps_line({"apiVersion": API_VERSION, "kind": kind, **data}, ensure_ascii=True) + "\n"
            with _EVENT_LOCK:
                self.stdout.write(line)
                self.stdout.flush()

    def progress(self, description: str, total: float | None = None, unit: str = ""):
        """A progress context: a Rich bar on a TTY stderr, silent otherwise."""
        if self.stderr_tty and not self.quiet and self.fmt != "jsonl":
            return _RichProgress(self.stderr, description, total, unit, no_color=self.no_color)
        return _NullProgress()

    # -- results (stdout) ---------------------------------------------------
    def render(self, result: Result) -> None:
        fmt = self.fmt
        if fmt == "json":
            for chunk in json_chunks(result.to_dict()):
                self.stdout.write(chunk)
            self._write("\n")
        elif fmt == "jsonl":  # after the events: the result is one more line
            self._write(to_json(result.to_dict(), indent=None) + "\n")
        elif fmt == "yaml":
            self._write(to_yaml(result.to_dict()))
        elif fmt == "name":
            rows = result.items if result.items is not None else ([result.item] if result.item else [])
            for it in rows:
                self._write(_cell(_dig(it, result.name_key)) + "\n")
        elif fmt == "markdown":
            if result.items is not None:
                self._markdown(result)
            elif result.item is not None:
                self._write(markdown_block(describe(_shown(result))))
            if result.summary:
                self.info(result.summary)
        else:
            if result.items is not None:
                self._table(result, wide=(fmt == "wide"))
            elif result.item is not None:
                self._write(describe(_shown(result)))
            if result.summary:
                self.info(result.summary)
        # every format: stderr is where a reader of a log looks (as for the Error object's
        # "katactl: error:" line), and a script reading stdout never sees it
        hints: set[str] = set()
        for e in result.errors:
            where = e.get("node") or e.get("target") or ""
            self.error(f"{where + ': ' if where else ''}{e['error']['message']}")
            hint = e["error"].get("hint")
            if hint and hint not in hints:  # once: many nodes failing alike share one
                hints.add(hint)
                print(f"hint: {printable(hint)}", file=self.stderr)

    def _columns(self, result: Result, wide: bool) -> list[Column]:
        cols = [c for c in result.columns if wide or not c.wide]
        if result.multi_node:
            cols = [Column("NODE", "node")] + cols
        return cols

    def _table(self, result: Result, wide: bool) -> None:
        cols = self._columns(result, wide)
        rows = [[c.value(it) for c in cols] for it in result.items or []]
        if not rows:
            self._none_found(result)
            return
        if self.stdout_tty:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
            from rich import box

            t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
            for c in cols:
                t.add_column(Text(printable(c.header)), overflow="fold")
            for r in rows:
                t.add_row(*map(Text, r))  # Text, not str: Rich would read "[...]" in data as markup
            Console(file=self.stdout, no_color=not self.color, highlight=False).print(t)
            return
        headers = [printable(c.header) for c in cols]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
        for r in rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        self._write("\n".join(lines) + "\n")

    def _none_found(self, result: Result) -> None:
        """An empty list's message: "No X found." only when no node or target failed; with
        failures the errors are the story (a command says what the others found in its summary)."""
        if result.summary is None and not result.errors:
            self.info(f"No {plural_noun(result.kind)} found.")

    def _markdown(self, result: Result) -> None:
        """A GitHub pipe table (tabulate's "github" format) with -o wide's columns;
        every cell escaped (markdown_cell) so data never breaks the table or renders
        as markup."""
        cols = self._columns(result, wide=True)
        rows = [[markdown_cell(c.value(it)) for c in cols] for it in result.items or []]
        if not rows:
            self._none_found(result)
            return
        from tabulate import tabulate  # lazy: only -o markdown pays for it

        self._write(tabulate(rows, headers=[markdown_cell(printable(c.header)) for c in cols], tablefmt="github",
                             disable_numparse=True) + "\n")

    def text(self, s: str) -> None:
        """A command's native text on stdout (Prometheus exposition, iptables-save rules):
        exact in a pipe or file, so tools can read it back; on a terminal each line is
        printable() (a peer's escape sequences never reach it). With -o markdown it is a
        fenced code block of printable() lines."""
        if self.fmt == "markdown":
            s = markdown_block("".join(printable(line) + "\n" for line in s.splitlines()))
        elif self.stdout_tty:
            s = "".join(printable(line) + "\n" for line in s.splitlines())
        elif s and not s.endswith("\n"):
            s += "\n"
        self._write(s)

    def _write(self, s: str) -> None:
        self.stdout.write(s)
        self.stdout.flush()


def to_yaml(obj) -> str:
    """-o yaml: the JSON document's data (to_json's conversions first), as YAML."""
    import yaml  # lazy: only for -o yaml

    return yaml.dump(json.loads(to_json(obj)), Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=True)


def _yaml_dumper():
    """yaml's SafeDumper, but a scalar holding an unsafe code point (_UNSAFE) is written
    double-quoted with escapes. With allow_unicode, PyYAML (emitter.py, analyze_scalar and
    write_double_quoted) writes bidi controls and zero-width characters raw in any style, and
    U+2028/U+2029 raw in a single-quoted or block scalar; it escapes DEL and C1 only in a
    double-quoted one. Such a scalar is written as allow_unicode=False writes it (\\u202E,
    and \\xE9 for é in that scalar only): the same value to any YAML parser."""
    import yaml

    global _YAML_DUMPER
    if _YAML_DUMPER is None:
        class Dumper(yaml.SafeDumper):
            def analyze_scalar(self, scalar):
                a = super().analyze_scalar(scalar)
                if _JSON_UNSAFE.search(scalar):
                    a.allow_flow_plain = a.allow_block_plain = a.allow_single_quoted = a.allow_block = False
                return a

            def write_double_quoted(self, text, split=True):
                if not _JSON_UNSAFE.search(text):
                    return super().write_double_quoted(text, split)
                self.allow_unicode = False
                try:
                    return super().write_double_quoted(text, split)
                finally:
                    self.allow_unicode = True

        _YAML_DUMPER = Dumper
    return _YAML_DUMPER


_YAML_DUMPER: Any = None


# Markdown: a backslash escapes any ASCII punctuation (CommonMark), and "\|" is GFM's way to put
# a pipe in a table cell. The backslash itself first, so data cannot forge an escape; then
# the characters that would end a cell or start markup (code spans, emphasis, links, HTML).
_MD_SPECIAL = re.compile(r"([\\|`*_\[\]<>])")


def markdown_cell(s: str) -> str:
    """A table cell's text escaped for a GitHub pipe table (s is already printable())."""
    return _MD_SPECIAL.sub(r"\\\1", s)


def markdown_block(text: str) -> str:
    """text as a fenced code block: a fence longer than any backtick run in it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip(chr(10))}\n{fence}\n"


def describe(d: dict, indent: int = 0) -> str:
    """kubectl-describe-like text for one object: 'Key: value' lines, nested indented.
    Keys are data as much as values (a bundle's annotation keys): both are printable()."""
    out: list[str] = []
    pad = "  " * indent
    for key, v in d.items():
        k = printable(str(key))
        if isinstance(v, dict):
            if v:
                out.append(f"{pad}{k}:\n{describe(v, indent + 1)}".rstrip("\n"))
            else:
                out.append(f"{pad}{k}: -")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{pad}{k}:")
            for x in v:
                body = describe(x, indent + 2).rstrip("\n")
                first, _, rest = body.lstrip().partition("\n")
                out.append(f"{pad}  - {first}" + (f"\n{rest}" if rest else ""))
        else:
            out.append(f"{pad}{k}: {_cell(v)}")
    return "\n".join(out) + "\n"


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


class _NullProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        pass


class _RichProgress:
    def __init__(self, stream, description, total, unit, *, no_color: bool = False):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        from katactl.values import format_size

        class BytesColumn(ProgressColumn):
            """Done/total and rate in katactl's binary units (Mi, Gi), not Rich's MB/GB."""

            def render(self, task):
                done = format_size(task.completed)
                total = f"/{format_size(task.total)}" if task.total else ""
                rate = f"  {format_size(task.speed)}/s" if task.speed else ""
                return Text(done + total + rate)

        cols = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
        if unit == "bytes":
            cols += [BytesColumn()]
        else:
            cols += [TextColumn("{task.completed:.0f}/{task.total:.0f}" if total is not None else "")]
        self._p = Progress(*cols, console=Console(file=stream, no_color=no_color or None),
                           transient=True)
        self._desc, self._total = description, total

    def __enter__(self):
        self._p.__enter__()
        self._task = self._p.add_task(self._desc, total=self._total)
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def update(self, completed=None, total=None, description=None):
        kw = {}
        if completed is not None:
            kw["completed"] = completed
        if total is not None:
            kw["total"] = total
        if description is not None:
            kw["description"] = description
        self._p.update(self._task, **kw)


def error_object(exc_dict: dict) -> dict:
    return {"apiVersion": API_VERSION, "kind": "Error", **exc_dict}


