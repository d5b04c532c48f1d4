"""The node's *effective* Kata configuration, found and merged as the runtime does.

Facts (reference/kata-node.md, checked against the Go runtime's
``katautils.decodeConfig``/``decodeDropIns``):

- Go runtime search order: ``/etc/kata-containers/configuration.toml``, then
  ``/usr/share/defaults/kata-containers/configuration.toml``; kata-deploy
  installs under ``/opt/kata/share/defaults/kata-containers/`` (searched last
  here, because containerd points the shim at it explicitly there).
- runtime-rs: the same directories with a ``runtime-rs/`` subfolder.
- The chosen file is resolved through symlinks first (kata-deploy links
  ``configuration.toml`` -> ``configuration-qemu.toml``); drop-ins are every
  file in ``<dir of the resolved file>/config.d/``, applied in lexical order;
  a drop-in replaces values and merges tables key by key.

Everything goes through a NodeTransport (node paths), so --host-root and SSH
work unchanged. Small and dependency-free on purpose: vmcore and upgrade use it.
"""
from __future__ import annotations

import dataclasses
import posixpath
import sys
from typing import Any

from katactl.errors import NotFound, OperationFailed, UsageError
from katactl.backends.base import NodeTransport

GO_SEARCH = (
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
    "/opt/kata/share/defaults/kata-containers/configuration.toml",
)
RS_SEARCH = (
    "/etc/kata-containers/runtime-rs/configuration.toml",
    "/usr/share/defaults/kata-containers/runtime-rs/configuration.toml",
    "/opt/kata/share/defaults/kata-containers/runtime-rs/configuration.toml",
)
HYPERVISORS = ("qemu", "clh", "cloud-hypervisor", "fc", "firecracker", "dragonball", "stratovirt",
               "remote")
MAX_DROPIN = 4 << 20


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
                "runtime": self.runtime, "hypervisor": self.hypervisor_name}


def search_paths(runtime: str = "go") -> tuple[str, ...]:
    if runtime == "go":
        return GO_SEARCH
    if runtime == "rs":
        return RS_SEARCH
    raise UsageError(f"invalid runtime {runtime!r} (choose go or rs)")


def realpath(transport: NodeTransport, path: str, max_links: int = 40) -> str:
    """Resolve symlinks in a node path through the transport (like EvalSymlinks)."""
    parts = [p for p in path.split("/") if p]
    out = "/"
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            out = posixpath.dirname(out) or "/"
            continue
        cand = posixpath.join(out, part)
        try:
            st = transport.stat(cand, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return posixpath.normpath(posixpath.join(cand, *parts))
        if st.is_link:
            links += 1
            if links > max_links:
                raise OperationFailed(f"{path}: too many levels of symbolic links")
            target = transport.readlink(cand)
            if target.startswith("/"):
                out = "/"
            parts = [p for p in target.split("/") if p] + parts
            continue
        out = cand
    return out


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


def _read_regular(transport: NodeTransport, path: str, shown: str) -> str:
    """A configuration file's text; only a regular file is opened (a FIFO would hang the read)."""
    st = transport.stat(path)
    if st.is_dir or (st.mode & 0o170000) != 0o100000:
        raise OperationFailed(f"{shown}: not a regular file; a Kata configuration must be one")
    return transport.read_text(path, limit=MAX_DROPIN)


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
        transport.stat(realpath(transport, path), follow_symlinks=False)
        return True
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return False
    except OperationFailed:
        return True   # a symlink loop: exists, and load() reports the loop


def find_config(transport: NodeTransport, runtime: str = "go") -> str:
    for p in search_paths(runtime):
        if exists(transport, p):
            return p
    raise NotFound(f"no Kata configuration on node {transport.node} (looked for "
                   + ", ".join(search_paths(runtime)) + ")",
                   hint="pass --kata-config PATH if the runtime is pointed elsewhere (ConfigPath in containerd)")


def load(transport: NodeTransport, path: str | None = None, runtime: str = "auto") -> KataConfig:
    """The effective configuration: search (unless path), resolve, merge drop-ins.

    runtime "auto" tries the Go runtime's paths first, then runtime-rs.
    """
    if path is None:
        if runtime == "auto":
            try:
                path, runtime = find_config(transport, "go"), "go"
            except NotFound:
                try:
                    path, runtime = find_config(transport, "rs"), "rs"
                except NotFound:
                    raise NotFound(f"no Kata configuration on node {transport.node} (looked for "
                                   + ", ".join(GO_SEARCH + RS_SEARCH) + ")",
                                   hint="pass --kata-config PATH (the file containerd's ConfigPath names)") from None
        else:
            path = find_config(transport, runtime)
    elif runtime == "auto":
        runtime = "rs" if "/runtime-rs/" in path else "go"
    resolved = realpath(transport, path)
    try:
        text = _read_regular(transport, resolved, path)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"{path}: Kata configuration file not found on node {transport.node}") from None
    data = parse_toml(text, resolved)
    sources = _keys(data, resolved)
    dropin_dir = posixpath.join(posixpath.dirname(resolved), "config.d")
    applied: list[str] = []
    try:
        names = sorted(transport.listdir(realpath(transport, dropin_dir)))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        p = posixpath.join(dropin_dir, name)
        try:
            if transport.stat(realpath(transport, p), follow_symlinks=False).is_dir:
                continue
        except (FileNotFoundError, NotADirectoryError):
            continue
        over = parse_toml(_read_regular(transport, realpath(transport, p), p), p)
        try:
            data = merge(data, over)
        except RecursionError:
            raise OperationFailed(f"{p}: tables nested too deeply to merge") from None
        sources.update(_keys(over, p))
        applied.append(p)
    return KataConfig(path=path, resolved=resolved, dropins=applied, data=data, runtime=runtime,
                      sources=sources)
