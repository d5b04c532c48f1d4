"""Rollout steps: typed as the katactl command they run (``upgrade stage SRC --sha256
HEX``, ``drain --ignore-daemonsets``) and parsed by that command's own click definition,
so a step takes exactly the options the command takes and cannot drift from it. The
built-in Kubernetes steps are parsed by ``node cordon|uncordon|drain|check`` (without
the NODE arguments: the rollout names the node), ``wait-ready`` by its own definition.
A step runs through the library, with the Kubernetes API client or over the node's
transport (SSH today): never a shell, never a katactl subprocess.

Each step definition names the command parameters its library call uses and the ones
it refuses (with why: ``--dry-run`` is the rollout's own, ``--parallel`` is
--max-unavailable's); any other parameter typed in a step is refused too, so a new
option of a command is never silently ignored. Parsing never invokes the command, and
never reads the environment variables the command's options honour (a plan is stored
and may be resumed from another machine: a step means what its text says).
``run(ctx, args) -> dict`` returns ``{"changed": bool, "message": str, ...}`` or raises
a KatactlError.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import shlex
import threading
import time
import types
from typing import Any, Callable

from katactl.errors import ExitCode, KatactlError, OperationFailed, TimeoutExpired, UsageError

#: the check a soaked node gets when the plan has no 'check' step of its own
DEFAULT_FAIL_ON = "high"

DRY_RUN = "is the rollout's own: 'rollout plan' (or 'rollout run --dry-run') shows what would be done"
NODES = "is not for a step: the rollout names the node (select nodes with -N, -l or --nodes-from)"


class CheckFailed(KatactlError):
    """A check step ran and found problems (node check, audit)."""

    exit_code, code = ExitCode.CHECK_FAILED, "CheckFailed"


class Args(types.SimpleNamespace):
    """A parsed step: every parameter of its command by name (the command's default when
    not typed), ``typed_`` (the names of those typed), plus what the step's check derived
    from them (parsed sizes, a policy)."""


@dataclasses.dataclass
class StepContext:
    """What a running step may use. ``api`` is None for SSH-only rollouts."""

    node: str
    api: Any
    settings: Any
    rollout: str
    stop: threading.Event
    events: Callable[..., None]
    timeout: float = 0.0           # the policy's --step-timeout (0: none)
    #: the id the rollout saved for this node's cordon record (see engine: "the rollout cordoned it")
    cordon_id: str | None = None

    def transport(self):
        from katactl.fleet import open_transport, validate_node_name

        return open_transport(validate_node_name(self.node), self.settings)


@dataclasses.dataclass
class StepDef:
    name: str
    kind: str                      # "kube" (needs the Kubernetes API) or "node" (node-local)
    #: the katactl command whose definition parses the step (None: wait-ready's own)
    command: tuple[str, ...] | None
    run: Callable[[StepContext, Args], dict]
    help: str
    #: the command's parameters the step's library call uses ...
    uses: frozenset[str]
    #: ... and those it refuses when typed, with why (any other typed parameter is refused too)
    refuses: dict[str, str]
    #: checks and derives values at plan time (exit 2 before any node is touched)
    check: Callable[[Args], None] | None = None
    #: a step after which the node is out of service (it cordons)
    cordons: bool = False


@dataclasses.dataclass
class Step:
    text: str
    definition: StepDef
    args: Args

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def kind(self) -> str:
        return self.definition.kind

    def run(self, ctx: StepContext) -> dict:
        return self.definition.run(ctx, self.args)


REGISTRY: dict[str, StepDef] = {}

#: katactl commands that exist but are not node-local steps, and why
NOT_NODE_LOCAL = {
    "rollout": "a rollout cannot run a rollout",
    "node": "use the built-in steps cordon, uncordon, drain, recycle-stale, check",
    "lab": "the lab is this machine's, not a node's",
    "config": "it reads this machine's settings",
    "version": "a read-only report, not a maintenance step",
    "sandbox": "a read-only report, not a maintenance step",
    "top": "an interactive view",
    "metrics": "a read-only report, not a maintenance step",
    "pprof": "a per-sandbox download, not a node step",
    "shim": "a per-sandbox endpoint, not a node step",
    "balloon": "a per-sandbox operation, not a node step",
    "inspect": "a read-only report, not a maintenance step",
    "overhead": "a read-only report, not a maintenance step",
    "upgrade status": "a read-only report (use 'check' or 'audit' to gate a node)",
    "vmcore list": "a read-only report",
    "vmcore trigger": "it panics a guest: never part of a rollout",
    "vmcore rm": "deleting dumps is not a rollout step (use 'vmcore collect --delete-after')",
}


def _register(name, kind, command, help, *, uses, refuses=None, check=None, cordons=False):
    def deco(run):
        REGISTRY[name] = StepDef(name, kind, command, run, help, frozenset(uses), dict(refuses or {}), check,
                                 cordons)
        return run
    return deco


def parse_step(text: str) -> Step:
    """One step as typed (``'drain --ignore-daemonsets --timeout 10m'``)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty --step: give a step such as 'cordon' or 'upgrade switch 3.10.0'")
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"step {text!r}: {e}") from None
    if argv and argv[0] == "katactl":
        argv = argv[1:]
    if not argv:
        raise UsageError(f"step {text!r}: no command in it")
    two = " ".join(argv[:2])
    if two in REGISTRY:
        d, rest = REGISTRY[two], argv[2:]
    elif argv[0] in REGISTRY:
        d, rest = REGISTRY[argv[0]], argv[1:]
    else:
        why = NOT_NODE_LOCAL.get(two) or NOT_NODE_LOCAL.get(argv[0])
        if why:
            raise UsageError(f"step {text!r}: '{two if two in NOT_NODE_LOCAL else argv[0]}' is not a "
                             f"node-local step ({why})", hint=steps_hint())
        if any(a.startswith("-") for a in argv[:1]) or any(c in text for c in "|;&$`><"):
            raise UsageError(f"step {text!r}: steps are katactl commands, not shell command lines",
                             hint=steps_hint())
        raise UsageError(f"step {text!r}: unknown step {argv[0]!r}", hint=steps_hint())
    args = _parse_args(d, rest, text)
    if d.check is not None:
        try:
            d.check(args)
        except UsageError as e:
            raise UsageError(f"step {text!r}: {e.message}", hint=e.hint) from None
    return Step(text, d, args)


