"""Where a rollout's lock and state live: one interface, two backends.

KubeStore (clusters): the lock is a coordination.k8s.io/v1 Lease
``katactl-rollout`` in the lock namespace (one rollout per cluster), holder
``user@host/NAME``, renewed while running, taken over only once expired (judged
from its renewTime against this machine's clock) or when its holder is this
same user@host/NAME whose process is gone (kill -9, then resume here); a 409
means another katactl won the race. The state is a ConfigMap
``katactl-rollout-NAME`` next to the Lease (binaryData ``state.json.gz``: the
state, gzip; data ``control``; or sharded, below), so ``rollout resume`` works from
another machine; node progress is also written
on the nodes (label ``katactl.io/rollout-phase``, annotation
``katactl.io/rollout``) for ``kubectl get nodes -L katactl.io/rollout-phase``.

FileStore (SSH-only fleets): ``$XDG_STATE_HOME/katactl/rollouts/NAME.json``
(atomic rename), ``NAME.control.json``, and ``rollout.lock`` held with flock
(released by the kernel if katactl dies) holding the holder's identity. A file has no
size limit: it is never sharded.

The state in a ConfigMap is gzip-compressed JSON in binaryData: kube-apiserver refuses a
ConfigMap whose data + binaryData values exceed 1 MiB (ValidateConfigMap in
pkg/apis/core/validation/validation.go: ``ConfigMap "NAME" is invalid: []: Too long: must
have at most 1048576 bytes``, 422), and the plain JSON (~350-1,200 bytes a node, by steps
and node names) passed it at 850-2,900 nodes; gzip brings a node to ~27-66 bytes
(docs/rollout.md, "State in ConfigMaps"). StateWriter encodes it incrementally: the gzip
stream is a concatenation of members (RFC 1952, 2.2: a gzip file is a series of members;
gunzip and Go's gzip.Reader read them as one stream), one for the plan (written once), one
for the rollout's own fields, and one per CHUNK node records in batch order, so a save
compresses again only the chunks whose records changed (a batch's nodes are contiguous).

A state projected (projected at the start: every node through every step) past SHARD_BYTES
is sharded, so a fleet is not bounded by one ConfigMap: the main ConfigMap
``katactl-rollout-NAME`` keeps the control record, the rollout's own fields (data ``head``,
JSON) and the layout (data ``shards``: records a shard, shards); ``katactl-rollout-NAME.plan``
holds the plan (written once), ``katactl-rollout-NAME.nodes-K`` the node records K*n to
K*n+n-1 in batch order (binaryData ``nodes.json.gz``), all labelled ``katactl.io/rollout=NAME``
and ``katactl.io/rollout-part``. A save PUTs the shards whose records changed, then the main
ConfigMap: a record is in one shard (always whole), and the main ConfigMap never says more
than its shards hold (a kill between two writes leaves shards newer than it, as if the rest
of that save had not happened; resume reconciles from the nodes' own cordon records as
always). A create writes the parts first and the main ConfigMap last (parts a killed create
left without one are written over by the next). A state that fits stays in one ConfigMap
(binaryData ``state.json.gz``), written by one PUT, as katactl wrote it before shards; a
ConfigMap written by an earlier katactl still (JSON in data ``state``) is read as well, and
replaced by the new form at its next save; the layout of a stored state is the state's own
(a rollout resumes as it started).
"""
from __future__ import annotations

import base64
import collections
import datetime as dt
import json
import os
import socket
import threading
import time
import zlib
from typing import Callable

from katactl.errors import NotFound, OperationFailed, Refused

LEASE = "katactl-rollout"
CM_PREFIX = "katactl-rollout-"
NODE_LABEL = "katactl.io/rollout"
PHASE_LABEL = "katactl.io/rollout-phase"
NODE_ANNOTATION = "katactl.io/rollout"
SESSION_ANNOTATION = "katactl.io/rollout-session"
MANAGED = {"app.kubernetes.io/managed-by": "katactl"}
#: binaryData key of the gzip state; ``state`` (data) is the form written before it
STATE_KEY = "state.json.gz"
LEGACY_STATE_KEY = "state"
#: kube-apiserver's limit on a ConfigMap's data + binaryData values (core.MaxSecretSize)
MAX_CONFIGMAP_BYTES = 1024 * 1024
#: node records per gzip member (~50-330 KB of JSON: deflate's window is 32 KB, so larger
#: members would compress no better, and smaller ones would be compressed again more often)
CHUNK = 256
#: a sharded state (see KubeStore): the plan, the node records and the rollout's own fields
PART_LABEL = "katactl.io/rollout-part"
PLAN_KEY = "plan.json.gz"
NODES_KEY = "nodes.json.gz"
HEAD_KEY = "head"
SHARDS_KEY = "shards"
#: a state projected larger than this is sharded, into node shards projected at most this
#: large: an eighth of a ConfigMap keeps a save's request small (a save PUTs only the
#: shards whose records changed) and leaves room for retried steps' results (up to 20 a node)
SHARD_BYTES = 128 * 1024
SHARD_BYTES_ENV = "KATACTL_ROLLOUT_SHARD_BYTES"
#: zlib level: 6 (the default) is ~25% smaller than 1 at ~2x the time, and a save compresses
#: only its changed chunks
GZIP_LEVEL = 6


def holder_identity(name: str) -> str:
    from katactl.audit import current_user

    return f"{current_user()}@{socket.gethostname()}/{name}"


def held_by(holder: dict | None, name: str) -> bool:
    """Whether ``holder`` (a lock_holder() answer) is rollout ``name``'s (see holder_identity)."""
    return bool(holder) and str((holder or {}).get("holder", "")).endswith("/" + name)


def session() -> dict:
    """This process as the Lease's holder: with boot id, pid namespace and start time (the
    upgrade lock's owner identity), so a pid is judged only where it means this process."""
    from katactl.upgrade.lock import owner_identity

    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **owner_identity()}


def _pidns() -> str | None:
    from katactl.upgrade.lock import owner_identity

    return owner_identity().get("pidns")


def micro_time(t: float | None = None) -> str:
    """MicroTime as the API server wants it: always six fractional digits."""
    return dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc) \
        .strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Store:
    """The interface the engine and the commands use."""

    kind = "?"
    #: told about what is wrong but not fatal (a hand-edited control record)
    on_warning: Callable[[str], None] = staticmethod(lambda msg: None)

    def _warn_once(self, msg: str) -> None:
        """on_warning, once per message: not at every poll of a running rollout."""
        seen = self.__dict__.setdefault("_warned", set())
        if msg not in seen:
            seen.add(msg)
            self.on_warning(msg)

    def acquire(self, name: str, wait: bool = True) -> None: ...
    def renew(self) -> bool: raise NotImplementedError
    def release(self) -> None: ...
    def lock_holder(self) -> dict | None: ...
    def load(self, name: str) -> dict | None: ...

    def phase(self, name: str) -> str | None:
        """The rollout's phase alone (None: no such rollout), for a caller that polls it."""
        st = self.load(name)
        return st.get("phase") if st else None

    def create(self, state: dict) -> None: ...
    def save(self, name: str, snap: "Snapshot", written=None, taken=None) -> None: ...  # see StateWriter
    def control(self, name: str) -> dict: raise NotImplementedError
    def set_control(self, name: str, control: dict) -> None: ...
    def list(self) -> list[dict]: raise NotImplementedError
    def mark_node(self, node: str, name: str, info: dict) -> None: ...
    def close(self) -> None: ...

    def writer(self, state: dict) -> "StateWriter":
        """The StateWriter for ``state``'s saves (as this store lays it out; ``save``'s
        ``written()`` is called after each shard it writes)."""
        return StateWriter(state)


