"""The AWS JSON 1.0 protocol for a service that was a query-protocol one (CloudWatch, as
current botocore speaks it): ``POST /`` with ``X-Amz-Target: <prefix>.<Operation>`` and
a JSON body; timestamps as seconds since the epoch. Errors carry the modeled shape in
``__type`` and the query error code in ``x-amzn-query-error`` (sans-IO).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from botocore.model import OperationModel, ServiceModel, Shape

from borealis.api.errors import ApiError

CONTENT_TYPE = "application/x-amz-json-1.0"
TARGET_HEADER = "X-Amz-Target"


def content_type(model: ServiceModel) -> str:
    """The service's JSON version (1.0 for CloudWatch, 1.1 for Application Auto Scaling)."""
    return f"application/x-amz-json-{model.metadata.get('jsonVersion', '1.0')}"


def targets(model: ServiceModel, target: str) -> bool:
    return target.startswith(f"{model.metadata['targetPrefix']}.")


def parse_request(model: ServiceModel, target: str, body: bytes
                  ) -> tuple[OperationModel, dict[str, Any]]:
    name = target.split(".", 1)[1]
    if name not in model.operation_names:
        raise ApiError("InvalidAction", f"{name} is not an operation of {model.service_name}",
                       400)
    try:
        params = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ApiError("SerializationException", "the body is not JSON") from None
    if not isinstance(params, dict):
        raise ApiError("SerializationException", "the body is not a JSON object")
    op = model.operation_model(name)
    return op, _timestamps_in(params, op.input_shape)


def _timestamps_in(value: Any, shape: Shape | None) -> Any:
    """Epoch seconds in the input become datetimes, as the other codecs give them."""
    if shape is None:
        return value
    if shape.type_name == "structure" and isinstance(value, dict):
        return {k: _timestamps_in(v, shape.members.get(k)) for k, v in value.items()}
    if shape.type_name == "list" and isinstance(value, list):
        return [_timestamps_in(v, shape.member) for v in value]  # type: ignore[attr-defined]
    if shape.type_name == "timestamp" and isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    return value


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return value


def serialize_result(result: dict[str, Any]) -> bytes:
    return json.dumps(_json_ready(result)).encode()


def error_shape(model: ServiceModel, code: str, status: int) -> tuple[str, int, str]:
    """The modeled error shape whose query code is ``code``: its name, its HTTP status
    and who is at fault (``Sender`` or ``Receiver``)."""
    for name in model.shape_names:
        meta = model.shape_for(name).metadata.get("error", {})
        if meta.get("code") == code:
            return (name, int(meta.get("httpStatusCode", status)),
                    "Sender" if meta.get("senderFault") else "Receiver")
    return code, status, "Sender" if status < 500 else "Receiver"


def error_document(model: ServiceModel, error: ApiError
                   ) -> tuple[dict[str, str], int, dict[str, str]]:
    """An error as the JSON and CBOR protocols carry it, before either encodes it: the
    document (its ``__type`` names the modeled shape whose query code is ``error.code``,
    so boto3 raises that exception class), the HTTP status and the headers."""
    shape, status, fault = error_shape(model, error.code, error.status)
    namespace = "com.amazonaws." + str(model.metadata.get("serviceId", "")).lower()
    return ({"__type": f"{namespace}#{shape}", "message": error.message}, status,
            {"x-amzn-query-error": f"{error.code};{fault}"})


def serialize_error(model: ServiceModel, error: ApiError) -> tuple[bytes, int, dict[str, str]]:
    document, status, headers = error_document(model, error)
    return json.dumps(document).encode(), status, headers
