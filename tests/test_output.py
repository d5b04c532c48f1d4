"""katactl.output: one renderer, every format."""
import contextlib
import io
import json
import os
import pty
import re
import subprocess
import sys

import pytest
import yaml

from katactl.output import Column, Output, Result

ITEMS = [{"name": "sb-1", "pod": {"name": "web", "namespace": "prod"}, "mem": 512, "note": "two\nlines"},
         {"name": "sb-2", "pod": {"name": "batch-job-with-a-really-long-name-" + "x" * 80, "namespace": "batch"},
          "mem": None, "note": ""}]
COLS = [Column("NAME", "name"), Column("POD", lambda i: f"{i['pod']['namespace']}/{i['pod']['name']}"),
        Column("MEM", "mem", fmt=lambda v: f"{v}Mi"), Column("NOTE", "note", wide=True)]


def render(fmt, result=None, tty=False):
    out, err = io.StringIO(), io.StringIO()
    if tty:
        out.isatty = lambda: True
    o = Output(fmt, stdout=out, stderr=err, color=False)
    o.render(result or Result(kind="SandboxList", items=ITEMS, columns=COLS))
    return out.getvalue(), err.getvalue()


def test_plain_is_one_record_per_line_unwrapped():
    text, _ = render(None)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["NAME", "POD", "MEM"]
    assert lines[1].split() == ["sb-1", "prod/web", "512Mi"]
    assert lines[2].split()[2] == "-" and len(lines[2]) > 120


def test_wide_adds_columns_and_escapes_newlines():
    text, _ = render("wide")
    assert text.splitlines()[0].split() == ["NAME", "POD", "MEM", "NOTE"]
    assert "two\\nlines" in text and len(text.splitlines()) == 3


def test_json_shape():
    text, _ = render("json", Result(kind="BalloonStatus", item={"target": 1}, changed=False, dry_run=True))
    assert json.loads(text) == {"apiVersion": "katactl/v1", "kind": "BalloonStatus", "target": 1,
                                "changed": False, "dryRun": True}


def test_mutation_result_lifts_changed_and_dry_run():
    item = {"node": "n1", "changed": True, "dryRun": True, "to": "2.0"}
    r = Result.mutation("UpgradeSwitch", item, name_key="node")
    assert r.to_dict() == {"apiVersion": "katactl/v1", "kind": "UpgradeSwitch", "node": "n1", "to": "2.0",
                           "changed": True, "dryRun": True}
    assert r.name_key == "node" and item["changed"] is True  # the caller's dict is left alone
    # every mutating command reports dryRun: false when the operation did not say
    assert Result.mutation("VmcoreTrigger", {"changed": True}).to_dict()["dryRun"] is False


def test_yaml_and_name():
    text, _ = render("yaml")
    d = yaml.safe_load(text)
    assert d["kind"] == "SandboxList" and d["items"][0]["pod"]["name"] == "web"
    text, _ = render("name")
    assert text.splitlines() == ["sb-1", "sb-2"]


def test_errors_go_to_stderr_and_json():
    r = Result(kind="SandboxList", items=[], columns=COLS, multi_node=True,
               errors=[{"node": "n2", "error": {"code": "Unreachable", "message": "boom", "exitCode": 7}}])
    text, err = render(None, r)
    assert "n2: boom" in err and text == ""
    text, _ = render("json", r)
    assert json.loads(text)["errors"][0]["node"] == "n2"


def test_multi_node_adds_node_column():
    r = Result(kind="SandboxList", items=[{"node": "n1", **ITEMS[0]}], columns=COLS, multi_node=True)
    text, _ = render(None, r)
    assert text.splitlines()[0].split()[0] == "NODE"


def test_single_item_describe():
    text, _ = render(None, Result(kind="Sandbox", item={"id": "abc", "pod": {"name": "web"}, "vcpus": 2}))
    assert text.splitlines() == ["id: abc", "pod:", "  name: web", "vcpus: 2"]


