"""CloudWatch's CBOR protocol as botocore's own serializer and parser see it, and the
Prometheus names: no server, no sockets."""

from __future__ import annotations

import datetime as dt

import botocore.session
import cbor2
from botocore.parsers import create_parser
from botocore.serialize import create_serializer

from borealis.api import cbor_codec, prometheus
from borealis.api.errors import ApiError
from borealis.control.metric_sampling import rate

MODEL = botocore.session.get_session().get_service_model("cloudwatch")


def test_a_request_botocore_serializes_is_parsed() -> None:
    op = MODEL.operation_model("GetMetricStatistics")
    start = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    wire = create_serializer("smithy-rpc-v2-cbor").serialize_to_request(
        {"Namespace": "AWS/RDS", "MetricName": "CPUUtilization", "StartTime": start,
         "EndTime": start + dt.timedelta(hours=1), "Period": 60,
         "Statistics": ["Average"]}, op)
    parsed_op, params = cbor_codec.parse_request(MODEL, wire["url_path"], wire["body"])
    assert parsed_op.name == "GetMetricStatistics"
    assert params["MetricName"] == "CPUUtilization" and params["Period"] == 60
    assert params["StartTime"].timestamp() == start.timestamp()


def test_a_result_parses_in_botocore_with_its_timestamps() -> None:
    op = MODEL.operation_model("GetMetricStatistics")
    body = cbor_codec.serialize_result(op, {"Label": "CommitThroughput", "Datapoints": [
        {"Timestamp": 1_800_000_000.0, "Average": 412.5, "Unit": "Count/Second"}]})
    parsed = create_parser("smithy-rpc-v2-cbor").parse(
        {"body": body, "headers": {"smithy-protocol": "rpc-v2-cbor"}, "status_code": 200},
        op.output_shape)
    point = parsed["Datapoints"][0]
    assert point["Average"] == 412.5
    assert point["Timestamp"] == dt.datetime.fromtimestamp(1_800_000_000, dt.UTC)


def test_an_error_carries_the_query_code_boto3_matches() -> None:
    body, status, headers = cbor_codec.serialize_error(
        MODEL, ApiError("InvalidParameterCombination", "too many datapoints"))
    assert status == 400 and headers["x-amzn-query-error"] == "InvalidParameterCombination;Sender"
    parsed = create_parser("smithy-rpc-v2-cbor").parse(
        {"body": body, "headers": headers, "status_code": status},
        MODEL.operation_model("GetMetricStatistics").output_shape)
    assert parsed["Error"]["Code"] == "InvalidParameterCombination"
    assert parsed["Error"]["Message"] == "too many datapoints"


def test_a_body_that_is_not_cbor_is_refused() -> None:
    path = cbor_codec.operation_path(MODEL) + "ListMetrics"
    for body in (b"\xff\xff\xff", cbor2.dumps([1, 2])):
        try:
            cbor_codec.parse_request(MODEL, path, body)
        except ApiError as exc:
            assert exc.code == "SerializationException"
        else:
            raise AssertionError(f"{body!r} was taken")


def test_prometheus_names() -> None:
    assert prometheus.prometheus_name("AuroraReplicaLag") == \
        "borealis_aurora_replica_lag_milliseconds"
    assert prometheus.prometheus_name("CPUUtilization") == "borealis_cpu_utilization_percent"
    assert prometheus.prometheus_name("DatabaseConnections") == "borealis_database_connections"
    assert prometheus.snake("DBInstanceIdentifier") == "db_instance_identifier"


def test_a_counter_that_went_back_gives_no_rate() -> None:
    assert rate(100, 160, 6) == 10
    assert rate(160, 3, 5) is None  # a restarted server's counters start again
    assert rate(None, 3, 5) is None and rate(1, 2, 0) is None


def test_the_json_and_query_protocols_round_trip_through_botocore() -> None:
    from borealis.api import json_codec, query_codec

    op = MODEL.operation_model("GetMetricStatistics")
    start = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    params = {"Namespace": "AWS/RDS", "MetricName": "CPUUtilization", "StartTime": start,
              "EndTime": start + dt.timedelta(hours=1), "Period": 60,
              "Statistics": ["Average"],
              "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": "c-1"}]}
    wire = create_serializer("json").serialize_to_request(params, op)
    target = wire["headers"]["X-Amz-Target"]
    assert json_codec.targets(MODEL, target)
    parsed_op, parsed = json_codec.parse_request(MODEL, target, wire["body"])
    assert parsed_op.name == op.name and parsed["StartTime"] == start
    assert parsed["Dimensions"] == params["Dimensions"]
    result = {"Label": "CPUUtilization", "Datapoints": [
        {"Timestamp": 1_800_000_000.0, "Average": 12.5, "Unit": "Percent"}]}
    back = create_parser("json").parse(
        {"body": json_codec.serialize_result(result), "headers": {}, "status_code": 200},
        op.output_shape)
    assert back["Datapoints"][0]["Timestamp"] == dt.datetime.fromtimestamp(1_800_000_000,
                                                                            dt.UTC)
    body, status, headers = json_codec.serialize_error(
        MODEL, ApiError("MissingParameter", "Statistics is required"))
    error = create_parser("json").parse({"body": body, "headers": headers,
                                         "status_code": status}, op.output_shape)
    assert error["Error"]["Code"] == "MissingParameter" and status == 400
    # The query protocol (botocore before CloudWatch moved off it).
    form = create_serializer("query").serialize_to_request(params, op)["body"]
    import urllib.parse
    fields = query_codec.parse_form(urllib.parse.urlencode(form).encode())
    query_op, from_form = query_codec.parse_request(MODEL, fields)
    assert query_op.name == op.name and from_form["Period"] == 60
    xml = query_codec.serialize_result(op, result, "rid")
    parsed_xml = create_parser("query").parse({"body": xml, "headers": {},
                                               "status_code": 200}, op.output_shape)
    assert parsed_xml["Datapoints"][0]["Average"] == 12.5
