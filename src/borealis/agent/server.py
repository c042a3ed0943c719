"""``borealis agent``: starts, stops and reports one host's processes on the control
plane's command, and keeps them running while the control plane is away.

HTTPS with mutual TLS: the agent serves with the certificate it received when it joined
and answers only a client whose certificate the deployment's CA signed for the control
plane. Processes are started in their own session (they outlive the agent); the table of
what should run is kept in ``<root>/agent/processes.json``, so a restarted agent adopts
the processes that still run (by PID and command line, never by name) and restarts the
ones to keep that do not.

    python -m borealis.agent.server --root DIR   (after ``borealis agent --join``)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from borealis import pki, processes
from borealis.compute import postgres as pg
from borealis.compute import server
from borealis.fsync import write_atomic
from borealis.protocol.agent import (
    CONTROL_PLANE_CN,
    FILES,
    KINDS,
    AgentInfo,
    AgentProtocolError,
    Identity,
    ProcessKey,
    ProcessReport,
    ProcessSpec,
)
from borealis.protocol.files import ServerConfig

log = logging.getLogger("borealis.agent")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEEP_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 30.0
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "KILL": signal.SIGKILL,
           "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT, "HUP": signal.SIGHUP}


def identity_path(root: Path) -> Path:
    return root / "agent" / "identity.json"


@dataclass
class Entry:
    spec: ProcessSpec
    pid: int | None = None
    restarts: int = 0


class Agent:
    def __init__(self, identity: Identity, root: Path) -> None:
        self.identity = identity
        self.root = root
        self.table: dict[ProcessKey, Entry] = {}
        self._lock = asyncio.Lock()
        self._load()

    # -- the table ------------------------------------------------------------------------

    def _table_path(self) -> Path:
        return self.root / "agent" / "processes.json"

    def _load(self) -> None:
        try:
            rows = json.loads(self._table_path().read_text())
        except FileNotFoundError:
            return
        for row in rows:
            key = ProcessKey(row["cluster"], row["kind"], row["name"])
            self.table[key] = Entry(ProcessSpec(key, row["config"], row["keep"]), row["pid"],
                                    row.get("restarts", 0))

    def _save(self) -> None:
        rows = [{"cluster": k.cluster, "kind": k.kind, "name": k.name, "config": e.spec.config,
                 "keep": e.spec.keep, "pid": e.pid, "restarts": e.restarts}
                for k, e in self.table.items()]
        write_atomic(self._table_path(), json.dumps(rows, indent=1), make_parent=True)

    def folder(self, key: ProcessKey) -> Path:
        return self.root / key.path()

    def config_path(self, key: ProcessKey) -> Path:
        return self.folder(key) / "config.json"

    def marker(self, key: ProcessKey) -> str:
        """What the command line of the process holds: its folder (the config's path for
        the Python processes; the data directory's for a postmaster, which the kind
        ``postgres`` becomes)."""
        return f"{self.folder(key)}/"

    def alive(self, key: ProcessKey) -> bool:
        entry = self.table.get(key)
        return entry is not None and processes.alive(entry.pid, self.marker(key))

    def report(self, key: ProcessKey) -> ProcessReport:
        entry = self.table[key]
        alive = self.alive(key)
        usage = (processes.tree_usage(entry.pid) if alive and entry.pid
                 and key.kind == "postgres" else None)
        return ProcessReport(key.cluster, key.kind, key.name, entry.pid, alive,
                             entry.spec.keep, entry.restarts,
                             usage.cpu_s if usage else None,
                             usage.read_bytes if usage else None,
                             usage.write_bytes if usage else None)

    def info(self) -> AgentInfo:
        i = self.identity
        reports = [self.report(k) for k in sorted(
            self.table, key=lambda k: (k.cluster, k.kind, k.name))]
        return AgentInfo(i.host, i.az, i.address, i.port, str(self.root),
                         processes.current_boot_id(), os.getpid(), reports,
                         processes.available_memory())

    # -- verbs -----------------------------------------------------------------------------

    def ensure(self, spec: ProcessSpec) -> ProcessReport:
        """Run the process with this config unless it runs already. A new config is
        written for the next start; a running process is not restarted for it (the
        control plane stops it first when it must)."""
        key = spec.key
        entry = self.table.setdefault(key, Entry(spec))
        entry.spec = spec
        write_atomic(self.config_path(key), spec.config, make_parent=True)
        if not self.alive(key):
            self._start(key, entry)
        self._save()
        return self.report(key)

    def _start(self, key: ProcessKey, entry: Entry) -> None:
        entry.pid = processes.spawn_python(KINDS[key.kind],
                                           ["--config", str(self.config_path(key))],
                                           self.folder(key) / "process.log")
        log.info("started %s %s of %s (pid %d)", key.kind, key.name, key.cluster, entry.pid)

    def stop(self, key: ProcessKey, sig: int, timeout_s: float, forget: bool) -> bool:
        """Stop the process (SIGKILL after the timeout); ``forget`` drops it from the
        table and removes its folder, else it stays known (not kept) with its files.
        Returns whether it ran."""
        entry = self.table.get(key)
        if entry is None:
            return False
        ran = self.alive(key)
        entry.spec = ProcessSpec(key, entry.spec.config, keep=False)
        self._save()  # not restarted meanwhile, even by an agent restarted now
        processes.stop(entry.pid, self.marker(key), sig, timeout_s)
        if key.kind == "postgres":  # backends that outlived their postmaster go with it
            pg.end_orphans(pg.find_bindir(), server.datadir_of(self.config_path(key)))
        if forget:
            del self.table[key]
            shutil.rmtree(self.folder(key), ignore_errors=True)
        self._save()
        return ran

    def reload(self, spec: ProcessSpec) -> bool:
        """A new config for a known process; a running server applies it at once (its
        settings and certificate rewritten, then SIGHUP), any other process at its next
        start. True if it was running."""
        entry = self.table.get(spec.key)
        if entry is None:
            raise AgentProtocolError(f"no process {spec.key.path()} to reload")
        entry.spec = ProcessSpec(spec.key, spec.config, entry.spec.keep)
        write_atomic(self.config_path(spec.key), spec.config, make_parent=True)
        self._save()
        if not self.alive(spec.key) or spec.key.kind != "postgres":
            return False
        datadir = server.datadir_of(self.config_path(spec.key))
        server.apply(ServerConfig.from_json(spec.config), datadir, pg.RunAs.detect())
        return self.signal(spec.key, signal.SIGHUP)

    def install_data(self, key: ProcessKey, archive: Path) -> None:
        """A stopped server's data directory made from a tar archive the control plane
        sent (a restored or cloned writer made on its machine, or the base image a lost
        writer is rebuilt from); whatever data directory was there goes. Unpacked aside
        and renamed when whole, as a copy is (:func:`borealis.compute.server.prepare`)."""
        if key.kind != "postgres":
            raise AgentProtocolError("only a PostgreSQL server takes a data directory")
        if self.alive(key):
            raise AgentProtocolError(f"{key.path()} is running: stop it first")
        folder = self.folder(key)
        datadir = server.datadir_of(self.config_path(key))
        making = datadir.with_name(server.DATA + ".making")
        shutil.rmtree(making, ignore_errors=True)
        making.mkdir(mode=0o700, parents=True)
        try:
            with tarfile.open(archive) as tar:
                # The "data" filter refuses members that would land outside the folder,
                # links out of it and device files.
                tar.extractall(making, filter="data")
        except (tarfile.TarError, OSError) as exc:
            shutil.rmtree(making, ignore_errors=True)
            raise AgentProtocolError(f"the data directory sent is unusable: {exc}") from None
        run_as = pg.RunAs.detect()
        run_as.ensure_traversable(folder)
        os.chmod(making, 0o700)
        run_as.own(making)
        shutil.rmtree(datadir, ignore_errors=True)
        os.rename(making, datadir)
        log.info("data directory of %s installed (%d bytes sent)", key.path(),
                 archive.stat().st_size)

    def signal(self, key: ProcessKey, sig: int) -> bool:
        """Send a signal (a test's freeze and thaw); True if the process ran."""
        entry = self.table.get(key)
        if entry is None or not self.alive(key):
            return False
        assert entry.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, sig)
        return True

    def keep_running(self) -> None:
        """Restart every process to keep that is gone (the control plane may be away)."""
        changed = False
        for key, entry in self.table.items():
            if entry.spec.keep and not self.alive(key):
                entry.restarts += 1
                log.warning("%s %s of %s exited; restarting it (restart %d)", key.kind,
                            key.name, key.cluster, entry.restarts)
                self._start(key, entry)
                changed = True
        if changed:
            self._save()