def steps_hint() -> str:
    node = sorted(n for n, d in REGISTRY.items() if d.kind == "node")
    kube = sorted(n for n, d in REGISTRY.items() if d.kind == "kube")
    return f"built-in steps: {', '.join(kube)}; node-local steps: {', '.join(node)}"


# -- parsing by the command's own definition ------------------------------------------

@functools.cache
def step_command(name: str):
    """The click command that parses step ``name``: the katactl command's own, with its
    parameters' environment variables dropped (a step means what its text says, on
    whichever machine plans or resumes it). Only that command's module is imported."""
    path = REGISTRY[name].command
    return _wait_ready_command() if path is None else _without_envvars(path)


@functools.cache
def _without_envvars(path: tuple[str, ...]):
    from katactl.cli import command_at

    cmd = copy.copy(command_at(path))
    cmd.params = [copy.copy(p) for p in cmd.params]
    for p in cmd.params:
        p.envvar = None
    return cmd


def _parse_args(d: StepDef, argv: list[str], text: str) -> Args:
    """The step's words after its name, parsed by the command's definition without
    invoking it; click's errors reworded into one-line UsageErrors naming the step."""
    from typer._click import exceptions as cx
    from typer._click.core import ParameterSource

    cmd = step_command(d.name)
    where = f"katactl {' '.join(d.command)}" if d.command else None
    hint = f"see '{where} --help' for its options" if where else None
    try:
        # no --help option: it would print and exit; typed in a step it is an unknown option
        ctx = cmd.make_context(d.name, list(argv), resilient_parsing=False, help_option_names=[])
    except cx.NoSuchOption as e:
        raise UsageError(f"step {text!r}: {_unknown_option(e, where)}", hint=hint) from None
    except cx.ClickException as e:
        msg = " ".join(e.format_message().split()).rstrip(".")
        if msg.startswith(EXTRA):
            msg = "unrecognized arguments: " + msg[len(EXTRA):].removesuffix(")")
        raise UsageError(f"step {text!r}: {msg[:1].lower()}{msg[1:]}", hint=hint) from None
    for p in cmd.params:
        if p.name not in d.uses and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE:
            why = d.refuses.get(p.name, "is not supported in a rollout step")
            raise UsageError(f"step {text!r}: {_spelling(p)} {why}", hint=hint)
    return Args(**ctx.params, typed_=frozenset(p.name for p in cmd.params if p.name in ctx.params and
                                               ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE))


EXTRA = "Got unexpected extra argument(s) ("  # click's (typer._click.core.Command.parse_args)


