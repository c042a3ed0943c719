"""The Borealis control plane process: the composition root. It builds the control
plane (:mod:`borealis.control.plane`) and the API (:mod:`borealis.api`), listens, and
runs the supervisor's loops until told to stop. The only module that sees both the
control and the API packages.

    python -m borealis.daemon [--home DIR] [--port N]   (``borealis up`` starts it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from borealis import settings
from borealis.api import identity
from borealis.api import server as api_server
from borealis.api.control_routes import build_app
from borealis.api.host_routes import HostListeners
from borealis.control.host_sweep import sweep_hosts
from borealis.control.plane import ControlPlane
from borealis.control.plane_base import default_home
from borealis.control.state import State
from borealis.fsync import write_atomic
from borealis.protocol.files import ClientConfig, ControlInfo

log = logging.getLogger("borealis.control")


def api_address(state: State, port: int) -> tuple[str, int]:
    """Where the API listens: ``--port``, else ``BOREALIS_API_PORT``, else a port chosen
    once for this home and kept (so ``borealis credentials`` stays valid)."""
    host = settings.current().api_host
    port = port or settings.current().api_port
    if not port:
        port = int(state.setting_once("api_port", lambda: str(state.allocate_port())))
    return host, port


async def serve(home: Path, port: int) -> None:
    cp = ControlPlane(home)
    for cluster in cp.state.clusters():
        cp.runtime(cluster.name).clear_staged_images()
    cp.recover_lost_with_host()  # before anything could start a server on such data
    cp.recover_interrupted()  # before supervision starts: it takes the cluster's lock first
    api = api_server.Api(cp)
    listeners = HostListeners(cp.hosts, 0)
    app = build_app(cp, api, listeners)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = api_address(cp.state, port)
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (set BOREALIS_API_PORT to another port)",
                  host, port, exc)
        raise SystemExit(1) from None
    bound = runner.addresses[0][1]
    # Agents reach the control plane on the API's port number, at other addresses. An
    # API on a host's address (a control plane on a lab host) holds that pair itself:
    # then agents get a port of their own, kept like the API's.
    listeners.port = bound if ipaddress.ip_address(host).is_loopback else int(
        cp.state.setting_once("agent_listener_port", lambda: str(cp.state.allocate_port())))
    await listeners.start()
    cp.api_url = f"http://{host}:{bound}"
    info = ControlInfo(os.getpid(), bound, cp.api_url, identity.region(cp.state))
    key_id, secret = cp.state.access_keys()[0]  # the API made one if there was none
    write_atomic(home / "client.json",
                 ClientConfig(key_id, secret, cp.api_url, info.region).to_json())
    write_atomic(home / "control.json", info.to_json())
    log.info("control plane and API on %s (pid %d)", info.url, os.getpid())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cp.stopping.set)
    tasks = [asyncio.create_task(t) for t in (
        cp.supervisor.run(), cp.supervisor.watch_writers(), cp.supervisor.watch_nodes(),
        sweep_hosts(cp.state, cp.locks, cp.stopping), api.reap(),
        cp.metric_sampler.run(cp.stopping), cp.capacity.run(cp.stopping),
        cp.replica_scaler.run(cp.stopping), cp.wake_watcher.run(cp.stopping))]
    await cp.stopping.wait()
    for task in tasks:
        task.cancel()
    await asyncio.sleep(0.2)  # let the last response go out
    cp.capacity.close()
    await api.data.close()
    await listeners.stop()
    await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        if ControlInfo.from_json((home / "control.json").read_text()).pid == os.getpid():
            (home / "control.json").unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description="Borealis control plane")
    parser.add_argument("--home", type=Path, default=default_home())
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.home, args.port))


if __name__ == "__main__":
    main()

