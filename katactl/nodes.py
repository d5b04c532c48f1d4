"""Kubernetes node operations: list, cordon, uncordon, drain, check.

Drain follows kubectl's pkg/drain exactly where kubectl has an answer
(kubernetes-ops.md): the same pod filters in the same order, the same
messages, policy/v1 evictions retried every 5 s while a PodDisruptionBudget
forbids them, deletion confirmed by UID, one deadline. What kubectl cannot
know is added on top: which pods are Kata sandboxes (their RuntimeClass's
handler), and a record of who cordoned a node and whether it was cordoned
before (annotation ``katactl.io/cordon``), so katactl never uncordons a node
it did not find schedulable.

Every function takes a :class:`katactl.backends.kube.KubeAPI`; nothing here
prints. Long operations report through an ``events(kind, **data)`` callback.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable

from katactl.backends.kube import ApiStatusError, Conflict, KubeAPI, interrupt_exec_plugins, seg
from katactl.errors import (AuthError, Interrupted, KatactlError, NotFound, OperationFailed, Refused, TimeoutExpired,
                            UsageError)
from katactl.backends.base import NodeTransport

CORDON_ANNOTATION = "katactl.io/cordon"
#: set by kata-deploy on nodes where it installed Kata
KATA_LABEL = "katacontainers.io/kata-runtime"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
#: kubectl drain's wait after an eviction answered 429 (pkg/drain/drain.go evictPods: "(will
#: retry after 5s)"), unless the server sends Retry-After
EVICTION_RETRY = 5.0
#: the StatusCause reason of the eviction registry's PodDisruptionBudget refusals
#: (k8s.io/api policy/v1 DisruptionBudgetCause, set by pkg/registry/core/pod/storage/eviction.go);
#: a 429 without it is API Priority and Fairness (or another limiter) throttling the request
DISRUPTION_BUDGET = "DisruptionBudget"
#: how often evicted pods are checked for being gone (kubectl: every second)
POLL = 1.0
#: how often an eviction answered 5xx with Retry-After is sent again (client-go rest/request.go:
#: a request's maxRetries, 10 by default)
EVICTION_SERVER_RETRIES = 10
#: pods evicted at once per node (kubectl starts one goroutine per pod; a node runs at
#: most 110 pods by default, so this is "all of them"; requests share the client's pool)
EVICTION_WORKERS = 128

Events = Callable[..., None]


def _no_events(kind: str, **data) -> None:
    pass


# -- reading -----------------------------------------------------------------

def get_node(api: KubeAPI, name: str) -> dict:
    try:
        return api.get(f"/api/v1/nodes/{seg(name)}")
    except NotFound:
        raise NotFound(f"node {name!r} not found") from None


def node_pods(api: KubeAPI, node: str, pod_selector: str | None = None) -> list[dict]:
    """Every pod bound to the node (kubectl drain's list: fieldSelector spec.nodeName)."""
    return api.list("/api/v1/pods", fieldSelector=f"spec.nodeName={node}", labelSelector=pod_selector)


def runtime_classes(api: KubeAPI, denied: list[str] | None = None) -> dict[str, dict]:
    """RuntimeClass name -> object; {} when the API has none or we may not read them (then
    why is appended to ``denied``, for a caller that reports it)."""
    try:
        return {rc["metadata"]["name"]: rc for rc in api.list("/apis/node.k8s.io/v1/runtimeclasses")}
    except NotFound:
        return {}
    except AuthError as e:  # pods then count as Kata by their RuntimeClass's name
        if denied is not None:
            denied.append(e.message)
        return {}


def is_kata_handler(handler: str | None) -> bool:
    """Kata's handlers are kata, kata-qemu, kata-clh, kata-fc, kata-dragonball, ... (kata-deploy)."""
    return handler is not None and (handler == "kata" or handler.startswith("kata-"))


def pod_runtime_handler(pod: dict, rcs: dict[str, dict]) -> str | None:
    rc = (pod.get("spec") or {}).get("runtimeClassName")
    if not rc:
        return None
    obj = rcs.get(rc)
    # an unknown RuntimeClass (deleted, or not readable): its name is the best evidence
    return obj.get("handler") if obj else rc


def is_kata_pod(pod: dict, rcs: dict[str, dict]) -> bool:
    return is_kata_handler(pod_runtime_handler(pod, rcs))


def node_status(node: dict) -> str:
    ready = "Unknown"
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            ready = "Ready" if c.get("status") == "True" else "NotReady"
    if (node.get("spec") or {}).get("unschedulable"):
        ready += ",SchedulingDisabled"
    return ready


def cordon_record(node: dict) -> dict | None:
    raw = ((node.get("metadata") or {}).get("annotations") or {}).get(CORDON_ANNOTATION)
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return {"invalid": raw[:200]}
    return rec if isinstance(rec, dict) else {"invalid": raw[:200]}


def _kata_handlers_for(node: dict, rcs: dict[str, dict]) -> list[str]:
    """Kata RuntimeClass handlers whose scheduling.nodeSelector admits this node."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    out = []
    for rc in rcs.values():
        if not is_kata_handler(rc.get("handler")):
            continue
        sel = ((rc.get("scheduling") or {}).get("nodeSelector")) or {}
        if all(labels.get(k) == v for k, v in sel.items()):
            out.append(rc["handler"])
    return sorted(set(out))


def _age(ts: str | None, now: dt.datetime) -> str:
    if not ts:
        return "-"
    try:
        t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    s = int((now - t).total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{max(s, 0)}s"


def list_nodes(api: KubeAPI, names: list[str] | None = None, selector: str | None = None) -> list[dict]:
    """One row per node: status, Kata capability, pod and Kata pod counts, the
    katactl cordon record, and -o wide's node facts. Pods are counted page by
    page (memory stays one page deep on 100,000-pod clusters)."""
    if names:
        nodes = [get_node(api, n) for n in names]
    else:
        nodes = api.list("/api/v1/nodes", labelSelector=selector)
    rcs = runtime_classes(api)
    wanted = {n["metadata"]["name"] for n in nodes}
    pods: dict[str, int] = dict.fromkeys(wanted, 0)
    kata: dict[str, int] = dict.fromkeys(wanted, 0)
    # terminal pods hold no resources: kubectl describe node does not count them either
    field = "status.phase!=Succeeded,status.phase!=Failed"
    if len(wanted) == 1:
        field += f",spec.nodeName={next(iter(wanted))}"

    def restart() -> None:  # an expired continue token: a full list follows, count afresh
        pods.update(dict.fromkeys(wanted, 0))
        kata.update(dict.fromkeys(wanted, 0))

    for page in api.list_pages("/api/v1/pods", on_restart=restart, fieldSelector=field):
        for p in page:
            n = (p.get("spec") or {}).get("nodeName")
            if n in pods:
                pods[n] += 1
                if is_kata_pod(p, rcs):
                    kata[n] += 1
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for node in nodes:
        meta, st = node["metadata"], node.get("status") or {}
        info = st.get("nodeInfo") or {}
        name = meta["name"]
        labels = meta.get("labels") or {}
        rec = cordon_record(node)
        current = current_cordon_record(node)
        ip = next((a.get("address") for a in st.get("addresses") or [] if a.get("type") == "InternalIP"), None)
        rows.append({
            "name": name,
            "status": node_status(node),
            "kata": labels.get(KATA_LABEL) == "true",
            "kataHandlers": _kata_handlers_for(node, rcs) if labels.get(KATA_LABEL) == "true" else [],
            "pods": pods[name],
            "kataPods": kata[name],
            # who cordoned it, while katactl's record is current: katactl's user, or whom katactl
            # found had cordoned it already
            "cordonedBy": cordoned_by(current),
            "cordon": rec,
            "age": _age(meta.get("creationTimestamp"), now),
            "kubeletVersion": info.get("kubeletVersion"),
            "kernel": info.get("kernelVersion"),
            "containerRuntime": info.get("containerRuntimeVersion"),
            "internalIP": ip,
            "taints": [f"{t.get('key')}{'=' + t['value'] if t.get('value') else ''}:{t.get('effect')}"
                       for t in (node.get("spec") or {}).get("taints") or []],
        })
    return rows


# -- cordon / uncordon ---------------------------------------------------------

def _who() -> str:
    import socket

    from katactl.audit import current_user

    return f"{current_user()}@{socket.gethostname()}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: the field manager of katactl's writes: the API server's default, the User-Agent
#: ("katactl/VERSION", katactl/backends/kube.py) up to its first "/" (apiserver
#: pkg/endpoints/handlers/create.go managerOrUserAgent)
FIELD_MANAGER = "katactl"


#: managers that name nobody: the oldest Update entries merged once there are more than 10
#: (k8s.io/apimachinery pkg/util/managedfields/internal/capmanagers.go oldUpdatesManagerName),
#: and what the first server-side apply finds already set (internal/skipnonapplied.go)
UNNAMED_MANAGERS = ("ancient-changes", "before-first-apply")


def _unschedulable_owners(node: dict) -> list[dict]:
    return [mf for mf in (node.get("metadata") or {}).get("managedFields") or []
            if "f:unschedulable" in (((mf.get("fieldsV1") or {}).get("f:spec")) or {})]


def unschedulable_set_by_katactl(node: dict) -> bool | None:
    """Whether spec.unschedulable is katactl's, from managedFields: True when katactl's manager
    owns it (alone or with others: a server-side apply of the same value shares the field, and
    Apply entries are listed first); False when another named manager owns it and katactl does
    not (an Update that changes a field takes it from every other owner: ``kubectl uncordon``
    then ``kubectl cordon`` leaves it kubectl-cordon's, while katactl's cordon record stays);
    None when nobody named does (only "ancient-changes": katactl's entry may be among those
    merged; or a server that keeps none): the caller trusts the cordon record then."""
    owners = {mf.get("manager") for mf in _unschedulable_owners(node)}
    if FIELD_MANAGER in owners:
        return True
    return False if owners - set(UNNAMED_MANAGERS) else None


def cordoned_again_by(node: dict) -> str | None:
    """Who cordoned the node again after katactl's cordon, when katactl's record no longer
    describes it: the node is unschedulable, the record says katactl made it so
    (wasUnschedulable false), and managedFields name another owner of spec.unschedulable
    (:func:`unschedulable_set_by_katactl` False: ``kubectl uncordon`` then ``kubectl cordon``
    leave the record). That manager (and time), else None: the record holds. The one rule of
    every reader of the record: cordon, uncordon (explicit and a drain's restore), list, check."""
    rec = cordon_record(node)
    if not (node.get("spec") or {}).get("unschedulable") or rec is None or "invalid" in rec \
            or rec.get("wasUnschedulable") or unschedulable_set_by_katactl(node) is not False:
        return None
    return unschedulable_manager(node) or "someone else"


def current_cordon_record(node: dict) -> dict | None:
    """katactl's cordon record while it describes the node's cordon: the node is cordoned, the
    record is readable and nobody cordoned the node again since (:func:`cordoned_again_by`)."""
    rec = cordon_record(node)
    if rec is None or "invalid" in rec or not (node.get("spec") or {}).get("unschedulable") \
            or cordoned_again_by(node):
        return None
    return rec


def cordoned_by(current: dict | None) -> str | None:
    """Who cordoned the node by katactl's current record (:func:`current_cordon_record`):
    katactl's user, or whom katactl found had cordoned it already (wasUnschedulable). What
    node list shows and node check says."""
    if current is None:
        return None
    return (current.get("cordonedBefore") or "unknown") if current.get("wasUnschedulable") else current.get("by")


def unschedulable_manager(node: dict) -> str | None:
    """Who set spec.unschedulable, from the server's managedFields (kubectl cordon shows up
    as manager "kubectl-cordon"): a named manager other than katactl if there is one; None
    when the server keeps none."""
    owners = _unschedulable_owners(node)
    mf = next((m for m in owners if m.get("manager") not in (FIELD_MANAGER, *UNNAMED_MANAGERS)),
              owners[0] if owners else None)
    if mf is None:
        return None
    return f"{mf.get('manager')} at {mf.get('time')}" if mf.get("time") else mf.get("manager")


def cordon(api: KubeAPI, name: str, *, reason: str | None = None, dry_run: bool | str = False,
           op_id: str | None = None, held: bool = False) -> dict:
    """Mark the node unschedulable and record that katactl did, and whether it
    already was. Idempotent: a node katactl already cordoned is ``changed: false``.

    held: an operator's standing cordon (``node cordon``), lifted by ``node uncordon`` only.
    A current record that is not one (a drain's or a rollout's, which undo their own cordon
    by its id at their end) is taken over: a new record (new id, ``held``, ``supersedes``
    naming the old one, its ``wasUnschedulable``/``cordonedBefore`` kept), so the drain or
    rollout finds its id gone and leaves the node cordoned. A held record is left as it is
    (a repeated ``node cordon``: ``changed: false``).

    Whether this call cordoned the node is decided from the node, never from whether
    the PATCH answered: the record carries an ``id`` made here, and after a lost
    answer (replayed -> 409), a timeout or a 5xx the node is read again. Our id on it
    means our patch landed (``changed: true``, ``wasUnschedulable`` as we recorded).

    dry_run: False, "client" (read only) or "server" (the API validates the patch
    and stores nothing). op_id: the record's id, chosen by a caller that saved it first
    (a rollout: its state then names the record even if it dies before the answer)."""
    op_id = op_id or uuid.uuid4().hex
    sent: dict | None = None  # the record of the last patch we sent, if its fate is unknown
    last_err: KatactlError | None = None
    for _ in range(5):
        node = get_node(api, name)
        rec = cordon_record(node)
        if sent is not None and rec is not None and rec.get("id") == op_id:
            # what the send that landed recorded
            was = bool(rec.get("wasUnschedulable")) or "supersedes" in rec
            return _cordon_result(name, True, dry_run, was, rec, _cordon_note(rec))
        was = bool((node.get("spec") or {}).get("unschedulable"))
        new = {"by": _who(), "at": _now(), "reason": reason or "", "wasUnschedulable": was, "id": op_id}
        if held:
            new["held"] = True
        if was and rec is not None and "invalid" not in rec and not cordoned_again_by(node):
            if not held or rec.get("held") or rec.get("id") == op_id:
                return _cordon_result(name, False, dry_run, was, rec, "already cordoned by katactl")
            # katactl's cordon, but not a standing one: whoever made it undoes it by its id
            new.update(wasUnschedulable=bool(rec.get("wasUnschedulable")),
                       supersedes={k: rec.get(k) for k in ("id", "by", "at", "reason")})
            if "cordonedBefore" in rec:
                new["cordonedBefore"] = rec["cordonedBefore"]
        elif was:
            new["cordonedBefore"] = unschedulable_manager(node) or "unknown"
        # conditional on the resourceVersion: of several sends (a retry after a timeout) at
        # most one lands, the others meet 409
        patch = {"metadata": {"resourceVersion": node["metadata"].get("resourceVersion"),
                              "annotations": {CORDON_ANNOTATION: json.dumps(new, sort_keys=True)}}}
        if not was:
            patch["spec"] = {"unschedulable": True}
        if dry_run == "client" or dry_run is True:
            return _cordon_result(name, True, dry_run, was, new, "would cordon" if not was else
                                  "would take over katactl's cordon" if "supersedes" in new else "would record")
        if not dry_run:
            _changing()
        try:
            api.patch(f"/api/v1/nodes/{seg(name)}", patch, dry_run=dry_run == "server")
        except Conflict as e:
            # changed between our read and our patch, or our own patch replayed after its
            # answer was lost: the next read tells which
            sent, last_err = (new, e) if not dry_run else (None, e)
            continue
        except (UsageError, AuthError, NotFound) as e:
            if sent is not None:  # this one did not land; an earlier one still may
                e.details = {**e.details, "cordonRecordId": op_id}
            raise  # the server answered no: nothing landed
        except KatactlError as e:
            if dry_run:
                raise
            sent, last_err = new, e  # timed out, cut, 5xx: it may have landed; read again
            continue
        return _cordon_result(name, True, dry_run, was, new, _cordon_note(new))
    if last_err is not None and not isinstance(last_err, Conflict):
        # a send may still land: its record carries this id (drain restores by it)
        last_err.details = {**last_err.details, "cordonRecordId": op_id}
        raise last_err
    raise Conflict(f"node {name}: changing too fast to cordon safely; try again")


def _changing() -> None:
    """Before a PATCH or an eviction: the running audited() action's "requested" entry, once."""
    from katactl import audit

    audit.changing()


def _cordon_note(rec: dict) -> str:
    """What a cordon() that wrote ``rec`` did."""
    if "supersedes" in rec:
        old = rec["supersedes"]
        return (f"cordoned: took over katactl's cordon by {old.get('by')} ({old.get('reason') or 'no reason'}), "
                "which will not undo it now")
    if rec.get("wasUnschedulable"):
        return "already cordoned (not by katactl): recorded, will not uncordon it"
    return "cordoned"


def _cordon_result(name, changed, dry_run, was, rec, message) -> dict:
    return {"name": name, "changed": changed, "dryRun": bool(dry_run), "wasUnschedulable": was,
            "record": rec, "message": message}


def uncordon(api: KubeAPI, name: str, *, force: bool = False, dry_run: bool | str = False,
             record_id: str | None = None) -> dict:
    """Make the node schedulable again, unless katactl's record says it was
    already cordoned before katactl cordoned it, or someone cordoned it again since
    (:func:`cordoned_again_by`), or the node is cordoned without a readable katactl record and
    managedFields do not name katactl as the owner of spec.unschedulable (``kubectl
    cordon``, or a server that keeps no owner): Refused, exit 5, unless force. With force it
    does what ``kubectl uncordon`` does.

    record_id: undo one cordon() only: act only while the node still carries that
    call's record (``changed: false`` otherwise: someone cordoned it since).

    As in cordon(), whether the PATCH landed is read from the node when its answer did
    not say (a 5xx such as the timeout filter's 504 after the write, a 409 meeting our own
    resent PATCH, a timeout, a cut): it did only if the node now shows what it asked for,
    schedulable and without katactl's record (a node kubectl cordoned has no record to
    lose: its record's absence alone proves nothing). One that did not land is sent again
    after a 409 (the node changed: decided anew) and raised otherwise (the node is still
    cordoned: that error, its exit code and an audit entry saying so). An uncordon made
    elsewhere at the same moment reads the same: the node is schedulable either way."""
    sent: str | None = None  # the message of a PATCH sent whose fate is unknown
    last_err: KatactlError | None = None
    for _ in range(5):
        node = get_node(api, name)
        unsched = bool((node.get("spec") or {}).get("unschedulable"))
        rec = cordon_record(node)
        if sent is not None and not unsched and rec is None:  # what our PATCH asked for: it landed
            return {"name": name, "changed": True, "dryRun": bool(dry_run), "message": sent}
        if last_err is not None and not isinstance(last_err, Conflict):
            # it did not land: the caller decides when to try again (a rollout backs off)
            if sent is not None:
                last_err.message += (f" (node {name} read back still cordoned: not uncordoned)" if unsched
                                     else f" (node {name} read back: katactl's record still on it)")
            raise last_err
        if record_id is not None and (rec is None or rec.get("id") != record_id or rec.get("wasUnschedulable")):
            return {"name": name, "changed": False, "dryRun": bool(dry_run),
                    "message": "left as it is: katactl's cordon record on it is not this run's any more"
                    if rec is None or rec.get("id") != record_id else "left cordoned: it was cordoned before"}
        again = cordoned_again_by(node)
        if again and (record_id is not None or not force):
            # uncordoned and cordoned again since by someone else (kubectl leaves our record): theirs
            if record_id is not None:
                return {"name": name, "changed": False, "dryRun": bool(dry_run),
                        "message": f"left cordoned: cordoned again since by {again}"}
            raise Refused(f"node {name} was cordoned again by {again} after katactl's cordon (by "
                          f"{(rec or {}).get('by')} at {(rec or {}).get('at')}): leaving it cordoned",
                          hint="use --force to uncordon it anyway")
        if unsched and (rec is None or "invalid" in rec) and not force \
                and unschedulable_set_by_katactl(node) is not True:
            # no readable record: katactl's own cordon only when managedFields say so (a record
            # removed or mangled by hand), as current_cordon_record reads it for node check; the
            # design's rule, a node katactl did not cordon is never uncordoned
            what = f"no {CORDON_ANNOTATION} record" if rec is None else f"{CORDON_ANNOTATION} record unreadable"
            raise Refused(f"node {name} is cordoned by {unschedulable_manager(node) or 'someone else'} "
                          f"({what}: not by katactl): leaving it cordoned",
                          hint="use --force to uncordon it anyway, as kubectl uncordon does")
        if unsched and rec and rec.get("wasUnschedulable") and not force:
            first = rec.get("cordonedBefore") or "someone else"
            raise Refused(f"node {name} was already cordoned (by {first}) before katactl cordoned it "
                          f"(by {rec.get('by')} at {rec.get('at')}): leaving it cordoned",
                          hint="use --force to uncordon it anyway")
        if not unsched and rec is None:
            return {"name": name, "changed": False, "dryRun": bool(dry_run), "message": "already schedulable"}
        patch: dict[str, Any] = {"metadata": {"resourceVersion": node["metadata"].get("resourceVersion"),
                                              "annotations": {CORDON_ANNOTATION: None}}}
        if unsched:
            patch["spec"] = {"unschedulable": None}
        msg = "uncordoned" if unsched else "already schedulable: removed katactl's stale cordon record"
        if dry_run == "client" or dry_run is True:
            return {"name": name, "changed": True, "dryRun": True, "message": "would be " + msg}
        if not dry_run:
            _changing()
        try:
            api.patch(f"/api/v1/nodes/{seg(name)}", patch, dry_run=dry_run == "server")
        except Conflict as e:
            # changed since our read, or our own PATCH resent after a 5xx meeting the first: the
            # next read tells (conditional on the resourceVersion: at most one send lands)
            sent, last_err = (msg if not dry_run else sent), e
            continue
        except (UsageError, AuthError, NotFound):
            raise  # the server answered no: this one did not land
        except KatactlError as e:
            if dry_run:
                raise
            sent, last_err = msg, e  # timed out, cut, 5xx: it may have landed; read again
            continue
        return {"name": name, "changed": True, "dryRun": bool(dry_run), "message": msg}
    raise Conflict(f"node {name}: changing too fast to uncordon safely; try again")


# -- drain -------------------------------------------------------------------

@dataclasses.dataclass
class DrainOptions:
    ignore_daemonsets: bool = False
    delete_emptydir_data: bool = False
    force: bool = False
    grace_period: int = -1               # -1: the pod's own
    timeout: float = 0.0                 # 0: wait forever (kubectl's default)
    pod_selector: str | None = None
    skip_wait_for_delete_timeout: int = 0
    disable_eviction: bool = False
    dry_run: str | None = None           # None, "client", "server"
    kata_only: bool = False
    keep_cordoned: bool = False
    #: pods (namespace, name) to evict among the Kata pods; None = all (for --stale-release)
    only_pods: set[tuple[str, str]] | None = None
    reason: str | None = None
    cordon_id: str | None = None         # the cordon record's id (see cordon's op_id)
    agent_namespace: str = "kube-system"  # where katactl's own node pods run (skipped, not evicted)


#: DeleteOptions.gracePeriodSeconds is an int64, and kubectl's int flags are Go ints (64 bits)
INT64_MAX = 2 ** 63 - 1


def check_drain_values(*, grace_period: int, skip_wait: int, pod_selector: str | None) -> None:
    """node drain's values checked before anything is touched (UsageError, exit 2), as
    kubectl's flag parsing and its drain Complete() do: a value the API server would
    refuse must not first cost a cordon."""
    from katactl import labelselector

    if not -1 <= grace_period <= INT64_MAX:
        raise UsageError(f"invalid --grace-period {grace_period}: -1 (the pod's own) to {INT64_MAX}")
    if not 0 <= skip_wait <= INT64_MAX:
        raise UsageError(f"invalid --skip-wait-for-delete-timeout {skip_wait}: 0 to {INT64_MAX}")
    if pod_selector:
        try:
            labelselector.check(pod_selector)
        except ValueError as e:
            # kubectl: "--pod-selector=<pod_selector> must be a valid label selector"
            # (staging/src/k8s.io/kubectl/pkg/cmd/drain/drain.go Complete)
            raise UsageError(f"invalid --pod-selector {pod_selector!r}: must be a valid label selector: {e}") from None


def _owner(pod: dict) -> dict | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def _terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _deleting_for(pod: dict, now: dt.datetime) -> float | None:
    ts = (pod.get("metadata") or {}).get("deletionTimestamp")
    if not ts:
        return None
    try:
        return (now - dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return 0.0


def _ref(pod: dict) -> str:
    return f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}"


def pod_object(meta: dict) -> dict:
    """A pod as katactl's JSON names one: {name, namespace, uid}, as sandbox list's ``pod``
    (docs/output.md), with the "NS/NAME" string as ``podRef`` beside it."""
    return {"name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")}


def _skipped(pod: dict, reason: str) -> dict:
    return {"pod": pod_object(pod["metadata"]), "podRef": _ref(pod), "reason": reason}


def classify(api: KubeAPI, pods: list[dict], opts: DrainOptions, rcs: dict[str, dict]):
    """kubectl drain's filter chain after katactl's own selection (--kata-only,
    --stale-release): skip-deleted, DaemonSet, mirror, local storage, unreplicated, as
    kubernetes staging/src/k8s.io/kubectl/pkg/drain/filters.go makeFilters(). A filter
    either stops the chain (skip, refusal, an ignored DaemonSet pod) or lets the pod go on
    to the next one (drain.go filterPods breaks only when !status.Delete): an orphaned
    DaemonSet pod allowed by --force still meets the local storage filter. Messages are
    kubectl's (an orphan's is the API's NotFound message, as err.Error() there).

    kubectl keeps only the last filter's status, so a warning from an earlier filter is
    lost when a later one passes the pod (filters.go's own TODO); katactl reports every
    warning a pod earned, in kubectl's words.

    katactl's own node agent pods (label app.kubernetes.io/name=katactl-node-agent) are skipped
    before the DaemonSet filter, with a warning like ignored DaemonSet pods: a drain through
    ``--via kube`` runs in one of them.

    Returns (to_evict, skipped [{pod, reason}], errors {message: [pods]}, warnings {message: [pods]})."""
    from katactl import nodeagent

    now = dt.datetime.now(dt.timezone.utc)
    evict: list[dict] = []
    skipped: list[dict] = []
    errors: dict[str, list[str]] = {}
    warnings: dict[str, list[str]] = {}
    ds_missing: dict[tuple[str, str], str | None] = {}  # -> the NotFound message, None: it exists

    def daemonset_filter(pod: dict, ref: str) -> bool:
        owner = _owner(pod)
        if not owner or owner.get("kind") != "DaemonSet" or _terminal(pod):
            return True
        key = (pod["metadata"].get("namespace"), owner["name"])  # name: required in an ownerReference
        if key not in ds_missing:
            try:
                api.get(f"/apis/apps/v1/namespaces/{seg(key[0])}/daemonsets/{seg(key[1])}")
                ds_missing[key] = None
            except NotFound as e:
                ds_missing[key] = e.message or f'daemonsets.apps "{key[1]}" not found'
        missing = ds_missing[key]
        if missing is not None:  # orphaned: deleted only with --force, and the chain goes on
            (warnings if opts.force else errors).setdefault(missing, []).append(ref)
            return opts.force
        if not opts.ignore_daemonsets:
            errors.setdefault("DaemonSet-managed Pods (use --ignore-daemonsets to ignore)", []).append(ref)
        else:
            warnings.setdefault("ignoring DaemonSet-managed Pods", []).append(ref)
            skipped.append(_skipped(pod, "DaemonSet-managed"))
        return False

    for pod in pods:
        ref = _ref(pod)
        if opts.kata_only and not is_kata_pod(pod, rcs):
            skipped.append(_skipped(pod, "not a Kata pod (--kata-only)"))
            continue
        if opts.only_pods is not None and (pod["metadata"].get("namespace"), pod["metadata"]["name"]) not in opts.only_pods:
            skipped.append(_skipped(pod, "its sandbox runs the current release (--stale-release)"))
            continue
        deleting = _deleting_for(pod, now)
        if opts.skip_wait_for_delete_timeout > 0 and deleting is not None \
                and deleting > opts.skip_wait_for_delete_timeout:
            skipped.append(_skipped(pod, "deleting for longer than --skip-wait-for-delete-timeout"))
            continue
        if nodeagent.is_agent_pod(pod, opts.agent_namespace):
            # katactl's own node pod (--via kube: the drain step may run through it), reported
            # as kubectl reports the DaemonSet pods it ignores
            warnings.setdefault("ignoring katactl node agent Pods", []).append(ref)
            skipped.append(_skipped(pod, "katactl node agent"))
            continue
        if not daemonset_filter(pod, ref):
            continue
        if MIRROR_ANNOTATION in ((pod["metadata"].get("annotations")) or {}):
            skipped.append(_skipped(pod, "mirror pod (static pod of the kubelet)"))
            continue
        if any("emptyDir" in v for v in (pod.get("spec") or {}).get("volumes") or []) and not _terminal(pod):
            if not opts.delete_emptydir_data:
                errors.setdefault("Pods with local storage (use --delete-emptydir-data to override)", []).append(ref)
                continue
            warnings.setdefault("deleting Pods with local storage", []).append(ref)
        if _owner(pod) is None and not _terminal(pod):
            if not opts.force:
                errors.setdefault("cannot delete Pods that declare no controller (use --force to override)",
                                  []).append(ref)
                continue
            warnings.setdefault("deleting Pods that declare no controller", []).append(ref)
        evict.append(pod)
    return evict, skipped, errors, warnings


class _Deadline:
    """One drain's deadline and its two ways to end early: ``stop``, the command's (an
    interrupt: every node's drain stops), and ``halt``, this drain's own (its failure ends its
    eviction workers, never another node's drain)."""

    def __init__(self, seconds: float, stop: threading.Event):
        self.end = time.monotonic() + seconds if seconds > 0 else None
        self.stop = stop
        self.halt = threading.Event()

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def ended(self) -> bool:
        return self.stop.is_set() or self.halt.is_set()

    def sleep(self, seconds: float) -> None:
        """Sleep, cut short by the deadline, a stop request or this drain's halt."""
        left = self.left()
        until = time.monotonic() + (seconds if left is None else max(0.0, min(seconds, left)))
        while not self.ended():
            rest = until - time.monotonic()
            if rest <= 0:
                return
            self.halt.wait(min(rest, 0.2))  # 0.2 s: how soon the command-wide stop is seen


def drain(api: KubeAPI, name: str, opts: DrainOptions, *, events: Events = _no_events,
          stop: threading.Event | None = None) -> dict:
    """Cordon the node, then evict (or delete) its pods as kubectl drain does and
    wait until they are gone. On a refusal, a failure, the deadline or Ctrl-C the
    node's schedulability is restored to what it was before (unless
    keep_cordoned), and the error is raised with the partial result in its details.

    Unlike kubectl (cordon, then filter: kubernetes
    staging/src/k8s.io/kubectl/pkg/cmd/drain/drain.go RunDrain), the filters run once
    before the cordon, so a drain they refuse writes nothing, and again after it, on the
    pods then on the node (one scheduled meanwhile, a DaemonSet's that tolerates the
    cordon), whose refusal restores the node."""
    stop = stop or threading.Event()
    dry = opts.dry_run
    result: dict[str, Any] = {"name": name, "changed": False, "dryRun": bool(dry), "evicted": [],
                              "skipped": [], "blocked": [], "warnings": [], "wasUnschedulable": None}
    # the record of the cordon this drain made (restored on failure), None when the node
    # was unschedulable when cordon() read it: that one stays as it is
    mine: dict | None = None
    cordoned = False  # this drain's cordon changed the node (or a dry run's would)

    def filtered(rcs: dict[str, dict], *, quiet: bool) -> list[dict]:
        """The pods to evict; Refused (every offending pod) when a filter refuses one.
        quiet: the check before the cordon, whose pass says nothing (the second one will)."""
        evict, skipped, errors, warnings = classify(api, node_pods(api, name, opts.pod_selector), opts, rcs)
        if quiet and not errors:
            return evict
        result["skipped"] = skipped
        result["warnings"] = [f"{msg}: {', '.join(refs)}" for msg, refs in warnings.items()]
        for w in result["warnings"]:
            events("Warning", node=name, message=w)
        if errors:
            msg = "; ".join(f"cannot delete {m}: {', '.join(refs)}" if not m.startswith("cannot delete")
                            else f"{m}: {', '.join(refs)}" for m, refs in errors.items())
            raise Refused(f"node {name}: {msg}", details={"pods": sorted({r for v in errors.values() for r in v})})
        return evict

    try:
        rcs = runtime_classes(api)
        filtered(rcs, quiet=True)
        _stopped(stop, name)
        c = cordon(api, name, reason=opts.reason or "katactl node drain", dry_run=dry or False,
                   op_id=opts.cordon_id)
        result["wasUnschedulable"] = c["wasUnschedulable"]
        result["cordon"] = c["record"]  # katactl's cordon record on the node now (a rollout's step reads it)
        if c["changed"] and not c["wasUnschedulable"] and not dry:
            mine = c["record"]
        # a dry run reports the change it would make, as cordon --dry-run does
        cordoned = c["changed"]
        _stopped(stop, name)
        evict = filtered(rcs, quiet=False)
        _stopped(stop, name)
        result["toEvict"] = [_ref(p) for p in evict]
        events("NodeDraining", node=name, pods=len(evict), dryRun=bool(dry))
        if dry == "client" or not evict:
            result["evicted"] = [_ref(p) for p in evict] if dry else []
        else:
            if not dry:
                _changing()  # (a node already cordoned: the evictions are the first change)
            deadline = _Deadline(opts.timeout, stop)
            _remove_pods(api, name, evict, opts, deadline, result, events)
        result["changed"] = cordoned or result["changed"] or bool(result["evicted"])
        events("NodeDrained", node=name, evicted=len(result["evicted"]), dryRun=bool(dry))
        return result
    except BaseException as e:
        restored = False
        rec_id = mine.get("id") if mine is not None else \
            (e.details.get("cordonRecordId") if isinstance(e, KatactlError) and not dry else None)
        if rec_id and not opts.keep_cordoned:
            try:
                # only our own cordon, and only while our record is on it: never force, never a
                # node someone cordoned since (their kubectl cordon finds it cordoned and says so)
                r = uncordon(api, name, record_id=rec_id)
                restored = r["changed"]
                if restored:
                    events("NodeRestored", node=name, unschedulable=False)
                elif mine is not None:
                    events("Warning", node=name, message=r["message"])
            except Exception as re_err:  # noqa: BLE001 - report both, the first error wins
                events("Warning", node=name, message=f"could not restore the node's cordon state: {re_err}")
        result["restored"] = restored
        # a failed drain changed the cluster when it evicted a pod (_remove_pods sets changed on
        # an accepted eviction) or left its cordon on (kept, or not restored)
        result["changed"] = result["changed"] or bool(result["evicted"]) or (cordoned and not restored)
        if isinstance(e, KatactlError):
            e.details = {**e.details, "drain": result}
            if restored:
                e.message += f" (node {name} uncordoned again: it was schedulable before)"
            elif mine is None and rec_id and not opts.keep_cordoned:
                e.message += (f" (the cordon may still land: 'katactl node uncordon {name}' undoes it if "
                              f"katactl.io/cordon shows id {rec_id})")
        elif isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"interrupted while draining {name}"
                              + (" (uncordoned again: it was schedulable before)" if restored else ""),
                              details={"drain": result}) from None
        raise


