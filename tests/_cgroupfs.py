"""Helpers for the tests that make real cgroups on this machine."""
from __future__ import annotations

import os
import time


def remove_cgroups(made: list[str], tries: int = 100) -> None:
    """rmdir the cgroup directories ``made`` (children last in the list: removed first). A
    cgroup whose last task has just been killed can stay busy (EBUSY) for a moment: retried."""
    for d in reversed(made):
        for _ in range(tries):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
