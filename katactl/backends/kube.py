"""Kubernetes API access: kubeconfig loading from the official client, raw
HTTP through httpx for the calls themselves.

The generated API classes of the kubernetes package cost ~0.6 s to import and
touch (python-cli.md); katactl needs a handful of verbs on a few kinds, so it
borrows the client's kubeconfig handling (``KUBECONFIG`` lists merged,
contexts, certificates, token files, exec plugins) and sends plain requests.

Errors are mapped here once (kubectl's habits, design.md's exit codes):
401/403 -> AuthError (7) naming the user and the verb; 404 -> NotFound (3);
400/422 -> UsageError (2) with the server's message; 409 -> Conflict (callers
re-read and retry through :meth:`KubeAPI.modify`); 429 and 5xx -> retried with
backoff honouring Retry-After, then OperationFailed (1); no connection ->
UnreachableError (7). Reads are retried on a cut connection; a mutation only
when the request never left (connect failed). Watches (:meth:`KubeAPI.watch`) are not
retried here: the caller re-watches from the last resourceVersion it saw, or lists again
after :class:`WatchExpired`.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from katactl import __version__
from katactl.errors import (AuthError, KatactlError, NotFound, OperationFailed, UnreachableError,
                            UsageError)

if TYPE_CHECKING:
    from typing import Self  # Python 3.11

PAGE = 500
RETRIES = 4
#: connections per KubeAPI (and requests in flight through it; see KubeAPI.__init__)
POOL_SIZE = 16
#: longest wait katactl honours from a Retry-After header (a server asking for
#: minutes is treated as "retry later" by the caller, not slept through)
MAX_RETRY_AFTER = 10.0
#: how often an update is re-read and retried after a 409 Conflict
CONFLICT_RETRIES = 5

PATCH_TYPES = {
    "strategic": "application/strategic-merge-patch+json",
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
}
_RETRY_STATUS = (429, 500, 502, 503, 504)
_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


class Conflict(OperationFailed):
    """409: the object changed since it was read (or already exists)."""

    code = "Conflict"


class ApiStatusError(OperationFailed):
    """A request the server refused with a status the caller interprets itself
    (evictions: 429 from a PodDisruptionBudget, 500 for several PDBs)."""

    code = "ApiError"

    def __init__(self, message: str, status: int, body: dict, retry_after: float | None = None):
        super().__init__(message, details={"httpStatus": status, "reason": body.get("reason")})
        self.status = status
        self.body = body
        self.retry_after = retry_after


class WatchExpired(ApiStatusError):
    """410 from a watch: its resourceVersion is older than the server's history (etcd
    compaction, the watch cache's window). The caller lists again for a fresh one."""

    code = "Expired"


