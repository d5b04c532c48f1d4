"""katactl metrics and the metrics library (issue 3)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from katactl import metrics
from katactl.errors import ProtocolError
from katactl.lab.shimserver import ShimServer, ShimState
from tests._katanode import node


@pytest.fixture(scope="module")
def tree():
    with node() as n:
        n.go("go1111", pod_name="web", pod_namespace="prod")
        n.rs("rs2222", pod_name="batch-0", pod_namespace="batch")
        yield n


def test_parsed_json(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "go1111", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "MetricSampleList" and d["sandbox"] == "go1111"
    names = {s["family"] for s in d["items"]}
    for fam in ("kata_shim_proc_status", "kata_hypervisor_proc_stat", "kata_agent_total_rss",
                "kata_guest_meminfo", "kata_guest_vm_stat", "go_goroutines", "process_resident_memory_bytes",
                "kata_shim_rpc_durations_histogram_milliseconds"):
        assert fam in names, fam
    mem = {s["labels"]["item"]: s["value"] for s in d["items"] if s["family"] == "kata_guest_meminfo"}
    assert mem["mem_total"] == float(2048 << 20)


def test_rs_has_no_go_families(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "batch/batch-0", "-o", "json"])
    assert r.exit_code == 0
    assert not any(s["family"].startswith("go_") for s in r.json()["items"])


def test_family_filter_and_raw(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "go1111", "--family", "kata_guest_meminfo",
             "--family", "go_goroutines", "-o", "json"])
    assert {s["family"] for s in r.json()["items"]} == {"kata_guest_meminfo", "go_goroutines"}
    r = cli(["--host-root", tree.root, "metrics", "go1111", "--raw", "--family", "kata_guest_vm_stat"])
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# HELP kata_guest_vm_stat")
    assert 'kata_guest_vm_stat{item="balloon_inflate"} 0' in lines
    assert all("kata_guest_vm_stat" in ln for ln in lines)
    r = cli(["--host-root", tree.root, "metrics", "go1111", "--raw"])
    assert r.stdout.startswith("# HELP go_goroutines ")  # raw: as the shim sent it
    assert "# TYPE go_gc_duration_seconds summary" in r.stdout


def test_table(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "go1111", "--family", "kata_guest_meminfo"])
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].split() == ["METRIC", "LABELS", "VALUE"]
    assert "item=mem_total" in r.stdout and str(2048 << 20) in r.stdout


def test_unknown_family_warns(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "go1111", "--family", "kata_nothing", "-o", "json"])
    assert r.exit_code == 0 and r.json()["items"] == [] and "no metric family" in r.stderr


@pytest.mark.parametrize("bad", ["", "kata guest", "1abc", "kata-guest", "x{y}", "a\nb"])
def test_bad_family_prefix(cli, tree, bad):
    r = cli(["--host-root", tree.root, "metrics", "go1111", "--family", bad])
    assert r.exit_code == 2, r.stderr
    assert "Traceback" not in r.stderr


def test_stale_sandbox_refused(cli):
    with node() as n:
        n.go("gone01", serve=False, pid=2 ** 22 + 9)
        r = cli(["--host-root", n.root, "metrics", "gone01"])
        assert r.exit_code == 7 and "stale" in r.stderr


@pytest.mark.parametrize("text", ["kata_x{item=\"a\" 1\n", "# TYPE kata_x gauge\nkata_x abc\n"])
def test_malformed_metrics_text(text):
    with pytest.raises(ProtocolError):
        metrics.parse(text)


def test_malformed_metrics_from_shim(cli):
    from katactl.lab.shimserver import Response

    with node() as n:
        p = n.go("badm01", serve=False)
        n.serve(p, "go", extra_routes={(None, "/metrics"): lambda s, r: Response(200, "kata_x{ 1\n")})
        r = cli(["--host-root", n.root, "metrics", "badm01"])
        assert r.exit_code == 1 and "Prometheus" in r.stderr



def test_all_waits_the_request_timeout_given(cli, monkeypatch):
    """--all bounds each scrape by its default (10 s) unless --request-timeout is given (flag, env,
    config): then that wins, as for one SANDBOX. The default is lowered to 0.5 s here so that a
    shim answering after 1 s is past it without the test waiting 10 s."""
    import time

    from katactl.commands import metrics as metrics_cmd
    from katactl.lab.shimserver import Response

    monkeypatch.setattr(metrics_cmd, "ALL_SCRAPE_TIMEOUT", 0.5)

    def late(s, r):
        time.sleep(1.0)  # past the (lowered) default bound: the answer's delay, nothing is timed
        return Response(200, 'kata_guest_x{item="a"} 1\n')

    with node() as n:
        p = n.go("slow01", serve=False)
        n.serve(p, "go", extra_routes={(None, "/metrics"): late})
        r = cli(["--host-root", n.root, "metrics", "--all", "-o", "prom"])
        assert r.exit_code == 6 and "no answer within 0.5s" in r.stderr, r.stderr  # the default bounds it
        r = cli(["--request-timeout", "60s", "--host-root", n.root, "metrics", "--all", "-o", "prom"])
        assert r.exit_code == 0, r.stderr
        assert [ln for ln in r.stdout.splitlines() if ln.startswith("kata_guest_x{") and 'sandbox_id="slow01"' in ln]


def test_filter_text_keeps_histogram_series():
    text = ShimServer("/nonexistent", state=ShimState()).metrics_text()
    out = metrics.filter_text(text, ["kata_shim_rpc"])
    assert "kata_shim_rpc_durations_histogram_milliseconds_bucket" in out
    assert "_sum" in out and "_count" in out and "kata_shim_threads" not in out
    samples = metrics.parse(text, ["kata_shim_rpc"])
    assert {s["type"] for s in samples} == {"histogram"}


def test_help_does_not_load_heavy_modules():
    code = ("import sys, katactl.commands.metrics, katactl.commands.top, katactl.commands.sandbox, "
            "katactl.commands.shim, katactl.commands.pprof, katactl.sandbox, katactl.metrics;"
            "bad=[m for m in ('httpx','h11','prometheus_client','rich','yaml') if m in sys.modules];"
            "print(','.join(bad))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout + p.stderr


def test_nan_and_inf_samples_are_null_in_json(cli):
    """A Go shim's summary without observations has quantiles NaN (client_golang writes
    'NaN'): -o json printed "value": NaN, which no strict JSON parser takes (docs/output.md:
    null). -o prom keeps the shim's text."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    with node() as n:
        n.go("nan01", pod_name="web", pod_namespace="prod")
        base = n.server("nan01").metrics_text
        n.server("nan01").metrics_text = lambda: base() + (
            "# HELP kata_x_seconds x\n# TYPE kata_x_seconds summary\n"
            'kata_x_seconds{quantile="0.5"} NaN\nkata_x_seconds_sum 0\nkata_x_seconds_count 0\n'
            "# TYPE kata_x_max gauge\nkata_x_max +Inf\n")
        for args in (["nan01"], ["--all"]):
            for fmt in ("json", "jsonl", "yaml"):
                r = cli(["--host-root", n.root, "metrics", *args, "--family", "kata_x", "-o", fmt])
                assert r.exit_code == 0, r.stderr
                assert "NaN" not in r.stdout and "Infinity" not in r.stdout and ".nan" not in r.stdout
                if fmt != "yaml":
                    d = json.loads(r.stdout.splitlines()[-1] if fmt == "jsonl" else r.stdout, parse_constant=refuse)
                    values = {s["name"]: s["value"] for s in d["items"]}
                    assert values == {"kata_x_seconds": None, "kata_x_seconds_sum": 0, "kata_x_seconds_count": 0,
                                      "kata_x_max": None}, (args, fmt)
        r = cli(["--host-root", n.root, "metrics", "nan01", "--family", "kata_x", "-o", "prom"])
        assert "} NaN\n" in r.stdout and "} +Inf\n" in r.stdout


