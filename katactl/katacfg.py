"""The Kata configuration a runtime really uses, found and merged as the runtime does.

Which file (upstream, checked against kata-containers main and 3.x/4.x):

- Go shim (``src/runtime/pkg/containerd-shim-v2/create.go`` ``loadRuntimeConfig``): the
  sandbox annotation ``io.katacontainers.config_path``, else the ``ConfigPath`` containerd
  passes in the runtime handler's options, else the shim's ``KATA_CONF_FILE``
  environment variable, else ``katautils.GetDefaultConfigFilePaths()``:
  ``/etc/kata-containers/configuration.toml`` then ``<PREFIX>/share/defaults/
  kata-containers/configuration.toml`` for the one PREFIX the build was made with
  (``src/runtime/Makefile``: ``/usr`` by default, the shim then in ``/usr/local/bin``;
  kata-deploy builds with ``/opt/kata``). Never both prefixes.
- runtime-rs (``src/runtime-rs/crates/runtimes/src/manager.rs`` ``load_config``):
  ``KATA_CONF_FILE``, else the handler's ``ConfigPath``, else kata-types'
  ``DEFAULT_RUNTIME_CONFIGURATIONS`` (``src/libs/kata-types/src/config/default.rs``),
  which really lists ``/etc``, ``/usr/share/defaults`` and ``/opt/kata/share/defaults``
  (``kata-containers/runtime-rs/configuration.toml`` under each), in that order. The
  annotation never chooses its file (it only feeds per-key overrides,
  ``update_config_by_annotation``); releases before that function's 2026 rewrite read it
  first, as Go does: katactl follows the current one.
- kata-deploy (``tools/packaging/kata-deploy/binary/src/runtime/containerd.rs``) writes,
  per shim, ``[plugins.<cri>.containerd.runtimes.kata-<shim>]`` with ``runtime_type =
  "io.containerd.kata-<shim>.v2"``, ``runtime_path`` (``/opt/kata/bin/containerd-shim-kata-v2``,
  runtime-rs ``/opt/kata/runtime-rs/bin/...``) and ``options.ConfigPath`` =
  ``/opt/kata/share/defaults/kata-containers[/runtime-rs]/runtimes/<shim>/configuration-<shim>.toml``
  (a *copy*, so that its own ``config.d`` applies: ``artifacts/install.rs``
  ``setup_runtime_directory``), into ``/opt/kata/containerd/config.d/kata-deploy.toml``,
  which it appends to ``imports`` of containerd's ``config.toml``. ``<cri>`` is
  ``"io.containerd.cri.v1.runtime"`` in config version 3 (containerd 2.x),
  ``"io.containerd.grpc.v1.cri"`` in version 2, ``cri`` in version 1.

Drop-ins: the chosen file is resolved through symlinks (Go ``ResolvePath``, RS
``fs::canonicalize``) and every entry of ``<its dir>/config.d/`` is applied in byte order of
the names, tables merged key by key. An entry that is not a file is an error in both, and
the runtime refuses to start the sandbox: Go ``katautils.decodeDropIns`` reads each entry
with ``os.ReadFile`` (``error reading file "<p>": read <p>: is a directory``; a symlink to
a file is followed); runtime-rs ``kata-types/src/config/drop_in.rs`` checks
``DirEntry::file_type().is_file()``, which does not follow symlinks, so it refuses a
directory *and* a symlinked drop-in ("drop-in cfg file can only be a regular file or a
symlink").

Everything goes through a NodeTransport (node paths), so --host-root and SSH work
unchanged. Small and dependency-free on purpose: vmcore, upgrade and sandbox use it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import posixpath
import sys
from typing import Any, Iterable, Sequence

from katactl.errors import KatactlError, NotFound, OperationFailed, UsageError
from katactl.backends.base import NodeTransport

GO_SYSCONF = "/etc/kata-containers/configuration.toml"
DEFAULTS_SUBPATH = "share/defaults/kata-containers/configuration.toml"
#: src/runtime/Makefile: PREFIX when none is given (its shim then lives in /usr/local/bin)
DEFAULT_PREFIX = "/usr"
#: kata-static's (kata-deploy's) build PREFIX
KATA_STATIC_PREFIX = "/opt/kata"
#: kata-types default.rs DEFAULT_RUNTIME_CONFIGURATIONS (runtime-rs searches all three)
RS_SEARCH = (
    "/etc/kata-containers/runtime-rs/configuration.toml",
    "/usr/share/defaults/kata-containers/runtime-rs/configuration.toml",
    "/opt/kata/share/defaults/kata-containers/runtime-rs/configuration.toml",
)
SHIM_BINARY = "containerd-shim-kata-v2"
#: where containerd finds a shim binary by name (its PATH on common distros), then kata-deploy's
BINARY_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
SHIM_LOCATIONS = tuple(f"{d}/{SHIM_BINARY}" for d in BINARY_DIRS) + (f"/opt/kata/bin/{SHIM_BINARY}",)
CONFIG_PATH_ANNOTATION = "io.katacontainers.config_path"
HYPERVISORS = ("qemu", "clh", "cloud-hypervisor", "fc", "firecracker", "dragonball", "stratovirt",
               "remote")
#: a hypervisor table's name -> katactl's short name (Sandbox.hypervisor)
HV_SHORT = {"cloud-hypervisor": "clh", "cloud_hypervisor": "clh", "ch": "clh", "firecracker": "fc"}
MAX_DROPIN = 4 << 20
#: where the choice of file came from (KataConfig.origin)
ORIGINS = ("explicit", "annotation", "containerd", "KATA_CONF_FILE", "etc", "build-default")


@dataclasses.dataclass
class KataConfig:
    """The merged configuration and where it came from."""

    path: str                 # the file found by the search (node path)
    resolved: str             # after symlinks
    dropins: list[str]        # applied, in order
    data: dict[str, Any]      # merged TOML
    runtime: str              # "go" | "rs"
    #: dotted key -> the file that set it last (the base file or a drop-in)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    #: why this file: one of ORIGINS, and the detail (which handler, which env, which prefix)
    origin: str = "explicit"
    origin_detail: str | None = None

    def source(self, dotted: str) -> str:
        """The file that set ``dotted`` (for messages about a bad value)."""
        return self.sources.get(dotted, self.resolved)

    def typed(self, dotted: str, kind: str, default: Any = None) -> Any:
        """``get(dotted)`` checked against the type the runtime decodes it into:
        ``"str"``, ``"bool"`` or ``"mib"`` (a whole number > 0; TOML integer). A value of
        another type is exit 1 naming the file and the key, as the runtime refuses it."""
        v = self.get(dotted, None)
        if v is None:
            return default
        ok = {"str": isinstance(v, str), "bool": isinstance(v, bool),
              "mib": isinstance(v, int) and not isinstance(v, bool) and 0 < v < (1 << 32)}[kind]
        if not ok:
            want = {"str": "a string", "bool": "true or false",
                    "mib": "a whole number of MiB (1..4294967295)"}[kind]
            section, _, key = dotted.rpartition(".")
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise OperationFailed(f"{self.source(dotted)}: [{section}] {key} = {shown}: expected {want}")
        return v

    @property
    def hypervisor_name(self) -> str | None:
        hv = self.data.get("hypervisor")
        if isinstance(hv, dict):
            for name in hv:
                if isinstance(hv[name], dict):
                    return name
        return None

    @property
    def hypervisor(self) -> dict[str, Any]:
        """The first (in practice the only) ``[hypervisor.<name>]`` table."""
        name = self.hypervisor_name
        return dict(self.data["hypervisor"][name]) if name else {}

    def get(self, dotted: str, default: Any = None) -> Any:
        cur: Any = self.data
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur

    def to_dict(self) -> dict:
        return {"path": self.path, "resolved": self.resolved, "dropins": list(self.dropins),
                "runtime": self.runtime, "hypervisor": self.hypervisor_name,
                "origin": self.origin, "originDetail": self.origin_detail}


def build_prefix(binary: str | None) -> str | None:
    """The PREFIX a shim binary (symlinks resolved) was built with: ``<PREFIX>/bin/...``,
    and ``/usr/local/bin`` for the Makefile's default PREFIX ``/usr``; None otherwise.
    A release of katactl's A/B layout (``<kata-root>/releases/<v>/bin``) is a kata-static
    tarball, built with PREFIX ``/opt/kata`` wherever it is unpacked: the defaults path is
    compiled in (DEFAULTSDIR), so that shim searches ``/opt/kata/share/defaults``."""
    if not binary:
        return None
    bindir = posixpath.dirname(posixpath.normpath(binary))
    if posixpath.basename(bindir) != "bin":
        return None
    prefix = posixpath.dirname(bindir) or "/"
    if posixpath.basename(posixpath.dirname(prefix)) == "releases":
        return KATA_STATIC_PREFIX
    return DEFAULT_PREFIX if prefix == "/usr/local" else prefix


def search_paths(runtime: str = "go", prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """The files a runtime tries when nothing names one (Go: for the build's PREFIX)."""
    if runtime == "go":
        return (GO_SYSCONF, f"{prefix.rstrip('/')}/{DEFAULTS_SUBPATH}")
    if runtime == "rs":
        return RS_SEARCH
    raise UsageError(f"invalid runtime {runtime!r} (choose go or rs)")


def node_prefix(transport: NodeTransport) -> tuple[str, str | None]:
    """(PREFIX, the shim binary it was read from) for a node-wide answer without a sandbox:
    the first Go shim found where containerd would look (PATH, then kata-deploy's
    /opt/kata/bin), symlinks resolved; the Makefile's default without one."""
    found = exists_many(transport, SHIM_LOCATIONS)
    for b in SHIM_LOCATIONS:
        if found[b]:
            try:
                p = build_prefix(realpath(transport, b))
            except OperationFailed:
                continue
            if p:
                return p, b
    return DEFAULT_PREFIX, None


def _origin_of_default(path: str) -> str:
    return "etc" if path.startswith("/etc/") else "build-default"


def realpath(transport: NodeTransport, path: str, max_links: int = 40) -> str:
    """Resolve symlinks in a node path through the transport (like EvalSymlinks)."""
    return _resolve(transport, path, max_links)[0]


def rooted_escape(transport: NodeTransport, path: str) -> tuple[str, str, str] | None:
    """(link, its target, the path resolved inside the node) when a transport that maps node
    paths under a directory (--host-root over SSH, --via kube's /host) would leave the node's
    tree on the way to path: that machine's kernel follows an absolute symlink (/opt/kata ->
    /data/kata) or a ``..`` above the node's / from *its* root. None when the path stays inside,
    the transport has no root (the node's own kernel resolves it), or resolves inside its root
    itself (the local one: NodeTransport.resolves_in_root)."""
    if getattr(transport, "host_root", "") in ("", "/") or transport.resolves_in_root:
        return None  # "/" is the machine's own resolution
    leaving: list[tuple[str, str]] = []
    real, _ = _resolve(transport, path, leaving=leaving)
    return (*leaving[0], real) if leaving else None


def _resolve(transport: NodeTransport, path: str, max_links: int = 40,
             leaving: list[tuple[str, str]] | None = None) -> tuple[str, bool]:
    """(the path with symlinks resolved, whether it exists). The components up to the
    next ``.``/``..`` are lstat'ed in one ``stat_many`` call (one pipelined SFTP round
    trip over SSH for the whole path, not one per component: a node's configuration
    lookup resolves some 30 paths), then walked in order. ``leaving`` collects the links
    whose target is absolute or climbs above / (see rooted_escape)."""
    parts = [p for p in path.split("/") if p]
    out = "/"
    links = 0
    via: str | None = None  # the link whose target is being walked (for a ``..`` above /)
    while parts:
        if parts[0] == ".":
            parts.pop(0)
            continue
        if parts[0] == "..":
            parts.pop(0)
            if out == "/" and via is not None and leaving is not None:
                leaving.append((via, transport.readlink(via)))
            out = posixpath.dirname(out) or "/"
            continue
        run: list[str] = []
        for part in parts:
            if part in (".", ".."):
                break
            run.append(posixpath.join(run[-1] if run else out, part))
        stats = transport.stat_many(run, follow_symlinks=False)
        for cand in run:
            parts.pop(0)
            st = stats.get(cand)
            if isinstance(st, (FileNotFoundError, NotADirectoryError, PermissionError)):
                return posixpath.normpath(posixpath.join(cand, *parts)), False
            if isinstance(st, OSError):
                raise st
            if st is None:
                raise OperationFailed(f"{cand}: no answer from the node's stat")
            if st.is_link:
                links += 1
                if links > max_links:
                    raise OperationFailed(f"{path}: too many levels of symbolic links")
                target = transport.readlink(cand)
                via = cand
                if target.startswith("/"):
                    out = "/"
                    if leaving is not None:
                        leaving.append((cand, target))
                parts[:0] = [p for p in target.split("/") if p]
                break
            out = cand
    return out, True


def parse_toml(text: str, where: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise OperationFailed(f"{where}: invalid TOML: {e}") from None
    except RecursionError:
        raise OperationFailed(f"{where}: invalid TOML: nested too deeply") from None


def _keys(data: dict, where: str) -> dict[str, str]:
    """{dotted key: where} for every value in data (iterative: no depth limit to hit)."""
    out: dict[str, str] = {}
    stack = [("", data)]
    while stack:
        prefix, d = stack.pop()
        for k, v in d.items():
            dotted = f"{prefix}{k}"
            if isinstance(v, dict):
                stack.append((dotted + ".", v))
            else:
                out[dotted] = where
    return out


def merge(base: dict, over: dict) -> dict:
    """Drop-in semantics: tables merge key by key, every other value replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def exists(transport: NodeTransport, path: str) -> bool:
    """Whether a node path exists, symlinks resolved inside the node (not on the host)."""
    try:
        return _resolve(transport, path)[1]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False
    except OperationFailed:
        return True   # a symlink loop: exists, and load() reports the loop


def exists_many(transport: NodeTransport, paths: Sequence[str]) -> dict[str, bool]:
    """{path: exists(transport, path)} with one ``stat_many`` of every path's components
    for all of them (one round trip over SSH for a whole search list); only a path with a
    symlink on its way is resolved on its own afterwards."""
    prefixes: dict[str, None] = {}
    chains: dict[str, list[str] | None] = {}
    for path in paths:
        parts = [q for q in path.split("/") if q]
        if not path.startswith("/") or any(q in (".", "..") for q in parts):
            chains[path] = None  # not a plain absolute path: the careful walk
            continue
        walk = ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]
        chains[path] = walk
        prefixes.update(dict.fromkeys(walk))
    stats = transport.stat_many(list(prefixes), follow_symlinks=False) if prefixes else {}
    out: dict[str, bool] = {}
    for path, chain in chains.items():
        if chain is None:
            out[path] = exists(transport, path)
            continue
        answer: bool | None = True
        for c in chain:
            st = stats.get(c)
            if isinstance(st, (FileNotFoundError, NotADirectoryError, PermissionError)):
                answer = False
                break
            if isinstance(st, OSError) or st is None or st.is_link:
                answer = None  # a link (or an odd error) on the way: resolve this one alone
                break
        out[path] = exists(transport, path) if answer is None else answer
    return out


def _read_regular(transport: NodeTransport, path: str, shown: str) -> str:
    """A configuration file's text; only a regular file is opened (a FIFO would hang the read)."""
    st = transport.stat(path)
    if st.is_dir or (st.mode & 0o170000) != 0o100000:
        raise OperationFailed(f"{shown}: not a regular file; a Kata configuration must be one")
    raw = transport.read_bytes(path, MAX_DROPIN + 1)
    if len(raw) > MAX_DROPIN:  # never parse a cut file: the keys past the cut would vanish
        raise OperationFailed(f"{shown}: larger than {MAX_DROPIN >> 20} MiB; not read as a configuration")
    return raw.decode("utf-8", errors="replace")


def find_config(transport: NodeTransport, runtime: str = "go", prefix: str | None = None) -> str:
    paths = search_paths(runtime, prefix or node_prefix(transport)[0])
    found = exists_many(transport, paths)
    for p in paths:
        if found[p]:
            return p
    raise NotFound(f"no Kata configuration on node {transport.node} (looked for " + ", ".join(paths) + ")",
                   hint="pass --kata-config PATH if the runtime is pointed elsewhere (ConfigPath in containerd)")


def load(transport: NodeTransport, path: str | None = None, runtime: str = "auto", *,
         prefix: str | None = None) -> KataConfig:
    """The node's effective configuration without a sandbox: ``path``, else the runtime's
    own search (Go: /etc, then the build's PREFIX, found from the installed shim when
    ``prefix`` is None; runtime-rs: its list), then drop-ins as that runtime applies them.

    runtime "auto" tries the Go runtime's paths first, then runtime-rs."""
    origin, detail = "explicit", None
    if path is None:
        if prefix is None:
            prefix, shim = node_prefix(transport)
            detail = f"PREFIX {prefix} of " + (shim or "the upstream Makefile (no shim binary found)")
        else:
            detail = f"PREFIX {prefix}"
        if runtime == "auto":
            try:
                path, runtime = find_config(transport, "go", prefix), "go"
            except NotFound:
                try:
                    path, runtime = find_config(transport, "rs"), "rs"
                except NotFound:
                    raise NotFound(f"no Kata configuration on node {transport.node} (looked for "
                                   + ", ".join(search_paths("go", prefix) + RS_SEARCH) + ")",
                                   hint="pass --kata-config PATH (the file containerd's ConfigPath names)") from None
        else:
            path = find_config(transport, runtime, prefix)
        origin = _origin_of_default(path)
        if origin == "etc" or runtime == "rs":
            detail = None
    elif runtime == "auto":
        runtime = "rs" if "/runtime-rs/" in path else "go"
    return load_file(transport, path, runtime, origin=origin, origin_detail=detail)


def load_file(transport: NodeTransport, path: str, runtime: str, *, origin: str = "explicit",
              origin_detail: str | None = None) -> KataConfig:
    """One named configuration file, resolved through symlinks, with its ``config.d``
    applied as ``runtime`` ("go" or "rs") applies it (see the module docstring).
    Raises NotFound (no such file) or OperationFailed (the runtime would refuse it)."""
    resolved = realpath(transport, path)
    try:
        text = _read_regular(transport, resolved, path)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"{path}: Kata configuration file not found on node {transport.node}") from None
    except PermissionError:
        raise OperationFailed(f"{path}: permission denied") from None
    data = parse_toml(text, resolved)
    sources = _keys(data, resolved)
    applied: list[str] = []
    for p, text in _dropins(transport, resolved, runtime):
        over = parse_toml(text, p)
        try:
            data = merge(data, over)
        except RecursionError:
            raise OperationFailed(f"{p}: tables nested too deeply to merge") from None
        sources.update(_keys(over, p))
        applied.append(p)
    return KataConfig(path=path, resolved=resolved, dropins=applied, data=data, runtime=runtime,
                      sources=sources, origin=origin, origin_detail=origin_detail)


def _dropins(transport: NodeTransport, resolved: str, runtime: str) -> Iterable[tuple[str, str]]:
    """(node path, text) of each drop-in of the configuration file ``resolved``, in the
    order the runtime applies them; what the runtime refuses raises OperationFailed with
    the runtime's own words."""
    d = posixpath.join(posixpath.dirname(resolved), "config.d")
    rd = realpath(transport, d)  # resolved inside the node: an absolute link must not reach the host
    try:
        entries = transport.scan_dir(rd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as e:
        # Go: 'error reading "<dir>" directory'; runtime-rs: read_dir's io::Error
        raise OperationFailed(f'error reading "{d}" directory: {e.strerror or e}') from None
    for name, st in sorted(entries, key=lambda e: e[0].encode("utf-8", "surrogateescape")):
        p = posixpath.join(d, name)
        if runtime == "rs":
            if st.is_dir or st.is_link or (st.mode & 0o170000) != 0o100000:
                raise OperationFailed(f"{p}: drop-in cfg file can only be a regular file or a symlink"
                                      + (" (runtime-rs does not follow a symlinked drop-in)"
                                         if st.is_link else ""))
            target = posixpath.join(rd, name)  # a regular file in the resolved directory
        else:
            try:
                target = realpath(transport, p)
                tst = transport.stat(target, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                raise OperationFailed(f'error reading file "{p}": open {p}: no such file or directory') from None
            if tst.is_dir:
                raise OperationFailed(f'error reading file "{p}": read {p}: is a directory')
        try:
            yield p, _read_regular(transport, target, p)
        except (FileNotFoundError, NotADirectoryError):
            raise OperationFailed(f'error reading file "{p}": open {p}: no such file or directory') from None
        except PermissionError:
            raise OperationFailed(f'error reading file "{p}": open {p}: permission denied') from None


# -- containerd's runtime handlers ------------------------------------------------
#: containerd's main configuration (the first that exists: plain containerd, k3s, RKE2)
CONTAINERD_CONFIGS = ("/etc/containerd/config.toml",
                      "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
                      "/var/lib/rancher/rke2/agent/etc/containerd/config.toml")
#: the CRI plugin holding containerd.runtimes, per config file version
CRI_RUNTIME_PLUGINS = {3: "io.containerd.cri.v1.runtime", 2: "io.containerd.grpc.v1.cri", 1: "cri"}
MAX_CONTAINERD_FILES = 256


@dataclasses.dataclass
class RuntimeHandler:
    """One ``containerd.runtimes.<name>`` table (a RuntimeClass handler)."""

    name: str
    runtime_type: str | None = None
    runtime_path: str | None = None
    config_path: str | None = None   # options.ConfigPath
    defined_in: str | None = None    # the containerd file that set ConfigPath (else the table)

    @property
    def binary_name(self) -> str | None:
        """containerd's ``shim.BinaryName``: ``io.containerd.kata-qemu.v2`` ->
        ``containerd-shim-kata-qemu-v2`` (the binary looked up when runtime_path is unset)."""
        parts = (self.runtime_type or "").split(".")
        if len(parts) < 2 or not parts[0]:
            return None
        return f"containerd-shim-{parts[-2]}-{parts[-1]}"


@dataclasses.dataclass
class ContainerdConfig:
    path: str | None                  # the main file, None when there is none
    files: list[str]                  # every file read (imports included), in containerd's order
    handlers: dict[str, RuntimeHandler]
    error: str | None = None          # why it could not be read (handlers then empty)


def containerd_config(transport: NodeTransport, path: str | None = None) -> ContainerdConfig:
    """containerd's runtime handlers, read as containerd's ``LoadConfig`` does
    (``cmd/containerd/server/config/config.go``): the main file, then its ``imports``
    (absolute, or relative to the importing file; ``*`` globs, matches sorted), breadth
    first, each file once; a handler table set in several files is merged key by key, the
    later file winning (recent containerd merges plugin tables with mergo; old releases
    replaced a whole plugin table). Each file's own ``version`` says which plugin holds
    ``containerd.runtimes`` (CRI_RUNTIME_PLUGINS), as containerd 2 migrates older imports.
    Nothing readable: an empty result (with ``error`` when a file was there but bad)."""
    if path is None:
        found = exists_many(transport, CONTAINERD_CONFIGS)
        path = next((p for p in CONTAINERD_CONFIGS if found[p]), None)
        if path is None:
            return ContainerdConfig(None, [], {})
    tables: dict[str, dict] = {}
    where: dict[str, str] = {}
    files: list[str] = []
    pending, seen = [path], set[str]()
    root_version: Any = 1
    try:
        while pending and len(seen) < MAX_CONTAINERD_FILES:
            p = pending.pop(0)
            if p in seen:
                continue
            seen.add(p)
            try:
                data = parse_toml(_read_regular(transport, realpath(transport, p), p), p)
            except (FileNotFoundError, NotADirectoryError):
                if p == path:
                    raise OperationFailed(f"{p}: not found") from None
                continue  # containerd skips an import that does not exist
            files.append(p)
            # an import without its own version is read as the main file's (kata-deploy's
            # drop-in has none, and serves containerd 1.x and 2.x alike)
            version = data.get("version", root_version if files[1:] else 1)
            if not files[1:]:
                root_version = version
            plugin = CRI_RUNTIME_PLUGINS.get(version) if isinstance(version, int) else None
            runtimes = _dig(data, "plugins", plugin or "", "containerd", "runtimes")
            for name, tbl in (runtimes or {}).items():
                if isinstance(tbl, dict):
                    tables[name] = merge(tables.get(name, {}), tbl)
                    if _dig(tbl, "options", "ConfigPath") is not None or name not in where:
                        where[name] = p
            imports = data.get("imports") or []
            if isinstance(imports, list):
                pending += _resolve_imports(transport, p, [i for i in imports if isinstance(i, str)])
        if any(q not in seen for q in pending):
            raise OperationFailed(f"{path}: imports reach more than {MAX_CONTAINERD_FILES} files; "
                                  "not read (an import cycle through globs?)")
    except (OperationFailed, PermissionError, RecursionError) as e:
        msg = getattr(e, "message", None) or (f"{path}: permission denied" if isinstance(e, PermissionError)
                                              else str(e))
        return ContainerdConfig(path, files, {}, error=msg)
    handlers = {}
    for name, t in tables.items():
        handlers[name] = RuntimeHandler(
            name=name, runtime_type=_s(t.get("runtime_type")), runtime_path=_s(t.get("runtime_path")),
            config_path=_s(_dig(t, "options", "ConfigPath")), defined_in=where.get(name))
    return ContainerdConfig(path, files, handlers)


def _s(v) -> str | None:
    return v if isinstance(v, str) and v else None


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _resolve_imports(transport: NodeTransport, parent: str, imports: list[str]) -> list[str]:
    """containerd's resolveImports: Clean, relative to the parent's dir, globs expanded."""
    out: list[str] = []
    for imp in imports:
        p = posixpath.normpath(imp)
        if not p.startswith("/"):
            p = posixpath.normpath(posixpath.join(posixpath.dirname(parent), p))
        out += _glob(transport, p) if "*" in p else [p]
    return out


def _glob(transport: NodeTransport, pattern: str) -> list[str]:
    """filepath.Glob over the node's files: every component may hold a pattern; sorted."""
    found = ["/"]
    for part in [x for x in pattern.split("/") if x]:
        nxt = []
        for base in found:
            if not any(c in part for c in "*?["):
                nxt.append(posixpath.join(base, part))
                continue
            try:
                names = sorted(transport.listdir(realpath(transport, base)))
            except (OSError, OperationFailed):
                continue
            nxt += [posixpath.join(base, n) for n in names if fnmatch.fnmatchcase(n, part)]
        found = nxt
        if len(found) > MAX_CONTAINERD_FILES:  # '/*/*/*.toml' would walk the whole node
            raise OperationFailed(f"import {pattern!r} matches more than {MAX_CONTAINERD_FILES} paths; not read")
    there = exists_many(transport, found)
    return [p for p in found if there[p]]


# -- the configuration one sandbox's runtime used ---------------------------------
@dataclasses.dataclass
class SandboxFacts:
    """What a sandbox tells about the configuration its shim read."""

    runtime: str                        # "go" | "rs"
    hypervisor: str | None = None       # katactl's short name: qemu, clh, fc, dragonball
    bundle: str | None = None           # node path of its OCI bundle
    shim_pid: int | None = None
    annotation_path: str | None = None  # io.katacontainers.config_path on its spec
    #: persisted kernel/image/initrd/path, to tell apart handlers sharing one shim binary
    assets: dict[str, str | None] = dataclasses.field(default_factory=dict)

    @property
    def annotation_file(self) -> str | None:
        """The file the annotation makes the runtime read: Go only. runtime-rs's load_config
        (src/runtime-rs/crates/runtimes/src/manager.rs) never takes its file from it, only
        per-key overrides (``update_config_by_annotation``)."""
        return self.annotation_path if self.runtime == "go" else None


@dataclasses.dataclass
class SandboxConfig:
    """The configuration a sandbox's runtime used, or why it cannot be told."""

    config: KataConfig | None
    path: str | None = None             # the file chosen (named even when it is broken)
    handler: str | None = None          # containerd runtime handler (RuntimeClass handler)
    origin: str | None = None           # one of ORIGINS
    origin_detail: str | None = None
    error: str | None = None            # the runtime would refuse it (or it cannot be told)
    _dict: dict | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The JSON shape (``kataConfig``); one dict per answer, shared: do not modify it."""
        if self._dict is None:
            c = self.config
            self._dict = {"file": c.resolved if c else self.path, "path": self.path,
                          "dropIns": list(c.dropins) if c else [], "source": self.origin,
                          "sourceDetail": self.origin_detail, "runtimeHandler": self.handler,
                          "error": self.error}
        return self._dict


def _short_hv(name: str | None) -> str | None:
    return HV_SHORT.get(name, name) if name else None


class Resolver:
    """Resolves many sandboxes' configurations on one node: containerd's handlers read
    once, files fetched in a few batched reads, each configuration loaded once per
    resolved file (and runtime: the two apply drop-ins differently)."""

    def __init__(self, transport: NodeTransport, containerd_path: str | None = None):
        self.t = transport
        self._cd_path = containerd_path   # None: the first of CONTAINERD_CONFIGS
        self._cd: ContainerdConfig | None = None
        self._real: dict[str, str] = {}
        self._files: dict[tuple[str, str], KataConfig | KatactlError] = {}
        self._hbin: dict[str, str | None] = {}
        self._node_prefix: tuple[str, str | None] | None = None
        self._exists: dict[str, bool] = {}
        #: one answer (and one dict) shared by the sandboxes that got the same one
        self._answers: dict[tuple, SandboxConfig] = {}

    def containerd(self) -> ContainerdConfig:
        if self._cd is None:
            self._cd = containerd_config(self.t, self._cd_path)
        return self._cd

    def _realpath(self, path: str) -> str:
        if path not in self._real:
            try:
                self._real[path] = realpath(self.t, path)
            except OperationFailed:
                self._real[path] = path  # a loop: load_file reports it
        return self._real[path]

    def load(self, path: str, runtime: str) -> KataConfig:
        """load_file, once per resolved file and runtime (a failure is cached too)."""
        key = (self._realpath(path), runtime)
        hit = self._files.get(key)
        if hit is None:
            try:
                hit = load_file(self.t, path, runtime)
            except KatactlError as e:
                hit = e
            self._files[key] = hit
        if isinstance(hit, KatactlError):
            raise hit
        return hit

    def resolve_many(self, facts: list[SandboxFacts]) -> list[SandboxConfig]:
        cd = self.containerd()
        # the binary containerd started: <bundle>/shim-binary-path (containerd >= 1.6 writes it)
        # (it also tells the build's PREFIX for the Go defaults: read when that can matter)
        matters: list[bool] = []  # _prefix_matters(), asked once (it is the same for all)

        def prefix_matters() -> bool:
            if not matters:
                matters.append(self._prefix_matters())
            return matters[0]

        want = [f"{f.bundle}/shim-binary-path" for f in facts if f.bundle and not f.annotation_file
                and (cd.handlers or (f.runtime == "go" and prefix_matters()))]
        sbp = self.t.read_many(want, limit=4096) if want else {}
        binaries: list[str | None] = []
        matched = []
        for f in facts:
            raw = sbp.get(f"{f.bundle}/shim-binary-path") if f.bundle else None
            b = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) and raw.strip() else None
            binaries.append(b)
            matched.append(self._match(f, b) if cd.handlers and not f.annotation_file else (None, []))
        # the shim's environment (KATA_CONF_FILE) and argv[0] (its binary, for the build's
        # PREFIX), read only for sandboxes whose runtime would get that far
        need = [f.shim_pid for f, (h, _) in zip(facts, matched, strict=True)
                if f.shim_pid and not f.annotation_file and (f.runtime == "rs" or not (h and h.config_path))]
        procs = self.t.read_many([f"/proc/{p}/{n}" for p in sorted(set(need)) for n in ("environ", "cmdline")],
                                 limit=1 << 20) if need else {}
        return [self._one(f, b, h, amb, procs) for f, b, (h, amb) in zip(facts, binaries, matched, strict=True)]

    def _one(self, f: SandboxFacts, binary: str | None, h: RuntimeHandler | None, ambiguous: list[str],
             procs: dict) -> SandboxConfig:
        env, env_note = None, None
        if f.shim_pid:
            raw = procs.get(f"/proc/{f.shim_pid}/environ")
            if isinstance(raw, bytes):
                for kv in raw.split(b"\0"):
                    if kv.startswith(b"KATA_CONF_FILE="):
                        env = kv.split(b"=", 1)[1].decode("utf-8", "replace") or None
            elif isinstance(raw, OSError):
                env_note = f"KATA_CONF_FILE not checked: /proc/{f.shim_pid}/environ is not readable"
        handler = h.name if h else None
        cp = h.config_path if h else None
        cpd = f"ConfigPath of runtime handler {h.name} in {h.defined_in}" if h else None
        pid_d = f"environment of shim pid {f.shim_pid}"
        chain: list[tuple[str, str, str | None]] = []
        if f.annotation_file:
            chain.append((f.annotation_file, "annotation", CONFIG_PATH_ANNOTATION))
        elif f.runtime == "go":
            chain += [(cp, "containerd", cpd)] if cp else []
            chain += [(env, "KATA_CONF_FILE", pid_d)] if env else []
        else:
            chain += [(env, "KATA_CONF_FILE", pid_d)] if env else []
            chain += [(cp, "containerd", cpd)] if cp else []
        if ambiguous and not (f.runtime == "rs" and env):  # else KATA_CONF_FILE wins anyway
            return SandboxConfig(None, error=(
                f"cannot tell which runtime handler started this sandbox: {', '.join(ambiguous)} run "
                f"{binary} and their configurations all match it"))
        path: str | None
        if chain:
            path, origin, detail = chain[0]
        else:
            search, detail = self._defaults(f, binary, procs)
            path = next((p for p in search if self._exists_cached(p)), None)
            if env_note:
                detail = f"{detail}; {env_note}" if detail else env_note
            if path is None:  # one answer for the sandboxes that looked in the same places
                none_key = (None, tuple(search), handler, detail)
                if none_key not in self._answers:
                    self._answers[none_key] = SandboxConfig(
                        None, handler=handler, origin=None, origin_detail=detail,
                        error=f"no Kata configuration (looked for {', '.join(search)})")
                return self._answers[none_key]
            origin = _origin_of_default(path)
        key = (path, f.runtime, handler, origin, detail)
        if key not in self._answers:
            try:
                cfg = dataclasses.replace(self.load(path, f.runtime), path=path, origin=origin, origin_detail=detail)
                self._answers[key] = SandboxConfig(cfg, path=path, handler=handler, origin=origin,
                                                   origin_detail=detail)
            except KatactlError as e:
                self._answers[key] = SandboxConfig(None, path=path, handler=handler, origin=origin,
                                                   origin_detail=detail, error=e.message)
        return self._answers[key]

    def _prefix_matters(self) -> bool:
        """Whether a Go sandbox's build PREFIX can change its answer: no /etc file (which
        comes first), and some build's defaults exist (none: the answer is 'none found')."""
        if self._exists_cached(GO_SYSCONF):
            return False
        prefixes = {DEFAULT_PREFIX, "/opt/kata", self._node_prefix_cached()[0]}
        return any(self._exists_cached(search_paths("go", p)[1]) for p in prefixes)

    def _node_prefix_cached(self) -> tuple[str, str | None]:
        if self._node_prefix is None:
            self._node_prefix = node_prefix(self.t)
        return self._node_prefix

    def _exists_cached(self, path: str) -> bool:
        if not self._exists:
            # every default search path in one round trip: most sandboxes ask about them
            prefixes = (DEFAULT_PREFIX, "/opt/kata", self._node_prefix_cached()[0])
            self._exists.update(exists_many(self.t, [GO_SYSCONF, *RS_SEARCH, *(
                search_paths("go", p)[1] for p in prefixes)]))
        if path not in self._exists:
            self._exists[path] = exists(self.t, path)
        return self._exists[path]

    def _defaults(self, f: SandboxFacts, binary: str | None, procs: dict) -> tuple[tuple[str, ...], str | None]:
        """The runtime's own search list and, for Go, where the build's PREFIX was read."""
        if f.runtime == "rs":
            return RS_SEARCH, None
        argv0 = None
        raw = procs.get(f"/proc/{f.shim_pid}/cmdline") if f.shim_pid else None
        if isinstance(raw, bytes) and raw:
            argv0 = raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None
        for b in (binary, argv0):  # the re-executed shim's argv[0] is already resolved
            prefix = build_prefix(self._realpath(b)) if b and b.startswith("/") else None
            if prefix:
                return search_paths("go", prefix), f"PREFIX {prefix} of {b}"
        prefix, shim = self._node_prefix_cached()
        return search_paths("go", prefix), f"PREFIX {prefix} of " + (shim or "the upstream Makefile")

    def _handler_binary(self, h: RuntimeHandler) -> str | None:
        """The binary containerd starts for h, symlinks resolved: runtime_path, else
        BinaryName(runtime_type) looked up in BINARY_DIRS."""
        if h.name not in self._hbin:
            b = h.runtime_path
            if not b and h.binary_name:
                cands = [f"{d}/{h.binary_name}" for d in BINARY_DIRS]
                there = exists_many(self.t, cands)
                b = next((c for c in cands if there[c]), None)
            self._hbin[h.name] = self._realpath(b) if b else None
        return self._hbin[h.name]

    def _match(self, f: SandboxFacts, binary: str | None) -> tuple[RuntimeHandler | None, list[str]]:
        """The handler that started the sandbox: those whose binary is the one containerd
        recorded (by name first, then symlinks resolved), narrowed, when several share it
        (kata-deploy gives every Go handler one runtime_path), to those whose
        configuration has the sandbox's hypervisor and its persisted assets. ([], names)
        when still several with different configurations."""
        if not binary:
            return None, []
        hs = list(self.containerd().handlers.values())
        cands = [h for h in hs if h.runtime_path == binary
                 or (not h.runtime_path and h.binary_name == posixpath.basename(binary))]
        if not cands:
            real = self._realpath(binary)
            cands = [h for h in hs if self._handler_binary(h) == real]
        if len(cands) > 1:
            cands = self._narrow(f, cands)
        if len(cands) == 1:
            return cands[0], []
        if cands and len({h.config_path for h in cands}) == 1:
            return dataclasses.replace(cands[0], name=" or ".join(h.name for h in cands)), []
        return None, sorted(h.name for h in cands)

    def _narrow(self, f: SandboxFacts, cands: list[RuntimeHandler]) -> list[RuntimeHandler]:
        def hv_of(h: RuntimeHandler) -> KataConfig | None:
            try:
                return self.load(h.config_path, f.runtime) if h.config_path else None
            except KatactlError:
                return None

        cfgs = {h.name: hv_of(h) for h in cands}
        if f.hypervisor:
            same = [h for h in cands if (c := cfgs[h.name]) is None or _short_hv(c.hypervisor_name) == f.hypervisor]
            cands = same or cands
        known = {k: v for k, v in f.assets.items() if v}
        if len(cands) > 1 and known:
            same = [h for h in cands if (c := cfgs[h.name]) is None  # unreadable: cannot rule it out
                    or all(c.hypervisor.get(k) in (None, "", v) for k, v in known.items())]
            cands = same or cands
        return cands
