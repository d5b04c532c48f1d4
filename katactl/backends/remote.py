"""The remote-node half of a NodeTransport: what katactl does *on* a node it reaches through a
channel that runs an argv there, whatever carries that channel.

Two transports are built on it (design.md: "ssh and the kube pods/exec transport share one remote
channel implementation"):

- backends/ssh.py: the channel is an SSH exec channel (paramiko); files go through SFTP,
  pipelined.
- backends/kubeexec.py: the channel is a Kubernetes ``pods/exec`` WebSocket into a privileged
  node pod that has the host at /host; files go through one long-lived node-side helper process.

What lives here, identical for both: node-path mapping under the node's host root (``remote``),
argv checks (never a shell string: each transport passes argv words literally), running an argv
(``run``: stdout, stderr, exit status, 127 = missing program), streaming a command's or a file's
output in bounded memory (``run_stream``, ``open_stream`` through ``cat``/``tail -c``), the
python3 relay that connects to a unix socket on the node (shim, QMP, Cloud Hypervisor,
Firecracker) and makes the channel a socket-like object, and the argv forms of ``mkdir -p``,
``rm -rf``, ``ln -s`` and ``stat -f``. ``run`` (without input) and streams run the argv under
GUARD, so that a command katactl gave up on (a timeout, Ctrl-C, SIGTERM, a stream closed early,
katactl killed) ends on the node: neither sshd nor the kubelet ends it when the client goes.

A subclass provides the channel (``_exec_channel``) and the way to wait for a finished command
(``_communicate``), plus its file access. A channel is an object with paramiko Channel's
methods that are used here: ``settimeout``, ``sendall``, ``send``, ``recv`` (stdout; b"" at its
end; socket.timeout when nothing came in time), ``shutdown_write``, ``recv_exit_status``,
``recv_stderr``, ``shutdown``, ``close`` (and for the socket relay ``gettimeout``,
``setblocking``, ``fileno`` where it has one).
"""
from __future__ import annotations

import errno
import os
import posixpath
import re
import socket
import stat as st
from typing import Iterator, Sequence

from katactl.backends.base import NodeTransport, RunResult
from katactl.errors import NOT_A_SOCKET, SOCKET_MISSING, SOCKET_REFUSED, TimeoutExpired, UnreachableError, UsageError

STREAM_CHUNK = 1 << 20

STALE_TMP_AGE = 3600     # s: a write's temp file untouched this long is a killed write's
TMP_NAME = re.compile(r"\.katactl-[0-9a-f]{12}\.tmp")  # write_stream_atomic's temp files (ssh, kube)


def stale_tmps(listing, base: str) -> list[str]:
    """The names in a directory listing ([(name, FileStat)], not following links) that are
    temp files killed writes (kill -9, a dropped connection: their cleanup never ran) left
    beside ``base``, the file just written: TMP_NAME regular files of its owner, last written
    over STALE_TMP_AGE before it (a live write touches its file with every write). ``base``
    gives the uid and the node's "now" (its mtime: never the client's clock) from the same
    listing."""
    me = dict(listing).get(base)
    if me is None:
        return []
    return [n for n, s in listing if TMP_NAME.fullmatch(n) and st.S_ISREG(s.mode) and s.uid == me.uid
            and me.mtime - s.mtime > STALE_TMP_AGE]

# The socket relay run on the node for connect_unix: connects, writes one NUL
# byte ("connected"), then copies stdin->socket and socket->stdout until EOF.
# Exit 3: no such socket; 4: refused; 5: other connect error.
RELAY = r"""
import os, select, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
d, b = os.path.split(sys.argv[1])
try:
    os.chdir(d or "/")  # a relative name: paths under a host root may exceed sun_path (108)
    s.connect(b)
except FileNotFoundError:
    sys.stderr.write("no such socket\n"); sys.exit(3)
except ConnectionRefusedError:
    sys.stderr.write("connection refused\n"); sys.exit(4)
except OSError as e:
    sys.stderr.write("%s\n" % (e.strerror or e)); sys.exit(5)
def put(fd, b):
    while b:
        b = b[os.write(fd, b):]
put(1, b"\0")
rd = [0, s]
while rd:
    r = select.select(rd, [], [])[0]
    if 0 in r:
        b = os.read(0, 65536)
        if b:
            s.sendall(b)
        else:
            rd.remove(0)
            try: s.shutdown(socket.SHUT_WR)
            except OSError: pass
    if s in r:
        b = s.recv(65536)
        if not b:
            break
        put(1, b)
""".strip()

