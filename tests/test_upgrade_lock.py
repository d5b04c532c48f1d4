"""The node upgrade lock of remote transports (katactl/upgrade/lock.py): a stream cut at any
byte of the lock's helper requests leaves no lock behind (--via kube, on the pods/exec
stand-in), and an owner-less lock is waited on while young and broken once old (real sshd)."""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time

import pytest

A = "3.1.0"


def test_a_cut_exec_stream_during_the_lock_leaves_no_lock(kube, kc, tmp_path):
    """Every cut point of the file helper's replies while the lock is taken (the helper exec
    serves nothing else here): the call fails or succeeds, and afterwards the node has no
    lock.d and no temp directory of the lock, so the next operation takes it at once."""
    if os.geteuid() != 0:
        pytest.skip("the exec stand-in needs root (unshare --mount)")
    from katactl import nodeagent
    from katactl.backends.kubeexec import HELPER_ARGV, KubeExecTransport
    from katactl.config import resolve
    from katactl.errors import KatactlError
    from katactl.upgrade.layout import Layout
    from katactl.upgrade.lock import node_lock
    from tests.test_vmcore import node_tree

    root = tmp_path / "tree-node"
    node_tree(str(root))
    kube.add_node("tree-node")
    kube.set_node_root("tree-node", str(root))
    layout = Layout("/opt/kata-lock")
    state = root / layout.state.lstrip("/")
    settings = resolve({"kubeconfig": kc, "agent_image": "python:3.12-slim", "request_timeout": 10.0}, environ={})
    t = KubeExecTransport.from_settings("tree-node", settings)
    try:
        outcomes = set()
        for n in range(4, 900, 11):  # every reply of the lock protocol is cut somewhere
            kube.exec_cut("^" + re.escape(" ".join(HELPER_ARGV)) + "$", after_bytes=n)
            t._drop_helper()  # the next helper request starts the exec that is cut
            try:
                with node_lock(t, layout, timeout=0.5):
                    outcomes.add("held")
            except KatactlError as e:
                outcomes.add(type(e).__name__)
            left = sorted(x for x in os.listdir(state) if x.startswith(("lock.d", ".lock-")))
            assert left == [], (n, left)
        assert outcomes == {"UnreachableError", "held"}  # cut inside the lock, and past its end
        with node_lock(t, layout, timeout=0.5):
            assert json.loads((state / "lock.d/owner.json").read_text())["pid"] == os.getpid()
    finally:
        t.close()
        nodeagent.cleanup()


@pytest.fixture
def ssh_node(sshd_lab, katactl_bin):
    root = f"/opt/kata-ut-{secrets.token_hex(3)}"  # private to this test inside the shared tree
    state = sshd_lab.nodes["node4"].root / root.lstrip("/") / "releases/.katactl"
    state.mkdir(parents=True)

    def run(*args):
        return katactl_bin(["--ssh-config", str(sshd_lab.config), "-N", "node4", "upgrade", *args,
                            "--kata-root", root, "-o", "json"])
    return state, run


def test_an_old_ownerless_lock_is_broken_a_young_one_waited_on(ssh_node, tbs_lock):
    """An empty lock.d (an older katactl cut between its mkdir and its owner write) blocks
    while it may still be that katactl at work, and is broken once older than the bound."""
    state, run = ssh_node
    lockd = state / "lock.d"
    lockd.mkdir()
    r = run("stage", tbs_lock, "--lock-timeout", "0.5")
    assert r.exit_code == 6 and "holds the lock on node4 (another katactl)" in r.stderr, r.stderr
    old = time.time() - 3600
    os.utime(lockd, (old, old))
    r = run("stage", tbs_lock, "--lock-timeout", "0.5")
    assert r.exit_code == 0, r.stderr
    assert sorted(x for x in os.listdir(state) if x.startswith(("lock.d", ".lock-"))) == []
    # an unreadable owner (not JSON) counts as none: old, it is broken too
    lockd.mkdir()
    (lockd / "owner.json").write_bytes(b"\xff{")
    os.utime(lockd, (old, old))
    r = run("gc", "--force", "--yes", "--lock-timeout", "0.5")
    assert r.exit_code == 0, r.stderr
    assert not lockd.exists()