# -- Kubernetes ----------------------------------------------------------------------

def _server_failed(what: str, e) -> OperationFailed:
    """A create the server kept answering 5xx (a MaybeApplied read back and found absent):
    exit 1 with the server's own message, not a safety refusal."""
    msg = (e.body or {}).get("message") or f"HTTP {e.status}"
    return OperationFailed(f"{what}: the Kubernetes API keeps failing: HTTP {e.status}: {msg}",
                           details={"httpStatus": e.status})


class StaleState(OperationFailed):
    """A save refused because another katactl may have written the state since (see KubeStore.save)."""


class KubeStore(Store):
    kind = "kube"

    def __init__(self, api, namespace: str = "kube-system", ttl: float = 60.0, shard_bytes: int | None = None):
        from katactl.backends.kube import seg

        self.api = api
        self.ns = seg(namespace)
        self.ttl = ttl
        self.shard_bytes = shard_bytes_setting() if shard_bytes is None else shard_bytes
        self._layout: dict[str, int] = {}      # rollout -> node records per shard (0: one ConfigMap)
        self._part_rv: dict[str, str] = {}     # shard ConfigMap -> resourceVersion
        self._part_sent: dict[str, bytes] = {}  # shard ConfigMap -> the state it holds (skip a same PUT)
        self._lease: dict | None = None
        self._cm_rv: dict[str, str] = {}
        self._cm_control: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.name: str | None = None
        #: the lease record as last seen and the local monotonic time it was first seen so
        #: (client-go leaderelection.go observedRecord/observedTime)
        self._seen: tuple[tuple, float] | None = None
        #: told when acquire waits for a lease to expire unrenewed (a message)
        self.on_wait: Callable[[str], None] = lambda msg: None

    # lock -------------------------------------------------------------
    def observed_left(self, lease: dict) -> float:
        """Seconds until the lease expires as this client sees it: leaseDurationSeconds after
        the local monotonic time at which it first saw the record as it is now. Never the
        holder's renewTime against the local clock: a machine whose clock is ahead would take
        a live holder's lease (client-go tools/leaderelection/leaderelection.go isLeaseValid:
        observedTime + LeaseDuration)."""
        spec = lease.get("spec") or {}
        key = ((lease.get("metadata") or {}).get("resourceVersion"), spec.get("holderIdentity"),
               spec.get("renewTime"))
        now = time.monotonic()
        if self._seen is None or self._seen[0] != key:
            self._seen = (key, now)
        return self._seen[1] + (spec.get("leaseDurationSeconds") or 0) - now

    @property
    def _lease_path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.ns}/leases/{LEASE}"

    def lock_holder(self) -> dict | None:
        try:
            lease = self.api.get(self._lease_path)
        except NotFound:
            return None
        spec = lease.get("spec") or {}
        if not spec.get("holderIdentity"):
            return None
        renew = parse_time(spec.get("renewTime")) or 0
        dur = spec.get("leaseDurationSeconds") or 0
        sess = _session_of(lease)
        return {"holder": spec["holderIdentity"], "renewTime": spec.get("renewTime"),
                "leaseDurationSeconds": dur, "expiresIn": round(renew + dur - time.time(), 1),
                "session": sess, "lease": f"{self.ns}/{LEASE}"}

    def _spec(self, name: str, transitions: int, acquire: str | None = None) -> dict:
        now = micro_time()
        return {"holderIdentity": holder_identity(name), "leaseDurationSeconds": max(1, int(self.ttl)),
                "acquireTime": acquire or now, "renewTime": now, "leaseTransitions": transitions}

    def acquire(self, name: str, wait: bool = True) -> None:
        """Take the cluster lock for rollout ``name``, or Refused (exit 5) when another holds
        it. A create answered 5xx (MaybeApplied) is read back: our own Lease is ours; absent, it
        is sent again after a backoff (Retry-After honoured), at most RETRIES times, then
        OperationFailed with the server's message: an overloaded server is no other holder.

        A held lease is taken once this client has seen it unchanged for its
        leaseDurationSeconds (observed_left): with ``wait``, when its renewTime says it has
        expired, acquire watches it that long (a holder that renews meanwhile is alive:
        Refused); without, it refuses, and a later call goes on with the same observation.
        A lease of this rollout's own process that is gone (kill -9), judged on this boot in
        this pid namespace (upgrade.lock.owner_dead), is taken at once."""
        from katactl.backends.kube import RETRIES, Conflict, MaybeApplied, backoff
        from katactl.upgrade.lock import owner_dead

        me = holder_identity(name)
        mine = session()  # a Lease carrying this very session is one this call wrote
        races = failed = 0
        pause = 0.0  # before sending the create again, after a 5xx
        while races < 3:
            try:
                lease = self.api.get(self._lease_path)
            except NotFound:
                obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": LEASE, "namespace": self.ns, "labels": dict(MANAGED),
                                    "annotations": {SESSION_ANNOTATION: json.dumps(mine)}},
                       "spec": self._spec(name, 0)}
                time.sleep(pause)
                try:
                    self._lease = self.api.create(f"/apis/coordination.k8s.io/v1/namespaces/{self.ns}/leases", obj)
                except Conflict:
                    races += 1
                    continue  # created by someone else meanwhile: judge it
                except MaybeApplied as e:
                    # answered 5xx: it may have landed; read it back and judge, or send it again
                    if failed == RETRIES:
                        raise _server_failed(f"cannot take the cluster lock (Lease {self.ns}/{LEASE})", e) from None
                    pause = backoff(failed, e.retry_after)
                    failed += 1
                    continue
                self.name = name
                return
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            sess = _session_of(lease)
            if holder == me and sess == mine:
                self._lease, self.name = lease, name  # our own create landed, its answer lost
                return
            renew = parse_time(spec.get("renewTime")) or 0
            dur = spec.get("leaseDurationSeconds") or 0
            # this rollout's own process, gone (kill -9) by this boot's and pid namespace's word
            # (a bare pid says nothing from another pid namespace): nothing to wait for
            gone = holder == me and sess.get("host") == socket.gethostname() and owner_dead(sess)
            left = self.observed_left(lease)
            if holder and not gone and left > 0:
                if wait and renew + dur < time.time():
                    # expired by its renewTime and our clock (which may be ahead): watch it
                    # unrenewed for its whole duration before taking it
                    self.on_wait(f"the cluster lock (Lease {self.ns}/{LEASE}) held by {holder} looks expired: "
                                 f"taking it if it stays unrenewed for {left:.0f}s")
                    self._watch_unrenewed(lease)
                    races += 1
                    continue  # read again: unchanged for its duration, it is taken; freed or gone, too
                else:
                    self._refuse_held(name, holder, sess, spec, left)
            holder = spec.get("holderIdentity") or ""
            transitions = int(spec.get("leaseTransitions") or 0) + (1 if holder != me else 0)
            lease.setdefault("metadata", {}).setdefault("annotations", {})[SESSION_ANNOTATION] = json.dumps(session())
            lease["spec"] = self._spec(name, transitions)
            try:
                self._lease = self.api.update(self._lease_path, lease)
            except Conflict:
                raise Refused(f"lost the race for the cluster lock (Lease {self.ns}/{LEASE}): "
                              "another katactl took it at the same moment") from None
            self.name = name
            return
        raise Refused(f"the cluster lock (Lease {self.ns}/{LEASE}) keeps changing: another katactl is taking it")

    def _refuse_held(self, name: str, holder: str, sess: dict, spec: dict, left: float):
        if holder == holder_identity(name):
            where = f"pid {sess.get('pid')}" if sess.get("host") == socket.gethostname() else f"on {sess.get('host')}"
            if sess.get("host") == socket.gethostname() and sess.get("pidns") not in (None, _pidns()):
                where += " in another pid namespace"
            raise Refused(f"rollout {name} is already running ({where}); the lock is "
                          f"{self.ns}/{LEASE}, renewed {spec.get('renewTime')}",
                          hint="'katactl rollout pause|abort NAME' talks to it")
        raise Refused(f"another rollout holds the cluster lock (Lease {self.ns}/{LEASE}): {holder}, "
                      f"renewed {spec.get('renewTime')}, expires in {max(0, int(left + 0.999))}s unless renewed",
                      hint="one rollout per cluster: wait for it, or 'katactl rollout abort' it")

    def _watch_unrenewed(self, lease: dict) -> dict:
        """Read the lease until this client has seen it unchanged for its duration (returned as
        last read: a free lease, or one to take); Refused when its holder renews it meanwhile."""
        from katactl.errors import Refused

        first = self._seen
        while True:
            left = self.observed_left(lease)
            if self._seen is not first or not (lease.get("spec") or {}).get("holderIdentity"):
                if (lease.get("spec") or {}).get("holderIdentity"):
                    spec = lease["spec"]
                    raise Refused(f"another katactl holds the cluster lock (Lease {self.ns}/{LEASE}): "
                                  f"{spec.get('holderIdentity')}, renewed while we waited (its renewTime "
                                  f"{spec.get('renewTime')} is behind this machine's clock)",
                                  hint="one rollout per cluster: wait for it, or 'katactl rollout abort' it")
                return lease
            if left <= 0:
                return lease
            time.sleep(min(1.0, left))
            try:
                lease = self.api.get(self._lease_path)
            except NotFound:
                return {}  # deleted: free

    def renew(self) -> bool:
        """Renew the lease; False when it is no longer ours."""
        from katactl.backends.kube import Conflict

        with self._lock:
            if self._lease is None:
                return False
            lease = self._lease
            lease["spec"]["renewTime"] = micro_time()
            try:
                self._lease = self.api.update(self._lease_path, lease)
                return True
            except Conflict:
                cur = self.api.get(self._lease_path)
                if (cur.get("spec") or {}).get("holderIdentity") != lease["spec"]["holderIdentity"] or \
                        _session_of(cur).get("pid") != os.getpid():
                    self._lease = None
                    return False
                cur["spec"]["renewTime"] = micro_time()
                self._lease = self.api.update(self._lease_path, cur)
                return True

    def release(self) -> None:
        """Write an empty holder (client-go's release), if the lease is still ours."""
        from katactl.backends.kube import Conflict

        with self._lock:
            lease, self._lease = self._lease, None
        if lease is None:
            return
        for _ in range(3):
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["renewTime"] = micro_time()
            lease["spec"]["leaseDurationSeconds"] = 1
            try:
                self.api.update(self._lease_path, lease)
                return
            except Conflict:
                lease = self.api.get(self._lease_path)
                if _session_of(lease).get("pid") != os.getpid() or \
                        (lease.get("spec") or {}).get("holderIdentity") != holder_identity(self.name or ""):
                    return  # not ours any more: nothing to release
            except NotFound:
                return

    # state ------------------------------------------------------------------
    def _cm_path(self, name: str) -> str:
        return f"/api/v1/namespaces/{self.ns}/configmaps/{CM_PREFIX}{name}"

    def _part_path(self, cm_name: str) -> str:
        return f"/api/v1/namespaces/{self.ns}/configmaps/{cm_name}"

    def _control_of(self, cm: dict, name: str) -> dict:
        return parse_control((cm.get("data") or {}).get(CONTROL_KEY),
                             f"ConfigMap {self.ns}/{CM_PREFIX}{name}", self._warn_once)

    def _note(self, cm: dict, name: str) -> None:
        """Remember the ConfigMap's resourceVersion and control record (not its state)."""
        self._cm_rv[name] = cm["metadata"].get("resourceVersion")
        self._cm_control[name] = self._control_of(cm, name)

    def load(self, name: str) -> dict | None:
        """The state: one ConfigMap, or (sharded) the main one and then its parts, listed by
        label in one request; parts written after the main one are newer, never older
        (KubeStore.save writes them first)."""
        try:
            cm = self.api.get(self._cm_path(name))
        except NotFound:
            return None
        self._note(cm, name)
        parts = None
        if SHARDS_KEY in (cm.get("data") or {}):
            parts = self.api.list(f"/api/v1/namespaces/{self.ns}/configmaps",
                                  labelSelector=f"{NODE_LABEL}={name},{PART_LABEL}")
        try:
            st = state_of_configmaps(cm, parts)
            self._layout[name] = layout_of(cm)
        except ValueError as e:
            raise OperationFailed(f"ConfigMap {self.ns}/{CM_PREFIX}{name}: {e}") from None
        for p in parts or ():
            self._part_rv[p["metadata"]["name"]] = p["metadata"].get("resourceVersion")
            raw = (p.get("binaryData") or {}).get(NODES_KEY)
            if raw:
                self._part_sent[p["metadata"]["name"]] = base64.b64decode(raw)
        return st

    def phase(self, name: str) -> str | None:
        """The phase from the main ConfigMap alone: a sharded state's fields are there
        (``data.head``), so polling it reads no shard."""
        try:
            cm = self.api.get(self._cm_path(name))
        except NotFound:
            return None
        data = cm.get("data") or {}
        try:
            st = json.loads(data[HEAD_KEY]) if SHARDS_KEY in data else state_of_configmap(cm)
        except (ValueError, KeyError, TypeError) as e:
            raise OperationFailed(f"ConfigMap {self.ns}/{CM_PREFIX}{name}: {e}") from None
        return st.get("phase") if isinstance(st, dict) else None

    def writer(self, state: dict) -> "StateWriter":
        return StateWriter(state, self._layout.get(state["name"], 0))

    def _check_size(self, what: str, size: int) -> None:
        if size > MAX_CONFIGMAP_BYTES:  # values only, as ValidateConfigMap counts
            raise OperationFailed(
                f"rollout {what} is {size:,} bytes compressed, more than a ConfigMap holds "
                f"({MAX_CONFIGMAP_BYTES:,} bytes)",
                hint="split the fleet into several rollouts (-l SELECTOR), or use fewer steps per rollout")

    def _meta(self, name: str, cm_name: str, rv: str | None, part: str | None = None) -> dict:
        md: dict = {"name": cm_name, "namespace": self.ns, "labels": {**MANAGED, NODE_LABEL: name}, "resourceVersion": rv}
        if part is not None:
            # no ownerReference to the main one: parts are written before it exists (its uid
            # unknown); they are found by these labels (kubectl delete cm -l katactl.io/rollout=NAME)
            md["labels"][PART_LABEL] = part
        return md

    def _obj(self, name: str, blob: bytes | None, control: dict, head: str | None = None,
             w: StateWriter | None = None) -> dict:
        """The main ConfigMap: the whole state (``blob``), or a sharded state's own fields
        (``head``) and its layout (``w``'s)."""
        ctl = json.dumps(control, sort_keys=True)
        if head is None:
            assert blob is not None
            self._check_size(f"{name}: the state", len(blob) + len(ctl))
            # data "state" (the form before) is left out: a PUT replaces the object, so it goes
            return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self._meta(name, CM_PREFIX + name,
                                                                                    self._cm_rv.get(name)),
                    "data": {CONTROL_KEY: ctl}, "binaryData": {STATE_KEY: base64.b64encode(blob).decode()}}
        assert w is not None
        layout = dumps({"nodes": w.shard_nodes, "count": len(w.shard_chunks)})
        self._check_size(f"{name}: the rollout's own fields", len(head) + len(ctl) + len(layout))
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self._meta(name, CM_PREFIX + name,
                                                                                self._cm_rv.get(name)),
                "data": {CONTROL_KEY: ctl, HEAD_KEY: head, SHARDS_KEY: layout}}

    def _part_obj(self, name: str, part: str, key: str, blob: bytes) -> dict:
        cm_name = part_name(name, part)
        self._check_size(f"{name}: ConfigMap {cm_name}", len(blob))
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self._meta(name, cm_name,
                                                                                self._part_rv.get(cm_name), part),
                "binaryData": {key: base64.b64encode(blob).decode()}}

    def _refused(self, name: str, e: Exception) -> OperationFailed:
        """A 422 (UsageError) on a state write is no usage error of the user's: exit 1."""
        return OperationFailed(f"cannot save the state of rollout {name} (ConfigMap {self.ns}/{CM_PREFIX}{name}): "
                               f"{getattr(e, 'message', e)}")

    def create(self, state: dict) -> None:
        """Write a new rollout's state. Sharded (its projected size passes shard_bytes):
        the plan's and every shard's ConfigMap first, the main one last, so that a main
        ConfigMap always has its parts (a kill in between leaves parts without one: the
        next create of that name writes over them)."""
        from katactl.backends.kube import Conflict
        from katactl.errors import UsageError

        name = state["name"]
        # refused before anything runs, not when a save in the middle of the fleet is refused
        size, fig = shard_layout(state, self.shard_bytes)
        if size and fig["plan"] > MAX_CONFIGMAP_BYTES - CONTROL_ROOM:
            raise Refused(f"rollout {name}: its plan of {fig['nodes']:,} nodes is {fig['plan']:,} bytes compressed; "
                          f"a ConfigMap holds {MAX_CONFIGMAP_BYTES:,}",
                          hint="split the fleet into several rollouts (-l SELECTOR), one after the other")
        self._layout[name] = size
        w = StateWriter(state, size)
        snap = w.snapshot(state)
        exists = Refused(f"rollout {name} already exists (ConfigMap {self.ns}/{CM_PREFIX}{name})",
                         hint=f"'katactl rollout resume {name}' continues it")
        try:
            if size:
                try:
                    self.api.get(self._cm_path(name))
                    raise exists  # its parts are not to be written over
                except NotFound:
                    pass
                self._put_part(name, "plan", PLAN_KEY, w.plan_gzip(), create=True)
                for k, blob in snap.shards().items():
                    self._put_part(name, f"nodes-{k}", NODES_KEY, blob, create=True)
                    snap.sent(k)
                obj = self._obj(name, None, {}, snap.head(), w)
            else:
                obj = self._obj(name, snap.gzip(), {})
            obj["metadata"].pop("resourceVersion")
            cm = self._create_configmap(CM_PREFIX + name, obj)
        except Conflict:
            raise exists from None
        except UsageError as e:
            raise self._refused(name, e) from None
        self._cm_rv[name] = cm["metadata"]["resourceVersion"]
        self._cm_control[name] = {}

    def _put_part(self, name: str, part: str, key: str, blob: bytes, *, create: bool = False,
                  taken=None) -> bool:
        """Write one part of a sharded state (created as needed: by create(), or again if
        someone deleted it); False when it already holds ``blob``. Nobody else writes parts
        while we hold the lock: a 409 is a stale resourceVersion (one left by an interrupted
        create, or a write of ours whose answer was lost); once ``taken()`` (see save) it is
        StaleState."""
        from katactl.backends.kube import Conflict

        cm_name = part_name(name, part)
        if self._part_sent.get(cm_name) == blob:
            return False
        obj = self._part_obj(name, part, key, blob)
        for _ in range(5):
            try:
                if create or not obj["metadata"].get("resourceVersion"):
                    obj["metadata"].pop("resourceVersion", None)
                    cm = self._create_configmap(cm_name, obj)
                else:
                    cm = self.api.update(self._part_path(cm_name), obj)
                break
            except Conflict:
                if taken is not None and taken():
                    raise StaleState(f"ConfigMap {self.ns}/{cm_name} was written by another katactl since "
                                     "the lease may have expired: not overwriting it") from None
                create = False
                obj["metadata"]["resourceVersion"] = self.api.get(self._part_path(cm_name))["metadata"].get(
                    "resourceVersion")
            except NotFound:
                create = True
        else:
            raise OperationFailed(f"ConfigMap {self.ns}/{cm_name} keeps changing: cannot save the state")
        self._part_rv[cm_name] = cm["metadata"]["resourceVersion"]
        self._part_sent[cm_name] = blob
        return True

    def _create_configmap(self, cm_name: str, obj: dict) -> dict:
        """POST a state ConfigMap. A 5xx answer (MaybeApplied) may hide a create that
        landed, or lands later (kube-apiserver's timeout filter answers 504 while the handler
        goes on): read back; one holding exactly what we sent is ours, another's is Conflict;
        absent, send again after a backoff (Retry-After honoured), at most RETRIES times, then
        OperationFailed with the server's message. A 409 to a create sent again after a 5xx
        is judged the same way (our first one may have landed between)."""
        from katactl.backends.kube import RETRIES, Conflict, MaybeApplied, backoff

        def ours() -> dict | None:
            try:
                cm = self.api.get(self._part_path(cm_name))
            except NotFound:
                return None
            if cm.get("binaryData") != obj.get("binaryData") or cm.get("data") != obj.get("data"):
                raise Conflict(f"ConfigMap {cm_name} exists")
            return cm

        failed = 0
        while True:
            try:
                return self.api.create(f"/api/v1/namespaces/{self.ns}/configmaps", obj)
            except Conflict:
                if not failed:
                    raise
                cm = ours()
                if cm is not None:
                    return cm
                if failed > RETRIES:  # one that keeps coming and going is not ours
                    raise
                failed += 1  # deleted since: nobody's, send it again
                continue
            except MaybeApplied as e:
                err = e
            cm = ours()
            if cm is not None:
                return cm
            if failed == RETRIES:
                raise _server_failed(f"cannot create the state (ConfigMap {self.ns}/{cm_name})", err) from None
            time.sleep(backoff(failed, err.retry_after))
            failed += 1

    def save(self, name: str, snap: "Snapshot", written=None, taken=None) -> None:
        """PUT with the last resourceVersion (one request); on 409 (a pause/abort wrote
        the control key) re-read, keep its control, and write again. Sharded: first the
        shards whose records changed (``written()`` after each), then the main ConfigMap:
        it never says more than its shards hold, and a kill between two shard writes leaves
        each node record whole (a record is in one shard).

        ``taken()`` True: another katactl may hold the lock by now (ours was lost and its
        lease may have expired), so a 409 may be its state, not a control write: StaleState,
        nothing re-read or overwritten (a sharded state's main is read first, and a part's
        409 is the same refusal)."""
        from katactl.backends.kube import Conflict
        from katactl.errors import UsageError

        def stale(what: str) -> StaleState:
            return StaleState(f"ConfigMap {self.ns}/{what} was written by another katactl since the lease "
                              "may have expired: not overwriting it")

        head: str | None = None
        blob: bytes | None = None
        try:
            if snap.w.shard_nodes:
                if taken is not None and taken() and self.api.get(self._cm_path(name))["metadata"].get(
                        "resourceVersion") != self._cm_rv.get(name):
                    raise stale(CM_PREFIX + name)
                for k, blob in snap.shards().items():
                    wrote = self._put_part(name, f"nodes-{k}", NODES_KEY, blob, taken=taken)
                    snap.sent(k)
                    if wrote and written is not None:
                        written()
                head = snap.head()
            else:
                blob = snap.gzip()
            for _ in range(5):
                try:
                    cm = self.api.update(self._cm_path(name),
                                         self._obj(name, blob, self._cm_control.get(name, {}), head, snap.w))
                    self._cm_rv[name] = cm["metadata"]["resourceVersion"]
                    return
                except Conflict:
                    if taken is not None and taken():
                        raise stale(CM_PREFIX + name) from None
                    # our state is what counts: only the control and resourceVersion are needed
                    self._note(self.api.get(self._cm_path(name)), name)
        except UsageError as e:
            raise self._refused(name, e) from None
        raise OperationFailed(f"ConfigMap {self.ns}/{CM_PREFIX}{name} keeps changing: cannot save the state")

    def control(self, name: str) -> dict:
        """The control record (pause/abort requests): re-read from the API."""
        try:
            cm = self.api.get(self._cm_path(name))
        except NotFound:
            return {}
        # keep our resourceVersion: a newer one would let a save overwrite a control we never read
        ctl = self._control_of(cm, name)
        if cm["metadata"].get("resourceVersion") != self._cm_rv.get(name):
            self._cm_control[name] = ctl
            self._cm_rv[name] = cm["metadata"].get("resourceVersion")
            # our own state is what counts: the next save writes it with the new control
        return ctl

    def known_control(self, name: str) -> dict:
        return dict(self._cm_control.get(name) or {})

    def set_control(self, name: str, control: dict) -> None:
        def mutate(cm: dict) -> bool:
            data = cm.setdefault("data", {})
            raw = data.get(CONTROL_KEY)
            cur = self._control_of(cm, name)  # one not a JSON object is replaced
            new = {**cur, **control}
            new = {k: v for k, v in new.items() if v is not None}
            if new == cur and (cur or not raw or raw.strip() == "{}"):  # (a malformed one is replaced)
                return False
            data[CONTROL_KEY] = json.dumps(new, sort_keys=True)
            return True
        try:
            self.api.modify(self._cm_path(name), mutate)
        except NotFound:
            raise NotFound(f"no rollout named {name!r} (ConfigMap {self.ns}/{CM_PREFIX}{name})") from None

    def list(self) -> list[dict]:
        """Every rollout's state, from one list of the ConfigMaps (main ones and parts)."""
        mains, parts = {}, collections.defaultdict(list)
        for cm in self.api.list(f"/api/v1/namespaces/{self.ns}/configmaps",
                                labelSelector="app.kubernetes.io/managed-by=katactl," + NODE_LABEL):
            labels = cm["metadata"].get("labels") or {}
            name = labels.get(NODE_LABEL)
            if not name:
                continue
            if PART_LABEL in labels:
                parts[name].append(cm)
            elif cm["metadata"].get("name") == CM_PREFIX + name:
                mains[name] = cm
        out = []
        for name, cm in mains.items():
            try:
                st = state_of_configmaps(cm, parts.get(name, []))
            except ValueError as e:
                self.on_warning(f"ConfigMap {self.ns}/{CM_PREFIX}{name}: {e}: left out")
                st = None
            if isinstance(st, dict):
                out.append(st)
        return out

    def mark_node(self, node: str, name: str, info: dict) -> None:
        from katactl.backends.kube import seg

        phase = info.get("phase", "")
        patch = {"metadata": {"labels": {NODE_LABEL: name, PHASE_LABEL: phase},
                              "annotations": {NODE_ANNOTATION: json.dumps({"name": name, **info}, sort_keys=True)}}}
        self.api.patch(f"/api/v1/nodes/{seg(node)}", patch)

    def close(self) -> None:
        pass


