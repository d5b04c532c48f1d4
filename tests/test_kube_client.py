"""The Kubernetes API client (katactl/backends/kube.py) against the stand-in over real sockets:
KUBECONFIG lists merged as kubectl merges them (compared with a real kubectl 1.33), credentials
that expire (exec plugins, token files), a cluster's proxy-url (a real CONNECT proxy), creates
answered 5xx, and expired continue tokens."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from tests.kubeserver import KubeStandIn


def settings(kubeconfig=None, context=None, namespace=None):
    return SimpleNamespace(kubeconfig=kubeconfig, context=context, namespace=namespace, request_timeout=10.0)


@pytest.fixture
def private_kube():
    """A stand-in of the test's own: its tokens may change (a rotated credential)."""
    srv = KubeStandIn(tokens={"admin": "t1", "readonly": "readonly-token"}, grace_scale=0.01)
    yield srv
    srv.close()


# -- KUBECONFIG with several files ---------------------------------------------------------------

def _write(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


def test_kubeconfig_list_merges_as_kubectl_1_33(kube, private_kube, tmp_path, monkeypatch, kubectl_133):
    """client-go's rules (tools/clientcmd/loader.go Load): for clusters, contexts and users the
    first file to set a name wins, whole; current-context from the first file that sets it;
    relative paths resolve against their own file's directory. katactl and kubectl agree on the
    context, the server and the namespace."""
    prod, dev = kube, private_kube
    prod.add_node("prod-node-1")
    dev.add_node("dev-node-1")
    (tmp_path / "a" / "creds").mkdir(parents=True)
    (tmp_path / "a" / "creds" / "ca.crt").write_bytes(prod.ca_pem)
    (tmp_path / "a" / "creds" / "token").write_text(prod.tokens["admin"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ca.crt").write_bytes(dev.ca_pem)
    a = _write(tmp_path / "a" / "config", {
        "apiVersion": "v1", "kind": "Config",  # no current-context: the next file's counts
        "clusters": [{"name": "prod", "cluster": {"server": prod.url, "certificate-authority": "creds/ca.crt"}}],
        "users": [{"name": "prod-admin", "user": {"tokenFile": "creds/token"}}],
        "contexts": [{"name": "shared", "context": {"cluster": "prod", "user": "prod-admin", "namespace": "from-a"}}]})
    b = _write(tmp_path / "b" / "config", {
        "apiVersion": "v1", "kind": "Config", "current-context": "shared",
        "clusters": [{"name": "prod", "cluster": {"server": dev.url, "certificate-authority": "ca.crt"}},
                     {"name": "dev", "cluster": {"server": dev.url, "certificate-authority": "ca.crt"}}],
        "users": [{"name": "prod-admin", "user": {"token": "wrong"}},
                  {"name": "dev-admin", "user": {"token": dev.tokens["admin"]}}],
        "contexts": [{"name": "shared", "context": {"cluster": "dev", "user": "dev-admin", "namespace": "from-b"}},
                     {"name": "dev", "context": {"cluster": "dev", "user": "dev-admin", "namespace": "dev-ns"}}]})
    c = _write(tmp_path / "c" / "config", {"apiVersion": "v1", "kind": "Config", "current-context": "dev"})
    kubeconfig = os.pathsep.join([a, str(tmp_path / "missing"), b, a, c])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not resolve against the working directory
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    from katactl.backends.kube import KubeAPI

    def kubectl(*args):
        p = subprocess.run([kubectl_133, *args], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "KUBECONFIG": kubeconfig}, cwd=elsewhere)
        assert p.returncode == 0, p.stderr
        return p.stdout

    for context in (None, "dev"):
        flags = ["--context", context] if context else []
        view = json.loads(kubectl(*flags, "config", "view", "--minify", "-o", "json"))
        kctx = view["contexts"][0]["context"]
        with KubeAPI.from_settings(settings(context=context)) as api:
            assert api.host == view["clusters"][0]["cluster"]["server"]
            assert api.namespace == kctx.get("namespace", "default")
            assert api.user == kctx["user"]
            names = [n["metadata"]["name"] for n in api.list("/api/v1/nodes")]
        assert ["node/" + n for n in names] == kubectl(*flags, "get", "nodes", "-o", "name").split()
        if context is None:
            assert view["current-context"] == "shared" and kctx["namespace"] == "from-a"
            assert names == ["prod-node-1"]  # a's prod cluster, a's tokenFile, a's CA
        else:
            assert names == ["dev-node-1"]


def test_kubeconfig_explicit_file_is_not_a_list(kube, tmp_path):
    a = kube.kubeconfig(tmp_path / "a")
    with pytest.raises(Exception) as e:
        from katactl.backends.kube import KubeAPI

        KubeAPI.from_settings(settings(kubeconfig=f"{a}{os.pathsep}{a}"))
    assert "no such file" in str(e.value)


# -- credentials that expire ---------------------------------------------------------------------

PLUGIN = """import json, sys
tok_file, runs_file, expires = sys.argv[1], sys.argv[2], sys.argv[3]
open(runs_file, "a").write("run\\n")
status = {"token": open(tok_file).read().strip()}
if expires != "-":
    status["expirationTimestamp"] = expires
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status}))
"""


def _exec_kubeconfig(srv, tmp_path, expires: str) -> str:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    (tmp_path / "tok").write_text(srv.tokens["admin"])
    doc = json.loads(open(srv.kubeconfig(tmp_path / "kc")).read())
    doc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                                        "args": [str(plugin), str(tmp_path / "tok"), str(tmp_path / "runs"), expires],
                                        "interactiveMode": "Never"}}
    return _write(tmp_path / "kc", doc)


