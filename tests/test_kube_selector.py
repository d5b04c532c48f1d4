"""-l/--selector resolves nodes through a real HTTP exchange with a kube-apiserver stand-in."""
import pytest

from katactl import config, fleet
from katactl.errors import AuthError, NotFound, UsageError
from tests.kubeserver import FakeKubeAPI


@pytest.fixture
def api():
    nodes = {f"node-{i:04d}": {"pool": "batch" if i % 2 else "online", "kata": "true"} for i in range(1203)}
    nodes["edge"] = {"pool": "edge"}
    srv = FakeKubeAPI(nodes)
    yield srv
    srv.close()


def test_selector_pages_through_all_nodes(api, tmp_path):
    kc = api.kubeconfig(tmp_path / "kc")
    s = config.resolve({"selector": "pool=batch", "kubeconfig": kc})
    names = fleet.select_nodes(s)
    assert len(names) == 601 and names[0] == "node-0001"
    assert sum("continue=" in r["path"] for r in api.requests) == 1  # 2 pages of 500 for 601 items


def test_set_based_selector(api, tmp_path):
    kc = api.kubeconfig(tmp_path / "kc")
    s = config.resolve({"selector": "pool in (edge),!kata", "kubeconfig": kc})
    assert fleet.select_nodes(s) == ["edge"]


def test_no_match_is_not_found(api, tmp_path):
    s = config.resolve({"selector": "pool=none", "kubeconfig": api.kubeconfig(tmp_path / "kc")})
    with pytest.raises(NotFound):
        fleet.select_nodes(s)


def test_bad_token_is_auth_error(api, tmp_path):
    s = config.resolve({"selector": "pool=edge", "kubeconfig": api.kubeconfig(tmp_path / "kc", token="wrong")})
    with pytest.raises(AuthError):
        fleet.select_nodes(s)


def test_malformed_selector_is_usage_error(cli, api, tmp_path):
    kc = api.kubeconfig(tmp_path / "kc")
    r = cli(["--kubeconfig", kc, "-l", "pool in (", "version"])
    assert r.exit_code == 2 and "Traceback" not in r.stderr


def test_missing_kubeconfig_is_usage_error(cli, tmp_path):
    r = cli(["--kubeconfig", str(tmp_path / "none"), "-l", "a=b", "version"])
    assert r.exit_code == 2 and "kubeconfig" in r.stderr


def test_unreachable_api_exits_7(cli, api, tmp_path):
    kc = api.kubeconfig(tmp_path / "kc")
    api.close()
    r = cli(["--kubeconfig", kc, "--request-timeout", "1s", "-l", "a=b", "version"])
    assert r.exit_code == 7, r.stderr


def test_pod_reference_resolves_to_its_node(tmp_path):
    from katactl import targets

    srv = FakeKubeAPI({"n1": {}}, pods={("batch", "job-7"): {"nodeName": "n1", "uid": "u-1"}})
    try:
        s = config.resolve({"kubeconfig": srv.kubeconfig(tmp_path / "kc")})
        ref = targets.parse_sandbox_ref(s, "pod/batch/job-7")
        assert ref == targets.SandboxRef("batch/job-7", "n1")
        assert fleet.select_nodes(targets.settings_for_ref(s, ref)) == ["n1"]
        with pytest.raises(NotFound):
            targets.parse_sandbox_ref(s, "pod/batch/nope")
        for bad in ("pod/batch", "pod//x", "pod/Bad_NS/x", "pod/a/b/c", "pod/a/$(x)"):
            with pytest.raises(UsageError):
                targets.parse_sandbox_ref(s, bad)
    finally:
        srv.close()


def test_plain_refs_need_no_api():
    from katactl import targets

    s = config.resolve({})
    assert targets.parse_sandbox_ref(s, "ns/pod") == targets.SandboxRef("ns/pod")
    assert targets.parse_sandbox_ref(s, "abc123") == targets.SandboxRef("abc123")


@pytest.mark.parametrize("selector", ["a=b=c", "a in (b", "a b", "pool in ("])
def test_malformed_selector_is_usage_error_without_the_api(cli, api, tmp_path, selector):
    """A bad -l was exit 7 when the API server was unreachable (exit 2 only from a live
    server's 400): the exit code of bad input depended on the network (review 7, finding 11).
    It is checked as the API server parses it, before anything is contacted."""
    kc = api.kubeconfig(tmp_path / "kc")
    api.close()
    r = cli(["--kubeconfig", kc, "--request-timeout", "1s", "-l", selector, "-o", "json", "version"])
    assert r.exit_code == 2, r.stderr
    assert r.json()["code"] == "UsageError" and "invalid label selector" in r.json()["message"]


def test_a_bad_selector_from_the_environment_is_named_and_config_view_still_shows_it(cli, monkeypatch):
    """A bad KATACTL_SELECTOR failed every command without saying where it came from, also
    `config view`, the command that says where a setting came from."""
    monkeypatch.setenv("KATACTL_SELECTOR", "a in (")
    r = cli(["sandbox", "list"])
    assert r.exit_code == 2 and "label selector (from env KATACTL_SELECTOR)" in r.stderr, r.stderr
    view = cli(["config", "view", "-o", "json"])
    assert view.exit_code == 0, view.stderr
    assert {"name": "selector", "value": "a in (", "source": "env KATACTL_SELECTOR"} in view.json()["settings"]
