"""A wall-clock step (an NTP correction, a VM resumed) for a katactl subprocess: put this
directory first on PYTHONPATH and time.time() adds the seconds written in $KATACTL_TEST_CLOCK_STEP_FILE
(read at each call, so the test steps the clock while the process runs). time.monotonic()
is left alone, as the kernel does."""
import os
import time

_file = os.environ.get("KATACTL_TEST_CLOCK_STEP_FILE")
if _file:
    _wall = time.time

    def _stepped() -> float:
        try:
            with open(_file) as fh:
                return _wall() + float(fh.read().strip() or 0)
        except (OSError, ValueError):
            return _wall()

    time.time = _stepped
