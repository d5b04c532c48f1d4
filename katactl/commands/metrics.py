"""katactl metrics SANDBOX | --all."""
from __future__ import annotations

import re
from typing import Iterable, List, Optional

import typer

from katactl.commands._common import SANDBOX_HELP, finish, new_app, render_final, sandbox_ref, state

#: each shim's bound for --all when no --request-timeout is given (seconds)
ALL_SCRAPE_TIMEOUT = 10.0

app = new_app("A sandbox's shim /metrics (parsed, filtered, raw), or every sandbox's in one "
              "relabelled Prometheus exposition (--all).", single=True)


@app.command()
def metrics(
    ctx: typer.Context,
    target: Optional[str] = typer.Argument(None, metavar="[SANDBOX]", help=SANDBOX_HELP),
    all_: bool = typer.Option(False, "--all", "-A",
                              help="Every running sandbox of the node(s), relabelled as kata-monitor does."),
    family: Optional[List[str]] = typer.Option(None, "--family", metavar="PREFIX",
                                               help="Keep metric families starting with PREFIX (repeatable): "
                                                    "the name shown, or the shim's own (go_ keeps "
                                                    "kata_shim_go_goroutines in -o prom and --all)."),
    raw: bool = typer.Option(False, "--raw", help="Print the Prometheus text as the shim sent it."),
    to: Optional[str] = typer.Option(None, "--to", metavar="FILE",
                                     help="Write the exposition to FILE atomically (temp file + rename), "
                                          "e.g. for node_exporter's textfile collector. A symlink's target "
                                          "is written; a device, FIFO or socket is refused."),
) -> None:
    """Scrape one sandbox's shim management socket (/metrics) and show the samples,
    or with --all every running sandbox of the node(s) concurrently.

    Families: kata_shim_*, kata_hypervisor_*, kata_agent_*, kata_guest_*
    (kata_guest_meminfo, kata_guest_vm_stat ...), and for the Go shim its
    own go_* and process_* families.

    With -o prom (or --to FILE) the answer is one Prometheus text exposition in
    kata-monitor's shape: every sample carries sandbox_id, cri_uid, cri_name
    and cri_namespace (and node="..." with -N/-l), go_*/process_* become
    kata_shim_go_*/kata_shim_process_*, HELP and TYPE appear once per family.
    --all -o json and its table name samples so too; one SANDBOX's table, json
    and --raw by the shim's own names. --family matches the name shown, and
    the shim's own in every mode, and warns when it matched no family.
    --to FILE leaves out the samples' timestamps (node_exporter's textfile
    collector skips a whole file that has one); -o prom keeps them.
    A shim that does not answer, or answers with something that is not
    Prometheus text, is katactl_scrape_error{sandbox_id=...} 1 and a warning;
    the others are still there, and the exit code is 4 (partial failure); when
    no shim answered it is theirs if they all failed alike (6 all timed out,
    7 all lost the connection), else 1.
    With --all each shim has 10s to answer unless --request-timeout is given.

    \b
    Examples:
      katactl metrics 3f2a
      katactl metrics batch/train-0 --family kata_guest_meminfo
      katactl metrics 3f2a --raw --family kata_hypervisor_ > hv.prom
      katactl metrics 3f2a -o json | jq '.items[] | select(.labels.item=="mem_available")'
      katactl metrics --all -o prom
      katactl metrics --all --to /var/lib/node_exporter/textfile/kata.prom
      katactl -N node-1,node-2 metrics --all --family kata_guest_ -o prom
    """
    from katactl import metrics as m
    from katactl import sandbox
    from katactl.errors import UsageError
    from katactl.output import Column, Result

    app_ctx = state(ctx)
    prefixes = m.validate_prefixes(family)
    if all_ and target is not None:
        raise UsageError("give a SANDBOX or --all, not both")
    if not all_ and target is None:
        raise UsageError("missing SANDBOX (or --all for every sandbox)")
    if raw and all_:
        raise UsageError("--raw is one shim's text; with --all use -o prom (relabelled)")
    dest = _check_to(to) if to is not None else None
    timeout = float(app_ctx.settings.request_timeout)
    prom = app_ctx.out.fmt == "prom" or to is not None
    cols = [Column("METRIC", "name"),
            Column("LABELS", lambda s: ",".join(f"{k}={v}" for k, v in s["labels"].items()) or None),
            Column("VALUE", "value", fmt=_fmt_value),
            Column("TYPE", "type", wide=True)]
    if all_:
        # a node-wide scrape (every 15 s from a timer) waits 10 s per shim, not the global 30 s
        # default; a --request-timeout the user gave (flag, env, config file) wins, as everywhere
        if app_ctx.settings.sources.get("request_timeout", "default") == "default":
            timeout = min(timeout, ALL_SCRAPE_TIMEOUT)
        _all(app_ctx, prefixes, prom, to, dest, timeout)
        return
    assert target is not None  # without --all a SANDBOX is required (checked above)
    settings, ref = sandbox_ref(app_ctx, target)
    node, sb, text = sandbox.on_sandbox(settings, ref, lambda t, s: m.scrape(t, s, timeout))
    if raw and not prom:
        text = m.filter_text(text, prefixes)
        if prefixes and not text:
            _warn_unmatched(app_ctx, prefixes)
        app_ctx.out.text(text)
        return
    if prom:
        fams = m.parse_families(text)
        if prefixes:
            fams = [f for f in fams if m.family_matches(f.name, tuple(prefixes))]
            if not fams:
                _warn_unmatched(app_ctx, prefixes)
        labels = m.sandbox_labels(sb, node if node != "localhost" else None)
        _emit(app_ctx, m.render_exposition([(labels, m.relabel(fams, labels))], timestamps=to is None), to, dest)
        return
    samples = m.parse(text, prefixes)
    if prefixes and not samples:
        _warn_unmatched(app_ctx, prefixes)
    finish(app_ctx, Result(kind="MetricSampleList", item={"node": node, "sandbox": sb.id},
                           items=samples, columns=cols, name_key="name",
                           summary=None))


