"""~/.ssh/config for katactl: paramiko's parser plus what it lacks.

paramiko.SSHConfig ignores ``Include`` and returns ProxyJump as a raw string.
This module reads Include files (globs, paths relative to ~/.ssh, nested up
to 16 levels) scoped as OpenSSH scopes them: a file included inside a Host or
Match block applies only when that block does, and cannot end the block it is
in (see _contexts); it appends /etc/ssh/ssh_config unless a config file
was chosen explicitly (``ssh -F`` semantics; --ssh-config/KATACTL_SSH_CONFIG/
the config file count as explicit), resolves one node name
``[user@]host[:port]`` into the parameters a connection needs (host names in
the case ``ssh -G`` prints them), and splits ProxyJump into hops. Honoured: HostName, Port, User, IdentityFile,
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
import functools
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
# Structure markers in config_text's text, read back by load(). Real comment lines are
# dropped when a file is read, so no line of a config can be taken for one.
_FILE, _BEGIN, _END = "#>file", "#>include", "#<include"


def expand_includes(path: str, depth: int = 0, base: str | None = None) -> str:
    """The config text with every Include replaced by the files it names, each between
    _BEGIN/_END markers: load() scopes a file to the block its Include is in."""
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
        if line.lstrip().startswith("#"):
            continue
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
                out += [f"{_BEGIN} {inc}", expand_includes(inc, depth + 1, base), _END]
    return "\n".join(out) + "\n"


_MATCH_EXEC = re.compile(r"^\s*match\b.*\bexec\b", re.I | re.M)


SYSTEM_CONFIG = "/etc/ssh/ssh_config"


def config_text(path: str | None, *, system: bool = False) -> str:
    """The effective config text: the user file, then (like ssh without -F) the
    system-wide file, each with its Includes expanded (relative to ~/.ssh and
    /etc/ssh respectively). First obtained value wins, as in OpenSSH.

    Without the system file the user file was chosen (--ssh-config, like `ssh -F`):
    missing, it is an error as for ssh, not a silent run with no config at all."""
    if path and not system and not os.path.exists(os.path.expanduser(path)):
        raise UsageError(f"SSH config {path}: no such file (given as ssh_config: --ssh-config, "
                         "KATACTL_SSH_CONFIG or the config file)")
    text = f"{_FILE} {path}\n" + expand_includes(path) if path else ""
    if system:
        text += f"{_FILE} {SYSTEM_CONFIG}\n" + expand_includes(SYSTEM_CONFIG, base="/etc/ssh")
    return text


def uses_match_exec(text: str) -> bool:
    """Whether the config text has a ``Match exec`` line."""
    return bool(_MATCH_EXEC.search(text))


_CACHE: dict[int, object] = {}


def load(text: str):
    """A paramiko.SSHConfig for config text (see config_text), cached by content."""
    key = hash(text)
    cfg = _CACHE.get(key)
    if cfg is None:
        try:
            cfg = _scoped_class()()
            cfg._config = _contexts(text)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - paramiko raises several types
            raise UsageError(f"SSH config: {e}") from None
        _CACHE[key] = cfg
    return cfg


def _contexts(text: str) -> list[dict]:
    """paramiko's blocks for config text, tagged with OpenSSH's Include scoping
    (openssh-portable readconf.c, oInclude and read_config_file_depth):

    - a file starts with its lines active: a top-level file always, an included one
      when the block its Include is in is active (else it is read with
      SSHCONF_NEVERMATCH: nothing in it applies). Every block of an included file is
      tagged ``_guard``: that enclosing block, which must be active too;
    - after each included file the enclosing block's state is restored (``*activep =
      oactive``): the lines that follow form a block tagged ``_same_as`` the one the
      Include was in, active exactly when it was, whatever the file ended with.
    """
    import paramiko

    out: list[dict] = []
    stack: list[tuple[dict | None, dict]] = []  # per open include: (its guard, the block it is in)
    guard: dict | None = None
    resume: dict | None = None  # the next chunk continues this block (after an include)
    chunk: list[str] = []

    def flush() -> None:
        # paramiko's parser, for the blocks (the stubs do not declare _config)
        blocks = paramiko.SSHConfig.from_text("\n".join(chunk))._config  # type: ignore[attr-defined]
        chunk.clear()
        first = blocks[0]  # paramiko's implicit block: the lines before any Host/Match
        if resume is not None:
            first["_same_as"] = resume
            root = resume
            while "_same_as" in root:
                root = root["_same_as"]
            # the same host/matches as the block it continues: lookup() indexes it alike
            first.pop("host", None)
            first.update({k: root[k] for k in ("host", "matches") if k in root})
        for b in blocks:
            if guard is not None:
                b["_guard"] = guard
        out.extend(blocks)

    for line in text.splitlines():
        if line.startswith(_FILE):
            flush()
            stack, guard, resume = [], None, None
        elif line.startswith(_BEGIN):
            flush()
            stack.append((guard, out[-1]))
            guard, resume = out[-1], None
        elif line.startswith(_END):
            flush()
            guard, resume = stack.pop()
        else:
            chunk.append(line)
    flush()
    return out


_SCOPED = None


def _claimed_by_rival(key: str, options) -> bool:
    """Whether a ProxyCommand/ProxyJump line comes too late: whichever is obtained first
    wins (ssh_config(5) ProxyJump). openssh-portable readconf.c parse_jump ignores a
    ProxyJump once proxy_command is set (``ProxyCommand none`` included), and a jump it
    takes sets proxy_command to "none", which shuts out a later ProxyCommand; ``ProxyJump
    none`` sets jump_host alone, so a later ProxyCommand still applies (as ``ssh -G``)."""
    if key == "proxyjump":
        return "proxycommand" in options
    if key == "proxycommand":
        return str(options.get("proxyjump", "none")).lower() != "none"
    return False


def _scoped_class():
    """paramiko.SSHConfig whose lookup honours _contexts' Include tags (made on first use:
    paramiko is imported only when SSH is)."""
    global _SCOPED
    if _SCOPED is None:
        import paramiko
        from paramiko.config import SSHConfigDict

        class ScopedSSHConfig(paramiko.SSHConfig):
            _original = ""  # the name as given, for Match originalhost (set per lookup)

            def lookup(self, hostname, user=None, port=None):
                """OpenSSH's passes (openssh-portable ssh.c main()), not paramiko's: the
                first matches Host patterns against the name as given; then the host is
                HostName (%h expanded) or that name, lower-cased unless an address, and
                canonicalized if asked. Only with CanonicalizeHostname or a ``Match final``
                does a final pass run, matching Host patterns against that host: ``Host
                node1`` applies to ``Node1`` only there (paramiko always re-reads, with
                the name as given).

                user is the command line's (``user@host``, ``ssh -l``): ssh sets
                options.user before reading the config, so ``Match user`` and ``%r`` see
                it and no ``User`` line replaces it (readconf.c match_cfg_line: ``ruser =
                options->user == NULL ? pw->pw_name : options->user``). port likewise
                (``host:port``, ``ssh -p``): no ``Port`` line replaces it and ``%p`` is it."""
                run = copy.copy(self)
                run._original = hostname
                seed = {k: v for k, v in (("user", user), ("port", port)) if v}
                options = run._lookup(hostname, SSHConfigDict(**seed) if seed else None)
                host = _canonical_case(_expand_h(options.get("hostname"), hostname) or hostname)
                canon = str(options.get("canonicalizehostname", "no")).lower()
                if canon in ("yes", "always") and not _is_addr(host) and not host.endswith(".") \
                        and host.count(".") <= int(options.get("canonicalizemaxdots", 1)) \
                        and (canon == "always" or not (options.get("proxycommand") or options.get("proxyjump"))):
                    domains = str(options.get("canonicaldomains", "")).split()
                    if domains:
                        host = self.canonicalize(host, options, domains)
                if canon in ("yes", "always") or _wants_final_pass(self._config):
                    options["hostname"] = host
                    options = run._lookup(host, options, canonical=True, final=True)
                else:
                    options.setdefault("hostname", hostname)
                # ProxyCommand's and ProxyJump's tokens are resolve()'s (expand_proxy_command):
                # paramiko's replace() chain knows no %n or %%, and turns %%h into %<host>
                raw = {k: options.pop(k) for k in ("proxycommand", "proxyjump") if k in options}
                options = run._expand_variables(options, hostname)
                options.update(raw)
                return options

            def _lookup(self, hostname, options=None, canonical=False, final=False):
                # paramiko's own _lookup, with a block's activity remembered for the
                # blocks that depend on it (evaluated once, as OpenSSH keeps oactive);
                # %-tokens are expanded once, by lookup
                if options is None:
                    options = SSHConfigDict()
                active: dict[int, bool] = {}
                for c in self._config:
                    g = c.get("_guard")
                    if g is not None and not active.get(id(g), False):
                        on = False
                    elif "_same_as" in c:
                        on = active.get(id(c["_same_as"]), False)
                    else:
                        on = bool(self._pattern_matches(c.get("host", []), hostname)
                                  or self._does_match(c.get("matches", []), hostname, canonical, final, options))
                    active[id(c)] = on
                    if not on:
                        continue
                    for key, value in c["config"].items():
                        if key in options:
                            if key == "identityfile":
                                options[key].extend(x for x in value if x not in options[key])
                        elif _claimed_by_rival(key, options):
                            continue
                        elif key == "connecttimeout" and value == "none":
                            continue  # parse_time stores `none` as -1, "unset": a later value applies
                        else:
                            options[key] = value[:] if value is not None else value
                return options

            def _does_match(self, match_list, target_hostname, canonical, final, options):
                """paramiko's, with OpenSSH's case rule: ``Match host`` and ``originalhost``
                compare the name and the patterns lower-cased (readconf.c match_cfg_line ->
                match.c match_hostname, which lowercase()s the host and matches with
                dolower=1), against HostName with %h expanded (or the name) and the name as
                given; the final pass's ``host`` is the lower-cased host lookup set."""
                original = self._original or target_hostname
                host = options.get("hostname")
                host = (host if final else _expand_h(host, original)) if host else original
                plain, cased = [], []
                for m in match_list:
                    if m["type"] in ("host", "originalhost"):
                        cased.append(m)
                    else:
                        plain.append(m)
                for m in cased:
                    name = host if m["type"] == "host" else original
                    pats = m["param"].split(",") if isinstance(m["param"], str) else m["param"]
                    if self._should_fail(self._pattern_matches([p.lower() for p in pats], name.lower()), m):
                        return False
                if not plain:
                    return cased
                # the rest (user, localuser, exec, canonical, final, all) as paramiko has them
                rest = super()._does_match(plain, original, canonical, final, options)
                return cased + rest if isinstance(rest, list) else rest  # True for Match all

        _SCOPED = ScopedSSHConfig
    return _SCOPED


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
    """Apply the SSH config to a node name. Explicit arguments win over the file.

    The node's ``user@``, else user (--ssh-user), is the command line's user: the config
    is read with it, as ssh reads it with ``user@host``/``-l`` (Match user, %r)."""
    nuser, host, nport = split_node(node)
    o = lookup(cfg, host, nuser or user, nport)
    port = nport or a2port(o.get("port"))
    who = o.get("user") or _local_user()
    ids = []
    if identity:
        ids.append(os.path.expanduser(identity))
    ids.extend(os.path.expanduser(i) for i in o.get("identityfile", []) if i.lower() != "none")
    jump = jump_host if jump_host is not None else o.get("proxyjump")
    hops: tuple[str, ...] = ()
    hka = o.get("hostkeyalias")
    hostname = _canonical_case(o.get("hostname", host))
    expand = functools.partial(expand_proxy_command, host=hostname, original=host, port=port, user=who,
                               key_alias=hka.lower() if hka else host)
    if jump and jump.lower() != "none":
        # -J's too: ssh runs a jump as a ProxyCommand (ssh -W) and expands it alike
        jump = expand(jump, what="ProxyJump")
        hops = tuple(h.strip() for h in jump.split(",") if h.strip())
        for i, h in enumerate(hops):
            _, hhost, hport = split_node(_strip_ssh_url(h))
            if hhost in (host, o.get("hostname", host)) and \
                    (hport or a2port(lookup(cfg, hhost).get("port"))) == port:  # the hop's own Port
                # A jump through itself: `Host *` + `ProxyJump bastion` also matches
                # bastion. The hops before it are the way to it; the rest is moot.
                hops = hops[:i]
                break
    # the lookup kept only the first of ProxyCommand/ProxyJump; -J, given before the config
    # is read (ssh.c sets jump_host and proxy_command "none"), overrides both
    pc = None if jump_host and jump_host.lower() != "none" else o.get("proxycommand")
    if pc and pc.lower() == "none":
        pc = None
    if pc:
        pc = expand(pc)
    ukh = tuple(os.path.expanduser(p) for p in _multi(o.get("userknownhostsfile")))
    gkh = tuple(os.path.expanduser(p) for p in _multi(o.get("globalknownhostsfile")))
    ct = o.get("connecttimeout")
    root = None
    for env in _multi(o.get("setenv")):
        if env.startswith("KATACTL_HOST_ROOT="):
            root = env.split("=", 1)[1]
    return Target(alias=host, hostname=hostname, port=port, user=who,
                  identity_files=tuple(dict.fromkeys(ids)), identities_only=_yes(o.get("identitiesonly", "no")),
                  proxy_command=pc, proxy_jump=hops, host_key_alias=hka.lower() if hka else None,
                  user_known_hosts=ukh or DEFAULT_USER_FILES,
                  global_known_hosts=gkh or DEFAULT_GLOBAL_FILES,
                  hash_known_hosts=_yes(o.get("hashknownhosts", "no")),
                  connect_timeout=float(convtime(ct, "ConnectTimeout")) or None if ct else None,
                  host_root=root, forward_agent=_yes(o.get("forwardagent", "no")))


