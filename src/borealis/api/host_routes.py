"""Where agents reach the control plane: HTTPS listeners on addresses other hosts can
route to (the API itself stays on loopback, SigV4-signed).

Two routes only: ``GET /v1/ca`` (the CA certificate; a joining agent checks it against
its token's fingerprint) and ``POST /v1/hosts/join`` (a token's secret for the host's
certificate). Listeners are added at run time (``borealis lab up`` adds the lab's
gateway) and kept in the state, so a restarted control plane listens there again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from borealis import pki
from borealis.agent.client import AgentRefused, AgentUnreachable
from borealis.control.hosts import Host, HostError, HostRegistry
from borealis.protocol.agent import AGENT_PORT, AgentProtocolError

log = logging.getLogger("borealis.api")

LISTENERS_SETTING = "host_listeners"


class HostListeners:
    def __init__(self, registry: HostRegistry, port: int) -> None:
        self.registry = registry
        self.port = port
        self._runner: web.AppRunner | None = None
        self._sites: dict[str, web.TCPSite] = {}

    def addresses(self) -> list[str]:
        return list(json.loads(self.registry.state.setting(LISTENERS_SETTING) or "[]"))

    def url(self, address: str) -> str:
        return f"https://{address}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/v1/ca", self._ca)
        app.router.add_post("/v1/hosts/join", self._join)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for address in self.addresses():
            try:
                await self._listen(address)
            except OSError as exc:  # the address is gone (a lab taken down meanwhile)
                log.warning("cannot listen for agents on %s:%d: %s", address, self.port, exc)

    async def _listen(self, address: str) -> None:
        assert self._runner is not None
        if address in self._sites:
            return
        ctx = self._context(address)
        site = web.TCPSite(self._runner, address, self.port, ssl_context=ctx)
        await site.start()
        self._sites[address] = site
        log.info("listening for agents on %s", self.url(address))

    def _context(self, address: str) -> ssl.SSLContext:
        # The listener's certificate names its address.
        return pki.server_context(self.registry.server_pair(address),
                                  self.registry.ca().cert_pem, require_client_cert=False)

    async def add(self, address: str) -> str:
        await self._listen(address)
        kept = self.addresses()
        if address not in kept:
            self.registry.state.set_setting(LISTENERS_SETTING, json.dumps([*kept, address]))
        return self.url(address)

    async def remove(self, address: str) -> None:
        site = self._sites.pop(address, None)
        if site is not None:
            await site.stop()
        kept = [a for a in self.addresses() if a != address]
        self.registry.state.set_setting(LISTENERS_SETTING, json.dumps(kept))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ca(self, _: web.Request) -> web.Response:
        return web.Response(text=self.registry.ca().cert_pem, content_type="text/plain")

    async def _join(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            secret = body["secret"]
            if not isinstance(secret, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": 'a join is {"secret": "..."}'}, status=400)
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        local = sockname[0] if sockname else "127.0.0.1"
        try:
            identity = self.registry.join(secret, self.url(local))
        except HostError as exc:
            return web.json_response({"error": str(exc)}, status=403)
        log.info("host %s (%s, AZ %s) joined", identity.host, identity.address, identity.az)
        return web.json_response(identity.to_json())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AGENT_PROBE_S = 2.0


class HostAdminRoutes:
    """The signed ``/v1`` routes of ``borealis host`` and of the lab's listener."""

    def __init__(self, registry: HostRegistry, listeners: HostListeners,
                 holding: Callable[[str], list[str]]) -> None:
        self.registry = registry
        self.listeners = listeners
        self.holding = holding  # host name -> the processes placed there

    def table(self) -> list[tuple[str, str, Handler]]:
        return [
            ("get", "/v1/hosts", self.list_hosts),
            ("post", "/v1/hosts", self.add_host),
            ("delete", "/v1/hosts/{name}", self.remove_host),
            ("post", "/v1/listeners", self.add_listener),
            ("delete", "/v1/listeners/{address}", self.remove_listener),
        ]

    async def list_hosts(self, _: web.Request) -> web.Response:
        hosts = self.registry.hosts()
        reports = await asyncio.gather(*(asyncio.to_thread(self._probe, h) for h in hosts))
        return web.json_response({"hosts": reports, "listeners": [
            self.listeners.url(a) for a in self.listeners.addresses()]})

    def _probe(self, host: Host) -> dict[str, object]:
        report = host.to_json()
        report["holds"] = self.holding(host.name)
        if not host.joined:
            return report
        try:
            client = self.registry.client(host)
            client.timeout_s = AGENT_PROBE_S
            info = client.info()
        except (AgentUnreachable, AgentRefused) as exc:
            report["agent"] = f"unreachable: {exc}"
            return report
        report.update(agent="up", boot_id=info.boot_id, root=info.root,
                      processes=len(info.processes))
        return report

    async def add_host(self, request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            token = self.registry.add(str(body.get("name", "")), str(body.get("address", "")),
                                      str(body.get("az", "")),
                                      int(body.get("port") or AGENT_PORT))
        except (HostError, AgentProtocolError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"host": self.registry.host(str(body["name"])).to_json(),
                                  "token": token, "join": [
                                      self.listeners.url(a) for a in self.listeners.addresses()]})

    async def remove_host(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            self.registry.remove(name, self.holding(name))
        except HostError as exc:
            status = 404 if str(exc).startswith("no host") else 409
            return web.json_response({"error": str(exc)}, status=status)
        return web.json_response({"removed": name})

    async def add_listener(self, request: web.Request) -> web.Response:
        address = str((await _body(request)).get("address", ""))
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return web.json_response({"error": f"{address!r} is not an IP address"},
                                     status=400)
        try:
            url = await self.listeners.add(address)
        except OSError as exc:
            return web.json_response({"error": f"cannot listen on {address}: {exc}"},
                                     status=409)
        return web.json_response({"url": url})

    async def remove_listener(self, request: web.Request) -> web.Response:
        await self.listeners.remove(request.match_info["address"])
        return web.json_response({"removed": request.match_info["address"]})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.body_exists else {}
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "the body is not JSON"}),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the body is a JSON object"}),
                                 content_type="application/json")
    return body