# Runs a command (the positional arguments, never parsed as shell text) with stdin from
# /dev/null, and SIGTERMs it when our stdin reaches EOF: when katactl closes the channel
# before the command ended (a timeout, Ctrl-C, a stream closed early) or its connection
# drops, even by kill -9. Neither end of a channel ends a command whose client went away:
# - sshd leaves a non-pty command running when its channel closes ("delay detach of
#   session", openssh session.c session_close_by_channel), and refuses the RFC 4254
#   "signal" request for root logins ("session signalling requires privilege separation",
#   session.c session_signal_req); after a normal end it closes our stdin itself
#   (session_exit_message), which ends the watcher;
# - the kubelet's runtime waits for an exec with no tie to its client's stream, and only
#   closes the exec's stdin when that stream ends (containerd pkg/cri/server/
#   container_execsync.go execInternal: Attach with StdinOnce and CloseStdin;
#   kubernetes/kubernetes#89031, opencontainers/runc#3359); after a normal end the
#   watcher's stdin closes with the exec stream, which katactl closes after the status.
# The watcher's output goes to /dev/null: it must not hold the channel's stdout/stderr
# open. The command runs in its own process group (setsid, where the node has it:
# util-linux, busybox) and the whole group is signalled: a command's own children (a
# resumed dump's compressor feeding tail) must end with it. A non-interactive sh has no
# job control, so the background child is no group leader and setsid execs the command
# without forking: $! is the command itself, its pid its group's id.
GUARD = (
    'exec 3<&0 </dev/null\n'
    'if command -v setsid >/dev/null 2>&1; then setsid "$@" 3<&- & else "$@" 3<&- & fi\n'
    'p=$!\n'
    '{ cat <&3; kill -TERM -"$p" || kill -TERM "$p"; } >/dev/null 2>&1 &\n'
    'w=$!\n'
    'exec 3<&-\n'
    'wait "$p"\n'
    'rc=$?\n'
    'kill "$w" 2>/dev/null\n'
    'exit "$rc"\n'
)


