"""``borealis events``, ``top``, ``console``, ``hosts-file`` and ``metrics-token``: what
a cluster did and does, and the ways in for people and tools that watch it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from borealis.cli.arguments import CLUSTER
from borealis.cli.client import api_location, request
from borealis.times import format_time

console = Console(emoji=False)
Subparsers = Any  # argparse's _SubParsersAction is private


def cmd_events(args: argparse.Namespace) -> None:
    """The cluster's events in Borealis's own words, every source at once (``aws rds
    describe-events`` gives them as RDS does, per cluster, instance and snapshot)."""
    since = time.time() - args.days * 86400
    events = request("GET", f"/v1/clusters/{args.cluster}/events?since={since}")["events"]
    for e in events:
        when = dt.datetime.fromtimestamp(float(e["time"]), dt.UTC)
        console.print(f"{format_time(when)}  {e['source']}: {e['message']}", soft_wrap=True,
                      highlight=False, markup=False)


def cmd_top(args: argparse.Namespace) -> None:
    """Each instance's statements that took the most time (pg_stat_statements)."""
    answer = request("GET", f"/v1/clusters/{args.cluster}/top?limit={args.limit}")
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    for inst in answer["instances"]:
        t = Table(title=f"{inst['instance']} ({inst['role']})", title_justify="left")
        for col in ("total ms", "calls", "mean ms", "rows", "database", "statement"):
            t.add_column(col, justify="right" if col.endswith(("ms", "calls", "rows"))
                         else "left", overflow="fold")
        for s in inst["statements"]:
            t.add_row(f"{s['total_ms']:.1f}", str(s["calls"]), f"{s['mean_ms']:.2f}",
                      str(s["rows"]), s["database"], " ".join(s["query"].split())[:200])
        console.print(t)
        if inst.get("error"):
            console.print(f"  {inst['error']}", highlight=False, markup=False)


def cmd_hosts_file(_: argparse.Namespace) -> None:
    """Lines for /etc/hosts (or a DNS zone): every endpoint on this machine by name."""
    status = request("GET", "/v1/status")
    for cluster in status["clusters"]:
        for ep in cluster["endpoints"]:
            print(f"{ep['host']}\t{ep['dns_name']}")


def cmd_console(_: argparse.Namespace) -> None:
    answer = request("POST", "/v1/console-link")
    # The link signs the browser in once (for five minutes); the console's own login
    # takes the access key (borealis credentials) after that.
    print(answer["url"])


def cmd_metrics_token(_: argparse.Namespace) -> None:
    url, _region = api_location()
    answer = request("GET", "/v1/metrics-token")
    # For a Prometheus scrape config: authorization: {credentials: TOKEN}.
    print(f"{url}{answer['path']}\n{answer['token']}")


def add_commands(sub: Subparsers) -> None:
    ev = sub.add_parser("events", help="what happened to a cluster, and when")
    ev.add_argument("cluster", type=CLUSTER)
    ev.add_argument("--days", type=float, default=14, help="how far back (default 14)")
    ev.set_defaults(func=cmd_events)
    tp = sub.add_parser("top", help="each instance's top SQL by time (pg_stat_statements)")
    tp.add_argument("cluster", type=CLUSTER)
    tp.add_argument("--limit", type=int, default=10)
    tp.add_argument("--json", action="store_true")
    tp.set_defaults(func=cmd_top)
    sub.add_parser("hosts-file", help="/etc/hosts lines naming every endpoint (a driver's "
                   "instance host pattern: ?.borealis.internal)").set_defaults(
                       func=cmd_hosts_file)
    sub.add_parser("console", help="a one-time link into the web console").set_defaults(
        func=cmd_console)
    sub.add_parser("metrics-token", help="where Prometheus scrapes the metrics, and the "
                   "bearer token it sends").set_defaults(func=cmd_metrics_token)
