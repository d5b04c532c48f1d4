"""Walk katactl's command tree (all lazy groups loaded) for the doc generators."""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Opt:
    names: list[str]
    metavar: str | None  # None = flag
    help: str
    choices: list[str] | None = None


@dataclasses.dataclass
class Node:
    path: list[str]
    help: str
    short: str
    options: list[Opt]
    arguments: list[str]
    children: list["Node"]
    usage: str

    @property
    def name(self) -> str:
        return " ".join(self.path)


def tree() -> Node:
    import typer

    from katactl.cli import REGISTRY, app

    root_cmd = typer.main.get_command(app)
    return _node(root_cmd, ["katactl"], REGISTRY, root_cmd)


def _node(cmd, path, registry=None, root=None) -> Node:
    import typer._click as click

    ctx = click.Context(cmd, info_name=path[-1])
    opts, args = [], []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "option":
            names = list(p.opts) + list(p.secondary_opts)
            rec = p.get_help_record(ctx)
            decl = rec[0] if rec else ", ".join(names)
            metavar = None if (p.is_flag or p.count) else (decl.rsplit(" ", 1)[-1] if " " in decl else "VALUE")
            choices = None
            if metavar and metavar.startswith("[") and "|" in metavar:
                choices = metavar.strip("[]").split("|")
            opts.append(Opt(names, metavar, (p.help or "").strip(), choices))
        else:
            args.append((p.metavar or p.name or "ARG").upper())
    opts.append(Opt(["-h", "--help"], None, "Show help and exit."))
    children = []
    if registry is not None:
        for name in registry:
            sub = cmd.get_command(ctx, name)
            children.append(_node(sub, path + [name]))
    elif hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            if not getattr(sub, "hidden", False):
                children.append(_node(sub, path + [name]))
    help_text = (cmd.help or "").strip()
    short = (cmd.short_help or help_text.split("\n\n")[0].replace("\n", " ")).strip()
    if registry is None and root is None and len(path) == 2:
        from katactl.cli import REGISTRY

        short = REGISTRY[path[1]].help
    pieces = cmd.collect_usage_pieces(ctx)
    usage = " ".join(path + pieces)
    return Node(path, help_text, short, opts, args, children, usage)


def walk(node: Node):
    yield node
    for c in node.children:
        yield from walk(c)


def sync_files(directory: str, files: dict[str, str], *, check: bool, script: str,
               prune_suffix: str | None = None) -> int:
    """Write generated ``files`` into directory (or, with check, only report
    stale ones). Files ending in prune_suffix that are no longer generated go."""
    stale = []
    existing = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    if prune_suffix:
        for extra in sorted(f for f in existing - set(files) if f.endswith(prune_suffix)):
            stale.append(extra)
            if not check:
                os.unlink(os.path.join(directory, extra))
    for name, text in files.items():
        path = os.path.join(directory, name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(name)
            if not check:
                with open(path, "w") as f:
                    f.write(text)
    if check and stale:
        print(f"stale in {directory}: {', '.join(stale)} (run scripts/{script})", file=sys.stderr)
        return 1
    return 0