def _all(app_ctx, prefixes, prom: bool, to: str | None, dest: str | None, timeout: float) -> None:
    from katactl import metrics as m
    from katactl.commands._common import _progress_cb
    from katactl.errors import ExitCode, KatactlError, exit_code_for, outcome_exit_code
    from katactl.fleet import LOCAL, run_on_nodes, select_nodes
    from katactl.output import Column, Result
    from katactl.sandbox import pod_ref

    picked = select_nodes(app_ctx.settings)
    # an exposition's families are rendered as each shim answers (never all held parsed): the
    # labels they get then are known now but for their values (node="..." in a fleet's answer)
    render = ([*m.MONITOR_LABELS, *(["node"] if picked else [])], to is None) if prom else None
    fo = run_on_nodes(app_ctx.settings,
                      lambda t: m.scrape_node(t, timeout=timeout, prefixes=prefixes, render=render),
                      nodes=picked or [LOCAL], selected=bool(picked), progress=_progress_cb(app_ctx))
    if to is not None:
        # FILE is for a textfile collector whatever -o says: with no node answering it is left
        # as it was (its mtime shows its age) and the command fails (the Error object with -o
        # json); a partial answer is written, failed nodes as katactl_scrape_error{node=...}
        if fo.errors and len(fo.errors) == len(fo.nodes):
            app_ctx.out.warn(f"{to} is left as it was: no node answered")
        fo.raise_if_none_answered()
    else:
        fo.raise_if_single_failure()
    per: list = []
    where: list = []
    for node in fo.nodes:
        for row in fo.values.get(node, []):
            sb, res = row["sandbox"], row["result"]
            labels = m.sandbox_labels(sb, node if fo.multi else None)
            if not isinstance(res, KatactlError) and not (res and isinstance(res[0], m.RenderedFamily)):
                res = m.relabel(res, labels)
            per.append((labels, res))
            where.append((node, sb))
            row["result"] = None  # the exposition's copy is the one kept
    per = m.refuse_clashes(per)
    answered = [fams for _labels, fams in per if not isinstance(fams, KatactlError)]
    if prefixes and answered and not any(answered):
        _warn_unmatched(app_ctx, prefixes)
    failed: list[int] = []  # each failed sandbox's exit code: all alike, the command's (6 all stuck)
    for (node, sb), (_labels, res) in zip(where, per, strict=True):
        if isinstance(res, KatactlError):
            failed.append(exit_code_for(res))
            app_ctx.out.warn(f"{node + ': ' if fo.multi else ''}sandbox {sb.id[:12]} "
                             f"({pod_ref(sb.pod) or 'no pod'}): {res.message}")
    if prom:  # JSON samples carry their own type: only an exposition loses a family
        short = set()
        for i, family, typ, first, first_sid in m.type_conflicts(per):
            short.add(i)
            node, sb = where[i]
            app_ctx.out.warn(f"{node + ': ' if fo.multi else ''}sandbox {sb.id[:12]} ({pod_ref(sb.pod) or 'no pod'}): "
                             f"its family {family} is a {typ}, sandbox {first_sid[:12]}'s a {first} (one family "
                             f"has one TYPE): its samples of it left out ({m.FAMILY_CONFLICT} 1)")
        failed += [ExitCode.FAILED] * len(short)
    code = fo.exit_code()
    if not code and failed:
        code = outcome_exit_code(failed, len(per) - len(failed))
    if prom:
        node_errors = list(fo.errors.items())
        for n, e in node_errors:
            app_ctx.out.error(f"{n}: {e.message}")
        _emit(app_ctx, m.iter_exposition(per, node_errors, timestamps=to is None), to, dest)
    else:
        items = []
        for _labels, fams in per:
            if isinstance(fams, KatactlError):
                continue
            for f in fams:
                for name, labs, value, _ts in f.samples:
                    items.append({"family": f.name, "type": f.type, "name": name,
                                  "labels": {k: _unescape(v) for k, v in labs}, "value": _num(value)})
        errs = fo.error_items() + [{"target": dict(labels)["sandbox_id"], "error": fams.to_dict()}
                                   for labels, fams in per if isinstance(fams, KatactlError)]
        cols = [Column("POD", lambda s: "/".join(x for x in (s["labels"].get("cri_namespace"),
                                                              s["labels"].get("cri_name")) if x) or None),
                Column("SANDBOX", lambda s: (s["labels"].get("sandbox_id") or "")[:13]),
                Column("METRIC", "name"),
                Column("LABELS", lambda s: ",".join(f"{k}={v}" for k, v in s["labels"].items()
                                                    if k not in m.MONITOR_LABELS and k != "node") or None),
                Column("VALUE", "value", fmt=_fmt_value),
                Column("TYPE", "type", wide=True)]
        render_final(app_ctx, Result(kind="MetricSampleList", items=items, columns=cols, name_key="name",
                                     errors=errs, multi_node=False))
    if code:
        raise typer.Exit(int(code))


