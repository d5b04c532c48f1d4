"""Kubernetes API access: kubeconfig loading as kubectl does, raw HTTP through httpx for
the calls themselves.

The generated API classes of the kubernetes package cost ~0.6 s to import and
touch (python-cli.md); katactl needs a handful of verbs on a few kinds, so it sends plain
requests. The kubeconfig: files merged here by client-go's rules (:func:`load_kubeconfig`);
the official client's loader then reads the chosen context's server, certificates,
auth-provider and basic auth; bearer tokens that expire (exec plugins, tokenFile) are
:class:`_Credentials`, obtained again as client-go does; a cluster's proxy-url carries the
requests.

Errors are mapped here once (kubectl's habits, design.md's exit codes):
401/403 -> AuthError (7) naming the user and the verb (a 401 first renews refreshable
credentials and sends the request once more); 404 -> NotFound (3); 400/422 -> UsageError
(2) with the server's message; 409 -> Conflict (callers re-read and retry through
:meth:`KubeAPI.modify`); 429 and 5xx -> retried with backoff honouring Retry-After, then
OperationFailed (1) -- except a POST answered 5xx, which may have been applied:
:class:`MaybeApplied` at once, the caller reads back; no connection -> UnreachableError (7).
Reads are retried on a cut connection; a mutation only when the request never left (connect
failed). Watches (:meth:`KubeAPI.watch`) are not retried here: the caller re-watches from the
last resourceVersion it saw, or lists again after :class:`WatchExpired`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
import subprocess
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

from katactl import __version__
from katactl.errors import (AuthError, Interrupted, KatactlError, NotFound, OperationFailed, UnreachableError,
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
#: client-go's cached file token source: a tokenFile is read again once its copy is a minute
#: old, less 10 s of leeway (client-go transport/token_source.go NewCachedFileTokenSource)
TOKEN_FILE_PERIOD = 60.0 - 10.0

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


class MaybeApplied(ApiStatusError):
    """A POST (create) answered 5xx: the server may have applied it or not. Not sent again:
    the caller reads the object and tells its own from someone else's (or its absence)."""

    code = "MaybeApplied"


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
        # kept for connections httpx does not make (the kube transport's WebSockets); the same
        # object when it carries refreshable credentials (_Headers), so that copies share them
        self.headers = headers if isinstance(headers, _Headers) else _Headers(headers)
        self.tls, self.timeout = tls, timeout
        self._creds = self.headers.creds
        self.proxy = self.headers.proxy
        # a drain evicts a node's pods at once: a bounded pool keeps that from opening
        # a hundred connections (kubectl multiplexes them over one HTTP/2 connection)
        self._client = httpx.Client(base_url=self.host, verify=tls, timeout=timeout, trust_env=False,
                                    headers={k: v for k, v in self.headers.items() if k.lower() != "authorization"},
                                    proxy=self.proxy,
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
    def from_settings(cls, settings, *, token_file_period: float = TOKEN_FILE_PERIOD) -> Self:
        """The client of the kubeconfig context in effect. ``token_file_period``: how often a
        tokenFile is read again (client-go's 50 s; tests shorten it)."""
        try:
            from kubernetes import config as kconfig
            from kubernetes.client import Configuration
        except ImportError:  # pragma: no cover - a declared dependency
            raise OperationFailed("the kubernetes package is not installed") from None
        cfg = Configuration()
        # --kubeconfig is one file; KUBECONFIG a list, merged here by client-go's rules (the
        # official Python loader lets the last file's current-context win). Read the environment
        # of this call, not the loader's import-time default.
        merged = load_kubeconfig(settings.kubeconfig)
        name = settings.context or merged.get("current-context")
        contexts = {c["name"]: c for c in merged["contexts"]}
        if not name:
            raise UsageError("kubeconfig: no current-context set (and no --context)"
                             f" in {', '.join(merged['_files']) or 'no file'}")
        if name not in contexts:
            known = ", ".join(sorted(contexts)) or "none"
            raise UsageError(f"kubeconfig: context {name!r} not found (contexts: {known})")
        ctx = contexts[name].get("context") or {}
        if not isinstance(ctx, dict):
            raise UsageError(f"kubeconfig: context {name!r}: not a mapping")
        users = {u["name"]: u.get("user") or {} for u in merged["users"]}
        clusters = {c["name"]: c.get("cluster") or {} for c in merged["clusters"]}
        user = users.get(str(ctx.get("user") or ""), {})
        cluster = clusters.get(str(ctx.get("cluster") or ""))
        if cluster is None:
            raise UsageError(f"kubeconfig: context {name!r}: cluster {ctx.get('cluster')!r} not found")
        # a malformed server URL is a usage error here, not a ValueError of the loader's or httpx's
        cname = str(ctx.get("cluster") or "")
        if not cluster.get("server"):  # client-go clientcmd validation.go validateClusterInfo
            raise UsageError(f"kubeconfig: no server found for cluster \"{cname}\"")
        if not isinstance(cluster["server"], str):
            raise UsageError(f"kubeconfig: cluster \"{cname}\": server is a {type(cluster['server']).__name__}, "
                             "not a URL")
        server_url(cluster["server"], cname)
        if cluster.get("tls-server-name") is not None and not isinstance(cluster["tls-server-name"], str):
            # kubectl: "json: cannot unmarshal number into ... tls-server-name of type string"
            raise UsageError(f"kubeconfig: cluster \"{cname}\": tls-server-name is a "
                             f"{type(cluster['tls-server-name']).__name__}, not a string")
        for key in ("token", "tokenFile"):  # sent as a header, or read from a file: text
            if user.get(key) is not None and not isinstance(user[key], str):
                raise UsageError(f"kubeconfig: user {ctx.get('user')!r}: {key} is a {type(user[key]).__name__}, "
                                 "not a string")
        if isinstance(user.get("token"), str):
            header_value(user["token"], f"kubeconfig: user {ctx.get('user')!r}: token")
        # client-go tools/clientcmd/validation.go validateAuthInfo: a token and basic auth together
        # are refused, not one of them picked (kubectl and katactl would disagree on who acts)
        methods = [m for m, keys in (("token", ("token",)), ("basicAuth", ("username", "password")))
                   if any(user.get(k) for k in keys)]
        if len(methods) > 1:
            raise UsageError(f"kubeconfig: more than one authentication method found for {ctx.get('user') or ''}; "
                             f"found [{' '.join(methods)}], only one is allowed")
        # the bearer-token sources that expire (exec plugin, tokenFile) are katactl's own
        # (_Credentials, refreshed as client-go does); the loader keeps the server, TLS files,
        # auth-provider and basic auth
        loader_user = {k: v for k, v in user.items() if k not in ("exec", "token", "tokenFile")}
        loader_cfg = {**merged, "users": [{"name": "user", "user": loader_user}],
                      "contexts": [{"name": name, "context": {**ctx, "user": "user"}}],
                      "current-context": name}
        loader_cfg.pop("_files", None)
        loader_cfg.pop("_sources", None)
        try:
            kconfig.load_kube_config_from_dict(loader_cfg, context=name, client_configuration=cfg,
                                               persist_config=False)
            creds = _Credentials.from_user(user, cluster, token_file_period=token_file_period,
                                           timeout=settings.request_timeout, name=str(ctx.get("user") or ""),
                                           stdin_unavailable=getattr(settings, "nodes_from", None) == "-")
        except kconfig.ConfigException as e:
            raise UsageError(f"kubeconfig: {_one_line(e)}") from None
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise UsageError(f"kubeconfig: not a valid kubeconfig ({type(e).__name__}: {_one_line(e)})") from None
        except OSError as e:
            raise UsageError(f"kubeconfig: {e.filename or ''}: {e.strerror}") from None
        headers = _Headers({"Accept": "application/json", "User-Agent": f"katactl/{__version__}"})
        api_key = cfg.api_key or {}
        token = api_key.get("authorization") or api_key.get("BearerToken")  # auth-provider, basic auth
        if token:
            headers["Authorization"] = token if token.lower().startswith(("bearer ", "basic ")) else f"Bearer {token}"
        namespace = settings.namespace or ctx.get("namespace") or "default"
        try:
            tls = _tls_context(cfg)
        except (OSError, ValueError) as e:  # an unreadable or malformed CA or client certificate
            raise UsageError(f"kubeconfig: certificate: {getattr(e, 'strerror', None) or e}") from None
        headers.proxy = proxy_for(cluster, cfg.host, str(ctx.get("cluster") or ""))
        if creds is not None:
            headers.creds = creds
            creds.attach(headers, tls)
            creds.authorization()  # a failing plugin stops here, before any request
        return cls(cfg.host, headers, tls, settings.request_timeout,
                   user=str(ctx.get("user") or ""), namespace=namespace)

    # -- the one request path ----------------------------------------------
    def request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                content_type: str = "application/json", retry: bool = True) -> dict:
        """Send one request; the decoded JSON answer, or a mapped error.

        With retry=False, 429 and 5xx answers raise ApiStatusError at once (for
        callers that have their own policy, such as evictions). A POST answered 5xx (not
        429) raises MaybeApplied at once: a create is never sent twice."""
        import httpx

        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if data is not None else None
        q = {k: v for k, v in (params or {}).items() if v is not None}
        err: KatactlError | None = None
        for attempt in range(RETRIES + 1):
            delay = backoff(attempt)
            try:
                r = self._send(method, path, params=q, content=data, headers=headers)
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
                    if method == "POST" and r.status_code != 429:
                        # a create answered 5xx may have landed (kube-apiserver's timeout filter
                        # answers 504 while the handler goes on): sending it again could make a
                        # second object or meet our own as 409. The caller re-reads and decides.
                        # 429 comes from admission before any handler: safe to send again.
                        raise MaybeApplied(f"{msg} (it may have been applied)", r.status_code, status,
                                           retry_after)
                    err = OperationFailed(msg, details={"httpStatus": r.status_code})
                    delay = backoff(attempt, retry_after)
                else:
                    raise self._error(method, path, r.status_code, status)
            if attempt == RETRIES:
                break
            time.sleep(delay)
        assert err is not None
        raise err

    def _authorization(self) -> str | None:
        return self._creds.authorization() if self._creds is not None else self.headers.get("Authorization")

    def authorization(self) -> str | None:
        """The Authorization value to send now (exec plugin / tokenFile obtained again when
        expired), for a connection made outside this client: the pods/exec WebSocket."""
        return self._authorization()

    def renew_authorization(self, used: str | None) -> bool:
        """After a 401 answered to ``used`` outside this client: obtain the credentials again;
        whether they changed (worth one more attempt, as :meth:`_send` does)."""
        return self._creds is not None and self._creds.renew(used)

    def _send(self, method: str, path: str, *, stream: bool = False, slot: bool = True,
              headers: dict | None = None, **kw):
        """One exchange, with the current credentials; a 401 to credentials that can be obtained
        again (exec plugin, tokenFile) is answered by obtaining them and sending once more (a
        401 means the server did nothing). ``stream=True``: the response is open (close it)."""
        for again in (False, True):
            auth = self._authorization()
            h = dict(headers or {})
            if auth:
                h["Authorization"] = auth
            req = self._client.build_request(method, path, headers=h, **kw)
            if slot:
                with self._slots:
                    r = self._client.send(req, stream=stream)
            else:  # the caller holds one (a watch holds it while it reads)
                r = self._client.send(req, stream=stream)
            if r.status_code != 401 or again or self._creds is None or not self._creds.renew(auth):
                return r
            r.close()
        raise AssertionError("unreachable")

    def _error(self, method: str, path: str, code: int, status: dict) -> KatactlError:
        msg = status.get("message") or status.get("reason") or f"HTTP {code}"
        # apiMessage: the server's own words, for callers that tell who refused (RBAC or not)
        details = {"httpStatus": code, "reason": status.get("reason"), "apiMessage": msg}
        causes = (status.get("details") or {}).get("causes") if isinstance(status.get("details"), dict) else None
        if isinstance(causes, list):
            details["causes"] = causes  # e.g. NamespaceTerminating under a 403 (HasStatusCause)
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
                   on_restart: Callable[[], None] | None = None, **params) -> Iterator[list[dict]]:
        """Pages of a list endpoint (limit/continue). Memory stays one page deep. ``meta`` (a
        dict) receives the first page's metadata: its resourceVersion is the list's (the real
        server serves every page from that snapshot), where a watch starts.

        An expired continue token (410 Gone: the snapshot left etcd's history) is answered as
        client-go's pager does (tools/pager/pager.go, FullListIfExpired): one full list without
        limit, a new snapshot. Its items include those of the pages already yielded:
        ``on_restart()`` is called first, for a caller that adds up what it sees to forget
        it. Without ``on_restart`` the items come again (harmless to a caller keyed by name)."""
        cont = None
        while True:
            q = dict(params, limit=limit)
            if cont:
                q["continue"] = cont
            try:
                page = self.get(path, q)
            except ApiStatusError as e:
                if e.status != 410 or not cont:
                    raise
                if on_restart is not None:
                    on_restart()
                page = self.get(path, dict(params))
                if meta is not None:
                    meta.clear()
                    meta.update(page.get("metadata") or {})
                yield page.get("items") or []
                return
            if meta is not None and cont is None:
                meta.clear()
                meta.update(page.get("metadata") or {})
            yield page.get("items") or []
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                return

    def list(self, path: str, **params) -> list[dict]:
        """All items of a list endpoint, following ``continue`` tokens (an expired token: the
        full list replaces the pages read, as in client-go's ListPager.List)."""
        items: list[dict] = []
        for page in self.list_pages(path, on_restart=items.clear, **params):
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
            with self._slots, contextlib.closing(self._send("GET", path, params=q, timeout=timeout,
                                                           stream=True, slot=False)) as r:
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


