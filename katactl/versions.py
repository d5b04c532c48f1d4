"""Client and node version discovery."""
from __future__ import annotations

import platform
import sys

from katactl import __version__
from katactl.backends.base import NodeTransport

DEPENDENCIES = ("typer", "rich", "httpx", "h11", "kubernetes", "psutil", "tabulate", "paramiko", "PyYAML", "orjson")

# Binaries whose --version tells a node's Kata story; looked for in these dirs.
NODE_BINARIES = {
    "runtime": "kata-runtime",
    "shim": "containerd-shim-kata-v2",
    "qemu": "qemu-system-x86_64",
    "cloudHypervisor": "cloud-hypervisor",
    "firecracker": "firecracker",
}
BIN_DIRS = ("/opt/kata/current/bin", "/opt/kata/bin", "/usr/local/bin", "/usr/bin")


def client_versions() -> dict:
    """Versions without importing the dependencies (metadata only: fast)."""
    from importlib import metadata

    deps: dict[str, str | None] = {}
    for d in DEPENDENCIES:
        try:
            deps[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            deps[d] = None
    return {"client": __version__, "python": platform.python_version(),
            "implementation": sys.implementation.name, "platform": platform.platform(terse=True),
            "dependencies": deps}


def node_versions(transport: NodeTransport) -> dict:
    """First line of ``<binary> --version`` for each Kata binary found on the node, e.g. the Go
    shim's ``Kata Containers containerd shim (Golang): id: "io.containerd.kata.v2", version:
    3.x.y, commit: ...`` (kata-containers src/runtime/cmd/containerd-shim-kata-v2/main.go).
    Under a host root nothing is run: a binary found is ``present at PATH``."""
    out: dict = {}
    for key, name in NODE_BINARIES.items():
        out[key] = None
        for d in BIN_DIRS:
            path = f"{d}/{name}"
            if not transport.exists(path):
                continue
            if transport.host_root:
                # A mounted root: executing its binaries would run another
                # machine's programs here; report the path only.
                out[key] = f"present at {path}"
                break
            r = transport.run([path, "--version"], timeout=10)
            text = (r.stdout or r.stderr).decode("utf-8", "replace").strip()
            out[key] = text.splitlines()[0] if text else f"{path} (no version output)"
            break
    return out
