"""Node selection and fan-out: run one function per node, concurrently.

``run_on_nodes`` is the only fan-out mechanism: every node-local command goes
through it, so --parallel, per-node errors, exit 4 (partial) and 7 (all nodes
unreachable) behave the same everywhere.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable

from katactl.errors import ExitCode, KatactlError, UsageError, as_katactl_error, exit_code_for, outcome_exit_code

LOCAL = "localhost"
log = logging.getLogger(__name__)
#: a selected node's failure stays in the command's list (machine formats); see configure()
_list_errors = False


def configure(*, list_errors: bool) -> None:
    """``list_errors=True`` (the CLI with -o json/yaml/jsonl): with a node selection, even of
    one node, a failed node is an entry of the result's ``errors``, never the command's
    error object (FanOut.raise_if_single_failure)."""
    global _list_errors
    _list_errors = list_errors

# [user@]host[:port], host a DNS name, IPv4 or [IPv6]. Anything else (spaces,
# quotes, $, ;, backticks, newlines) is refused before it reaches any backend; a user
# starting with "-" too, as ssh refuses it (openssh-portable misc.c valid_ruser).
_NODE_RE = re.compile(r"(?:[A-Za-z0-9._][A-Za-z0-9._-]*@)?"
                      r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?")


def validate_node_name(name: str) -> str:
    # fullmatch: "node1\n" is not node1 ($ would match before the newline)
    m = _NODE_RE.fullmatch(name or "")
    # a DNS name's labels are 1-63 characters: "a..b" would end in an IDNA UnicodeError
    if (not m or len(name) > 255
            or not all(0 < len(label) <= 63 for label in m.group("host").strip("[]").split("."))):
        raise UsageError(f"invalid node name {name!r}: expected [user@]host[:port]")
    # here, not per node: a fan-out must not have changed the other nodes by the time
    # one name's port turns out to be out of range (ssh: "Bad port", misc.c a2port)
    if m.group("port") and not 0 < int(m.group("port")) < 65536:
        raise UsageError(f"invalid port in node name {name!r}: expected 1-65535")
    return name


def select_nodes(settings) -> list[str]:
    """Node names from -N (comma lists, @group), --nodes-from and -l; [] = this host."""
    names: list[str] = []
    for entry in settings.nodes:
        for n in str(entry).split(","):
            n = n.strip(" ")  # "a, b"; a newline or tab stays, for validation to refuse
            if not n:
                continue
            if n.startswith("@"):
                group = settings.node_groups.get(n[1:])
                if group is None:
                    known = ", ".join(sorted(settings.node_groups)) or "none configured"
                    raise UsageError(f"unknown node group {n!r} (groups: {known})")
                if not group:  # an empty group must not fall back to this host
                    raise UsageError(f"node group {n!r} is empty")
                names.extend(group)
            else:
                names.append(n)
    if settings.nodes_from:
        from_file = _read_nodes_file(settings.nodes_from)
        if not from_file:  # an empty list must not fall back to this host
            raise UsageError(f"--nodes-from {settings.nodes_from}: no node names in it")
        names.extend(from_file)
    if settings.selector:
        check_selector(settings.selector)
        from katactl.backends import kube

        names.extend(kube.node_names(settings))
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(validate_node_name(n), None)
    return list(seen)


def check_selector(selector: str, what: str = "label selector") -> None:
    """A usage error (exit 2) for a -l the API server would refuse, before any kubeconfig is
    read or API contacted: exit 2 whether or not the server is there to say 400. The CLI
    checks the global -l once its settings resolve (node list and rollout pass it to the API
    themselves), a rollout plan file's ``selector`` as it is read."""
    from katactl import labelselector

    try:
        labelselector.check(selector)
    except ValueError as e:
        raise UsageError(f"invalid {what} {selector!r}: {e}") from None


def _read_nodes_file(path: str) -> list[str]:
    from katactl.config import read_input

    try:
        text = read_input(path, "--nodes-from").decode("utf-8")
    except OSError as e:
        raise UsageError(f"--nodes-from {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--nodes-from {path}: not UTF-8 text") from None
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _not_a_directory(path: str) -> str:
    """Why path (not a directory) cannot be a node root."""
    import errno
    import os

    try:
        os.stat(path)
    except OSError as e:
        reasons = {errno.ELOOP: "symlink loop", errno.EACCES: "permission denied"}
        return reasons.get(e.errno, "no such directory") if e.errno is not None else "no such directory"
    return "not a directory"


def open_transport(node: str, settings):
    """The transport for one node name ('localhost' or [] -> local)."""
    if node == LOCAL:
        import os

        from katactl.backends.local import LocalTransport

        root = settings.host_root
        if root and not os.path.isdir(root):
            raise UsageError(f"--host-root {root}: {_not_a_directory(root)}")
        return LocalTransport(root, node=LOCAL)
    if getattr(settings, "via", "ssh") == "kube":
        from katactl.backends.kubeexec import KubeExecTransport  # lazy: httpx, websocket

        return KubeExecTransport.from_settings(node, settings)
    from katactl.backends.ssh import SSHTransport  # lazy: paramiko

    return SSHTransport.from_settings(node, settings)


