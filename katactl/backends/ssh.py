"""The SSH NodeTransport: a remote node's files, processes and unix sockets over paramiko.

This module is the SSH half: keys, ssh_config, jump hosts, host-key trust, connection pooling,
exec channels and pipelined SFTP. What katactl runs on the node through a channel (argv, file
streams, the unix-socket relay, mkdir -p / rm -rf / ln -s) is katactl.backends.remote, shared
with the Kubernetes pods/exec transport (kubeexec.py).

Security model
  * Host keys are verified strictly (katactl.backends.knownhosts): the user's
    known_hosts files (UserKnownHostsFile, default ~/.ssh/known_hosts), the
    global ones (/etc/ssh/ssh_known_hosts) and --known-hosts; hashed entries,
    [host]:port keys, @cert-authority (host certificates) and @revoked. An
    unknown key is refused unless --ssh-accept-new; a changed or revoked key is
    always refused (HostKeyError, exit 7, naming the known_hosts file:line).
  * Commands are argv lists. Each element is quoted with shlex.quote and the
    quoted words joined: the remote login shell (which sshd always uses) sees
    only literal words, never a string built from input. The node's login shell
    must be POSIX (sh, dash, bash, zsh, ksh). run() and streams run the argv
    under remote.py's GUARD (a fixed sh script; the words are its positional parameters),
    which ends the command when the channel closes before it finished.
  * File access uses SFTP (no shell at all).

Batched file access (read_many, stat_many, scan_dirs, write_stream_atomic)
pipelines SFTP requests (_Pipe): many requests per SSH packet, replies read in
bulk, so a call costs a few round trips whatever the number of files. fsync
uses OpenSSH's ``fsync@openssh.com`` extension (``sync FILE`` when missing);
rename uses ``posix-rename@openssh.com`` and then fsyncs the directory.

Requirements on the node: sshd with the sftp subsystem, coreutils (cat, tail,
mkdir, rm, stat, ln; sync only without fsync@openssh.com) and, for
connect_unix (shim/QMP/CLH/FC sockets), ``python3`` — a fixed relay program
(RELAY below) is run with the quoted socket path as its only argument.

Host root on a remote node: node paths are mapped on the node itself, as
``<host_root><path>``. The root is --host-root/KATACTL_HOST_ROOT when given
(the same for every node), else the node's own ``SetEnv
KATACTL_HOST_ROOT=/dir`` in its ~/.ssh/config Host block (per node: a
privileged pod with the host at /host, a lab tree; see sshconfig.py), else /.

Connections are pooled per process and keyed by (user, host, port, proxy,
identity, known_hosts): one command reuses one connection for all its calls,
and nodes behind the same jump host share one connection to it. Idle
connections beyond MAX_IDLE are closed (least recently used first). Exec
channels per connection are capped below sshd's default MaxSessions (10);
paramiko's SFTP client is used by one thread at a time per connection.

paramiko is imported lazily (it costs ~120 ms): only when a remote node is
actually contacted.
"""
from __future__ import annotations

import atexit
import logging
import errno
import itertools
import os
import posixpath
import shlex
import socket
import stat as st
import threading
import time
import weakref
from typing import TYPE_CHECKING, Sequence

from katactl.backends import knownhosts, sshconfig
from katactl.backends.base import FileStat
from katactl.backends.remote import RELAY, ChannelSocket, RemoteTransport, _check_root, _run_oserror, stale_tmps
from katactl.errors import (AuthError, HostKeyError, KatactlError, OperationFailed, TimeoutExpired, UnreachableError,
                            UsageError)

if TYPE_CHECKING:
    from paramiko import SFTPClient

WINDOW = 16 << 20          # channel window: bounds memory per streaming channel
MAX_PACKET = 256 << 10     # large packets: far fewer per-packet Python round trips
MAX_IDLE = 32             # idle pooled connections kept for reuse
MAX_SESSIONS = 8          # exec channels at once per connection (sshd MaxSessions 10: SFTP + margin)


# -- connection pool ------------------------------------------------------------
class _Conn:
    """One authenticated SSH connection (paramiko Transport) and its SFTP session."""

    def __init__(self, transport, name: str, via: "_Conn | None" = None):
        self.t = transport
        self.name = name
        self.via = via
        self.lock = threading.Lock()
        # paramiko's SFTPClient is not safe for concurrent requests (two threads
        # reading responses off one channel hang): one SFTP call at a time.
        self.sftp_lock = threading.RLock()
        self._sftp: SFTPClient | None = None
        self._pipe: _Pipe | None = None
        #: a session dropped because a reply did not come -> that wait (seconds): the calls
        #: queued on it (sftp_lock) then say so too, not "Socket is closed" (lost())
        self._timed_out: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.trust = ""
        # sshd's MaxSessions defaults to 10 per connection (SFTP takes one):
        # more concurrent exec channels would be refused, so callers queue.
        self.sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        self.refs = 0
        self.key: tuple = ()
        self.last_used = time.monotonic()
        self.closed = False

    def _session(self, timeout: float | None = None) -> "tuple[SFTPClient, _Pipe]":
        """This connection's SFTP session and its pipe, opened when there is none or its
        channel closed: both are read under the lock that reset_sftp() takes.

        timeout bounds every wait for a reply on the session (--request-timeout): the
        channel's recv raises socket.timeout, which the callers map to TimeoutExpired.
        Keepalives cannot do it (paramiko's ask for no reply), and without it a node
        that stops answering (a hung kernel, a black-holed link) hangs the call forever."""
        with self.lock:
            if self._sftp is None or self._pipe is None or self._sftp.sock.closed:
                sftp = _open_sftp(self.t, timeout)
                self._sftp, self._pipe = sftp, _Pipe(sftp)
            self._sftp.sock.settimeout(timeout)
            return self._sftp, self._pipe

    def sftp(self, timeout: float | None = None) -> "SFTPClient":
        return self._session(timeout)[0]

    def reset_sftp(self, sftp: "SFTPClient | None" = None, timed_out: float | None = None) -> None:
        """Drop the SFTP session (after a failure mid-exchange); the next call opens a new one.

        sftp: the session the failure was on (a newer one, opened since, stays);
        timed_out: the failure was no reply within that many seconds."""
        with self.lock:
            if sftp is None or sftp is self._sftp:
                sftp, self._sftp, self._pipe = self._sftp, None, None
            if sftp is not None and timed_out is not None:
                self._timed_out[sftp] = timed_out
        if sftp is not None:
            try:
                sftp.close()
            except Exception:  # noqa: BLE001
                pass

    def pipe(self, timeout: float | None = None) -> "_Pipe":
        """The pipelined-request layer of this connection's SFTP session
        (use it under sftp_lock)."""
        return self._session(timeout)[1]

    def lost(self, sftp: "SFTPClient", path: str) -> KatactlError:
        """The error of a call whose SFTP session was closed under it, while it waited for
        sftp_lock: the node's, never the file's. A session dropped because an earlier
        call got no reply is that same timeout (exit 6): the node stopped answering."""
        with self.lock:
            waited = self._timed_out.get(sftp)
        if waited is not None:
            return TimeoutExpired(f"no SFTP reply about {path}: the node gave an earlier request "
                                  f"none within {waited:g}s")
        if not self.t.is_active():
            return UnreachableError(f"SSH connection lost (SFTP on {path})")
        return UnreachableError(f"SFTP session closed (on {path})")

    def alive(self) -> bool:
        return self.t.is_active()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._sftp is not None:
                self._sftp.close()
        except Exception:  # noqa: BLE001
            pass
        self.t.close()
        if self.via is not None:
            POOL.release(self.via)  # the jump connection this one was holding