def _spelling(p) -> str:
    """How a parameter is typed: its longest option name, or an argument's metavar."""
    opts = list(getattr(p, "opts", None) or []) if getattr(p, "param_type_name", "") == "option" else []
    return max(opts, key=len) if opts else (p.metavar or p.name.upper())


def _unknown_option(e, where: str | None) -> str:
    from katactl.cli import _global_opts

    opt = e.option_name
    if opt in ("-h", "--help"):
        return f"{opt} is not a step option"
    if opt in _global_opts():
        return (f"{opt} is one of katactl's global options, not an option of '{where}': give it to "
                "'katactl rollout' itself (it applies to the whole rollout)")
    return f"unrecognized arguments: {opt}" + (f" (did you mean {', '.join(e.possibilities)}?)"
                                               if getattr(e, "possibilities", None) else "")


def _wait_ready_command():
    """wait-ready's definition: a step only, no katactl command of its own."""
    import typer

    app = typer.Typer(add_completion=False)

    @app.command("wait-ready")
    def wait_ready(timeout: str = typer.Argument("5m", metavar="[TIMEOUT]")) -> None:
        """Wait until the node is Ready."""
    return typer.main.get_command(app)


# -- shared checks -----------------------------------------------------------------------------

def _check_sev(v: str) -> None:
    from katactl.nodes import SEVERITIES

    if v not in SEVERITIES:
        raise UsageError(f"invalid --fail-on {v!r}: choose from {', '.join(SEVERITIES)}")


def _duration(text: str, what: str, allow_zero: bool = True) -> float:
    from katactl.values import parse_duration

    return parse_duration(text, what=what, allow_zero=allow_zero)


# -- built-in Kubernetes steps --------------------------------------------------------

def _need_api(ctx: StepContext):
    if ctx.api is None:
        raise UsageError("this step needs the Kubernetes API (no kubeconfig in use)")
    return ctx.api


_NODE_CMD = {"names": NODES, "dry_run": DRY_RUN, "dry_run_server": DRY_RUN}


@_register("cordon", "kube", ("node", "cordon"), "Mark the node unschedulable (recorded in katactl.io/cordon).",
           uses={"reason"}, refuses=_NODE_CMD, cordons=True)
def _cordon(ctx, a):
    from katactl import nodes

    r = nodes.cordon(_need_api(ctx), ctx.node, reason=a.reason or f"katactl rollout {ctx.rollout}",
                     op_id=ctx.cordon_id)
    return {"changed": r["changed"], "message": r["message"], "wasUnschedulable": _found(ctx, r)}


def _found(ctx, r: dict) -> bool | None:
    """Whether the node was unschedulable before the rollout touched it: a cordon of a node
    this rollout already cordoned (a drain after a cordon step, a resumed cordon) finds it
    unschedulable, but its own record (the node's cordonId) says what the first one found."""
    rec = r.get("record", r.get("cordon")) or {}
    if ctx.cordon_id is not None and rec.get("id") == ctx.cordon_id:
        return bool(rec.get("wasUnschedulable"))
    return r["wasUnschedulable"]


@_register("uncordon", "kube", ("node", "uncordon"),
           "Undo the rollout's own cordon of the node (never a cordon anyone else made).",
           uses=(), refuses={**_NODE_CMD, "force": "is not for a step: the rollout never uncordons a node that "
                                                  "was unschedulable before it"})
def _uncordon(ctx, a):
    from katactl import nodes

    if ctx.cordon_id is None:
        # no cordon of this rollout to undo (a stored plan without a step that cordons, a state
        # from before cordon ids): without its id, uncordon would undo anyone's cordon
        return {"changed": False, "message": "left as it is: the rollout has no cordon record of this node"}
    # only the rollout's own cordon (by its record's id), never one made by someone else since
    r = nodes.uncordon(_need_api(ctx), ctx.node, record_id=ctx.cordon_id)
    if not r["changed"] and r["message"].startswith("left cordoned"):  # our cordon found it cordoned
        return {"changed": False, "message": "left cordoned: it was unschedulable before the rollout"}
    return {"changed": r["changed"], "message": r["message"]}


_DRAIN_USES = {"ignore_daemonsets", "delete_emptydir_data", "force", "grace_period", "timeout", "pod_selector",
               "skip_wait", "disable_eviction", "kata_only", "stale_release", "kata_root", "reason"}