def a2port(text: str | None) -> int:
    """A Port line's value as openssh-portable misc.c a2port() reads it (readconf.c oPort):
    a decimal number (strtonum: optional sign) or a service name from /etc/services
    (getservbyname), 1..65535; anything else is an error, as for ssh ("Bad port")."""
    if text is None:
        return 22
    if re.fullmatch(r"[+-]?[0-9]+", text):
        n = int(text)
    else:
        try:
            n = socket.getservbyname(text, "tcp")
        except (OSError, UnicodeError, ValueError):
            n = 0
    if not 0 < n < 65536:
        raise UsageError(f"SSH config: Port {text!r}: bad port (1-65535 or a service name)")
    return n


_PROXY_TOKEN = re.compile(r"%(.)|%$|~", re.S)


def valid_ruser(user: str) -> bool:
    """A user name as ssh accepts one from its command line (openssh-portable
    valid_ruser: ssh.c since OpenSSH 9.6, for CVE-2023-51385, misc.c with the control
    character test later; Debian's 9.2p1 carries the backport): not starting with ``-``, no
    control character, none of ``'`";&<>|(){}``, no space before a ``-``, no trailing
    backslash. The same rule for --ssh-user, KATACTL_SSH_USER and config.toml's ssh_user
    (they stand for ``ssh -l``); an ssh_config User line is the config's own, as for ssh."""
    if not user or user.startswith("-") or user.endswith("\\") or " -" in user:
        return False
    return not any(c in "'`\";&<>|(){}" or ord(c) < 0x20 or ord(c) == 0x7f for c in user)


