"""Crash safety: katactl is SIGKILLed at every step of stage, switch, rollback and gc
(KATACTL_FAULT fault-injection points); the node is always fully on the old or
fully on the new release, and a re-run completes the operation."""
from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from katactl.upgrade.layout import FAULT_POINTS
from tests import upgrade_fixtures as fx

A, B = "3.1.0", "3.2.0"
STAGE_POINTS = [p for p in FAULT_POINTS if p.startswith("stage:")]
SWITCH_POINTS = [p for p in FAULT_POINTS if p.startswith("switch:")]


@pytest.fixture(scope="module")
def tbs(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash-tarballs")
    return {A: fx.make_tarball(str(d), A, str(d), compression="gz"),
            B: fx.make_tarball(str(d), B, str(d), compression="xz")}


@pytest.fixture(scope="module")
def templates(tmp_path_factory, tbs):
    """Node trees with A and B staged, on (A, A) and on (B, B); copied per test (fast)."""
    from katactl.backends.local import LocalTransport
    from katactl import upgrade

    out = {}
    mp = pytest.MonkeyPatch()  # module scope runs before the autouse home isolation
    mp.setenv("KATACTL_AUDIT_LOG", str(tmp_path_factory.mktemp("audit") / "audit.log"))
    request_cleanup = mp.undo
    for start in (A, B):
        node = tmp_path_factory.mktemp(f"template-{start}") / "node"
        t = LocalTransport(str(node))
        L = upgrade.Layout()
        for v in (A, B):
            upgrade.stage(t, L, tbs[v])
        upgrade.switch(t, L, start)
        out[start] = node
    request_cleanup()
    return out


def node_on(templates, tmp_path, start):
    import shutil

    node = tmp_path / "node"
    shutil.copytree(templates[start], node, symlinks=True)
    return node


def run(katactl_bin, node, *args, fault=None):
    env = {"KATACTL_FAULT": fault} if fault else {}
    return katactl_bin(["--host-root", str(node), "upgrade", *args, "-o", "json"], env=env)


def releases_dir(node):
    return node / "opt/kata/releases"


def state(node):
    """(runtime, agent) as the node would serve new sandboxes now."""
    try:
        link = os.readlink(node / "opt/kata/current")
    except FileNotFoundError:
        return (None, None)
    rt = link.split("/")[-1]
    cfg = (releases_dir(node) / rt / "share/defaults/kata-containers/configuration-qemu.toml").read_text()
    clh = (releases_dir(node) / rt / "share/defaults/kata-containers/configuration-clh.toml").read_text()
    agents = {line.split("/releases/")[1].split("/")[0] for line in (cfg + clh).splitlines()
              if re.match(r"(kernel|image|initrd)\s*=", line)}
    assert len(agents) == 1, f"configuration mixes agents {agents}"
    return (rt, agents.pop())


def assert_releases_complete(node):
    """Every releases/<v> dir is whole: a record, and every manifest entry intact."""
    for v in os.listdir(releases_dir(node)):
        if v.startswith("."):
            continue
        r = releases_dir(node) / v
        assert (r / ".katactl-release.json").exists(), f"half-staged release {v}"
        for line in (r / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split(None, 1)
            if name.endswith(".toml"):
                continue  # configs are rebased into the release on purpose
            assert hashlib.sha256((r / name).read_bytes()).hexdigest() == digest, name


def history(node):
    p = releases_dir(node) / ".katactl/history.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_every_fault_point_is_known():
    import katactl.upgrade.ops as ops
    import inspect

    src = inspect.getsource(ops)
    for p in FAULT_POINTS:
        assert f'fault("{p}")' in src or p == "stage:mid-extract" and "stage:mid-extract" in src


@pytest.mark.parametrize("point", STAGE_POINTS)
def test_stage_killed_at_each_step(katactl_bin, tmp_path, tbs, point):
    node = tmp_path / "node"
    node.mkdir()  # --host-root must be an existing directory
    r = run(katactl_bin, node, "stage", tbs[B], fault=point)
    assert r.exit_code == -9, (point, r.stderr)
    rel = releases_dir(node) / B
    if point == "stage:after-rename":
        assert rel.exists()
    else:
        assert not rel.exists(), f"{point}: release visible before it was complete"
    assert_releases_complete(node)
    r = run(katactl_bin, node, "stage", tbs[B])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["changed"] is (point != "stage:after-rename")
    assert_releases_complete(node)
    assert not [n for n in os.listdir(releases_dir(node)) if n.startswith(".staging")]


@pytest.mark.parametrize("component,start,target", [
    ("all", (A, A), (B, B)),
    ("runtime", (A, A), (B, A)),
    ("agent", (B, B), (B, A)),
])
@pytest.mark.parametrize("point", SWITCH_POINTS)
def test_switch_killed_at_each_step(katactl_bin, tmp_path, templates, point, component, start, target):
    node = node_on(templates, tmp_path, start[0])
    assert state(node) == start
    version = target[1] if component == "agent" else target[0]
    r = run(katactl_bin, node, "switch", version, "--component", component, fault=point)
    steps_on_path = point not in ("switch:after-config",) if component != "agent" else \
        point not in ("switch:after-prepare", "switch:after-tmp-link", "switch:after-flip")
    if steps_on_path:
        assert r.exit_code == -9, (point, r.stderr)
    else:  # this component's switch never reaches that step
        assert r.exit_code == 0, r.stderr
    now = state(node)
    assert now in (start, target), f"{point}: half switch {now}"
    assert_releases_complete(node)
    assert not [n for n in os.listdir(node / "opt/kata") if n.startswith(".current")] or r.exit_code == -9
    r = run(katactl_bin, node, "switch", version, "--component", component)
    assert r.exit_code == 0, r.stderr
    assert state(node) == target
    assert not (releases_dir(node) / ".katactl/pending.json").exists()
    assert not [n for n in os.listdir(node / "opt/kata") if n.startswith(".current")]
    hist = history(node)
    moves = [h for h in hist if h["to"] == {"runtime": target[0], "agent": target[1]}]
    assert len(moves) == 1, f"{point}: history records the switch {len(moves)} times"
    assert hist[-1]["to"] == {"runtime": target[0], "agent": target[1]}


@pytest.mark.parametrize("point", ["switch:after-journal", "switch:after-flip", "switch:after-history"])
def test_rollback_killed_then_completed(katactl_bin, tmp_path, templates, point):
    node = node_on(templates, tmp_path, A)
    assert run(katactl_bin, node, "switch", B).exit_code == 0
    r = run(katactl_bin, node, "rollback", fault=point)
    assert r.exit_code == -9
    assert state(node) in ((A, A), (B, B))
    r = run(katactl_bin, node, "rollback")
    assert r.exit_code == 0, r.stderr
    assert state(node) == (A, A)
    assert [h["action"] for h in history(node)] == ["switch", "switch", "rollback"]


def test_gc_killed_after_trash_is_finished_by_rerun(katactl_bin, tmp_path, templates):
    node = node_on(templates, tmp_path, B)
    (node / "proc").mkdir()
    r = run(katactl_bin, node, "gc", "--yes", fault="gc:after-trash")
    assert r.exit_code == -9
    assert not (releases_dir(node) / A).exists()  # gone from view atomically
    r = run(katactl_bin, node, "gc", "--yes")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["changed"] is True and d["staleTempDirs"] and d["removed"] == []
    assert [n for n in os.listdir(releases_dir(node)) if n != ".katactl"] == [B]
