"""The HTTP shell around the API: routes, SigV4 on every request, AWS error shapes.

- ``POST /`` — the RDS management API (AWS query protocol, XML answers);
- ``POST /Execute``, ``/BatchExecute``, ``/BeginTransaction``, ``/CommitTransaction``,
  ``/RollbackTransaction`` — the RDS Data API (REST-JSON);
- ``/v1/...`` — the control plane's own verbs (``up``, ``down``, ``status``), JSON.

No request reaches an operation before its signature is verified against a configured
access key; a refused request changes nothing. Errors never carry a Python trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import botocore.session
from aiohttp import web
from botocore.model import OperationModel, ServiceModel
from botocore.validate import ParamValidator

from borealis.api import (
    cbor_codec,
    console_routes,
    data_api,
    identity,
    json_codec,
    prometheus,
    query_codec,
    sigv4,
)
from borealis.api.autoscaling import AutoScalingOperations
from borealis.api.cloudwatch import CloudWatchOperations
from borealis.api.data_api import DataApi
from borealis.api.errors import ApiError
from borealis.api.rds import RdsOperations
from borealis.api.rds_rules import master_secret_name
from borealis.control.handle import ClusterError

if TYPE_CHECKING:
    from borealis.control.plane import ControlPlane

log = logging.getLogger("borealis.api")

MAX_REQUEST = 4 << 20
CONTROL_SERVICE = "borealis"  # the signing name of the /v1 verbs
METRICS_PATH = "/metrics"  # Prometheus's scrape: a bearer token, not SigV4
CONSOLE_SERVICE = "console"  # the web console: a session cookie, not SigV4
REAP_INTERVAL_S = 5.0

# Auth failures as the JSON protocols name them (the query protocol keeps AWS's names).
_JSON_AUTH_CODES = {
    "SignatureDoesNotMatch": "InvalidSignatureException",
    "InvalidClientTokenId": "UnrecognizedClientException",
    "MissingAuthenticationToken": "MissingAuthenticationTokenException",
    "IncompleteSignature": "IncompleteSignatureException",
}

_session = botocore.session.get_session()
RDS_MODEL: ServiceModel = _session.get_service_model("rds")
DATA_MODEL: ServiceModel = _session.get_service_model("rds-data")
CLOUDWATCH_MODEL: ServiceModel = _session.get_service_model("cloudwatch")
CLOUDWATCH_PATH = cbor_codec.operation_path(CLOUDWATCH_MODEL)
AUTOSCALING_MODEL: ServiceModel = _session.get_service_model("application-autoscaling")


def _query_wire_error(error: ApiError) -> ApiError:
    """The code and HTTP status the RDS model gives an error shape: some differ from the
    shape's name (``DBInstanceNotFoundFault`` goes on the wire as ``DBInstanceNotFound``,
    which is what boto3's exceptions and waiters match)."""
    try:
        meta = RDS_MODEL.shape_for(error.code).metadata.get("error", {})
    except Exception:
        return error
    return ApiError(str(meta.get("code", error.code)), error.message,
                    int(meta.get("httpStatusCode", error.status)))


def query_error(error: ApiError, request_id: str) -> web.Response:
    wire = _query_wire_error(error)
    return web.Response(body=query_codec.serialize_error(RDS_MODEL, wire, request_id),
                        status=wire.status, content_type="text/xml",
                        headers={"x-amzn-RequestId": request_id})


def json_error(error: ApiError, request_id: str) -> web.Response:
    code = _JSON_AUTH_CODES.get(error.code, error.code)
    return web.json_response({"message": error.message}, status=error.status,
                             headers={"x-amzn-ErrorType": code,
                                      "x-amzn-RequestId": request_id})


def control_error(error: ApiError, _: str) -> web.Response:
    return web.json_response({"error": error.message, "code": error.code},
                             status=error.status)


def cbor_error(error: ApiError, request_id: str) -> web.Response:
    body, status, headers = cbor_codec.serialize_error(CLOUDWATCH_MODEL, error)
    return web.Response(body=body, status=status, content_type=cbor_codec.CONTENT_TYPE,
                        headers={**headers, "x-amzn-RequestId": request_id,
                                 cbor_codec.PROTOCOL_HEADER[0]: cbor_codec.PROTOCOL_HEADER[1]})