def dumps(obj) -> str:
    """The state files' and ConfigMaps' JSON (compact, sorted keys)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


CONTROL_KEY = "control"


#: the most JSON a stored state may inflate to: ~40x what the largest state that fits a
#: ConfigMap decompresses to; anyone who may write the ConfigMap must not make every
#: 'rollout status' inflate a gzip bomb (1 MiB of gzip can hold ~1 GiB)
MAX_STATE_JSON = 256 << 20


def _gunzip_capped(data: bytes, cap: int) -> bytes:
    """gzip.decompress of a series of members, refusing more than ``cap`` bytes out."""
    out: list[bytes] = []
    size = 0
    while data:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        chunk = d.decompress(data, cap - size + 1)
        size += len(chunk)
        if size > cap or d.unconsumed_tail:
            raise ValueError(f"inflates to more than {cap >> 20} MiB")
        if not d.eof:
            raise EOFError("compressed data ended before the end-of-stream marker")
        out.append(chunk)
        data = d.unused_data
    return b"".join(out)


NODE_PHASES = ("pending", "running", "soaking", "done", "failed", "aborted")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_state(st: dict) -> dict:
    """``st`` (a loaded state, a JSON object) has the shape every command relies on, else
    ValueError saying what is wrong (a hand-edited state): the fields the engine and the
    summary index, a plan whose nodes are the node records' and whose batches hold each of
    them once, each record's phase, step, batch and attempts."""
    for k in ("name", "phase"):
        if not isinstance(st.get(k), str):
            raise ValueError(f"the state's {k!r} is not a string")
    if not _int(st.get("batch", 0)):
        raise ValueError("the state's 'batch' is not a whole number")
    plan, nodes = st.get("plan"), st.get("nodes")
    if not isinstance(plan, dict) or not isinstance(plan.get("name"), str) \
            or not isinstance(plan.get("nodes"), dict) or not isinstance(plan.get("batches"), list) \
            or not isinstance(plan.get("steps"), list) or not isinstance(plan.get("policy"), dict):
        raise ValueError("the state's 'plan' is not a rollout plan (name, nodes, batches, steps, policy)")
    if not all(isinstance(v, dict) for v in plan["nodes"].values()):
        raise ValueError("the state's 'plan.nodes' are not a mapping of node names to their facts")
    if not all(isinstance(s, str) for s in plan["steps"]):
        raise ValueError("the state's 'plan.steps' are not step texts (strings)")
    # the engine runs the batches' names and indexes the records by them: a name of no record
    # crashed it, a node in no batch was never done yet the rollout Succeeded (review 13)
    batched: list = []
    for b in plan["batches"]:
        if not isinstance(b, list) or not all(isinstance(n, str) for n in b):
            raise ValueError("the state's 'plan.batches' are not lists of node names")
        batched += b
    if len(batched) != len(plan["nodes"]) or set(batched) != set(plan["nodes"]):
        raise ValueError("the state's 'plan.batches' do not hold each node of its plan exactly once")
    if not isinstance(nodes, dict) or set(nodes) != set(plan["nodes"]):
        raise ValueError("the state's 'nodes' are not a record for each node of its plan")
    for n, rec in nodes.items():
        if not isinstance(rec, dict) or rec.get("phase") not in NODE_PHASES:
            raise ValueError(f"node {n}'s record has no valid 'phase' (one of {', '.join(NODE_PHASES)})")
        for k in ("step", "batch", "attempts"):
            if not _int(rec.get(k)):
                raise ValueError(f"node {n}'s record: {k!r} is not a whole number")
        if not isinstance(rec.get("results", []), list):
            raise ValueError(f"node {n}'s record: 'results' is not a list")
    return st


