"""katactl's root command: global options, the lazy command registry, and the
single place where exceptions become messages and exit codes.

Command modules are imported only when their group runs (pip's habit): --help
and TAB completion read names and one-line help from REGISTRY below and never
import a command module, so they never load kubernetes, paramiko or httpx.
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator, MutableMapping
from typing import List, NamedTuple, Optional

import typer
from typer._click import Context as ClickContext
from typer.core import TyperGroup
from typer.models import TyperInfo

from katactl.errors import ExitCode, Interrupted, KatactlError, UsageError, exit_code_for


class Entry(NamedTuple):
    module: str
    help: str


# name -> command module (which defines ``app``). Register a group once it works.
REGISTRY: dict[str, Entry] = {
    "version": Entry("katactl.commands.version", "Show client (and, with a node, Kata) versions."),
    "config": Entry("katactl.commands.config", "Show effective settings and where each came from."),
    "sandbox": Entry("katactl.commands.sandbox", "List and inspect sandboxes on node(s), mapped to pods."),
    "metrics": Entry("katactl.commands.metrics", "A sandbox's shim metrics (parsed, filtered or raw)."),
    "top": Entry("katactl.commands.top", "Live per-sandbox CPU and memory (one snapshot with -o json)."),
    "pprof": Entry("katactl.commands.pprof", "Download a Go shim pprof profile (heap, goroutine, profile, trace)."),
    "shim": Entry("katactl.commands.shim", "Other shim endpoints: agent-url, iptables, volume."),
    "balloon": Entry("katactl.commands.balloon", "Memory elasticity: get or set a sandbox's balloon."),
    "lab": Entry("katactl.commands.lab", "A local Kata-like node with real QEMU micro-VMs: up, status, down."),
    "vmcore": Entry("katactl.commands.vmcore", "Guest memory dumps: list, collect, trigger, rm."),
    "upgrade": Entry("katactl.commands.upgrade", "A/B upgrade of runtime and agent: stage, switch, rollback, status, gc."),
    "inspect": Entry("katactl.commands.inspect", "Host isolation as it is: cgroup, bvt, memcg, rdt, threads, pressure."),
    "audit": Entry("katactl.commands.audit", "Check the co-location isolation policy (exit 8 on findings)."),
    "overhead": Entry("katactl.commands.overhead", "Pod overhead declared (RuntimeClass) vs measured (shim, VMM, helpers)."),
    "node": Entry("katactl.commands.node", "Kubernetes nodes: list, check, cordon, uncordon, drain (Kata-aware)."),
    "rollout": Entry("katactl.commands.rollout", "Rolling node operations: batches, soak, alert gate, windows, resume."),
}


_BUILT: dict[int, tuple[typer.Typer, object]] = {}


def _built(typer_app: typer.Typer):
    """The click command of typer_app, built once per process (one run needs the root and
    its leaf's group more than once: option hoisting, Click). A group's subcommands are
    built on first use (:class:`_Commands`): Typer would build every command of the group
    from its signature, about 1 ms each, where a leaf's run or --help needs one."""
    hit = _BUILT.get(id(typer_app))
    if hit is None or hit[0] is not typer_app:
        lazy = typer_app.registered_callback and not typer_app._add_completion  # as typer.main.get_command
        cmd = _lazy_group(TyperInfo(typer_app), typer_app) if lazy else typer.main.get_command(typer_app)
        hit = _BUILT[id(typer_app)] = (typer_app, cmd)
    return hit[1]


def _lazy_group(info: TyperInfo, top: typer.Typer) -> TyperGroup:
    """typer.main.get_group_from_info(info), the subcommands left to :class:`_Commands`:
    the group is built from a copy of its Typer without them. ``top`` is the Typer whose
    build settings Typer hands down to every subcommand."""
    from typer.main import get_command_from_info, get_command_name, get_group_from_info, solve_typer_info_defaults

    short, markup = top.pretty_exceptions_short, top.rich_markup_mode

    def group_of(i: TyperInfo) -> TyperGroup:
        return get_group_from_info(i, pretty_exceptions_short=short, rich_markup_mode=markup,
                                   suggest_commands=top.suggest_commands)

    inst = info.typer_instance
    assert inst is not None and isinstance(inst, typer.Typer)
    makers: dict[str, Callable[[], object]] = {}
    for c in inst.registered_commands:
        name = c.name or get_command_name(getattr(c.callback, "__name__", ""))
        makers[name] = functools.partial(get_command_from_info, c, pretty_exceptions_short=short,
                                         rich_markup_mode=markup)
    for g in inst.registered_groups:
        sub = solve_typer_info_defaults(g).name
        if not sub:  # Typer merges an unnamed group's commands into this one: built whole
            return group_of(info)
        makers[sub] = functools.partial(_lazy_group, g, top)
    shell = copy.copy(inst)
    shell.registered_commands, shell.registered_groups = [], []
    shell_info = copy.copy(info)
    shell_info.typer_instance = shell
    group = group_of(shell_info)
    group.commands = _Commands(makers)
    return group


class _Commands(MutableMapping):
    """A group's subcommands by name, each built by its maker on first lookup; names,
    ``in`` and len() build nothing."""

    def __init__(self, makers: dict[str, Callable[[], object]]):
        self._makers = makers
        self._made: dict[str, object] = {}

    def __getitem__(self, name: str):
        if name not in self._made:
            self._made[name] = self._makers[name]()  # KeyError for a name the group lacks
        return self._made[name]

    def __setitem__(self, name: str, cmd) -> None:  # click's add_command
        self._makers.setdefault(name, lambda: cmd)
        self._made[name] = cmd

    def __delitem__(self, name: str) -> None:
        del self._makers[name]
        self._made.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._makers

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


class LazyGroup(TyperGroup):
    """A Typer group whose subcommands live in REGISTRY and load on first use."""

    def list_commands(self, ctx) -> list[str]:
        return list(REGISTRY)

    def get_command(self, ctx, name: str):
        entry = REGISTRY.get(name)
        if entry is None:
            return None
        module = importlib.import_module(entry.module)
        cmd = _built(module.app)
        cmd.name = name
        return cmd

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, e.help) for n, e in REGISTRY.items()])

    def format_epilog(self, ctx, formatter) -> None:
        with formatter.section("Examples"):
            formatter.write_dl([
                ("katactl lab up", "a Kata-like node with real QEMU micro-VMs, to try everything on"),
                ("katactl sandbox list", "sandboxes on this node, with pods and state"),
                ("katactl balloon set NS/POD --target 1Gi --wait", "give a batch VM back memory"),
                ("katactl -N node-1,node-2 audit -o json", "check the co-location policy on two nodes"),
                ("katactl vmcore collect --to /srv/crash", "copy guest dumps off the node, verified"),
            ])
        formatter.write_paragraph()
        formatter.write_text(
            "Exit codes: 0 ok, 1 failed, 2 usage, 3 not found, 4 partial failure, 5 refused by a "
            "safety check, 6 timeout, 7 unreachable/auth, 8 check found problems, 130 interrupted.")
        formatter.write_paragraph()
        formatter.write_text("Run 'katactl COMMAND --help' for a command's options and examples.")


