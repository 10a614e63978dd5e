"""The TLS file checks of ``--check`` and every start: certificate, key and CA files."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from agent.config.model import AgentSettings
from iotunnel.errors import ConfigError

#: More than this is not a certificate, key or CA bundle file (a system bundle is ~200 KiB).
_MAX_PEM = 16 * 1024 * 1024


class _Encrypted(Exception):
    """The key asked for a passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def _read_all(name: str, path: Path) -> bytes:
    """The file's bytes (up to :data:`_MAX_PEM` and one more); a directory is listed instead."""
    try:
        if path.is_dir():
            os.listdir(path)
            return b""
        with path.open("rb") as file:
            return file.read(_MAX_PEM + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: {path}: cannot read: {exc.strerror or exc}") from None


def _certificates(name: str, path: Path) -> None:
    """``path`` holds at least one PEM certificate (or is a readable directory of them)."""
    data = _read_all(name, path)
    if path.is_dir():
        return
    if len(data) > _MAX_PEM:
        raise ConfigError(f"{name}: {path}: larger than {_MAX_PEM >> 20} MiB: not a PEM file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError):
        raise ConfigError(f"{name}: {path}: no PEM certificate in it") from None


def check_tls_files(settings: AgentSettings) -> None:
    """Read and parse the certificate, key and CA files, as ``--check`` and every start do.

    Each must be readable and hold PEM of its kind: certificates for ``cert``, ``root_ca`` and
    ``tunnel_ca`` (or a readable directory for the CAs), an unencrypted private key that belongs
    to the certificate for ``key``. The message names the setting and the file, never what the
    file holds.

    Raises:
        ConfigError: One line, e.g. ``root_ca: /etc/iotunnel/ca.pem: cannot read: Permission
            denied``.
    """
    _certificates("cert", settings.cert)
    if settings.key is not None:
        _key_file(settings.cert, settings.key)
    if settings.root_ca is not None:
        _certificates("root_ca", settings.root_ca)
    if settings.tunnel_ca is not None:
        _certificates("tunnel_ca", settings.tunnel_ca)


def _key_file(cert: Path, key: Path) -> None:
    """``key`` is an unencrypted PEM private key, ``cert``'s."""
    data = _read_all("key", key)
    if b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"key: {key}: no PEM private key in it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            f"key: {key}: encrypted with a passphrase, which the agent cannot ask for"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"cert, key: {cert} is not the certificate of {key}") from None
        raise ConfigError(f"key: {key}: not a usable PEM private key") from None
    except OSError as exc:
        raise ConfigError(f"cert, key: cannot read: {exc.strerror or exc}") from None
