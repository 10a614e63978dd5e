"""The management API on the wire: AWS JSON 1.1, as the AWS CLI and boto3 speak it.

``POST /`` with ``X-Amz-Target: IoTSecuredTunneling.<Operation>`` and a JSON object body;
the answer is a JSON object (``Content-Type: application/x-amz-json-1.1``) or, for an error,
HTTP 400 (403 for authentication) with ``{"__type": "<ErrorType>", "message": "..."}`` and the
same type in ``x-amzn-ErrorType``, so that botocore raises the typed error and the CLI prints
``An error occurred (<ErrorType>) when calling the <Operation> operation: <message>``.

Operations: OpenTunnel, CloseTunnel, DescribeTunnel, ListTunnels, RotateTunnelAccessToken,
TagResource, UntagResource, ListTagsForResource (botocore's ``iotsecuretunneling`` model,
2018-10-05). Each request is checked against the model's shapes here (types, required members,
lengths, ranges, patterns, enums); the rules of the service are in :mod:`service.control`.
Timestamps are epoch seconds. Unknown members are ignored, as AWS does.

Errors of the protocol itself: ``SerializationException`` (a body that is not a JSON object,
is nested deeper than ``MAX_DEPTH`` levels, or, with HTTP 413, is over ``MAX_BODY`` bytes; the
HTTP layer stops reading at that size: see :meth:`ManagementApi.http_error`),
``UnknownOperationException`` (a missing or unknown target), ``InvalidRequestException`` (a
member of the wrong type or value). Responses hold tokens: bodies are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from iotunnel import boundedjson
from iotunnel.mode import Mode
from iotunnel.rules import NAME_MAX, NAME_RE
from service.control import ApiError, ControlPlane, InvalidRequest
from service.http import HttpRequest, HttpResponse
from service.registry import TUNNEL_ID_RE, ConnectionState, Tunnel
from service.sigv4 import SigV4Verifier

log = logging.getLogger(__name__)

TARGET_PREFIX = "IoTSecuredTunneling."
CONTENT_TYPE = "application/x-amz-json-1.1"
#: Largest request body accepted (the largest valid request is a few tens of KiB).
MAX_BODY = 256 * 1024
#: Deepest nesting of a request body (the deepest valid one, tags, has 3 levels).
MAX_DEPTH = 8

THING_NAME_RE = NAME_RE  # and at most NAME_MAX characters, checked apart
NEXT_TOKEN_RE = re.compile(r"[a-zA-Z0-9_=-]{1,4096}")
_TAG_EXTRA = frozenset("_.:/=+-@")

Json = dict[str, Any]


class SerializationError(ApiError):
    code = "SerializationException"
    status = 400


class UnknownOperation(ApiError):
    code = "UnknownOperationException"
    status = 400


class NotFound(ApiError):
    code = "UnknownOperationException"
    status = 404


class MethodNotAllowed(ApiError):
    code = "UnknownOperationException"
    status = 405


class PayloadTooLarge(ApiError):
    code = "SerializationException"
    status = 413


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """An HTTP response of the API."""

    status: int
    body: bytes
    #: the AWS error type, for an error
    error: str | None = None
    request_id: str = ""

    def headers(self) -> list[tuple[str, str]]:
        headers = [
            ("Content-Type", CONTENT_TYPE),
            ("x-amzn-RequestId", self.request_id),
        ]
        if self.error is not None:
            headers.append(("x-amzn-ErrorType", self.error))
        return headers


def error_response(error: ApiError, request_id: str = "") -> ApiResponse:
    body = json.dumps({"__type": error.code, "message": error.message}).encode()
    return ApiResponse(error.status, body, error.code, request_id or str(uuid.uuid4()))


class ManagementApi:
    """Dispatches requests to the control plane; authenticates them with ``verifier`` if set."""

    def __init__(self, control: ControlPlane, *, verifier: SigV4Verifier | None = None) -> None:
        self.control = control
        self.verifier = verifier
        self._operations: dict[str, Callable[[Json], Awaitable[Json]]] = {
            "OpenTunnel": self.open_tunnel,
            "CloseTunnel": self.close_tunnel,
            "DescribeTunnel": self.describe_tunnel,
            "ListTunnels": self.list_tunnels,
            "RotateTunnelAccessToken": self.rotate_tunnel_access_token,
            "TagResource": self.tag_resource,
            "UntagResource": self.untag_resource,
            "ListTagsForResource": self.list_tags_for_resource,
        }

    @property
    def operations(self) -> list[str]:
        return list(self._operations)

    @staticmethod
    def http_error(status: int, reason: str) -> HttpResponse:
        """The :data:`service.http.ErrorHook` of the API: a request the HTTP layer refuses
        (over ``MAX_BODY``, malformed HTTP) answered in the AWS shape, as a
        ``SerializationException`` with the HTTP layer's status."""
        error = SerializationError(reason)
        response = error_response(error)
        response = ApiResponse(status, response.body, response.error, response.request_id)
        return HttpResponse(status, response.headers(), response.body)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        """The :data:`service.http.Handler` of the API."""
        response = await self.handle_http(
            request.method,
            request.target,
            request.headers,
            request.body,
            scheme=request.scheme,
            peer=request.peer,
        )
        return HttpResponse(response.status, response.headers(), response.body)

    async def handle_http(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        scheme: str = "https",
        peer: str = "-",
    ) -> ApiResponse:
        """Answer one HTTP request (never raises)."""
        request_id = str(uuid.uuid4())
        operation = "-"
        try:
            if target.split("?", 1)[0] != "/":
                raise NotFound(f"no such resource: {target.split('?', 1)[0]}")
            if method != "POST":
                raise MethodNotAllowed(f"method {method} not allowed: POST JSON 1.1 requests")
            if len(body) > MAX_BODY:
                raise PayloadTooLarge(f"request body over {MAX_BODY} bytes")
            targets = [v for k, v in headers if k.lower() == "x-amz-target"]
            operation = targets[0] if len(targets) == 1 else "-"
            if self.verifier is not None:
                self.verifier.verify(method, target, headers, body, scheme=scheme)
            response = await self.handle(targets[0] if len(targets) == 1 else None, body)
        except ApiError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("api: request %s failed", request_id)
            response = error_response(ApiError("internal error"))
        response = ApiResponse(response.status, response.body, response.error, request_id)
        log.info(
            "api: %s %s from %s -> %d%s",
            operation.removeprefix(TARGET_PREFIX),
            request_id,
            peer,
            response.status,
            f" {response.error}" if response.error else "",
        )
        return response

    async def handle(self, target: str | None, body: bytes) -> ApiResponse:
        """Answer one operation request: ``target`` is the ``X-Amz-Target`` value."""
        try:
            if target is None:
                raise UnknownOperation("X-Amz-Target header missing (or given more than once)")
            name = target.removeprefix(TARGET_PREFIX)
            operation = self._operations.get(name) if target.startswith(TARGET_PREFIX) else None
            if operation is None:
                raise UnknownOperation(f"unknown operation {target!r}")
            params = _parse_body(body)
            result = await operation(params)
        except ApiError as exc:
            return error_response(exc)
        except Exception:
            log.exception("api: %s failed", target)
            return error_response(ApiError("internal error"))
        return ApiResponse(200, json.dumps(result).encode())

    # ------------------------------------------------------------------ operations

    async def open_tunnel(self, params: Json) -> Json:
        description = _description(params)
        tags = _tags(params, "tags", required=False)
        services: list[str] = []
        thing_name = None
        destination = _object(params, "destinationConfig")
        if destination is not None:
            services, thing_name = _destination_config(destination)
        lifetime = None
        timeout = _object(params, "timeoutConfig")
        if timeout is not None:
            lifetime = _integer(
                timeout, "maxLifetimeTimeoutMinutes", "timeoutConfig.", minimum=1, maximum=720
            )
        opened = await self.control.open_tunnel(
            services=services,
            thing_name=thing_name,
            description=description,
            lifetime_minutes=lifetime,
            tags=tags,
        )
        return {
            "tunnelId": opened.tunnel.tunnel_id,
            "tunnelArn": self.control.arn(opened.tunnel.tunnel_id),
            "sourceAccessToken": opened.source_token,
            "destinationAccessToken": opened.destination_token,
        }

    async def close_tunnel(self, params: Json) -> Json:
        tunnel_id = _tunnel_id(params)
        delete = params.get("delete")
        if delete is not None and not isinstance(delete, bool):
            raise InvalidRequest("delete: must be a boolean")
        await self.control.close_tunnel(tunnel_id, delete=bool(delete))
        return {}

    async def describe_tunnel(self, params: Json) -> Json:
        tunnel = self.control.describe(_tunnel_id(params))
        return {"tunnel": self._describe(tunnel)}

    async def list_tunnels(self, params: Json) -> Json:
        thing_name = _string(params, "thingName", pattern=THING_NAME_RE, max_length=NAME_MAX)
        max_results = _integer(params, "maxResults", minimum=1, maximum=100)
        next_token = _string(params, "nextToken", pattern=NEXT_TOKEN_RE)
        tunnels, token = self.control.list_tunnels(
            thing_name=thing_name, max_results=max_results, next_token=next_token
        )
        result: Json = {"tunnelSummaries": [self._summary(t) for t in tunnels]}
        if token is not None:
            result["nextToken"] = token
        return result

    async def rotate_tunnel_access_token(self, params: Json) -> Json:
        tunnel_id = _tunnel_id(params)
        mode = _string(params, "clientMode", required=True)
        modes = {
            "SOURCE": [Mode.SOURCE],
            "DESTINATION": [Mode.DESTINATION],
            "ALL": [Mode.SOURCE, Mode.DESTINATION],
        }.get(mode or "")
        if modes is None:
            raise InvalidRequest(f"clientMode: must be SOURCE, DESTINATION or ALL, not {mode!r}")
        services: list[str] | None = None
        thing_name = None
        destination = _object(params, "destinationConfig")
        if destination is not None:
            services, thing_name = _destination_config(destination)
        tokens = await self.control.rotate(
            tunnel_id, modes, destination_services=services, thing_name=thing_name
        )
        result: Json = {"tunnelArn": self.control.arn(tunnel_id)}
        if Mode.SOURCE in tokens:
            result["sourceAccessToken"] = tokens[Mode.SOURCE]
        if Mode.DESTINATION in tokens:
            result["destinationAccessToken"] = tokens[Mode.DESTINATION]
        return result

    async def tag_resource(self, params: Json) -> Json:
        arn = _arn(params)
        tags = _tags(params, "tags", required=True)
        assert tags is not None
        self.control.tag(arn, tags)
        return {}

    async def untag_resource(self, params: Json) -> Json:
        arn = _arn(params)
        keys = _list(params, "tagKeys", required=True, max_items=200)
        assert keys is not None
        for index, key in enumerate(keys):
            _check_tag_text(key, f"tagKeys[{index}]", 1, 128)
        self.control.untag(arn, keys)
        return {}

    async def list_tags_for_resource(self, params: Json) -> Json:
        tags = self.control.tags(_arn(params))
        return {"tags": _tag_list(tags)} if tags else {}

    # ------------------------------------------------------------------ shapes

    def _summary(self, tunnel: Tunnel) -> Json:
        summary: Json = {
            "tunnelId": tunnel.tunnel_id,
            "tunnelArn": self.control.arn(tunnel.tunnel_id),
            "status": tunnel.status.value,
        }
        if tunnel.description is not None:
            summary["description"] = tunnel.description
        summary["createdAt"] = tunnel.created_at
        summary["lastUpdatedAt"] = tunnel.updated_at
        return summary

    def _describe(self, tunnel: Tunnel) -> Json:
        described = self._summary(tunnel)
        described["sourceConnectionState"] = _connection(tunnel.source_state)
        described["destinationConnectionState"] = _connection(tunnel.destination_state)
        if tunnel.services or tunnel.thing_name is not None:
            config: Json = {"services": list(tunnel.services)}
            if tunnel.thing_name is not None:
                config["thingName"] = tunnel.thing_name
            described["destinationConfig"] = config
        if tunnel.lifetime_minutes is not None:
            described["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": tunnel.lifetime_minutes}
        if tunnel.tags:
            described["tags"] = _tag_list(tunnel.tags)
        return described