class _Headers(dict):
    """A KubeAPI's request headers, carrying the kubeconfig's credential source and proxy: the
    clients made from another's (host, headers, tls, ...) -- the rollout engine's per-node
    pools, the kube exec transport -- refresh the same credentials and use the same proxy.
    ``Authorization`` is kept current here (the exec transport's WebSockets read it)."""

    creds: "_Credentials | None" = None
    proxy: str | None = None


class _Credentials:
    """Bearer tokens that expire: an exec credential plugin's (client.authentication.k8s.io
    ExecCredential) or a tokenFile's, obtained again as client-go does.

    - exec: run again once ``status.expirationTimestamp`` has passed (client-go
      plugin/pkg/client/auth/exec/exec.go credsExpired: no skew), and after a 401 answered to
      the current token (maybeRefreshCreds). A plugin's client certificate
      (clientCertificateData/clientKeyData) is loaded into the TLS context: new connections
      present it.
    - tokenFile: read again every 50 s and after a 401, as client-go's cachingTokenSource
      (transport/token_source.go): a read that fails or finds the file empty (a rotation that
      truncates, then writes) keeps the token held ("Unable to rotate token", at -v) and is
      tried again at the next request; only the first read failing is an error (exit 2),
      unless the user also has a ``token`` (sent while the file cannot be read, client-go
      round_trippers.go NewBearerAuthWithRefreshRoundTripper).

    After a 401, :meth:`renew` says whether the credentials changed: the request is then sent
    once more (client-go only refreshes for the next request; a drain that outlives a
    15-minute token would lose the request).

    After an interrupt (:func:`interrupt_exec_plugins`) the restores that follow use the
    credentials held, expired or not (the server decides); a plugin run they still need (none
    held, or a 401) is bounded by AFTER_INTERRUPT_PLUGIN_TIMEOUT, not --request-timeout."""

    #: every exec-plugin credential source alive, for interrupt_exec_plugins()
    _all: "weakref.WeakSet[_Credentials]"

    def __init__(self, *, exec_cfg: dict | None = None, token_file: str | None = None,
                 cluster: dict | None = None, token_file_period: float = TOKEN_FILE_PERIOD,
                 timeout: float = 0.0, interactive_mode: str = "Never", stdin_unavailable: bool = False):
        self.exec_cfg, self.token_file, self.cluster = exec_cfg, token_file, cluster
        self.timeout = timeout  # --request-timeout: bounds an exec plugin's run (0: none)
        self.interactive_mode, self.stdin_unavailable = interactive_mode, stdin_unavailable
        self.interrupted = False  # set by interrupt_exec_plugins()
        if exec_cfg is not None:
            _Credentials._all.add(self)
        self.token_file_period = token_file_period
        self._lock = threading.Lock()
        self._auth: str | None = None
        self._expires: float | None = None  # epoch seconds (an exec plugin's expirationTimestamp)
        self._read_at = 0.0  # monotonic time of the last tokenFile read
        self._headers: dict | None = None
        self._tls = None
        self._fallback: str | None = None  # a user's token beside its unreadable tokenFile
        self._file_token: str | None = None  # the tokenFile's last good read
        self._rotate_failed = False  # warned that a re-read failed (once until one succeeds)
        self._loaded = False

    @classmethod
    def from_user(cls, user: dict, cluster: dict, *, token_file_period: float = TOKEN_FILE_PERIOD,
                  timeout: float = 0.0, name: str = "", stdin_unavailable: bool = False) -> "_Credentials | None":
        """The bearer-token source of a kubeconfig user ``name`` (exec > tokenFile > token), or
        None. With both tokenFile and token, the file's token is sent while the file can be read
        (client-go transport/round_trippers.go NewBearerAuthWithRefreshRoundTripper).
        stdin_unavailable: katactl reads stdin itself (``--nodes-from -``), as kubectl's ``-f -``."""
        if isinstance(user.get("exec"), dict):
            return cls(exec_cfg=user["exec"], cluster=cluster, timeout=timeout,
                       interactive_mode=exec_interactive_mode(user["exec"], name),
                       stdin_unavailable=stdin_unavailable)
        if user.get("tokenFile"):
            c = cls(token_file=str(user["tokenFile"]), token_file_period=token_file_period)
            c._fallback = f"Bearer {user['token']}" if user.get("token") else None
            return c
        if user.get("token"):
            c = cls()
            c._auth = f"Bearer {user['token']}"
            return c
        return None

    def attach(self, headers: dict, tls) -> None:
        self._headers, self._tls = headers, tls
        if self._auth:
            headers["Authorization"] = self._auth

    def _stale(self) -> bool:
        if not self._loaded:
            return bool(self.exec_cfg or self.token_file)
        if self.exec_cfg is not None:
            if self.interrupted and self._auth is not None:
                return False  # restoring after an interrupt: the held token first, no plugin
            return self._expires is not None and time.time() > self._expires
        if self.token_file:  # a failed read is tried again at the next request (no _read_at)
            return self._file_token is None or time.monotonic() - self._read_at >= self.token_file_period
        return False

    def authorization(self) -> str | None:
        """The Authorization header to send now (obtained again if expired)."""
        with self._lock:
            if self._stale():
                self._load()
            return self._auth

    def renew(self, used: str | None) -> bool:
        """After a 401 answered to ``used``: obtain the credentials again unless another request
        already did; whether they differ from ``used`` (worth one more attempt)."""
        if not (self.exec_cfg or self.token_file):
            return False
        with self._lock:
            if self._auth == used:
                self._load()
            return self._auth != used

    def _load(self) -> None:
        self._loaded = True
        if self.exec_cfg is not None:
            self._auth, self._expires = self._run_plugin()
        else:
            self._read_token_file()
            self._auth = f"Bearer {self._file_token}" if self._file_token else self._fallback
        if self._headers is not None:
            if self._auth:
                self._headers["Authorization"] = self._auth
            else:
                self._headers.pop("Authorization", None)

    def _read_token_file(self) -> None:
        assert self.token_file
        try:
            with open(self.token_file, encoding="utf-8") as f:
                tok = f.read().strip()
            why = "" if tok else "read an empty token"
            try:
                header_value(tok, "")
            except UsageError:  # a header cannot carry it: no token, as an unreadable file
                tok, why = "", "not printable ASCII (a line break or a character a header cannot carry)"
        except (OSError, UnicodeDecodeError) as e:
            tok, why = "", getattr(e, "strerror", None) or "not UTF-8 text"
        if tok:
            self._file_token, self._read_at, self._rotate_failed = tok, time.monotonic(), False
            return
        if self._file_token is None and self._fallback is None:  # nothing held yet: the first read
            raise UsageError(f"kubeconfig: tokenFile {self.token_file}: {why}")
        if not self._rotate_failed:
            self._rotate_failed = True
            import logging

            logging.getLogger(__name__).debug(f"kubeconfig: tokenFile {self.token_file}: {why}: "
                                              "unable to rotate the token, keeping the one held")

    def _run_plugin(self) -> tuple[str | None, float | None]:
        assert self.exec_cfg is not None
        timeout, why = self.timeout, "--request-timeout"
        if self.interrupted and not 0 < timeout <= AFTER_INTERRUPT_PLUGIN_TIMEOUT:
            timeout, why = AFTER_INTERRUPT_PLUGIN_TIMEOUT, "bounded after the interrupt"
        status = run_exec_plugin(self.exec_cfg, self.cluster, timeout,
                                 interactive=exec_interactive(self.interactive_mode, self.stdin_unavailable),
                                 timeout_why=why)
        if not isinstance(status, dict):
            raise AuthError("kubeconfig: credential plugin failed: status is not an object")
        expires = None
        if status.get("expirationTimestamp"):
            try:
                expires = _rfc3339(str(status["expirationTimestamp"]))
            except ValueError:
                raise AuthError("kubeconfig: credential plugin failed: bad expirationTimestamp "
                                f"{status['expirationTimestamp']!r}") from None
        if status.get("token"):
            if not isinstance(status["token"], str):
                raise AuthError("kubeconfig: credential plugin failed: its token is not a string")
            try:
                return f"Bearer {header_value(status['token'], 'its token')}", expires
            except UsageError as e:
                raise AuthError(f"kubeconfig: credential plugin failed: {e.message}") from None
        if status.get("clientCertificateData") and status.get("clientKeyData"):
            self._load_cert(status["clientCertificateData"], status["clientKeyData"])
            return None, expires
        raise AuthError("kubeconfig: credential plugin failed: no token or clientCertificateData in its status")

    def _load_cert(self, cert: str, key: str) -> None:
        import tempfile

        if self._tls is None:
            return
        with tempfile.TemporaryDirectory(prefix="katactl-cred-") as d:
            c, k = os.path.join(d, "cert"), os.path.join(d, "key")
            for path, text in ((c, cert), (k, key)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                    f.write(text)
            self._tls.load_cert_chain(c, k)


#: the exec credential versions client-go speaks (v1alpha1 went in 1.24: kubectl 1.33 says
#: 'exec plugin: invalid apiVersion "client.authentication.k8s.io/v1alpha1"')
_EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1beta1", "client.authentication.k8s.io/v1")
#: v1beta1 exec configs default interactiveMode to IfAvailable; v1 must name it
#: (client-go tools/clientcmd/api/v1/defaults.go SetDefaults_ExecConfig, validation.go)
_EXEC_DEFAULT_IFAVAILABLE = ("client.authentication.k8s.io/v1beta1",)
#: how long a plugin may run for the restores after an interrupt (instead of --request-timeout)
AFTER_INTERRUPT_PLUGIN_TIMEOUT = 5.0

#: exec plugins running now -> whether interactive (interrupt_exec_plugins kills them)
_running_plugins: dict[subprocess.Popen, bool] = {}
#: pids of plugins interrupt_exec_plugins killed (their runs raise Interrupted)
_killed_plugins: set[int] = set()
_plugins_lock = threading.Lock()
_Credentials._all = weakref.WeakSet()


def _check_exec_api_version(exec_cfg: dict) -> None:
    v = exec_cfg.get("apiVersion")
    if isinstance(v, str) and v and v not in _EXEC_API_VERSIONS:
        raise UsageError(f"kubeconfig: exec plugin: invalid apiVersion {json.dumps(v)}")


def exec_interactive_mode(exec_cfg: dict, user: str) -> str:
    """An exec config's interactiveMode, checked as client-go's kubeconfig validation does
    (tools/clientcmd/validation.go validateAuthInfo): Never, IfAvailable or Always; missing
    is IfAvailable for v1beta1 and a UsageError for v1 (kubectl's words)."""
    _check_exec_api_version(exec_cfg)
    mode = exec_cfg.get("interactiveMode")
    if mode in (None, "") and exec_cfg.get("apiVersion") in _EXEC_DEFAULT_IFAVAILABLE:
        return "IfAvailable"
    if mode in (None, ""):
        raise UsageError(f"kubeconfig: interactiveMode must be specified for {user} to use exec authentication plugin")
    if mode not in ("Never", "IfAvailable", "Always"):
        raise UsageError(f"kubeconfig: invalid interactiveMode for {user}: {json.dumps(mode)}")
    return str(mode)


def exec_interactive(mode: str, stdin_unavailable: bool = False) -> bool:
    """Whether a plugin runs interactively (gets the terminal's stdin), decided as client-go's
    isInteractive (plugin/pkg/client/auth/exec/exec.go): Never: no; IfAvailable: when stdin is
    a terminal and katactl does not read it itself; Always: that, or the plugin fails
    ("exec plugin cannot support interactive mode: ..."). From stdin, never from stdout:
    ``katactl ... -o json | jq`` still prompts."""
    import sys

    tty = sys.stdin is not None and hasattr(sys.stdin, "isatty") and sys.stdin.isatty()
    if mode == "Never":
        return False
    if mode == "Always":
        why = "standard input is not a terminal" if not tty else \
            "standard input is unavailable: used by --nodes-from -" if stdin_unavailable else None
        if why:
            raise AuthError(f"kubeconfig: credential plugin failed: exec plugin cannot support interactive mode: {why}")
        return True
    return tty and not stdin_unavailable


def interrupt_exec_plugins() -> None:
    """Kill every exec plugin running now, in whatever thread it runs (a drain's workers
    refresh credentials too), from the thread that took the interrupt (Ctrl-C, SIGTERM made
    one): its run raises Interrupted. The credentials alive then restore with what they hold
    (:class:`_Credentials`), so a plugin that hangs (a browser login) delays no restore."""
    import signal

    for c in list(_Credentials._all):
        c.interrupted = True
    with _plugins_lock:
        running = list(_running_plugins.items())
        _killed_plugins.update(p.pid for p, _ in running)
    for proc, interactive in running:
        _kill_plugin(proc, interactive, signal)


def _kill_plugin(proc, interactive: bool, signal) -> None:
    try:
        if interactive:
            proc.kill()  # it shares the terminal's process group, katactl's own
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # the plugin and whatever it started
    except OSError:
        pass


def run_exec_plugin(exec_cfg: dict, cluster: dict | None, timeout: float, *, interactive: bool = False,
                    timeout_why: str = "--request-timeout") -> dict:
    """An exec credential plugin's ExecCredential status, as client-go runs the plugin
    (plugin/pkg/client/auth/exec/exec.go refreshCredsLocked: KUBERNETES_EXEC_INFO with
    spec.interactive and, with provideClusterInfo, spec.cluster; its stderr always the user's
    (cmd.Stderr = a.stderr), its stdin the terminal's only when ``interactive``
    (:func:`exec_interactive`), else /dev/null; exit status, apiVersion and kind checked),
    and as the kubernetes package's ExecProvider words its failures. Bounded by ``timeout``
    (--request-timeout, or ``timeout_why``; 0: none): a plugin that does not answer by then,
    or katactl interrupted (Ctrl-C, SIGTERM made one; in any thread:
    :func:`interrupt_exec_plugins`), is killed with every process it started (its own
    process group; an interactive one stays in the terminal's foreground group, where it
    may read the terminal, and only it is killed)."""
    import signal
    import subprocess

    def failed(why: str) -> AuthError:
        return AuthError(f"kubeconfig: credential plugin failed: {why}")

    for key in ("command", "apiVersion"):
        if not isinstance(exec_cfg.get(key), str) or not exec_cfg[key]:
            raise failed(f"exec: malformed request. missing key '{key}'")
    _check_exec_api_version(exec_cfg)
    args = exec_cfg.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise UsageError("kubeconfig: exec: args is not a list of strings")
    env = dict(os.environ)
    for item in exec_cfg.get("env") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("value"), str):
            raise UsageError("kubeconfig: exec: an env entry without a name and a value")
        env[item["name"]] = item["value"]
    spec: dict[str, Any] = {"interactive": interactive}
    if exec_cfg.get("provideClusterInfo") and cluster:
        spec["cluster"] = dict(cluster)
        for ext in cluster.get("extensions") or []:
            if isinstance(ext, dict) and ext.get("name") == "client.authentication.k8s.io/exec":
                spec["cluster"]["config"] = ext.get("extension")
                break
    env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": exec_cfg["apiVersion"], "kind": "ExecCredential",
                                              "spec": spec})
    argv = [exec_cfg["command"], *args]
    with _plugins_lock:  # started and registered at once: an interrupt kills it or finds it not started
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None,
                                    stdin=None if interactive else subprocess.DEVNULL, env=env, text=True,
                                    process_group=None if interactive else 0)
        except OSError as e:
            raise failed(f"{exec_cfg['command']}: {e.strerror}") from None
        _running_plugins[proc] = interactive

    def kill() -> None:
        _kill_plugin(proc, interactive, signal)
        proc.wait()

    try:
        try:
            out, _ = proc.communicate(timeout=timeout if timeout > 0 else None)
        except subprocess.TimeoutExpired:
            kill()
            raise failed(f"{exec_cfg['command']} did not answer within {timeout:g}s ({timeout_why})") from None
        except BaseException:
            kill()
            raise
    finally:
        with _plugins_lock:
            _running_plugins.pop(proc, None)
            killed = proc.pid in _killed_plugins
            _killed_plugins.discard(proc.pid)
    if killed:
        raise Interrupted(f"interrupted: credential plugin {exec_cfg['command']} killed")
    if proc.returncode != 0:
        raise failed(f"exec: process returned {proc.returncode}")
    try:
        data = json.loads(out)
    except ValueError as e:
        raise failed(f"exec: failed to decode process output: {e}") from None
    if not isinstance(data, dict):
        raise failed("exec: failed to decode process output: not an object")
    for key in ("apiVersion", "kind", "status"):
        if key not in data:
            raise failed(f"exec: malformed response. missing key '{key}'")
    if data["apiVersion"] != exec_cfg["apiVersion"]:
        raise failed(f"exec: plugin api version {data['apiVersion']} does not match {exec_cfg['apiVersion']}")
    return data["status"]


