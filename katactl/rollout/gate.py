"""The gate a rollout passes before it starts a node: maintenance windows and
an Alertmanager alert gate (API v2).

Alertmanager: ``GET /api/v2/alerts?active=true&silenced=false&inhibited=false
&unprocessed=true&filter=<matcher>...``: alerts that fire and are neither
silenced nor inhibited (unprocessed ones count: Alertmanager has not judged
them yet), matching every ``--alert-filter`` (Alertmanager's own semantics:
all matchers must match). A query that fails closes the gate (the safe
answer: kured's choice too), with the error as the reason.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from katactl.rollout.policy import Policy, in_windows, redact_url


@dataclasses.dataclass
class GateState:
    open: bool
    reason: str | None = None          # "window" | "alerts" | "alertmanager-error"
    message: str | None = None
    alerts: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"open": self.open}
        if not self.open:
            d.update(reason=self.reason, message=self.message)
            if self.alerts:
                d["alerts"] = self.alerts
        return d


def firing_alerts(url: str, matchers, timeout: float = 10.0) -> list[dict]:
    """The matching firing alerts (labels, fingerprint, startsAt, state)."""
    import httpx

    params: list[tuple[str, str | int | float | bool | None]] = [("active", "true"), ("silenced", "false"), ("inhibited", "false"), ("unprocessed", "true")]
    params += [("filter", str(m)) for m in matchers]
    r = httpx.get(f"{url}/api/v2/alerts", params=params, timeout=timeout, trust_env=False,
                  headers={"Accept": "application/json"})
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text.strip()[:200]}")
    data = r.json()
    if not isinstance(data, list):
        raise RuntimeError("the answer is not a list of alerts")
    out = []
    for a in data:
        if not isinstance(a, dict):
            continue
        labels = a.get("labels") or {}
        status = a.get("status") or {}
        # the server filtered already; check again (an older Alertmanager may ignore a filter),
        # never removing what it matched: only = and != are re-checked (Matcher.rejects)
        if status.get("silencedBy") or status.get("inhibitedBy") or status.get("state") == "suppressed":
            continue
        if any(m.rejects(labels) for m in matchers):
            continue
        out.append({"labels": labels, "fingerprint": a.get("fingerprint"), "startsAt": a.get("startsAt"),
                    "state": status.get("state")})
    return out


def check(policy: Policy, now: dt.datetime | None = None, timeout: float = 10.0) -> GateState:
    if not in_windows(policy.windows, now):
        return GateState(False, "window", "outside every maintenance window: "
                         + "; ".join(str(w) for w in policy.windows))
    if policy.alert_gate:
        try:
            alerts = firing_alerts(policy.alert_gate, policy.alert_filters, timeout)
        except Exception as e:  # noqa: BLE001 - any failure closes the gate, with its reason
            return GateState(False, "alertmanager-error",
                             f"cannot query Alertmanager {redact_url(policy.alert_gate)}: {' '.join(str(e).split()) or type(e).__name__}")
        if alerts:
            names = sorted({a["labels"].get("alertname", "?") for a in alerts})
            return GateState(False, "alerts", f"{len(alerts)} alert(s) firing: {', '.join(names)}", alerts)
    return GateState(True)
