"""Explicit notification: producers that know what they wrote tell the origin (`fleetsync publish`).

Published paths are only hints: they go through the same indexer (lstat + hash) as inotify
events, so a wrong or malicious hint cannot corrupt anything.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from typing import Any

from aiohttp import web

from fleetsync import paths
from fleetsync.errors import UnsafePath
from fleetsync.index.indexer import Indexer
from fleetsync.transport.wire import API

MAX_PUBLISH = 100_000


def resolve(root: bytes, raw: bytes) -> bytes:
    """Map an absolute path under root, or a root-relative path, to a validated relative path."""
    if raw.startswith(b"/"):
        norm = os.path.normpath(raw)
        if norm == root:
            return b""
        if not norm.startswith(root + b"/"):
            raise UnsafePath(f"{raw!r} is outside the origin root {root!r}")
        raw = norm[len(root) + 1:]
    return paths.validate(raw)


def publish_paths(indexer: Indexer, raw_paths: list[bytes]) -> dict[str, Any]:
    """Hand paths to the indexer; returns per-path outcomes."""
    accepted: list[dict[str, str]] = []
    rejected: list[dict[str, str]] = []
    for raw in raw_paths:
        shown = os.fsdecode(raw)
        try:
            rel = resolve(indexer.root, raw)
        except UnsafePath as e:
            rejected.append({"path": shown, "error": str(e)})
            continue
        if rel and indexer.ignore.ignored(rel):
            rejected.append({"path": shown, "error": "matches an upload temp-name pattern; publish the final name"})
            continue
        st = indexer.fs.lstat(rel) if rel else os.lstat(indexer.root)
        if st is None:
            if indexer.j.get(rel) is None:
                rejected.append({"path": shown, "error": "no such file or directory (and not replicated, so "
                                                         "nothing to delete)"})
                continue
            indexer.removed(rel)
            accepted.append({"path": shown, "action": "delete"})
        elif stat.S_ISDIR(st.st_mode):
            indexer.rescan(rel)
            accepted.append({"path": shown, "action": "directory: rescanning its subtree"})
        else:
            indexer.changed(rel, closed=True)
            accepted.append({"path": shown, "action": "update"})
    return {"accepted": accepted, "rejected": rejected}


def routes(indexer: Indexer, token: str | None) -> list[web.RouteDef]:
    """The POST /v1/publish route (token-protected; loopback-only when no token is configured)."""

    async def publish(request: web.Request) -> web.Response:
        if not token:
            try:
                if not ipaddress.ip_address(request.remote or "").is_loopback:
                    return web.json_response({"error": "publish without a token is only allowed from loopback"},
                                             status=403)
            except ValueError:
                return web.json_response({"error": "publish without a token is only allowed from loopback"},
                                         status=403)
        try:
            body = await request.json()
            items = body["paths"]
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "body must be JSON {\"paths\": [\"percent-encoded path\", …]}"},
                                     status=400)
        if len(items) > MAX_PUBLISH:
            return web.json_response({"error": f"at most {MAX_PUBLISH} paths per request"}, status=413)
        result = publish_paths(indexer, [paths.decode(x) for x in items])
        return web.json_response(result, status=200 if not result["rejected"] else 207)

    return [web.post(API + "/publish", publish)]
