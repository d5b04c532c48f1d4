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