class _Pool:
    """Connections by key. In-use connections are counted; idle ones are kept
    (so the next call to the same node reuses them) up to MAX_IDLE, least
    recently used closed first, so a 1000-node fan-out never holds 1000."""

    def __init__(self):
        self._conns: dict[tuple, _Conn] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: tuple, factory) -> tuple[_Conn, bool]:
        """(connection, created). The caller owns one reference: release() it."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                c = self._conns.get(key)
                if c is not None and c.alive():
                    c.refs += 1
                    return c, False
            c = factory()
            c.key = key
            with self._guard:
                old = self._conns.get(key)
                self._conns[key] = c
                c.refs = 1
            if old is not None:
                old.close()
            return c, True

    def release(self, c: _Conn) -> None:
        victims = []
        with self._guard:
            c.refs = max(0, c.refs - 1)
            c.last_used = time.monotonic()
            if self._conns.get(c.key) is not c and c.refs == 0:
                victims.append(c)  # replaced while in use
            idle = sorted((x for x in self._conns.values() if x.refs == 0), key=lambda x: x.last_used)
            for x in idle[:max(0, len(idle) - MAX_IDLE)]:
                del self._conns[x.key]
                victims.append(x)
        for x in victims:
            x.close()

    def close_all(self) -> None:
        with self._guard:
            conns = list(self._conns.values())
            self._conns.clear()
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass


def _open_sftp(t, timeout: float | None) -> "SFTPClient":
    """paramiko's SFTPClient.from_transport, with every wait bounded by timeout (its
    subsystem request and version exchange wait forever on a node that stopped answering)."""
    import paramiko

    chan = t.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=timeout)
    try:
        chan.settimeout(timeout)
        _chan_request(chan, "subsystem", b"sftp", timeout=timeout)
        return paramiko.SFTPClient(chan)
    except BaseException:
        chan.close()
        raise


def _chan_request(chan, kind: str, arg: bytes, *, timeout: float | None = None) -> None:
    """An RFC 4254 channel request with one string argument (subsystem, exec), waiting
    for its reply at most timeout seconds (socket.timeout): paramiko's invoke_subsystem
    and exec_command wait without a bound, and take only text."""
    import paramiko
    from paramiko.common import cMSG_CHANNEL_REQUEST
    from paramiko.message import Message

    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string(kind)
    m.add_boolean(True)
    m.add_string(arg)
    chan._event_pending()
    chan.transport._send_user_message(m)
    if not chan.event.wait(timeout):
        raise socket.timeout(f"no reply to the {kind} request within {timeout:g}s")
    if not chan.event_ready:
        raise chan.transport.get_exception() or paramiko.SSHException("Channel closed.")


# paramiko logs transport-thread failures at ERROR; without a handler Python's
# last-resort handler would print tracebacks on stderr. We report errors ourselves.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

POOL = _Pool()
atexit.register(POOL.close_all)


def close_pool() -> None:
    """Close every pooled SSH connection (tests; long-running callers)."""
    POOL.close_all()


# -- connecting -------------------------------------------------------------------
_IMPORT_LOCK = threading.Lock()


def _import_paramiko(need_invoke: bool):
    """Import paramiko without ``invoke`` unless the SSH config has ``Match exec``.

    paramiko.config imports invoke (asyncio, unittest.mock, yaml: ~125 ms, a
    third of paramiko's import) only to run ``Match exec`` commands.
    """
    import sys

    with _IMPORT_LOCK:
        if "paramiko" in sys.modules:
            return sys.modules["paramiko"]
        block = not need_invoke and "invoke" not in sys.modules
        if block:
            # makes "import invoke" raise ImportError (typeshed's sys.modules does not admit None)
            sys.modules["invoke"] = None  # type: ignore[assignment]
        try:
            import paramiko
        finally:
            if block and sys.modules.get("invoke", 0) is None:
                del sys.modules["invoke"]
        return paramiko


class _Options:
    def __init__(self, settings):
        self.cfg_path = os.path.expanduser(settings.ssh_config) if settings.ssh_config else None
        # like `ssh -F FILE`: an explicitly chosen config replaces the system-wide one
        sources = getattr(settings, "sources", {}) or {}
        self.system_config = sources.get("ssh_config", "default") == "default"
        self.user = settings.ssh_user
        self.identity = settings.identity
        self.jump_host = settings.jump_host
        self.accept_new = bool(settings.ssh_accept_new)
        self.extra_known_hosts = settings.known_hosts
        self.timeout = float(settings.request_timeout or 30.0)
        # a --request-timeout the user gave (flag, env, config file) beats ssh_config's
        # ConnectTimeout, as `ssh -o ConnectTimeout=` beats the file; the default does not
        self.timeout_given = sources.get("request_timeout", "default") != "default"


_TCLASS = None


def _transport_class():
    global _TCLASS
    if _TCLASS is not None:
        return _TCLASS
    import paramiko

    class _T(paramiko.Transport):
        """A Transport whose host-key algorithm order we set per host (like ssh does).

        A subclass, not Transport.get_security_options(): its key_types cannot put a
        certificate type first (paramiko appends the -cert-v01 variants after every plain
        type, and doubles the suffix of a cert name given to it), which hosts known only
        through an @cert-authority line need."""

        host_key_order: tuple[str, ...] = ()
        # AES-GCM first: one AEAD pass in OpenSSL instead of CTR + a separate
        # HMAC; measured 3-4x the streaming throughput of aes128-ctr here.
        # No CBC, 3DES, SHA-1 or MD5.
        _preferred_ciphers = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                              "aes128-ctr", "aes192-ctr", "aes256-ctr")
        _preferred_macs = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
                           "hmac-sha2-256", "hmac-sha2-512")

        @property
        def preferred_keys(self):
            base = list(super().preferred_keys)
            first = [k for k in self.host_key_order if k in base]
            return tuple(first + [k for k in base if k not in first])

    _TCLASS = _T
    return _T


class _SockReader:
    """The TCP socket as paramiko's Packetizer reads it: one recv(2) of up to READ_SIZE
    bytes, handed out in the pieces the Packetizer asks for (a 16-byte header, then the
    rest of the packet), instead of two or more recv(2) calls per SSH packet. Everything
    else (send, settimeout, close) is the socket's own. Only for a real socket: paramiko's
    ProxyCommand.recv(n) waits until it has n bytes."""

    READ_SIZE = 256 << 10

    def __init__(self, sock):
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            out = buf[pos:pos + n]
            self._pos = pos + len(out)
            return out
        data = self._sock.recv(max(n, self.READ_SIZE))  # timeouts and errors as the socket's
        if len(data) <= n:
            return data
        self._buf, self._pos = data, n
        return data[:n]

    def send(self, data) -> int:
        return self._sock.send(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _ChunkPipe:
    """A drop-in for paramiko's BufferedPipe (a channel's in_buffer) that keeps received
    packets as they came, in a deque. BufferedPipe appends every packet to an array and
    answers recv(n) with a slice, a copy to bytes and a ``del`` that moves the rest of the
    buffer (up to the 16 MiB window) down: 3-4 copies of every byte; here a packet is kept
    as is and recv(n) joins whole packets (one copy; none when one packet fits). Same
    contract: feed/read/read_ready/empty/close/set_event/len, read(n, timeout) blocks
    until data or close and raises PipeTimeout after timeout seconds."""

    def __init__(self):
        from collections import deque

        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._parts: deque[bytes] = deque()
        self._len = 0
        self._closed = False
        self._event: threading.Event | None = None

    def set_event(self, event: threading.Event) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._len > 0:
                event.set()
            else:
                event.clear()

    def feed(self, data) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        with self._lock:
            if self._event is not None:
                self._event.set()
            if data:
                self._parts.append(bytes(data))
                self._len += len(data)
            self._cv.notify_all()

    def read_ready(self) -> bool:
        with self._lock:
            return self._len > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        from paramiko.buffered_pipe import PipeTimeout

        with self._lock:
            if self._len == 0:
                if self._closed:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                while self._len == 0 and not self._closed:
                    then = time.time()
                    self._cv.wait(timeout)
                    if timeout is not None:
                        timeout -= time.time() - then
                        if timeout <= 0.0:
                            raise PipeTimeout()
                if self._len == 0:
                    return b""
            parts, out, got = self._parts, [], 0
            while parts and got + len(parts[0]) <= nbytes:
                b = parts.popleft()
                out.append(b)
                got += len(b)
            if not out:  # the first packet is larger than nbytes: split it
                b = parts[0]
                out.append(b[:nbytes])
                parts[0] = b[nbytes:]
                got = nbytes
            self._len -= got
            if self._len == 0 and self._event is not None and not self._closed:
                self._event.clear()
        return out[0] if len(out) == 1 else b"".join(out)

    def empty(self) -> bytes:
        with self._lock:
            out = b"".join(self._parts)
            self._parts.clear()
            self._len = 0
            if self._event is not None and not self._closed:
                self._event.clear()
            return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cv.notify_all()
            if self._event is not None:
                self._event.set()

    def __len__(self) -> int:
        return self._len


def _chunk_pipe(chan) -> None:
    """Give a new channel (no data can have come yet) a _ChunkPipe for its stdout, when
    it has paramiko's BufferedPipe there (another paramiko keeps its own)."""
    from paramiko.buffered_pipe import BufferedPipe

    with chan.lock:  # paramiko closes in_buffer (EOF, close, lost connection) under it
        if type(getattr(chan, "in_buffer", None)) is BufferedPipe:
            pipe = _ChunkPipe()
            if chan.closed or chan.eof_received:
                pipe.close()
            chan.in_buffer = pipe


_PCLASS = None


