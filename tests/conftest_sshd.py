"""Real OpenSSH sshd processes on loopback ports, for the SSH transport and fan-out tests.

``SshLab`` (usable without pytest: bench/bench_ssh.py builds 32 nodes with it)
creates throw-away host keys, a throw-away user key, a host CA, one sshd per
node (``sshd -D -f <own config>``, root login by key only, internal-sftp), and a
client side: an OpenSSH client config (the node Host blocks live in an
Included file) and known_hosts files. Each node serves its own node tree:
``SetEnv KATACTL_HOST_ROOT=<tree>`` in its Host block (see
katactl/backends/sshconfig.py), so one machine plays many nodes.

Session fixture ``sshd_lab`` has these nodes:
  node1..node4   normal; node1/node2 hashed known_hosts entries, node3
                 [127.0.0.1]:port, node4 only in the *global* known_hosts file
  jump1, jump2   jump hosts (debug logs record direct-tcpip forwards)
  behind         reached with ``ProxyJump jump1,jump2``
  viacmd         reached with ``ProxyCommand ssh -W %h:%p jump1`` (OpenSSH client)
  changed        known_hosts holds a different key for it (refused, exit 7)
  revoked        its key is listed @revoked
  certnode       only a host certificate signed by a CA listed @cert-authority
  expcert        an expired host certificate from that CA, and its plain key known too
  freeze         normal; tests SIGSTOP its sshd session processes (a node that stops
                 answering): nothing else may use it
  unknown        not in any known_hosts file (--ssh-accept-new)
  unreachable    a port nobody listens on
  slow           accepts TCP, never speaks SSH (handshake timeout)
"""
from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test/bench process dies (no orphan sshds)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def keygen(path: Path, kind: str = "ed25519", comment: str = "katactl-test") -> Path:
    subprocess.run([SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def pub(path: Path) -> tuple[str, str]:
    t, b64 = Path(str(path) + ".pub").read_text().split()[:2]
    return t, b64


@dataclasses.dataclass
class Node:
    name: str
    port: int
    root: Path
    host_key: Path | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def make_tree(root: Path, name: str) -> None:
    """A minimal node tree; sandbox data comes from katactl.lab.layout when present."""
    (root / "opt/kata/bin").mkdir(parents=True, exist_ok=True)
    rt = root / "opt/kata/bin/kata-runtime"
    rt.write_text(f"#!/bin/sh\necho 'kata-runtime : 3.2.0 ({name})'\n")
    rt.chmod(0o755)
    (root / "run/vc/sbs").mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/hostname").write_text(name + "\n")


class SshLab:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        for d in ("hk", "run", "log", "trees", "conf.d", "home"):
            (self.base / d).mkdir(exist_ok=True)
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privsep dir (root)
        except PermissionError:
            pass  # non-root: sshd runs unprivileged and only lets this same user in
        self.user = getpass.getuser()
        self.user_key = keygen(self.base / "user_key")
        self.ca_key = keygen(self.base / "host_ca", comment="katactl-test-ca")
        (self.base / "authorized_keys").write_text(Path(str(self.user_key) + ".pub").read_text())
        self.nodes: dict[str, Node] = {}
        self.known_hosts = self.base / "known_hosts"
        self.global_known_hosts = self.base / "global_known_hosts"
        self.config = self.base / "ssh_config"
        self._kh: list[str] = []
        self._gkh: list[str] = []
        self._blocks: list[str] = []
        self._listeners: list[socket.socket] = []

    # -- nodes ------------------------------------------------------------------
    def add_node(self, name: str, *, known: str = "plain", cert: bool = False, debug: bool = False,
                 proxy_jump: str | None = None, proxy_command: str | None = None,
                 tree: bool = True, env: dict | None = None, sshd_options: tuple[str, ...] = (),
                 cert_validity: str = "-5m:+1d") -> Node:
        """known: plain | hashed | global | changed | revoked | none | ca, or a
        comma list of them (``plain,ca``: the plain key and the CA both known)

        env: variables sshd sets for every session on this node (sshd_config
        ``SetEnv``, applied after sshd's own PATH), e.g. ``{"PATH": dir}`` for a
        node that lacks some programs. sshd_options: more sshd_config lines."""
        setenv = {"HOME": str(self.base / "home"), **(env or {})}
        if any(" " in f"{k}{v}" or '"' in f"{k}{v}" for k, v in setenv.items()):
            raise ValueError(f"SetEnv values must not contain spaces or quotes: {setenv}")
        port = free_port()
        root = self.base / "trees" / name
        if tree:
            make_tree(root, name)
        hk = keygen(self.base / "hk" / name)
        node = Node(name, port, root, hk, log=self.base / "log" / f"{name}.log")
        lines = [f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {hk}",
                 f"PidFile {self.base / 'run' / (name + '.pid')}",
                 f"AuthorizedKeysFile {self.base / 'authorized_keys'}",
                 "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
                 "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "Subsystem sftp internal-sftp", "MaxStartups 300:30:600",  # MaxSessions: default 10
                 "AllowTcpForwarding yes", "PrintMotd no", "PrintLastLog no", "UseDNS no",
                 f"LogLevel {'DEBUG1' if debug else 'ERROR'}",
                 # root's real ~/.bashrc (sourced by bash under sshd) must not
                 # slow or change the test nodes: a throw-away HOME. (sshd uses
                 # only its first SetEnv line: every variable goes on this one.)
                 "SetEnv " + " ".join(f"{k}={v}" for k, v in setenv.items()),
                 # so `ssh node` / parallel-ssh see the same per-node root as katactl
                 "AcceptEnv KATACTL_HOST_ROOT", *sshd_options]
        if cert:
            subprocess.run([SSH_KEYGEN, "-q", "-s", str(self.ca_key), "-I", f"{name}-host", "-h",
                            "-n", "127.0.0.1,localhost", "-V", cert_validity, str(hk) + ".pub"],
                           check=True, stdin=subprocess.DEVNULL)
            lines.append(f"HostCertificate {hk}-cert.pub")
        cfg = self.base / "run" / f"{name}.sshd_config"
        cfg.write_text("\n".join(lines) + "\n")
        node.proc = subprocess.Popen([SSHD, "-D", "-f", str(cfg), "-E", str(node.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        for k in known.split(","):
            self._known(name, port, hk, k)
        self._block(name, port, root if tree else None, proxy_jump, proxy_command)
        self.nodes[name] = node
        return node

    def add_unreachable(self, name: str) -> Node:
        port = free_port()
        node = Node(name, port, self.base / "trees" / name)
        self._block(name, port, None, None)
        self.nodes[name] = node
        return node

    def add_silent(self, name: str) -> Node:
        """Accepts TCP connections and never sends an SSH banner."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        self._listeners.append(s)
        held: list[socket.socket] = []

        def serve():
            while True:
                try:
                    c, _ = s.accept()
                except OSError:
                    return
                held.append(c)

        threading.Thread(target=serve, daemon=True).start()
        node = Node(name, s.getsockname()[1], self.base / "trees" / name, extra={"held": held})
        self._block(name, node.port, None, None)
        self.nodes[name] = node
        return node

    def _known(self, name: str, port: int, hk: Path, known: str) -> None:
        from katactl.backends.knownhosts import hash_name

        t, b64 = pub(hk)
        key = f"[127.0.0.1]:{port}"
        if known == "plain":
            self._kh.append(f"{key} {t} {b64}")
        elif known == "hashed":
            self._kh.append(f"{hash_name(key)} {t} {b64}")
        elif known == "global":
            self._gkh.append(f"{key} {t} {b64}")
        elif known == "changed":
            other = keygen(self.base / "hk" / f"{name}.old")
            ot, ob = pub(other)
            self._kh.append(f"# {name}: the key it had before it was reinstalled")
            self._kh.append(f"{key} {ot} {ob}")
        elif known == "revoked":
            self._kh.append(f"{key} {t} {b64}")
            self._kh.append(f"@revoked * {t} {b64}")
        elif known == "ca":
            ct, cb = pub(self.ca_key)
            line = f"@cert-authority 127.0.0.1,[127.0.0.1]:* {ct} {cb}"
            if line not in self._kh:
                self._kh.append(line)

    def _block(self, name: str, port: int, root: Path | None, proxy_jump: str | None,
               proxy_command: str | None = None) -> None:
        b = [f"Host {name}", "  HostName 127.0.0.1", f"  Port {port}"]
        if proxy_command:
            b.append(f"  ProxyCommand {proxy_command}")
        if root is not None:
            b.append(f"  SetEnv KATACTL_HOST_ROOT={root}")
        if proxy_jump:
            b.append(f"  ProxyJump {proxy_jump}")
        self._blocks.append("\n".join(b))

    def write_config(self) -> None:
        self.known_hosts.write_text("\n".join(self._kh) + "\n")
        self.global_known_hosts.write_text("\n".join(self._gkh) + "\n")
        (self.base / "conf.d" / "nodes.conf").write_text("\n\n".join(self._blocks) + "\n")
        self.config.write_text(
            f"# katactl test fleet\nInclude {self.base}/conf.d/*.conf\n\n"
            f"Host *\n  User {self.user}\n"
            f"  IdentityFile {self.user_key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            f"  GlobalKnownHostsFile {self.global_known_hosts}\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n  GSSAPIAuthentication no\n")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for n in self.nodes.values():
            if n.proc is None:
                continue
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", n.port), timeout=1) as s:
                        if s.recv(16).startswith(b"SSH-"):
                            break
                except OSError:
                    pass
                if n.proc.poll() is not None:
                    log = n.log.read_text() if n.log and n.log.exists() else ""
                    raise RuntimeError(f"sshd for {n.name} exited: {log[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd for {n.name} not ready")
                time.sleep(0.02)

    def session_pids(self, name: str) -> list[int]:
        """The node's per-connection sshd processes and their children (not the listener)."""
        def kids(pid: int) -> list[int]:
            out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
            return [int(p) for p in out.split()]

        todo, found = kids(self.nodes[name].proc.pid), []
        while todo:
            p = todo.pop()
            found.append(p)
            todo.extend(kids(p))
        return found

    def ssh_argv(self, node: str, *argv: str) -> list[str]:
        return ["ssh", "-F", str(self.config), node, "--", *argv]

    def stop(self) -> None:
        for s in self._listeners:
            s.close()
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                n.proc.terminate()
        for n in self.nodes.values():
            if n.proc is not None:
                try:
                    n.proc.wait(5)
                except subprocess.TimeoutExpired:
                    n.proc.kill()


def build_standard_lab(base: Path) -> SshLab:
    lab = SshLab(base)
    lab.add_node("node1", known="hashed")
    lab.add_node("node2", known="hashed")
    lab.add_node("node3", known="plain")
    lab.add_node("node4", known="global")
    lab.add_node("jump1", debug=True, tree=False)
    lab.add_node("jump2", debug=True, tree=False)
    lab.add_node("behind", proxy_jump="jump1,jump2")
    lab.add_node("viacmd", proxy_command=f"ssh -F {lab.config} -W %h:%p jump1")
    lab.add_node("changed", known="changed")
    lab.add_node("revoked", known="revoked")
    lab.add_node("certnode", known="ca", cert=True)
    lab.add_node("expcert", known="plain,ca", cert=True, cert_validity="-2d:-1d")
    lab.add_node("freeze", known="plain")
    lab.add_node("unknown", known="none")
    lab.add_node("rekeying", known="hashed", sshd_options=("RekeyLimit 1M",))  # sshd rekeys every MiB
    lab.add_unreachable("unreachable")
    lab.add_silent("slow")
    lab.write_config()
    lab.wait_ready()
    return lab


def settings_for(lab: SshLab, **kw):
    """Resolved settings for the lab's ssh_config (timeout= sets --request-timeout, 10 s by
    default; any other keyword is a settings flag)."""
    from katactl import config

    flags = {"ssh_config": str(lab.config), "request_timeout": kw.pop("timeout", 10.0)}
    flags.update(kw)
    return config.resolve(flags)


try:
    import pytest
except ImportError:  # pragma: no cover - bench use without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def sshd_lab():
        if not (os.path.exists(SSHD) and SSH_KEYGEN and shutil.which("ssh")):
            pytest.skip("OpenSSH (openssh-server, openssh-client) is not installed")
        # a short root of its own, not under pytest's basetemp: the nodes' sockets (CLH API,
        # shims) must fit AF_UNIX's 108 bytes, and pytest-xdist adds popen-gwN/ to basetemp
        root = tempfile.mkdtemp(prefix="sl-", dir="/tmp")
        lab = build_standard_lab(Path(root))
        yield lab
        from katactl.backends import ssh

        ssh.close_pool()
        lab.stop()
        shutil.rmtree(root, ignore_errors=True)

    @pytest.fixture
    def ssh_open(sshd_lab):
        """open_(node, **settings_for keywords): an SSHTransport to a lab node."""
        from katactl.backends.ssh import SSHTransport

        def open_(node, **kw):
            return SSHTransport.from_settings(node, settings_for(sshd_lab, **kw))

        return open_
