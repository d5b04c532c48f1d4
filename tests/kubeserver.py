"""KubeStandIn: a protocol-faithful kube-apiserver stand-in over real HTTPS on loopback.

Driven in the tests by real kubectl 1.33 (tests/test_kubeserver_kubectl.py) and by katactl's own
client. What it serves:

- HTTPS (HTTP/1.1, ALPN http/1.1) on 127.0.0.1:<random>, a throwaway CA and a server certificate
  for 127.0.0.1/localhost; ``kubeconfig()`` writes a kubeconfig with certificate-authority-data.
- Bearer tokens: "admin" may do everything, "readonly" only get/list/watch (403 Forbidden Status
  with the RBAC message format); a wrong or missing token gets 401.
- Discovery: /api, /api/v1, /apis, /apis/<group>/<version> (apps/v1, policy/v1,
  coordination.k8s.io/v1, node.k8s.io/v1, authorization.k8s.io/v1), /version. Aggregated discovery is not offered: the
  answer is plain application/json, from which client-go falls back to per-group discovery.
- Resources: nodes, pods (+ eviction, status), namespaces, configmaps, events,
  poddisruptionbudgets (+ status), daemonsets, replicasets, leases, runtimeclasses.
- Verbs: get, list (limit/continue, labelSelector, fieldSelector with =, ==, !=), watch, create (409
  AlreadyExists), update (409 Conflict on a stale resourceVersion; 422 without one for leases and
  PDBs, whose strategies refuse unconditional updates; PUT creates a missing lease), patch
  (strategic-merge, merge, json-patch; 415 otherwise), delete (DeleteOptions from the body or the
  query: gracePeriodSeconds, preconditions uid/resourceVersion, propagationPolicy), dryRun=All on
  every mutation. resourceVersion is one global counter; uid, creationTimestamp, generation filled.
- Request bodies: JSON, or Kubernetes protobuf for Eviction, DeleteOptions, ConfigMap, Namespace,
  PodDisruptionBudget, Lease and SelfSubjectAccessReview (tests/_protobuf.py). Responses are always JSON.
- Graceful pod deletion: deletionTimestamp/deletionGracePeriodSeconds, removal after the grace
  (times ``grace_scale``) by a "kubelet" timer; grace 0, unscheduled pods and terminal pods go at
  once; a pod annotated ``test.katactl.io/stuck-terminating: "true"`` never goes.
- Eviction: as pkg/registry/core/pod/storage/eviction.go (terminal/pending/deleting pods skip the
  PDB check; >1 PDB -> 500; disruptionsAllowed 0 -> 429 DisruptionBudget; observedGeneration
  behind -> 429 retry-after 10; NotReady pod with a healthy budget or AlwaysAllow -> deleted
  without decrement; success decrements disruptionsAllowed and records disruptedPods).
- Disruption controller: PDB status recomputed synchronously after every change, like
  pkg/controller/disruption (expected count from ReplicaSet replicas for maxUnavailable and
  percentages; DaemonSet or controller-less pods there -> SyncFailed, 0 allowed).
- ReplicaSet controller: a deleted (or terminating) pod of a ReplicaSet gets a replacement with a
  new name/uid, same labels and ownerReference, on the first schedulable Ready node (never a
  cordoned one) or Pending without nodeName. DaemonSet controller: a removed DaemonSet pod is
  recreated on the same node.
- Faults: ``inject``, ``delay``, ``cut``, ``drop`` (close without an answer); ``lag_watch_cache``
  (resourceVersion=0 lists served from an older state, as a watch cache behind etcd); ``deny`` (a verb on a
  resource refused to every user with RBAC's 403); request log in ``requests``; the TLS server
  names (SNI) clients sent in ``sni_names``.
- pods/exec over WebSocket (v5/v4.channel.k8s.io) running the argv in a private mount namespace
  with the pod's node root at /host, a mini kubelet for pods created with a nodeName, DaemonSet
  pods per node: tests/kubeexec_server.py (its docstring lists its own differences).

Known differences from the real kube-apiserver:
- Watch is a polling loop over an in-memory event log (20000 events), events up to 20 ms late,
  one JSON event per chunk, no sendInitialEvents/watch-list. As the real server (cacher.go Watch,
  cache_watcher.go convertToWatchEvent): a resourceVersion older than the log is a 200 stream with
  one ERROR event (Status 410 Expired, "too old resource version: X (Y)") that then ends; with a
  label/field selector, an object that stops matching comes as DELETED (its previous content at
  the event's resourceVersion) and one that starts matching as ADDED; with
  allowWatchBookmarks=true a BOOKMARK (the kind, apiVersion and metadata.resourceVersion only)
  every ``bookmark_interval`` s (60, the real bookmarkFrequency) and 2 s before timeoutSeconds,
  at the last resourceVersion the watch has passed (the real one may be newer: etcd progress
  notifications); no initial-events-end annotation. ``cut_watches()`` drops the open watch
  connections without the final chunk; ``compact()`` forgets the history (etcd compaction). No server-side apply (apply-patch+yaml -> 415), no
  deletecollection, no openapi (/openapi/* -> 404), no aggregated discovery, no admission
  plugins (but NamespaceLifecycle's Terminating check, below, and Priority on pod creates only:
  spec.priority and spec.preemptionPolicy from the priorityClassName, only the two system classes
  and no globalDefault class, nothing kept on pod updates; see admit_priority) or webhooks, no
  field validation beyond what is listed, no managedFields
  but a node's spec.unschedulable owner (the manager of the last Update that changed it, and its time).
- Protobuf is accepted only for the kinds above (others -> 415); responses are never protobuf.
- Table output (``as=Table``) is served for nodes and pods only, with the standard columns;
  other kinds get a NAME/AGE table; row objects are always the full object.
- Continue tokens are opaque but not a consistent snapshot: later pages show the current state
  after the last key (the real server serves the snapshot at the first page's resourceVersion);
  they never expire (no 410).
- Strategic merge patch knows only the common list merge keys (containers/volumes/env/ports by
  name, conditions by type, ownerReferences by uid, finalizers as a set); other lists replace.
  ``$patch``/``$retainKeys``/``$setElementOrder`` directives are mostly ignored.
- A pod created through the API gets the status the real pod strategy gives it (phase Pending and
  the QoS class, pod_qos; a status sent is dropped), but is otherwise stored as sent: no defaulting
  (requests from limits counts for the QoS class only). Pod-level resources are not looked at.
- Validation is minimal: names (DNS subdomain), Lease MicroTime (exactly 6 fractional digits),
  PDB (minAvailable xor maxUnavailable), DeleteOptions (propagationPolicy value, not with
  orphanDependents), ConfigMap size (data + binaryData values at most 1 MiB: 422 with the real
  message; a bad base64 binaryData value is reported at byte 0, not at its real offset).
  Other invalid objects are stored. No etcd request size limit (1.5 MiB by default: the
  ConfigMap limit comes first), no request body limit (3 MiB).
- Controllers are synchronous and instant: replacement pods are Running and Ready at once; the
  ReplicaSet controller never scales down; no scheduler (first schedulable node by name), no
  taints/affinity/resources in placement. The disruption controller has no 2-minute expiry of
  disruptedPods (entries go when the pod is gone or terminating).
- Deleting a ReplicaSet/DaemonSet removes its pods at once unless propagationPolicy=Orphan
  (the real garbage collector is asynchronous). Namespaces are deleted at once (no Terminating);
  a Namespace stored with status.phase Terminating refuses creates and evictions in it as
  NamespaceLifecycle admission does (403, cause NamespaceTerminating); no other admission but Priority (above).
- Mirror pods are plain stored pods: they can be deleted or evicted (as on the real server) but
  no kubelet recreates them afterwards.
- DELETE answers the object for pods (like the real pod store) and a Success Status otherwise.
- Authorization is two fixed users, not RBAC (``deny`` takes a verb away from both, with RBAC's
  message); no impersonation, no client certificates. authorization.k8s.io/v1 serves only
  selfsubjectaccessreviews (``kubectl auth can-i``), answered from that same model: no
  subjectaccessreviews, localsubjectaccessreviews or selfsubjectrulesreviews, a nonResource
  review allows admin everything and others only "get", and label/field selector attributes
  are ignored.
- Events are written only by the mini kubelet (Scheduled, Evicted) and the DaemonSet controller
  (FailedCreate), tests/kubeexec_server.py; no leader election; no audit.
"""
from __future__ import annotations

import base64
import bisect
import copy
import datetime as _dt
import ipaddress
import json
import os
import random
import re
import socket
import ssl
import tempfile
import threading
import time
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from tests import _protobuf
from tests.kubeexec_server import KubeExecMixin, is_exec, serve_exec

STUCK = "test.katactl.io/stuck-terminating"
MIRROR = "kubernetes.io/config.mirror"


# ---------------------------------------------------------------------------------------------
# resources


class Res:
    def __init__(self, plural, kind, group, version, namespaced, short=(), unconditional=True,
                 create_on_update=False, subresources=()):
        self.plural, self.kind, self.group, self.version = plural, kind, group, version
        self.namespaced, self.short = namespaced, list(short)
        self.unconditional, self.create_on_update = unconditional, create_on_update
        self.subresources = subresources

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self):  # "pods", "leases.coordination.k8s.io"
        return f"{self.plural}.{self.group}" if self.group else self.plural


VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
RESOURCES = {r.plural: r for r in [
    Res("nodes", "Node", "", "v1", False, ["no"], subresources=("status",)),
    Res("pods", "Pod", "", "v1", True, ["po"], subresources=("status", "eviction")),
    Res("namespaces", "Namespace", "", "v1", False, ["ns"], subresources=("status",)),
    Res("configmaps", "ConfigMap", "", "v1", True, ["cm"]),
    Res("events", "Event", "", "v1", True, ["ev"]),
    Res("poddisruptionbudgets", "PodDisruptionBudget", "policy", "v1", True, ["pdb"], unconditional=False,
        subresources=("status",)),
    Res("daemonsets", "DaemonSet", "apps", "v1", True, ["ds"], subresources=("status",)),
    Res("replicasets", "ReplicaSet", "apps", "v1", True, ["rs"], subresources=("status",)),
    Res("leases", "Lease", "coordination.k8s.io", "v1", True, unconditional=False, create_on_update=True),
    Res("runtimeclasses", "RuntimeClass", "node.k8s.io", "v1", False),
]}
BY_KIND = {r.kind: r for r in RESOURCES.values()}
GROUPS = {"": "v1", "apps": "v1", "policy": "v1", "coordination.k8s.io": "v1", "node.k8s.io": "v1",
          "authorization.k8s.io": "v1"}
#: authorization.k8s.io/v1's one served resource: a create-only review, stored nowhere
SSAR = "selfsubjectaccessreviews"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: a ConfigMap's data + binaryData values (binaryData decoded) at most this: core.MaxSecretSize
MAX_CONFIGMAP_BYTES = 1024 * 1024
_MICRO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