def test_an_old_lock_of_a_live_owner_still_blocks(ssh_node, tbs_lock):
    """A lock written by an older katactl (owner.json without a token) of a live process:
    however old, it blocks; its owner gone, it is broken."""
    state, run = ssh_node
    lockd = state / "lock.d"
    lockd.mkdir()
    (lockd / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "user": "x",
                                                  "since": "2020-01-01T00:00:00Z"}))
    old = time.time() - 3600
    os.utime(lockd, (old, old))
    r = run("stage", tbs_lock, "--lock-timeout", "0.5")
    assert r.exit_code == 6 and f"holds the lock on node4 (pid {os.getpid()}" in r.stderr, r.stderr
    (lockd / "owner.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(), "user": "x"}))
    r = run("stage", tbs_lock, "--lock-timeout", "0.5")
    assert r.exit_code == 0, r.stderr
    assert not lockd.exists()


@pytest.fixture(scope="module")
def tbs_lock(tmp_path_factory):
    from tests import upgrade_fixtures as fx

    d = tmp_path_factory.mktemp("lock-tarballs")
    return fx.make_tarball(str(d), A, str(d), compression="gz")


def test_a_breaker_judging_from_an_old_read_never_moves_a_live_lock(sshd_lab):
    """A deterministic interleaving over real sshd (node4). Breaker B read lock S (its owner a
    dead katactl of this host: stale). Before B acts, client C breaks S itself and takes the
    lock. Then B breaks "S", and after every step of B's break a third client D tries to take
    the lock. C must stay the only holder: B never moves C's lock away (it did: renamed it to
    .lock-stale-*, D took the free lock.d, and B's put-back failed onto D's lock)."""
    import contextlib

    from katactl import config
    from katactl.backends.ssh import SSHTransport
    from katactl.errors import TimeoutExpired
    from katactl.upgrade import lock
    from katactl.upgrade.layout import Layout

    holders: list[str] = []
    stack = contextlib.ExitStack()

    def try_take(name, t):
        try:
            stack.enter_context(lock._mkdir_lock(t, layout, 0, None))
            holders.append(name)
        except TimeoutExpired:
            pass  # held by another: the right outcome for D

    class SteppedSSH(SSHTransport):
        """node4 over SSH; while stepping, D tries to take the lock after each step."""
        stepping = False

        def _step(self, op, *a, **kw):
            try:
                return getattr(super(), op)(*a, **kw)
            finally:
                if self.stepping:
                    try_take("D", td)

        def rename(self, *a, **kw):
            return self._step("rename", *a, **kw)

        def mkdir(self, *a, **kw):
            return self._step("mkdir", *a, **kw)

        def read_bytes(self, *a, **kw):
            return self._step("read_bytes", *a, **kw)

        def remove(self, *a, **kw):
            return self._step("remove", *a, **kw)

    settings = config.resolve({"ssh_config": str(sshd_lab.config)})
    layout = Layout(f"/opt/kata-ut-{secrets.token_hex(3)}")
    state = sshd_lab.nodes["node4"].root / layout.state.lstrip("/")
    (state / "lock.d").mkdir(parents=True)
    (state / "lock.d/owner.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(),
                                                         "user": "x", "token": "dead"}))
    tb, tc, td = (cls.from_settings("node4", settings) for cls in (SteppedSSH, SSHTransport, SSHTransport))
    try:
        with stack:
            raw = tb.read_bytes(f"{layout.lock}.d/owner.json")  # B's read: S, judged stale
            assert lock._stale(raw)
            try_take("C", tc)  # breaks S and takes the lock
            c_owner = (state / "lock.d/owner.json").read_bytes()
            assert holders == ["C"]
            tb.stepping = True
            lock._break(tb, layout, f"{layout.lock}.d", raw)
            tb.stepping = False
            assert holders == ["C"]
            assert (state / "lock.d/owner.json").read_bytes() == c_owner
            assert sorted(os.listdir(state / "lock.d")) == ["owner.json"]  # B's claim withdrawn
        assert sorted(os.listdir(state)) == []  # C released its lock; nothing left behind
    finally:
        for t in (tb, tc, td):
            t.close()


