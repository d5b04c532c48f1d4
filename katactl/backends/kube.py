"""Kubernetes API access: kubeconfig loading from the official client, raw
HTTP through httpx for the calls themselves.

The generated API classes of the kubernetes package cost ~0.6 s to import and
touch (python-cli.md); katactl only needs a few list calls, so it borrows the
client's kubeconfig handling (contexts, exec plugins, certificates) and sends
plain requests. Paginated (limit/continue) and retried on 429/5xx.
"""
from __future__ import annotations

import time

from katactl.errors import AuthError, OperationFailed, UnreachableError, UsageError

PAGE = 500
RETRIES = 3


class KubeAPI:
    def __init__(self, host: str, headers: dict, verify, cert, timeout: float):
        import httpx

        self.host = host.rstrip("/")
        self._client = httpx.Client(base_url=self.host, headers=headers, verify=verify, cert=cert,
                                    timeout=timeout, trust_env=False)

    @classmethod
    def from_settings(cls, settings) -> "KubeAPI":
        try:
            from kubernetes import config as kconfig
            from kubernetes.client import Configuration
        except ImportError:  # pragma: no cover - a declared dependency
            raise OperationFailed("the kubernetes package is not installed") from None
        cfg = Configuration()
        try:
            kconfig.load_kube_config(config_file=settings.kubeconfig, context=settings.context,
                                     client_configuration=cfg, persist_config=False)
        except kconfig.ConfigException as e:
            raise UsageError(f"kubeconfig: {e}") from None
        except FileNotFoundError as e:
            raise UsageError(f"kubeconfig: {e.filename or e}: no such file") from None
        headers = {"Accept": "application/json", "User-Agent": "katactl"}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        verify = (cfg.ssl_ca_cert or True) if cfg.verify_ssl else False
        cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file else None
        return cls(cfg.host, headers, verify, cert, settings.request_timeout)

    def get(self, path: str, params: dict | None = None) -> dict:
        import httpx

        for attempt in range(RETRIES + 1):
            try:
                r = self._client.get(path, params=params)
            except httpx.TimeoutException:
                err: Exception = UnreachableError(f"Kubernetes API {self.host}: timed out")
            except httpx.TransportError as e:
                err = UnreachableError(f"Kubernetes API {self.host}: {e}")
            else:
                if r.status_code == 200:
                    return r.json()
                msg = _status_message(r)
                if r.status_code in (401, 403):
                    raise AuthError(f"Kubernetes API {self.host}: {msg}")
                if r.status_code == 400:
                    raise UsageError(f"Kubernetes API rejected the request: {msg}")
                if r.status_code == 410:  # continue token expired: the caller restarts
                    raise OperationFailed(f"Kubernetes API: list expired while paging ({msg})")
                if r.status_code not in (429, 500, 502, 503, 504):
                    raise OperationFailed(f"Kubernetes API {path}: HTTP {r.status_code}: {msg}")
                err = OperationFailed(f"Kubernetes API {path}: HTTP {r.status_code}: {msg}")
            if attempt == RETRIES:
                raise err
            time.sleep(min(0.2 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")

    def list(self, path: str, **params) -> list[dict]:
        """All items of a list endpoint, following ``continue`` tokens."""
        items: list[dict] = []
        cont = None
        while True:
            q = {k: v for k, v in params.items() if v is not None}
            q["limit"] = PAGE
            if cont:
                q["continue"] = cont
            page = self.get(path, q)
            items.extend(page.get("items") or [])
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                return items

    def close(self) -> None:
        self._client.close()


def _status_message(r) -> str:
    try:
        d = r.json()
        return d.get("message") or d.get("reason") or r.text[:200]
    except ValueError:
        return r.text[:200] or r.reason_phrase


def node_names(settings) -> list[str]:
    """Names of the nodes matching settings.selector (-l)."""
    api = KubeAPI.from_settings(settings)
    try:
        nodes = api.list("/api/v1/nodes", labelSelector=settings.selector)
    finally:
        api.close()
    names = [n["metadata"]["name"] for n in nodes]
    if not names:
        from katactl.errors import NotFound

        raise NotFound(f"no node matches selector {settings.selector!r}")
    return names


def pod_location(settings, namespace: str, name: str) -> dict:
    """{node, uid, namespace, name} of a pod, for ``pod/NAMESPACE/NAME`` targets."""
    api = KubeAPI.from_settings(settings)
    try:
        try:
            pod = api.get(f"/api/v1/namespaces/{_seg(namespace)}/pods/{_seg(name)}")
        except OperationFailed as e:
            if "HTTP 404" in e.message:
                from katactl.errors import NotFound

                raise NotFound(f"pod {namespace}/{name} not found") from None
            raise
    finally:
        api.close()
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        raise OperationFailed(f"pod {namespace}/{name} is not scheduled on a node yet")
    return {"node": node, "uid": pod["metadata"].get("uid"), "namespace": namespace, "name": name}


def _seg(s: str) -> str:
    """A Kubernetes name as one URL path segment (names are DNS labels; refuse anything else)."""
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", s or ""):
        raise UsageError(f"invalid Kubernetes name {s!r}")
    return s
