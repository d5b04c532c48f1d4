"""The audit log guard of every mutating command (design.md "Safety": every mutating action is
appended to the audit log): a log that cannot be written refuses the change (exit 5) before
anything is touched, and nothing planted where the log goes (a symlink, a FIFO, a device) can
redirect or stall katactl (review 7 fixesB, findings 3 and 10)."""
from __future__ import annotations

import os
import signal

import pytest

DUMP = "vmcore-20261205084400.elf"


@pytest.fixture
def root(tmp_path):
    """A node root with one crash dump and a staged-release source next to it."""
    r = tmp_path / "root"
    d = r / "var/crash/kata/0123456789abcdef"
    d.mkdir(parents=True)
    (d / DUMP).write_bytes(b"dump")
    (r / "opt/kata").mkdir(parents=True)
    src = tmp_path / "rel"
    (src / "bin").mkdir(parents=True)
    (src / "bin/containerd-shim-kata-v2").write_text("#!/bin/sh\n")
    (src / "VERSION").write_text("3.9.0\n")
    return r


MUTATIONS = {
    "vmcore rm": ["vmcore", "rm", "--dump-path", "/var/crash/kata", DUMP, "--yes"],
    "vmcore collect": ["vmcore", "collect", "--dump-path", "/var/crash/kata", "--to", "{tmp}/out"],
    "vmcore trigger": ["vmcore", "trigger", "0123456789ab"],
    "upgrade stage": ["upgrade", "stage", "{tmp}/rel", "--as", "3.9.0", "--no-verify"],
    "upgrade switch": ["upgrade", "switch", "3.9.0"],
    "upgrade rollback": ["upgrade", "rollback"],
    "upgrade gc": ["upgrade", "gc", "--yes"],
    "lab down": ["lab", "down", "--root", "{tmp}/lab"],
}


@pytest.mark.parametrize("planted", ["symlink", "directory"])
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_mutating_command_refuses_an_unwritable_audit_log_first(cli, root, tmp_path, monkeypatch,
                                                                     name, planted):
    """vmcore and upgrade never asked (the change was made, its record dropped with a warning)."""
    log = tmp_path / "audit.log"
    if planted == "symlink":
        log.symlink_to(tmp_path / "victim")
    else:
        log.mkdir()
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(log))
    args = [a.replace("{tmp}", str(tmp_path)) for a in MUTATIONS[name]]
    r = cli(["--host-root", root, "-o", "json", *args])
    assert r.exit_code == 5, (r.stdout, r.stderr)
    d = r.json()
    assert d["kind"] == "Error" and "audit log" in d["message"] and "nothing was changed" in d["message"], d
    assert (root / "var/crash/kata/0123456789abcdef" / DUMP).exists()
    assert not (root / "opt/kata/releases").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "victim").exists()


def test_only_a_real_change_needs_the_log_and_no_audit_lets_it_through(cli, root, tmp_path, monkeypatch):
    (tmp_path / "audit.log").symlink_to(tmp_path / "victim")
    monkeypatch.setenv("KATACTL_AUDIT_LOG", str(tmp_path / "audit.log"))
    rm = ["--host-root", root, "-o", "json", "vmcore", "rm", "--dump-path", "/var/crash/kata", DUMP]
    assert cli([*rm, "--yes"]).exit_code == 5
    r = cli([*rm, "--dry-run"])
    assert r.exit_code == 0 and r.json()["dryRun"] is True, r.stderr
    r = cli(["--no-audit", *rm, "--yes"])
    assert r.exit_code == 0, r.stderr
    assert not (root / "var/crash/kata/0123456789abcdef" / DUMP).exists()


@pytest.fixture
def alarm():
    """A blocking open would hang the test run: end it as a failure instead."""
    def fail(*_):
        raise AssertionError("the audit log open blocked")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_fifo_as_the_audit_log_is_refused_without_blocking(katactl_bin, root, tmp_path, alarm, caplog):
    """O_NOFOLLOW alone opened a FIFO for writing, which waits for a reader: every mutation
    hung (upgrade gc until killed)."""
    from katactl import audit
    from katactl.errors import Refused

    fifo = tmp_path / "audit.log"
    os.mkfifo(fifo)
    r = katactl_bin(["--host-root", root, "upgrade", "gc", "--yes"], env={"KATACTL_AUDIT_LOG": str(fifo)},
                    timeout=20)
    assert r.exit_code == 5, r.stderr
    assert "not a regular file" in r.stderr
    with pytest.raises(Refused, match="not a regular file"):
        audit.require_writable(str(fifo))
    audit.record("upgrade.gc", "x", path=str(fifo))  # warns, never waits
    assert any("not a regular file" in rec.getMessage() for rec in caplog.records)


def test_a_fifo_with_a_reader_or_a_device_takes_no_record(tmp_path, alarm, caplog):
    """Opened without blocking, then fstat: only a regular file is written to."""
    from katactl import audit
    from katactl.errors import Refused

    fifo = tmp_path / "audit.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(Refused, match="not a regular file"):
            audit.require_writable(str(fifo))
        audit.record("upgrade.gc", "x", path=str(fifo))
        assert os.read(reader, 100) == b""  # nothing was written into it (no writer left: EOF)
    finally:
        os.close(reader)
    with pytest.raises(Refused, match="not a regular file"):
        audit.require_writable(os.devnull)
    fd = audit._open(str(tmp_path / "a.log"))  # a regular file is written to blocking, as before
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)

