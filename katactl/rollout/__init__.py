"""Rolling node operations over a fleet (see docs/rollout.md).

- :mod:`katactl.rollout.policy`  canary, max-unavailable, soak, budget, windows, alert matchers
- :mod:`katactl.rollout.steps`   the step registry: built-in Kubernetes steps and node-local katactl commands
- :mod:`katactl.rollout.plan`    selection -> batches (zone spread), plan files
- :mod:`katactl.rollout.store`   lock + state: KubeStore (Lease, ConfigMap, node label/annotation), FileStore
- :mod:`katactl.rollout.gate`    maintenance windows and the Alertmanager v2 gate
- :mod:`katactl.rollout.engine`  the engine: every transition persisted before it is acted on

Nothing here prints; the engine reports through an ``events(kind, **data)`` callback.
"""
