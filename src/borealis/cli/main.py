"""``borealis``: the command line. A client of the control plane's local API.

``up`` starts the control plane in the background when it is not running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from borealis.cli import hosts, observe
from borealis.cli.arguments import CLUSTER, ENDPOINT, INSTANCE, SECRET, SNAPSHOT
from borealis.cli.client import (
    CliError,
    api_location,
    call,
    control_info,
    credentials,
    describe_cluster,
    ensure_control_plane,
    rds_client,
    request,
    stop_control_plane,
    wait,
)
from borealis.control.status import without_secrets

# No emoji codes: ":secret:" inside an ARN must stay as it is.
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


# -- commands ---------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> None:
    ensure_control_plane()
    with console.status(f"bringing up cluster [bold]{args.cluster}[/]..."):
        status = request("POST", f"/v1/clusters/{args.cluster}/up", {"readers": args.readers})
    console.print(f"cluster [bold]{status['name']}[/] is {status['status']}")
    shown = without_secrets(status)
    for ep in shown.get("endpoints", []):
        if ep["type"] in ("WRITER", "READER"):
            console.print(f"  {ep['type'].lower():<6} endpoint {ep['name']:<14} "
                          f"psql \"{ep['dsn']}\"", soft_wrap=True)
    for inst in shown["instances"]:
        console.print(f"  {inst['role']:<6} {inst['id']:<14} psql \"{inst['dsn']}\"",
                      soft_wrap=True)
    console.print("  the password: borealis status --json --show-secrets (or the cluster's "
                  "secret: borealis secret list)", soft_wrap=True, highlight=False)
    url, region = api_location()
    key_id, _ = credentials()
    console.print(f"API (RDS and RDS Data, SigV4) on {url}, region {region}, access key "
                  f"{key_id}", soft_wrap=True, highlight=False)
    console.print('  for boto3 and the AWS CLI: eval "$(borealis credentials)"; then e.g. '
                  "aws rds describe-db-clusters", soft_wrap=True, highlight=False)


def cmd_status(args: argparse.Namespace) -> None:
    if control_info() is None:
        if args.json:
            print(json.dumps({"control": None, "clusters": []}, indent=2))
        else:
            console.print("the control plane is not running")
        return
    status = request("GET", "/v1/status")
    if args.json:
        print(json.dumps(status if args.show_secrets else without_secrets(status), indent=2))
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
    with console.status("stopping..."):
        stopped = stop_control_plane()
    console.print("stopped; data kept (`borealis up` brings it back)" if stopped
                  else "nothing is running")


def cmd_destroy(args: argparse.Namespace) -> None:
    request("DELETE", f"/v1/clusters/{args.name}")
    console.print(f"cluster {args.name} destroyed")


def cmd_instance_add(args: argparse.Namespace) -> None:
    rds = rds_client()
    cluster = describe_cluster(rds, args.cluster)
    instance_id = args.id or next_instance_id(cluster)
    params: dict[str, Any] = {"DBInstanceIdentifier": instance_id,
                              "DBClusterIdentifier": args.cluster, "Engine": cluster["Engine"],
                              "DBInstanceClass": "db.r6g.large", "PromotionTier": args.tier}
    if args.az:
        params["AvailabilityZone"] = args.az
    with console.status(f"adding instance {instance_id} to {args.cluster}..."):
        call(rds.create_db_instance, **params)
        wait(rds, "db_instance_available", DBInstanceIdentifier=instance_id)
    inst = call(rds.describe_db_instances, DBInstanceIdentifier=instance_id)["DBInstances"][0]
    ep = inst["Endpoint"]
    role = "writer" if writer_of(describe_cluster(rds, args.cluster)) == instance_id \
        else "reader"
    console.print(f"{role} {instance_id} in {inst['AvailabilityZone']}: psql "
                  f"\"host={ep['Address']} port={ep['Port']} user={inst['MasterUsername']} "
                  "dbname=postgres\"", soft_wrap=True)


def next_instance_id(cluster: dict[str, Any]) -> str:
    taken = {m["DBInstanceIdentifier"] for m in cluster["DBClusterMembers"]}
    n = 1
    while f"{cluster['DBClusterIdentifier']}-{n}" in taken:
        n += 1
    return f"{cluster['DBClusterIdentifier']}-{n}"


def cmd_failover(args: argparse.Namespace) -> None:
    rds = rds_client()
    before = writer_of(describe_cluster(rds, args.cluster))
    params: dict[str, Any] = {"DBClusterIdentifier": args.cluster}
    if args.target:
        params["TargetDBInstanceIdentifier"] = args.target
    with console.status(f"failing over {args.cluster}..."):
        call(rds.failover_db_cluster, **params)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            cluster = describe_cluster(rds, args.cluster)
            writer = writer_of(cluster)
            if cluster["Status"] == "available" and writer not in (None, before):
                break
            time.sleep(0.2)
        else:
            raise CliError(f"the failover did not finish; see `borealis events {args.cluster}`")
    console.print(f"{args.cluster}: {writer} is the writer; `borealis events {args.cluster}` "
                  "shows each step")


def writer_of(cluster: dict[str, Any]) -> str | None:
    return next((m["DBInstanceIdentifier"] for m in cluster["DBClusterMembers"]
                 if m["IsClusterWriter"]), None)


def cmd_instance_remove(args: argparse.Namespace) -> None:
    rds = rds_client()
    with console.status(f"removing {args.id}..."):
        call(rds.delete_db_instance, DBInstanceIdentifier=args.id)
        wait(rds, "db_instance_deleted", DBInstanceIdentifier=args.id)
    console.print(f"instance {args.id} removed")


def cmd_endpoint_create(args: argparse.Namespace) -> None:
    rds = rds_client()
    params = endpoint_params(args)
    params["DBClusterIdentifier"] = args.cluster
    ep = call(rds.create_db_cluster_endpoint, **params)
    show_endpoint(rds, ep)


def cmd_endpoint_modify(args: argparse.Namespace) -> None:
    rds = rds_client()
    ep = call(rds.modify_db_cluster_endpoint, **endpoint_params(args))
    show_endpoint(rds, ep)


def endpoint_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {"DBClusterEndpointIdentifier": args.name}
    if args.type:
        params["EndpointType"] = args.type
    if args.static is not None:
        params["StaticMembers"] = args.static
    if args.excluded is not None:
        params["ExcludedMembers"] = args.excluded
    return params


def show_endpoint(rds: Any, ep: dict[str, Any]) -> None:
    cluster = describe_cluster(rds, ep["DBClusterIdentifier"])
    members = ep.get("StaticMembers") or [f"all but {', '.join(ep.get('ExcludedMembers', []))}"
                                          if ep.get("ExcludedMembers") else "all"]
    console.print(f"endpoint {ep['DBClusterEndpointIdentifier']} ({ep['CustomEndpointType']}) "
                  f"members {members}: psql \"host={ep['Endpoint']} port={cluster['Port']} "
                  f"user={cluster['MasterUsername']} dbname=postgres\"", soft_wrap=True)


def cmd_endpoint_delete(args: argparse.Namespace) -> None:
    call(rds_client().delete_db_cluster_endpoint, DBClusterEndpointIdentifier=args.name)
    console.print(f"endpoint {args.name} deleted")


def cmd_credentials(_: argparse.Namespace) -> None:
    url, region = api_location()
    key_id, secret = credentials()
    # Plain print: these lines are for `eval`, not for a terminal's eyes.
    print(f"export AWS_ACCESS_KEY_ID={key_id}")
    print(f"export AWS_SECRET_ACCESS_KEY={secret}")
    print(f"export AWS_DEFAULT_REGION={region}")
    print(f"export AWS_ENDPOINT_URL={url}")


def cmd_secret_create(args: argparse.Namespace) -> None:
    secret = request("POST", "/v1/secrets", {"name": args.name, "cluster": args.cluster,
                                             "user": args.user, "password": args.password})
    console.print(f"secret {secret['name']} (user {secret['user']}): {secret['arn']}",
                  soft_wrap=True)


def cmd_secret_list(args: argparse.Namespace) -> None:
    secrets = request("GET", "/v1/secrets")["secrets"]
    if args.json:
        print(json.dumps(secrets, indent=2))
        return
    t = Table("name", "cluster", "user", "arn")
    for s in secrets:
        t.add_row(s["name"], s["cluster"], s["user"], s["arn"])
    console.print(t)


def cmd_secret_delete(args: argparse.Namespace) -> None:
    request("DELETE", "/v1/secrets/" + urllib.parse.quote(args.name, safe="/"))
    console.print(f"secret {args.name} deleted")


def cmd_backup_status(args: argparse.Namespace) -> None:
    query = "?verify=no" if args.no_verify else ""
    with console.status("reading (and verifying) the backups..."):
        st = request("GET", f"/v1/clusters/{args.cluster}/backup{query}")
    if args.json:
        print(json.dumps(st, indent=2))
        return
    console.print(f"{args.cluster}: backups in {st['location']}/{st['prefix']}", highlight=False)
    console.print(f"  restorable from {st['earliest_restorable_time']} to "
                  f"{st['latest_restorable_time']}", highlight=False)
    console.print(f"  {len(st['base_images'])} base images, {st['wal_segments_archived']} WAL "
                  f"segments archived (up to {st['archived_up_to']}), "
                  f"{st['bytes_stored'] / 2**20:.1f} MiB stored", highlight=False)
    for left in st.get("backtracked_timelines", []):
        console.print(f"  timeline {left['timeline']} until {left['until']} (left by a "
                      "backtrack; restores to a time before then follow it)", highlight=False)
    if st["gaps"]:
        console.print(f"  [red]WAL segments missing:[/] {', '.join(st['gaps'])}")
    for key in st.get("damaged", []):
        console.print(f"  [red]damaged or missing:[/] {key}", highlight=False)
    if st.get("verified"):
        console.print("  every object matches its checksum")


def cmd_restore(args: argparse.Namespace) -> None:
    body = {"new_cluster": args.new_cluster, "to_time": args.to_time, "latest": args.latest,
            "readers": args.readers}
    request("POST", f"/v1/clusters/{args.cluster}/restore", body)
    wait_restored(args.cluster, args.new_cluster)


Events = list[dict[str, Any]]


def follow(cluster: str, what: str, done: Callable[[dict[str, Any], Events], bool],
           since: int = 0) -> tuple[dict[str, Any], Events]:
    """Show a long operation on ``cluster`` until ``done``: its events as they come, and
    a progress bar while it reports one (base image, WAL staged, WAL replayed)."""
    deadline = time.monotonic() + 3600
    seen = since
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TaskProgressColumn(), TextColumn("{task.fields[amount]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=None, amount="")
        while time.monotonic() < deadline:
            st = request("GET", f"/v1/clusters/{cluster}")
            events = request("GET", f"/v1/clusters/{cluster}/events")["events"]
            for e in events[seen:]:
                bar.console.print(f"  {e['message']}", highlight=False, soft_wrap=True)
                if "failed" in e["message"] and e["source"] in ("restore", "clone", "backtrack"):
                    raise CliError(e["message"])
            seen = len(events)
            if st["status"] == "failed":
                raise CliError(f"the {what} failed; see `borealis events {cluster}`")
            if done(st, events):
                return st, events
            p = st.get("progress")
            if p and p["total"]:
                bar.update(task, description=f"{what}: {p['phase']}", total=p["total"],
                           completed=p["done"], amount=f"{p['done'] / 2**20:.0f}/"
                                                       f"{p['total'] / 2**20:.0f} MiB")
            else:
                bar.update(task, description=f"{what}: {p['phase'] if p else 'working'}",
                           total=None, amount="")
            time.sleep(0.1)
    raise CliError(f"the {what} did not finish within an hour")


def wait_restored(source: str, new: str, what: str = "restore") -> None:
    """Follow a restore or clone until the new cluster is available."""
    finished = (f"cluster {new} restored from", f"cluster {new} cloned from")
    # The endpoints are set up just after the last step's event: wait for them too.
    st, _ = follow(new, f"{what} of {source} as {new}", lambda st, events: (
        st["status"] == "available"
        and any(e["message"].startswith(finished) for e in events)
        and any(e["type"] == "WRITER" for e in st.get("endpoints") or [])))
    writer = next(e for e in st["endpoints"] if e["type"] == "WRITER")
    console.print(f"cluster {new} ready: psql \"{writer['dsn']}\"", soft_wrap=True,
                  highlight=False)


def cmd_clone(args: argparse.Namespace) -> None:
    request("POST", f"/v1/clusters/{args.cluster}/clone",
            {"new_cluster": args.new_cluster, "readers": args.readers})
    wait_restored(args.cluster, args.new_cluster, "clone")


def cmd_backtrack(args: argparse.Namespace) -> None:
    before = len(request("GET", f"/v1/clusters/{args.cluster}/events")["events"])
    request("POST", f"/v1/clusters/{args.cluster}/backtrack", {"to_time": args.to_time})
    _, events = follow(args.cluster, "backtrack", lambda st, _e: st["status"] == "available",
                       since=before)
    done = [e["message"] for e in events if e["source"] == "backtrack"]
    console.print(f"{args.cluster}: {done[-1] if done else 'backtracked'}", highlight=False)


def cmd_snapshot_create(args: argparse.Namespace) -> None:
    request("POST", "/v1/snapshots", {"name": args.name, "cluster": args.cluster})
    deadline = time.monotonic() + 3600
    with console.status(f"taking snapshot {args.name} of {args.cluster}..."):
        while time.monotonic() < deadline:
            snap = next(s for s in request("GET", "/v1/snapshots")["snapshots"]
                        if s["name"] == args.name)
            if snap["status"] != "creating":
                break
            time.sleep(0.5)
    if snap["status"] != "available":
        raise CliError(f"snapshot {args.name} failed; see `borealis events {args.cluster}`")
    console.print(f"snapshot {args.name} of {args.cluster} at {snap['time']} "
                  f"({snap['bytes'] / 2**20:.1f} MiB)", highlight=False)


def cmd_snapshot_list(args: argparse.Namespace) -> None:
    snaps = request("GET", "/v1/snapshots")["snapshots"]
    if args.json:
        print(json.dumps(snaps, indent=2))
        return
    t = Table("snapshot", "cluster", "status", "time", "MiB")
    for s in snaps:
        t.add_row(s["name"], s["cluster"], s["status"], s["time"], f"{s['bytes'] / 2**20:.1f}")
    console.print(t)


def cmd_snapshot_delete(args: argparse.Namespace) -> None:
    request("DELETE", f"/v1/snapshots/{args.name}")
    console.print(f"snapshot {args.name} deleted")


def cmd_snapshot_restore(args: argparse.Namespace) -> None:
    request("POST", f"/v1/snapshots/{args.name}/restore",
            {"new_cluster": args.new_cluster, "readers": args.readers})
    wait_restored(f"snapshot {args.name}", args.new_cluster)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="borealis", description="Aurora-style PostgreSQL clusters")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start (or create) a cluster and the control plane")
    up.add_argument("--cluster", default="demo", type=CLUSTER)
    up.add_argument("--readers", type=int, default=None)
    up.set_defaults(func=cmd_up)
    st = sub.add_parser("status", help="clusters, instances, storage nodes")
    st.add_argument("--json", action="store_true")
    st.add_argument("--show-secrets", action="store_true",
                    help="keep the passwords in the connection strings (--json)")
    st.set_defaults(func=cmd_status)
    sub.add_parser("down", help="stop everything, keep the data").set_defaults(func=cmd_down)
    de = sub.add_parser("destroy", help="stop a cluster and delete its data")
    de.add_argument("name", type=CLUSTER)
    de.set_defaults(func=cmd_destroy)
    fo = sub.add_parser("failover", help="promote a reader to writer now (fences the old one)")
    fo.add_argument("cluster", type=CLUSTER)
    fo.add_argument("--target", default=None, type=INSTANCE,
                    help="the reader to promote (default: by promotion tier, then replay "
                    "position)")
    fo.set_defaults(func=cmd_failover)
    _secret_and_backup_commands(sub)
    _copy_commands(sub)
    _instance_and_endpoint_commands(sub)
    observe.add_commands(sub)
    hosts.add_commands(sub)
    return p


Subparsers = Any  # argparse's _SubParsersAction is private


def _secret_and_backup_commands(sub: Subparsers) -> None:
    sub.add_parser("credentials", help="shell exports for boto3 and the AWS CLI "
                   "(eval \"$(borealis credentials)\")").set_defaults(func=cmd_credentials)
    sec = sub.add_parser("secret", help="database credentials for the Data API")
    ssub = sec.add_subparsers(dest="secret_command", required=True)
    sc = ssub.add_parser("create", help="store a user and password under an ARN")
    sc.add_argument("name", type=SECRET)
    sc.add_argument("--cluster", required=True, type=CLUSTER)
    sc.add_argument("--user", default=None, help="default: the master user (created when "
                    "it does not exist)")
    sc.add_argument("--password", default=None)
    sc.set_defaults(func=cmd_secret_create)
    sl = ssub.add_parser("list", help="secrets and their ARNs")
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(func=cmd_secret_list)
    sd = ssub.add_parser("delete", help="forget a secret (the database user stays)")
    sd.add_argument("name", type=SECRET)
    sd.set_defaults(func=cmd_secret_delete)
    bk = sub.add_parser("backup", help="continuous backup")
    bsub = bk.add_subparsers(dest="backup_command", required=True)
    bs = bsub.add_parser("status", help="restorable window, base images, WAL archived, "
                         "verification")
    bs.add_argument("cluster", type=CLUSTER)
    bs.add_argument("--json", action="store_true")
    bs.add_argument("--no-verify", action="store_true", help="skip checking every object")
    bs.set_defaults(func=cmd_backup_status)


def _copy_commands(sub: Subparsers) -> None:
    rs = sub.add_parser("restore", help="a new cluster from a cluster's backups")
    rs.add_argument("cluster", type=CLUSTER)
    when = rs.add_mutually_exclusive_group(required=True)
    when.add_argument("--to-time", help="ISO 8601, e.g. 2026-11-23T04:55:00.250Z (UTC "
                      "without a zone)")
    when.add_argument("--latest", action="store_true", help="the latest restorable time")
    new_cluster_args(rs)
    rs.set_defaults(func=cmd_restore)
    cl = sub.add_parser("clone", help="a new cluster with a cluster's current state")
    cl.add_argument("cluster", type=CLUSTER)
    new_cluster_args(cl)
    cl.set_defaults(func=cmd_clone)
    bt = sub.add_parser("backtrack", help="rewind a cluster in place to a time in its "
                        "backtrack window")
    bt.add_argument("cluster", type=CLUSTER)
    bt.add_argument("--to-time", required=True, help="ISO 8601, e.g. 2026-11-23T04:55:00Z")
    bt.set_defaults(func=cmd_backtrack)
    sn = sub.add_parser("snapshot", help="named restore points, kept until deleted")
    snsub = sn.add_subparsers(dest="snapshot_command", required=True)
    snc = snsub.add_parser("create", help="take a snapshot of a cluster now")
    snc.add_argument("cluster", type=CLUSTER)
    snc.add_argument("name", type=SNAPSHOT)
    snc.set_defaults(func=cmd_snapshot_create)
    snl = snsub.add_parser("list", help="snapshots")
    snl.add_argument("--json", action="store_true")
    snl.set_defaults(func=cmd_snapshot_list)
    snd = snsub.add_parser("delete", help="delete a snapshot")
    snd.add_argument("name", type=SNAPSHOT)
    snd.set_defaults(func=cmd_snapshot_delete)
    snr = snsub.add_parser("restore", help="a new cluster from a snapshot")
    snr.add_argument("name", type=SNAPSHOT)
    new_cluster_args(snr)
    snr.set_defaults(func=cmd_snapshot_restore)


def _instance_and_endpoint_commands(sub: Subparsers) -> None:
    inst = sub.add_parser("instance", help="add or remove instances")
    isub = inst.add_subparsers(dest="instance_command", required=True)
    add = isub.add_parser("add", help="add an instance (a reader; the writer when the "
                          "cluster has none)")
    add.add_argument("cluster", type=CLUSTER)
    add.add_argument("--az", default=None)
    add.add_argument("--tier", type=int, default=1)
    add.add_argument("--id", default=None, type=INSTANCE,
                     help="instance identifier (default: <cluster>-<n>)")
    add.set_defaults(func=cmd_instance_add)
    rm = isub.add_parser("remove", help="remove a reader")
    rm.add_argument("id", type=INSTANCE)
    rm.set_defaults(func=cmd_instance_remove)
    ep = sub.add_parser("endpoint", help="custom endpoints")
    esub = ep.add_subparsers(dest="endpoint_command", required=True)
    for verb, func in (("create", cmd_endpoint_create), ("modify", cmd_endpoint_modify)):
        e = esub.add_parser(verb, help=f"{verb} a custom endpoint")
        e.add_argument("name", type=ENDPOINT)
        if verb == "create":
            e.add_argument("--cluster", required=True, type=CLUSTER)
        e.add_argument("--type", choices=["READER", "ANY"],
                       default="ANY" if verb == "create" else None)
        members = e.add_mutually_exclusive_group()
        members.add_argument("--static", nargs="+", metavar="ID", default=None, type=INSTANCE)
        members.add_argument("--excluded", nargs="+", metavar="ID", default=None,
                             type=INSTANCE)
        e.set_defaults(func=func)
    de = esub.add_parser("delete", help="delete a custom endpoint")
    de.add_argument("name", type=ENDPOINT)
    de.set_defaults(func=cmd_endpoint_delete)


def new_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new-cluster", required=True, type=CLUSTER, help="the cluster to create")
    p.add_argument("--readers", type=int, default=0, help="readers besides its writer")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
