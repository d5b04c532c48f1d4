"""A rollout's policy: how many nodes at once, when, and when to stop.

Parsing only (every bad value is a UsageError naming the option); the engine
applies it. Values come from flags or a plan file, with the same names.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import functools
import math
import re
import reprlib

from katactl.errors import UsageError
from katactl.values import parse_duration

ON_FAILURE = ("stop", "skip", "continue")
DEFAULT_SPREAD = "topology.kubernetes.io/zone"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

#: the shortest --poll: each poll reads the rollout's state (and, at a closed gate, its
#: nodes) from the API, so 1ms sent ~480 requests a second
POLL_MIN = 0.05
#: zoneinfo files that are no IANA zone: Debian's tzdata adds localtime -> /etc/localtime
#: (this machine's zone: another one resuming the rollout reads other hours)
_NOT_IANA = frozenset({"localtime", "posixrules"})

_COUNT = re.compile(r"(\d{1,9})(%?)", re.ASCII)

#: how error messages show a user's value: a plan file's value may share its parts (YAML
#: aliases), so a plain repr() or str() of ~1 KB of YAML can expand to 9^9 leaves
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 200, 200, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4


def short_repr(v) -> str:
    """repr(v), bounded (nesting, items, string length) for messages."""
    return _REPR.repr(v)


@dataclasses.dataclass(frozen=True)
class Count:
    """N nodes or P percent of the selected nodes."""

    value: int
    percent: bool = False

    def of(self, total: int, *, at_least_one: bool) -> int:
        n = math.floor(total * self.value / 100) if self.percent else self.value
        return max(n, 1) if at_least_one and total else n

    def __str__(self) -> str:
        return f"{self.value}{'%' if self.percent else ''}"


def parse_count(text, what: str, *, allow_zero: bool) -> Count:
    # (str() of a plan file's list or mapping could expand it: only scalars are read)
    s = str(text).strip() if isinstance(text, (str, int)) else ""
    m = _COUNT.fullmatch(s)
    if not m or isinstance(text, bool):
        raise UsageError(f"invalid {what} {short_repr(text)}: expected a number of nodes (N) or a percentage (P%)")
    c = Count(int(m.group(1)), bool(m.group(2)))
    if c.percent and c.value > 100:
        raise UsageError(f"invalid {what} {short_repr(text)}: a percentage is at most 100%")
    if c.value == 0 and not allow_zero:
        raise UsageError(f"invalid {what} {short_repr(text)}: must be at least 1")
    return c


# -- maintenance windows ----------------------------------------------------------

_TIME = re.compile(r"([01]\d|2[0-3]):([0-5]\d)|24:00", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Window:
    """Days (0 = Monday), a start and end minute of the day, a time zone. A window
    whose end is before its start crosses midnight and belongs to its start day."""

    text: str
    days: frozenset
    start: int
    end: int
    tz: str

    def contains(self, when: dt.datetime) -> bool:
        from zoneinfo import ZoneInfo

        local = when.astimezone(ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return (day in self.days and minute >= self.start) or \
            ((day - 1) % 7 in self.days and minute < self.end)

    def __str__(self) -> str:
        return self.text


def _minute(s: str, text: str) -> int:
    if not _TIME.fullmatch(s):
        raise UsageError(f"invalid --window {text!r}: {s!r} is not a time HH:MM (00:00-24:00)")
    h, m = s.split(":")
    return int(h) * 60 + int(m)


def _day(name: str) -> int | None:
    """0 = Monday, for an exact day name: Mon..Sun or Monday..Sunday (any case)."""
    for i, d in enumerate(DAYS):
        if name in (d, FULL_DAYS[i]):
            return i
    return None


def _days(spec: str, text: str) -> frozenset:
    if spec.lower() in ("*", "daily", "any", "all"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in spec.split(","):
        a, sep, b = part.lower().partition("-")
        i, j = _day(a), _day(b) if sep else _day(a)
        if i is None or j is None:
            raise UsageError(f"invalid --window {text!r}: {part!r} is not a day or day range "
                             "(Mon..Sun or Monday..Sunday, Mon-Fri, Sat,Sun, daily)")
        while True:
            out.add(i)
            if i == j:
                break
            i = (i + 1) % 7
    return frozenset(out)


@functools.lru_cache(maxsize=1)
def _iana_zones() -> frozenset:
    from zoneinfo import available_timezones

    return frozenset(available_timezones()) - _NOT_IANA


def parse_window(text: str, *, iana: bool = True) -> Window:
    """'Mon-Fri 02:00-05:00 Europe/Paris' (time zone optional, UTC by default). ``iana``:
    the zone must be an IANA name (zoneinfo.available_timezones(), not ``localtime`` nor a
    ``posix/``/``right/`` copy); a stored plan (``iana=False``) keeps what it was given."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    parts = str(text or "").split()
    if len(parts) not in (2, 3):
        raise UsageError(f"invalid --window {text!r}: expected 'DAYS HH:MM-HH:MM [TIMEZONE]', "
                         "e.g. 'Mon-Fri 02:00-05:00 Europe/Paris'")
    days = _days(parts[0], text)
    a, sep, b = parts[1].partition("-")
    if not sep:
        raise UsageError(f"invalid --window {text!r}: {parts[1]!r} is not a time range HH:MM-HH:MM")
    start, end = _minute(a, text), _minute(b, text)
    if start == end:
        raise UsageError(f"invalid --window {text!r}: the window is empty (start = end)")
    if start == 24 * 60:
        raise UsageError(f"invalid --window {text!r}: a window cannot start at 24:00")
    tz = parts[2] if len(parts) == 3 else "UTC"
    try:
        if tz.startswith("/") or ".." in tz or (iana and tz not in _iana_zones()):
            raise ValueError
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise UsageError(f"invalid --window {text!r}: unknown time zone {tz!r} "
                         "(an IANA name such as UTC, Europe/Paris, Asia/Shanghai)") from None
    return Window(str(text), days, start, end % (24 * 60) if end != 24 * 60 else 24 * 60, tz)


