#!/usr/bin/env python3
"""Write man/katactl.1 and man/katactl-<group>.1 from katactl's command tree.

Typer >= 0.26 has its own Click copy, so click-man cannot read it; this walks
typer.main.get_command(app) and writes roff directly. Re-run after changing
commands; the test suite fails when man/ is stale.
Usage: python scripts/gen_man.py [--check]
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cmdtree  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fixed, so regenerating gives identical files (a date would make every run "stale").
DATE = "2026-11"

EXIT_CODES = [
    (0, "success, including \"already in the requested state\" (changed: false)"),
    (1, "the operation failed"),
    (2, "usage error: bad flag, argument or value"),
    (3, "target not found, or an ambiguous prefix"),
    (4, "partial failure: some nodes or targets failed, the rest succeeded"),
    (5, "refused by a safety check (override with --force where allowed)"),
    (6, "timed out waiting"),
    (7, "backend unreachable or authentication failed"),
    (8, "a check ran and found problems: audit, node check, node agent status (a node without a ready "
        "agent pod), overhead --fail-on, inspect pressure --fail-on, a rollout's check step"),
    (130, "interrupted"),
]


def esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n"))


def paragraphs(help_text: str) -> tuple[list[str], list[str]]:
    """Split a docstring into prose paragraphs and an Examples block."""
    prose, examples = [], []
    for block in re.split(r"\n\s*\n", help_text.strip()):
        lines = block.split("\n")
        if lines[0].strip() == "\b":
            lines = lines[1:]
        if lines and lines[0].strip().rstrip(":").lower() == "examples":
            examples.extend(line.strip() for line in lines[1:] if line.strip())
        elif block.strip() and block.strip() != "\b":
            if lines and lines[0] != "\b" and block.startswith("\b"):
                lines = lines[1:]
            prose.append(" ".join(line.strip() for line in lines if line.strip() != "\b"))
    return prose, examples


def options_section(node) -> list[str]:
    out = []
    for o in node.options:
        names = ", ".join(f"\\fB{esc(n)}\\fR" for n in o.names)
        meta = f" \\fI{esc(o.metavar)}\\fR" if o.metavar else ""
        out += [".TP", names + meta, esc(o.help or "-")]
    return out


def environment_section(root) -> list[str]:
    """KATACTL_<SETTING> for every setting, with the root flag that sets it (-N/--node is
    KATACTL_NODES: the one spelt differently)."""
    from katactl.config import SETTINGS, variable

    out = []
    for name, setting in SETTINGS.items():
        long = "--" + name.replace("_", "-")
        opt = next((o for o in root.options if long in o.names or long.rstrip("s") in o.names), None)
        flag = f" ({', '.join(opt.names)})" if opt else ""
        out += [".TP", f"\\fB{esc(variable(name))}\\fR", esc(setting.help + flag)]
    return out


def page(node, all_nodes) -> str:
    name = "-".join(node.path)
    out = [f'.TH "{name.upper()}" 1 "{DATE}" "katactl" "katactl manual"', ".SH NAME",
           f"{esc(name)} \\- {esc(node.short)}", ".SH SYNOPSIS"]
    subs = [n for n in all_nodes if n.path[: len(node.path)] == node.path]
    for n in subs:
        if n.children and n is not node:
            continue
        if n is node and n.children and len(node.path) > 1:
            continue
        out += [".PP", "\\fB" + esc(" ".join(n.path)) + "\\fR " + esc(" ".join(n.usage.split()[len(n.path):]))]
    prose, examples = paragraphs(node.help)
    out.append(".SH DESCRIPTION")
    for p in prose or [node.short]:
        out += [".PP", esc(p)]
    if node.options:
        out += [".SH OPTIONS"] + options_section(node)
    for n in subs:
        if n is node:
            continue
        p2, ex2 = paragraphs(n.help)
        out += [f'.SH "{esc(" ".join(n.path[1:]).upper())}"', ".PP", "\\fB" + esc(n.usage) + "\\fR"]
        for p in p2 or [n.short]:
            out += [".PP", esc(p)]
        real_opts = [o for o in n.options if o.names != ["-h", "--help"]]
        if real_opts:
            out += [".PP", "Options:", ".RS"] + options_section(n) + [".RE"]
        examples += ex2
    if len(node.path) == 1:
        out += [".SH COMMANDS"]
        for c in node.children:
            out += [".TP", f"\\fB{esc(c.path[-1])}\\fR", esc(c.short) + f" See \\fBkatactl\\-{esc(c.path[-1])}\\fR(1)."]
        out += [".SH ENVIRONMENT", ".PP", esc(
            "Each setting's variable is KATACTL_ and its name in capitals; flags win over the environment, the "
            "environment over the config file. Another KATACTL_* variable that looks like one (a typo, another "
            "case) is refused (exit 2); one like none is ignored with a warning.")]
        out += environment_section(node)
        out += [".TP", "\\fBKATACTL_CONFIG\\fR", "Config file path.", ".TP", "\\fBKATACTL_PROFILE\\fR",
                "Config profile (as \\-\\-profile).", ".TP", "\\fBNO_COLOR\\fR", "Disable colour."]
        out += [".SH FILES", ".TP", "\\fI$XDG_CONFIG_HOME/katactl/config.toml\\fR",
                "Settings and profiles (node groups, SSH user/key/jump host, kube context).", ".TP",
                "\\fI$XDG_STATE_HOME/katactl/audit.log\\fR", "Audit log of changes (JSON lines)."]
    out += [".SH EXIT STATUS"]
    for code, meaning in EXIT_CODES:
        out += [".TP", f"\\fB{code}\\fR", esc(meaning)]
    if examples:
        out += [".SH EXAMPLES", ".nf"] + [esc(e) for e in examples] + [".fi"]
    see = ["katactl(1)"] if len(node.path) > 1 else [f"katactl-{c.path[-1]}(1)" for c in node.children]
    out += [".SH SEE ALSO", esc(", ".join(see))]
    return "\n".join(out) + "\n"


def generate() -> dict[str, str]:
    root = cmdtree.tree()
    nodes = list(cmdtree.walk(root))
    pages = {"katactl.1": page(root, nodes)}
    for c in root.children:
        pages[f"katactl-{c.path[-1]}.1"] = page(c, nodes)
    return pages


def main(argv: list[str]) -> int:
    return cmdtree.sync_files(os.path.join(ROOT, "man"), generate(), check="--check" in argv,
                              script="gen_man.py", prune_suffix=".1")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
