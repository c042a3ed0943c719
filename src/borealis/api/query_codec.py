"""The AWS query protocol, sans-IO: form fields in, XML out, both driven by botocore's
service model (the same model boto3 and the AWS CLI serialize and parse with).

Invariants: a request either parses completely into the operation's input shape or
raises ``ApiError`` naming the offending field; a response is built only from members
the output shape defines, so whatever botocore can parse we can write. Parsing takes
time linear in the request (every field's prefixes are indexed once) and a request has
at most ``MAX_FIELDS`` fields: a large body never holds up the control plane's loop.
"""

from __future__ import annotations

import base64
import datetime as dt
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from botocore.model import OperationModel, ServiceModel, Shape

from borealis.api.errors import ApiError
from borealis.times import format_time, parse_time

MAX_FIELDS = 10_000


def parse_form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError("MalformedQueryString", "the request body is not UTF-8") from None
    fields: dict[str, str] = {}
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True,
                                       max_num_fields=MAX_FIELDS)
    except ValueError:
        raise ApiError("InvalidParameterValue",
                       f"the request has more than {MAX_FIELDS} parameters") from None
    for key, value in pairs:
        fields[key] = value
    return fields


class _Fields(dict[str, str]):
    """The request's fields, with every dotted prefix of their names indexed once
    (``Filters.Filter.1.Name`` gives ``Filters``, ``Filters.Filter``, ...)."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        super().__init__(fields)
        self.prefixes: set[str] = set()
        for key in fields:
            at = key.find(".")
            while at != -1:
                self.prefixes.add(key[:at])
                at = key.find(".", at + 1)


def parse_request(model: ServiceModel, fields: Mapping[str, str]
                  ) -> tuple[OperationModel, dict[str, Any]]:
    """The operation and its parameters, checked against the input shape."""
    action = fields.get("Action")
    if not action:
        raise ApiError("MissingAction", "the request names no Action")
    if action not in model.operation_names:
        raise ApiError("InvalidAction", f"{action} is not a valid action for this service")
    version = fields.get("Version")
    if version != model.api_version:
        raise ApiError("InvalidParameterValue",
                       f"Version must be {model.api_version}, not {version!r}")
    op = model.operation_model(action)
    params = _Fields({k: v for k, v in fields.items() if k not in ("Action", "Version")})
    if op.input_shape is None:
        return op, {}
    used: set[str] = set()
    value = _parse_structure(op.input_shape, params, "", used)
    unknown = sorted(set(params) - used)
    if unknown:
        raise ApiError("InvalidParameterValue", f"unrecognized parameter {unknown[0]}")
    return op, value


def _name(shape: Shape, default: str) -> str:
    return str(shape.serialization.get("name", default))


def _has_prefix(params: Mapping[str, str], prefix: str) -> bool:
    if isinstance(params, _Fields):
        return prefix in params or prefix in params.prefixes
    return prefix in params or any(k.startswith(prefix + ".") for k in params)


def _parse(shape: Shape, params: Mapping[str, str], prefix: str, used: set[str]) -> Any:
    kind = shape.type_name
    if kind == "structure":
        return _parse_structure(shape, params, prefix, used)
    if kind == "list":
        return _parse_list(shape, params, prefix, used)
    if kind == "map":
        return _parse_map(shape, params, prefix, used)
    if prefix not in params:  # only nested fields (Name.member.1) for a plain value
        raise ApiError("InvalidParameterValue", f"{prefix} takes a single {kind} value")
    used.add(prefix)
    return _parse_scalar(shape, params[prefix], prefix)


def _parse_structure(shape: Shape, params: Mapping[str, str], prefix: str,
                     used: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, member in shape.members.items():
        name = _name(member, key)
        full = f"{prefix}.{name}" if prefix else name
        if _has_prefix(params, full):
            out[key] = _parse(member, params, full, used)
    for key in shape.required_members:
        if key not in out:
            where = f"{prefix}.{key}" if prefix else key
            raise ApiError("MissingParameter",
                           f"the request must contain the parameter {where}")
    return out


def _parse_list(shape: Shape, params: Mapping[str, str], prefix: str,
                used: set[str]) -> list[Any]:
    if params.get(prefix) == "":
        used.add(prefix)
        return []
    if shape.serialization.get("flattened"):
        base = ".".join(prefix.split(".")[:-1] + [_name(shape.member, prefix.split(".")[-1])])
    else:
        base = f"{prefix}.{_name(shape.member, 'member')}"
    items: list[Any] = []
    i = 1
    while _has_prefix(params, f"{base}.{i}"):
        items.append(_parse(shape.member, params, f"{base}.{i}", used))
        i += 1
    if not items:
        stray = [k for k in params if k.startswith(prefix + ".") and k not in used]
        if stray:
            raise ApiError("InvalidParameterValue",
                           f"{stray[0]}: list items are numbered from 1")
    return items


def _parse_map(shape: Shape, params: Mapping[str, str], prefix: str,
               used: set[str]) -> dict[str, Any]:
    base = prefix if shape.serialization.get("flattened") else f"{prefix}.entry"
    key_name, value_name = _name(shape.key, "key"), _name(shape.value, "value")
    out: dict[str, Any] = {}
    i = 1
    while _has_prefix(params, f"{base}.{i}"):
        key = _parse(shape.key, params, f"{base}.{i}.{key_name}", used)
        out[key] = _parse(shape.value, params, f"{base}.{i}.{value_name}", used)
        i += 1
    return out


def _parse_scalar(shape: Shape, raw: str, where: str) -> Any:
    kind = shape.type_name
    try:
        if kind in ("integer", "long"):
            return int(raw)
        if kind in ("float", "double"):
            return float(raw)
        if kind == "boolean":
            if raw.lower() not in ("true", "false"):
                raise ValueError(raw)
            return raw.lower() == "true"
        if kind == "timestamp":
            return parse_time(raw)
        if kind == "blob":
            return base64.b64decode(raw, validate=True)
    except ValueError:
        raise ApiError("InvalidParameterValue",
                       f"invalid value {raw!r} for {where} (a {kind})") from None
    enum = shape.enum
    if enum and raw not in enum:
        raise ApiError("InvalidParameterValue",
                       f"invalid value {raw!r} for {where}; valid values: {', '.join(enum)}")
    return raw


# -- responses -------------------------------------------------------------------------


def serialize_result(op: OperationModel, result: Mapping[str, Any], request_id: str) -> bytes:
    namespace = str(op.metadata.get("xmlNamespace", ""))
    root = ET.Element(f"{op.name}Response", xmlns=namespace)
    shape = op.output_shape
    if shape is not None:
        wrapper = shape.serialization.get("resultWrapper", f"{op.name}Result")
        _write_members(ET.SubElement(root, wrapper), shape, result)
    meta = ET.SubElement(root, "ResponseMetadata")
    ET.SubElement(meta, "RequestId").text = request_id
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def serialize_error(model: ServiceModel, error: ApiError, request_id: str) -> bytes:
    root = ET.Element("ErrorResponse", xmlns=str(model.metadata.get("xmlNamespace", "")))
    err = ET.SubElement(root, "Error")
    ET.SubElement(err, "Type").text = "Sender" if error.status < 500 else "Receiver"
    ET.SubElement(err, "Code").text = error.code
    ET.SubElement(err, "Message").text = error.message
    ET.SubElement(root, "RequestId").text = request_id
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def new_request_id() -> str:
    return str(uuid.uuid4())


def _write_members(parent: ET.Element, shape: Shape, value: Mapping[str, Any]) -> None:
    for key, member in shape.members.items():
        if key not in value or value[key] is None:
            continue
        _write(parent, member, _name(member, key), value[key])


def _write(parent: ET.Element, shape: Shape, name: str, value: Any) -> None:
    kind = shape.type_name
    if kind == "list":
        item_name = _name(shape.member, "member")
        if shape.serialization.get("flattened"):
            for item in value:
                _write(parent, shape.member, item_name, item)
            return
        holder = ET.SubElement(parent, name)
        for item in value:
            _write(holder, shape.member, item_name, item)
        return
    node = ET.SubElement(parent, name)
    if kind == "structure":
        _write_members(node, shape, value)
    elif kind == "map":
        for k, v in value.items():
            entry = ET.SubElement(node, "entry")
            _write(entry, shape.key, _name(shape.key, "key"), k)
            _write(entry, shape.value, _name(shape.value, "value"), v)
    else:
        node.text = _scalar_text(kind, value)


def _scalar_text(kind: str, value: Any) -> str:
    if kind == "boolean":
        return "true" if value else "false"
    if kind == "timestamp":
        if isinstance(value, (int, float)):
            value = dt.datetime.fromtimestamp(value, dt.UTC)
        return format_time(value)
    if kind == "blob":
        return base64.b64encode(value).decode()
    return str(value)
