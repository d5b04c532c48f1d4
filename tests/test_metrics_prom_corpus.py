"""metrics --all -o prom over shim garbage that Go's text parser refuses (the grammar of
prometheus/common expfmt/text_parse.go, which kata-monitor, node_exporter's textfile
collector and promtool read with): each is that shim's scrape error, never an exposition
promtool cannot parse. Python's float() takes more than Go's strconv.ParseFloat ('1_000',
Unicode digits, '-nan', 1e400 as inf), and Go files X_count under summary X whatever
family X_count says it is."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from katactl import metrics as m
from katactl.errors import ProtocolError
from tests._katanode import node

#: (id, text the shim appends, promtool refuses the shim's text as it is). Not refused as it
#: is: Go's parser takes the order the shim wrote, katactl's exposition sorts families by name.
GARBAGE = [
    ("underscore", "# TYPE kata_evil gauge\nkata_evil 1_000\n", True),
    ("arabic-digit", "# TYPE kata_evil gauge\nkata_evil \u0661\n", True),
    ("fullwidth-digit", "# TYPE kata_evil gauge\nkata_evil \uff11\n", True),
    ("overflow", "# TYPE kata_evil gauge\nkata_evil 1e400\n", True),
    ("many-digits", "# TYPE kata_evil gauge\nkata_evil " + "9" * 400 + "\n", True),
    ("signed-nan", "# TYPE kata_evil gauge\nkata_evil -nan\n", True),
    ("infinit", "# TYPE kata_evil gauge\nkata_evil infinit\n", True),
    ("hex-float", "# TYPE kata_evil gauge\nkata_evil 0x1p3\n", True),
    ("timestamp-int64", "# TYPE kata_evil gauge\nkata_evil 1 9223372036854775808\n", True),
    ("timestamp-digits", "# TYPE kata_evil gauge\nkata_evil 1 " + "1" * 5000 + "\n", True),
    ("label-escape", '# TYPE kata_evil gauge\nkata_evil{a="x\\ty"} 1\n', True),
    ("label-__name__", '# TYPE kata_evil gauge\nkata_evil{__name__="x"} 1\n', True),
    ("help-trailing-backslash", "# HELP kata_evil bad \\\n# TYPE kata_evil gauge\nkata_evil 1\n", True),
    ("help-quote-escape", '# HELP kata_evil a \\"b\\"\n# TYPE kata_evil gauge\nkata_evil 1\n', True),
    ("quantile-not-float", '# TYPE kata_evs summary\nkata_evs{quantile="abc"} 1\n', True),
    ("le-not-float", '# TYPE kata_evh histogram\nkata_evh_bucket{le="1_0"} 1\n', True),
    ("summary-vs-count-family", "# TYPE kata_evs summary\nkata_evs_count 1\nkata_evs_sum 2\n"
                                "# TYPE kata_evs_count gauge\nkata_evs_count{a=\"b\"} 3\n", True),
    ("count-family-first", "# TYPE kata_evs_count gauge\nkata_evs_count{a=\"b\"} 3\n"
                           "# TYPE kata_evs summary\nkata_evs_count 1\nkata_evs_sum 2\n", False),
    ("histogram-vs-bucket-family", "# TYPE kata_evh histogram\nkata_evh_bucket{le=\"+Inf\"} 1\nkata_evh_count 1\n"
                                   "# TYPE kata_evh_bucket gauge\nkata_evh_bucket 3\n", True),
    ("counter-vs-total-family", "# TYPE kata_evc counter\nkata_evc_total 1\n# TYPE kata_evc_total gauge\n"
                                "kata_evc_total{a=\"b\"} 3\n", True),
    ("katactl-own-family", "# TYPE katactl_scrape_error gauge\nkatactl_scrape_error 0\n", False),
]

#: what Go's grammar takes and Python's may write differently: kept as the shim wrote them
GOOD = ("# TYPE kata_fine gauge\n"
        'kata_fine{v="a"} +Inf\nkata_fine{v="b"} -inf\nkata_fine{v="c"} Infinity\nkata_fine{v="d"} nan\n'
        'kata_fine{v="e"} .5\nkata_fine{v="f"} 5.\nkata_fine{v="g"} 1E5\nkata_fine{v="h"} +1\n'
        'kata_fine{v="i"} 1e-400\nkata_fine{v="j"} 1 +5\nkata_fine{v="k"} 1 -9223372036854775808\n'
        'kata_fine{v="l\\\\\\"\\n"} 0\n'
        '# HELP kata_fine_s a \\\\ and a \\n in help\n# TYPE kata_fine_s summary\n'
        'kata_fine_s{quantile="0.5"} NaN\nkata_fine_s_sum 0\nkata_fine_s_count 0\n')


def _promtool() -> str:
    p = shutil.which("promtool")
    if not p:
        pytest.skip("promtool not installed")
    return p


def _promtool_parses(text: str) -> bool:
    r = subprocess.run([_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    # promtool exits non-zero for lint findings too (upstream families' naming): only parse errors count
    return "error while linting" not in out and "text format parsing error" not in out


def _shims(tree, evil_text: str, good_text: str = "") -> None:
    tree.go("good01", pod_name="good", pod_namespace="a", pod_uid="u1")
    tree.go("evil01", pod_name="evil", pod_namespace="b", pod_uid="u2")
    for sid, extra in (("good01", good_text), ("evil01", evil_text)):
        base = tree.server(sid).metrics_text
        tree.server(sid).metrics_text = lambda base=base, extra=extra: base() + extra


@pytest.mark.parametrize("case,text,raw_refused", GARBAGE, ids=[c[0] for c in GARBAGE])
def test_garbage_is_that_shims_scrape_error(cli, case, text, raw_refused):
    if raw_refused:   # the corpus is garbage to Go's parser, not only to katactl
        assert not _promtool_parses(text), case
    with node() as tree:
        _shims(tree, text)
        r = cli(["--host-root", tree.root, "metrics", "--all", "-o", "prom"])
    assert r.exit_code == 4, (case, r.stderr)
    assert r.stderr.count("warning:") == 1 and "sandbox evil01" in r.stderr and "Traceback" not in r.stderr
    assert _promtool_parses(r.stdout), (case, r.stdout)
    assert 'katactl_scrape_error{sandbox_id="evil01",cri_uid="u2",cri_name="evil",cri_namespace="b"} 1' in r.stdout
    assert 'katactl_scrape_error{sandbox_id="good01",cri_uid="u1",cri_name="good",cri_namespace="a"} 0' in r.stdout
    assert 'kata_shim_threads{sandbox_id="good01"' in r.stdout and 'sandbox_id="evil01",cri_uid="u2",cri_name' \
        not in r.stdout.replace('katactl_scrape_error{sandbox_id="evil01",cri_uid="u2",cri_name', "")


@pytest.mark.parametrize("case,text,raw_refused", GARBAGE, ids=[c[0] for c in GARBAGE])
def test_garbage_is_a_protocol_error_alone(case, text, raw_refused):
    with pytest.raises(ProtocolError) as e:
        m.parse_families(text)
    assert "\n" not in e.value.message and len(e.value.message) < 400


def test_what_go_takes_is_kept_as_written(cli):
    with node() as tree:
        _shims(tree, "", GOOD)
        r = cli(["--host-root", tree.root, "metrics", "--all", "-o", "prom", "--family", "kata_fine"])
    assert r.exit_code == 0, r.stderr
    assert _promtool_parses(r.stdout), r.stdout
    for v in ("+Inf", "-inf", "Infinity", "nan", ".5", "5.", "1E5", "+1", "1e-400", "1 +5", "1 -9223372036854775808"):
        assert f"}} {v}\n" in r.stdout, v
    assert 'v="l\\\\\\"\\n"' in r.stdout


def test_a_clash_between_two_shims_refuses_the_later_one(cli):
    """Each shim alone is fine; merged, summary X and a family X_count would not parse."""
    with node() as tree:
        _shims(tree, "# TYPE kata_pair_count gauge\nkata_pair_count 3\n",
               "# TYPE kata_pair summary\nkata_pair_sum 1\nkata_pair_count 2\n")
        r = cli(["--host-root", tree.root, "metrics", "--all", "-o", "prom"])
        j = cli(["--host-root", tree.root, "metrics", "--all", "-o", "json", "--family", "kata_pair"])
    assert r.exit_code == 4, r.stderr
    assert "sandbox evil01" in r.stderr and "kata_pair_count" in r.stderr and "good01" in r.stderr
    assert _promtool_parses(r.stdout), r.stdout
    assert "# TYPE kata_pair summary" in r.stdout and "# TYPE kata_pair_count" not in r.stdout
    assert 'katactl_scrape_error{sandbox_id="evil01",cri_uid="u2",cri_name="evil",cri_namespace="b"} 1' in r.stdout
    assert j.exit_code == 4 and [e["target"] for e in j.json()["errors"]] == ["evil01"]


def _node_exporter_takes(text: str) -> bool:
    """node_exporter's textfile collector (collector/textfile.go processFile/hasTimestamps):
    a file whose text does not parse, or with any sample's client-side timestamp, is skipped whole."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        fams = list(text_string_to_metric_families(text))
    except ValueError:
        return False
    return not any(s.timestamp is not None for f in fams for s in f.samples)


