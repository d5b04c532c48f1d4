"""Run a real katactl subprocess on a real pseudo-terminal (progress bars, prompts,
live views)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import time


def start_on_pty(argv, **env) -> tuple[subprocess.Popen, int]:
    """(process, master fd): argv with stdin/stdout/stderr on a new terminal."""
    master, slave = pty.openpty()
    e = {**os.environ, "COLUMNS": "120", "TERM": "xterm", **env}
    e.pop("NO_COLOR", None)
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=e, close_fds=True)
    os.close(slave)
    return p, master


def read_some(master: int, wait: float) -> bytes | None:
    """What the terminal shows within ``wait`` seconds: b"" if nothing yet, None at its end."""
    if not select.select([master], [], [], wait)[0]:
        return b""
    try:
        return os.read(master, 65536) or None
    except OSError:  # the other side closed (Linux reports EIO)
        return None


def run_on_pty(argv, answer: bytes | None = None, timeout=60, **env) -> tuple[int, str]:
    """Run to the end; type ``answer`` at the first "[y/N]" prompt. (exit code, screen text)."""
    p, master = start_on_pty(argv, **env)
    buf, sent = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = read_some(master, 0.1)
            if data is None:
                break
            if not data and p.poll() is not None:
                break
            buf += data
            if answer is not None and not sent and b"[y/N]" in buf:
                os.write(master, answer)
                sent = True
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        os.close(master)
    return p.returncode, buf.decode(errors="replace")