def test_table_on_a_real_tty():
    """On a TTY: a Rich table, still one row per record at a normal width."""
    master, slave = pty.openpty()
    code = ("from katactl.output import *\n"
            "Output(None).render(Result(kind='X', items=[{'name': 'sb-1', 'mem': 1}], "
            "columns=[Column('NAME', 'name'), Column('MEM', 'mem')]))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=subprocess.PIPE,
                         env=dict(os.environ, COLUMNS="100", NO_COLOR="1"))
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 4096)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    p.wait()
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())
    assert p.returncode == 0, p.stderr.read()
    rows = [line for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("─━ ")]
    assert rows[0].split() == ["NAME", "MEM"] and rows[1].split() == ["sb-1", "1"]


@pytest.mark.parametrize("kind,noun", [
    ("SandboxList", "sandboxes"), ("UpgradeStatus", "upgrade statuses"), ("VmcoreList", "vmcores"),
    ("MetricSampleList", "metric samples"), ("Policy", "policies"), ("AgentURL", "agent urls"),
])
def test_empty_list_message_names_the_things_in_plural(kind, noun):
    from katactl.output import plural_noun

    assert plural_noun(kind) == noun


def test_empty_sandbox_list_says_so_on_stderr(cli, tmp_path):
    r = cli(["--host-root", str(tmp_path), "sandbox", "list"])
    assert r.exit_code == 0 and r.stdout == ""
    assert "No sandboxes found." in r.stderr


def test_name_output_of_one_object_commands(cli, tmp_path):
    r = cli(["version", "-o", "name"])
    assert r.exit_code == 0 and r.stdout.strip() and r.stdout.strip() != "-"
    r = cli(["--host-root", str(tmp_path), "version", "-o", "name"])
    assert r.exit_code == 0 and r.stdout == "localhost\n"


HOSTILE_PODS = {"mark01": "web[/]0", "mark02": "a[bold]b[/bold]", "esc003": "evil\x1b[31mRED\x1b]0;title\x07"}
#: an annotation key is node data too (containerd and most CRI clients do not validate keys):
#: `sandbox inspect --raw` prints the bundle's annotations, keys and values
HOSTILE_KEY = "key\x1b]0;PWNED\x07\x1b[2J\x1b[31mred"


@contextlib.contextmanager
def _hostile_node():
    from tests._katanode import node

    with node() as tree:
        for sid, pod in HOSTILE_PODS.items():
            tree.go(sid, serve=False, pod_name=pod, pod_namespace="ns",
                    extra_annotations={HOSTILE_KEY: "v"} if sid == "esc003" else None)
        yield tree


def test_data_is_never_rich_markup_on_a_terminal():
    """Pod names are data: "[/]" must not crash Rich or style the table."""
    from tests._pty import run_on_pty

    with _hostile_node() as tree:
        rc, text = run_on_pty([sys.executable, "-m", "katactl", "--host-root", tree.root, "sandbox", "list",
                               "--no-check"], COLUMNS="200")
    assert rc == 0, text
    assert "ns/web[/]0" in text and "ns/a[bold]b[/bold]" in text
    assert "\x1b]0;title" not in text and "\\x1b[31mRED" in text


def test_control_characters_in_data_never_reach_piped_output(cli):
    with _hostile_node() as tree:
        for args in (["sandbox", "list", "--no-check"], ["sandbox", "inspect", "esc003"]):
            r = cli(["--host-root", tree.root, *args])
            assert r.exit_code == 0, r.stderr
            assert "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
            assert "evil\\x1b[31mRED\\x1b]0;title\\x07" in r.stdout


@pytest.mark.parametrize("fmt", ["plain", "wide", "markdown"])
def test_control_characters_in_keys_never_reach_the_output(cli, fmt):
    """describe() printed dict keys raw: a hostile annotation key set the window title,
    cleared the screen and turned the text red (review 5, finding 5)."""
    with _hostile_node() as tree:
        r = cli(["--host-root", tree.root, "sandbox", "inspect", "esc003", "--raw", "-o", fmt])
    assert r.exit_code == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
    assert "key\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mred: v" in r.stdout


