"""``borealis host``, ``borealis agent`` and ``borealis lab``: places to run processes.

``host add`` registers a host and prints its agent's join token; ``agent --join`` runs on
that host; ``lab up`` makes hosts out of network namespaces on this machine, one per AZ
(plus a ``client`` namespace), and starts and registers an agent in each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from borealis.agent import join as agent_join
from borealis.agent import server as agent_server
from borealis.agent import unit as agent_unit
from borealis.cli.client import (
    CliError,
    control_info,
    ensure_control_plane,
    home,
    request,
    stop_control_plane,
)
from borealis.lab import netns
from borealis.lab.plan import Lab, LabError, LabHost
from borealis.logfiles import private_log
from borealis.protocol.agent import AgentProtocolError

console = Console(emoji=False)
AGENT_START_S = 30.0
CONTROL_HOST_FILE = "control-host"  # in the lab's folder: where its control plane runs

Subparsers = Any  # argparse's _SubParsersAction is private


# -- hosts ------------------------------------------------------------------------------------

def cmd_host_add(args: argparse.Namespace) -> None:
    ensure_control_plane()
    answer = request("POST", "/v1/hosts", {"name": args.name, "address": args.address,
                                           "az": args.az, "port": args.port})
    console.print(f"host [bold]{args.name}[/] ({args.address}, {args.az}) added; on it run:")
    join = answer["join"][0] if answer["join"] else "<control plane address:port>"
    console.print(f"  borealis agent --join {join.removeprefix('https://')} "
                  f"--token {answer['token']}", soft_wrap=True, highlight=False)
    if not answer["join"]:
        console.print("  (the control plane listens for agents on no address yet: "
                      "borealis host listen ADDRESS)", highlight=False)


def cmd_host_list(args: argparse.Namespace) -> None:
    answer = request("GET", "/v1/hosts")
    if args.json:
        print(json.dumps(answer, indent=1))
        return
    table = Table("host", "address", "AZ", "state", "agent", "holds")
    for h in answer["hosts"]:
        table.add_row(h["name"], f"{h['address']}:{h['port']}", h["az"], h["state"],
                      h.get("agent", "-"), ", ".join(h["holds"]) or "-")
    console.print(table)


def cmd_host_remove(args: argparse.Namespace) -> None:
    request("DELETE", f"/v1/hosts/{args.name}")
    console.print(f"host {args.name} removed")


def cmd_host_listen(args: argparse.Namespace) -> None:
    ensure_control_plane()
    url = request("POST", "/v1/listeners", {"address": args.address})["url"]
    console.print(f"agents join at {url}", highlight=False)


def cmd_agent(args: argparse.Namespace) -> None:
    root: Path = args.root.absolute()
    if args.systemd_unit:
        print(agent_unit.render([sys.executable, "-m", "borealis.cli.main"], root), end="")
        return
    if args.join:
        if not args.token:
            raise CliError("--join needs --token (printed by `borealis host add`)")
        try:
            identity = agent_join.join(args.join, args.token, root)
        except (agent_join.JoinError, AgentProtocolError) as exc:
            raise CliError(str(exc)) from None
        print(f"joined as host {identity.host} (AZ {identity.az}); serving on "
              f"{identity.address}:{identity.port}", flush=True)
        if args.join_only:
            return
    elif not agent_server.identity_path(root).exists():
        raise CliError(f"no identity under {root}: join first (--join ADDR --token T)")
    sys.argv = [sys.argv[0], "--root", str(root)]
    agent_server.main()


# -- the lab ------------------------------------------------------------------------------------

def cmd_lab_up(args: argparse.Namespace) -> None:
    h = home()
    if args.control_on and control_info() is not None:
        raise CliError("a control plane runs already, on this machine: stop it first "
                       "(borealis down) to start it on a lab host")
    if not args.control_on:
        ensure_control_plane()
    try:
        lab = netns.up(h, args.name, args.hosts, args.subnet)
        control = lab.host(args.control_on) if args.control_on else None
        if control is not None and control.az is None:
            raise LabError(f"{control.name} runs clients; the control plane goes on a host")
    except LabError as exc:
        if (netns.lab_dir(h, args.name) / "lab.json").exists():
            _lab_down(h, args.name)
        raise CliError(str(exc)) from None
    try:
        if control is not None:
            _start_control_plane_on(h, lab, control)
        listen = control.address if control is not None else lab.gateway
        url = request("POST", "/v1/listeners", {"address": listen})["url"]
        for host in lab.servers():
            token = request("POST", "/v1/hosts", {"name": host.name, "address": host.address,
                                                   "az": host.az})["token"]
            _start_agent(h, lab, host.name, token, urllib.parse.urlsplit(url).netloc)
        _wait_agents_up([host.name for host in lab.servers()])
    except (CliError, LabError) as exc:
        _lab_down(h, args.name)
        raise CliError(f"lab up failed, and what it made is removed: {exc}") from None
    console.print(f"lab [bold]{lab.name}[/]: {len(lab.servers())} hosts on {lab.subnet}")
    for host in lab.hosts:
        console.print(f"  {host.name:<10} {host.address:<15} "
                      f"{host.az or '(runs clients: borealis lab exec client -- CMD)'}"
                      f"{'  (the control plane)' if host == control else ''}",
                      highlight=False)


def _start_control_plane_on(h: Path, lab: Lab, host: LabHost) -> None:
    """The control plane in the host's namespace, its API on the host's address (the
    CLI and boto3 here reach it over the lab's network, as from another machine)."""
    (netns.lab_dir(h, lab.name) / CONTROL_HOST_FILE).write_text(host.name)
    ensure_control_plane(wrap=lambda argv: netns.agent_argv(lab, host.name, argv),
                         env={"BOREALIS_API_HOST": host.address})


def _control_host(h: Path, name: str) -> str | None:
    try:
        return (netns.lab_dir(h, name) / CONTROL_HOST_FILE).read_text().strip() or None
    except OSError:
        return None


def _start_agent(h: Path, lab: Lab, host: str, token: str | None, join_at: str = "") -> None:
    """The host's agent, in its namespace: joining the control plane at ``join_at``
    with ``token``, or (None) as the host it joined as before (a machine that comes
    back)."""
    root = netns.lab_dir(h, lab.name) / "hosts" / host
    root.mkdir(parents=True, exist_ok=True)
    join = ["--join", join_at, "--token", token] if token else []
    argv = netns.agent_argv(lab, host, [sys.executable, "-m", "borealis.cli.main", "agent",
                                         *join, "--root", str(root)])
    with private_log(root / "agent.log") as log:
        subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                         start_new_session=True, cwd="/")