def now_rfc3339(t: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(time.time() if t is None else t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(s: str) -> float:
    return _dt.datetime.strptime(s[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=_dt.timezone.utc).timestamp()


# ---------------------------------------------------------------------------------------------
# errors


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None, retry_after=None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details, self.retry_after = details, retry_after

    def status(self) -> dict:
        s = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message}
        if self.reason:
            s["reason"] = self.reason
        if self.details is not None:
            s["details"] = self.details
        s["code"] = self.code
        return s


def _details(res: Res | None, name: str | None, **extra) -> dict:
    d = {}
    if name:
        d["name"] = name
    if res is not None:
        if res.group:
            d["group"] = res.group
        d["kind"] = res.plural
    d.update(extra)
    return d


# the PriorityClasses every cluster has (pkg/apis/scheduling/v1/helpers.go systemPriorityClasses:
# SystemCriticalPriority = 2 * HighestUserDefinablePriority, node-critical 1000 above it); both are
# stored with the default preemptionPolicy (pkg/apis/scheduling/v1/defaults.go)
SYSTEM_PRIORITY_CLASSES = {"system-node-critical": 2000001000, "system-cluster-critical": 2000000000}
PREEMPT_LOWER = "PreemptLowerPriority"


def admit_priority(pod: dict, name: str) -> None:
    """The Priority admission plugin on a pod create (plugin/pkg/admission/priority/admission.go
    Admit: the pods resource only, so a DaemonSet naming an unknown class is stored and only its
    pods are refused; admitPod): spec.priority and spec.preemptionPolicy from the class, or
    getDefaultPriority's 0 and PreemptLowerPriority without one (no globalDefault class here); an
    unknown class, or a priority or preemptionPolicy the pod sets that differs, is 403 Forbidden.
    ``name`` is the pod's name or, before one is generated, its generateName (apiserver
    pkg/admission/errors.go extractResourceName). Only the system classes exist: the stand-in
    serves no PriorityClass objects."""
    spec = pod.setdefault("spec", {})
    cls = spec.get("priorityClassName") or ""

    def forbidden(why):
        return ApiError(403, "Forbidden", f'pods "{name}" is forbidden: {why}', {"name": name, "kind": "pods"})
    if cls and cls not in SYSTEM_PRIORITY_CLASSES:
        raise forbidden(f"no PriorityClass with name {cls} was found")
    value = SYSTEM_PRIORITY_CLASSES.get(cls, 0)
    if spec.get("priority") is not None and spec["priority"] != value:
        raise forbidden(f'the integer value of priority ({spec["priority"]}) must not be provided in pod spec; '
                        f"priority admission controller computed {value} from the given PriorityClass name")
    spec["priority"] = value
    if spec.get("preemptionPolicy") is not None and spec["preemptionPolicy"] != PREEMPT_LOWER:
        raise forbidden(f'the string value of PreemptionPolicy ({spec["preemptionPolicy"]}) must not be provided '
                        f"in pod spec; priority admission controller computed {PREEMPT_LOWER} from the given "
                        "PriorityClass name")
    spec["preemptionPolicy"] = PREEMPT_LOWER


_QTY = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?")
_QTY_MULT = {"": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
             **{p: Decimal(10) ** (3 * i) for i, p in enumerate("kMGTPE", 1)},
             **{p + "i": Decimal(2) ** (10 * i) for i, p in enumerate("KMGTPE", 1)}}


def quantity(v) -> Decimal:
    """A resource.Quantity's value, for comparing (apimachinery pkg/api/resource/quantity.go
    ParseQuantity syntax); a malformed one fails the body's decoding (400)."""
    m = _QTY.fullmatch(str(v))
    if m is None:
        raise bad_request(f"quantities must match the regular expression "
                          f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {v!r}")
    suf = m.group(2) or ""
    return Decimal(m.group(1)) * (_QTY_MULT[suf] if suf in _QTY_MULT else Decimal(10) ** int(suf[1:]))


def pod_qos(pod: dict) -> str:
    """The pod's QoS class as the API server stores it in status.qosClass on create
    (pkg/registry/core/pod/strategy.go PrepareForCreate, pkg/apis/core/v1/helper/qos/qos.go
    ComputePodQOS): init containers and containers, each BestEffort (no cpu or memory request
    or limit above zero), Guaranteed (cpu and memory requests equal to limits) or else Burstable;
    Burstable if any is, or if they differ. Only cpu and memory count. Requests missing beside
    limits are the limits (pkg/apis/core/v1/defaults.go SetDefaults_Pod: the stand-in stores a
    pod as sent, so it is applied here). Pod-level resources (PodLevelResources, alpha in 1.33)
    are not looked at."""
    spec = pod.get("spec") or {}
    classes = set()
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        r = (c.get("resources") if isinstance(c, dict) else None) or {}
        lim = {k: quantity(v) for k, v in (r.get("limits") or {}).items() if k in ("cpu", "memory")}
        req = {**lim, **{k: quantity(v) for k, v in (r.get("requests") or {}).items() if k in ("cpu", "memory")}}
        per = set()
        for k in ("cpu", "memory"):
            q, li = req.get(k, Decimal(0)), lim.get(k, Decimal(0))
            per.add("Burstable" if q != li else "BestEffort" if q == 0 else "Guaranteed")
        classes.add(per.pop() if len(per) == 1 else "Burstable")
    if not classes:
        return "BestEffort"
    return classes.pop() if len(classes) == 1 else "Burstable"


def not_found(res: Res, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{res.qualified} "{name}" not found', _details(res, name))


def already_exists(res: Res, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{res.qualified} "{name}" already exists', _details(res, name))


def conflict(res: Res, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.qualified} "{name}": {why}',
                    _details(res, name))


STALE = "the object has been modified; please apply your changes to the latest version and try again"


def invalid(res: Res, name: str, field: str, value, why: str) -> ApiError:
    gk = f"{res.kind}.{res.group}" if res.group else res.kind
    v = value if isinstance(value, str) and value.startswith("0x") else json.dumps(value)
    msg = f'{gk} "{name}" is invalid: {field}: Invalid value: {v}: {why}'
    return ApiError(422, "Invalid", msg, _details(res, name, kind=res.kind, causes=[
        {"reason": "FieldValueInvalid", "message": f"Invalid value: {v}: {why}", "field": field}]))


def bad_request(msg: str) -> ApiError:
    return ApiError(400, "BadRequest", msg)


# ---------------------------------------------------------------------------------------------
# selectors


_REQ = re.compile(r"^\s*(!?)([A-Za-z0-9._/-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def parse_selector(sel: str):
    """-> list of predicates on a labels dict; ValueError when malformed."""
    preds = []
    for part in _split(sel):
        m = _REQ.match(part)
        if not m or (m.group(1) and (m.group(3) or m.group(5))):
            raise ValueError(f"unable to parse requirement: {part!r}")
        neg, key, op, val, setop, vals = m.groups()
        if op in ("=", "=="):
            preds.append(lambda labels, k=key, v=val: labels.get(k) == v)
        elif op == "!=":
            preds.append(lambda labels, k=key, v=val: labels.get(k) != v)
        elif setop:
            vs = {x.strip() for x in vals.split(",")}
            preds.append((lambda labels, k=key, vs=vs: labels.get(k) in vs) if setop == "in"
                         else (lambda labels, k=key, vs=vs: labels.get(k) not in vs))
        elif neg:
            preds.append(lambda labels, k=key: k not in labels)
        else:
            preds.append(lambda labels, k=key: k in labels)
    return preds


def _split(sel: str):
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def selector_matches(sel: dict | None, labels: dict) -> bool:
    """metav1.LabelSelectorAsSelector(sel).Matches(labels), as policy/v1's eviction and disruption
    controller use it: a nil selector selects nothing, an empty one every pod of the namespace
    (pkg/registry/core/pod/storage/eviction.go: "Unlike the v1beta version, here we let an empty
    selector match everything")."""
    if sel is None:
        return False
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


FIELDS_COMMON = ("metadata.name", "metadata.namespace")
FIELDS = {
    "pods": ("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
             "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"),
    "nodes": ("spec.unschedulable",),
    "events": ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
               "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
               "reason", "reportingComponent", "source", "type"),
    "namespaces": ("status.phase",),
}


def _field_value(obj: dict, path: str) -> str:
    cur = obj
    for p in path.split("."):
        cur = cur.get(p) if isinstance(cur, dict) else None
    if path == "metadata.namespace" and cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    if path == "spec.hostNetwork" and cur is None:
        return "false"
    if path == "spec.unschedulable" and cur is None:
        return "false"
    return "" if cur is None else str(cur)


def parse_field_selector(res: Res, sel: str):
    preds = []
    for part in [p for p in sel.split(",") if p.strip()]:
        m = re.match(r"^\s*([A-Za-z0-9._]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f'invalid selector: \'{sel}\'; can\'t understand \'{part}\'')
        f, op, v = m.groups()
        if f not in FIELDS_COMMON + FIELDS.get(res.plural, ()):
            raise bad_request(f'field label not supported: {f}')
        preds.append((f, op, v))
    return lambda o: all((_field_value(o, f) == v) == (op != "!=") for f, op, v in preds)


# ---------------------------------------------------------------------------------------------
# patches


MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
              "env": "name", "ports": "containerPort", "volumeMounts": "mountPath", "conditions": "type",
              "ownerReferences": "uid", "imagePullSecrets": "name", "containerStatuses": "name",
              "addresses": "type"}
SET_LISTS = {"finalizers"}


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_merge_patch(target, patch, key=None):
    if not isinstance(patch, dict):
        if isinstance(patch, list) and isinstance(target, list):
            return _smp_list(target, patch, key)
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    if not isinstance(target, dict):
        target = {}
    out = dict(target)
    for k, v in patch.items():
        if k.startswith("$"):
            continue
        if k.startswith("$setElementOrder/") or k.startswith("$deleteFromPrimitiveList/"):
            continue
        if v is None:
            out.pop(k, None)
        else:
            r = strategic_merge_patch(out.get(k), v, k)
            if r is None:
                out.pop(k, None)
            else:
                out[k] = r
    for k, v in patch.items():
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.split("/", 1)[1]
            out[name] = [x for x in out.get(name) or [] if x not in v]
    return out


def _smp_list(target, patch, key):
    if key in SET_LISTS:
        return list(target) + [x for x in patch if x not in target]
    mk = MERGE_KEYS.get(key)
    if not mk or not all(isinstance(x, dict) for x in patch):
        return copy.deepcopy(patch)
    out = [copy.deepcopy(x) for x in target]
    for item in patch:
        if item.get("$patch") == "replace":
            return [{k: v for k, v in i.items() if k != "$patch"} for i in patch]
        idx = next((i for i, x in enumerate(out) if x.get(mk) == item.get(mk)), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
        elif idx is None:
            out.append({k: v for k, v in item.items() if not k.startswith("$")})
        else:
            out[idx] = strategic_merge_patch(out[idx], item)
    return out


def _ptr(doc, path):
    if path == "":
        return None, None
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, list):
            cur = cur[int(p)]
        elif isinstance(cur, dict) and p in cur:
            cur = cur[p]
        else:
            raise KeyError(path)
    return cur, parts[-1]


def json_patch(doc, ops):
    if not isinstance(ops, list):
        raise ValueError("a json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ValueError(f"invalid operation {op!r}")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise ValueError(f'operation "{kind}" needs a value')
        if kind == "test":
            par, last = _ptr(doc, path)
            cur = par[int(last)] if isinstance(par, list) else par[last]
            if cur != op["value"]:
                raise AssertionError(f"testing value {path} failed")
            continue
        if kind in ("move", "copy"):
            fpar, flast = _ptr(doc, op["from"])
            val = fpar[int(flast)] if isinstance(fpar, list) else fpar[flast]
            if kind == "move":
                if isinstance(fpar, list):
                    fpar.pop(int(flast))
                else:
                    del fpar[flast]
            kind, op = "add", {"value": copy.deepcopy(val)}
        par, last = _ptr(doc, path)
        if kind == "remove":
            if isinstance(par, list):
                par.pop(int(last))
            else:
                del par[last]
        elif kind in ("add", "replace"):
            if par is None:
                doc = copy.deepcopy(op["value"])
            elif isinstance(par, list):
                if kind == "add":
                    par.insert(len(par) if last == "-" else int(last), copy.deepcopy(op["value"]))
                else:
                    par[int(last)] = copy.deepcopy(op["value"])
            else:
                if kind == "replace" and last not in par:
                    raise KeyError(path)
                par[last] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"unknown op {kind!r}")
    return doc


PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/strategic-merge-patch+json")


# ---------------------------------------------------------------------------------------------
# TLS


_TLS_CACHE: dict = {}


def _tls_material():
    """(ca_pem, cert_pem, key_pem), made once per process."""
    if _TLS_CACHE:
        return _TLS_CACHE["m"]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "katactl-test-kube-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(hours=1))
          .not_valid_after(now + _dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1)).not_valid_after(now + _dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    m = (ca.public_bytes(pem), cert.public_bytes(pem),
         key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _TLS_CACHE["m"] = m
    return m


# ---------------------------------------------------------------------------------------------
# the server


#: the request this handler thread serves (its field manager)
_request = threading.local()


class _Cut(Exception):
    pass


class _Watch(Exception):
    def __init__(self, res, ns, query):
        super().__init__("watch")
        self.res, self.ns, self.query = res, ns, query


class _Store(dict):
    """The object store: (plural, namespace, name) -> object, with the keys of each plural
    indexed and kept in the real server's list order (etcd's key order, "namespace/name")
    so that lists, controllers and seeding of 100,000 pods stay cheap. A plural's order is
    built on first use, then kept up to date by bisection."""

    def __init__(self):
        super().__init__()
        self._keys: dict[str, set] = {}
        self._by_ns: dict[tuple[str, str], set] = {}
        self._sorted: dict[str, list] = {}

    @staticmethod
    def _order(k) -> str:
        return f"{k[1]}/{k[2]}"

    def __setitem__(self, key, value):
        if key not in self:
            self._keys.setdefault(key[0], set()).add(key)
            self._by_ns.setdefault(key[:2], set()).add(key)
            if key[0] in self._sorted:
                bisect.insort(self._sorted[key[0]], key, key=self._order)
        super().__setitem__(key, value)

    def _forget(self, key) -> None:
        self._keys[key[0]].discard(key)
        self._by_ns[key[:2]].discard(key)
        order = self._sorted.get(key[0])
        if order is not None:
            i = bisect.bisect_left(order, self._order(key), key=self._order)
            if i < len(order) and order[i] == key:
                del order[i]

    def __delitem__(self, key):
        super().__delitem__(key)
        self._forget(key)

    def pop(self, key, *default):
        if key in self:
            value = super().pop(key)
            self._forget(key)
            return value
        return super().pop(key, *default)

    def clear(self):
        super().clear()
        self._keys.clear()
        self._by_ns.clear()
        self._sorted.clear()

    def in_namespace(self, plural: str, ns: str) -> set:
        """The keys of one resource in one namespace (unordered; do not modify)."""
        return self._by_ns.get((plural, ns), set())

    def of(self, plural: str) -> list:
        """The keys of one resource, in list order (do not modify)."""
        if plural not in self._sorted:
            self._sorted[plural] = sorted(self._keys.get(plural, ()), key=self._order)
        return self._sorted[plural]


class KubeStandIn(KubeExecMixin):
    """See the module docstring. Thread-safe; one lock around the store. pods/exec over
    WebSocket and the mini kubelet: tests/kubeexec_server.py."""

    def __init__(self, tokens: dict[str, str] | None = None, grace_scale: float = 1.0):
        self.tokens = tokens or {"admin": "admin-token", "readonly": "readonly-token"}
        self.default_grace_scale = grace_scale
        self.grace_scale = grace_scale
        self.pdb_controller_paused = False
        #: (verb, resource[/subresource]) refused to every user with RBAC's 403 (``deny``)
        self.denied: set[tuple[str, str]] = set()
        #: the server names clients sent in their TLS handshakes (SNI), in order
        self.sni_names: list[str | None] = []
        self._cache: _Store | None = None  # a lagging watch cache's store (lag_watch_cache)
        self._lock = threading.RLock()
        self._rv = 0
        self._gen = 0  # bumps on reset(): stale kubelet timers do nothing
        self.store: _Store = _Store()
        self.requests: list[dict] = []
        self._faults: list[dict] = []
        self._rng = random.Random(0)
        self._timers: list[threading.Timer] = []
        # (resourceVersion, type, object, the object's previous logged state or None) for watches
        self._events: list[tuple[int, str, dict, dict | None]] = []
        self._last: dict[tuple, dict] = {}  # (kind, namespace, name) -> its last logged state
        self.bookmark_interval = 60.0
        self._watch_cuts = 0  # cut_watches() bumps it: open watches drop their connection
        self._compacted = 0  # compact(): the history starts after this resourceVersion
        self._closed = False
        self._exec_init()  # pods/exec (tests/kubeexec_server.py)
        ca, cert, key = _tls_material()
        self._dir = tempfile.mkdtemp(prefix="kubestandin-")
        self.ca_path = os.path.join(self._dir, "ca.crt")
        Path(self.ca_path).write_bytes(ca)
        Path(self._dir, "tls.crt").write_bytes(cert)
        Path(self._dir, "tls.key").write_bytes(key)
        self.ca_pem = ca
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(self._dir, "tls.crt"), os.path.join(self._dir, "tls.key"))
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = lambda sock, name, c: self.sni_names.append(name)  # noqa: ARG005
        self._ssl = ctx
        outer = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # Go's listener takes the kernel's somaxconn, not Python's 5

            def get_request(self):
                # the listening socket is non-blocking: a connection reset between select() and
                # accept() leaves nothing to accept, and a blocking accept() then held the loop
                # (and shutdown() at the session's end) until the next client came
                sock, addr = self.socket.accept()
                sock.setblocking(True)
                # as Go's net package does on every TCP connection (net/tcpsock.go newTCPConn:
                # setNoDelay(fd, true)): without it, a response whose body goes out after its
                # headers in a second small segment waited for the client's delayed ACK (~40 ms)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

        class Handler(_Handler):
            srv = outer

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.socket.setblocking(False)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self._seed_defaults()

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self):
        self._closed = True
        for t in self._timers:
            t.cancel()
        self._exec_kill_all()
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        """Empty store (but the default namespaces), no faults, empty request log, default knobs."""
        with self._lock:
            self._gen += 1
            for t in self._timers:
                t.cancel()
            self._timers = []
            self.store.clear()
            self._events.clear()
            self._last.clear()
            self._compacted = 0
            self.bookmark_interval = 60.0
            self.requests.clear()
            self._faults.clear()
            self.grace_scale = self.default_grace_scale
            self.pdb_controller_paused = False
            self.denied = set()
            self.sni_names.clear()
            self._cache = None
            self._rng = random.Random(0)
            self._exec_reset()
            self._seed_defaults()

    def _seed_defaults(self):
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                      "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})

    def kubeconfig(self, path, user: str = "admin", namespace: str | None = None, token: str | None = None) -> str:
        """Write a kubeconfig (JSON, which is YAML too) for ``user``; ``token`` overrides its token."""
        ctx = {"cluster": "standin", "user": user}
        if namespace:
            ctx["namespace"] = namespace
        Path(path).write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin", "preferences": {},
            "clusters": [{"name": "standin", "cluster": {
                "server": self.url, "certificate-authority-data": base64.b64encode(self.ca_pem).decode()}}],
            "users": [{"name": user, "user": {"token": token if token is not None else self.tokens.get(user, "")}}],
            "contexts": [{"name": "standin", "context": ctx}],
        }, indent=1))
        return str(path)

    # -- faults -------------------------------------------------------------------------------

    def inject(self, method: str | None, path_regex: str, status: int = 503, times: int = 1,
               retry_after: int | None = None, body=None, applied: bool = False, match=None):
        """The next ``times`` requests matching (method or None for any, regex searched in the path
        with its query) are answered with ``status`` (a Status object unless ``body`` is given).
        ``applied``: the request is carried out first, then answered so (kube-apiserver's timeout
        filter answers 504 while the handler goes on and the write lands). ``match``: only
        requests whose decoded body it returns true for (a patch's body without its type)."""
        with self._lock:
            self._faults.append({"type": "status", "method": method, "re": re.compile(path_regex), "times": times,
                                 "status": status, "retry_after": retry_after, "body": body, "applied": applied,
                                 "match": match})

    def delay(self, path_regex: str, seconds: float, times: int | None = None, method: str | None = None):
        with self._lock:
            self._faults.append({"type": "delay", "method": method, "re": re.compile(path_regex), "times": times,
                                 "seconds": seconds})

    def cut(self, path_regex: str, times: int = 1, method: str | None = None):
        """Close the connection after sending the headers and half the body."""
        with self._lock:
            self._faults.append({"type": "cut", "method": method, "re": re.compile(path_regex), "times": times})

    def drop(self, path_regex: str, times: int = 1, method: str | None = None):
        """Close the connection without any answer and without acting on the request (what a
        client sees when the server closed an idle keep-alive connection as it was reused)."""
        with self._lock:
            self._faults.append({"type": "drop", "method": method, "re": re.compile(path_regex), "times": times})

    def deny(self, verb: str, resource: str):
        """Refuse ``verb`` on ``resource`` ("poddisruptionbudgets", "pods/eviction") to every
        user, admin too, with the RBAC authorizer's 403 (a Role that lacks the rule)."""
        with self._lock:
            self.denied.add((verb, resource))

    def lag_watch_cache(self, lagging: bool = True):
        """Serve resourceVersion=0 lists (the watch cache's) from the store as it is now until
        called with False: a cache behind etcd, which shows objects deleted since and misses
        objects created since. Reads without resourceVersion stay consistent (etcd's)."""
        with self._lock:
            if not lagging:
                self._cache = None
                return
            snap = _Store()
            for k, v in self.store.items():
                snap[k] = copy.deepcopy(v)
            self._cache = snap

    def clear_faults(self):
        """Forget the faults not yet used up (inject, delay, cut, drop)."""
        with self._lock:
            self._faults.clear()

    def cut_watches(self):
        """Drop every open watch connection (no final chunk), as a restarting server or a
        load balancer does: clients see the stream end without its terminating chunk."""
        with self._lock:
            self._watch_cuts += 1

    def compact(self, cut: bool = False):
        """Forget the watch history up to now, as an etcd compaction does: a watch from an
        older resourceVersion gets the ERROR event with a 410 Status (open watches go on).
        ``cut``: and drop the open watches at once, before they deliver anything newer, as a
        restarted server whose new watch cache starts later does: any watch from before gets
        the 410 (the resourceVersion moves on by one, so that even the newest is older)."""
        with self._lock:
            if cut:
                self._next_rv()
                self._watch_cuts += 1
            self._compacted = self._rv
            self._events.clear()

    def _take_faults(self, method: str, path: str, body=None) -> list[dict]:
        out = []
        with self._lock:
            for f in self._faults:
                if f["times"] is not None and f["times"] <= 0:
                    continue
                if f["method"] and f["method"].upper() != method:
                    continue
                if not f["re"].search(path):
                    continue
                if f.get("match") is not None and not f["match"](body):
                    continue
                if f["times"] is not None:
                    f["times"] -= 1
                out.append(f)
        return out

    # -- store primitives ---------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    EVENT_LOG = 20000

    def _log(self, typ: str, obj: dict, bump=False):
        """Record a watch event; DELETED objects carry the deletion's resourceVersion."""
        o = copy.deepcopy(obj)
        if bump:
            o["metadata"]["resourceVersion"] = self._next_rv()
        md = o["metadata"]
        k = (o.get("kind"), md.get("namespace"), md.get("name"))
        prev = self._last.pop(k, None) if typ == "DELETED" else self._last.get(k)
        if typ != "DELETED":
            self._last[k] = o
        self._events.append((int(md["resourceVersion"]), typ, o, prev))
        if len(self._events) > self.EVENT_LOG:
            del self._events[:len(self._events) - self.EVENT_LOG]

    @staticmethod
    def _key(res: Res, ns, name):
        return (res.plural, ns or "" if res.namespaced else "", name)

    def _stamp_new(self, res: Res, obj: dict) -> dict:
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        md = obj.setdefault("metadata", {})
        md["uid"] = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        md["creationTimestamp"] = now_rfc3339()
        md["resourceVersion"] = self._next_rv()
        for k in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            md.pop(k, None)
        if res.plural in ("poddisruptionbudgets", "daemonsets", "replicasets"):
            md["generation"] = 1
        return obj

    # -- seeding helpers (public API for other tests) -----------------------------------------

    def add(self, obj: dict) -> dict:
        """Store any object as-is (status included), filling uid/resourceVersion/creationTimestamp
        and namespace "default" for namespaced kinds; returns a copy of the stored object."""
        obj = copy.deepcopy(obj)
        res = BY_KIND[obj["kind"]]
        with self._lock:
            md = obj.setdefault("metadata", {})
            if res.namespaced:
                md.setdefault("namespace", "default")
            else:
                md.pop("namespace", None)
            keep = {k: md[k] for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                                       "generation") if k in md}
            self._stamp_new(res, obj)
            md.update(keep)
            if res.plural == "poddisruptionbudgets":
                md.setdefault("generation", 1)
            if res.namespaced and ("namespaces", "", md["namespace"]) not in self.store:
                self.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": md["namespace"]},
                          "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
            self.store[self._key(res, md.get("namespace"), md["name"])] = obj
            self._log("ADDED", obj)
            self._sync_pdbs()
            return copy.deepcopy(self.store[self._key(res, md.get("namespace"), md["name"])])

    def get_obj(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        res = BY_KIND.get(kind) or RESOURCES[kind]
        with self._lock:
            o = self.store.get(self._key(res, namespace or ("default" if res.namespaced else ""), name))
            return copy.deepcopy(o)

    def list_objs(self, kind: str, namespace: str | None = None) -> list[dict]:
        res = BY_KIND.get(kind) or RESOURCES[kind]
        with self._lock:
            return [copy.deepcopy(self.store[k]) for k in self.store.of(res.plural)
                    if namespace is None or k[1] == namespace]

    def add_node(self, name, labels=None, unschedulable=False, ready=True, annotations=None, taints=None,
                 kubelet_version="v1.33.1", kernel="6.1.0-28-amd64", runtime="containerd://1.7.24",
                 internal_ip=None) -> dict:
        idx = sum(1 for k in self.store if k[0] == "nodes")
        lab = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
               "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64"}
        lab.update(labels or {})
        spec: dict = {"podCIDR": f"10.244.{idx % 256}.0/24"}
        if unschedulable:
            spec["unschedulable"] = True
        taints = list(taints or [])
        if unschedulable and not any(t.get("key") == "node.kubernetes.io/unschedulable" for t in taints):
            taints.append({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
                           "timeAdded": now_rfc3339()})
        if taints:
            spec["taints"] = taints
        ts = now_rfc3339()
        return self.add({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": lab, "annotations": dict(annotations or {})},
            "spec": spec,
            "status": {
                "conditions": [{"type": "Ready", "status": "True" if ready else "Unknown",
                                "reason": "KubeletReady" if ready else "NodeStatusUnknown",
                                "message": "kubelet is posting ready status" if ready
                                else "Kubelet stopped posting node status.",
                                "lastHeartbeatTime": ts, "lastTransitionTime": ts}],
                "addresses": [{"type": "InternalIP", "address": internal_ip or f"10.0.{idx // 250}.{idx % 250 + 1}"},
                              {"type": "Hostname", "address": name}],
                "capacity": {"cpu": "8", "memory": "32863128Ki", "pods": "110"},
                "allocatable": {"cpu": "7910m", "memory": "31711128Ki", "pods": "110"},
                "nodeInfo": {"kubeletVersion": kubelet_version, "kubeProxyVersion": kubelet_version,
                             "kernelVersion": kernel, "containerRuntimeVersion": runtime,
                             "osImage": "Debian GNU/Linux 12 (bookworm)", "operatingSystem": "linux",
                             "architecture": "amd64", "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, name).hex,
                             "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
                             "bootID": str(uuid.uuid5(uuid.NAMESPACE_OID, name))}}})

    def add_pod(self, name, namespace="default", node=None, labels=None, owner=None, runtime_class=None,
                overhead=None, empty_dir=False, phase="Running", ready=True, mirror=False, annotations=None) -> dict:
        ann = dict(annotations or {})
        md: dict = {"name": name, "namespace": namespace, "labels": dict(labels or {}), "annotations": ann}
        if mirror:
            ann.setdefault(MIRROR, uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}/{name}").hex)
            ann.setdefault("kubernetes.io/config.source", "file")
            if node:
                md["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node, "controller": True,
                                          "uid": (self.get_obj("Node", node) or {}).get("metadata", {}).get("uid", "")}]
        if owner:
            okind, oname = owner
            o = self.get_obj(okind, oname, namespace)
            md["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": okind, "name": oname, "controller": True,
                                      "blockOwnerDeletion": True,
                                      "uid": (o or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())}]
        spec: dict = {"containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10",
                                      "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}],
                      "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "schedulerName": "default-scheduler",
                      "serviceAccountName": "default", "dnsPolicy": "ClusterFirst",
                      "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                       "effect": "NoExecute", "tolerationSeconds": 300}]}
        if node:
            spec["nodeName"] = node
        if runtime_class:
            spec["runtimeClassName"] = runtime_class
        if overhead:
            spec["overhead"] = dict(overhead)
        if empty_dir:
            spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
            spec["containers"][0]["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
        return self.add({"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": spec,
                         "status": self._pod_status(phase, ready, node)})

    def _pod_status(self, phase, ready, node):
        ts = now_rfc3339()
        st: dict = {"phase": phase, "qosClass": "Burstable"}
        if node and phase != "Pending":
            st["hostIP"] = "10.0.0.1"
            st["podIP"] = f"10.244.0.{self._rng.randint(2, 250)}"
            st["startTime"] = ts
        r = "True" if (ready and phase == "Running") else "False"
        st["conditions"] = [{"type": "PodScheduled", "status": "True" if node else "False", "lastTransitionTime": ts},
                            {"type": "Ready", "status": r, "lastTransitionTime": ts},
                            {"type": "ContainersReady", "status": r, "lastTransitionTime": ts}]
        if phase in ("Running", "Succeeded", "Failed"):
            state = ({"running": {"startedAt": ts}} if phase == "Running" else
                     {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1,
                                     "reason": "Completed" if phase == "Succeeded" else "Error"}})
            st["containerStatuses"] = [{"name": "main", "ready": r == "True", "restartCount": 0, "state": state,
                                        "image": "registry.k8s.io/pause:3.10", "started": phase == "Running"}]
        return st

    def add_replicaset(self, name, namespace, replicas, labels) -> dict:
        return self.add({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                         "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                         "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                                  "template": {"metadata": {"labels": dict(labels)},
                                               "spec": {"containers": [{"name": "main",
                                                                        "image": "registry.k8s.io/pause:3.10"}]}}},
                         "status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                                    "fullyLabeledReplicas": replicas, "observedGeneration": 1}})

    def add_daemonset(self, name, namespace, labels) -> dict:
        return self.add({"apiVersion": "apps/v1", "kind": "DaemonSet",
                         "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
                         "spec": {"selector": {"matchLabels": dict(labels)},
                                  "template": {"metadata": {"labels": dict(labels)},
                                               "spec": {"containers": [{"name": "main",
                                                                        "image": "registry.k8s.io/pause:3.10"}]}},
                                  "updateStrategy": {"type": "RollingUpdate"}},
                         "status": {"observedGeneration": 1}})

    def add_pdb(self, name, namespace, selector: dict, min_available=None, max_unavailable=None) -> dict:
        spec: dict = {"selector": {"matchLabels": dict(selector)} if "matchLabels" not in selector
                      and "matchExpressions" not in selector else copy.deepcopy(selector)}
        if min_available is not None:
            spec["minAvailable"] = min_available
        if max_unavailable is not None:
            spec["maxUnavailable"] = max_unavailable
        return self.add({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                         "metadata": {"name": name, "namespace": namespace, "generation": 1}, "spec": spec})

    def add_runtimeclass(self, name, handler, overhead=None) -> dict:
        o: dict = {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": name},
                   "handler": handler}
        if overhead:
            o["overhead"] = {"podFixed": dict(overhead)}
        return self.add(o)

    def seed_twin_nodes(self, seed: int, names=("twin-a", "twin-b")) -> dict:
        """The same deterministic mix of pods on every named node (nodes created if missing).

        Per node N (``k`` = 1..3 drawn from ``seed``, equal for every twin):
        - ns "apps": ReplicaSet web-N (k+1 replicas, all on N; evictable);
          ReplicaSet cache-N (1 pod with emptyDir: needs --delete-emptydir-data);
          ReplicaSet kata-N (1 Kata pod: runtimeClassName "kata" + overhead);
          a Succeeded pod done-N (no controller, terminal: always fine).
        - ns "default": an unreplicated pod lonely-N (needs --force).
        - ns "kube-system": DaemonSet node-agent's pod node-agent-N; mirror pod kube-proxy-N.
        - ns "guarded-N": ReplicaSet db-N with 2 pods on N and PDB db-N minAvailable 2 (0 allowed).
        Plus RuntimeClass "kata" (handler kata, overhead 250m/160Mi) and DaemonSet kube-system/node-agent.
        Returns {node: {"evictable": [...], "daemonset": [...], "mirror": [...], "blocked": [...],
        "emptydir": [...], "unreplicated": [...], "terminal": [...], "kata": [...]}} with "ns/name" entries.
        """
        overhead = {"cpu": "250m", "memory": "160Mi"}
        out = {}
        with self._lock:
            if not self.get_obj("RuntimeClass", "kata"):
                self.add_runtimeclass("kata", "kata", overhead)
            if not self.get_obj("DaemonSet", "node-agent", "kube-system"):
                self.add_daemonset("node-agent", "kube-system", {"app": "node-agent"})
            for n in names:
                rng = random.Random(seed)
                k = rng.randint(1, 3)
                sfx = "".join(rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
                if not self.get_obj("Node", n):
                    self.add_node(n)
                d: dict = {key: [] for key in ("evictable", "daemonset", "mirror", "blocked", "emptydir",
                                               "unreplicated", "terminal", "kata")}
                web = {"app": f"web-{n}"}
                self.add_replicaset(f"web-{n}", "apps", k + 1, web)
                for i in range(k + 1):
                    self.add_pod(f"web-{n}-{sfx}{i}", "apps", n, web, owner=("ReplicaSet", f"web-{n}"))
                    d["evictable"].append(f"apps/web-{n}-{sfx}{i}")
                self.add_replicaset(f"cache-{n}", "apps", 1, {"app": f"cache-{n}"})
                self.add_pod(f"cache-{n}-{sfx}", "apps", n, {"app": f"cache-{n}"}, owner=("ReplicaSet", f"cache-{n}"),
                             empty_dir=True)
                d["emptydir"].append(f"apps/cache-{n}-{sfx}")
                self.add_replicaset(f"kata-{n}", "apps", 1, {"app": f"kata-{n}"})
                self.add_pod(f"kata-{n}-{sfx}", "apps", n, {"app": f"kata-{n}"}, owner=("ReplicaSet", f"kata-{n}"),
                             runtime_class="kata", overhead=overhead)
                d["kata"].append(f"apps/kata-{n}-{sfx}")
                self.add_pod(f"done-{n}", "apps", n, {"app": "batch"}, phase="Succeeded", ready=False)
                d["terminal"].append(f"apps/done-{n}")
                self.add_pod(f"lonely-{n}", "default", n, {"app": "lonely"})
                d["unreplicated"].append(f"default/lonely-{n}")
                self.add_pod(f"node-agent-{n}", "kube-system", n, {"app": "node-agent"},
                             owner=("DaemonSet", "node-agent"))
                d["daemonset"].append(f"kube-system/node-agent-{n}")
                self.add_pod(f"kube-proxy-{n}", "kube-system", n, {"component": "kube-proxy"}, mirror=True)
                d["mirror"].append(f"kube-system/kube-proxy-{n}")
                g = f"guarded-{n}"
                self.add_replicaset(f"db-{n}", g, 2, {"app": "db"})
                for i in range(2):
                    self.add_pod(f"db-{n}-{sfx}{i}", g, n, {"app": "db"}, owner=("ReplicaSet", f"db-{n}"))
                    d["blocked"].append(f"{g}/db-{n}-{sfx}{i}")
                self.add_pdb(f"db-{n}", g, {"app": "db"}, min_available=2)
                out[n] = d
        return out

    # -- controllers --------------------------------------------------------------------------

    def _pods(self, ns=None):
        keys = self.store.of("pods") if ns is None else sorted(self.store.in_namespace("pods", ns))
        return [self.store[k] for k in keys]

    @staticmethod
    def _ready(pod) -> bool:
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (pod.get("status") or {}).get("conditions") or [])

    @staticmethod
    def _controller_ref(obj):
        return next((r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")), None)

    def pdb_status(self, pdb: dict) -> dict:
        """The disruption controller's view of ``pdb`` (pkg/controller/disruption)."""
        ns = pdb["metadata"]["namespace"]
        spec = pdb.get("spec") or {}
        old = pdb.get("status") or {}
        pods = [p for p in self._pods(ns) if selector_matches(spec.get("selector"), p["metadata"].get("labels") or {})]
        disrupted = {k: v for k, v in (old.get("disruptedPods") or {}).items()
                     if any(p["metadata"]["name"] == k and not p["metadata"].get("deletionTimestamp") for p in pods)}
        failed = None
        expected = desired = 0

        def scale():
            total, seen = 0, set()
            for p in pods:
                ref = self._controller_ref(p)
                if not ref:
                    continue  # unmanaged pods are ignored (an event is recorded upstream)
                if ref.get("kind") != "ReplicaSet":
                    raise ValueError(f"found no controllers for pod {p['metadata']['name']!r}")
                if ref.get("uid") in seen:
                    continue
                seen.add(ref.get("uid"))
                rs = self.store.get(("replicasets", ns, ref.get("name")))
                if not rs:
                    raise ValueError(f"found no controllers for pod {p['metadata']['name']!r}")
                total += int((rs.get("spec") or {}).get("replicas", 1))
            return total

        def scaled(v, total):
            if isinstance(v, int):
                return v
            m = re.fullmatch(r"(\d+)%", str(v))
            if not m:
                raise ValueError(f"invalid value for IntOrString: invalid value {v!r}")
            return -(-int(m.group(1)) * total // 100)  # round up

        try:
            if spec.get("maxUnavailable") is not None:
                expected = scale()
                desired = max(0, expected - scaled(spec["maxUnavailable"], expected))
            elif spec.get("minAvailable") is not None:
                if isinstance(spec["minAvailable"], int):
                    desired, expected = spec["minAvailable"], len(pods)
                else:
                    expected = scale()
                    desired = scaled(spec["minAvailable"], expected)
        except ValueError as e:
            failed = str(e)
        healthy = sum(1 for p in pods if not p["metadata"].get("deletionTimestamp")
                      and p["metadata"]["name"] not in disrupted and self._ready(p))
        allowed = healthy - desired
        if failed or expected <= 0 or allowed <= 0:
            allowed = 0
        st = {"observedGeneration": pdb["metadata"].get("generation", 1), "disruptionsAllowed": allowed,
              "currentHealthy": 0 if failed else healthy, "desiredHealthy": 0 if failed else desired,
              "expectedPods": 0 if failed else expected}
        if disrupted:
            st["disruptedPods"] = disrupted
        ts = now_rfc3339()
        if failed:
            cond = {"type": "DisruptionAllowed", "status": "False", "reason": "SyncFailed", "message": failed}
        elif allowed > 0:
            cond = {"type": "DisruptionAllowed", "status": "True", "reason": "SufficientPods", "message": ""}
        else:
            cond = {"type": "DisruptionAllowed", "status": "False", "reason": "InsufficientPods", "message": ""}
        oldc = next((c for c in old.get("conditions") or [] if c.get("type") == "DisruptionAllowed"), None)
        cond["lastTransitionTime"] = oldc["lastTransitionTime"] if oldc and oldc.get("status") == cond["status"] else ts
        cond["observedGeneration"] = st["observedGeneration"]
        st["conditions"] = [cond]
        return st

    def _sync_pdbs(self):
        if self.pdb_controller_paused:
            return
        for k in list(self.store.of("poddisruptionbudgets")):
            pdb = self.store[k]
            st = self.pdb_status(pdb)
            old = dict(pdb.get("status") or {})
            if {a: b for a, b in old.items() if a != "conditions"} != {a: b for a, b in st.items() if a != "conditions"}:
                pdb["status"] = st
                pdb["metadata"]["resourceVersion"] = self._next_rv()
                self._log("MODIFIED", pdb)

    def _pod_gone_or_terminating(self, pod: dict, removed: bool):
        """ReplicaSet/DaemonSet controllers react to one of their pods going away."""
        ref = self._controller_ref(pod)
        if not ref:
            return
        ns = pod["metadata"]["namespace"]
        if ref.get("kind") == "ReplicaSet":
            rs = self.store.get(("replicasets", ns, ref.get("name")))
            if not rs or rs["metadata"].get("uid") != ref.get("uid"):
                return
            active = [p for p in self._pods(ns) if (self._controller_ref(p) or {}).get("uid") == ref["uid"]
                      and not p["metadata"].get("deletionTimestamp")
                      and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            if len(active) >= int((rs.get("spec") or {}).get("replicas", 1)):
                return
            node = next((n["metadata"]["name"] for n in (self.store[k] for k in self.store.of("nodes"))
                         if not (n.get("spec") or {}).get("unschedulable") and self._ready(n)), None)
            self._spawn(rs, pod, node)
        elif ref.get("kind") == "DaemonSet" and removed:
            ds = self.store.get(("daemonsets", ns, ref.get("name")))
            node = (pod.get("spec") or {}).get("nodeName")
            if not ds or ds["metadata"].get("uid") != ref.get("uid") or not node or ("nodes", "", node) not in self.store:
                return
            self._spawn(ds, pod, node)

    def _spawn(self, owner: dict, old: dict, node: str | None):
        ns = owner["metadata"]["namespace"]
        base = owner["metadata"]["name"]
        while True:
            name = f"{base}-" + "".join(self._rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
            if ("pods", ns, name) not in self.store:
                break
        pod = copy.deepcopy(old)
        md = pod["metadata"]
        for k in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "uid", "creationTimestamp"):
            md.pop(k, None)
        md["name"], md["generateName"] = name, f"{base}-"
        md["labels"] = dict(((owner.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels")
                            or md.get("labels") or {})
        (md.get("annotations") or {}).pop(STUCK, None)
        spec = pod.setdefault("spec", {})
        if node:
            spec["nodeName"] = node
            pod["status"] = self._pod_status("Running", True, node)
        else:
            spec.pop("nodeName", None)
            pod["status"] = self._pod_status("Pending", False, None)
        self._stamp_new(RESOURCES["pods"], pod)
        self.store[("pods", ns, name)] = pod
        self._log("ADDED", pod)

    # -- pod deletion (kubelet) ---------------------------------------------------------------

    def _remove(self, res: Res, key, obj, cascade=True):
        self.store.pop(key, None)
        self._log("DELETED", obj, bump=True)
        if res.plural == "pods":
            self._pod_gone_or_terminating(obj, removed=True)
            self._exec_pod_removed(obj)  # kubeexec_server.py: its containers, and execs, end
        elif res.plural in ("replicasets", "daemonsets") and cascade:
            uid = obj["metadata"]["uid"]
            for k, p in list(self.store.items()):
                if k[0] == "pods" and (self._controller_ref(p) or {}).get("uid") == uid:
                    self.store.pop(k, None)
                    self._log("DELETED", p, bump=True)
        elif res.plural == "namespaces":
            for k in [k for k in self.store if k[1] == key[2] and RESOURCES[k[0]].namespaced]:
                self._log("DELETED", self.store.pop(k), bump=True)
        self._sync_pdbs()

    def _kubelet_finish(self, gen, key, uid):
        with self._lock:
            if gen != self._gen:
                return
            pod = self.store.get(key)
            if pod is None or pod["metadata"].get("uid") != uid:
                return
            self._remove(RESOURCES["pods"], key, pod)

    def _schedule_finish(self, key, pod, grace):
        if (pod["metadata"].get("annotations") or {}).get(STUCK) == "true":
            return
        t = threading.Timer(max(0.0, grace * self.grace_scale), self._kubelet_finish,
                            (self._gen, key, pod["metadata"]["uid"]))
        t.daemon = True
        self._timers.append(t)
        t.start()

    def _delete(self, res: Res, ns, name, opts: dict, dry: bool):
        key = self._key(res, ns, name)
        obj = self.store.get(key)
        if obj is None:
            raise not_found(res, name)
        pre = opts.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"].get("uid"):
            raise conflict(res, name, f"Precondition failed: UID in precondition: {pre['uid']}, "
                                      f"UID in object meta: {obj['metadata'].get('uid')}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"].get("resourceVersion"):
            raise conflict(res, name, f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                                      f"ResourceVersion in object meta: {obj['metadata'].get('resourceVersion')}")
        pp = opts.get("propagationPolicy")
        if pp is not None and pp not in ("Orphan", "Background", "Foreground"):
            raise ApiError(422, "Invalid", f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: '
                                           f'"{pp}": supported values: "Foreground", "Background", "Orphan", "nil"',
                           {"group": "meta.k8s.io", "kind": "DeleteOptions"})
        if pp is not None and opts.get("orphanDependents") is not None:
            raise ApiError(422, "Invalid", 'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Invalid value: '
                                           f'"{pp}": orphanDependents and deletionPropagation cannot be both set',
                           {"group": "meta.k8s.io", "kind": "DeleteOptions"})
        gps = opts.get("gracePeriodSeconds")
        if gps is not None and gps < 0:
            gps = None if res.plural != "pods" else 1
        if res.plural != "pods":
            if not dry:
                self._remove(res, key, obj, cascade=(pp or ("Orphan" if opts.get("orphanDependents") else "Background"))
                             != "Orphan")
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": _details(res, name, uid=obj["metadata"].get("uid"))}
        spec, st, md = obj.get("spec") or {}, obj.get("status") or {}, obj["metadata"]
        grace = gps if gps is not None else int(spec.get("terminationGracePeriodSeconds", 30))
        if not spec.get("nodeName") or st.get("phase") in ("Succeeded", "Failed"):
            grace = 0  # pod strategy: unscheduled or terminal pods go at once
        if md.get("deletionTimestamp") and md.get("deletionGracePeriodSeconds") is not None:
            grace = min(grace, md["deletionGracePeriodSeconds"])  # may only shorten
        out = copy.deepcopy(obj)
        if grace == 0:
            if not dry:
                self._remove(res, key, obj)
            out["metadata"]["deletionTimestamp"] = out["metadata"].get("deletionTimestamp") or now_rfc3339()
            out["metadata"]["deletionGracePeriodSeconds"] = 0
            return 200, out
        if dry:
            out["metadata"]["deletionTimestamp"] = now_rfc3339(time.time() + grace)
            out["metadata"]["deletionGracePeriodSeconds"] = grace
            return 200, out
        first = not md.get("deletionTimestamp")
        md["deletionTimestamp"] = now_rfc3339(time.time() + grace)
        md["deletionGracePeriodSeconds"] = grace
        md["resourceVersion"] = self._next_rv()
        self._log("MODIFIED", obj)
        self._schedule_finish(key, obj, grace)
        if first:
            self._pod_gone_or_terminating(obj, removed=False)
        self._sync_pdbs()
        return 200, copy.deepcopy(obj)

    # -- eviction -----------------------------------------------------------------------------

    def _evict(self, ns, name, ev: dict, query_dry: bool):
        pods = RESOURCES["pods"]
        if (ev.get("metadata") or {}).get("name") != name:
            raise bad_request("name in URL does not match name in Eviction object")
        opts = dict(ev.get("deleteOptions") or {})
        body_dry = opts.get("dryRun") or []
        if query_dry and body_dry and body_dry != ["All"]:
            raise bad_request(f"Non-matching dry-run options in request and content: [All] and {body_dry}")
        dry = query_dry or body_dry == ["All"]
        pod = self.store.get(("pods", ns, name))
        if pod is None:
            raise not_found(pods, name)
        md, st = pod["metadata"], pod.get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed", "Pending") or md.get("deletionTimestamp"):
            self._delete(pods, ns, name, opts, dry)
            return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
        pdbs = [p for p in (self.store[k] for k in self.store.of("poddisruptionbudgets") if k[1] == ns)
                if selector_matches((p.get("spec") or {}).get("selector"), md.get("labels") or {})]
        if len(pdbs) > 1:
            return 500, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": "This pod has more than one PodDisruptionBudget, which the eviction subresource "
                                    "does not support.", "code": 500}
        if pdbs:
            pdb = pdbs[0]
            ps, pst = pdb.get("spec") or {}, pdb.get("status") or {}
            unready_ok = not self._ready(pod) and (
                ps.get("unhealthyPodEvictionPolicy") == "AlwaysAllow" or
                (pst.get("currentHealthy", 0) >= pst.get("desiredHealthy", 0) and pst.get("desiredHealthy", 0) > 0))
            if unready_ok:
                pre = dict(opts.get("preconditions") or {})
                pre.setdefault("resourceVersion", md.get("resourceVersion"))
                self._delete(pods, ns, name, {**opts, "preconditions": pre}, dry)
                return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
            pname = pdb["metadata"]["name"]
            if pst.get("observedGeneration", 0) < pdb["metadata"].get("generation", 1):
                raise ApiError(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.",
                               {"causes": [{"reason": "DisruptionBudget", "message":
                                            f"The disruption budget {pname} is still being processed by the server."}],
                                "retryAfterSeconds": 10}, retry_after=10)
            if pst.get("disruptionsAllowed", 0) < 0:
                raise ApiError(403, "Forbidden", f'poddisruptionbudget.policy "{pname}" is forbidden: '
                                                 "pdb disruptions allowed is negative",
                               {"name": pname, "group": "policy", "kind": "poddisruptionbudget"})
            if pst.get("disruptionsAllowed", 0) == 0:
                raise ApiError(429, "TooManyRequests", "Cannot evict pod as it would violate the pod's disruption budget.",
                               {"causes": [{"reason": "DisruptionBudget", "message":
                                            f"The disruption budget {pname} needs {pst.get('desiredHealthy', 0)} "
                                            f"healthy pods and has {pst.get('currentHealthy', 0)} currently"}]})
            if not dry:
                pst = pdb.setdefault("status", {})
                pst["disruptionsAllowed"] -= 1
                pst.setdefault("disruptedPods", {})[name] = now_rfc3339()
                pdb["metadata"]["resourceVersion"] = self._next_rv()
                self._log("MODIFIED", pdb)
        self._delete(pods, ns, name, opts, dry)
        return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    # -- validation ---------------------------------------------------------------------------

    def _validate(self, res: Res, obj: dict, name: str):
        if not _NAME.match(name or "") or len(name) > 253:
            raise invalid(res, name, "metadata.name", name, "a lowercase RFC 1123 subdomain must consist of lower case "
                          "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")
        if res.plural == "leases":
            for f in ("acquireTime", "renewTime"):
                v = (obj.get("spec") or {}).get(f)
                if v is not None and not (isinstance(v, str) and _MICRO.match(v)):
                    raise bad_request(f'Lease in version "v1" cannot be handled as a Lease: parsing time "{v}" as '
                                      f'"2006-01-02T15:04:05.000000Z07:00": cannot parse "{v[19:] if isinstance(v, str) else v}" as "."')
        if res.plural == "poddisruptionbudgets":
            spec = obj.get("spec") or {}
            if spec.get("minAvailable") is not None and spec.get("maxUnavailable") is not None:
                raise invalid(res, name, "spec", spec, "minAvailable and maxUnavailable cannot be both set")
        if res.plural == "configmaps":
            self._validate_configmap_size(res, obj, name)

    def _validate_configmap_size(self, res: Res, obj: dict, name: str):
        """ValidateConfigMap (kubernetes pkg/apis/core/validation/validation.go): the values
        of data and binaryData (decoded: []byte) may total core.MaxSecretSize (1 MiB); more
        is field.TooLong(field.NewPath(""), ...) on the whole object (apimachinery
        pkg/util/validation/field/errors.go: "must have at most %d bytes"; an empty path
        prints "[]"), e.g. 'ConfigMap "chi-storage-core" is invalid: []: Too long: must have
        at most 1048576 bytes' in Altinity/clickhouse-operator#1710."""
        total = sum(len(str(v).encode()) for v in (obj.get("data") or {}).values())
        for v in (obj.get("binaryData") or {}).values():
            try:
                total += len(base64.b64decode(v if isinstance(v, (str, bytes)) else "", validate=True))
            except ValueError:
                raise bad_request('ConfigMap in version "v1" cannot be handled as a ConfigMap: '
                                  'illegal base64 data at input byte 0') from None
        if total > MAX_CONFIGMAP_BYTES:
            why = f"Too long: must have at most {MAX_CONFIGMAP_BYTES} bytes"
            raise ApiError(422, "Invalid", f'ConfigMap "{name}" is invalid: []: {why}', _details(
                res, name, kind=res.kind, causes=[{"reason": "FieldValueTooLong", "message": why, "field": "[]"}]))

    # -- request dispatch ---------------------------------------------------------------------

    def _authorize(self, user, verb, res: Res, sub, ns, name):
        r = f"{res.plural}/{sub}" if sub else res.plural
        if (user == "admin" or verb in ("get", "list", "watch")) and (verb, r) not in self.denied:
            return
        scope = f'in the namespace "{ns}"' if ns else "at the cluster scope"
        why = f'User "{user}" cannot {verb} resource "{r}" in API group "{res.group}" {scope}'
        gr = res.qualified
        msg = f'{gr} "{name}" is forbidden: {why}' if name else f"{gr} is forbidden: {why}"
        raise ApiError(403, "Forbidden", msg, _details(res, name))

    def handle(self, method: str, path: str, query: dict, body, user: str, accept: str):
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path in ("/api", "/api/"):
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]}
        if path in ("/apis", "/apis/"):
            return 200, self._group_list()
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "emulationMajor": "1", "emulationMinor": "33",
                         "minCompatibilityMajor": "1", "minCompatibilityMinor": "32", "gitVersion": "v1.33.1",
                         "gitCommit": "8adc0f041b8e7ad1d30e29cc59c6ae7a15e19828", "gitTreeState": "clean",
                         "buildDate": "2025-05-15T08:19:08Z", "goVersion": "go1.24.2", "compiler": "gc",
                         "platform": "linux/amd64"}
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            group = parts[1]
            if len(parts) == 2:
                if group not in GROUPS or not group:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return 200, self._group(group)
            version, rest = parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if GROUPS.get(group) != version:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return 200, self._resource_list(group, version)
        if group == "authorization.k8s.io":
            if rest != [SSAR]:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
            return self._self_subject_access_review(body, user)
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            ns, rest = rest[1], rest[2:]
        plural = rest[0]
        res = RESOURCES.get(plural)
        if res is None or res.group != group or (ns is not None and not res.namespaced) or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in res.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if res.namespaced and ns is None and (name or method not in ("GET",)):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        watch = name is None and method == "GET" and query.get("watch", [""])[0] in ("true", "1")
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}.get(method)
        if verb is None or (verb == "create" and name and sub != "eviction") or (verb in ("update", "patch") and not name):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if watch:
            verb = "watch"
        self._authorize(user, verb, res, sub, ns, name)
        if watch:
            raise _Watch(res, ns, query)
        dry = False
        if verb not in ("get", "list"):
            dr = query.get("dryRun") or []
            if any(d != "All" for d in dr):
                raise bad_request(f"Invalid dryRun value: {dr}")
            dry = bool(dr)
        with self._lock:
            if verb == "get":
                obj = self.store.get(self._key(res, ns, name))
                if obj is None:
                    raise not_found(res, name)
                return 200, self._maybe_table(res, [obj], accept, single=True) or copy.deepcopy(obj)
            if verb == "list":
                return 200, self._list(res, ns, query, accept)
            if verb == "deletecollection":
                raise ApiError(405, "MethodNotAllowed", "the stand-in does not implement deletecollection")
            if verb == "create" and ns:
                self._namespace_lifecycle(res, ns, name or (body.get("metadata") or {}).get("name")
                                          if isinstance(body, dict) else name)
            if sub == "eviction":
                if not isinstance(body, dict):
                    raise bad_request("an Eviction body is required")
                return self._evict(ns, name, body, dry)
            if verb == "create":
                return self._create(res, ns, body, dry)
            if verb == "update":
                return self._update(res, ns, name, body, dry, sub)
            if verb == "patch":
                return self._patch(res, ns, name, body, dry, sub)
            if verb == "delete":
                opts = dict(body) if isinstance(body, dict) else {}
                if "gracePeriodSeconds" in query:
                    opts["gracePeriodSeconds"] = int(query["gracePeriodSeconds"][0])
                if "propagationPolicy" in query:
                    opts["propagationPolicy"] = query["propagationPolicy"][0]
                dry = dry or (opts.get("dryRun") or []) == ["All"]
                return self._delete(res, ns, name, opts, dry)
        raise AssertionError(verb)

    def _self_subject_access_review(self, body, user):
        """POST selfsubjectaccessreviews (``kubectl auth can-i``): the request's own user asked
        about one verb on a resource, answered 201 with the review and its status from this
        server's authorizer (_authorize's model: the two users, less ``deny``), as
        pkg/registry/authorization/selfsubjectaccessreview/rest.go Create does. RBAC never
        denies, it only does not allow: ``denied`` is absent, ``reason`` empty on a refusal."""
        if not isinstance(body, dict) or body.get("kind") not in (None, "SelfSubjectAccessReview"):
            raise bad_request(f"not a SelfSubjectAccessReview: {body!r}")
        spec = body.get("spec") or {}
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if (ra is None) == (nra is None):
            raise ApiError(422, "Invalid", 'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: '
                           "spec.resourceAttributes: Invalid value: \"null\": exactly one of "
                           "nonResourceAttributes or resourceAttributes must be specified")
        if ra is not None:
            verb = ra.get("verb") or ""
            r = ra.get("resource") or ""
            if ra.get("subresource"):
                r = f"{r}/{ra['subresource']}"
            allowed = (user == "admin" or verb in ("get", "list", "watch")) and (verb, r) not in self.denied
        else:
            allowed = user == "admin" or nra.get("verb") == "get"
        out = {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
               "metadata": {"creationTimestamp": None}, "spec": spec, "status": {"allowed": allowed}}
        if allowed:
            out["status"]["reason"] = ('RBAC: allowed by ClusterRoleBinding "cluster-admin" of ClusterRole '
                                       '"cluster-admin" to Group "system:masters"' if user == "admin" else
                                       'RBAC: allowed by ClusterRoleBinding "view" of ClusterRole "view" to '
                                       f'User "{user}"')
        return 201, out

    def _namespace_lifecycle(self, res, ns, name):
        """NamespaceLifecycle admission (apiserver/pkg/admission/plugin/namespace/lifecycle/
        admission.go): no create (an eviction is one) in a Terminating namespace; 403 with the
        NamespaceTerminating cause."""
        nso = self.store.get(self._key(RESOURCES["namespaces"], None, ns))
        if nso is not None and (nso.get("status") or {}).get("phase") == "Terminating":
            raise ApiError(403, "Forbidden", f'{res.qualified} "{name}" is forbidden: unable to create new content in '
                           f"namespace {ns} because it is being terminated",
                           {"name": name, "kind": res.plural, "causes": [
                               {"reason": "NamespaceTerminating", "message": f"namespace {ns} is being terminated",
                                "field": "metadata.namespace"}]})

    def _create(self, res, ns, body, dry):
        if not isinstance(body, dict):
            raise bad_request("the body of the request is not an object")
        obj = copy.deepcopy(body)
        md = obj.setdefault("metadata", {})
        if res.namespaced:
            if md.get("namespace") and md["namespace"] != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            md["namespace"] = ns
            if ("namespaces", "", ns) not in self.store:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        shown = md.get("name") or md.get("generateName")  # admission runs before a name is generated
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + "".join(self._rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        name = md.get("name")
        if not name:
            raise invalid(res, "", "metadata.name", "", "name or generateName is required")
        self._exec_default(res, obj)  # kubeexec_server.py: pod-template defaulting
        if res.plural == "pods":
            admit_priority(obj, shown)
        self._validate(res, obj, name)
        key = self._key(res, ns, name)
        if key in self.store:
            raise already_exists(res, name)
        if res.plural == "poddisruptionbudgets":
            obj["status"] = {}
        if res.plural == "namespaces":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
        if res.plural == "pods":  # strategy.go PrepareForCreate: a status sent is dropped
            obj["status"] = {"phase": "Pending", "qosClass": pod_qos(obj)}
        self._stamp_new(res, obj)
        if dry:
            self._rv -= 1
            obj["metadata"].pop("resourceVersion", None)
            return 201, obj
        self.store[key] = obj
        self._log("ADDED", obj)
        self._exec_after_create(res, obj)  # mini kubelet / DaemonSet pods (kubeexec_server.py)
        self._sync_pdbs()
        return 201, copy.deepcopy(obj)

    def _finish_update(self, res, ns, name, old, new, dry, sub):
        md, omd = new.setdefault("metadata", {}), old["metadata"]
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            if k in omd:
                md[k] = omd[k]
            else:
                md.pop(k, None)
        md["name"] = name
        if res.namespaced:
            md["namespace"] = ns
        new["apiVersion"], new["kind"] = res.api_version, res.kind
        if sub == "status":
            new = {**copy.deepcopy(old), "status": new.get("status"), "metadata": md}
        elif res.plural in ("poddisruptionbudgets", "replicasets", "daemonsets"):
            new["status"] = copy.deepcopy(old.get("status"))
            if new.get("spec") != old.get("spec"):
                md["generation"] = omd.get("generation", 1) + 1
        self._exec_default(res, new)
        self._validate(res, new, name)
        if res.plural == "nodes" and sub is None and \
                (new.get("spec") or {}).get("unschedulable") != (old.get("spec") or {}).get("unschedulable"):
            self._manage_unschedulable(md, "unschedulable" in (new.get("spec") or {}))
        if new == old:
            return 200, copy.deepcopy(old)
        md["resourceVersion"] = str(self._rv + 1)
        if dry:
            return 200, new
        self._next_rv()
        self.store[self._key(res, ns, name)] = new
        self._log("MODIFIED", new)
        self._sync_pdbs()
        return 200, copy.deepcopy(new)

    def _manage_unschedulable(self, md: dict, present: bool) -> None:
        """managedFields for a node's spec.unschedulable only: an Update that changes it makes
        the request's manager (?fieldManager, else the User-Agent up to its first '/': apiserver
        pkg/endpoints/handlers/create.go managerOrUserAgent) its owner, at this time; one that removes it leaves
        it unowned."""
        entries = []
        for mf in md.get("managedFields") or []:
            spec = {k: v for k, v in ((mf.get("fieldsV1") or {}).get("f:spec") or {}).items() if k != "f:unschedulable"}
            if spec or set(mf.get("fieldsV1") or {}) - {"f:spec"}:
                entries.append({**mf, "fieldsV1": {**mf["fieldsV1"], "f:spec": spec}})
        if present:
            entries.append({"manager": getattr(_request, "manager", "") or "unknown", "operation": "Update",
                            "apiVersion": "v1", "time": now_rfc3339(), "fieldsType": "FieldsV1",
                            "fieldsV1": {"f:spec": {"f:unschedulable": {}}}})
        md["managedFields"] = entries

    def _update(self, res, ns, name, body, dry, sub):
        if not isinstance(body, dict):
            raise bad_request("the body of the request is not an object")
        bmd = body.get("metadata") or {}
        if bmd.get("name") and bmd["name"] != name:
            raise bad_request(f"the name of the object ({bmd['name']}) does not match the name on the URL ({name})")
        old = self.store.get(self._key(res, ns, name))
        if old is None:
            if res.create_on_update and sub is None:
                b = copy.deepcopy(body)
                b.setdefault("metadata", {})["name"] = name
                b["metadata"].pop("resourceVersion", None)
                return self._create(res, ns, b, dry)
            raise not_found(res, name)
        rv = bmd.get("resourceVersion")
        if not rv and not res.unconditional:
            raise invalid(res, name, "metadata.resourceVersion", "0x0", "must be specified for an update")
        if rv and rv != old["metadata"].get("resourceVersion"):
            raise conflict(res, name, STALE)
        return self._finish_update(res, ns, name, old, copy.deepcopy(body), dry, sub)

    def _patch(self, res, ns, name, body, dry, sub):
        ctype, doc = body
        old = self.store.get(self._key(res, ns, name))
        if old is None:
            raise not_found(res, name)
        cur = copy.deepcopy(old)  # patch results share untouched sub-objects with their input
        try:
            if ctype == "application/json-patch+json":
                new = json_patch(cur, doc)
            elif ctype == "application/merge-patch+json":
                new = merge_patch(cur, doc)
            else:
                new = strategic_merge_patch(cur, doc)
        except AssertionError as e:
            raise ApiError(422, "Invalid", str(e)) from None
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}") from None
        if not isinstance(new, dict):
            raise bad_request("the patch did not result in an object")
        prv = ((doc if isinstance(doc, dict) else {}).get("metadata") or {}).get("resourceVersion")
        if prv and prv != old["metadata"].get("resourceVersion"):
            raise conflict(res, name, STALE)
        new.setdefault("metadata", {})["resourceVersion"] = old["metadata"].get("resourceVersion")
        return self._finish_update(res, ns, name, old, new, dry, sub)

    def _list(self, res, ns, query, accept):
        # resourceVersion=0 is served from the watch cache, which may lag (lag_watch_cache)
        lagging = self._cache is not None and query.get("resourceVersion", [""])[0] == "0"
        store = self._cache if lagging and self._cache is not None else self.store
        keys = store.of(res.plural)
        lsel = query.get("labelSelector", [""])[0]
        fsel = query.get("fieldSelector", [""])[0]
        try:
            preds = parse_selector(lsel)
        except ValueError as e:
            raise bad_request(str(e)) from None
        fpred = parse_field_selector(res, fsel)
        try:
            limit = int(query.get("limit", ["0"])[0] or 0)
        except ValueError:
            raise bad_request("limit must be an integer") from None
        first = 0
        cont = query.get("continue", [""])[0]
        if cont:
            try:
                tok = json.loads(base64.urlsafe_b64decode(cont + "=" * (-len(cont) % 4)))
                start = tok["start"]
            except (ValueError, KeyError, TypeError):
                raise bad_request("continue key is not valid: invalid continue token") from None
            first = bisect.bisect_left(keys, start, key=lambda k: f"{k[1]}/{k[2]}")
        items, more = [], None
        for i in range(first, len(keys)):
            k = keys[i]
            if ns is not None and k[1] != ns:
                continue
            o = store[k]
            if all(p(o["metadata"].get("labels") or {}) for p in preds) and fpred(o):
                if limit > 0 and len(items) == limit:
                    more = o
                    break
                items.append(o)
        meta: dict = {"resourceVersion": str(self._rv)}
        if more is not None:
            nxt = self._sortkey(more)
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"v": "meta.k8s.io/v1", "rv": self._rv, "start": nxt}).encode()).decode().rstrip("=")
            if not lsel and not fsel:
                meta["remainingItemCount"] = sum(1 for k in keys[first:] if ns is None or k[1] == ns) - limit
        table = self._maybe_table(res, items, accept)
        if table is not None:
            table["metadata"] = meta
            return table
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta,
                "items": [{k: v for k, v in copy.deepcopy(o).items() if k not in ("kind", "apiVersion")} for o in items]}

    def watch_open(self, w: "_Watch"):
        """Validate a watch request (ApiError) and return an iterator of its events (dicts), which
        ends at the request's timeoutSeconds, a reset() or close()."""
        res, ns, q = w.res, w.ns, w.query
        try:
            preds = parse_selector(q.get("labelSelector", [""])[0])
        except ValueError as e:
            raise bad_request(str(e)) from None
        fpred = parse_field_selector(res, q.get("fieldSelector", [""])[0])
        timeout = float(q.get("timeoutSeconds", ["1800"])[0] or 1800)

        def match(o):
            return (o["kind"] == res.kind and (ns is None or o["metadata"].get("namespace") == ns)
                    and all(p(o["metadata"].get("labels") or {}) for p in preds) and fpred(o))

        rv = q.get("resourceVersion", [""])[0]
        bookmarks = q.get("allowWatchBookmarks", [""])[0] == "true"
        with self._lock:
            gen, cuts = self._gen, self._watch_cuts
            if rv in ("", "0"):
                cursor = self._rv
                first = [{"type": "ADDED", "object": copy.deepcopy(o)} for k, o in sorted(self.store.items())
                         if k[0] == res.plural and match(o)]
            else:
                try:
                    cursor = int(rv)
                except ValueError:
                    raise bad_request(f"invalid resourceVersion {rv!r}") from None
                oldest = max(self._events[0][0] - 1 if self._events else 0, self._compacted)
                if cursor < oldest and cursor < self._rv:
                    # past authn/authz and a parsed resourceVersion, the real server reports it
                    # inside the stream (cacher.go Watch: newErrWatcher), which then ends
                    err = ApiError(410, "Expired", f"too old resource version: {cursor} ({oldest})")
                    return iter([{"type": "ERROR", "object": err.status()}])
                first = []
        return self._watch_iter(first, cursor, gen, cuts, match, timeout, res if bookmarks else None)

    def _watch_iter(self, first, cursor, gen, cuts, match, timeout, bookmark_res):
        yield from first
        start = time.monotonic()
        end = start + timeout

        def next_bookmark(now):  # cache_watcher.go nextBookmarkTime: every bookmarkFrequency, and 2 s before the end
            t = min(now + self.bookmark_interval, end - 2)
            return t if t >= now else None
        bm = next_bookmark(start) if bookmark_res is not None else None
        while time.monotonic() < end and not self._closed and gen == self._gen:
            with self._lock:
                if gen != self._gen:
                    return
                if cuts != self._watch_cuts:
                    raise _Cut()
                i = bisect.bisect_right(self._events, cursor, key=lambda e: e[0])
                evs = self._events[i:]
            for r, t, o, prev in evs:
                cursor = r
                # cache_watcher.go convertToWatchEvent: the object's match before and after
                if t == "DELETED":
                    cur, old = False, match(o)
                else:
                    cur = match(o)
                    old = t == "MODIFIED" and (match(prev) if prev is not None else cur)
                if cur:
                    yield {"type": "MODIFIED" if old else "ADDED", "object": copy.deepcopy(o)}
                elif old:
                    gone = copy.deepcopy(o if t == "DELETED" else prev)
                    gone["metadata"]["resourceVersion"] = str(r)
                    yield {"type": "DELETED", "object": gone}
            now = time.monotonic()
            if bm is not None and now >= bm:
                yield {"type": "BOOKMARK", "object": {
                    "kind": bookmark_res.kind, "apiVersion": bookmark_res.api_version,
                    "metadata": {"resourceVersion": str(cursor), "creationTimestamp": None}}}
                bm = next_bookmark(now)
            time.sleep(0.02)

    @staticmethod
    def _sortkey(o):
        return f"{o['metadata'].get('namespace', '')}/{o['metadata']['name']}"

    # -- tables -------------------------------------------------------------------------------

    @staticmethod
    def _age(o):
        s = int(time.time() - _parse_time(o["metadata"]["creationTimestamp"]))
        return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"

    def _maybe_table(self, res, items, accept, single=False):
        if "as=Table" not in (accept or ""):
            return None
        cols = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        rows = []
        if res.plural == "nodes":
            cols += [{"name": n, "type": "string", "format": "", "description": n, "priority": p} for n, p in
                     [("Status", 0), ("Roles", 0), ("Age", 0), ("Version", 0), ("Internal-IP", 1), ("External-IP", 1),
                      ("OS-Image", 1), ("Kernel-Version", 1), ("Container-Runtime", 1)]]
            for o in items:
                st, sp = o.get("status") or {}, o.get("spec") or {}
                # kubernetes pkg/printers/internalversion/printers.go printNode: a Ready condition
                # that is not True (False or Unknown) is NotReady; Unknown only with no Ready condition
                ready = next((c.get("status") for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
                s = "Unknown" if ready is None else "Ready" if ready == "True" else "NotReady"
                if sp.get("unschedulable"):
                    s += ",SchedulingDisabled"
                roles = ",".join(sorted(k.split("/", 1)[1] for k in (o["metadata"].get("labels") or {})
                                        if k.startswith("node-role.kubernetes.io/"))) or "<none>"
                addr = {a["type"]: a["address"] for a in st.get("addresses") or []}
                ni = st.get("nodeInfo") or {}
                rows.append([o["metadata"]["name"], s, roles, self._age(o), ni.get("kubeletVersion", ""),
                             addr.get("InternalIP", "<none>"), addr.get("ExternalIP", "<none>"), ni.get("osImage", ""),
                             ni.get("kernelVersion", ""), ni.get("containerRuntimeVersion", "")])
        elif res.plural == "pods":
            cols += [{"name": n, "type": t, "format": "", "description": n, "priority": p} for n, t, p in
                     [("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0), ("Age", "string", 0),
                      ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1),
                      ("Readiness Gates", "string", 1)]]
            for o in items:
                st = o.get("status") or {}
                cs = st.get("containerStatuses") or []
                n = len((o.get("spec") or {}).get("containers") or [])
                phase = st.get("phase", "Pending")
                if o["metadata"].get("deletionTimestamp"):
                    phase = "Terminating"
                elif phase == "Succeeded":
                    phase = "Completed"
                elif phase == "Failed":
                    phase = "Error"
                rows.append([o["metadata"]["name"], f"{sum(1 for c in cs if c.get('ready'))}/{n}", phase,
                             str(sum(c.get("restartCount", 0) for c in cs)), self._age(o), st.get("podIP", "<none>"),
                             (o.get("spec") or {}).get("nodeName", "<none>"), "<none>", "<none>"])
        else:
            cols += [{"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0}]
            rows = [[o["metadata"]["name"], self._age(o)] for o in items]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self._rv)},
                "columnDefinitions": cols,
                "rows": [{"cells": r, "object": copy.deepcopy(o)} for r, o in zip(rows, items, strict=True)]}

    # -- discovery ----------------------------------------------------------------------------

    def _resource_list(self, group, version):
        out = []
        for r in RESOURCES.values():
            if r.group != group:
                continue
            e = {"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced, "kind": r.kind,
                 "verbs": VERBS, "storageVersionHash": base64.b64encode(r.kind.encode()).decode()[:11]}
            if r.short:
                e["shortNames"] = r.short
            out.append(e)
            for s in r.subresources:
                if s == "eviction":
                    out.append({"name": f"{r.plural}/eviction", "singularName": "", "namespaced": True,
                                "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]})
                else:
                    out.append({"name": f"{r.plural}/{s}", "singularName": "", "namespaced": r.namespaced,
                                "kind": r.kind, "verbs": ["get", "patch", "update"]})
        if group == "authorization.k8s.io":
            out.append({"name": SSAR, "singularName": "selfsubjectaccessreview", "namespaced": False,
                        "kind": "SelfSubjectAccessReview", "verbs": ["create"]})
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version,
                "resources": out}

    def _group(self, g):
        gv = {"groupVersion": f"{g}/{GROUPS[g]}", "version": GROUPS[g]}
        return {"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": [gv], "preferredVersion": gv}

    def _group_list(self):
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [{k: v for k, v in self._group(g).items() if k not in ("kind", "apiVersion")}
                           for g in GROUPS if g]}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    srv: KubeStandIn

    def log_message(self, *a):
        pass

    def _send(self, code, body, retry_after=None, cut=False):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        if cut:
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            raise _Cut()
        self.wfile.write(data)

    def _serve(self):
        srv = self.srv
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        u = urlsplit(self.path)
        query = parse_qs(u.query, keep_blank_values=True)
        entry = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                 "user_agent": self.headers.get("User-Agent", ""), "content_type": ctype, "raw": raw, "body": None}
        body = None
        err = None
        if raw:
            try:
                if ctype == "application/vnd.kubernetes.protobuf":
                    body = _protobuf.decode_k8s(raw)
                elif ctype in PATCH_TYPES and self.command == "PATCH":
                    body = (ctype, json.loads(raw))
                elif ctype in ("application/json", "") or ctype.endswith("+json"):
                    body = json.loads(raw)
                elif ctype in ("application/yaml", "application/apply-patch+yaml"):
                    err = ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                                   "accepted media types include: application/json-patch+json, "
                                   "application/merge-patch+json, application/strategic-merge-patch+json")
                else:
                    err = ApiError(415, "UnsupportedMediaType",
                                   'the body of the request was in an unknown format - accepted media types include: '
                                   'application/json, application/yaml, application/vnd.kubernetes.protobuf')
            except _protobuf.ProtobufError as e:
                err = ApiError(415 if "no protobuf schema" in str(e) else 400,
                               "UnsupportedMediaType" if "no protobuf schema" in str(e) else "BadRequest", str(e))
            except ValueError as e:
                err = bad_request(f"couldn't get version/kind; json parse error: {e}")
        if self.command == "PATCH" and err is None and not (isinstance(body, tuple)):
            err = ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
                           "media types include: application/json-patch+json, application/merge-patch+json, "
                           "application/apply-patch+yaml, application/strategic-merge-patch+json")
        entry["body"] = body[1] if isinstance(body, tuple) else body
        with srv._lock:
            srv.requests.append(entry)
        faults = srv._take_faults(self.command, self.path, entry["body"])
        cut = False
        late = None  # an ``applied`` status fault: answered once the request is carried out
        for f in faults:
            if f["type"] == "delay":
                time.sleep(f["seconds"])
        for f in faults:
            if f["type"] == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if f["type"] == "cut":
                cut = True
            elif f["type"] == "status" and f.get("applied"):
                late = f
            elif f["type"] == "status":
                b = f["body"] if f["body"] is not None else ApiError(
                    f["status"], {403: "Forbidden", 409: "Conflict", 429: "TooManyRequests", 500: "InternalError",
                                  503: "ServiceUnavailable", 504: "Timeout"}.get(f["status"], "InternalError"),
                    f"injected fault ({f['status']})",
                    {"retryAfterSeconds": f["retry_after"]} if f["retry_after"] is not None else None).status()
                if isinstance(b, str):
                    b = b.encode()
                return self._send(f["status"], b, f["retry_after"], cut)
        auth = self.headers.get("Authorization", "")
        user = next((u for u, t in srv.tokens.items() if t and auth == f"Bearer {t}"), None)
        if user is None:
            return self._send(401, ApiError(401, "Unauthorized", "Unauthorized").status(), cut=cut)
        if err is not None:
            return self._send(err.code, err.status(), cut=cut)
        if is_exec(self.command, u.path):  # pods/exec over WebSocket: tests/kubeexec_server.py
            return serve_exec(self, srv, user, u.path, query)
        try:
            _request.manager = (query.get("fieldManager") or [""])[0] or self.headers.get("User-Agent", "").split("/")[0]
            code, out = srv.handle(self.command, u.path, query, body, user, self.headers.get("Accept", ""))
        except ApiError as e:
            return self._send(e.code, e.status(), e.retry_after, cut)
        except _Watch as w:
            return self._stream(srv, w)
        if late is not None:
            code, out = late["status"], ApiError(late["status"], "Timeout", "injected fault after the request "
                                                 f"was carried out ({late['status']})").status()
        self._send(code, out, cut=cut)

    def _stream(self, srv, w):
        try:
            events = srv.watch_open(w)
        except ApiError as e:
            return self._send(e.code, e.status())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()
        try:
            for ev in events:
                data = json.dumps(ev).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            if hasattr(events, "close"):
                events.close()
        self.close_connection = True

    def _run(self):
        try:
            self._serve()
        except _Cut:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (ssl.SSLError, ConnectionError, BrokenPipeError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _run

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ssl.SSLError, ConnectionError, OSError):
            self.close_connection = True


class FakeKubeAPI(KubeStandIn):
    """The former nodes-only fake: ``FakeKubeAPI({node: labels}, token, pods={(ns, name): {nodeName, uid}})``."""

    def __init__(self, nodes: dict[str, dict[str, str]], token: str = "test-token",
                 pods: dict[tuple[str, str], dict] | None = None):
        super().__init__(tokens={"admin": token, "readonly": "readonly-token"})
        with self._lock:
            for n, labels in nodes.items():
                self.add_node(n, labels=labels)
            for (ns, name), p in (pods or {}).items():
                self.add_pod(name, ns, node=p.get("nodeName"), runtime_class="kata")
                if p.get("uid"):
                    self.store[("pods", ns, name)]["metadata"]["uid"] = p["uid"]

    def kubeconfig(self, path, user: str = "admin", namespace: str | None = None, token: str | None = None) -> str:
        return super().kubeconfig(path, user, namespace, token)
