"""katactl.gcpause: the cyclic GC paused around discovery and its JSON (issue 17)."""
from __future__ import annotations

import gc
import threading

from katactl.gcpause import paused


def test_the_pause_nests_and_restores_the_gc():
    was = gc.isenabled()
    try:
        gc.enable()
        with paused():
            with paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the outer pause still holds
        assert gc.isenabled()
        gc.disable()
        with paused():
            pass
        assert not gc.isenabled()  # disabled before: left disabled
    finally:
        (gc.enable if was else gc.disable)()


def test_what_the_block_kept_is_not_walked_again_as_young():
    """After the pause, what the block made and kept is in the oldest generation: the first
    collections after it (a few allocations later) do not walk it all again."""
    was = gc.isenabled()
    try:
        gc.enable()
        with paused():
            kept = [[i] for i in range(5000)]
        young = {id(o) for o in gc.get_objects(generation=0) + gc.get_objects(generation=1)}
        assert not young.intersection(map(id, kept))
        assert any(o is kept for o in gc.get_objects(generation=2))
    finally:
        (gc.enable if was else gc.disable)()


def test_concurrent_pauses_share_one():
    was = gc.isenabled()
    try:
        gc.enable()
        inside, release = threading.Event(), threading.Event()

        def worker():
            with paused():
                inside.set()
                release.wait(5)

        th = threading.Thread(target=worker)
        th.start()
        inside.wait(5)
        with paused():
            pass
        assert not gc.isenabled()  # the worker's pause still holds
        release.set()
        th.join(5)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
