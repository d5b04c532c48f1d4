"""Where a rollout's lock and state live: one interface, two backends.

KubeStore (clusters): the lock is a coordination.k8s.io/v1 Lease
``katactl-rollout`` in the lock namespace (one rollout per cluster), holder
``user@host/NAME``, renewed while running, taken over only once expired (judged
from its renewTime against this machine's clock) or when its holder is this
same user@host/NAME whose process is gone (kill -9, then resume here); a 409
means another katactl won the race. The state is a ConfigMap
``katactl-rollout-NAME`` next to the Lease (data: ``state``, ``control``), so
``rollout resume`` works from another machine; node progress is also written
on the nodes (label ``katactl.io/rollout-phase``, annotation
``katactl.io/rollout``) for ``kubectl get nodes -L katactl.io/rollout-phase``.

FileStore (SSH-only fleets): ``$XDG_STATE_HOME/katactl/rollouts/NAME.json``
(atomic rename), ``NAME.control.json``, and ``rollout.lock`` held with flock
(released by the kernel if katactl dies) holding the holder's identity.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time

from katactl.errors import NotFound, OperationFailed, Refused

LEASE = "katactl-rollout"
CM_PREFIX = "katactl-rollout-"
NODE_LABEL = "katactl.io/rollout"
PHASE_LABEL = "katactl.io/rollout-phase"
NODE_ANNOTATION = "katactl.io/rollout"
SESSION_ANNOTATION = "katactl.io/rollout-session"
MANAGED = {"app.kubernetes.io/managed-by": "katactl"}


def holder_identity(name: str) -> str:
    from katactl.audit import current_user

    return f"{current_user()}@{socket.gethostname()}/{name}"


def held_by(holder: dict | None, name: str) -> bool:
    """Whether ``holder`` (a lock_holder() answer) is rollout ``name``'s (see holder_identity)."""
    return bool(holder) and str((holder or {}).get("holder", "")).endswith("/" + name)


def session() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


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

    def acquire(self, name: str) -> None: ...
    def renew(self) -> bool: raise NotImplementedError
    def release(self) -> None: ...
    def lock_holder(self) -> dict | None: ...
    def load(self, name: str) -> dict | None: ...
    def create(self, state: dict) -> None: ...
    def save(self, name: str, text: str) -> None: ...  # text: the state, JSON-encoded
    def control(self, name: str) -> dict: raise NotImplementedError
    def set_control(self, name: str, control: dict) -> None: ...
    def list(self) -> list[dict]: raise NotImplementedError
    def mark_node(self, node: str, name: str, info: dict) -> None: ...
    def close(self) -> None: ...


# -- Kubernetes ----------------------------------------------------------------------