def test_control_characters_in_keys_never_reach_a_terminal():
    from tests._pty import run_on_pty

    with _hostile_node() as tree:
        rc, text = run_on_pty([sys.executable, "-m", "katactl", "--host-root", tree.root, "sandbox", "inspect",
                               "esc003", "--raw"], COLUMNS="200")
    assert rc == 0, text
    assert "\x1b]0;PWNED" not in text and "\x1b[2J" not in text and "\\x1b]0;PWNED\\x07" in text


def test_describe_and_table_headers_escape_keys():
    from katactl.output import describe

    key = "k\x1b[2J"
    assert describe({key: {key: [{key: 1}]}}) == "k\\x1b[2J:\n  k\\x1b[2J:\n    - k\\x1b[2J: 1\n"
    for fmt in ("plain", "markdown"):  # a header made of data, should a command make one
        text, _ = render(fmt, Result(kind="X", items=[{"a": 1}], columns=[Column(key, "a")]))
        assert "\x1b" not in text and "x1b" in text, text


def test_native_text_is_exact_in_a_pipe_and_escaped_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    rules = "*filter\n-A INPUT -m comment --comment \"\x1b]0;x\x07\" -j ACCEPT\nCOMMIT"
    piped, tty = io.StringIO(), Tty()
    Output("plain", stdout=piped).text(rules)
    Output("table", stdout=tty).text(rules)
    assert piped.getvalue() == rules + "\n"  # iptables-restore reads back what get printed
    assert "\x1b" not in tty.getvalue() and "\\x1b]0;x\\x07" in tty.getvalue()


# -- -o markdown (issue 20) -------------------------------------------------------------
MD_HOSTILE = [{"name": "pipe|in`name`", "pod": {"name": "a\\|b *x* _y_ [l](u) <b>", "namespace": "ns"},
               "mem": 1, "note": "back\\slash ``two``"}]


def _md_rows(text: str) -> list[list[str]]:
    """A GitHub pipe table read back: '\\X' is a literal X, an unescaped '|' ends a cell."""
    lines = text.splitlines()
    assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[1]), lines[1]
    rows = []
    for ln in [lines[0]] + lines[2:]:
        assert ln.startswith("| ") and ln.endswith(" |"), ln
        cells, cur, i = [], "", 1
        while i < len(ln) - 1:
            ch = ln[i]
            if ch == "\\":
                cur += ln[i + 1]
                i += 2
                continue
            if ch == "|":
                cells.append(cur.strip())
                cur = ""
            else:
                cur += ch
            i += 1
        cells.append(cur.strip())
        rows.append(cells)
    return rows


def test_markdown_is_a_pipe_table_with_wide_columns_that_reads_back():
    items = ITEMS + MD_HOSTILE
    text, err = render("markdown", Result(kind="SandboxList", items=items, columns=COLS))
    rows = _md_rows(text)
    assert rows[0] == ["NAME", "POD", "MEM", "NOTE"]  # -o wide's columns
    assert rows[1:] == [[c.value(it) for c in COLS] for it in items]  # the same cells as -o wide
    assert "two\\\\nlines" in text  # a newline in data: escaped, never a broken row
    assert len(text.splitlines()) == 2 + len(items) and err == ""


def test_markdown_renders_as_a_table_with_the_data_as_text():
    """A real CommonMark+GFM-tables parser sees one table whose cells are the data,
    with no code span, emphasis, link or HTML made of it."""
    markdown_it = pytest.importorskip("markdown_it")
    text, _ = render("markdown", Result(kind="SandboxList", items=MD_HOSTILE, columns=COLS))
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
    kinds = {t.type for t in tokens} | {c.type for t in tokens for c in (t.children or [])}
    assert "table_open" in kinds and not kinds & {"code_inline", "em_open", "strong_open", "link_open",
                                                   "html_inline"}
    import html

    page = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", page)]
    assert cells == [c.value(MD_HOSTILE[0]) for c in COLS]  # rendered text == the data
    assert cells[0] == "pipe|in`name`" and cells[1] == "ns/a\\|b *x* _y_ [l](u) <b>"


