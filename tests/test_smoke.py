def test_version_json(cli):
    r = cli(["version", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["apiVersion"] == "katactl/v1" and d["kind"] == "Version"


def test_unknown_command_is_usage_error(cli):
    r = cli(["no-such-command"])
    assert r.exit_code == 2
    assert "No such command" in r.stderr and "Traceback" not in r.stderr
