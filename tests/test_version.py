"""katactl version with a node: the client's versions alongside the node's, and --host-root's
binaries reported by path (not run), as --help says (review 5, finding 11a)."""
from __future__ import annotations

import os
import stat

from katactl import __version__


def _root(tmp_path):
    d = tmp_path / "opt" / "kata" / "bin"
    d.mkdir(parents=True)
    shim = d / "containerd-shim-kata-v2"
    # run, it would leave a mark: a --host-root's binaries are another machine's programs
    mark = tmp_path / "ran"
    shim.write_text(f"#!/bin/sh\ntouch {mark}\necho 'Kata Containers containerd shim (Golang): version: 9.9.9'\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return tmp_path, mark


def test_host_root_shows_client_and_node(cli, tmp_path):
    root, mark = _root(tmp_path)
    r = cli(["--host-root", str(root), "version", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    d = r.json()
    assert d["kind"] == "NodeVersion" and d["node"] == "localhost"
    assert d["client"]["client"] == __version__ and d["client"]["python"]
    assert d["shim"] == "present at /opt/kata/bin/containerd-shim-kata-v2"
    assert d["runtime"] is None
    assert not os.path.exists(mark)


def test_help_promises_what_it_does(cli, tmp_path):
    h = " ".join(cli(["version", "--help"]).stdout.split())
    assert "also the node's" in h and "present at PATH" in h and "not run" in h
    root, _ = _root(tmp_path)
    r = cli(["--host-root", str(root), "version"])
    assert r.exit_code == 0, r.stderr
    assert f"client: {__version__}" in r.stdout
    assert "shim: present at /opt/kata/bin/containerd-shim-kata-v2" in r.stdout
