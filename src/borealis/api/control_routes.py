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
from typing import Any

from aiohttp import web

from borealis import identifiers
from borealis.api import secrets as api_secrets
from borealis.api import server as api_server
from borealis.control import backtrack
from borealis.control.handle import ClusterError
from borealis.control.plane import ControlPlane
from borealis.times import format_time, parse_time

log = logging.getLogger("borealis.api")


def build_app(cp: ControlPlane, api: api_server.Api) -> web.Application:
    routes = web.RouteTableDef()

    def need_cluster(name: str) -> None:
        if cp.state.cluster(name) is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"cluster {name!r} not found"}),
                                   content_type="application/json")

    @routes.get("/v1/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "pid": os.getpid()})

    @routes.get("/v1/status")
    async def status(_: web.Request) -> web.Response:
        return web.json_response(await cp.status())

    @routes.post("/v1/clusters/{name}/up")
    async def up(request: web.Request) -> web.Response:
        body = await request.json() if request.body_exists else {}
        readers = body.get("readers")
        if readers is not None and (not isinstance(readers, int) or not 0 <= readers <= 15):
            return _error(400, "readers must be an integer between 0 and 15")
        name = _identifier(request.match_info["name"], "cluster name")
        return web.json_response(await cp.up(name, readers))

    @routes.get("/v1/clusters/{name}")
    async def cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        return web.json_response(await cp.cluster_status(name))

    @routes.delete("/v1/clusters/{name}")
    async def destroy(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        await cp.destroy(name)
        return web.json_response({"destroyed": name})

    @routes.get("/v1/clusters/{name}/events")
    async def events(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        return web.json_response({"events": cp.state.events(name)})

    @routes.post("/v1/secrets")
    async def create_secret(request: web.Request) -> web.Response:
        body = await request.json()
        fields = {k: body.get(k) for k in ("name", "cluster", "user", "password")}
        if not all(isinstance(v, str) for k, v in fields.items()
                   if v is not None or k in ("name", "cluster")):
            return _error(400, "name and cluster are required; all fields are strings")
        return web.json_response(await api_secrets.create_secret(
            cp, fields["name"], fields["cluster"], fields["user"], fields["password"]))

    @routes.get("/v1/secrets")
    async def list_secrets(_: web.Request) -> web.Response:
        return web.json_response({"secrets": [
            api_secrets.describe(s.name, s.cluster, s.arn, s.username)
            for s in cp.state.secrets()]})

    @routes.delete("/v1/secrets/{name:.+}")
    async def delete_secret(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            identifiers.secret_name(name)
        except identifiers.BadIdentifier as exc:
            return _error(400, str(exc))
        if cp.state.secret(name) is None:
            return _error(404, f"secret {name!r} not found")
        cp.state.delete_secret(name)
        return web.json_response({"deleted": name})

    @routes.get("/v1/clusters/{name}/backup")
    async def backup_status(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        quick = request.query.get("verify") == "no"
        return web.json_response(await asyncio.to_thread(cp.backup_status, name, not quick))

    @routes.post("/v1/clusters/{name}/restore")
    async def restore_cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
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
        src, user, password = cp.restore_source(cluster=name)
        await asyncio.to_thread(cp.check_restore, src, new, target)
        cp.start_restore(src, user, password, new, target, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    @routes.post("/v1/clusters/{name}/clone")
    async def clone_cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        new, readers = _new_cluster(await request.json())
        await asyncio.to_thread(cp.check_clone, name, new)
        cp.start_clone(name, new, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    @routes.post("/v1/clusters/{name}/backtrack")
    async def backtrack_cluster(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "cluster name")
        need_cluster(name)
        body = await request.json()
        try:
            target = parse_time(str(body.get("to_time"))).timestamp()
        except ValueError:
            return _error(400, f"not an ISO 8601 time: {body.get('to_time')!r} (for example "
                               "2026-11-23T04:55:00.250Z)")
        await asyncio.to_thread(backtrack.check, cp.runtime(name), target, time.time())
        cp.start_backtrack(name, target)
        return web.json_response({"cluster": name, "status": "backtracking"})

    @routes.post("/v1/snapshots")
    async def create_snapshot(request: web.Request) -> web.Response:
        body = await request.json()
        name = _identifier(body.get("name"), "snapshot name")
        cluster = _identifier(body.get("cluster"), "cluster name")
        need_cluster(cluster)
        cp.create_snapshot(cluster, name)
        return web.json_response(snapshot_json(name))

    @routes.get("/v1/snapshots")
    async def list_snapshots(_: web.Request) -> web.Response:
        return web.json_response({"snapshots": [snapshot_json(s.name)
                                                for s in cp.state.snapshots()]})

    @routes.delete("/v1/snapshots/{name}")
    async def delete_snapshot(request: web.Request) -> web.Response:
        name = _identifier(request.match_info["name"], "snapshot name")
        await asyncio.to_thread(cp.delete_snapshot, name)
        return web.json_response({"deleted": name})

    @routes.post("/v1/snapshots/{name}/restore")
    async def restore_snapshot(request: web.Request) -> web.Response:
        new, readers = _new_cluster(await request.json())
        snapshot = _identifier(request.match_info["name"], "snapshot name")
        src, user, password = cp.restore_source(snapshot=snapshot)
        await asyncio.to_thread(cp.check_restore, src, new, None)
        cp.start_restore(src, user, password, new, None, readers)
        return web.json_response({"cluster": new, "status": "creating"})

    def snapshot_json(name: str) -> dict[str, Any]:
        snap = cp.state.snapshot(name)
        assert snap is not None
        return {"name": snap.name, "cluster": snap.cluster, "status": snap.status,
                "time": format_time(snap.created), "bytes": snap.bytes}

    @routes.post("/v1/down")
    async def down(_: web.Request) -> web.Response:
        await cp.down_all()
        cp.stopping.set()
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

    app = web.Application(middlewares=[api.authenticate, errors],
                          client_max_size=api_server.MAX_REQUEST)
    app.add_routes(routes)
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