def parse_control(raw: str | None, where: str, warn: Callable[[str], None]) -> dict:
    """A rollout's control record (pause/abort requests); one that is not a JSON object
    (hand-edited) counts as none, with a warning: the next pause/abort replaces it, and
    abort, the operator's way out, never depends on its syntax."""
    if not raw:
        return {}
    try:
        ctl = json.loads(raw)
    except ValueError:
        ctl = None
    if not isinstance(ctl, dict):
        warn(f"{where}: the rollout's control record is not a JSON object ({raw[:60]!r}): ignored "
             "(the next 'rollout pause|abort' replaces it)")
        return {}
    return ctl


def state_of_configmap(cm: dict) -> dict | None:
    """The state a rollout ConfigMap holds: binaryData ``state.json.gz``, or data
    ``state`` (plain JSON) as katactl wrote it before. ValueError when it is corrupt."""
    raw = (cm.get("binaryData") or {}).get(STATE_KEY)
    text: str | bytes | None
    if raw:
        try:
            text = _gunzip_capped(base64.b64decode(raw, validate=True), MAX_STATE_JSON)
        except (ValueError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"binaryData {STATE_KEY!r} is not base64 gzip: {e}") from None
    else:
        text = (cm.get("data") or {}).get(LEGACY_STATE_KEY)
        if not text:
            return None
    try:
        st = json.loads(text)
    except ValueError:
        raise ValueError(f"the state ({STATE_KEY if raw else LEGACY_STATE_KEY}) is not JSON") from None
    if not isinstance(st, dict):
        raise ValueError("the state is not a JSON object")
    return check_state(st)


