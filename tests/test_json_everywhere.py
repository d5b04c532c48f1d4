"""Every command's -o json parses, on success and on failure (Ansible reads stdout).

Success paths run against the shared lab (real QEMU guests); failure paths
against an empty node root, where each command must still print a JSON Error
object with the exit code it exits with.
"""
import json
import os

import pytest

OUTPUT_DOC = open(os.path.join(os.path.dirname(__file__), "..", "docs", "output.md")).read()

LAB_READS = [
    ["sandbox", "list"], ["sandbox", "inspect", "{pod}"], ["metrics", "{pod}"], ["top"],
    ["balloon", "get", "{pod}"], ["vmcore", "list"], ["inspect", "rdt"], ["upgrade", "status"],
    ["shim", "agent-url", "{pod}"], ["version"], ["config", "view"],
    ["balloon", "set", "{pod}", "--target", "300Mi", "--dry-run"],
]

# (args, exit code): 3 not found (e.g. a release that is not staged); 5 refused (gc will not
# guess on a node whose /proc it cannot read: tested in test_upgrade; on an empty node gc has
# nothing to remove)
EMPTY_NODE_FAILURES = [
    (["sandbox", "inspect", "nope"], 3), (["metrics", "nope"], 3), (["balloon", "get", "nope"], 3),
    (["balloon", "set", "nope", "--target", "1Gi"], 3), (["vmcore", "list"], 3), (["inspect", "bvt"], 3),
    (["inspect", "threads", "nope"], 3), (["shim", "agent-url", "nope"], 3),
    (["upgrade", "switch", "9.9.9"], 3), (["upgrade", "rollback"], 3), (["vmcore", "trigger", "nope"], 3),
    (["pprof", "nope", "heap", "-f", "/dev/null"], 3),
]


def _check_json(r):
    d = json.loads(r.stdout)
    assert d["apiVersion"] == "katactl/v1" and d["kind"]
    assert f"`{d['kind']}`" in OUTPUT_DOC, f"kind {d['kind']} is not documented in docs/output.md"
    if r.exit_code:
        assert d["kind"] == "Error" and d["exitCode"] == r.exit_code, d
    return d


@pytest.mark.parametrize("args", LAB_READS, ids=lambda a: " ".join(a))
def test_json_on_the_lab(lab, cli, args):
    pod = lab.pod("qemu-0")
    r = cli(["--host-root", lab.root, "-o", "json", *[a.format(pod=pod) for a in args]])
    assert r.exit_code == 0, r.stderr
    d = _check_json(r)
    if "--dry-run" in args:
        assert d["dryRun"] is True and "changed" in d


@pytest.mark.parametrize("args,code", EMPTY_NODE_FAILURES, ids=lambda a: " ".join(a) if isinstance(a, list) else str(a))
def test_json_error_object_on_an_empty_node(tmp_path, cli, args, code):
    r = cli(["--host-root", str(tmp_path), "-o", "json", *args])
    assert r.exit_code == code, (r.exit_code, r.stderr)
    _check_json(r)
    assert len([line for line in r.stderr.splitlines() if line.startswith("katactl: error:")]) == 1


def test_jsonl_every_stdout_line_is_one_json_object(lab, cli):
    """-o jsonl: progress events, then the result, one object per line (Cloud Hypervisor
    sandbox: its simulated guest moves the balloon gradually, so there are events)."""
    pod = lab.pod("clh-0")
    for move in (["--target", "768Mi"], ["--release"]):
        r = cli(["--host-root", lab.root, "-o", "jsonl", "balloon", "set", pod, *move, "--wait",
                 "--timeout", "60s"])
        assert r.exit_code == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert all(d["apiVersion"] == "katactl/v1" for d in lines)
        assert lines[-1]["kind"] == "BalloonChange" and "changed" in lines[-1]
        assert {d["kind"] for d in lines[:-1]} <= {"BalloonProgress"}


@pytest.mark.parametrize("args", LAB_READS, ids=lambda a: " ".join(a))
def test_markdown_on_the_lab(lab, cli, args):
    """-o markdown: a command that prints a table prints a GitHub pipe table with -o wide's
    columns (a row per -o wide row); one object is a fenced block (issue 20)."""
    import re

    argv = [a.format(pod=lab.pod("qemu-0")) for a in args]
    r = cli(["--host-root", lab.root, "-o", "markdown", *argv])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    wide = cli(["--host-root", lab.root, "-o", "wide", *argv])
    if not lines:  # nothing to list (no dumps, no RDT, no releases): as with -o wide
        assert wide.stdout == "" and r.stderr
        return
    if lines[0].startswith("```"):
        assert lines[-1] == lines[0][:len(lines[-1])] and len(lines) > 2
        return
    assert re.fullmatch(r"\|(-+\|)+", lines[1]), r.stdout
    assert all(ln.startswith("| ") and ln.endswith(" |") for ln in lines[:1] + lines[2:])
    if "top" in args:  # a live figure: the columns are the same, the rows differ in numbers
        assert [c.strip() for c in lines[0].strip("|").split("|")] == wide.stdout.splitlines()[0].split()
        return
    assert [c.strip() for c in lines[0].strip("|").split("|")] == wide.stdout.splitlines()[0].split()
    assert len(lines) - 2 == len(wide.stdout.splitlines()) - 1


def _with_pod(doc):
    """Every object in doc that has a "pod" key."""
    if isinstance(doc, dict):
        if "pod" in doc:
            yield doc
        for v in doc.values():
            yield from _with_pod(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _with_pod(v)


# (args, whether pod was the "NS/NAME" string there: those also carry it as podRef)
POD_READS = [
    (["sandbox", "list"], False), (["sandbox", "inspect", "{pod}"], False), (["top"], False),
    (["overhead"], True), (["inspect", "cgroup", "{pod}"], False),
    (["balloon", "get", "{pod}"], True), (["balloon", "set", "{pod}", "--target", "300Mi", "--dry-run"], True),
    (["vmcore", "trigger", "{pod}", "--dry-run"], True),
    (["inspect", "pressure", "--interval", "0.2s"], True),  # rdt, bvt: test_inspect_fixtures
    (["upgrade", "status"], True), (["lab", "status", "--root", "{root}"], True),
]


@pytest.mark.parametrize("args,ref", POD_READS, ids=lambda a: " ".join(a) if isinstance(a, list) else str(a))
def test_pod_is_one_object_everywhere(lab, cli, args, ref):
    """`pod` was the object {name, namespace, uid} in sandbox list, top and overhead but the
    string "NS/NAME" in balloon, the isolation reports, vmcore and upgrade status: `jq
    .pod.name` worked on one and not the other (review 11, finding 9). Now the object
    everywhere, with that string beside it as `podRef` where it was the string."""
    pod = lab.pod("qemu-0")
    r = cli(["--host-root", lab.root, "-o", "json", *[a.format(pod=pod, root=lab.root) for a in args]])
    assert r.exit_code in (0, 1), r.stderr  # 1: a lab node lacks some isolation feature (warnings)
    found = [o for o in _with_pod(_check_json(r)) if o["pod"] is not None]
    assert found, r.stdout
    for o in found:
        assert set(o["pod"]) == {"name", "namespace", "uid"}, o
        if ref or "podRef" in o:
            assert o["podRef"] == f"{o['pod']['namespace']}/{o['pod']['name']}", o
