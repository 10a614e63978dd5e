"""agent.notify: payload -> Notification or Rejection; agent.topics."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.notify import MAX_PAYLOAD, Notification, Rejection, parse
from agent.topics import notify_topic

TOKEN = "AQGAAXiT2bY7-secret-destination-token-0123456789"
MAPPED = {"HTTP1", "SSH1"}


def payload(**fields: object) -> bytes:
    document: dict[str, object] = {
        "clientAccessToken": TOKEN,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["HTTP1", "SSH1"],
    }
    for name, value in fields.items():
        if value is None:
            document.pop(name, None)
        else:
            document[name] = value
    return json.dumps(document).encode()


def rejected(data: bytes, mapped: set[str] = MAPPED) -> str:
    result = parse(data, mapped, mapping_dir="/etc/iotunnel/destination.d")
    assert isinstance(result, Rejection), result
    assert TOKEN not in result.reason
    return result.reason


def test_the_aws_notification_is_accepted() -> None:
    result = parse(payload(), MAPPED)
    assert isinstance(result, Notification)
    assert result.token.reveal() == TOKEN
    assert result.region == "us-east-1"
    assert result.services == ("HTTP1", "SSH1")
    assert TOKEN not in repr(result)
    assert TOKEN not in result.describe()
    assert result.describe() == "HTTP1, SSH1 (region us-east-1)"


def test_a_subset_of_the_mapped_services_is_fine() -> None:
    result = parse(payload(services=["SSH1"]), MAPPED)
    assert isinstance(result, Notification)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "the payload is not a JSON object"),
        (payload(clientMode="source"), "clientMode is 'source', not 'destination'"),
        (payload(clientMode=None), "no clientMode"),
        (payload(clientAccessToken=None), "no clientAccessToken"),
        (payload(clientAccessToken=""), "no clientAccessToken"),
        (payload(clientAccessToken=7), "no clientAccessToken"),
        (payload(clientAccessToken="two words"), "characters an HTTP header cannot carry"),
        (payload(region=None), "no region"),
        (payload(region=""), "no region"),
        (payload(region="US East"), "region 'US East' is not an AWS region name"),
        (payload(services=None), "no services"),
        (payload(services=[]), "no services"),
        (payload(services="HTTP1"), "services must be a list"),
        (payload(services=["HTTP1", 5]), "services holds 5, which is not a service ID"),
        (payload(services=["a b"]), "services holds 'a b'"),
        (payload(services=["SSH1", "SSH1"]), "services names a service twice"),
        (payload(services=["SSH1", "VNC1"]), "service VNC1 not mapped in /etc/iotunnel/"),
        (payload(services=["RDP", "VNC1"]), "services RDP, VNC1 not mapped"),
        (b" " * (MAX_PAYLOAD + 1), f"larger than {MAX_PAYLOAD}"),
    ],
)
def test_rejections_say_why(data: bytes, reason: str) -> None:
    assert reason in rejected(data)


def test_nested_json_is_rejected_not_raised() -> None:
    # Issue 11 #1: 2 KB of brackets raised RecursionError out of json.loads.
    reason = rejected(b"[" * 1000 + b"]" * 1000)
    assert reason.startswith("malformed JSON: nested more than")
    deep = payload(region=[[[[[[[[[[["x"]]]]]]]]]]])
    assert "nested more than" in rejected(deep)


def test_a_number_too_long_for_int_is_a_rejection() -> None:
    # json.loads raises a plain ValueError (not JSONDecodeError) for a 5000-digit integer.
    assert "malformed JSON" in rejected(b'{"region": ' + b"1" * 5000 + b"}")


def test_long_values_are_shortened_in_the_reason() -> None:
    reason = rejected(payload(clientMode="x" * 500))
    assert len(reason) < 100


def test_token_never_in_a_reason_even_when_it_is_in_other_fields() -> None:
    reason = rejected(payload(region=TOKEN.upper(), clientMode="destination"))
    assert TOKEN.upper()[:40] not in reason


@given(st.binary(max_size=300))
def test_any_bytes_give_a_notification_or_a_rejection(data: bytes) -> None:
    assert isinstance(parse(data, MAPPED), Notification | Rejection)


def test_fingerprint_covers_all_four_fields() -> None:
    first = parse(payload(), MAPPED)
    again = parse(payload(), MAPPED)
    other_token = parse(payload(clientAccessToken=TOKEN + "x"), MAPPED)
    other_region = parse(payload(region="eu-west-1"), MAPPED)
    other_services = parse(payload(services=["SSH1"]), MAPPED)
    assert isinstance(first, Notification)
    assert isinstance(again, Notification)
    assert first.fingerprint() == again.fingerprint()
    for other in (other_token, other_region, other_services):
        assert isinstance(other, Notification)
        assert other.fingerprint() != first.fingerprint()


def test_notify_topic() -> None:
    assert notify_topic("thing-1") == "$aws/things/thing-1/tunnels/notify"
    for bad in ("", "a/b", "a+", "#", "x" * 129):
        with pytest.raises(ValueError, match="not a thing name"):
            notify_topic(bad)
