"""iotunnel.notify: payload -> Notification or Rejection, Notification -> payload; the topic."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotunnel.notify import MAX_PAYLOAD, Notification, Rejection, notify_topic, parse
from iotunnel.secret import Secret

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
    assert rejected(payload(clientMode=TOKEN)) == "clientMode is '<token>', not 'destination'"
    assert rejected(payload(services=[TOKEN + "!"])).startswith("services holds '<token>!'")
    assert "repeated" in rejected(payload(services=["SSH1", TOKEN]))
    short = "tok-a1"
    assert "repeated" in rejected(payload(clientAccessToken=short, region=short))
    assert "'<token>_'" in rejected(payload(clientAccessToken=short, region=short + "_"))


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: "tok-" never occurs in a reason's own words: a token found in a reason is a leak.
TOKENS = st.from_regex(r"tok-[A-Za-z0-9_.~+/=-]{8,80}", fullmatch=True)
SERVICE_IDS = st.from_regex(r"[A-Za-z0-9:_-]{1,12}", fullmatch=True)
GIANT = st.sampled_from(["x" * 20_000, "é" * 9_000, "\ud800" * 100, "a\nb\u2028c" * 1000])
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**4000)
    | st.floats()
    | st.text(max_size=50)
    | GIANT,
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=12), children, max_size=8)
    ),
    max_leaves=30,
)


def checked(data: bytes, mapped: set[str], token: str | None = None) -> Notification | Rejection:
    """parse() never raises; a rejection is one line and never holds the token."""
    result = parse(data, mapped, mapping_dir="/etc/iotunnel/destination.d")
    assert isinstance(result, Notification | Rejection)
    if isinstance(result, Rejection):
        assert isinstance(result.reason, str)
        assert result.reason
        assert len(result.reason.splitlines()) == 1, result.reason
        if token is not None:
            assert token not in result.reason
    return result


@FUZZ
@given(st.binary(max_size=MAX_PAYLOAD + 10))
def test_any_bytes_give_a_notification_or_a_rejection(data: bytes) -> None:
    checked(data, MAPPED)


@FUZZ
@given(JSON_VALUES)
def test_any_json_value_gives_a_notification_or_a_rejection(value: object) -> None:
    checked(json.dumps(value).encode(), MAPPED)


def a_field(valid: st.SearchStrategy[object], token: str) -> st.SearchStrategy[object]:
    """A field's value: valid, missing (None), of any JSON type, the token, or huge."""
    return st.one_of(valid, valid, st.none(), JSON_VALUES, st.just(token), st.just([token]), GIANT)


@st.composite
def documents(draw: st.DrawFn) -> tuple[bytes, dict[str, object], str, set[str]]:
    token = draw(TOKENS)
    mapped = draw(st.sets(SERVICE_IDS, max_size=6))
    services = st.lists(
        st.one_of(st.sampled_from(sorted(mapped) or ["SSH1"]), SERVICE_IDS, st.just(token)),
        max_size=20,
    )
    fields = {
        "clientAccessToken": a_field(st.just(token), token),
        "clientMode": a_field(st.just("destination"), token),
        "region": a_field(st.sampled_from(["us-east-1", "eu-west-1", "cn-north-1"]), token),
        "services": a_field(
            st.one_of(services, st.lists(st.just("S"), min_size=1000, max_size=3000)), token
        ),
    }
    document = {name: value for name, s in fields.items() if (value := draw(s)) is not None}
    extra = draw(st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=3))
    document = {**extra, **document}
    text = json.dumps(
        document, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2]))
    )
    return text.encode("utf-8", "surrogatepass"), document, token, mapped


def acceptable(document: dict[str, object], mapped: set[str]) -> bool:
    """The rule, written again plainly: the oracle of the fuzzer."""
    token, region = document.get("clientAccessToken"), document.get("region")
    services = document.get("services")
    return (
        document.get("clientMode") == "destination"
        and isinstance(token, str)
        and 0 < len(token) <= 8192
        and all("\x21" <= c <= "\x7e" for c in token)
        and isinstance(region, str)
        and re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", region) is not None
        and isinstance(services, list)
        and 0 < len(services) <= 16
        and all(isinstance(x, str) and re.fullmatch(r"[a-zA-Z0-9:_-]{1,128}", x) for x in services)
        and len(set(services)) == len(services)
        and not any(token in value for value in (region, *services))
        and set(services) <= mapped
    )


@FUZZ
@given(documents())
def test_fuzzed_notifications_follow_the_rules(
    case: tuple[bytes, dict[str, object], str, set[str]],
) -> None:
    data, document, token, mapped = case
    # The token is secret when it is the clientAccessToken, wherever else it is repeated.
    secret = token if document.get("clientAccessToken") in (token, [token]) else None
    result = checked(data, mapped, secret)
    if len(data) > MAX_PAYLOAD:
        assert isinstance(result, Rejection)
        assert f"larger than {MAX_PAYLOAD}" in result.reason
        return
    assert isinstance(result, Notification) == acceptable(document, mapped), result
    if isinstance(result, Notification):
        assert result.token.reveal() == document["clientAccessToken"]
        assert result.region == document["region"]
        assert list(result.services) == document["services"]
        assert token not in repr(result)
        assert token not in result.describe()


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


def test_payload_round_trips_through_parse() -> None:
    built = Notification(Secret(TOKEN), "eu-west-1", ("SSH1", "HTTP1"))
    assert json.loads(built.payload()) == {
        "clientAccessToken": TOKEN,
        "clientMode": "destination",
        "region": "eu-west-1",
        "services": ["SSH1", "HTTP1"],
    }
    assert parse(built.payload(), MAPPED) == built
    assert TOKEN not in repr(built)
