"""The API's sans-IO parts against botocore itself: what boto3 serializes we parse, what
we write boto3 parses, and signatures botocore makes are the ones we accept."""

from __future__ import annotations

import datetime as dt
import decimal
import urllib.parse
from typing import Any

import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.model import Shape
from botocore.parsers import QueryParser
from botocore.serialize import QuerySerializer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from borealis.api import data_codec, query_codec, sigv4
from borealis.api.errors import ApiError

RDS = botocore.session.get_session().get_service_model("rds")
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)


def values_for(shape: Shape, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of a botocore shape (bounded depth: some RDS shapes nest deeply)."""
    kind = shape.type_name
    if kind == "structure":
        members = {k: m for k, m in shape.members.items() if depth < 3 or k in
                   shape.required_members}
        if not members:
            return st.just({})
        required = {k: values_for(m, depth + 1) for k, m in members.items()
                    if k in shape.required_members}
        optional = {k: values_for(m, depth + 1) for k, m in members.items()
                    if k not in shape.required_members}
        return st.fixed_dictionaries(required, optional=optional)
    if kind == "list":
        # An empty structure in a list leaves no field at all: the query protocol cannot
        # carry it (boto3 would send a gap in the numbering).
        return st.lists(values_for(shape.member, depth + 1).filter(lambda v: v != {}),
                        min_size=1, max_size=3)
    if kind == "map":
        return st.dictionaries(_text.filter(bool), values_for(shape.value, depth + 1),
                               max_size=2)
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "long"):
        return st.integers(-2**31, 2**31 - 1)
    if kind in ("float", "double"):
        return st.floats(allow_nan=False, allow_infinity=False, width=32)
    if kind == "timestamp":
        # Milliseconds: the precision of the time format the API writes.
        return st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                            timezones=st.just(dt.UTC)).map(
            lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000))
    if shape.enum:
        return st.sampled_from(shape.enum)
    return _text


OPERATIONS = ["CreateDBCluster", "CreateDBInstance", "ModifyDBClusterEndpoint",
              "DescribeDBClusters", "DescribeEvents", "FailoverDBCluster"]


@pytest.mark.parametrize("name", OPERATIONS)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_what_boto3_sends_parses_back(name: str, data: st.DataObject) -> None:
    op = RDS.operation_model(name)
    params = data.draw(values_for(op.input_shape))
    body = QuerySerializer().serialize_to_request(params, op)["body"]
    form = urllib.parse.urlencode(body).encode()
    parsed_op, parsed = query_codec.parse_request(RDS, query_codec.parse_form(form))
    assert parsed_op.name == name
    assert parsed == _without_empty(params)


def _without_empty(value: Any) -> Any:
    """The query protocol cannot tell an empty map from a missing one."""
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v != {} or k == ""}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


@pytest.mark.parametrize("name", ["DescribeDBClusters", "DescribeDBInstances",
                                  "CreateDBClusterEndpoint", "DescribeEvents"])
@settings(max_examples=25, deadline=None,  # DBCluster has ~90 members: big draws
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_what_we_write_boto3_parses(name: str, data: st.DataObject) -> None:
    op = RDS.operation_model(name)
    result = data.draw(values_for(op.output_shape))
    body = query_codec.serialize_result(op, result, "req-1")
    parsed = QueryParser().parse({"body": body, "headers": {}, "status_code": 200},
                                 op.output_shape)
    assert parsed.pop("ResponseMetadata")["RequestId"] == "req-1"
    assert _normalized(parsed) == _normalized(result)


def _normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, str):
        return value.replace("\r\n", "\n").replace("\r", "\n")  # XML normalizes line ends
    if isinstance(value, float):
        return pytest.approx(value)
    return value


def test_errors_name_the_problem() -> None:
    cases = [
        ({"Action": "Nope", "Version": "2014-10-31"}, "InvalidAction"),
        ({"Version": "2014-10-31"}, "MissingAction"),
        ({"Action": "DescribeDBClusters", "Version": "2000-01-01"}, "InvalidParameterValue"),
        ({"Action": "CreateDBCluster", "Version": "2014-10-31"}, "MissingParameter"),
        ({"Action": "DescribeDBClusters", "Version": "2014-10-31", "MaxRecords": "x"},
         "InvalidParameterValue"),
        ({"Action": "DescribeDBClusters", "Version": "2014-10-31", "Bogus": "1"},
         "InvalidParameterValue"),
        ({"Action": "FailoverDBCluster", "Version": "2014-10-31", "DBClusterIdentifier": "a",
          "TargetDBInstanceIdentifier.member.1": "x"}, "InvalidParameterValue"),
    ]
    for fields, code in cases:
        with pytest.raises(ApiError) as err:
            query_codec.parse_request(RDS, fields)
        assert err.value.code == code, fields


# -- SigV4 ---------------------------------------------------------------------------------

KEYS = {"AKIDEXAMPLE": "secret-key-example"}


def _signed(body: bytes = b"Action=DescribeDBClusters&Version=2014-10-31",
            secret: str = "secret-key-example", service: str = "rds") -> AWSRequest:
    req = AWSRequest(method="POST", url="http://127.0.0.1:8123/", data=body,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    SigV4Auth(Credentials("AKIDEXAMPLE", secret), service, "us-west-2").add_auth(req)
    return req


def _verify(req: AWSRequest, body: bytes | None = None, **kw: Any) -> str:
    headers = {**dict(req.headers.items()), "Host": "127.0.0.1:8123"}
    return sigv4.verify(req.method, req.url, headers, req.body if body is None else body,
                        KEYS.get, kw.pop("service", "rds"), **kw)


def test_botocore_signatures_verify() -> None:
    assert _verify(_signed()) == "AKIDEXAMPLE"


@pytest.mark.parametrize("case,code", [
    ("wrong secret", "SignatureDoesNotMatch"),
    ("changed body", "SignatureDoesNotMatch"),
    ("unknown key", "InvalidClientTokenId"),
    ("no header", "MissingAuthenticationToken"),
    ("old", "SignatureDoesNotMatch"),
    ("other service", "SignatureDoesNotMatch"),
])
def test_bad_signatures_are_refused(case: str, code: str) -> None:
    req = _signed(secret="wrong" if case == "wrong secret" else "secret-key-example")
    kw: dict[str, Any] = {}
    body = None
    if case == "changed body":
        body = b"Action=DeleteDBCluster&Version=2014-10-31"
    if case == "unknown key":
        req.headers.replace_header("Authorization", req.headers["Authorization"].replace(
            "AKIDEXAMPLE", "AKIDOTHER"))
    if case == "no header":
        del req.headers["Authorization"]
    if case == "old":
        kw["now"] = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=20)
    if case == "other service":
        kw["service"] = "rds-data"
    with pytest.raises(ApiError) as err:
        _verify(req, body, **kw)
    assert err.value.code == code and err.value.status == 403


# -- Data API values -------------------------------------------------------------------------


def test_named_parameters_outside_literals_only() -> None:
    sql = ("SELECT :a, ':b', \"c:d\", x::int, $$ :e $$, $tag$ :f $tag$ -- :g\n"
           "/* :h */ FROM t WHERE y LIKE '%' || :i")
    query, names = data_codec.to_pyformat(sql)
    assert names == ["a", "i"]
    assert query.startswith("SELECT %(a)s, ':b', \"c:d\", x::int, $$ :e $$, $tag$ :f $tag$")
    assert query.endswith("LIKE '%%' || %(i)s")


@given(st.text(alphabet=st.characters(blacklist_characters="'"), max_size=30))
def test_literal_text_is_left_alone(inner: str) -> None:
    query, names = data_codec.to_pyformat(f"SELECT '{inner}'")
    assert names == [] and query == f"SELECT '{inner.replace('%', '%%')}'"


def test_typed_parameters() -> None:
    values = data_codec.bind_parameters(["a", "b", "c", "d", "e"], [
        {"name": "a", "value": {"longValue": 5}},
        {"name": "b", "value": {"stringValue": "2026-11-23 04:55:00.25"},
         "typeHint": "TIMESTAMP"},
        {"name": "c", "value": {"stringValue": "1.10"}, "typeHint": "DECIMAL"},
        {"name": "d", "value": {"isNull": True}},
        {"name": "e", "value": {"arrayValue": {"longValues": [1, 2]}}},
    ])
    assert values["a"] == 5 and values["d"] is None and values["e"] == [1, 2]
    assert values["b"] == dt.datetime(2026, 11, 23, 4, 55, 0, 250000)
    assert values["c"] == decimal.Decimal("1.10")
    with pytest.raises(ApiError, match="No value specified for parameter: z"):
        data_codec.bind_parameters(["z"], [])
    with pytest.raises(ApiError, match="not a valid DATE"):
        data_codec.bind_parameters(["a"], [{"name": "a", "value": {"stringValue": "x"},
                                            "typeHint": "DATE"}])


def test_fields() -> None:
    assert data_codec.field(None) == {"isNull": True}
    assert data_codec.field(True) == {"booleanValue": True}
    assert data_codec.field(7) == {"longValue": 7}
    assert data_codec.field(7, {"longReturnType": "STRING"}) == {"stringValue": "7"}
    assert data_codec.field(decimal.Decimal("2.50")) == {"stringValue": "2.50"}
    assert data_codec.field(b"\x00") == {"blobValue": "AA=="}
    assert data_codec.field(dt.datetime(2026, 1, 2, 3, 4, 5, 120000)) == {
        "stringValue": "2026-01-02 03:04:05.12"}
    assert data_codec.field([[1], [2]]) == {"arrayValue": {"arrayValues": [
        {"longValues": [1]}, {"longValues": [2]}]}}


@pytest.mark.timeout(20)
def test_a_request_with_thousands_of_filters_parses_in_linear_time() -> None:
    """8,000 fields (550 KB) took 51 s when every list item scanned every key."""
    from borealis.api.server import RDS_MODEL
    n = 4000
    body = ("Action=DescribeDBClusters&Version=2014-10-31&" + "&".join(
        f"Filters.Filter.{i}.Name=db-cluster-id&Filters.Filter.{i}.Values.Value.1=c{i}"
        for i in range(1, n + 1))).encode()
    _, params = query_codec.parse_request(RDS_MODEL, query_codec.parse_form(body))
    assert len(params["Filters"]) == n
    assert params["Filters"][-1] == {"Name": "db-cluster-id", "Values": [f"c{n}"]}


def test_a_request_with_too_many_fields_is_refused() -> None:
    body = b"Action=DescribeDBClusters&Version=2014-10-31&" + b"&".join(
        b"x%d=1" % i for i in range(query_codec.MAX_FIELDS + 5))
    with pytest.raises(ApiError) as refused:
        query_codec.parse_form(body)
    assert refused.value.code == "InvalidParameterValue"
