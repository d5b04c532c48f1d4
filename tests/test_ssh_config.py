"""known_hosts and ssh_config parsing (no sshd needed)."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from katactl.backends import knownhosts as kh
from katactl.backends import sshconfig
from katactl.errors import HostKeyError, UsageError

ED = "ssh-ed25519"
BLOB = base64.b64decode("AAAAC3NzaC1lZDI1NTE5AAAAIHk0V5ow4WzPeJ0sXyNlcgLxKh3uEwU8i0ChsvW0f3PZ")
B64 = base64.b64encode(BLOB).decode()


@pytest.mark.parametrize("field,name,want", [
    ("node1", "node1", True),
    ("NODE1", "node1", True),
    ("node1,node2", "node2", True),
    ("node1", "node10", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "example.com", False),
    ("node?", "node7", True),
    ("!bad.example.com,*.example.com", "bad.example.com", False),
    ("!bad.example.com,*.example.com", "ok.example.com", True),
    ("[10.0.0.1]:2222", "[10.0.0.1]:2222", True),
    ("[10.0.0.1]:*", "[10.0.0.1]:2222", True),
    ("10.0.0.1", "[10.0.0.1]:2222", False),
    ("[10.0.0.1]:2222", "10.0.0.1", False),
    (kh.hash_name("node1", b"s" * 20), "node1", True),  # fixed salt: stable test ids
    (kh.hash_name("node1", b"s" * 20), "node2", False),
    ("|1|notbase64|???", "node1", False),
    ("", "node1", False),
])
def test_host_matches(field, name, want):
    assert kh.host_matches(field, name) is want


def test_host_key_name():
    assert kh.host_key_name("h", 22) == "h"
    assert kh.host_key_name("h", 2222) == "[h]:2222"


def test_loader_tolerates_markers_and_garbage(tmp_path):
    f = tmp_path / "known_hosts"
    f.write_bytes((
        "# comment\n"
        f"node1 {ED} {B64}\r\n"
        f"@cert-authority *.example.com {ED} {B64}\n"
        f"@revoked * {ED} {B64}\n"
        f"@unknown-marker node1 {ED} {B64}\n"
        "garbage\n"
        f"node2 {ED} !!!notbase64!!!\n"
        f"node3 ssh-rsa {B64}\n"           # type does not match the blob
        "\n"
        f"{kh.hash_name('[node4]:2222')} {ED} {B64} trailing comment\n"
    ).encode())
    es = kh.parse_file(str(f))
    assert [(e.line, e.marker) for e in es] == [(2, ""), (3, "@cert-authority"), (4, "@revoked"), (10, "")]
    assert kh.parse_file(str(tmp_path / "missing")) == []


def test_verify_outcomes(tmp_path):
    other = bytearray(BLOB)
    other[-1] ^= 1
    other = bytes(other)
    f = tmp_path / "kh"
    f.write_text(f"[h]:2222 {ED} {B64}\n")
    k = kh.KnownHosts([str(f)])
    assert "known key" in k.verify(["[h]:2222"], ED, BLOB, node="", principal="h")
    with pytest.raises(HostKeyError) as ei:
        k.verify(["[h]:2222"], ED, other, node="", principal="h")
    assert f"{f}:1" in ei.value.message and ei.value.exit_code == 7
    with pytest.raises(HostKeyError, match="unknown host key"):
        k.verify(["[new]:2222"], ED, other, node="", principal="new")
    new = tmp_path / "sub" / "accepted"
    assert "accepted" in k.verify(["[new]:2222"], ED, other, node="", principal="new",
                                  accept_new_file=str(new), hash_new=True)
    text = new.read_text()
    assert text.startswith("|1|") and "[new]" not in text
    assert "known key" in kh.KnownHosts([str(new)]).verify(["[new]:2222"], ED, other, node="", principal="new")
    (tmp_path / "rev").write_text(f"@revoked * {ED} {B64}\n[h]:2222 {ED} {B64}\n")
    with pytest.raises(HostKeyError, match="@revoked"):
        kh.KnownHosts([str(tmp_path / "rev")]).verify(["[h]:2222"], ED, BLOB, node="", principal="h")


needs_keygen = pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="ssh-keygen missing")


@needs_keygen
@pytest.mark.parametrize("extra,principal,problem", [
    (["-h", "-n", "node1"], "node1", None),
    (["-h", "-n", "node1"], "node2", "not among its principals"),
    (["-n", "node1"], "node1", "not a host certificate"),
    (["-h", "-n", "node1", "-V", "20200101:20200102"], "node1", "expired"),
    (["-h", "-n", "node1", "-V", "+1d:+2d"], "node1", "not valid yet"),
])
def test_certificate_checks(tmp_path, extra, principal, problem):
    for n in ("ca", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / n)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "t", *extra,
                    str(tmp_path / "host.pub")], check=True)
    ctype, b64 = (tmp_path / "host-cert.pub").read_text().split()[:2]
    cert = kh.parse_cert(base64.b64decode(b64))
    got = cert.problem(principal)
    assert (got is None) if problem is None else (problem in got)
    # a forged signature never verifies
    blob = bytearray(base64.b64decode(b64))
    blob[-5] ^= 0xFF
    forged = kh.parse_cert(bytes(blob))
    if problem is None:
        assert "signature" in forged.problem(principal)
    ca_t, ca_b64 = (tmp_path / "ca.pub").read_text().split()[:2]
    assert forged.ca_blob == base64.b64decode(ca_b64)


@needs_keygen
def test_a_revoked_ca_is_named_as_the_ca(tmp_path):
    """@revoked on the CA refuses its certificates, and the error names the CA's key, not
    the host's (which is not the one revoked)."""
    for n in ("ca", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / n)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "t", "-h", "-n", "node1",
                    str(tmp_path / "host.pub")], check=True)
    ctype, b64 = (tmp_path / "host-cert.pub").read_text().split()[:2]
    ca_t, ca_b64 = (tmp_path / "ca.pub").read_text().split()[:2]
    (tmp_path / "kh").write_text(f"@cert-authority * {ca_t} {ca_b64}\n@revoked * {ca_t} {ca_b64}\n")
    ca_fp = kh.fingerprint(base64.b64decode(ca_b64))
    with pytest.raises(HostKeyError, match=f"CA that signed the host certificate \\({re.escape(ca_fp)}\\) is marked @revoked"):
        kh.KnownHosts([str(tmp_path / "kh")]).verify(["node1"], ctype, base64.b64decode(b64), node="",
                                                     principal="node1")


