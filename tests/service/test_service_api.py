"""The management API: every operation through boto3 over HTTPS (responses checked against
botocore's model), bad input of every kind, SigV4, and the HTTP layer.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from api_harness import ShapeChecker, ThreadedApi
from botocore.exceptions import ClientError
from service_harness import V3
from websockets.asyncio.client import connect

from service.api import ManagementApi
from service.clock import ManualClock
from service.control import ControlPlane, ControlSettings, Limits
from service.registry import TunnelRegistry
from testbed.awsapi import TEST_KEY_ID, TEST_SECRET
from testbed.pki import PKI

TARGET = "IoTSecuredTunneling."


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedApi]:
    pki = PKI.create(tmp_path_factory.mktemp("api-pki"))
    service = ThreadedApi(pki, settings=ControlSettings(limits=Limits(max_tunnels=1000)))
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(api: ThreadedApi) -> Any:
    return api.client()


def code_of(info: pytest.ExceptionInfo[ClientError]) -> tuple[str, str, int]:
    error = info.value.response["Error"]
    return error["Code"], error["Message"], info.value.response["ResponseMetadata"][
        "HTTPStatusCode"
    ]


# ---------------------------------------------------------------------------- operations


def test_every_operation_with_boto3(api: ThreadedApi, client: Any) -> None:
    before = ShapeChecker.checked
    opened = client.open_tunnel(
        description="first tunnel",
        tags=[{"key": "env", "value": "test"}],
        destinationConfig={"thingName": "thing-1", "services": ["HTTP1", "SSH1"]},
        timeoutConfig={"maxLifetimeTimeoutMinutes": 30},
    )
    tunnel_id = opened["tunnelId"]
    arn = opened["tunnelArn"]
    assert arn == f"arn:aws:iot:us-east-1:123456789012:tunnel/{tunnel_id}"
    assert opened["sourceAccessToken"] != opened["destinationAccessToken"]
    token = opened["destinationAccessToken"]
    [note] = [n for n in api.notifier.sent if n.notification.token.reveal() == token]
    assert (note.thing_name, note.services) == ("thing-1", ("HTTP1", "SSH1"))

    described = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
    assert described["status"] == "OPEN"
    assert described["description"] == "first tunnel"
    assert described["destinationConfig"] == {"thingName": "thing-1", "services": ["HTTP1", "SSH1"]}
    assert described["timeoutConfig"] == {"maxLifetimeTimeoutMinutes": 30}
    assert described["tags"] == [{"key": "env", "value": "test"}]
    assert described["sourceConnectionState"]["status"] == "DISCONNECTED"
    assert described["destinationConnectionState"]["status"] == "DISCONNECTED"
    assert isinstance(described["createdAt"], datetime.datetime)

    summaries = client.list_tunnels(thingName="thing-1")["tunnelSummaries"]
    assert tunnel_id in [s["tunnelId"] for s in summaries]

    rotated = client.rotate_tunnel_access_token(
        tunnelId=tunnel_id,
        clientMode="DESTINATION",
        destinationConfig={"thingName": "thing-1", "services": ["SSH1", "HTTP1"]},
    )
    assert set(rotated) - {"ResponseMetadata"} == {"tunnelArn", "destinationAccessToken"}
    assert api.notifier.sent[-1].notification.token.reveal() == rotated["destinationAccessToken"]
    assert set(client.rotate_tunnel_access_token(tunnelId=tunnel_id, clientMode="ALL")) == {
        "ResponseMetadata",
        "tunnelArn",
        "sourceAccessToken",
        "destinationAccessToken",
    }

    client.tag_resource(resourceArn=arn, tags=[{"key": "team", "value": "iot"}])
    tags = client.list_tags_for_resource(resourceArn=arn)["tags"]
    assert tags == [{"key": "env", "value": "test"}, {"key": "team", "value": "iot"}]
    client.untag_resource(resourceArn=arn, tagKeys=["env"])
    assert client.list_tags_for_resource(resourceArn=arn)["tags"] == [
        {"key": "team", "value": "iot"}
    ]
    client.untag_resource(resourceArn=arn, tagKeys=["team"])
    assert "tags" not in client.list_tags_for_resource(resourceArn=arn)

    client.close_tunnel(tunnelId=tunnel_id)
    assert client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["status"] == "CLOSED"
    client.close_tunnel(tunnelId=tunnel_id, delete=True)
    with pytest.raises(ClientError) as info:
        client.describe_tunnel(tunnelId=tunnel_id)
    assert code_of(info)[0] == "ResourceNotFoundException"
    assert ShapeChecker.checked - before == 15


def test_minimal_tunnel_shape(client: Any) -> None:
    opened = client.open_tunnel()
    described = client.describe_tunnel(tunnelId=opened["tunnelId"])["tunnel"]
    assert "destinationConfig" not in described
    assert "tags" not in described
    assert described["timeoutConfig"] == {"maxLifetimeTimeoutMinutes": 720}


def test_list_pagination(client: Any) -> None:
    ids = {
        client.open_tunnel(destinationConfig={"thingName": "pager", "services": ["S"]})[
            "tunnelId"
        ]
        for _ in range(5)
    }
    pages = [client.list_tunnels(thingName="pager", maxResults=2)]
    while "nextToken" in pages[-1]:
        pages.append(
            client.list_tunnels(
                thingName="pager", maxResults=2, nextToken=pages[-1]["nextToken"]
            )
        )
    assert [len(p["tunnelSummaries"]) for p in pages] == [2, 2, 1]
    assert {s["tunnelId"] for p in pages for s in p["tunnelSummaries"]} == ids
    created = [s["createdAt"] for p in pages for s in p["tunnelSummaries"]]
    assert created == sorted(created, reverse=True)


def test_connection_states_are_live(api: ThreadedApi, client: Any) -> None:
    opened = client.open_tunnel(destinationConfig={"services": ["SSH1"]})
    tunnel_id = opened["tunnelId"]

    async def connect_destination() -> Any:
        ws = await connect(
            f"wss://127.0.0.1:{api.ws_port}/tunnel?local-proxy-mode=destination",
            ssl=api.pki.client_context(),
            subprotocols=[V3],  # type: ignore[list-item]
            additional_headers=[("access-token", opened["destinationAccessToken"])],
            ping_interval=None,
        )
        async with asyncio.timeout(10):
            await api.data.wait_for_peer(tunnel_id, "destination")
        return ws

    ws = api.call(connect_destination())
    state = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
    assert state["destinationConnectionState"]["status"] == "CONNECTED"
    assert state["sourceConnectionState"]["status"] == "DISCONNECTED"
    connected_at = state["destinationConnectionState"]["lastUpdatedAt"]

    async def wait_closed() -> Any:
        async with asyncio.timeout(10):
            await ws.wait_closed()
        return ws.close_code, ws.close_reason

    client.close_tunnel(tunnelId=tunnel_id)
    assert api.call(wait_closed()) == (1000, "tunnel closed")
    state = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
    assert state["destinationConnectionState"]["status"] == "DISCONNECTED"
    assert state["destinationConnectionState"]["lastUpdatedAt"] >= connected_at


def test_the_shape_checker_is_strict() -> None:
    import botocore.session
    from api_harness import check_value

    model = botocore.session.get_session().get_service_model("iotsecuretunneling")
    shape = model.operation_model("DescribeTunnel").output_shape
    good = {
        "tunnel": {
            "tunnelId": "t",
            "status": "OPEN",
            "sourceConnectionState": {"status": "CONNECTED", "lastUpdatedAt": 1.5},
            "createdAt": 1,
        }
    }
    assert check_value(good, shape, "DescribeTunnel") == []
    bad = {
        "tunnel": {
            "tunnelId": "!!",
            "status": "OPENED",
            "sourceConnectionState": {"status": "CONNECTED", "lastUpdatedAt": "yesterday"},
            "tags": [],
            "extra": 1,
        }
    }
    problems = "\n".join(check_value(bad, shape, "DescribeTunnel"))
    for fragment in ("tunnelId", "OPENED", "lastUpdatedAt", "tags", "extra"):
        assert fragment in problems


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("operation", "params", "code", "fragment"),
    [
        ("describe_tunnel", {"tunnelId": "no-such-tunnel"}, "ResourceNotFoundException", "no-such"),
        ("close_tunnel", {"tunnelId": "no-such-tunnel"}, "ResourceNotFoundException", "not found"),
        (
            "rotate_tunnel_access_token",
            {"tunnelId": "no-such-tunnel", "clientMode": "ALL"},
            "ResourceNotFoundException",
            "not found",
        ),
        (
            "open_tunnel",
            {"destinationConfig": {"services": ["A", "B", "C", "D"]}},
            "LimitExceededException",
            "at most 3 services",
        ),
        (
            "open_tunnel",
            {"destinationConfig": {"services": ["bad id"]}},
            "InvalidRequestException",
            "services[0]: must match",
        ),
        (
            "open_tunnel",
            {"destinationConfig": {"services": ["x" * 129]}},
            "InvalidRequestException",
            "1 to 128",
        ),
        (
            "open_tunnel",
            {"destinationConfig": {"thingName": "bad thing", "services": ["A"]}},
            "InvalidRequestException",
            "thingName",
        ),
        (
            "open_tunnel",
            {"timeoutConfig": {"maxLifetimeTimeoutMinutes": 721}},
            "InvalidRequestException",
            "1 to 720",
        ),
        ("open_tunnel", {"description": "bell\x07"}, "InvalidRequestException", "description"),
        (
            "open_tunnel",
            {"tags": [{"key": "bad\tkey", "value": "v"}]},
            "InvalidRequestException",
            "tags[0].key",
        ),
        (
            "rotate_tunnel_access_token",
            {"tunnelId": "t", "clientMode": "BOTH"},
            "InvalidRequestException",
            "clientMode",
        ),
        ("describe_tunnel", {"tunnelId": "a b"}, "InvalidRequestException", "tunnelId"),
        ("list_tunnels", {"maxResults": 101}, "InvalidRequestException", "maxResults"),
        ("list_tunnels", {"nextToken": "Zm9v"}, "InvalidRequestException", "nextToken"),
        (
            "list_tags_for_resource",
            {"resourceArn": "arn:aws:iot:us-east-1:123456789012:tunnel/none"},
            "ResourceNotFoundException",
            "not found",
        ),
        (
            "tag_resource",
            {"resourceArn": "arn:aws:iot:us-east-1:123456789012:thing/x", "tags": []},
            "InvalidRequestException",
            "at least 1",
        ),
    ],
)
def test_bad_input_gets_the_aws_error(
    client: Any, operation: str, params: dict[str, Any], code: str, fragment: str
) -> None:
    from botocore.config import Config

    # botocore's own client-side checks would catch some of these first: switch them off so
    # that the service's answer is what is tested.
    unchecked = _unvalidated(client, Config)
    with pytest.raises(ClientError) as info:
        getattr(unchecked, operation)(**params)
    got_code, message, status = code_of(info)
    assert (got_code, status) == (code, 400)
    assert fragment in message
    assert client.list_tunnels(maxResults=1)["ResponseMetadata"]["HTTPStatusCode"] == 200


def _unvalidated(client: Any, config_class: Any) -> Any:
    cached = getattr(client, "_unvalidated", None)
    if cached is None:
        import boto3

        credentials = client._request_signer._credentials
        cached = boto3.session.Session().client(
            "iotsecuretunneling",
            endpoint_url=client.meta.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=credentials.access_key,
            aws_secret_access_key=credentials.secret_key,
            verify=client._endpoint.http_session._verify,
            config=config_class(parameter_validation=False, retries={"max_attempts": 1}),
        )
        ShapeChecker.attach(cached)
        client._unvalidated = cached
    return cached


async def _raw_api(
    target: str | None, body: bytes, registry: TunnelRegistry | None = None
) -> tuple[int, dict[str, Any]]:
    api = ManagementApi(ControlPlane(registry or TunnelRegistry()))
    response = await api.handle(target, body)
    return response.status, json.loads(response.body)


SERIALIZATION = "SerializationException"
UNKNOWN = "UnknownOperationException"


@pytest.mark.parametrize(
    ("operation", "body", "code", "fragment"),
    [
        ("OpenTunnel", b"{not json", SERIALIZATION, "not valid JSON"),
        ("OpenTunnel", b"\xff\xfe", SERIALIZATION, "not UTF-8"),
        ("OpenTunnel", b"[1, 2]", SERIALIZATION, "JSON object"),
        ("FlyToTheMoon", b"{}", UNKNOWN, "FlyToTheMoon"),
        ("DescribeTunnel", b"{}", "", "tunnelId: missing"),
        ("DescribeTunnel", b'{"tunnelId": 5}', "", "string"),
        ("CloseTunnel", b'{"tunnelId": "t", "delete": "yes"}', "", "boolean"),
        ("RotateTunnelAccessToken", b'{"tunnelId": "t"}', "", "clientMode: missing"),
        ("OpenTunnel", b'{"destinationConfig": {}}', "", "services: missing"),
        ("OpenTunnel", b'{"destinationConfig": []}', "", "object"),
        ("OpenTunnel", b'{"destinationConfig": {"services": [1]}}', "", "services[0]"),
        ("OpenTunnel", b'{"timeoutConfig": {"maxLifetimeTimeoutMinutes": true}}', "", "integer"),
        ("OpenTunnel", b'{"tags": [{"key": "k"}]}', "", "tags[0].value: missing"),
        ("TagResource", b'{"resourceArn": "x"}', "", "tags: missing"),
        ("UntagResource", b'{"resourceArn": "x", "tagKeys": [1]}', "", "tagKeys[0]"),
        ("ListTunnels", b'{"maxResults": 0}', "", "maxResults"),
    ],
)
def test_malformed_requests(operation: str, body: bytes, code: str, fragment: str) -> None:
    status, document = asyncio.run(_raw_api(TARGET + operation, body))
    assert status == 400
    assert document["__type"] == (code or "InvalidRequestException")
    assert fragment in document["message"]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [(None, "X-Amz-Target"), ("Other.OpenTunnel", "Other.OpenTunnel"), ("", "unknown")],
)
def test_missing_or_foreign_target(target: str | None, fragment: str) -> None:
    status, document = asyncio.run(_raw_api(target, b"{}"))
    assert (status, document["__type"]) == (400, UNKNOWN)
    assert fragment in document["message"]


def test_empty_body_means_no_parameters() -> None:
    status, document = asyncio.run(_raw_api(TARGET + "ListTunnels", b""))
    assert (status, document) == (200, {"tunnelSummaries": []})


def test_unknown_members_are_ignored() -> None:
    status, document = asyncio.run(_raw_api(TARGET + "OpenTunnel", b'{"future": 1}'))
    assert status == 200
    assert set(document) == {"tunnelId", "tunnelArn", "sourceAccessToken", "destinationAccessToken"}


# ---------------------------------------------------------------------------- HTTP layer


def _https(api: ThreadedApi) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        "127.0.0.1", api.api_port, context=api.pki.client_context(), timeout=10
    )


def test_http_routing_and_keep_alive(api: ThreadedApi) -> None:
    conn = _https(api)
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 405
    assert json.loads(response.read())["__type"] == "UnknownOperationException"
    conn.request("POST", "/elsewhere", body=b"{}", headers={"X-Amz-Target": TARGET + "ListTunnels"})
    response = conn.getresponse()
    assert response.status == 404
    response.read()
    for _ in range(3):  # same connection, kept alive
        conn.request("POST", "/", body=b"{}", headers={"X-Amz-Target": TARGET + "ListTunnels"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/x-amz-json-1.1"
        assert response.getheader("x-amzn-RequestId")
        json.loads(response.read())
    conn.request("POST", "/", body=b"x" * (2 * 1024 * 1024))
    response = conn.getresponse()
    assert response.status == 413
    conn.close()


def test_garbage_http_gets_400_and_the_service_keeps_serving(api: ThreadedApi) -> None:
    context = api.pki.client_context()
    with (
        socket.create_connection(("127.0.0.1", api.api_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", api.api_port), timeout=10) as raw:
        raw.sendall(b"plain text on a TLS port\r\n\r\n")  # TLS handshake fails
        try:
            answer = raw.recv(4096)
        except OSError:  # reset: as good as closed
            answer = b""
        assert not answer.startswith(b"HTTP")
    conn = _https(api)
    conn.request("POST", "/", body=b"{}", headers={"X-Amz-Target": TARGET + "ListTunnels"})
    assert conn.getresponse().status == 200
    conn.close()


# ---------------------------------------------------------------------------- SigV4


@pytest.fixture(scope="module")
def signed_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedApi]:
    pki = PKI.create(tmp_path_factory.mktemp("signed-pki"))
    service = ThreadedApi(pki, credentials={TEST_KEY_ID: TEST_SECRET, "AKIDSECOND": "second"})
    yield service
    service.close()


def test_signed_requests_are_verified(signed_api: ThreadedApi) -> None:
    assert signed_api.client().list_tunnels()["tunnelSummaries"] == []
    assert signed_api.client("AKIDSECOND", "second").open_tunnel()["tunnelId"]


@pytest.mark.parametrize(
    ("key_id", "secret", "region", "code", "fragment"),
    [
        (TEST_KEY_ID, "wrong-secret", "us-east-1", "InvalidSignatureException", "does not match"),
        ("AKIDUNKNOWN", TEST_SECRET, "us-east-1", "UnrecognizedClientException", "invalid"),
        (TEST_KEY_ID, TEST_SECRET, "eu-west-1", "InvalidSignatureException", "region"),
    ],
)
def test_bad_signatures_are_refused(
    signed_api: ThreadedApi, key_id: str, secret: str, region: str, code: str, fragment: str
) -> None:
    before = len(signed_api.registry)
    with pytest.raises(ClientError) as info:
        signed_api.client(key_id, secret, region).open_tunnel()
    got, message, status = code_of(info)
    assert (got, status) == (code, 403)
    assert fragment in message
    assert len(signed_api.registry) == before


def test_unsigned_and_tampered_requests_are_refused(signed_api: ThreadedApi) -> None:
    conn = _https(signed_api)
    conn.request("POST", "/", body=b"{}", headers={"X-Amz-Target": TARGET + "OpenTunnel"})
    response = conn.getresponse()
    assert response.status == 403
    assert json.loads(response.read())["__type"] == "MissingAuthenticationTokenException"

    # sign a ListTunnels, then send a different body with the same signature
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(
        method="POST",
        url=f"https://127.0.0.1:{signed_api.api_port}/",
        data=b"{}",
        headers={
            "X-Amz-Target": TARGET + "ListTunnels",
            "Content-Type": "application/x-amz-json-1.1",
        },
    )
    credentials = Credentials(TEST_KEY_ID, TEST_SECRET)
    SigV4Auth(credentials, "IoTSecuredTunneling", "us-east-1").add_auth(request)
    headers = dict(request.headers.items())
    conn.request("POST", "/", body=b"{}", headers=headers)
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()
    conn.request("POST", "/", body=b'{"maxResults": 1}', headers=headers)
    response = conn.getresponse()
    assert response.status == 403
    assert json.loads(response.read())["__type"] == "InvalidSignatureException"
    headers["Authorization"] = "AWS4-HMAC-SHA256 garbage"
    conn.request("POST", "/", body=b"{}", headers=headers)
    response = conn.getresponse()
    assert json.loads(response.read())["__type"] == "IncompleteSignatureException"
    conn.close()


def test_stale_signatures_are_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    pki = PKI.create(tmp_path_factory.mktemp("stale-pki"))
    clock = ManualClock(datetime.datetime.now(datetime.UTC).timestamp() + 16 * 60)
    service = ThreadedApi(pki, credentials={TEST_KEY_ID: TEST_SECRET}, verifier_clock=clock)
    try:
        with pytest.raises(ClientError) as info:
            service.client().list_tunnels()
        code, message, _ = code_of(info)
        assert (code, "Signature expired" in message) == ("InvalidSignatureException", True)
    finally:
        service.close()


def test_without_credentials_unsigned_requests_are_accepted(api: ThreadedApi) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", api.api_port, context=ssl.create_default_context(cafile=api.pki.ca.cert)
    )
    conn.request("POST", "/", body=b"{}", headers={"X-Amz-Target": TARGET + "ListTunnels"})
    assert conn.getresponse().status == 200
    conn.close()


def test_an_internal_failure_is_a_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ControlPlane):
        def describe(self, tunnel_id: str) -> Any:
            raise RuntimeError("disk on fire")

    async def scenario() -> Any:
        api = ManagementApi(Broken(TunnelRegistry()))
        return await api.handle(TARGET + "DescribeTunnel", b'{"tunnelId": "t"}')

    response = asyncio.run(scenario())
    assert response.status == 500
    assert json.loads(response.body) == {"__type": "InternalFailure", "message": "internal error"}
    assert "disk on fire" in caplog.text  # in the log, not in the answer


def _signed_headers_for(
    api: ThreadedApi, body: bytes, headers: dict[str, str], *, secret: str = TEST_SECRET
) -> dict[str, str]:
    """``headers`` plus the Authorization and X-Amz-Date botocore adds, signing over exactly
    the headers given (and host)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(
        method="POST", url=f"https://127.0.0.1:{api.api_port}/", data=body, headers=headers
    )
    SigV4Auth(Credentials(TEST_KEY_ID, secret), "IoTSecuredTunneling", "us-east-1").add_auth(
        request
    )
    return dict(request.headers.items())


