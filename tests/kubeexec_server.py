"""pods/exec over WebSocket for the kube-apiserver stand-in (tests/kubeserver.py), and the bit of
kubelet behaviour that katactl's node pods need.

``KubeExecMixin`` is a base class of ``KubeStandIn``; ``serve_exec`` is called by its request
handler for ``GET .../pods/{name}/exec`` (and ``/attach`` is not served). What it does:

- Authorization as kube-apiserver 1.35: the WebSocket upgrade needs ``create`` on ``pods/exec``
  (the stand-in's "readonly" user is refused with the RBAC-format 403). A missing pod -> 404; a
  pod without a nodeName -> 400. What the kubelet side answers -- a pod that is not Running:
  "container not found"; a node that is NotReady or has no root mapped: "error dialing backend"
  (the kubelet is unreachable) -- comes as the server generation does: with v4 (an old
  apiserver's upgrade-aware proxy hands the upgrade to the kubelet) as an HTTP 400 / 500 before
  any upgrade; with v5 (1.30+'s StreamTranslatorHandler, streamtranslator.go) after the 101, as
  an ``InternalError`` Status on channel 3 ("Internal error occurred: ...") and a close.
  No ``command`` -> 400. A non-upgrade GET -> 400 "Upgrade request required".
- Subprotocols: the client's ``Sec-WebSocket-Protocol`` list; the first it offers among
  ``exec_protocols`` (default ``("v5.channel.k8s.io", "v4.channel.k8s.io")``: set
  ``("v5.channel.k8s.io",)`` to act as the 1.30+ translator, ``("v4.channel.k8s.io",)`` as an old
  kubelet) is chosen; none -> 400 (no upgrade).
- Framing as k8s.io/apimachinery wsstream: after the 101 the server sends one "empty" binary
  message, which is the channel byte of the lowest writable channel (stdout, else stderr, else
  status) with no data (kubectl 1.33 fails with "read stream id: EOF" on a zero-length one); then every message is ``[channel byte] + data``: 0 stdin, 1 stdout, 2 stderr, 3 status
  (a metav1.Status: ``Success``, or ``Failure`` with reason ``NonZeroExitCode`` and
  ``details.causes[{reason: ExitCode, message: "<rc>"}]``), 4 resize (ignored), and with v5 only
  ``[255, 0]`` closes stdin (half-close). After the status the server sends a close frame (1000).
  Client frames must be masked (RFC 6455); pings are answered.
- Execution: for a pod on node N (``node_roots[N]`` = a directory: a lab or a fixture tree) the
  argv runs on this machine as root, cwd /, inside a private mount namespace
  (``unshare --mount --propagation private``) in which that directory is rbind-mounted at ``/host``
  (the directory /host is created on this machine if missing; it stays empty outside the
  namespaces). The "container image" is this machine: python3, coreutils. A program that is not
  found -> Failure status with the runtime's "executable file not found in $PATH" message and no
  exit code (as runc's exec failure), not exit 127.
- Back-pressure: stdout/stderr are read in ``exec_chunk`` pieces (default 32 KiB, io.Copy's
  buffer) and written to the socket synchronously; a slow reader stops the process's pipe.
- Defaulting: a DaemonSet's pod template is stored with kube-apiserver's defaults
  (imagePullPolicy, terminationMessagePath/Policy, resources, restartPolicy, dnsPolicy,
  schedulerName, securityContext, terminationGracePeriodSeconds, enableServiceLinks, hostPath
  type); other objects and bare pods are stored as sent.
- "kubelet": a pod created through the API with a nodeName on a Ready node that has a root becomes
  Running after ``kubelet_start_delay`` seconds (``kubelet_starts_pods = False`` leaves it Pending,
  with a Scheduled event and an ImagePullBackOff waiting state, for timeout tests); on a node with
  a True MemoryPressure/DiskPressure/PIDPressure condition the eviction manager's admission
  applies (a pod that is not critical is rejected: Failed, reason Evicted; under MemoryPressure
  alone a Burstable or Guaranteed pod, or one tolerating the memory-pressure taint, is admitted).
  A DaemonSet created through the API gets one pod per node its template's nodeSelector matches
  (tolerations and affinity are not evaluated), each through Priority admission; a refused pod
  create (an unknown priorityClassName) leaves the DaemonSet stored and makes no pod but one
  FailedCreate Warning event on it, "Error creating: <the 403's message>". A node added later
  gets no pod, and a template changed later does not replace the pods (as updateStrategy OnDelete).
- A client that goes away (a close frame or a dropped connection before the status): as the
  kubelet's runtime does, the exec's stdin is closed (containerd pkg/cri/server/
  container_execsync.go execInternal: Attach with ``StdinOnce`` and ``CloseStdin``), its output
  is no longer read (a command that goes on writing blocks once its pipe is full), and the
  process is *not* killed: it runs on until it ends by itself (kubernetes/kubernetes#89031,
  kubernetes/kubectl#1076, opencontainers/runc#3359). Nor are processes an exec left behind
  (its background children) killed when it ends. They end with their pod (below).
- Process info: every exec's processes carry ``KATACTL_STANDIN_EXEC=<server>/<pod uid>/<n>`` in
  their environment (inherited by their children, also those in a session of their own, as a
  container's cgroup holds them all); ``exec_processes()`` lists the live ones (pid, argv), so a
  test sees what a client left running on the "node".
- Faults: ``exec_cut(argv_regex, after_bytes, times)`` drops the connection (no close frame, no
  status) after that many stdout bytes of an exec whose space-joined argv matches; the process is
  left as a client's going away leaves it. ``exec_log`` lists every exec (pod, node, argv,
  protocol, exit code, and ``requestLine``: the length of its HTTP request line, which a front
  such as nginx bounds).

Known differences from the real kubelet/apiserver:
- The DaemonSet controller runs once, at the DaemonSet's create: it sets each pod's nodeName
  (the real one sets a nodeAffinity the scheduler binds by), and a refused create is not retried
  (the real controller retries with backoff, the event's count growing). Its pods get no
  SuccessfulCreate events and the DaemonSet no status.
- The eviction admit reads the Node's pressure conditions (the real manager its own
  observations) and counts mirror pods and priority >= 2000000000 as critical, not static pods.
- A pod's execs (every process carrying their environment marker) are killed when the pod leaves storage (grace 0 at once, else at the end of
  its grace period), not at the deletionTimestamp's SIGTERM; a DaemonSet's pods removed by
  the cascade of the DaemonSet's deletion keep theirs.
- No TTY, no resize, no ``channel.k8s.io``/v2/v3 (base64) protocols, no SPDY (kubectl with
  ``KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`` gets a 400), no ``container`` validation beyond
  existence of the name in the pod spec, no ephemeral containers, no exec timeout.
- The process runs in this machine's PID, network and IPC namespaces (a hostPID,
  hostNetwork pod), with the marker variable above in its environment; ``securityContext`` and ``hostPath`` volumes of the pod are not looked at: the
  root mapping is the test's, not the pod spec's.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


class KubeExecMixin:
    """State and knobs of the exec endpoint and the mini kubelet (see the module docstring)."""

    def _exec_init(self):
        self.node_roots: dict[str, str] = {}
        self.exec_protocols: tuple[str, ...] = PROTOCOLS
        self.exec_chunk = 32 << 10
        self.exec_log: list[dict] = []
        self.kubelet_starts_pods = True
        self.kubelet_start_delay = 0.05
        self._exec_cuts: list[dict] = []
        self._exec_token = os.urandom(6).hex()  # this server's execs' environment marker
        self._exec_n = 0

    def _exec_reset(self):
        self.node_roots = {}
        self.exec_protocols = PROTOCOLS
        self.exec_chunk = 32 << 10
        self.exec_log = []
        self.kubelet_starts_pods = True
        self.kubelet_start_delay = 0.05
        self._exec_cuts = []
        self._exec_kill_all()

    def _exec_kill_all(self):
        if hasattr(self, "_exec_token"):
            _kill_marked(f"{self._exec_token}/")

    def _exec_pod_removed(self, pod):
        """The kubelet stops a deleted pod's containers (at the end of its grace period, when
        the stand-in removes it): every process exec'd in them is killed, its stream ends."""
        _kill_marked(f"{self._exec_token}/{(pod.get('metadata') or {}).get('uid')}/")

    def exec_processes(self) -> list[tuple[int, list[str]]]:
        """The live processes of this server's execs (pid, argv), finished ones' leftovers and
        those a client left running included (see the module docstring)."""
        return _marked(f"{self._exec_token}/")

    def set_node_root(self, node: str, root: str):
        """Exec into pods on ``node`` sees ``root`` at /host."""
        self.node_roots[node] = os.path.abspath(root)

    def exec_cut(self, argv_regex: str, after_bytes: int, times: int = 1):
        with self._lock:
            self._exec_cuts.append({"re": re.compile(argv_regex), "after": after_bytes, "times": times})

    def _take_cut(self, argv) -> int | None:
        joined = " ".join(argv)
        with self._lock:
            for c in self._exec_cuts:
                if c["times"] > 0 and c["re"].search(joined):
                    c["times"] -= 1
                    return c["after"]
        return None

    # -- defaulting ---------------------------------------------------------------------------

    def _exec_default(self, res, obj):
        """kube-apiserver's defaulting of a DaemonSet's pod template, as stored and returned
        (pkg/apis/core/v1/defaults.go SetDefaults_PodSpec and SetDefaults_Container, the
        fields a client that compares its manifest with the stored object trips over)."""
        if res.plural != "daemonsets":
            return
        spec = ((obj.get("spec") or {}).get("template") or {}).get("spec")
        if not isinstance(spec, dict):
            return
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("securityContext", {})
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("enableServiceLinks", True)
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            if not isinstance(c, dict):
                continue
            # ParseImageName: no tag and no digest is the tag "latest"; "latest" is pulled Always
            name, _, digest = str(c.get("image") or "").partition("@")
            tag = name.rsplit("/", 1)[-1].partition(":")[2]
            c.setdefault("imagePullPolicy", "Always" if tag == "latest" or not (tag or digest) else "IfNotPresent")
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("resources", {})
        for v in spec.get("volumes") or []:
            if isinstance(v, dict) and isinstance(v.get("hostPath"), dict):
                v["hostPath"].setdefault("type", "")  # SetDefaults_HostPathVolumeSource

    # -- mini kubelet and DaemonSet controller ------------------------------------------------

    def _exec_after_create(self, res, obj):
        """Called under the store lock after an object was created through the API."""
        if res.plural == "pods":
            node = (obj.get("spec") or {}).get("nodeName")
            if node:
                self._kubelet_admit(obj["metadata"]["namespace"], obj["metadata"]["name"], node)
        elif res.plural == "daemonsets":
            from tests.kubeserver import RESOURCES, ApiError, admit_priority, pod_qos

            tmpl = (obj.get("spec") or {}).get("template") or {}
            want = ((tmpl.get("spec") or {}).get("nodeSelector")) or {}
            for n in self.list_objs("Node"):
                node = n["metadata"]["name"]
                labels = n["metadata"].get("labels") or {}
                if any(labels.get(k) != v for k, v in want.items()):
                    continue  # nodeShouldRunDaemonPod: the template's nodeSelector must match
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": copy.deepcopy(tmpl.get("metadata") or {}),
                       "spec": copy.deepcopy(tmpl.get("spec") or {})}
                md = pod["metadata"]
                base = obj["metadata"]["name"]
                md["namespace"] = obj["metadata"]["namespace"]
                md["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": base,
                                          "uid": obj["metadata"]["uid"], "controller": True,
                                          "blockOwnerDeletion": True}]
                pod["spec"]["nodeName"] = node
                try:  # the controller's create goes through admission, before its name is generated
                    admit_priority(pod, f"{base}-")
                except ApiError as e:
                    self._failed_create(obj, e)
                    break  # syncNodes' slow start: a failed batch skips the rest
                md["name"] = f"{base}-" + "".join(self._rng.choice("bcdfghjklmnpqrstvwxz2456789")
                                                  for _ in range(5))
                pod["status"] = {"phase": "Pending", "qosClass": pod_qos(pod)}
                self._stamp_new(RESOURCES["pods"], pod)
                self.store[("pods", md["namespace"], md["name"])] = pod
                self._log("ADDED", pod)
                self._kubelet_admit(md["namespace"], md["name"], node)

    def _failed_create(self, ds, err):
        """The DaemonSet controller's pod create was refused: a Warning event on the DaemonSet
        (pkg/controller/controller_utils.go RealPodControl.createPods; none for a namespace
        being terminated, which the stand-in's DaemonSet create already refused)."""
        md = ds["metadata"]
        self.add({"apiVersion": "v1", "kind": "Event",
                  "metadata": {"name": f"{md['name']}.{os.urandom(8).hex()}", "namespace": md["namespace"]},
                  "involvedObject": {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": md["name"],
                                     "namespace": md["namespace"], "uid": md["uid"],
                                     "resourceVersion": md.get("resourceVersion", "")},
                  "reason": "FailedCreate", "type": "Warning", "count": 1,
                  "source": {"component": "daemonset-controller"},
                  "message": f"Error creating: {err.message}"})

    def _kubelet_admit(self, ns, name, node):
        if self._kubelet_rejects(ns, name, node):
            return
        ready = self._node_ready(node)
        if not (self.kubelet_starts_pods and ready and node in self.node_roots):
            self.add({"apiVersion": "v1", "kind": "Event",
                      "metadata": {"name": f"{name}.{os.urandom(4).hex()}", "namespace": ns},
                      "involvedObject": {"kind": "Pod", "name": name, "namespace": ns},
                      "reason": "Scheduled", "type": "Normal",
                      "message": f"Successfully assigned {ns}/{name} to {node}"})
            pod = self.store.get(("pods", ns, name))
            if pod is not None and ready:
                cs = [{"name": c.get("name", "main"), "ready": False, "restartCount": 0,
                       "image": c.get("image", ""),
                       "state": {"waiting": {"reason": "ImagePullBackOff",
                                             "message": f'Back-off pulling image "{c.get("image", "")}"'}}}
                      for c in (pod.get("spec") or {}).get("containers") or []]
                pod["status"] = {"phase": "Pending", "qosClass": _qos(pod), "containerStatuses": cs}
            return
        gen = self._gen

        def start():
            with self._lock:
                if gen != self._gen:
                    return
                pod = self.store.get(("pods", ns, name))
                if pod is None or (pod["metadata"].get("deletionTimestamp")):
                    return
                qos = _qos(pod)
                pod["status"] = self._pod_status("Running", True, node)
                pod["status"]["qosClass"] = qos
                cs = pod["status"].get("containerStatuses") or []
                names = [c.get("name", "main") for c in (pod.get("spec") or {}).get("containers") or []]
                for c, n in zip(cs, names, strict=False):  # a pod may report fewer statuses
                    c["name"] = n
                pod["metadata"]["resourceVersion"] = self._next_rv()
                self._log("MODIFIED", pod)

        t = threading.Timer(self.kubelet_start_delay, start)
        t.daemon = True
        self._timers.append(t)
        t.start()

    def _kubelet_rejects(self, ns, name, node) -> bool:
        """The eviction manager's admit handler (pkg/kubelet/eviction/eviction_manager.go Admit)
        on a node whose MemoryPressure/DiskPressure/PIDPressure condition is True: a critical pod
        (pkg/kubelet/types/pod_update.go IsCriticalPod: mirror, or priority >= 2000000000) is
        admitted; under MemoryPressure alone a pod that is not BestEffort (v1qos.GetPodQOS:
        status.qosClass, else computed), or a BestEffort one whose tolerations tolerate the
        memory-pressure NoSchedule taint (tolerates_taint); any other is rejected as kubelet.go
        rejectPod does (phase Failed, reason Evicted, a Warning event). Not modelled: static pods
        (config source not "api") count as critical, and the conditions are the Node object's, not
        an eviction manager's own observations."""
        from tests.kubeserver import MIRROR

        n = self.store.get(("nodes", "", node))
        pod = self.store.get(("pods", ns, name))
        if n is None or pod is None:
            return False
        conds = [c.get("type") for c in (n.get("status") or {}).get("conditions") or []
                 if c.get("type") in ("MemoryPressure", "DiskPressure", "PIDPressure") and c.get("status") == "True"]
        spec = pod.get("spec") or {}
        if not conds or (spec.get("priority") or 0) >= 2000000000 or MIRROR in (pod["metadata"].get("annotations") or {}):
            return False
        if conds == ["MemoryPressure"]:
            taint = {"key": "node.kubernetes.io/memory-pressure", "effect": "NoSchedule"}
            if _qos(pod) != "BestEffort" or any(tolerates_taint(t, taint) for t in spec.get("tolerations") or []):
                return False
        msg = f"The node had condition: [{' '.join(conds)}]. "
        pod["status"] = {"phase": "Failed", "reason": "Evicted", "message": "Pod was rejected: " + msg,
                         "qosClass": _qos(pod)}
        pod["metadata"]["resourceVersion"] = self._next_rv()
        self._log("MODIFIED", pod)
        self.add({"apiVersion": "v1", "kind": "Event",
                  "metadata": {"name": f"{name}.{os.urandom(4).hex()}", "namespace": ns},
                  "involvedObject": {"kind": "Pod", "name": name, "namespace": ns},
                  "reason": "Evicted", "type": "Warning", "message": msg})
        return True

    def _node_ready(self, node) -> bool:
        n = self.store.get(("nodes", "", node))
        if n is None:
            return False
        return any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (n.get("status") or {}).get("conditions") or [])


