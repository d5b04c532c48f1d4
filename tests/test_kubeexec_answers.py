"""The --via kube file helper's per-path answers are checked against the paths asked."""
from __future__ import annotations

import pytest

from katactl.backends.kubeexec import KubeExecTransport
from katactl.errors import ProtocolError


def _transport() -> KubeExecTransport:
    t = object.__new__(KubeExecTransport)  # no API server needed: only the answer check runs
    t.node = "node1"
    return t


@pytest.mark.parametrize("header", [{"r": [{"n": 1}]}, {"r": [{"n": 1}] * 3}, {}, {"r": "x"}])
def test_short_long_or_missing_answers_are_protocol_errors(header):
    with pytest.raises(ProtocolError, match="file helper answered"):
        _transport()._answers(header, ["/a", "/b"])


def test_answers_one_per_path():
    assert _transport()._answers({"r": [{"n": 1}, {"e": 2}]}, ["/a", "/b"]) == [{"n": 1}, {"e": 2}]
