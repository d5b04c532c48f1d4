"""vmcore on a terminal: a progress bar with throughput on stderr, and rm asking first.

A real katactl subprocess on a real pseudo-terminal (pty)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from tests.test_vmcore import DUMP_PATH, SID, TS, add_dump, node_tree


def _run_on_pty(argv, answer: bytes | None = None, timeout=60) -> tuple[int, str]:
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="120", TERM="xterm")
    env.pop("NO_COLOR", None)
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    buf = b""
    deadline = time.monotonic() + timeout
    sent = False
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                buf += data
                if answer is not None and not sent and b"[y/N]" in buf:
                    os.write(master, answer)
                    sent = True
            elif p.poll() is not None:
                break
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        os.close(master)
    return p.returncode, buf.decode(errors="replace")


def test_collect_progress_bar_with_throughput_on_tty(tmp_path):
    root = node_tree(tmp_path / "n")
    add_dump(root, size_segments=((0, 12 << 20),), data=os.urandom(8 << 20))
    rc, text = _run_on_pty([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "collect",
                            "--to", str(tmp_path / "o"), "--bwlimit", "8Mi"])
    assert rc == 0, text
    assert f"vmcore-{TS}.elf" in text           # the bar names the dump
    assert "/s" in text and "MB" in text        # transfer speed and byte counts


def test_rm_asks_on_tty(tmp_path):
    root = node_tree(tmp_path / "n")
    add_dump(root)
    dump = os.path.join(root, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf")
    base = [sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "rm", SID[:8]]
    rc, text = _run_on_pty(base, answer=b"n\n")
    assert rc == 5 and "Delete 1 vmcore(s)" in text and "1 never collected" in text
    assert os.path.exists(dump)
    rc, text = _run_on_pty(base, answer=b"y\n")
    assert rc == 0, text
    assert not os.path.exists(dump)
