"""Read the audit log katactl wrote during a test (conftest isolates XDG_STATE_HOME per test)."""
from __future__ import annotations

import json
import os


def audit_entries(action: str | None = None, target: str | None = None) -> list[dict]:
    from katactl.audit import audit_path

    p = audit_path()
    if not os.path.exists(p):
        return []
    with open(p) as f:
        entries = [json.loads(line) for line in f]
    return [e for e in entries if action in (None, e["action"]) and target in (None, e["target"])]
