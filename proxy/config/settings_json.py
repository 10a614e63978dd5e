"""The ``--settings-json`` file: the reference localproxy's keys and iotunnel's own.

Part of :mod:`proxy.config`; see its docstring for the rules every part follows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from iotunnel import boundedjson
from iotunnel.errors import ConfigError
from iotunnel.handshake import V3_SUBPROTOCOL
from proxy.config.files import read_config_text
from proxy.config.model import _TUNING_RANGES, Tuning, _brief, _key
from proxy.config.values import _bind_address, _Invalid, _port, _split_host_port

_OUR_PREFIX = "iotunnel."


class _ReferenceKey(NamedTuple):
    field: str
    scale: float | None = None  # ms -> s for time fields; None keeps the integer


_REFERENCE_KEYS: dict[str, _ReferenceKey] = {
    "tunneling.proxy.websocket.ping_period_ms": _ReferenceKey("ping_interval", 0.001),
    "tunneling.proxy.websocket.retry_delay_ms": _ReferenceKey("reconnect_base", 0.001),
    "tunneling.proxy.websocket.connect_retry_count": _ReferenceKey("reconnect_attempts"),
    "tunneling.proxy.tcp.max_active_connections": _ReferenceKey("max_connections"),
    "tunneling.proxy.message.max_payload_size": _ReferenceKey("read_chunk"),
    "tunneling.proxy.tcp.write_buffer_size": _ReferenceKey("local_write_buffer"),
}

_REFERENCE_IGNORED = frozenset(
    {
        "tunneling.proxy.message.data_length_size",
        "tunneling.proxy.message.max_size",
        "tunneling.proxy.message.data_frame_max_size",
        "tunneling.proxy.tcp.connection_retry_count",
        "tunneling.proxy.tcp.connection_retry_delay_ms",
        "tunneling.proxy.tcp.read_buffer_size",
        "tunneling.proxy.websocket.max_frame_size",
        "tunneling.proxy.websocket.write_buffer_size",
        "tunneling.proxy.websocket.read_buffer_size",
        "tunneling.proxy.websocket.reconnect_on_data_error",
    }
)

_KEY_BIND_ADDRESS = "tunneling.proxy.default_bind_address"
_KEY_ENDPOINT_FORMAT = "tunneling.proxy.endpoint_format"
_KEY_REGION_OVERRIDE = "tunneling.proxy.region_endpoint_overrides."
_KEY_SUBPROTOCOL = "tunneling.proxy.websocket.subprotocol"
_SUBPROTOCOL = V3_SUBPROTOCOL


@dataclass(frozen=True, slots=True)
class _FileSettings:
    """What a ``--settings-json`` file says."""

    tuning: Tuning
    default_bind_address: str | None = None
    endpoint_format: str | None = None
    region_hosts: tuple[tuple[str, str], ...] = ()


def default_settings_json() -> str:
    """The default :class:`Tuning` as a ``--settings-json`` document (our own keys)."""
    defaults = Tuning()
    document = {"iotunnel": {f.name: getattr(defaults, f.name) for f in fields(Tuning)}}
    return json.dumps(document, indent=4) + "\n"


def _flatten(
    document: Mapping[str, object], prefix: str, out: dict[str, object], display: str
) -> None:
    for key, value in document.items():
        dotted = prefix + key
        if isinstance(value, dict):
            _flatten(value, dotted + ".", out, display)
        elif dotted in out:
            raise ConfigError(f"{display}: {_key(dotted)}: set twice")
        else:
            out[dotted] = value


def _reference_int(value: object) -> int:
    """A reference value: a JSON integer or the decimal string its export writes."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(f"expected an integer, not {_brief(value)}")


def _settings_string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, not {_brief(value)}")
    return value.strip()


def _service_host(text: str) -> str:
    """Check a service ``host[:port]`` from the settings file; return it unchanged."""
    _, port = _split_host_port(text)
    if port is not None:
        _port(port, allow_zero=False)
    return text