def test_parse_cert_garbage():
    with pytest.raises(HostKeyError, match="malformed"):
        kh.parse_cert(b"\x00\x00\x00\x20ssh-ed25519-cert-v01@openssh.com")


# -- ssh config --------------------------------------------------------------------------
def test_include_glob_nested_and_relative(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-a.conf").write_text("Host a\n  HostName 10.0.0.1\n  Include more.conf\n")
    (tmp_path / "conf.d" / "20-b.conf").write_text("Host b\n  Port 2200\n")
    (tmp_path / "more.conf").write_text("  User alice\n")
    main = tmp_path / "config"
    main.write_text(f"Include {tmp_path}/conf.d/*.conf\nHost *\n  User bob\n  IdentityFile ~/id_x\n")
    text = sshconfig.expand_includes(str(main), base=str(tmp_path))
    assert "HostName 10.0.0.1" in text and "User alice" in text and "Port 2200" in text
    cfg = sshconfig.load(sshconfig.config_text(str(main)))
    t = sshconfig.resolve("a", cfg)
    assert (t.hostname, t.port, t.user) in (("10.0.0.1", 22, "alice"), ("10.0.0.1", 22, "bob"))
    t = sshconfig.resolve("carol@b:2201", cfg, identity="/k")
    assert (t.hostname, t.port, t.user) == ("b", 2201, "carol")
    assert t.identity_files[0] == "/k"


def test_include_loop_is_an_error(tmp_path):
    f = tmp_path / "loop"
    f.write_text(f"Include {f}\n")
    with pytest.raises(UsageError, match="nested too deeply"):
        sshconfig.expand_includes(str(f))


def test_resolve_proxyjump_setenv_and_overrides(tmp_path):
    f = tmp_path / "config"
    f.write_text("Host n1\n  HostName 10.1.1.1\n  Port 2022\n  ProxyJump j1,ssh://u@j2:2200\n"
                 "  SetEnv LANG=C KATACTL_HOST_ROOT=/srv/n1\n"
                 "Host n2\n  ProxyCommand nc %h %p\n  HostKeyAlias n2-alias\n"
                 "Host n3\n  ProxyJump none\n")
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    t = sshconfig.resolve("n1", cfg, user="root")
    assert t.proxy_jump == ("j1", "ssh://u@j2:2200")
    assert t.host_root == "/srv/n1" and t.port == 2022 and t.user == "root"
    assert sshconfig.resolve("n1", cfg, jump_host="other").proxy_jump == ("other",)
    t2 = sshconfig.resolve("n2", cfg)
    assert t2.proxy_command == "nc n2 22" and t2.host_key_alias == "n2-alias"
    assert sshconfig.resolve("n3", cfg).proxy_jump == ()


def test_a_jump_through_itself_is_dropped(tmp_path):
    """`Host *` + `ProxyJump bastion` matches bastion too: bastion is reached
    directly, and a chain is cut where it reaches the host itself (issue 16, 14)."""
    f = tmp_path / "config"
    f.write_text("Host bastion\n  HostName 10.0.0.1\n  Port 2200\nHost inner\n  ProxyJump outer,inner,x\n"
                 "Host *\n  ProxyJump bastion\n")
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    assert sshconfig.resolve("node1", cfg).proxy_jump == ("bastion",)
    assert sshconfig.resolve("bastion", cfg).proxy_jump == ()
    assert sshconfig.resolve("10.0.0.1:2200", cfg).proxy_jump == ("bastion",)  # another host's Host block
    assert sshconfig.resolve("inner", cfg).proxy_jump == ("outer",)
    assert sshconfig.resolve("bastion:22", cfg).proxy_jump == ("bastion",)  # another port: another host


@pytest.mark.parametrize("bad", ["a b", "user@", "@host", "h:0", "h:70000", "h:x"])
def test_split_node_rejects(bad):
    with pytest.raises(UsageError):
        sshconfig.split_node(bad)


def test_split_node_ipv6():
    assert sshconfig.split_node("root@[::1]:2222") == ("root", "::1", 2222)


def test_system_config_only_without_explicit_file(tmp_path, monkeypatch):
    """Like ssh: /etc/ssh/ssh_config applies after the user file, unless -F/--ssh-config."""
    from katactl import config
    from katactl.backends.ssh import _Options

    system = tmp_path / "ssh_config"
    system.write_text("Host *\n  User sysuser\n  Port 2201\n  HashKnownHosts yes\n")
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", str(system))
    user = tmp_path / "user_config"
    user.write_text("Host n1\n  User me\n")
    t = sshconfig.resolve("n1", sshconfig.load(sshconfig.config_text(str(user), system=True)))
    assert (t.user, t.port, t.hash_known_hosts) == ("me", 2201, True)
    t = sshconfig.resolve("n1", sshconfig.load(sshconfig.config_text(str(user), system=False)))
    assert (t.user, t.port, t.hash_known_hosts) == ("me", 22, False)
    assert _Options(config.resolve({})).system_config is True
    assert _Options(config.resolve({"ssh_config": str(user)})).system_config is False


def test_match_exec_detection():
    assert sshconfig.uses_match_exec('Host a\nMatch exec "test -f /x"\n  User b\n')
    assert sshconfig.uses_match_exec("  match host a exec true\n")
    assert not sshconfig.uses_match_exec("Host exec\n  User b\n")


# -- names are compared and written lower-cased, as OpenSSH does ---------------------------
@pytest.mark.parametrize("hashed", [False, True])
def test_add_entry_writes_the_name_lowercased_as_openssh_does(tmp_path, hashed):
    """OpenSSH hostfile.c write_host_entry() lowercases the host before host_hash() or
    writing it; an entry hashed from 'Kata-Node-1' would match no lookup (they hash the
    lower-cased name), neither katactl's nor ssh-keygen -F's."""
    f = tmp_path / "known_hosts"
    kh.add_entry(str(f), "Kata-Node-1", ED, BLOB, hashed=hashed)
    kh.add_entry(str(f), "[Node-2.Example]:2222", ED, BLOB, hashed=hashed)
    field1, field2 = (line.split()[0] for line in f.read_text().splitlines())
    assert kh.host_matches(field1, "kata-node-1") and kh.host_matches(field2, "[node-2.example]:2222")
    if not hashed:
        assert (field1, field2) == ("kata-node-1", "[node-2.example]:2222")
    if shutil.which("ssh-keygen"):
        for name in ("kata-node-1", "[node-2.example]:2222"):
            r = subprocess.run(["ssh-keygen", "-F", name, "-f", str(f)], capture_output=True, text=True)
            assert r.returncode == 0 and B64 in r.stdout, (name, r.stdout, r.stderr)


#: Host blocks with capitals in their patterns, HostName and HostKeyAlias: OpenSSH
#: matches Host patterns case-sensitively, then lowercases the host it connects to
#: (HostName, or the name given) unless it is an address, and the HostKeyAlias
#: (ssh.c main(): "Don't lowercase addresses"; lowercase(options.host_key_alias)).
CASE_CONFIG = """\
Host node1
  Port 2201
Host NODE2
  Port 2202
  HostKeyAlias Kata-Node-2
Host Mixed3
  HostName Real-Host.Example
Host v6
  HostName FE80::ABCD
Host pct
  HostName %h.Example.COM
"""


@pytest.mark.parametrize("node", ["NODE1", "node1", "NODE2", "node2", "Mixed3", "mixed3", "v6", "pct",
                                  "10.0.0.1", "[FE80::1]", "Upper.Example", "User@Upper:2200"])
def test_resolve_canonicalises_case_like_ssh_G(tmp_path, node):
    """sshconfig.resolve gives what `ssh -G` prints for hostname, port, user, hostkeyalias."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    f = tmp_path / "config"
    f.write_text(CASE_CONFIG)
    t = sshconfig.resolve(node, sshconfig.load(sshconfig.config_text(str(f))))
    g = _ssh_G(f, node)
    assert (t.hostname, str(t.port), t.user, t.host_key_alias) == \
        (g["hostname"], g["port"], g["user"], g.get("hostkeyalias")), (node, g)


def _ssh_G(config, node: str) -> dict:
    """`ssh -G` for node under config alone (-F): its keys, first value each."""
    user, host, port = sshconfig.split_node(node)
    argv = ["ssh", "-G", "-F", str(config)] + (["-l", user] if user else []) + (["-p", str(port)] if port else [])
    r = subprocess.run([*argv, host], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True)
    out: dict = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(" ")
        out.setdefault(k, v)
    return out


# -- Include is scoped to the block it is in (readconf.c oInclude), checked against ssh -G ----
def _include_corpus(d) -> dict[str, str]:
    """Included files, and configs that include them at top level, inside a matching and a
    non-matching Host, inside Match, nested, by glob, and matching no file."""
    files = {
        "inc-any.conf": "Host *\n  User intruder\n  Port 2222\n",
        "inc-other.conf": "Host other\n  User bob\n",
        "inc-top.conf": "User topuser\nConnectTimeout 9\nHost *\n  Port 2223\n",
        "inc-match.conf": "Match host node1\n  ConnectTimeout 7\nMatch originalhost node2\n  User m2\n",
        "inc-nested.conf": f"HostKeyAlias nested-top\nInclude {d}/inc-other.conf\nUser nested-after\n",
        "inc-nested-host.conf": f"Host node1\n  Include {d}/inc-top.conf\n  HostKeyAlias n1-after\n"
                                f"Host node2\n  Include {d}/inc-top.conf\n",
        "g/10-a.conf": "Host other\n  User g-a\n",
        "g/20-b.conf": "Port 2299\n",
    }
    for name, text in files.items():
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_text(text)
    return {
        "review": f"Host jumpbox-only\n  Include {d}/inc-any.conf\n\n"
                  f"Host node1\n  Include {d}/inc-other.conf\n  Port 2200\n  User alice\n",
        "top": f"Include {d}/inc-other.conf\nUser after-top\nHost node2\n  Port 2202\n",
        "in-host": f"Host node1\n  Include {d}/inc-top.conf\n  HostKeyAlias afterinc\n"
                   f"Host node2\n  Include {d}/inc-top.conf\n",
        "in-match": f"Match host node1\n  Include {d}/inc-match.conf\n  User after-m\n"
                    f"Host *\n  Include {d}/inc-match.conf\n",
        "nested": f"Host node*\n  Include {d}/inc-nested.conf\n  Port 2201\n",
        "nested-host": f"Include {d}/inc-nested-host.conf\nHost *\n  User last\n",
        "glob": f"Host node1\n  Include {d}/g/*.conf\n  HostKeyAlias g-after\nHost zzz\n  Include {d}/g/*.conf\n",
        "no-file": f"Host node1\n  Include {d}/none-*.conf\n  User still-n1\n",
        "inactive-top": f"Host zzz\n  Include {d}/inc-top.conf\n  User z\nHost *\n  User everyone\n",
    }


@pytest.mark.parametrize("case", ["review", "top", "in-host", "in-match", "nested", "nested-host", "glob",
                                  "no-file", "inactive-top"])
def test_include_scope_matches_ssh_G(tmp_path, case):
    """What OpenSSH reads from an Include depends on the block around it: inside an
    inactive block nothing in the file applies (SSHCONF_NEVERMATCH), and the enclosing
    block's state is restored after it ("don't let Match in includes clobber the
    containing file's Match state"); inlining the text let the file's blocks leak."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    f = tmp_path / "config"
    f.write_text(_include_corpus(tmp_path)[case])
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    for node in ("node1", "node2", "node3", "other"):
        t = sshconfig.resolve(node, cfg)
        g = _ssh_G(f, node)
        ct = g["connecttimeout"]
        assert (t.user, t.hostname, str(t.port), t.host_key_alias, t.connect_timeout) == \
            (g["user"], g["hostname"], g["port"], g.get("hostkeyalias"), None if ct == "none" else float(ct)), \
            (case, node, f.read_text())


def test_the_system_file_starts_outside_the_user_files_last_block(tmp_path, monkeypatch):
    """ssh reads ~/.ssh/config and then /etc/ssh/ssh_config as two files, each starting
    with every line active: the system file's top lines are not the user file's last Host's."""
    system = tmp_path / "ssh_config"
    system.write_text("User sysuser\nHost *\n  Port 2201\n")
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", str(system))
    user = tmp_path / "user_config"
    user.write_text("Host other\n  User me\n")
    cfg = sshconfig.load(sshconfig.config_text(str(user), system=True))
    assert (sshconfig.resolve("n1", cfg).user, sshconfig.resolve("n1", cfg).port) == ("sysuser", 2201)
    assert sshconfig.resolve("other", cfg).user == "me"


def test_an_explicit_ssh_config_that_does_not_exist_is_a_usage_error(cli, tmp_path):
    """Like `ssh -F missing`: a chosen file that is not there stops the run (exit 2, one
    line) instead of connecting with no configuration at all; the default
    ~/.ssh/config may be missing."""
    missing = tmp_path / "typo" / "ssh_config"
    r = cli(["--ssh-config", str(missing), "-N", "node1", "version"])
    assert r.exit_code == 2
    assert f"SSH config {missing}: no such file" in r.stderr and "Traceback" not in r.stderr
    text = sshconfig.config_text(str(missing), system=True)  # the default path: no error
    assert str(missing) in text


# -- the case of the name in Match host/originalhost and OpenSSH's final pass, against ssh -G ----
#: OpenSSH lower-cases the name and the patterns for Match host/originalhost (readconf.c
#: match_cfg_line -> match.c match_hostname), and with CanonicalizeHostname or a Match final
#: it reads the config again, matching Host patterns against the host lower-cased, HostName
#: applied (ssh.c main()); paramiko compares case-sensitively and re-reads with the name given.
CASE_MATCH_CONFIGS = {
    "m-orig": "Match originalhost node1\n  Port 2001\n",
    "m-host": "Match host node1\n  User ops\n",
    "m-host-upper-pat": "Match host NODE1,Other\n  User up\n",
    "canon-nodomain": "CanonicalizeHostname yes\nHost node1\n  Port 2002\n",
    "canon-jump": "CanonicalizeHostname yes\nHost Node1\n  ProxyJump bastion\nHost node1\n  Port 2002\n",
    "final": "Match final\n  ConnectTimeout 5\nHost node1\n  Port 2003\n",
    "final-mixed": "Host Node1\n  Port 2004\nMatch final\nHost node1\n  User fin\n",
    "final-hostname": "Match final\nHost alias1\n  HostName Real.Example\nHost real.example\n  Port 2005\n"
                      "Host Real.Example\n  User realup\n",
    "final-ip": "Match final\nHost 10.0.0.1\n  Port 2006\nHost FE80::1\n  User v6\nHost fe80::1\n  User v6l\n",
    "m-host-ip": "Match host 10.0.0.*\n  User ipu\nMatch host fe80::*\n  Port 2010\n",
    "m-host-hostname": "Host *\n  HostName %h.Example.COM\nMatch host node1.example.com\n  Port 2007\n",
    "m-orig-neg": "Match originalhost NODE1,!other\n  User neg\n",
    "m-not-host": "Match !host node1\n  User notn1\n",
    "m-canonical": "Match canonical host node1\n  Port 2008\nHost *\n  User u\n",
    "m-canonical-final": "Match canonical host node1\n  Port 2008\nMatch final\n  User f\n",
    "host-upper": "Host NODE1 Other\n  Port 2009\n",
    "host-glob": "Match final\nHost n*1\n  Port 2011\nHost N*\n  User cap\n",
    "m-user": "Match user ROOT\n  Port 2012\nMatch localuser root\n  User lu\n",
    "m-canonical-all": "Match canonical all\n  Port 2013\nMatch final\n  User f\n",
    "final-match-host": "Host Node1\n  HostName Target.Example\nMatch final host target.example\n  User tf\n",
}
CASE_MATCH_NAMES = ["Node1", "NODE1", "node1", "node2", "Other", "10.0.0.1", "[FE80::1]", "[fe80::1]", "alias1", "ALIAS1"]


@pytest.mark.parametrize("case, node, want", [
    ("m-orig", "Node1", ("node1", 2001, "root")),           # the review's four (ssh -G's answers)
    ("m-host", "Node1", ("node1", 22, "ops")),
    ("canon-nodomain", "Node1", ("node1", 2002, "root")),   # was a KeyError: no CanonicalDomains
    ("final", "Node1", ("node1", 2003, "root")),
    ("final-mixed", "Node1", ("node1", 2004, "fin")),        # Host Node1 first, Host node1 finally
    ("final-hostname", "ALIAS1", ("alias1", 22, "root")),   # Host alias1 never matches ALIAS1
    ("final-hostname", "alias1", ("real.example", 2005, "root")),  # the final pass sees HostName, lower-cased
    ("final-ip", "[FE80::1]", ("FE80::1", 22, "v6")),       # an address keeps its case
    ("m-host-hostname", "Node1", ("node1.example.com", 2007, "root")),
    ("m-canonical", "Node1", ("node1", 22, "u")),           # Match canonical alone: no final pass
])
def test_match_host_and_the_final_pass_use_openssh_case(tmp_path, case, node, want):
    """("root" = the local user, ssh's default.)"""
    f = tmp_path / "config"
    f.write_text(CASE_MATCH_CONFIGS[case])
    t = sshconfig.resolve(node, sshconfig.load(sshconfig.config_text(str(f))))
    assert (t.hostname, t.port, t.user) == (want[0], want[1], sshconfig._local_user() if want[2] == "root" else want[2])


@pytest.mark.parametrize("case", sorted(CASE_MATCH_CONFIGS))
def test_case_and_final_pass_corpus_matches_ssh_G(tmp_path, case):
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    f = tmp_path / "config"
    f.write_text(CASE_MATCH_CONFIGS[case])
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    for node in CASE_MATCH_NAMES:
        t = sshconfig.resolve(node, cfg)
        g = _ssh_G(f, node)
        ct = g["connecttimeout"]
        assert (t.hostname, str(t.port), t.user, t.connect_timeout) == \
            (g["hostname"], g["port"], g["user"], None if ct == "none" else float(ct)), (case, node)


# -- ProxyCommand vs ProxyJump: the first one obtained wins, `none` included ----------------
#: ssh_config(5) ProxyJump: "this option will compete with the ProxyCommand option - whichever
#: is specified first will prevent later instances of the other option from taking effect"
#: (readconf.c oProxyCommand skips when jump_host is set; parse_jump when proxy_command is).
PROXY_CONFIGS = {
    "command-first": ("Host node1\n  ProxyCommand nc -x socks:1080 %h %p\nHost *\n  ProxyJump bastion\n",
                      (), "nc -x socks:1080 node1 22"),
    "command-none-first": ("Host node1\n  ProxyCommand none\nHost *\n  ProxyJump bastion\n", (), None),
    # `ProxyJump none` sets jump_host alone: a later ProxyJump is out, a later ProxyCommand is not
    "jump-none-first": ("Host node1\n  ProxyJump none\nHost *\n  ProxyCommand nc %h %p\n", (), "nc node1 22"),
    "jump-none-then-jump": ("Host node1\n  ProxyJump none\nHost *\n  ProxyJump b\n", (), None),
    "jump-first": ("Host node1\n  ProxyJump j1,j2\nHost *\n  ProxyCommand nc %h %p\n", ("j1", "j2"), None),
    "same-block-jump-first": ("Host node1\n  ProxyJump j1\n  ProxyCommand nc %h %p\n", ("j1",), None),
    "same-block-command-first": ("Host node1\n  ProxyCommand nc %h %p\n  ProxyJump j1\n", (), "nc node1 22"),
    "match-command-first": ("Match originalhost node1\n  ProxyCommand nc %h %p\nHost *\n  ProxyJump b\n",
                            (), "nc node1 22"),
}


@pytest.mark.parametrize("case", sorted(PROXY_CONFIGS))
def test_proxycommand_and_proxyjump_the_first_obtained_wins_like_ssh_G(tmp_path, case):
    """A `Host node1 / ProxyCommand none` before `Host * / ProxyJump bastion` means "connect
    directly": katactl went through bastion, a route the operator's config rules out."""
    text, hops, command = PROXY_CONFIGS[case]
    f = tmp_path / "config"
    f.write_text(text)
    t = sshconfig.resolve("node1", sshconfig.load(sshconfig.config_text(str(f))))
    assert (t.proxy_jump, t.proxy_command) == (hops, command)
    if shutil.which("ssh"):
        g = _ssh_G(f, "node1")
        assert ",".join(t.proxy_jump) == g.get("proxyjump", "")
        assert (t.proxy_command is not None) == ("proxycommand" in g), g
    # -J (jump_host) is given before the config is read: it wins over both
    t = sshconfig.resolve("node1", sshconfig.load(sshconfig.config_text(str(f))), jump_host="other")
    assert (t.proxy_jump, t.proxy_command) == (("other",), None)


# -- Match user tests the remote user: user@ in the node name, else --ssh-user ---------------
def _match_user_configs() -> dict[str, str]:
    me = sshconfig._local_user()
    return {
        "deploy": "Match user deploy\n  Port 2601\n  IdentityFile ~/.ssh/deploy_key\n",
        "local-name": f"Match user {me}\n  Port 2602\n",
        "negated": "Match !user deploy\n  Port 2603\n",
        "user-line-first": "Host node1\n  User deploy\nMatch user deploy\n  Port 2604\n",
        "cmdline-beats-user-line": "Host node1\n  User deploy\nMatch user bob\n  Port 2605\n",
        "localuser": f"Match localuser {me}\n  Port 2606\n",
        "pattern": "Match user dep*,!root\n  Port 2607\n  User ignored\n",
    }


@pytest.mark.parametrize("case", sorted(_match_user_configs()))
@pytest.mark.parametrize("node, ssh_user", [("deploy@node1", None), ("node1", "deploy"), ("bob@node1", None),
                                            ("node1", None), ("deploy@node1", "bob")])
def test_match_user_tests_the_remote_user_like_ssh_G(tmp_path, case, node, ssh_user):
    """ssh_config(5): "The user keyword matches against the target username on the remote
    host"; readconf.c match_cfg_line: ruser = options->user, which `user@host` or -l set before
    the config is read (else the local user). katactl's user@ wins over --ssh-user."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    f = tmp_path / "config"
    f.write_text(_match_user_configs()[case])
    t = sshconfig.resolve(node, sshconfig.load(sshconfig.config_text(str(f))), user=ssh_user)
    nuser, host, _ = sshconfig.split_node(node)
    g = _ssh_G(f, f"{nuser or ssh_user}@{host}" if (nuser or ssh_user) else host)
    ids = [i for i in g.get("identityfile", "").split() if "deploy_key" in i]
    assert (t.user, str(t.port), any("deploy_key" in i for i in t.identity_files)) == \
        (g["user"], g["port"], bool(ids)), (case, node, ssh_user)


def test_match_user_expected_answers(tmp_path):
    """The review's case, without ssh: `-N deploy@node1` and `--ssh-user deploy` both get port 2601."""
    f = tmp_path / "config"
    f.write_text(_match_user_configs()["deploy"])
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    for node, user in (("deploy@node1", None), ("node1", "deploy")):
        t = sshconfig.resolve(node, cfg, user=user)
        assert (t.user, t.port) == ("deploy", 2601)
        assert t.identity_files and t.identity_files[0].endswith("/.ssh/deploy_key")
    assert sshconfig.resolve("bob@node1", cfg).port == 22
    # %r is that user too (ssh_config(5) TOKENS: "the remote user name"), not the local one
    f.write_text("Host node1\n  ProxyCommand nc -u %r %h %p\n")
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    assert sshconfig.resolve("deploy@node1", cfg).proxy_command == "nc -u deploy node1 22"
    assert sshconfig.resolve("node1", cfg, user="ops").proxy_command == "nc -u ops node1 22"


@pytest.mark.parametrize("node", ["node1:2222", "node1", "ops@node1:2022", "other:2400"])
def test_the_node_port_is_the_command_line_port_for_percent_p_and_port_lines(tmp_path, node):
    """`-N host:port` is ssh -p: no Port line replaces it and %p in ProxyCommand is it
    (it expanded to the config's Port, 22 by default)."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    f = tmp_path / "config"
    f.write_text("Host node1\n  Port 2100\n  ProxyCommand nc %h %p\nHost *\n  ProxyCommand nc -v %h %p\n")
    t = sshconfig.resolve(node, sshconfig.load(sshconfig.config_text(str(f))))
    g = _ssh_G(f, node)  # ssh -G prints ProxyCommand unexpanded
    want = g["proxycommand"].replace("%h", g["hostname"]).replace("%p", g["port"])
    assert (str(t.port), t.proxy_command) == (g["port"], want), g


# -- ConnectTimeout: sshd_config(5) TIME FORMATS, and only when --request-timeout was not given --
@pytest.mark.parametrize("value, want", [
    ("90", 90.0), ("1m", 60.0), ("1m30s", 90.0), ("1M", 60.0), ("10S", 10.0), ("1h1h", 7200.0),
    ("2d", 172800.0), ("1w", 604800.0), ("+5", 5.0), ("07", 7.0), ("1m+1", 61.0),
    ("0", None), ("none", None),   # 0 is no timeout for ssh (timeout_connect), none is unset
])
def test_connect_timeout_time_formats_like_ssh_G(tmp_path, value, want):
    """readconf.c parse_time -> misc.c convtime: `ConnectTimeout 1m` is 60 s (it was ignored)."""
    f = tmp_path / "config"
    f.write_text(f"Host *\n  ConnectTimeout {value}\n")
    t = sshconfig.resolve("node1", sshconfig.load(sshconfig.config_text(str(f))))
    assert t.connect_timeout == want
    if shutil.which("ssh"):
        ct = _ssh_G(f, "node1")["connecttimeout"]
        assert t.connect_timeout == (None if ct in ("none", "0") else float(ct))


def test_connect_timeout_none_leaves_it_unset_for_a_later_block(tmp_path):
    """parse_time stores `none` as -1, the "unset" value: a later block's ConnectTimeout applies."""
    f = tmp_path / "config"
    f.write_text("Host node1\n  ConnectTimeout none\nHost *\n  ConnectTimeout 5\n")
    assert sshconfig.resolve("node1", sshconfig.load(sshconfig.config_text(str(f)))).connect_timeout == 5.0
    if shutil.which("ssh"):
        assert _ssh_G(f, "node1")["connecttimeout"] == "5"


@pytest.mark.parametrize("value", ["1.5", "1ms", "-5", "5x", "99999999999", "1m 30s"])
def test_a_bad_connect_timeout_is_a_usage_error_as_ssh_refuses_it(tmp_path, value):
    f = tmp_path / "config"
    f.write_text(f"Host *\n  ConnectTimeout {value}\n")
    with pytest.raises(UsageError, match="ConnectTimeout"):
        sshconfig.resolve("node1", sshconfig.load(sshconfig.config_text(str(f))))
    if shutil.which("ssh"):
        r = subprocess.run(["ssh", "-G", "-F", str(f), "node1"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        assert r.returncode != 0


@pytest.fixture
def silent_port():
    """A TCP port that accepts and never sends an SSH banner (a wedged sshd)."""
    import socket
    import threading

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    held = []

    def serve():
        while True:
            try:
                held.append(s.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname()[1]
    s.close()
    for c in held:
        c.close()


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_an_explicit_request_timeout_beats_connect_timeout(cli, tmp_path, monkeypatch, silent_port, how):
    """Like `ssh -o ConnectTimeout=N` over the config file: a --request-timeout the user gave
    (flag, KATACTL_REQUEST_TIMEOUT or katactl's config file) bounds the handshake; ssh_config's
    ConnectTimeout 3 used to win (the flag's 0.5 s became 3 s)."""
    f = tmp_path / "ssh_config"
    f.write_text("Host *\n  ConnectTimeout 3\n")
    args = ["--ssh-config", str(f), "-N", f"127.0.0.1:{silent_port}", "version"]
    if how == "flag":
        args = ["--request-timeout", "500ms", *args]
    elif how == "env":
        monkeypatch.setenv("KATACTL_REQUEST_TIMEOUT", "500ms")
    else:
        cfg = tmp_path / "katactl.toml"
        cfg.write_text('request_timeout = "500ms"\n')
        monkeypatch.setenv("KATACTL_CONFIG", str(cfg))
    r = cli(args)
    assert r.exit_code == 7, r.stderr
    assert "within 0.5s" in r.stderr, r.stderr


def test_connect_timeout_applies_when_no_request_timeout_was_given(cli, tmp_path, silent_port):
    f = tmp_path / "ssh_config"
    f.write_text("Host *\n  ConnectTimeout 1\n")
    r = cli(["--ssh-config", str(f), "-N", f"127.0.0.1:{silent_port}", "version"])
    assert r.exit_code == 7 and "within 1s" in r.stderr, r.stderr


# -- Port: openssh-portable misc.c a2port (readconf.c oPort), checked against ssh -G ----------
@pytest.mark.parametrize("value", ["22", "+22", "022", "65535", "ssh", "http"])
def test_port_numbers_and_service_names_like_ssh_G(tmp_path, value):
    f = tmp_path / "config"
    f.write_text(f"Host node1\n  Port {value}\n")
    t = sshconfig.resolve("node1", sshconfig.load(sshconfig.config_text(str(f))))
    if shutil.which("ssh"):
        assert str(t.port) == _ssh_G(f, "node1")["port"]
    assert t.port == ({"ssh": 22, "http": 80}[value] if value.isalpha() else int(value))


@pytest.mark.parametrize("value", ["abc", "22 23", "70000", "65536", "0", "-1", "-0", "0x16", "1e3", "22#x",
                                   "99999999999999999999", "no-such-service"])
def test_a_port_ssh_refuses_is_a_usage_error_not_a_wrapped_port(tmp_path, value):
    """`Port 70000` reached 127.0.0.1:4464 (getaddrinfo wraps it), `Port abc` was exit 1 with
    Python's ValueError; ssh refuses both ("Bad port")."""
    f = tmp_path / "config"
    f.write_text(f"Host node1\n  Port {value}\n")
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    with pytest.raises(UsageError, match=r"^SSH config: Port .*: bad port"):
        sshconfig.resolve("node1", cfg)
    # the hop's own Port too (its jump-through-itself check reads it)
    f.write_text(f"Host *\n  ProxyJump node1\nHost node1\n  Port {value}\n")
    with pytest.raises(UsageError, match="bad port"):
        sshconfig.resolve("node1:2222", sshconfig.load(sshconfig.config_text(str(f))))
    if shutil.which("ssh"):
        r = subprocess.run(["ssh", "-G", "-F", str(f), "node1"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        assert r.returncode != 0


def test_a_bad_port_exits_2_with_one_line(cli, tmp_path):
    f = tmp_path / "config"
    f.write_text("Host a\n  HostName 127.0.0.1\n  Port abc\n")
    r = cli(["--ssh-config", str(f), "-N", "a", "sandbox", "list"])
    assert r.exit_code == 2, r.stderr
    assert r.stderr.strip() == "katactl: error: a: SSH config: Port 'abc': bad port (1-65535 or a service name)"


# -- ProxyCommand tokens: %% %h %n %p %r (and %k) in one pass, checked against what ssh runs ---
PROXY_TOKEN_CASES = {
    "n-and-pct": ("Host nodeA\n  HostName 127.0.0.1\n", "nodeA", "n=%n pct=100%% h=%h p=%p"),
    "pct-h-stays": ("Host nodeA\n  HostName 127.0.0.1\n", "nodeA", "%%h %%%h %%n %%%%"),
    "case": ("Host pct\n  HostName %h.Example.COM\n", "pct", "%h %n"),
    "case-final": ("Host pct\n  HostName Pct.Example.COM\nMatch final\n  Port 2200\n", "pct", "%h %p"),
    "user-port": ("Host n1\n  User joe\n  Port 2200\n", "bob@n1:2300", "%r@%n:%p via %h"),
    "key-alias": ("Host n1\n  HostKeyAlias Ali\n", "n1", "k=%k"),
    "key-alias-default": ("Host n1\n  HostName 10.0.0.1\n", "n1", "k=%k"),
}


@pytest.mark.parametrize("case", sorted(PROXY_TOKEN_CASES))
def test_proxycommand_tokens_are_what_ssh_runs(tmp_path, case):
    """ssh_config(5): "ProxyCommand and ProxyJump accept the tokens %%, %h, %n, %p, and %r";
    paramiko expands only %h %p %r, one after another: %n and 100%% reached the proxy as
    written. Both sides run the command here; ssh's exits before any network."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    import shlex

    text, node, words = PROXY_TOKEN_CASES[case]
    out = tmp_path / "out"
    f = tmp_path / "config"
    f.write_text(text + f"  ProxyCommand sh -c 'echo \"{words}\" > {out}; exit 1'\n")
    user, host, port = sshconfig.split_node(node)
    subprocess.run(["ssh", "-F", str(f), "-o", "BatchMode=yes", *(["-l", user] if user else []),
                    *(["-p", str(port)] if port else []), host, "true"],
                   capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    want = out.read_text()
    out.unlink()
    t = sshconfig.resolve(node, sshconfig.load(sshconfig.config_text(str(f))))
    subprocess.run(shlex.split(t.proxy_command), stdin=subprocess.DEVNULL, timeout=30)  # as paramiko.ProxyCommand
    assert out.read_text() == want


@pytest.mark.parametrize("command", ["nc %h %x", "nc %h 100%", "nc %C"])
def test_an_unknown_proxycommand_token_is_a_usage_error_as_ssh_refuses_it(tmp_path, command):
    f = tmp_path / "config"
    f.write_text(f"Host n1\n  ProxyCommand {command}\n")
    with pytest.raises(UsageError, match="ProxyCommand .*unknown token"):
        sshconfig.resolve("n1", sshconfig.load(sshconfig.config_text(str(f))))
    if shutil.which("ssh"):  # misc.c percent_expand: "unknown key", "invalid format"
        r = subprocess.run(["ssh", "-F", str(f), "-o", "BatchMode=yes", "n1", "true"], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=30)
        assert "percent_expand: failed" in r.stderr, r.stderr


@pytest.mark.parametrize("jump", ["%n-j", "x%%y-j", "%h-j", "%r-%p-j", "%k-j", "%%n%n-j"])
@pytest.mark.parametrize("flag", [False, True], ids=["config", "-J"])
def test_proxyjump_tokens_are_what_ssh_jumps_through(tmp_path, jump, flag):
    """ssh runs a jump as a ProxyCommand (ssh -W) and expands its tokens alike, -J's too: the
    hop is named by the expanded string. The hop's own ProxyCommand (a `Host *-j` block) tells
    the name ssh gave it (%n); katactl's hop must be that name."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    out = tmp_path / "out"
    f = tmp_path / "config"
    f.write_text("Host nodeA\n  HostName 127.0.0.1\n  HostKeyAlias Ali\n  User joe\n  Port 2200\n"
                 + ("" if flag else f"  ProxyJump {jump}\n")
                 + f"Host *-j\n  ProxyCommand sh -c 'echo %n > {out}; exit 1'\n")
    subprocess.run(["ssh", "-F", str(f), "-o", "BatchMode=yes", *(["-J", jump] if flag else []), "nodeA", "true"],
                   capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    t = sshconfig.resolve("nodeA", sshconfig.load(sshconfig.config_text(str(f))), jump_host=jump if flag else None)
    assert t.proxy_jump == (out.read_text().strip(),)


# -- a user name from katactl's own settings, as ssh -l takes one (review 10 finding 1) -----------
RUSER_CORPUS = ["root", "a.b_c", "a-b", "a b", "a$b", "a%b", "a@b", "a\\b", "ü",
                "-a", "a -b", "a  -b", "a\\", "a\tb", "a\nb", "a\x7fb", "a\x1bb", "a'b", 'a"b', "a`b",
                "a;b", "a&b", "a<b", "a>b", "a|b", "a(b", "a)b", "a{b", "a}b"]


@pytest.mark.parametrize("user", RUSER_CORPUS)
def test_ssh_user_is_refused_where_ssh_refuses_it(user):
    """--ssh-user, KATACTL_SSH_USER and config.toml's ssh_user stand for ``ssh -l``: refused
    (exit 2) exactly where ssh refuses the same name (openssh-portable valid_ruser)."""
    from katactl import config

    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    probe = subprocess.run(["ssh", "-G", "-F", "none", "-l", "a;b", "x"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
    if "remote username contains invalid characters" not in probe.stderr:
        pytest.skip("this OpenSSH client predates valid_ruser (9.6, CVE-2023-51385)")
    r = subprocess.run(["ssh", "-G", "-F", "none", "-l", user, "x"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    ssh_refuses = "remote username contains invalid characters" in r.stderr
    assert ssh_refuses == (r.returncode != 0), r.stderr
    if ssh_refuses:
        with pytest.raises(UsageError, match=r"^invalid SSH user .* \(from flag\): ") as ei:
            config.resolve({"ssh_user": user})
        assert "\n" not in ei.value.message
    else:
        assert config.resolve({"ssh_user": user}).ssh_user == user


def test_proxycommand_tokens_stay_one_word_each(tmp_path, monkeypatch):
    """paramiko.ProxyCommand splits the command line (shlex) after katactl expanded it: a
    value with a space or a quote must stay one word of the proxy's argv, not add words
    (a user ``a b``, accepted by ssh too; a home directory with a space for ``~``)."""
    import shlex

    monkeypatch.setenv("HOME", str(tmp_path / "my home"))
    f = tmp_path / "config"
    f.write_text("Host node1\n  ProxyCommand ~/bin/proxy -u %r -k '%k' \"%h:%p\"\n"
                 "Host node2\n  User x'y\n  HostKeyAlias q\"r\n  ProxyCommand nc -u %r -k %k %h %p\n")
    cfg = sshconfig.load(sshconfig.config_text(str(f)))
    t = sshconfig.resolve("node1", cfg, user="a b")
    assert shlex.split(t.proxy_command) == [str(tmp_path / "my home/bin/proxy"), "-u", "a b", "-k", "node1",
                                            "node1:22"]
    t = sshconfig.resolve("node2", cfg)
    assert shlex.split(t.proxy_command) == ["nc", "-u", "x'y", "-k", 'q"r', "node2", "22"]


def test_a_proxycommand_with_an_open_quote_is_a_usage_error(tmp_path):
    f = tmp_path / "config"
    f.write_text("Host n1\n  ProxyCommand nc 'a %h %p\n")
    with pytest.raises(UsageError, match="^SSH config: ProxyCommand .*No closing quotation"):
        sshconfig.resolve("n1", sshconfig.load(sshconfig.config_text(str(f))))
