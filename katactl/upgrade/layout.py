"""Where an A/B Kata installation lives on a node, and the small shared helpers.

::

    <root>/                      /opt/kata by default (--kata-root, KATACTL_KATA_ROOT)
      current -> releases/<v>    the runtime release: switched with one rename(2)
      releases/<v>/              one complete, verified kata-static tree per version
        .katactl-release.json    written before the release is renamed into place
        bin/ share/ libexec/ ...
      releases/.katactl/         lock, history.jsonl, pending.json, backups/
      releases/.staging-*        temp dirs of a stage in progress (same filesystem)
      releases/.replaced-*       a release being replaced by stage --force (set aside)
      releases/.trash-*          releases being removed by gc

Every path here is a *node path*; all access goes through a NodeTransport.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import signal
from collections.abc import Callable

from katactl.errors import UsageError

DEFAULT_ROOT = "/opt/kata"
#: kata-static tarballs are built for this prefix; their configs reference it
INSTALL_PREFIX = "/opt/kata"
RELEASE_RECORD = ".katactl-release.json"
STATE_DIRNAME = ".katactl"
CONFIG_SUBDIR = "share/defaults/kata-containers"
SHIM_BINARIES = ("bin/containerd-shim-kata-v2", "runtime-rs/bin/containerd-shim-kata-v2")
COMPONENTS = ("all", "runtime", "agent")

#: the characters of a release version (validate_version); procscan ends a version in an argument
#: at the first other one (``K=/opt/kata/releases/V;`` names V)
VERSION_CHARS = "A-Za-z0-9._+~-"
_VERSION_RE = re.compile(rf"^[A-Za-z0-9][{VERSION_CHARS}]{{0,63}}$")
_RESERVED = {"current", "previous", "releases"}

#: every fault-injection point, in execution order (KATACTL_FAULT=<point>[,<point>...])
FAULT_POINTS = (
    "stage:locked", "stage:after-scan", "stage:mid-extract", "stage:after-extract",
    "stage:after-record", "stage:after-rename",
    "stage:after-set-aside",
    "switch:locked", "switch:after-journal", "switch:after-config-tmp", "switch:after-intent",
    "switch:after-config-rename", "switch:after-prepare", "switch:after-tmp-link",
    "switch:after-flip", "switch:after-config", "switch:after-history",
    "gc:after-trash",
)
#: points reached once per item (one per configuration file renamed): ``<point>`` kills at
#: the first, ``<point>@N`` at the N-th
REPEATED_FAULT_POINTS = ("switch:after-config-rename",)


def fault(point: str, n: int | None = None) -> None:
    """Test hook: SIGKILL ourselves at a named step (see FAULT_POINTS).

    Only active when KATACTL_FAULT names the point (``point@n`` for the n-th pass of a
    repeated point); a real crash, not an exception, so no finally-block or atexit
    handler runs. KATACTL_FAULT_SIGNAL=INT sends SIGINT instead: a Ctrl-C at that step."""
    want = os.environ.get("KATACTL_FAULT")
    if not want:
        return
    names = want.split(",")
    if (point in names and n in (None, 1)) or (n is not None and f"{point}@{n}" in names):
        sig = signal.SIGINT if os.environ.get("KATACTL_FAULT_SIGNAL") == "INT" else signal.SIGKILL
        os.kill(os.getpid(), sig)


#: how much of a bad value an error shows: a VERSION file may hold a megabyte
SHOWN_VALUE = 80


def shown(v: object) -> str:
    """repr(v), cut to SHOWN_VALUE characters: an error stays one readable line."""
    r = repr(v)
    return r if len(r) <= SHOWN_VALUE else f"{r[:SHOWN_VALUE]}… ({len(str(v))} characters)"


def validate_version(v: str | None, what: str = "version") -> str:
    if v is None or not _VERSION_RE.fullmatch(v) or v in _RESERVED or v in (".", ".."):
        raise UsageError(f"invalid {what} {shown(v)}: expected 1-64 characters of A-Z a-z 0-9 . _ + ~ -, "
                         "starting with a letter or digit")
    return v


@dataclasses.dataclass(frozen=True)
class Layout:
    root: str = DEFAULT_ROOT

    def __post_init__(self):
        if not isinstance(self.root, str) or not self.root.startswith("/") or "\0" in self.root:
            raise UsageError(f"--kata-root must be an absolute path, got {self.root!r}")
        norm = posixpath.normpath(self.root)
        if norm == "/":
            raise UsageError("--kata-root must not be /")
        object.__setattr__(self, "root", norm)

    @property
    def releases(self) -> str:
        return f"{self.root}/releases"

    @property
    def current(self) -> str:
        return f"{self.root}/current"

    @property
    def state(self) -> str:
        return f"{self.releases}/{STATE_DIRNAME}"

    @property
    def lock(self) -> str:
        return f"{self.state}/lock"

    @property
    def history(self) -> str:
        return f"{self.state}/history.jsonl"

    @property
    def journal(self) -> str:
        return f"{self.state}/pending.json"

    def backups(self, version: str) -> str:
        return f"{self.state}/backups/{version}"

    def release(self, version: str) -> str:
        return f"{self.releases}/{version}"

    def config_dir(self, version: str) -> str:
        return f"{self.release(version)}/{CONFIG_SUBDIR}"

    def link_target(self, version: str) -> str:
        """What `current` points to: relative when possible (survives --host-root and chroots)."""
        return f"releases/{version}"

    def version_of_path(self, path: str, real_releases: str | None = None) -> str | None:
        """The release a node path lies in (None when outside every release). ``real_releases``:
        ``releases`` with its symlinks resolved (real_releases()), for paths the kernel
        reports: /proc/<pid>/exe, maps and fd/ name files with every symlink resolved; and for
        a configuration that names guest assets by their resolved path."""
        hit = self.split_release_path(path, real_releases)
        return hit[0] if hit else None

    def config_paths(self, transport) -> Callable[[str], tuple[str, str] | None]:
        """split_release_path for the paths a configuration names: as ``--kata-root`` gives them
        or resolved (/var/opt/kata/releases/V/... with /opt -> var/opt). real_releases() is
        looked up once, and only for a path outside the releases as given: over SSH it is a
        round trip that a kata-static configuration (every path under releases/V) never needs."""
        real: list[str | None] = []

        def split(path: str) -> tuple[str, str] | None:
            hit = self.split_release_path(path)
            if hit is None and path.startswith("/") and not path.startswith(f"{self.releases}/"):
                if not real:
                    real.append(self.real_releases(transport))
                hit = self.split_release_path(path, real[0])
            return hit
        return split

    def split_release_path(self, path: str, real_releases: str | None = None) -> tuple[str, str] | None:
        """(release, the path inside it) of a node path under a release (see version_of_path)."""
        if not path:
            return None
        path = path.removesuffix(" (deleted)")
        for releases in (self.releases, real_releases):
            prefix = f"{releases}/"
            if releases and path.startswith(prefix):
                v, _, rest = path[len(prefix):].partition("/")
                return None if not v or v.startswith(".") else (v, rest)
        return None

    def check_inside(self, transport) -> None:
        """Refuse a kata root the transport would reach outside the node's tree: over SSH with
        --host-root (or --via kube's /host) that machine's kernel follows an absolute symlink
        such as /opt/kata -> /data/kata, or releases -> /data/releases, to *its* /data, so a
        stage would write there (exit 2, naming what to give or change). A local --host-root
        resolves inside the root (katacfg.rooted_escape says None)."""
        from katactl.katacfg import realpath, rooted_escape

        esc = rooted_escape(transport, self.state)  # walks the root, releases/ and .katactl/
        if not esc:
            return
        link, target, _ = esc
        where = f"{link} is a symlink to {target}, which the node root {transport.host_root} would " \
                "follow out of the node's tree"
        if link.startswith(f"{self.root}/"):  # inside the kata root: katactl cannot name another
            raise UsageError(f"--kata-root {self.root}: {where}; make it a relative symlink")
        raise UsageError(f"--kata-root {self.root}: {where}; give --kata-root {realpath(transport, self.root)}")

    def check_release_inside(self, transport, version: str) -> None:
        """Refuse to switch to a release that is an absolute symlink (releases/V -> /data/V)
        under a node root the transport maps (SSH, --via kube): its preflight would check, and
        `current` name, a tree that machine's kernel finds on *its* /, not the node's (exit 5).
        A staged release is a directory."""
        from katactl.errors import Refused
        from katactl.katacfg import rooted_escape

        esc = rooted_escape(transport, self.release(version))
        if esc:
            link, target, _ = esc
            raise Refused(f"release {version}: {link} is a symlink to {target}, which the node root "
                          f"{transport.host_root} would follow out of the node's tree",
                          hint="make it a relative symlink, or stage the release again")

    def real_releases(self, transport) -> str | None:
        """``releases`` with its symlinks resolved inside the node, when that differs (a kata
        root under a symlink: /opt -> var/opt on Fedora CoreOS and RHCOS); else None. The kernel
        shows the real path: linux fs/proc/base.c proc_exe_link returns the exe's f_path."""
        from katactl.errors import KatactlError
        from katactl.katacfg import realpath

        try:
            real = realpath(transport, self.releases)
        except (OSError, KatactlError):
            return None
        return real if real != self.releases else None
