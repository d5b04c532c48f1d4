"""katactl pprof SANDBOX PROFILE."""
from __future__ import annotations

from typing import Optional

import typer

from katactl.commands._common import finish, new_app, sandbox_ref, state

app = new_app("Download a pprof profile from a sandbox's Go shim.", single=True)


@app.command()
def pprof(
    ctx: typer.Context,
    target: str = typer.Argument(..., metavar="SANDBOX",
                                 help="Sandbox id, unique id prefix, NAMESPACE/POD or pod/NAMESPACE/NAME."),
    profile: str = typer.Argument(..., metavar="PROFILE",
                                  help="heap, goroutine, profile (CPU), trace, allocs, block, mutex, threadcreate, cmdline."),
    seconds: Optional[int] = typer.Option(None, "--seconds", metavar="N",
                                          help="Duration for 'profile' and 'trace' (default 30 and 1)."),
    file: Optional[str] = typer.Option(None, "-f", "--file", metavar="FILE",
                                       help="Write to FILE ('-' = stdout). Default: <id12>-<PROFILE>.pprof"),
) -> None:
    """Fetch /debug/pprof/PROFILE from the Go shim (containerd-shim-kata-v2).

    The shim serves pprof only with enable_pprof = true in the [runtime]
    section of the Kata configuration (or the pod annotation
    io.katacontainers.config.runtime.enable_pprof=true). runtime-rs has none.
    Read the result with 'go tool pprof FILE'.

    \b
    Examples:
      katactl pprof 3f2a heap -f heap.pprof
      katactl pprof batch/train-0 profile --seconds 10 -f cpu.pprof
      katactl pprof 3f2a goroutine -f - | go tool pprof -top -
    """
    import os

    from katactl import sandbox
    from katactl.backends.local import atomic_file
    from katactl.backends.shim import PPROF_PROFILES, ShimClient
    from katactl.errors import UsageError
    from katactl.output import Result

    app_ctx = state(ctx)
    if profile not in PPROF_PROFILES:
        raise UsageError(f"unknown profile {profile!r} (choose from {', '.join(PPROF_PROFILES)})")
    if seconds is not None and not (1 <= seconds <= 3600):
        raise UsageError(f"invalid --seconds {seconds}: expected 1..3600")
    if seconds is not None and profile not in ("profile", "trace"):
        raise UsageError("--seconds applies to 'profile' and 'trace' only")
    if file == "-" and app_ctx.out.stdout_tty:
        raise UsageError("refusing to write a binary profile to a terminal; give -f FILE or redirect")
    if file is not None and file != "-":
        # checked before the download: a CPU profile takes --seconds to fail otherwise
        if not file.strip():
            raise UsageError("-f needs a file name, got an empty string")
        d = os.path.dirname(os.path.abspath(file))
        if not os.path.isdir(d):
            raise UsageError(f"-f {file}: directory {d} does not exist")
        if file.endswith("/") or os.path.isdir(file):
            raise UsageError(f"-f {file}: is a directory; give a file name")
    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.timeout)
    def fetch(t, sb):
        # The profile streams to its destination: stdout, or a temp file renamed into
        # place only once the shim answered 2xx and the download finished.
        with ShimClient.for_sandbox(t, sb, timeout=timeout) as c:
            if file == "-":
                out = app_ctx.out.stdout
                n = c.pprof(profile, getattr(out, "buffer", out), seconds=seconds)
                out.flush()
                return n, None
            path = os.path.abspath(file or f"{sb.id[:12]}-{profile}.pprof")
            with atomic_file(path, 0o600) as f:
                return c.pprof(profile, f, seconds=seconds), path

    node, sb, (n, path) = sandbox.on_sandbox(settings, ref, fetch)
    if path is None:
        return
    finish(app_ctx, Result(kind="PprofProfile", item={"node": node, "sandbox": sb.id, "profile": profile,
                                                      "file": path, "bytes": n}))