def _tuning_value(key: str, value: object) -> tuple[str, int | float]:
    """Convert one ``iotunnel.*`` or mapped reference key to (Tuning field, value)."""
    if key in _REFERENCE_KEYS:
        name, scale = _REFERENCE_KEYS[key]
        number = _reference_int(value)
        value = number if scale is None else number * scale
        context = f"as {name}: "
    else:
        name, context = key[len(_OUR_PREFIX) :], ""
        if name not in _TUNING_RANGES:
            raise _Invalid("unknown setting")
    limits = _TUNING_RANGES[name]
    problem = limits.problem(value)
    if problem is not None:
        raise _Invalid(context + problem)
    assert isinstance(value, int | float)
    return name, float(value) if limits.kind is float else value


def _settings_entry(
    key: str, value: object, tuning: dict[str, tuple[int | float, str]], extra: dict[str, str]
) -> None:
    """Apply one flattened key: to ``tuning`` (field -> (value, key)) or to ``extra``."""
    if key.startswith(_OUR_PREFIX) or key in _REFERENCE_KEYS:
        name, number = _tuning_value(key, value)
        if name in tuning:
            raise _Invalid(f"sets {name} again (already set by {tuning[name][1]})")
        tuning[name] = number, key
    elif key in _REFERENCE_IGNORED:
        if not isinstance(value, str | int | bool):
            raise _Invalid(f"expected a string, number or boolean, not {_brief(value)}")
    elif key == _KEY_SUBPROTOCOL:
        if value != _SUBPROTOCOL:
            raise _Invalid(f"only {_SUBPROTOCOL!r} is supported; use -y V1|V2 for older peers")
    elif key == _KEY_BIND_ADDRESS:
        extra[key] = _bind_address(_settings_string(value))
    elif key == _KEY_ENDPOINT_FORMAT:
        text = _settings_string(value)
        if text.count("%s") != 1:
            raise _Invalid("must contain '%s' (the region) once")
        _service_host(text.replace("%s", "us-east-1"))
        extra[key] = text
    elif key.startswith(_KEY_REGION_OVERRIDE) and len(key) > len(_KEY_REGION_OVERRIDE):
        extra[key] = _service_host(_settings_string(value).lower())
    else:
        raise _Invalid("unknown setting")


def _read_settings_json(path: Path, display: str) -> _FileSettings:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in pairs:
            if key in result:
                raise ConfigError(f"{display}: key {_brief(key)} appears twice in one object")
            result[key] = value
        return result

    def no_constant(name: str) -> NoReturn:
        raise ConfigError(f"{display}: {name} is not a valid setting value")

    text = read_config_text(path, display)
    try:
        document = boundedjson.loads(
            text, object_pairs_hook=no_duplicates, parse_constant=no_constant
        )
    except boundedjson.JSONInputError as exc:
        raise ConfigError(f"{display}: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{display}: expected a JSON object at the top level")
    flat: dict[str, object] = {}
    _flatten(document, "", flat, display)
    tuning: dict[str, tuple[int | float, str]] = {}
    extra: dict[str, str] = {}
    for key, value in flat.items():
        try:
            _settings_entry(key, value, tuning, extra)
        except _Invalid as exc:
            raise ConfigError(f"{display}: {_key(key)}: {exc}") from None
    values: dict[str, Any] = {name: value for name, (value, _) in tuning.items()}
    try:
        knobs = Tuning(**values)
    except ValueError as exc:
        raise ConfigError(f"{display}: {exc}") from None
    return _FileSettings(
        tuning=knobs,
        default_bind_address=extra.get(_KEY_BIND_ADDRESS),
        endpoint_format=extra.get(_KEY_ENDPOINT_FORMAT),
        region_hosts=tuple(
            (key[len(_KEY_REGION_OVERRIDE) :], value)
            for key, value in extra.items()
            if key.startswith(_KEY_REGION_OVERRIDE)
        ),
    )