def _stopped(stop: threading.Event, name: str) -> None:
    """A stop request (Ctrl-C, SIGTERM, another node's interrupt) ends the drain between steps."""
    if stop.is_set():
        raise Interrupted(f"interrupted while draining {name}")


def _remove_pods(api: KubeAPI, node: str, pods: list[dict], opts: DrainOptions, deadline: _Deadline,
                 result: dict, events: Events) -> None:
    """Evict (or delete) every pod concurrently, as kubectl does, then confirm each gone.

    kubectl polls every evicted pod with its own GET each second; here one LIST of the
    node's pods per second confirms them all (gone = its UID is no longer there, which one
    consistent GET of that pod then confirms), so a 110-pod drain costs one request per
    second instead of 110."""
    server_dry = opts.dry_run == "server"
    grace = None if opts.grace_period < 0 else opts.grace_period
    lock = threading.Lock()
    failures: list[str] = []
    blocked: dict[str, dict] = {}
    throttled: dict[str, str] = {}  # ns/name -> the server's message: its last eviction was throttled
    waiting: dict[str, str] = {}  # uid -> ns/name: evicted, not gone yet
    denied: list[KatactlError] = []  # RBAC refused an eviction: the drain fails with exit 7, not 1

    def evict_one(pod: dict) -> None:
        ref = _ref(pod)
        ns, pname, uid = pod["metadata"].get("namespace"), pod["metadata"]["name"], pod["metadata"].get("uid")
        events("PodEvicting", node=node, pod=pod_object(pod["metadata"]), podRef=ref,
               eviction=not opts.disable_eviction)
        server_errors = 0
        accepted = False  # the server took our eviction or delete (not: the pod was gone already)
        said = None  # the last throttling warning printed for this pod
        while True:
            if deadline.ended():
                return
            if deadline.expired():
                with lock:
                    why = f" (throttled by the API server: {throttled[ref]})" if ref in throttled else ""
                    failures.append(f"{ref}: timed out{why}")
                return
            try:
                if opts.disable_eviction:
                    api.delete(f"/api/v1/namespaces/{seg(ns)}/pods/{seg(pname)}", grace_period=grace,
                               uid=uid, dry_run=server_dry)
                else:
                    api.evict(ns, pname, grace_period=grace, dry_run=server_dry)
                accepted = True
                break
            except NotFound:
                break  # gone already: done
            except Conflict as e:
                if opts.disable_eviction:
                    break  # the UID precondition failed: that pod is gone, another has its name
                # an eviction carries no precondition of ours: a 409 is the server's (a conflict
                # it gave up on), fatal for this pod as in kubectl (pkg/drain/drain.go evictPods:
                # every error but NotFound, TooManyRequests and a terminating namespace's)
                with lock:
                    failures.append(f"{ref}: {e.details.get('apiMessage') or e.message}")
                return
            except ApiStatusError as e:
                msg = (e.body.get("message") or "").strip()
                details = e.body.get("details")
                causes = [c for c in (details.get("causes") if isinstance(details, dict) else None) or []
                          if isinstance(c, dict)]
                if e.status == 429:
                    # the server's Retry-After (APF's, or 10 s for a budget not yet observed), else
                    # kubectl's 5 s; the delay said is the delay slept
                    delay = EVICTION_RETRY if e.retry_after is None else max(e.retry_after, 1.0)
                    if any(c.get("reason") == DISRUPTION_BUDGET for c in causes):
                        budget = "; ".join(c["message"] for c in causes
                                           if c.get("reason") == DISRUPTION_BUDGET and c.get("message"))
                        info = {"pod": pod_object(pod["metadata"]), "podRef": ref, "message": msg,
                                "budget": budget or None}
                        with lock:
                            first = ref not in blocked
                            blocked[ref] = info
                            throttled.pop(ref, None)
                        if first:
                            events("PodEvictionBlocked", node=node, **info, retryAfter=delay)
                    else:
                        # throttled (API Priority and Fairness, a rate limit): no budget is involved;
                        # said in the server's words, as kubectl says every 429
                        with lock:
                            throttled[ref] = msg or e.message
                            blocked.pop(ref, None)
                        if said != (msg, delay):
                            said = (msg, delay)
                            events("Warning", node=node, message=_retrying(ns, pname, delay, msg or e.message))
                    deadline.sleep(delay)
                    continue
                if e.status >= 500 and e.retry_after is not None and server_errors < EVICTION_SERVER_RETRIES:
                    # client-go retries a 5xx that carries Retry-After (rest/with_retry.go checkWait), as
                    # kubectl's eviction does (eviction.go answers 504 + Retry-After 10 after PDB
                    # update conflicts); the 500 for several budgets carries none: fatal
                    server_errors += 1
                    delay = max(e.retry_after, 0.1)
                    events("Warning", node=node, message=_retrying(ns, pname, delay, msg or e.message))
                    deadline.sleep(delay)
                    continue
                with lock:
                    failures.append(f"{ref}: {msg or e.message}")
                return
            except KatactlError as e:
                if _namespace_terminating(e):
                    # kubectl (pkg/drain/drain.go evictPods): a pod already deleting is waited
                    # for; otherwise retried every 5 s, with the pod read again each time
                    if (pod["metadata"].get("deletionTimestamp")):
                        break
                    events("Warning", node=node, message=f'error when evicting pod "{pname}" from terminating '
                           f'namespace "{ns}" (will retry after 5s)')
                    deadline.sleep(EVICTION_RETRY)
                    try:
                        fresh = api.get(f"/api/v1/namespaces/{seg(ns)}/pods/{seg(pname)}")
                    except NotFound:
                        break  # gone: the namespace's deletion took it
                    except KatactlError:
                        continue  # kubectl too evicts the pod it had
                    if fresh["metadata"].get("uid") != uid:
                        break  # another pod with its name: ours is gone
                    pod = fresh
                    continue
                rbac = _denied_by_rbac(e)
                with lock:
                    # a 403 that is not RBAC's (a budget's negative disruptionsAllowed, a webhook)
                    # is this pod's failure in the server's words, not a credentials problem
                    status_msg = e.details.get("apiMessage")
                    failures.append(f"{ref}: {e.message if rbac or not status_msg else status_msg}")
                    if rbac:
                        denied.append(e)
                return
        with lock:
            blocked.pop(ref, None)
            throttled.pop(ref, None)
            if accepted:  # the cluster changed, even if this drain fails later
                result["changed"] = True
            if server_dry:
                result["evicted"].append(ref)
            else:
                waiting[uid] = ref

    workers = max(1, min(EVICTION_WORKERS, len(pods)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="katactl-evict") as ex:
        futures = [ex.submit(evict_one, p) for p in pods]
        try:
            pending = set(futures)
            last_check = 0.0
            while True:
                if pending:  # short waits keep the main thread free for Ctrl-C
                    _, pending = wait(pending, timeout=0.2)
                if waiting and time.monotonic() - last_check >= POLL:
                    last_check = time.monotonic()
                    _confirm_gone(api, node, waiting, result, events, lock, opts.skip_wait_for_delete_timeout)
                if not pending and not waiting:
                    break
                if deadline.expired() or deadline.ended():
                    if pending:
                        wait(pending)  # the workers see the deadline too and return
                        pending = set()
                    break
                if not pending:
                    deadline.sleep(max(0.0, POLL - (time.monotonic() - last_check)))
            for f in futures:
                f.result()
        except BaseException as e:
            deadline.halt.set()  # this drain's workers end; other nodes' drains go on
            if isinstance(e, KeyboardInterrupt):
                deadline.stop.set()  # Ctrl-C in this thread: every drain stops
                interrupt_exec_plugins()  # an eviction worker may be waiting on a credential plugin
            raise
    failures += [f"{ref}: still terminating" for ref in waiting.values()]
    result["evicted"].sort()
    result["blocked"] = sorted(blocked.values(), key=lambda b: b["podRef"])
    if deadline.stop.is_set():
        raise Interrupted(f"interrupted while draining {node}")
    if failures and deadline.expired():
        raise TimeoutExpired(f"node {node}: drain did not finish within {opts.timeout:g}s: "
                             + "; ".join(sorted(failures))
                             + (f" (blocked by a disruption budget: {', '.join(b['podRef'] for b in result['blocked'])})"
                                if result["blocked"] else ""))
    if failures:
        if denied:
            raise AuthError(f"node {node}: " + "; ".join(sorted(failures)), details=denied[0].details)
        raise OperationFailed(f"node {node}: " + "; ".join(sorted(failures)))


def _retrying(ns: str, name: str, delay: float, message: str) -> str:
    """kubectl drain's line for an eviction it sends again (pkg/drain/drain.go evictPods:
    'error when evicting pods/%q -n %q (will retry after 5s): %v'), with the delay used."""
    return f"error when evicting pods/{json.dumps(name)} -n {json.dumps(ns)} (will retry after {delay:g}s): {message}"


#: the StatusCause kube-apiserver's NamespaceLifecycle admission adds to its 403
#: (staging/src/k8s.io/apiserver/pkg/admission/plugin/namespace/lifecycle/admission.go)
NAMESPACE_TERMINATING = "NamespaceTerminating"


def _denied_by_rbac(e: KatactlError) -> bool:
    """An eviction refused for the credentials: 401, or a 403 in the RBAC authorizer's words
    ('User "u" cannot create resource "pods/eviction" ...'). Other 403s come from the registry
    (eviction.go: a budget's negative disruptionsAllowed), admission plugins or webhooks."""
    status = e.details.get("httpStatus")
    if status == 401:
        return True
    return status == 403 and "cannot create resource" in str(e.details.get("apiMessage") or "")


def _namespace_terminating(e: KatactlError) -> bool:
    """A 403 carrying details.causes[].reason NamespaceTerminating (kubectl:
    apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause); the NamespaceLifecycle
    admission, apiserver/pkg/admission/plugin/namespace/lifecycle/admission.go, sets it)."""
    if e.details.get("httpStatus") != 403:
        return False
    return any(isinstance(c, dict) and c.get("reason") == NAMESPACE_TERMINATING
               for c in e.details.get("causes") or [])


def _confirm_gone(api: KubeAPI, node: str, waiting: dict[str, str], result: dict, events: Events,
                  lock: threading.Lock, skip_after: int) -> None:
    """One LIST of the node's pods: evicted pods whose UID is gone are done (a pod
    deleting for longer than skip_after, when > 0, counts as gone, as in kubectl's
    waitForDelete)."""
    now = dt.datetime.now(dt.timezone.utc)
    live: dict[str, dict] = {}
    # resourceVersion=0: served from the API server's watch cache (indexed by node, as the
    # kubelet's own list is) instead of a full read of every pod from etcd each second
    for page in api.list_pages("/api/v1/pods", fieldSelector=f"spec.nodeName={node}", resourceVersion="0"):
        for p in page:
            live[p["metadata"].get("uid")] = p
    with lock:
        missing = [(uid, ref) for uid, ref in waiting.items() if uid not in live]
    for uid, ref in missing:
        # a cache behind etcd also misses a pod created just before the drain's (consistent)
        # list: absent here is gone only once a consistent GET agrees (kubectl's waitForDelete:
        # NotFound or another UID); each pod is read so once, when the cache stops showing it
        ns, name = ref.split("/", 1)
        try:
            fresh = api.get(f"/api/v1/namespaces/{seg(ns)}/pods/{seg(name)}")
        except NotFound:
            continue
        if fresh["metadata"].get("uid") == uid:
            live[uid] = fresh
    gone = []
    with lock:
        for uid, ref in list(waiting.items()):
            pod = live.get(uid)
            if pod is None or (skip_after > 0 and (_deleting_for(pod, now) or 0) > skip_after):
                gone.append((uid, ref))
                del waiting[uid]
                result["evicted"].append(ref)
    for uid, ref in gone:
        ns, name = ref.split("/", 1)
        events("PodDeleted", node=node, pod=pod_object({"name": name, "namespace": ns, "uid": uid}), podRef=ref)


# -- check -------------------------------------------------------------------

SEVERITIES = ("info", "low", "medium", "high", "critical")
#: seconds past its grace period after which a terminating pod counts as stuck
STUCK_AFTER = 60


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A metav1.LabelSelector (matchLabels, matchExpressions) against labels.
    An empty selector matches everything (policy/v1 PDB semantics); None nothing."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and key in labels and labels[key] in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _finding(severity: str, check: str, target: str, message: str, **extra) -> dict:
    return {"severity": severity, "check": check, "target": target, "message": message, **extra}


def check(api: KubeAPI, name: str, drain: DrainOptions | None = None) -> list[dict]:
    """A read-only maintenance preflight of one node: is it Ready, what would
    block or complicate a drain right now (and why), and its Kata pods with
    their RuntimeClass and declared overhead. Findings carry a severity.

    drain: the drain this check answers for (node check's filter flags). A pod its filters
    refuse is a high drain-filter finding, so that a check passing at the default --fail-on
    high is a drain that passes its filters; a pod it skips or deletes with kubectl's
    warning (an ignored DaemonSet pod, --force on a pod without a controller) is info.
    None (a rollout's check step and post-soak check: no drain to come): the refusals of a
    flag-less drain, DaemonSet pods info and the others medium."""
    node = get_node(api, name)
    out: list[dict] = []
    status = node_status(node)
    if not status.startswith("Ready"):
        out.append(_finding("high", "node-ready", name, f"node is {status.split(',')[0]}: evicted pods "
                            "may hang in Terminating (consider --skip-wait-for-delete-timeout)"))
    if (node.get("spec") or {}).get("unschedulable"):
        # the one reading of the record, as list and uncordon: a cordon katactl only recorded is not its own
        rec = current_cordon_record(node)
        if rec and not rec.get("wasUnschedulable"):
            by = f"by katactl ({rec.get('by')}, {rec.get('reason') or 'no reason'})"
        elif rec:
            by = (f"not by katactl (cordoned by {cordoned_by(rec)}; katactl recorded it: {rec.get('by')}, "
                  f"{rec.get('reason') or 'no reason'}; node uncordon leaves it without --force)")
        else:
            who = unschedulable_manager(node)
            by = f"not by katactl (cordoned by {who})" if who and not who.startswith(FIELD_MANAGER) \
                else "not by katactl"
        out.append(_finding("info", "node-cordoned", name, f"node is already cordoned {by}"))
    denied: list[str] = []
    rcs = runtime_classes(api, denied)
    if denied:
        out.append(_finding("low", "runtimeclass-unknown", name, "cannot list RuntimeClasses: Kata pods are "
                            f"recognised by their RuntimeClass's name only ({denied[0]})"))
    pods = node_pods(api, name)
    try:
        pdbs = api.list("/apis/policy/v1/poddisruptionbudgets")
    except NotFound:  # the API serves no policy/v1: no budget can refuse an eviction
        pdbs = []
    except AuthError as e:
        # a check that could not run is no "passed": whether a budget blocks the drain is unknown
        pdbs = []
        out.append(_finding("high", "pdb-unknown", name, "cannot list PodDisruptionBudgets: whether one "
                            f"blocks the drain is unknown ({e.message})"))
    _, _, errors, warnings = classify(api, pods, drain or DrainOptions(), rcs)
    for msg, refs in errors.items():
        sev = "high" if drain else "info" if "DaemonSet" in msg else "medium"
        for ref in refs:
            out.append(_finding(sev, "drain-filter", ref, f"kubectl drain refuses: {msg}"))
    for msg, refs in warnings.items() if drain else ():
        for ref in refs:
            out.append(_finding("info", "drain-filter", ref, f"kubectl drain goes on, warning: {msg}"))
    now = dt.datetime.now(dt.timezone.utc)
    for pod in pods:
        ref, meta = _ref(pod), pod["metadata"]
        labels = meta.get("labels") or {}
        if _terminal(pod):
            continue
        # deletionTimestamp is when the grace period ends (the request's time + grace)
        overdue = _deleting_for(pod, now)
        if overdue is not None and overdue > STUCK_AFTER:
            out.append(_finding("high", "stuck-terminating", ref,
                                f"still terminating {int(overdue)}s after its grace period ended: a drain "
                                "waits for it (--skip-wait-for-delete-timeout)"))
        mine = [b for b in pdbs if b["metadata"].get("namespace") == meta.get("namespace")
                and selector_matches((b.get("spec") or {}).get("selector"), labels)]
        if len(mine) > 1:
            out.append(_finding("high", "pdb-multiple", ref, "more than one PodDisruptionBudget covers this pod: "
                                "the eviction API refuses it (HTTP 500) until one is removed",
                                budgets=[b["metadata"]["name"] for b in mine]))
        for b in mine:
            st = b.get("status") or {}
            if st.get("disruptionsAllowed", 0) <= 0 and (pod.get("status") or {}).get("phase") == "Running":
                out.append(_finding(
                    "high", "pdb-blocks", ref,
                    f"PodDisruptionBudget {b['metadata']['name']} allows 0 disruptions now "
                    f"({st.get('currentHealthy', '?')} healthy, {st.get('desiredHealthy', '?')} desired, "
                    f"{st.get('expectedPods', '?')} expected): eviction will be refused until it allows one",
                    budget=b["metadata"]["name"], currentHealthy=st.get("currentHealthy"),
                    desiredHealthy=st.get("desiredHealthy"), expectedPods=st.get("expectedPods")))
        if is_kata_pod(pod, rcs):
            rc = (pod.get("spec") or {}).get("runtimeClassName")
            overhead = (pod.get("spec") or {}).get("overhead")
            if overhead:
                out.append(_finding("info", "kata-pod", ref, f"Kata pod (RuntimeClass {rc}, handler "
                                    f"{pod_runtime_handler(pod, rcs)}), overhead "
                                    + ", ".join(f"{k}={v}" for k, v in sorted(overhead.items())),
                                    runtimeClass=rc, overhead=overhead))
            else:
                out.append(_finding("low", "kata-overhead-missing", ref,
                                    f"Kata pod (RuntimeClass {rc}) declares no overhead: the scheduler "
                                    "does not reserve the VM's own memory and CPU", runtimeClass=rc))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    out.sort(key=lambda f: (-order[f["severity"]], f["check"], f["target"]))
    return out


# -- many nodes, audited -------------------------------------------------------

def audited(action: str, name: str, params: dict, fn: Callable[[], dict]) -> dict:
    """Run a mutation of node ``name`` and log its final outcome in the audit log: a change,
    or a failure with what it did before failing (a drain's evicted pods, whether the node
    was restored). Dry runs (``params["dryRun"]``) and no-ops change nothing: not logged."""
    from katactl import audit

    if params.get("dryRun"):
        return fn()
    audit.require_writable()  # no untraceable change (exit 5 unless --no-audit)
    # a "requested" entry before the first PATCH or eviction (audit.changing): a kill -9 midway
    # leaves the change logged
    with audit.intent(action, name, node=name, params=params) as it:
        try:
            res = fn()
        except BaseException as e:
            err = e if isinstance(e, KatactlError) else None
            partial = (err.details.get("drain") if err else None) or {}
            # "interrupted" as audit.record_unfinished writes it for the other commands
            interrupted = isinstance(e, (KeyboardInterrupt, Interrupted))
            audit.record(action, name, node=name, params=params, result="interrupted" if interrupted else "error",
                         error=err.message if err else "interrupted" if isinstance(e, KeyboardInterrupt)
                         else type(e).__name__,
                         evicted=partial.get("evicted"), restored=partial.get("restored"))
            raise
    if res.get("changed") or it.sent:  # a "requested" entry always gets its outcome
        audit.record(action, name, node=name, params=params, changed=bool(res.get("changed")),
                     **({"evicted": res["evicted"]} if "evicted" in res else {}))
    return res


def for_each_node(names: list[str], fn: Callable[[str], Any], *, parallel: int = 1,
                  stop: threading.Event | None = None):
    """fn(name) for each node, ``parallel`` at a time; a fleet.FanOut of the outcomes
    (one node's failure never stops the others: it is that node's error).

    With ``stop`` (the event fn's operations watch; set here on an interrupt only), fn runs
    in worker threads even one at a time, and the calling thread only waits: a Ctrl-C (or
    SIGTERM made one) there sets ``stop`` at once, starts no further node, and waits until
    every running fn has wound down (restored its node, written its audit entry) before it
    raises Interrupted with what was done (:func:`_interrupted`); further interrupts
    meanwhile do not cut a restore short."""
    from katactl.errors import as_katactl_error
    from katactl.fleet import FanOut

    values: dict[str, Any] = {}
    errors: dict[str, KatactlError] = {}
    interrupted: dict[str, Interrupted] = {}

    def one(n: str) -> None:
        if stop is not None and stop.is_set():
            return  # interrupted before this node's turn: not touched
        try:
            values[n] = fn(n)
        except Interrupted as e:
            interrupted[n] = e
            raise
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - per-node failures are data
            errors[n] = as_katactl_error(e)

    if stop is None and (parallel <= 1 or len(names) == 1):
        for n in names:
            one(n)
        return FanOut(list(names), values, errors)
    ex = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(names))), thread_name_prefix="katactl-node")
    futures = [ex.submit(one, n) for n in names]
    try:
        pending = set(futures)
        while pending:  # short waits keep this thread free for Ctrl-C
            _, pending = wait(pending, timeout=0.2)
    except BaseException as e:
        if stop is not None:
            stop.set()
        if isinstance(e, KeyboardInterrupt):
            # a worker may be waiting on an exec plugin (a credential refresh): only this thread
            # took the signal, and the plugin runs in a process group of its own
            interrupt_exec_plugins()
        for f in futures:
            f.cancel()
        while True:
            try:
                wait(futures)
                break
            except KeyboardInterrupt:
                continue  # the nodes are being restored: let them
        if isinstance(e, KeyboardInterrupt):
            raise _interrupted(names, values, errors, interrupted) from None
        raise
    finally:
        ex.shutdown(wait=True)  # every future is done by now: the workers end (no thread outlives us)
    if interrupted:  # a stop set by the caller (a rollout's): the same report
        raise _interrupted(names, values, errors, interrupted)
    for f in futures:
        f.result()
    return FanOut(list(names), values, errors)


