"""katactl metrics --all / -o prom (issue 15): every sandbox's shim metrics in one exposition,
relabelled as kata-monitor does (src/runtime/pkg/kata-monitor/metrics.go,
parsePrometheusMetrics: sandbox_id, cri_uid, cri_name, cri_namespace appended to every
sample; go_*/process_* renamed kata_shim_go_*/kata_shim_process_*), checked by promtool and
prometheus_client's parser."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from katactl import metrics as m
from katactl.errors import ProtocolError
from katactl.lab.shimserver import ShimState
from tests._katanode import node

GO_FAMILIES = """# HELP go_katactl_test_goroutines Number of goroutines that currently exist.
# TYPE go_katactl_test_goroutines gauge
go_katactl_test_goroutines 42
# HELP process_katactl_test_resident_bytes Resident memory size in bytes.
# TYPE process_katactl_test_resident_bytes gauge
process_katactl_test_resident_bytes 5.0331648e+07
# HELP kata_shim_katactl_test_histogram_milliseconds RPC latency distributions.
# TYPE kata_shim_katactl_test_histogram_milliseconds histogram
kata_shim_katactl_test_histogram_milliseconds_bucket{action="create",le="1"} 0
kata_shim_katactl_test_histogram_milliseconds_bucket{action="create",le="+Inf"} 3
kata_shim_katactl_test_histogram_milliseconds_sum{action="create"} 12.5
kata_shim_katactl_test_histogram_milliseconds_count{action="create"} 3
# HELP kata_agent_katactl_test_total A counter with a backslash \\\\ and a \\n newline in its help.
# TYPE kata_agent_katactl_test_total counter
kata_agent_katactl_test_total{path="a\\"b\\\\c\\nd"} 7
"""


def promtool():
    p = shutil.which("promtool")
    if not p:
        pytest.skip("promtool not installed")
    return p


@pytest.fixture
def tree():
    with node() as n:
        n.go("mon01", pod_name="web", pod_namespace="prod", pod_uid="uid-1")
        n.go("mon02", pod_name="batch", pod_namespace="jobs", pod_uid="uid-2")
        n.go("mon03", pod_name="bad", pod_namespace="jobs", pod_uid="uid-3")
        base = n.server("mon01").metrics_text
        n.server("mon01").metrics_text = lambda: base() + GO_FAMILIES
        n.server("mon03").metrics_text = lambda: "kata_shim_threads{oops 1\n"   # garbage
        yield n


def _check(text: str) -> None:
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool exits 1 for lint findings too (counter naming of upstream families): only
    # parse errors fail us
    assert "error while linting" not in r.stderr and "text format parsing error" not in (r.stdout + r.stderr), \
        r.stdout + r.stderr


def _parse_client(text: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))


def test_relabelled_exposition(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "--all", "-o", "prom"])
    assert r.exit_code == 4, r.stderr   # mon03 answered garbage: partial
    text = r.stdout
    assert "mon03" in r.stderr and r.stderr.startswith("warning:")
    _check(text)
    fams = {f.name: f for f in _parse_client(text)}
    # kata-monitor's labels, in its order, on every sample
    for f in fams.values():
        for s in f.samples:
            if f.name == "katactl_scrape_error":
                continue
            keys = list(s.labels)
            tail = [k for k in keys if k not in ("le", "quantile")][-4:]
            assert tail == list(m.MONITOR_LABELS), (s.name, keys)
    assert "kata_shim_go_katactl_test_goroutines" in fams and "kata_shim_process_katactl_test_resident_bytes" in fams
    assert "go_katactl_test_goroutines" not in text.replace("kata_shim_go_katactl_test_goroutines", "")
    g = fams["kata_shim_go_katactl_test_goroutines"].samples[0]
    assert g.labels == {"sandbox_id": "mon01", "cri_uid": "uid-1", "cri_name": "web", "cri_namespace": "prod"}
    # HELP/TYPE once per family, however many sandboxes
    assert text.count("# TYPE kata_shim_threads ") == 1
    assert {s.labels["sandbox_id"] for s in fams["kata_shim_threads"].samples} == {"mon01", "mon02"}
    # le stays last in a bucket, as Go's text encoder writes it
    assert ('kata_shim_katactl_test_histogram_milliseconds_bucket{action="create",sandbox_id="mon01",'
            'cri_uid="uid-1",cri_name="web",cri_namespace="prod",le="+Inf"} 3') in text
    # escapes survive
    (agent,) = fams["kata_agent_katactl_test"].samples
    assert agent.labels["path"] == 'a"b\\c\nd'
    errs = {s.labels["sandbox_id"]: s.value for s in fams["katactl_scrape_error"].samples}
    assert errs == {"mon01": 0, "mon02": 0, "mon03": 1}


def test_to_file_atomic(cli, tree, tmp_path):
    out = tmp_path / "kata.prom"
    out.write_text("old\n")
    r = cli(["--host-root", tree.root, "metrics", "--all", "--to", str(out), "--family", "kata_guest_"])
    assert r.exit_code == 4 and r.stdout == ""
    text = out.read_text()
    _check(text)
    assert "kata_shim_threads" not in text and "kata_guest_meminfo" in text
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["kata.prom"]   # no temp file left


def test_to_file_sweeps_the_stale_temp_files_of_killed_runs(cli, tmp_path):
    """A run killed with SIGKILL (the OOM killer, systemd's final kill) left its
    .katactl-XXXXXXXX.prom.tmp in the textfile directory forever (review 9 local #5): the next
    --to run removes those unchanged for 10 minutes, never a younger one (a run that may still
    write it), another name, a directory or a symlink."""
    out = tmp_path / "kata.prom"
    old = time.time() - 3600
    stale, young = tmp_path / ".katactl-zytkzsjd.prom.tmp", tmp_path / ".katactl-abcd1234.prom.tmp"
    kept = [young, tmp_path / ".katactl-zytkzsjd.prom.tmp.bak", tmp_path / "other-abcdefgh.prom.tmp",
            tmp_path / ".katactl-dir00000.prom.tmp", tmp_path / ".katactl-link0000.prom.tmp"]
    for p in (stale, young, *kept[1:3]):
        p.write_text("x 1\n")
    kept[3].mkdir()
    kept[4].symlink_to(kept[2])
    for p in (stale, *kept[1:]):
        os.utime(p, (old, old), follow_symlinks=False)
    with node() as n:
        n.go("ok01", pod_name="ok", pod_namespace="prod")
        r = cli(["--host-root", n.root, "metrics", "--all", "--to", str(out)])
    assert r.exit_code == 0, r.stderr
    assert not stale.exists() and all(os.path.lexists(p) for p in kept), sorted(os.listdir(tmp_path))
    assert "kata_" in out.read_text()


def test_to_file_when_every_shim_fails(cli, tmp_path):
    """No shim answered: exit 1 (nothing succeeded), and the file is still replaced, every
    sandbox's katactl_scrape_error 1: the collector must not keep serving the last figures
    as if current (docs/metrics-textfile.md)."""
    out = tmp_path / "kata.prom"
    out.write_text("kata_old_metric 1\n")
    with node() as n:
        for sid in ("aaa01", "bbb01"):
            n.go(sid, pod_name=sid, pod_namespace="ns")
            n.server(sid).metrics_text = lambda: "garbage{\n"
        r = cli(["--host-root", n.root, "metrics", "--all", "--to", str(out)])
    assert r.exit_code == 1, r.stderr
    text = out.read_text()
    _check(text)
    assert "kata_old_metric" not in text
    assert [line.split("{")[1].split(",")[0] for line in text.splitlines() if not line.startswith("#")] == \
        ['sandbox_id="aaa01"', 'sandbox_id="bbb01"']
    assert all(line.endswith("} 1") for line in text.splitlines() if not line.startswith("#"))


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_to_file_that_cannot_be_written_is_exit_1_naming_it(cli, fmt):
    """/proc takes no new file: an operation failure (exit 1) about FILE, not "not found" (exit 3)
    about katactl's temporary file."""
    with node() as n:
        n.go("ok01", pod_name="ok", pod_namespace="prod")
        r = cli(["--host-root", n.root, "-o", fmt, "metrics", "--all", "--to", "/proc/kata.prom"])
    assert r.exit_code == 1, r.stderr
    assert "/proc/kata.prom" in r.stderr and ".katactl-" not in r.stderr and "Traceback" not in r.stderr
    if fmt == "json":
        assert r.json()["code"] == "Failed", r.stdout
    else:
        assert len(r.stderr.strip().splitlines()) <= 2, r.stderr


def test_a_shim_that_does_not_answer(cli, tmp_path):
    with node() as n:
        n.go("ok01", pod_name="ok", pod_namespace="prod")
        p = n.go("hung01", serve=False, pod_name="hung", pod_namespace="prod")
        s = socket.socket(socket.AF_UNIX)
        s.bind(p.shim_socket)
        s.listen(5)     # accepts, never answers
        try:
            r = cli(["--host-root", n.root, "--request-timeout", "1s", "metrics", "--all", "-o", "prom"])
        finally:
            s.close()
    assert r.exit_code == 4, r.stderr
    assert 'katactl_scrape_error{sandbox_id="hung01",cri_uid=' in r.stdout
    assert 'kata_shim_threads{sandbox_id="ok01"' in r.stdout
    _check(r.stdout)


def test_json_and_table(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "--all", "-o", "json", "--family", "kata_guest_meminfo"])
    assert r.exit_code == 4
    d = r.json()
    assert d["kind"] == "MetricSampleList" and d["items"]
    assert {i["labels"]["sandbox_id"] for i in d["items"]} == {"mon01", "mon02"}
    assert [e["target"] for e in d["errors"]] == ["mon03"]
    r = cli(["--host-root", tree.root, "metrics", "--all", "--family", "kata_guest_meminfo"])
    assert r.stdout.splitlines()[0].split()[:3] == ["POD", "SANDBOX", "METRIC"]


def test_single_sandbox_prom(cli, tree):
    r = cli(["--host-root", tree.root, "metrics", "mon01", "-o", "prom"])
    assert r.exit_code == 0, r.stderr
    _check(r.stdout)
    assert 'sandbox_id="mon01",cri_uid="uid-1",cri_name="web",cri_namespace="prod"' in r.stdout


def test_empty_node(cli, tmp_path):
    r = cli(["--host-root", str(tmp_path), "metrics", "--all", "-o", "prom"])
    assert r.exit_code == 0 and r.stdout == ""


@pytest.mark.parametrize("args", [["--all", "x1"], [], ["--all", "--raw"], ["--all", "--to", ""],
                                  ["--all", "--to", "/nonexistent-dir/x.prom"], ["--all", "--to", "/tmp"],
                                  ["--all", "--family", "bad-prefix"]])
def test_bad_args(cli, tmp_path, args):
    r = cli(["--host-root", str(tmp_path), "metrics", *args])
    assert r.exit_code == 2, (args, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("text", ["foo{a=1} 2\n", "foo 1 2 3\n", "foo abc\n", "# TYPE foo nonsense\n",
                                  'foo{a="1",a="2"} 1\n', "1foo 2\n", "foo{a=\"x} 1\n",
                                  "# TYPE foo gauge\nfoo 1\n# TYPE foo counter\n"])
def test_garbage_is_a_protocol_error(text):
    with pytest.raises(ProtocolError):
        m.parse_families(text)


def test_shim_label_of_the_same_name_is_replaced_not_duplicated():
    fams = m.parse_families('kata_shim_agent_rpc_durations_histogram_milliseconds_count{action="x",'
                            'sandbox_id="abc"} 3\n')
    out = m.render_exposition([(m.sandbox_labels(_Sb()), m.relabel(fams, m.sandbox_labels(_Sb())))])
    assert out.count("sandbox_id=") == 2   # the sample and katactl_scrape_error
    _parse_client(out)


class _Sb:
    id = "abc"
    pod = {"name": "p", "namespace": "n", "uid": "u"}


def test_fleet_node_label(cli, sshd_lab):
    from katactl.lab import layout
    from katactl.lab.shimserver import ShimServer

    servers, ids = [], {}
    for n in ("node3", "node4"):
        root = str(sshd_lab.nodes[n].root)
        p = layout.write_go_sandbox(root, f"fleet-{n}", pod_name=f"pod-{n}", pod_namespace="prod")
        ids[n] = p.sandbox_id
        servers.append(ShimServer(p.shim_socket, state=ShimState(sandbox_id=p.sandbox_id)).start())
    try:
        r = cli(["--ssh-config", str(sshd_lab.config), "-N", "node3,node4", "metrics", "--all", "-o", "prom",
                 "--family", "kata_shim_threads"])
    finally:
        for s in servers:
            s.stop()
    assert r.exit_code in (0, 4), r.stderr
    _check(r.stdout)
    for n in ("node3", "node4"):
        assert f'cri_namespace="prod",node="{n}"}}' in r.stdout


def test_many_sandboxes_one_exposition(cli):
    with node() as n:
        for i in range(40):
            n.go(f"many{i:03d}", pod_name=f"p{i}", pod_namespace="bulk")
        r = cli(["--host-root", n.root, "metrics", "--all", "-o", "prom", "--family", "kata_shim_threads"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("katactl_scrape_error{") == 40
    assert r.stdout.count("kata_shim_threads{") == 40 and r.stdout.count("# TYPE kata_shim_threads") == 1
    _check(r.stdout)


def test_all_holds_each_shims_text_once_not_parsed(cli, tmp_path):
    """-o prom / --to renders each shim's families as its text is parsed and holds that, about
    the text's size, never every shim's samples parsed and relabelled (~30x each: review 8,
    finding 7, 1.7 GB for four 15 MiB bodies). Python's own allocations, traced: no clock."""
    import tracemalloc

    from katactl.lab.shimserver import Response

    body = "".join(f"# TYPE kata_guest_x{f} gauge\n"
                   + "".join(f'kata_guest_x{f}{{item="k{i:03d}",cpu="{f % 4}"}} {f * i}\n' for i in range(1000))
                   for f in range(40))
    out = tmp_path / "kata.prom"
    with node() as n:
        for sid in ("big01", "big02", "big03", "big04"):
            p = n.go(sid, serve=False)
            n.serve(p, "go", extra_routes={(None, "/metrics"): lambda s, r: Response(200, body)})
        cli(["--host-root", n.root, "metrics", "--all", "--to", str(out)])  # warm: imports, caches
        tracemalloc.start()
        try:
            r = cli(["--host-root", n.root, "metrics", "--all", "--to", str(out)])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert r.exit_code == 0, r.stderr
    assert out.read_text().count('sandbox_id="big0') == 4 * 40 * 1000 + 4
    assert peak < 10 * 4 * len(body), (peak, len(body))   # 5.6x here; 21.5x parsed (before)


_OWN_LABELS = ("# TYPE kata_own histogram\n"
               'kata_own_bucket{le="1",sandbox_id="theirs",node="n0",a="x"} 1\n'
               'kata_own_bucket{a="y",le="+Inf"} 2\nkata_own_sum 3 1700000000000\nkata_own_count 2\n'
               "# TYPE kata_q summary\n"
               'kata_q{quantile="0.9",cri_name="x"} 1\nkata_q_sum{cri_name="x"} 2\nkata_q_count 1 -5\n'
               "# HELP kata_empty nothing yet\n# TYPE kata_empty counter\n"
               "kata_untyped 7\n"
               "# TYPE kata_clash counter\nkata_clash_total 1\n")
_OTHER_TYPE = "# TYPE kata_clash gauge\nkata_clash 2\n# TYPE go_own gauge\ngo_own{sandbox_id=\"s\"} 1\n"


class _Sb2:
    def __init__(self, sid, pod):
        self.id, self.pod = sid, pod


@pytest.mark.parametrize("timestamps", [True, False])
@pytest.mark.parametrize("fleet", [False, True])
def test_rendered_as_each_shim_answers_is_byte_identical(timestamps, fleet):
    """parse_rendered + iter_exposition (what --all -o prom does now) writes what relabel +
    render_exposition (one SANDBOX, and --all before) write, byte for byte; a shim holding
    the label placeholder stays parsed beside the rendered ones."""
    from katactl.lab.shimserver import ShimServer
    from tests.test_metrics_prom_corpus import GOOD

    texts = [ShimServer("/nonexistent", flavour="go").metrics_text() + GO_FAMILIES,
             ShimServer("/nonexistent", flavour="rs").metrics_text(), GOOD, _OWN_LABELS, _OTHER_TYPE, "",
             'kata_nul{v="a\x00b"} 1\n']
    sbs = [_Sb2(f"sb{i}", {"uid": f"u{i}", "name": f'p"{i}', "namespace": "ns\\x"}) for i in range(len(texts))]
    names = [*m.MONITOR_LABELS, *(["node"] if fleet else [])]
    old, new = [], []
    for i, (sb, text) in enumerate(zip(sbs, texts, strict=True)):
        labels = m.sandbox_labels(sb, f"node-{i % 2}" if fleet else None)
        old.append((labels, m.relabel(m.parse_families(text), labels)))
        got = (m.parse_rendered(text, names, timestamps=timestamps) if m._EXTRA not in text
               else m.relabel(m.parse_families(text), labels))
        new.append((labels, got))
    assert isinstance(new[0][1][0], m.RenderedFamily) and isinstance(new[-1][1][0], m.Family)
    errors = [("node-9", ProtocolError("x"))]
    want = m.render_exposition(old, errors, timestamps=timestamps)
    assert "".join(m.iter_exposition(new, errors, timestamps=timestamps)) == want
    assert m.type_conflicts(new) == m.type_conflicts(old) != []
    assert "kata_own_sum" in want and ("1700000000000" in want) == timestamps


def _special_file(p, kind: str) -> None:
    """A filesystem object at ``p`` that is not a regular file (review 11 #1: --to renamed its
    temp file over /dev/null, and over a symlink)."""
    import stat

    if kind == "character device":   # a private /dev/null: never the node's own
        try:
            os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("mknod needs CAP_MKNOD")
    elif kind == "FIFO":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()   # the socket file stays


@pytest.mark.parametrize("how", [["--all"], ["ok01"]])
@pytest.mark.parametrize("kind,link", [("character device", False), ("FIFO", False), ("socket", False),
                                       ("FIFO", True), ("character device", True)])
def test_to_what_is_not_a_regular_file_is_refused_and_left_alone(cli, tmp_path, how, kind, link):
    """--to FILE replaces FILE: a device, FIFO or socket (or a symlink to one) would be destroyed
    (exit 0, /dev/null a regular file): usage error 2 naming what it is, the object untouched, no
    temp file, and nothing scraped."""
    target = tmp_path / "special"
    _special_file(target, kind)
    out = tmp_path / "kata.prom"
    if link:
        out.symlink_to("special")
    else:
        out = target
    before, special = os.lstat(out), os.lstat(target)
    with node() as n:
        n.go("ok01", pod_name="ok", pod_namespace="prod")
        r = cli(["--host-root", n.root, "metrics", *how, "--to", str(out)])
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and f"is a {kind}" in r.stderr and str(out) in r.stderr, r.stderr
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert os.lstat(target).st_mode == special.st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"special", out.name})


def test_to_a_link_to_stdout_is_refused(tmp_path):
    """What /dev/stdout is (a link to /proc/self/fd/1), here a pipe: refused, the link kept
    (a subprocess: in-process, fd 1 is pytest's capture file)."""
    from tests.conftest import run_katactl_subprocess

    out = tmp_path / "stdout"
    out.symlink_to("/proc/self/fd/1")
    with node() as n:
        n.go("ok01", pod_name="ok", pod_namespace="prod")
        r = run_katactl_subprocess(["--host-root", n.root, "metrics", "--all", "--to", str(out)])
    assert r.exit_code == 2 and "is a FIFO" in r.stderr and r.stdout == "", r.stderr
    assert out.is_symlink() and os.readlink(out) == "/proc/self/fd/1"


@pytest.mark.parametrize("dangling", [False, True])
def test_to_a_symlink_writes_its_target_and_keeps_the_link(cli, tmp_path, dangling):
    """A textfile path that is a symlink (config management's): the exposition replaces the
    link's target, atomically in the target's directory; the link stays a link (it became a
    regular file, and the target silently stopped updating). A dangling link's target is made."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "textfile").mkdir()
    target = real / "m.prom"
    if not dangling:
        target.write_text("kata_old_metric 1\n")
    lnk = tmp_path / "textfile" / "lnk.prom"
    lnk.symlink_to("../real/m.prom")
    with node() as n:
        n.go("ok01", pod_name="ok", pod_namespace="prod")
        r = cli(["--host-root", n.root, "metrics", "--all", "--to", str(lnk)])
    assert r.exit_code == 0, r.stderr
    assert lnk.is_symlink() and os.readlink(lnk) == "../real/m.prom"
    text = target.read_text()
    assert "kata_old_metric" not in text and 'kata_shim_threads{sandbox_id="ok01"' in text
    _check(text)
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in real.iterdir()) == ["m.prom"] and [p.name for p in lnk.parent.iterdir()] == ["lnk.prom"]


def _resetting_shim(path: str) -> socket.socket:
    """A shim socket that accepts each connection and resets it (SO_LINGER 0): the client's
    read fails with ECONNRESET, "connection lost" (exit 7). Closing the socket ends the thread."""
    import struct
    import threading

    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(5)

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return s


@pytest.mark.parametrize("out", ["json", "prom", "table", "to"])
@pytest.mark.parametrize("shims,code", [(("hung", "hung"), 6), (("reset", "reset"), 7), (("hung", "reset"), 1)])
def test_every_shim_failing_alike_exits_with_their_code(cli, tmp_path, out, shims, code):
    """No shim answered: the exit code is their common one (6 every shim timed out, 7 every
    connection was lost; 1 when they differ), as top's and errors.outcome_exit_code's contract
    says (review 11 #5: always 1, while -o json's own errors[] said 6)."""
    socks = []
    with node() as n:
        for i, how in enumerate(shims):
            p = n.go(f"{how}{i:02d}", serve=False, pod_name=f"p{i}", pod_namespace="prod")
            if how == "reset":
                socks.append(_resetting_shim(p.shim_socket))
                continue
            s = socket.socket(socket.AF_UNIX)
            s.bind(p.shim_socket)
            s.listen(5)   # accepts, never answers
            socks.append(s)
        args = ["--to", str(tmp_path / "kata.prom")] if out == "to" else ["-o", out]
        try:
            r = cli(["--host-root", n.root, "--request-timeout", "0.3s", "metrics", "--all", *args])
        finally:
            for s in socks:
                s.close()
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    if out == "json":
        assert sorted(e["error"]["exitCode"] for e in r.json()["errors"]) == sorted({"hung": 6, "reset": 7}[h]
                                                                                    for h in shims)
    if out == "to":
        assert (tmp_path / "kata.prom").read_text().count("} 1\n") == 2   # each shim's scrape error


@pytest.mark.parametrize("what", ["loop", "slash"])
def test_to_a_symlink_loop_or_a_directory_path_is_a_usage_error(cli, tmp_path, what):
    """A symlink loop (the rename made it a file) and FILE/ (written as FILE): exit 2, one line."""
    if what == "loop":
        (tmp_path / "loop.prom").symlink_to("loop.prom")
        to = str(tmp_path / "loop.prom")
    else:
        to = str(tmp_path / "kata.prom") + "/"
    r = cli(["--host-root", str(tmp_path), "metrics", "--all", "--to", to])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (r.exit_code, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["loop.prom"] if what == "loop" else [])
    if what == "loop":
        assert os.readlink(tmp_path / "loop.prom") == "loop.prom"