class RemoteTransport(NodeTransport):
    """NodeTransport logic shared by every transport that runs argv on a remote node."""

    is_remote = True
    node: str
    host_root: str = ""
    timeout: float = 30.0
    _swept_dirs: set[str]  # directories this transport's writes swept (_sweep_due); set in __init__

    # -- what a subclass provides -------------------------------------------------------
    def _exec_channel(self, argv: tuple[str, ...], timeout: float | None = None):
        """Start argv on the node; the channel (see the module docstring)."""
        raise NotImplementedError

    def _communicate(self, chan, argv: tuple[str, ...], input: bytes | None,
                     timeout: float) -> tuple[bytes, bytes, int]:
        """Send input (then EOF), collect stdout and stderr to the end, and the exit
        status, within timeout (TimeoutExpired)."""
        raise NotImplementedError

    def _guarded_channel(self, argv: tuple[str, ...], timeout: float):
        """argv under GUARD (argv its positional words): the channel's stdin stays open
        (hold_stdin: _communicate must not half-close it), so that the command is ended
        when the channel closes before it finished."""
        chan = self._exec_channel(("sh", "-c", GUARD, "sh", *argv), timeout)
        chan.hold_stdin = True
        return chan

    def _run_channel(self, argv: tuple[str, ...], timeout: float, input: bytes | None):
        """The channel run() waits on: argv under GUARD; a command given input reads it on
        stdin, so it runs unguarded (no caller gives input to a long command)."""
        return self._exec_channel(argv, timeout) if input is not None else self._guarded_channel(argv, timeout)

    def _mkdir_one(self, path: str, remote: str, mode: int) -> None:
        """mkdir(2) of one directory (FileExistsError when it exists)."""
        raise NotImplementedError

    def _unlink(self, path: str, remote: str) -> None:
        """unlink(2) of a file or symlink."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    def _sweep_due(self, d: str) -> bool:
        """True at this transport's first write into directory d only: the stale-temp sweep
        (stale_tmps) lists the whole directory, a stat per entry, so a sweep per write made N
        writes into a large directory cost N listings (20 into 20,000 entries: 4.8 s against
        30 ms). A temp that goes stale later is the next run's to remove."""
        if d in self._swept_dirs:
            return False
        self._swept_dirs.add(d)  # before the listing: one that fails is not retried per write
        return True

    def remote(self, path: str) -> str:
        """The path on the remote machine for a node path (host_root applied there)."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise UsageError(f"internal: node path must be absolute: {path!r}")
        if "\0" in path:
            raise UsageError("path contains a NUL byte")
        p = posixpath.normpath(path)
        if p.startswith("//"):
            p = "/" + p.lstrip("/")
        return self.host_root + p if self.host_root else p

    # -- files through argv ------------------------------------------------------------
    def open_stream(self, path: str, offset: int = 0, chunk_size: int = STREAM_CHUNK) -> Iterator[bytes]:
        """Stream a file with ``cat`` (or ``tail -c +N``) over an exec channel.

        Memory is bounded by the channel's flow control (the SSH channel window; the
        WebSocket's TCP window): the node only sends more as we consume.
        """
        s = self.stat(path)  # fail now (FileNotFoundError) rather than mid-stream
        if s.is_dir:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        r = self.remote(path)
        argv = ("cat", "--", r) if not offset else ("tail", "-c", f"+{int(offset) + 1}", "--", r)
        return self._stream(argv, chunk_size, None, path, "reading failed on the node")

    def run_stream(self, argv: Sequence[str], chunk_size: int = STREAM_CHUNK,
                   timeout: float | None = None) -> Iterator[bytes]:
        """Run argv on the node and stream its stdout over an exec channel (memory bounded
        by the channel's flow control, as open_stream). Closing the iterator early closes the
        channel: GUARD SIGTERMs the node's process group. Exit 127 raises FileNotFoundError,
        any other non-zero exit OSError(EIO) with the end of its stderr, both once stdout
        has ended. timeout: the longest wait for the next bytes (default: the transport's)."""
        argv = _check_argv(argv)
        return self._stream(argv, chunk_size, timeout, argv[0], f"{argv[0]} failed on {self.node}")

    def scan_dir(self, path: str, follow_symlinks: bool = True) -> list:
        """One directory through the batched scan_dirs the channel implements."""
        r = self.scan_dirs([path], follow_symlinks)[path]
        if isinstance(r, OSError):
            raise r
        return r

    def listdir(self, path: str) -> list[str]:
        return [n for n, _ in self.scan_dir(path, follow_symlinks=False)]

    def _stream_channel(self, argv, timeout: float):
        """An exec channel for a stream: argv under GUARD, stdout read."""
        return self._guarded_channel(argv, timeout)

    def _stream(self, argv, chunk_size: int, timeout: float | None, path: str, what: str) -> Iterator[bytes]:
        timeout = self.timeout if timeout is None else timeout
        chan = self._stream_channel(argv, timeout)
        chan.settimeout(timeout)

        def chunks():
            try:
                while True:
                    try:
                        b = chan.recv(chunk_size)
                    except socket.timeout:
                        raise TimeoutExpired(f"{path}: no data for {timeout:g}s") from None
                    if not b:
                        break
                    yield b
                rc = chan.recv_exit_status()
                if rc != 0:
                    err = chan.recv_stderr(4096).decode("utf-8", "replace").strip()
                    if rc == 127:
                        raise FileNotFoundError(errno.ENOENT, f"{argv[0]}: command not found on {self.node}",
                                                argv[0])
                    raise OSError(errno.EIO, f"{what}: {err or f'exit {rc}'}", path)
            finally:
                chan.close()

        return chunks()

    def statvfs_free(self, path: str) -> int:
        r = self.run(["stat", "-f", "-c", "%a %S", "--", self.remote(path)], raw=True)
        if r.returncode != 0:
            raise _run_oserror(r, path)
        avail, bsize = r.stdout.split()
        return int(avail) * int(bsize)

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = True) -> None:
        r = self.remote(path)
        if parents:
            res = self.run(["mkdir", "-p", "-m", format(mode, "o"), "--", r], raw=True)
            if res.returncode != 0:
                raise _run_oserror(res, path)
        else:
            if self.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            self._mkdir_one(path, r, mode)

    def remove(self, path: str, recursive: bool = False) -> None:
        r = self.remote(path)
        s = self.stat(path, follow_symlinks=False)
        if recursive and s.is_dir:
            res = self.run(["rm", "-rf", "--", r], raw=True)
            if res.returncode != 0:
                raise _run_oserror(res, path)
            return
        if s.is_dir:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        self._unlink(path, r)

    def symlink(self, target: str, link: str) -> None:
        # argv ln: OpenSSH's sftp-server swaps SSH_FXP_SYMLINK's arguments.
        res = self.run(["ln", "-s", "--", target, self.remote(link)], raw=True)
        if res.returncode != 0:
            raise _run_oserror(res, link)

    # -- processes and sockets -----------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float | None = None,
            input: bytes | None = None, raw: bool = False) -> RunResult:
        """Run argv on the node (argv words passed literally by the channel)."""
        argv = _check_argv(argv)
        timeout = self.timeout if timeout is None else timeout
        chan = self._run_channel(argv, timeout, input)
        try:
            out, err, rc = self._communicate(chan, argv, input, timeout)
        finally:
            chan.close()
        res = RunResult(argv, rc, out, err)
        if rc == 127 and not raw:
            # like subprocess locally: a missing program is FileNotFoundError
            raise FileNotFoundError(errno.ENOENT, f"{argv[0]}: command not found on {self.node}", argv[0])
        return res

    def connect_unix(self, path: str, timeout: float):
        """A socket-like stream to a unix socket on the node, through a python3 relay."""
        r = self.remote(path)
        # One file round trip spares a relay process for the common "stale" case.
        try:
            mode = self.stat(path, follow_symlinks=True).mode
        except (FileNotFoundError, NotADirectoryError):
            raise UnreachableError(f"{path}: socket does not exist", reason=SOCKET_MISSING) from None
        except PermissionError:
            mode = st.S_IFSOCK  # let the relay (maybe another user's view) decide
        if not st.S_ISSOCK(mode):
            raise UnreachableError(f"{path}: not a unix socket", reason=NOT_A_SOCKET)
        try:
            # -I: ignore PYTHON* variables and user site; -S: no site import (faster start)
            chan = self._exec_channel(("python3", "-I", "-S", "-c", RELAY, r), timeout)
        except socket.timeout:
            raise TimeoutExpired(f"{path}: connect timed out after {timeout:g}s") from None
        try:
            chan.settimeout(timeout)
            first = chan.recv(1)
            if first == b"\0":
                return ChannelSocket(chan, path)
            rc = chan.recv_exit_status()
            msg = chan.recv_stderr(4096).decode("utf-8", "replace").strip()
        except socket.timeout:
            chan.close()
            raise TimeoutExpired(f"{path}: connect timed out after {timeout:g}s") from None
        except BaseException:
            chan.close()  # a failed connect (a cut stream, Ctrl-C) must not keep its channel open
            raise
        chan.close()
        if rc == 3:
            raise UnreachableError(f"{path}: socket does not exist", reason=SOCKET_MISSING)
        if rc == 4:
            raise UnreachableError(f"{path}: nobody is listening on the socket", reason=SOCKET_REFUSED)
        if rc == 127:
            raise UnreachableError(f"reaching {path} needs python3 on the node "
                                   "(katactl relays unix sockets through it)")
        raise UnreachableError(f"{path}: {msg or f'relay exited {rc}'}")


