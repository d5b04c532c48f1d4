"""Line-level edits of Kata configuration TOML files (comments and layout kept).

Two edits:
- ``rebase``: at stage time, every quoted string starting with the kata-static
  install prefix (``"/opt/kata/...``) is pointed into the release itself
  (``"/opt/kata/releases/<v>/..."``), so a release's configuration names its
  own shim-side binaries and guest assets, and running sandboxes' persist.json
  records say which release they came from.
- ``set_agent``: the guest assets (``kernel``, ``image``, ``initrd`` in
  ``[hypervisor.*]``) pointed at another release's files of the same name, and the keys
  bound to the image (IMAGE_BOUND_KEYS) set to that release's own values.
"""
from __future__ import annotations

import re

ASSET_KEYS = ("kernel", "image", "initrd")
#: keys that describe one particular image, so they move with it: kata-static bakes each
#: release's dm-verity root hash of its image into its own configurations
#: (tools/packaging/static-build/shim-v2/build.sh: ``KERNELVERITYPARAMS`` from
#: ``root_hash_<variant>.txt``, "a single kernel_verity_params line"), and the runtime builds
#: the guest's dm-verity command line from it: another image's hash and the guest does not boot
IMAGE_BOUND_KEYS = ("kernel_verity_params",)
_SECTION = re.compile(r"^\s*\[\s*([^\]\s]+)\s*\]")
_ASSET = re.compile(r'^(\s*)(' + "|".join(ASSET_KEYS) + r')(\s*=\s*)"([^"]*)"(.*)$')
_BOUND = re.compile(r"^\s*(" + "|".join(IMAGE_BOUND_KEYS) + r")\s*=")


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


def image_bound(text: str) -> dict[str, dict[str, str]] | None:
    """``{section: {key: value}}`` of the image-bound keys of every ``[hypervisor.*]`` table
    (``{}`` for a table without any); None when the text is not TOML."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        return None
    hv = data.get("hypervisor")
    if not isinstance(hv, dict):
        return {}
    return {f"hypervisor.{name}": {k: t[k] for k in IMAGE_BOUND_KEYS if isinstance(t.get(k), str)}
            for name, t in hv.items() if isinstance(t, dict)}


def set_agent(text: str, mapper, bound=None) -> tuple[str, list[str], list[str]]:
    """Rewrite asset values with mapper(value) -> new value | None (keep). In each section
    where the mapper takes the assets (returns a value), the image-bound keys are set to
    ``bound(section)``: a dict (a key it lacks is removed, one it has is set or added after
    the last asset line), or None when unknown (the lines are kept).

    Returns (new text, list of new values, sections that hold an image-bound key whose new
    value is unknown: the caller refuses rather than pair an image with another's hash)."""
    lines = text.splitlines(keepends=True)
    section = ""
    changed: list[str] = []
    moved: dict[str, int] = {}  # section -> index of its last asset line
    present: set[tuple[str, str]] = set()
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        b = _BOUND.match(line)
        if b:
            present.add((section, b.group(1)))
        a = _ASSET.match(line.rstrip("\r\n"))
        if not (a and section.startswith("hypervisor.") and a.group(4)):
            continue
        new = mapper(a.group(4))
        if new is None:
            continue
        moved[section] = i
        if new == a.group(4):
            continue
        eol = line[len(line.rstrip("\r\n")):]
        lines[i] = f'{a.group(1)}{a.group(2)}{a.group(3)}"{new}"{a.group(5)}{eol}'
        changed.append(new)
    if bound is None or not moved:
        return "".join(lines), changed, []
    want = {sec: bound(sec) for sec in moved}
    unknown = sorted(sec for sec, vals in want.items() if vals is None
                     and any((sec, k) in present for k in IMAGE_BOUND_KEYS))
    out: list[str] = []
    section = ""
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
        vals = want.get(section)
        b = _BOUND.match(line)
        if b and section in want and vals is not None:
            if b.group(1) in vals:
                out.append(_assign(line, b.group(1), vals[b.group(1)]))
            continue  # set above, or the new image has none: the line goes
        out.append(line)
        if moved.get(section) == i and vals:
            if not line.endswith(("\n", "\r")):  # the file's last line: end it before adding
                out[-1] = line + "\n"
            out += [_assign(line, k, v) for k, v in vals.items() if (section, k) not in present]
    return "".join(out), changed, unknown


def _assign(like: str, key: str, value: str) -> str:
    """``key = "value"``, indented and ended like the line ``like`` (a TOML basic string:
    JSON's escapes are valid TOML ones)."""
    import json

    indent = like[:len(like) - len(like.lstrip())]
    eol = like[len(like.rstrip("\r\n")):] or "\n"
    return f"{indent}{key} = {json.dumps(value)}{eol}"
