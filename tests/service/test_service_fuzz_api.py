"""Property tests of the management API through its real HTTPS server (hypothesis).

Whatever body, target or signature a client sends, the service answers in the AWS shape: a
200 whose body fits botocore's output shape, or a 4xx ``{"__type", "message"}`` of a known
error type; never a 500, never a traceback (or any error) in its log, and no tunnel opened by a
request it refused.

The settings are fixed here: derandomized and without an example database, so every run
explores the same cases, with budgets that keep this file to a few seconds.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from api_harness import PROTOCOL_ERRORS, ThreadedApi, check_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.control import ControlSettings, Limits
from testbed.awsapi import REGION, TEST_KEY_ID, TEST_SECRET
from testbed.pki import PKI

settings.register_profile(
    "iotunnel-service-api",
    derandomize=True,
    database=None,
    deadline=None,  # no timing assertions
    max_examples=60,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
FUZZ = settings.get_profile("iotunnel-service-api")

TARGET = "IoTSecuredTunneling."
#: The errors the model lists for some operation, besides the protocol's own.
KNOWN_ERRORS = PROTOCOL_ERRORS | {"ResourceNotFoundException", "LimitExceededException"}


def _model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("iotsecuretunneling")


MODEL = _model()
OPERATIONS = sorted(MODEL.operation_names)


# ---------------------------------------------------------------------------- the service


class LogWatch(logging.Handler):
    """Every record (of any logger) that is an error or carries a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        if record.levelno >= logging.ERROR or record.exc_info is not None:
            self.bad.append(f"{record.name}: {record.levelname}: {record.getMessage()}")


