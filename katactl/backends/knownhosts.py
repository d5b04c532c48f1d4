"""OpenSSH known_hosts, read the way OpenSSH reads it (paramiko's loader is not enough).

Differences from ``paramiko.HostKeys`` (which katactl therefore does not use):

- ``@cert-authority`` and ``@revoked`` lines are understood instead of breaking
  the whole file; host certificates signed by a listed CA are trusted (type,
  principals, validity and the CA signature are checked), revoked keys are
  refused whatever the host pattern says;
- every entry remembers its file and line, so a changed key is reported as
  "~/.ssh/known_hosts:12" the way ``ssh`` does;
- hashed entries (``|1|salt|hash``), comma lists, ``*``/``?`` wildcards, ``!``
  negation and ``[host]:port`` keys are matched like OpenSSH's match_hostname;
- several files are read (user files first, then the global ones).

No paramiko import at module level: this module is pure parsing, and the
certificate check imports paramiko only when a certificate is presented.
"""
from __future__ import annotations

import base64
import dataclasses
import fnmatch
import hashlib
import hmac
import os
import struct
import threading
import time

from katactl.errors import HostKeyError

DEFAULT_USER_FILES = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_FILES = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


@dataclasses.dataclass(frozen=True)
class Entry:
    file: str
    line: int
    marker: str            # "", "@cert-authority" or "@revoked"
    patterns: str          # the raw host field ("|1|..|.." when hashed)
    keytype: str
    blob: bytes

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def matches(self, name: str) -> bool:
        return host_matches(self.patterns, name)


