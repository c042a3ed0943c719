"""The Smithy RPC v2 CBOR protocol, as botocore speaks it for CloudWatch (sans-IO).

A call is ``POST /service/<target prefix>/operation/<Operation>`` with a CBOR map of the
input's members (timestamps as tag 1, seconds since the epoch); the answer is a CBOR map
of the output's, or for an error a map with ``__type`` and ``message`` and, since the
service was a query-protocol one, the query error code in ``x-amzn-query-error``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import cbor2
from botocore.model import OperationModel, ServiceModel, Shape

from borealis.api.errors import ApiError
from borealis.api.json_codec import error_document

CONTENT_TYPE = "application/cbor"
PROTOCOL_HEADER = ("smithy-protocol", "rpc-v2-cbor")


def operation_path(model: ServiceModel) -> str:
    return f"/service/{model.metadata['targetPrefix']}/operation/"


def parse_request(model: ServiceModel, path: str, body: bytes
                  ) -> tuple[OperationModel, dict[str, Any]]:
    name = path.removeprefix(operation_path(model))
    if name not in model.operation_names:
        raise ApiError("InvalidAction", f"{name} is not an operation of {model.service_name}",
                       404)
    try:
        params = cbor2.loads(body) if body else {}
    except (cbor2.CBORDecodeError, ValueError, EOFError) as exc:
        raise ApiError("SerializationException", f"the body is not CBOR: {exc}") from None
    if not isinstance(params, dict):
        raise ApiError("SerializationException", "the body is not a CBOR map")
    return model.operation_model(name), params


def _wire(value: Any, shape: Shape | None) -> Any:
    if shape is None:
        return value
    if shape.type_name == "structure":
        return {k: _wire(v, shape.members.get(k)) for k, v in value.items() if v is not None}
    if shape.type_name == "list":
        return [_wire(v, shape.member) for v in value]  # type: ignore[attr-defined]
    if shape.type_name == "timestamp" and isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    return value


def serialize_result(op: OperationModel, result: dict[str, Any]) -> bytes:
    """The output as botocore reads it (epoch seconds become timestamps, tag 1)."""
    return cbor2.dumps(_wire(result, op.output_shape), datetime_as_timestamp=True)


def serialize_error(model: ServiceModel, error: ApiError) -> tuple[bytes, int, dict[str, str]]:
    document, status, headers = error_document(model, error)
    return cbor2.dumps(document), status, headers