class ChannelSocket:
    """A socket-like object (sendall/recv/settimeout/close) over an exec channel."""

    def __init__(self, chan, path: str):
        self._chan = chan
        self.path = path

    def sendall(self, data: bytes) -> None:
        try:
            self._chan.sendall(data)
        except socket.timeout:
            raise
        except OSError as e:
            raise BrokenPipeError(f"{self.path}: relay closed ({e})") from None

    def send(self, data: bytes) -> int:
        return self._chan.send(data)

    def recv(self, n: int) -> bytes:
        return self._chan.recv(n)

    def settimeout(self, t: float | None) -> None:
        self._chan.settimeout(t)

    def gettimeout(self):
        return self._chan.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self._chan.setblocking(flag)

    def fileno(self) -> int:
        return self._chan.fileno()

    def shutdown(self, how: int) -> None:
        self._chan.shutdown(how)

    def close(self) -> None:
        self._chan.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    argv = tuple(str(a) for a in argv)
    if not argv:
        raise UsageError("internal: empty argv")
    if any("\0" in a for a in argv):
        raise UsageError("argument contains a NUL byte")
    return argv


def _check_root(root: str) -> str:
    if not root.startswith("/") or "\0" in root:
        raise UsageError(f"host root must be an absolute path on the node: {root!r}")
    root = posixpath.normpath(root)
    return "" if root == "/" else root


def _run_oserror(r: RunResult, path: str) -> OSError:
    text = r.stderr.decode("utf-8", "replace").strip()
    low = text.lower()
    if "no such file" in low:
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if "permission denied" in low or "operation not permitted" in low:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    if "file exists" in low:
        return FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    if "not a directory" in low:
        return NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return OSError(errno.EIO, text.splitlines()[-1] if text else f"{r.argv[0]} exited {r.returncode}", path)


__all__ = ["RemoteTransport", "ChannelSocket", "GUARD", "RELAY", "STREAM_CHUNK"]
