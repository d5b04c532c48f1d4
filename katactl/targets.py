"""Sandbox target references shared by every SANDBOX argument.

A SANDBOX is a sandbox id, a unique id prefix, NAMESPACE/POD (looked up on the
selected node(s)), or pod/NAMESPACE/NAME: the pod is looked up through the
Kubernetes API, and the command then runs on the pod's node.
"""
from __future__ import annotations

import dataclasses

from katactl.errors import UsageError


@dataclasses.dataclass(frozen=True)
class SandboxRef:
    ref: str                   # what the node-local resolver gets (id, prefix or NS/POD)
    node: str | None = None    # the node the API placed the pod on, if known


def parse_sandbox_ref(settings, text: str) -> SandboxRef:
    """Turn a user's SANDBOX into a node-local reference (+ node for pod/NS/NAME)."""
    if text is None or text == "":
        raise UsageError("empty SANDBOX: give a sandbox id, id prefix, NAMESPACE/POD or pod/NAMESPACE/NAME")
    if "\0" in text:
        raise UsageError("SANDBOX contains a NUL byte")
    if text.startswith("pod/"):
        parts = text.split("/")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UsageError(f"invalid pod reference {text!r}: expected pod/NAMESPACE/NAME")
        from katactl.backends import kube

        loc = kube.pod_location(settings, parts[1], parts[2])
        return SandboxRef(f"{parts[1]}/{parts[2]}", loc["node"])
    return SandboxRef(text)


def settings_for_ref(settings, ref: SandboxRef):
    """Settings narrowed to the pod's node when the API told us where it runs."""
    if ref.node is None:
        return settings
    import copy

    narrowed = copy.copy(settings)
    narrowed.values = dict(settings.values, nodes=(ref.node,), nodes_from=None, selector=None)
    return narrowed