def host_key_name(host: str, port: int) -> str:
    """The name OpenSSH looks a host up under: host, or [host]:port off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def host_matches(field: str, name: str) -> bool:
    """OpenSSH match_hostname over a known_hosts host field."""
    name = name.lower()
    if field.startswith("|1|"):
        try:
            _, _, salt64, hash64 = field.split("|", 3)
            salt = base64.b64decode(salt64)
            want = base64.b64decode(hash64)
        except (ValueError, TypeError):
            return False
        got = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(got, want)
    matched = False
    for pat in field.split(","):
        pat = pat.strip().lower()
        if not pat:
            continue
        neg = pat.startswith("!")
        if neg:
            pat = pat[1:]
        if _glob(pat, name):
            if neg:
                return False
            matched = True
    return matched


def _glob(pat: str, name: str) -> bool:
    if "*" not in pat and "?" not in pat:
        return pat == name
    # fnmatch also knows [..] classes, which known_hosts uses literally in [host]:port.
    pat = pat.replace("[", "[[]")
    return fnmatch.fnmatchcase(name, pat)


#: a known_hosts line is ~100-800 bytes: 64 MiB is a fleet of 100,000s of keys
KNOWN_HOSTS_LIMIT = 64 << 20


def hash_name(name: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(20)
    h = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(h).decode()}"


def parse_file(path: str) -> list[Entry]:
    """Entries of one known_hosts file; bad lines are skipped (like ssh)."""
    from katactl.config import read_input

    try:
        data = read_input(path, "known_hosts file", KNOWN_HOSTS_LIMIT)
    except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
        return []
    out: list[Entry] = []
    for n, raw in enumerate(data.splitlines(), 1):
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        marker = ""
        if parts[0].startswith("@"):
            marker = parts[0].lower()
            if marker not in ("@cert-authority", "@revoked"):
                continue
            parts = parts[1:]
        if len(parts) < 3:
            continue
        hosts, keytype, b64 = parts[0], parts[1], parts[2]
        try:
            blob = base64.b64decode(b64, validate=True)
        except (ValueError, TypeError):
            continue
        if _blob_type(blob) != keytype:
            continue
        out.append(Entry(path, n, marker, hosts, keytype, blob))
    return out


class _Index:
    """Where a name can match in a list of entries, built once: plain host patterns in a
    dict (name -> positions); wildcard and negated fields in a list checked for every
    name; hashed fields with their salt and hash decoded once (one HMAC-SHA1 per hashed
    entry and name is unavoidable: each has its own salt), results kept per name."""

    def __init__(self, entries: list[Entry]):
        self.size = len(entries)
        self.plain: dict[str, list[int]] = {}
        self.general: list[tuple[int, str]] = []
        self.hashed: list[tuple[int, bytes, bytes]] = []
        self.memo: dict[str, tuple[int, ...]] = {}
        for i, e in enumerate(entries):
            field = e.patterns
            if field.startswith("|1|"):
                try:
                    _, _, salt64, hash64 = field.split("|", 3)
                    self.hashed.append((i, base64.b64decode(salt64), base64.b64decode(hash64)))
                except (ValueError, TypeError):
                    pass  # never matches (host_matches says False)
                continue
            pats = [p for p in (x.strip().lower() for x in field.split(",")) if p]
            if any(p.startswith("!") or "*" in p or "?" in p for p in pats):
                self.general.append((i, field))
                continue
            for p in dict.fromkeys(pats):
                self.plain.setdefault(p, []).append(i)

    def matching(self, name: str) -> tuple[int, ...]:
        """Positions of the entries whose host field matches name (host_matches), in order."""
        got = self.memo.get(name)
        if got is None:
            low = name.lower()
            pos = set(self.plain.get(low, ()))
            pos.update(i for i, field in self.general if host_matches(field, name))
            if self.hashed:
                key = low.encode()
                digest = hmac.digest
                pos.update(i for i, salt, want in self.hashed
                           if hmac.compare_digest(digest(salt, key, "sha1"), want))
            got = self.memo[name] = tuple(sorted(pos))
        return got


#: parsed files and their index, per (paths, their stat): several connections of one run
#: (a fan-out over 1,000 nodes) read and index each known_hosts file once
_LOADED: dict[tuple, tuple[list[Entry], _Index]] = {}
_LOAD_LOCK = threading.Lock()


def _file_key(path: str):
    try:
        st = os.stat(path)
    except OSError as e:
        return ("missing", e.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _load(files: list[str]) -> tuple[list[Entry], _Index]:
    key = tuple((f, _file_key(f)) for f in files)
    with _LOAD_LOCK:
        got = _LOADED.get(key)
        if got is None:
            entries: list[Entry] = []
            for f in files:
                entries.extend(parse_file(f))
            if len(_LOADED) > 64:
                _LOADED.clear()
            got = _LOADED[key] = (entries, _Index(entries))
    return got


class KnownHosts:
    """All entries of several files, in order (user files first)."""

    def __init__(self, files: list[str]):
        self.files = [os.path.expanduser(f) for f in files]
        entries, self._index = _load(self.files)
        self.entries: list[Entry] = list(entries)

    def for_host(self, names: list[str], marker: str = "") -> list[Entry]:
        if self._index.size != len(self.entries):  # entries added since (verify's accept-new)
            self._index = _Index(self.entries)
        pos: set[int] = set()
        for n in names:
            pos.update(self._index.matching(n))
        return [e for e in (self.entries[i] for i in sorted(pos)) if e.marker == marker]

    def known_types(self, names: list[str]) -> list[str]:
        """Key types known for the host (order kept), for host-key-algorithm ordering."""
        seen: dict[str, None] = {}
        for e in self.for_host(names):
            seen.setdefault(e.keytype, None)
        return list(seen)

    def has_ca_for(self, names: list[str]) -> bool:
        return bool(self.for_host(names, "@cert-authority"))

    def verify(self, names: list[str], keytype: str, blob: bytes, *, node: str,
               principal: str, accept_new_file: str | None = None, hash_new: bool = False) -> str:
        """Check a server's host key (plain or certificate). Returns how it was trusted.

        names: lookup names, the first is the canonical one ([host]:port or HostKeyAlias).
        node: a message prefix ("" or "jump host X: ").
        Raises HostKeyError (exit 7) when revoked, changed, or unknown without
        accept_new_file. A certificate that is not valid (expired, wrong principal) is
        checked again as its plain key, as OpenSSH's check_host_key does (sshconnect.c:
        "No matching CA found. Retry with plain key"; only a revoked key is final): a
        lapse in host-certificate rotation does not lock out hosts whose key is pinned.
        Its problem is then named in the trust text, and in the error if that fails too.
        """
        cert = None
        cert_problem = ""
        plain_type, plain_blob = keytype, blob
        if keytype.endswith("-cert-v01@openssh.com"):
            cert = parse_cert(blob)
            plain_type, plain_blob = cert.key_type, cert.key_blob
        for e in self.entries:
            if e.marker != "@revoked":
                continue
            if e.blob in (plain_blob, blob):
                raise HostKeyError(
                    f"{node}the host key ({plain_type} {fingerprint(plain_blob)}) is marked "
                    f"@revoked in {e.where}; refusing to connect")
            if cert is not None and e.blob == cert.ca_blob:
                raise HostKeyError(
                    f"{node}the CA that signed the host certificate ({fingerprint(cert.ca_blob)}) "
                    f"is marked @revoked in {e.where}; refusing to connect")
        if cert is not None:
            cas = [e for e in self.for_host(names, "@cert-authority") if e.blob == cert.ca_blob]
            if cas:
                problem = cert.problem(principal)
                if not problem:
                    return f"certificate signed by CA {fingerprint(cert.ca_blob)} ({cas[0].where})"
                cert_problem = (f"; its host certificate signed by the CA in {cas[0].where} "
                                f"is not valid: {problem}")
            # No trusted CA, or an invalid certificate: fall back to the plain key inside it.
        known = self.for_host(names)
        for e in known:
            if e.blob == plain_blob:
                return f"known key ({e.where}){cert_problem}"
        if known:
            e = next((k for k in known if _same_family(k.keytype, plain_type)), known[0])
            raise HostKeyError(
                f"{node}REMOTE HOST KEY CHANGED: the server offered {plain_type} "
                f"{fingerprint(plain_blob)} but {e.where} has {e.keytype} {fingerprint(e.blob)} "
                f"for {names[0]}; refusing to connect{cert_problem}",
                hint=f"if the change is expected, remove the old key: ssh-keygen -R '{names[0]}' "
                     f"-f {e.file} (offending line {e.line})",
                details={"knownHostsFile": e.file, "line": e.line, "host": names[0],
                         "offered": fingerprint(plain_blob), "known": fingerprint(e.blob)})
        if accept_new_file is None:
            where = ", ".join(self.files) or "no known_hosts file"
            raise HostKeyError(
                f"{node}unknown host key {plain_type} {fingerprint(plain_blob)} for {names[0]} "
                f"(not in {where}){cert_problem}",
                hint="add it with ssh-keyscan after checking its fingerprint, or pass "
                     "--ssh-accept-new to trust it on first use")
        add_entry(accept_new_file, names[0], plain_type, plain_blob, hashed=hash_new)
        self.entries.append(Entry(accept_new_file, 0, "", names[0], plain_type, plain_blob))
        return f"new key accepted and added to {accept_new_file}"


def _same_family(a: str, b: str) -> bool:
    return a.split("-")[:2] == b.split("-")[:2]


def add_entry(path: str, name: str, keytype: str, blob: bytes, *, hashed: bool = False) -> None:
    """Append one line (flock'ed; the directory is created 0700 like ~/.ssh).

    The name is written lower-cased, hashed or not, as OpenSSH's write_host_entry()
    (openssh-portable hostfile.c) does: lookups (host_matches, ssh, ssh-keygen -F) hash
    the lower-cased name, so a hash of 'Node-1' would never match again."""
    import fcntl

    path = os.path.expanduser(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, mode=0o700, exist_ok=True)
    name = name.lower()
    host = hash_name(name) if hashed else name
    line = f"{host} {keytype} {base64.b64encode(blob).decode()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# -- SSH wire helpers ---------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def string(self) -> bytes:
        if self.pos + 4 > len(self.data):
            raise ValueError("truncated")
        (n,) = struct.unpack_from(">I", self.data, self.pos)
        start = self.pos + 4
        if start + n > len(self.data):
            raise ValueError("truncated")
        self.pos = start + n
        return self.data[start:self.pos]

    def uint32(self) -> int:
        (v,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return v

    def uint64(self) -> int:
        (v,) = struct.unpack_from(">Q", self.data, self.pos)
        self.pos += 8
        return v


def _blob_type(blob: bytes) -> str | None:
    try:
        return _Reader(blob).string().decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def _pack(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


# number of wire strings/mpints in the public part of each base key type
_KEY_FIELDS = {"ssh-ed25519": 1, "ssh-rsa": 2, "ecdsa-sha2-nistp256": 2,
               "ecdsa-sha2-nistp384": 2, "ecdsa-sha2-nistp521": 2}


@dataclasses.dataclass
class Certificate:
    cert_type: str
    key_type: str
    key_blob: bytes
    serial: int
    type: int           # 1 user, 2 host
    key_id: str
    principals: list[str]
    valid_after: int
    valid_before: int
    critical: bytes
    ca_blob: bytes
    signed: bytes
    signature: bytes

    def problem(self, principal: str, now: float | None = None) -> str | None:
        """Why this host certificate must not be trusted for ``principal`` (None = fine)."""
        now = time.time() if now is None else now
        if self.type != 2:
            return "it is not a host certificate"
        if self.principals and principal.lower() not in (p.lower() for p in self.principals):
            return f"{principal!r} is not among its principals ({', '.join(self.principals)})"
        if now < self.valid_after:
            return "it is not valid yet"
        if now >= self.valid_before:
            return "it has expired"
        if self.critical:
            return "it carries critical options this client does not understand"
        if not verify_signature(self.ca_blob, self.signed, self.signature):
            return "the CA signature does not verify"
        return None


def parse_cert(blob: bytes) -> Certificate:
    try:
        r = _Reader(blob)
        ctype = r.string().decode("ascii")
        base = ctype.replace("-cert-v01@openssh.com", "")
        if base.startswith("rsa-sha2-"):
            base = "ssh-rsa"
        r.string()  # nonce
        fields = [r.string() for _ in range(_KEY_FIELDS[base])]
        key_blob = _pack(base.encode()) + b"".join(_pack(f) for f in fields)
        serial = r.uint64()
        typ = r.uint32()
        key_id = r.string().decode("utf-8", "replace")
        pr = _Reader(r.string())
        principals = []
        while pr.pos < len(pr.data):
            principals.append(pr.string().decode("utf-8", "replace"))
        va, vb = r.uint64(), r.uint64()
        critical = r.string()
        r.string()  # extensions
        r.string()  # reserved
        ca = r.string()
        signed = blob[:r.pos]
        sig = r.string()
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise HostKeyError(f"malformed host certificate: {e}") from None
    return Certificate(ctype, base, key_blob, serial, typ, key_id, principals, va, vb, critical,
                       ca, signed, sig)


def verify_signature(ca_blob: bytes, data: bytes, sig: bytes) -> bool:
    import paramiko
    from paramiko.message import Message

    ktype = _blob_type(ca_blob)
    if ktype is None:  # not a key blob: nothing to verify with
        return False
    try:
        ca = paramiko.PKey.from_type_string(ktype, ca_blob)
        return bool(ca.verify_ssh_sig(data, Message(sig)))
    except Exception:  # noqa: BLE001 - any failure means "not verified"
        return False
