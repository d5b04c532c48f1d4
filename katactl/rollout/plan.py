"""A rollout plan: which nodes, in which batches, through which steps, under
which policy. Computed once (``rollout plan`` prints it, ``rollout run`` stores
it with the state) and never recomputed on resume, so a resumed rollout does
exactly what was planned.

Plan files (``-f PLAN.yaml``, YAML or JSON) carry the same fields as the flags;
see docs/rollout.md.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

from katactl.errors import UsageError
from katactl.rollout.policy import Policy, short_repr
from katactl.rollout.steps import REGISTRY, Step, parse_step

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")
BACKENDS = ("auto", "kube", "file")

#: plan-file keys -> their flag
FILE_KEYS = {
    "apiVersion": None, "kind": None, "name": None,
    "selector": "-l", "nodes": "-N", "nodesFrom": "--nodes-from", "steps": "--step",
    "lockNamespace": "--lock-namespace", "stateBackend": "--state", "lockTTL": "--lock-ttl",
    "policy": None,
}
POLICY_KEYS = {
    "maxUnavailable": "--max-unavailable", "canary": "--canary", "canarySoak": "--canary-soak",
    "batchGrowth": "--batch-growth", "soak": "--soak", "failureBudget": "--failure-budget",
    "onFailure": "--on-failure", "windows": "--window", "alertGate": "--alert-gate",
    "alertFilters": "--alert-filter", "spreadBy": "--spread-by", "stepTimeout": "--step-timeout",
    "gateTimeout": "--gate-timeout", "poll": "--poll",
}


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid rollout name {short_repr(name)}: lowercase letters, digits and '-', "
                         "at most 40 characters, starting and ending with a letter or digit")
    return name


def load_file(path: str) -> dict:
    """A plan file: a mapping with the keys above (unknown keys are exit 2, named)."""
    from katactl.config import read_input

    try:
        raw = read_input(path, "-f")
    except OSError as e:
        raise UsageError(f"-f {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"-f {path}: not UTF-8 text") from None
    import yaml

    try:
        d = yaml.load(text, Loader=_unique_keys_loader())  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UsageError(f"-f {path}: not a valid YAML or JSON plan{where}: "
                         f"{getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise UsageError(f"-f {path}: nested too deeply") from None
    if not isinstance(d, dict):
        raise UsageError(f"-f {path}: a plan file is a mapping (apiVersion, kind, name, steps, policy, ...), "
                         f"not {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in FILE_KEYS)
    if unknown:
        raise UsageError(f"-f {path}: unknown key(s) {', '.join(unknown)} "
                         f"(known: {', '.join(FILE_KEYS)})")
    if d.get("kind") not in (None, "RolloutPlan"):
        raise UsageError(f"-f {path}: kind must be RolloutPlan, not {short_repr(d.get('kind'))}")
    if d.get("apiVersion") not in (None, "katactl/v1"):
        raise UsageError(f"-f {path}: apiVersion must be katactl/v1, not {short_repr(d.get('apiVersion'))}")
    pol = d.get("policy")
    if pol is None:
        d["policy"] = {}
    elif not isinstance(pol, dict):
        raise UsageError(f"-f {path}: policy must be a mapping")
    else:
        unknown = sorted(str(k) for k in pol if k not in POLICY_KEYS)
        if unknown:
            raise UsageError(f"-f {path}: unknown policy key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(POLICY_KEYS)})")
    steps = d.get("steps")
    if steps is not None and (not isinstance(steps, list) or not all(isinstance(s, str) for s in steps)):
        raise UsageError(f"-f {path}: steps must be a list of strings (each a step as typed)")
    for k in ("selector", "nodesFrom", "lockNamespace", "stateBackend", "name"):
        if d.get(k) is not None and not isinstance(d[k], str):
            raise UsageError(f"-f {path}: {k} must be a string")
    if d.get("selector"):
        from katactl.fleet import check_selector

        check_selector(d["selector"], f"-f {path}: selector")  # exit 2 before the API is asked
    nodes = d.get("nodes")
    if nodes is not None and (not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes)):
        raise UsageError(f"-f {path}: nodes must be a list of node names")
    return d


def _unique_keys_loader():
    """yaml.SafeLoader refusing a mapping key given twice (YAML 1.2, 3.2.1.1: keys are
    unique; go-yaml v3 decode.go d.uniqueKeys: "mapping key %#v already defined at line
    %d"), where PyYAML keeps the last: a merge conflict's second ``maxUnavailable`` would
    silently win. JSON plans are read by the same loader (JSON is YAML), so theirs too.
    Keys a ``<<`` merge brings may still be overridden, as YAML's merge type allows.
    Refuses a document whose aliases make most of it (a "billion laughs": _check_aliasing)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            _check_aliasing(node)
            return node

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:
                        continue  # unhashable: the base method refuses it
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"mapping key {short_repr(key)} already defined at line {first + 1}",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _allowed_alias_ratio(decodes: int) -> float:
    """go-yaml v3 decode.go allowedAliasRatio: 99% of a document may come from aliases up to
    400,000 nodes decoded, scaling down to 10% at 4,000,000."""
    low, high = 400_000, 4_000_000
    if decodes <= low:
        return 0.99
    if decodes >= high:
        return 0.10
    return 0.99 - 0.89 * (decodes - low) / (high - low)


def _check_aliasing(root) -> None:
    """Refuse a composed YAML document as go-yaml v3 does when it decodes it into an
    ``interface{}`` (yaml/v3 decode.go): "anchor '%s' value contains itself" (decoder.alias),
    and "document contains excessive aliasing" (decoder.unmarshal). Every decode adds one to
    decodeCount, and one made under an alias (aliasDepth > 0) one to aliasCount; the alias node
    itself is a decode at its own depth. After each decode, more than 100 aliased, more than
    1,000 in all, at a ratio above _allowed_alias_ratio, refuses. So 1,200 aliases of a scalar
    are 1,200 aliased of ~2,400: accepted; and aliases that make most of the document so far
    are refused then, whatever follows them. The walk follows go-yaml's order: a mapping's
    keys and values, then its merge (decoder.merge: the parent's keys decoded again unless
    already merging; a key already set skips its value). PyYAML shares an aliased node, so
    loading stays cheap, but anything that walks the value (a message's repr(), str())
    expands it: ~600 bytes made 9^9 scalars. The walk stops at go-yaml's limit, so it costs
    what go-yaml's decode would (at most ~1.2 million steps, whatever the document)."""
    import yaml

    def children(n):
        if isinstance(n, yaml.SequenceNode):
            return n.value
        if isinstance(n, yaml.MappingNode):
            return [x for kv in n.value for x in kv]
        return ()

    # PyYAML's composer returns an alias as its anchor's node: in document order a node's
    # first place is where it is written, any later one an alias (YAML anchors come first)
    aliases: set[tuple[int, int]] = set()  # (id(parent), index in children(parent))
    seen: set[int] = {id(root)}
    on_path: set[int] = {id(root)}
    walk = [(root, iter(enumerate(children(root))))]
    while walk:  # iterative: a deep document is no RecursionError here
        parent, it = walk[-1]
        nxt = next(it, None)
        if nxt is None:
            on_path.discard(id(parent))
            walk.pop()
            continue
        i, c = nxt
        if id(c) in on_path:
            raise yaml.composer.ComposerError(None, None, "an anchor's value contains itself", c.start_mark)
        if id(c) in seen:
            aliases.add((id(parent), i))
        else:
            seen.add(id(c))
            on_path.add(id(c))
            walk.append((c, iter(enumerate(children(c)))))

    count = {"decodes": 1, "aliased": 0, "depth": 0}  # decodes: the DocumentNode's

    def key_of(n):
        return (n.tag, n.value) if isinstance(n, yaml.ScalarNode) else id(n)

    def unmarshal(n, merged: set | None, is_alias: bool):
        """decode.go decoder.unmarshal; ``merged`` is d.mergedFields. Yields the decodes it makes."""
        count["decodes"] += 1
        if count["depth"]:
            count["aliased"] += 1
        d, a = count["decodes"], count["aliased"]
        if a > 100 and d > 1000 and a / d > _allowed_alias_ratio(d):
            raise yaml.composer.ComposerError(
                None, None, f"document contains excessive aliasing ({a} of {d} nodes decoded came from aliases)",
                None)
        if is_alias:  # decoder.alias: its anchor's node, one level deeper
            count["depth"] += 1
            yield n, merged, False
            count["depth"] -= 1
        elif isinstance(n, yaml.SequenceNode):
            for i, c in enumerate(n.value):
                yield c, merged, (id(n), i) in aliases
        elif isinstance(n, yaml.MappingNode):
            merge = None
            for i, (k, v) in enumerate(n.value):
                if k.tag == "tag:yaml.org,2002:merge":
                    merge = (v, (id(n), 2 * i + 1) in aliases)
                    continue
                yield k, None, (id(n), 2 * i) in aliases
                if merged is not None:
                    if key_of(k) in merged:
                        continue
                    merged.add(key_of(k))
                yield v, None, (id(n), 2 * i + 1) in aliases
            if merge is not None:  # decoder.merge
                m = merged
                if m is None:
                    m = set()
                    for i, (k, _) in enumerate(n.value):
                        yield k, m, (id(n), 2 * i) in aliases
                        m.add(key_of(k))
                v, v_alias = merge
                if isinstance(v, yaml.SequenceNode) and not v_alias:
                    for i, c in enumerate(v.value):
                        yield c, m, (id(v), i) in aliases
                else:  # a mapping, or an alias of one (else the constructor refuses it)
                    yield v, m, v_alias

    stack = [unmarshal(root, None, False)]
    while stack:  # go-yaml recurses; here a stack of generators, so an alias chain cannot overflow
        call = next(stack[-1], None)
        if call is None:
            stack.pop()
        else:
            stack.append(unmarshal(*call))


def parse_steps(texts: list[str]) -> list[Step]:
    if not texts:
        raise UsageError("a rollout needs at least one --step (e.g. --step cordon --step 'upgrade switch 3.10.0')")
    return [parse_step(t) for t in texts]


def check_uncordon_steps(steps: list[Step]) -> None:
    """A new plan's ``uncordon`` step undoes the rollout's own cordon only (its record's id):
    one with no step before it that cordons (cordon, drain, ...) could only uncordon a node
    someone else cordoned, which katactl never does (design.md): exit 2. Not for a stored
    plan (resume, abort): there the step itself does nothing without the node's cordonId."""
    for i, s in enumerate(steps):
        if s.definition.name == "uncordon" and not any(p.definition.cordons for p in steps[:i]):
            cordoning = ", ".join(n for n, d in REGISTRY.items() if d.cordons)
            raise UsageError(f"step {i + 1} '{s.text}': uncordon undoes only a cordon this rollout made, and no "
                             f"step before it cordons ({cordoning}): remove it, or add a cordon step before it")


def lock_ttl(flag: str | None, file_value) -> float:
    """--lock-ttl, else the plan file's lockTTL, else 60s: at least 3s (the Lease is renewed
    every third of it). A file's 0 is refused like the flag's, not taken for "unset"."""
    from katactl.rollout.policy import _dur

    given = flag if flag is not None else file_value
    if given is None:
        return 60.0
    ttl = _dur(given, "--lock-ttl", allow_zero=False)
    if ttl < 3:
        raise UsageError(f"invalid --lock-ttl {short_repr(given)}: at least 3s")
    return ttl


def needs_kube(steps: list[Step]) -> bool:
    return any(s.kind == "kube" for s in steps)


@dataclasses.dataclass
class NodeInfo:
    name: str
    zone: str | None = None
    unschedulable: bool = False
    ready: bool = True

    @property
    def out(self) -> bool:
        """Out of service: unschedulable or not Ready."""
        return self.unschedulable or not self.ready


def node_infos(api, names: list[str] | None, selector: str | None, spread_by: str | None,
               meta: dict | None = None) -> list[NodeInfo]:
    """Nodes of the selection with their zone and availability, from the API (one paged list;
    ``meta`` receives its metadata: the resourceVersion a watch of them can start from)."""
    from katactl.errors import NotFound

    wanted = set(names or [])
    out: dict[str, NodeInfo] = {}
    for page in api.list_pages("/api/v1/nodes", meta=meta, labelSelector=selector if not names else None):
        for n in page:
            name = n["metadata"]["name"]
            if names and name not in wanted:
                continue
            out[name] = info_of(n, spread_by)
    if names:
        missing = [n for n in names if n not in out]
        if missing:
            raise NotFound(f"node(s) not found: {', '.join(missing)}")
        return [out[n] for n in names]
    if not out:
        raise NotFound(f"no node matches selector {selector!r}" if selector else "the cluster has no nodes")
    return [out[k] for k in sorted(out)]


def info_of(node: dict, spread_by: str | None) -> NodeInfo:
    labels = (node.get("metadata") or {}).get("labels") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in (node.get("status") or {}).get("conditions") or [])
    return NodeInfo(node["metadata"]["name"], labels.get(spread_by) if spread_by else None,
                    bool((node.get("spec") or {}).get("unschedulable")), ready)


