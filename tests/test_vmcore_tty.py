"""vmcore on a terminal: a progress bar with throughput on stderr, and rm asking first.

A real katactl subprocess on a real pseudo-terminal (pty)."""
from __future__ import annotations

import os
import re
import sys

from tests._pty import run_on_pty
from tests.test_vmcore import DUMP_PATH, SID, TS, add_dump, node_tree


def test_collect_progress_bar_with_throughput_on_tty(tmp_path):
    root = node_tree(tmp_path / "n")
    add_dump(root, size_segments=((0, 12 << 20),), data=os.urandom(8 << 20))
    rc, text = run_on_pty([sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "collect",
                            "--to", str(tmp_path / "o"), "--bwlimit", "8Mi"])
    assert rc == 0, text
    assert f"vmcore-{TS}.elf" in text           # the bar names the dump
    assert re.search(r"\d+(\.\d)?Mi/12(\.\d)?Mi  \d+(\.\d)?Mi/s", text), text  # done/total, rate: Mi units


def test_rm_asks_on_tty(tmp_path):
    root = node_tree(tmp_path / "n")
    add_dump(root)
    dump = os.path.join(root, DUMP_PATH.lstrip("/"), SID, f"vmcore-{TS}.elf")
    base = [sys.executable, "-m", "katactl", "--host-root", root, "vmcore", "rm", SID[:8]]
    rc, text = run_on_pty(base, answer=b"n\n")
    assert rc == 5 and "Delete 1 vmcore(s)" in text and "1 never collected" in text
    assert "not confirmed: nothing deleted" in text
    assert os.path.exists(dump)
    rc, text = run_on_pty(base, answer=b"y\n")
    assert rc == 0, text
    assert not os.path.exists(dump)
