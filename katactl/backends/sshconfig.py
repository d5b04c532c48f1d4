"""~/.ssh/config for katactl: paramiko's parser plus what it lacks.

paramiko.SSHConfig ignores ``Include`` and returns ProxyJump as a raw string.
This module inlines Include files (globs, paths relative to ~/.ssh, nested up
to 16 levels, like OpenSSH), appends /etc/ssh/ssh_config unless a config file
was chosen explicitly (``ssh -F`` semantics; --ssh-config/KATACTL_SSH_CONFIG/
the config file count as explicit), resolves one node name
``[user@]host[:port]`` into the parameters a connection needs, and splits
ProxyJump into hops. Honoured: HostName, Port, User, IdentityFile,
IdentitiesOnly, ProxyCommand, ProxyJump (multi-hop), HostKeyAlias,
UserKnownHostsFile, GlobalKnownHostsFile, HashKnownHosts, ConnectTimeout,
Match (``exec`` loads paramiko's invoke dependency). StrictHostKeyChecking is
deliberately not: accepting new keys is --ssh-accept-new only.

Per-node host root: a Host block may carry ``SetEnv KATACTL_HOST_ROOT=/dir``.
OpenSSH's own client sends it as an environment variable (sshd drops it unless
AcceptEnv allows it), katactl reads it as the node's --host-root: the node's
root filesystem lives under /dir on that node (a privileged pod with the host
at /host, a lab tree, a mounted snapshot). A --host-root flag or setting wins.
"""
from __future__ import annotations

import copy
import dataclasses
import getpass
import glob
import os
import re
import shlex
import socket

from katactl.backends.knownhosts import DEFAULT_GLOBAL_FILES, DEFAULT_USER_FILES
from katactl.errors import UsageError

_INCLUDE = re.compile(r"^\s*include(?:\s*=\s*|\s+)(.*)$", re.I)
_MAX_DEPTH = 16


def expand_includes(path: str, depth: int = 0, base: str | None = None) -> str:
    """The config text with every Include replaced by the files it names."""
    path = os.path.expanduser(path)
    base = base or os.path.expanduser("~/.ssh")
    if depth > _MAX_DEPTH:
        raise UsageError(f"{path}: Include nested too deeply")
    from katactl.config import read_input

    try:
        text = read_input(path, "SSH config").decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"SSH config {path}: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for line in text.splitlines():
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        try:
            names = shlex.split(m.group(1), comments=True)
        except ValueError:
            raise UsageError(f"{path}: bad Include line: {line.strip()!r}") from None
        for name in names:
            name = os.path.expanduser(name)
            if not os.path.isabs(name):
                name = os.path.join(base, name)
            for inc in sorted(glob.glob(name)):
                out.append(expand_includes(inc, depth + 1, base))
    return "\n".join(out) + "\n"


_MATCH_EXEC = re.compile(r"^\s*match\b.*\bexec\b", re.I | re.M)


SYSTEM_CONFIG = "/etc/ssh/ssh_config"


def config_text(path: str | None, *, system: bool = False) -> str:
    """The effective config text: the user file, then (like ssh without -F) the
    system-wide file, each with its Includes inlined (relative to ~/.ssh and
    /etc/ssh respectively). First obtained value wins, as in OpenSSH."""
    text = expand_includes(path) if path else ""
    if system:
        text += "\n" + expand_includes(SYSTEM_CONFIG, base="/etc/ssh")
    return text


def uses_match_exec(text: str) -> bool:
    """Whether the config text has a ``Match exec`` line."""
    return bool(_MATCH_EXEC.search(text))


_CACHE: dict[int, object] = {}


def load(text: str):
    """A paramiko.SSHConfig for config text (see config_text), cached by content."""
    import paramiko

    key = hash(text)
    cfg = _CACHE.get(key)
    if cfg is None:
        try:
            cfg = paramiko.SSHConfig.from_text(text)
        except Exception as e:  # noqa: BLE001 - paramiko raises several types
            raise UsageError(f"SSH config: {e}") from None
        _CACHE[key] = cfg
    return cfg


@dataclasses.dataclass(frozen=True)
class Target:
    """Everything needed to reach one host (one hop)."""

    alias: str                 # what the user wrote (without user@ and :port)
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    identities_only: bool
    proxy_command: str | None
    proxy_jump: tuple[str, ...]   # hops, outermost first
    host_key_alias: str | None
    user_known_hosts: tuple[str, ...]
    global_known_hosts: tuple[str, ...]
    hash_known_hosts: bool
    connect_timeout: float | None
    host_root: str | None
    forward_agent: bool = False

    @property
    def key(self) -> tuple:
        return (self.user, self.hostname, self.port, self.proxy_command, self.proxy_jump,
                self.host_key_alias, self.identity_files)


_NODE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d{1,5}))?$")


def split_node(node: str) -> tuple[str | None, str, int | None]:
    m = _NODE.match(node)
    if not m:
        raise UsageError(f"invalid node name {node!r}: expected [user@]host[:port]")
    host = m.group("host").strip("[]")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"invalid port in node name {node!r}")
    return m.group("user"), host, port


def _yes(v) -> bool:
    return str(v).strip().lower() in ("yes", "true", "on")


