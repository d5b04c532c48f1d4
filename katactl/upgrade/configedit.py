"""Line-level edits of Kata configuration TOML files (comments and layout kept).

Two edits:
- ``rebase``: at stage time, every quoted string starting with the kata-static
  install prefix (``"/opt/kata/...``) is pointed into the release itself
  (``"/opt/kata/releases/<v>/..."``), so a release's configuration names its
  own shim-side binaries and guest assets, and running sandboxes' persist.json
  records say which release they came from.
- ``set_agent``: the guest assets (``kernel``, ``image``, ``initrd`` in
  ``[hypervisor.*]``) pointed at another release's files of the same name.
"""
from __future__ import annotations

import re

ASSET_KEYS = ("kernel", "image", "initrd")
_SECTION = re.compile(r"^\s*\[\s*([^\]\s]+)\s*\]")
_ASSET = re.compile(r'^(\s*)(' + "|".join(ASSET_KEYS) + r')(\s*=\s*)"([^"]*)"(.*)$')


def rebase(text: str, prefix: str, release_path: str) -> str:
    pat = re.compile(r'(["\'])' + re.escape(prefix.rstrip("/")) + r'/(?!releases/)')
    return pat.sub(lambda m: m.group(1) + release_path.rstrip("/") + "/", text)


def asset_refs(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every non-empty guest asset in a hypervisor section."""
    out = []
    section = ""
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        a = _ASSET.match(line)
        if a and section.startswith("hypervisor.") and a.group(4):
            out.append((section, a.group(2), a.group(4)))
    return out


def set_agent(text: str, mapper) -> tuple[str, list[str]]:
    """Rewrite asset values with mapper(value) -> new value | None (keep).

    Returns (new text, list of new values)."""
    lines = text.splitlines(keepends=True)
    section = ""
    changed: list[str] = []
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        a = _ASSET.match(line.rstrip("\r\n"))
        if not (a and section.startswith("hypervisor.") and a.group(4)):
            continue
        new = mapper(a.group(4))
        if new is None or new == a.group(4):
            continue
        eol = line[len(line.rstrip("\r\n")):]
        lines[i] = f'{a.group(1)}{a.group(2)}{a.group(3)}"{new}"{a.group(5)}{eol}'
        changed.append(new)
    return "".join(lines), changed