def test_a_break_claim_left_by_a_killed_breaker_is_cleared_once_old(ssh_node, tbs_lock):
    """A breaker killed between its claim (lock.d/.break) and its rename leaves a claimed
    stale lock: while the claim is young it is another breaker at work (wait); once older
    than the bound it is cleared and the lock broken."""
    state, run = ssh_node
    lockd = state / "lock.d"
    (lockd / ".break/0123456789abcdef").mkdir(parents=True)  # its breaker's token inside
    (lockd / "owner.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(), "user": "x"}))
    r = run("stage", tbs_lock, "--lock-timeout", "0.5")
    assert r.exit_code == 6 and "holds the lock on node4" in r.stderr, r.stderr
    old = time.time() - 3600
    os.utime(lockd / ".break", (old, old))
    r = run("stage", tbs_lock, "--lock-timeout", "0.5")
    assert r.exit_code == 0, r.stderr
    assert sorted(x for x in os.listdir(state) if x.startswith(("lock.d", ".lock-"))) == []


def _dead_stale_lock(tmp_path):
    """A node tree (for a LocalTransport) whose lock.d is owned by a dead katactl of this host."""
    from katactl.upgrade.layout import Layout

    layout = Layout("/opt/kata")
    lockd = tmp_path / layout.state.lstrip("/") / "lock.d"
    lockd.mkdir(parents=True)
    (lockd / "owner.json").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(),
                                                  "user": "x", "token": "dead"}))
    return layout, lockd


@pytest.mark.parametrize("stall_after", ["owner re-read", "claim re-check"])
def test_a_breaker_stalled_past_the_bound_never_moves_a_live_lock(tmp_path, stall_after):
    """review5 diffA #2, a deterministic interleaving over a LocalTransport node tree: breaker
    B claims the stale lock S, then stalls (Ctrl-Z, slow calls) longer than the bound after
    one of its calls: B's own clock jumps an hour, its claim looks an hour old on the node,
    and client C meanwhile clears that claim, breaks S and takes the lock. B resumes: it must
    not rename C's lock away (it did, and a client D then took the free lock.d: two holders).
    After the owner re-read B finds its token gone from the claim; after the claim re-check
    its own clock says it is too late to be sure."""
    import contextlib

    from katactl.backends.local import LocalTransport
    from katactl.errors import TimeoutExpired
    from katactl.upgrade import lock

    layout, lockd = _dead_stale_lock(tmp_path)
    holders: list[str] = []
    stack = contextlib.ExitStack()
    b_clock = [0.0]

    def try_take(name):
        try:
            # C's first look finds B's claim (old: cleared), the next one breaks S
            stack.enter_context(lock._mkdir_lock(LocalTransport(str(tmp_path)), layout, 1.0, None))
            holders.append(name)
        except TimeoutExpired:
            pass  # held by another: the right outcome for D

    class StalledB(LocalTransport):
        """B's node; the first call after the named step returns an hour late."""
        stalled = False

        def _stall(self, now: bool) -> None:
            if now and not self.stalled:
                self.stalled = True
                b_clock[0] += 3600
                old = time.time() - 3600
                os.utime(lockd / lock.BREAK_CLAIM, (old, old))
                try_take("C")

        def read_bytes(self, path, *a, **kw):
            r = super().read_bytes(path, *a, **kw)
            self._stall(stall_after == "owner re-read" and (lockd / lock.BREAK_CLAIM).is_dir())
            return r

        def stat(self, path, *a, **kw):
            r = super().stat(path, *a, **kw)
            self._stall(stall_after == "claim re-check" and path.startswith(f"{layout.lock}.d/{lock.BREAK_CLAIM}/"))
            return r

    b = StalledB(str(tmp_path))
    d = f"{layout.lock}.d"
    raw = b.read_bytes(f"{d}/owner.json")  # B's read: S, judged stale
    assert lock._stale(raw)
    with stack:
        lock._break(b, layout, d, raw, lambda mtime: time.time() - mtime > 60, bound=60, clock=lambda: b_clock[0])
        assert b.stalled
        c_owner = (lockd / "owner.json").read_bytes()
        try_take("D")
        assert holders == ["C"]
        assert (lockd / "owner.json").read_bytes() == c_owner
    assert sorted(os.listdir(lockd.parent)) == []  # C released its lock; nothing of B's left behind


def test_an_old_ownerless_lock_with_a_killed_breakers_claim_is_broken_in_one_run(ssh_node, tbs_lock):
    """review5 diffA #4: an owner-less lock.d and the claim of a breaker killed right after
    claiming it, both hours old. Clearing the claim (moved out of lock.d) set lock.d's mtime,
    by which an owner-less lock is aged, to now: the run that cleared it, and every run for
    the next 60 s, said 'held by another katactl' (exit 6). The claim is now taken over in
    place, lock.d's age stays, and the first run breaks it."""
    state, run = ssh_node
    lockd = state / "lock.d"
    (lockd / ".break/0123456789abcdef").mkdir(parents=True)
    old = time.time() - 3 * 3600
    for p in (lockd / ".break", lockd):
        os.utime(p, (old, old))
    r = run("stage", tbs_lock, "--lock-timeout", "0.5")
    assert r.exit_code == 0, r.stderr
    assert sorted(x for x in os.listdir(state) if x.startswith(("lock.d", ".lock-"))) == []