def batch_sizes(total: int, policy: Policy) -> list[int]:
    """Sizes of the batches: the canary alone first, then max-unavailable at a time
    (1, 2, 4, ... up to it with --batch-growth)."""
    mu = policy.max_unavailable.of(total, at_least_one=True)
    sizes: list[int] = []
    left = total
    if policy.canary and left:
        sizes.append(min(policy.canary, left))
        left -= sizes[-1]
    size = 1 if policy.batch_growth else mu
    while left > 0:
        b = min(size, mu, left)
        sizes.append(b)
        left -= b
        if policy.batch_growth:
            size = min(size * 2, mu)
    return sizes


def make_batches(infos: list[NodeInfo], policy: Policy) -> list[list[str]]:
    """Split the nodes into batches. Nodes already out of service go first (doing
    them costs no availability); with --spread-by, a batch of b nodes takes at most
    ceil(b * remaining-in-zone / remaining) from one zone."""
    order = sorted(range(len(infos)), key=lambda i: (not infos[i].out, i))
    pool = [infos[i] for i in order]
    batches: list[list[str]] = []
    if not policy.spread_by:
        at = 0
        for b in batch_sizes(len(pool), policy):
            batches.append([n.name for n in pool[at:at + b]])
            at += b
        return batches
    # each zone's remaining nodes in pool order (out-of-service ones first), kept across the
    # batches: a batch takes from their fronts (linear, where rebuilding them per batch was
    # quadratic: 35 s for 120,000 nodes)
    queues: dict[str | None, collections.deque[NodeInfo]] = {}
    for n in pool:
        queues.setdefault(n.zone, collections.deque()).append(n)
    left = len(pool)
    for b in batch_sizes(len(pool), policy):
        cap = {z: math.ceil(b * len(q) / left) for z, q in queues.items()}
        # round robin over the zones (largest first), each up to its cap
        order_z = sorted(queues, key=lambda z: (not queues[z][0].out, -len(queues[z]), str(z)))
        taken: list[NodeInfo] = []
        while len(taken) < b:
            progressed = False
            for z in order_z:
                if len(taken) == b:
                    break
                if cap[z] > 0 and queues[z]:
                    taken.append(queues[z].popleft())
                    cap[z] -= 1
                    progressed = True
            if not progressed:
                break
        for z in [z for z, q in queues.items() if not q]:
            del queues[z]
        left -= len(taken)
        batches.append([n.name for n in taken])
    return batches


