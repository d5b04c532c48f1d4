"""AppContext: what a command needs for one invocation (settings + output)."""
from __future__ import annotations

import dataclasses
import sys

from katactl.config import Settings
from katactl.output import Output


@dataclasses.dataclass
class AppContext:
    settings: Settings
    out: Output

    @classmethod
    def create(cls, settings: Settings) -> "AppContext":
        out = Output(settings.output, color=False if settings.no_color else None,
                     quiet=settings.quiet, verbose=settings.verbose)
        _route_library_logs(out)
        # Point the audit log at the audit_log setting. Read-only commands never
        # import katactl.audit: importing it just to say "default" would cost
        # start-up, and a module not yet imported holds no earlier path.
        if settings.audit_log or settings.no_audit or "katactl.audit" in sys.modules:
            from katactl import audit

            audit.configure(settings.audit_log, enabled=not settings.no_audit)
        return cls(settings, out)

    def confirm(self, question: str) -> bool:
        """Ask on a TTY; without one, only --yes may proceed (never prompt in scripts)."""
        if self.settings.yes:
            return True
        if not sys.stdin.isatty():
            return False
        import typer

        return typer.confirm(question, default=False, err=True)

    def require_confirmation(self, question: str, action: str, *, hint: str | None = None,
                             declined: str = "not confirmed: nothing deleted") -> None:
        """:meth:`confirm`, or raise Refused: without a TTY, "<action> needs confirmation:
        re-run with --yes" (with ``hint``); when the user says no, ``declined``."""
        from katactl.errors import Refused

        if self.confirm(question):
            return
        if not sys.stdin.isatty():
            raise Refused(f"{action} needs confirmation: re-run with --yes (no TTY to ask on)", hint=hint)
        raise Refused(declined)


def _route_library_logs(out: Output) -> None:
    """The library logs (it never prints); on the command line its warnings are
    ours: "warning: ..." on stderr through the one output module (escaped, one line),
    debug lines with -v. One handler per invocation, replacing the previous one."""
    import logging

    class ToOutput(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            (out.warn if record.levelno >= logging.WARNING else out.debug)(msg)
            if record.exc_info and out.verbose:  # -v: the traceback behind a one-line error
                import traceback

                print("".join(traceback.format_exception(*record.exc_info)).rstrip(), file=out.stderr)

    logger = logging.getLogger("katactl")
    for h in [h for h in logger.handlers if type(h).__name__ == "ToOutput"]:
        logger.removeHandler(h)
    logger.addHandler(ToOutput(logging.DEBUG if out.verbose else logging.WARNING))
    logger.setLevel(logging.DEBUG if out.verbose else logging.WARNING)