def test_to_file_drops_timestamps_that_node_exporter_refuses(cli, tmp_path):
    """One shim timestamps a sample: the textfile must still be taken (every sandbox's metrics),
    with the sample, without its timestamp; -o prom keeps it as kata-monitor does."""
    out = tmp_path / "kata.prom"
    with node() as tree:
        _shims(tree, "# TYPE kata_custom_ts gauge\nkata_custom_ts 1 1700000000000\n")
        r = cli(["--host-root", tree.root, "metrics", "--all", "--to", str(out)])
        one = cli(["--host-root", tree.root, "metrics", "evil01", "--to", str(tmp_path / "one.prom")])
        p = cli(["--host-root", tree.root, "metrics", "--all", "-o", "prom"])
    assert r.exit_code == 0 and one.exit_code == 0 and p.exit_code == 0, (r.stderr, one.stderr, p.stderr)
    for f in (out, tmp_path / "one.prom"):
        text = f.read_text()
        assert 'kata_custom_ts{sandbox_id="evil01",cri_uid="u2",cri_name="evil",cri_namespace="b"} 1\n' in text
        assert _node_exporter_takes(text), text
    assert "} 1 1700000000000\n" in p.stdout and not _node_exporter_takes(p.stdout)


def test_a_family_two_shims_type_differently_loses_only_that_family_in_prom(cli):
    """A gauge here, a counter there (old and new shims side by side): one family has one TYPE,
    so the exposition drops the later shim's samples of that family only, with a warning, its
    katactl_family_conflict 1 and exit 4; its other families are still there. JSON items carry
    their own type: every sample, exit 0."""
    with node() as tree:
        _shims(tree, "# TYPE kata_custom_x counter\nkata_custom_x 2\n", "# TYPE kata_custom_x gauge\nkata_custom_x 1\n")
        r = cli(["--host-root", tree.root, "metrics", "--all", "-o", "prom"])
        j = cli(["--host-root", tree.root, "metrics", "--all", "-o", "json"])
    assert r.exit_code == 4, r.stderr
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "evil01" in warn[0] and "kata_custom_x" in warn[0] and "good01" in warn[0], r.stderr
    assert _promtool_parses(r.stdout), r.stdout
    assert "# TYPE kata_custom_x gauge" in r.stdout and 'kata_custom_x{sandbox_id="good01"' in r.stdout
    assert 'kata_custom_x{sandbox_id="evil01"' not in r.stdout
    evil = '{sandbox_id="evil01",cri_uid="u2",cri_name="evil",cri_namespace="b"'
    assert f"katactl_scrape_error{evil}}} 0" in r.stdout
    assert f'katactl_family_conflict{evil},family="kata_custom_x"}} 1' in r.stdout
    assert "katactl_family_conflict{sandbox_id=\"good01\"" not in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("kata_") and "sandbox_id=" in ln]
    per = {sid: sum(f'sandbox_id="{sid}"' in ln for ln in lines) for sid in ("good01", "evil01")}
    assert per["evil01"] == per["good01"] - 1 > 10, per
    assert j.exit_code == 0 and not j.stderr and not j.json().get("errors"), j.stderr
    got = {(i["labels"]["sandbox_id"], i["type"]) for i in j.json()["items"] if i["family"] == "kata_custom_x"}
    assert got == {("good01", "gauge"), ("evil01", "counter")}
