"""The kube client's pool discipline against the stand-in: no request ever waits inside
httpcore's connection pool (encode/httpcore#1110: a request queued there can be handed a
connection another thread's pass then closes under it: a 30 s hang or EBADF)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpcore

from katactl import config
from katactl.backends import kube as kube_backend
from katactl.backends.kube import KubeAPI


def test_no_more_requests_inside_the_pool_than_connections(kube, tmp_path):
    """64 threads (a drain evicts with up to 128) share one KubeAPI while each answer takes
    50 ms: at most POOL_SIZE of them are ever inside httpcore's pool; the rest wait in
    katactl's own semaphore. httpcore is observed, not replaced: its handle_request runs."""
    kube.add_node("n1")
    kube.delay(r"/api/v1/nodes/n1", 0.05)
    api = KubeAPI.from_settings(config.resolve({"kubeconfig": kube.kubeconfig(tmp_path / "kc")}))
    real = httpcore.ConnectionPool.handle_request
    lock, inside, most = threading.Lock(), [0], [0]

    def observed(pool, request):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return real(pool, request)
        finally:
            with lock:
                inside[0] -= 1

    httpcore.ConnectionPool.handle_request = observed  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(max_workers=64) as ex:
            names = list(ex.map(lambda _: api.request("GET", "/api/v1/nodes/n1")["metadata"]["name"], range(256)))
    finally:
        httpcore.ConnectionPool.handle_request = real  # type: ignore[method-assign]
        api.close()
    assert names == ["n1"] * 256
    assert 1 < most[0] <= kube_backend.POOL_SIZE, most[0]