def part_name(name: str, part: str) -> str:
    """A sharded state's ConfigMap ``part`` ("plan", "nodes-K"): the dot keeps it apart
    from every rollout's own name (rollout names have none; ConfigMap names are DNS
    subdomains, ValidateConfigMapName)."""
    return f"{CM_PREFIX}{name}.{part}"


def shard_bytes_setting(environ=None) -> int:
    """SHARD_BYTES, or KATACTL_ROLLOUT_SHARD_BYTES (bytes: smaller shards, cheaper saves,
    more ConfigMaps; tests use a small one to shard a small fleet)."""
    from katactl.errors import UsageError

    raw = (os.environ if environ is None else environ).get(SHARD_BYTES_ENV)
    if not raw:
        return SHARD_BYTES
    top = MAX_CONFIGMAP_BYTES - CONTROL_ROOM
    if not raw.isdigit() or not 0 < int(raw) <= top:
        raise UsageError(f"invalid {SHARD_BYTES_ENV}={raw!r}: bytes, from 1 to {top}")
    return int(raw)


def layout_of(cm: dict) -> int:
    """Node records per shard of the state a main ConfigMap describes (0: not sharded)."""
    raw = (cm.get("data") or {}).get(SHARDS_KEY)
    if raw is None:
        return 0
    try:
        d = json.loads(raw)
        per = d["nodes"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"data {SHARDS_KEY!r} is not the layout JSON") from None
    if not _int(per) or not per:
        raise ValueError(f"data {SHARDS_KEY!r}: 'nodes' is not a positive whole number")
    return per


