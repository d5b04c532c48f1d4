"""The local-file rollout store (katactl.rollout.store.FileStore, for SSH-only fleets) under
concurrent writers: real processes on real files."""
from __future__ import annotations

import json
import multiprocessing

from katactl.rollout.store import FileStore


def _request(directory: str, key: str, barrier, rounds: int) -> None:
    store = FileStore(directory)
    for _ in range(rounds):
        barrier.wait()
        store.set_control("r1", {key: True})
        barrier.wait()


def test_a_pause_and_an_abort_at_the_same_moment_are_both_kept(tmp_path):
    """set_control read NAME.control.json, merged and wrote it back unlocked: a 'rollout pause'
    and a 'rollout abort' at once kept only the later write (291 rounds of 300 lost one; a lost
    abort leaves the running rollout going and the abort waiting for it until --timeout).
    Each round starts both requests together and checks both are there (review 13)."""
    rounds = 40
    (tmp_path / "r1.json").write_text("{}")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_request, args=(str(tmp_path), k, barrier, rounds)) for k in ("pause", "abort")]
    for p in procs:
        p.start()
    lost = []
    try:
        for i in range(rounds):
            (tmp_path / "r1.control.json").unlink(missing_ok=True)
            barrier.wait(timeout=60)  # both go
            barrier.wait(timeout=60)  # both done
            ctl = json.loads((tmp_path / "r1.control.json").read_text())
            if ctl != {"pause": True, "abort": True}:
                lost.append((i, ctl))
    finally:
        for p in procs:
            p.join(timeout=60)
            p.kill()
    assert not lost, f"{len(lost)} of {rounds} rounds lost a request, e.g. {lost[0]}"
