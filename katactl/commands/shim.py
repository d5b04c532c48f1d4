"""katactl shim agent-url | iptables get|set | volume stats|resize."""
from __future__ import annotations

import typer

from katactl.commands._common import finish, new_app, sandbox_ref, state

app = new_app("The other shim management endpoints: agent-url, iptables, direct-volume.")
iptables_app = new_app("Guest iptables rules through the shim (iptables-save text).")
volume_app = new_app("Direct-assigned volumes through the shim: stats, resize.")
app.add_typer(iptables_app, name="iptables")
app.add_typer(volume_app, name="volume")

SANDBOX_HELP = "Sandbox id, unique id prefix, NAMESPACE/POD or pod/NAMESPACE/NAME."


def _client_call(app_ctx, target: str, fn, require_live: bool = True):
    from katactl import sandbox
    from katactl.backends.shim import ShimClient

    settings, ref = sandbox_ref(app_ctx, target)
    timeout = float(app_ctx.settings.timeout)

    def run(t, sb):
        with ShimClient.for_sandbox(t, sb, timeout=timeout) as c:
            return fn(c)

    return sandbox.on_sandbox(settings, ref, run, require_live=require_live)


@app.command("agent-url")
def agent_url(ctx: typer.Context,
              target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP)) -> None:
    """Print the kata-agent URL the shim talks to (vsock://CID:1024, hvsock://...).

    \b
    Examples:
      katactl shim agent-url 3f2a
      katactl shim agent-url batch/train-0 -o json
    """
    from katactl.output import Result

    app_ctx = state(ctx)
    node, sb, url = _client_call(app_ctx, target, lambda c: c.agent_url())
    if app_ctx.out.fmt in ("plain", "table", "wide", "name"):
        app_ctx.out.stdout.write(url + "\n")
        return
    finish(app_ctx, Result(kind="AgentURL", item={"node": node, "sandbox": sb.id, "agentURL": url}))


@iptables_app.command("get")
def iptables_get(ctx: typer.Context,
                 target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                 v6: bool = typer.Option(False, "--v6", help="IPv6 rules (ip6tables).")) -> None:
    """Print the guest's iptables rules (iptables-save format).

    \b
    Examples:
      katactl shim iptables get 3f2a > rules.v4
      katactl shim iptables get 3f2a --v6
    """
    from katactl.output import Result

    app_ctx = state(ctx)
    node, sb, rules = _client_call(app_ctx, target, lambda c: c.iptables_get(v6))
    if app_ctx.out.fmt in ("plain", "table", "wide", "name"):
        app_ctx.out.stdout.write(rules if rules.endswith("\n") or not rules else rules + "\n")
        return
    finish(app_ctx, Result(kind="IPTables", item={"node": node, "sandbox": sb.id, "v6": v6, "rules": rules}))


def validate_rules(data: bytes, source: str) -> str:
    """iptables-save text: UTF-8, at least one *table and COMMIT, no NUL."""
    from katactl.errors import UsageError

    if not data.strip():
        raise UsageError(f"{source}: empty rules (an iptables-save dump has '*filter' ... 'COMMIT')")
    if b"\0" in data:
        raise UsageError(f"{source}: contains NUL bytes; not iptables-save text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not UTF-8 text") from None
    lines = [ln.strip() for ln in text.splitlines()]
    if not any(ln.startswith("*") for ln in lines) or "COMMIT" not in lines:
        raise UsageError(f"{source}: not iptables-save text (needs a '*table' line and 'COMMIT')")
    return text