@dataclass
class Wire:
    """One kept-alive HTTPS connection to the API, opened again whenever the server closes it."""

    api: ThreadedApi
    conn: http.client.HTTPSConnection | None = field(default=None, repr=False)

    def post(
        self, body: bytes, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(
                    "127.0.0.1",
                    self.api.api_port,
                    context=self.api.pki.client_context(),
                    timeout=30,
                )
            try:
                self.conn.request("POST", "/", body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            return response.status, response.headers, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Fuzzed:
    """A service, a connection to it, and a log watch."""

    api: ThreadedApi
    wire: Wire
    log: LogWatch
    #: a tunnel opened up front, so that some requests name a tunnel that exists
    tunnel_id: str
    arn: str


def _start(pki: PKI, credentials: dict[str, str] | None) -> Iterator[Fuzzed]:
    watch = LogWatch()
    logger = logging.getLogger("service")
    logging.getLogger().addHandler(watch)  # every logger's errors: asyncio's, websockets' too
    level = logger.level
    logger.setLevel(logging.INFO)
    api = ThreadedApi(
        pki,
        credentials=credentials,
        settings=ControlSettings(limits=Limits(max_tunnels=100_000)),
    )
    wire = Wire(api)
    try:
        client = api.client()
        opened = client.open_tunnel(destinationConfig={"services": ["SSH1"]})
        yield Fuzzed(api, wire, watch, opened["tunnelId"], opened["tunnelArn"])
    finally:
        wire.close()
        api.close()
        logging.getLogger().removeHandler(watch)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    yield from _start(PKI.create(tmp_path_factory.mktemp("fuzz-api-pki")), None)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    pki = PKI.create(tmp_path_factory.mktemp("fuzz-signed-pki"))
    yield from _start(pki, {TEST_KEY_ID: TEST_SECRET})


# ---------------------------------------------------------------------------- strategies

_text = st.text(max_size=24)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)


def _or_any(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | json_values


def _members(fuzz: Fuzzed) -> dict[str, st.SearchStrategy[Any]]:
    """Values for each member name of the model's inputs: plausible ones (that reach the
    deeper checks) and anything at all."""
    tags = st.lists(
        _or_any(st.fixed_dictionaries({}, optional={"key": _text, "value": _text})), max_size=4
    )
    cursor = st.binary(max_size=64).map(lambda raw: base64.urlsafe_b64encode(raw).decode())
    return {
        "tunnelId": _or_any(
            st.just(fuzz.tunnel_id) | st.from_regex(r"[a-z0-9-]{1,40}", fullmatch=True)
        ),
        "resourceArn": _or_any(st.just(fuzz.arn) | _text),
        "description": _or_any(_text),
        "thingName": _or_any(st.from_regex(r"[a-zA-Z0-9:_-]{0,12}", fullmatch=True)),
        "clientMode": _or_any(st.sampled_from(["SOURCE", "DESTINATION", "ALL", "source"])),
        "maxResults": _or_any(st.integers(-5, 200)),
        "nextToken": _or_any(cursor | _text),
        "delete": _or_any(st.booleans()),
        "tags": _or_any(tags),
        "tagKeys": _or_any(st.lists(_or_any(_text), max_size=4)),
        "destinationConfig": _or_any(
            st.fixed_dictionaries(
                {},
                optional={
                    "thingName": _or_any(_text),
                    "services": _or_any(st.lists(_or_any(_text), max_size=4)),
                },
            )
        ),
        "timeoutConfig": _or_any(
            st.fixed_dictionaries(
                {}, optional={"maxLifetimeTimeoutMinutes": _or_any(st.integers(-5, 800))}
            )
        ),
    }


def bodies(fuzz: Fuzzed, operation: str) -> st.SearchStrategy[bytes]:
    """Request bodies for ``operation``: objects of its members (and unknown ones), any JSON
    value, and any bytes."""
    members = _members(fuzz)
    shape = MODEL.operation_model(operation).input_shape
    names = list(shape.members) if shape is not None else []
    objects = st.fixed_dictionaries(
        {}, optional={name: members.get(name, json_values) for name in [*names, "unknown"]}
    )
    as_json = (objects | json_values).map(lambda value: json.dumps(value).encode())
    return as_json | st.binary(max_size=256)


# ---------------------------------------------------------------------------- invariants


def check_answer(
    fuzz: Fuzzed,
    operation: str | None,
    status: int,
    headers: Any,
    raw: bytes,
    before: int,
    logged: int,
) -> None:
    """The invariants every answer keeps (``before``: the tunnels known before the request;
    the log watch is read from ``logged`` on)."""
    assert status < 500, raw
    assert headers.get("Content-Type") == "application/x-amz-json-1.1"
    document = json.loads(raw)
    assert isinstance(document, dict)
    after = len(fuzz.api.registry)
    if status == 200:
        assert operation is not None
        output = MODEL.operation_model(operation).output_shape
        assert check_value(document, output, operation) == []
        assert after <= before + (1 if operation == "OpenTunnel" else 0)
    else:
        assert set(document) == {"__type", "message"}, document
        assert document["__type"] in KNOWN_ERRORS, document
        assert headers.get("x-amzn-ErrorType") == document["__type"]
        assert isinstance(document["message"], str)
        assert document["message"]
        assert after <= before, "a refused request opened a tunnel"
    assert fuzz.log.bad[logged:] == []


def _send(fuzz: Fuzzed, operation: str | None, body: bytes, headers: dict[str, str]) -> None:
    before, logged = len(fuzz.api.registry), len(fuzz.log.bad)
    status, answer_headers, raw = fuzz.wire.post(body, headers)
    check_answer(fuzz, operation, status, answer_headers, raw, before, logged)


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("operation", OPERATIONS)
def test_any_body_gets_an_aws_shaped_answer(fuzzed: Fuzzed, operation: str) -> None:
    @FUZZ
    @given(bodies(fuzzed, operation))
    def run(body: bytes) -> None:
        _send(fuzzed, operation, body, {"X-Amz-Target": TARGET + operation})

    run()
    assert fuzzed.log.records > 0  # the watch sees the service's log


_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@settings(FUZZ, max_examples=80)
@given(
    target=_header_text | st.sampled_from([TARGET + op for op in OPERATIONS]),
    body=st.binary(max_size=64),
)
def test_any_target_gets_an_aws_shaped_answer(fuzzed: Fuzzed, target: str, body: bytes) -> None:
    operation = target.removeprefix(TARGET) if target.removeprefix(TARGET) in OPERATIONS else None
    _send(fuzzed, operation if target.startswith(TARGET) else None, body, {"X-Amz-Target": target})


def _amz_date(offset: float = 0.0) -> str:
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return now.strftime("%Y%m%dT%H%M%SZ")


_PARTS = ("date", "key", "scope", "region", "service", "names", "signature", "auth", "host", "sha")


@st.composite
def signatures(draw: st.DrawFn) -> dict[str, str]:
    """Authorization, X-Amz-Date, Host (and X-Amz-Content-SHA256) as botocore sends them, but
    for one or two parts spoiled (and a signature that cannot match)."""
    spoiled = draw(st.sets(st.sampled_from(_PARTS), min_size=1, max_size=2))

    def part(name: str, valid: st.SearchStrategy[str]) -> str:
        return draw(_header_text if name in spoiled else valid)

    date = part("date", st.sampled_from([_amz_date(), _amz_date(-3600)]))
    key = part("key", st.sampled_from([TEST_KEY_ID, "AKIDUNKNOWN"]))
    scope_date = part("scope", st.just(date[:8]))
    region = part("region", st.just(REGION))
    service = part("service", st.just("IoTSecuredTunneling"))
    names = part(
        "names",
        st.just("host;x-amz-date;x-amz-target")
        | st.lists(
            st.sampled_from(["host", "x-amz-date", "x-amz-target", "content-type", "x-amz-x"]),
            max_size=5,
        ).map(";".join),
    )
    signature = part("signature", st.text("0123456789abcdef", min_size=64, max_size=64))
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={key}/{scope_date}/{region}/{service}/aws4_request, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    headers = {
        "Authorization": part("auth", st.just(authorization)),
        "X-Amz-Date": date,
        "X-Amz-Target": TARGET + draw(st.sampled_from(OPERATIONS)),
    }
    if "host" in spoiled:
        headers["Host"] = draw(
            st.sampled_from(["[", "]", "a b", "127.0.0.1:99999", "[::1", ""]) | _header_text
        )
    if "sha" in spoiled:
        headers["X-Amz-Content-SHA256"] = draw(_header_text)
    return headers


@settings(FUZZ, max_examples=150)
@given(headers=signatures(), body=st.binary(max_size=32))
def test_any_signature_gets_an_aws_shaped_answer(
    signed: Fuzzed, headers: dict[str, str], body: bytes
) -> None:
    before, logged = len(signed.api.registry), len(signed.log.bad)
    status, answer_headers, raw = signed.wire.post(body, headers)
    check_answer(signed, None, status, answer_headers, raw, before, logged)
    assert status in (400, 403, 404), raw  # none of these is a valid signature