@dataclasses.dataclass
class FanOut:
    """Outcome of run_on_nodes: per-node values and errors, in node order."""

    nodes: list[str]
    values: dict[str, Any]
    errors: dict[str, KatactlError]
    #: a node selection was made (-N, --nodes-from, -l, @group), even one naming only
    #: localhost; None: inferred from the names (anything but this host alone)
    selected: bool | None = None

    @property
    def multi(self) -> bool:
        """The result's shape is the fleet's (a list, each item with its node): any selection,
        whatever it names, so `-N localhost` (an Ansible inventory's) is shaped like `-N a`."""
        if self.selected is not None:
            return self.selected or len(self.nodes) > 1
        return len(self.nodes) > 1 or self.nodes != [LOCAL]

    def error_items(self) -> list[dict]:
        return [{"node": n, "error": self.errors[n].to_dict()} for n in self.nodes if n in self.errors]

    def exit_code(self) -> int:
        return outcome_exit_code([exit_code_for(e) for e in self.errors.values()],
                                 len(self.nodes) - len(self.errors))

    def raise_if_single_failure(self) -> None:
        """The failure of a list command's only node, raised as the command's error where
        that is its shape: on this host (no node selected), and with a node selection in a
        human format (one line ``NODE: message`` and its hint on stderr, nothing on stdout).
        With a node selection in -o json/yaml/jsonl (configure(list_errors=True), the CLI's
        doing) nothing is raised: the command renders its ``<Kind>List`` with the node in
        ``errors``, the shape docs/output.md promises "even for one node", so a script reading
        ``.items``/``.errors`` does not break when a group shrinks to one host. The exit code
        is the same either way (outcome_exit_code of one failure is its code)."""
        if len(self.nodes) == 1 and self.errors and not (self.multi and _list_errors):
            self.raise_if_only_node_failed()

    def raise_if_only_node_failed(self) -> None:
        """With one node, its error *is* the command's error: named after the node (a -N
        alias whose HostName is an address is otherwise unrecognisable), as fan-out
        output names each node; -o json carries it as details.node. For commands whose
        result is one object whatever the selection (a sandbox found somewhere in it)."""
        if len(self.nodes) == 1 and self.errors:
            node = self.nodes[0]
            err = self.errors[node]
            if node != LOCAL and not err.details.get("node"):
                err.message = f"{node}: {err.message}"
                err.args = (err.message, *err.args[1:])
                err.details = {**err.details, "node": node}
            raise err

    def raise_if_none_answered(self, **details) -> None:
        """When no selected node answered, one error naming each node and its message (one
        node: raise_if_only_node_failed), with every node's error in ``details.nodes``; its
        exit code is theirs when they share it, else 1 (errors.outcome_exit_code). For a
        command that has nothing to show without an answer (a sandbox to find, a file it must
        not overwrite with nothing)."""
        if not self.errors or len(self.errors) < len(self.nodes):
            return
        self.raise_if_only_node_failed()
        errs = [(n, self.errors[n]) for n in self.nodes]
        err = KatactlError("; ".join(f"{n}: {e.message}" for n, e in errs)
                           + f" (none of the {len(errs)} selected nodes answered)",
                           hint=errs[0][1].hint if len({e.hint for _, e in errs}) == 1 else None,
                           details={**details, "nodes": {n: e.to_dict() for n, e in errs}})
        code = outcome_exit_code([exit_code_for(e) for _, e in errs], 0)
        err.exit_code = ExitCode(code)
        codes = {e.code for _, e in errs}
        err.code = codes.pop() if len(codes) == 1 else KatactlError.code
        raise err

    def items(self) -> list[dict]:
        """Flatten list results, tagging each item with its node."""
        out = []
        for n in self.nodes:
            if n not in self.values:
                continue
            v = self.values[n]
            for it in (v if isinstance(v, list) else [v]):
                if isinstance(it, dict):
                    it = {"node": n, **it}
                out.append(it)
        return out


def run_on_nodes(settings, fn: Callable[[Any], Any], *, nodes: list[str] | None = None,
                 selected: bool | None = None, progress=None) -> FanOut:
    """Call fn(transport) on every selected node, at most settings.parallel at once.

    Each failure is kept per node; nothing is raised, so one bad node never
    stops the others. ``progress(done, total)`` is called as nodes finish (in
    completion order, so a slow node does not freeze the counter); results are
    still reported in node order. Ctrl-C cancels the nodes not yet started.
    ``nodes`` (instead of the settings' selection) comes with ``selected``: whether it is one.
    """
    if nodes is None:
        picked = select_nodes(settings)
        nodes, selected = picked or [LOCAL], bool(picked)
    values: dict[str, Any] = {}
    errors: dict[str, KatactlError] = {}

    def one(node: str):
        try:
            with open_transport(node, settings) as t:
                return node, fn(t), None
        except KeyboardInterrupt:
            raise
        except Exception as e:  # each node's failure is data, not an abort
            err = as_katactl_error(e)
            if err is not e:
                # keep the original: -v shows its traceback (the one line stays the default)
                err.__cause__ = e
                log.debug("node %s: %s", node, err.message, exc_info=e)
            return node, None, err

    results: dict[str, tuple] = {}
    if len(nodes) == 1:
        results[nodes[0]] = one(nodes[0])
    else:
        ex = ThreadPoolExecutor(max_workers=max(1, min(int(settings.parallel), len(nodes))),
                                thread_name_prefix="katactl-node")
        try:
            futures = [ex.submit(one, n) for n in nodes]
            for i, f in enumerate(as_completed(futures), 1):
                r = f.result()
                results[r[0]] = r
                if progress:
                    progress(i, len(nodes))
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
    for node in nodes:
        _, value, err = results[node]
        if err is None:
            values[node] = value
        else:
            errors[node] = err
    return FanOut(nodes, values, errors, selected)


__all__ = ["run_on_nodes", "select_nodes", "open_transport", "FanOut", "validate_node_name",
           "LOCAL", "configure", "check_selector"]
