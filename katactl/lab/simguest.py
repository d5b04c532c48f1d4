"""A simulated guest's memory for the Cloud Hypervisor / Firecracker lab servers.

The balloon's actual size moves toward its target at a fixed rate (as a real
guest driver does, only deterministic); the guest "uses" a fixed amount.
"""
from __future__ import annotations

import threading
import time

#: how fast the simulated balloon moves (bytes per second)
RATE = 2 << 30


class SimGuest:
    def __init__(self, memory_bytes: int, used_bytes: int = 96 << 20, driver: bool = True):
        self.memory = int(memory_bytes)
        self.used = int(used_bytes)
        self.driver = driver  # False: no guest balloon driver, requests stay pending
        self._lock = threading.Lock()
        self._from = 0
        self._target = 0
        self._t0 = time.monotonic()

    def balloon_actual(self) -> int:
        with self._lock:
            if not self.driver:
                return 0
            dt = time.monotonic() - self._t0
            step = int(dt * RATE)
            if self._target >= self._from:
                return min(self._target, self._from + step)
            return max(self._target, self._from - step)

    def balloon_target(self) -> int:
        return self._target

    def set_balloon(self, size: int) -> None:
        cur = self.balloon_actual()
        with self._lock:
            self._from, self._target, self._t0 = cur, int(size), time.monotonic()

    def guest_stats(self) -> dict:
        """What a guest balloon driver reports (bytes)."""
        b = self.balloon_actual()
        free = max(0, self.memory - self.used - b)
        return {"total": self.memory, "free": free, "available": free + (16 << 20)}
