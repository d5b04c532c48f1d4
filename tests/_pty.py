"""Run a real katactl subprocess on a real pseudo-terminal (progress bars, prompts)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import time


def run_on_pty(argv, answer: bytes | None = None, timeout=60) -> tuple[int, str]:
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
