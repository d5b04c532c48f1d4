"""Real processes across an A/B switch.

Stand-in shims and hypervisors are real processes executed from release A's
binaries (copies of the Python interpreter living in the release) that map
A's guest kernel and keep A's image open, like QEMU does. They keep running
across a switch to B; ``status`` attributes each process and sandbox to the
right release; ``gc`` keeps A while they run and removes it once they exit.

The node is a --host-root tree whose /proc is this machine's /proc (a symlink),
so persist.json written by the lab layout and the real processes meet.
"""
from __future__ import annotations

import json
import os

import pytest

from katactl.lab import layout
from tests import upgrade_fixtures as fx

A, B = "3.1.0", "3.2.0"


@pytest.fixture
def lab(tmp_path, cli):
    node = tmp_path / "node"
    node.mkdir()
    os.symlink("/proc", node / "proc")
    for v in (A, B):
        tb = fx.make_tarball(str(tmp_path), v, str(tmp_path), compression="gz")
        r = cli(["--host-root", str(node), "upgrade", "stage", tb])
        assert r.exit_code == 0, r.stderr
    procs = []
    yield node, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def K(cli, node, *args):
    r = cli(["--host-root", str(node), "upgrade", *args, "-o", "json"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.json()


def start_sandbox(node, procs, release: str, sid: str):
    """A shim and a hypervisor from `release`, plus its persist.json (configured paths from
    the release's own configuration, as the runtime records them)."""
    relnode = f"/opt/kata/releases/{release}"
    real = lambda p: str(node) + p  # noqa: E731
    kernel = f"{relnode}/share/kata-containers/vmlinux.container"
    image = f"{relnode}/share/kata-containers/kata-containers.img"
    shim = fx.start_standin(real(f"{relnode}/bin/containerd-shim-kata-v2"), "-namespace", "k8s.io",
                            "-address", "/run/containerd/containerd.sock", "-id", sid)
    hv = fx.start_standin(real(f"{relnode}/bin/qemu-system-x86_64"), "-name", f"sandbox-{sid}",
                          "-kernel", real(kernel), real(image))
    procs += [shim, hv]
    layout.write_go_sandbox(str(node), sid, pid=hv.pid, kernel=kernel, image=image,
                            hypervisor_path=f"{relnode}/bin/qemu-system-x86_64",
                            pod_name=f"batch-{sid[:4]}", pod_namespace="offline")
    return shim, hv


def test_running_sandboxes_survive_switch_status_attributes_gc_waits(cli, lab):
    node, procs = lab
    K(cli, node, "switch", A)
    sid_a = layout.sandbox_id_for(1)
    shim_a, hv_a = start_sandbox(node, procs, A, sid_a)

    d = K(cli, node, "switch", B)
    assert d["changed"] and d["to"] == {"runtime": B, "agent": B}
    assert shim_a.poll() is None and hv_a.poll() is None  # nothing was stopped

    sid_b = layout.sandbox_id_for(2)
    shim_b, hv_b = start_sandbox(node, procs, B, sid_b)

    st = K(cli, node, "status")
    assert st["current"] == {"runtime": B, "agent": B}
    assert st["previous"] == {"runtime": A, "agent": A}
    by_pid = {p["pid"]: p for p in st["processes"]}
    assert by_pid[shim_a.pid]["releases"] == [A] and by_pid[shim_a.pid]["role"] == "shim"
    assert by_pid[hv_a.pid]["releases"] == [A] and by_pid[hv_a.pid]["role"] == "hypervisor"
    assert set(by_pid[hv_a.pid]["via"][A]) >= {"exe", "maps", "fd", "cmdline"}
    assert by_pid[hv_b.pid]["releases"] == [B] and by_pid[shim_b.pid]["releases"] == [B]
    sbs = {s["id"]: s for s in st["sandboxes"]}
    a = sbs[sid_a]
    assert (a["shimPid"], a["shimRelease"], a["hypervisorRelease"], a["assetsRelease"]) == \
        (shim_a.pid, A, A, A)
    assert a["podRef"] == f"offline/batch-{sid_a[:4]}" and a["hypervisorRunning"] is True
    assert (a["pod"]["namespace"], a["pod"]["name"]) == ("offline", f"batch-{sid_a[:4]}") and "uid" in a["pod"]
    assert sbs[sid_b]["shimRelease"] == B and sbs[sid_b]["assetsRelease"] == B
    rels = {r["version"]: r for r in st["releases"]}
    assert sorted(rels[A]["processes"]) == sorted([shim_a.pid, hv_a.pid])
    assert rels[A]["sandboxes"] == [sid_a] and rels[A]["inUse"] and rels[A]["state"] == ["previous"]

    # the table views name the releases too
    r = cli(["--host-root", str(node), "upgrade", "status", "--sandboxes"])
    assert r.exit_code == 0
    row = [line.split() for line in r.stdout.splitlines() if line.startswith(sid_a)][0]
    assert row[1:] == [f"offline/batch-{sid_a[:4]}", str(shim_a.pid), A, str(hv_a.pid), A, A]

    # gc keeps A while its processes run
    d = K(cli, node, "gc", "--no-keep-previous", "--dry-run")
    assert d["removed"] == []
    reason = {k["version"]: k["reason"] for k in d["kept"]}[A]
    assert reason.startswith("in use:") and str(hv_a.pid) in reason
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == []
    assert (node / "opt/kata/releases" / A).is_dir()

    # only the hypervisor left: still in use (it maps A's kernel)
    shim_a.kill()
    shim_a.wait()
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == []
    hv_a.kill()
    hv_a.wait()
    d = K(cli, node, "gc", "--no-keep-previous", "--dry-run")
    assert d["removed"] == [A] and (node / "opt/kata/releases" / A).is_dir()
    d = K(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == [A] and d["changed"] is True
    assert not (node / "opt/kata/releases" / A).exists()
    assert shim_b.poll() is None and hv_b.poll() is None
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["changed"] is False
    st = K(cli, node, "status")
    stale = {s["id"]: s for s in st["sandboxes"]}[sid_a]
    assert stale["hypervisorRunning"] is False and stale["releases"] == []


def test_process_running_deleted_binary_still_counts(cli, lab, tmp_path):
    """A process whose release binary was deleted under it (exe '(deleted)') still pins the release."""
    node, procs = lab
    K(cli, node, "switch", B)
    exe = str(node) + f"/opt/kata/releases/{A}/bin/cloud-hypervisor"
    p = fx.start_standin(exe)
    procs.append(p)
    os.remove(exe)
    st = K(cli, node, "status")
    mine = [x for x in st["processes"] if x["pid"] == p.pid][0]
    assert mine["releases"] == [A] and mine["exe"].endswith("(deleted)")
    d = K(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == []
    p.kill()
    p.wait()
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == [A]


def tree_bytes(root) -> dict:
    """Every entry under root: type, mode, and content or link target (byte-for-byte)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.islink(p):
                what = ("link", os.readlink(p))
            elif os.path.isdir(p):
                what = ("dir", None)
            else:
                with open(p, "rb") as f:
                    what = ("file", f.read())
            out[os.path.relpath(p, root)] = (what, st.st_mode, st.st_ino)
    return out


def _stage_audits(home):
    p = home / "state" / "katactl" / "audit.log"
    return [a for a in map(json.loads, p.read_text().splitlines()) if a["action"] == "upgrade.stage"]


def test_forced_restage_refused_while_processes_use_the_release(cli, lab, tmp_path, _isolated_home):
    """stage --force of a release a running shim/hypervisor uses: refused (exit 5, even as
    a dry run), the release tree untouched, no change audited; once they exit it replaces it."""
    node, procs = lab
    K(cli, node, "switch", B)
    sid = layout.sandbox_id_for(1)
    shim, hv = start_sandbox(node, procs, A, sid)
    (tmp_path / "other").mkdir()  # A again, from another source
    other = fx.make_tarball(str(tmp_path / "other"), A, str(tmp_path / "other"), compression="tar")
    rel_a = node / "opt/kata/releases" / A
    before = tree_bytes(rel_a)
    old_sha = json.loads((rel_a / ".katactl-release.json").read_text())["sourceSha256"]
    audits = len(_stage_audits(_isolated_home))

    for dry in ([], ["--dry-run"]):
        r = cli(["--host-root", str(node), "upgrade", "stage", other, "--force", *dry, "-o", "json"])
        assert r.exit_code == 5, (dry, r.stdout, r.stderr)
        err = r.json()
        assert err["code"] == "Refused" and f"release {A} is in use" in err["message"]
        for pid in (shim.pid, hv.pid):
            assert f"pid {pid} " in err["hint"]
        assert f"sandbox {sid[:12]}" in err["hint"]
        assert "wait until they end" in err["hint"] and "--as VERSION" in err["hint"]
        assert tree_bytes(rel_a) == before
        assert sorted(n for n in os.listdir(rel_a.parent) if n.startswith(".")) == [".katactl"]
    assert shim.poll() is None and hv.poll() is None
    recs = _stage_audits(_isolated_home)[audits:]
    assert len(recs) == 1  # the dry run is not audited
    assert "changed" not in recs[0] and recs[0]["result"].startswith("error: ") and "in use" in recs[0]["result"]

    # the shim gone, the hypervisor still maps A's kernel and holds its image: still refused
    shim.kill()
    shim.wait()
    r = cli(["--host-root", str(node), "upgrade", "stage", other, "--force"])
    assert r.exit_code == 5 and f"pid {hv.pid} " in r.stderr and f"pid {shim.pid} " not in r.stderr
    assert tree_bytes(rel_a) == before

    hv.kill()
    hv.wait()
    d = K(cli, node, "stage", other, "--force", "--dry-run")
    assert d["changed"] is True and d["replace"] is True and tree_bytes(rel_a) == before
    d = K(cli, node, "stage", other, "--force")
    assert d["changed"] is True and d["replaced"] is True
    new_sha = json.loads((rel_a / ".katactl-release.json").read_text())["sourceSha256"]
    assert new_sha != old_sha and new_sha == d["sourceSha256"]
    assert _stage_audits(_isolated_home)[-1]["changed"] is True
    assert K(cli, node, "stage", other, "--force")["changed"] is False  # idempotent


def test_forced_restage_refused_when_proc_cannot_be_read(cli, tmp_path):
    """A node tree without /proc: nothing proves the release is unused, so stage --force
    refuses (also as a dry run); plain staging and an idempotent re-stage still work."""
    node = tmp_path / "bare"
    node.mkdir()
    tb = fx.make_tarball(str(tmp_path), A, str(tmp_path), compression="gz")
    (tmp_path / "other").mkdir()
    other = fx.make_tarball(str(tmp_path / "other"), A, str(tmp_path / "other"), compression="tar")
    K(cli, node, "stage", tb)
    rel_a = node / "opt/kata/releases" / A
    before = tree_bytes(rel_a)
    for dry in ([], ["--dry-run"]):
        r = cli(["--host-root", str(node), "upgrade", "stage", other, "--force", *dry, "-o", "json"])
        assert r.exit_code == 5, (dry, r.stdout, r.stderr)
        err = r.json()
        assert err["code"] == "Refused" and "cannot list /proc" in err["message"]
        assert "/proc must be visible" in err["hint"] and "--as VERSION" in err["hint"]
    assert tree_bytes(rel_a) == before
    assert K(cli, node, "stage", tb, "--force")["changed"] is False  # same source: nothing to replace
    (node / "proc").mkdir()  # a /proc showing no processes: nothing uses A
    assert K(cli, node, "stage", other, "--force")["replaced"] is True


@pytest.mark.parametrize("link,target,real", [("opt", "var/opt", "var/opt/kata/releases"),
                                               ("opt/kata/releases", "../../srv/kata", "srv/kata")])
def test_a_kata_root_under_a_symlink_still_sees_the_processes_using_a_release(cli, tmp_path, link, target, real):
    """review 7 #1: with /opt -> var/opt (Fedora CoreOS, RHCOS), the kernel reports a shim's
    exe, maps and fds with the symlink resolved (/var/opt/kata/releases/A/...; linux
    fs/proc/base.c proc_exe_link): status showed no process, gc deleted the release under
    the running shim, and stage --force replaced it. Also with releases/ itself a link."""
    node = tmp_path / "node"
    (node / link).parent.mkdir(parents=True)
    (node / link).parent.joinpath(target).mkdir(parents=True)
    os.symlink(target, node / link)
    os.symlink("/proc", node / "proc")
    for v in (A, B):
        (tmp_path / v).mkdir()
        K(cli, node, "stage", fx.make_tarball(str(tmp_path / v), v, str(tmp_path / v), compression="gz"))
    assert (node / real / A).is_dir()
    K(cli, node, "switch", A)
    cur = f"{node}/opt/kata/current"  # started the way containerd does: through current
    shim = fx.start_standin(f"{cur}/bin/containerd-shim-kata-v2", f"{cur}/share/kata-containers/vmlinux.container")
    try:
        assert os.readlink(f"/proc/{shim.pid}/exe").startswith(f"{node}/{real}/{A}/")
        K(cli, node, "switch", B)
        st = K(cli, node, "status")
        mine = [p for p in st["processes"] if p["pid"] == shim.pid]
        assert mine and mine[0]["releases"] == [A] and set(mine[0]["via"][A]) >= {"exe", "maps"}
        assert {r["version"]: r["inUse"] for r in st["releases"]} == {A: True, B: False}
        d = K(cli, node, "gc", "--no-keep-previous", "--yes")
        assert d["removed"] == [] and str(shim.pid) in {k["version"]: k["reason"] for k in d["kept"]}[A]
        (tmp_path / "other").mkdir()
        other = fx.make_tarball(str(tmp_path / "other"), A, str(tmp_path / "other"), compression="tar")
        r = cli(["--host-root", str(node), "upgrade", "stage", other, "--force"])
        assert r.exit_code == 5 and f"release {A} is in use" in r.stderr, r.stderr
        assert shim.poll() is None and (node / real / A).is_dir()
    finally:
        shim.kill()
        shim.wait()
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == [A]


@pytest.mark.parametrize("where", ["current", "handler"])
def test_a_configuration_naming_assets_by_their_resolved_path_keeps_that_release(cli, tmp_path, where):
    """review 13 (unverified suspicion 2): with /opt -> var/opt, a Kata configuration naming
    release A's guest assets by their resolved path (/var/opt/kata/releases/A/...) did not
    protect A: gc read the current release's configuration, and status/handler pins a
    handler's, without the resolved prefix procscan uses, so gc deleted the image and kernel
    the next pod boots, and stage --force replaced those a handler's configuration names."""
    node = tmp_path / "node"
    (node / "var/opt").mkdir(parents=True)
    os.symlink("var/opt", node / "opt")
    (node / "proc").mkdir()  # no process uses anything
    for v in (A, B):
        (tmp_path / v).mkdir()
        K(cli, node, "stage", fx.make_tarball(str(tmp_path / v), v, str(tmp_path / v), compression="gz"))
    K(cli, node, "switch", B)
    qemu = f"opt/kata/releases/{B}/share/defaults/kata-containers/configuration-qemu.toml"
    text = (node / qemu).read_text().replace(f"/opt/kata/releases/{B}/share/kata-containers/",
                                             f"/var/opt/kata/releases/{A}/share/kata-containers/")
    assert f'image = "/var/opt/kata/releases/{A}/' in text
    if where == "current":
        (node / qemu).write_text(text)
        reason = "referenced by the current configuration"
    else:  # a handler reading its own copy; B's configurations untouched
        (node / "etc/kata-containers").mkdir(parents=True)
        (node / "etc/kata-containers/configuration.toml").write_text(text)
        (node / "etc/containerd").mkdir(parents=True)
        (node / "etc/containerd/config.toml").write_text(
            'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]\n'
            'runtime_type = "io.containerd.kata.v2"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata.options]\n'
            'ConfigPath = "/etc/kata-containers/configuration.toml"\n')
        assert K(cli, node, "status")["runtimeHandlers"][0]["assetReleases"] == [A]
        reason = "pinned by containerd handler kata"
    d = K(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == [] and {k["version"]: k["reason"] for k in d["kept"]}[A] == reason, d["kept"]
    assert (node / f"var/opt/kata/releases/{A}/share/kata-containers/kata-containers.img").exists()
    if where == "handler":
        (tmp_path / "other").mkdir()
        other = fx.make_tarball(str(tmp_path / "other"), A, str(tmp_path / "other"), compression="tar")
        r = cli(["--host-root", str(node), "upgrade", "stage", other, "--force"])
        assert r.exit_code == 5 and f"release {A} is pinned by containerd handler kata" in r.stderr, r.stderr


def test_an_agent_switch_moves_asset_paths_given_resolved_and_status_reads_them(cli, tmp_path):
    """The same resolved asset paths in the current release's configuration (/opt -> var/opt):
    status named the agent by the other files alone (B, while qemu's configuration booted A's
    image), a runtime switch went ahead, and `switch B -c agent` left those paths on A. Now
    status says mixed, a runtime switch is refused, and the agent switch moves them to B."""
    node = tmp_path / "node"
    (node / "var/opt").mkdir(parents=True)
    os.symlink("var/opt", node / "opt")
    (node / "proc").mkdir()
    for v in (A, B):
        (tmp_path / v).mkdir()
        K(cli, node, "stage", fx.make_tarball(str(tmp_path / v), v, str(tmp_path / v), compression="gz"))
    K(cli, node, "switch", B)
    qemu = node / f"opt/kata/releases/{B}/share/defaults/kata-containers/configuration-qemu.toml"
    qemu.write_text(qemu.read_text().replace(f"/opt/kata/releases/{B}/share/kata-containers/",
                                             f"/var/opt/kata/releases/{A}/share/kata-containers/"))
    st = K(cli, node, "status")
    assert st["current"] == {"runtime": B, "agent": "mixed"}, st["current"]
    r = cli(["--host-root", str(node), "upgrade", "switch", A, "-c", "runtime"])
    assert r.exit_code == 5 and "mixes guest assets of several releases" in r.stderr, r.stderr
    d = K(cli, node, "switch", B, "-c", "agent")
    assert d["changed"] is True and d["to"] == {"runtime": B, "agent": B}
    text = qemu.read_text()
    assert f'image = "/opt/kata/releases/{B}/share/kata-containers/kata-containers.img"' in text
    assert not [line for line in text.splitlines() if "/var/opt/" in line and not line.lstrip().startswith("#")]
    assert K(cli, node, "status")["current"] == {"runtime": B, "agent": B}


def test_status_without_proc_says_the_counts_are_unknown(cli, tmp_path):
    """review 8 (upgrade) #4: with nothing to look at (a --host-root without the node's
    /proc), status showed PROCESSES 0 for every release, exit 0, no warning, while gc
    refused. Now it warns in gc's words, the counts show '?' and inUse is null (unknown),
    the scan's gap named in -o json."""
    node = tmp_path / "bare"
    node.mkdir()
    K(cli, node, "stage", fx.make_tarball(str(tmp_path), A, str(tmp_path), compression="gz"))
    r = cli(["--host-root", str(node), "upgrade", "status"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.startswith("warning: localhost: cannot list /proc: which releases running processes use is "
                               "unknown; the PROCESSES and SANDBOXES counts are lower bounds"), r.stderr
    assert [line.split()[2:] for line in r.stdout.splitlines()[1:]] == [["?", "?"]]
    st = K(cli, node, "status")
    assert st["releases"][0]["inUse"] is None and st["releases"][0]["processes"] == []
    assert st["scan"]["gap"] == "cannot list /proc: which releases running processes use is unknown"
    (node / "proc").mkdir()  # a /proc showing no processes: known unused
    st = K(cli, node, "status")
    assert st["releases"][0]["inUse"] is False and "gap" not in st["scan"]


def test_status_as_non_root_says_which_processes_it_could_not_inspect(cli, lab, tmp_path):
    """The other blind spot of #4: run as an unprivileged user, status cannot read a root
    hypervisor's /proc/PID/{exe,maps,fd} and showed A used by 0 processes (exit 0, silent)
    while gc --dry-run refused. Now it warns with the pids, and A's count is '?'."""
    import subprocess
    import sys

    node, procs = lab
    K(cli, node, "switch", A)
    # started through current, as containerd does: no release path in its arguments
    hv = fx.start_standin(str(node) + "/opt/kata/current/bin/qemu-system-x86_64",
                          str(node) + "/opt/kata/current/share/kata-containers/vmlinux.container")
    procs.append(hv)
    K(cli, node, "switch", B)
    assert {r["version"]: r["processes"] for r in K(cli, node, "status")["releases"]}[A] == [hv.pid]
    p = tmp_path
    while p != p.parent:  # let nobody reach the node tree
        os.chmod(p, os.stat(p).st_mode | 0o055)
        p = p.parent
    (tmp_path / "cfg").mkdir()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               XDG_CONFIG_HOME=str(tmp_path / "cfg"), XDG_STATE_HOME=str(tmp_path / "cfg"))

    def nobody(*args):
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "katactl", "--host-root", str(node), "upgrade", "status", *args],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return r

    st = json.loads(nobody("-o", "json").stdout)
    assert hv.pid in st["scan"]["unreadableKata"] and st["scan"]["gap"].startswith("cannot inspect")
    assert {r["version"]: r["inUse"] for r in st["releases"]}[A] is None
    r = nobody()
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning: localhost: cannot inspect ")]
    assert len(warn) == 1 and "Kata process(es) (pids" in warn[0] and "not root?" in warn[0], r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows[A][2:] == ["?", "?"], r.stdout


#: (form, argv, counts): a process whose argv names release A (REL: its directory as this
#: node's path, under --host-root the lab tree's real path) uses A, wherever no path character
#: precedes the path; another tree's copy of the kata root does not (review 13 #2: quoted,
#: after ; && ( or ` and in JSON, gc deleted A under the process)
ARGV_FORMS = [
    ("an argument", ["-kernel", "REL/share/kata-containers/vmlinux.container"], True),
    ("file=, Kata's -drive", ["-drive", "file=REL/kata.img,if=none"], True),
    ("mem-path=, Kata's nvdimm", ["-object", "memory-backend-file,id=mem0,mem-path=REL/kata.img,size=1G"], True),
    ("unix:", ["-qmp", "unix:REL/qmp.sock,server=on,wait=off"], True),
    ("a word of sh -c", ["exec REL/bin/qemu-system-x86_64 -S"], True),
    ("double-quoted in sh -c", ['exec "REL/bin/qemu-system-x86_64" "$@"'], True),
    ("single-quoted in sh -c", ["exec 'REL/bin/qemu-system-x86_64'"], True),
    ("after &&", ["ulimit -n 1&&REL/bin/qemu-system-x86_64"], True),
    ("after ;", ["cd /;REL/bin/qemu-system-x86_64"], True),
    ("in a subshell", ["(REL/bin/kata-monitor)"], True),
    ("in backquotes", ["x=`REL/bin/kata-runtime --version`"], True),
    ("a supervising loop", ['while :; do "REL/bin/kata-monitor"; sleep 1; done'], True),
    ("K=RELEASE; (the version ends at ;)", ["K=REL; exec $K/bin/qemu-system-x86_64"], True),
    ("= then quoted", ['exec env KATA_DIR="REL" /usr/bin/true'], True),
    ("QEMU's JSON -blockdev", ["-blockdev", '{"driver":"file","node-name":"img","filename":"REL/kata.img"}'], True),
    ("another tree's copy", ["OTHER/opt/kata/releases/A/bin/qemu-system-x86_64"], False),
    ("a backup's copy after file=", ["file=/srv/backup/opt/kata/releases/A/kata.img"], False),
    ("another tree's copy, quoted", ['exec "/mnt/old/opt/kata/releases/A/bin/qemu-system-x86_64"'], False),
    ("another tree's copy in JSON", ['{"filename":"/mnt/old/opt/kata/releases/A/kata.img"}'], False),
    ("katactl's state dir", ["NODE/opt/kata/releases/.katactl/lock"], False),
]


def test_a_release_path_anywhere_in_an_argument_counts_another_trees_copy_does_not(cli, lab, tmp_path):
    """Every form of ARGV_FORMS as a real process: status attributes it to exactly A (via
    cmdline) or not at all; gc --yes keeps A while a process names it in a quoted sh -c
    word (review 13 #2: it deleted the release), and removes it with only the other trees'
    copies named."""
    import subprocess
    import sys

    node, procs = lab
    K(cli, node, "switch", A)
    K(cli, node, "switch", B)
    subst = {"REL": f"{node}/opt/kata/releases/{A}", "NODE": str(node), "OTHER": str(tmp_path / "other-node"),
             "releases/A": f"releases/{A}"}

    def start(argv):
        for k, v in subst.items():
            argv = [a.replace(k, v) for a in argv]
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", *argv])
        procs.append(p)
        return p

    started = [(form, counts, start(argv)) for form, argv, counts in ARGV_FORMS]
    seen = {p["pid"]: p for p in K(cli, node, "status")["processes"]}
    wrong = [(form, seen.get(p.pid, {}).get("via")) for form, counts, p in started
             if (seen.get(p.pid, {}).get("via") == {A: ["cmdline"]}) != counts]
    assert wrong == [], wrong

    for form, counts, p in started:
        if counts and form != "double-quoted in sh -c":
            p.kill()
            p.wait()
    quoted = next(p for form, _c, p in started if form == "double-quoted in sh -c")
    d = K(cli, node, "gc", "--no-keep-previous", "--yes")
    assert d["removed"] == [] and f"{quoted.pid}" in {k["version"]: k["reason"] for k in d["kept"]}[A]
    assert (node / "opt/kata/releases" / A).is_dir()
    quoted.kill()
    quoted.wait()
    assert K(cli, node, "gc", "--no-keep-previous", "--yes")["removed"] == [A]