# -- HTTP ---------------------------------------------------------------------------------

def _key(request: web.Request) -> ProcessKey:
    m = request.match_info
    try:
        return ProcessKey(m["cluster"], m["kind"], m["name"])
    except AgentProtocolError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}),
                                 content_type="application/json") from None


def _signal(value: str) -> int:
    if value.upper() not in SIGNALS:
        raise web.HTTPBadRequest(text=json.dumps(
            {"error": f"signal {value!r}: one of {', '.join(SIGNALS)}"}),
            content_type="application/json")
    return SIGNALS[value.upper()]


@web.middleware
async def control_plane_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mutual TLS has checked the CA; the certificate must also be the control plane's."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    if not der or pki.common_name(der) != CONTROL_PLANE_CN:
        raise web.HTTPForbidden(text=json.dumps({"error": "only the control plane may ask"}),
                                content_type="application/json")
    return await handler(request)


def build_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[control_plane_only], client_max_size=4 << 20)
    base = "/v1/processes/{cluster}/{kind}/{name}"

    async def info(_: web.Request) -> web.Response:
        return web.json_response(agent.info().to_json())

    async def ensure(request: web.Request) -> web.Response:
        key = _key(request)
        try:
            spec = ProcessSpec.from_json(key, await request.json())
        except (AgentProtocolError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        async with agent._lock:
            report = await asyncio.to_thread(agent.ensure, spec)
        return web.json_response(report.to_json())

    async def stop(request: web.Request) -> web.Response:
        key = _key(request)
        sig = _signal(request.query.get("signal", "TERM"))
        timeout_s = min(float(request.query.get("timeout_s", STOP_TIMEOUT_S)), 600.0)
        forget = request.query.get("forget", "0") == "1"
        async with agent._lock:
            ran = await asyncio.to_thread(agent.stop, key, sig, timeout_s, forget)
        return web.json_response({"ran": ran})

    async def reload(request: web.Request) -> web.Response:
        key = _key(request)
        try:
            spec = ProcessSpec.from_json(key, await request.json())
            async with agent._lock:
                ran = await asyncio.to_thread(agent.reload, spec)
        except (AgentProtocolError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ran": ran})

    async def install_data(request: web.Request) -> web.Response:
        key = _key(request)
        agent.folder(key).mkdir(parents=True, exist_ok=True)
        archive = agent.folder(key) / "data.tar.partial"
        try:
            with archive.open("wb") as out:  # streamed: a data directory has no bound
                async for chunk in request.content.iter_chunked(1 << 20):
                    out.write(chunk)
            async with agent._lock:
                await asyncio.to_thread(agent.install_data, key, archive)
        except AgentProtocolError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        finally:
            archive.unlink(missing_ok=True)
        return web.json_response({"installed": True})

    async def send_signal(request: web.Request) -> web.Response:
        key = _key(request)
        return web.json_response({"ran": agent.signal(key, _signal(request.query["signal"]))})

    async def read_file(request: web.Request) -> web.Response:
        key = _key(request)
        name = request.match_info["file"]
        if name not in FILES:
            return web.json_response({"error": f"readable files: {', '.join(FILES)}"},
                                     status=400)
        try:
            data = (agent.folder(key) / name).read_bytes()[-(1 << 20):]
        except FileNotFoundError:
            return web.json_response({"error": f"no {name} for {key.path()}"}, status=404)
        return web.Response(body=data, content_type="text/plain")

    app.router.add_get("/v1/agent", info)
    app.router.add_put(base, ensure)
    app.router.add_delete(base, stop)
    app.router.add_post(base + "/signal", send_signal)
    app.router.add_post(base + "/reload", reload)
    app.router.add_put(base + "/data", install_data)
    app.router.add_get(base + "/files/{file}", read_file)
    return app


async def serve(root: Path) -> None:
    identity = Identity.from_json(json.loads(identity_path(root).read_text()))
    agent = Agent(identity, root)
    ctx = pki.server_context(pki.KeyPair(identity.cert_pem, identity.key_pem),
                             identity.ca_pem, require_client_cert=True)
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, identity.address, identity.port, ssl_context=ctx).start()
    log.info("agent of %s (AZ %s) on https://%s:%d, root %s", identity.host, identity.az,
             identity.address, identity.port, root)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    while not stopping.is_set():
        async with agent._lock:
            await asyncio.to_thread(agent.keep_running)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), KEEP_INTERVAL_S)
    await runner.cleanup()  # the processes stay: they run without the agent


def main() -> None:
    parser = argparse.ArgumentParser(description="Borealis host agent")
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.root))


if __name__ == "__main__":
    main()
