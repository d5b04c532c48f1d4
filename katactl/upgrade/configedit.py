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
#: the host files of a ``[hypervisor.*]`` table that the Go runtime resolves when it loads the
#: configuration (src/runtime/pkg/katautils/config.go: ``path()``, ``jailerPath()``,
#: ``firmware()``, ``firmwareVolume()`` call ResolvePath, which fails for a missing file), so
#: one missing fails every new sandbox, as a missing guest asset does
HOST_FILE_KEYS = ("path", "jailer_path", "firmware", "firmware_volume")
_SECTION = re.compile(r"^\s*\[\s*([^\]\s]+)\s*\]")


def _key_value(keys: tuple[str, ...]) -> re.Pattern:
    return re.compile(r'^(\s*)(' + "|".join(keys) + r')(\s*=\s*)"([^"]*)"(.*)$')


_ASSET = _key_value(ASSET_KEYS)
#: an image-bound key, bare or quoted (TOML quoted keys are the same key)
_BOUND = re.compile(r"""^\s*(["']?)(""" + "|".join(IMAGE_BOUND_KEYS) + r")\1\s*=")


class EditError(ValueError):
    """set_agent's result is not the intended edit of the file (the caller refuses)."""


def rebase(text: str, prefix: str, release_path: str) -> str:
    pat = re.compile(r'(["\'])' + re.escape(prefix.rstrip("/")) + r'/(?!releases/)')
    return pat.sub(lambda m: m.group(1) + release_path.rstrip("/") + "/", text)


def asset_refs(text: str, keys: tuple[str, ...] = ASSET_KEYS) -> list[tuple[str, str, str]]:
    """(section, key, value) for every non-empty guest asset (or other ``keys``) in a
    hypervisor section."""
    pat = _ASSET if keys == ASSET_KEYS else _key_value(keys)
    out = []
    section = ""
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        a = pat.match(line)
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
    value is unknown: the caller refuses rather than pair an image with another's hash).
    EditError when the new text, parsed, is not exactly that edit (see _verify)."""
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
            present.add((section, b.group(2)))
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
        new_text = "".join(lines)
        _verify(text, new_text, {})
        return new_text, changed, []
    want = {sec: bound(sec) for sec in moved}
    unknown = sorted(sec for sec, vals in want.items() if vals is None
                     and any((sec, k) in present for k in IMAGE_BOUND_KEYS))
    out: list[str] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
        vals = want.get(section)
        b = _BOUND.match(line)
        if b and section in want and vals is not None:
            end = _value_end(lines, i, b.end())
            if b.group(2) in vals:
                out.append(_assign(lines[end], b.group(2), vals[b.group(2)], like_indent=line))
            i = end + 1
            continue  # set above, or the new image has none: the value (all its lines) goes
        out.append(line)
        if moved.get(section) == i and vals:
            if not line.endswith(("\n", "\r")):  # the file's last line: end it before adding
                out[-1] = line + "\n"
            out += [_assign(line, k, v) for k, v in vals.items() if (section, k) not in present]
        i += 1
    new_text = "".join(out)
    _verify(text, new_text, want)
    return new_text, changed, unknown


def _value_end(lines: list[str], i: int, col: int, limit: int = 10000) -> int:
    """The index of the last line of the value that starts at ``lines[i][col:]``: a TOML
    multi-line basic or literal string, or an array, spans several lines. The first run of
    lines that parses as a value is its span; i itself when none does (_verify refuses then)."""
    import tomllib

    text = lines[i][col:]
    for j in range(i, min(len(lines), i + limit)):
        if j > i:
            text += lines[j]
        try:
            tomllib.loads("v =" + text)
        except tomllib.TOMLDecodeError:
            continue
        return j
    return i


def _flat(d: dict, at: tuple = ()) -> dict[tuple, object]:
    out: dict[tuple, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, at + (k,)))
        else:
            out[at + (k,)] = v
    return out


def _verify(old: str, new: str, want: dict) -> None:
    """EditError unless ``new`` is ``old`` with only the guest assets and image-bound keys
    of the ``[hypervisor.*]`` tables changed, and each edited table's image-bound keys exactly
    ``want``'s (unchanged where unknown): a line-level edit must never leave a file the
    runtime cannot parse, a duplicate or lost key, or an image paired with another's hash.
    A file that was not TOML before is left to the line edit (nothing to compare with)."""
    import tomllib

    try:
        before = tomllib.loads(old)
    except (tomllib.TOMLDecodeError, RecursionError):
        return
    try:
        after = tomllib.loads(new)
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise EditError(f"the edited file would not be valid TOML ({e})") from None
    fb, fa = _flat(before), _flat(after)
    editable = set(ASSET_KEYS) | set(IMAGE_BOUND_KEYS)
    odd = sorted(".".join(map(str, k)) for k in fb.keys() | fa.keys() if fb.get(k) != fa.get(k)
                 and not (len(k) == 3 and k[0] == "hypervisor" and k[2] in editable))
    if odd:
        raise EditError(f"the edit would change {', '.join(odd[:5])}")
    for sec, vals in want.items():
        parts = tuple(sec.split("."))
        got = {k: fa[parts + (k,)] for k in IMAGE_BOUND_KEYS if parts + (k,) in fa}
        exp = {k: fb[parts + (k,)] for k in IMAGE_BOUND_KEYS if parts + (k,) in fb} if vals is None else vals
        if got != exp:
            raise EditError(f"[{sec}] would have {', '.join(IMAGE_BOUND_KEYS)} {got or 'unset'}, "
                            f"not the image's own {exp or 'none'}")


def _assign(like: str, key: str, value: str, like_indent: str | None = None) -> str:
    """``key = "value"``, indented like the line ``like_indent`` (default ``like``) and ended
    like ``like`` (a TOML basic string: JSON's escapes are valid TOML ones)."""
    import json

    src = like if like_indent is None else like_indent
    indent = src[:len(src) - len(src.lstrip())]
    eol = like[len(like.rstrip("\r\n")):] or "\n"
    return f"{indent}{key} = {json.dumps(value)}{eol}"