def test_the_parsers_lazy_regexes_are_safe_to_build_from_many_threads():
    """metrics --all and top parse 32 shims' answers at once: a thread that found the first
    regex built while the others were still being compiled failed that shim's scrape with an
    AssertionError (seen as a flaky benchmark). Fresh state, regex cache purged, threads
    switching often: no round may fail."""
    import re
    import sys
    import threading

    from katactl import metrics as m

    text = '# TYPE a gauge\na{x="1"} 1\n# HELP b h\\\\n\n# TYPE b counter\nb_total 2\n'
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(30):
            re.purge()
            m._SAMPLE_RE = m._LABEL_RE = m._FULLNAME_RE = m._BAD_ESCAPE_RE = m._LOOSE_RE = None
            start, errors = threading.Barrier(16), []

            def parse(start=start, errors=errors):
                start.wait()
                try:
                    m.parse_families(text)
                except AssertionError as e:
                    errors.append(e)

            threads = [threading.Thread(target=parse) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
    finally:
        sys.setswitchinterval(old)


def _raw_names(r, mode: str) -> list[str]:
    """The sample names of an answer, as shown."""
    if mode == "json":
        return [s["name"] for s in r.json()["items"]]
    return [ln.split("{")[0].split()[0] for ln in r.stdout.splitlines() if ln and not ln.startswith("#")]


def _names(r, mode: str) -> set[str]:
    """The sample names of an answer, kata-monitor's renaming undone (kata_shim_go_x: go_x)."""
    out = set()
    for n in _raw_names(r, mode):
        if n.startswith("katactl_"):
            continue
        out.add(n[len("kata_shim_"):] if n.startswith(("kata_shim_go_", "kata_shim_process_")) else n)
    return out


_MODES = [(["go1111", "-o", "json"], "json"), (["go1111", "--raw"], "text"), (["go1111", "-o", "prom"], "text"),
          (["go1111", "--to", "{to}"], "file"), (["--all", "-o", "json"], "json"), (["--all", "-o", "prom"], "text"),
          (["--all", "--to", "{to}"], "file")]


_SHIM_NAME_MODES = _MODES[:2]  # metrics SANDBOX -o json and --raw show the shim's own names


@pytest.mark.parametrize("prefix,args,mode", [(p, a, m) for p in ("go_", "kata_shim_go_") for a, m in _MODES
                                               if p == "go_" or (a, m) not in _SHIM_NAME_MODES])
def test_a_family_prefix_selects_the_same_families_in_every_mode(cli, tree, tmp_path, args, mode, prefix):
    """--family matches the shim's own name (go_goroutines) in every mode, and kata-monitor's
    (kata_shim_go_goroutines) where those are shown: go_ selected 7 samples with -o json and
    nothing (exit 0, no warning) with -o prom, --to and --all (review 11 #6)."""
    want = {n for n in _names(cli(["--host-root", tree.root, "metrics", "go1111", "-o", "json"]), "json")
            if n.startswith("go_")}
    assert want
    to = tmp_path / "kata.prom"
    r = cli(["--host-root", tree.root, "metrics", *[a.format(to=to) for a in args], "--family", prefix])
    assert r.exit_code == 0, r.stderr
    if mode == "file":
        r.stdout, mode = to.read_text(), "text"
    assert _names(r, mode) == want and "no metric family" not in r.stderr


@pytest.mark.parametrize("args,mode", _SHIM_NAME_MODES)
def test_kata_prefix_keeps_only_kata_families_where_the_shims_names_are_shown(cli, tree, args, mode):
    """Where the shim's own names are shown, a prefix is matched against them only: kata_ kept
    go_* and process_* too, by their kata-monitor names kata_shim_go_* (review 12); and
    kata_shim_go_, a name not shown here, matches nothing and says so."""
    r = cli(["--host-root", tree.root, "metrics", *args, "--family", "kata_"])
    names = _raw_names(r, mode)
    assert r.exit_code == 0 and names and all(n.startswith("kata_") for n in names), names
    r = cli(["--host-root", tree.root, "metrics", *args, "--family", "kata_shim_go_"])
    assert r.exit_code == 0 and "warning: no metric family starts with kata_shim_go_" in r.stderr, r.stderr


@pytest.mark.parametrize("args,mode", [*_MODES, (["--all"], "table")])
def test_a_family_prefix_matching_nothing_warns_in_every_mode(cli, tree, tmp_path, args, mode):
    to = tmp_path / "kata.prom"
    r = cli(["--host-root", tree.root, "metrics", *[a.format(to=to) for a in args], "--family", "kata_nothing",
             "--family", "go_nothing"])
    assert r.exit_code == 0, r.stderr
    assert "warning: no metric family starts with kata_nothing, go_nothing" in r.stderr, r.stderr