def test_markdown_multi_node_and_objects():
    text, _ = render("markdown", Result(kind="SandboxList", items=[dict(ITEMS[0], node="n1")], columns=COLS,
                                       multi_node=True))
    assert _md_rows(text)[0] == ["NODE", "NAME", "POD", "MEM", "NOTE"]
    text, _ = render("markdown", Result(kind="Balloon", item={"target": "```x```", "nested": {"a": 1}}))
    assert text.startswith("````text\n") and text.endswith("\n````\n") and "target: ```x```" in text
    text, err = render("markdown", Result(kind="SandboxList", items=[], columns=COLS))
    assert text == "" and "No sandboxes found." in err


def test_markdown_from_the_cli_escapes_pod_names(cli):
    """sandbox list -o markdown: pod names with '|' and backticks stay in their cell."""
    from tests._katanode import node

    with node() as tree:
        tree.go("mdpipe01", serve=False, pod_name="web|0`x`", pod_namespace="ns")
        tree.go("mdplain2", serve=False, pod_name="db", pod_namespace="ns")
        wide = cli(["--host-root", tree.root, "sandbox", "list", "--no-check", "-o", "wide"])
        r = cli(["--host-root", tree.root, "sandbox", "list", "--no-check", "-o", "markdown"])
    assert r.exit_code == 0, r.stderr
    assert "web\\|0\\`x\\`" in r.stdout
    rows = _md_rows(r.stdout)
    assert rows[0] == wide.stdout.splitlines()[0].split()  # the same columns as -o wide
    pods = {row[0]: row[rows[0].index("POD")] for row in rows[1:]}
    assert pods == {"mdpipe01": "ns/web|0`x`", "mdplain2": "ns/db"}


def test_markdown_is_an_output_format():
    from katactl.cli import OUTPUT_HELP
    from katactl.output import FORMATS

    assert "markdown" in FORMATS and "markdown" in OUTPUT_HELP


def test_json_chunks_is_json_dumps_text():
    """-o json's fast encoder (json_chunks) writes exactly what json.dumps(indent=2) writes,
    for the awkward cases too: empty containers, non-str keys, escapes, enums, dataclasses,
    sets and bytes through the default hook, deep nesting."""
    import dataclasses
    import enum

    from katactl.output import json_chunks

    class Level(enum.IntEnum):
        HIGH = 3

    @dataclasses.dataclass
    class Row:
        x: int
        y: list

    cases = [
        {}, [], {"a": {}}, {"a": []}, [[], {}], {"k": [1, 2.5, -0.0, 1e-7, 1e22, 12345678901234567890]},
        {"s": "é\u2028\n\t\"\\ \x00\x1b ☃ 𝄞"}, {"t": True, "f": False, "n": None},
        {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
        {"e": Level.HIGH}, {"d": Row(1, [{"z": {3, 1, 2}}])}, {"b": b"bytes\xff"},
        {"nested": [[[[{"deep": [1]}]]]]}, "top-level string", 5, None, [None, True],
        {"items": [{"id": f"{i:032x}", "vcpus": i, "pod": {"name": f"p{i}"}} for i in range(3000)]},
    ]
    for case in cases:
        assert "".join(json_chunks(case)) == _dumps(case)
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError):
        json_chunks(loop)