class KubeStore(Store):
    kind = "kube"

    def __init__(self, api, namespace: str = "kube-system", ttl: float = 60.0):
        from katactl.backends.kube import seg

        self.api = api
        self.ns = seg(namespace)
        self.ttl = ttl
        self._lease: dict | None = None
        self._cm_rv: dict[str, str] = {}
        self._cm_control: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.name: str | None = None

    # lock -------------------------------------------------------------
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

    def acquire(self, name: str) -> None:
        from katactl.backends.kube import Conflict

        me = holder_identity(name)
        for _ in range(3):
            try:
                lease = self.api.get(self._lease_path)
            except NotFound:
                obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": LEASE, "namespace": self.ns, "labels": dict(MANAGED),
                                    "annotations": {SESSION_ANNOTATION: json.dumps(session())}},
                       "spec": self._spec(name, 0)}
                try:
                    self._lease = self.api.create(f"/apis/coordination.k8s.io/v1/namespaces/{self.ns}/leases", obj)
                except Conflict:
                    continue  # created by someone else meanwhile: judge it
                self.name = name
                return
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            sess = _session_of(lease)
            renew = parse_time(spec.get("renewTime")) or 0
            dur = spec.get("leaseDurationSeconds") or 0
            expired = renew + dur < time.time()
            if holder and not expired:
                if holder != me:
                    raise Refused(f"another rollout holds the cluster lock (Lease {self.ns}/{LEASE}): {holder}, "
                                  f"renewed {spec.get('renewTime')}, expires in {int(renew + dur - time.time())}s",
                                  hint="one rollout per cluster: wait for it, or 'katactl rollout abort' it")
                if sess.get("host") != socket.gethostname() or _pid_alive(sess.get("pid")):
                    where = f"pid {sess.get('pid')}" if sess.get("host") == socket.gethostname() \
                        else f"on {sess.get('host')}"
                    raise Refused(f"rollout {name} is already running ({where}); the lock is "
                                  f"{self.ns}/{LEASE}, renewed {spec.get('renewTime')}",
                                  hint="'katactl rollout pause|abort NAME' talks to it")
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

    def _decode(self, cm: dict, name: str) -> dict | None:
        data = cm.get("data") or {}
        self._cm_rv[name] = cm["metadata"].get("resourceVersion")
        try:
            self._cm_control[name] = json.loads(data.get("control") or "{}")
            return json.loads(data["state"]) if data.get("state") else None
        except ValueError:
            raise OperationFailed(f"ConfigMap {self.ns}/{CM_PREFIX}{name}: 'state' is not JSON") from None

    def load(self, name: str) -> dict | None:
        try:
            cm = self.api.get(self._cm_path(name))
        except NotFound:
            return None
        return self._decode(cm, name)

    def _obj(self, name: str, text: str, control: dict) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": CM_PREFIX + name, "namespace": self.ns,
                             "labels": {**MANAGED, NODE_LABEL: name},
                             "resourceVersion": self._cm_rv.get(name)},
                "data": {"state": text, "control": json.dumps(control, sort_keys=True)}}

    def create(self, state: dict) -> None:
        from katactl.backends.kube import Conflict

        obj = self._obj(state["name"], dumps(state), {})
        obj["metadata"].pop("resourceVersion")
        try:
            cm = self.api.create(f"/api/v1/namespaces/{self.ns}/configmaps", obj)
        except Conflict:
            raise Refused(f"rollout {state['name']} already exists (ConfigMap {self.ns}/{CM_PREFIX}{state['name']})",
                          hint=f"'katactl rollout resume {state['name']}' continues it") from None
        self._cm_rv[state["name"]] = cm["metadata"]["resourceVersion"]
        self._cm_control[state["name"]] = {}

    def save(self, name: str, text: str) -> None:
        """PUT with the last resourceVersion (one request); on 409 (a pause/abort wrote
        the control key) re-read, keep its control, and write again."""
        from katactl.backends.kube import Conflict

        for _ in range(5):
            try:
                cm = self.api.update(self._cm_path(name), self._obj(name, text, self._cm_control.get(name, {})))
                self._cm_rv[name] = cm["metadata"]["resourceVersion"]
                return
            except Conflict:
                cur = self.api.get(self._cm_path(name))
                self._decode(cur, name)
        raise OperationFailed(f"ConfigMap {self.ns}/{CM_PREFIX}{name} keeps changing: cannot save the state")

    def control(self, name: str) -> dict:
        """The control record (pause/abort requests): re-read from the API."""
        try:
            cm = self.api.get(self._cm_path(name))
        except NotFound:
            return {}
        # keep our resourceVersion: a newer one would let a save overwrite a control we never read
        data = cm.get("data") or {}
        try:
            ctl = json.loads(data.get("control") or "{}")
        except ValueError:
            ctl = {}
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
            cur = json.loads(data.get("control") or "{}")
            new = {**cur, **control}
            new = {k: v for k, v in new.items() if v is not None}
            if new == cur:
                return False
            data["control"] = json.dumps(new, sort_keys=True)
            return True
        try:
            self.api.modify(self._cm_path(name), mutate)
        except NotFound:
            raise NotFound(f"no rollout named {name!r} (ConfigMap {self.ns}/{CM_PREFIX}{name})") from None

    def list(self) -> list[dict]:
        out = []
        for cm in self.api.list(f"/api/v1/namespaces/{self.ns}/configmaps",
                                labelSelector="app.kubernetes.io/managed-by=katactl," + NODE_LABEL):
            name = (cm["metadata"].get("labels") or {}).get(NODE_LABEL)
            try:
                st = json.loads((cm.get("data") or {}).get("state") or "null")
            except ValueError:
                st = None
            if name and isinstance(st, dict):
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

    def acquire(self, name: str) -> None:
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
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            raise OperationFailed(f"{self._path(name)}: corrupt JSON") from None

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

    def save(self, name: str, text: str) -> None:
        self._write(self._path(name), text)

    def control(self, name: str) -> dict:
        try:
            with open(self._path(name, ".control.json"), "rb") as f:
                d = json.loads(f.read())
            return d if isinstance(d, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    known_control = control

    def set_control(self, name: str, control: dict) -> None:
        if not os.path.exists(self._path(name)):
            raise NotFound(f"no rollout named {name!r} ({self._path(name)})")
        new = {k: v for k, v in {**self.control(name), **control}.items() if v is not None}
        self._write(self._path(name, ".control.json"), dumps(new))

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
                except OperationFailed:
                    continue
                if isinstance(st, dict):
                    out.append(st)
        return out

    def mark_node(self, node: str, name: str, info: dict) -> None:
        pass

    def close(self) -> None:
        self.release()