_DRAIN_REFUSES = {**_NODE_CMD,
                  "keep_cordoned": "is not for a step: the rollout restores the cordon state of its nodes itself",
                  "parallel": "is not for a step: --max-unavailable sets how many nodes the rollout takes at once"}


def _check_drain(a: Args) -> None:
    """node drain's own checks (at plan time: a bad selector or grace period must not wait
    for a node to be cordoned); --timeout: the policy's --step-timeout when not typed."""
    from katactl import nodes

    nodes.check_drain_values(grace_period=a.grace_period, skip_wait=a.skip_wait, pod_selector=a.pod_selector)
    a.deadline = _duration(a.timeout, "drain --timeout") if "timeout" in a.typed_ else None


def _drain_opts(ctx: StepContext, a: Args, *, kata_only: bool, only_pods=None):
    from katactl import nodes

    timeout = a.deadline if a.deadline is not None else ctx.timeout
    return nodes.DrainOptions(ignore_daemonsets=a.ignore_daemonsets, delete_emptydir_data=a.delete_emptydir_data,
                              force=a.force, grace_period=a.grace_period, timeout=timeout or 0.0,
                              pod_selector=a.pod_selector, skip_wait_for_delete_timeout=a.skip_wait,
                              disable_eviction=a.disable_eviction, kata_only=kata_only, only_pods=only_pods,
                              reason=a.reason or f"katactl rollout {ctx.rollout}", cordon_id=ctx.cordon_id,
                              agent_namespace=ctx.settings.agent_namespace if ctx.settings else "kube-system")


def _drain_events(ctx: StepContext):
    def ev(kind, **data):
        if kind in ("PodEvictionBlocked", "Warning", "NodeRestored"):
            ctx.events(kind, **data)
    return ev


def _run_drain(ctx: StepContext, a: Args, *, kata_only: bool, stale: bool) -> dict:
    from katactl import nodes

    only = None
    if stale:
        with ctx.transport() as t:
            only, current = nodes.stale_release_pods(t, a.kata_root)
        if not only:
            return {"changed": False, "message": f"no sandbox runs a release other than {current}",
                    "evicted": []}
        kata_only = True
    r = nodes.drain(_need_api(ctx), ctx.node, _drain_opts(ctx, a, kata_only=kata_only, only_pods=only),
                    events=_drain_events(ctx), stop=ctx.stop)
    return {"changed": r["changed"], "message": f"{len(r['evicted'])} pod(s) evicted, {len(r['skipped'])} skipped",
            "evicted": r["evicted"], "wasUnschedulable": _found(ctx, r)}


@_register("drain", "kube", ("node", "drain"), "Cordon and evict pods, with kubectl drain's semantics and flags.",
           uses=_DRAIN_USES, refuses=_DRAIN_REFUSES, check=_check_drain, cordons=True)
def _drain(ctx, a):
    return _run_drain(ctx, a, kata_only=a.kata_only, stale=a.stale_release)


# --kata-only and --stale-release are what recycle-stale is: typed again, they change nothing
@_register("recycle-stale", "kube", ("node", "drain"),
           "= drain --kata-only --stale-release: move sandboxes still on an old release.",
           uses=_DRAIN_USES, refuses=_DRAIN_REFUSES, check=_check_drain, cordons=True)
def _recycle(ctx, a):
    return _run_drain(ctx, a, kata_only=True, stale=True)


def _at_or_above(findings: list[dict], fail_on: str) -> list[dict]:
    from katactl.nodes import SEVERITIES

    rank = SEVERITIES.index(fail_on)
    return [f for f in findings if SEVERITIES.index(f["severity"]) >= rank]


def run_check(api, node: str, fail_on: str, findings: list[dict] | None = None) -> dict:
    """node check on ``node`` (plus ``findings`` already made, --node-facts'): CheckFailed
    when any is at or above ``fail_on``."""
    from katactl import nodes

    findings = nodes.check(api, node) + (findings or [])
    bad = _at_or_above(findings, fail_on)
    if bad:
        raise CheckFailed(f"node check found {len(bad)} problem(s) at or above {fail_on}: "
                          + "; ".join(f"{f['check']} {f['target']}: {f['message']}" for f in bad[:3]),
                          details={"findings": bad[:20]})
    return {"changed": False, "message": f"node check passed ({len(findings)} finding(s) below {fail_on})"}


