"""Crash safety: katactl is SIGKILLed at every step of stage, switch, rollback and gc
(KATACTL_FAULT fault-injection points, also between the renames of a multi-file
configuration switch and of a forced re-stage).

The invariant checked after every kill (docs/upgrade.md, "Concurrency and crash safety"):
the node serves new sandboxes either the old or the new (runtime, agent) pair; the one
exception is a kill between the back-to-back renames of an agent switch, where each
configuration file is still wholly old or wholly new, the journal records the switch,
``status`` reports agent "switching" (never "mixed"), and the next katactl upgrade
command finishes it first. A re-run always completes the operation."""
from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from katactl.upgrade.layout import FAULT_POINTS, REPEATED_FAULT_POINTS
from tests import upgrade_fixtures as fx

A, B = "3.1.0", "3.2.0"
#: the fixture releases' configuration files an agent switch rewrites
CONFIGS = ("configuration-clh.toml", "configuration-qemu.toml")
STAGE_POINTS = [p for p in FAULT_POINTS if p.startswith("stage:")]
#: every switch step, plus every later pass of a repeated one (``@1`` is the plain name):
#: a kill after each of the len(CONFIGS) configuration renames
SWITCH_POINTS = [p for p in FAULT_POINTS if p.startswith("switch:")] + [
    f"{p}@{n}" for p in REPEATED_FAULT_POINTS for n in range(2, len(CONFIGS) + 1)]
#: the steps of a multi-file configuration edit (absent when there is nothing to edit)
CONFIG_EDIT_POINTS = {"switch:after-config-tmp", "switch:after-intent", "switch:after-config-rename",
                      *[p for p in SWITCH_POINTS if "@" in p]}
#: kills that may leave the live configuration files partly renamed (each one whole)
MID_RENAME_POINTS = {p for p in SWITCH_POINTS if p.startswith("switch:after-config-rename")
                     and not p.endswith(f"@{len(CONFIGS)}")}


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
    (node / "proc").mkdir()  # a /proc showing no processes: gc and stage --force list it
    return node


def run(katactl_bin, node, *args, fault=None):
    env = {"KATACTL_FAULT": fault} if fault else {}
    return katactl_bin(["--host-root", str(node), "upgrade", *args, "-o", "json"], env=env)


def releases_dir(node):
    return node / "opt/kata/releases"


def file_agents(node):
    """{config file name: the one agent release it names} for the live configuration;
    each file must name exactly one (a file is never half rewritten)."""
    rt = os.readlink(node / "opt/kata/current").split("/")[-1]
    cfg_dir = releases_dir(node) / rt / "share/defaults/kata-containers"
    assert sorted(n for n in os.listdir(cfg_dir) if n.endswith(".toml") and not (cfg_dir / n).is_symlink()) \
        == sorted(CONFIGS), "the fixture's configuration files changed: update CONFIGS"
    out = {}
    for name in CONFIGS:
        agents = {line.split("/releases/")[1].split("/")[0] for line in (cfg_dir / name).read_text().splitlines()
                  if re.match(r"(kernel|image|initrd)\s*=", line)}
        assert len(agents) == 1, f"{name} itself mixes agents {agents}"
        out[name] = agents.pop()
    return out


def state(node):
    """(runtime, agent) as the node would serve new sandboxes now."""
    try:
        link = os.readlink(node / "opt/kata/current")
    except FileNotFoundError:
        return (None, None)
    agents = set(file_agents(node).values())
    assert len(agents) == 1, f"configuration mixes agents {agents}"
    return (link.split("/")[-1], agents.pop())


def journal(node):
    p = releases_dir(node) / ".katactl/pending.json"
    return json.loads(p.read_text()) if p.exists() else None


