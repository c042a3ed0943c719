"""``borealis``: the command line. A client of the control plane's local API.

``up`` starts the control plane in the background when it is not running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from rich.console import Console
from rich.table import Table

from borealis.control.processes import alive
from borealis.control.state import State

console = Console()
err_console = Console(stderr=True)


class CliError(Exception):
    pass


def home() -> Path:
    return Path(os.environ.get("BOREALIS_HOME", Path.home() / ".borealis"))


def control_info() -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads((home() / "control.json").read_text())
    except (OSError, ValueError):
        return None
    if not alive(info.get("pid"), "borealis.control.daemon"):
        return None
    return info


def credentials() -> tuple[str, str]:
    """The first access key of this home (the control plane creates it)."""
    keys = State(home()).access_keys()
    if not keys:
        raise CliError("no access key yet; start the control plane with `borealis up`")
    return keys[0]


def request(method: str, path: str, body: dict[str, Any] | None = None,
            timeout_s: float = 900) -> Any:
    """A signed call to the control plane's own verbs (SigV4, as every API request)."""
    info = control_info()
    if info is None:
        raise CliError("the control plane is not running; start it with `borealis up`")
    data = json.dumps(body).encode() if body is not None else b""
    signed = AWSRequest(method=method, url=info["url"] + path, data=data,
                        headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(*credentials()), "borealis", info.get("region", "us-east-1")
              ).add_auth(signed)
    req = urllib.request.Request(info["url"] + path, data=data or None, method=method,
                                 headers=dict(signed.headers.items()))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", str(exc))
        except ValueError:
            message = str(exc)
        raise CliError(message) from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach the control plane: {exc.reason}") from None


def ensure_control_plane() -> dict[str, Any]:
    info = control_info()
    if info is not None:
        return info
    h = home()
    if not h.exists():
        h.mkdir(parents=True)
        os.chmod(h, 0o700)
    with open(h / "control.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "borealis.control.daemon", "--home", str(h)],
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         start_new_session=True, cwd="/")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = control_info()
        if info is not None:
            try:
                request("GET", "/v1/health", timeout_s=2)
                return info
            except CliError:
                pass
        time.sleep(0.1)
    raise CliError(f"the control plane did not start; see {h / 'control.log'}")


# -- commands ---------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> None:
    ensure_control_plane()
    with console.status(f"bringing up cluster [bold]{args.cluster}[/]..."):
        status = request("POST", f"/v1/clusters/{args.cluster}/up", {"readers": args.readers})
    console.print(f"cluster [bold]{status['name']}[/] is {status['status']}")
    for ep in status.get("endpoints", []):
        if ep["type"] in ("WRITER", "READER"):
            console.print(f"  {ep['type'].lower():<6} endpoint {ep['name']:<14} "
                          f"psql \"{ep['dsn']}\"", soft_wrap=True)
    for inst in status["instances"]:
        console.print(f"  {inst['role']:<6} {inst['id']:<14} psql \"{inst['dsn']}\"",
                      soft_wrap=True)