def _warn_unmatched(app_ctx, prefixes: list[str]) -> None:
    app_ctx.out.warn(f"no metric family starts with {', '.join(prefixes)}")


def _check_to(path: str) -> str:
    """The file --to writes: FILE, or what FILE leads to when it is a symlink (config
    management's link into the textfile directory: the link stays, its target is updated).
    The write renames a new file over it, so anything but a regular file (a device such as
    /dev/null, a FIFO such as /dev/stdout's, a socket, a directory) is refused, untouched."""
    import errno
    import os
    import stat

    from katactl.errors import UsageError

    if not path or not path.strip() or "\0" in path:
        raise UsageError(f"invalid --to {path!r}: give a file path")
    if path.endswith(os.sep):
        raise UsageError(f"invalid --to {path}: names a directory")
    link = os.path.islink(path)
    dest = os.path.realpath(path) if link else os.path.abspath(path)
    try:
        st = os.stat(path)  # through the links: the object a rename would replace
    except (FileNotFoundError, NotADirectoryError):
        st = None  # a new file (a dangling link's target is made, as `echo > link` would)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"invalid --to {path}: {e.strerror}") from None
        return path  # EACCES and the like: the write fails naming FILE (exit 1), as before
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"invalid --to {path}: is a {_kind(st.st_mode)}{' (through a symlink)' if link else ''}, "
                             "not a regular file (the write would replace it; -o prom prints to stdout)")
        try:
            at = os.lstat(dest)
        except OSError:
            at = None
        # a /proc/PID/fd link names no path of its file (a deleted one: "/tmp/x (deleted)")
        if at is None or (at.st_dev, at.st_ino) != (st.st_dev, st.st_ino):
            raise UsageError(f"invalid --to {path}: a link to a file with no path to write next to ({dest})")
    d = os.path.dirname(dest)
    if not os.path.isdir(d):
        raise UsageError(f"invalid --to {path}: {d} is not a directory")
    return dest


