"""The RDS and RDS Data APIs, driven by real boto3 clients and the real AWS CLI,
configured only with what ``borealis credentials`` prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.harness import Borealis, ClusterView, wait_for

WAIT = {"Delay": 1, "MaxAttempts": 180}
# Passwords are data: libpq would read an unquoted backslash as an escape and a quote as
# the start of a quoted value.
FIRST_PASSWORD = "pw\\li'fe-123"
NEW_PASSWORD = "'n\\ew'pass-9\\"
ENGINE = "aurora-postgresql"


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def writer_of(cluster: dict[str, Any]) -> str:
    return next(m["DBInstanceIdentifier"] for m in cluster["DBClusterMembers"]
                if m["IsClusterWriter"])


def test_cluster_lifecycle_with_boto3(cluster: ClusterView) -> None:
    borealis = cluster.b  # a running control plane (the shared cluster is not touched)
    rds = borealis.client("rds")
    with pytest.raises(ClientError) as unsupported:
        rds.create_db_cluster(DBClusterIdentifier="life", Engine=ENGINE, MasterUsername="owner",
                              MasterUserPassword="pw-life-123", StorageEncrypted=True)
    assert error_code(unsupported) == "NotImplemented"  # refused, not silently ignored
    created = rds.create_db_cluster(DBClusterIdentifier="Life", Engine=ENGINE,
                                    MasterUsername="owner", MasterUserPassword=FIRST_PASSWORD,
                                    DeletionProtection=True,
                                    Tags=[{"Key": "team", "Value": "storage"}])
    assert created["DBCluster"]["Status"] == "creating"
    assert created["DBCluster"]["DBClusterIdentifier"] == "life"  # AWS lower-cases ids
    rds.get_waiter("db_cluster_available").wait(DBClusterIdentifier="life", WaiterConfig=WAIT)
    for instance_id, az, tier in (("life-a", "az-a", 1), ("life-b", "az-b", 0)):
        inst = rds.create_db_instance(DBInstanceIdentifier=instance_id, DBClusterIdentifier="life",
                                      Engine=ENGINE, DBInstanceClass="db.r6g.large",
                                      AvailabilityZone=az, PromotionTier=tier)["DBInstance"]
        assert inst["DBInstanceStatus"] == "creating"
        rds.get_waiter("db_instance_available").wait(DBInstanceIdentifier=instance_id,
                                                     WaiterConfig=WAIT)
    with pytest.raises(ClientError) as dup:
        rds.create_db_instance(DBInstanceIdentifier="life-a", DBClusterIdentifier="life",
                               Engine=ENGINE, DBInstanceClass="db.r6g.large")
    assert error_code(dup) == "DBInstanceAlreadyExists"

    cluster = rds.describe_db_clusters(DBClusterIdentifier="life")["DBClusters"][0]
    assert cluster["Engine"] == ENGINE and cluster["EngineVersion"].startswith("15.")
    assert cluster["DBClusterArn"].endswith(":cluster:life")
    assert writer_of(cluster) == "life-a"
    assert cluster["TagList"] == [{"Key": "team", "Value": "storage"}]
    rds.add_tags_to_resource(ResourceName=cluster["DBClusterArn"],
                             Tags=[{"Key": "env", "Value": "test"}])
    tags = rds.list_tags_for_resource(ResourceName=cluster["DBClusterArn"])["TagList"]
    assert {t["Key"]: t["Value"] for t in tags} == {"team": "storage", "env": "test"}
    assert {m["DBInstanceIdentifier"]: m["PromotionTier"]
            for m in cluster["DBClusterMembers"]} == {"life-a": 1, "life-b": 0}
    port = cluster["Port"]
    conninfo = {"port": port, "user": "owner", "password": FIRST_PASSWORD,
                "dbname": "postgres", "connect_timeout": 30}
    with psycopg.connect(host=cluster["Endpoint"], autocommit=True, **conninfo) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("INSERT INTO t VALUES (1)")
    with psycopg.connect(host=cluster["ReaderEndpoint"], **conninfo) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    instances = rds.describe_db_instances(
        Filters=[{"Name": "db-cluster-id", "Values": ["life"]}])["DBInstances"]
    ports = {i["DBInstanceIdentifier"]: i["Endpoint"] for i in instances}
    assert {i["DBInstanceStatus"] for i in instances} == {"available"}

    # The Data API on this cluster, before and after the failover (kept connections to
    # the old writer must not be handed out again).
    data = borealis.client("rds-data")
    target = {"resourceArn": cluster["DBClusterArn"],
              "secretArn": cluster["MasterUserSecret"]["SecretArn"]}
    count = "SELECT count(*) FROM t"
    assert data.execute_statement(sql=count, **target)["records"] == [[{"longValue": 1}]]

    # A new password with a backslash and a quote: supervision, the volume client (made
    # to log in again) and the failover below keep working.
    rds.modify_db_cluster(DBClusterIdentifier="life", MasterUserPassword=NEW_PASSWORD,
                          ApplyImmediately=True)
    conninfo["password"] = NEW_PASSWORD
    life = ClusterView(borealis, "life")
    os.kill(life.status()["volume_client"]["pid"], signal.SIGKILL)
    with psycopg.connect(host=cluster["Endpoint"], autocommit=True, **conninfo) as conn:
        conn.execute("INSERT INTO t VALUES (2)")  # commits need the new volume client
    with psycopg.connect(host=cluster["Endpoint"], autocommit=True, **conninfo) as conn:
        conn.execute("DELETE FROM t WHERE id = 2")

    # Fail over to the chosen reader (the writer itself is no target: refused at once).
    with pytest.raises(ClientError) as self_target:
        rds.failover_db_cluster(DBClusterIdentifier="life", TargetDBInstanceIdentifier="life-a")
    assert error_code(self_target) == "InvalidDBInstanceState"  # the wire code, as AWS
    assert "already the writer" in str(self_target.value)
    failing = rds.failover_db_cluster(DBClusterIdentifier="life",
                                      TargetDBInstanceIdentifier="life-b")["DBCluster"]
    assert failing["Status"] == "failing-over"
    wait_for("life-b to be the writer", lambda: (lambda c: c["Status"] == "available"
             and writer_of(c) == "life-b")(
        rds.describe_db_clusters(DBClusterIdentifier="life")["DBClusters"][0]), 120)
    rds.get_waiter("db_instance_available").wait(DBInstanceIdentifier="life-a",
                                                 WaiterConfig=WAIT)
    with psycopg.connect(host=cluster["Endpoint"], autocommit=True, **conninfo) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)
    assert data.execute_statement(sql=count, **target)["records"] == [[{"longValue": 2}]]

    # A custom endpoint over the old writer (now a reader).
    ep = rds.create_db_cluster_endpoint(DBClusterIdentifier="life",
                                        DBClusterEndpointIdentifier="life-old",
                                        EndpointType="ANY", StaticMembers=["life-a"])
    assert ep["CustomEndpointType"] == "ANY" and ep["StaticMembers"] == ["life-a"]
    wait_for("the custom endpoint", lambda: rds.describe_db_cluster_endpoints(
        DBClusterEndpointIdentifier="life-old")["DBClusterEndpoints"][0]["Status"]
        == "available", 30)
    with psycopg.connect(host=ep["Endpoint"], **conninfo) as conn:
        row = conn.execute("SELECT current_setting('port')::int, pg_is_in_recovery()").fetchone()
    assert row is not None and row[1] is True
    assert row[0] != ports["life-b"]["Port"]
    listed = rds.describe_db_cluster_endpoints(DBClusterIdentifier="life")["DBClusterEndpoints"]
    assert sorted(e["EndpointType"] for e in listed) == ["CUSTOM", "READER", "WRITER"]
    rds.modify_db_cluster_endpoint(DBClusterEndpointIdentifier="life-old",
                                   ExcludedMembers=["life-b"])
    rds.delete_db_cluster_endpoint(DBClusterEndpointIdentifier="life-old")
    with pytest.raises(ClientError) as gone:
        rds.describe_db_cluster_endpoints(DBClusterEndpointIdentifier="life-old")
    assert error_code(gone) == "DBClusterEndpointNotFoundFault"

    messages = [e["Message"] for e in rds.describe_events(
        SourceType="db-cluster", SourceIdentifier="life", Duration=60)["Events"]]
    assert any("promoted life-b" in m for m in messages)
    # The failover as the AWS CLI lists it: Aurora's messages, in its category.
    aws = Path(sys.executable).with_name("aws")
    listed = json.loads(subprocess.run(
        [str(aws), "rds", "describe-events", "--source-type", "db-cluster",
         "--source-identifier", "life", "--event-categories", "failover", "--output",
         "json"], env=borealis.aws_env(), capture_output=True, text=True, timeout=120,
        check=True).stdout)["Events"]
    assert "Completed failover to DB instance: life-b" in [e["Message"] for e in listed]
    assert all(e["EventCategories"] == ["failover"] for e in listed), listed
    promoted = rds.describe_events(SourceType="db-instance", SourceIdentifier="life-b",
                                   Duration=60)["Events"]
    assert any(e["EventCategories"] == ["failover"] for e in promoted), promoted
    categories = rds.describe_event_categories(SourceType="db-cluster")
    assert "failover" in categories["EventCategoriesMapList"][0]["EventCategories"]
    with pytest.raises(ClientError) as bad:
        rds.describe_events(SourceType="db-planet")
    assert error_code(bad) == "InvalidParameterValue"

    # A reboot of a reader: rebooting, then available again.
    rebooting = rds.reboot_db_instance(DBInstanceIdentifier="life-a")["DBInstance"]
    assert rebooting["DBInstanceStatus"] == "rebooting"
    rds.get_waiter("db_instance_available").wait(DBInstanceIdentifier="life-a",
                                                 WaiterConfig=WAIT)

    # Delete everything: a cluster with instances cannot go first.
    with pytest.raises(ClientError) as busy:
        rds.delete_db_cluster(DBClusterIdentifier="life", SkipFinalSnapshot=True)
    assert error_code(busy) == "InvalidDBClusterStateFault"
    for instance_id in ("life-a", "life-b"):
        rds.delete_db_instance(DBInstanceIdentifier=instance_id, SkipFinalSnapshot=True)
    for instance_id in ("life-a", "life-b"):
        rds.get_waiter("db_instance_deleted").wait(DBInstanceIdentifier=instance_id,
                                                   WaiterConfig=WAIT)
    with pytest.raises(ClientError) as protected:
        rds.delete_db_cluster(DBClusterIdentifier="life", SkipFinalSnapshot=True)
    assert error_code(protected) == "InvalidParameterCombination"
    rds.modify_db_cluster(DBClusterIdentifier="life", DeletionProtection=False,
                          ApplyImmediately=True)
    deleted = rds.delete_db_cluster(DBClusterIdentifier="life", SkipFinalSnapshot=True)
    assert deleted["DBCluster"]["Status"] == "deleting"
    rds.get_waiter("db_cluster_deleted").wait(DBClusterIdentifier="life", WaiterConfig=WAIT)
    assert not (borealis.home / "clusters" / "life").exists()


def test_aws_cli_describes_the_cluster(cluster: ClusterView) -> None:
    aws = Path(sys.executable).with_name("aws")
    out = subprocess.run([str(aws), "rds", "describe-db-clusters", "--output", "json"],
                         env=cluster.b.aws_env(), capture_output=True, text=True, timeout=120,
                         check=True).stdout
    clusters = {c["DBClusterIdentifier"]: c for c in json.loads(out)["DBClusters"]}
    assert clusters["shared"]["Engine"] == ENGINE
    assert clusters["shared"]["Status"] == "available"


# -- the Data API ---------------------------------------------------------------------------


def data_target(cluster: ClusterView) -> dict[str, str]:
    described = cluster.b.client("rds").describe_db_clusters(
        DBClusterIdentifier="shared")["DBClusters"][0]
    return {"resourceArn": described["DBClusterArn"],
            "secretArn": described["MasterUserSecret"]["SecretArn"]}


def test_data_api_statements_and_transactions(cluster: ClusterView) -> None:
    data = cluster.b.client("rds-data")
    target = data_target(cluster)
    data.execute_statement(sql="CREATE TABLE api_items (id bigint PRIMARY KEY, name text, "
                               "price numeric(8,2), seen timestamp, tags text[])", **target)
    inserted = data.execute_statement(
        sql="INSERT INTO api_items VALUES (:id, :name, :price, :seen, '{a,b}')",
        parameters=[{"name": "id", "value": {"longValue": 1}},
                    {"name": "name", "value": {"stringValue": "it's :not a param"}},
                    {"name": "price", "value": {"stringValue": "9.50"}, "typeHint": "DECIMAL"},
                    {"name": "seen", "value": {"stringValue": "2026-11-23 04:55:00.25"},
                     "typeHint": "TIMESTAMP"}], **target)
    assert inserted["numberOfRecordsUpdated"] == 1
    plain = data.execute_statement(sql="SELECT * FROM api_items", includeResultMetadata=True,
                                   **target)
    assert plain["records"] == [[{"longValue": 1}, {"stringValue": "it's :not a param"},
                                 {"stringValue": "9.50"},
                                 {"stringValue": "2026-11-23 04:55:00.25"},
                                 {"arrayValue": {"stringValues": ["a", "b"]}}]]
    assert [c["name"] for c in plain["columnMetadata"]] == ["id", "name", "price", "seen", "tags"]
    assert plain["columnMetadata"][0]["typeName"] == "int8"
    as_json = data.execute_statement(sql="SELECT id, name FROM api_items",
                                     formatRecordsAs="JSON", **target)
    assert json.loads(as_json["formattedRecords"]) == [{"id": 1, "name": "it's :not a param"}]
    assert "records" not in as_json

    tx = data.begin_transaction(**target)["transactionId"]
    data.execute_statement(sql="INSERT INTO api_items (id) VALUES (2)", transactionId=tx, **target)
    assert data.rollback_transaction(transactionId=tx, **target)["transactionStatus"] == \
        "Rollback Complete"
    tx = data.begin_transaction(**target)["transactionId"]
    data.execute_statement(sql="INSERT INTO api_items (id) VALUES (3)", transactionId=tx, **target)
    outside = data.execute_statement(sql="SELECT count(*) FROM api_items", **target)
    assert outside["records"] == [[{"longValue": 1}]]  # not visible before the commit
    assert data.commit_transaction(transactionId=tx, **target)["transactionStatus"] == \
        "Transaction Committed"
    ids = data.execute_statement(sql="SELECT id FROM api_items ORDER BY id", **target)
    assert ids["records"] == [[{"longValue": 1}], [{"longValue": 3}]]
    with pytest.raises(ClientError) as done:
        data.commit_transaction(transactionId=tx, **target)
    assert error_code(done) == "TransactionNotFoundException"

    # Calls share kept connections, never their session state; the same statement many
    # times over (psycopg would prepare it after five) keeps working.
    for i in range(8):
        same = data.execute_statement(sql="SELECT :i::int", parameters=[
            {"name": "i", "value": {"longValue": i}}], **target)
        assert same["records"] == [[{"longValue": i}]]
    data.execute_statement(sql="SET statement_timeout = '123s'", **target)
    shown = data.execute_statement(sql="SHOW statement_timeout", **target)
    assert shown["records"] != [[{"stringValue": "123s"}]]

    batch = data.batch_execute_statement(
        sql="INSERT INTO api_items (id) VALUES (:id)",
        parameterSets=[[{"name": "id", "value": {"longValue": i}}] for i in (10, 11, 12)],
        **target)
    assert len(batch["updateResults"]) == 3

    with pytest.raises(ClientError) as big:
        data.execute_statement(sql="SELECT repeat('x', 1000) FROM generate_series(1, 2000)",
                               **target)
    assert error_code(big) == "BadRequestException"
    assert "response size limit" in big.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as bad_sql:
        data.execute_statement(sql="SELECT * FROM no_such_table", **target)
    assert error_code(bad_sql) == "BadRequestException"
    assert "42P01" in bad_sql.value.response["Error"]["Message"]


def test_data_api_limits(cluster: ClusterView) -> None:
    """A call past the time limit is cancelled; an idle transaction is rolled back
    (6 s and 8 s in tests, 45 s and 3 minutes by default)."""
    data = cluster.b.client("rds-data")
    target = data_target(cluster)
    data.execute_statement(sql="CREATE TABLE api_idle (id int)", **target)
    started = time.monotonic()
    with pytest.raises(ClientError) as slow:
        data.execute_statement(sql="SELECT pg_sleep(60)", **target)
    assert error_code(slow) == "StatementTimeoutException"
    assert time.monotonic() - started < 30
    running = data.execute_statement(
        sql="SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' "
            "AND state = 'active'", **target)
    assert running["records"] == [[{"longValue": 0}]]  # cancelled, not left running

    tx = data.begin_transaction(**target)["transactionId"]
    data.execute_statement(sql="INSERT INTO api_idle VALUES (1)", transactionId=tx, **target)

    def rolled_back() -> bool:
        try:
            data.execute_statement(sql="SELECT 1", transactionId=tx, **target)
        except ClientError as exc:
            return bool(exc.response["Error"]["Code"] == "TransactionNotFoundException")
        return False
    # The check itself counts as use: poll less often than the idle limit plus the
    # reaper's interval (8 + 5 s).
    wait_for("the idle transaction to be rolled back", rolled_back, 60, interval_s=14)
    count = data.execute_statement(sql="SELECT count(*) FROM api_idle", **target)
    assert count["records"] == [[{"longValue": 0}]]


def test_secrets_for_other_users(cluster: ClusterView) -> None:
    b = cluster.b
    b.cli("secret", "create", "reporting", "--cluster", "shared", "--user", "reporter")
    secrets = {s["name"]: s for s in json.loads(b.cli("secret", "list", "--json").stdout)}
    assert secrets["reporting"]["cluster"] == "shared"
    data = b.client("rds-data")
    target = {**data_target(cluster), "secretArn": secrets["reporting"]["arn"]}
    who = data.execute_statement(sql="SELECT current_user", **target)
    assert who["records"] == [[{"stringValue": "reporter"}]]
    wrong = b.cli("secret", "create", "bad", "--cluster", "shared", "--user", "reporter",
                  "--password", "not-its-password", check=False)
    assert wrong.returncode != 0 and "does not log in" in wrong.stderr
    b.cli("secret", "delete", "reporting")
    with pytest.raises(ClientError) as gone:
        data.execute_statement(sql="SELECT 1", **target)
    assert error_code(gone) == "SecretsErrorException"


# -- refusals -------------------------------------------------------------------------------


def test_wrong_keys_are_refused_and_change_nothing(cluster: ClusterView) -> None:
    b = cluster.b
    bad_rds = b.client("rds", aws_secret_access_key="x" * 40)
    with pytest.raises(ClientError) as refused:
        bad_rds.create_db_cluster(DBClusterIdentifier="intruder", Engine=ENGINE,
                                  MasterUsername="x", MasterUserPassword="password-1")
    assert error_code(refused) == "SignatureDoesNotMatch"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as unknown:
        b.client("rds", aws_access_key_id="AKIANOSUCHKEY0000000").describe_db_clusters()
    assert error_code(unknown) == "InvalidClientTokenId"
    bad_data = b.client("rds-data", aws_secret_access_key="x" * 40)
    with pytest.raises(ClientError) as data_refused:
        bad_data.execute_statement(sql="CREATE TABLE intruder (i int)", **data_target(cluster))
    assert error_code(data_refused) == "InvalidSignatureException"
    assert "intruder" not in {c["name"] for c in b.status()["clusters"]}
    with cluster.connect(cluster.writer()) as conn:
        assert conn.execute("SELECT to_regclass('intruder')").fetchone() == (None,)


def raw(b: Borealis, path: str, body: bytes, content_type: str, service: str,
        sign: bool = True) -> tuple[int, dict[str, str], bytes]:
    env = b.aws_env()
    url = env["AWS_ENDPOINT_URL"] + path
    request = AWSRequest(method="POST", url=url, data=body,
                         headers={"Content-Type": content_type})
    if sign:
        SigV4Auth(Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]), service,
                  env["AWS_DEFAULT_REGION"]).add_auth(request)
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers=dict(request.headers.items()))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


@pytest.mark.parametrize("body,status,code", [
    (b"Action=NoSuchAction&Version=2014-10-31", 400, "InvalidAction"),
    (b"Action=DescribeDBClusters&Version=2014-10-31&MaxRecords=many", 400,
     "InvalidParameterValue"),
    (b"Action=CreateDBCluster&Version=2014-10-31&Engine=aurora-postgresql", 400,
     "MissingParameter"),
    (b"Action=DescribeDBClusters&Version=2014-10-31&DBClusterIdentifier=nope", 404,
     "DBClusterNotFoundFault"),
    (b"Action=CreateGlobalCluster&Version=2014-10-31&GlobalClusterIdentifier=g1", 501,
     "NotImplemented"),
    (b"Action=DescribeDBClusters&Version=2014-10-31&" + b"x" * (5 << 20), 413,
     "RequestEntityTooLarge"),
    (b"\xff\xfe", 400, "MalformedQueryString"),
])
def test_malformed_rds_requests_get_aws_errors(cluster: ClusterView, body: bytes, status: int,
                                               code: str) -> None:
    got, headers, answer = raw(cluster.b, "/", body, "application/x-www-form-urlencoded",
                               "rds")
    assert got == status, answer
    assert headers["Content-Type"].startswith("text/xml")
    assert b"<ErrorResponse" in answer and f"<Code>{code}</Code>".encode() in answer
    assert b"Traceback" not in answer


def test_unsigned_requests_are_refused(cluster: ClusterView) -> None:
    status, _, answer = raw(cluster.b, "/", b"Action=DescribeDBClusters&Version=2014-10-31",
                            "application/x-www-form-urlencoded", "rds", sign=False)
    assert status == 403 and b"<Code>MissingAuthenticationToken</Code>" in answer
    status, headers, _ = raw(cluster.b, "/Execute", b"{}", "application/json", "rds-data",
                             sign=False)
    assert status == 403
    assert headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"sql": 5}',
                                  b'{"resourceArn": "a", "secretArn": "b", "sql": "x", '
                                  b'"extra": 1}'])
def test_malformed_data_api_requests_get_aws_errors(cluster: ClusterView, body: bytes) -> None:
    status, headers, answer = raw(cluster.b, "/Execute", body, "application/json", "rds-data")
    assert status == 400
    assert headers["x-amzn-ErrorType"] == "BadRequestException"
    assert "message" in json.loads(answer) and b"Traceback" not in answer


@pytest.mark.parametrize("bad", ["..", "/etc", "", "a" * 64, "r\u00e9plica", "a--b"])
def test_odd_identifiers_are_refused_everywhere_and_change_nothing(cluster: ClusterView,
                                                                   bad: str) -> None:
    b = cluster.b
    home_before = sorted(p.relative_to(b.home) for p in (b.home / "clusters").rglob("*")
                         if "instances" in p.parts and p.is_dir() and len(p.parts) < 20)
    quoted = urllib.parse.quote(bad, safe="")
    for action, field in [("CreateDBInstance", "DBInstanceIdentifier"),
                          ("CreateDBClusterEndpoint", "DBClusterEndpointIdentifier"),
                          ("CreateDBClusterSnapshot", "DBClusterSnapshotIdentifier"),
                          ("CreateDBCluster", "DBClusterIdentifier")]:
        body = (f"Action={action}&Version=2014-10-31&{field}={quoted}&DBClusterIdentifier="
                f"{'shared' if field != 'DBClusterIdentifier' else quoted}&Engine={ENGINE}"
                "&DBInstanceClass=db.r6g.large&EndpointType=READER").encode()
        status, _, answer = raw(b, "/", body, "application/x-www-form-urlencoded", "rds")
        assert status == 400, (action, answer)
        assert b"<Code>InvalidParameterValue</Code>" in answer or \
            b"<Code>MissingParameter</Code>" in answer, (action, answer)
    # The CLI's own routes, and the CLI itself.
    for args in (["up", "--cluster", bad], ["destroy", bad],
                 ["snapshot", "create", "shared", bad]):
        if not bad and args[0] == "destroy":
            continue
        proc = b.cli(*args, check=False)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr, proc.stderr
    home_after = sorted(p.relative_to(b.home) for p in (b.home / "clusters").rglob("*")
                        if "instances" in p.parts and p.is_dir() and len(p.parts) < 20)
    assert home_after == home_before
    assert Path("/etc/passwd").exists()


def test_deletion_protection_holds_on_every_path(cluster: ClusterView) -> None:
    rds = cluster.b.client("rds")
    rds.modify_db_cluster(DBClusterIdentifier="shared", DeletionProtection=True)
    try:
        proc = cluster.b.cli("destroy", "shared", check=False)
        assert proc.returncode != 0 and "DeletionProtection" in proc.stderr + proc.stdout
        assert cluster.status()["status"] == "available"
    finally:
        rds.modify_db_cluster(DBClusterIdentifier="shared", DeletionProtection=False)


def test_a_master_password_changed_in_sql_breaks_nothing_of_ours(cluster: ClusterView) -> None:
    """The control plane and the volume client log in as the internal role: a customer
    who changes the master user's password with ALTER ROLE keeps a supervised cluster
    whose commits go on (a new volume client logs in) and whose writer is not failed
    over for failed probes."""
    writer = cluster.writer()
    old = psycopg.conninfo.conninfo_to_dict(writer["dsn"])
    with cluster.connect(writer) as conn:
        user = conn.execute("SELECT current_user").fetchone()
        assert user is not None
        conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD 'changed-in-sql-1'").format(
            psycopg.sql.Identifier(str(user[0]))))
    mine = dict(old, password="changed-in-sql-1")
    failovers = cluster.b.cli("events", "shared").stdout.count("failover: started")
    try:
        before = cluster.status()
        os.kill(before["volume_client"]["pid"], signal.SIGKILL)
        wait_for("a new volume client", lambda: (v := cluster.status()["volume_client"])
                 ["pid"] != before["volume_client"]["pid"] and v["state"] == "running", 30)
        with psycopg.connect(autocommit=True, connect_timeout=10, **mine) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS after_alter (id int)")
            conn.execute("INSERT INTO after_alter VALUES (1)")  # needs the volume client
        assert cluster.writer()["id"] == writer["id"]
        # No failover of its own (another test may have caused one before it).
        assert cluster.b.cli("events", "shared").stdout.count("failover: started") == failovers
    finally:
        with psycopg.connect(autocommit=True, connect_timeout=10, **mine) as conn:
            conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                psycopg.sql.Identifier(old["user"]), psycopg.sql.Literal(old["password"])))