def _connection(state: ConnectionState) -> Json:
    return {
        "status": "CONNECTED" if state.connected else "DISCONNECTED",
        "lastUpdatedAt": state.updated_at,
    }


def _tag_list(tags: dict[str, str]) -> list[Json]:
    return [{"key": key, "value": value} for key, value in tags.items()]


# -------------------------------------------------------------------------- request checks


def _parse_body(body: bytes) -> Json:
    if not body.strip():
        return {}
    try:
        params = boundedjson.loads(body, max_bytes=MAX_BODY, max_depth=MAX_DEPTH)
    except boundedjson.JSONInputError as exc:  # its text never quotes the body
        raise SerializationError(f"request body: {exc}") from None
    if not isinstance(params, dict):
        raise SerializationError("request body must be a JSON object")
    return params


def _where(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def _string(
    params: Json,
    name: str,
    prefix: str = "",
    *,
    required: bool = False,
    pattern: re.Pattern[str] | None = None,
    min_length: int = 1,
    max_length: int | None = None,
) -> str | None:
    where = _where(prefix, name)
    value = params.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{where}: missing (required)")
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}: must be a string")
    if len(value) < min_length or (max_length is not None and len(value) > max_length):
        limit = f"at least {min_length}" if max_length is None else f"{min_length} to {max_length}"
        raise InvalidRequest(f"{where}: length must be {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidRequest(f"{where}: {value!r} does not match {pattern.pattern}")
    return value


def _integer(
    params: Json, name: str, prefix: str = "", *, minimum: int, maximum: int
) -> int | None:
    where = _where(prefix, name)
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{where}: must be an integer")
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"{where}: must be {minimum} to {maximum}, not {value}")
    return value