class KubeAPI:
    """A Kubernetes API client over httpx: one connection pool per instance.

    ``user`` is the kubeconfig user (for error messages); ``namespace`` the
    context's namespace (or "default")."""

    def __init__(self, host: str, headers: dict, tls, timeout: float, *,
                 user: str = "", namespace: str = "default"):
        import httpx

        self.host = host.rstrip("/")
        self.user = user
        self.namespace = namespace
        # kept for connections httpx does not make (the kube transport's WebSockets)
        self.headers, self.tls, self.timeout = dict(headers), tls, timeout
        # a drain evicts a node's pods at once: a bounded pool keeps that from opening
        # a hundred connections (kubectl multiplexes them over one HTTP/2 connection)
        self._client = httpx.Client(base_url=self.host, headers=headers, verify=tls,
                                    timeout=timeout, trust_env=False,
                                    limits=httpx.Limits(max_connections=POOL_SIZE,
                                                        max_keepalive_connections=POOL_SIZE))
        # at most POOL_SIZE requests inside httpcore's pool at once: a request queued there
        # can be handed a connection that another thread's pass then closes under it
        # (encode/httpcore#1110, 1.0.9): a 30 s hang or EBADF. Drains evict with up to
        # EVICTION_WORKERS threads; they wait here instead of in the pool.
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._watches: set = set()  # the network streams of the watches being read (abort_watches)
        self._watches_lock = threading.Lock()
        self._watches_aborted = False

    # -- construction ------------------------------------------------------
    @classmethod
    def from_settings(cls, settings) -> Self:
        try:
            from kubernetes import config as kconfig
            from kubernetes.client import Configuration
        except ImportError:  # pragma: no cover - a declared dependency
            raise OperationFailed("the kubernetes package is not installed") from None
        cfg = Configuration()
        # KUBECONFIG may list several files: the loader merges them as kubectl does. Read it
        # here, not from the loader's import-time default, so the environment of this call counts.
        path = settings.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            contexts, active = kconfig.list_kube_config_contexts(config_file=path)
            if settings.context:
                active = next((c for c in contexts if c.get("name") == settings.context), None)
                if active is None:
                    known = ", ".join(sorted(str(c.get("name")) for c in contexts)) or "none"
                    raise UsageError(f"kubeconfig: context {settings.context!r} not found (contexts: {known})")
            with _loader_errors() as plugin_errors:
                kconfig.load_kube_config(config_file=path, context=settings.context,
                                         client_configuration=cfg, persist_config=False)
            if plugin_errors:
                # the loader logs a failed exec plugin and goes on without credentials:
                # stop here with its reason instead of a puzzling 401 later
                raise AuthError(f"kubeconfig: credential plugin failed: {_one_line(plugin_errors[0])}")
        except kconfig.ConfigException as e:
            raise UsageError(f"kubeconfig: {_one_line(e)}") from None
        except FileNotFoundError as e:
            raise UsageError(f"kubeconfig: {e.filename or e}: no such file") from None
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
            # not YAML, not a mapping, not text: the loader's own error says which
            raise UsageError(f"kubeconfig {path or '(KUBECONFIG)'}: not a valid kubeconfig "
                             f"({type(e).__name__}: {_one_line(e)})") from None
        except OSError as e:
            raise UsageError(f"kubeconfig: {e.filename or path}: {e.strerror}") from None
        except Exception as e:  # noqa: BLE001 - yaml.YAMLError and friends from a foreign loader
            if type(e).__module__.startswith("yaml"):
                raise UsageError(f"kubeconfig {path or '(KUBECONFIG)'}: not YAML: {_one_line(e)}") from None
            raise
        ctx = (active or {}).get("context") or {}
        headers = {"Accept": "application/json", "User-Agent": f"katactl/{__version__}"}
        api_key = cfg.api_key or {}
        token = api_key.get("authorization") or api_key.get("BearerToken")
        if token:
            headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        namespace = settings.namespace or ctx.get("namespace") or "default"
        try:
            tls = _tls_context(cfg)
        except (OSError, ValueError) as e:  # an unreadable or malformed CA or client certificate
            raise UsageError(f"kubeconfig: certificate: {getattr(e, 'strerror', None) or e}") from None
        return cls(cfg.host, headers, tls, settings.request_timeout,
                   user=str(ctx.get("user") or ""), namespace=namespace)

    # -- the one request path ----------------------------------------------
    def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                content_type: str = "application/json", retry: bool = True) -> dict:
        """Send one request; the decoded JSON answer, or a mapped error.

        With retry=False, 429 and 5xx answers raise ApiStatusError at once (for
        callers that have their own policy, such as evictions)."""
        import httpx

        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if data is not None else None
        q = {k: v for k, v in (params or {}).items() if v is not None}
        err: KatactlError | None = None
        for attempt in range(RETRIES + 1):
            delay = min(0.2 * 2 ** attempt, 2.0)
            try:
                with self._slots:
                    r = self._client.request(method, path, params=q, content=data, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                # the request never left: safe to send again, even a mutation
                err = UnreachableError(f"Kubernetes API {self.host}: {_one_line(e) or type(e).__name__}")
            except httpx.TimeoutException:
                err = UnreachableError(f"Kubernetes API {self.host}: {method} {path}: timed out")
                if method != "GET":  # it may have been applied: never send a mutation twice
                    raise err from None
            except httpx.TransportError as e:
                err = UnreachableError(f"Kubernetes API {self.host}: {method} {path}: {_one_line(e)}")
                # a server that closed the (reused) connection without answering: safe to send
                # again when the change cannot apply twice (a duplicate meets 409 or changes nothing)
                closed_unanswered = isinstance(e, httpx.RemoteProtocolError)
                if method != "GET" and not (closed_unanswered and _replayable(method, content_type, body)):
                    raise err from None
            else:
                if r.status_code < 300:
                    return _json(r)
                status = _status_body(r)
                retry_after = _retry_after(r)
                if r.status_code in _RETRY_STATUS:
                    msg = f"Kubernetes API {method} {path}: HTTP {r.status_code}: {status.get('message')}"
                    if not retry:
                        raise ApiStatusError(msg, r.status_code, status, retry_after)
                    err = OperationFailed(msg, details={"httpStatus": r.status_code})
                    if retry_after is not None:
                        delay = min(retry_after, MAX_RETRY_AFTER)
                else:
                    raise self._error(method, path, r.status_code, status)
            if attempt == RETRIES:
                break
            time.sleep(delay)
        assert err is not None
        raise err

    def _error(self, method: str, path: str, code: int, status: dict) -> KatactlError:
        msg = status.get("message") or status.get("reason") or f"HTTP {code}"
        details = {"httpStatus": code, "reason": status.get("reason")}
        if code in (401, 403):
            who = f"user {self.user!r}" if self.user else "this kubeconfig's user"
            what = "Unauthorized" if code == 401 else "Forbidden"
            return AuthError(f"Kubernetes API: {what}: {who} cannot {_VERBS.get(method, method)} "
                             f"{path}: {msg}", details=details)
        if code == 404:
            return NotFound(msg, details=details)
        if code in (400, 422):
            return UsageError(f"Kubernetes API rejected the request: {msg}", details=details)
        if code == 409:
            return Conflict(msg, details=details)
        if code == 410:
            return ApiStatusError(f"Kubernetes API: {msg}", code, status)
        return OperationFailed(f"Kubernetes API {method} {path}: HTTP {code}: {msg}", details=details)

    # -- verbs ---------------------------------------------------------------
    def get(self, path: str, params: dict | None = None) -> dict:
        return self.request("GET", path, params=params)

    def list_pages(self, path: str, *, limit: int = PAGE, meta: dict | None = None,
                   **params) -> Iterator[list[dict]]:
        """Pages of a list endpoint (limit/continue). Memory stays one page deep.
        An expired continue token (410) restarts the list once from the top:
        the caller sees items again only if it consumed a page before. ``meta`` (a dict)
        receives the first page's metadata: its resourceVersion is the list's (the real
        server serves every page from that snapshot), where a watch starts."""
        cont = None
        restarted = False
        while True:
            q = dict(params, limit=limit)
            if cont:
                q["continue"] = cont
            try:
                page = self.get(path, q)
            except ApiStatusError as e:
                if e.status != 410 or restarted:
                    raise
                restarted, cont = True, None
                continue
            if meta is not None and cont is None:
                meta.clear()
                meta.update(page.get("metadata") or {})
            yield page.get("items") or []
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                return

    def list(self, path: str, **params) -> list[dict]:
        """All items of a list endpoint, following ``continue`` tokens."""
        items: list[dict] = []
        for page in self.list_pages(path, **params):
            items.extend(page)
        return items

    def watch(self, path: str, *, resource_version: str, timeout_seconds: int = 60,
              on_open: Callable[[], None] | None = None, **params) -> Iterator[dict]:
        """The watch events of a list endpoint after ``resource_version``, as they come:
        ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK, "object": {...}}`` (line-delimited JSON
        over one streamed response; ``allowWatchBookmarks=true``, so a BOOKMARK now and then
        carries a newer resourceVersion and nothing else). Ends (returns) when the server
        ends the watch at ``timeoutSeconds``: watch again from the last resourceVersion seen.

        The real kube-apiserver answers a resourceVersion older than its history with a 200
        stream holding one ERROR event, a Status with code 410 (cacher.go Watch: "errors
        must fail with a watch event of type ERROR, rather than a directly returned error";
        the etcd3 watcher does the same on a compacted revision): that, or a plain HTTP 410,
        raises :class:`WatchExpired`. Other statuses and ERROR events map like any answer
        (:meth:`_error`; 429/5xx -> OperationFailed); a connection lost or silent for
        ``timeout_seconds`` plus the request timeout -> UnreachableError. No retries here.
        ``on_open()`` is called when the server accepted the watch (200, before any event).
        :meth:`abort_watches` (from another thread) ends the read at once."""
        import httpx

        from katactl.errors import ProtocolError

        q = {k: v for k, v in params.items() if v is not None}
        q.update(watch="true", resourceVersion=resource_version, timeoutSeconds=str(int(timeout_seconds)),
                 allowWatchBookmarks="true")
        # the server may stay silent until it ends the watch: the read waits that long, plus the
        # request timeout for the end to arrive
        timeout = httpx.Timeout(self.timeout, read=int(timeout_seconds) + self.timeout)
        try:
            with self._slots, self._client.stream("GET", path, params=q, timeout=timeout) as r:
                if r.status_code >= 300:
                    r.read()
                    status = _status_body(r)
                    if r.status_code == 410:
                        raise WatchExpired(f"Kubernetes API: {status.get('message') or 'Gone'}", 410, status)
                    raise self._error("GET", path, r.status_code, status)
                stream = r.extensions.get("network_stream")
                with self._watches_lock:
                    if self._watches_aborted:
                        raise UnreachableError(f"Kubernetes API {self.host}: watch {path}: aborted")
                    self._watches.add(stream)
                try:
                    if on_open is not None:
                        on_open()
                    for line in r.iter_lines():
                        if not line.strip():
                            continue
                        try:
                            ev = json.loads(line)
                        except ValueError:
                            raise ProtocolError(f"Kubernetes API watch {path}: not a JSON event: "
                                                f"{line[:80]!r}") from None
                        if not isinstance(ev, dict) or not isinstance(ev.get("object"), dict):
                            raise ProtocolError(f"Kubernetes API watch {path}: not a watch event: {line[:80]!r}")
                        if ev.get("type") == "ERROR":
                            st = ev["object"]
                            code = st.get("code") if isinstance(st.get("code"), int) else 500
                            if code == 410:
                                raise WatchExpired(f"Kubernetes API: {st.get('message') or 'Expired'}", 410, st)
                            raise self._error("GET", path, code, st)
                        yield ev
                finally:
                    with self._watches_lock:
                        self._watches.discard(stream)
        except httpx.TimeoutException:
            raise UnreachableError(f"Kubernetes API {self.host}: watch {path}: no answer within "
                                   f"{int(timeout_seconds) + self.timeout:g}s") from None
        except httpx.TransportError as e:
            raise UnreachableError(f"Kubernetes API {self.host}: watch {path}: "
                                   f"{_one_line(e) or type(e).__name__}") from None

    def abort_watches(self) -> None:
        """End the watches being read and refuse new ones (another thread's :meth:`watch`
        then raises UnreachableError): a socket shut down wakes a blocked read, which closing
        it does not."""
        import socket

        with self._watches_lock:
            self._watches_aborted = True
            streams = list(self._watches)
        for s in streams:
            sock = s.get_extra_info("socket") if s is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def create(self, path: str, obj: dict, *, dry_run: bool = False) -> dict:
        return self.request("POST", path, body=obj, params=_dry(dry_run))

    def update(self, path: str, obj: dict, *, dry_run: bool = False) -> dict:
        """PUT; the object's metadata.resourceVersion makes it conditional."""
        return self.request("PUT", path, body=obj, params=_dry(dry_run))

    def patch(self, path: str, patch: Any, *, kind: str = "strategic", dry_run: bool = False) -> dict:
        return self.request("PATCH", path, body=patch, content_type=PATCH_TYPES[kind], params=_dry(dry_run))

    def delete(self, path: str, *, grace_period: int | None = None, uid: str | None = None,
               propagation: str | None = None, dry_run: bool = False) -> dict:
        opts: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period is not None:
            opts["gracePeriodSeconds"] = grace_period
        if uid:
            opts["preconditions"] = {"uid": uid}
        if propagation:
            opts["propagationPolicy"] = propagation
        if dry_run:
            opts["dryRun"] = ["All"]
        return self.request("DELETE", path, body=opts)

    def evict(self, namespace: str, name: str, *, grace_period: int | None = None,
              dry_run: bool = False) -> dict:
        """POST a policy/v1 Eviction. 429/5xx are not retried here: they carry the
        PodDisruptionBudget's verdict, which the drain interprets (ApiStatusError)."""
        ev: dict[str, Any] = {"apiVersion": "policy/v1", "kind": "Eviction",
                              "metadata": {"name": name, "namespace": namespace}}
        opts: dict[str, Any] = {}
        if grace_period is not None:
            opts["gracePeriodSeconds"] = grace_period
        if dry_run:
            opts["dryRun"] = ["All"]
        if opts:
            ev["deleteOptions"] = opts
        return self.request("POST", f"/api/v1/namespaces/{seg(namespace)}/pods/{seg(name)}/eviction",
                            body=ev, retry=False)

    def modify(self, path: str, mutate: Callable[[dict], bool], *, dry_run: bool = False) -> tuple[dict, bool]:
        """Read, change, write back with its resourceVersion; on 409 re-read and
        retry (bounded). ``mutate(obj)`` edits in place and returns whether it
        changed anything. Returns (object, changed)."""
        for _ in range(CONFLICT_RETRIES):
            obj = self.get(path)
            if not mutate(obj):
                return obj, False
            try:
                return self.update(path, obj, dry_run=dry_run), True
            except Conflict:
                continue
        raise Conflict(f"{path}: still changing under us after {CONFLICT_RETRIES} attempts")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "KubeAPI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _loader_errors:
    """Collect what the kubernetes config loader logs at ERROR on the root logger (a
    failed exec credential plugin) instead of letting Python print it raw."""

    def __enter__(self) -> list[str]:
        import logging

        self.found: list[str] = []
        found = self.found

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                found.append(record.getMessage())

        self.handler = Catch(logging.ERROR)
        self.root = logging.getLogger()
        self.root.addHandler(self.handler)
        return found

    def __exit__(self, *exc) -> None:
        self.root.removeHandler(self.handler)


def _replayable(method: str, content_type: str, body: Any) -> bool:
    """Whether sending this change twice is harmless: a PUT conditional on its
    resourceVersion (the second meets 409 Conflict) or a merge/strategic-merge PATCH (it
    sets the same values again). POSTs (creates, evictions) and JSON patches are not."""
    if method == "PUT":
        return isinstance(body, dict) and bool((body.get("metadata") or {}).get("resourceVersion"))
    if method == "PATCH":
        return content_type != PATCH_TYPES["json"]
    return False


def _tls_context(cfg):
    """The kubeconfig's CA (or none: insecure-skip-tls-verify) and client certificate."""
    import ssl

    if cfg.verify_ssl:
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


def _dry(dry_run: bool) -> dict:
    return {"dryRun": "All"} if dry_run else {}


def _json(r) -> dict:
    try:
        d = r.json()
    except ValueError:
        from katactl.errors import ProtocolError

        raise ProtocolError(f"Kubernetes API answered non-JSON ({r.headers.get('content-type')})") from None
    if not isinstance(d, dict):
        from katactl.errors import ProtocolError

        raise ProtocolError("Kubernetes API answered JSON that is not an object")
    return d


def _status_body(r) -> dict:
    try:
        d = r.json()
    except ValueError:
        return {"message": (r.text[:200] or r.reason_phrase).strip()}
    return d if isinstance(d, dict) else {"message": str(d)[:200]}


def _retry_after(r) -> float | None:
    v = r.headers.get("retry-after")
    try:
        return max(0.0, float(v)) if v is not None else None
    except ValueError:
        return None


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def seg(s: str) -> str:
    """A Kubernetes name as one URL path segment (names are DNS subdomains; refuse anything else)."""
    if not isinstance(s, str) or not _NAME_RE.fullmatch(s):
        raise UsageError(f"invalid Kubernetes name {s!r}")
    return s


def client(settings) -> KubeAPI:
    return KubeAPI.from_settings(settings)


def node_names(settings) -> list[str]:
    """Names of the nodes matching settings.selector (-l)."""
    with client(settings) as api:
        names = [n["metadata"]["name"] for page in api.list_pages("/api/v1/nodes", labelSelector=settings.selector)
                 for n in page]
    if not names:
        raise NotFound(f"no node matches selector {settings.selector!r}")
    return names


def pod_location(settings, namespace: str, name: str) -> dict:
    """{node, uid, namespace, name} of a pod, for ``pod/NAMESPACE/NAME`` targets."""
    with client(settings) as api:
        try:
            pod = api.get(f"/api/v1/namespaces/{seg(namespace)}/pods/{seg(name)}")
        except NotFound:
            raise NotFound(f"pod {namespace}/{name} not found") from None
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        raise OperationFailed(f"pod {namespace}/{name} is not scheduled on a node yet")
    return {"node": node, "uid": pod["metadata"].get("uid"), "namespace": namespace, "name": name}
