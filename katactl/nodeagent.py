"""Node pods for ``--via kube``: find the pod through which a node is reached, or create an
ephemeral one; the katactl node agent DaemonSet (``node agent install|status|uninstall|gc``).

A node pod is privileged, hostPID/hostNetwork/hostIPC, has the host's / at /host
(mountPropagation HostToContainer), tolerates every taint, is pinned with ``nodeName`` (so it
runs on a cordoned node too) and runs an image with python3 sleeping. Pods are labelled
``app.kubernetes.io/name=katactl-node-agent`` and ``katactl.io/agent-kind=daemonset|ephemeral``;
an ephemeral pod is named ``katactl-node-<node>-<5 chars>`` (chosen here, registered for deletion
before its create is sent: a create answered 5xx or timed out may have landed) and annotated with
who created it and when, is deleted at the end of the katactl run (also on errors, Ctrl-C, SIGTERM
and SIGHUP: the CLI runs every ``--via kube`` command under katactl.interrupt), and has an
activeDeadlineSeconds so a leftover from a killed run stops by itself; ``node agent gc`` deletes
leftovers.
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import getpass
import math
import os
import random
import re
import socket
import threading
import time
import weakref

from katactl.errors import (AuthError, Interrupted, KatactlError, NotFound, OperationFailed, TimeoutExpired, UnreachableError,
                             UsageError)

APP_LABEL = "app.kubernetes.io/name"
APP = "katactl-node-agent"
KIND_LABEL = "katactl.io/agent-kind"
CREATED_BY = "katactl.io/created-by"
DS_NAME = "katactl-node-agent"
CONTAINER = "agent"
EPHEMERAL_DEADLINE = 6 * 3600   # seconds an ephemeral pod may live at most
POLL = 0.1
# The container's command: python3 (which the relays need anyway) waiting for SIGTERM.
SLEEP = ["python3", "-c", "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
         "[signal.pause() for _ in iter(int, 1)]"]


@dataclasses.dataclass
class AgentPod:
    namespace: str
    name: str
    node: str
    kind: str                      # "daemonset" | "ephemeral"
    container: str = CONTAINER
    image: str | None = None


# -- manifests ----------------------------------------------------------------------------------
# kubelet's eviction manager admits only critical pods to a node under DiskPressure or PIDPressure
# and evicts the others first (pkg/kubelet/eviction/eviction_manager.go Admit;
# pkg/kubelet/types/pod_update.go IsCriticalPod: priority >= 2000000000): a node whose /var/crash
# filled with vmcores is where katactl is needed most.
PRIORITY_CLASS = "system-node-critical"
# the pods are Linux-only (python3 image, hostPID, privileged): kubelet sets this label on every node
LINUX = {"kubernetes.io/os": "linux"}


def pod_spec(image: str, node: str | None = None) -> dict:
    spec = {
        "hostPID": True, "hostNetwork": True, "hostIPC": True,
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "priorityClassName": PRIORITY_CLASS,
        # the DaemonSet controller places pods by it; a pod pinned with nodeName is still
        # checked against it by kubelet's admission (NodeAffinity), which refuses it up front
        "nodeSelector": dict(LINUX),
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 1,
        "containers": [{
            "name": CONTAINER, "image": image, "command": SLEEP,
            "securityContext": {"privileged": True},
            "volumeMounts": [{"name": "host", "mountPath": "/host", "mountPropagation": "HostToContainer"}],
        }],
        "volumes": [{"name": "host", "hostPath": {"path": "/", "type": "Directory"}}],
    }
    if node:
        spec["nodeName"] = node
    return spec


def _dns_label(s: str, n: int) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", s.lower()).strip("-")
    return s[:n].rstrip("-") or "node"


def ephemeral_manifest(node: str, image: str, namespace: str) -> dict:
    suffix = "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
    spec = pod_spec(image, node)
    spec["restartPolicy"] = "Never"
    spec["activeDeadlineSeconds"] = EPHEMERAL_DEADLINE
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"katactl-node-{_dns_label(node, 40)}-{suffix}", "namespace": namespace,
                         "labels": {APP_LABEL: APP, KIND_LABEL: "ephemeral"},
                         "annotations": {CREATED_BY: _who()}},
            "spec": spec}


def is_agent_pod(pod: dict, namespace: str) -> bool:
    """katactl's own node pod, not merely a pod wearing its label: in the agent namespace,
    labelled with a kind, and either owned by katactl's DaemonSet or an ephemeral pod
    carrying katactl's created-by annotation (and no controller)."""
    md = pod.get("metadata") or {}
    labels = md.get("labels") or {}
    if md.get("namespace") != namespace or labels.get(APP_LABEL) != APP:
        return False
    owners = [o for o in md.get("ownerReferences") or [] if o.get("controller")]
    kind = labels.get(KIND_LABEL)
    if kind == "daemonset":
        return [(o.get("kind"), o.get("name")) for o in owners] == [("DaemonSet", DS_NAME)]
    return kind == "ephemeral" and not owners and CREATED_BY in (md.get("annotations") or {})


def daemonset_manifest(image: str, namespace: str) -> dict:
    labels = {APP_LABEL: APP, KIND_LABEL: "daemonset"}
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": DS_NAME, "namespace": namespace, "labels": dict(labels),
                         "annotations": {CREATED_BY: _who()}},
            "spec": {"selector": {"matchLabels": dict(labels)},
                     "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%"}},
                     "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec(image)}}}


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"