def _qos(pod) -> str:
    """v1qos.GetPodQOS (pkg/apis/core/v1/helper/qos/qos.go): status.qosClass when the pod has
    one, else computed from its spec."""
    from tests.kubeserver import pod_qos

    return (pod.get("status") or {}).get("qosClass") or pod_qos(pod)


def tolerates_taint(t, taint) -> bool:
    """k8s.io/api core/v1 toleration.go ToleratesTaint: an empty effect matches every effect, an
    empty key every key; operator Exists matches any value, Equal or none (the default) an equal
    value (a taint without one has ""); any other operator nothing."""
    if not isinstance(t, dict):
        return False
    if t.get("effect") and t["effect"] != taint.get("effect"):
        return False
    if t.get("key") and t["key"] != taint.get("key"):
        return False
    op = t.get("operator") or "Equal"
    if op == "Equal":
        return (t.get("value") or "") == (taint.get("value") or "")
    return op == "Exists"


# ---------------------------------------------------------------------------------------------
# the endpoint


class _WSClosed(Exception):
    pass


def is_exec(method: str, path: str) -> bool:
    return method in ("GET", "POST") and re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/[^/]+/exec", path) is not None


def serve_exec(h, srv, user: str, path: str, query: dict):
    """Serve one exec request on handler ``h`` (a _Handler). Errors are Status answers. POST (SPDY,
    kubectl's fallback) is authorized like GET and then refused with 400."""
    from tests.kubeserver import RESOURCES, ApiError

    parts = path.strip("/").split("/")
    ns, name = parts[3], parts[5]
    try:
        srv._authorize(user, "create", RESOURCES["pods"], "exec", ns, name)
        with srv._lock:
            pod = copy.deepcopy(srv.store.get(("pods", ns, name)))
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
            node = (pod.get("spec") or {}).get("nodeName")
            containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
            container = (query.get("container") or [containers[0] if containers else ""])[0]
            if container not in containers:
                raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
            if not node:
                raise ApiError(400, "BadRequest", f"pod {name} does not have a host assigned")
            # what the kubelet (or the dial to it) answers; before the upgrade on v4, after it on v5
            kubelet_err = None
            root = srv.node_roots.get(node)
            if not srv._node_ready(node) or root is None:
                kubelet_err = ApiError(500, "InternalError", "error dialing backend: dial tcp 10.0.0.1:10250: "
                                       "connect: connection refused")
            elif (pod.get("status") or {}).get("phase") != "Running":
                kubelet_err = ApiError(400, "BadRequest",
                                       f'unable to upgrade connection: container not found ("{container}")')
        # argv words are bytes (Go's url.ParseQuery keeps any byte; the runtime execs them as
        # they are): decoded as the OS does file names, not with U+FFFD replacements
        from urllib.parse import parse_qs, urlsplit

        argv = parse_qs(urlsplit(h.path).query, errors="surrogateescape").get("command") or []
        if not argv:
            raise ApiError(400, "BadRequest", "you must specify at least one command for the container")
        if h.command == "POST" or (h.headers.get("Upgrade") or "").lower().startswith("spdy"):
            raise ApiError(400, "BadRequest", "the stand-in does not serve SPDY (use WebSocket)")
        if (h.headers.get("Upgrade") or "").lower() != "websocket":
            raise ApiError(400, "BadRequest", "Upgrade request required")
        offered = [p.strip() for v in h.headers.get_all("Sec-WebSocket-Protocol") or [] for p in v.split(",")]
        proto = next((p for p in offered if p in srv.exec_protocols), None)
        if proto is None:
            raise ApiError(400, "BadRequest", "unable to upgrade connection: no supported subprotocol "
                           f"(offered {offered}, served {list(srv.exec_protocols)})")
        if kubelet_err is not None and proto != "v5.channel.k8s.io":
            raise kubelet_err
    except ApiError as e:
        return h._send(e.code, e.status())
    want = {k: (query.get(k) or ["false"])[0] in ("true", "1") for k in ("stdin", "stdout", "stderr", "tty")}
    key = h.headers.get("Sec-WebSocket-Key", "").encode()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
    h.send_response(101, "Switching Protocols")
    h.send_header("Upgrade", "websocket")
    h.send_header("Connection", "Upgrade")
    h.send_header("Sec-WebSocket-Accept", accept)
    h.send_header("Sec-WebSocket-Protocol", proto)
    h.end_headers()
    h.wfile.flush()
    h.close_connection = True
    if kubelet_err is not None:
        return _translator_failure(h, want, kubelet_err.status()["message"])
    _Session(h, srv, pod, node, root, argv, proto, want).run()


