"""Label selector syntax, checked as the API server parses it, so that a bad selector is a
usage error before anything is touched (kubectl drain's Complete() does the same:
"--pod-selector=<pod_selector> must be a valid label selector").

A port of the lexer and parser of kubernetes
staging/src/k8s.io/apimachinery/pkg/labels/selector.go (``labels.Parse``) with
``NewRequirement``'s checks: keys are qualified names, values label values
(staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go), ``in``/``notin`` need a
value set, ``=``/``==``/``!=`` one value, ``>``/``<`` one integer. Only validation: matching
is the server's job.
"""
from __future__ import annotations

import re

_SPECIAL = set("=!(),><")
_WHITESPACE = set(" \t\r\n")
_OPERATORS = {"!": "!", "!=": "!=", "==": "==", "=": "=", ">": ">", "<": "<", "(": "(", ")": ")", ",": ","}
_KEYWORDS = {"in", "notin"}
_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_BINARY = "in, notin, =, ==, !=, gt, lt"  # selector.go binaryOperators, as it prints them
_END, _ID, _ERR = "end", "id", "error"


def _lex(s: str) -> list[tuple[str, str]]:
    """(token, literal) pairs; token is an operator itself, "in"/"notin", _ID, _ERR or _END."""
    out, i, n = [], 0, len(s)
    while True:
        while i < n and s[i] in _WHITESPACE:
            i += 1
        if i >= n:
            out.append((_END, ""))
            return out
        if s[i] in _SPECIAL:  # scanSpecialSymbol: the longest operator
            buf, last, j = "", None, i
            while j < n and s[j] in _SPECIAL:
                buf += s[j]
                if buf in _OPERATORS:
                    last, j = buf, j + 1
                elif last is not None:
                    break
                else:
                    j += 1
            if last is None:
                out.append((_ERR, f"error expected: keyword found '{buf}'"))
                i = j
            else:
                out.append((last, last))
                i += len(last)
            continue
        j = i
        while j < n and s[j] not in _SPECIAL and s[j] not in _WHITESPACE:
            j += 1
        word = s[i:j]
        out.append((word if word in _KEYWORDS else _ID, word))
        i = j


def _key_errors(k: str) -> list[str]:
    """IsQualifiedName: [prefix/]name."""
    parts = k.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return ["prefix part must be non-empty"]
        if len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
            return ["prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                    "characters, '-' or '.', and must start and end with an alphanumeric character"]
    else:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start "
                "and end with an alphanumeric character with an optional DNS subdomain prefix and '/'"]
    if not name:
        return ["name part must be non-empty"]
    if len(name) > 63:
        return ["name part must be no more than 63 characters"]
    if not _NAME.match(name):
        return ["name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                "with an alphanumeric character"]
    return []


def _value_errors(v: str) -> list[str]:
    if len(v) > 63:
        return ["must be no more than 63 characters"]
    if v and not _NAME.match(v):
        return ["a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
                "'.', and must start and end with an alphanumeric character"]
    return []


class _Parser:
    def __init__(self, s: str):
        self.items = _lex(s)
        self.pos = 0

    def look(self, values: bool = True) -> tuple[str, str]:
        tok, lit = self.items[self.pos]
        return (_ID if values and tok in _KEYWORDS else tok), lit

    def take(self, values: bool = True) -> tuple[str, str]:
        r = self.look(values)
        self.pos += 1
        return r

    def parse(self) -> None:
        while True:
            tok, lit = self.look()
            if tok == _END:
                return
            if tok not in (_ID, "!"):
                raise ValueError(f"found '{lit}', expected: !, identifier, or 'end of string'")
            try:
                self.requirement()
            except ValueError as e:
                raise ValueError(f"unable to parse requirement: {e}") from None
            t, lit = self.take()
            if t == _END:
                return
            if t != ",":
                raise ValueError(f"found '{lit}', expected: ',' or 'end of string'")
            t2, lit2 = self.look()
            if t2 not in (_ID, "!"):
                raise ValueError(f"found '{lit2}', expected: identifier after ','")

    def requirement(self) -> None:
        tok, key = self.take()
        unary = tok == "!"
        if unary:
            tok, key = self.take()
        if tok != _ID:
            raise ValueError(f"found '{key}', expected: identifier")
        errs = _key_errors(key)
        if errs:
            raise ValueError(f'Invalid value: "{key}": {"; ".join(errs)}')
        if unary or self.look()[0] in (_END, ","):  # "!a=b": parse() then refuses the "="
            return
        op, lit = self.take(values=False)
        if op in ("in", "notin"):
            values = self.value_set()
            if not values:
                raise ValueError("for 'in', 'notin' operators, values set can't be empty")
        elif op in ("=", "==", "!=", ">", "<"):
            t, lit = self.look()
            if t in (_END, ","):
                values = {""}
            else:
                t, lit = self.take()
                if t != _ID:
                    raise ValueError(f"found '{lit}', expected: identifier")
                values = {lit}
            if op in (">", "<"):
                try:
                    int(next(iter(values)), 10)
                except ValueError:
                    raise ValueError("for 'Gt', 'Lt' operators, the value must be an integer") from None
        else:
            raise ValueError(f"found '{lit}', expected: {_BINARY}")
        for v in sorted(values):
            errs = _value_errors(v)
            if errs:
                raise ValueError(f'values[0][{key}]: Invalid value: "{v}": {"; ".join(errs)}')

    def value_set(self) -> set[str]:
        tok, lit = self.take()
        if tok != "(":
            raise ValueError(f"found '{lit}' expected: '('")
        tok, lit = self.look()
        if tok == ")":
            self.take()
            return {""}
        if tok not in (_ID, ","):
            raise ValueError(f"found '{lit}', expected: ',', ')' or identifier")
        out: set[str] = set()
        while True:
            t, lit2 = self.take()
            if t == _ID:
                out.add(lit2)
                t2, lit3 = self.look()
                if t2 == ",":
                    continue
                if t2 == ")":
                    break
                raise ValueError(f"found '{lit3}', expected: ',' or ')'")
            if t == ",":
                if not out:
                    out.add("")
                t2, _ = self.look()
                if t2 == ")":
                    out.add("")
                    break
                if t2 == ",":
                    out.add("")
                continue
            raise ValueError(f"found '{lit2}', expected: ',', or identifier")
        if self.take()[0] != ")":
            raise ValueError(f"found '{lit}', expected: ')'")
        return out


def check(selector: str) -> None:
    """ValueError (the API server's reason) when ``selector`` is not a valid label selector."""
    _Parser(selector).parse()