# -- finding a node's pod -------------------------------------------------------------------------
def _running(p: dict) -> bool:
    st = p.get("status") or {}
    return (st.get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
            and all(c.get("ready", True) or (c.get("state") or {}).get("running")
                    for c in st.get("containerStatuses") or []))


def _ended(p: dict) -> bool:
    """A pod that will not run again (terminal, or being deleted)."""
    return bool((p.get("status") or {}).get("phase") in ("Failed", "Succeeded") or p["metadata"].get("deletionTimestamp"))


def find_pods(api, namespace: str, node: str | None = None) -> list[dict]:
    from katactl.backends.kube import seg

    params = {"labelSelector": f"{APP_LABEL}={APP}"}
    if node:
        params["fieldSelector"] = f"spec.nodeName={node}"
    try:
        return api.list(f"/api/v1/namespaces/{seg(namespace)}/pods", **params)
    except NotFound:
        return []


def _check_node(api, node: str) -> None:
    from katactl.backends.kube import seg

    try:
        n = api.get(f"/api/v1/nodes/{seg(node)}")
    except NotFound:
        raise NotFound(f"node {node!r} not found in the cluster (with --via kube, -N names Kubernetes nodes)") \
            from None
    ready = next((c for c in (n.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") != "True":
        why = (ready or {}).get("message") or (ready or {}).get("reason") or "no Ready condition"
        raise UnreachableError(f"node {node} is NotReady: {why}")


# every ephemeral pod this run created per (host, namespace, node), not only the latest: a
# create of unknown outcome may land after the next call created another for the node
_EPHEMERAL: dict[tuple, list[AgentPod]] = {}
_EPHEMERAL_API: dict[tuple, object] = {}
_LOCKS: dict[tuple, threading.Lock] = {}
_GUARD = threading.Lock()
_REACHED: set[tuple] = set()   # (host, node) this run looked for a node pod on


def reached_nodes() -> int:
    """How many nodes this run reached through node pods (until cleanup()): more than one,
    pods left behind are a partial failure of a fan-out."""
    with _GUARD:
        return len(_REACHED)


def agent_pod(api, settings, node: str, avoid: frozenset = frozenset()) -> AgentPod:
    """The running node pod for ``node``: the agent DaemonSet's, an ephemeral one this run
    created already, or a new ephemeral one (with --agent-image). Pods named in ``avoid``
    (one found not running) are not taken."""
    ns = settings.agent_namespace
    with _GUARD:
        _REACHED.add((api.host, node))
    _check_node(api, node)
    key = (api.host, ns, node)
    with _GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        with _GUARD:
            mine = {p.name: p for p in _EPHEMERAL.get(key, [])}
        # katactl's own pods only: a pod merely wearing the label may be anything
        pods = [p for p in find_pods(api, ns, node) if p["metadata"]["name"] not in avoid and is_agent_pod(p, ns)]
        # a DaemonSet pod, or an ephemeral pod of this run: another run's ephemeral pod is
        # deleted at that run's end, whoever still execs in it (kubectl debug node and
        # node-shell never share theirs either)
        running = [p for p in pods if _running(p)
                   and ((p["metadata"].get("labels") or {}).get(KIND_LABEL) == "daemonset"
                        or p["metadata"]["name"] in mine)]
        running.sort(key=lambda p: ((p["metadata"].get("labels") or {}).get(KIND_LABEL) != "daemonset",
                                    p["metadata"]["name"] not in mine))
        if running:
            p = running[0]
            if p["metadata"]["name"] in mine:
                return mine[p["metadata"]["name"]]  # with its image: a replacement is made alike
            return AgentPod(ns, p["metadata"]["name"], node, "daemonset", image=settings.agent_image)
        listed = next((mine[p["metadata"]["name"]] for p in pods if p["metadata"]["name"] in mine
                       and not _ended(p)), None)
        if listed is not None:
            return wait_running(api, listed, float(settings.request_timeout or 30.0))
        image = settings.agent_image
        timeout = float(settings.request_timeout or 30.0)
        if not image:
            ds = None
            if any((p["metadata"].get("labels") or {}).get(KIND_LABEL) == "daemonset" for p in pods) \
                    or (ds := _daemonset(api, ns)) is not None:
                if ds is not None:  # no pod of it here yet: one that can never come is said at once
                    _refuse_unselected(api, ds, ns, node)
                # installed, its pod on this node still starting or not made yet (a new node, a
                # template update replacing every pod at once): waited for, as an ephemeral pod is
                return _wait_daemonset_pod(api, ns, node, timeout, avoid)
            raise UsageError(f"node {node} has no running katactl node agent pod in namespace {ns}",
                             hint="install the agent (katactl node agent install --image IMAGE) or give "
                                  "--agent-image IMAGE for an ephemeral node pod (an image with python3)")
        return _create_ephemeral(api, ns, node, image, timeout, key)


def _daemonset(api, ns: str) -> dict | None:
    """The agent DaemonSet, or None when it is not installed."""
    from katactl.backends.kube import seg

    try:
        return api.get(f"/apis/apps/v1/namespaces/{seg(ns)}/daemonsets/{DS_NAME}")
    except NotFound:
        return None


def _refuse_unselected(api, ds: dict, ns: str, node: str) -> None:
    """UsageError when the DaemonSet's nodeSelector leaves ``node`` out (a Windows node: its pod
    is never made there), rather than a wait to the timeout for it."""
    from katactl.backends.kube import seg

    want = ((((ds.get("spec") or {}).get("template") or {}).get("spec") or {}).get("nodeSelector")) or {}
    if not want:
        return
    labels = (api.get(f"/api/v1/nodes/{seg(node)}").get("metadata") or {}).get("labels") or {}
    off = [f"{k}={v} (the node has {labels[k] if k in labels else 'none'})" for k, v in sorted(want.items())
           if labels.get(k) != v]
    if off:
        raise UsageError(f"the katactl node agent DaemonSet {ns}/{DS_NAME} does not select node {node}: "
                         f"nodeSelector {', '.join(off)}",
                         hint="katactl's node pods run on Linux nodes only; leave this node out of -N/-l")


def _wait_daemonset_pod(api, ns: str, node: str, timeout: float, avoid: frozenset) -> AgentPod:
    """The DaemonSet's pod on ``node`` once it runs, within ``timeout``: a pod there is waited
    for as wait_running waits for an ephemeral one (a pod that ends or goes is replaced by the
    controller: looked for again); none yet, the node's pods are listed again every second.
    Past the deadline, TimeoutExpired (exit 6) with the pod's status and events."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        pods = [p for p in find_pods(api, ns, node) if p["metadata"]["name"] not in avoid and is_agent_pod(p, ns)
                and (p["metadata"].get("labels") or {}).get(KIND_LABEL) == "daemonset"]
        live = next((p for p in pods if not _ended(p)), None)
        if live is not None:
            last = live
            pod = AgentPod(ns, live["metadata"]["name"], node, "daemonset")
            try:
                return wait_running(api, pod, timeout, deadline)
            except TimeoutExpired as e:
                raise TimeoutExpired(f"{e.message} (DaemonSet {ns}/{DS_NAME})") from None
            except OperationFailed:  # ended or deleted while starting: the controller replaces it
                pass
        if time.monotonic() >= deadline:
            what = (f"its pod {ns}/{last['metadata']['name']} ended or went away" if last is not None else
                    "none on this node (not created yet, or the DaemonSet does not select the node)")
            # the fan-out names the node
            raise TimeoutExpired(f"no running pod of DaemonSet {ns}/{DS_NAME} within {timeout:g}s: {what}")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if threading.current_thread() in _STALE:  # interrupted: cleanup() ran
            raise Interrupted("interrupted")


# (host, namespace, user) -> the refusal of the access check, or None (allowed, or not asked)
_ACCESS: dict[tuple, AuthError | None] = {}
_ACCESS_LOCK = threading.Lock()
SSAR = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


# what an ephemeral node pod needs, asked in this order: a pod katactl could create but not delete
# would stay on the node, privileged with the host's / mounted, until activeDeadlineSeconds; one it
# could not exec into would be started for nothing. The WebSocket upgrade of pods/exec is a GET
# (get), and since 1.35 also needs create (feature gate AuthorizePodWebsocketUpgradeCreatePermission)
ACCESS_NEEDED = (("create", "pods", ""), ("delete", "pods", ""), ("create", "pods", "exec"), ("get", "pods", "exec"))


def check_pod_access(api, ns: str) -> None:
    """Refuse (AuthError, exit 7) before any pod is created when this user lacks one of
    ACCESS_NEEDED in ``ns``. Asked once per run with a SelfSubjectAccessReview per verb, what
    ``kubectl auth can-i`` sends (the server's own authorizer decides:
    pkg/registry/authorization/selfsubjectaccessreview/rest.go). A server that cannot be asked
    (no such API, 5xx) is not a refusal: the create answers for itself."""
    from katactl.backends.kube import ApiStatusError

    key = (api.host, ns, api.user)
    with _ACCESS_LOCK:  # the nodes of a fan-out wait for one answer instead of asking it each
        # one look, and the answer asked is used as it is, never read back: cleanup() clears
        # _ACCESS without this lock, so a stale worker's second look could find nothing
        try:
            refusal = _ACCESS[key]
        except KeyError:
            refusal = None
            for verb, resource, sub in ACCESS_NEEDED:
                attrs = {"namespace": ns, "verb": verb, "resource": resource, **({"subresource": sub} if sub else {})}
                review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                          "spec": {"resourceAttributes": attrs}}
                try:
                    status = api.create(SSAR, review).get("status") or {}
                except AuthError as e:
                    if e.details.get("httpStatus") != 403:  # 401: the create would meet it too
                        raise
                    break
                except (NotFound, UsageError, ApiStatusError, OperationFailed):
                    break
                if status.get("allowed") is not True:
                    who = f"user {api.user!r}" if api.user else "this kubeconfig's user"
                    why = status.get("reason") or status.get("evaluationError")
                    what = f"{resource}/{sub}" if sub else resource
                    refusal = AuthError(
                        f"Kubernetes API: Forbidden: {who} cannot {verb} {what} in namespace {ns}, which an "
                        f"ephemeral node pod needs (no pod was created){': ' + why if why else ''}",
                        hint=f"ask for create and delete on pods and get and create on pods/exec in {ns} "
                             f"(kubectl auth can-i {verb} {what} -n {ns})"
                             + ("" if sub else ", or install the node agent DaemonSet (katactl node agent install)"),
                        details={"verb": verb, "resource": what, "namespace": ns})
                    break
            _ACCESS[key] = refusal
    if refusal is not None:
        raise AuthError(refusal.message, hint=refusal.hint, details=dict(refusal.details))


def _create_ephemeral(api, ns: str, node: str, image: str, timeout: float, key) -> AgentPod:
    from katactl.backends.kube import Conflict, MaybeApplied, seg

    check_pod_access(api, ns)
    man = ephemeral_manifest(node, image, ns)
    pod = AgentPod(ns, man["metadata"]["name"], node, "ephemeral", image=image)
    # registered under its (client-chosen) name before the create is sent: a create answered
    # 5xx or timed out may have landed, and the cleanup must delete it all the same
    done = _register(key, pod, api)
    try:
        _create(api, f"/api/v1/namespaces/{seg(ns)}/pods", man, (key, pod.name), timeout)
    except Conflict:
        _unregister(key, pod)  # the name is someone else's pod: never delete it
        raise
    except (NotFound, AuthError, UsageError, OperationFailed) as e:
        # a definitive 4xx (403 RBAC or admission, 404 namespace, 400/422 invalid): nothing
        # was created, so nothing to delete nor to warn about at the end
        code = e.details.get("httpStatus")
        if isinstance(e, NotFound) or (isinstance(code, int) and 400 <= code < 500 and code != 408
                                       and not isinstance(e, MaybeApplied)):
            _unregister(key, pod)
        raise
    except KeyboardInterrupt:  # the create may be on its way: the cleanup watches for it
        with _GUARD:
            _UNSEEN.add((key, pod.name))
        raise
    finally:
        done.set()
    return wait_running(api, pod, timeout)


def _create(api, path: str, man: dict, pkey, timeout: float) -> None:
    """POST the pod. An unknown outcome (5xx, timeout) is not sent again: the name is looked
    for until ``timeout`` (found: it landed, it is ours); not found, the error stands and the
    cleanup watches a while for the create landing late (kube-apiserver's timeout filter
    answers 504 while the handler goes on)."""
    from katactl.backends.kube import MaybeApplied, seg

    ns = man["metadata"]["namespace"]
    try:
        api.create(path, man)
    except NotFound:
        raise NotFound(f"namespace {ns} not found (--agent-namespace)") from None
    except AuthError as e:
        if "violates PodSecurity" in e.message:
            # admission (Pod Security Admission), not RBAC: the user may create pods, the
            # namespace's policy level forbids this privileged one
            why = e.message[e.message.index("violates PodSecurity"):]
            raise OperationFailed(
                f"the node pod was refused by admission, not RBAC: namespace {ns}'s Pod Security level "
                f"forbids a privileged pod ({why})",
                hint="give --agent-namespace NS, a namespace labelled pod-security.kubernetes.io/enforce=privileged",
                details=e.details) from None
        raise
    except (MaybeApplied, UnreachableError):
        deadline = time.monotonic() + timeout
        while True:
            try:
                api.get(f"{path}/{seg(man['metadata']['name'])}")
                return
            except NotFound:
                gone = time.monotonic() >= deadline
            except KatactlError:  # the API does not answer either: nothing more to learn
                gone = True
            if gone:
                with _GUARD:
                    _UNSEEN.add(pkey)
                raise
            time.sleep(POLL * 3)


def replace_agent_pod(api, pod: AgentPod) -> AgentPod:
    """The pod went away mid-run: find its replacement (a DaemonSet's) or, for an ephemeral
    pod, create a new one."""
    from types import SimpleNamespace

    # an ephemeral pod stays registered: one that ended (Failed, past activeDeadlineSeconds)
    # is still there to delete at the end of the run
    settings = SimpleNamespace(agent_namespace=pod.namespace, agent_image=pod.image,
                               request_timeout=float(getattr(api, "timeout", 30.0) or 30.0))
    try:
        return agent_pod(api, settings, pod.node, frozenset({pod.name}))
    except (UsageError, TimeoutExpired):
        # the DaemonSet uninstalled, or its replacement pod not running in time
        raise UnreachableError(f"node pod {pod.namespace}/{pod.name} on {pod.node} went away and no "
                               "replacement is running") from None


def wait_running(api, pod: AgentPod, timeout: float, deadline: float | None = None) -> AgentPod:
    """Wait until ``pod`` runs: one GET, then one watch of the pod (its name as the field
    selector) until it runs, ends or ``timeout`` passes (or ``deadline``, a wait begun earlier
    whose ``timeout`` the error names), as kubectl debug's waitForContainer
    (staging/src/k8s.io/kubectl/pkg/cmd/debug/debug.go: watchtools.UntilWithSync over a
    metadata.name field selector), not a GET every 100 ms per node while images pull."""
    from katactl.backends.kube import WatchExpired, seg

    base = f"/api/v1/namespaces/{seg(pod.namespace)}/pods"
    deadline = time.monotonic() + timeout if deadline is None else deadline
    with _GUARD:
        if threading.current_thread() in _STALE:  # interrupted: the cleanup deletes it
            raise Interrupted("interrupted")
        _WAITING.add(api)  # cleanup() ends the watch of a worker an interrupt left waiting
    try:
        obj = _get_starting(api, pod, f"{base}/{seg(pod.name)}")
        pause = 0.0
        while True:
            if _started(api, pod, obj, timeout, deadline):
                return pod
            try:
                for ev in api.watch(base, resource_version=obj["metadata"].get("resourceVersion") or "0",
                                    timeout_seconds=max(1, math.ceil(deadline - time.monotonic())),
                                    fieldSelector=f"metadata.name={pod.name}"):
                    if ev.get("type") == "DELETED":
                        raise OperationFailed(f"node pod {pod.namespace}/{pod.name} was deleted while starting")
                    if ev.get("type") == "BOOKMARK":
                        obj["metadata"]["resourceVersion"] = ev["object"]["metadata"].get("resourceVersion")
                        continue
                    obj = ev["object"]
                    if _started(api, pod, obj, timeout, deadline):
                        return pod
                # the server ended the watch (its timeoutSeconds): the pod as it is now, for the
                # deadline's message or the next watch
                obj = _get_starting(api, pod, f"{base}/{seg(pod.name)}")
                pause = 0.0
            except (WatchExpired, UnreachableError):
                if threading.current_thread() in _STALE:
                    raise Interrupted("interrupted") from None
                # the watch was lost, refused (no watch on pods: a GET every 2 s then) or its
                # resourceVersion is too old: read the pod again
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(2.0, pause * 2 or 0.5)
                obj = _get_starting(api, pod, f"{base}/{seg(pod.name)}")
    finally:
        with _GUARD:
            _WAITING.discard(api)


def _get_starting(api, pod: AgentPod, path: str) -> dict:
    try:
        return api.get(path)
    except NotFound:
        raise OperationFailed(f"node pod {pod.namespace}/{pod.name} was deleted while starting") from None


def _started(api, pod: AgentPod, obj: dict, timeout: float, deadline: float) -> bool:
    """True once ``obj`` runs; raises once it ended or the deadline passed; False meanwhile."""
    if threading.current_thread() in _STALE:  # interrupted: the cleanup deletes it
        raise Interrupted("interrupted")
    if _running(obj):
        return True
    phase = (obj.get("status") or {}).get("phase")
    if phase in ("Failed", "Succeeded"):
        raise OperationFailed(f"node pod {pod.namespace}/{pod.name} on {pod.node} ended ({phase}) "
                              f"{_describe(api, obj)}")
    if time.monotonic() >= deadline:
        raise TimeoutExpired(f"node pod {pod.namespace}/{pod.name} on {pod.node} not Running within "
                             f"{timeout:g}s: {_describe(api, obj)}")
    return False


def _describe(api, obj: dict) -> str:
    """Phase, container waiting reasons and the pod's recent events, in one line."""
    from katactl.backends.kube import seg

    st = obj.get("status") or {}
    # the pod's own reason: kubelet's rejection (Evicted, NodeAffinity) is said there only
    why = ": ".join(x for x in (st.get("reason"), st.get("message")) if x)
    parts = [f"phase {st.get('phase') or 'Unknown'}{' (' + why.strip() + ')' if why else ''}"]
    for c in st.get("containerStatuses") or []:
        w = (c.get("state") or {}).get("waiting") or (c.get("state") or {}).get("terminated")
        if w:
            parts.append(f"{c.get('name')}: {w.get('reason')}{': ' + w['message'] if w.get('message') else ''}")
    try:
        md = obj["metadata"]
        evs = api.list(f"/api/v1/namespaces/{seg(md['namespace'])}/events",
                       fieldSelector=f"involvedObject.name={md['name']}")
        for e in evs[-5:]:
            parts.append(f"event {e.get('reason')}: {e.get('message')}")
    except Exception:  # noqa: BLE001 - the description is best effort
        pass
    return "; ".join(parts)


# -- ephemeral pod lifetime ----------------------------------------------------------------------
# threads alive when cleanup() ran: workers an interrupt left behind (fleet's fan-out does not
# wait for them) must not create a pod nobody deletes; later runs' threads are new ones
_STALE: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
# by (key, pod name): one entry per create, as _EPHEMERAL keeps every pod of a node
_IN_FLIGHT: dict[tuple, threading.Event] = {}   # set once the pod's create has been answered
_UNSEEN: set[tuple] = set()        # creates of unknown outcome whose pod was never seen
LATE_CREATE_WATCH = 5.0            # seconds the cleanup watches for such a create landing late
CLEANUP_TIMEOUT = 10.0             # seconds all the DELETEs of one cleanup may take together
RECHECK_TIMEOUT = 2.0              # seconds the one GET of the pods whose DELETE was not answered may take
CLEANUP_WORKERS = 16               # DELETEs sent at once
_WAITING: set = set()              # the API clients of wait_running()s watching a pod start


def _register(key, pod: AgentPod, api) -> threading.Event:
    """Register ``pod`` for cleanup; the event is to be set when its create was answered."""
    done = threading.Event()
    with _GUARD:
        if threading.current_thread() in _STALE:  # a worker starting a node after an interrupt
            raise Interrupted("interrupted")
        _EPHEMERAL.setdefault(key, []).append(pod)
        _EPHEMERAL_API[key] = (api.host, api)
        _IN_FLIGHT[(key, pod.name)] = done
    return done


def _unregister(key, pod: AgentPod) -> None:
    with _GUARD:
        pods = _EPHEMERAL.get(key, [])
        if any(p is pod for p in pods):
            pods[:] = [p for p in pods if p is not pod]
            _IN_FLIGHT.pop((key, pod.name), None)
            _UNSEEN.discard((key, pod.name))
            if not pods:
                del _EPHEMERAL[key]
                _EPHEMERAL_API.pop(key, None)


def cleanup(warn=None, *, at_exit: bool = False, warn_left: bool = True) -> list[tuple[AgentPod, str]]:
    """Delete every ephemeral pod this process created (grace 0), all at once within one
    deadline (CLEANUP_TIMEOUT, plus the wait for a create still on its way). Returns the pods
    that could not be deleted, each with why: each has had its warning pointing at ``node
    agent gc`` unless not ``warn_left`` (the caller reports them itself).

    A pod whose DELETE failed or was not answered by the deadline gets one GET (RECHECK_TIMEOUT)
    before it is reported: gone, its DELETE was carried out after all. A pod leaves the registry
    once its DELETE was answered (or it was given up), never before: interrupted (a second
    Ctrl-C), the pods not deleted yet get one warning naming them, stay registered, and the
    atexit pass tries them again."""
    from katactl.backends.kube import KubeAPI, seg

    with _GUARD:
        _STALE.update(t for t in threading.enumerate() if t is not threading.current_thread())
        items = [(key, pod) for key, pods in _EPHEMERAL.items() for pod in pods]
        apis = dict(_EPHEMERAL_API)
        flights = dict(_IN_FLIGHT)
        unseen = set(_UNSEEN)
        waiting = list(_WAITING)
        _WAITING.clear()
        _REACHED.clear()
    # without its lock: a worker may hold it through a slow review; the next run asks again
    _ACCESS.clear()
    for w in waiting:  # a worker an interrupt left watching its pod start: end it now
        w.abort_watches()
    if not items:
        return []
    start = time.monotonic()
    # a create still on its way (an interrupt) is waited for first: deleting before it lands
    # would find nothing and leave the pod behind
    creating = [float(getattr(apis[k][1], "timeout", 30.0) or 30.0) + 1.0 for k, p in items
                if (ev := flights.get((k, p.name))) is not None and not ev.is_set()]
    deadline = start + max(creating, default=0.0) + CLEANUP_TIMEOUT
    left: list[tuple[AgentPod, str]] = []
    done: set[str] = set()  # pods dealt with (deleted, or warned about), by namespace/name
    lock = threading.Lock()

    def path_of(pod: AgentPod) -> str:
        return f"/api/v1/namespaces/{seg(pod.namespace)}/pods/{seg(pod.name)}"

    def report(pod: AgentPod, why) -> None:
        name = f"{pod.namespace}/{pod.name}"
        with lock:
            if name in done:
                return
            done.add(name)
            if why is not None:
                left.append((pod, str(why)))
        if why is not None and warn and warn_left:
            warn(f"could not delete ephemeral node pod {name}: {why} (katactl node agent gc removes it)")

    def delete(item) -> None:
        key, pod = item
        api = apis[key][1]
        ev = flights.get((key, pod.name))
        if ev is not None:
            ev.wait(max(0.0, deadline - CLEANUP_TIMEOUT - time.monotonic()))
        why = None
        try:
            client = KubeAPI(api.host, api.headers, api.tls, max(1.0, deadline - time.monotonic()),
                             user=api.user)
            try:
                try:
                    client.delete(path_of(pod), grace_period=0)
                except NotFound:
                    if (key, pod.name) not in unseen:
                        raise
                    _delete_late(client, path_of(pod), deadline)
            finally:
                client.close()
        except NotFound:
            pass
        except Exception as e:  # noqa: BLE001 - every pod gets its try
            why = e
        if time.monotonic() > deadline + 1.0:
            return  # given up on already, and said so
        if why is None:
            _unregister(key, pod)
            report(pod, None)
        else:  # reported once the GET below confirms the pod is still there
            with lock:
                failed[f"{pod.namespace}/{pod.name}"] = why

    failed: dict[str, Exception] = {}  # pods whose DELETE failed, by namespace/name
    gone: set[str] = set()

    def recheck(item) -> None:
        key, pod = item
        if _gone(apis[key][1], path_of(pod)):
            with lock:
                gone.add(f"{pod.namespace}/{pod.name}")

    try:
        _each(delete, items, deadline + 1.0)
        # a DELETE carried out but answered too late (a client timeout at the deadline) or
        # never left no pod: every pod not known deleted gets one GET, all at once, before it
        # is reported left
        with lock:
            given_up = [(k, p, failed.get(f"{p.namespace}/{p.name}")) for k, p in items
                        if f"{p.namespace}/{p.name}" not in done]
        _each(recheck, [(k, p) for k, p, _ in given_up], time.monotonic() + RECHECK_TIMEOUT + 1.0)
    except KeyboardInterrupt:
        with lock:
            pending = [f"{p.namespace}/{p.name}" for _, p in items if f"{p.namespace}/{p.name}" not in done]
            done.update(pending)  # a DELETE answered from now on says nothing more
        if pending and warn:
            warn(f"interrupted while deleting ephemeral node pods; not deleted: {', '.join(pending)} "
                 + ("(katactl node agent gc removes them)" if at_exit
                    else "(tried once more as katactl exits; katactl node agent gc removes any left)"))
        raise
    # whatever is still there (or not known gone) is given up on, with its warning
    with lock:
        deleted = set(gone)
    for key, pod, why in given_up:
        name = f"{pod.namespace}/{pod.name}"
        _unregister(key, pod)
        report(pod, None if name in deleted else why or f"no answer within {deadline - start:.0f}s")
    return left


def _each(fn, items: list, until: float) -> None:
    """fn(item) for every item, on up to CLEANUP_WORKERS daemon threads taking the next item
    as they finish one, joined until ``until``: a thread still in a request then is abandoned
    (its pod has been given up on, and said so)."""
    todo, lock = iter(items), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            fn(item)

    threads = [threading.Thread(target=worker, name="katactl-pod-cleanup", daemon=True)
               for _ in range(min(CLEANUP_WORKERS, len(items)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, until - time.monotonic()))


def _gone(api, path: str) -> bool:
    """One GET (within RECHECK_TIMEOUT) of a pod whose DELETE was not answered in time: gone, or
    its deletion under way, it is no pod left. No answer either: not confirmed, so it is."""
    from katactl.backends.kube import KubeAPI

    try:
        client = KubeAPI(api.host, api.headers, api.tls, RECHECK_TIMEOUT, user=api.user)
        try:
            obj = client.request("GET", path, retry=False)
        finally:
            client.close()
    except NotFound:
        return True
    except Exception:  # noqa: BLE001 - any other answer confirms nothing
        return False
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _delete_late(client, path: str, deadline: float) -> None:
    """A create of unknown outcome never seen: delete the pod should it land in the next
    LATE_CREATE_WATCH seconds (later, activeDeadlineSeconds and ``node agent gc`` remain)."""
    deadline = min(deadline, time.monotonic() + LATE_CREATE_WATCH)
    while time.monotonic() < deadline:
        time.sleep(POLL * 3)
        try:
            client.delete(path, grace_period=0)
            return
        except NotFound:
            continue
    raise NotFound(path)


def _atexit() -> None:
    """The last pass: pods an interrupted cleanup left registered (a Ctrl-C here too ends it,
    having named them)."""
    import sys

    try:
        cleanup(lambda m: print(f"warning: {m}", file=sys.stderr), at_exit=True)
    except KeyboardInterrupt:
        pass


atexit.register(_atexit)


# -- the DaemonSet -------------------------------------------------------------------------------
def install(api, namespace: str, image: str, *, dry_run: bool = False) -> dict:
    from katactl import audit
    from katactl.backends.kube import seg

    base = f"/apis/apps/v1/namespaces/{seg(namespace)}/daemonsets"
    want = daemonset_manifest(image, namespace)
    try:
        cur = api.get(f"{base}/{DS_NAME}")
    except NotFound:
        cur = None
    if cur is None:
        audit.changing()  # the "requested" entry (nodes.audited's intent; none for a dry run)
        try:
            api.create(base, want, dry_run=dry_run)
        except NotFound:
            raise NotFound(f"namespace {namespace} not found (--agent-namespace)") from None
        return {"changed": True, "action": "created"}
    have = (cur.get("spec") or {}).get("template")
    if _undefaulted(want["spec"]["template"]) == _undefaulted(have):
        return {"changed": False, "action": "unchanged"}
    audit.changing()
    api.patch(f"{base}/{DS_NAME}", {"spec": {"template": _replacing(want["spec"]["template"], have)}},
              kind="merge", dry_run=dry_run)
    return {"changed": True, "action": "updated"}


# What kube-apiserver fills in on a pod template that leaves it unset, and so the only way a stored
# template may differ from katactl's and still be katactl's (pkg/apis/core/v1/defaults.go:
# SetDefaults_PodSpec, SetDefaults_Container, SetDefaults_HostPathVolumeSource; "resources" and the
# template's "creationTimestamp" are Go's encoding of an empty struct and a zero time, not defaults).
_POD_DEFAULTS = {"dnsPolicy": "ClusterFirst", "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                 "securityContext": {}, "schedulerName": "default-scheduler", "enableServiceLinks": True}
_CONTAINER_DEFAULTS = {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                       "resources": {}}


def _pull_policy(image: str) -> str:
    """SetDefaults_Container's imagePullPolicy: Always for the tag "latest", which an image with
    neither tag nor digest has (ParseImageName), else IfNotPresent."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    return "Always" if tag == "latest" or (not tag and not digest) else "IfNotPresent"


def _undefaulted(tmpl):
    """A pod template without the fields that hold the API server's default for them: two
    templates are the same to the server exactly when these are equal."""
    if not isinstance(tmpl, dict):
        return tmpl
    t = copy.deepcopy(tmpl)
    md = t.get("metadata")
    if isinstance(md, dict) and "creationTimestamp" in md and md["creationTimestamp"] is None:
        del md["creationTimestamp"]
    spec = t.get("spec")
    if not isinstance(spec, dict):
        return t
    _drop_defaults(spec, _POD_DEFAULTS)
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if isinstance(c, dict):
            _drop_defaults(c, {**_CONTAINER_DEFAULTS, "imagePullPolicy": _pull_policy(str(c.get("image") or ""))})
    for v in spec.get("volumes") or []:
        hp = v.get("hostPath") if isinstance(v, dict) else None
        if isinstance(hp, dict):
            _drop_defaults(hp, {"type": ""})
    return t


def _drop_defaults(d: dict, defaults: dict) -> None:
    for k, v in defaults.items():
        if k in d and d[k] == v:
            del d[k]


def _replacing(want: dict, have) -> dict:
    """A JSON merge patch (RFC 7386) that turns ``have`` into ``want``: ``want`` with every key
    only ``have`` holds set to null (a merge patch keeps a map's other keys; lists it replaces
    whole). A nulled server-defaulted field is defaulted again."""
    out = dict(want)
    if isinstance(have, dict):
        for k, v in have.items():
            if k not in want:
                out[k] = None
            elif isinstance(want[k], dict):
                out[k] = _replacing(want[k], v)
    return out


def status(api, namespace: str) -> dict:
    from katactl.backends.kube import seg
    from katactl.nodes import pod_object

    try:
        ds = api.get(f"/apis/apps/v1/namespaces/{seg(namespace)}/daemonsets/{DS_NAME}")
    except NotFound:
        ds = None
    pods = find_pods(api, namespace)
    tmpl = (((ds or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    image = _image(tmpl)
    # the nodes the DaemonSet places a pod on (its nodeSelector; its tolerations take every taint):
    # a node it does not select lacking its pod is no problem
    selector = tmpl.get("nodeSelector") or {}
    nodes = [n["metadata"]["name"] for n in api.list("/api/v1/nodes")
             if all(((n["metadata"].get("labels") or {}).get(k)) == v for k, v in selector.items())]
    by_node: dict[str, list[dict]] = {}
    for p in pods:
        by_node.setdefault((p.get("spec") or {}).get("nodeName") or "", []).append(p)
    items = []
    for n in nodes:
        ps = by_node.get(n, [])
        ds_pods = [p for p in ps if (p["metadata"].get("labels") or {}).get(KIND_LABEL) == "daemonset"]
        eph = [p for p in ps if (p["metadata"].get("labels") or {}).get(KIND_LABEL) == "ephemeral"]
        running = [p for p in ds_pods if _running(p)]
        run = next((p for p in running if _image(p.get("spec") or {}) == image), running[0] if running else None)
        shown = run or (ds_pods[0] if ds_pods else {})
        meta = shown.get("metadata")
        pod_image = _image(shown.get("spec") or {}) if meta else None
        # a pod the controller has not replaced since the template changed still runs the
        # old agent: --via kube would exec into it (kubectl rollout status counts it not done)
        updated = None if not (meta and ds) else pod_image == image
        items.append({"node": n, "pod": pod_object(meta) if meta else None,
                      "podRef": f"{meta.get('namespace')}/{meta.get('name')}" if meta else None,
                      "ready": run is not None and updated is not False,
                      "phase": (shown.get("status") or {}).get("phase"),
                      "image": pod_image, "updated": updated,
                      "ephemeral": [p["metadata"]["name"] for p in eph]})
    return {"namespace": namespace, "installed": ds is not None, "image": image,
            "ready": sum(1 for i in items if i["ready"]), "nodes": len(items),
            "outdated": sum(1 for i in items if i["updated"] is False), "items": items}


def _image(spec: dict) -> str | None:
    """The agent container's image in a pod (template) spec."""
    return next((c.get("image") for c in spec.get("containers") or [] if c.get("name") == CONTAINER), None)


def uninstall(api, namespace: str, *, dry_run: bool = False) -> dict:
    from katactl import audit
    from katactl.backends.kube import seg

    path = f"/apis/apps/v1/namespaces/{seg(namespace)}/daemonsets/{DS_NAME}"
    try:
        api.get(path)  # none there: a no-op, which writes no "requested" entry
    except NotFound:
        return {"changed": False}
    audit.changing()
    try:
        api.delete(path, propagation="Background", dry_run=dry_run)
    except NotFound:
        return {"changed": False}
    return {"changed": True}


GC_MIN_AGE = 3 * 3600    # node agent gc --older-than's default: below EPHEMERAL_DEADLINE


def _creator_alive(created_by: str | None) -> bool:
    """Whether the annotation names a katactl process on this host that is still running
    ("user@host pid N at ...", _who)."""
    m = re.fullmatch(r"[^@]*@(\S+) pid (\d+) at .*", created_by or "")
    if not m or m.group(1) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(2)), 0)
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def _age(p: dict, now: float) -> float | None:
    import calendar

    ts = p["metadata"].get("creationTimestamp")
    try:
        return now - calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ"))
    except (TypeError, ValueError):
        return None


def gc_candidates(api, namespace: str, older_than: float = GC_MIN_AGE) -> list[dict]:
    """Ephemeral node pods left behind: katactl's own (is_agent_pod, not a pod wearing its
    label) that ended, or are older than ``older_than`` seconds and whose creator is not a
    katactl still running on this host (a live run uses its pod and deletes it at its end)."""
    out = []
    now = time.time()
    for p in find_pods(api, namespace):
        if (p["metadata"].get("labels") or {}).get(KIND_LABEL) != "ephemeral" or not is_agent_pod(p, namespace):
            continue
        created_by = (p["metadata"].get("annotations") or {}).get(CREATED_BY)
        if (p.get("status") or {}).get("phase") not in ("Failed", "Succeeded"):
            age = _age(p, now)
            if age is None or age < older_than or _creator_alive(created_by):
                continue
        out.append({"name": p["metadata"]["name"], "node": (p.get("spec") or {}).get("nodeName"),
                    "phase": (p.get("status") or {}).get("phase"),
                    "createdBy": created_by,
                    "created": p["metadata"].get("creationTimestamp")})
    return out


def gc(api, namespace: str, *, dry_run: bool = False, candidates: list[dict] | None = None,
       older_than: float = GC_MIN_AGE) -> tuple[list[dict], list[tuple[dict, KatactlError]]]:
    """Delete the ephemeral node pods: candidates (what gc_candidates listed and the user
    confirmed), else those gc_candidates lists now. Every pod gets its DELETE (one refused is
    no reason to leave the others on their nodes): returns the pods deleted, and the pods not
    deleted each with its error (a pod already gone is neither)."""
    from katactl.backends.kube import seg
    from katactl.errors import as_katactl_error

    done, failed = [], []
    for c in gc_candidates(api, namespace, older_than) if candidates is None else candidates:
        try:
            api.delete(f"/api/v1/namespaces/{seg(namespace)}/pods/{seg(c['name'])}", grace_period=0, dry_run=dry_run)
            done.append(c)
        except NotFound:
            pass
        except Exception as e:  # noqa: BLE001 - that pod's outcome; the next ones still get theirs
            failed.append((c, as_katactl_error(e)))
    return done, failed