def _runs(tmp_path) -> int:
    return len((tmp_path / "runs").read_text().splitlines())


def test_exec_plugin_is_run_again_after_a_401_and_the_request_sent_once_more(private_kube, tmp_path):
    from katactl.backends.kube import KubeAPI

    srv = private_kube
    srv.add_node("n1")
    kc = _exec_kubeconfig(srv, tmp_path, "2999-01-01T00:00:00Z")
    with KubeAPI.from_settings(settings(kc)) as api:
        assert [n["metadata"]["name"] for n in api.list("/api/v1/nodes")] == ["n1"]
        assert _runs(tmp_path) == 1  # cached until it expires
        api.get("/api/v1/nodes/n1")
        assert _runs(tmp_path) == 1
        # the token is revoked early: the server answers 401; the plugin now issues another
        srv.tokens["admin"] = "t2"
        (tmp_path / "tok").write_text("t2")
        assert api.get("/api/v1/nodes/n1")["metadata"]["name"] == "n1"
        assert _runs(tmp_path) == 2
        assert api.headers["Authorization"] == "Bearer t2"  # what the exec transport's WebSockets send
        # a copy made from (host, headers, tls, ...) -- the rollout engine's per-node clients --
        # shares the credentials
        copy = KubeAPI(api.host, api.headers, api.tls, api.timeout, user=api.user, namespace=api.namespace)
        srv.tokens["admin"] = "t3"
        (tmp_path / "tok").write_text("t3")
        assert copy.get("/api/v1/nodes/n1")["metadata"]["name"] == "n1"
        copy.close()
        assert _runs(tmp_path) == 3
        # the plugin gives the same rejected token: no endless loop, exit 7
        srv.tokens["admin"] = "t4"
        from katactl.errors import AuthError

        with pytest.raises(AuthError):
            api.get("/api/v1/nodes/n1")
        assert _runs(tmp_path) == 4


def test_exec_plugin_is_run_again_once_its_credential_expired(private_kube, tmp_path):
    """client-go (plugin/pkg/client/auth/exec/exec.go getCreds): an expirationTimestamp
    passed means run the plugin again before the next request."""
    from katactl.backends.kube import KubeAPI

    srv = private_kube
    srv.add_node("n1")
    kc = _exec_kubeconfig(srv, tmp_path, "2001-01-01T00:00:00Z")
    with KubeAPI.from_settings(settings(kc)) as api:
        for _ in range(3):
            api.get("/api/v1/nodes/n1")
    assert _runs(tmp_path) == 4  # at load, then before each request
    kc = _exec_kubeconfig(srv, tmp_path, "-")  # no expirationTimestamp: valid until a 401
    (tmp_path / "runs").unlink()
    with KubeAPI.from_settings(settings(kc)) as api:
        for _ in range(3):
            api.get("/api/v1/nodes/n1")
    assert _runs(tmp_path) == 1


def test_token_file_is_read_again_after_a_401(private_kube, tmp_path):
    from katactl.backends.kube import KubeAPI

    srv = private_kube
    srv.add_node("n1")
    doc = json.loads(open(srv.kubeconfig(tmp_path / "kc")).read())
    (tmp_path / "token").write_text("t1\n")
    # relative to the kubeconfig's directory; the file's token is sent, not "token" (client-go)
    doc["users"][0]["user"] = {"tokenFile": "token", "token": "stale"}
    kc = _write(tmp_path / "kc", doc)
    with KubeAPI.from_settings(settings(kc)) as api:
        api.get("/api/v1/nodes/n1")
        srv.tokens["admin"] = "t2"  # the kubelet rotated the projected token
        (tmp_path / "token").write_text("t2\n")
        assert api.get("/api/v1/nodes/n1")["metadata"]["name"] == "n1"


def test_token_file_that_cannot_be_read_again_keeps_the_token_held(private_kube, tmp_path):
    """client-go's cachingTokenSource (transport/token_source.go): a periodic re-read that fails
    (the file gone) or reads nothing (a rotation truncates, then writes) keeps the token held
    while the server accepts it; a new token is taken once the file has one; only the first
    read failing is a usage error. The 50 s period is shortened to 0 (every request reads)."""
    from katactl.backends.kube import KubeAPI
    from katactl.errors import AuthError, UsageError

    srv = private_kube
    srv.add_node("n1")
    doc = json.loads(open(srv.kubeconfig(tmp_path / "kc")).read())
    token = tmp_path / "token"
    doc["users"][0]["user"] = {"tokenFile": str(token)}
    kc = _write(tmp_path / "kc", doc)
    with pytest.raises(UsageError, match="tokenFile .*token: No such file"):
        KubeAPI.from_settings(settings(kc), token_file_period=0)
    token.write_text("  \n")
    with pytest.raises(UsageError, match="read an empty token"):
        KubeAPI.from_settings(settings(kc), token_file_period=0)

    def sent():
        return srv.requests[-1]["headers"].get("Authorization")

    token.write_text("t1\n")
    with KubeAPI.from_settings(settings(kc), token_file_period=0) as api:
        api.get("/api/v1/nodes/n1")
        token.unlink()
        assert api.get("/api/v1/nodes/n1")["metadata"]["name"] == "n1" and sent() == "Bearer t1"
        token.write_text("")
        assert api.get("/api/v1/nodes/n1")["metadata"]["name"] == "n1" and sent() == "Bearer t1"
        token.write_text("t2\n")
        srv.tokens["admin"] = "t2"
        assert api.get("/api/v1/nodes/n1")["metadata"]["name"] == "n1" and sent() == "Bearer t2"
        # revoked, and no new token to read: the 401 stands (exit 7), no usage error mid-run
        token.unlink()
        srv.tokens["admin"] = "t3"
        with pytest.raises(AuthError, match="Unauthorized"):
            api.get("/api/v1/nodes/n1")