@iptables_app.command("set")
def iptables_set(ctx: typer.Context,
                 target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                 file: str = typer.Argument(..., metavar="FILE", help="iptables-save text ('-' = stdin)."),
                 v6: bool = typer.Option(False, "--v6", help="IPv6 rules (ip6tables)."),
                 dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing.")) -> None:
    """Replace the guest's iptables rules (iptables-restore semantics).

    Idempotent: when the guest already has exactly these rules nothing is
    sent and the result says changed: false. Every change is audited.

    \b
    Examples:
      katactl shim iptables set 3f2a rules.v4
      katactl shim iptables set 3f2a rules.v6 --v6 --dry-run
      iptables-save | katactl shim iptables set batch/train-0 -
    """
    import sys

    from katactl import audit
    from katactl.errors import UsageError
    from katactl.output import Result

    app_ctx = state(ctx)
    src = "stdin" if file == "-" else file
    try:
        if file == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        else:
            with open(file, "rb") as f:
                data = f.read(8 << 20)
    except OSError as e:
        raise UsageError(f"{file}: {e.strerror}") from None
    rules = validate_rules(data, src)

    def op(c):
        cur = c.iptables_get(v6)
        if _norm(cur) == _norm(rules):
            return False
        if not dry_run:
            c.iptables_set(rules, v6)
        return True

    node, sb, changed = _client_call(app_ctx, target, op)
    if not dry_run:
        audit.record("shim.iptables.set", sb.id, node=node, params={"v6": v6, "bytes": len(rules)},
                     changed=changed, path=app_ctx.settings.audit_log)
    finish(app_ctx, Result(kind="IPTablesSet", item={"node": node, "sandbox": sb.id, "v6": v6},
                           changed=changed, dry_run=dry_run))


def _norm(text: str) -> list[str]:
    # iptables-save adds comment lines with timestamps and packet counters; compare rules only
    import re

    out = []
    for ln in text.splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        out.append(re.sub(r"\[\d+:\d+\]", "[0:0]", ln))
    return out


@volume_app.command("stats")
def volume_stats(ctx: typer.Context,
                 target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                 path: str = typer.Argument(..., metavar="VOLUME_PATH",
                                            help="The direct volume's path (as passed to the shim).")) -> None:
    """Usage of a direct-assigned volume inside the guest (bytes and inodes).

    \b
    Examples:
      katactl shim volume stats 3f2a /dev/mapper/vol-1
      katactl shim volume stats 3f2a /dev/mapper/vol-1 -o json
    """
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    _check_volume_path(path)
    node, sb, st = _client_call(app_ctx, target, lambda c: c.volume_stats(path))
    usage = []
    for u in st.get("usage") or []:
        if isinstance(u, dict):
            unit = {1: "bytes", 2: "inodes", "BYTES": "bytes", "INODES": "inodes"}.get(u.get("unit"), u.get("unit"))
            usage.append({"unit": unit, "total": u.get("total"), "used": u.get("used"),
                          "available": u.get("available")})
    cols = [Column("UNIT", "unit"), Column("TOTAL", "total"), Column("USED", "used"),
            Column("AVAILABLE", "available")]
    finish(app_ctx, Result(kind="VolumeStats", item={"node": node, "sandbox": sb.id, "path": path,
                                                     "condition": st.get("volume_condition")},
                           items=usage, columns=cols, name_key="unit"))


def _check_volume_path(path: str) -> None:
    from katactl.errors import UsageError

    if not path or "\0" in path or not path.startswith("/"):
        raise UsageError(f"invalid volume path {path!r}: expected an absolute path")


@volume_app.command("resize")
def volume_resize(ctx: typer.Context,
                  target: str = typer.Argument(..., metavar="SANDBOX", help=SANDBOX_HELP),
                  path: str = typer.Argument(..., metavar="VOLUME_PATH", help="The direct volume's path."),
                  size: str = typer.Argument(..., metavar="SIZE", help="New size: 10Gi, 500M, bytes."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing.")) -> None:
    """Resize a direct-assigned volume in the guest to SIZE (after growing it on the host).

    Idempotent: a volume already of SIZE is left alone (changed: false).

    \b
    Examples:
      katactl shim volume resize 3f2a /dev/mapper/vol-1 20Gi
      katactl shim volume resize 3f2a /dev/mapper/vol-1 20Gi --dry-run -o json
    """
    from katactl import audit
    from katactl.output import Result
    from katactl.values import parse_size

    app_ctx = state(ctx)
    _check_volume_path(path)
    nbytes = parse_size(size, what="volume size")

    def op(c):
        before = None
        try:
            st = c.volume_stats(path)
            for u in st.get("usage") or []:
                if isinstance(u, dict) and u.get("unit") in (1, "BYTES"):
                    before = u.get("total")
        except Exception:  # stats may be unsupported; resize decides
            before = None
        if before == nbytes:
            return before, False
        if not dry_run:
            c.volume_resize(path, nbytes)
        return before, True

    node, sb, (before, changed) = _client_call(app_ctx, target, op)
    if not dry_run:
        audit.record("shim.volume.resize", sb.id, node=node, params={"path": path, "size": nbytes},
                     changed=changed, path=app_ctx.settings.audit_log)
    finish(app_ctx, Result(kind="VolumeResize", item={"node": node, "sandbox": sb.id, "path": path,
                                                      "sizeBefore": before, "size": nbytes},
                           changed=changed, dry_run=dry_run))
