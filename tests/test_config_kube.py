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
