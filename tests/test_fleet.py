"""The fan-out keeps the original exception of an unexpected per-node failure."""
from __future__ import annotations

import io
import logging

from katactl import config, fleet


def test_unexpected_node_failure_keeps_its_traceback_for_verbose(tmp_path):
    s = config.resolve({"host_root": str(tmp_path), "nodes": ("localhost",)})

    def boom(transport):
        raise ValueError("bad byte in a node file")

    fo = fleet.run_on_nodes(s, boom)
    err = fo.errors["localhost"]
    assert "ValueError: bad byte" in err.message  # the one line stays as it was
    assert isinstance(err.__cause__, ValueError)

    # with -v the routed library log prints the traceback of the original
    from katactl.context import AppContext

    s = config.resolve({"host_root": str(tmp_path), "verbose": 1})
    ctx = AppContext.create(s)
    buf = io.StringIO()
    ctx.out.stderr = buf
    fleet.run_on_nodes(s, boom)
    text = buf.getvalue()
    assert "Traceback" in text and "in boom" in text and "ValueError: bad byte" in text
    for h in list(logging.getLogger("katactl").handlers):
        logging.getLogger("katactl").removeHandler(h)


def test_host_root_that_is_a_symlink_loop_says_so(cli, tmp_path):
    """A symlink loop as --host-root is named as one, not "no such directory" (issue 16,
    finding 17); exit 2 as for the other unusable roots."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    chain = tmp_path / "a"
    chain.symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for root in (loop, chain, tmp_path / "loop" / "x"):
        r = cli(["--host-root", str(root), "sandbox", "list"])
        assert r.exit_code == 2 and r.stderr == f"katactl: error: --host-root {root}: symlink loop\n", r.stderr
    r = cli(["--host-root", str(tmp_path / "missing"), "sandbox", "list"])
    assert r.exit_code == 2 and r.stderr.endswith(": no such directory\n")
    (tmp_path / "file").write_text("")
    r = cli(["--host-root", str(tmp_path / "file"), "sandbox", "list"])
    assert r.exit_code == 2 and r.stderr.endswith(": not a directory\n")
