"""Non-stop A/B upgrade of the Kata runtime and agent (see docs/upgrade.md).

Public API (every function takes a NodeTransport and a Layout, returns plain
dicts, never prints; modules: state (readers), journal (crash recovery), stage,
switch (and rollback), status, gc):

- ``stage(t, layout, source, version=, sha256=, no_verify=, reserve=, force=, dry_run=, lock_timeout=, on_wait=)``
- ``switch(t, layout, version, component="all"|"runtime"|"agent", dry_run=, force=, run_binaries=True,
  lock_timeout=, on_wait=)``
- ``rollback(t, layout, dry_run=, force=, run_binaries=True, lock_timeout=, on_wait=)``
- ``status(t, layout)``
- ``gc(t, layout, dry_run=, force=, keep_previous=True, only=, lock_timeout=, on_wait=)``
- ``releases(t, layout)``, ``read_state(t, layout)``, ``read_history(t, layout)``: the raw state

The mutating ones take the node's upgrade lock: ``lock_timeout`` (seconds, default 30)
bounds the wait for another operation's lock (then TimeoutExpired), and
``on_wait(holder)`` is called once when they have to wait (``holder``: a string naming
the owner). ``run_binaries=False`` skips running the release's binaries
(``--version``) in the preflight (``--no-preflight-exec``).
"""
from katactl.upgrade.layout import COMPONENTS, DEFAULT_ROOT, FAULT_POINTS, Layout  # noqa: F401
from katactl.upgrade.gc import gc  # noqa: F401
from katactl.upgrade.stage import DEFAULT_RESERVE, StageRequest, stage  # noqa: F401
from katactl.upgrade.state import read_history, read_state, releases  # noqa: F401
from katactl.upgrade.status import status  # noqa: F401
from katactl.upgrade.switch import rollback, switch  # noqa: F401
