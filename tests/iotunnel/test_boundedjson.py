"""The bounded JSON reader: size, depth, encoding and syntax each end in one JSONInputError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotunnel.boundedjson import JSONInputError, loads


def test_parses_ordinary_documents() -> None:
    assert loads(b'{"a": [1, {"b": "x"}]}') == {"a": [1, {"b": "x"}]}
    assert loads('"[[[["') == "[[[["  # brackets inside strings do not count


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_refuses_deep_nesting_before_parsing(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    document = opener * 100_000 + "1" + closer * 100_000
    with pytest.raises(JSONInputError, match="nested more than 32 levels"):
        loads(document)
    assert loads(opener * 32 + "1" + closer * 32, max_bytes=10_000) is not None


def test_refuses_large_documents() -> None:
    with pytest.raises(JSONInputError, match="too large: 11 bytes, at most 10"):
        loads(b'"123456789"', max_bytes=10)


def test_errors_never_quote_the_input() -> None:
    secret = "AQGAAXi-secret-token"
    for bad in (f'{{"t": "{secret}", }}', f'{{"t": "{secret}"', f"[{secret}]"):
        with pytest.raises(JSONInputError) as info:
            loads(bad)
        assert secret not in str(info.value)
        assert "not valid JSON" in str(info.value)
    with pytest.raises(JSONInputError, match="not UTF-8"):
        loads(b'"\xff"')


def test_hooks_are_passed_through() -> None:
    assert loads('{"a": 1}', object_pairs_hook=list) == [("a", 1)]
    with pytest.raises(ValueError, match="NaN"):
        loads("[NaN]", parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_input_parses_or_raises_jsoninputerror(data: str | bytes) -> None:
    try:
        value = loads(data)
    except JSONInputError:
        return
    text = data.decode() if isinstance(data, bytes) else data
    assert json.dumps(value) == json.dumps(json.loads(text))  # NaN != NaN, so compare text


def test_an_integer_over_pythons_digit_limit_is_a_json_input_error() -> None:
    """``json.loads`` raises a plain ValueError (not a JSONDecodeError) for an integer of more
    than ``sys.get_int_max_str_digits()`` digits; it must end in a JSONInputError too."""
    for document in ("1" * 5000, '{"a": [' + "9" * 5000 + "]}"):
        with pytest.raises(JSONInputError, match="not valid JSON: a number of more than"):
            loads(document)