def command_at(path: tuple[str, ...]):
    """The click command of ``katactl PATH...`` (``("upgrade", "stage")``), importing only
    its group's module and building only the commands on the path (rollout steps are
    parsed by the commands' own definitions)."""
    cmd = LazyGroup().get_command(None, path[0])
    for word in path[1:]:
        cmd = cmd.commands[word]
    return cmd


app = typer.Typer(
    cls=LazyGroup,
    name="katactl",
    help=("Operate Kata Containers nodes: sandboxes, memory balloons, vmcores, host isolation, "
          "A/B upgrades of runtime and agent, on one node or a fleet over SSH."),
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: fast, and identical on TTYs and pipes
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

OUTPUT_HELP = "Output format: table, wide, plain, json, yaml, name, jsonl, markdown, prom (metrics)."


@app.callback()
def root(
    ctx: typer.Context,
    output: Optional[str] = typer.Option(None, "-o", "--output", help=OUTPUT_HELP, metavar="FORMAT"),
    node: Optional[List[str]] = typer.Option(None, "-N", "--node", metavar="NODE",
                                             help="Act on NODE over SSH (repeatable; a,b,c; @group)."),
    nodes_from: Optional[str] = typer.Option(None, "--nodes-from", metavar="FILE",
                                             help="Read node names from FILE ('-' = stdin)."),
    selector: Optional[str] = typer.Option(None, "-l", "--selector", metavar="SELECTOR", help="Kubernetes node label selector."),
    host_root: Optional[str] = typer.Option(None, "--host-root", metavar="DIR",
                                            help="The node's root filesystem is mounted at DIR."),
    context: Optional[str] = typer.Option(None, "--context", metavar="NAME", help="kubeconfig context."),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", metavar="FILE", help="kubeconfig file."),
    namespace: Optional[str] = typer.Option(None, "-n", "--namespace", metavar="NAMESPACE", help="Kubernetes namespace."),
    via: Optional[str] = typer.Option(None, "--via", metavar="ssh|kube",
                                      help="How named nodes are reached: ssh (default), or kube (pods/exec into a "
                                           "privileged node pod; -N names Kubernetes nodes)."),
    agent_namespace: Optional[str] = typer.Option(None, "--agent-namespace", metavar="NAMESPACE",
                                                  help="Namespace of katactl's node pods for --via kube (default kube-system)."),
    agent_image: Optional[str] = typer.Option(None, "--agent-image", metavar="IMAGE",
                                              help="Image (with python3) for an ephemeral node pod where no node agent runs (--via kube)."),
    ssh_user: Optional[str] = typer.Option(None, "--ssh-user", metavar="USER", help="SSH user."),
    ssh_config: Optional[str] = typer.Option(None, "--ssh-config", metavar="FILE", help="OpenSSH config file."),
    identity: Optional[str] = typer.Option(None, "-i", "--identity", metavar="FILE", help="SSH private key."),
    jump_host: Optional[str] = typer.Option(None, "-J", "--jump-host", metavar="[USER@]HOST[:PORT][,...]",
                                            help="Reach nodes through this SSH jump host (ProxyJump syntax)."),
    known_hosts: Optional[str] = typer.Option(None, "--known-hosts", metavar="FILE",
                                              help="Extra known_hosts file to verify host keys against."),
    ssh_accept_new: bool = typer.Option(False, "--ssh-accept-new",
                                        help="Trust unknown SSH host keys on first use (changed keys are still refused)."),
    request_timeout: Optional[str] = typer.Option(
        None, "--request-timeout", metavar="DURATION",
        help="Bound on each connect, request and call, as kubectl's (default 30s). A command's own "
             "--timeout is the deadline of its wait."),
    parallel: Optional[int] = typer.Option(None, "--parallel", metavar="N", help="Nodes worked on at once."),
    profile: Optional[str] = typer.Option(None, "--profile", metavar="NAME", help="Config profile to use."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="More detail; tracebacks on errors."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only data, warnings and errors: no info messages or progress."),
    no_color: bool = typer.Option(False, "--no-color", help="No colour (also NO_COLOR=1)."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Assume yes; needed for destructive actions without a TTY."),
    no_audit: bool = typer.Option(False, "--no-audit",
                                  help="Change without an audit record (else an unwritable audit log refuses changes, exit 5)."),
):
    flags = {k: v for k, v in dict(
        output=output, nodes=tuple(node or ()), nodes_from=nodes_from, selector=selector,
        host_root=host_root, context=context, kubeconfig=kubeconfig, namespace=namespace,
        via=via, agent_namespace=agent_namespace, agent_image=agent_image, ssh_user=ssh_user, ssh_config=ssh_config, identity=identity, jump_host=jump_host,
        known_hosts=known_hosts, ssh_accept_new=ssh_accept_new,
        request_timeout=request_timeout, parallel=parallel, verbose=verbose, quiet=quiet, no_color=no_color, yes=yes,
        no_audit=no_audit,
    ).items() if v is not None and v is not False and v != () and not (k == "verbose" and v == 0)}
    if _help_only:
        # a subcommand's --help needs no settings (no config file read, no logging set up):
        # built on first use instead, should a command run after all (-h as an option's value)
        ctx.meta[_DEFERRED] = (flags, profile)
        return
    build_context(ctx, flags, profile)


_DEFERRED = "katactl.deferred-settings"


def build_context(ctx: "typer.Context | ClickContext", flags: dict, profile: str | None) -> None:
    """Resolve the settings of this invocation and put its AppContext on the root context."""
    from katactl import config
    from katactl.context import AppContext
    from katactl.output import FORMATS, PROM_COMMANDS

    settings = config.resolve(flags, profile=profile)
    if settings.output is not None and settings.output not in FORMATS:
        raise UsageError(f"invalid output format {settings.output!r} (choose from {', '.join(FORMATS)})")
    if settings.output == "prom" and ctx.invoked_subcommand not in PROM_COMMANDS:
        raise UsageError(f"-o prom is a Prometheus exposition: only {', '.join(PROM_COMMANDS)} answers in it")
    if settings.selector and ctx.invoked_subcommand != "config":  # config view shows where it came from
        from katactl.fleet import check_selector

        src = settings.sources.get("selector", "flag")
        # every command, also those that hand -l to the API
        check_selector(settings.selector, "label selector" + ("" if src == "flag" else f" (from {src})"))
    if settings.via not in ("ssh", "kube"):
        from katactl.balloon import PATHS  # only on this error path

        # balloon's path option was --via until it shadowed this one: say where it went
        moved = (f"balloon's path option is --path now: --path {settings.via}"
                 if settings.via in ("auto", *PATHS) else None)
        raise UsageError(f"invalid value {settings.via!r} for --via (choose from ssh, kube)", hint=moved)
    if settings.via == "kube":
        # ephemeral node pods this run creates are deleted when it ends (errors, Ctrl-C too)
        ctx.call_on_close(_delete_node_pods)
    ctx.obj = AppContext.create(settings)
    for var in settings.ignored_variables:
        ctx.obj.out.warn(f"{var} is not a katactl variable: ignored (docs/configuration.md lists them)")
    from katactl import fleet
    from katactl.output import STRUCTURED_FORMATS

    # -o json/yaml/jsonl keep their <Kind>List shape with a node selection of any size
    fleet.configure(list_errors=settings.output in STRUCTURED_FORMATS)
    global _output_format, _verbose
    _output_format = settings.output  # errors honour -o from the config file and env too
    _verbose = settings.verbose  # and KATACTL_VERBOSE / verbose = 1 give -v's traceback


def _delete_node_pods(warn_left: bool = True) -> None:
    import signal
    import sys
    import threading

    if "katactl.nodeagent" not in sys.modules:
        return
    # A second SIGTERM or SIGHUP (systemd, a supervisor repeating it) must not end us halfway
    # through deleting privileged pods: both are ignored until the deletion is done (its calls
    # are bounded); SIGKILL still ends it, and Ctrl-C stays the user's way out.
    held = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                held[sig] = signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):
                pass
    global _pods_left
    nodeagent = sys.modules["katactl.nodeagent"]
    try:
        nodes = nodeagent.reached_nodes()
        left = nodeagent.cleanup(lambda m: print(f"warning: {m}", file=sys.stderr), warn_left=warn_left)
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
    if left:  # a success that left privileged pods running is not one (main's exit code)
        # a second pass (the close after settle_node_pods) adds to the first, whose count of
        # nodes reached stands: cleanup() reset it
        before, fan_out = _pods_left or ([], False)
        _pods_left = (before + left, fan_out or nodes > 1)


def settle_node_pods() -> list[dict]:
    """Delete this run's ephemeral node pods now, before the command writes its -o json/yaml/
    jsonl result, and return an ``errors`` entry per pod left (code NodePodLeft, on the pod's
    node): stdout's one document then says what turned the exit code into 1 or 4, which the
    end-of-run deletion could only say on stderr, after the document. Their messages reach
    stderr as the render's ``error:`` lines, not as the cleanup's warnings too (an interrupted
    deletion still names its pods)."""
    from katactl.errors import OperationFailed

    _delete_node_pods(warn_left=False)
    out = []
    for pod, why in sorted((_pods_left or ([], False))[0], key=lambda pw: (pw[0].node, pw[0].name)):
        err = OperationFailed(f"could not delete ephemeral node pod {pod.namespace}/{pod.name}: {why}",
                              hint="katactl node agent gc removes it",
                              details={"namespace": pod.namespace, "pod": pod.name})
        err.code = "NodePodLeft"
        out.append({"node": pod.node, "error": err.to_dict()})
    return out


# The ephemeral node pods this run's cleanup could not delete (each with why), and whether the
# run was a fan-out: its exit 0 becomes 1 (4 for a fan-out, whose results stand).
_pods_left: tuple[list[tuple], bool] | None = None

# True when this invocation only asks for help (-h/--help before any "--"): the root
# callback then builds no settings (no config file read, no logging set up).
_help_only = False

# The resolved -o of this invocation (None until the root callback ran), for main's
# error report: it runs after Typer has unwound the context that held the settings.
_output_format: str | None = None
#: the resolved verbosity (0 until the root callback ran), for the same reason
_verbose = 0


# -- global options may follow the subcommand (kubectl habit) ------------------
# Hoisted in front of the subcommand unless the leaf command defines an option
# of the same name itself (a command's own -n or -l, say).
@functools.lru_cache(maxsize=1)
def _global_opts() -> dict[str, bool]:
    """Root option name -> takes a value, read from the root command itself."""
    opts: dict[str, bool] = {}
    for p in _built(app).params:
        takes_value = not (getattr(p, "is_flag", False) or getattr(p, "count", False))
        for name in list(getattr(p, "opts", [])) + list(getattr(p, "secondary_opts", [])):
            if name.startswith("-"):
                opts[name] = takes_value
    return opts


def hoist_global_options(args: list[str]) -> list[str]:
    """Move global options written after the subcommand to the front, in every
    spelling the root accepts: ``--opt value``, ``--opt=value``, ``-o value``,
    ``-ojson``, ``-o=json`` (kubectl's) and short clusters (``-vv``, ``-qy``).
    A global option that needs a value and has none is a UsageError here, before
    it could swallow the subcommand's name."""
    global_opts = _global_opts()
    head: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":  # options already in front
        toks, nxt = _take_global(args, i, global_opts, set())
        if toks is None:  # not a root option (--help, a typo): Typer's to judge
            head.append(args[i])
            i += 1
        else:
            head += toks
            i = nxt
    rest = args[i:]
    if not rest or "--" in rest:
        return head + rest
    local = _leaf_option_names(rest)
    hoisted, kept = [], []
    j = 0
    while j < len(rest):
        toks, nxt = _take_global(rest, j, global_opts, local)
        if toks is None:
            kept.append(rest[j])
            j += 1
        else:
            hoisted += toks
            j = nxt
    return head + hoisted + kept


def _take_global(args: list[str], k: int, global_opts: dict[str, bool], local: set[str]
                 ) -> tuple[list[str] | None, int]:
    """(the tokens of the root option at args[k], normalised, and the index after
    it), or (None, k) when args[k] is not a root option (or the leaf command has
    an option of that name itself, a command's own -n or -l)."""
    tok = args[k]
    if not tok.startswith("-") or tok in ("-", "--"):
        return None, k

    def value_of(opt: str) -> tuple[list[str], int]:
        if k + 1 >= len(args):
            raise UsageError(f"option {opt} needs a value (see 'katactl --help')")
        return [opt, args[k + 1]], k + 2

    if tok.startswith("--"):
        opt, eq, _ = tok.partition("=")
        takes = global_opts.get(opt)
        if takes is None or opt in local:
            return None, k
        return ([tok], k + 1) if eq or not takes else value_of(opt)
    out: list[str] = []
    for pos in range(1, len(tok)):  # -v, -vv, -qy, -ojson, -o=json, -qo json
        opt = "-" + tok[pos]
        takes = global_opts.get(opt)
        if takes is None or opt in local:
            return None, k
        if not takes:
            out.append(opt)
            continue
        attached = tok[pos + 1:].removeprefix("=")
        if attached:
            return out + [opt, attached], k + 1
        toks, nxt = value_of(opt)
        return out + toks, nxt
    return out, k + 1


def _leaf_option_names(rest: list[str]) -> set[str]:
    entry = REGISTRY.get(rest[0])
    if entry is None:
        return set()
    try:
        cmd = LazyGroup().get_command(None, rest[0])
    except Exception:
        return set()
    for tok in rest[1:]:
        sub = getattr(cmd, "commands", None)
        if not sub or tok.startswith("-") or tok not in sub:
            break
        cmd = sub[tok]
    names: set[str] = set()
    for p in getattr(cmd, "params", []):
        names.update(getattr(p, "opts", []))
        names.update(getattr(p, "secondary_opts", []))
    return names


def expand_dry_run(args: list[str]) -> list[str]:
    """kubectl's ``--dry-run=client|server|none`` on top of katactl's ``--dry-run`` flag:
    =client is the flag, =server adds the hidden ``--dry-run-server`` of the commands
    that can ask the API server to validate without storing (Typer has no options
    with an optional value); other commands refuse =server with a clear message."""
    if not any(a.startswith("--dry-run=") for a in args):
        return args
    out: list[str] = []
    for i, a in enumerate(args):
        if a == "--":
            return out + args[i:]
        if a.startswith("--dry-run="):
            mode = a.split("=", 1)[1]
            if mode not in ("client", "server", "none"):
                raise UsageError(f"invalid --dry-run value {mode!r}: client, server or none")
            if mode == "server" and "--dry-run-server" not in _leaf_option_names(
                    args[next((j for j, x in enumerate(args) if x in REGISTRY), len(args)):]):
                raise UsageError("--dry-run=server is for commands that change Kubernetes objects "
                                 "(node cordon, uncordon, drain); use --dry-run here")
            out += {"client": ["--dry-run"], "server": ["--dry-run", "--dry-run-server"], "none": []}[mode]
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, map every failure to one line + exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    completing = any(k.startswith("_KATACTL_COMPLETE") for k in os.environ)
    if completing:
        # Each TAB press runs us again: keep this path as light as --help.
        from typer._completion_classes import completion_init

        completion_init()
        _built(app).main(args=args, prog_name="katactl")
        return
    from katactl.interrupt import terminate_as_interrupt

    try:
        # SIGTERM (Ansible's timeout, timeout(1), systemd) and SIGHUP (a dropped session) take
        # Ctrl-C's path in every command, from here (and one that came while the CLI was
        # imported) until the command completed: its cleanup (a node lock, a temp file, node
        # pods), its audit record and exit 130 with the JSON error, not Python ending where it
        # stands. After that, to the process's exit, they leave the command's outcome alone.
        try:
            with terminate_as_interrupt(keep=argv is None):
                if argv is None:  # a real process, not a test calling main() in-process
                    sys.stdout = _Stdout(sys.stdout)
                _run(args)
        except KeyboardInterrupt:  # before _run reports its own
            sys.exit(_report(Interrupted("interrupted"), _sniff_output(args), False))
    except SystemExit as done:
        if argv is None:
            _exit_without_abandoned_threads(done)
        raise


class OutputError(KatactlError):
    """Our own stdout cannot be written (closed, a full disk): exit 1, one line."""

    code = "OutputError"


class _Stdout:
    """The real process's sys.stdout: a write that fails (``>&-``, ``> /dev/full``)
    is an OutputError naming standard output, not a traceback or an error object
    about None. A reader that went away (EPIPE) stays a BrokenPipeError: main's
    quiet exit for ``katactl ... | head -1``."""

    def __init__(self, stream):
        self._stream = stream  # None when fd 1 was closed before Python started

    def _fail(self, e: OSError | None):
        _discard_stdout()
        why = "it is closed" if e is None else (e.strerror or str(e))
        raise OutputError(f"cannot write to standard output: {why}") from None

    def write(self, s):
        if self._stream is None:
            self._fail(None)
        try:
            return self._stream.write(s)
        except BrokenPipeError:
            raise
        except OSError as e:
            self._fail(e)

    def flush(self):
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            self._fail(e)

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def fileno(self) -> int:
        if self._stream is None:
            import errno

            raise OSError(errno.EBADF, "standard output is closed")
        return self._stream.fileno()

    def __getattr__(self, name):
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def _discard_stdout() -> None:
    """Point fd 1 at /dev/null so what is still buffered can be flushed (and dropped)
    at exit instead of failing a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _exit_without_abandoned_threads(done: SystemExit) -> None:
    """Exit now even when a worker thread is still blocked (a scrape stuck on a shim
    that Ctrl-C abandoned): the interpreter would otherwise join it at exit, and
    only a second Ctrl-C would end katactl. Nothing is lost: the command is over,
    its output is flushed here, and whatever the worker held closes with the process."""
    import threading

    if not any(t.is_alive() and not t.daemon for t in threading.enumerate()
               if t is not threading.main_thread()):
        return
    if "katactl.nodeagent" in sys.modules:  # os._exit skips atexit: node pods an interrupt left get their retry
        sys.modules["katactl.nodeagent"]._atexit()
    code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            code = code or ExitCode.FAILED
    os._exit(code)


def _run(args: list[str]) -> None:
    command = _built(app)
    global _output_format, _help_only, _verbose, _pods_left
    _output_format, _verbose, _pods_left = None, 0, None
    head = args[:args.index("--")] if "--" in args else args
    _help_only = any(a in ("-h", "--help") for a in head)
    verbose = any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in args)
    try:
        args = hoist_global_options(expand_dry_run(args))
        try:
            rc = command.main(args=args, prog_name="katactl", standalone_mode=False)
        finally:
            # its result printed and audited, or its error about to be: no longer interruptible
            from katactl.interrupt import complete

            complete()
            if "katactl.fleet" in sys.modules:  # this run's format, not the next in-process caller's
                sys.modules["katactl.fleet"].configure(list_errors=False)
        if rc == ExitCode.INTERRUPTED:
            # Typer turns Ctrl-C into Exit(130) before it reaches us: still one line
            # (and the JSON error object), like every other failure.
            raise KeyboardInterrupt
        rc = rc if isinstance(rc, int) else 0
        if rc == ExitCode.OK and _pods_left is not None:
            left, fan_out = _pods_left
            names = ", ".join(f"{p.namespace}/{p.name}" for p, _ in left)
            print(f"katactl: error: {len(left)} ephemeral node pod(s) could not be deleted: {names}",
                  file=sys.stderr)
            rc = int(ExitCode.PARTIAL if fan_out else ExitCode.FAILED)
        sys.exit(rc)
    except SystemExit:
        raise
    except BrokenPipeError as exc:
        if not _stdout_closed():  # a socket's peer, not our reader: a real error
            sys.exit(_report(exc, _error_format(args), verbose or bool(_verbose)))
        _quiet_exit_on_closed_stdout()
    except KeyboardInterrupt:
        sys.exit(_report(Interrupted("interrupted"), _error_format(args), False))
    except BaseException as exc:  # noqa: BLE001 - the one place that turns errors into exits
        try:
            sys.exit(_report(exc, _error_format(args), verbose or bool(_verbose)))
        except BrokenPipeError:
            _quiet_exit_on_closed_stdout()


def _error_format(args: list[str]) -> str | None:
    return _output_format if _output_format is not None else _sniff_output(args)


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader went away (`katactl ... | head -1`)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # in-process runners: a StringIO
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _quiet_exit_on_closed_stdout() -> None:
    """The reader of our stdout is gone: that is its choice, not our error. Point
    stdout at /dev/null so the interpreter's final flush does not fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(ExitCode.FAILED)


def _report(exc: BaseException, fmt: str | None, verbose: bool) -> int:
    from typer import exceptions as typer_exc
    from typer._click import exceptions as click_exc

    if isinstance(exc, typer_exc.Abort):
        print("aborted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    if isinstance(exc, typer_exc.Exit):
        return exc.exit_code
    if isinstance(exc, click_exc.NoArgsIsHelpError):
        # bare "katactl" or "katactl GROUP": help is the answer, not an error
        print(exc.format_message())
        return ExitCode.OK
    if isinstance(exc, click_exc.ClickException):
        msg = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        exc = UsageError(msg.rstrip(".") + where) if isinstance(exc, click_exc.UsageError) else UsageError(msg)
    if isinstance(exc, OSError) and not isinstance(exc, KatactlError):
        from katactl.errors import as_katactl_error

        if verbose:
            import traceback

            traceback.print_exception(exc)
        exc = as_katactl_error(exc)  # a local file or socket failed: expected, not a bug
    if isinstance(exc, KatactlError):
        err = exc
    else:
        if verbose:
            import traceback

            traceback.print_exception(exc)
        err = KatactlError(f"unexpected {type(exc).__name__}: {exc}"
                           + ("" if verbose else " (re-run with -v for the traceback)"))
    if fmt in ("json", "jsonl", "yaml") and not isinstance(err, OutputError):
        from katactl.output import error_object, to_json, to_yaml

        obj = error_object(err.to_dict())
        try:  # -o yaml is the same data (docs/output.md): its Error object too
            print(to_yaml(obj) if fmt == "yaml" else to_json(obj, indent=None if fmt == "jsonl" else 2),
                  end="" if fmt == "yaml" else "\n", flush=True)
        except (OSError, KatactlError):  # stdout closed, full, or its reader gone: stderr still says it
            _discard_stdout()
    print(f"katactl: error: {_one_line(err.message)}", file=sys.stderr)
    if err.hint:
        print(f"hint: {_one_line(err.hint)}", file=sys.stderr)
    return exit_code_for(err)


def _one_line(text: str) -> str:
    """Errors are one line, free of terminal escapes, even when a peer's answer or an
    echoed value holds newlines or control characters."""
    from katactl.output import printable

    return printable(str(text))


def _sniff_output(args: list[str]) -> str | None:
    """-o from argv, else KATACTL_OUTPUT, else the config file's, when the settings never
    resolved (a bad flag, a config value refused): `output = "json"` there must still give
    Ansible the JSON error object."""
    given = _last_root_option(args, ("-o", "--output"))
    if given is not None:
        return given
    if "KATACTL_OUTPUT" in os.environ:
        return os.environ["KATACTL_OUTPUT"]
    return _config_file_output(args)


def _last_root_option(args: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of the root options ``names`` in args, in every spelling the
    root reads (``-o json``, ``-ojson``, ``-o=json``, ``-qojson``, ``--output[=]json``), before
    any ``--``: Click keeps the last one given, so an error reported before the settings
    resolved must follow that one too (a wrapper's ``katactl -o wide "$@"`` given ``-o json``)."""
    opts = _global_opts()
    found = None
    i = 0
    while i < len(args) and args[i] != "--":
        try:
            toks, nxt = _take_global(args, i, opts, set())
        except UsageError:  # the last option lacks its value: nothing more to read
            break
        if toks is None:
            i += 1
            continue
        k = 0
        while k < len(toks):
            opt, eq, value = toks[k].partition("=")
            if eq:  # --output=json (a short option's '=' value came back split)
                k += 1
            elif opts.get(opt):
                value, k = toks[k + 1], k + 2
            else:
                k += 1
                continue
            if opt in names:
                found = value
        i = nxt
    return found


def _config_file_output(args: list[str]) -> str | None:
    """`output` of the config file (its active profile's first), best effort: the file
    may be the very thing that failed, and then there is no format to honour."""
    try:
        from katactl import config

        data = config.load_file(config.config_path())
        profile = _last_root_option(args, ("--profile",)) or os.environ.get("KATACTL_PROFILE") or data.get("profile")
        table = data.get("profiles", {}).get(profile, {}) if isinstance(profile, str) else {}
        value = table.get("output", data.get("output")) if isinstance(table, dict) else data.get("output")
        return value if isinstance(value, str) else None
    except Exception:  # noqa: BLE001 - only a guess at the format of an error being reported
        return None
