"""The cyclic GC paused around work that allocates many containers and no cycles."""
from __future__ import annotations

import contextlib
import gc
import threading

_LOCK = threading.Lock()
_state = [0, False]  # [nesting depth, whether the GC was enabled before the outermost]


@contextlib.contextmanager
def paused():
    """The cyclic GC paused in the block. Sandbox discovery (parsed JSON, stats) and the
    JSON of its result (a dict per sandbox, walked for orjson) allocate many small
    containers that never form cycles; every 700 of them the GC would walk the young
    ones, and ever more often the whole, growing heap: at 5,000 sandboxes a third of the
    run. Nested and concurrent uses (fan-out threads) share one pause; the GC is enabled
    again when the last one ends (if it was before). Nothing stays frozen (gc.freeze()
    alone): discovery also runs inside long-lived ``top``, where frozen cyclic garbage
    would never be freed."""
    with _LOCK:
        if _state[0] == 0:
            _state[1] = gc.isenabled()
            gc.disable()
        _state[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _state[0] -= 1
            if _state[0] == 0 and _state[1]:
                # what the block made and kept joins the oldest generation unexamined: else
                # the first collections after it walk all of it (at 10,000 sandboxes ~40 ms
                # of the run) to learn what the pause already knew, that it is no garbage.
                # Cyclic garbage among it waits for a full collection, as any old object's.
                # (unfreeze would also thaw what someone froze before: katactl freezes nothing)
                gc.freeze()
                gc.unfreeze()
                gc.enable()