def backoff(attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait before sending again after failed attempt ``attempt`` (0, 1, ...):
    the server's Retry-After (at most MAX_RETRY_AFTER), else 0.2 s doubling up to 2 s."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER)
    return min(0.2 * 2 ** attempt, 2.0)


def _rfc3339(s: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def proxy_for(cluster: dict, server: str, name: str = "") -> str | None:
    """The proxy kubectl would reach ``server`` through: the cluster's proxy-url, else the
    environment's (:func:`_environment_proxy`), else none. The one decision for every connection
    to the API server: httpx's requests and the exec transport's WebSockets (kubeexec.py).
    ``name`` is the cluster's name, for the error of a malformed URL (UsageError)."""
    server_url(server, name)
    if cluster.get("proxy-url"):
        return _proxy_url(str(cluster["proxy-url"]), f"invalid 'proxy-url' \"{cluster['proxy-url']}\" "
                                                      f"for cluster \"{name}\"")
    proxy = _environment_proxy(server)
    return _proxy_url(proxy, f"invalid proxy address \"{proxy}\" (HTTPS_PROXY/HTTP_PROXY)")


def server_url(server: str, name: str = ""):
    """A cluster's server URL, split (urllib.parse.SplitResult), or a UsageError in kubectl's
    words where it has them (client-go rest/url_utils.go DefaultServerURL: "host must be a URL
    or a host:port pair"; net/http: "unsupported protocol scheme"). A server without a scheme
    is refused too (kubectl guesses http:// or https:// for one: katactl does not guess which)."""
    from urllib.parse import urlsplit

    where = f"kubeconfig: cluster \"{name}\"" if name else "kubeconfig"
    try:
        u = urlsplit(server)
        u.port  # noqa: B018 - raises ValueError on a port that is not a number, or out of range
    except ValueError as e:
        if "out of range" in str(e):
            raise UsageError(f"{where}: server \"{server}\": port out of range 0-65535") from None
        raise UsageError(f"{where}: host must be a URL or a host:port pair: \"{server}\"") from None
    if "://" in server and u.scheme not in ("http", "https"):
        raise UsageError(f"{where}: server \"{server}\": unsupported protocol scheme \"{u.scheme}\"")
    if "://" not in server or not u.hostname:
        raise UsageError(f"{where}: server \"{server}\": not a URL (https://HOST:PORT)")
    return u


def header_value(value: str, what: str) -> str:
    """A credential as an HTTP header carries it: printable ASCII (no line breaks, which would
    end the header; nothing httpx cannot encode). Else a one-line UsageError naming ``what``."""
    if not value.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise UsageError(f"{what}: not printable ASCII (a line break or a character a header cannot carry)")
    return value


def _proxy_url(url: str | None, what: str) -> str | None:
    """A proxy URL as client-go accepts it: http, https or socks5, parseable, its port a number
    in range (client-go tools/clientcmd/client_config.go parseProxyURL: "invalid 'proxy-url'
    ... could not parse", "unsupported scheme ..."); the proxy then carries every request (HTTP
    CONNECT for an https server). ``what`` starts the one-line UsageError."""
    if not url:
        return None
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - raises ValueError on a port that is not a number, or out of range
    except ValueError as e:
        why = "port out of range 0-65535" if "out of range" in str(e) else f"could not parse: {url}"
        raise UsageError(f"{what}: {why}") from None
    if u.scheme not in ("http", "https", "socks5"):
        raise UsageError(f"{what}: unsupported scheme \"{u.scheme}\", must be http, https, or socks5")
    if not u.hostname:
        raise UsageError(f"{what}: could not parse: {url}")
    if u.scheme == "socks5":
        import importlib.util

        if importlib.util.find_spec("socksio") is None:  # httpx's SOCKS support
            raise UsageError(f"{what}: SOCKS5 proxies need the socksio "
                             "package (pip install 'httpx[socks]'); an HTTP CONNECT proxy works as is")
    return url


def _environment_proxy(server: str) -> str | None:
    """The proxy the environment names for ``server`` when the cluster sets no proxy-url, as
    kubectl finds it (client-go uses Go's http.ProxyFromEnvironment, golang.org/x/net/http/
    httpproxy): HTTPS_PROXY (https) or HTTP_PROXY (http), either case; a value without a
    scheme is http://; never for localhost or a loopback address, nor when NO_PROXY exempts
    the host (:func:`_no_proxy_matches`)."""
    u = server_url(server)
    env = os.environ
    keys = ("HTTPS_PROXY", "https_proxy") if u.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((env[k] for k in keys if env.get(k)), None)
    host = (u.hostname or "").lower()
    if not proxy or not host:
        return None
    port = str(u.port or (443 if u.scheme == "https" else 80))
    ip = _go_ip(host)
    if host == "localhost" or (ip is not None and ip.is_loopback):
        return None
    if _no_proxy_matches(env.get("NO_PROXY") or env.get("no_proxy") or "", host, port):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _go_ip(s: str):
    """Go's net.ParseIP: an IPv4 or IPv6 literal without a zone; IPv4-mapped IPv6 is the IPv4
    address (net.IP.Equal and IPNet.Contains treat them as one), or None."""
    import ipaddress

    if not s or "%" in s:
        return None
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def _go_split_host_port(s: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort: (host without brackets, port) or None (no port, stray colons
    or brackets). The port may be empty ("host:")."""
    i = s.rfind(":")
    if i < 0:
        return None
    j = k = 0
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or end + 1 != i:
            return None
        host, j, k = s[1:end], 1, end + 1
    else:
        host = s[:i]
        if ":" in host:
            return None
    if "[" in s[j:] or "]" in s[k:]:
        return None
    return host, s[i + 1:]


def _no_proxy_matches(no_proxy: str, host: str, port: str) -> bool:
    """Whether NO_PROXY exempts host:port, as golang.org/x/net/http/httpproxy (proxy.go,
    config.init and useProxy) decides for kubectl: entries split at commas, trimmed and
    lowercased; "*" exempts all; a CIDR or an IP (":port" or "[v6]:port" limits it to that
    port) matches IP hosts only; anything else is a name ("*.d" is ".d"): "d" matches d and its
    subdomains, ".d" subdomains only (by suffix), never an IP host; an entry with an empty
    host part is ignored. Compared with kubectl 1.33 in tests/test_kube_client.py."""
    import ipaddress

    ip = _go_ip(host)
    for p in no_proxy.split(","):
        p = p.strip().lower()
        if not p:
            continue
        if p == "*":
            return True
        addr, _, bits = p.partition("/")
        if bits:  # net.ParseCIDR: ADDR/DECIMAL only (no netmask form, no zone)
            net_ip = _go_ip(addr) if bits.isdigit() else None
            if net_ip is not None:
                try:
                    net = ipaddress.ip_network(f"{net_ip}/{int(bits)}", strict=False)
                except ValueError:
                    net = None
                if net is not None:
                    if ip is not None and ip.version == net.version and ip in net:
                        return True
                    continue
        hp = _go_split_host_port(p)
        phost, pport = hp if hp is not None else (p, "")
        if hp is not None and not phost:
            continue
        pip = _go_ip(phost)
        if pip is not None:
            if ip is not None and pip == ip and pport in ("", port):
                return True
            continue
        if not phost or ip is not None:
            continue
        if phost.startswith("*."):
            phost = phost[1:]
        exact = not phost.startswith(".")
        if exact:
            phost = "." + phost
        if (host.endswith(phost) or (exact and host == phost[1:])) and pport in ("", port):
            return True
    return False


#: the entries of a kubeconfig that name local files, resolved against the directory of the
#: file that set them (client-go loader.go GetClusterFileReferences, GetAuthInfoFileReferences)
_CLUSTER_FILES = ("certificate-authority",)
_USER_FILES = ("client-certificate", "client-key", "tokenFile")


def kubeconfig_files(explicit: str | None = None) -> list[str]:
    """The kubeconfig files kubectl would read, in merge order (existing or not)."""
    if explicit:
        return [os.path.expanduser(explicit)]
    if os.environ.get("KUBECONFIG"):
        files = dict.fromkeys(f for f in os.environ["KUBECONFIG"].split(os.pathsep) if f)
        return [os.path.expanduser(f) for f in files]
    return [os.path.expanduser("~/.kube/config")]


def load_kubeconfig(explicit: str | None = None) -> dict:
    """The kubeconfig in effect, merged as kubectl merges it (client-go
    tools/clientcmd/loader.go ClientConfigLoadingRules.Load):

    - ``explicit`` (--kubeconfig) is one file, which must exist; else ``KUBECONFIG`` is a list
      (duplicates dropped, missing files skipped), else ~/.kube/config;
    - clusters, contexts and users by name: the first file to set a name wins, whole (a later
      file's entry of that name is ignored, even its other fields); one file naming an entry
      twice is refused (UsageError), as client-go refuses it;
    - current-context: the first file that sets it;
    - relative paths (certificate-authority, client-certificate, client-key, tokenFile, an exec
      command containing a '/') resolve against the directory of the file they come from.

    Returns {"clusters": [...], "contexts": [...], "users": [...], "current-context": ...,
    "_files": [the files read], "_sources": {"clusters"|"contexts"|"users": {name: file},
    "current-context": file}}."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    files = kubeconfig_files(explicit)
    out: dict[str, Any] = {"clusters": [], "contexts": [], "users": [], "current-context": None,
                           "_files": [], "_sources": {"clusters": {}, "contexts": {}, "users": {}}}
    seen: dict[str, set] = {"clusters": set(), "contexts": set(), "users": set()}
    for path in files:
        try:
            with open(path, "rb") as fb:
                raw = fb.read()
        except FileNotFoundError:
            if explicit:
                raise UsageError(f"kubeconfig: {path}: no such file") from None
            continue
        except OSError as e:
            raise UsageError(f"kubeconfig: {path}: {e.strerror}") from None
        try:
            # libyaml's loader where PyYAML has it: the pure-Python one takes ~0.6 s over a
            # 1 MiB kubeconfig of 500 clusters, which every command (and config view) reads
            doc = yaml.load(raw.decode("utf-8"), Loader=loader) if raw.strip() else {}
        except UnicodeDecodeError:
            raise UsageError(f"kubeconfig {path}: not a valid kubeconfig (not UTF-8 text)") from None
        except yaml.YAMLError as e:
            raise UsageError(f"kubeconfig {path}: not YAML: {_one_line(e)}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise UsageError(f"kubeconfig {path}: not a valid kubeconfig (a {type(doc).__name__}, "
                             "not a mapping)")
        out["_files"].append(path)
        base = os.path.dirname(os.path.abspath(path))
        for key in ("clusters", "contexts", "users"):
            entries = doc.get(key) or []
            if not isinstance(entries, list):
                raise UsageError(f"kubeconfig {path}: {key} is not a list")
            mine: dict[str, dict] = {}
            for ent in entries:
                if not isinstance(ent, dict) or not isinstance(ent.get("name"), str):
                    raise UsageError(f"kubeconfig {path}: an entry of {key} without a name")
                if ent["name"] in mine:
                    # client-go refuses the file (tools/clientcmd/api/v1/conversion.go
                    # Convert_Slice_v1_NamedCluster_To_Map_string_To_Pointer_api_Cluster and its
                    # NamedContext/NamedAuthInfo twins): no entry of the two may be taken for it
                    raise UsageError(f"kubeconfig {path}: duplicate name \"{ent['name']}\" in {key} "
                                     "(each name once per file)")
                mine[ent["name"]] = ent
            for n, ent in mine.items():
                if n in seen[key]:
                    continue
                seen[key].add(n)
                out[key].append(_resolved(key, ent, base, path))
                out["_sources"][key][n] = path
        if not out["current-context"] and doc.get("current-context"):
            out["current-context"] = str(doc["current-context"])
            out["_sources"]["current-context"] = path
    if not out["_files"]:
        raise UsageError(f"kubeconfig: no configuration: {', '.join(files)}: no such file")
    return out


def context_in_use(settings) -> dict:
    """The Kubernetes context katactl would use, and where each part comes from, read from the
    kubeconfig alone (no request, no credential plugin run): what ``config view`` shows, as
    ``kubectl config view --minify`` and ``kubectl config current-context`` would.

    {"files": [the files read], "context", "cluster", "server", "user", "namespace", "proxy",
    "sources": {part: where it comes from}, "error": why the kubeconfig cannot be used, or
    None}. Without any kubeconfig file, "files" is empty and the rest None: not an error."""
    from katactl.errors import KatactlError

    out: dict[str, Any] = {"files": [], "context": None, "cluster": None, "server": None, "user": None,
                           "namespace": None, "proxy": None, "sources": {}, "error": None}
    if not settings.kubeconfig and not any(os.path.exists(f) for f in kubeconfig_files()):
        out["sources"]["files"] = ("KUBECONFIG: no such file" if os.environ.get("KUBECONFIG")
                                   else "~/.kube/config: no such file")
        return out
    try:
        merged = load_kubeconfig(settings.kubeconfig)
    except KatactlError as e:
        out["error"] = e.message
        return out
    src = merged["_sources"]
    out["files"] = merged["_files"]
    out["sources"]["files"] = (f"kubeconfig ({settings.sources.get('kubeconfig')})" if settings.kubeconfig
                               else "env KUBECONFIG" if os.environ.get("KUBECONFIG") else "default")
    name = settings.context or merged.get("current-context")
    out["context"] = name
    if name:
        out["sources"]["context"] = (f"context ({settings.sources.get('context')})" if settings.context
                                     else f"current-context in {src.get('current-context')}")
    else:
        out["error"] = "no current-context set (and no --context)"
        return out
    contexts = {c["name"]: c for c in merged["contexts"]}
    if name not in contexts:
        out["error"] = f"context {name!r} not found"
        return out
    ctx = contexts[name].get("context") or {}
    if not isinstance(ctx, dict):
        out["error"] = f"context {name!r}: not a mapping"
        return out
    out["sources"]["context"] += f"; defined in {src['contexts'][name]}"
    out["cluster"] = cname = str(ctx.get("cluster") or "") or None
    out["user"] = uname = str(ctx.get("user") or "") or None
    clusters = {c["name"]: c.get("cluster") for c in merged["clusters"]}
    if cname in clusters and isinstance(clusters[cname], dict):
        cluster = clusters[cname]
        out["server"] = cluster.get("server")
        out["sources"]["cluster"] = out["sources"]["server"] = src["clusters"][cname]
        try:
            out["proxy"] = proxy_for(cluster, str(cluster.get("server") or ""), cname or "")
        except KatactlError as e:
            out["error"] = e.message
        if out["proxy"]:
            out["sources"]["proxy"] = (f"proxy-url in {src['clusters'][cname]}" if cluster.get("proxy-url")
                                       else "HTTPS_PROXY/HTTP_PROXY")
    else:
        out["error"] = f"context {name!r}: cluster {cname!r} not found"
    if uname in src["users"]:
        out["sources"]["user"] = src["users"][uname]
    elif uname:
        out["sources"]["user"] = "not defined in any file"
    if settings.namespace:
        out["namespace"] = settings.namespace
        out["sources"]["namespace"] = f"namespace ({settings.sources.get('namespace')})"
    elif ctx.get("namespace"):
        out["namespace"] = str(ctx["namespace"])
        out["sources"]["namespace"] = f"context {name!r}"
    else:
        out["namespace"] = "default"
        out["sources"]["namespace"] = "default"
    return out


def _resolved(key: str, entry: dict, base: str, path: str) -> dict:
    """A copy of a cluster or user entry with its relative file paths made absolute against
    ``base`` (its file's directory)."""
    import copy

    entry = copy.deepcopy(entry)
    inner_key = {"clusters": "cluster", "users": "user"}.get(key)
    inner = entry.get(inner_key) if inner_key else None
    if not isinstance(inner, dict):
        if inner_key and inner is not None:
            raise UsageError(f"kubeconfig {path}: {key} {entry['name']!r}: not a mapping")
        return entry
    for f in _CLUSTER_FILES if key == "clusters" else _USER_FILES:
        v = inner.get(f)
        if isinstance(v, str) and v and not os.path.isabs(v):
            inner[f] = os.path.join(base, v)
    ex = inner.get("exec") if key == "users" else None
    if isinstance(ex, dict) and isinstance(ex.get("command"), str) and os.sep in ex["command"] \
            and not os.path.isabs(ex["command"]):
        ex["command"] = os.path.join(base, ex["command"])
    return entry


def _replayable(method: str, content_type: str, body: Any) -> bool:
    """Whether sending this change twice is harmless: a PUT conditional on its
    resourceVersion (the second meets 409 Conflict) or a merge/strategic-merge PATCH (it
    sets the same values again). POSTs (creates, evictions) and JSON patches are not."""
    if method == "PUT":
        return isinstance(body, dict) and bool((body.get("metadata") or {}).get("resourceVersion"))
    if method == "PATCH":
        return content_type != PATCH_TYPES["json"]
    return False


class _NamedTLS(ssl.SSLContext):
    """An SSLContext whose connections name ``server_name`` (when set) whatever the caller asks:
    SNI and certificate verification, for httpx's connections (wrap_socket; wrap_bio through
    an HTTPS proxy) and the exec transport's WebSockets alike (they all use the KubeAPI's
    ``tls``)."""

    server_name: str | None = None

    def wrap_socket(self, sock, *args, server_hostname=None, **kw):
        return super().wrap_socket(sock, *args, server_hostname=self.server_name or server_hostname, **kw)

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None,
                 session=None):
        return super().wrap_bio(incoming, outgoing, server_side, self.server_name or server_hostname, session)


def _tls_context(cfg):
    """The kubeconfig's CA (or none: insecure-skip-tls-verify) and client certificate, and its
    tls-server-name: the name sent as SNI and verified in the server's certificate instead of
    the server URL's host (client-go rest.TLSClientConfig.ServerName). A CA together with
    insecure-skip-tls-verify is refused in kubectl's words (client-go transport/transport.go
    TLSConfigFor)."""
    if not cfg.verify_ssl and cfg.ssl_ca_cert:
        raise UsageError("kubeconfig: specifying a root certificates file with the insecure flag is not allowed")
    ctx = _NamedTLS(ssl.PROTOCOL_TLS_CLIENT)
    ctx.server_name = str(getattr(cfg, "tls_server_name", None) or "") or None
    if cfg.verify_ssl:  # as ssl.create_default_context: the CA file, else the system's
        if cfg.ssl_ca_cert:
            ctx.load_verify_locations(cafile=cfg.ssl_ca_cert)
        else:
            ctx.load_default_certs()
    else:
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