def status(katactl_bin, node):
    r = run(katactl_bin, node, "status")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def assert_old_or_new_or_switching(katactl_bin, node, start, target, point):
    """The documented invariant after a kill. Returns True when the node is mid-switch."""
    per_file = file_agents(node)  # every file whole
    rt = os.readlink(node / "opt/kata/current").split("/")[-1]
    st = status(katactl_bin, node)
    assert st["current"]["agent"] != "mixed", f"{point}: status reports a mixed agent"
    if len(set(per_file.values())) == 1:
        assert (rt, next(iter(per_file.values()))) in (start, target), f"{point}: half switch"
        assert st["current"] == {"runtime": rt, "agent": per_file[CONFIGS[0]]}
        return False
    # between the renames of a configuration switch: only the two agents, journal says so
    assert point in MID_RENAME_POINTS, f"{point}: configuration mixes agents {per_file}"
    assert set(per_file.values()) == {start[1], target[1]} and rt == start[0] == target[0]
    j = journal(node)
    assert j and j["to"] == {"runtime": target[0], "agent": target[1]} and len(j["configs"]) == len(CONFIGS)
    assert st["current"] == {"runtime": rt, "agent": "switching"}
    assert st["inProgress"]["to"] == j["to"]
    n = int(point.split("@")[1]) if "@" in point else 1
    assert st["inProgress"]["configFilesRenamed"] == n
    roles = {r["version"]: r["state"] for r in st["releases"]}
    assert "agent-old" in roles[start[1]] and "agent-new" in roles[target[1]]
    return True


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
    from pathlib import Path

    import katactl.upgrade

    pkg = Path(katactl.upgrade.__file__).parent
    src = "\n".join(p.read_text() for p in sorted(pkg.glob("*.py")))
    for p in FAULT_POINTS:
        assert re.search(rf'fault\("{re.escape(p)}"[,)]', src) or p == "stage:mid-extract" and "stage:mid-extract" in src
    assert set(REPEATED_FAULT_POINTS) <= set(FAULT_POINTS)


@pytest.mark.parametrize("point", STAGE_POINTS)
def test_stage_killed_at_each_step(katactl_bin, tmp_path, tbs, point):
    node = tmp_path / "node"
    node.mkdir()  # --host-root must be an existing directory
    r = run(katactl_bin, node, "stage", tbs[B], fault=point)
    on_path = point != "stage:after-set-aside"  # only a forced re-stage sets a release aside
    assert r.exit_code == (-9 if on_path else 0), (point, r.stderr)
    rel = releases_dir(node) / B
    if point in ("stage:after-rename", "stage:after-set-aside"):
        assert rel.exists()
    else:
        assert not rel.exists(), f"{point}: release visible before it was complete"
    assert_releases_complete(node)
    r = run(katactl_bin, node, "stage", tbs[B])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["changed"] is (point not in ("stage:after-rename", "stage:after-set-aside"))
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
    not_on_path = {
        "all": {"switch:after-config"} | CONFIG_EDIT_POINTS,  # B's own config needs no edit
        "runtime": {"switch:after-config"},  # B's config is edited (to A's assets), not live
        "agent": {"switch:after-prepare", "switch:after-tmp-link", "switch:after-flip"},
    }[component]
    if point not in not_on_path:
        assert r.exit_code == -9, (point, r.stderr)
    else:  # this component's switch never reaches that step
        assert r.exit_code == 0, r.stderr
    mid = assert_old_or_new_or_switching(katactl_bin, node, start, target, point)
    assert mid is (component == "agent" and point in MID_RENAME_POINTS)
    assert_releases_complete(node)
    assert not [n for n in os.listdir(node / "opt/kata") if n.startswith(".current")] or r.exit_code == -9
    r = run(katactl_bin, node, "switch", version, "--component", component)
    assert r.exit_code == 0, r.stderr
    assert state(node) == target
    assert not (releases_dir(node) / ".katactl/pending.json").exists()
    assert not [n for n in os.listdir(node / "opt/kata") if n.startswith(".current")]
    for v in (A, B):
        cfg_dir = releases_dir(node) / v / "share/defaults/kata-containers"
        assert not [n for n in os.listdir(cfg_dir) if n.startswith(".")], f"{point}: temp files left"
    assert status(katactl_bin, node)["current"] == {"runtime": target[0], "agent": target[1]}
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
    r = run(katactl_bin, node, "gc", "--yes", fault="gc:after-trash")
    assert r.exit_code == -9
    assert not (releases_dir(node) / A).exists()  # gone from view atomically
    r = run(katactl_bin, node, "gc", "--yes")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["changed"] is True and d["staleTempDirs"] and d["removed"] == []
    assert [n for n in os.listdir(releases_dir(node)) if n != ".katactl"] == [B]