def test_drain_outlives_its_exec_credential(cli, private_kube, tmp_path):
    """r12: a token rotated in the middle of a drain (evicted pod still terminating): the drain
    goes on with the plugin's new token and finishes."""
    srv = private_kube
    srv.add_node("n1")
    srv.add_replicaset("rs", "default", 1, {"app": "a"})
    pod = srv.add_pod("a-1", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    pod["spec"]["terminationGracePeriodSeconds"] = 300  # 3 s at grace_scale 0.01: polled meanwhile
    kc = _exec_kubeconfig(srv, tmp_path, "2999-01-01T00:00:00Z")

    def rotate():
        for _ in range(3000):
            if any(r["method"] == "POST" and r["path"].endswith("/eviction") for r in list(srv.requests)):
                srv.tokens["admin"] = "t2"
                (tmp_path / "tok").write_text("t2")
                return
            time.sleep(0.01)

    t = threading.Thread(target=rotate, daemon=True)
    t.start()
    r = cli(["--kubeconfig", kc, "node", "drain", "n1", "--timeout", "60s"])
    t.join()
    assert r.exit_code == 0, r.stderr
    assert _runs(tmp_path) >= 2
    assert srv.get_obj("Pod", "a-1", "default") is None


def test_forbidden_eviction_fails_the_drain_with_exit_7(cli, kube, tmp_path):
    kube.add_node("n1")
    kube.add_replicaset("rs", "default", 1, {"app": "a"})
    kube.add_pod("a-1", "default", "n1", {"app": "a"}, owner=("ReplicaSet", "rs"))
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                       "message": 'pods "a-1" is forbidden: User "admin" cannot create resource "pods/eviction"'})
    kube.inject("POST", r"/eviction", status=403, times=1, body=body)
    r = cli(["--kubeconfig", kube.kubeconfig(tmp_path / "kc"), "node", "drain", "n1", "-o", "json"])
    assert r.exit_code == 7, r.stderr
    assert "forbidden" in r.stdout and not kube.get_obj("Node", "n1")["spec"].get("unschedulable")


# -- proxy-url -------------------------------------------------------------------------------------

class ConnectProxy:
    """An HTTP CONNECT proxy on loopback (a bastion): it alone knows where ``name`` is."""

    def __init__(self, routes: dict[str, tuple[str, int]]):
        self.routes, self.log = routes, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            req = b""
            while b"\r\n\r\n" not in req:
                chunk = c.recv(4096)
                if not chunk:
                    return
                req += chunk
            line = req.split(b"\r\n")[0].decode()
            self.log.append(line)
            method, target, _ = line.split(" ", 2)
            if method != "CONNECT" or target not in self.routes:
                c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            with socket.create_connection(self.routes[target]) as up:
                c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                while True:
                    r, _, _ = select.select([c, up], [], [], 30)
                    if not r:
                        return
                    for x in r:
                        try:
                            data = x.recv(65536)
                            if data:
                                (up if x is c else c).sendall(data)
                        except OSError:  # a side reset: the tunnel ends, as a real proxy's would
                            data = b""
                        if not data:
                            return

    def close(self):
        self.sock.close()


def test_proxy_url_carries_the_requests_like_kubectl(cli, kube, tmp_path, kubectl_133):
    kube.add_node("n1")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]  # nothing listens here: only the proxy reaches the API
    s.close()
    proxy = ConnectProxy({f"localhost:{dead}": ("127.0.0.1", kube.port)})
    try:
        doc = json.loads(open(kube.kubeconfig(tmp_path / "kc")).read())
        doc["clusters"][0]["cluster"]["server"] = f"https://localhost:{dead}"
        direct = _write(tmp_path / "direct", doc)
        doc["clusters"][0]["cluster"]["proxy-url"] = proxy.url
        kc = _write(tmp_path / "kc", doc)
        r = cli(["--kubeconfig", direct, "--request-timeout", "3s", "node", "list", "-o", "name"])
        assert r.exit_code == 7, r.stderr
        r = cli(["--kubeconfig", kc, "node", "list", "-o", "name"])
        assert r.exit_code == 0 and r.stdout.split() == ["n1"], r.stderr
        assert proxy.log and all(line == f"CONNECT localhost:{dead} HTTP/1.1" for line in proxy.log)
        p = subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "nodes", "-o", "name"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.split() == ["node/n1"], p.stderr
    finally:
        proxy.close()


def proxied_kubeconfigs(kube, tmp_path, name: str, proxy, monkeypatch) -> tuple[str, str]:
    """(a kubeconfig of the stand-in on loopback, one naming it ``https://NAME``: a name only
    ``proxy`` knows, TLS unchecked as the name is not the certificate's); HTTPS_PROXY is the
    proxy and no other proxy variable is set."""
    doc = json.loads(open(kube.kubeconfig(tmp_path / "kc0")).read())
    loopback = _write(tmp_path / "loopback", doc)
    del doc["clusters"][0]["cluster"]["certificate-authority-data"]
    doc["clusters"][0]["cluster"].update({"server": f"https://{name}", "insecure-skip-tls-verify": True})
    named = _write(tmp_path / "named", doc)
    for k in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    return loopback, named