def _kind(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _emit(app_ctx, text: str | Iterable[str], to: str | None, dest: str | None) -> None:
    """The exposition on stdout or into FILE (``to``, written at ``dest``: see _check_to); in
    pieces of whole lines, written as they come (never joined into one string)."""
    import os

    pieces = [text] if isinstance(text, str) else text
    if to is None:
        for piece in pieces:
            app_ctx.out.text(piece)
        return
    n = 0

    def counted():
        nonlocal n
        for piece in pieces:
            # sample lines: every line but the # HELP/TYPE ones (no line is empty)
            n += piece.count("\n") - piece.count("\n#") - piece.startswith("#")
            yield piece

    assert dest is not None
    write_atomic(dest, counted())
    app_ctx.out.info(f"wrote {n} samples to {to}{f' ({dest})' if dest != os.path.abspath(to) else ''}")


_TMP_PREFIX, _TMP_SUFFIX = ".katactl-", ".prom.tmp"
#: the temp names write_atomic's mkstemp makes (8 of tempfile's "a-z0-9_" characters), no others'
_TMP_RE = re.compile(r"\.katactl-[a-z0-9_]{8}\.prom\.tmp")
#: a temp file unchanged this long is a leftover: a write keeps appending to its own
STALE_TMP_AGE = 600.0


def _sweep_stale_temps(d: str) -> None:
    """Remove the temp files of runs killed before their clean-up (SIGKILL: the OOM killer,
    systemd's final kill) from ``d``: only regular files of write_atomic's own naming that have
    not changed for STALE_TMP_AGE seconds. Best effort: the run's own write is what matters."""
    import os
    import stat
    import time

    try:
        names = [n for n in os.listdir(d) if _TMP_RE.fullmatch(n)]
    except OSError:
        return
    now = time.time()
    for n in names:
        p = os.path.join(d, n)
        try:
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_TMP_AGE:
                os.unlink(p)
        except OSError:
            pass


def write_atomic(path: str, text: str | Iterable[str]) -> None:
    """FILE's new content appears whole or not at all (a textfile collector never reads half
    a file): a temp file in the same directory, fsync, rename over FILE, mode 0644. ``text``
    may come in pieces. Stale temp files of killed runs are swept first (_sweep_stale_temps)."""
    import os
    import tempfile

    from katactl.errors import OperationFailed

    d = os.path.dirname(os.path.abspath(path))
    _sweep_stale_temps(d)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=d)
    except OSError as e:  # the user's FILE, not our temp file's name; never "not found" (exit 3)
        raise OperationFailed(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for piece in [text] if isinstance(text, str) else text:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OperationFailed(f"cannot write {path}: {e.strerror or e} (the old file is kept)") from None
        raise


def _unescape(v: str) -> str:
    if "\\" not in v:
        return v
    out, i = [], 0
    while i < len(v):
        c = v[i]
        if c == "\\" and i + 1 < len(v):
            nxt = v[i + 1]
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _num(v: str) -> float:
    return float(v)


def _fmt_value(v) -> str:
    f = float(v)
    if f == f and abs(f) < 1e18 and f.is_integer():
        return str(int(f))
    return f"{f:g}"
