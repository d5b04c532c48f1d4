"""Settings: flags > KATACTL_* environment > config file > built-in defaults.

The config file is TOML at $XDG_CONFIG_HOME/katactl/config.toml (or
$KATACTL_CONFIG). Top-level keys are defaults; ``[profiles.NAME]`` tables
override them when that profile is active (``--profile``/KATACTL_PROFILE or
``profile = "NAME"`` at the top of the file). Node groups live in
``[node_groups]`` or ``[profiles.NAME.node_groups]`` and are selected with
``-N @group``. Every effective value remembers where it came from, which is
what ``katactl config view`` shows.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Mapping

from katactl.errors import UsageError
from katactl.values import parse_duration


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    kind: type
    help: str


# name -> (default, type, help). The CLI flag is --name with '_' -> '-'.
SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("output", None, str, "output format (table|wide|json|yaml|name|jsonl)"),
    Setting("nodes", (), tuple, "nodes to act on (names, or @group from the config)"),
    Setting("nodes_from", None, str, "file with one node name per line"),
    Setting("selector", None, str, "Kubernetes label selector choosing nodes"),
    Setting("host_root", "", str, "directory where the node's root filesystem is mounted"),
    Setting("context", None, str, "kubeconfig context"),
    Setting("kubeconfig", None, str, "kubeconfig file"),
    Setting("namespace", None, str, "Kubernetes namespace"),
    Setting("via", "ssh", str, "how named nodes are reached: ssh, or kube (pods/exec into a node pod)"),
    Setting("agent_namespace", "kube-system", str, "namespace of katactl's node pods (--via kube)"),
    Setting("agent_image", None, str, "image with python3 for ephemeral node pods (--via kube)"),
    Setting("ssh_user", None, str, "SSH user for remote nodes"),
    Setting("ssh_config", "~/.ssh/config", str, "OpenSSH client config file"),
    Setting("identity", None, str, "SSH private key file"),
    Setting("jump_host", None, str, "SSH jump host (ProxyJump syntax)"),
    Setting("ssh_accept_new", False, bool, "accept unknown SSH host keys (never changed ones)"),
    Setting("known_hosts", None, str, "extra known_hosts file"),
    Setting("request_timeout", 30.0, float, "bound on each connect, request and call (SSH, shim, hypervisor, Kubernetes API), seconds"),
    Setting("parallel", 32, int, "how many nodes to work on at once"),
    Setting("verbose", 0, int, "verbosity"),
    Setting("quiet", False, bool, "suppress informational messages"),
    Setting("no_color", False, bool, "disable colour"),
    Setting("yes", False, bool, "assume yes for confirmations"),
    Setting("audit_log", None, str, "audit log file (JSON lines): an absolute path, ~ allowed"),
    Setting("runtime_class_overhead", None, str, "declared Pod overhead for katactl overhead without a Kubernetes API (cpu=250m,memory=160Mi)"),
    Setting("no_audit", False, bool, "change without an audit record (else an unwritable log refuses the change)"),
]}


# Settings renamed in a release: old name -> new name (for a helpful error only).
RENAMED = {"timeout": "request_timeout"}

#: KATACTL_* variables that are not settings: read before the settings (the file, its
#: profile), by one command (lab, upgrade's --kata-root, rollout's shard size), or by the
#: test suite and CI (fault injection, clocks, caches; bench scripts run katactl under them)
OTHER_VARIABLES = frozenset({
    "KATACTL_CONFIG", "KATACTL_PROFILE", "KATACTL_LAB_ROOT", "KATACTL_KATA_ROOT",
    "KATACTL_ROLLOUT_SHARD_BYTES", "KATACTL_FAULT", "KATACTL_FAULT_SIGNAL", "KATACTL_REQUIRE_TOOLS",
    "KATACTL_STANDIN_EXEC",
})
#: test hooks: KATACTL_TEST_KILL_AT, KATACTL_TEST_CACHE, KATACTL_TEST_CLOCK_STEP_FILE, ...
TEST_PREFIX = "KATACTL_TEST_"


def variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return "KATACTL_" + name.upper()


def _unknown_variables(environment: Mapping[str, str]) -> tuple[str, ...]:
    """KATACTL_* variables katactl does not read. One that looks like a setting's (a typo,
    another case, the flag's singular: KATACTL_NODE for --node) is refused, since it would
    otherwise be ignored and the command act on this host, where the same key in the config
    file is refused. Others (a CI system's own KATACTL_VERSION) are returned, to be warned
    about: refusing them would stop even 'lab down' in that environment."""
    known = {variable(n) for n in SETTINGS} | OTHER_VARIABLES
    ignored = []
    for var in sorted(environment):
        if var.startswith("KATACTL_") and var not in known and not var.startswith(TEST_PREFIX):
            import difflib  # only on this path: every run passes here

            # matched without the shared prefix, which alone would make every name close
            names = sorted(k[8:] for k in known)
            close = difflib.get_close_matches(var[8:].upper(), names, n=1, cutoff=0.75)
            if not close:
                ignored.append(var)
                continue
            raise UsageError(f"unknown environment variable {var} (did you mean KATACTL_{close[0]}?): "
                             "refused rather than ignored (unset or rename it)",
                             hint="each setting's variable is KATACTL_<SETTING> in capitals (-N/--node is "
                                  "KATACTL_NODES); docs/configuration.md lists them")
    return tuple(ignored)


def _renamed_hint(names) -> str | None:
    """The new name of a renamed key, else the closest setting (node: nodes, as -N's flag)."""
    import difflib

    hints = []
    for n in sorted(names):
        close = difflib.get_close_matches(n, sorted(SETTINGS), n=1) if n not in RENAMED else []
        hints += [f"{n} is now {RENAMED[n]}"] if n in RENAMED else [f"{n}: did you mean {close[0]}?"] if close else []
    return "; ".join(hints) or None


def config_path() -> str:
    explicit = os.environ.get("KATACTL_CONFIG")
    if explicit is not None:
        if not explicit.strip():
            # KATACTL_CONFIG="$CFG" with CFG unset must not quietly mean the default file
            raise UsageError("KATACTL_CONFIG is set but empty (unset it, or give a file)")
        return explicit
    return os.path.join(xdg_dir("XDG_CONFIG_HOME", "~/.config"), "katactl", "config.toml")


def state_dir() -> str:
    return os.path.join(xdg_dir("XDG_STATE_HOME", "~/.local/state"), "katactl")


def xdg_dir(variable: str, default: str) -> str:
    """$variable, or ``default`` when it is unset, empty or relative: the XDG Base Directory
    spec says a relative path there "should be considered invalid and ignored", and one
    relative to the current directory would split the audit trail (and the config) per cwd."""
    base = os.environ.get(variable) or ""
    return base if os.path.isabs(base) else os.path.expanduser(default)


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = SETTINGS[name].kind
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, (bool, float)):
                raise ValueError  # parallel = 1.5 is a typo, not 1
            v = int(value)
            if v < (0 if name == "verbose" else 1):
                raise ValueError
            return v
        if kind is float:  # durations; a TOML number is seconds, with the same limits
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (int, float)):
                if not math.isfinite(value) or value <= 0:
                    raise ValueError
                return parse_duration(repr(float(value)), what=name)
            return parse_duration(str(value), what=name)
        if kind is tuple:
            if isinstance(value, str):
                names = tuple(x.strip() for x in value.split(",") if x.strip())
                if not names and source.startswith("KATACTL_"):
                    # KATACTL_NODES=, (or "$LIST" with LIST unset) must not mean "this host"
                    raise UsageError(f"{source}={value!r} names no node (unset it, or give names)")
                if not names and source != "flag":  # the config file: a template rendered empty
                    raise UsageError(f"{source}: {name} = {value!r} names no node "
                                     "(remove the key to act on this host, or give names)")
                return names
            if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
                if not any(x.strip() for v in value for x in v.split(",")):
                    if source == "flag":
                        # -N "$NODE" with NODE unset must not mean "this host"
                        raise UsageError(f"--{name.rstrip('s')} needs a name, got an empty string")
                    raise UsageError(f"{source}: {name} = {list(value)!r} names no node "
                                     "(remove the key to act on this host, or give names)")
                return tuple(value)
            raise ValueError
        if source.startswith("KATACTL_") and not value.strip():
            # KATACTL_HOST_ROOT="$ROOT" with ROOT unset must not mean "this host",
            # no more than the empty flag does
            raise UsageError(f"{source} is set but empty (unset it, or give a value)")
        if not isinstance(value, str):
            raise ValueError
        if not value.strip():
            if source == "flag":
                # --host-root "$ROOT" with ROOT unset must not mean "this host"
                raise UsageError(f"--{name.replace('_', '-')} needs a value, got an empty string")
            # the config file is one more layer of the same settings (selector = "" from a
            # template must not mean "no selection", i.e. this host)
            raise UsageError(f"{source}: {name} is empty (remove the key, or give a value)")
        if name == "audit_log" and not os.path.isabs(os.path.expanduser(value)):
            # relative to the current directory, each runbook's cd would start another trail
            raise UsageError(f"audit_log {value!r} (from {source}) is a relative path: give an absolute "
                             "one (~ allowed), or the audit trail splits by working directory")
        if name == "ssh_user":
            from katactl.backends.sshconfig import valid_ruser

            if not valid_ruser(value):  # it reaches a ProxyCommand's %r, as ssh -l's does
                raise UsageError(f"invalid SSH user {value!r} (from {source}): it contains characters "
                                 "ssh refuses in a user name (quotes, ;&<>|(){}`, control characters, "
                                 "a leading or space-led '-', a trailing backslash)")
        return value
    except (ValueError, TypeError):
        raise UsageError(f"invalid value {value!r} for {name} (from {source})") from None