@pytest.fixture
def both(sshd_lab, katactl_bin, tbs_lock):
    """A private kata root on node4 with release A staged, reached two ways: over real sshd
    (ssh) and as a --host-root tree on this machine (local), as a DaemonSet or an SRE shell
    on the node and an SSH rollout would. Returns (layout, state dir, ssh, local)."""
    from katactl.upgrade.layout import Layout

    tree = sshd_lab.nodes["node4"].root
    layout = Layout(f"/opt/kata-ut-{secrets.token_hex(3)}")

    def ssh(*args, env=None):
        return katactl_bin(["--ssh-config", str(sshd_lab.config), "-N", "node4", "upgrade", *args,
                            "--kata-root", layout.root, "-o", "json"], env=env)

    def local(*args, env=None):
        return katactl_bin(["--host-root", str(tree), "upgrade", *args, "--kata-root", layout.root, "-o", "json"],
                           env=env)

    assert local("stage", tbs_lock).exit_code == 0
    return layout, tree / layout.state.lstrip("/"), ssh, local


def _current(state):
    try:
        return os.readlink(state.parent.parent / "current")
    except FileNotFoundError:
        return None


def test_a_local_and_a_remote_run_exclude_each_other(both, sshd_lab, ssh_open):
    """review 7 #2: a local run took flock(lock) and a remote one lock.d, so an SSH switch
    went ahead while a local katactl held its lock, and a --host-root switch while an SSH
    katactl held its own (a concurrent SSH gc deleted a local stage's staging tree). Both
    now hold lock.d: each waits for the other, times out (exit 6), and changes nothing."""
    from katactl.backends.local import LocalTransport
    from katactl.upgrade.lock import node_lock

    layout, state, ssh, local = both
    with node_lock(LocalTransport(str(sshd_lab.nodes["node4"].root)), layout, timeout=1):
        r = ssh("switch", A, "--lock-timeout", "0.5")
        assert r.exit_code == 6 and "holds the lock on node4" in r.stderr, r.stderr
        assert _current(state) is None
    t = ssh_open("node4")
    try:
        with node_lock(t, layout, timeout=1):
            r = local("switch", A, "--lock-timeout", "0.5")
            assert r.exit_code == 6 and "holds the lock on localhost" in r.stderr, r.stderr
            assert _current(state) is None
    finally:
        t.close()
    assert local("switch", A).exit_code == 0 and ssh("rollback").exit_code == 3  # free again
    assert [n for n in os.listdir(state) if n.startswith(("lock.d", ".lock-"))] == []


@pytest.mark.parametrize("killed", ["local", "ssh"])
def test_a_lock_left_by_a_killed_run_is_broken_by_either_kind(both, killed):
    """A run SIGKILLed while it holds the lock leaves lock.d. A local run's owner held the
    node's flock (now dropped by the kernel): a remote run sees it free (flock -n on the
    node) and a local one holds it itself. A remote client's owner (this machine, this pid
    namespace, a dead pid) is dead to a run of this machine, local or remote."""
    layout, state, ssh, local = both
    runs = {"local": local, "ssh": ssh}
    assert runs[killed]("switch", A, env={"KATACTL_FAULT": "switch:locked"}).exit_code == -9
    owner = json.loads((state / "lock.d/owner.json").read_text())
    assert owner.get("flock") is (True if killed == "local" else None)
    for name in ("ssh", "local") if killed == "local" else ("local", "ssh"):
        r = runs[name]("switch", A, "--lock-timeout", "5")
        assert r.exit_code == 0, (name, r.stderr)
        assert [n for n in os.listdir(state) if n.startswith(("lock.d", ".lock-"))] == []
        runs[killed]("switch", A, env={"KATACTL_FAULT": "switch:locked"})  # and again, for the other kind
    assert _current(state) == f"releases/{A}"