def test_https_proxy_environment_is_used_like_kubectl(cli, kube, tmp_path, monkeypatch, kubectl_133):
    """No proxy-url: HTTPS_PROXY / NO_PROXY as kubectl reads them (Go's ProxyFromEnvironment);
    a loopback server is never proxied."""
    kube.add_node("n1")
    name = f"kubeapi.test:{kube.port}"  # only the proxy knows this name
    proxy = ConnectProxy({name: ("127.0.0.1", kube.port)})
    try:
        loopback, kc = proxied_kubeconfigs(kube, tmp_path, name, proxy, monkeypatch)
        r = cli(["--kubeconfig", kc, "node", "list", "-o", "name"])
        assert r.exit_code == 0 and r.stdout.split() == ["n1"], r.stderr
        assert proxy.log and set(proxy.log) == {f"CONNECT {name} HTTP/1.1"}
        p = subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "nodes", "-o", "name"], capture_output=True,
                           text=True, timeout=60, env=dict(os.environ))
        assert p.returncode == 0 and p.stdout.split() == ["node/n1"], p.stderr
        proxy.log.clear()
        r = cli(["--kubeconfig", loopback, "node", "list", "-o", "name"])
        assert r.exit_code == 0 and r.stdout.split() == ["n1"] and proxy.log == [], r.stderr
        monkeypatch.setenv("NO_PROXY", "example.com,.test")
        r = cli(["--kubeconfig", kc, "--request-timeout", "3s", "node", "list", "-o", "name"])
        assert r.exit_code == 7 and proxy.log == [], r.stderr
    finally:
        proxy.close()


@pytest.mark.parametrize("server,no_proxy,proxied", [
    ("https://api.example.com", "", True),
    ("https://api.example.com", "example.com", False),      # a domain: itself and subdomains
    ("https://example.com", ".example.com", True),           # ".domain": subdomains only
    ("https://api.example.com", "*.example.com", False),
    ("https://example.com", "*.example.com", True),
    ("https://api.example.com:6443", "api.example.com:443", True),   # another port
    ("https://api.example.com:6443", "api.example.com:6443", False),
    ("https://10.1.2.3:6443", "10.0.0.0/8", False),          # CIDR
    ("https://10.1.2.3:6443", "10.1.2.4", True),
    ("https://[::1]:6443", "", False),                       # loopback: never
    ("https://localhost:6443", "", False),
    ("https://api.example.com", "*", False),
])
def test_no_proxy_matching_follows_go(monkeypatch, server, no_proxy, proxied):
    from katactl.backends.kube import _environment_proxy

    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert _environment_proxy(server) == ("http://proxy.corp:3128" if proxied else None)


#: (server, NO_PROXY, proxied?) as kubectl 1.33 decides (Go's golang.org/x/net/http/httpproxy
#: config.init / useProxy), observed by test_no_proxy_corpus_is_kubectls
NO_PROXY_CORPUS = [
    ("https://api.example.invalid", "", True),
    ("https://api.example.invalid", "*", False),
    ("https://api.example.invalid", "example.invalid", False),      # a domain: itself and below
    ("https://apiexample.invalid", "example.invalid", True),        # not a label boundary
    ("https://example.invalid", ".example.invalid", True),           # ".d": below only
    ("https://api.example.invalid", "*.example.invalid", False),
    ("https://example.invalid", "*.example.invalid", True),
    ("https://api.example.invalid", "*example.invalid", True),      # "*x" is a name, no wildcard
    ("https://api.example.invalid", "EXAMPLE.invalid", False),      # lowercased
    ("https://api.example.invalid", " foo , example.invalid", False),
    ("https://api.example.invalid.", "example.invalid", True),      # a trailing dot is another name
    ("https://api.example.invalid:6443", "api.example.invalid:6443", False),
    ("https://api.example.invalid:6443", "api.example.invalid:443", True),
    ("https://api.example.invalid", "api.example.invalid:443", False),  # the scheme's port
    ("https://api.example.invalid:6443", "api.example.invalid:", False),  # empty port: any
    ("https://api.example.invalid", "[api.example.invalid]:443", False),  # brackets stripped
    ("https://api.example.invalid", "api.example.invalid:6443:1", True),
    ("https://api.example.invalid", ":6443", True),                # no host: ignored
    ("https://10.0.0.1:6443", "10.0.0.1", False),
    ("https://10.0.0.1:6443", "10.0.0.2", True),
    ("https://10.0.0.1:6443", "10.0.0.1:6443", False),
    ("https://10.0.0.1:6443", "10.0.0.1:443", True),
    ("https://10.0.0.1", "10.0.0.1:443", False),
    ("https://10.0.0.1:6443", "10.0.0.0/8", False),
    ("https://10.0.0.1:6443", "10.0.0.1/255.0.0.0", True),          # no netmask form
    ("https://10.0.0.1:6443", "0.1", True),                         # names never match an IP
    ("https://10.0.0.1:6443", ".0.0.1", True),
    ("https://10.0.0.1:6443", "0.0.1", True),
    ("https://[fd00::1]:6443", "fd00::1", False),
    ("https://[fd00::1]:6443", "[fd00::1]:6443", False),
    ("https://[fd00::1]:6443", "[fd00::1]", True),                  # no port: a name, not an IP
    ("https://[fd00::1]:6443", "fd00::/16", False),
    ("https://[::ffff:10.0.0.1]:6443", "10.0.0.1", False),          # IPv4-mapped is the IPv4
    ("https://10.0.0.1:6443", "::ffff:10.0.0.1", False),
    ("https://localhost:6443", "", False),                          # loopback: never
    ("https://[::1]:6443", "", False),
    ("https://127.0.0.2:6443", "", False),
]


@pytest.mark.parametrize("server,no_proxy,proxied", NO_PROXY_CORPUS)
def test_no_proxy_corpus(monkeypatch, server, no_proxy, proxied):
    from katactl.backends.kube import _environment_proxy

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert _environment_proxy(server) == ("http://proxy.corp:3128" if proxied else None)