def _gunzip_json(cm: dict | None, key: str, what: str, cap: int) -> tuple[object, int]:
    if cm is None:
        raise ValueError(f"ConfigMap {what} is missing: the state is incomplete")
    raw = (cm.get("binaryData") or {}).get(key)
    try:
        text = _gunzip_capped(base64.b64decode(raw or "", validate=True), cap)
        return json.loads(text), len(text)
    except (ValueError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"ConfigMap {cm['metadata'].get('name')}: binaryData {key!r} is not base64 gzip "
                         f"JSON: {e}") from None


def state_of_configmaps(cm: dict, parts: list[dict] | None) -> dict | None:
    """The state of a main ConfigMap and its parts (see KubeStore): the plan's, and one per
    shard of node records. ValueError when one is missing or corrupt, or when the shards do
    not hold exactly the plan's nodes. A ConfigMap that is not sharded: state_of_configmap."""
    data = cm.get("data") or {}
    if SHARDS_KEY not in data:
        return state_of_configmap(cm)
    name = ((cm.get("metadata") or {}).get("labels") or {}).get(NODE_LABEL) or \
        cm["metadata"]["name"][len(CM_PREFIX):]
    try:
        layout = json.loads(data[SHARDS_KEY])
        count = int(layout["count"])
        head = json.loads(data.get(HEAD_KEY) or "")
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"data {SHARDS_KEY!r}/{HEAD_KEY!r} is not the layout and fields JSON") from None
    if not isinstance(head, dict):
        raise ValueError(f"data {HEAD_KEY!r} is not a JSON object")
    by = {((p.get("metadata") or {}).get("labels") or {}).get(PART_LABEL): p for p in parts or ()}
    left = MAX_STATE_JSON
    plan, size = _gunzip_json(by.get("plan"), PLAN_KEY, part_name(name, "plan"), left)
    left -= size
    nodes: dict = {}
    for k in range(count):
        d, size = _gunzip_json(by.get(f"nodes-{k}"), NODES_KEY, part_name(name, f"nodes-{k}"), left)
        left -= size
        if not isinstance(d, dict) or not isinstance(d.get("nodes"), dict):
            raise ValueError(f"ConfigMap {part_name(name, f'nodes-{k}')}: no node records")
        nodes.update(d["nodes"])
    if not isinstance(plan, dict) or set(nodes) != set(plan.get("nodes") or ()):
        raise ValueError(f"its {count} shard(s) do not hold the plan's nodes: the state is incomplete")
    return check_state({**head, "plan": plan, "nodes": nodes})