def _packetizer_class():
    """paramiko's Packetizer (Transport's ``packetizer_class``, paramiko >= 3.4) reading a
    TCP socket through a _SockReader, and rekeying when OpenSSH does."""
    global _PCLASS
    if _PCLASS is None:
        import paramiko

        class _P(paramiko.Packetizer):
            # OpenSSH's limits (RFC 4344 3.2: 2^32 blocks of a 16-byte cipher, 64 GiB; 2^31
            # packets), not paramiko's 512 MiB; sshd also rekeys by its own RekeyLimit. A
            # rekey we start that meets the server's CHANNEL_CLOSE blocks paramiko's transport
            # thread for 30 s and fails the stream (paramiko issue #822): a 1 GiB stream ends
            # right after paramiko's second rekey starts.
            REKEY_BYTES = 1 << 36
            REKEY_PACKETS = 1 << 31

            def __init__(self, sock):
                super().__init__(_SockReader(sock) if isinstance(sock, socket.socket) else sock)

        _PCLASS = _P
    return _PCLASS


_ALGS = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
}


def _open_sock(target: sshconfig.Target, timeout: float, via: _Conn | None, name: str):
    """The byte stream to the target: TCP, a ProxyCommand, or a direct-tcpip channel."""
    import paramiko

    where = _hostport(target.hostname, target.port)
    if via is not None:
        try:
            return via.t.open_channel("direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
                                      timeout=timeout)
        except paramiko.ChannelException as e:
            raise UnreachableError(f"{_pfx(name)}jump host {via.name} could not reach {where}: "
                                   f"{e.text or e}") from None
        except paramiko.SSHException as e:
            raise UnreachableError(f"{_pfx(name)}via jump host {via.name}: {e}") from None
    if target.proxy_command:
        try:
            return paramiko.ProxyCommand(target.proxy_command)
        except Exception as e:  # noqa: BLE001
            raise UnreachableError(f"{_pfx(name)}ProxyCommand failed: {e}") from None
    try:
        sock = socket.create_connection((target.hostname, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle+delayed-ACK stalls
        return sock
    except socket.timeout:
        raise UnreachableError(f"{_pfx(name)}connect to {where} timed out after {timeout:g}s") from None
    except socket.gaierror as e:
        raise UnreachableError(f"{_pfx(name)}cannot resolve {target.hostname}: {e.strerror}") from None
    except OSError as e:
        raise UnreachableError(f"{_pfx(name)}cannot connect to {where}: {e.strerror or e}") from None


def _hostport(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets ([::1]:22) as ssh and URLs write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pfx(name: str) -> str:
    """Message prefix: only jump hosts are named (fan-out output already names the node)."""
    return f"{name}: " if name.startswith("jump host") else ""


def _key_files(target: sshconfig.Target) -> list[str]:
    files = list(target.identity_files)
    if not files:
        files = [os.path.expanduser(f"~/.ssh/{n}") for n in ("id_ed25519", "id_ecdsa", "id_rsa")]
    return files


_KEYS: dict[tuple, object] = {}


def _load_key(path: str):
    """A private key from a file (cached by path and mtime: fan-outs load it once)."""
    try:
        k = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return None
    if k not in _KEYS:
        _KEYS[k] = _load_key_uncached(path)
    return _KEYS[k]


def _load_key_uncached(path: str):
    import paramiko

    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key_file(path)
        except paramiko.PasswordRequiredException:
            return None  # encrypted: the agent may hold it
        except (paramiko.SSHException, ValueError):
            continue
        except OSError:
            return None
    return None


def _authenticate(t, target: sshconfig.Target, name: str) -> None:
    import paramiko

    tried = 0
    errors = []
    candidates = []
    for f in _key_files(target):
        if os.path.exists(f):
            k = _load_key(f)
            if k is not None:
                candidates.append((f, k))
            elif target.identity_files:
                errors.append(f"{f}: unreadable or passphrase-protected")
        elif f in target.identity_files:
            errors.append(f"{f}: no such file")
    if os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent_keys = paramiko.Agent().get_keys()
        except Exception:  # noqa: BLE001
            agent_keys = ()
        if target.identities_only:
            blobs = {k.asbytes() for _, k in candidates}
            agent_keys = tuple(k for k in agent_keys if k.asbytes() in blobs)
        candidates.extend(("agent", k) for k in agent_keys)
    for _src, key in candidates:
        tried += 1
        try:
            t.auth_publickey(target.user, key)
            if t.is_authenticated():
                return
        except paramiko.AuthenticationException:
            continue
        except paramiko.SSHException as e:
            raise UnreachableError(f"{_pfx(name)}authentication: {e}") from None
    detail = ("; ".join(errors) + "; ") if errors else ""
    raise AuthError(f"{_pfx(name)}authentication failed for user {target.user!r} "
                    f"({detail}{tried} key(s) tried)",
                    hint="check --ssh-user, -i/--identity, IdentityFile in the SSH config or ssh-agent")


def _connect(target: sshconfig.Target, opts: _Options, via: _Conn | None, name: str) -> _Conn:
    import paramiko

    timeout = opts.timeout if opts.timeout_given else (target.connect_timeout or opts.timeout)
    kh_files = list(target.user_known_hosts) + list(target.global_known_hosts)
    if opts.extra_known_hosts:
        kh_files.insert(0, opts.extra_known_hosts)
    kh = knownhosts.KnownHosts(kh_files)
    primary = target.host_key_alias or knownhosts.host_key_name(target.hostname, target.port)
    names = [primary]
    if not target.host_key_alias and target.alias != target.hostname:
        names.append(knownhosts.host_key_name(target.alias, target.port))
    order: list[str] = []
    types = kh.known_types(names)
    if kh.has_ca_for(names):
        for kt in (types or list(_ALGS)):
            order.extend(a + "-cert-v01@openssh.com" for a in _ALGS.get(kt, ()))
    for kt in types:
        order.extend(_ALGS.get(kt, ()))

    sock = _open_sock(target, timeout, via, name)
    T = _transport_class()
    t = T(sock, packetizer_class=_packetizer_class())
    t.host_key_order = tuple(order)
    t.banner_timeout = timeout
    t.handshake_timeout = timeout
    t.auth_timeout = timeout
    t.default_window_size = WINDOW
    t.default_max_packet_size = MAX_PACKET
    try:
        try:
            t.start_client(timeout=timeout)
        except paramiko.SSHException as e:
            msg = str(e)
            if "timeout" in msg.lower() or "banner" in msg.lower():
                raise UnreachableError(f"{_pfx(name)}no SSH handshake from {_hostport(target.hostname, target.port)} "
                                       f"within {timeout:g}s ({msg})") from None
            raise UnreachableError(f"{_pfx(name)}SSH negotiation failed: {msg}") from None
        except (EOFError, OSError) as e:
            raise UnreachableError(f"{_pfx(name)}connection closed during SSH handshake ({e or type(e).__name__})") from None
        if not t.is_active() or t.host_key is None:
            raise UnreachableError(f"{_pfx(name)}no SSH handshake from {_hostport(target.hostname, target.port)} "
                                   f"within {timeout:g}s")
        key = t.get_remote_server_key()
        keytype = key.public_blob.key_type if key.public_blob else key.get_name()
        blob = key.public_blob.key_blob if key.public_blob else key.asbytes()
        accept_file = None
        if opts.accept_new:
            accept_file = opts.extra_known_hosts or target.user_known_hosts[0]
        conn = _Conn(t, name, via)
        conn.trust = kh.verify(names, keytype, blob, node=_pfx(name), principal=target.host_key_alias or target.hostname,
                               accept_new_file=accept_file, hash_new=target.hash_known_hosts)
        _authenticate(t, target, name)
        t.set_keepalive(30)
        return conn
    except BaseException:
        t.close()
        raise


def _connect_chain(target: sshconfig.Target, opts: _Options, cfg, name: str,
                   _path: tuple[str, ...] = ()) -> _Conn:
    """Connect to target through its ProxyJump hops. Every hop is pooled, so nodes
    behind one jump host share one connection to it. Returns one reference.
    A hop whose own ProxyJump leads back to a host on the way is a loop in the
    SSH config: a UsageError naming the chain (a jump through itself is dropped
    already by sshconfig.resolve)."""
    via: _Conn | None = None
    held: list[_Conn] = []
    created: list[bool] = []   # created[i]: held[i] is new and keeps a reference on held[i-1]
    path = _path + (target.alias,)
    try:
        for i, hop in enumerate(target.proxy_jump):
            hop_t = sshconfig.resolve(hop.removeprefix("ssh://"), cfg, identity=opts.identity)
            if i > 0:  # a later hop is reached through the earlier ones, not its own ProxyJump
                hop_t = _replace(hop_t, proxy_jump=())
            if hop_t.proxy_jump:
                if hop_t.alias in path:
                    hosts = path + (hop_t.alias, hop_t.proxy_jump[0])
                    chain = ", ".join(f"{a} through {b}" for a, b in itertools.pairwise(hosts))
                    raise UsageError(f"ProxyJump loop in the SSH config: {chain}",
                                     hint=f"give {hop_t.alias} 'ProxyJump none' (or no ProxyJump) in its Host block")
                via, new = _connect_chain(hop_t, opts, cfg, f"jump host {hop}", path), False
            else:
                parent = via
                via, new = POOL.get(_pool_key(hop_t, opts, parent),
                                    lambda hop_t=hop_t, parent=parent, hop=hop:
                                    _connect(hop_t, opts, parent, f"jump host {hop}"))
            held.append(via)
            created.append(new)
        conn, new = POOL.get(_pool_key(target, opts, via), lambda: _connect(target, opts, via, name))
    except BaseException:
        for c in held:
            POOL.release(c)
        raise
    created.append(new)
    # A new connection keeps the reference on the connection it runs through
    # (given back when it closes); every other reference taken here is returned.
    for i, c in enumerate(held):
        if not created[i + 1]:
            POOL.release(c)
    return conn


def _replace(t, **kw):
    import dataclasses

    return dataclasses.replace(t, **kw)


def _pool_key(target, opts: _Options, via: _Conn | None) -> tuple:
    return (target.key, id(via) if via else None, opts.accept_new, opts.extra_known_hosts,
            target.user_known_hosts, target.global_known_hosts)


# -- pipelined SFTP -------------------------------------------------------------------
PIPE_CHUNK = 128 << 10   # bytes per pipelined READ/WRITE (OpenSSH's limit: 256 KiB - 1 KiB)
PIPE_FILES = 32          # files in flight per read batch: bounds buffered replies (~4 MiB)
PIPE_STATS = 256         # STAT requests in flight per batch
PIPE_WRITES = 32         # WRITE requests in flight while streaming a file up (~4 MiB)

_FX_EOF, _FX_NO_SUCH_FILE, _FX_PERMISSION_DENIED, _FX_OP_UNSUPPORTED = 1, 2, 3, 8


class _Pipe:
    """Pipelined SFTP: queue many requests, send them at once, then collect the replies.

    paramiko's public SFTP calls wait for each reply before sending the next
    request (one round trip each) and give every request its own SSH packet
    (one send(2) and one encryption each). Here requests are numbered and
    registered exactly like SFTPClient._async_request does (its request counter
    and reply table, under its lock), but queued and written to the channel
    together: one SSH packet carries many requests. Replies are read in bulk
    (one channel recv for many replies, where paramiko does two per reply) and
    dispatched by request number, in any order; replies to paramiko's own
    requests (an SFTPFile's unwaited close) go to their owner as paramiko would.
    Every call ends on a reply boundary (``settle``), so paramiko's reader can
    take over the stream after it. ``forget`` queues a request nobody waits for
    (CLOSE of a read handle): its reply is consumed by whichever reader comes
    next. Callers hold the connection's sftp_lock.
    """

    #: paramiko internals this depends on (SFTPClient's request table; SFTPAttributes' wire
    #: format): checked when a pipe is made on a real SFTPClient, so a paramiko that renamed
    #: them fails loudly instead of hanging on replies nobody dispatches
    NEEDS = ("_lock", "request_number", "_expecting")

    def __init__(self, sftp):
        from paramiko import SFTPAttributes, SFTPClient

        if isinstance(sftp, SFTPClient):
            missing = [n for n in self.NEEDS if not hasattr(sftp, n)]
            missing += [f"SFTPAttributes.{n}" for n in ("_from_msg", "_pack") if not hasattr(SFTPAttributes, n)]
            if missing:
                import paramiko

                raise OperationFailed(f"paramiko {paramiko.__version__} lacks what katactl's pipelined SFTP "
                                      f"uses ({', '.join(missing)}): install a paramiko version that "
                                      "pyproject.toml allows")
        self.sftp = sftp
        self.got: dict[int, tuple] = {}
        self.forgotten: set[int] = set()
        self.out: list[bytes] = []
        self.queued = 0
        self.first_queued: int | None = None  # number of the oldest request not yet written
        self.buf = bytearray()                # received bytes not yet dispatched

    # paramiko calls these for requests registered with this object
    def _async_response(self, t, msg, num) -> None:
        if num in self.forgotten:
            self.forgotten.discard(num)
        else:
            self.got[num] = (t, msg)

    def _check_exception(self) -> None:
        pass

    def send(self, cmd, *args) -> int:
        """Queue a request; returns its number (wait() for the reply)."""
        import struct

        from paramiko.message import Message
        from paramiko.sftp import int64
        from paramiko.sftp_attr import SFTPAttributes

        sftp = self.sftp
        msg = Message()
        with sftp._lock:
            num = sftp.request_number
            sftp.request_number += 1
            msg.add_int(num)
            for a in args:
                if isinstance(a, int64):
                    msg.add_int64(a)
                elif isinstance(a, int):
                    msg.add_int(a)
                elif isinstance(a, SFTPAttributes):
                    a._pack(msg)  # type: ignore[attr-defined]  # private: not in the stubs
                elif isinstance(a, str):
                    msg.add_string(_wire(a))
                else:
                    msg.add_string(a)
            sftp._expecting[num] = self
        if self.first_queued is None:
            self.first_queued = num
        body = msg.asbytes()
        self.out.append(struct.pack(">IB", len(body) + 1, cmd) + body)
        self.queued += len(body) + 5
        if self.queued >= MAX_PACKET:
            self.flush()
        return num

    def forget(self, cmd, *args) -> None:
        self.forgotten.add(self.send(cmd, *args))

    def flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.queued = 0
            self.first_queued = None
            self.sftp._write_all(data)

    def wait(self, num: int) -> tuple:
        if self.first_queued is not None and num >= self.first_queued:
            self.flush()  # (replies to requests already written need no flush: CLOSEs stay queued)
        while num not in self.got:
            self._pump()
        return self.got.pop(num)

    def _pump(self) -> None:
        """Receive what the channel holds (at least one byte) and dispatch complete replies."""
        from paramiko.message import Message

        data = self.sftp.sock.recv(1 << 20)
        if not data:
            raise EOFError("SFTP channel closed")
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        sftp = self.sftp
        while n - pos >= 5:
            size = int.from_bytes(buf[pos:pos + 4], "big")
            if n - pos - 4 < size:
                break
            t = buf[pos + 4]
            msg = Message(bytes(buf[pos + 5:pos + 4 + size]))
            pos += 4 + size
            num = msg.get_int()
            with sftp._lock:
                owner = sftp._expecting.pop(num, None)
            if owner is not None and owner is not type(None):
                owner._async_response(t, msg, num)
        del buf[:pos]

    def drop(self, nums) -> None:
        """Nobody will wait for these requests' replies (any more)."""
        for num in nums:
            if self.got.pop(num, None) is None:
                self.forgotten.add(num)

    def settle(self) -> None:
        """Write what is queued and stop on a reply boundary (paramiko's reader reads next)."""
        self.flush()
        while self.buf:
            self._pump()


def _wire(s: str) -> bytes:
    """A node path or command as the node's bytes: names read from the node that are not
    UTF-8 carry surrogates (_name), which go back as the original bytes."""
    return s.encode("utf-8", "surrogateescape")


def _name(b: bytes) -> str:
    """A name from the node as os.listdir gives it: bytes that are not UTF-8 as
    surrogates (surrogateescape), so that local and SSH transports agree."""
    return b.decode("utf-8", "surrogateescape")


def _status_error(t, msg, path: str) -> OSError | None:
    """None for SSH_FX_OK/EOF replies, else the OSError a STATUS reply means."""
    from paramiko.sftp import CMD_STATUS

    if t != CMD_STATUS:
        return OSError(errno.EIO, f"unexpected SFTP reply type {t}", path)
    code = msg.get_int()
    text = msg.get_text()
    if code in (0, _FX_EOF):
        return None
    if code == _FX_NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if code == _FX_PERMISSION_DENIED:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    if code == _FX_OP_UNSUPPORTED:
        return OSError(errno.EOPNOTSUPP, text or os.strerror(errno.EOPNOTSUPP), path)
    return OSError(errno.EIO, text or "SFTP failure", path)


def _file_stat(a) -> FileStat:
    mode = a.st_mode or 0
    return FileStat(size=a.st_size or 0, mtime=float(a.st_mtime or 0), mode=mode,
                    is_dir=st.S_ISDIR(mode), is_link=st.S_ISLNK(mode), uid=a.st_uid or 0)


class _Reading:
    __slots__ = ("key", "path", "h", "parts", "got", "size", "req", "fstat", "err")

    def __init__(self, key, path, h):
        self.key, self.path, self.h = key, path, h
        self.parts: list[bytes] = []
        self.got = 0
        self.size = 0        # regular file's size from FSTAT (0: unknown, read to EOF)
        self.req = self.fstat = None
        self.err: OSError | None = None


def _pipe_read(pipe: _Pipe, items: list[tuple[str, str]], limit: int | None) -> dict:
    """{node path: bytes | OSError} for (node path, remote path) items.

    Per batch of files: all OPENs, then for every handle an FSTAT and a READ,
    more READs only for files larger than PIPE_CHUNK (or of unknown size, like
    /proc files), a CLOSE without waiting. Three round trips for small files,
    however many there are.
    """
    from paramiko.sftp import CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_FSTAT, CMD_HANDLE, CMD_OPEN, CMD_READ, \
        SFTP_FLAG_READ, int64
    from paramiko.sftp_attr import SFTPAttributes

    out: dict = {}

    def want(f: _Reading) -> int:
        return PIPE_CHUNK if limit is None else min(PIPE_CHUNK, limit - f.got)

    for i in range(0, len(items), PIPE_FILES):
        group = items[i:i + PIPE_FILES]
        opened = [(k, pipe.send(CMD_OPEN, r, SFTP_FLAG_READ, SFTPAttributes())) for k, r in group]
        live: list[_Reading] = []
        for k, num in opened:
            t, msg = pipe.wait(num)
            if t == CMD_HANDLE:
                live.append(_Reading(k, k, msg.get_binary()))
            else:
                out[k] = _status_error(t, msg, k) or OSError(errno.EIO, "SFTP open failed", k)
        for f in live:
            f.fstat = pipe.send(CMD_FSTAT, f.h)
            if want(f) > 0:
                f.req = pipe.send(CMD_READ, f.h, int64(0), want(f))
        while live:
            more: list[_Reading] = []
            for f in live:
                if f.fstat is not None:
                    t, msg = pipe.wait(f.fstat)
                    f.fstat = None
                    if t == CMD_ATTRS:
                        a = SFTPAttributes._from_msg(msg)  # type: ignore[attr-defined]  # private: not in the stubs
                        if st.S_ISDIR(a.st_mode or 0):
                            f.err = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), f.path)
                        elif st.S_ISREG(a.st_mode or 0):
                            f.size = a.st_size or 0
                done = f.req is None
                if f.req is not None:
                    t, msg = pipe.wait(f.req)
                    f.req = None
                    if t == CMD_DATA:
                        data = msg.get_string()
                        f.parts.append(data)
                        f.got += len(data)
                        done = not data or want(f) <= 0 or (f.size > 0 and f.got >= f.size)
                    else:
                        f.err = f.err or _status_error(t, msg, f.path)  # None: EOF
                        done = True
                if done or f.err is not None:
                    pipe.forget(CMD_CLOSE, f.h)
                    out[f.key] = f.err if f.err is not None else b"".join(f.parts)
                else:
                    f.req = pipe.send(CMD_READ, f.h, int64(f.got), want(f))
                    more.append(f)
            live = more
    return out


def _pipe_stat(pipe: _Pipe, items: list[tuple[str, str]], follow_symlinks: bool) -> dict:
    """{node path: FileStat | OSError}: every STAT (or LSTAT) in flight at once."""
    from paramiko.sftp import CMD_ATTRS, CMD_LSTAT, CMD_STAT
    from paramiko.sftp_attr import SFTPAttributes

    cmd = CMD_STAT if follow_symlinks else CMD_LSTAT
    out: dict = {}
    for i in range(0, len(items), PIPE_STATS):
        sent = [(k, pipe.send(cmd, r)) for k, r in items[i:i + PIPE_STATS]]
        for k, num in sent:
            t, msg = pipe.wait(num)
            if t == CMD_ATTRS:
                out[k] = _file_stat(SFTPAttributes._from_msg(msg))  # type: ignore[attr-defined]  # private: not in the stubs
            else:
                out[k] = _status_error(t, msg, k) or OSError(errno.EIO, "SFTP stat failed", k)
    return out


def _pipe_scandirs(pipe: _Pipe, items: list[tuple[str, str]]) -> dict:
    """{node path: [(name, lstat), ...] | OSError}: every OPENDIR at once, then two
    READDIRs in flight per directory until its EOF, CLOSEs unwaited."""
    from collections import deque

    from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR
    from paramiko.sftp_attr import SFTPAttributes

    out: dict = {}
    opened = [(k, pipe.send(CMD_OPENDIR, r)) for k, r in items]
    live = {}
    for k, num in opened:
        t, msg = pipe.wait(num)
        if t == CMD_HANDLE:
            h = msg.get_binary()
            live[k] = [h, deque([pipe.send(CMD_READDIR, h), pipe.send(CMD_READDIR, h)]), [], None, False]
        else:
            out[k] = _status_error(t, msg, k) or OSError(errno.EIO, "SFTP opendir failed", k)
    while live:
        for k in list(live):
            h, pending, entries, err, eof = d = live[k]
            t, msg = pipe.wait(pending.popleft())
            if t == CMD_NAME:
                for _ in range(msg.get_int()):
                    name = _name(msg.get_string())
                    msg.get_string()  # longname (ls -l text: ignored)
                    a = SFTPAttributes._from_msg(msg)  # type: ignore[attr-defined]  # private: not in the stubs
                    if name not in (".", ".."):
                        entries.append((name, _file_stat(a)))
                if not eof:
                    pending.append(pipe.send(CMD_READDIR, h))
            else:
                d[4] = True
                d[3] = err or _status_error(t, msg, k)
            if not pending:
                pipe.forget(CMD_CLOSE, h)
                out[k] = d[3] if d[3] is not None else entries
                del live[k]
    return out


def _pipe_write(pipe: _Pipe, path: str, tmp: str, chunks, mode: int) -> tuple[int, bool]:
    """Stream chunks into a new remote file ``tmp`` (created 0600, exclusive): WRITEs of
    PIPE_CHUNK bytes with at most PIPE_WRITES unacknowledged (bounded memory), then
    chmod, fsync (fsync@openssh.com) and close in one round trip. Returns (bytes
    written, fsynced); fsynced is False when the server lacks the extension. On any
    failure (the iterator's included) the handle is closed and tmp removed."""
    from collections import deque

    from paramiko.sftp import (CMD_CLOSE, CMD_EXTENDED, CMD_FSETSTAT, CMD_HANDLE, CMD_OPEN, CMD_REMOVE,
                               CMD_WRITE, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_WRITE, int64)
    from paramiko.sftp_attr import SFTPAttributes

    def check(num: int) -> None:
        t, msg = pipe.wait(num)
        e = _status_error(t, msg, path)
        if e is not None:
            raise e

    a = SFTPAttributes()
    a.st_mode = 0o600
    t, msg = pipe.wait(pipe.send(CMD_OPEN, tmp, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, a))
    if t != CMD_HANDLE:
        raise _status_error(t, msg, path) or OSError(errno.EIO, "SFTP open failed", path)
    h = msg.get_binary()
    inflight: deque[int] = deque()
    n = 0
    try:
        for chunk in chunks:
            pipe.settle()  # the iterator runs with the reply stream at a boundary
            mv = memoryview(chunk)
            for off in range(0, len(mv), PIPE_CHUNK):
                piece = bytes(mv[off:off + PIPE_CHUNK])
                inflight.append(pipe.send(CMD_WRITE, h, int64(n), piece))
                n += len(piece)
                while len(inflight) > PIPE_WRITES:
                    check(inflight.popleft())
        while inflight:
            check(inflight.popleft())
        a = SFTPAttributes()
        a.st_mode = mode & 0o7777
        n_mode = pipe.send(CMD_FSETSTAT, h, a)
        n_sync = pipe.send(CMD_EXTENDED, "fsync@openssh.com", h)
        n_close = pipe.send(CMD_CLOSE, h)
        h = None
        check(n_mode)
        t, msg = pipe.wait(n_sync)
        sync_err = _status_error(t, msg, path)
        check(n_close)
        if sync_err is not None and sync_err.errno != errno.EOPNOTSUPP:
            raise sync_err
        return n, sync_err is None
    except BaseException:
        pipe.drop(inflight)
        try:
            if h is not None:
                pipe.wait(pipe.send(CMD_CLOSE, h))
            pipe.wait(pipe.send(CMD_REMOVE, tmp))
        except Exception:  # noqa: BLE001 - the original error matters
            pass
        raise


def _pipe_fsync(pipe: _Pipe, path: str, remote: str, want_dir: bool) -> OSError | None:
    """fsync(2) a remote file or directory through SFTP: OPEN read-only (sftp-server opens
    directories too), FSTAT + fsync@openssh.com + CLOSE in one round trip. Returns an
    EOPNOTSUPP error when the server lacks the extension (caller falls back)."""
    from paramiko.sftp import (CMD_ATTRS, CMD_CLOSE, CMD_EXTENDED, CMD_FSTAT, CMD_HANDLE, CMD_OPEN,
                               SFTP_FLAG_READ)
    from paramiko.sftp_attr import SFTPAttributes

    t, msg = pipe.wait(pipe.send(CMD_OPEN, remote, SFTP_FLAG_READ, SFTPAttributes()))
    if t != CMD_HANDLE:
        raise _status_error(t, msg, path) or OSError(errno.EIO, "SFTP open failed", path)
    h = msg.get_binary()
    n_stat = pipe.send(CMD_FSTAT, h)
    n_sync = pipe.send(CMD_EXTENDED, "fsync@openssh.com", h)
    n_close = pipe.send(CMD_CLOSE, h)
    t, msg = pipe.wait(n_stat)
    is_dir = t == CMD_ATTRS and st.S_ISDIR(SFTPAttributes._from_msg(msg).st_mode or 0)  # type: ignore[attr-defined]  # private: not in the stubs
    t, msg = pipe.wait(n_sync)
    err = _status_error(t, msg, path)
    pipe.wait(n_close)
    if want_dir and not is_dir:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    if err is not None and err.errno != errno.EOPNOTSUPP:
        raise err
    return err


def _pipe_remove(pipe: _Pipe, paths: list[str]) -> None:
    """REMOVE every path at once; their errors are ignored (best effort)."""
    from paramiko.sftp import CMD_REMOVE

    for num in [pipe.send(CMD_REMOVE, r) for r in paths]:
        pipe.wait(num)


MAX_SYMLINKS = 40  # Linux's limit on symlinks followed in one lookup (ELOOP beyond)


def _prefixes(r: str) -> list[str]:
    """/a/b/c -> [/a, /a/b, /a/b/c]."""
    parts = [c for c in r.split("/") if c]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _why_err(code: int, key: str) -> OSError:
    cls = {errno.ENOENT: FileNotFoundError, errno.ENOTDIR: NotADirectoryError}.get(code, OSError)
    return cls(code, os.strerror(code), key)


def _settled(items: list[tuple[str, str]], lstat: bool, known: dict) -> tuple[dict, list, list]:
    """What _pipe_why_missing needs no request for: (answers, [(key, remote path, the remote
    path of the missing item it fails as)], the items left to ask about). known ({remote
    path: resolves to a directory}, "/" in it) is what the same call's answers proved
    (_known_dirs): a path under a known non-directory is ENOTDIR; under another missing
    item it fails as that item does (the lookup stops there); an LSTAT miss in a known
    directory is ENOENT."""
    missing = {r for _, r in items}
    out: dict = {}
    under: list[tuple[str, str, str]] = []
    fresh: list[tuple[str, str]] = []
    for k, r in items:
        d = posixpath.dirname(r)
        while d not in missing and d not in known:
            d = posixpath.dirname(d)
        if d in missing and d != r:
            under.append((k, r, d))
        elif known.get(d) is False:
            out[k] = _why_err(errno.ENOTDIR, k)
        elif lstat and d == posixpath.dirname(r):
            out[k] = _why_err(errno.ENOENT, k)
        else:
            fresh.append((k, r))
    return out, under, fresh


def _pipe_why_missing(pipe: _Pipe, items: list[tuple[str, str]], want_dir: bool, lstat: bool,
                      known: dict) -> dict:
    """{node path: the OSError the kernel gave} for (node path, remote path) items that SFTP
    answered SSH_FX_NO_SUCH_FILE: OpenSSH's sftp-server maps ELOOP and ENOTDIR to it too
    (sftp-server.c errno_to_portable), where the local transport says which. Only on that
    error path, and for what _settled could not tell: the parent's STAT and the name's LSTAT;
    then, where that does not tell (a symlink, or a parent that does not resolve: its
    own walk tells for all its children), an LSTAT and a STAT of every prefix below the
    deepest known directory (known, as in _settled), all in one round trip
    (prefixes shared between paths asked once); a symlink that does not resolve is read
    (READLINK) and the walk goes on from its target, one more round trip per link, until
    a component is missing (ENOENT), a non-directory is walked through (ENOTDIR), or a
    link comes back or MAX_SYMLINKS are followed (ELOOP). want_dir: the call opened the
    path as a directory (OPENDIR of a file is ENOTDIR); lstat: it did not follow a final
    symlink (LSTAT: its miss is the final LSTAT's answer, not asked again)."""
    from paramiko.sftp import CMD_ATTRS, CMD_LSTAT, CMD_NAME, CMD_READLINK, CMD_STAT
    from paramiko.sftp_attr import SFTPAttributes

    known = dict(known)
    err = _why_err

    def mode(num: int | None) -> int | None:
        if num is None:
            return None
        t, msg = pipe.wait(num)
        return (SFTPAttributes._from_msg(msg).st_mode or 0) if t == CMD_ATTRS else None  # type: ignore[attr-defined]

    out: dict = {}
    # The common case first, in fewer requests: the parent is a directory and the name
    # is not there (ENOENT), or the parent is not a directory (ENOTDIR).
    hard: list[tuple[str, str, bool]] = []  # (key, remote path to walk, it must be a directory)
    parents = {d: pipe.send(CMD_STAT, d) for d in dict.fromkeys(posixpath.dirname(r) for _, r in items)
               if d not in known}
    finals = [(k, r, None if lstat else pipe.send(CMD_LSTAT, r)) for k, r in items]
    pmodes = {d: mode(n) for d, n in parents.items()}
    known.update((d, True) for d, m in pmodes.items() if m is not None and st.S_ISDIR(m))
    for k, r, n in finals:
        d, lmode = posixpath.dirname(r), mode(n)
        pmode = pmodes[d] if d in pmodes else (st.S_IFDIR if known[d] else st.S_IFREG)
        if pmode is not None and not st.S_ISDIR(pmode):
            out[k] = err(errno.ENOTDIR, k)
        elif pmode is not None and lmode is None:
            out[k] = err(errno.ENOENT, k)
        elif pmode is None:  # the lookup fails in the parent: walk that, as a directory
            hard.append((k, d, True))
        else:
            hard.append((k, r, want_dir))

    def walk(r: str) -> list[str]:
        """The prefixes of r the walk asks about: those below its deepest known directory."""
        ps = _prefixes(r)
        for i in range(len(ps) - 2, -1, -1):
            if known.get(ps[i]) is True:
                return ps[i + 1:]
        return ps

    # remote path now, links followed, links seen, it must be a directory
    todo: dict[str, tuple[str, int, frozenset, bool]] = {k: (r, 0, frozenset(), d) for k, r, d in hard}
    while todo:
        asked = {p: (pipe.send(CMD_LSTAT, p), pipe.send(CMD_STAT, p))
                 for p in dict.fromkeys(p for r, _, _, _ in todo.values() for p in walk(r))}
        modes = {p: (mode(n1), mode(n2)) for p, (n1, n2) in asked.items()}
        links: dict[str, list] = {}
        for k, (r, hops, seen, as_dir) in todo.items():
            ps = walk(r)
            code = errno.ENOENT
            for i, p in enumerate(ps):
                lmode, smode = modes[p]
                last = i == len(ps) - 1
                if lmode is None:
                    break  # this component is missing: ENOENT
                if st.S_ISLNK(lmode) and smode is None:
                    if p in seen or hops >= MAX_SYMLINKS:
                        code = errno.ELOOP
                        break
                    links.setdefault(p, []).append((k, r[len(p):], hops, seen | {p}, as_dir))
                    code = 0
                    break
                if (not last or as_dir) and not st.S_ISDIR(smode if smode is not None else lmode):
                    code = errno.ENOTDIR
                    break
            if code:
                out[k] = err(code, k)
        todo = {}
        for p, t_num in [(p, pipe.send(CMD_READLINK, p)) for p in links]:
            t, msg = pipe.wait(t_num)
            target = _name(msg.get_string()) if t == CMD_NAME and msg.get_int() > 0 else None
            for k, rest, hops, seen, as_dir in links[p]:
                if target is None:
                    out[k] = err(errno.ENOENT, k)
                else:
                    nxt = posixpath.normpath(posixpath.join(posixpath.dirname(p), target) + rest)
                    todo[k] = ("/" + nxt.lstrip("/"), hops + 1, seen, as_dir)
    return out


def _known_dirs(results: dict, remote, follow: bool) -> dict:
    """{remote path: True for a directory, False for anything else} of what a batch's
    answers prove about the paths it walked (for _pipe_why_missing): every prefix of a path
    answered resolves to a directory, and a stat answer's own type is known (a symlink's
    only when it was followed)."""
    out: dict = {}
    for k, v in results.items():
        if isinstance(v, BaseException):
            continue
        r = remote(k)
        d = r
        while d != "/":
            d = posixpath.dirname(d)
            if out.get(d) is True:
                break
            out[d] = True
        if isinstance(v, FileStat):
            if v.is_dir or follow or not v.is_link:
                out[r] = v.is_dir
        elif isinstance(v, list):  # a listing
            out[r] = True
        elif isinstance(v, bytes):  # read: open(2) of a non-directory
            out[r] = False
    return out


def _pipe_rename(pipe: _Pipe, path: str, src: str, dst: str) -> None:
    from paramiko.sftp import CMD_EXTENDED

    t, msg = pipe.wait(pipe.send(CMD_EXTENDED, "posix-rename@openssh.com", src, dst))
    e = _status_error(t, msg, path)
    if e is not None:
        raise e


# -- the transport ------------------------------------------------------------------
def _oserror(e: OSError, path: str) -> OSError:
    """paramiko's IOError with the node path attached (and the right subclass)."""
    code = e.errno
    if code is None:
        text = str(e).lower()
        if "no such file" in text:
            code = errno.ENOENT
        elif "permission denied" in text:
            code = errno.EACCES
    if code is None:
        return OSError(errno.EIO, str(e) or "SFTP failure", path)
    return OSError(code, os.strerror(code), path)


class _SlotChannel:
    """A paramiko Channel that releases its session slot exactly once on close()."""

    hold_stdin = False  # True: the command runs under remote.GUARD, stdin is its lifeline

    def __init__(self, chan, sem):
        self._c = chan
        self._sem = sem
        self._released = False
        self._rl = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._c, name)

    def close(self) -> None:
        try:
            self._c.close()
        finally:
            with self._rl:
                if not self._released:
                    self._released = True
                    self._sem.release()

    def __del__(self):
        try:
            if not self._released:
                self.close()
        except Exception:  # noqa: BLE001
            pass


