"""The selected nodes' availability, kept current by a watch (an informer of one kind).

One paged list of the selection gives the nodes and a resourceVersion (or the list the
rollout's plan was just made from: ``seed``); a thread then watches
the nodes from there (its own client: threads sharing one httpcore pool can be handed a
connection another thread closes, encode/httpcore#1110) and applies ADDED/MODIFIED/DELETED
to the view, as client-go's reflector does:

- the server ends each watch after ``seconds`` (timeoutSeconds): watch again from the last
  resourceVersion seen (an event's or a BOOKMARK's);
- an ERROR event with a 410 Status (the resourceVersion fell out of the server's history):
  list again, then watch from the new list's resourceVersion;
- a connection lost or refused: watch again from the last resourceVersion, after a backoff
  (0.2 s doubling to 5 s); a client error that will not heal (401/403/400): stop watching
  (the engine then lists, as without the view).

With a label selector, a node whose labels stop matching leaves the watch as DELETED (the real
server's cache_watcher.go convertToWatchEvent): it is gone from the view, as it would be from
a list with that selector, and counts as out of service like a deleted node.

:meth:`NodeView.fresh` says whether the view may be used for the max-unavailable check: it
is synced (a list, then a watch) and the server was last heard from (the watch opened, an
event, a bookmark, or its orderly end) at most ``max(poll, seconds + 1)`` ago: the renewal
every ``seconds`` is the heartbeat that also bounds a connection that died without a word
(no FIN, no RST). A break noticed is unhealthy after ``poll`` at once. The engine lists
instead whenever the view is not fresh.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from katactl.errors import AuthError, KatactlError, ProtocolError, UsageError
from katactl.rollout.plan import NodeInfo, info_of

#: the longest watch the view asks for (its renewal is its heartbeat, see NodeView.fresh)
WATCH_MAX = 60
BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0


def watch_seconds(poll: float) -> int:
    """timeoutSeconds of each watch: half the poll interval (an integer, at least 1), so
    that its renewal proves the connection alive within the poll interval."""
    return max(1, min(WATCH_MAX, int(poll // 2)))


class NodeView:
    """``nodes``: name -> NodeInfo of the selected nodes the server has; ``out``: the
    selected names out of service (unschedulable, not Ready, or gone), kept as events
    come. ``on_change()`` is called (from the watch thread) when ``out`` changed."""

    def __init__(self, make_api: Callable[[], Any], names: set[str], selector: str | None, poll: float, *,
                 on_change: Callable[[], None] = lambda: None, on_warning: Callable[[str], None] = lambda m: None,
                 clock: Callable[[], float] = time.monotonic, seed: tuple[str, list[NodeInfo]] | None = None):
        self._make_api = make_api
        self.names = set(names)
        self.selector = selector
        self.poll = poll
        self.seconds = watch_seconds(poll)
        self.stale_after = max(poll, self.seconds + 1.0)
        self.on_change, self.on_warning, self.clock = on_change, on_warning, clock
        self.lock = threading.Lock()
        self.nodes: dict[str, NodeInfo] = {}
        self.out: set[str] = set(self.names)
        self.rv: str | None = None
        self.synced = False
        self.heard = 0.0                    # clock() of the server's last word
        self.broken_since: float | None = None
        self.stats = {"lists": 0, "watches": 0, "expired": 0, "errors": 0, "events": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._api: Any = None
        self._seed = seed

    # -- the engine's side ----------------------------------------------------------
    def start(self) -> None:
        """List once (here: the first max-unavailable check can use it), or take the seed
        (resourceVersion, NodeInfos) of a list just made, then watch in a thread from its
        resourceVersion (too old by then: 410, a list). A failed list is retried by the
        thread; meanwhile the engine lists."""
        self._api = self._make_api()
        if self._seed is not None:
            rv, infos = self._seed
            nodes = {i.name: i for i in infos if i.name in self.names}
            with self.lock:
                self.nodes, self.rv = nodes, rv
                self.out = {n for n in self.names if n not in nodes or nodes[n].out}
                self.synced, self.heard, self.broken_since = True, self.clock(), None
            self.on_change()
        else:
            try:
                self._relist()
            except KatactlError:
                pass
        self._thread = threading.Thread(target=self._loop, name="katactl-rollout-nodewatch", daemon=True)
        self._thread.start()

    def fresh(self) -> bool:
        with self.lock:
            if not self.synced:
                return False
            now = self.clock()
            if self.broken_since is not None and now - self.broken_since > self.poll:
                return False
            return now - self.heard <= self.stale_after

    def snapshot(self) -> tuple[dict[str, NodeInfo], set[str]]:
        """The nodes (the view's own dict: read it, do not change it) and a copy of ``out``."""
        with self.lock:
            return self.nodes, set(self.out)

    def stop(self, timeout: float | None = None) -> None:
        """End the watch thread (its read is cut at once) and close its client."""
        self._stop.set()
        api = self._api
        if api is not None:
            api.abort_watches()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            # a list under way is not cut: it ends within the request timeout
            t.join(timeout if timeout is not None else getattr(api, "timeout", 30.0) + 5.0)
        if api is not None and not (t is not None and t.is_alive()):
            api.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the watch thread ------------------------------------------------------------
    def _relist(self) -> None:
        nodes: dict[str, NodeInfo] = {}
        meta: dict = {}
        for page in self._api.list_pages("/api/v1/nodes", meta=meta, labelSelector=self.selector):
            for n in page:
                name = n["metadata"]["name"]
                if name in self.names:
                    nodes[name] = info_of(n, None)
        rv = meta.get("resourceVersion")
        if not rv:
            raise ProtocolError("Kubernetes API: a node list without metadata.resourceVersion: cannot watch")
        out = {n for n in self.names if n not in nodes or nodes[n].out}
        with self.lock:
            changed = out != self.out
            self.nodes, self.out, self.rv = nodes, out, rv
            self.synced, self.heard, self.broken_since = True, self.clock(), None
            self.stats["lists"] += 1
        if changed:
            self.on_change()

    def _apply(self, ev: dict) -> None:
        obj = ev["object"]
        md = obj.get("metadata") or {}
        typ = ev.get("type")
        with self.lock:
            self.heard = self.clock()
            if md.get("resourceVersion"):
                self.rv = md["resourceVersion"]
            self.stats["events"] += 1
            name = md.get("name")
            if typ == "BOOKMARK" or name not in self.names:
                return
            was = name in self.out
            if typ == "DELETED":
                self.nodes.pop(name, None)
                self.out.add(name)
            elif typ in ("ADDED", "MODIFIED"):
                info = self.nodes[name] = info_of(obj, None)
                if info.out:
                    self.out.add(name)
                else:
                    self.out.discard(name)
            changed = was != (name in self.out)
        if changed:
            self.on_change()

    def _loop(self) -> None:
        from katactl.backends.kube import WatchExpired

        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                if not self.synced:
                    self._relist()
                with self.lock:
                    rv = self.rv
                    self.stats["watches"] += 1
                for ev in self._api.watch("/api/v1/nodes", resource_version=rv, timeout_seconds=self.seconds,
                                          on_open=self._opened, labelSelector=self.selector):
                    self._apply(ev)
                # the server ended it in order (timeoutSeconds): that was a word too
                with self.lock:
                    self.heard, self.broken_since = self.clock(), None
                backoff = BACKOFF_MIN
            except WatchExpired:
                with self.lock:
                    self.synced = False
                    self.stats["expired"] += 1
            except (AuthError, UsageError) as e:
                if not self._stop.is_set():
                    self.on_warning(f"cannot watch the nodes ({e.message}): listing them instead")
                self._broken()
                return
            except Exception:  # noqa: BLE001 - lost, refused, 5xx: watch again after a backoff
                if self._stop.is_set():
                    return
                self._broken()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _opened(self) -> None:
        with self.lock:
            self.heard, self.broken_since = self.clock(), None

    def _broken(self) -> None:
        with self.lock:
            self.stats["errors"] += 1
            if self.broken_since is None:
                self.broken_since = self.clock()