def in_windows(windows, when: dt.datetime | None = None) -> bool:
    if not windows:
        return True
    when = when or dt.datetime.now(dt.timezone.utc)
    return any(w.contains(when) for w in windows)


# -- Alertmanager matchers ------------------------------------------------------------

_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|([^"\s,{}]*))\s*')


@dataclasses.dataclass(frozen=True)
class Matcher:
    name: str
    op: str
    value: str

    def rejects(self, labels: dict) -> bool:
        """Whether this matcher certainly does not match ``labels``: ``=`` and ``!=`` compare
        strings as Alertmanager does (a missing label is ""). A regex never rejects:
        Alertmanager runs it with Go's RE2, and Python's re reads some of it otherwise
        ([[:alpha:]]) or not at all (\\pL), so an alert it returned counts as firing."""
        if self.op == "=":
            return str(labels.get(self.name, "")) != self.value
        if self.op == "!=":
            return str(labels.get(self.name, "")) == self.value
        return False

    def __str__(self) -> str:
        value = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{value}"'


def _unescape(raw: str) -> str:
    """A matcher's value as Alertmanager's pkg/labels/parse.go ParseMatcher reads it, quoted
    or not: only \\" \\\\ and \\n are escapes; any other backslash stays a literal backslash
    ("a spurious escape"), so db-\\d+ reaches RE2 as db-\\d+."""
    return re.sub(r'\\([\\"n])', lambda m: "\n" if m.group(1) == "n" else m.group(1), raw)


def parse_matcher(text: str) -> Matcher:
    """Alertmanager matcher syntax: name=value, name!=value, name=~regex, name!~regex
    (value optionally double-quoted)."""
    m = _MATCHER.fullmatch(str(text or ""))
    if not m:
        raise UsageError(f"invalid --alert-filter {text!r}: expected an Alertmanager matcher such as "
                         "severity=critical, alertname!=Watchdog or team=~\"db|storage\"")
    name, op = m.group(1), m.group(2)
    value = _unescape(m.group(3) if m.group(3) is not None else m.group(4))
    if op in ("=~", "!~"):
        bad = re2_error(value)
        if bad:
            raise UsageError(f"invalid --alert-filter {text!r}: bad regular expression for Alertmanager "
                             f"(Go's RE2): {bad}")
    return Matcher(name, op, value)


#: Go regexp/syntax (perl_groups.go, posix_groups): [:name:] in a class
_POSIX = frozenset("alnum alpha ascii blank cntrl digit graph lower print punct space upper word xdigit".split())
#: Go's parseRepeat: {n}, {n,}, {n,m} without leading zeros (else '{' is a literal)
_REPEAT = re.compile(r"\{(0|[1-9]\d*)(,(0|[1-9]\d*)?)?\}")
_HINTS = {"\\Z": " (RE2 spells the end of text \\z)", "(?=": " (lookahead)", "(?!": " (negative lookahead)",
          "(?<=": " (lookbehind)", "(?<!": " (negative lookbehind)", "(?>": " (atomic group)",
          "(?P=": " (backreference)", "(?(": " (conditional)", "(?#": " (comment)"}


def re2_error(rx: str) -> str | None:
    """Why Go's regexp refuses ``^(?:rx)$`` (what Alertmanager compiles a matcher's value as:
    pkg/labels/matcher.go NewMatcher), in its words (Go src/regexp/syntax/parse.go), or None.

    A syntax check only, after parse.go's grammar with Perl flags: escapes \\A \\b \\B \\z
    \\Q..\\E \\pL \\p{Name} \\d \\s \\w \\x{..}, octal, punctuation; [[:alpha:]] classes; flags
    imsU; (?P<name>); repeats up to {1000}, never stacked (a**, a++). Python's re is no
    stand-in: it refuses \\z, \\pL and \\Q..\\E and reads [[:alpha:]] as another class. A
    \\p{Name} is not looked up in Go's Unicode tables: an unknown one makes Alertmanager
    answer 400, which keeps the gate closed."""
    s = f"^(?:{rx})$"
    i, n = 0, len(s)
    depth = 0
    can_repeat = False   # the stack's top is an operand (Go: not opLeftParen/opVerticalBar)
    repeated = False     # the last token was a repetition (Go: lastRepeat)

    def escape(j: int, in_class: bool) -> tuple[int, str | None]:
        """End of the escape at s[j] == '\\', or an error."""
        if j + 1 >= n:
            return j, "trailing backslash at end of expression"
        c = s[j + 1]
        if c in "pP":
            if j + 2 < n and s[j + 2] == "{":
                end = s.find("}", j + 3)
                name = s[j + 3:end].removeprefix("^") if end > 0 else ""
                if end < 0 or not re.fullmatch(r"[A-Za-z_]+", name):
                    return j, f"invalid character class range: `{s[j:end + 1 if end > 0 else n]}`"
                return end + 1, None
            if j + 2 < n and s[j + 2] in "CLMNPSZ":  # a one-letter Unicode category
                return j + 3, None
            return j, f"invalid character class range: `{s[j:j + 3]}`"
        if c in "dDsSwW" or c in "afnrtv" or (c.isascii() and not c.isalnum()):
            return j + 2, None
        if not in_class and c in "AbBz":
            return j + 2, None
        if c in "01234567" and (c == "0" or (j + 2 < n and s[j + 2] in "01234567")):
            k = j + 2
            while k < n and k < j + 4 and s[k] in "01234567":
                k += 1
            return k, None
        if c == "x":
            if j + 2 < n and s[j + 2] == "{":
                end = s.find("}", j + 3)
                if end > 0 and re.fullmatch(r"[0-9A-Fa-f]+", s[j + 3:end]) and int(s[j + 3:end], 16) <= 0x10FFFF:
                    return end + 1, None
            elif re.fullmatch(r"[0-9A-Fa-f]{2}", s[j + 2:j + 4]):
                return j + 4, None
            return j, f"invalid escape sequence: `{s[j:j + 2]}`"
        hint = " (a backreference)" if c in "123456789" else _HINTS.get(s[j:j + 2], "")
        return j, f"invalid escape sequence: `{s[j:j + 2]}`{hint}"

    while i < n:
        c = s[i]
        if c == "(":
            if s.startswith("(?", i):
                if s.startswith("(?P<", i):
                    end = s.find(">", i)
                    if end < 0 or not re.fullmatch(r"[A-Za-z0-9_]+", s[i + 4:end]):
                        return f"invalid named capture: `{s[i:end + 1 if end > 0 else n]}`"
                    i = end + 1
                else:
                    f = re.match(r"\(\?([imsU]*)(?:-([imsU]+))?([:)])", s[i:])
                    if not f:
                        hint = next((h for p, h in _HINTS.items() if s.startswith(p, i)), "")
                        return f"invalid or unsupported Perl syntax: `{s[i:i + 3]}`{hint}"
                    i += f.end()
                    if f.group(3) == ")":  # flags only: no group, the operand stays as it was
                        repeated = False
                        continue
            else:
                i += 1
            depth += 1
            can_repeat = repeated = False
            continue
        if c == ")":
            if not depth:
                return f"unexpected ): `{s}`"
            depth -= 1
            i += 1
            can_repeat, repeated = True, False
            continue
        if c == "|":
            i += 1
            can_repeat = repeated = False
            continue
        quant = None
        if c in "*+?":
            quant = c
        elif c == "{" and (m := _REPEAT.match(s, i)):
            lo, hi = int(m.group(1)), m.group(3)
            if lo > 1000 or (hi and (int(hi) > 1000 or int(hi) < lo)):
                return f"invalid repeat count: `{m.group(0)}`"
            quant = m.group(0)
        if quant is not None:
            j = i + len(quant) + s.startswith("?", i + len(quant))  # a*? is lazy, not stacked
            if repeated:
                return f"invalid nested repetition operator: `{s[i - 1:j]}`"
            if not can_repeat:
                return f"missing argument to repetition operator: `{s[i:j]}`"
            i, repeated = j, True
            continue
        repeated = False
        if s.startswith("\\Q", i):  # literal up to \E or the end (then the wrapper's ")$" too)
            end = s.find("\\E", i + 2)
            can_repeat = can_repeat or end != i + 2  # \Q\E is nothing
            i = n if end < 0 else end + 2
            continue
        can_repeat = True
        if c == "\\":
            i, err = escape(i, False)
            if err:
                return err
            continue
        if c == "[":
            j = i + 1 + s.startswith("^", i + 1)
            first = True
            while first or j >= n or s[j] != "]":
                if j >= n:
                    return f"missing closing ]: `{s[i:n]}`"
                first = False
                if s.startswith("[:", j) and (end := s.find(":]", j + 2)) > 0:
                    if s[j + 2:end].removeprefix("^") not in _POSIX:
                        return f"invalid character class range: `{s[j:end + 2]}`"
                    j = end + 2
                    continue
                if s.startswith("\\", j) and j + 1 < n and s[j + 1] in "pPdDsSwW":
                    j, err = escape(j, True)
                    if err:
                        return err
                    continue
                lo_at = j
                j, first_c, err = _class_char(s, j, escape)
                if err:
                    return err
                if j + 1 < n and s[j] == "-" and s[j + 1] != "]":
                    j, last_c, err = _class_char(s, j + 1, escape)
                    if err:
                        return err
                    if last_c < first_c:
                        return f"invalid character class range: `{s[lo_at:j]}`"
            i = j + 1
            continue
        i += 1
    if depth:
        return f"missing closing ): `{s}`"
    return None


def _class_char(s: str, j: int, escape) -> tuple[int, str, str | None]:
    """One character of a class at s[j] (an escape or a rune): the end, its text, an error."""
    if j >= len(s):
        return j, "", f"missing closing ]: `{s}`"
    if s[j] != "\\":
        return j + 1, s[j], None
    if s[j + 1:j + 2] in ("p", "P", "d", "D", "s", "S", "w", "W"):  # a class is no range's end
        return j, "", f"invalid escape sequence: `{s[j:j + 2]}`"
    end, err = escape(j, True)
    return end, "" if err else _escaped_char(s[j:end]), err


def _escaped_char(esc: str) -> str:
    """The character an escape in a class stands for (for a range's order)."""
    c = esc[1:2]
    if c == "x":
        return chr(int(esc[2:].strip("{}") or "0", 16))
    if c in "01234567":
        return chr(int(esc[1:], 8))
    return {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}.get(c, c)


# -- the policy ---------------------------------------------------------------------------

@dataclasses.dataclass
class Policy:
    max_unavailable: Count = Count(1)
    canary: int = 0
    canary_soak: float | None = None     # None: stop after the canary for 'rollout resume'
    batch_growth: bool = False
    soak: float = 0.0
    failure_budget: Count = Count(0)
    on_failure: str = "stop"
    windows: list = dataclasses.field(default_factory=list)
    alert_gate: str | None = None
    alert_filters: list = dataclasses.field(default_factory=list)
    spread_by: str | None = DEFAULT_SPREAD
    step_timeout: float = 0.0            # 0: the steps' own bounds
    gate_timeout: float = 0.0            # 0: wait for a closed gate forever
    poll: float = 5.0                    # gate and pause/abort re-check interval

    def to_dict(self) -> dict:
        return {"maxUnavailable": str(self.max_unavailable), "canary": self.canary,
                "canarySoak": self.canary_soak, "batchGrowth": self.batch_growth, "soak": self.soak,
                "failureBudget": str(self.failure_budget), "onFailure": self.on_failure,
                "windows": [str(w) for w in self.windows], "alertGate": self.alert_gate,
                "alertFilters": [str(m) for m in self.alert_filters], "spreadBy": self.spread_by,
                "stepTimeout": self.step_timeout, "gateTimeout": self.gate_timeout, "poll": self.poll}

    @classmethod
    def from_dict(cls, d: dict, *, stored: bool = False) -> "Policy":
        """Build and check a policy from plan-file / flag values (camelCase keys). ``stored``:
        a stored plan's (resume, abort): checks added since it was stored (the --poll floor,
        IANA zone names, an --alert-gate without credentials) do not strand it."""
        p = cls()
        if d.get("maxUnavailable") is not None:
            p.max_unavailable = parse_count(d["maxUnavailable"], "--max-unavailable", allow_zero=False)
        if d.get("canary") is not None:
            p.canary = _int(d["canary"], "--canary")
        if d.get("canarySoak") is not None:
            p.canary_soak = _dur(d["canarySoak"], "--canary-soak", allow_zero=True)
        p.batch_growth = _bool(d.get("batchGrowth", False), "--batch-growth")
        if d.get("soak") is not None:
            p.soak = _dur(d["soak"], "--soak", allow_zero=True)
        budget_given = d.get("failureBudget") is not None
        if budget_given:
            p.failure_budget = parse_count(d["failureBudget"], "--failure-budget", allow_zero=True)
        on_failure = d.get("onFailure")
        if on_failure is not None and on_failure not in ON_FAILURE:
            raise UsageError(f"invalid --on-failure {short_repr(on_failure)}: choose from {', '.join(ON_FAILURE)}")
        p.on_failure = on_failure or ("skip" if budget_given and p.failure_budget.value else "stop")
        if p.on_failure == "stop" and budget_given and p.failure_budget.value:
            raise UsageError(f"conflicting policy: --on-failure stop stops at the first failed node, "
                             f"so --failure-budget {p.failure_budget} can never be used "
                             "(use --on-failure skip or continue)")
        p.windows = [parse_window(w, iana=not stored) for w in _list(d.get("windows"), "--window")]
        gate = d.get("alertGate")
        if gate is not None:
            p.alert_gate = check_gate_url(gate, userinfo=stored)
        p.alert_filters = [parse_matcher(m) for m in _list(d.get("alertFilters"), "--alert-filter")]
        if p.alert_filters and not p.alert_gate:
            raise UsageError("conflicting policy: --alert-filter without --alert-gate URL")
        if "spreadBy" in d:
            sb = d["spreadBy"]
            if sb is not None and (not isinstance(sb, str) or not re.fullmatch(r"[A-Za-z0-9./_-]{1,316}", sb)):
                raise UsageError(f"invalid --spread-by {short_repr(sb)}: expected a node label key (or '' for none)")
            p.spread_by = sb or None
        if d.get("stepTimeout") is not None:
            p.step_timeout = _dur(d["stepTimeout"], "--step-timeout", allow_zero=True)
        if d.get("gateTimeout") is not None:
            p.gate_timeout = _dur(d["gateTimeout"], "--gate-timeout", allow_zero=True)
        if d.get("poll") is not None:
            p.poll = _dur(d["poll"], "--poll", allow_zero=False)
            if p.poll < POLL_MIN and not stored:
                raise UsageError(f"invalid --poll {short_repr(d['poll'])}: at least {POLL_MIN * 1000:g}ms (each poll "
                                 "reads the rollout's state from the API)")
        if p.canary_soak is not None and not p.canary:
            raise UsageError("conflicting policy: --canary-soak without --canary N")
        if not p.max_unavailable.percent and p.canary > p.max_unavailable.value:
            raise UsageError(f"conflicting policy: --canary {p.canary} takes more nodes out at once than "
                             f"--max-unavailable {p.max_unavailable}")
        return p


def check_canary(policy: "Policy", total: int) -> None:
    """--canary against a percentage --max-unavailable, resolved on the selection's size
    (``total`` nodes) as the batches are (Policy.from_dict checks a count alone)."""
    mu = policy.max_unavailable.of(total, at_least_one=True)
    if policy.max_unavailable.percent and policy.canary > mu:
        raise UsageError(f"conflicting policy: --canary {policy.canary} takes more nodes out at once than "
                         f"--max-unavailable {policy.max_unavailable} ({mu} of the {total} selected node(s))")


def check_gate_url(url, *, userinfo: bool = False) -> str:
    """An Alertmanager URL. Without ``userinfo``, one carrying credentials (user:pass@) is
    refused: the URL is stored in the rollout's state (a ConfigMap in the lock namespace),
    the audit log and its events, readable by many more than the credential should be."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url.strip():
        raise UsageError("invalid --alert-gate: expected an Alertmanager URL such as http://alertmanager:9093")
    try:
        u = urlsplit(url.strip())
    except ValueError as e:  # an unclosed IPv6 bracket: "Invalid IPv6 URL"
        raise UsageError(f"invalid --alert-gate {redact_url(url)!r}: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment \
            or any(c.isspace() for c in url.strip()):
        raise UsageError(f"invalid --alert-gate {redact_url(url)!r}: expected an Alertmanager URL such as "
                         "http://alertmanager:9093")
    try:
        _ = u.port  # parsing the port raises for a bad one
    except ValueError:
        raise UsageError(f"invalid --alert-gate {redact_url(url)!r}: bad port") from None
    if (u.username is not None or u.password is not None) and not userinfo:
        raise UsageError(f"invalid --alert-gate {redact_url(url)!r}: a URL with credentials (user:password@) "
                         "would be stored in the rollout's state, the audit log and its events",
                         hint="reach Alertmanager without credentials: its in-cluster Service (or kubectl "
                              "port-forward to it), or a proxy on localhost that adds them")
    return url.strip().rstrip("/")


def redact_url(url: str) -> str:
    """url with its password replaced by ``xxxxx``, as Go's net/url URL.Redacted() does;
    also in a URL that does not parse (an unclosed IPv6 bracket), where the password is what
    lies between the first ':' after '//' and the last '@'."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        u = urlsplit(url)
    except ValueError:
        scheme, sep, rest = url.partition("//")
        userinfo, at, host = rest.rpartition("@")
        if not (sep and at and ":" in userinfo):
            return url
        return f"{scheme}//{userinfo.partition(':')[0]}:xxxxx@{host}"
    if u.password is None:
        return url
    user = u.netloc.rpartition("@")[0].partition(":")[0]
    return urlunsplit(u._replace(netloc=f"{user}:xxxxx@{u.netloc.rpartition('@')[2]}"))


def _list(v, what: str) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return list(v)
    raise UsageError(f"invalid {what}: expected a string or a list of strings, got {short_repr(v)}")


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):  # (str() of a list could expand it)
        raise UsageError(f"invalid {what} {short_repr(v)}: expected a whole number")
    try:
        n = int(v.strip()) if isinstance(v, str) else v
    except ValueError:
        raise UsageError(f"invalid {what} {short_repr(v)}: expected a whole number") from None
    if n < 0 or n > 10 ** 6:
        raise UsageError(f"invalid {what} {short_repr(v)}: expected 0 or more")
    return n


def _bool(v, what: str) -> bool:
    if isinstance(v, bool):
        return v
    raise UsageError(f"invalid {what} {short_repr(v)}: expected true or false")


def _dur(v, what: str, *, allow_zero: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):  # (parse_duration str()s it)
        raise UsageError(f"invalid {what} {short_repr(v)}: expected a duration")
    if isinstance(v, (int, float)):
        # written as a positional decimal: a stored 1e-05 (repr) is no duration parse_duration reads
        v = format(decimal.Decimal(repr(v)), "f") if v >= 0 else f"-{-v}"
    return parse_duration(v, what=what, allow_zero=allow_zero)