def _interrupted(names: list[str], values: dict, errors: dict, interrupted: dict) -> Interrupted:
    """The Interrupted of a fan-out: one node's own (its details: a drain's evicted pods and
    whether it was restored) when there was one; with several nodes, ``details.nodes`` says
    what became of each, in selection order: ``{node, result}``, ``{node, error}`` (an
    interrupted node's error too: code Interrupted, its ``details.drain``; the shape of the
    fan-out's ``errors[]`` entries) or ``{node, notStarted: true}`` (docs/output.md)."""
    if len(interrupted) == 1 and len(names) == 1:
        return next(iter(interrupted.values()))
    nodes: list[dict] = []
    for n in names:
        if n in values:
            nodes.append({"node": n, "result": values[n]})
        elif n in errors or n in interrupted:
            nodes.append({"node": n, "error": (errors.get(n) or interrupted[n]).to_dict()})
        else:
            nodes.append({"node": n, "notStarted": True})
    which = ", ".join(interrupted) or "the nodes"
    return Interrupted(f"interrupted while working on {which}", details={"nodes": nodes})


# -- what only the node knows ------------------------------------------------------

def node_transport(settings, name: str):
    """The transport to the node behind Kubernetes node ``name``: its root mounted at
    --host-root (one node only: the root is that node's), else SSH to the same name
    (ssh_config may map it)."""
    from katactl.fleet import LOCAL, open_transport

    return open_transport(LOCAL if settings.host_root else name, settings)


