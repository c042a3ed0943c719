"""The one error type of the API: an AWS error code, a message and an HTTP status."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def not_found(code: str, message: str) -> ApiError:
    return ApiError(code, message, 404)
