"""One error hierarchy, one exit-code map (design.md, "Contracts").

Library code raises these; only katactl.cli turns them into exit codes and
messages. Exit codes are stable across releases: add, never renumber.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    PARTIAL = 4
    REFUSED = 5
    TIMEOUT = 6
    UNREACHABLE = 7
    CHECK_FAILED = 8
    INTERRUPTED = 130


class KatactlError(Exception):
    """Base of every expected failure. ``str(e)`` is the one-line message."""

    exit_code: ExitCode = ExitCode.FAILED
    #: short machine name used in JSON error objects
    code: str = "Failed"
    #: a mutating command's failure: whether it changed something before it failed (the
    #: Error object's top-level ``changed``); None where the command does not say
    changed: bool | None = None

    def __init__(self, message: str, *, hint: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details or {}

    def to_dict(self) -> dict:
        d = {"code": self.code, "message": self.message, "exitCode": int(self.exit_code)}
        if self.changed is not None:
            d["changed"] = self.changed
        if self.hint:
            d["hint"] = self.hint
        if self.details:
            d["details"] = self.details
        return d


class OperationFailed(KatactlError):
    exit_code, code = ExitCode.FAILED, "Failed"


class UsageError(KatactlError):
    exit_code, code = ExitCode.USAGE, "UsageError"


class NotFound(KatactlError):
    exit_code, code = ExitCode.NOT_FOUND, "NotFound"


class Ambiguous(NotFound):
    code = "Ambiguous"


class Incomplete(KatactlError):
    """A search over several nodes found nothing on those that answered, and others could
    not be asked: 'not found' (3) would tell a script the thing does not exist."""

    exit_code, code = ExitCode.PARTIAL, "Incomplete"


class Refused(KatactlError):
    exit_code, code = ExitCode.REFUSED, "Refused"


class TimeoutExpired(KatactlError):
    exit_code, code = ExitCode.TIMEOUT, "Timeout"


class UnreachableError(KatactlError):
    """An endpoint could not be reached. ``reason`` says what was found where a caller
    decides on it, so that no caller reads the wording: for a unix socket
    (NodeTransport.connect_unix, on every transport) SOCKET_MISSING (no such path),
    SOCKET_REFUSED (a socket nobody listens on), SOCKET_BUSY (its connection queue is full:
    the server accepts nobody, e.g. a QEMU monitor another client holds) or NOT_A_SOCKET;
    None for anything else
    (the transport failed, permission denied...)."""

    exit_code, code = ExitCode.UNREACHABLE, "Unreachable"

    def __init__(self, message: str, *, reason: str | None = None, hint: str | None = None,
                 details: dict | None = None):
        super().__init__(message, hint=hint, details=details)
        self.reason = reason


#: UnreachableError.reason values of connect_unix
SOCKET_MISSING, SOCKET_REFUSED, NOT_A_SOCKET = "socket-missing", "socket-refused", "not-a-socket"
SOCKET_BUSY = "socket-busy"


class AuthError(UnreachableError):
    code = "AuthFailed"


class HostKeyError(UnreachableError):
    code = "HostKeyRejected"


class Interrupted(KatactlError):
    exit_code, code = ExitCode.INTERRUPTED, "Interrupted"


class ProtocolError(OperationFailed):
    """A peer (shim, hypervisor, API server) answered something we cannot use."""

    code = "ProtocolError"


def exit_code_for(exc: BaseException) -> int:
    """The single map from an exception to a process exit code."""
    if isinstance(exc, KatactlError):
        return int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    return exit_code_for(as_katactl_error(exc))


def outcome_exit_code(failures: list[int], succeeded: int) -> int:
    """Exit code of one command over many targets (nodes, dumps, shims), from
    the exit codes of the failed ones and the number that succeeded.

    Some failed and some succeeded: 4. All failed: their common code (7 when
    every node was unreachable), or 1 when the failures differ — 4 would claim
    that something succeeded.
    """
    if not failures:
        return int(ExitCode.OK)
    if succeeded:
        return int(ExitCode.PARTIAL)
    codes = set(failures)
    return codes.pop() if len(codes) == 1 else int(ExitCode.FAILED)


def as_katactl_error(exc: BaseException) -> KatactlError:
    """Wrap an OS-level error raised by a transport in our hierarchy."""
    if isinstance(exc, KatactlError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{exc.filename or exc}: no such file or directory")
    if isinstance(exc, PermissionError):
        return OperationFailed(f"{exc.filename or exc}: permission denied")
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError, BrokenPipeError)):
        return UnreachableError(str(exc) or type(exc).__name__)
    if isinstance(exc, TimeoutError):
        return TimeoutExpired(str(exc) or "timed out")
    if isinstance(exc, OSError):
        return OperationFailed(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
    return OperationFailed(f"{type(exc).__name__}: {exc}")