def cloudwatch_json_error(error: ApiError, request_id: str) -> web.Response:
    body, status, headers = json_codec.serialize_error(CLOUDWATCH_MODEL, error)
    return web.Response(body=body, status=status, content_type=json_codec.CONTENT_TYPE,
                        headers={**headers, "x-amzn-RequestId": request_id})


def autoscaling_error(error: ApiError, request_id: str) -> web.Response:
    body, status, headers = json_codec.serialize_error(AUTOSCALING_MODEL, error)
    return web.Response(body=body, status=status,
                        headers={**headers, "x-amzn-RequestId": request_id,
                                 "Content-Type": json_codec.content_type(AUTOSCALING_MODEL)})


def cloudwatch_query_error(error: ApiError, request_id: str) -> web.Response:
    return web.Response(body=query_codec.serialize_error(CLOUDWATCH_MODEL, error, request_id),
                        status=error.status, content_type="text/xml",
                        headers={"x-amzn-RequestId": request_id})


def _is_cloudwatch_query(body: bytes) -> bool:
    """A form for CloudWatch's query protocol (older botocore): its API version."""
    return b"Version=2010-08-01" in body


def _service_of(path: str, headers: Mapping[str, str], body: bytes = b""
                ) -> tuple[str, Callable[[ApiError, str], web.Response]]:
    """Which service a request is for (its signing name) and how its errors look. At
    ``/``: CloudWatch's or Application Auto Scaling's JSON (``X-Amz-Target``),
    CloudWatch's query form (its API version), else RDS."""
    if path == METRICS_PATH:
        return METRICS_PATH, control_error
    if path == console_routes.PREFIX or path.startswith(console_routes.PREFIX + "/"):
        return CONSOLE_SERVICE, control_error
    if path.startswith("/v1/"):
        return CONTROL_SERVICE, control_error
    if path.startswith(CLOUDWATCH_PATH):
        return CLOUDWATCH_MODEL.signing_name, cbor_error
    if path == "/" and json_codec.targets(CLOUDWATCH_MODEL,
                                          headers.get(json_codec.TARGET_HEADER, "")):
        return CLOUDWATCH_MODEL.signing_name, cloudwatch_json_error
    if path == "/" and json_codec.targets(AUTOSCALING_MODEL,
                                          headers.get(json_codec.TARGET_HEADER, "")):
        return AUTOSCALING_MODEL.signing_name, autoscaling_error
    if path == "/" and _is_cloudwatch_query(body):
        return CLOUDWATCH_MODEL.signing_name, cloudwatch_query_error
    if path == "/":
        return "rds", query_error
    return "rds-data", json_error