def kata_facts(transport: NodeTransport, kata_root: str = "/opt/kata") -> dict:
    """The node's current Kata release, its sandboxes on other releases, and dumps not
    yet collected (katactl.upgrade's attribution, katactl.vmcore's listing)."""
    from katactl.sandbox import discover

    try:  # once for both: the release attribution and the dump directories' configurations
        found: list | None = discover(transport, check=False)
    except (KatactlError, OSError):
        found = None  # each reports its own failure as before
    current, stale = stale_sandboxes(transport, kata_root, found)
    facts: dict[str, Any] = {"current": current, "staleSandboxes": stale, "uncollectedVmcores": None}
    try:
        from katactl.vmcore import list_dumps

        facts["uncollectedVmcores"] = [d for d in list_dumps(transport, sandboxes=found) if not d.get("collected")]
    except (NotFound, OperationFailed) as e:  # no Kata configuration, no dump path: say so
        facts["vmcoreError"] = e.message
    return facts


def stale_sandboxes(transport: NodeTransport, kata_root: str = "/opt/kata",
                    sandboxes: list | None = None) -> tuple[str | None, list[dict]]:
    """(the current runtime release, the sandboxes whose shim, hypervisor or guest assets
    still come from another release), from katactl.upgrade's attribution. ``sandboxes``:
    the node's, when the caller discovered them already."""
    from katactl.upgrade import Layout, status

    st = status(transport, Layout(kata_root), sandboxes)
    current = (st.get("current") or {}).get("runtime")
    return current, [s for s in st.get("sandboxes") or []
                     if s.get("releases") and current and set(s["releases"]) != {current}]