def _wait_agents_up(names: list[str]) -> None:
    deadline = time.monotonic() + AGENT_START_S
    missing = names
    while time.monotonic() < deadline:
        hosts = {h["name"]: h for h in request("GET", "/v1/hosts")["hosts"]}
        missing = [n for n in names if hosts.get(n, {}).get("agent") != "up"]
        if not missing:
            return
        time.sleep(0.2)
    raise CliError(f"the agents of {', '.join(missing)} did not come up in "
                   f"{AGENT_START_S:.0f} s")


def cmd_lab_down(args: argparse.Namespace) -> None:
    _lab_down(home(), args.name)
    console.print(f"lab {args.name} removed")


def _lab_down(h: Path, name: str) -> None:
    """Everything the lab made goes, in reverse: hosts and listener, the control plane
    if it runs on a lab host, processes (by PID), namespaces."""
    try:
        lab = netns.load(h, name)
    except LabError as exc:
        raise CliError(str(exc)) from None
    holding = []
    try:
        hosts = {x["name"]: x for x in request("GET", "/v1/hosts")["hosts"]}
        holding = [f"{n} ({', '.join(x['holds'])})" for n, x in hosts.items() if x["holds"]
                   and n in {s.name for s in lab.servers()}]
    except CliError:
        hosts = {}
    if holding:
        raise CliError(f"lab hosts still hold cluster processes: {'; '.join(holding)}; "
                       "destroy those clusters first")
    control = _control_host(h, name)
    for host in lab.servers():
        if host.name in hosts:
            request("DELETE", f"/v1/hosts/{host.name}")
    with contextlib.suppress(CliError):  # no control plane: nothing listens there
        listen = lab.host(control).address if control else lab.gateway
        request("DELETE", f"/v1/listeners/{listen}")
    if control is not None:
        with contextlib.suppress(CliError):
            stop_control_plane()
        (netns.lab_dir(h, name) / CONTROL_HOST_FILE).unlink(missing_ok=True)
    for host in lab.hosts:
        netns.stop_host_processes(host)
    try:
        netns.down(h, name)
    except LabError as exc:
        raise CliError(str(exc)) from None


def cmd_lab_exec(args: argparse.Namespace) -> None:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        full = netns.exec_argv(netns.load(home(), args.name), args.host, argv)
    except LabError as exc:
        raise CliError(str(exc)) from None
    os.execvp(full[0], full)


