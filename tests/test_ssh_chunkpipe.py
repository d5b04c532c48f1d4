"""katactl.backends.ssh._ChunkPipe answers as paramiko's BufferedPipe does (it replaces it as
an exec channel's stdout buffer): the same reads for the same feeds, the same timeout and
end-of-stream behaviour, and the event (Channel.fileno's select pipe) set and cleared alike."""
from __future__ import annotations

import threading

import pytest
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout

from katactl.backends.ssh import _ChunkPipe

FEEDS = [b"a" * 10, b"b" * 32768, b"", b"c" * 5, b"d" * 100_000, b"e"]
READS = [4, 6, 1 << 20, 3, 2, 50_000, 50_000, 1 << 20]


def _script(pipe) -> list:
    out = []
    feeds, reads = list(FEEDS), list(READS)
    while reads:
        if feeds:
            pipe.feed(feeds.pop(0))
        out.append((len(pipe), pipe.read_ready(), pipe.read(reads.pop(0), timeout=0.5)))
    return out


def test_same_reads_as_paramikos_buffered_pipe():
    assert _script(_ChunkPipe()) == _script(BufferedPipe())


@pytest.mark.parametrize("cls", [_ChunkPipe, BufferedPipe])
def test_timeout_close_and_event(cls):
    p = cls()
    with pytest.raises(PipeTimeout):
        p.read(10, timeout=0.0)
    with pytest.raises(PipeTimeout):
        p.read(10, timeout=0.05)
    ev = threading.Event()
    p.set_event(ev)
    assert not ev.is_set()
    p.feed(b"xy")
    assert ev.is_set()
    assert p.read(10) == b"xy" and not ev.is_set()
    threading.Timer(0.05, p.feed, (b"late",)).start()
    assert p.read(10, timeout=5) == b"late"      # a blocked reader wakes on feed
    p.feed(b"rest")
    p.close()
    assert ev.is_set()
    assert p.empty() == b"rest" and len(p) == 0
    assert p.read(10) == b"" and p.read(10, timeout=0.0) == b""   # closed and empty: end of stream