def stale_release_pods(transport: NodeTransport, kata_root: str = "/opt/kata"
                       ) -> tuple[set[tuple[str, str]], str | None]:
    """((namespace, name) of the pods whose sandbox runs a release other than current,
    the current release): what ``drain --stale-release`` and ``recycle-stale`` evict."""
    current, stale = stale_sandboxes(transport, kata_root)
    pods = {(s["pod"]["namespace"], s["pod"]["name"]) for s in stale
            if s.get("pod") and s["pod"].get("namespace") and s["pod"].get("name")}
    return pods, current


def check_node_facts(name: str, facts: dict) -> list[dict]:
    """node check findings from kata_facts()."""
    out = [_finding("info", "kata-release", name, f"Kata release in use: {facts.get('current') or 'none'}")]
    stale = facts.get("staleSandboxes") or []
    if stale:
        out.append(_finding("medium", "kata-stale-sandboxes", name,
                            f"{len(stale)} sandbox(es) still run another release than {facts.get('current')}: "
                            "node drain --kata-only --stale-release retires them",
                            sandboxes=[{"id": s["id"], "pod": s.get("pod"), "podRef": s.get("podRef"),
                                        "releases": s["releases"]}
                                       for s in stale]))
    dumps = facts.get("uncollectedVmcores")
    if dumps:
        out.append(_finding("medium", "vmcore-uncollected", name,
                            f"{len(dumps)} guest memory dump(s) not collected yet: vmcore collect before the "
                            "node is reimaged", dumps=[d.get("path") for d in dumps]))
    elif facts.get("vmcoreError"):
        out.append(_finding("info", "vmcore-unknown", name, f"dumps not checked: {facts['vmcoreError']}"))
    return out