def _lab_fault(args: argparse.Namespace) -> None:
    try:
        if args.lab_command == "partition":
            netns.partition(home(), args.name, args.az)
        elif args.lab_command == "heal":
            netns.heal(home(), args.name, args.az)
        elif args.lab_command == "delay":
            netns.delay(home(), args.name, args.ms)
        elif args.lab_command == "kill-host":
            lab = netns.load(home(), args.name)
            n = netns.stop_host_processes(lab.host(args.host))
            console.print(f"killed {n} processes of {args.host}")
        elif args.lab_command in ("freeze-host", "thaw-host"):
            lab = netns.load(home(), args.name)
            sig = signal.SIGSTOP if args.lab_command == "freeze-host" else signal.SIGCONT
            n = netns.signal_host(lab.host(args.host), sig)
            console.print(f"{'froze' if sig == signal.SIGSTOP else 'thawed'} {n} processes "
                          f"of {args.host}")
        elif args.lab_command == "start-host":  # the machine back: its agent starts
            lab = netns.load(home(), args.name)
            if netns.host_pids(lab.host(args.host)):
                raise CliError(f"{args.host} runs already (kill-host stops it)")
            _start_agent(home(), lab, args.host, None)
            _wait_agents_up([args.host])
            console.print(f"{args.host} is back; its agent restarts what it keeps running")
    except LabError as exc:
        raise CliError(str(exc)) from None


def add_commands(sub: Subparsers) -> None:
    host = sub.add_parser("host", help="places to run a cluster's processes")
    hsub = host.add_subparsers(dest="host_command", required=True)
    ha = hsub.add_parser("add", help="register a host; prints its agent's join token")
    ha.add_argument("name")
    ha.add_argument("--address", required=True, help="the host's IP address")
    ha.add_argument("--az", required=True, help="its availability zone (az-a, az-b, ...)")
    ha.add_argument("--port", type=int, default=None, help="its agent's port (7420)")
    ha.set_defaults(func=cmd_host_add)
    hl = hsub.add_parser("list", help="hosts, their agents and what they hold")
    hl.add_argument("--json", action="store_true")
    hl.set_defaults(func=cmd_host_list)
    hr = hsub.add_parser("remove", help="forget a host (refused while it holds processes)")
    hr.add_argument("name")
    hr.set_defaults(func=cmd_host_remove)
    hli = hsub.add_parser("listen", help="where agents reach the control plane (an address "
                          "of this machine)")
    hli.add_argument("address")
    hli.set_defaults(func=cmd_host_listen)
    ag = sub.add_parser("agent", help="run this host's agent")
    ag.add_argument("--join", default=None, help="the control plane's ADDRESS:PORT")
    ag.add_argument("--token", default=None)
    ag.add_argument("--root", type=Path, default=Path("/var/lib/borealis/agent"))
    ag.add_argument("--join-only", action="store_true",
                    help="join and exit (then start the agent as a service)")
    ag.add_argument("--systemd-unit", action="store_true",
                    help="print a systemd unit that runs this agent, and exit")
    ag.set_defaults(func=cmd_agent)
    _lab_commands(sub)


def _lab_commands(sub: Subparsers) -> None:
    lab = sub.add_parser("lab", help="hosts made of network namespaces on this machine")
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    lu = lsub.add_parser("up", help="make the hosts (one per AZ) and a client namespace")
    lu.add_argument("--control-on", default=None, metavar="HOST",
                    help="run the control plane on this lab host (e.g. az-a-1), not here")
    lu.add_argument("--hosts", type=int, default=3)
    lu.add_argument("--subnet", default="10.77.0.0/24")
    lu.set_defaults(func=cmd_lab_up)
    ld = lsub.add_parser("down", help="remove everything the lab made")
    ld.set_defaults(func=cmd_lab_down)
    le = lsub.add_parser("exec", help="run a command in a host's namespace")
    le.add_argument("host")
    le.add_argument("argv", nargs=argparse.REMAINDER)
    le.set_defaults(func=cmd_lab_exec)
    for verb, help_ in (("partition", "cut an AZ off the network"),
                        ("heal", "connect an AZ again")):
        p = lsub.add_parser(verb, help=help_)
        p.add_argument("az")
        p.set_defaults(func=_lab_fault)
    dl = lsub.add_parser("delay", help="packets between AZs wait MS each way (0: none)")
    dl.add_argument("ms", type=float)
    dl.set_defaults(func=_lab_fault)
    kh = lsub.add_parser("kill-host", help="SIGKILL every process of a host")
    kh.add_argument("host")
    kh.set_defaults(func=_lab_fault)
    sh = lsub.add_parser("start-host", help="start a killed host's agent again (it restarts "
                                            "the processes it keeps running)")
    sh.add_argument("host")
    sh.set_defaults(func=_lab_fault)
    for verb, what in (("freeze-host", "SIGSTOP every process of a host (it hangs)"),
                       ("thaw-host", "SIGCONT every process of a host")):
        fh = lsub.add_parser(verb, help=what)
        fh.add_argument("host")
        fh.set_defaults(func=_lab_fault)
    for p in (lu, ld, le, *[lsub.choices[v] for v in (
            "partition", "heal", "delay", "kill-host", "start-host", "freeze-host",
            "thaw-host")]):
        p.add_argument("--name", default="lab", help="which lab (default: lab)")
