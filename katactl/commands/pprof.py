"""katactl pprof SANDBOX PROFILE."""
from __future__ import annotations

from typing import Any, BinaryIO, Optional

import typer

from katactl.commands._common import SANDBOX_HELP, finish, new_app, sandbox_ref, state

app = new_app("Download a pprof profile from a sandbox's Go shim.", single=True)


@app.command()
def pprof(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
    profile: str = typer.Argument(..., metavar="PROFILE",
                                  help="heap, goroutine, profile (CPU), trace, allocs, block, mutex, threadcreate, cmdline, "
                                       "symbol."),
    seconds: Optional[int] = typer.Option(None, "--seconds", metavar="N",
                                          help="Duration in seconds. 'profile' and 'trace' record for N (default 30 and 1); heap, allocs, "
                                               "goroutine, block, mutex and threadcreate answer the change over N "
                                               "(a delta profile) instead of a snapshot."),
    file: Optional[str] = typer.Option(None, "-f", "--file", metavar="FILE",
                                       help="Write to FILE ('-' = stdout). Default: <id12>-<PROFILE>.pprof"),
) -> None:
    """Fetch /debug/pprof/PROFILE from the Go shim (containerd-shim-kata-v2).

    The shim serves pprof only with enable_pprof = true in the [runtime]
    section of the Kata configuration (or the pod annotation
    io.katacontainers.config.runtime.enable_pprof=true). runtime-rs has none.
    Read the result with 'go tool pprof FILE': a file, not a pipe ('-' is a
    file name to it, and /dev/stdin from a pipe loses its first bytes).

    \b
    Examples:
      katactl pprof 3f2a heap -f heap.pprof
      katactl pprof batch/train-0 profile --seconds 10 -f cpu.pprof
      katactl pprof 3f2a heap --seconds 60 -f heap-growth.pprof
      katactl pprof 3f2a goroutine -f goroutine.pprof && go tool pprof -top goroutine.pprof
    """
    from katactl import sandbox, shim_ops
    from katactl.errors import UsageError
    from katactl.output import Result

    app_ctx = state(ctx)
    to_stdout = file == "-"
    shim_ops.check_pprof_request(profile, seconds, None if to_stdout else file)
    if to_stdout and app_ctx.out.stdout_tty:
        raise UsageError("refusing to write a binary profile to a terminal; give -f FILE or redirect")
    dest: str | BinaryIO | None = file
    if to_stdout:
        # a text stream (its .buffer takes the bytes), or a bytes stream a caller gave as stdout
        stdout: Any = app_ctx.out.stdout
        dest = getattr(stdout, "buffer", stdout)
    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.request_timeout)
    _, _, res = sandbox.on_sandbox(settings, ref, lambda t, sb: shim_ops.pprof_download(
        t, sb, profile, dest, seconds=seconds, timeout=timeout))
    if to_stdout:
        return
    finish(app_ctx, Result(kind="PprofProfile", item=res))