def _nulls(o):
    """o with each NaN or infinite float value None, keys as they are (json.dumps writes a
    key NaN as "NaN"): what -o json writes for them."""
    if isinstance(o, float):
        return o if o - o == 0 else None
    if isinstance(o, dict):
        return {k: _nulls(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nulls(v) for v in o]
    return o


def _dumps(case) -> str:
    from katactl.output import _json_default

    # DEL, C1, bidi, separator and zero-width code points: \uXXXX escapes, the same JSON value
    return _escape_unsafe(json.dumps(_nulls(case), indent=2, ensure_ascii=False, default=_json_default))


def test_json_by_orjson_only_where_its_text_is_json_dumps_text():
    """-o json hands plain data to orjson (_orjson_chunks) and everything it would write
    otherwise to json's path: floats below 1e-4 ("1e-05" is "0.00001" there), an Enum (its
    value), subclasses, integers beyond 64 bits, non-str
    keys (at the top too, beside a list long enough to be batched), lone surrogates, nesting
    deeper than orjson's 254 levels. The text is
    json.dumps(indent=2)'s either way."""
    import collections
    import enum

    from katactl.output import _orjson_chunks, json_chunks

    class Color(enum.Enum):
        RED = "red"

    class Text(str):
        pass

    def nest(v, depth):
        for _ in range(depth):
            v = [v]
        return v

    def record(i, **kw):
        return {"id": f"{i:064x}", "vcpus": 1.5, "pod": {"name": f"p{i}", "uid": None},
                "dropIns": [f"/etc/{i}.toml"], "sockets": {"shim": "/run/s", "api": None}, **kw}

    plain = [{}, [], {"a": []}, [[], {}], (1, 2), "s", 0.0, -0.0, 1e-4, 1e16, 1.7976931348623157e308,
             float("nan"), float("inf"), float("-inf"), [record(1), record(2, vcpus=float("nan"))],
             2 ** 64 - 1, -2 ** 63, {"s": "é\u2028\n\t\"\\ \x00\x1b\x7f ☃ 𝄞"}, [record(i) for i in range(50)],
             [record(1), {"other": "shape"}, record(2, extra=[1, 2.5])], nest({"x": 1.25}, 200),
             # a result: its long list goes to orjson in batches, indented as json indents it
             {"apiVersion": "v1", "kind": "SandboxList", "items": [record(i) for i in range(1100)],
              "empty": [], "none": {}, "meta": {"n": [1, {"a": []}]}, "few": [record(1)], "last": "x"},
             {"items": [record(i) for i in range(1024)]}, {"items": [[i, [i]] for i in range(513)]}]
    other = [1e-5, -2.5e-7, 5e-324, 2 ** 64, -2 ** 63 - 1,
             {1: "int key"}, "\ud800", Color.RED, Text("x"), collections.OrderedDict(a=1), {"d": {"x"}},
             [record(i) for i in range(50)] + [record(50, vcpus=1e-5)],
             [record(1, pod={"name": Color.RED})], nest({"x": 1}, 300), nest(1e-6, 3),
             # a result's long list (written in batches) beside a non-str key: 1 is "1" there
             {1: list(range(200)), "a": 1}, {"a": list(range(200)), None: 1, 2.5: True, False: 0},
             {Text("items"): [record(i) for i in range(129)]}]
    for case in plain + other:
        assert "".join(json_chunks(case)) == _dumps(case)
    assert [_orjson_chunks(c) is not None for c in plain] == [True] * len(plain)
    assert [_orjson_chunks(c) is not None for c in other] == [False] * len(other)
    cycle: dict = {}
    cycle["self"] = cycle
    with pytest.raises(ValueError):
        json_chunks(cycle)


def _strict_json(text: str):
    """json.loads refusing NaN, Infinity and -Infinity, as RFC 8259, Go's encoding/json,
    JSON.parse and serde_json do."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("path", ["orjson", "json"])
@pytest.mark.parametrize("fmt", ["json", "jsonl", "yaml"])
def test_nan_and_infinity_are_null_in_every_data_format(fmt, path):
    """A shim summary without observations has quantiles NaN: -o json printed a bare NaN,
    which no strict JSON parser takes. Both of -o json's encoders (orjson for plain data,
    json's for the rest: here a set), the long list's batches, -o jsonl's events and
    result, and -o yaml (from the same JSON) write null."""
    nan, inf = float("nan"), float("inf")
    items = [{"name": f"s{i}", "value": [nan, inf, -inf, 1.5][i % 4]} for i in range(300)]
    if path == "json":
        items[0]["tags"] = {"x"}
    out = io.StringIO()
    o = Output(fmt, stdout=out, stderr=io.StringIO(), color=False)
    o.event("Progress", value=nan, nested={"v": [-inf]})
    o.render(Result(kind="MetricSampleList", items=items, item={"sum": inf}))
    text = out.getvalue()
    if fmt == "yaml":
        assert ".nan" not in text and ".inf" not in text
        docs = [yaml.safe_load(text)]
    elif fmt == "jsonl":
        docs = [_strict_json(line) for line in text.splitlines()]
        assert docs[0]["value"] is None and docs[0]["nested"] == {"v": [None]}
        docs = docs[1:]
    else:
        docs = [_strict_json(text)]
    (d,) = docs
    assert [i["value"] for i in d["items"][:4]] == [None, None, None, 1.5] and d["sum"] is None
    assert sum(i["value"] is None for i in d["items"]) == 225


# -- DEL, C1 controls, bidi overrides, line separators (review 5, finding 8) ----------------
#: DEL, C1 (U+009B is a one-byte CSI to many terminals, U+0085 a line end to some), the Trojan
#: Source bidi controls (CVE-2021-42574: U+202A-202E, U+2066-2069, LRM/RLM/ALM), line and
#: paragraph separators, and the invisible zero-width ones
UNSAFE = "\x7f\x80\x85\x9b\x9f\u061c\u200b\u200c\u200d\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e" \
         "\u2060\u2066\u2067\u2068\u2069\ufeff"
SPOOF = "batch-\u202eexe.gnp\u202c-\u200bclh\u2028x\x9b2J\x7fy\x85z é ☃"


def _raw_unsafe(text: str) -> set[str]:
    return set(text) & set(UNSAFE)


@pytest.mark.parametrize("fmt", ["plain", "wide", "markdown", "name", "table"])
def test_bidi_and_separators_are_escaped_in_human_output(fmt):
    """A pod name with U+202E displayed as batch-png.exe (reversed), U+2028 split the row:
    every human format shows them as escapes, as it shows C0 controls."""
    items = [{"name": SPOOF, "pod": {"name": "p", "namespace": "n"}, "mem": 1, "note": SPOOF}]
    text, _ = render(fmt, Result(kind="SandboxList", items=items, columns=COLS), tty=(fmt == "table"))
    assert not _raw_unsafe(text), [hex(ord(c)) for c in _raw_unsafe(text)]
    shown = text.replace("\\\\", "\\") if fmt == "markdown" else text  # markdown_cell doubles each backslash
    if fmt != "table":  # Rich may fold a long cell
        assert "\\u202eexe.gnp\\u202c" in shown and "\\u2028" in shown and "\\x9b2J\\x7fy\\x85z é ☃" in shown
    text, _ = render(fmt, Result(kind="Sandbox", item={SPOOF: SPOOF}), tty=(fmt == "table"))
    assert not _raw_unsafe(text)


def test_printable_escapes_every_unsafe_code_point():
    from katactl.output import printable

    assert printable(UNSAFE) == "".join(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                                        for c in UNSAFE)
    assert printable("é ☃ 𝄞 \u00a0") == "é ☃ 𝄞 \u00a0"  # other text is left alone


@pytest.mark.parametrize("path", ["orjson", "json"])
@pytest.mark.parametrize("fmt", ["json", "jsonl", "yaml"])
def test_unsafe_code_points_are_escapes_in_every_data_format(fmt, path):
    """-o json/jsonl wrote DEL, C1 controls (U+009B, a CSI) and bidi overrides raw (ensure_ascii=
    False escapes only U+0000-001F; orjson has no option): they are \\uXXXX escapes now, the
    same JSON value. Both encoders (orjson for plain data, json's for the rest: here a set),
    the batched long list, keys, events; -o yaml writes such a scalar double-quoted with escapes."""
    items = [{"name": f"s{i}", "pod": SPOOF if i % 50 == 0 else "p", SPOOF: i} for i in range(300)]
    if path == "json":
        items[1]["tags"] = {"x"}
    out = io.StringIO()
    o = Output(fmt, stdout=out, stderr=io.StringIO(), color=False)
    o.event("Progress", pod=SPOOF)
    o.render(Result(kind="SandboxList", items=items, item={"note": UNSAFE, "other": "é ☃"}))
    text = out.getvalue()
    assert not _raw_unsafe(text), [hex(ord(c)) for c in _raw_unsafe(text)]
    assert "é ☃" in text  # other non-ASCII text stays as it is (not \u00e9)
    docs = [yaml.safe_load(text)] if fmt == "yaml" else [json.loads(line) for line in text.splitlines()] \
        if fmt == "jsonl" else [json.loads(text)]
    d = docs[-1]
    assert d["note"] == UNSAFE and d["items"][0]["pod"] == SPOOF and d["items"][3][SPOOF] == 3
    if fmt == "json":
        from katactl.output import json_chunks

        plain = [json.dumps(v, indent=2, ensure_ascii=False) for v in ({"k": SPOOF}, [UNSAFE, 1])]
        assert ["".join(json_chunks(v)) for v in ({"k": SPOOF}, [UNSAFE, 1])] == list(map(_escape_unsafe, plain))


def _escape_unsafe(text: str) -> str:
    for c in UNSAFE:
        text = text.replace(c, f"\\u{ord(c):04x}")
    return text


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_del_in_ascii_only_output_is_an_escape(fmt):
    """DEL is ASCII: an all-ASCII text is not thereby safe (both encoders, long list too)."""
    for item in ({"pod": "x\x7fy"}, {"set": {"a"}, "pod": "x\x7fy"},
                 {"items": [{"pod": f"p{i}\x7f"} for i in range(300)]}):
        out = io.StringIO()
        Output(fmt, stdout=out, stderr=io.StringIO()).render(Result(kind="X", item=item))
        assert "\x7f" not in out.getvalue() and "\\u007f" in out.getvalue()
        assert json.loads(out.getvalue())["kind"] == "X"


def test_a_mutations_human_view_says_whether_it_changed_anything(cli, tmp_path):
    """Every mutating command's one-object result reads `changed` (and `dryRun` when it was
    one) on a terminal too, as in JSON: here `lab down` of a lab that is not there."""
    r = cli(["lab", "down", "--root", str(tmp_path / "nolab")])
    assert r.exit_code == 0, r.stderr
    assert "changed: false" in r.stdout.splitlines()
    r = cli(["lab", "down", "--root", str(tmp_path / "nolab"), "-o", "json"])
    assert r.json()["changed"] is False


def test_no_color_reaches_the_progress_bar(monkeypatch):
    """--no-color (Output(color=False)) left the Rich progress bar on a TTY stderr in colour:
    only NO_COLOR, which Rich reads itself, turned it off (review 7, finding 6)."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")

    def screen(color):
        master, slave = pty.openpty()
        with os.fdopen(slave, "w") as err:
            out = Output("table", color=color, stderr=err, stdout=io.StringIO())
            with out.progress("collect", total=4) as bar:
                for i in range(5):
                    bar.update(completed=i)
            err.flush()
        data = b""
        while chunk := _read_ready(master):
            data += chunk
        os.close(master)
        return data

    colour = re.compile(rb"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7])[;m]")
    assert colour.search(screen(None)), "the bar is coloured on a terminal by default"
    assert not colour.search(screen(False))


def _read_ready(fd: int) -> bytes:
    import select

    if not select.select([fd], [], [], 0)[0]:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
