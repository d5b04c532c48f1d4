"""``config view`` shows the Kubernetes context katactl would use -- context, cluster, server,
user, namespace, proxy, and the kubeconfig file each comes from -- compared with real kubectl
1.33's ``config current-context`` and ``config view --minify``; without a kubeconfig it says
none and still succeeds; it reads the files only (no credential plugin is run, the kubernetes
package is not imported)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _write(path, doc) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for k in ("KUBECONFIG", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    return h


@pytest.fixture
def two_files(tmp_path):
    """a: current-context dev (defined in b), user sre; b: contexts dev and prod, clusters, a
    second 'sre' (ignored: the first file's wins), a current-context (ignored: a's wins)."""
    a = _write(tmp_path / "a" / "config", {
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "users": [{"name": "sre", "user": {"token": "from-a"}}],
    })
    b = _write(tmp_path / "b" / "config", {
        "apiVersion": "v1", "kind": "Config", "current-context": "prod",
        "clusters": [{"name": "dev-c", "cluster": {"server": "https://dev.example.com:6443"}},
                     {"name": "prod-c", "cluster": {"server": "https://prod.example.com",
                                                    "proxy-url": "http://bastion.example.com:3128"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "dev-c", "user": "sre", "namespace": "batch"}},
                     {"name": "prod", "context": {"cluster": "prod-c", "user": "ops"}}],
        "users": [{"name": "sre", "user": {"token": "from-b"}}, {"name": "ops", "user": {"token": "t"}}],
    })
    return a, b


def _kubectl(kubectl, *args, env):
    return subprocess.run([kubectl, *args], capture_output=True, text=True, timeout=60, env=env)


def test_shows_the_merged_context_like_kubectl(cli, home, two_files, monkeypatch, kubectl_133):
    a, b = two_files
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([a, b]))
    env = dict(os.environ)
    for flags in ([], ["--context", "prod"]):
        r = cli([*flags, "config", "view", "-o", "json"])
        assert r.exit_code == 0, r.stderr
        d = r.json()
        assert d["apiVersion"] == "katactl/v1" and d["kind"] == "Config"
        k = d["kubernetes"]
        if not flags:  # kubectl config current-context shows the files' choice, never --context
            cur = _kubectl(kubectl_133, "config", "current-context", env=env)
            assert cur.returncode == 0 and k["context"] == cur.stdout.strip(), cur.stderr
        view = json.loads(_kubectl(kubectl_133, *flags, "config", "view", "--minify", "-o", "json", env=env).stdout)
        assert k["context"] == view["current-context"]
        [ctx], [cluster] = view["contexts"], view["clusters"]
        assert k["cluster"] == ctx["context"]["cluster"] == cluster["name"]
        assert k["server"] == cluster["cluster"]["server"]
        assert k["user"] == ctx["context"]["user"]
        assert k["namespace"] == ctx["context"].get("namespace", "default")
        assert k["proxy"] == cluster["cluster"].get("proxy-url")
        assert k["files"] == [a, b] and k["sources"]["files"] == "env KUBECONFIG" and k["error"] is None
    # where each part came from: dev by a's current-context, defined in b; its user from a
    r = cli(["config", "view", "-o", "json"])
    s = r.json()["kubernetes"]["sources"]
    assert s["context"] == f"current-context in {a}; defined in {b}"
    assert s["cluster"] == s["server"] == b and s["user"] == a and s["namespace"] == "context 'dev'"
    r = cli(["--context", "prod", "--namespace", "kata", "config", "view", "-o", "json"])
    k = r.json()["kubernetes"]
    assert k["sources"]["context"] == f"context (flag); defined in {b}"
    assert k["namespace"] == "kata" and k["sources"]["namespace"] == "namespace (flag)"
    assert k["proxy"] == "http://bastion.example.com:3128" and k["sources"]["proxy"] == f"proxy-url in {b}"
    # the table: the same, one record per line beside the settings
    r = cli(["--context", "prod", "config", "view", "-o", "wide"])
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in r.stdout.splitlines()[1:]}
    assert rows["kube.context"] == ["prod", f"context (flag); defined in {b}"]
    assert rows["kube.server"] == ["https://prod.example.com", b]
    assert rows["kube.namespace"] == ["default", "default"]


def test_no_kubeconfig_says_none_and_succeeds(cli, home, tmp_path, kubectl_133):
    r = cli(["config", "view", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    k = r.json()["kubernetes"]
    assert k["files"] == [] and k["context"] is None and k["server"] is None and k["error"] is None
    assert k["sources"] == {"files": "~/.kube/config: no such file"}
    r = cli(["config", "view"])
    assert r.exit_code == 0 and "warning" not in r.stderr
    [row] = [line for line in r.stdout.splitlines() if line.startswith("kube.")]
    assert row.split(None, 2) == ["kube.context", "-", "none (~/.kube/config: no such file)"]
    # kubectl agrees there is no context
    p = _kubectl(kubectl_133, "config", "current-context", env=dict(os.environ))
    assert p.returncode != 0 and "current-context is not set" in p.stderr


@pytest.mark.parametrize("content,needle", [
    ("clusters: [", "not YAML"),
    ("- a list", "not a mapping"),
    ('{"contexts": [{"context": {}}]}', "without a name"),
    ('{"current-context": "gone"}', "context 'gone' not found"),
    ('{"contexts": [{"name": "x", "context": {"cluster": "nope"}}], "current-context": "x"}',
     "cluster 'nope' not found"),
    ('{"clusters": [{"name": "c", "cluster": {"server": "https://h", "proxy-url": "ftp://p"}}],'
     ' "contexts": [{"name": "x", "context": {"cluster": "c"}}], "current-context": "x"}', "unsupported scheme"),
])
def test_a_broken_kubeconfig_is_shown_not_fatal(cli, home, tmp_path, content, needle):
    kc = tmp_path / "kc"
    kc.write_text(content)
    r = cli(["--kubeconfig", str(kc), "config", "view", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert needle in r.json()["kubernetes"]["error"]
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr
    r = cli(["--kubeconfig", str(tmp_path / "missing"), "config", "view", "-o", "json"])
    assert r.exit_code == 0 and "no such file" in r.json()["kubernetes"]["error"]


def test_reads_the_files_only(home, tmp_path):
    """No credential plugin is run, no request is sent, and the kubernetes package (~0.6 s) is
    not imported: config view stays as quick with a kubeconfig as without."""
    marker = tmp_path / "plugin-ran"
    plugin = tmp_path / "plugin.sh"
    plugin.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{}}'\n")
    plugin.chmod(0o755)
    kc = _write(home / ".kube" / "config", {
        "current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                                  "command": str(plugin)}}}]})
    code = ("import sys\nfrom katactl.cli import main\n"
            "sys.argv = ['katactl', 'config', 'view', '-o', 'json']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'httpx')), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, HOME=str(home)))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kubernetes"]["files"] == [kc]
    assert p.stderr.strip().splitlines()[-1] == "[]"
    assert not marker.exists()


# -- malformed URLs: the server's, proxy-url's, HTTPS_PROXY's ------------------------------------

def _url_kubeconfig(tmp_path, server, proxy_url=None) -> str:
    cluster = {"server": server, **({"proxy-url": proxy_url} if proxy_url else {})}
    return _write(tmp_path / "kc", {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "x"}}]})


BAD_URLS = [  # server, proxy-url, HTTPS_PROXY, the one-line error
    ("https://a", "http://[::1", None, "invalid 'proxy-url' \"http://[::1\" for cluster \"k\": could not parse"),
    ("https://a", "http://proxy:abc", None,
     "invalid 'proxy-url' \"http://proxy:abc\" for cluster \"k\": could not parse"),
    ("https://a", "http://proxy:99999", None,
     "invalid 'proxy-url' \"http://proxy:99999\" for cluster \"k\": port out of range"),
    ("https://a", "ftp://proxy:21", None, "invalid 'proxy-url' \"ftp://proxy:21\" for cluster \"k\": "
                                          "unsupported scheme \"ftp\", must be http, https, or socks5"),
    ("https://a", "http://", None, "invalid 'proxy-url' \"http://\" for cluster \"k\": could not parse"),
    ("https://example.com:abc", None, "http://proxy:3128",
     "cluster \"k\": host must be a URL or a host:port pair: \"https://example.com:abc\""),
    ("https://example.com:abc", None, None, "host must be a URL or a host:port pair"),
    ("https://example.com:99999", None, "http://proxy:3128", "port out of range 0-65535"),
    ("https://[::1", None, None, "cluster \"k\": host must be a URL or a host:port pair: \"https://[::1\""),
    ("https://[fd00::1", None, "http://proxy:3128", "host must be a URL or a host:port pair"),
    ("ftp://example.com", None, None, "unsupported protocol scheme \"ftp\""),
    ("https://example.com", None, "http://[::1", "invalid proxy address \"http://[::1\""),
    ("https://example.com", None, "http://proxy:abc", "invalid proxy address"),
]


@pytest.mark.parametrize("server,proxy_url,env_proxy,needle", BAD_URLS)
def test_a_malformed_url_is_a_usage_error_and_shown_by_config_view(cli, home, tmp_path, monkeypatch,
                                                                   server, proxy_url, env_proxy, needle):
    """A malformed server, proxy-url or HTTPS_PROXY (bad IPv6 literal, port not a number or out
    of range, unsupported scheme): a command says so in one line, exit 2; config view shows
    it with one warning and succeeds, as for any broken kubeconfig (kubectl config view
    --minify exits 0 too)."""
    if env_proxy:
        monkeypatch.setenv("HTTPS_PROXY", env_proxy)
    kc = _url_kubeconfig(tmp_path, server, proxy_url)
    r = cli(["--kubeconfig", kc, "--request-timeout", "2s", "node", "list"])
    assert r.exit_code == 2, r.stderr
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "unexpected" not in r.stderr, r.stderr
    r = cli(["--kubeconfig", kc, "config", "view", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    k = r.json()["kubernetes"]
    assert needle in k["error"] and k["server"] == server and k["proxy"] is None
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("warning: kubeconfig: ") and needle in r.stderr
    r = cli(["--kubeconfig", kc, "config", "view"])
    assert r.exit_code == 0 and r.stderr.count("warning") == 1, r.stderr


@pytest.mark.parametrize("proxy_url", ["http://[::1", "http://proxy:abc", "ftp://proxy:21"])
def test_a_malformed_proxy_url_is_refused_in_kubectls_words(cli, home, tmp_path, proxy_url, kubectl_133):
    kc = _url_kubeconfig(tmp_path, "https://a", proxy_url)
    p = _kubectl(kubectl_133, "--kubeconfig", kc, "get", "--raw", "/version", env=dict(os.environ))
    assert p.returncode == 1 and p.stderr.startswith("error: invalid 'proxy-url'"), p.stderr
    r = cli(["--kubeconfig", kc, "node", "list"])
    assert r.exit_code == 2
    assert r.stderr.strip().split("error: ", 1)[1] == p.stderr.strip().split("error: ", 1)[1]


def _standin_variant(kube, tmp_path, mutate) -> str:
    doc = json.loads(open(kube.kubeconfig(tmp_path / "good")).read())
    mutate(doc)
    return _write(tmp_path / "kc", doc)


def _cluster(d):
    return d["clusters"][0]["cluster"]


def _user(d):
    return d["users"][0]["user"]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["contexts"][0].update(context="x"), "context 'standin': not a mapping"),
    (lambda d: _cluster(d).update(server=12345), 'cluster "standin": server is a int, not a URL'),
    (lambda d: _cluster(d).update(server=""), 'no server found for cluster "standin"'),
    (lambda d: _cluster(d).pop("server"), 'no server found for cluster "standin"'),
    (lambda d: _cluster(d).update(server=_cluster(d)["server"].split("//")[1]), "not a URL (https://HOST:PORT)"),
    (lambda d: _cluster(d).update({"tls-server-name": 123}), 'cluster "standin": tls-server-name is a int, not a string'),
    (lambda d: _cluster(d).update({"tls-server-name": ["localhost"]}), "tls-server-name is a list, not a string"),
    (lambda d: _user(d).update(token="tökén"), "token: not printable ASCII"),
    (lambda d: _user(d).update(token="admin-token\nX-Evil: 1"), "token: not printable ASCII"),
    (lambda d: _user(d).update(token=12345), "token is a int, not a string"),
    (lambda d: _user(d).update(exec={"apiVersion": "client.authentication.k8s.io/v1", "command": "sh",
                                     "args": "oops", "interactiveMode": "Never"}), "exec: args is not a list of strings"),
    # client-go tools/clientcmd/validation.go validateAuthInfo, in kubectl's words
    (lambda d: _user(d).update(exec={"apiVersion": "client.authentication.k8s.io/v1", "command": "sh"}),
     "interactiveMode must be specified for admin to use exec authentication plugin"),
    (lambda d: _user(d).update(exec={"apiVersion": "client.authentication.k8s.io/v1", "command": "sh",
                                     "interactiveMode": "Sometimes"}), 'invalid interactiveMode for admin: "Sometimes"'),
    (lambda d: _user(d).update(exec={"apiVersion": "client.authentication.k8s.io/v1", "command": "sh",
                                     "args": ["-c", "true"], "env": [{"name": "A"}], "interactiveMode": "Never"}),
     "exec: an env entry without a name and a value"),
])
def test_malformed_kubeconfig_values_are_one_line_usage_errors(cli, kube, tmp_path, mutate, needle):
    kc = _standin_variant(kube, tmp_path, mutate)
    r = cli(["--kubeconfig", kc, "--request-timeout", "3s", "node", "list"])
    assert r.exit_code == 2, r.stderr
    assert needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "unexpected" not in r.stderr and "Error:" not in r.stderr.split("error:", 1)[1], r.stderr
    assert not kube.requests  # refused before any request


def test_a_token_file_a_header_cannot_carry_is_a_one_line_usage_error(cli, kube, tmp_path):
    (tmp_path / "tok").write_text("tökén\n")
    kc = _standin_variant(kube, tmp_path, lambda d: d["users"][0].update(user={"tokenFile": str(tmp_path / "tok")}))
    r = cli(["--kubeconfig", kc, "node", "list"])
    assert r.exit_code == 2, r.stderr
    assert "tokenFile" in r.stderr and "not printable ASCII" in r.stderr and r.stderr.count("\n") == 1, r.stderr