def cmd_status(args: argparse.Namespace) -> None:
    if control_info() is None:
        if args.json:
            print(json.dumps({"control": None, "clusters": []}, indent=2))
        else:
            console.print("the control plane is not running")
        return
    status = request("GET", "/v1/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return
    for c in status["clusters"]:
        console.print(f"[bold]{c['name']}[/] {c['status']}  epoch {c['epoch']}  VDL {c['vdl']}")
        t = Table("instance", "role", "az", "tier", "port", "state", "replay LSN", "lag ms")
        for i in c["instances"]:
            t.add_row(i["id"], i["role"], i["az"], str(i["tier"]), str(i["port"]), i["state"],
                      str(i["replay_lsn"]), str(i["lag_ms"]))
        console.print(t)
        t = Table("storage node", "az", "port", "pid", "state", "flush LSN")
        for n in c["storage_nodes"]:
            t.add_row(n["id"], n["az"], str(n["port"]), str(n["pid"]), n["state"],
                      str(n["flush_lsn"]))
        console.print(t)


def cmd_down(_: argparse.Namespace) -> None:
    info = control_info()
    if info is None:
        console.print("nothing is running")
        return
    with console.status("stopping..."):
        request("POST", "/v1/down")
        deadline = time.monotonic() + 60
        while alive(info["pid"], "borealis.control.daemon") and time.monotonic() < deadline:
            time.sleep(0.1)
    console.print("stopped; data kept (`borealis up` brings it back)")


def cmd_destroy(args: argparse.Namespace) -> None:
    request("DELETE", f"/v1/clusters/{args.name}")
    console.print(f"cluster {args.name} destroyed")


def cmd_instance_add(args: argparse.Namespace) -> None:
    with console.status(f"adding a reader to {args.cluster}..."):
        inst = request("POST", f"/v1/clusters/{args.cluster}/instances",
                       {"az": args.az, "tier": args.tier, "id": args.id})
    console.print(f"reader {inst['id']} in {inst['az']}: psql \"{inst['dsn']}\"",
                  soft_wrap=True)


def cmd_failover(args: argparse.Namespace) -> None:
    with console.status(f"failing over {args.cluster}..."):
        status = request("POST", f"/v1/clusters/{args.cluster}/failover",
                         {"target": args.target})
    writer = next(i for i in status["instances"] if i["role"] == "writer")
    console.print(f"{args.cluster}: {writer['id']} is the writer (epoch {status['epoch']}); "
                  f"`borealis events {args.cluster}` shows each step")


def cmd_instance_remove(args: argparse.Namespace) -> None:
    request("DELETE", f"/v1/instances/{args.id}")
    console.print(f"instance {args.id} removed")


def cmd_endpoint_create(args: argparse.Namespace) -> None:
    ep = request("POST", f"/v1/clusters/{args.cluster}/endpoints",
                 {"name": args.name, "type": args.type, "static": args.static,
                  "excluded": args.excluded})
    console.print(f"endpoint {ep['name']} ({args.type}) members {ep['members']}: "
                  f"psql \"{ep['dsn']}\"", soft_wrap=True)


def cmd_endpoint_modify(args: argparse.Namespace) -> None:
    ep = request("PATCH", f"/v1/endpoints/{args.name}",
                 {"type": args.type, "static": args.static, "excluded": args.excluded})
    console.print(f"endpoint {ep['name']} members {ep['members']}")


def cmd_endpoint_delete(args: argparse.Namespace) -> None:
    request("DELETE", f"/v1/endpoints/{args.name}")
    console.print(f"endpoint {args.name} deleted")


def cmd_events(args: argparse.Namespace) -> None:
    events = request("GET", f"/v1/clusters/{args.cluster}/events")["events"]
    for e in events:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e["time"]))
        stamp += f".{int(e['time'] * 1000) % 1000:03d}Z"
        console.print(f"{stamp}  {e['source']:<10} {e['message']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="borealis", description="Aurora-style PostgreSQL clusters")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start (or create) a cluster and the control plane")
    up.add_argument("--cluster", default="demo")
    up.add_argument("--readers", type=int, default=None)
    up.set_defaults(func=cmd_up)
    st = sub.add_parser("status", help="clusters, instances, storage nodes")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    sub.add_parser("down", help="stop everything, keep the data").set_defaults(func=cmd_down)
    de = sub.add_parser("destroy", help="stop a cluster and delete its data")
    de.add_argument("name")
    de.set_defaults(func=cmd_destroy)
    ev = sub.add_parser("events", help="what happened to a cluster, and when")
    ev.add_argument("cluster")
    ev.set_defaults(func=cmd_events)
    fo = sub.add_parser("failover", help="promote a reader to writer now (fences the old one)")
    fo.add_argument("cluster")
    fo.add_argument("--target", default=None, help="the reader to promote (default: by "
                    "promotion tier, then replay position)")
    fo.set_defaults(func=cmd_failover)
    inst = sub.add_parser("instance", help="add or remove instances")
    isub = inst.add_subparsers(dest="instance_command", required=True)
    add = isub.add_parser("add", help="add a reader to a cluster")
    add.add_argument("cluster")
    add.add_argument("--az", default=None)
    add.add_argument("--tier", type=int, default=1)
    add.add_argument("--id", default=None, help="instance identifier (default: <cluster>-<n>)")
    add.set_defaults(func=cmd_instance_add)
    rm = isub.add_parser("remove", help="remove a reader")
    rm.add_argument("id")
    rm.set_defaults(func=cmd_instance_remove)
    ep = sub.add_parser("endpoint", help="custom endpoints")
    esub = ep.add_subparsers(dest="endpoint_command", required=True)
    for verb, func in (("create", cmd_endpoint_create), ("modify", cmd_endpoint_modify)):
        e = esub.add_parser(verb, help=f"{verb} a custom endpoint")
        e.add_argument("name")
        if verb == "create":
            e.add_argument("--cluster", required=True)
        e.add_argument("--type", choices=["READER", "ANY"],
                       default="ANY" if verb == "create" else None)
        members = e.add_mutually_exclusive_group()
        members.add_argument("--static", nargs="+", metavar="ID", default=None)
        members.add_argument("--excluded", nargs="+", metavar="ID", default=None)
        e.set_defaults(func=func)
    de = esub.add_parser("delete", help="delete a custom endpoint")
    de.add_argument("name")
    de.set_defaults(func=cmd_endpoint_delete)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