@_register("check", "kube", ("node", "check"),
           "= node check: fail the node on findings at or above --fail-on (default high).",
           uses={"fail_on", "node_facts", "kata_root"},
           refuses={"names": NODES, **dict.fromkeys(("ignore_daemonsets", "delete_emptydir_data", "force"),
                    "is not for a step: the check step judges no drain to come (a drain step refuses by itself, "
                    "before its cordon)")},
           check=lambda a: _check_sev(a.fail_on))
def _check(ctx, a):
    facts = None
    if a.node_facts:
        from katactl import nodes

        with ctx.transport() as t:
            facts = nodes.check_node_facts(ctx.node, nodes.kata_facts(t, a.kata_root))
    return run_check(_need_api(ctx), ctx.node, a.fail_on, facts)


def _check_wait_ready(a: Args) -> None:
    a.seconds = _duration(a.timeout, "wait-ready TIMEOUT", allow_zero=False)


@_register("wait-ready", "kube", None, "Wait until the node is Ready (default timeout 5m).",
           uses={"timeout"}, check=_check_wait_ready)
def _wait_ready(ctx, a):
    from katactl import nodes

    api = _need_api(ctx)
    end = time.monotonic() + a.seconds
    while True:
        status = nodes.node_status(nodes.get_node(api, ctx.node))
        if status.startswith("Ready"):
            return {"changed": False, "message": "node is Ready"}
        if time.monotonic() >= end:
            raise TimeoutExpired(f"node {ctx.node} not Ready after {a.seconds:g}s (status {status})")
        if ctx.stop.wait(min(1.0, max(0.0, end - time.monotonic()))):
            from katactl.errors import Interrupted

            raise Interrupted(f"interrupted while waiting for {ctx.node} to be Ready")


# -- node-local katactl commands ------------------------------------------------------------

_UPGRADE_USES = {"force", "kata_root", "lock_timeout"}
_UPGRADE_REFUSES = {"dry_run": DRY_RUN}


def _check_upgrade(a: Args) -> None:
    """--lock-timeout as the command reads it (none typed: the settings' request timeout)."""
    a.lock_seconds = _duration(a.lock_timeout, "--lock-timeout") if a.lock_timeout else None


def _upgrade(ctx: StepContext, a: Args, action: Callable[..., dict], *args, **kw) -> dict:
    """``action`` (a katactl.upgrade function) on the node with the step's --kata-root,
    --force and lock timeout (the settings' request timeout unless --lock-timeout)."""
    from katactl.upgrade import Layout

    lock_timeout = a.lock_seconds if a.lock_seconds is not None else ctx.settings.request_timeout
    with ctx.transport() as t:
        return action(t, Layout(a.kata_root), *args, force=a.force, lock_timeout=lock_timeout, **kw)


def _already(r: dict) -> str:
    return "" if r.get("changed") else " (already)"


def _check_stage(a: Args) -> None:
    from katactl.upgrade.source import check_source_arg
    from katactl.upgrade.stage import check_args
    from katactl.values import parse_size

    check_source_arg(a.source)
    check_args(a.as_version, a.sha256)  # a typo is exit 2 here, not a drained node's failure
    a.reserve_bytes = parse_size(a.reserve, allow_zero=True, what="--reserve")
    _check_upgrade(a)


@_register("upgrade stage", "node", ("upgrade", "stage"), "Stage a release on the node (upgrade stage SOURCE ...).",
           uses={*_UPGRADE_USES, "source", "as_version", "sha256", "no_verify", "reserve"},
           refuses=_UPGRADE_REFUSES, check=_check_stage)
def _stage(ctx, a):
    from katactl import upgrade

    r = _upgrade(ctx, a, upgrade.stage, a.source, version=a.as_version, sha256=a.sha256, no_verify=a.no_verify,
                 reserve=a.reserve_bytes)
    return {"changed": r.get("changed", False), "message": f"release {r.get('version')} staged{_already(r)}"}


def _check_switch(a: Args) -> None:
    from katactl.upgrade.layout import COMPONENTS, validate_version

    validate_version(a.version)
    if a.component not in COMPONENTS:
        raise UsageError(f"invalid --component {a.component!r} (choose from {', '.join(COMPONENTS)})")
    _check_upgrade(a)


@_register("upgrade switch", "node", ("upgrade", "switch"),
           "Switch the node to a staged release (upgrade switch VERSION ...).",
           uses={*_UPGRADE_USES, "version", "component", "no_preflight_exec"}, refuses=_UPGRADE_REFUSES,
           check=_check_switch)