def test_no_proxy_corpus_is_kubectls(tmp_path, kubectl_133):
    """kubectl 1.33's own decision for every case of NO_PROXY_CORPUS: whether it sends CONNECT
    to a proxy on loopback (HTTPS_PROXY) or dials the server itself."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    seen: dict[int, bool] = {}

    def one(i, server, no_proxy):
        proxy = ConnectProxy({})  # answers 403 to every CONNECT: kubectl fails either way
        try:
            kc = _write(tmp_path / f"kc{i}", {
                "apiVersion": "v1", "kind": "Config", "current-context": "c",
                "clusters": [{"name": "k", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "users": [{"name": "u", "user": {"token": "x"}}]})
            subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "--raw", "/version", "--request-timeout", "1s"],
                           env={**env, "HTTPS_PROXY": proxy.url, "NO_PROXY": no_proxy}, capture_output=True,
                           timeout=60)
            seen[i] = any(line.startswith("CONNECT ") for line in proxy.log)
        finally:
            proxy.close()

    threads = [threading.Thread(target=one, args=(i, s, n)) for i, (s, n, _) in enumerate(NO_PROXY_CORPUS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(s, n, seen[i]) for i, (s, n, _) in enumerate(NO_PROXY_CORPUS)] == NO_PROXY_CORPUS


@pytest.mark.parametrize("url,needle", [
    ("socks5://127.0.0.1:1080", "socksio"),
    ("ftp://127.0.0.1:21", "unsupported scheme"),
])
def test_proxy_url_not_usable_is_a_usage_error(cli, kube, tmp_path, url, needle):
    import importlib.util

    if needle == "socksio" and importlib.util.find_spec("socksio") is not None:
        pytest.skip("socksio installed: SOCKS5 proxies work")
    doc = json.loads(open(kube.kubeconfig(tmp_path / "kc")).read())
    doc["clusters"][0]["cluster"]["proxy-url"] = url
    r = cli(["--kubeconfig", _write(tmp_path / "kc", doc), "node", "list"])
    assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


# -- creates answered 5xx ------------------------------------------------------------------------

def test_create_answered_504_is_not_sent_again(kube, tmp_path):
    from katactl.backends.kube import KubeAPI, MaybeApplied

    kube.inject("POST", r"/configmaps", status=504, applied=True)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "default"}, "data": {}}
    with KubeAPI.from_settings(settings(kube.kubeconfig(tmp_path / "kc"))) as api:
        with pytest.raises(MaybeApplied) as e:
            api.create("/api/v1/namespaces/default/configmaps", cm)
    assert e.value.status == 504
    assert kube.get_obj("ConfigMap", "x", "default") is not None
    assert sum(r["method"] == "POST" for r in kube.requests) == 1


@pytest.mark.parametrize("what", ["leases", "configmaps"])
def test_rollout_accepts_its_own_create_answered_504(cli, kube, tmp_path, what):
    """r8: the Lease (or the state ConfigMap) lands but its answer is a 504: the rollout reads it
    back, knows it for its own, and runs."""
    for i in range(2):
        kube.add_node(f"n{i}", labels={"pool": "b"})
    kube.inject("POST", rf"/{what}", status=504, applied=True)
    kc = kube.kubeconfig(tmp_path / "kc")
    r = cli(["--kubeconfig", kc, "rollout", "run", "r1", "-l", "pool=b", "--step", "cordon", "--poll", "0.1"])
    assert r.exit_code == 0, r.stderr
    assert "Succeeded" in r.stderr + r.stdout
    # the re-read tells a Lease this very call wrote from one another katactl holds (same
    # user, host and pid here: only the session differs)
    from katactl.backends.kube import KubeAPI
    from katactl.errors import Refused
    from katactl.rollout.store import KubeStore

    with KubeAPI.from_settings(settings(kc)) as api:
        other = KubeStore(api)
        other.acquire("r2")
        with pytest.raises(Refused):
            KubeStore(api).acquire("r2")
        other.release()


@pytest.mark.parametrize("what", ["leases", "configmaps"])
def test_rollout_outlasts_creates_answered_503(cli, kube, tmp_path, what):
    """An overloaded server answers the Lease (or the state ConfigMap) create 503 three times,
    landing nothing: the rollout reads back, sends it again after a backoff (Retry-After
    honoured) and runs; it is no other holder (exit 5)."""
    for i in range(2):
        kube.add_node(f"n{i}", labels={"pool": "b"})
    kube.inject("POST", rf"/{what}", status=503, times=3, retry_after=0)
    kc = kube.kubeconfig(tmp_path / "kc")
    r = cli(["--kubeconfig", kc, "rollout", "run", "r1", "-l", "pool=b", "--step", "cordon", "--poll", "0.1"])
    assert r.exit_code == 0, r.stderr
    assert sum(q["method"] == "POST" and f"/{what}" in q["path"] for q in kube.requests) == 4


@pytest.mark.parametrize("what", ["leases", "configmaps"])
def test_rollout_fails_with_the_servers_message_when_creates_keep_failing(cli, kube, tmp_path, what):
    """A server that keeps answering 503: exit 1 with its message after a bounded number of
    attempts, never "another katactl holds it" (5); nothing was cordoned."""
    kube.add_node("n0", labels={"pool": "b"})
    kube.inject("POST", rf"/{what}", status=503, times=100)
    kc = kube.kubeconfig(tmp_path / "kc")
    r = cli(["--kubeconfig", kc, "rollout", "run", "r1", "-l", "pool=b", "--step", "cordon", "--poll", "0.1"])
    assert r.exit_code == 1, r.stderr
    assert "HTTP 503: injected fault (503)" in r.stderr and "another" not in r.stderr, r.stderr
    from katactl.backends.kube import RETRIES

    # read back after each 5xx, sent again after a backoff, a bounded number of times
    assert sum(q["method"] == "POST" and f"/{what}" in q["path"] for q in kube.requests) == RETRIES + 1
    assert not kube.get_obj("Node", "n0")["spec"].get("unschedulable")


def test_rollout_knows_its_own_configmap_landing_after_a_504(cli, kube, tmp_path):
    """kube-apiserver's timeout filter answers 504 while the create goes on: the read-back GET
    finds nothing yet, the create lands, the create sent again meets 409. Re-read, it holds
    what was sent: ours, the rollout runs (not "already exists", exit 5)."""
    from tests import kubeserver as ks

    for i in range(2):
        kube.add_node(f"n{i}", labels={"pool": "b"})
    handle, pending = kube.handle, []

    def late_landing(method, path, query, body, user, accept):  # the stand-in's handler, delayed
        if method == "POST" and path.endswith("/configmaps") and "katactl-rollout-" in json.dumps(body):
            if not pending:
                pending.append((method, path, query, body, user, accept))
                raise ks.ApiError(504, "Timeout", "Timeout: request did not complete within the allotted timeout")
            if pending[-1] is not None:
                handle(*pending[-1])
                pending.append(None)
        return handle(method, path, query, body, user, accept)

    kube.handle = late_landing
    kc = kube.kubeconfig(tmp_path / "kc")
    r = cli(["--kubeconfig", kc, "rollout", "run", "r1", "-l", "pool=b", "--step", "cordon", "--poll", "0.1"])
    assert r.exit_code == 0, r.stderr
    assert "Succeeded" in r.stderr + r.stdout
    # another's ConfigMap of that name landing between: still refused (exit 5)
    def foreign_landing(method, path, query, body, user, accept):
        if method == "POST" and path.endswith("/configmaps") and "katactl-rollout-" in json.dumps(body):
            if not pending:
                pending.append(True)
                raise ks.ApiError(504, "Timeout", "Timeout: request did not complete within the allotted timeout")
            if len(pending) == 1:
                pending.append(True)
                kube.add({"apiVersion": "v1", "kind": "ConfigMap", "data": {"control": "{}"},
                          "metadata": {"name": "katactl-rollout-r2", "namespace": "kube-system"}})
        return handle(method, path, query, body, user, accept)

    pending.clear()
    kube.handle = foreign_landing
    r = cli(["--kubeconfig", kc, "rollout", "run", "r2", "-l", "pool=b", "--step", "cordon", "--poll", "0.1"])
    assert r.exit_code == 5 and "rollout r2 already exists" in r.stderr, r.stderr


# -- expired continue tokens ---------------------------------------------------------------------

GONE = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
                   "message": "The provided continue parameter is too old to display a consistent list result. "
                              "You can start a new list without the continue parameter."})


def test_expired_continue_token_falls_back_to_one_full_list(cli, kube, tmp_path):
    """client-go's pager (tools/pager/pager.go, FullListIfExpired): a 410 on a continue request
    is followed by one list without limit; nothing is counted twice."""
    from katactl.backends.kube import KubeAPI

    kube.add_node("n1")
    for j in range(600):
        kube.add_pod(f"p{j}", "default", "n1", {"app": "x"}, owner=("ReplicaSet", "rs"))
    kc = kube.kubeconfig(tmp_path / "kc")
    kube.inject("GET", r"continue=", status=410, times=1, body=GONE)
    r = cli(["--kubeconfig", kc, "node", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["items"][0]["pods"] == 600
    kube.requests.clear()
    kube.inject("GET", r"continue=", status=410, times=1, body=GONE)
    with KubeAPI.from_settings(settings(kc)) as api:
        names = [p["metadata"]["name"] for p in api.list("/api/v1/namespaces/default/pods", limit=250)]
    assert sorted(names) == sorted(f"p{j}" for j in range(600))
    gets = [r["path"] for r in kube.requests if r["method"] == "GET"]
    assert len(gets) == 3  # page 1, the expired page 2, the full list


# -- TLS: tls-server-name, insecure-skip-tls-verify -------------------------------------------------

def _tls_variant(kube, tmp_path, **cluster) -> str:
    doc = json.loads(open(kube.kubeconfig(tmp_path / "good")).read())
    doc["clusters"][0]["cluster"].update(cluster)
    return _write(tmp_path / "kc", doc)


def test_tls_server_name_is_sent_and_verified_as_kubectl_does(cli, kube, tmp_path, kubectl_133):
    """client-go's TLSClientConfig.ServerName: the SNI and the name the certificate must carry,
    instead of the server URL's host (here 127.0.0.1; the certificate names localhost too)."""
    kube.add_node("n1")
    kc = _tls_variant(kube, tmp_path, **{"tls-server-name": "localhost"})
    r = cli(["--kubeconfig", kc, "node", "list", "-o", "name"])
    assert r.exit_code == 0 and r.stdout.split() == ["n1"], r.stderr
    assert kube.sni_names and set(kube.sni_names) == {"localhost"}
    kc = _tls_variant(kube, tmp_path, **{"tls-server-name": "wrong.example"})
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "nodes", "-o", "name"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "not wrong.example" in p.stderr
    r = cli(["--kubeconfig", kc, "node", "list", "-o", "name"])
    assert r.exit_code == 7 and "wrong.example" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the exec stand-in needs root (unshare --mount)")
