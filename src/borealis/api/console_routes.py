"""The web console: a page, its static files, and the JSON it reads and posts, served by
the API's HTTP server under ``/console``.

Who may: a session (cookie) made from the home's access key, by the login form or by
the one-time link ``borealis console`` prints (:mod:`borealis.console.sessions`). A post
must also carry ``X-Borealis-Console: 1``, which a page of another site cannot send
without the server's consent (nothing here grants it). The buttons call the same RDS
operations boto3 does (``FailoverDBCluster``, ``CreateDBInstance``,
``CreateDBClusterSnapshot``).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from borealis.console.sessions import COOKIE, SESSION_S, Sessions
from borealis.control import top_sql
from borealis.control.status import without_secrets
from borealis.metrics import catalog
from borealis.metrics.store import aggregate

if TYPE_CHECKING:
    from borealis.api.rds import RdsOperations
    from borealis.control.plane import ControlPlane

PREFIX = "/console"
CHARTS = ("AuroraReplicaLag", "CommitLatency", "CommitThroughput", "DatabaseConnections",
          "CPUUtilization", "ServerlessDatabaseCapacity")
_STATIC = {"console.js": "text/javascript", "console.css": "text/css",
           "chart.umd.min.js": "text/javascript", "index.html": "text/html",
           "login.html": "text/html", "favicon.svg": "image/svg+xml"}
_INSTANCE_ID = re.compile(r"-(\d+)$")


def _static(name: str) -> bytes:
    return resources.files("borealis.console").joinpath("static", name).read_bytes()


class ConsoleRoutes:
    def __init__(self, cp: ControlPlane, rds: RdsOperations) -> None:
        self.cp = cp
        self.rds = rds
        self.sessions = Sessions()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PREFIX, self.page)
        app.router.add_get(PREFIX + "/", self.page)
        app.router.add_get(PREFIX + "/static/{file}", self.static)
        app.router.add_get(PREFIX + "/login", self.link)
        app.router.add_post(PREFIX + "/login", self.login)
        app.router.add_post(PREFIX + "/logout", self.logout)
        app.router.add_get(PREFIX + "/api/clusters", self.clusters)
        app.router.add_get(PREFIX + "/api/clusters/{name}/metrics", self.metrics)
        app.router.add_get(PREFIX + "/api/clusters/{name}/events", self.events)
        app.router.add_get(PREFIX + "/api/clusters/{name}/top", self.top)
        app.router.add_post(PREFIX + "/api/clusters/{name}/{verb}", self.verb)

    # -- who may ---------------------------------------------------------------------------

    def new_link(self) -> str:
        """A one-time login token (for ``borealis console``)."""
        return self.sessions.new_link(time.time())

    def _signed_in(self, request: web.Request) -> bool:
        return self.sessions.valid(request.cookies.get(COOKIE), time.time())

    def _need_session(self, request: web.Request) -> None:
        if not self._signed_in(request):
            raise web.HTTPUnauthorized(text='{"error": "sign in first"}',
                                       content_type="application/json")

    def _signed_in_response(self, token: str) -> web.HTTPSeeOther:
        response = web.HTTPSeeOther(PREFIX + "/")
        response.set_cookie(COOKIE, token, max_age=SESSION_S, httponly=True,
                            samesite="Strict", path=PREFIX)
        return response

    async def link(self, request: web.Request) -> web.StreamResponse:
        token = self.sessions.use_link(request.query.get("token", ""), time.time())
        if token is None:
            raise web.HTTPForbidden(text="This link was used already or is too old: run "
                                         "borealis console for a new one.")
        raise self._signed_in_response(token)

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        key_id, secret = str(form.get("access_key_id", "")), str(form.get("secret", ""))
        known = dict(self.cp.state.access_keys())
        expected = known.get(key_id, "")
        if not expected or not hmac.compare_digest(expected.encode(), secret.encode()):
            raise web.HTTPSeeOther(PREFIX + "/?failed=1")
        raise self._signed_in_response(self.sessions.new_session(time.time()))

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.end(request.cookies.get(COOKIE))
        response = web.HTTPSeeOther(PREFIX + "/")
        response.del_cookie(COOKIE, path=PREFIX)
        raise response

    # -- the page -------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        name = "index.html" if self._signed_in(request) else "login.html"
        return web.Response(body=_static(name), content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; "
                                     "frame-ancestors 'none'", "Cache-Control": "no-store"})

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in _STATIC or name.endswith(".html"):
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=_STATIC[name])

    # -- what it reads ----------------------------------------------------------------------

    async def clusters(self, request: web.Request) -> web.Response:
        self._need_session(request)
        status = without_secrets(await self.cp.status())  # a page has no need of passwords
        return web.json_response({"clusters": status["clusters"], "now": time.time()})

    def _cluster(self, request: web.Request) -> str:
        self._need_session(request)
        name = request.match_info["name"]
        if self.cp.state.cluster(name) is None:
            raise web.HTTPNotFound(text='{"error": "no such cluster"}',
                                   content_type="application/json")
        return name

    async def metrics(self, request: web.Request) -> web.Response:
        """Every charted series of the cluster over the last ``minutes`` (5 s points)."""
        name = self._cluster(request)
        minutes = min(180, max(1, int(request.query.get("minutes", "15"))))
        now = time.time()
        start = now - minutes * 60
        ours = {i.id for i in self.cp.state.instances(name)}
        out: dict[str, list[dict[str, Any]]] = {m: [] for m in CHARTS}
        store = self.cp.metrics
        for metric, dims in await asyncio.to_thread(store.series, start):
            if metric not in out:
                continue
            d = catalog.parse_dimension_key(dims)
            if set(d) != {"DBInstanceIdentifier"} or d["DBInstanceIdentifier"] not in ours:
                continue  # one line per instance (the per-role sums would repeat them)
            buckets = await asyncio.to_thread(store.buckets, metric, dims, start, now, now, 5)
            points = aggregate(buckets, 5, ["Average"])
            label = d["DBInstanceIdentifier"]
            out[metric].append({"label": label, "t": [p["Timestamp"] for p in points],
                                "v": [round(p["Average"], 3) for p in points]})
        return web.json_response({"series": out, "now": now})

    async def events(self, request: web.Request) -> web.Response:
        name = self._cluster(request)
        return web.json_response({"events": self.cp.state.events(name, limit=50)})

    async def top(self, request: web.Request) -> web.Response:
        name = self._cluster(request)
        return web.json_response({"instances": await asyncio.to_thread(
            top_sql.top_statements, self.cp.runtime(name), 10)})

    # -- what it does ------------------------------------------------------------------------

    async def verb(self, request: web.Request) -> web.Response:
        name = self._cluster(request)
        if request.headers.get("X-Borealis-Console") != "1":
            raise web.HTTPForbidden(text='{"error": "a console request carries '
                                         'X-Borealis-Console: 1"}',
                                    content_type="application/json")
        verb = request.match_info["verb"]
        rds = self.rds
        if verb == "failover":
            await rds.handler("FailoverDBCluster")({"DBClusterIdentifier": name})
            return web.json_response({"done": f"failing over {name}"})
        if verb == "readers":
            taken = [int(m.group(1)) for i in self.cp.state.instances(name)
                     if (m := _INSTANCE_ID.search(i.id))]
            new = f"{name}-{max(taken, default=0) + 1}"
            await rds.handler("CreateDBInstance")({
                "DBInstanceIdentifier": new, "DBClusterIdentifier": name,
                "Engine": "aurora-postgresql", "DBInstanceClass": "db.r6g.large"})
            return web.json_response({"done": f"adding reader {new}"})
        if verb == "snapshots":
            snapshot = f"{name}-console-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            await rds.handler("CreateDBClusterSnapshot")({
                "DBClusterSnapshotIdentifier": snapshot, "DBClusterIdentifier": name})
            return web.json_response({"done": f"taking snapshot {snapshot}"})
        raise web.HTTPNotFound(text='{"error": "no such action"}',
                               content_type="application/json")
