"""The device key in a PKCS#11 token: ``pkcs11_*`` settings -> :class:`Pkcs11Key`, the PIN
read from its file."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.config.converters import _readable_file
from agent.config.keys import ENV_CREDENTIALS, PIN_CREDENTIAL, _fail, _Given
from iotunnel.errors import ConfigError
from iotunnel.secret import Secret

#: A PIN file larger than this is not a PIN file.
_MAX_PIN_FILE = 1024

_SLOT_RE = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+")


@dataclass(frozen=True, slots=True)
class Pkcs11Key:
    """The device key as an object in a PKCS#11 token (a TPM, an HSM, SoftHSM).

    Attributes:
        lib: The token's PKCS#11 library (module), loaded into the agent.
        token_label: The token's label, or ``None`` when :attr:`slot` picks the token.
        slot: The id of the token's slot, or ``None`` when :attr:`token_label` picks it.
        key_label: The label of the private key object.
        pin_file: Where the user PIN was read from.
        pin: The user PIN; only the MQTT client and ``--check`` reveal it, to awscrt.
    """

    lib: Path
    token_label: str | None
    slot: int | None
    key_label: str
    pin_file: Path
    pin: Secret

    def describe(self) -> str:
        """The token and key, for messages: never the PIN."""
        token = f"token {self.token_label!r}" if self.slot is None else f"slot {self.slot}"
        return f"key {self.key_label!r} in PKCS#11 {token} ({self.lib})"


def _label(limit: int) -> Callable[[_Given], str]:
    """A PKCS#11 label: printable text of at most ``limit`` bytes in UTF-8."""

    def convert(given: _Given) -> str:
        text = given.value.strip()
        if not text.isprintable() or len(text.encode()) > limit:
            _fail(given, f"a label is 1..{limit} bytes of printable text")
        return text

    return convert


def _slot(given: _Given) -> int:
    text = given.value.strip()
    if not _SLOT_RE.fullmatch(text) or int(text, 0 if text[:2].lower() == "0x" else 10) >> 64:
        _fail(given, "a slot id is a number 0..2^64-1 (decimal, or hexadecimal with 0x)")
    return int(text, 0 if text[:2].lower() == "0x" else 10)


def _pin_file(given: _Given) -> tuple[Path, Secret]:
    """The PIN file's path and the PIN in it (one line; the line end is not part of it).

    Messages name the file, never what it holds.
    """
    path = _readable_file(given)
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_PIN_FILE + 1)
    except OSError as exc:
        _fail(given, f"cannot read: {exc.strerror or exc}")
    if len(data) > _MAX_PIN_FILE:
        _fail(given, f"larger than {_MAX_PIN_FILE} bytes: not a PIN file")
    text = data.decode(errors="replace")
    if "\ufffd" in text:  # raised inside an except block, the message would chain the bytes
        _fail(given, "not UTF-8 text: not a PIN file")
    pin = text.removesuffix("\n").removesuffix("\r")
    if not pin:
        _fail(given, "empty: the token's user PIN belongs in it")
    if "\n" in pin or "\r" in pin:
        _fail(given, "more than one line: only the token's user PIN belongs in it")
    return path, Secret(pin)


#: The keys that only mean something with ``pkcs11_lib``.
_PKCS11_KEYS = ("pkcs11_token_label", "pkcs11_slot", "pkcs11_key_label", "pkcs11_pin_file")


def _pkcs11_key(
    lib: _Given,
    given: Callable[[str], _Given | None],
    environ: Mapping[str, str],
    base: Path,
) -> Pkcs11Key:
    """The PKCS#11 settings, ``pkcs11_lib`` given; the PIN read from its file."""
    key = given("key")
    if key is not None:
        raise ConfigError(
            f"key and pkcs11_lib are both set ({key.origin}; {lib.origin}): the device key is "
            "either a PEM file or in a PKCS#11 token: unset one"
        )
    library = _readable_file(lib)
    label, slot = given("pkcs11_token_label"), given("pkcs11_slot")
    if label is not None and slot is not None:
        raise ConfigError(
            f"pkcs11_token_label and pkcs11_slot are both set ({label.origin}; {slot.origin}): "
            "set one of them"
        )
    if label is None and slot is None:
        raise ConfigError(
            "pkcs11_lib is set but neither pkcs11_token_label nor pkcs11_slot: set one of them"
        )
    key_label = given("pkcs11_key_label")
    if key_label is None:
        raise ConfigError(
            "pkcs11_lib is set but pkcs11_key_label is not: set the label of the private key"
        )
    pin = given("pkcs11_pin_file")
    credentials = environ.get(ENV_CREDENTIALS, "").strip()
    if pin is None and credentials:
        pin = _Given(
            os.path.join(credentials, PIN_CREDENTIAL),
            f"pkcs11_pin_file (default: ${ENV_CREDENTIALS}/{PIN_CREDENTIAL})",
            base,
        )
    if pin is None:
        raise ConfigError(
            "pkcs11_lib is set but pkcs11_pin_file is not: name the file that holds the token's "
            f"user PIN, or hand it over as the systemd credential {PIN_CREDENTIAL} "
            f"(LoadCredential={PIN_CREDENTIAL}:FILE)"
        )
    pin_file, secret = _pin_file(pin)
    return Pkcs11Key(
        lib=library,
        token_label=None if label is None else _label(32)(label),
        slot=None if slot is None else _slot(slot),
        key_label=_label(255)(key_label),
        pin_file=pin_file,
        pin=secret,
    )