@pytest.mark.parametrize("point", sorted(MID_RENAME_POINTS))
@pytest.mark.parametrize("finisher", ["stage", "gc", "rollback", "switch"])
def test_any_upgrade_command_first_finishes_an_interrupted_agent_switch(katactl_bin, tmp_path, templates, tbs,
                                                                       point, finisher):
    """A switch killed between its configuration renames: status says "switching"
    (read-only: it stays so), and the next stage/gc/rollback/switch first rolls it
    forward to the recorded target, records it, then does its own work."""
    node = node_on(templates, tmp_path, B)
    assert run(katactl_bin, node, "switch", A, "--component", "agent", fault=point).exit_code == -9
    assert assert_old_or_new_or_switching(katactl_bin, node, (B, B), (B, A), point)
    assert status(katactl_bin, node)["current"]["agent"] == "switching"  # status changed nothing
    args = {"stage": ["stage", tbs[A]], "gc": ["gc", "--yes"], "rollback": ["rollback"],
            "switch": ["switch", B]}[finisher]
    r = run(katactl_bin, node, *args)
    assert r.exit_code == 0, r.stderr
    assert f"rolled forward an interrupted switch to runtime {B}, agent {A}" in r.stderr
    assert journal(node) is None
    moves = [h for h in history(node) if h["to"] == {"runtime": B, "agent": A}]
    assert len(moves) == 1 and moves[0]["recovered"] is True and "configs" not in moves[0]
    assert state(node) == ((B, B) if finisher in ("rollback", "switch") else (B, A))
    if finisher == "rollback":
        assert history(node)[-1]["action"] == "rollback"


@pytest.mark.parametrize("killed,point,finisher,outcome", [
    (("switch", A, "--component", "agent"), "switch:after-intent", ("switch", A, "--component", "agent"),
     "rolled forward"),
    (("switch", A, "--component", "agent"), "switch:after-config-rename", ("gc", "--yes"), "rolled forward"),
    (("switch", A, "--component", "agent"), "switch:after-intent", ("stage", "@A@"), "rolled forward"),
    (("switch", A), "switch:after-flip", ("switch", A), "completed"),
])
def test_a_run_that_finishes_an_interrupted_switch_reports_the_change(katactl_bin, tmp_path, templates, tbs,
                                                                      killed, point, finisher, outcome):
    """review 7 #3: a run that had nothing of its own to do, but first finished a killed
    switch (renamed live configuration files), said changed: false, and so did its audit
    record (the killed run wrote none): the live change was never reported. Now it is
    changed: true, with the recovery among the record's done steps."""
    node = node_on(templates, tmp_path, B)
    assert run(katactl_bin, node, *killed, fault=point).exit_code == -9
    log = tmp_path / "audit.log"
    args = [tbs[A] if a == "@A@" else a for a in finisher]
    r = katactl_bin(["--host-root", str(node), "upgrade", *args, "-o", "json"], env={"KATACTL_AUDIT_LOG": str(log)})
    assert r.exit_code == 0, r.stderr
    note = f"{outcome} an interrupted switch to runtime {killed[1] if len(killed) == 2 else B}, agent {A}"
    d = json.loads(r.stdout)
    assert d["recovered"] == note and d["changed"] is True
    entry = json.loads(log.read_text().splitlines()[-1])
    assert (entry["action"], entry["result"], entry["changed"]) == (f"upgrade.{args[0]}", "ok", True)
    assert entry["done"] == [note]  # the recovery: the run itself had nothing to do
    assert journal(node) is None and state(node) == ((A, A) if len(killed) == 2 else (B, A))