@dataclasses.dataclass
class Settings:
    values: dict[str, Any]
    sources: dict[str, str]
    profile: str | None
    node_groups: dict[str, tuple[str, ...]]
    #: group -> where it was defined (the file, or the file's active profile)
    node_group_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    #: KATACTL_* variables set but not katactl's (warned about, not refused)
    ignored_variables: tuple[str, ...] = ()
    #: the config file read (config_path()), and whether it exists: the default one may not
    config_file: str = ""
    config_file_exists: bool = False

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def view(self) -> list[dict]:
        return [{"name": n, "value": self.values[n], "source": self.sources[n]} for n in SETTINGS]

    def group_view(self) -> list[dict]:
        """One row per node group (``node_groups.NAME``), as view()'s rows."""
        return [{"name": f"node_groups.{g}", "value": list(m), "source": self.node_group_sources.get(g, "-")}
                for g, m in self.node_groups.items()]


#: the most katactl reads of an operator's input file (config, --nodes-from, a policy):
#: real ones are KiBs; /dev/zero or a wrong path must not exhaust memory
INPUT_LIMIT = 1 << 20


def read_input(path: str, what: str, limit: int = INPUT_LIMIT) -> bytes:
    """The bytes of an operator's input file (``-``: standard input), at most ``limit``
    of them: a larger file (or an endless one, /dev/zero) is a UsageError naming it
    and the cap, never a silently cut one. OSError is the caller's to word."""
    if path == "-":
        stdin = sys.stdin
        raw = getattr(stdin, "buffer", None)  # text-only when a caller replaced sys.stdin
        data = raw.read(limit + 1) if raw is not None else stdin.read(limit + 1).encode()
    else:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise too_large(path, what, limit)
    return data


