"""The control plane's own ``/v1`` routes (what the ``borealis`` CLI calls besides the
RDS API): health, up and down, status, events, backups, restores, clones, backtracks,
snapshots and secrets. SigV4-signed like every API request; each route checks its
input, then calls the control plane's verbs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from borealis import identifiers
from borealis.api import prometheus
from borealis.api import secrets as api_secrets
from borealis.api import server as api_server
from borealis.api.host_routes import HostAdminRoutes, HostListeners
from borealis.control import backtrack, top_sql
from borealis.control.handle import ClusterError
from borealis.control.plane import ControlPlane
from borealis.times import format_time, parse_time

log = logging.getLogger("borealis.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlRoutes:
    """The ``/v1`` routes, one method each; :meth:`table` lists them."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def table(self) -> list[tuple[str, str, Handler]]:
        return [
            ("get", "/v1/health", self.health),
            ("get", "/v1/status", self.status),
            ("post", "/v1/clusters/{name}/up", self.up),
            ("get", "/v1/clusters/{name}", self.cluster),
            ("delete", "/v1/clusters/{name}", self.destroy),
            ("get", "/v1/clusters/{name}/events", self.events),
            ("get", "/v1/clusters/{name}/top", self.top),
            ("post", "/v1/secrets", self.create_secret),
            ("get", "/v1/secrets", self.list_secrets),
            ("delete", "/v1/secrets/{name:.+}", self.delete_secret),
            ("get", "/v1/clusters/{name}/backup", self.backup_status),
            ("post", "/v1/clusters/{name}/restore", self.restore_cluster),
            ("post", "/v1/clusters/{name}/clone", self.clone_cluster),
            ("post", "/v1/clusters/{name}/backtrack", self.backtrack_cluster),
            ("post", "/v1/snapshots", self.create_snapshot),
            ("get", "/v1/snapshots", self.list_snapshots),
            ("delete", "/v1/snapshots/{name}", self.delete_snapshot),
            ("post", "/v1/snapshots/{name}/restore", self.restore_snapshot),
            ("post", "/v1/down", self.down),
            ("get", "/v1/metrics-token", self.metrics_token),
        ]

    def need_cluster(self, name: str) -> None:
        if self.cp.state.cluster(name) is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"cluster {name!r} not found"}),
                                   content_type="application/json")

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "pid": os.getpid()})

    async def metrics_token(self, _: web.Request) -> web.Response:
        """What a Prometheus scrape of ``/metrics`` authenticates with."""
        return web.json_response({"token": prometheus.scrape_token(self.cp.state),
                                  "path": "/metrics"})

    async def status(self, _: web.Request) -> web.Response:
        return web.json_response(await self.cp.status())

    async def up(self, request: web.Request) -> web.Response:
        body = await request.json() if request.body_exists else {}
        readers = body.get("readers")
        if readers is not None and (not isinstance(readers, int) or not 0 <= readers <= 15):
            return _error(400, "readers must be an integer between 0 and 15")
        name = _identifier(request.match_info["name"], "cluster name")
        return web.json_response(await self.cp.up(name, readers))

    async def cluster(self, request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        return web.json_response(await self.cp.cluster_status(name))

    async def destroy(self, request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        await self.cp.destroy(name)
        return web.json_response({"destroyed": name})

    async def events(self, request: web.Request) -> web.Response:
        """The cluster's events in Borealis's own words (``since``: epoch seconds)."""
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            return _error(400, "since is seconds since the epoch")
        events = [e for e in self.cp.state.events(name, limit=100_000)
                  if float(str(e["time"])) >= since]
        return web.json_response({"events": events})

    async def top(self, request: web.Request) -> web.Response:
        """Each instance's top statements by total time (``limit``, default 10)."""
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        try:
            limit = int(request.query.get("limit", "10"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return _error(400, "limit is 1 to 100")
        rt = self.cp.runtime(name)
        return web.json_response({"instances": await asyncio.to_thread(
            top_sql.top_statements, rt, limit)})

    async def create_secret(self, request: web.Request) -> web.Response:
        body = await request.json()
        fields = {k: body.get(k) for k in ("name", "cluster", "user", "password")}
        if not all(isinstance(v, str) for k, v in fields.items()
                   if v is not None or k in ("name", "cluster")):
            return _error(400, "name and cluster are required; all fields are strings")
        return web.json_response(await api_secrets.create_secret(
            self.cp, fields["name"], fields["cluster"], fields["user"], fields["password"]))

    async def list_secrets(self, _: web.Request) -> web.Response:
        return web.json_response({"secrets": [
            api_secrets.describe(s.name, s.cluster, s.arn, s.username)
            for s in self.cp.state.secrets()]})

    async def delete_secret(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            identifiers.secret_name(name)
        except identifiers.BadIdentifier as exc:
            return _error(400, str(exc))
        if self.cp.state.secret(name) is None:
            return _error(404, f"secret {name!r} not found")
        self.cp.state.delete_secret(name)
        return web.json_response({"deleted": name})

    async def backup_status(self, request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        quick = request.query.get("verify") == "no"
        return web.json_response(await asyncio.to_thread(self.cp.backup_status, name, not quick))

    async def restore_cluster(self, request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        body = await request.json()
        new, readers = _new_cluster(body)
        target = None
        if body.get("to_time") is not None:
            try:
                target = parse_time(str(body["to_time"])).timestamp()
            except ValueError:
                return _error(400, f"not an ISO 8601 time: {body['to_time']!r} (for example "
                                   "2026-11-23T04:55:00.250Z)")
        elif not body.get("latest"):
            return _error(400, "give to_time or latest")
        src, user, password = self.cp.restore_source(cluster=name)
        await asyncio.to_thread(self.cp.check_restore, src, new, target)
        self.cp.start_restore(src, user, password, new, target, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    async def clone_cluster(self, request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        new, readers = _new_cluster(await request.json())
        await asyncio.to_thread(self.cp.check_clone, name, new)
        self.cp.start_clone(name, new, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    async def backtrack_cluster(self, request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        self.need_cluster(name)
        body = await request.json()
        try:
            target = parse_time(str(body.get("to_time"))).timestamp()
        except ValueError:
            return _error(400, f"not an ISO 8601 time: {body.get('to_time')!r} (for example "
                               "2026-11-23T04:55:00.250Z)")
        await asyncio.to_thread(backtrack.check, self.cp.runtime(name), target, time.time())
        self.cp.start_backtrack(name, target)
        return web.json_response({"cluster": name, "status": "backtracking"})

    async def create_snapshot(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = _identifier(body.get("name"), "snapshot name")
        cluster = _identifier(body.get("cluster"), "cluster name")
        self.need_cluster(cluster)
        self.cp.create_snapshot(cluster, name)
        return web.json_response(self.snapshot_json(name))

    async def list_snapshots(self, _: web.Request) -> web.Response:
        return web.json_response({"snapshots": [self.snapshot_json(s.name)
                                                for s in self.cp.state.snapshots()]})

    async def delete_snapshot(self, request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "snapshot name")
        await asyncio.to_thread(self.cp.delete_snapshot, name)
        return web.json_response({"deleted": name})

    async def restore_snapshot(self, request: web.Request) -> web.Response:
        new, readers = _new_cluster(await request.json())
        snapshot = _identifier(request.match_info["name"], "snapshot name")
        src, user, password = self.cp.restore_source(snapshot=snapshot)
        await asyncio.to_thread(self.cp.check_restore, src, new, None)
        self.cp.start_restore(src, user, password, new, None, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    def snapshot_json(self, name: str) -> dict[str, Any]:
        snap = self.cp.state.snapshot(name)
        assert snap is not None
        return {"name": snap.name, "cluster": snap.cluster, "status": snap.status,
                "time": format_time(snap.created), "bytes": snap.bytes}

    async def down(self, _: web.Request) -> web.Response:
        await self.cp.down_all()
        self.cp.stopping.set()
        return web.json_response({"stopped": True})


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):  # the AWS APIs answer in AWS's error shapes
        return await handler(request)  # type: ignore[no-any-return]
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ClusterError as exc:
        return _error(400, str(exc))
    except json.JSONDecodeError:
        return _error(400, "request body is not valid JSON")
    except web.HTTPException:
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"{type(exc).__name__}: {exc}")


def build_app(cp: ControlPlane, api: api_server.Api,
              listeners: HostListeners) -> web.Application:
    """The one HTTP app: the AWS APIs (``api``) and the ``/v1`` routes, every request
    signed (SigV4)."""
    app = web.Application(middlewares=[api.authenticate, errors],
                          client_max_size=api_server.MAX_REQUEST)
    hosts = HostAdminRoutes(cp.hosts, listeners, cp.processes_on_host)
    for method, path, handler in ControlRoutes(cp).table() + hosts.table():
        app.router.add_route(method.upper(), path, handler)
    api.add_routes(app)
    return app


def _new_cluster(body: dict[str, Any]) -> tuple[str, int]:
    """The new cluster's name and reader count of a restore, clone or snapshot restore."""
    new, readers = body.get("new_cluster"), body.get("readers") or 0
    new = _identifier(new, "new_cluster")
    if not isinstance(readers, int) or not 0 <= readers <= 15:
        raise ClusterError("readers must be an integer between 0 and 15")
    return new, readers


def _identifier(value: object, what: str) -> str:
    """A name from a ``/v1`` request, checked as the RDS API checks it."""
    try:
        return identifiers.identifier(value, what)
    except identifiers.BadIdentifier as exc:
        raise ClusterError(str(exc)) from None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