def _translator_failure(h, want, err: str):
    """kube-apiserver >= 1.30's StreamTranslatorHandler (staging/src/k8s.io/apiserver/pkg/util/
    proxy/streamtranslator.go ServeHTTP): the client's WebSocket is accepted first
    (webSocketServerStreams, with its empty first message), then the SPDY exec to the kubelet is
    dialled; its failure is written as apierrors.NewInternalError(err) on the status channel."""
    st = {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {err}",
          "reason": "InternalError", "details": {"causes": [{"message": err}]}, "code": 500}
    sess = _Session.__new__(_Session)
    sess.h, sess.wlock, sess.dead = h, threading.Lock(), False
    try:
        sess.data(STDOUT if want["stdout"] else STDERR if want["stderr"] else STATUS, b"")
        sess.data(STATUS, json.dumps(st).encode())
        sess.send(0x8, (1000).to_bytes(2, "big"))
    except _WSClosed:
        pass
    sess._drain_close()


class _Session:
    def __init__(self, h, srv, pod, node, root, argv, proto, want):
        self.h, self.srv, self.pod, self.node, self.root = h, srv, pod, node, root
        self.argv, self.proto, self.want = argv, proto, want
        self.wlock = threading.Lock()
        self.dead = False
        self.sent_out = 0
        self.cut_after = srv._take_cut(argv)
        self.entry = {"pod": f"{pod['metadata']['namespace']}/{pod['metadata']['name']}", "node": node,
                      "argv": list(argv), "protocol": proto, "exitCode": None, "cut": False,
                      "requestLine": len(h.requestline)}
        with srv._lock:
            srv.exec_log.append(self.entry)

    # -- frames --------------------------------------------------------------------------------
    def send(self, opcode: int, payload: bytes):
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, n])
        elif n < 1 << 16:
            head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
        with self.wlock:
            if self.dead:
                raise _WSClosed()
            try:
                self.h.wfile.write(head + payload)
            except OSError:
                self.dead = True
                raise _WSClosed() from None

    def data(self, channel: int, payload: bytes):
        self.send(0x2, bytes([channel]) + payload)

    def read_frame(self):
        r = self.h.rfile
        b = r.read(2)
        if len(b) < 2:
            raise _WSClosed()
        fin, op, masked, n = b[0] & 0x80, b[0] & 0x0F, b[1] & 0x80, b[1] & 0x7F
        if n == 126:
            n = int.from_bytes(r.read(2), "big")
        elif n == 127:
            n = int.from_bytes(r.read(8), "big")
        if not masked:
            raise _WSClosed()  # RFC 6455 5.1: the server closes on an unmasked client frame
        mask = r.read(4)
        payload = r.read(n)
        if len(payload) < n:
            raise _WSClosed()
        if n:
            m = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "little") ^ int.from_bytes(m, "little")).to_bytes(n, "little")
        return fin, op, payload

    def kill_conn(self):
        with self.wlock:
            self.dead = True
        try:
            self.h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the exec ----------------------------------------------------------------------------
    def run(self):
        status_ok = self.proto in PROTOCOLS
        try:
            # the first, empty message: the lowest writable channel's byte and no data
            # (remotecommand's createWebSocketStreams writes []byte{} to stdout, else stderr, else error)
            self.data(STDOUT if self.want["stdout"] else STDERR if self.want["stderr"] else STATUS, b"")
        except _WSClosed:
            return
        prog = self.argv[0]
        found = shutil.which(prog, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") \
            if "/" not in prog else (prog if os.access(prog, os.X_OK) else None)
        if not found:
            msg = (f'OCI runtime exec failed: exec failed: unable to start container process: exec: "{prog}": '
                   f"executable file not found in $PATH: unknown")
            try:
                if status_ok:
                    self.data(STATUS, json.dumps({"metadata": {}, "status": "Failure", "message": msg,
                                                  "reason": "InternalError",
                                                  "details": {"causes": [{"message": msg}]}, "code": 500}).encode())
                self.send(0x8, (1000).to_bytes(2, "big"))
            except _WSClosed:
                pass
            self._drain_close()
            return
        os.makedirs("/host", exist_ok=True)
        wrapper = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                   'mount --rbind -- "$0" /host && cd / && exec "$@"', self.root, *self.argv]
        with self.srv._lock:
            self.srv._exec_n += 1
            n = self.srv._exec_n
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME": self.node,
               "HOME": "/root", "LANG": "C.UTF-8",
               MARKER: f"{self.srv._exec_token}/{self.pod['metadata'].get('uid')}/{n}"}
        p = subprocess.Popen(wrapper, stdin=subprocess.PIPE if self.want["stdin"] else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                             start_new_session=True, bufsize=0)
        pumps = [threading.Thread(target=self.pump, args=(p.stdout, STDOUT), daemon=True),
                 threading.Thread(target=self.pump, args=(p.stderr, STDERR), daemon=True)]
        for t in pumps:
            t.start()
        done = threading.Event()
        reader = threading.Thread(target=self.reader, args=(p, done), daemon=True)
        reader.start()
        try:
            for t in pumps:
                t.join()
            rc = p.wait()
            if rc < 0:  # killed by a signal: containerd's reaper reports 128 + signal (exitSignalOffset)
                rc = 128 - rc
            self.entry["exitCode"] = rc
            if self.dead:
                return
            try:
                if status_ok:
                    st = {"metadata": {}, "status": "Success"} if rc == 0 else {
                        "metadata": {}, "status": "Failure",
                        "message": f"command terminated with non-zero exit code: error executing command "
                                   f"{json.dumps(self.argv)}, exit code {rc}",
                        "reason": "NonZeroExitCode",
                        "details": {"causes": [{"reason": "ExitCode", "message": str(rc)}]}}
                    self.data(STATUS, json.dumps(st).encode())
                self.send(0x8, (1000).to_bytes(2, "big"))
            except _WSClosed:
                return
            reader.join(5)
        finally:
            # the exec ended: what it left behind runs on, as in a container (the kubelet's
            # runtime does not kill an exec's leftovers); closing its stdin as the runtime does
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    if f:
                        f.close()
                except OSError:
                    pass
            self.kill_conn()

    def _drain_close(self):
        try:
            self.h.connection.settimeout(5)
            while True:
                _, op, _ = self.read_frame()
                if op == 0x8:
                    break
        except (OSError, _WSClosed, ValueError):
            pass
        self.kill_conn()

    def pump(self, f, channel):
        try:
            while True:
                b = f.read(self.srv.exec_chunk)
                if not b:
                    return
                if channel == STDOUT and not self.want["stdout"]:
                    continue
                if channel == STDERR and not self.want["stderr"]:
                    continue
                if channel == STDOUT and self.cut_after is not None:
                    room = self.cut_after - self.sent_out
                    if room <= len(b):
                        if room > 0:
                            self.data(STDOUT, b[:room])
                        self.entry["cut"] = True
                        self.kill_conn()
                        return
                self.data(channel, b)
                if channel == STDOUT:
                    self.sent_out += len(b)
        except _WSClosed:
            return
        except (OSError, ValueError):
            return

    def reader(self, p, done):
        stdin_open = p.stdin is not None
        try:
            while True:
                fin, op, payload = self.read_frame()
                if op == 0x8:
                    try:
                        self.send(0x8, payload[:2] or (1000).to_bytes(2, "big"))
                    except _WSClosed:
                        pass
                    break
                if op == 0x9:
                    self.send(0xA, payload)
                    continue
                if op not in (0x1, 0x2, 0x0) or not payload:
                    continue
                ch, data = payload[0], payload[1:]
                if ch == STDIN and stdin_open and data:
                    try:
                        p.stdin.write(data)
                    except (OSError, ValueError):
                        stdin_open = False
                elif ch == CLOSE and self.proto == "v5.channel.k8s.io" and data[:1] == bytes([STDIN]):
                    if stdin_open:
                        stdin_open = False
                        try:
                            p.stdin.close()
                        except OSError:
                            pass
        except (_WSClosed, OSError, ValueError):
            pass
        finally:
            if stdin_open:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            if p.poll() is None and self.entry["exitCode"] is None:
                # the client went away: its stdin was closed just above, its output is no
                # longer read, and it runs on (the kubelet's runtime; see the docstring)
                self.dead = True
            done.set()


MARKER = "KATACTL_STANDIN_EXEC"


def _marked(prefix: str) -> list[tuple[int, list[str]]]:
    """Live processes whose environment has MARKER=<prefix...> (pid, argv); zombies have none."""
    want = f"{MARKER}={prefix}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if any(v.startswith(want) for v in env.split(b"\0")):
            out.append((int(d), [a.decode("utf-8", "surrogateescape") for a in argv.split(b"\0")[:-1]]))
    return out


def _kill_marked(prefix: str):
    """SIGKILL every marked process, again while a scan still finds some (one may fork
    between a scan and its kill), as a container's cgroup is killed whole."""
    for _ in range(10):
        procs = _marked(prefix)
        if not procs:
            return
        for pid, _ in procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