class Api:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.state = cp.state
        self.rds = RdsOperations(cp)
        self.data = DataApi(cp)
        self.cloudwatch = CloudWatchOperations(cp.metrics)
        self.autoscaling = AutoScalingOperations(cp)
        self.console = console_routes.ConsoleRoutes(cp, self.rds)
        self.validator = ParamValidator()
        identity.ensure_access_key(self.state)
        cp.cluster_created_hooks.append(self.create_master_secret)

    def create_master_secret(self, cluster: str) -> None:
        c = self.state.cluster(cluster)
        name = master_secret_name(cluster)
        if c is None or self.state.secret(name) is not None:
            return
        self.state.add_secret(name, cluster, c.master_user, c.master_password,
                              identity.secret_arn(self.state, name))

    # -- middleware ------------------------------------------------------------------------

    @web.middleware
    async def authenticate(self, request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
        service, error_response = _service_of(request.path, request.headers)
        request_id = query_codec.new_request_id()
        request["request_id"] = request_id
        try:
            if request.content_length is not None and request.content_length > MAX_REQUEST:
                raise ApiError("RequestEntityTooLarge", "the request body is larger than "
                               f"{MAX_REQUEST >> 20} MiB", 413)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise ApiError("RequestEntityTooLarge", "the request body is larger than "
                               f"{MAX_REQUEST >> 20} MiB", 413) from None
            service, error_response = _service_of(request.path, request.headers, body)
            host = request.headers.get("Host", request.host)
            url = f"{request.scheme}://{host}{request.raw_path}"
            if service == METRICS_PATH:
                self._check_scrape_token(request)
            elif service == CONSOLE_SERVICE:
                pass  # its routes check the session themselves (and serve the login)
            else:
                sigv4.verify(request.method, url, request.headers, body,
                             self.state.secret_key, service)
            request["body"] = body
            return await handler(request)
        except ApiError as exc:
            if service == "rds-data" and exc.code == "RequestEntityTooLarge":
                exc = ApiError("BadRequestException", exc.message, 400)
            return error_response(exc, request_id)
        except ClusterError as exc:
            return error_response(ApiError("InvalidParameterValue", str(exc)), request_id)
        except web.HTTPException as exc:
            if service in (CONTROL_SERVICE, CONSOLE_SERVICE):
                raise  # their own answers (a JSON 404 naming what is missing, a redirect)
            return error_response(ApiError("InvalidAction" if exc.status == 404 else
                                           "InvalidRequest", exc.reason, exc.status),
                                  request_id)
        except Exception:
            log.exception("%s %s failed (request %s)", request.method, request.path,
                          request_id)
            return error_response(ApiError("InternalFailure", "the request failed inside "
                                           f"Borealis; see the control plane log (request "
                                           f"{request_id})", 500), request_id)

    def _check_scrape_token(self, request: web.Request) -> None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), prometheus.scrape_token(self.state).encode()):
            raise ApiError("AccessDenied", "a scrape needs Authorization: Bearer <token> "
                           "(borealis metrics-token prints it)", 403)


    async def console_link(self, _: web.Request) -> web.Response:
        """A one-time link into the web console (what ``borealis console`` prints)."""
        token = self.console.new_link()
        return web.json_response({"url": f"{self.cp.api_url}{console_routes.PREFIX}/login"
                                         f"?token={token}",
                                  "console": f"{self.cp.api_url}{console_routes.PREFIX}/"})

    async def prometheus_metrics(self, _: web.Request) -> web.Response:
        body = await asyncio.to_thread(prometheus.exposition, self.cp.metrics)
        return web.Response(body=body, headers={"Content-Type": prometheus.CONTENT_TYPE})

    # -- RDS (query protocol) --------------------------------------------------------------

    async def root_post(self, request: web.Request) -> web.Response:
        """``POST /``: RDS (query), CloudWatch (JSON or query) or Application Auto
        Scaling (JSON)."""
        target = request.headers.get(json_codec.TARGET_HEADER, "")
        if json_codec.targets(CLOUDWATCH_MODEL, target):
            return await self.cloudwatch_json(request)
        if json_codec.targets(AUTOSCALING_MODEL, target):
            return await self.autoscaling_json(request)
        if _is_cloudwatch_query(request["body"]):
            return await self.cloudwatch_query(request)
        return await self.rds_query(request)

    async def rds_query(self, request: web.Request) -> web.Response:
        fields = query_codec.parse_form(request["body"])
        op, params = query_codec.parse_request(RDS_MODEL, fields)
        result = await self.rds.handler(op.name)(params)
        body = query_codec.serialize_result(op, result, request["request_id"])
        return web.Response(body=body, content_type="text/xml",
                            headers={"x-amzn-RequestId": request["request_id"]})

    # -- CloudWatch (Smithy RPC v2 CBOR) ---------------------------------------------------

    async def _call(self, operations: Any, op: OperationModel, params: dict[str, Any],
                    codes: tuple[str, str], answered: str) -> dict[str, Any]:
        """Validate the input against the model, then run the operation; ``codes`` are
        the service's for bad input and for an operation Borealis does not answer."""
        report = self.validator.validate(params, op.input_shape)
        if report.has_errors():
            raise ApiError(codes[0], report.generate_report())
        call = operations.handler(op.name)
        if call is None:
            raise ApiError(codes[1], f"{op.name} is not supported; Borealis {answered}", 400)
        result: dict[str, Any] = await call(params)
        return result

    async def _cloudwatch(self, op: OperationModel, params: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.cloudwatch, op, params,
                                ("InvalidParameterValue", "InvalidAction"),
                                "answers GetMetricStatistics, GetMetricData and ListMetrics")

    async def cloudwatch_call(self, request: web.Request) -> web.Response:
        op, params = cbor_codec.parse_request(CLOUDWATCH_MODEL, request.path, request["body"])
        body = cbor_codec.serialize_result(op, await self._cloudwatch(op, params))
        return web.Response(body=body, content_type=cbor_codec.CONTENT_TYPE,
                            headers={"x-amzn-RequestId": request["request_id"],
                                     cbor_codec.PROTOCOL_HEADER[0]:
                                     cbor_codec.PROTOCOL_HEADER[1]})

    async def cloudwatch_json(self, request: web.Request) -> web.Response:
        op, params = json_codec.parse_request(
            CLOUDWATCH_MODEL, request.headers[json_codec.TARGET_HEADER], request["body"])
        body = json_codec.serialize_result(await self._cloudwatch(op, params))
        return web.Response(body=body, content_type=json_codec.CONTENT_TYPE,
                            headers={"x-amzn-RequestId": request["request_id"]})

    async def cloudwatch_query(self, request: web.Request) -> web.Response:
        fields = query_codec.parse_form(request["body"])
        op, params = query_codec.parse_request(CLOUDWATCH_MODEL, fields)
        result = await self._cloudwatch(op, params)
        body = query_codec.serialize_result(op, result, request["request_id"])
        return web.Response(body=body, content_type="text/xml",
                            headers={"x-amzn-RequestId": request["request_id"]})

    # -- Application Auto Scaling (JSON 1.1) ------------------------------------------------

    async def autoscaling_json(self, request: web.Request) -> web.Response:
        op, params = json_codec.parse_request(
            AUTOSCALING_MODEL, request.headers[json_codec.TARGET_HEADER], request["body"])
        result = await self._call(self.autoscaling, op, params,
                                  ("ValidationException", "ValidationException"),
                                  "scales Aurora replicas with target tracking policies")
        body = json_codec.serialize_result(result)
        return web.Response(body=body, headers={
            "x-amzn-RequestId": request["request_id"],
            "Content-Type": json_codec.content_type(AUTOSCALING_MODEL)})

    # -- Data API (REST-JSON) --------------------------------------------------------------

    async def data_call(self, request: web.Request) -> web.Response:
        operation = self._data_operations().get(request.path)
        if operation is None:
            raise ApiError("UnknownOperationException", f"no operation at {request.path}", 404)
        op = DATA_MODEL.operation_model(operation)
        try:
            params = json.loads(request["body"] or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError("BadRequestException", "the request body is not JSON") from None
        if not isinstance(params, dict):
            raise ApiError("BadRequestException", "the request body is not a JSON object")
        report = self.validator.validate(params, op.input_shape)
        if report.has_errors():
            raise ApiError("BadRequestException", report.generate_report())
        calls: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "ExecuteStatement": self.data.execute_statement,
            "BatchExecuteStatement": self.data.batch_execute,
            "BeginTransaction": self.data.begin_transaction,
            "CommitTransaction": lambda p: self.data.end_transaction(p, True),
            "RollbackTransaction": lambda p: self.data.end_transaction(p, False),
        }
        call = calls.get(operation)
        if call is None:
            raise ApiError("BadRequestException", f"{operation} is not supported; use "
                           "ExecuteStatement")
        result = await call(params)
        body = json.dumps(result).encode()
        if len(body) > data_api.MAX_RESPONSE + (1 << 10):
            raise ApiError("BadRequestException", "Database returned more than the allowed "
                           "response size limit (1 MiB)")
        return web.Response(body=body, content_type="application/json",
                            headers={"x-amzn-RequestId": request["request_id"]})

    def _data_operations(self) -> dict[str, str]:
        return {DATA_MODEL.operation_model(name).http["requestUri"]: name
                for name in DATA_MODEL.operation_names}

    # -- wiring ----------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/", self.root_post)
        app.router.add_post("/v1/console-link", self.console_link)
        self.console.add_routes(app)
        app.router.add_get(METRICS_PATH, self.prometheus_metrics)
        app.router.add_post(CLOUDWATCH_PATH + "{operation}", self.cloudwatch_call)
        for uri in self._data_operations():
            app.router.add_post(uri, self.data_call)

    async def reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            with contextlib.suppress(Exception):
                await self.data.reap_idle()