def resolve(node: str, cfg, *, user: str | None = None, identity: str | None = None,
            jump_host: str | None = None) -> Target:
    """Apply the SSH config to a node name. Explicit arguments win over the file."""
    nuser, host, nport = split_node(node)
    o = lookup(cfg, host)
    port = nport or int(o.get("port", 22))
    who = nuser or user or o.get("user") or _local_user()
    ids = []
    if identity:
        ids.append(os.path.expanduser(identity))
    ids.extend(os.path.expanduser(i) for i in o.get("identityfile", []) if i.lower() != "none")
    jump = jump_host if jump_host is not None else o.get("proxyjump")
    hops: tuple[str, ...] = ()
    if jump and jump.lower() != "none":
        hops = tuple(h.strip() for h in jump.split(",") if h.strip())
        for i, h in enumerate(hops):
            _, hhost, hport = split_node(_strip_ssh_url(h))
            if hhost in (host, o.get("hostname", host)) and (hport or int(o.get("port", 22))) == port:
                # A jump through itself: `Host *` + `ProxyJump bastion` also matches
                # bastion. The hops before it are the way to it; the rest is moot.
                hops = hops[:i]
                break
    pc = o.get("proxycommand")
    if pc and pc.lower() == "none":
        pc = None
    if hops:
        pc = None  # OpenSSH: the first of ProxyJump/ProxyCommand wins; jump_host is explicit
    ukh = tuple(os.path.expanduser(p) for p in _multi(o.get("userknownhostsfile")))
    gkh = tuple(os.path.expanduser(p) for p in _multi(o.get("globalknownhostsfile")))
    ct = o.get("connecttimeout")
    root = None
    for env in _multi(o.get("setenv")):
        if env.startswith("KATACTL_HOST_ROOT="):
            root = env.split("=", 1)[1]
    hka = o.get("hostkeyalias")
    return Target(alias=host, hostname=_canonical_case(o.get("hostname", host)), port=port, user=who,
                  identity_files=tuple(dict.fromkeys(ids)), identities_only=_yes(o.get("identitiesonly", "no")),
                  proxy_command=pc, proxy_jump=hops, host_key_alias=hka.lower() if hka else None,
                  user_known_hosts=ukh or DEFAULT_USER_FILES,
                  global_known_hosts=gkh or DEFAULT_GLOBAL_FILES,
                  hash_known_hosts=_yes(o.get("hashknownhosts", "no")),
                  connect_timeout=float(ct) if ct and str(ct).isdigit() else None,
                  host_root=root, forward_agent=_yes(o.get("forwardagent", "no")))


def _canonical_case(host: str) -> str:
    """The host ssh connects to and looks up in known_hosts: lower-cased unless it is an
    address (openssh-portable ssh.c main(): "Don't lowercase addresses", with is_addr():
    a '%' or ':' in it, only digits and dots, or a numeric address to getaddrinfo)."""
    if "%" in host or ":" in host or not host.strip("0123456789."):
        return host
    try:
        socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return host.lower()
    return host


def lookup(cfg, host: str):
    """cfg.lookup(host), with only the blocks that can match host.

    paramiko's lookup tries every block, and for each that is not a match calls
    getpass.getuser() (for Match): ~28 ms per node with 1,024 ``Host`` blocks, 29 s for
    a 1,024-node fleet. Blocks whose patterns are all literal names (no ``*``/``?``/``[``,
    no ``!``) are indexed by name once per config; the others (wildcards, negations,
    Match) are kept for every host, in their order, so the result is the same."""
    idx = getattr(cfg, "_katactl_index", None)
    contexts = getattr(cfg, "_config", None)
    if not isinstance(contexts, list):
        return cfg.lookup(host)
    if idx is None or idx[0] != len(contexts):
        idx = (len(contexts), _index_blocks(contexts))
        try:
            cfg._katactl_index = idx
        except AttributeError:
            pass
    literal, always = idx[1]
    if literal is None:  # canonicalization can look up another name: every block
        return cfg.lookup(host)
    picked = literal.get(host)
    sub = copy.copy(cfg)
    sub._config = [contexts[i] for i in (sorted(always + picked) if picked else always)]
    return sub.lookup(host)


def _index_blocks(contexts: list) -> tuple[dict[str, list[int]] | None, list[int]]:
    literal: dict[str, list[int]] = {}
    always: list[int] = []
    for i, c in enumerate(contexts):
        if not isinstance(c, dict):
            return None, []
        conf = c.get("config") or {}
        if any(k.startswith("canonical") for k in conf):
            return None, []
        pats = c.get("host") or []
        if isinstance(pats, str):
            pats = pats.split(",")
        if c.get("matches") or not pats or any(not isinstance(p, str) or p.startswith("!")
                                               or any(ch in p for ch in "*?[") for p in pats):
            always.append(i)
            continue
        for p in dict.fromkeys(pats):
            literal.setdefault(p, []).append(i)
    return literal, always


def _strip_ssh_url(h: str) -> str:
    return h[len("ssh://"):] if h.startswith("ssh://") else h


def _multi(v) -> list[str]:
    if not v:
        return []
    if isinstance(v, list):
        v = " ".join(v)
    try:
        return shlex.split(v)
    except ValueError:
        return v.split()


def _local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "root"
