"""OpenAI-shaped error answers for the gateway.

OpenAI SDKs (Python, JS, LangChain, ...) turn a non-2xx answer into a typed exception by
status code and read `error.message` / `error.code` from the body; answering in the same
`{"error": {"message", "type", "param", "code"}}` shape means a client pointed at FleetLens
instead of api.openai.com reports our errors exactly as it reports OpenAI's, and retries a
429/503 after `Retry-After` without custom code.

Every helper returns an `ErrorResponse` (a named tuple: status, body dict, headers dict) so
any web framework can send it. Messages never contain the presented API key.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple


class ErrorResponse(NamedTuple):
    """What the gateway sends: HTTP status, JSON body and extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def error_response(
    status: int,
    message: str,
    type: str,  # noqa: A002 - the OpenAI field is called `type`
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> ErrorResponse:
    """Build an answer in OpenAI's error shape; all four fields are always present (null if unset)."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return ErrorResponse(status, body, dict(headers or {}))


def retry_after_header(seconds: float) -> str:
    """`Retry-After` is whole seconds (RFC 9110); round up and never say 0, or clients spin."""
    return str(max(1, math.ceil(seconds)))


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> ErrorResponse:
    """400: the request body is wrong (missing field, bad value); `param` names the field."""
    return error_response(400, message, "invalid_request_error", param=param, code=code)


def authentication_error(message: str = "Incorrect API key provided.") -> ErrorResponse:
    """401: no usable key. `WWW-Authenticate` tells generic HTTP clients which scheme to use."""
    return error_response(
        401, message, "authentication_error", code="invalid_api_key",
        headers={"WWW-Authenticate": 'Bearer realm="fleetlens"'},
    )


def permission_denied(message: str, *, code: str | None = "permission_denied") -> ErrorResponse:
    """403: the key is known but may not do this (disabled key, model not in `allowed_models`)."""
    return error_response(403, message, "permission_denied", code=code)


def model_not_found(model: str) -> ErrorResponse:
    """404: the requested model is not served (same wording and code as OpenAI)."""
    return error_response(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def rate_limit_exceeded(
    limit_name: str,
    retry_after_s: float | None,
    *,
    limit: int | None = None,
    requested: int | None = None,
) -> ErrorResponse:
    """429: a per-key bucket refused the request.

    `type` is the bucket (`requests` or `tokens`), as OpenAI does. `retry_after_s=None` means
    the request can never fit (its token estimate exceeds the bucket's capacity): the client
    must shrink it, so no `Retry-After` is sent and the message says so.
    """
    detail = f"Limit {limit}, Requested {requested}. " if limit is not None and requested is not None else ""
    if retry_after_s is None:
        message = f"Request too large for {limit_name} per min. {detail}Reduce the prompt or max_tokens."
        return error_response(429, message, limit_name, code="rate_limit_exceeded")
    header = retry_after_header(retry_after_s)
    message = f"Rate limit reached on {limit_name} per min. {detail}Please try again in {header}s."
    return error_response(
        429, message, limit_name, code="rate_limit_exceeded", headers={"Retry-After": header}
    )


def upstream_error(
    status: int, message: str | None = None, *, retry_after_s: float | None = None
) -> ErrorResponse:
    """502 (replica answered garbage/refused), 503 (no healthy replica), 504 (replica timed out).

    These are `server_error`s: the client did nothing wrong, and OpenAI SDKs retry them.
    """
    defaults = {
        502: ("upstream_error", "The model server returned an invalid response."),
        503: ("service_unavailable", "No model server is available to handle the request. Please retry."),
        504: ("upstream_timeout", "The model server did not respond in time."),
    }
    if status not in defaults:
        raise ValueError(f"upstream_error takes 502, 503 or 504, got {status}")
    code, default_message = defaults[status]
    headers = {"Retry-After": retry_after_header(retry_after_s)} if retry_after_s is not None else None
    return error_response(status, message or default_message, "server_error", code=code, headers=headers)