def test_tls_server_name_reaches_the_exec_websockets_of_via_kube(cli, kube, tmp_path):
    from tests.test_vmcore import node_tree

    root = tmp_path / "tree-node"
    node_tree(str(root))
    kube.add_node("tree-node")
    kube.set_node_root("tree-node", str(root))
    kc = _tls_variant(kube, tmp_path, **{"tls-server-name": "localhost"})
    r = cli(["--kubeconfig", kc, "--via", "kube", "-N", "tree-node", "--agent-image", "python:3.12-slim",
             "sandbox", "list", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert kube.exec_log and set(kube.sni_names) == {"localhost"}


def test_insecure_skip_tls_verify_with_a_ca_is_refused_in_kubectls_words(cli, kube, tmp_path, kubectl_133):
    kc = _tls_variant(kube, tmp_path, **{"insecure-skip-tls-verify": True})
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "nodes"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    r = cli(["--kubeconfig", kc, "node", "list"])
    assert r.exit_code == 2, r.stderr
    assert r.stderr.strip().endswith(p.stderr.strip().split("error: ", 1)[1]), (r.stderr, p.stderr)
    assert not kube.requests


# -- exec plugins: bounded, and killed with katactl -------------------------------------------------

HANG = "echo $$ > {pids}; sleep 300 & echo $! >> {pids}; wait"


def _hanging_plugin_kubeconfig(kube, tmp_path) -> tuple[str, object]:
    pids = tmp_path / "pids"
    doc = json.loads(open(kube.kubeconfig(tmp_path / "good")).read())
    doc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "sh",
                                        "args": ["-c", HANG.format(pids=pids)], "interactiveMode": "Never"}}
    return _write(tmp_path / "kc", doc), pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, not reaped yet
    except FileNotFoundError:
        return False