#: what Plan.from_dict raises on a stored plan of the wrong shape (hand-edited) past what
#: store.check_state checks, rather than the UsageError of a value it refuses
SHAPE_ERRORS = (ValueError, KeyError, TypeError, AttributeError)


def shape_error(e: BaseException) -> str:
    """One of SHAPE_ERRORS in a message: "KeyError 'backend'" (bounded)."""
    return f"{type(e).__name__} {short_repr(e.args[0] if len(e.args) == 1 else e.args)}"


@dataclasses.dataclass
class Plan:
    name: str
    nodes: list[NodeInfo]
    steps: list[Step]
    policy: Policy
    batches: list[list[str]]
    backend: str                     # "kube" or "file"
    lock_namespace: str = "kube-system"
    lock_ttl: float = 60.0
    selection: dict = dataclasses.field(default_factory=dict)
    #: the resourceVersion of the node list ``nodes`` came from (None: a stored plan): the
    #: run's node view watches from there instead of listing them again (engine.Engine.run)
    listed_at: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def max_unavailable(self) -> int:
        return self.policy.max_unavailable.of(len(self.nodes), at_least_one=True)

    @property
    def failure_budget(self) -> int:
        return self.policy.failure_budget.of(len(self.nodes), at_least_one=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "backend": self.backend, "lockNamespace": self.lock_namespace,
                "lockTTL": self.lock_ttl, "selection": self.selection,
                "steps": [s.text for s in self.steps], "policy": self.policy.to_dict(),
                "maxUnavailable": self.max_unavailable, "failureBudget": self.failure_budget,
                "batches": self.batches,
                "nodes": {n.name: {"zone": n.zone, "unschedulable": n.unschedulable, "ready": n.ready}
                          for n in self.nodes}}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """A stored plan (resume): the same steps, policy and batches."""
        p = d["policy"]
        pol = Policy.from_dict({**p, "canarySoak": p.get("canarySoak"), "spreadBy": p.get("spreadBy") or ""},
                               stored=True)
        nodes = [NodeInfo(k, v.get("zone"), v.get("unschedulable", False), v.get("ready", True))
                 for k, v in d["nodes"].items()]
        return cls(d["name"], nodes, [parse_step(s) for s in d["steps"]], pol, d["batches"], d["backend"],
                   d.get("lockNamespace", "kube-system"), d.get("lockTTL", 60.0), d.get("selection") or {})

    @classmethod
    def for_abort(cls, d: dict, warn) -> "Plan":
        """The stored plan as abort needs it: from_dict, or, when that no longer validates (a
        step a later katactl refuses, a time zone gone from tzdata, a field hand-edited away),
        its nodes, batches and lock under the default policy, a step that no longer parses
        standing as one that cordons: abort restores from the nodes' cordon records (the ids
        the state saved), never from the steps, so it still uncordons exactly what the rollout
        cordoned. ``d`` passed store.check_state (name, nodes, batches and steps have their
        shape); the fields it does not check fall back to their defaults here."""
        try:
            return cls.from_dict(d)
        except (UsageError, *SHAPE_ERRORS) as e:
            why = e.message if isinstance(e, UsageError) else shape_error(e)
            warn(f"the stored plan of rollout {d.get('name')} no longer validates ({why}): "
                 "aborting it from its nodes' cordon records")
        steps = []
        for text in d.get("steps") or []:
            try:
                steps.append(parse_step(text))
            except UsageError:
                steps.append(parse_step("cordon"))
        nodes = [NodeInfo(k, v.get("zone"), v.get("unschedulable", False), v.get("ready", True))
                 for k, v in d["nodes"].items()]
        ns, ttl, sel = d.get("lockNamespace"), d.get("lockTTL"), d.get("selection")
        return cls(d["name"], nodes, steps, Policy(), d["batches"], d.get("backend") or "kube",
                   ns if isinstance(ns, str) and ns else "kube-system",
                   float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl >= 3 else 60.0,
                   sel if isinstance(sel, dict) else {})

    def describe_nodes(self) -> list[dict]:
        """One row per node: batch, zone, state now, and what it will go through."""
        where = {n: i for i, b in enumerate(self.batches) for n in b}
        rows: list[dict[str, Any]] = []
        for n in self.nodes:
            b = where[n.name]
            rows.append({"name": n.name, "batch": b + 1, "canary": bool(self.policy.canary) and b == 0,
                         "zone": n.zone, "unschedulable": n.unschedulable, "ready": n.ready,
                         "steps": [s.text for s in self.steps]
                         + (["(uncordon if the rollout cordoned it)"] if any(s.definition.cordons for s in self.steps)
                            and not n.unschedulable else [])
                         # (the node check after a soak needs the Kubernetes API: not with the file state)
                         + ([f"(soak {self.policy.soak:g}s{', then node check' if self.backend == 'kube' else ''})"]
                            if self.policy.soak else [])})
        rows.sort(key=lambda r: (r["batch"], self.batches[r["batch"] - 1].index(r["name"])))
        return rows