def expand_proxy_command(command: str, *, host: str, original: str, port: int, user: str,
                         key_alias: str, what: str = "ProxyCommand") -> str:
    """ProxyCommand's (and ProxyJump's) tokens in one left-to-right pass, as openssh-portable
    sshconnect.c expand_proxy_command -> misc.c percent_expand: %% %h %n %p %r (ssh_config(5)
    TOKENS) and %k (the HostKeyAlias, else the name as given); ``%%h`` is ``%h``, an unknown
    token an error as for ssh ("unknown key"). In a ProxyCommand ``~`` is the home directory
    as paramiko's expansion had it: ssh runs the command through a shell,
    paramiko.ProxyCommand does not.

    A ProxyCommand is split into words first and each word expanded: paramiko.ProxyCommand
    splits the string it is given (shlex), so a value with a space or a quote (a User line,
    a home directory) must stay one word, never become more of the proxy's argv."""
    values = {"%": "%", "h": host, "n": original, "p": str(port), "r": user, "k": key_alias}

    def one(m: re.Match) -> str:
        if m.group(0) == "~":
            return os.path.expanduser("~") if what == "ProxyCommand" else "~"
        if m.group(1) not in values:
            raise UsageError(f"SSH config: {what} {command!r}: unknown token {m.group(0)!r} "
                             "(ssh_config(5) TOKENS: %%, %h, %n, %p, %r)")
        return values[m.group(1)]

    if what != "ProxyCommand":
        return _PROXY_TOKEN.sub(one, command)
    try:
        words = shlex.split(command)
    except ValueError as e:  # "No closing quotation": sh -c would refuse it as well
        raise UsageError(f"SSH config: ProxyCommand {command!r}: {e}") from None
    return shlex.join(_PROXY_TOKEN.sub(one, w) for w in words)