def _wait_pids(pids, n=2) -> list[int]:
    for _ in range(400):
        if pids.exists() and len(pids.read_text().split()) >= n:
            return [int(x) for x in pids.read_text().split()]
        time.sleep(0.05)
    raise AssertionError("the plugin did not start")


def _gone(pid_list) -> bool:
    for _ in range(100):  # SIGKILL is delivered at once; reaping by init may lag a moment
        if not any(_alive(p) for p in pid_list):
            return True
        time.sleep(0.05)
    return False


def test_a_hanging_exec_plugin_is_bounded_by_request_timeout_and_killed(kube, tmp_path):
    kc, pids = _hanging_plugin_kubeconfig(kube, tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "--request-timeout", "1s", "node",
                          "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 7, err
    assert "did not answer within 1s (--request-timeout)" in err and err.count("\n") == 1, err
    assert _gone(_wait_pids(pids))  # the plugin and the sleep it started


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_exec_plugin_is_killed_with_katactl(kube, tmp_path, sig):
    kc, pids = _hanging_plugin_kubeconfig(kube, tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "katactl", "--kubeconfig", kc, "--request-timeout", "60s", "node",
                          "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = _wait_pids(pids)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert _gone(running), "the plugin outlived katactl"


# -- exec plugins: interactive as client-go decides it -----------------------------------------------

PROMPTING = """#!/bin/sh
# records what it was told (spec.interactive) and whether its stdin is a terminal; prompts on
# stderr and reads the token from stdin when interactive, else takes it from a file
info=$(printenv KUBERNETES_EXEC_INFO | tr -d ' ')
case "$info" in *'"interactive":true'*) i=true ;; *) i=false ;; esac
if [ -t 0 ]; then t=tty; else t=notty; fi
echo "$i $t" >> {log}
if [ "$i" = true ]; then printf 'Password for cluster: ' >&2; read -r tok; else tok=$(cat {tok}); fi
printf '{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"%s"}}}}' "$tok"
"""


def _prompting_kubeconfig(kube, tmp_path, mode: str | None) -> str:
    (tmp_path / "tok").write_text(kube.tokens["admin"])
    plugin = tmp_path / "plugin.sh"
    plugin.write_text(PROMPTING.format(log=tmp_path / "log", tok=tmp_path / "tok"))
    plugin.chmod(0o755)
    doc = json.loads(open(kube.kubeconfig(tmp_path / "good")).read())
    doc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                                        **({"interactiveMode": mode} if mode else {})}}
    return _write(tmp_path / "kc", doc)


def test_exec_plugin_prompts_when_stdin_is_a_terminal_and_stdout_a_pipe(kube, tmp_path):
    """`katactl ... -o name | cat` on a terminal, interactiveMode IfAvailable: client-go
    (plugin/pkg/client/auth/exec/exec.go isInteractive) decides from stdin, so the plugin
    gets the terminal's stdin and its prompt shows (its stderr is always the user's)."""
    from tests._pty import read_some, start_on_pty

    kube.add_node("n1")
    kc = _prompting_kubeconfig(kube, tmp_path, "IfAvailable")
    p, master = start_on_pty([sys.executable, "-m", "katactl", "--kubeconfig", kc, "--request-timeout", "30s",
                              "node", "list", "-o", "name"], stdout=subprocess.PIPE)
    screen = b""
    try:
        while b"Password for cluster: " not in screen:
            data = read_some(master, 0.2)
            assert data is not None and p.poll() is None, screen
            screen += data
        os.write(master, kube.tokens["admin"].encode() + b"\n")
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
        os.close(master)
    assert p.returncode == 0 and out.split() == [b"n1"], screen
    assert (tmp_path / "log").read_text().split() == ["true", "tty"]


