"""katactl.config: where the config file comes from, and `config view`'s human table."""
from __future__ import annotations

import pytest


def test_explicit_config_file_that_does_not_exist_is_a_usage_error(cli, tmp_path, monkeypatch):
    """KATACTL_CONFIG naming a missing file (a runbook's typo) ran with every setting at its
    default, SSH user and timeouts lost, exit 0 (review 5, finding 9). As kubectl with a
    missing --kubeconfig: exit 2, one line naming the file."""
    missing = tmp_path / "typo.toml"
    monkeypatch.setenv("KATACTL_CONFIG", str(missing))
    for args in (["config", "view"], ["config", "view", "-o", "json"], ["version"]):
        r = cli(args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("katactl: error:")]
        assert len(lines) == 1 and str(missing) in lines[0] and "KATACTL_CONFIG" in lines[0], r.stderr
    assert r.exit_code == 2
    # the file there: read as before
    missing.write_text('ssh_user = "sre"\n')
    r = cli(["config", "view", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert {s["name"]: s["value"] for s in r.json()["settings"]}["ssh_user"] == "sre"


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_katactl_config_is_a_usage_error(cli, monkeypatch, value):
    """KATACTL_CONFIG="$CFG" with CFG unset must not quietly mean the default file, no more
    than an empty KATACTL_HOST_ROOT means this host."""
    monkeypatch.setenv("KATACTL_CONFIG", value)
    r = cli(["config", "view"])
    assert r.exit_code == 2 and "KATACTL_CONFIG is set but empty" in r.stderr, r.stderr


def test_default_config_file_may_be_missing(cli, _isolated_home):
    """review 13 docs #3: config view named the default file as "config file: PATH" (JSON
    configFile) though there was none, so a mistyped XDG_CONFIG_HOME looked like the file in
    use: it says it does not exist (configFileExists false), and an empty file exists."""
    path = _isolated_home / "config" / "katactl" / "config.toml"
    assert not path.exists()
    r = cli(["config", "view", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    assert r.json()["configFile"] == str(path) and r.json()["configFileExists"] is False
    r = cli(["config", "view"])
    assert r.exit_code == 0 and f"config file: {path} (does not exist: no setting comes from it)\n" in r.stderr, \
        r.stderr
    path.parent.mkdir(parents=True)
    path.write_text("")
    assert cli(["config", "view", "-o", "json"]).json()["configFileExists"] is True
    r = cli(["config", "view"])
    assert r.exit_code == 0 and f"config file: {path}\n" in r.stderr, r.stderr


def test_config_view_table_shows_node_groups_and_where_each_comes_from(cli, _isolated_home, monkeypatch):
    """-N @rack1's expansion was in -o json's nodeGroups only (review 5, finding 11d): the
    table has one row per group, its members and its source (a profile's group over the
    top-level one of the same name)."""
    cfg = _isolated_home / "config" / "katactl"
    cfg.mkdir(parents=True)
    path = cfg / "config.toml"
    path.write_text('profile = "prod"\n[node_groups]\nrack1 = ["a", "b"]\nall = ["a", "b", "c"]\n'
                    '[profiles.prod.node_groups]\nrack1 = ["n1", "n2"]\nempty = []\n')
    r = cli(["config", "view"])
    assert r.exit_code == 0, r.stderr
    rows = {ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines()[1:]}
    assert rows["node_groups.rack1"] == ["n1,n2", f"{path}", "[profiles.prod]"]
    assert rows["node_groups.all"] == ["a,b,c", f"{path}"]
    assert rows["node_groups.empty"] == ["-", f"{path}", "[profiles.prod]"]
    r = cli(["config", "view", "-o", "json"])  # the JSON is as it was
    assert r.json()["nodeGroups"] == {"rack1": ["n1", "n2"], "all": ["a", "b", "c"], "empty": []}


@pytest.mark.parametrize("body", ['nodes = ""', 'nodes = [""]', 'nodes = [" , "]', "nodes = []", 'selector = ""',
                                  'nodes_from = ""', 'via = ""', 'host_root = "  "',
                                  'profile = "prod"\n[profiles.prod]\nnodes = ""',
                                  'profile = "prod"\n[profiles.prod]\nselector = ""'])
def test_empty_selection_in_the_config_file_is_a_usage_error(cli, _isolated_home, body):
    """An empty node selection in the config file ran every command on this host, exit 0
    (review 7, finding 3), where the same empty value as a flag or KATACTL_* is refused:
    a template whose node list rendered empty must not act on the operator's machine."""
    cfg = _isolated_home / "config" / "katactl"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text(body + "\n")
    r = cli(["-o", "json", "version"])
    assert r.exit_code == 2, (body, r.stdout, r.stderr)
    assert r.json()["kind"] == "Error" and "config.toml" in r.json()["message"], r.stdout
    if "profiles" in body:
        assert "[profiles.prod]" in r.json()["message"]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("katactl: error:")]
    assert len(lines) == 1, r.stderr


@pytest.mark.parametrize("variable", ["XDG_STATE_HOME", "XDG_CONFIG_HOME"])
def test_relative_xdg_directory_is_ignored(tmp_path, monkeypatch, variable):
    """A relative $XDG_STATE_HOME put the audit log under the current directory, one trail
    per cwd (review 7, finding 14): the XDG spec says to ignore a relative value."""
    from katactl import audit, config

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv(variable, "rel")
    monkeypatch.chdir(tmp_path)
    if variable == "XDG_STATE_HOME":
        assert audit.audit_path() == str(home / ".local" / "state" / "katactl" / "audit.log")
    else:
        assert config.config_path() == str(home / ".config" / "katactl" / "config.toml")
    monkeypatch.setenv(variable, str(tmp_path / "abs"))  # an absolute one is used as it is
    assert (audit.audit_path() if variable == "XDG_STATE_HOME" else config.config_path()).startswith(
        str(tmp_path / "abs" / "katactl"))


@pytest.mark.parametrize("var,value,suggestion", [
    ("KATACTL_NODE", "node-7", "KATACTL_NODES"),  # the flag's name, singular
    ("KATACTL_REQUEST_TIMOUT", "1s", "KATACTL_REQUEST_TIMEOUT"),
    ("KATACTL_HOSTROOT", "/x", "KATACTL_HOST_ROOT"),
    ("KATACTL_nodes", "node-7", "KATACTL_NODES"),  # variables are case-sensitive
])
def test_unknown_katactl_variable_is_refused_with_a_suggestion(cli, tmp_path, monkeypatch, var, value, suggestion):
    """KATACTL_NODE=node-7 (the flag is --node) was ignored and the command acted on this
    host, exit 0, where `node = [...]` in the config file is refused (review 11, finding 4)."""
    monkeypatch.setenv(var, value)
    r = cli(["--host-root", str(tmp_path), "-o", "json", "sandbox", "list"])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    d = r.json()
    assert d["kind"] == "Error" and var in d["message"], d
    assert f"did you mean {suggestion}?" in d["message"]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("katactl: error:")]) == 1, r.stderr
    # the variables katactl reads outside the settings, and the test suite's hooks, still run
    monkeypatch.delenv(var)
    for ok in ("KATACTL_LAB_ROOT", "KATACTL_KATA_ROOT", "KATACTL_ROLLOUT_SHARD_BYTES", "KATACTL_FAULT",
               "KATACTL_TEST_KILL_AT", "KATACTL_REQUIRE_TOOLS", "KATACTL_PARALLEL"):
        monkeypatch.setenv(ok, "4" if ok == "KATACTL_PARALLEL" else "")
    r = cli(["--host-root", str(tmp_path), "-o", "json", "sandbox", "list"])
    assert r.exit_code == 0 and r.json()["kind"] == "SandboxList", r.stderr


@pytest.mark.parametrize("var", ["KATACTL_VERSION", "KATACTL_XYZZY", "KATACTL_OUTPUT_FORMAT"])
def test_a_variable_like_no_setting_is_warned_about_not_refused(cli, tmp_path, monkeypatch, var):
    """A CI system's own KATACTL_VERSION looks like no setting: refusing it stopped every
    command there, 'version', 'config view' and 'lab down' included (review 12). It is
    warned about once and the command runs."""
    monkeypatch.setenv(var, "1.2.3")
    for argv in (["--host-root", str(tmp_path), "-o", "json", "sandbox", "list"], ["-o", "json", "config", "view"],
                 ["-o", "json", "version"]):
        r = cli(argv)
        assert r.exit_code == 0, (argv, r.stderr)
        assert [ln for ln in r.stderr.splitlines() if var in ln] == \
            [f"warning: {var} is not a katactl variable: ignored (docs/configuration.md lists them)"], r.stderr


def test_every_setting_variable_is_documented():
    """The flag -> variable names (-N/--node is KATACTL_NODES) are documented, since a
    variable not among them is refused."""
    import os

    from katactl.config import OTHER_VARIABLES, SETTINGS, variable

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")).read()
    missing = [v for v in [variable(n) for n in SETTINGS] + sorted(OTHER_VARIABLES - {"KATACTL_STANDIN_EXEC"})
               if f"`{v}`" not in doc]
    assert not missing, missing


@pytest.mark.parametrize("where", ["file", "env"])
def test_relative_audit_log_is_refused(cli, _isolated_home, tmp_path, monkeypatch, where):
    """audit_log = "audit.log" wrote a/audit.log and b/audit.log for runs from a/ and b/:
    the audit trail split by working directory (review 11, finding 8), as a relative
    $XDG_STATE_HOME did before review 7."""
    cfg = _isolated_home / "config" / "katactl" / "config.toml"
    cfg.parent.mkdir(parents=True)
    if where == "file":
        cfg.write_text('audit_log = "audit.log"\n')
    else:
        monkeypatch.setenv("KATACTL_AUDIT_LOG", "logs/audit.log")
    monkeypatch.chdir(tmp_path)
    r = cli(["-o", "json", "--host-root", str(tmp_path), "sandbox", "list"])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    msg = r.json()["message"]
    assert "relative path" in msg and ("config.toml" in msg if where == "file" else "KATACTL_AUDIT_LOG" in msg), msg
    # absolute, or from the home directory: as before
    monkeypatch.delenv("KATACTL_AUDIT_LOG", raising=False)
    cfg.write_text('audit_log = "~/audit.log"\n')
    r = cli(["-o", "json", "config", "view"])
    assert r.exit_code == 0, r.stderr
    assert {s["name"]: s["value"] for s in r.json()["settings"]}["audit_log"] == "~/audit.log"


def test_unknown_config_key_names_the_closest_setting(cli, _isolated_home):
    """`node = [...]` (the flag's spelling) is refused, now with the key it meant, as the
    environment variable's refusal names it."""
    cfg = _isolated_home / "config" / "katactl"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('node = ["node-7"]\nrequest_timout = "5s"\nxyzzy = 1\n')
    r = cli(["config", "view"])
    assert r.exit_code == 2, r.stderr
    assert "hint: node: did you mean nodes?; request_timout: did you mean request_timeout?" in r.stderr, r.stderr
