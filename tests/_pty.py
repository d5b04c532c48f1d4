"""Run a real katactl subprocess on a real pseudo-terminal (progress bars, prompts,
live views)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import time


def start_on_pty(argv, *, stdout=None, **env) -> tuple[subprocess.Popen, int]:
    """(process, master fd): argv with stdin/stdout/stderr on a new terminal
    (``stdout``: where stdout goes instead, e.g. subprocess.PIPE)."""
    master, slave = pty.openpty()
    e = {**os.environ, "COLUMNS": "120", "TERM": "xterm", **env}
    e.pop("NO_COLOR", None)
    p = subprocess.Popen(argv, stdin=slave, stdout=slave if stdout is None else stdout, stderr=slave, env=e,
                         close_fds=True)
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


def wait_reading(p: subprocess.Popen, master: int, timeout: float) -> tuple[int | None, bytes]:
    """(exit code, or None if still running after ``timeout`` s; what the terminal showed
    meanwhile). The terminal is read while waiting: a child writing more than the pty's buffer
    (a live view's last frame) blocks until it is read, and a bare wait() would hang with it."""
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = read_some(master, 0.1)
        if data:
            out += data
        elif p.poll() is not None:
            break
    rc = p.poll()
    while rc is not None and (data := read_some(master, 0.2)):  # what is left after the exit
        out += data
    return rc, out


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


def run_stderr_on_pty(argv, timeout=60, **env) -> tuple[int, str, str]:
    """Run to the end with stdin/stderr on a terminal and stdout piped, as in
    ``katactl ... -o json | jq``: (exit code, stdout, what the terminal showed)."""
    p, master = start_on_pty(argv, stdout=subprocess.PIPE, **env)
    out_fd = p.stdout.fileno()
    bufs = {master: b"", out_fd: b""}
    open_fds = [master, out_fd]
    deadline = time.monotonic() + timeout
    try:
        while open_fds and time.monotonic() < deadline:
            for fd in select.select(open_fds, [], [], 0.1)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the terminal's other side closed (Linux reports EIO)
                    data = b""
                if data:
                    bufs[fd] += data
                else:
                    open_fds.remove(fd)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        os.close(master)
    return p.returncode, bufs[out_fd].decode(errors="replace"), bufs[master].decode(errors="replace")