_ChannelSocket = ChannelSocket  # (moved to remote.py)


class SSHTransport(RemoteTransport):
    """NodeTransport for one remote node over SSH. Build it with from_settings(). The
    node-side logic (argv, streams, the socket relay) is RemoteTransport's (remote.py); here:
    the SSH channel, SFTP file access."""


    def __init__(self, node: str, conn: _Conn, host_root: str = "", timeout: float = 30.0):
        self.node = node
        self._conn = conn
        self.host_root = _check_root(host_root) if host_root else ""
        self.timeout = timeout
        self._swept_dirs: set[str] = set()

    @classmethod
    def from_settings(cls, node: str, settings) -> "SSHTransport":
        opts = _Options(settings)
        text = sshconfig.config_text(opts.cfg_path, system=opts.system_config)
        _import_paramiko(sshconfig.uses_match_exec(text))
        cfg = sshconfig.load(text)
        target = sshconfig.resolve(node, cfg, user=opts.user, identity=opts.identity,
                                   jump_host=opts.jump_host)
        conn = _connect_chain(target, opts, cfg, node)
        root = settings.host_root or target.host_root or ""
        try:
            return cls(node, conn, root, opts.timeout)
        except BaseException:
            POOL.release(conn)
            raise

    # -- helpers ---------------------------------------------------------------------
    def _sftp(self):
        try:
            return self._conn.sftp(self.timeout)
        except KatactlError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UnreachableError(f"cannot open an SFTP session: {e}") from None

    def _channel(self):
        """A new session channel; its close() gives the session slot back."""
        import paramiko

        sem = self._conn.sessions
        if not sem.acquire(timeout=self.timeout):
            raise TimeoutExpired(f"no free SSH session slot within {self.timeout:g}s "
                                 f"({MAX_SESSIONS} channels busy)")
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                chan = self._conn.t.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET,
                                                 timeout=self.timeout)
                _chunk_pipe(chan)
                break
            except (paramiko.ChannelException, paramiko.SSHException) as e:
                # sshd frees a closed session's slot asynchronously: a refusal right
                # after a close is usually MaxSessions lag; retry briefly. (With
                # concurrent opens paramiko may report a refusal as a bare
                # SSHException "Unable to open channel": its saved exception is
                # per transport.)
                if not self._conn.t.is_active():
                    sem.release()
                    raise UnreachableError(f"SSH connection lost: {e or type(e).__name__}") from None
                if time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
                    continue
                sem.release()
                # ChannelException carries sshd's reason in .text; a bare SSHException has none
                text = e.text if isinstance(e, paramiko.ChannelException) else ""
                raise UnreachableError(f"cannot open an SSH channel: {text or e}") from None
            except (EOFError, OSError) as e:
                sem.release()
                raise UnreachableError(f"SSH connection lost: {e or type(e).__name__}") from None
            except BaseException:
                sem.release()
                raise
        return _SlotChannel(chan, sem)

    def _sftp_call(self, sftp, fn, path: str, *args):
        """fn(*args), a call on session sftp, under sftp_lock; its errors mapped."""
        import paramiko

        try:
            with self._conn.sftp_lock:
                return fn(*args)
        except OSError as e:
            if isinstance(e, socket.timeout):
                self._conn.reset_sftp(sftp, timed_out=self.timeout)  # a late reply would answer the next request
                raise TimeoutExpired(f"no SFTP reply about {path} within {self.timeout:g}s") from None
            if sftp.sock.closed:  # paramiko's "Socket is closed": the session went, not the file
                raise self._conn.lost(sftp, path) from None
            err = _oserror(e, path)
        except (paramiko.SSHException, EOFError) as e:
            if sftp.sock.closed:
                raise self._conn.lost(sftp, path) from None
            raise UnreachableError(f"SFTP on {path}: {e or type(e).__name__}") from None
        if isinstance(err, FileNotFoundError):
            err = self._why_missing({path: err}, lstat=fn.__name__ == "lstat")[path]
        raise err

    def _why_missing(self, errs: dict, want_dir: bool = False, lstat: bool = False) -> dict:
        """errs ({node path: answer or error}, one call's) with every FileNotFoundError told
        apart from ELOOP and ENOTDIR, as the local transport reports them (_pipe_why_missing,
        helped by what the call's other answers prove: _known_dirs)."""
        items = [(p, self.remote(p)) for p, e in errs.items() if isinstance(e, FileNotFoundError)]
        if not items:
            return errs
        known = _known_dirs(errs, self.remote, not lstat) if len(items) < len(errs) else {}
        known["/"] = True
        out, under, fresh = _settled(items, lstat, known)
        if fresh:
            out.update(self._piped(_pipe_why_missing, fresh[0][0], fresh, want_dir, lstat, known))
        keys = {r: k for k, r in items}
        for k, _, d in sorted(under, key=lambda u: len(u[1])):  # shallower first: they may chain
            out[k] = _why_err(out[keys[d]].errno, k)
        return {**errs, **out}

    # -- files -----------------------------------------------------------------------
    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        r = self.remote(path)
        sftp = self._sftp()

        def read():
            f = sftp.open(_wire(r), "rb")
            try:
                try:
                    return f.read(limit) if limit is not None else f.read()
                except socket.timeout:
                    raise
                except OSError:
                    # sftp-server opens a directory fine and then answers the READ with a
                    # bare SSH_FX_FAILURE ("Failure"): say EISDIR as open(2)+read(2) do
                    # locally (read_many does the same with its FSTAT). Only on this
                    # error path: no extra round trip for a good read.
                    try:
                        is_dir = st.S_ISDIR(f.stat().st_mode or 0)
                    except Exception:  # noqa: BLE001 - keep the original error
                        is_dir = False
                    if is_dir:
                        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path) from None
                    raise
            finally:
                # Read-only handle: do not wait for the CLOSE reply (one round trip
                # less per file; paramiko's own GC path does the same). The reply is
                # consumed by the next request on this SFTP session.
                try:
                    f._close(async_=True)
                except Exception:  # noqa: BLE001 - private API changed: close normally
                    f.close()
        return self._sftp_call(sftp, read, path)

    def _piped(self, fn, path: str, *args):
        """Run fn(pipe, *args) holding the SFTP session; transport errors mapped.

        A file's own error (FileNotFoundError, ...) or the caller's (a chunk
        iterator's) is raised with the reply stream settled; when the transport
        fails midway the session is dropped (its reply stream may be out of
        step) and the next call opens a new one."""
        import paramiko

        try:
            sftp, pipe = self._conn._session(self.timeout)
        except KatactlError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UnreachableError(f"cannot open an SFTP session: {e}") from None

        def broken(e: BaseException) -> bool:
            return isinstance(e, (socket.timeout, paramiko.SSHException, EOFError)) or \
                (isinstance(e, OSError) and e.errno is None)

        def mapped(e: BaseException) -> KatactlError:
            if isinstance(e, socket.timeout):
                self._conn.reset_sftp(sftp, timed_out=self.timeout)
                return TimeoutExpired(f"no SFTP reply about {path} within {self.timeout:g}s")
            err = self._conn.lost(sftp, path) if sftp.sock.closed else None
            self._conn.reset_sftp(sftp)
            return err or UnreachableError(f"SFTP on {path}: {e or type(e).__name__}")

        with self._conn.sftp_lock:
            try:
                out = fn(pipe, *args)
            except Exception as e:
                if broken(e):
                    raise mapped(e) from None
                try:
                    pipe.settle()
                except Exception as e2:  # noqa: BLE001
                    raise mapped(e2) from None
                raise
            except BaseException:
                self._conn.reset_sftp(sftp)
                raise
            try:
                pipe.settle()  # unwaited CLOSEs written; no half-read reply left behind
            except Exception as e:  # noqa: BLE001
                raise mapped(e) from None
            return out

    def read_many(self, paths: Sequence[str], limit: int | None = None) -> dict:
        """Pipelined SFTP reads: ~3 round trips for any number of small files."""
        items = list(dict.fromkeys(paths))
        if not items:
            return {}
        pairs = [(p, self.remote(p)) for p in items]
        return self._why_missing(self._piped(_pipe_read, items[0], pairs, limit))

    def stat_many(self, paths: Sequence[str], follow_symlinks: bool = True) -> dict:
        items = list(dict.fromkeys(paths))
        if not items:
            return {}
        pairs = [(p, self.remote(p)) for p in items]
        return self._why_missing(self._piped(_pipe_stat, items[0], pairs, follow_symlinks),
                                 lstat=not follow_symlinks)

    def scan_dirs(self, paths: Sequence[str], follow_symlinks: bool = True) -> dict:
        """Pipelined directory listings with their entries' attributes (READDIR
        carries them): about two round trips for any number of directories."""
        items = list(dict.fromkeys(paths))
        if not items:
            return {}
        out = self._why_missing(self._piped(_pipe_scandirs, items[0], [(p, self.remote(p)) for p in items]),
                                want_dir=True)
        if follow_symlinks:
            links = [f"{p.rstrip('/')}/{n}" for p, v in out.items() if not isinstance(v, OSError)
                     for n, s in v if s.is_link]
            # (their errors are not reported, only that they are errors: no _why_missing)
            got = self._piped(_pipe_stat, links[0], [(x, self.remote(x)) for x in links], True) if links else {}
            for p, v in out.items():
                if not isinstance(v, OSError) and got:
                    base = p.rstrip("/")
                    out[p] = [(n, s) if not s.is_link or isinstance(got[f"{base}/{n}"], OSError)
                              else (n, got[f"{base}/{n}"]) for n, s in v]
        return {p: (v if isinstance(v, OSError) else sorted(v, key=lambda e: e[0])) for p, v in out.items()}

    def stat(self, path: str, follow_symlinks: bool = True) -> FileStat:
        sftp = self._sftp()
        r = self.remote(path)
        a = self._sftp_call(sftp, sftp.stat if follow_symlinks else sftp.lstat, path, _wire(r))
        mode = a.st_mode or 0
        return FileStat(size=a.st_size or 0, mtime=float(a.st_mtime or 0), mode=mode,
                        is_dir=st.S_ISDIR(mode), is_link=st.S_ISLNK(mode), uid=a.st_uid or 0)

    def readlink(self, path: str) -> str:
        sftp = self._sftp()
        r = self.remote(path)
        if not st.S_ISLNK(self.stat(path, follow_symlinks=False).mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        target = self._sftp_call(sftp, sftp.readlink, path, _wire(r))
        if target is None:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        # paramiko gives bytes for a name that is not UTF-8: surrogates, as os.readlink
        return _name(target) if isinstance(target, bytes) else target

    # -- mutations ------------------------------------------------------------------
    def write_bytes_atomic(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.write_stream_atomic(path, (data,), mode)

    def write_stream_atomic(self, path: str, chunks, mode: int = 0o644) -> int:
        """Pipelined SFTP writes into a temp file beside path (0600, exclusive), chmod,
        fsync (fsync@openssh.com; else ``sync FILE``), posix-rename, fsync of the
        directory. Memory: one chunk plus PIPE_WRITES x PIPE_CHUNK bytes in flight."""
        import secrets

        real = self.remote(path)
        tmp = posixpath.join(posixpath.dirname(real), f".katactl-{secrets.token_hex(6)}.tmp")  # TMP_NAME
        n, synced = self._piped(_pipe_write, path, path, tmp, chunks, mode)
        try:
            if not synced:
                r = self.run(["sync", "--", tmp], raw=True)
                if r.returncode != 0:
                    raise _run_oserror(r, path)
            self._piped(_pipe_rename, path, path, tmp, real)
        except BaseException:
            try:
                with self._conn.sftp_lock:
                    self._sftp().remove(_wire(tmp))
            except Exception:  # noqa: BLE001
                pass
            raise
        self.fsync_dir(posixpath.dirname(posixpath.normpath(path)) or "/")
        self._sweep_stale_tmps(path, real)
        return n

    def _sweep_stale_tmps(self, path: str, real: str) -> None:
        """Remove the temp files that killed writes (kill -9, a dropped connection: the
        cleanup above never ran) left beside path (remote.stale_tmps: the kube transport's
        rule too). Done after our rename, so that the file just written is in the listing.
        Once per directory (_sweep_due). Best effort: the write is already done."""
        d, base = posixpath.split(real)
        if not self._sweep_due(d):
            return
        try:
            listing = self._piped(_pipe_scandirs, path, [(d, d)])[d]
            if isinstance(listing, OSError):
                return
            stale = [posixpath.join(d, n) for n in stale_tmps(listing, base)]
            if stale:
                self._piped(_pipe_remove, path, stale)
        except (OSError, KatactlError):
            pass

    def fsync_dir(self, path: str) -> None:
        """fsync a directory on the node (makes renames and new entries in it durable):
        through SFTP's fsync@openssh.com on a read-only handle, else ``sync DIR``."""
        r = self.remote(path)
        if self._piped(_pipe_fsync, path, path, r, True) is not None:
            res = self.run(["sync", "--", r], raw=True)
            if res.returncode != 0:
                raise _run_oserror(res, path)

    def _mkdir_one(self, path: str, remote: str, mode: int) -> None:
        sftp = self._sftp()
        self._sftp_call(sftp, sftp.mkdir, path, _wire(remote), mode)

    def _unlink(self, path: str, remote: str) -> None:
        sftp = self._sftp()
        self._sftp_call(sftp, sftp.remove, path, _wire(remote))

    def rename(self, src: str, dst: str) -> None:
        """posix-rename, then an fsync of dst's directory (durable, as locally)."""
        self._piped(_pipe_rename, src, src, self.remote(src), self.remote(dst))
        self.fsync_dir(posixpath.dirname(posixpath.normpath(dst)) or "/")

    # -- processes and sockets --------------------------------------------------
    def _exec_channel(self, argv, timeout=None):
        """A session channel running argv (each element shell-quoted: shlex.join)."""
        chan = self._channel()
        _exec(chan, argv, self.timeout)
        return chan

    def _communicate(self, chan, argv, input, timeout):
        import select

        deadline = time.monotonic() + timeout
        try:
            if input:
                chan.settimeout(timeout)
                chan.sendall(input)
            if not getattr(chan, "hold_stdin", False):
                chan.shutdown_write()
            out, err = [], []
            fd = chan.fileno()
            while True:
                got = False
                while chan.recv_ready():
                    out.append(chan.recv(1 << 20))
                    got = True
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(1 << 20))
                    got = True
                if got:
                    continue
                # exit-status can come before the last output: sshd sends it when it
                # reaps the child, with data maybe still in the pipe (openssh session.c
                # session_exit_message). The end is exit-status *and* EOF (or a close).
                if (chan.exit_status_ready() and chan.eof_received) or chan.closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutExpired(f"{argv[0]} did not finish within {timeout:g}s")
                if chan.eof_received:  # output closed; only the exit status is missing
                    chan.status_event.wait(min(left, 1.0))
                else:
                    select.select([fd], [], [], min(left, 1.0))
            # EOF (or close) seen: what is buffered is the rest
            while chan.recv_ready():
                out.append(chan.recv(1 << 20))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(1 << 20))
            rc = chan.recv_exit_status()
        except socket.timeout:
            raise TimeoutExpired(f"{argv[0]} did not finish within {timeout:g}s") from None
        return b"".join(out), b"".join(err), rc

    def close(self) -> None:
        """Release this transport; the connection stays pooled (idle) for the next user."""
        conn = self._conn
        if conn is not None and not getattr(self, "_did_release", False):
            self._did_release = True
            POOL.release(conn)


def _exec(chan, argv: Sequence[str], timeout: float) -> None:
    """exec with every argv element quoted (shlex.join): the remote login shell only
    ever sees literal words. Sent as bytes (_wire): a word may be a name that is not
    UTF-8."""
    import paramiko

    try:
        _chan_request(chan, "exec", _wire(shlex.join(argv)), timeout=timeout)
    except socket.timeout:
        chan.close()
        raise TimeoutExpired(f"the node did not start {argv[0]} within {timeout:g}s") from None
    except paramiko.SSHException as e:
        chan.close()
        raise UnreachableError(f"the node refused to run {argv[0]}: {e}") from None


__all__ = ["SSHTransport", "close_pool", "RELAY", "HostKeyError"]