@pytest.mark.parametrize("point", ["switch:after-intent", *sorted(MID_RENAME_POINTS)])
def test_rollback_of_an_agent_switch_killed_between_renames(katactl_bin, tmp_path, templates, point):
    node = node_on(templates, tmp_path, B)
    assert run(katactl_bin, node, "switch", A, "--component", "agent").exit_code == 0
    r = run(katactl_bin, node, "rollback", fault=point)
    assert r.exit_code == -9
    assert_old_or_new_or_switching(katactl_bin, node, (B, A), (B, B), point)
    r = run(katactl_bin, node, "rollback")
    assert r.exit_code == 0, r.stderr
    assert state(node) == (B, B)
    assert [h["action"] for h in history(node)] == ["switch", "switch", "rollback"]


@pytest.fixture(scope="module")
def other_a(tmp_path_factory):
    """Release A again, from another source (another tarball): stage needs --force."""
    d = tmp_path_factory.mktemp("other-a")
    return fx.make_tarball(str(d), A, str(d), compression="tar")


def record(node, v):
    return json.loads((releases_dir(node) / v / ".katactl-release.json").read_text())


@pytest.mark.parametrize("point", STAGE_POINTS)
def test_forced_restage_killed_at_each_step(katactl_bin, tmp_path, templates, other_a, point):
    """stage --force over a staged (not current) release: releases/A is always the old
    or the new tree, complete; a kill between the set-aside and the rename leaves it
    absent only with both trees kept, and any next run finishes the replacement."""
    node = node_on(templates, tmp_path, B)
    old_sha = record(node, A)["sourceSha256"]
    r = run(katactl_bin, node, "stage", other_a, "--force", fault=point)
    assert r.exit_code == -9, (point, r.stderr)
    rel = releases_dir(node)
    if (rel / A).exists():
        assert record(node, A)["sourceSha256"] in (old_sha, fx_sha(other_a))
    else:
        assert point == "stage:after-set-aside", f"{point}: release {A} missing"
        aside = [n for n in os.listdir(rel) if n.startswith(f".replaced-{A}-")]
        assert len(aside) == 1
        tok = aside[0].rsplit("-", 1)[1]
        assert (rel / f".staging-{A}-{tok}" / ".katactl-release.json").exists()
        assert json.loads((rel / aside[0] / ".katactl-release.json").read_text())["sourceSha256"] == old_sha
    assert_releases_complete(node)
    assert state(node) == (B, B)
    r = run(katactl_bin, node, "stage", other_a, "--force")
    assert r.exit_code == 0, r.stderr
    assert record(node, A)["sourceSha256"] == fx_sha(other_a)
    # after the set-aside, the re-run's recovery renames the new tree into place: a change too
    assert json.loads(r.stdout)["changed"] is (point != "stage:after-rename")
    assert not [n for n in os.listdir(rel) if n.startswith((".staging", ".replaced", ".trash"))]
    assert_releases_complete(node)


def test_a_switch_finishes_an_interrupted_forced_restage_first(katactl_bin, tmp_path, templates, other_a):
    node = node_on(templates, tmp_path, B)
    assert run(katactl_bin, node, "stage", other_a, "--force", fault="stage:after-set-aside").exit_code == -9
    assert not (releases_dir(node) / A).exists()
    r = run(katactl_bin, node, "switch", A)  # the release it needs is put in place first
    assert r.exit_code == 0, r.stderr
    assert f"completed an interrupted replacement of release {A}" in r.stderr
    assert record(node, A)["sourceSha256"] == fx_sha(other_a)
    assert state(node) == (A, A)