def _post(api: ThreadedApi, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    conn = _https(api)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_an_unsigned_target_cannot_be_swapped(signed_api: ThreadedApi) -> None:
    """Issue 11 #3: a signature over host;x-amz-date only must not authorize whatever
    X-Amz-Target is sent with it (a DescribeTunnel replayed as a CloseTunnel)."""
    tunnel_id = signed_api.client().open_tunnel()["tunnelId"]
    body = json.dumps({"tunnelId": tunnel_id}).encode()
    headers = _signed_headers_for(signed_api, body, {})
    assert "x-amz-target" not in headers["Authorization"].lower()
    for operation in ("DescribeTunnel", "CloseTunnel"):
        status, document = _post(
            signed_api, body, {**headers, "X-Amz-Target": TARGET + operation}
        )
        assert (status, document["__type"]) == (403, "IncompleteSignatureException")
        assert "X-Amz-Target" in document["message"]
    described = signed_api.client().describe_tunnel(tunnelId=tunnel_id)["tunnel"]
    assert described["status"] == "OPEN"


@pytest.mark.parametrize("signed", ["host;x-amz-target", "x-amz-date;x-amz-target"])
def test_host_and_date_must_be_signed(signed_api: ThreadedApi, signed: str) -> None:
    body = b"{}"
    headers = _signed_headers_for(signed_api, body, {"X-Amz-Target": TARGET + "ListTunnels"})
    authorization = headers["Authorization"]
    assert "SignedHeaders=host;x-amz-date;x-amz-target," in authorization
    headers["Authorization"] = authorization.replace(
        "SignedHeaders=host;x-amz-date;x-amz-target,", f"SignedHeaders={signed},"
    )
    status, document = _post(signed_api, body, headers)
    assert (status, document["__type"]) == (403, "IncompleteSignatureException")
    assert "SignedHeader" in document["message"]


def test_every_sent_amz_header_must_be_signed(signed_api: ThreadedApi) -> None:
    body = b"{}"
    headers = _signed_headers_for(signed_api, body, {"X-Amz-Target": TARGET + "ListTunnels"})
    status, document = _post(signed_api, body, {**headers, "X-Amz-Security-Token": "x"})
    assert (status, document["__type"]) == (403, "IncompleteSignatureException")
    assert "x-amz-security-token" in document["message"]


def test_a_signed_content_hash_must_be_the_body_hash(signed_api: ThreadedApi) -> None:
    """A request signed with X-Amz-Content-SHA256 (of the body it was signed with) cannot carry
    another body: the canonical request covers the real payload hash."""
    import hashlib

    tunnel_id = signed_api.client().open_tunnel()["tunnelId"]
    signed_body = json.dumps({"tunnelId": tunnel_id}).encode()
    headers = _signed_headers_for(
        signed_api,
        signed_body,
        {
            "X-Amz-Target": TARGET + "CloseTunnel",
            "X-Amz-Content-SHA256": hashlib.sha256(signed_body).hexdigest(),
        },
    )
    assert "x-amz-content-sha256" in headers["Authorization"]
    other = json.dumps({"tunnelId": tunnel_id, "delete": True}).encode()
    status, document = _post(signed_api, other, headers)
    assert (status, document["__type"]) == (403, "InvalidSignatureException")
    assert "x-amz-content-sha256" in document["message"]
    assert signed_api.registry.find(tunnel_id) is not None
    # an UNSIGNED-PAYLOAD claim is refused the same way
    headers = _signed_headers_for(
        signed_api,
        signed_body,
        {"X-Amz-Target": TARGET + "CloseTunnel", "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
    )
    status, document = _post(signed_api, signed_body, headers)
    assert (status, document["__type"]) == (403, "InvalidSignatureException")
    # the honest request with the header goes through
    headers = _signed_headers_for(
        signed_api,
        signed_body,
        {
            "X-Amz-Target": TARGET + "CloseTunnel",
            "X-Amz-Content-SHA256": hashlib.sha256(signed_body).hexdigest(),
        },
    )
    assert _post(signed_api, signed_body, headers)[0] == 200
    assert signed_api.registry.find(tunnel_id).is_open is False  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- hostile JSON


def _post_plain(api: ThreadedApi, operation: str, body: bytes) -> tuple[int, str, bytes]:
    conn = _https(api)
    try:
        conn.request("POST", "/", body=body, headers={"X-Amz-Target": TARGET + operation})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[" * 100_000, "nested more than"),
        (b'{"tags": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "nested more than"),
        (b'{"description": "' + b"x" * (300 * 1024) + b'"}', "over"),
    ],
    ids=["deep", "deep-member", "huge"],
)
def test_deep_or_huge_json_is_refused_in_one_line(
    api: ThreadedApi, caplog: pytest.LogCaptureFixture, body: bytes, fragment: str
) -> None:
    """Issue 11 #7: nesting or size that would exhaust the parser is a 4xx, not a 500."""
    caplog.set_level("INFO")
    before = len(api.registry)
    status, content_type, raw = _post_plain(api, "OpenTunnel", body)
    document = json.loads(raw)
    assert status in (400, 413)
    assert (document["__type"], content_type) == (
        "SerializationException",
        "application/x-amz-json-1.1",
    )
    assert fragment in document["message"]
    assert "\n" not in document["message"]
    assert len(api.registry) == before
    assert "Traceback" not in caplog.text
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.name in ("service.api", "service.http") and f" {status}" in r.getMessage()
    ]
    assert logged
    assert all("\n" not in line for line in logged)


def test_a_body_over_the_http_limit_gets_an_aws_shaped_413(api: ThreadedApi) -> None:
    status, content_type, raw = _post_plain(api, "OpenTunnel", b"x" * (2 * 1024 * 1024))
    assert status == 413
    assert content_type == "application/x-amz-json-1.1"
    assert json.loads(raw)["__type"] == "SerializationException"


@pytest.mark.parametrize(
    "cursor",
    [
        b"[" * 3000,
        b"[" + b"9" * 400 + b', "t"]',
        b'[NaN, "t"]',
        b'{"a": 1, "b": 2}',
        b'[1, ["t"]]',
        b"\xff\xfe",
    ],
    ids=["deep", "huge-int", "nan", "object", "non-string-id", "not-utf8"],
)
def test_a_hostile_next_token_is_an_invalid_request(api: ThreadedApi, cursor: bytes) -> None:
    import base64

    token = base64.urlsafe_b64encode(cursor).decode()
    assert len(token) <= 4096
    status, _, raw = _post_plain(api, "ListTunnels", json.dumps({"nextToken": token}).encode())
    document = json.loads(raw)
    assert (status, document["__type"]) == (400, "InvalidRequestException")
    assert "nextToken" in document["message"]


def test_an_unsignable_host_is_an_invalid_signature(signed_api: ThreadedApi) -> None:
    """Found by test_service_fuzz_api: a Host such as "[" made botocore's URL parsing raise,
    a 500 with a traceback in the log."""
    body = b"{}"
    headers = _signed_headers_for(signed_api, body, {"X-Amz-Target": TARGET + "ListTunnels"})
    status, document = _post(signed_api, body, {**headers, "Host": "["})
    assert (status, document["__type"]) == (403, "InvalidSignatureException")
    assert "Host" in document["message"]
