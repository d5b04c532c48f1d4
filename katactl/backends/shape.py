"""Checks on the shape of a peer's JSON answer (Cloud Hypervisor, Firecracker, the shim
extension, QMP): valid JSON of the wrong shape is a ProtocolError naming the endpoint and the
field, never an internal-bug message nor a wrong answer made of defaults (design.md "Testing
doctrine": malformed input gives a clear error)."""
from __future__ import annotations

from typing import Any

from katactl.errors import ProtocolError


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def obj(v: Any, what: str, field: str = "the answer") -> dict:
    """``v`` as a JSON object."""
    if not isinstance(v, dict):
        raise ProtocolError(f"{what}: {field} is {_kind(v)}, not an object")
    return v


def integer(v: Any, what: str, field: str) -> int:
    """``v`` as a JSON integer (not a boolean, a string or a float)."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"{what}: {field} is {_kind(v)} {v!r:.40}, not an integer" if v is not None
                            else f"{what}: {field} is missing or null")
    return v


def opt_integer(v: Any, what: str, field: str) -> int | None:
    """``v`` as a JSON integer, or None when absent or null."""
    return None if v is None else integer(v, what, field)