def _object(params: Json, name: str, prefix: str = "") -> Json | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{_where(prefix, name)}: must be an object")
    return value


def _list(
    params: Json,
    name: str,
    prefix: str = "",
    *,
    required: bool = False,
    min_items: int = 0,
    max_items: int | None = None,
) -> list[Any] | None:
    where = _where(prefix, name)
    value = params.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{where}: missing (required)")
        return None
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}: must be a list")
    if len(value) < min_items:
        raise InvalidRequest(f"{where}: must have at least {min_items} item(s)")
    if max_items is not None and len(value) > max_items:
        raise InvalidRequest(f"{where}: must have at most {max_items} items")
    return value


def _tunnel_id(params: Json) -> str:
    value = _string(params, "tunnelId", required=True, pattern=TUNNEL_ID_RE)
    assert value is not None
    return value


def _arn(params: Json) -> str:
    value = _string(params, "resourceArn", required=True, max_length=1011)
    assert value is not None
    return value


def _description(params: Json) -> str | None:
    value = _string(params, "description", max_length=2048)
    if value is not None and any(unicodedata.category(c).startswith("C") for c in value):
        raise InvalidRequest("description: must not contain control or format characters")
    return value


def _destination_config(config: Json) -> tuple[list[str], str | None]:
    """``services`` (shape-checked; the service id rule is the control plane's) and
    ``thingName`` of a destinationConfig."""
    thing_name = _string(
        config, "thingName", "destinationConfig.", pattern=THING_NAME_RE, max_length=NAME_MAX
    )
    services = _list(config, "services", "destinationConfig.", required=True, min_items=1)
    assert services is not None
    for index, service in enumerate(services):
        if not isinstance(service, str):
            raise InvalidRequest(f"destinationConfig.services[{index}]: must be a string")
    return services, thing_name


def _check_tag_text(value: Any, where: str, min_length: int, max_length: int) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}: must be a string")
    if not min_length <= len(value) <= max_length:
        raise InvalidRequest(f"{where}: length must be {min_length} to {max_length} characters")
    for char in value:
        if char not in _TAG_EXTRA and unicodedata.category(char)[0] not in "LZN":
            raise InvalidRequest(
                f"{where}: only letters, digits, spaces and _.:/=+-@ are allowed, not {char!r}"
            )


def _tags(params: Json, name: str, *, required: bool) -> dict[str, str] | None:
    items = _list(params, name, required=required, min_items=1, max_items=200)
    if items is None:
        return None
    tags: dict[str, str] = {}
    for index, item in enumerate(items):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: must be an object with key and value")
        for member in ("key", "value"):
            if member not in item:
                raise InvalidRequest(f"{where}.{member}: missing (required)")
        _check_tag_text(item["key"], f"{where}.key", 1, 128)
        _check_tag_text(item["value"], f"{where}.value", 0, 256)
        tags[item["key"]] = item["value"]
    return tags