def test_a_failed_forced_restage_puts_the_old_release_back(katactl_bin, tmp_path, templates, other_a):
    """No complete new tree beside the set-aside old one (a crash that lost it): the old
    release is restored, not lost."""
    import shutil

    node = node_on(templates, tmp_path, B)
    assert run(katactl_bin, node, "stage", other_a, "--force", fault="stage:after-set-aside").exit_code == -9
    rel = releases_dir(node)
    for n in os.listdir(rel):
        if n.startswith(".staging-"):
            shutil.rmtree(rel / n)
    old_sha = json.loads(next((rel / n / ".katactl-release.json").read_text() for n in os.listdir(rel)
                              if n.startswith(".replaced-")))["sourceSha256"]
    assert run(katactl_bin, node, "gc", "--dry-run").exit_code == 0
    assert not (rel / A).exists()  # a dry run changes nothing
    r = run(katactl_bin, node, "gc", "--yes")
    assert r.exit_code == 0, r.stderr
    assert f"restored release {A}" in r.stderr
    assert record(node, A)["sourceSha256"] == old_sha
    assert A not in json.loads(r.stdout)["removed"]  # the rollback target is kept
    assert not [n for n in os.listdir(rel) if n.startswith((".staging", ".replaced", ".trash"))]
    node2 = node_on(templates, tmp_path / "second", B)
    assert run(katactl_bin, node2, "stage", other_a, "--force", fault="stage:after-set-aside").exit_code == -9
    rel2 = releases_dir(node2)
    for n in os.listdir(rel2):
        if n.startswith(".staging-"):
            shutil.rmtree(rel2 / n)
    assert run(katactl_bin, node2, "switch", A).exit_code == 0
    assert record(node2, A)["sourceSha256"] == old_sha
    assert state(node2) == (A, A)


def fx_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("args,point,done,pending", [
    (("gc", "--yes", "--no-keep-previous"), "gc:after-trash", [f"removed release {A}"], False),
    (("switch", A), "switch:after-journal", [], True),
    (("switch", A), "switch:after-flip", [f"switched /opt/kata/current to releases/{A}"], True),
    (("stage", "@A@", "--as", "9.0.0"), "stage:mid-extract", [], False),
])
def test_an_interrupted_operation_is_audited_with_what_it_did(katactl_bin, tmp_path, templates, tbs, args, point,
                                                              done, pending):
    """Ctrl-C (a real SIGINT at the step; SIGTERM and SIGHUP take the same path) ends the
    run with exit 130 and an ``interrupted`` audit record saying whether the node changed
    (the live steps done) and whether the switch's journal is left for the next run."""
    node = node_on(templates, tmp_path, B)
    log = tmp_path / "audit.log"
    args = tuple(tbs[A] if a == "@A@" else a for a in args)
    r = katactl_bin(["--host-root", str(node), "upgrade", *args, "-o", "json"],
                    env={"KATACTL_FAULT": point, "KATACTL_FAULT_SIGNAL": "INT", "KATACTL_AUDIT_LOG": str(log)})
    assert r.exit_code == 130, (r.stdout, r.stderr)
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["action"] == f"upgrade.{args[0]}" and entry["result"] == "interrupted"
    assert entry["changed"] is bool(done) and entry.get("done", []) == done
    assert entry.get("pendingJournal") == ("/opt/kata/releases/.katactl/pending.json" if pending else None)
    assert (journal(node) is not None) is pending


def test_an_interruption_during_a_live_step_is_audited_as_unknown(tmp_path, monkeypatch):
    """Ctrl-C while a live step's call is under way (a rename's round trip to the node): it
    may have landed, so the record names it (maybeDone) and has no changed (unknown), never false."""
    from katactl.backends.local import LocalTransport
    from katactl.upgrade.layout import Layout
    from katactl.upgrade.lock import live, locked_audited

    log = tmp_path / "audit.log"
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(log))
    node = tmp_path / "node"
    (node / "opt/kata/releases").mkdir(parents=True)

    def body():
        with live("switched /opt/kata/current to releases/9.9.9"):
            raise KeyboardInterrupt  # arriving while the step's call runs

    with pytest.raises(KeyboardInterrupt):
        locked_audited(LocalTransport(str(node)), Layout(), "switch", {}, body, target="9.9.9", dry_run=False,
                       lock_timeout=1, on_wait=None)
    entry = json.loads(log.read_text().splitlines()[-1])
    assert (entry["result"], entry["maybeDone"]) == ("interrupted", "switched /opt/kata/current to releases/9.9.9")
    assert "changed" not in entry and "done" not in entry