def test_a_lock_of_another_machine_of_the_same_host_name_is_never_broken(both):
    """Two clients that share a host name (CI runners all called "runner") are not one
    machine: an owner of another boot whose pid does not exist here is not provably dead,
    so neither a local nor a remote run breaks its lock (exit 6)."""
    _layout, state, ssh, local = both
    (state / "lock.d").mkdir()
    (state / "lock.d/owner.json").write_text(json.dumps({
        "pid": 2 ** 22 + 7, "host": socket.gethostname(), "user": "x", "token": "t",
        "boot": "00000000-0000-4000-8000-000000000000", "pidns": os.readlink("/proc/self/ns/pid"), "start": "1"}))
    for run in (ssh, local):
        r = run("switch", A, "--lock-timeout", "0.5")
        assert r.exit_code == 6 and f"pid {2 ** 22 + 7} on {socket.gethostname()}" in r.stderr, r.stderr
    assert _current(state) is None and (state / "lock.d/owner.json").exists()


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_temp_lock_directories_of_killed_runs_are_swept_live_ones_kept(both, kind):
    """Review 7 (fixes) #6: a run killed between writing .lock-new-<token>/owner.json and
    renaming it to lock.d (every local run passes there) left it for good. The next run to
    take the lock removes those (and .lock-old-*) whose owner is provably gone, and keeps a
    live waiting client's."""
    import subprocess
    import sys

    _layout, state, ssh, local = both
    runs = {"local": local, "ssh": ssh}
    dead = {"pid": 2 ** 22 + 9, "host": socket.gethostname(), "user": "x", "token": "d",
            "boot": open("/proc/sys/kernel/random/boot_id").read().strip(),
            "pidns": os.readlink("/proc/self/ns/pid"), "start": "1"}
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(f"/proc/{live.pid}/stat", "rb") as f:
            start = f.read().rsplit(b")", 1)[-1].split()[19].decode()
        for name, owner in ((".lock-new-dead", dead), (".lock-old-dead", {**dead, "token": "o"}),
                            (".lock-new-flock", {**dead, "flock": True, "boot": "x"}),
                            (".lock-new-live", {**dead, "pid": live.pid, "start": start})):
            (state / name).mkdir()
            (state / name / "owner.json").write_text(json.dumps(owner))
        r = runs[kind]("switch", A)
        assert r.exit_code == 0, r.stderr
        assert sorted(n for n in os.listdir(state) if n.startswith(".lock-")) == [".lock-new-live"]
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_a_killed_breakers_leftovers_are_swept_a_young_claim_kept(both, kind):
    """Review 8 (fixes) #3: a breaker killed between renaming the stale lock to .lock-stale-<token>
    and removing it, or between making .lock-claim-<token>/<token> and renaming it into the
    lock, left them for good. The next run to take the lock removes the first (proven stale
    already) and a claim older than the bound a claim is taken over by; a young claim's breaker
    may be at work: kept."""
    _layout, state, ssh, local = both
    (state / ".lock-stale-aaaa" / ".break" / "tok").mkdir(parents=True)
    (state / ".lock-stale-aaaa" / "owner.json").write_text(json.dumps({"pid": 2 ** 22 + 9, "token": "s"}))
    for name in ("bbbb", "cccc"):
        (state / f".lock-claim-{name}" / name).mkdir(parents=True)
    day_ago = time.time() - 86400
    os.utime(state / ".lock-claim-bbbb", (day_ago, day_ago))
    r = {"local": local, "ssh": ssh}[kind]("switch", A)
    assert r.exit_code == 0, r.stderr
    assert sorted(n for n in os.listdir(state) if n.startswith(".lock-")) == [".lock-claim-cccc"]


def test_a_remote_run_never_hands_flock_a_lock_file_that_is_not_regular(both, tmp_path):
    """review 8 (upgrade) #6, the remote side: judging a killed local run's lock.d, a remote
    run asks the node's flock(1), which opens its file following symlinks and with O_CREAT
    (and would block on a FIFO). A symlink planted at the lock file is refused (exit 5, the
    file named) and nothing is created where it points."""
    layout, state, ssh, local = both
    assert local("switch", A, env={"KATACTL_FAULT": "switch:locked"}).exit_code == -9
    assert json.loads((state / "lock.d/owner.json").read_text()).get("flock") is True
    target = tmp_path / "created-by-flock"
    (state / "lock").unlink()
    os.symlink(target, state / "lock")
    r = ssh("switch", A, "--lock-timeout", "5")
    assert r.exit_code == 5, r.stderr
    assert f"{layout.lock} on node4 is not a regular file" in r.stderr
    assert not target.exists() and _current(state) is None