def _switch(ctx, a):
    from katactl import upgrade

    r = _upgrade(ctx, a, upgrade.switch, a.version, a.component, run_binaries=not a.no_preflight_exec)
    to = r.get("to") or {}
    return {"changed": r.get("changed", False),
            "message": f"runtime {to.get('runtime')}, agent {to.get('agent')}{_already(r)}"}


@_register("upgrade rollback", "node", ("upgrade", "rollback"), "Undo the node's last switch.",
           uses={*_UPGRADE_USES, "no_preflight_exec"}, refuses=_UPGRADE_REFUSES, check=_check_upgrade)
def _rollback(ctx, a):
    from katactl import upgrade

    r = _upgrade(ctx, a, upgrade.rollback, run_binaries=not a.no_preflight_exec)
    to = r.get("to") or {}
    return {"changed": r.get("changed", False), "message": f"back to runtime {to.get('runtime')}"}


@_register("upgrade gc", "node", ("upgrade", "gc"),
           "Remove releases nothing on the node uses (the plan is the confirmation).",
           uses={*_UPGRADE_USES, "keep_previous"}, refuses=_UPGRADE_REFUSES, check=_check_upgrade)
def _gc(ctx, a):
    from katactl import upgrade

    r = _upgrade(ctx, a, upgrade.gc, keep_previous=a.keep_previous)
    return {"changed": r.get("changed", False), "message": f"removed {', '.join(r.get('removed') or []) or 'nothing'}"}


def _check_audit(a: Args) -> None:
    from katactl.isolation import policy as pol_mod

    _check_sev(a.fail_on)
    a.policy_obj = pol_mod.load(a.policy)  # a bad policy file is exit 2 before anything runs


@_register("audit", "node", ("audit",),
           "Co-location isolation audit on the node; fails it on findings at or above --fail-on.",
           uses={"policy", "fail_on"}, refuses={"list_checks": "is not for a step: it lists the checks, "
                                                              "it checks no node ('katactl audit --list-checks')"},
           check=_check_audit)
def _audit(ctx, a):
    from katactl.isolation import audit as lib

    with ctx.transport() as t:
        res = lib.run(t, a.policy_obj)
    items, meta, failed = lib.merge({ctx.node: res}, a.fail_on, a.policy_obj, multi=False)
    if failed:
        bad = _at_or_above(items, a.fail_on)
        raise CheckFailed(f"audit found {len(bad)} finding(s) at or above {a.fail_on}: "
                          + "; ".join(f"{i['check']}: {i['message']}" for i in bad[:3]))
    return {"changed": False, "message": f"audit passed ({len(items)} finding(s) below {a.fail_on})"}


def _check_collect(a: Args) -> None:
    """vmcore collect's own checks, in its order: the options (--to too), the paths, the refs."""
    from katactl import vmcore
    from katactl.values import parse_size

    a.opts = vmcore.CollectOptions(
        to=a.to, compress=a.compress, compress_on=a.compress_on, makedumpfile=a.makedumpfile,
        dump_level=a.dump_level, delete_after=a.delete_after, verify_source=a.verify, force=a.force,
        bwlimit=parse_size(a.bwlimit, what="--bwlimit") if a.bwlimit is not None else None)
    a.opts.validate()
    for path, what in ((a.dump_path, "--dump-path"), (a.kata_config, "--kata-config")):
        if path is not None:
            vmcore.check_abs(path, what)
    a.refs = list(a.refs or ())
    for ref in a.refs:
        vmcore.check_ref(ref)


@_register("vmcore collect", "node", ("vmcore", "collect"),
           "Copy the node's guest dumps here (vmcore collect --to DIR ...).",
           uses={"refs", "to", "compress", "compress_on", "makedumpfile", "dump_level", "delete_after", "verify",
                 "bwlimit", "dump_path", "kata_config", "force"},
           refuses={"dry_run": DRY_RUN}, check=_check_collect)
def _vmcore(ctx, a):
    from katactl import vmcore

    with ctx.transport() as t:
        items = vmcore.collect(t, a.refs, a.opts, dump_path=a.dump_path, kata_config=a.kata_config, keep_going=True)
    errs = [i for i in items if i.get("error")]
    if errs:
        raise OperationFailed(f"{len(errs)} of {len(items)} dump(s) not collected: "
                              + "; ".join(f"{i['name']}: {i['error']['message']}" for i in errs[:3]))
    return {"changed": any(i.get("changed") for i in items), "message": f"{len(items)} dump(s) collected"}