#: room kept in the ConfigMap for the control record and a state's growth beyond the projection
CONTROL_ROOM = 16 * 1024


def _projected_end(state: dict) -> dict:
    """``state`` once every node has run every step once (retried steps add results, up to
    20 a node: a save that no longer fits is still refused, exit 1): each node done, times
    to the second, durations to the millisecond, a message with a count, as the engine
    records them (engine.Engine._steps), with more varied durations and messages than real
    steps give (docs/rollout.md, "State in ConfigMaps")."""
    import random

    rnd = random.Random(0)
    plan = state.get("plan") or {}
    steps = plan.get("steps") or []
    t0 = time.time()
    nodes = {}
    for i, (n, rec) in enumerate(state["nodes"].items()):
        at = time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(t0 + i * 0.5 + rnd.random() * 30))
        nodes[n] = {**rec, "phase": "done", "step": len(steps), "attempts": 1, "wasUnschedulable": False,
                    "startedAt": at, "finishedAt": at, "error": None,
                    "results": [{"step": k + 1, "text": text, "ok": True, "seconds": round(rnd.uniform(0.1, 900), 3),
                                 "at": at, "changed": True,
                                 "message": f"{text.split()[0]}: {rnd.randint(0, 999)} item(s) ok"}
                                for k, text in enumerate(steps)]}
    return {**state, "nodes": nodes}


def projected_size(state: dict) -> int:
    """The compressed size of ``state`` in one ConfigMap once every node has run every step."""
    end = _projected_end(state)
    return len(StateWriter(end).snapshot(end).gzip())


def shard_layout(state: dict, shard_bytes: int = SHARD_BYTES) -> tuple[int, dict]:
    """(node records per shard, the projection's figures) for ``state``: 0 (one ConfigMap,
    as before shards) when its projected size is at most ``shard_bytes``; else as many
    records as ``shard_bytes`` holds at the projected bytes a record, a multiple of CHUNK
    (so a shard's chunks are the unsharded state's: its projected size is their sum)."""
    end = _projected_end(state)
    w = StateWriter(end)
    total = len(w.snapshot(end).gzip())
    n = len(end["nodes"])
    per = sum(len(g or b"") for g in w._gz) / max(1, n)
    figures = {"total": total, "perNode": per, "plan": len(_gz(w._plan_json)), "nodes": n}
    if total <= shard_bytes:
        return 0, figures
    size = max(1, int(shard_bytes / per))
    if size >= CHUNK:
        size -= size % CHUNK
    return size, figures


def _gz(text: str) -> bytes:
    """One gzip member (header with mtime 0: the same state gives the same bytes)."""
    c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return c.compress(text.encode()) + c.flush()


class StateWriter:
    """Encodes one rollout's state for its saves, incrementally.

    The JSON is ``{"plan":PLAN,<the other fields, sorted>,"nodes":{<records>}}`` with the
    node records in batch order, in chunks of CHUNK. ``snapshot(state, dirty)`` (under the
    caller's state lock) encodes again only the records named in ``dirty`` and the small
    top-level fields; the Snapshot's ``gzip()`` (outside that lock, one save at a time)
    compresses again only the chunks those records are in and concatenates the cached
    members of the others. A run never changes its plan: it is encoded once.

    ``shard_nodes`` > 0: the records in batch order are cut into shards of that many (a
    chunk never spans two), each its own gzip stream ``{"nodes":{...}}`` (Snapshot.shards:
    only the shards of changed chunks), the plan its own (plan_gzip), and the other fields
    plain JSON (Snapshot.head)."""

    def __init__(self, state: dict, shard_nodes: int = 0):
        order = [n for b in (state.get("plan") or {}).get("batches") or [] for n in b]
        seen = set(order)
        order += sorted(n for n in state["nodes"] if n not in seen)  # (a plan always has them all)
        order = [n for n in order if n in state["nodes"]]
        self._keys = {n: json.dumps(n) + ":" for n in order}
        self.shard_nodes = shard_nodes
        groups = [order[i:i + shard_nodes] for i in range(0, len(order), shard_nodes)] if shard_nodes else [order]
        self._chunks: list[list[str]] = []
        self.shard_chunks: list[list[int]] = []  # shard -> its chunks
        for g in groups:
            first = len(self._chunks)
            self._chunks += [g[i:i + CHUNK] for i in range(0, len(g), CHUNK)]
            self.shard_chunks.append(list(range(first, len(self._chunks))))
        self._first = {c[0] for c in self.shard_chunks if c}  # chunks that open their stream
        self._shard_of = {i: k for k, c in enumerate(self.shard_chunks) for i in c}
        self._chunk_of = {n: i for i, c in enumerate(self._chunks) for n in c}
        self._frag: dict[str, str] = {}
        self._text: list[str] = [""] * len(self._chunks)
        self._gz: list[bytes | None] = [None] * len(self._chunks)
        self._stale: set[int] = set(range(len(self._chunks)))  # chunks whose _gz is out of date
        self._unsent: set[int] = set()  # shards changed and not yet written (a failed save's)
        self._plan_json = dumps(state.get("plan"))
        self._plan = '{"plan":' + self._plan_json + ","
        self._plan_gz: bytes | None = None
        self._all = set(order)

    def snapshot(self, state: dict, dirty=None) -> "Snapshot":
        """``dirty``: the node records changed since the last snapshot (None: all); it is
        emptied."""
        nodes = state["nodes"]
        changed = set(self._all) if dirty is None else set(dirty)
        chunks = set()
        for n in changed:
            self._frag[n] = dumps(nodes[n])
            chunks.add(self._chunk_of[n])
        for i in chunks:
            self._text[i] = ("" if i in self._first else ",") + \
                ",".join(self._keys[n] + self._frag[n] for n in self._chunks[i])
        self._stale |= chunks
        if dirty is not None:
            dirty.clear()
        fields = ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in sorted(state.items()) if k not in ("nodes", "plan"))
        return Snapshot(self, fields, {i: self._text[i] for i in chunks})

    def plan_gzip(self) -> bytes:
        """The plan's ConfigMap of a sharded state: the plan alone."""
        return _gz(self._plan_json)