_TIME = re.compile(r"([+-]?[0-9]+)([smhdwSMHDW]?)")
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_INT_MAX = 2**31 - 1


def convtime(text: str, what: str) -> int:
    """Seconds in sshd_config(5) TIME FORMATS (``90``, ``1m30s``, ``1h``, ``2w``), read as
    openssh-portable misc.c convtime() reads them: integers, each with an optional unit, the
    total at most INT_MAX; anything else is an error, as for ssh ("invalid time value").
    (katactl.values.parse_duration is another grammar: it takes ``1.5``/``500ms``, no ``w``.)"""
    total, pos = 0, 0
    for m in _TIME.finditer(text):
        n = int(m.group(1))
        if m.start() != pos or n < 0:
            break
        total += n * _TIME_UNITS[m.group(2).lower()]
        pos = m.end()
        if total > _INT_MAX:
            break
    else:
        if pos == len(text) and pos:
            return total
    raise UsageError(f"SSH config: {what} {text!r}: invalid time value "
                     "(sshd_config(5) TIME FORMATS: 90, 1m30s, 1h)")


def _expand_h(value, host: str):
    """HostName's tokens: %h (the name) and %% only (ssh.c main(), percent_expand)."""
    if not value:
        return value
    return re.sub(r"%([%h])", lambda m: host if m.group(1) == "h" else "%", value)


