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
import json
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from borealis import settings
from borealis.api import identity
from borealis.api import server as api_server
from borealis.api.control_routes import build_app
from borealis.control.plane import ControlPlane, default_home
from borealis.control.state import State

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
    app = build_app(cp, api)
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
    cp.api_url = f"http://{host}:{bound}"
    info = {"pid": os.getpid(), "port": bound, "url": cp.api_url,
            "region": identity.region(cp.state)}
    tmp = home / "control.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, home / "control.json")
    log.info("control plane and API on %s (pid %d)", info["url"], os.getpid())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cp.stopping.set)
    tasks = [asyncio.create_task(t) for t in (cp.supervisor.run(), cp.supervisor.watch_writers(),
                                              cp.supervisor.watch_nodes(), api.reap())]
    await cp.stopping.wait()
    for task in tasks:
        task.cancel()
    await asyncio.sleep(0.2)  # let the last response go out
    await api.data.close()
    await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        info_now = json.loads((home / "control.json").read_text())
        if info_now.get("pid") == os.getpid():
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