#: what opens and closes a node shard's stream
_NODES_OPEN, _CLOSE = '{"nodes":{', "}}"


class Snapshot:
    """A state as of one snapshot(): ``gzip()`` for one ConfigMap, ``text()`` for a file,
    ``head()`` and ``shards()`` for a sharded one."""

    def __init__(self, writer: StateWriter, fields: str, chunks: dict[int, str]):
        self.w, self.fields, self.chunks = writer, fields, chunks
        self.head_text = fields + ("," if fields else "") + '"nodes":{'

    def _compress(self) -> set[int]:
        """Compress the chunks this snapshot changed and the ones left stale; their indexes."""
        w = self.w
        done = set(self.chunks)
        for i, text in self.chunks.items():
            w._gz[i] = _gz(text)
            w._stale.discard(i)
        for i in list(w._stale):  # chunks of an earlier snapshot that was only written as text
            w._gz[i] = _gz(w._text[i])
            w._stale.discard(i)
            done.add(i)
        return done

    def gzip(self) -> bytes:
        w = self.w
        if w._plan_gz is None:
            w._plan_gz = _gz(w._plan)
        self._compress()
        return b"".join([w._plan_gz, _gz(self.head_text), *(g or b"" for g in w._gz), _gz(_CLOSE)])

    def text(self) -> str:
        w = self.w
        return "".join([w._plan, self.head_text, *w._text, _CLOSE])

    def head(self) -> str:
        """The rollout's own fields, JSON (a sharded state's main ConfigMap)."""
        return "{" + self.fields + "}"

    def shards(self) -> dict[int, bytes]:
        """shard -> its gzip stream, for the shards whose records changed and were not
        written since (``sent``): a save that failed half-way leaves its other shards to
        the next one."""
        w = self.w
        w._unsent |= {w._shard_of[i] for i in self._compress()}
        return {k: b"".join([_gz(_NODES_OPEN), *(w._gz[i] or b"" for i in w.shard_chunks[k]), _gz(_CLOSE)])
                for k in sorted(w._unsent)}

    def sent(self, shard: int) -> None:
        self.w._unsent.discard(shard)


def _session_of(lease: dict) -> dict:
    raw = ((lease.get("metadata") or {}).get("annotations") or {}).get(SESSION_ANNOTATION)
    try:
        s = json.loads(raw) if raw else {}
    except ValueError:
        s = {}
    return s if isinstance(s, dict) else {}


# -- local files (SSH-only fleets) ---------------------------------------------------------

class FileStore(Store):
    kind = "file"

    def __init__(self, directory: str | None = None):
        from katactl.config import state_dir

        self.dir = directory or os.path.join(state_dir(), "rollouts")
        self._fd: int | None = None
        self.name: str | None = None

    @property
    def lock_path(self) -> str:
        return os.path.join(self.dir, "rollout.lock")

    def _path(self, name: str, suffix: str = ".json") -> str:
        return os.path.join(self.dir, name + suffix)

    def _mkdir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def lock_holder(self) -> dict | None:
        import fcntl

        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.read(fd, 4096)
                try:
                    return {**json.loads(raw), "lockFile": self.lock_path}
                except ValueError:
                    return {"holder": "unknown", "lockFile": self.lock_path}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self, name: str, wait: bool = True) -> None:
        import fcntl

        self._mkdir()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raw = os.read(fd, 4096)
                who = json.loads(raw).get("holder", "?") if raw else "?"
            except ValueError:
                who = "?"
            os.close(fd)
            raise Refused(f"another rollout holds the lock {self.lock_path}: {who}",
                          hint="one rollout at a time: wait for it, or 'katactl rollout abort' it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder_identity(name), **session()}).encode(), 0)
        os.fsync(fd)
        self._fd, self.name = fd, name

    def renew(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def load(self, name: str) -> dict | None:
        try:
            with open(self._path(name), "rb") as f:
                st = json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            raise OperationFailed(f"{self._path(name)}: corrupt JSON") from None
        try:
            if not isinstance(st, dict):
                raise ValueError("the state is not a JSON object")
            return check_state(st)
        except ValueError as e:
            raise OperationFailed(f"{self._path(name)}: {e}") from None

    def _write(self, path: str, text: str) -> None:
        from katactl.backends.local import atomic_write

        self._mkdir()
        atomic_write(path, text.encode(), mode=0o600)

    def create(self, state: dict) -> None:
        if os.path.exists(self._path(state["name"])):
            raise Refused(f"rollout {state['name']} already exists ({self._path(state['name'])})",
                          hint=f"'katactl rollout resume {state['name']}' continues it")
        try:
            os.unlink(self._path(state["name"], ".control.json"))
        except FileNotFoundError:
            pass
        self._write(self._path(state["name"]), dumps(state))

    def save(self, name: str, snap: "Snapshot", written=None, taken=None) -> None:
        # a file's lock (flock) cannot be lost while the process lives: ``taken`` is moot;
        # plain JSON, unsharded: a file has no size limit, and stays readable with jq
        self._write(self._path(name), snap.text())

    def control(self, name: str) -> dict:
        try:
            with open(self._path(name, ".control.json"), "rb") as f:
                raw = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return {}
        return parse_control(raw, self._path(name, ".control.json"), self._warn_once)

    known_control = control

    def set_control(self, name: str, control: dict) -> None:
        import fcntl

        if not os.path.exists(self._path(name)):
            raise NotFound(f"no rollout named {name!r} ({self._path(name)})")
        # read-merge-write under a lock of its own (not rollout.lock: the running rollout holds
        # that): a pause and an abort at once each kept only its own key, one request lost
        self._mkdir()
        fd = os.open(os.path.join(self.dir, "control.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            new = {k: v for k, v in {**self.control(name), **control}.items() if v is not None}
            self._write(self._path(name, ".control.json"), dumps(new))
        finally:
            os.close(fd)  # (releases the flock)

    def list(self) -> list[dict]:
        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        for f in names:
            if f.endswith(".json") and not f.endswith(".control.json"):
                try:
                    st = self.load(f[:-5])
                except OperationFailed as e:
                    self.on_warning(f"{e.message}: left out")
                    continue
                if isinstance(st, dict):
                    out.append(st)
        return out

    def mark_node(self, node: str, name: str, info: dict) -> None:
        pass

    def close(self) -> None:
        self.release()
