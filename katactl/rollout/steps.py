"""Rollout steps: parsed with shlex into argv, looked up in a small registry,
run through the library: built-in Kubernetes steps with the KubeAPI client,
node-local katactl commands over the node's transport (SSH today). Never a
shell, never a katactl subprocess.

Each step definition has an argparse parser (errors are UsageError, exit 2,
naming the step) and a ``run(ctx, args) -> dict`` returning
``{"changed": bool, "message": str, ...}`` or raising a KatactlError.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import threading
import time
from typing import Any, Callable

from katactl.errors import ExitCode, KatactlError, OperationFailed, TimeoutExpired, UsageError

#: the check a soaked node gets when the plan has no 'check' step of its own
DEFAULT_FAIL_ON = "high"


class CheckFailed(KatactlError):
    """A check step ran and found problems (node check, audit)."""

    exit_code, code = ExitCode.CHECK_FAILED, "CheckFailed"


class _Parser(argparse.ArgumentParser):
    def __init__(self, step: str, **kw):
        super().__init__(prog=step, add_help=False, allow_abbrev=False, exit_on_error=False, **kw)
        self.step = step

    def error(self, message):  # never exit, never print
        raise UsageError(f"step {self.step!r}: {message}")


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
    was_unschedulable: bool = False

    def transport(self):
        from katactl.fleet import open_transport, validate_node_name

        return open_transport(validate_node_name(self.node), self.settings)


@dataclasses.dataclass
class StepDef:
    name: str
    kind: str                      # "kube" (needs the Kubernetes API) or "node" (node-local)
    parser: Callable[[], _Parser]
    run: Callable[[StepContext, argparse.Namespace], dict]
    help: str
    #: a step after which the node is out of service (it cordons)
    cordons: bool = False


@dataclasses.dataclass
class Step:
    text: str
    definition: StepDef
    args: argparse.Namespace

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


def _register(name, kind, help, cordons=False):
    def deco(fn):
        parser_fn, run_fn = fn()
        REGISTRY[name] = StepDef(name, kind, parser_fn, run_fn, help, cordons)
        return fn
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
    args = d.parser().parse_args(rest)
    check = getattr(args, "_check", None)
    if check:
        check(args, text)
    return Step(text, d, args)


def steps_hint() -> str:
    node = sorted(n for n, d in REGISTRY.items() if d.kind == "node")
    kube = sorted(n for n, d in REGISTRY.items() if d.kind == "kube")
    return f"built-in steps: {', '.join(kube)}; node-local steps: {', '.join(node)}"


def _sev(v: str) -> str:
    from katactl.nodes import SEVERITIES

    if v not in SEVERITIES:
        raise UsageError(f"invalid --fail-on {v!r}: choose from {', '.join(SEVERITIES)}")
    return v


def _duration_type(what: str, allow_zero: bool = True):
    def conv(s: str) -> float:
        from katactl.values import parse_duration

        return parse_duration(s, what=what, allow_zero=allow_zero)
    return conv


# -- built-in Kubernetes steps --------------------------------------------------------

def _need_api(ctx: StepContext):
    if ctx.api is None:
        raise UsageError("this step needs the Kubernetes API (no kubeconfig in use)")
    return ctx.api


@_register("cordon", "kube", "Mark the node unschedulable (recorded in katactl.io/cordon).", cordons=True)
def _cordon():
    def parser():
        p = _Parser("cordon")
        p.add_argument("--reason")
        return p

    def run(ctx, a):
        from katactl import nodes

        r = nodes.cordon(_need_api(ctx), ctx.node, reason=a.reason or f"katactl rollout {ctx.rollout}")
        return {"changed": r["changed"], "message": r["message"]}
    return parser, run


@_register("uncordon", "kube", "Make the node schedulable again, unless it was cordoned before the rollout.")
def _uncordon():
    def parser():
        return _Parser("uncordon")

    def run(ctx, a):
        from katactl import nodes

        if ctx.was_unschedulable:
            return {"changed": False, "message": "left cordoned: it was unschedulable before the rollout"}
        r = nodes.uncordon(_need_api(ctx), ctx.node)
        return {"changed": r["changed"], "message": r["message"]}
    return parser, run


def _drain_parser(name: str) -> _Parser:
    p = _Parser(name)
    p.add_argument("--ignore-daemonsets", action="store_true")
    p.add_argument("--delete-emptydir-data", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--grace-period", type=int, default=-1)
    p.add_argument("--timeout", type=_duration_type("drain --timeout"), default=None)
    p.add_argument("--pod-selector")
    p.add_argument("--skip-wait-for-delete-timeout", type=int, default=0)
    p.add_argument("--disable-eviction", action="store_true")
    p.add_argument("--kata-root", default="/opt/kata")
    if name == "drain":
        p.add_argument("--kata-only", action="store_true")
        p.add_argument("--stale-release", action="store_true")

    def check(a, text):
        if a.grace_period < -1:
            raise UsageError(f"step {text!r}: invalid --grace-period {a.grace_period}: -1 (the pod's own) or more")
        if a.skip_wait_for_delete_timeout < 0:
            raise UsageError(f"step {text!r}: invalid --skip-wait-for-delete-timeout: 0 or more")
    p.set_defaults(_check=check)
    return p


def _drain_opts(ctx: StepContext, a, *, kata_only: bool, only_pods=None):
    from katactl import nodes

    timeout = a.timeout if a.timeout is not None else ctx.timeout
    return nodes.DrainOptions(ignore_daemonsets=a.ignore_daemonsets, delete_emptydir_data=a.delete_emptydir_data,
                              force=a.force, grace_period=a.grace_period, timeout=timeout or 0.0,
                              pod_selector=a.pod_selector, skip_wait_for_delete_timeout=a.skip_wait_for_delete_timeout,
                              disable_eviction=a.disable_eviction, kata_only=kata_only, only_pods=only_pods,
                              reason=f"katactl rollout {ctx.rollout}")


def _drain_events(ctx: StepContext):
    def ev(kind, **data):
        if kind in ("PodEvictionBlocked", "Warning", "NodeRestored"):
            ctx.events(kind, **data)
    return ev


def _run_drain(ctx: StepContext, a, *, kata_only: bool, stale: bool) -> dict:
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
            "evicted": r["evicted"]}


@_register("drain", "kube", "Cordon and evict pods, with kubectl drain's semantics and flags.", cordons=True)
def _drain():
    def run(ctx, a):
        return _run_drain(ctx, a, kata_only=a.kata_only, stale=a.stale_release)
    return (lambda: _drain_parser("drain")), run


@_register("recycle-stale", "kube", "= drain --kata-only --stale-release: move sandboxes still on an old release.",
           cordons=True)
def _recycle():
    def run(ctx, a):
        return _run_drain(ctx, a, kata_only=True, stale=True)
    return (lambda: _drain_parser("recycle-stale")), run


def _at_or_above(findings: list[dict], fail_on: str) -> list[dict]:
    from katactl.nodes import SEVERITIES

    rank = SEVERITIES.index(fail_on)
    return [f for f in findings if SEVERITIES.index(f["severity"]) >= rank]


def run_check(api, node: str, fail_on: str) -> dict:
    from katactl import nodes

    findings = nodes.check(api, node)
    bad = _at_or_above(findings, fail_on)
    if bad:
        raise CheckFailed(f"node check found {len(bad)} problem(s) at or above {fail_on}: "
                          + "; ".join(f"{f['check']} {f['target']}: {f['message']}" for f in bad[:3]),
                          details={"findings": bad[:20]})
    return {"changed": False, "message": f"node check passed ({len(findings)} finding(s) below {fail_on})"}


@_register("check", "kube", "= node check: fail the node on findings at or above --fail-on (default high).")
def _check():
    def parser():
        p = _Parser("check")
        p.add_argument("--fail-on", type=_sev, default=DEFAULT_FAIL_ON)
        return p

    def run(ctx, a):
        return run_check(_need_api(ctx), ctx.node, a.fail_on)
    return parser, run


@_register("wait-ready", "kube", "Wait until the node is Ready (default timeout 5m).")
def _wait_ready():
    def parser():
        p = _Parser("wait-ready")
        p.add_argument("timeout", nargs="?", type=_duration_type("wait-ready TIMEOUT", allow_zero=False),
                       default=300.0)
        return p

    def run(ctx, a):
        from katactl import nodes

        api = _need_api(ctx)
        end = time.monotonic() + a.timeout
        while True:
            status = nodes.node_status(nodes.get_node(api, ctx.node))
            if status.startswith("Ready"):
                return {"changed": False, "message": "node is Ready"}
            if time.monotonic() >= end:
                raise TimeoutExpired(f"node {ctx.node} not Ready after {a.timeout:g}s (status {status})")
            if ctx.stop.wait(min(1.0, max(0.0, end - time.monotonic()))):
                from katactl.errors import Interrupted

                raise Interrupted(f"interrupted while waiting for {ctx.node} to be Ready")
    return parser, run


# -- node-local katactl commands ------------------------------------------------------------

def _upgrade_parser(name: str, positional: str | None) -> _Parser:
    """The flags every ``upgrade`` step takes: --kata-root, --lock-timeout, --force."""
    p = _Parser(name)
    if positional:
        p.add_argument(positional)
    p.add_argument("--kata-root", default="/opt/kata")
    p.add_argument("--lock-timeout", type=_duration_type("--lock-timeout"), default=None)
    p.add_argument("--force", action="store_true")
    return p


def _upgrade(ctx: StepContext, a, action: Callable[..., dict], *args, **kw) -> dict:
    """``action`` (a katactl.upgrade function) on the node with the step's --kata-root,
    --force and lock timeout (the settings' request timeout unless --lock-timeout)."""
    from katactl.upgrade import Layout

    lock_timeout = a.lock_timeout if a.lock_timeout is not None else ctx.settings.request_timeout
    with ctx.transport() as t:
        return action(t, Layout(a.kata_root), *args, force=a.force, lock_timeout=lock_timeout, **kw)


def _already(r: dict) -> str:
    return "" if r.get("changed") else " (already)"


@_register("upgrade stage", "node", "Stage a release on the node (upgrade stage SOURCE ...).")
def _stage():
    def parser():
        p = _upgrade_parser("upgrade stage", "source")
        p.add_argument("--as", dest="as_version")
        p.add_argument("--sha256")
        p.add_argument("--no-verify", action="store_true")
        p.add_argument("--reserve", default="256Mi")

        def check(a, text):
            from katactl.upgrade.source import check_source_arg
            from katactl.values import parse_size

            check_source_arg(a.source)
            a.reserve = parse_size(a.reserve, allow_zero=True, what="--reserve")
        p.set_defaults(_check=check)
        return p

    def run(ctx, a):
        from katactl import upgrade

        r = _upgrade(ctx, a, upgrade.stage, a.source, version=a.as_version, sha256=a.sha256, no_verify=a.no_verify,
                     reserve=a.reserve)
        return {"changed": r.get("changed", False), "message": f"release {r.get('version')} staged{_already(r)}"}
    return parser, run


@_register("upgrade switch", "node", "Switch the node to a staged release (upgrade switch VERSION ...).")
def _switch():
    def parser():
        p = _upgrade_parser("upgrade switch", "version")
        p.add_argument("--component", "-c", default="all", choices=("all", "runtime", "agent"))
        p.add_argument("--no-preflight-exec", action="store_true")

        def check(a, text):
            from katactl.upgrade.layout import validate_version

            validate_version(a.version)
        p.set_defaults(_check=check)
        return p

    def run(ctx, a):
        from katactl import upgrade

        r = _upgrade(ctx, a, upgrade.switch, a.version, a.component, run_binaries=not a.no_preflight_exec)
        to = r.get("to") or {}
        return {"changed": r.get("changed", False),
                "message": f"runtime {to.get('runtime')}, agent {to.get('agent')}{_already(r)}"}
    return parser, run


@_register("upgrade rollback", "node", "Undo the node's last switch.")
def _rollback():
    def parser():
        p = _upgrade_parser("upgrade rollback", None)
        p.add_argument("--no-preflight-exec", action="store_true")
        return p

    def run(ctx, a):
        from katactl import upgrade

        r = _upgrade(ctx, a, upgrade.rollback, run_binaries=not a.no_preflight_exec)
        to = r.get("to") or {}
        return {"changed": r.get("changed", False), "message": f"back to runtime {to.get('runtime')}"}
    return parser, run


@_register("upgrade gc", "node", "Remove releases nothing on the node uses (the plan is the confirmation).")
def _gc():
    def parser():
        p = _upgrade_parser("upgrade gc", None)
        p.add_argument("--no-keep-previous", action="store_true")
        return p

    def run(ctx, a):
        from katactl import upgrade

        r = _upgrade(ctx, a, upgrade.gc, keep_previous=not a.no_keep_previous)
        return {"changed": r.get("changed", False), "message": f"removed {', '.join(r.get('removed') or []) or 'nothing'}"}
    return parser, run


@_register("audit", "node", "Co-location isolation audit on the node; fails it on findings at or above --fail-on.")
def _audit():
    def parser():
        p = _Parser("audit")
        p.add_argument("--policy", "-p")
        p.add_argument("--fail-on", type=_sev, default="medium")

        def check(a, text):
            from katactl.isolation import policy as pol_mod

            a.policy_obj = pol_mod.load(a.policy)  # a bad policy file is exit 2 before anything runs
        p.set_defaults(_check=check)
        return p

    def run(ctx, a):
        from katactl.isolation import audit as lib

        with ctx.transport() as t:
            res = lib.run(t, a.policy_obj)
        items, meta, failed = lib.merge({ctx.node: res}, a.fail_on, a.policy_obj, multi=False)
        if failed:
            bad = _at_or_above(items, a.fail_on)
            raise CheckFailed(f"audit found {len(bad)} finding(s) at or above {a.fail_on}: "
                              + "; ".join(f"{i['check']}: {i['message']}" for i in bad[:3]))
        return {"changed": False, "message": f"audit passed ({len(items)} finding(s) below {a.fail_on})"}
    return parser, run


@_register("vmcore collect", "node", "Copy the node's guest dumps here (vmcore collect --to DIR ...).")
def _vmcore():
    def parser():
        p = _Parser("vmcore collect")
        p.add_argument("refs", nargs="*")
        p.add_argument("--to", required=True)
        p.add_argument("--compress", default="none")
        p.add_argument("--compress-on", default="auto")
        p.add_argument("--delete-after", action="store_true")
        p.add_argument("--verify", action="store_true")
        p.add_argument("--dump-path")
        p.add_argument("--kata-config")

        def check(a, text):
            from katactl import vmcore

            a.opts = vmcore.CollectOptions(to=a.to, compress=a.compress, compress_on=a.compress_on,
                                           delete_after=a.delete_after, verify_source=a.verify)
            a.opts.validate()
            for ref in a.refs:
                vmcore.check_ref(ref)
        p.set_defaults(_check=check)
        return p

    def run(ctx, a):
        from katactl import vmcore

        with ctx.transport() as t:
            items = vmcore.collect(t, a.refs, a.opts, dump_path=a.dump_path, kata_config=a.kata_config,
                                   keep_going=True)
        errs = [i for i in items if i.get("error")]
        if errs:
            raise OperationFailed(f"{len(errs)} of {len(items)} dump(s) not collected: "
                                  + "; ".join(f"{i['name']}: {i['error']['message']}" for i in errs[:3]))
        return {"changed": any(i.get("changed") for i in items), "message": f"{len(items)} dump(s) collected"}
    return parser, run