def _wants_final_pass(contexts) -> bool:
    """A ``Match final`` anywhere asks OpenSSH for the final pass (readconf.c
    match_cfg_line sets want_final_pass; ``Match canonical`` alone does not)."""
    return any(isinstance(c, dict) and any(m.get("type") == "final" for m in c.get("matches") or [])
               for c in contexts)


def _is_addr(host: str) -> bool:
    """openssh-portable ssh.c is_addr(): a '%' or ':' in it, only digits and dots, or a
    numeric address to getaddrinfo."""
    if "%" in host or ":" in host or not host.strip("0123456789."):
        return True
    try:
        socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return False
    return True


def _canonical_case(host: str) -> str:
    """The host ssh connects to and looks up in known_hosts: lower-cased unless it is an
    address (openssh-portable ssh.c main(): "Don't lowercase addresses")."""
    return host if _is_addr(host) else host.lower()


def lookup(cfg, host: str, user: str | None = None, port: int | None = None):
    """cfg.lookup(host, user, port), with only the blocks that can match host.

    paramiko's lookup tries every block, and for each that is not a match calls
    getpass.getuser() (for Match): ~28 ms per node with 1,024 ``Host`` blocks, 29 s for
    a 1,024-node fleet. Blocks whose patterns are all literal names (no ``*``/``?``/``[``,
    no ``!``) are indexed by name once per config; the others (wildcards, negations,
    Match) are kept for every host, in their order, so the result is the same."""
    idx = getattr(cfg, "_katactl_index", None)
    contexts = getattr(cfg, "_config", None)
    if not isinstance(contexts, list):
        return cfg.lookup(host, user, str(port) if port else None)
    if idx is None or idx[0] != len(contexts):
        idx = (len(contexts), _index_blocks(contexts))
        try:
            cfg._katactl_index = idx
        except AttributeError:
            pass
    literal, always = idx[1]
    if literal is None:  # a final pass looks up another name: every block
        return cfg.lookup(host, user, str(port) if port else None)
    picked = literal.get(host)
    sub = copy.copy(cfg)
    sub._config = [contexts[i] for i in (sorted(always + picked) if picked else always)]
    return sub.lookup(host, user, str(port) if port else None)


def _index_blocks(contexts: list) -> tuple[dict[str, list[int]] | None, list[int]]:
    literal: dict[str, list[int]] = {}
    always: list[int] = []
    if _wants_final_pass(contexts):  # its Host patterns see another name (lower-cased, HostName)
        return None, []
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
