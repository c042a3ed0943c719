"""The RDS Data API's values, sans-IO: named parameters to psycopg, typed ``Field``
values both ways, column metadata and the JSON record format.

Invariants: a ``:name`` inside a string literal, a quoted identifier, a dollar-quoted
body or a comment is SQL text, never a parameter; ``::`` is a cast. Every value sent to
PostgreSQL goes as a bound parameter, never spliced into the SQL text.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from borealis.api.errors import ApiError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def bad_request(message: str) -> ApiError:
    return ApiError("BadRequestException", message, 400)


def to_pyformat(sql: str) -> tuple[str, list[str]]:
    """``SELECT :a, '%:b'`` becomes ``SELECT %(a)s, '%%:b'`` and the names used."""
    out: list[str] = []
    names: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            end = _quoted_end(sql, i, ch)
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif ch == "$" and (tag := _DOLLAR_TAG.match(sql, i)) and not _in_word(sql, i):
            close = sql.find(tag.group(0), tag.end())
            end = n if close < 0 else close + len(tag.group(0))
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("::", i):
            out.append("::")
            i += 2
        elif ch == ":" and (m := _NAME.match(sql, i + 1)):
            names.append(m.group(0))
            out.append(f"%({m.group(0)})s")
            i = m.end()
        elif ch == "%":
            out.append("%%")
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out), names


def _quoted_end(sql: str, start: int, quote: str) -> int:
    i = start + 1
    while i < len(sql):
        if sql[i] == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:  # '' or "" inside: an escaped quote
                i += 2
                continue
            return i + 1
        i += 1
    return len(sql)


def _in_word(sql: str, i: int) -> bool:
    return i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")


# -- parameters -------------------------------------------------------------------------


def bind_parameters(names: Iterable[str], parameters: Sequence[Mapping[str, Any]]
                    ) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in parameters:
        name = p.get("name")
        if not name:
            raise bad_request("every parameter needs a name")
        values[name] = parameter_value(p.get("value", {"isNull": True}), p.get("typeHint"),
                                       name)
    missing = sorted(set(names) - set(values))
    if missing:
        raise bad_request(f"No value specified for parameter: {missing[0]}")
    return values


def parameter_value(field: Mapping[str, Any], type_hint: str | None, name: str) -> Any:
    if len(field) != 1:
        raise bad_request(f"parameter {name}: a value has exactly one member")
    kind, value = next(iter(field.items()))
    if kind == "isNull":
        return None
    if kind == "blobValue":
        try:
            return base64.b64decode(value, validate=True) if isinstance(value, str) else value
        except ValueError:
            raise bad_request(f"parameter {name}: blobValue is not base64") from None
    if kind == "arrayValue":
        return _array_value(value, name)
    if kind == "stringValue" and type_hint:
        return _hinted(value, type_hint, name)
    if kind in ("booleanValue", "longValue", "doubleValue", "stringValue"):
        return value
    raise bad_request(f"parameter {name}: unknown value type {kind}")


def _array_value(value: Mapping[str, Any], name: str) -> list[Any]:
    if len(value) != 1:
        raise bad_request(f"parameter {name}: an arrayValue has exactly one member")
    kind, items = next(iter(value.items()))
    if kind == "arrayValues":
        return [_array_value(v, name) for v in items]
    return list(items)


def _hinted(value: str, type_hint: str, name: str) -> Any:
    try:
        if type_hint == "DATE":
            return dt.date.fromisoformat(value)
        if type_hint == "TIME":
            return dt.time.fromisoformat(value)
        if type_hint == "TIMESTAMP":
            return dt.datetime.fromisoformat(value)
        if type_hint == "DECIMAL":
            return decimal.Decimal(value)
        if type_hint == "UUID":
            return uuid.UUID(value)
        if type_hint == "JSON":
            return Jsonb(json.loads(value))
    except (ValueError, decimal.InvalidOperation):
        raise bad_request(f"parameter {name}: {value!r} is not a valid {type_hint}") from None
    raise bad_request(f"parameter {name}: unknown typeHint {type_hint}")


# -- results ----------------------------------------------------------------------------


def field(value: Any, options: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A PostgreSQL value as a Data API ``Field``."""
    options = options or {}
    if value is None:
        return {"isNull": True}
    if isinstance(value, bool):
        return {"booleanValue": value}
    if isinstance(value, int):
        if options.get("longReturnType") == "STRING":
            return {"stringValue": str(value)}
        return {"longValue": value}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, decimal.Decimal):
        if options.get("decimalReturnType") == "DOUBLE_OR_LONG":
            return ({"longValue": int(value)} if value == value.to_integral_value()
                    else {"doubleValue": float(value)})
        return {"stringValue": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"blobValue": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, list):
        return {"arrayValue": _array_field(value)}
    return {"stringValue": text_value(value)}


def _array_field(values: list[Any]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, list) for v in present):
        return {"arrayValues": [_array_field(v) for v in values]}
    if present and all(isinstance(v, bool) for v in present):
        return {"booleanValues": values}
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return {"longValues": values}
    if present and all(isinstance(v, float) for v in present):
        return {"doubleValues": values}
    return {"stringValues": [None if v is None else text_value(v) for v in values]}


def text_value(value: Any) -> str:
    """Dates, times and the rest in the forms the Data API returns them."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:  # timestamptz: in UTC, as the Data API gives it
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return str(value.strftime("%Y-%m-%d %H:%M:%S")) + _fraction(value.microsecond)
    if isinstance(value, dt.time):
        return value.strftime("%H:%M:%S") + _fraction(value.microsecond)
    if isinstance(value, (dt.date, uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _fraction(microsecond: int) -> str:
    return f".{microsecond:06d}".rstrip("0") if microsecond else ""


def json_value(value: Any) -> Any:
    """A value as it appears in ``formattedRecords``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return value
    return text_value(value)


# JDBC type codes, as the Data API reports them in ColumnMetadata.type.
_JDBC = {"bool": -7, "int2": 5, "int4": 4, "int8": -5, "float4": 7, "float8": 8,
         "numeric": 2, "text": 12, "varchar": 12, "bpchar": 1, "name": 12, "bytea": -2,
         "date": 91, "time": 92, "timetz": 92, "timestamp": 93, "timestamptz": 93,
         "json": 1111, "jsonb": 1111, "uuid": 1111, "oid": -5}


def column_metadata(name: str, type_name: str, nullable: bool = True,
                    precision: int = 0, scale: int = 0) -> dict[str, Any]:
    array = type_name.startswith("_")
    return {
        "name": name, "label": name,
        "typeName": type_name,
        "type": 2003 if array else _JDBC.get(type_name, 1111),
        "schemaName": "", "tableName": "",
        "isAutoIncrement": False,
        "isSigned": type_name in ("int2", "int4", "int8", "float4", "float8", "numeric"),
        "isCurrency": type_name == "money",
        "isCaseSensitive": type_name in ("text", "varchar", "bpchar", "name"),
        "nullable": 1 if nullable else 0,
        "precision": precision, "scale": scale,
        "arrayBaseColumnType": _JDBC.get(type_name[1:], 1111) if array else 0,
    }
