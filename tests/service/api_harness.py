"""Harness for the management API tests: the whole service (data plane, control plane, API over
HTTPS) on an event loop in a thread, boto3 clients for it, and a strict check of every response
against botocore's ``iotsecuretunneling`` model.

Imported by the tests of this directory as ``api_harness``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

from service.api import MAX_BODY, ManagementApi
from service.clock import Clock, SystemClock
from service.control import ControlPlane, ControlSettings
from service.http import HttpServer
from service.notify import RecordingNotifier
from service.registry import TunnelRegistry
from service.server import TunnelService
from service.sigv4 import SigV4Verifier
from service.throttle import DEFAULT_THROTTLE, ThrottleSettings
from testbed.awsapi import REGION, TEST_KEY_ID, TEST_SECRET
from testbed.pki import PKI

T = TypeVar("T")

#: Error types the protocol itself may answer with, besides those the model lists.
PROTOCOL_ERRORS = frozenset(
    {
        "InvalidRequestException",
        "SerializationException",
        "UnknownOperationException",
        "InvalidSignatureException",
        "UnrecognizedClientException",
        "MissingAuthenticationTokenException",
        "IncompleteSignatureException",
    }
)


class ThreadedApi:
    """The service with its API on 127.0.0.1, run on its own event loop thread."""

    def __init__(
        self,
        pki: PKI,
        *,
        credentials: Mapping[str, str] | None = None,
        verifier_clock: Clock | None = None,
        settings: ControlSettings | None = None,
        tls: bool = True,
        throttle: ThrottleSettings | None = DEFAULT_THROTTLE,
    ) -> None:
        self.pki = pki
        self.tls = tls
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.registry = TunnelRegistry(clock=SystemClock())
        self.notifier = RecordingNotifier()
        context = pki.server_context() if tls else None

        async def make() -> tuple[TunnelService, ControlPlane, HttpServer, int, int]:
            data = TunnelService(self.registry, ssl_context=context, throttle=throttle)
            control = ControlPlane(
                self.registry, data_plane=data, notifier=self.notifier, settings=settings
            )
            verifier = None
            if credentials is not None:
                verifier = SigV4Verifier(
                    dict(credentials), REGION, verifier_clock or self.registry.clock
                )
            http = HttpServer(
                ManagementApi(control, verifier=verifier),
                ssl_context=context,
                max_body=MAX_BODY,
                on_error=ManagementApi.http_error,
            )
            ws_port = await data.start("127.0.0.1", 0)
            api_port = await http.start("127.0.0.1", 0)
            return data, control, http, ws_port, api_port

        self.data, self.control, self.http, self.ws_port, self.api_port = self.call(make())

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.api_port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def client(
        self, key_id: str = TEST_KEY_ID, secret: str = TEST_SECRET, region: str = REGION
    ) -> Any:
        """A boto3 client for this service; every response it gets is checked (see
        :class:`ShapeChecker`)."""
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=region
        )
        client = session.client(
            "iotsecuretunneling",
            endpoint_url=self.endpoint,
            verify=str(self.pki.ca.cert) if self.tls else False,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}),
        )
        ShapeChecker.attach(client)
        return client

    def close(self) -> None:
        async def stop() -> None:
            await self.http.close()
            await self.data.close()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ShapeChecker:
    """Checks each raw response body against the operation's output shape in botocore's model.

    botocore's parser drops members it does not know and does not check types, so the raw JSON
    is walked here, strictly: no unknown members, every type, enum, length, range and
    (Python-compatible) pattern as the model says. The parsed result is then also run through
    botocore's own parameter validator.
    """

    checked: int = 0

    def __init__(self) -> None:
        self.problems: list[str] = []

    @classmethod
    def attach(cls, client: Any) -> ShapeChecker:
        checker = cls()
        client.meta.events.register("after-call.iotsecuretunneling", checker._after_call)
        client._shape_checker = checker
        return checker

    def _after_call(self, http_response: Any, parsed: Any, model: Any, **_: Any) -> None:
        body = http_response.content
        status = http_response.status_code
        where = model.name
        try:
            document = json.loads(body) if body else {}
        except ValueError:
            self.problems.append(f"{where}: body is not JSON: {body[:200]!r}")
            return
        if status == 200:
            problems = check_value(document, model.output_shape, where)
            problems += validate_parsed(parsed, model.output_shape, where)
        else:
            problems = check_error(document, model, where)
        if http_response.headers.get("content-type") != "application/x-amz-json-1.1":
            problems.append(f"{where}: content-type {http_response.headers.get('content-type')}")
        self.problems.extend(problems)
        type(self).checked += 1
        assert not problems, problems


def check_error(document: Any, model: Any, where: str) -> list[str]:
    if not isinstance(document, dict) or set(document) != {"__type", "message"}:
        return [f"{where}: error body must be {{__type, message}}: {document!r}"]
    known = {shape.name for shape in model.error_shapes} | PROTOCOL_ERRORS
    if document["__type"] not in known:
        return [f"{where}: error type {document['__type']} not in {sorted(known)}"]
    if not isinstance(document["message"], str) or not document["message"]:
        return [f"{where}: error message must be a non-empty string"]
    return []


def _pattern(shape: Any) -> re.Pattern[str] | None:
    pattern = shape.metadata.get("pattern")
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error:  # Java-only syntax such as \p{C}
        return None


def check_value(value: Any, shape: Any, where: str) -> list[str]:
    """Problems of ``value`` (raw JSON) as an instance of ``shape``."""
    if shape is None:
        return [] if value in ({}, None) else [f"{where}: expected no output, got {value!r}"]
    kind = shape.type_name
    meta = shape.metadata
    problems: list[str] = []
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        for name in value:
            if name not in shape.members:
                problems.append(f"{where}.{name}: not a member of {shape.name}")
        for name in shape.required_members:
            if name not in value:
                problems.append(f"{where}.{name}: required member missing")
        for name, member in shape.members.items():
            if name in value:
                problems += check_value(value[name], member, f"{where}.{name}")
    elif kind == "list":
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        if len(value) < meta.get("min", 0) or len(value) > meta.get("max", len(value)):
            problems.append(f"{where}: list length {len(value)} outside the model's bounds")
        for index, item in enumerate(value):
            problems += check_value(item, shape.member, f"{where}[{index}]")
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{where}: expected a string"]
        if len(value) < meta.get("min", 0) or len(value) > meta.get("max", len(value)):
            problems.append(f"{where}: length {len(value)} outside the model's bounds")
        if shape.enum and value not in shape.enum:
            problems.append(f"{where}: {value!r} not one of {shape.enum}")
        pattern = _pattern(shape)
        if pattern is not None and not pattern.search(value):
            problems.append(f"{where}: {value!r} does not match {pattern.pattern}")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: expected an integer"]
        if not meta.get("min", value) <= value <= meta.get("max", value):
            problems.append(f"{where}: {value} outside the model's range")
    elif kind == "boolean":
        if not isinstance(value, bool):
            problems.append(f"{where}: expected a boolean")
    elif kind == "timestamp":
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: expected epoch seconds (a number), got {value!r}")
    else:  # pragma: no cover - the model uses no other types
        problems.append(f"{where}: unexpected shape type {kind}")
    return problems


def validate_parsed(parsed: Any, shape: Any, where: str) -> list[str]:
    """botocore's own validator on the parsed result (datetimes for timestamps)."""
    from botocore.validate import ParamValidator

    if shape is None:
        return []
    params = {k: v for k, v in parsed.items() if k != "ResponseMetadata"}
    report = ParamValidator().validate(params, shape)
    return [f"{where}: {report.generate_report()}"] if report.has_errors() else []
