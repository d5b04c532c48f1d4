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


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", "-3", "-T1"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("algo", ["gzip", "zstd"])
def test_inflater_bounded_pieces_members_and_damage(algo):
    """Zero pages inflate ~1000x: output comes in pieces of at most CHUNK bytes, however
    large the input chunk; gzip members / zstd frames follow one another; a cut or
    damaged stream is an OperationFailed."""
    if algo == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    data = bytes(64 << 20) + os.urandom(3 << 20) + bytes(16 << 20)
    comp = (gzip.compress(data[:40 << 20], 1) + gzip.compress(data[40 << 20:], 1) if algo == "gzip"
            else _zstd(data[:40 << 20]) + _zstd(data[40 << 20:]))
    h, sizes = hashlib.sha256(), []

    def sink(b):
        h.update(b)
        sizes.append(len(b))

    inf = streams.Inflater(algo, sink)
    try:
        inf.feed(comp)                       # one big feed
        inf.finish()
    finally:
        inf.close()
    assert h.digest() == hashlib.sha256(data).digest() and inf.out == len(data)
    assert max(sizes) <= streams.CHUNK
    for damaged in (comp[:len(comp) // 2], comp[:len(comp) // 2] + bytes([comp[len(comp) // 2] ^ 0xFF])
                    + comp[len(comp) // 2 + 1:]):
        inf = streams.Inflater(algo, lambda b: None)
        try:
            with pytest.raises(OperationFailed, match=f"the {algo} stream cannot be decoded"):
                for i in range(0, len(damaged), 1 << 20):
                    inf.feed(damaged[i:i + (1 << 20)])
                inf.finish()
        finally:
            inf.close()


def test_the_hasher_survives_a_wakeup_lost_to_an_interrupt():
    """SIGTERM's KeyboardInterrupt can strike the main thread inside Queue.put's notify() after
    it took the hasher thread's waiter and before it released it: the thread slept on with data
    queued, and Hasher.close() joined it for ever (vmcore collect --via kube hung after SIGTERM
    instead of exiting 130). The lost wakeup, made by hand: the thread must still finish."""
    import threading
    import time

    h = streams.Hasher()
    deadline = time.monotonic() + 5
    while not h._q.not_empty._waiters and time.monotonic() < deadline:  # the thread waits for data
        time.sleep(0.01)
    h._q.not_empty._waiters.clear()  # what the interrupted notify() leaves: nobody to wake it
    done = []
    t = threading.Thread(target=lambda: done.append(h.hexdigest()), daemon=True)
    with h._q.mutex:  # data arrives without a wakeup
        h._q.queue.append(b"abc")
        h._q.unfinished_tasks += 1
    t.start()
    t.join(10)
    assert done == [hashlib.sha256(b"abc").hexdigest()]
