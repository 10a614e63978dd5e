"""Property-based: whatever a ``--settings-json`` or ``--config`` file holds, the proxy either
loads it or fails with one :class:`ConfigError` line naming the file; never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotunnel.errors import ConfigError
from proxy.config import CliExit, ProxySettings, Tuning, load

TOKEN = "AQGAAXiNsecretTOKENvalue/with+base64=chars"
ENV = {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_TUNING_KEYS = [f"iotunnel.{name}" for name in Tuning.__dataclass_fields__]
_REFERENCE_KEYS = [
    "tunneling.proxy.websocket.ping_period_ms",
    "tunneling.proxy.websocket.retry_delay_ms",
    "tunneling.proxy.websocket.connect_retry_count",
    "tunneling.proxy.tcp.max_active_connections",
    "tunneling.proxy.message.max_payload_size",
    "tunneling.proxy.default_bind_address",
    "tunneling.proxy.endpoint_format",
    "tunneling.proxy.region_endpoint_overrides.us-east-1",
    "tunneling.proxy.websocket.subprotocol",
    "tunneling.proxy.tcp.read_buffer_size",
]
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
_SETTINGS_DOCUMENTS = st.dictionaries(
    st.sampled_from(_TUNING_KEYS + _REFERENCE_KEYS) | st.text(max_size=20),
    _JSON_VALUES,
    max_size=6,
).map(json.dumps)

_OPTIONS = [
    "region",
    "proxy-endpoint",
    "access-token",
    "client-token",
    "source-listen-port",
    "destination-app",
    "mode",
    "local-bind-address",
    "capath",
    "no-ssl-host-verify",
    "verbose",
    "destination-client-type",
    "config-dir",
    "settings-json",
    "config",
    "help",
]
_CONFIG_LINES = st.lists(
    st.tuples(
        st.sampled_from(_OPTIONS) | st.text(max_size=12),
        st.sampled_from([" = ", "=", ": ", " "]),
        st.text(max_size=30),
    ).map("".join)
    | st.text(max_size=40),
    max_size=8,
).map("\n".join)


def _outcome(argv: list[str], files: dict[str, bytes]) -> Any:
    """Load with ``files`` written in a fresh directory; the result or the ConfigError."""
    with tempfile.TemporaryDirectory() as directory:
        cwd = Path(directory)
        for name, data in files.items():
            (cwd / name).write_bytes(data)
        try:
            return load(argv, ENV, cwd)
        except ConfigError as exc:
            return exc


def _check_error(result: Any, file_name: str, *, others: tuple[str, ...] = ()) -> None:
    if isinstance(result, ProxySettings | CliExit):
        return
    assert isinstance(result, ConfigError)
    message = str(result)
    assert message
    assert "\n" not in message
    assert TOKEN not in message
    assert message.startswith(file_name) or message.startswith(others), message


@FUZZ
@given(data=st.binary(max_size=300) | _SETTINGS_DOCUMENTS.map(str.encode))
def test_any_settings_json_loads_or_fails_in_one_line(data: bytes) -> None:
    result = _outcome(
        ["-r", "us-east-1", "-d", "22", "--settings-json", "s.json"], {"s.json": data}
    )
    _check_error(result, "s.json")


@FUZZ
@given(depth=st.integers(min_value=1, max_value=5000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_settings_json_is_one_line(depth: int, opener: str) -> None:
    result = _outcome(
        ["-r", "us-east-1", "-d", "22", "--settings-json", "s.json"],
        {"s.json": (opener * depth).encode()},
    )
    _check_error(result, "s.json")


# A --config file can fail on what it does not say (no mode, no region): those lines name
# the flags to give instead of the file.
_WHOLE_CONFIG = ("cannot tell the mode: give -s", "give -r REGION or -e ENDPOINT")


@FUZZ
@given(data=st.binary(max_size=300) | _CONFIG_LINES.map(str.encode))
def test_any_config_file_loads_or_fails_in_one_line(data: bytes) -> None:
    result = _outcome(["--config", "proxy.conf"], {"proxy.conf": data})
    _check_error(result, "proxy.conf", others=_WHOLE_CONFIG)
