"""A small protocol-faithful stand-in for kube-apiserver (nodes only).

Real parts: HTTP on a loopback TCP port, driven by katactl's real kubeconfig
loading (kubernetes.config) and HTTP client. Serves GET /api/v1/namespaces/NS/pods/NAME and GET /api/v1/nodes with
equality- and set-based label selectors (=, ==, !=, in, notin, exists, !key),
pagination (limit + continue tokens, metadata.continue), bearer-token auth
(401 Status object otherwise), 400 for a malformed selector.

Known differences from kube-apiserver: no TLS, no watch, no resourceVersion
semantics, field selectors ignored, continue tokens are plain offsets, only
the nodes resource exists (other paths: 404 Status).
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


_REQ = re.compile(r"^\s*(!?)([A-Za-z0-9._/-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def parse_selector(sel: str):
    """-> list of predicates on a labels dict; ValueError when malformed."""
    preds = []
    for part in _split(sel):
        m = _REQ.match(part)
        if not m or (m.group(1) and (m.group(3) or m.group(5))):
            raise ValueError(f"unable to parse requirement: {part!r}")
        neg, key, op, val, setop, vals = m.groups()
        if op in ("=", "=="):
            preds.append(lambda l, k=key, v=val: l.get(k) == v)
        elif op == "!=":
            preds.append(lambda l, k=key, v=val: l.get(k) != v)
        elif setop:
            vs = {x.strip() for x in vals.split(",")}
            preds.append((lambda l, k=key, vs=vs: l.get(k) in vs) if setop == "in"
                         else (lambda l, k=key, vs=vs: l.get(k) not in vs))
        elif neg:
            preds.append(lambda l, k=key: k not in l)
        else:
            preds.append(lambda l, k=key: k in l)
    return preds


def _split(sel: str):
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


class FakeKubeAPI:
    def __init__(self, nodes: dict[str, dict[str, str]], token: str = "test-token",
                 pods: dict[tuple[str, str], dict] | None = None):
        self.nodes = nodes  # name -> labels
        self.pods = pods or {}  # (namespace, name) -> {"nodeName": ..., "uid": ...}
        self.token = token
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                u = urlparse(self.path)
                m = re.match(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$", u.path)
                if m:
                    pod = outer.pods.get((m.group(1), m.group(2)))
                    if pod is None:
                        return self._send(404, _status(404, "NotFound", f'pods "{m.group(2)}" not found'))
                    return self._send(200, {"kind": "Pod", "apiVersion": "v1",
                                            "metadata": {"name": m.group(2), "namespace": m.group(1), "uid": pod["uid"]},
                                            "spec": {"nodeName": pod.get("nodeName"), "runtimeClassName": "kata"},
                                            "status": {"phase": "Running"}})
                if u.path != "/api/v1/nodes":
                    return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
                q = parse_qs(u.query)
                try:
                    preds = parse_selector(q.get("labelSelector", [""])[0])
                except ValueError as e:
                    return self._send(400, _status(400, "BadRequest", str(e)))
                names = sorted(n for n, l in outer.nodes.items() if all(p(l) for p in preds))
                start = int(q.get("continue", ["0"])[0])
                limit = int(q.get("limit", ["0"])[0]) or len(names)
                page = names[start:start + limit]
                meta = {"resourceVersion": "1"}
                if start + limit < len(names):
                    meta["continue"] = str(start + limit)
                self._send(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": meta,
                                 "items": [{"metadata": {"name": n, "labels": outer.nodes[n]}} for n in page]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path, token=None) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": self.url}}],
            "users": [{"name": "sre", "user": {"token": token or self.token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "sre"}}],
        }))
        return str(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