@pytest.mark.parametrize("mode,stdin_tty,want", [
    ("IfAvailable", False, "false notty"),  # stdout a terminal, stdin not: not interactive
    ("Never", True, "false notty"),          # stdin a terminal, but Never: /dev/null, as client-go
    (None, False, "false notty"),            # v1beta1 without interactiveMode: IfAvailable
])
def test_exec_plugin_interactive_follows_interactive_mode_and_stdin(kube, tmp_path, mode, stdin_tty, want):
    import pty

    kube.add_node("n1")
    kc = _prompting_kubeconfig(kube, tmp_path, mode)
    if mode is None:
        doc = json.loads(open(kc).read())
        doc["users"][0]["user"]["exec"]["apiVersion"] = "client.authentication.k8s.io/v1beta1"
        _write(tmp_path / "kc", doc)
        (tmp_path / "plugin.sh").write_text((tmp_path / "plugin.sh").read_text().replace(
            "client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"))
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "katactl", "--kubeconfig", kc, "node", "list", "-o", "name"],
                           stdin=slave if stdin_tty else subprocess.DEVNULL, stdout=subprocess.PIPE if stdin_tty
                           else slave, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "log").read_text().strip() == want


def test_a_v1alpha1_exec_config_is_refused_as_kubectl_1_33_does(cli, kube, tmp_path, kubectl_133):
    """client-go dropped client.authentication.k8s.io/v1alpha1 in 1.24: kubectl 1.33 refuses
    it; katactl ran the plugin and used its token, hiding the broken kubeconfig."""
    import subprocess

    kc = _prompting_kubeconfig(kube, tmp_path, "Never")
    doc = json.loads(open(kc).read())
    doc["users"][0]["user"]["exec"]["apiVersion"] = "client.authentication.k8s.io/v1alpha1"
    kc = _write(tmp_path / "kc-alpha", doc)
    ref = subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "nodes"], capture_output=True, text=True)
    assert ref.returncode != 0 and 'invalid apiVersion "client.authentication.k8s.io/v1alpha1"' in ref.stderr
    r = cli(["--kubeconfig", kc, "node", "list"])
    assert r.exit_code == 2, r.stderr
    assert 'exec plugin: invalid apiVersion "client.authentication.k8s.io/v1alpha1"' in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "log").exists()


def test_exec_plugin_always_interactive_without_a_terminal_fails_in_client_gos_words(cli, kube, tmp_path):
    kc = _prompting_kubeconfig(kube, tmp_path, "Always")
    r = cli(["--kubeconfig", kc, "node", "list"])  # stdin is not a terminal here
    assert r.exit_code == 7, r.stderr
    assert "exec plugin cannot support interactive mode: standard input is not a terminal" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "log").exists()


# -- kubeconfigs kubectl refuses ---------------------------------------------------------------------

def _kubeconfig_doc(kube, tmp_path) -> dict:
    return json.loads(open(kube.kubeconfig(tmp_path / "good")).read())


@pytest.mark.parametrize("key", ["clusters", "users", "contexts"])
@pytest.mark.parametrize("dead_first", [True, False])
def test_a_name_twice_in_one_file_is_refused_as_kubectl_1_33_does(cli, kube, tmp_path, monkeypatch, kubectl_133,
                                                                   key, dead_first):
    """client-go (tools/clientcmd/api/v1/conversion.go) refuses a file naming a cluster, user or
    context twice ('duplicate name "X" in list'): a hand-merged kubeconfig must not send katactl
    to either of the two entries, whichever comes first; across KUBECONFIG files the first stays."""
    kube.add_node("n1")
    doc = _kubeconfig_doc(kube, tmp_path)
    twin = json.loads(json.dumps(doc[key][0]))
    inner = {"clusters": "cluster", "users": "user", "contexts": "context"}[key]
    twin[inner].update({"clusters": {"server": "https://127.0.0.1:1"}, "users": {"token": "wrong"},
                        "contexts": {"namespace": "elsewhere"}}[key])
    doc[key] = [twin, doc[key][0]] if dead_first else [doc[key][0], twin]
    kc = _write(tmp_path / "dup" / "config", doc)
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "nodes"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and f'duplicate name "{doc[key][0]["name"]}" in list' in p.stderr, p.stderr
    kube.requests.clear()
    r = cli(["--kubeconfig", kc, "node", "list"])
    assert r.exit_code == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and kc in r.stderr and f'duplicate name "{doc[key][0]["name"]}" in {key}' \
        in r.stderr, r.stderr
    assert not kube.requests
    # the same file in a KUBECONFIG list after a good one: kubectl still refuses it
    kubeconfig = os.pathsep.join([kube.kubeconfig(tmp_path / "first"), kc])
    p = subprocess.run([kubectl_133, "get", "nodes"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "KUBECONFIG": kubeconfig})
    assert p.returncode == 1 and "duplicate name" in p.stderr, p.stderr
    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    r = cli(["node", "list"])
    assert r.exit_code == 2 and kc in r.stderr, r.stderr


@pytest.mark.parametrize("basic", [{"username": "u", "password": "p"}, {"username": "u"}, {"password": "p"}])
def test_a_token_with_basic_auth_is_refused_as_kubectl_1_33_does(cli, kube, tmp_path, kubectl_133, basic):
    """client-go (tools/clientcmd/validation.go validateAuthInfo): a user with a token and a
    username or password has two authentication methods, which kubectl refuses; katactl must not
    act as the token's user where kubectl would not act at all."""
    kube.add_node("n1")
    doc = _kubeconfig_doc(kube, tmp_path)
    doc["users"][0]["user"].update(basic)
    kc = _write(tmp_path / "two" / "config", doc)
    p = subprocess.run([kubectl_133, "--kubeconfig", kc, "get", "nodes"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    kube.requests.clear()
    r = cli(["--kubeconfig", kc, "node", "list"])
    assert r.exit_code == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.strip().endswith(p.stderr.strip().split("error: ", 1)[1]), \
        (r.stderr, p.stderr)
    assert not kube.requests