def too_large(path: str, what: str, limit: int = INPUT_LIMIT) -> UsageError:
    return UsageError(f"{what} {path}: more than {limit >> 20} MiB, the limit for this file "
                      f"(is it the right file?)")


def load_file(path: str, *, explicit: bool = False) -> dict:
    """The config file's settings; ``{}`` when the default file does not exist (read_file)."""
    return read_file(path, explicit=explicit) or {}


def read_file(path: str, *, explicit: bool = False) -> dict | None:
    """The config file's settings; None when the default file does not exist. A file
    named explicitly (KATACTL_CONFIG) must exist, as kubectl's --kubeconfig must: a typo
    would otherwise run with every setting at its default (other SSH user, timeouts)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(read_input(path, "config file").decode("utf-8"))
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} (KATACTL_CONFIG) does not exist") from None
        return None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: invalid TOML: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read config: {e.strerror}") from None


def resolve(flags: dict[str, Any], environ: Mapping[str, str] | None = None,
            profile: str | None = None) -> Settings:
    """Merge the four layers. ``flags`` holds only options the user gave."""
    environment: Mapping[str, str] = os.environ if environ is None else environ
    path = config_path()
    found = read_file(path, explicit="KATACTL_CONFIG" in os.environ)
    data = found if found is not None else {}
    unknown = set(data) - set(SETTINGS) - {"profile", "profiles", "node_groups"}
    if unknown:
        raise UsageError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}", hint=_renamed_hint(unknown))
    if profile is not None and not profile.strip():
        raise UsageError("--profile needs a value, got an empty string")
    if "KATACTL_PROFILE" in environment and not environment["KATACTL_PROFILE"].strip():
        raise UsageError("KATACTL_PROFILE is set but empty (unset it, or give a value)")
    if "profile" in data and not (isinstance(data["profile"], str) and data["profile"].strip()):
        raise UsageError(f"{path}: profile must be a profile name (a string), not {data['profile']!r}")
    profile = profile or environment.get("KATACTL_PROFILE") or data.get("profile")
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise UsageError(f"{path}: [profiles] must be a table")
    for pname, ptable in profiles.items():
        if not isinstance(ptable, dict):
            raise UsageError(f"{path}: profiles.{pname} must be a table ([profiles.{pname}]), "
                             f"not {type(ptable).__name__}")
    pdata: dict = {}
    if profile:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none defined"
            raise UsageError(f"unknown profile {profile!r} ({known})")
        pdata = profiles[profile]
        bad = set(pdata) - set(SETTINGS) - {"node_groups"}
        if bad:
            raise UsageError(f"{path}: profile {profile!r}: unknown setting(s): {', '.join(sorted(bad))}",
                             hint=_renamed_hint(bad))

    for old, new in RENAMED.items():
        # a runbook's old variable silently doing nothing would be worse than stopping
        if "KATACTL_" + old.upper() in environment:
            raise UsageError(f"KATACTL_{old.upper()} was renamed to KATACTL_{new.upper()}")
    ignored = _unknown_variables(environment)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, s in SETTINGS.items():
        env = variable(name)
        if name in flags:
            values[name], sources[name] = _coerce(name, flags[name], "flag"), "flag"
        elif env in environment:
            values[name], sources[name] = _coerce(name, environment[env], env), f"env {env}"
        elif name in pdata:
            where = f"{path} [profiles.{profile}]"
            values[name], sources[name] = _coerce(name, pdata[name], where), where
        elif name in data:
            values[name], sources[name] = _coerce(name, data[name], path), path
        else:
            values[name], sources[name] = s.default, "default"
    groups: dict[str, tuple[str, ...]] = {}
    group_sources: dict[str, str] = {}
    for src, where in ((data.get("node_groups", {}), path),
                       (pdata.get("node_groups", {}), f"{path} [profiles.{profile}]")):
        if not isinstance(src, dict):
            raise UsageError(f"{path}: node_groups must be a table of name = [nodes]")
        for g, members in src.items():
            if not (isinstance(members, list) and all(isinstance(m, str) for m in members)):
                raise UsageError(f"{path}: node group {g!r} must be a list of node names")
            groups[g] = tuple(members)
            group_sources[g] = where
    return Settings(values, sources, profile, groups, group_sources, ignored, path, found is not None)
