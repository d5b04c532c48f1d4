"""Every command's -o json parses, on success and on failure (Ansible reads stdout).

Success paths run against the shared lab (real QEMU guests); failure paths
against an empty node root, where each command must still print a JSON Error
object with the exit code it exits with.
"""
import json

import pytest

LAB_READS = [
    ["sandbox", "list"], ["sandbox", "inspect", "{pod}"], ["metrics", "{pod}"], ["top"],
    ["balloon", "get", "{pod}"], ["vmcore", "list"], ["inspect", "rdt"], ["upgrade", "status"],
    ["shim", "agent-url", "{pod}"], ["version"], ["config", "view"],
    ["balloon", "set", "{pod}", "--target", "300Mi", "--dry-run"],
]

EMPTY_NODE_FAILURES = [
    ["sandbox", "inspect", "nope"], ["metrics", "nope"], ["balloon", "get", "nope"],
    ["balloon", "set", "nope", "--target", "1Gi"], ["vmcore", "list"], ["inspect", "bvt"],
    ["inspect", "threads", "nope"], ["shim", "agent-url", "nope"], ["upgrade", "gc", "--dry-run"],
    ["vmcore", "trigger", "nope"], ["pprof", "nope", "heap", "-f", "/dev/null"],
]


def _check_json(r):
    d = json.loads(r.stdout)
    assert d["apiVersion"] == "katactl/v1" and d["kind"]
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


@pytest.mark.parametrize("args", EMPTY_NODE_FAILURES, ids=lambda a: " ".join(a))
def test_json_error_object_on_an_empty_node(tmp_path, cli, args):
    r = cli(["--host-root", str(tmp_path), "-o", "json", *args])
    assert r.exit_code in (1, 3, 5), (r.exit_code, r.stderr)
    _check_json(r)
    assert len([l for l in r.stderr.splitlines() if l.startswith("katactl: error:")]) == 1
