"""Non-stop A/B upgrade of the Kata runtime and agent (see docs/upgrade.md).

Public API (every function takes a NodeTransport and a Layout, returns plain
dicts, never prints):

- ``stage(t, layout, source, version=, sha256=, no_verify=, reserve=, force=, dry_run=)``
- ``switch(t, layout, version, component="all"|"runtime"|"agent", dry_run=, force=)``
- ``rollback(t, layout, dry_run=, force=)``
- ``status(t, layout)``
- ``gc(t, layout, dry_run=, force=, keep_previous=True, only=)``
"""
from katactl.upgrade.layout import COMPONENTS, DEFAULT_ROOT, FAULT_POINTS, Layout  # noqa: F401
from katactl.upgrade.ops import (DEFAULT_RESERVE, gc, read_history, read_state, releases,  # noqa: F401
                                 rollback, stage, status, switch)
