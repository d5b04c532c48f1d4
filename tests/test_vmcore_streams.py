"""vmcore byte plumbing (katactl/vmcore/streams.py): the rate limit and the Inflater."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import types

import pytest

from katactl.errors import OperationFailed
from katactl.vmcore import streams


def test_rate_limit_keeps_the_average_at_the_rate(monkeypatch):
    """Called with the bytes copied so far: 16 MiB at 8 MiB/s is 2 s of (fake) clock."""
    clock = {"t": 100.0}
    fake = types.SimpleNamespace(monotonic=lambda: clock["t"],
                                 sleep=lambda s: clock.__setitem__("t", clock["t"] + s))
    monkeypatch.setattr(streams, "time", fake)
    limit = streams.RateLimit(8 << 20)
    done = 0
    for _ in range(4):
        done += 4 << 20
        limit(done)
    assert clock["t"] - 100.0 == pytest.approx(2.0)
    streams.RateLimit(None)(1 << 40)      # no limit: never sleeps
    assert clock["t"] - 100.0 == pytest.approx(2.0)
