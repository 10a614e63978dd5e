"""What a failed MQTT connection means, in words: awscrt gives an error name only.

:func:`explain` turns the name into one line that says what to check:

- ``AWS_ERROR_HTTP_PROXY_CONNECT_FAILED``: the HTTP proxy answered the CONNECT with anything
  but 2xx (awscrt does not say which status): a wrong user or password, or a port the proxy
  does not allow;
- a socket or name lookup error with a proxy: the agent's own connection is to the proxy (the
  proxy looks the broker up and connects to it), so the proxy is what cannot be reached;
- a TLS failure while the system clock is outside the device certificate's validity (or that of
  every CA in ``root_ca``): a device without a real-time clock that boots in the past sees the
  broker's certificate as not yet valid, and the TLS library only says the handshake failed.
  The device certificate was issued before it was installed, so a clock before its start is
  certainly wrong. The agent keeps retrying: once NTP has set the clock, the next attempt
  connects.

Nothing here quotes a setting that may hold a secret (the proxy URL's password).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from pathlib import Path

from agent.config import AgentSettings

__all__ = ["PROXY_REFUSED", "clock_problem", "explain", "validity"]

#: awscrt's error when the proxy answers a CONNECT with anything but 2xx.
PROXY_REFUSED = "AWS_ERROR_HTTP_PROXY_CONNECT_FAILED"
#: awscrt's errors of a socket or a name lookup: the proxy's, when there is one.
_NETWORK_ERRORS = ("AWS_IO_SOCKET_", "AWS_IO_DNS_")


def explain(reason: str, settings: AgentSettings, now: float | None = None) -> str:
    """``reason`` (an awscrt error name), with what it most likely means appended.

    Args:
        reason: The error name of a failed connection attempt.
        settings: The agent's settings (the proxy, the certificate files).
        now: The time to judge the certificates by (default: the system clock).
    """
    proxy = settings.mqtt_proxy
    if reason == PROXY_REFUSED and proxy is not None:
        return (
            f"the HTTP proxy {proxy} refused to open a tunnel to {settings.endpoint}:"
            f"{settings.port} ({reason}): check the user and password of https_proxy "
            f"({proxy.origin}), and that the proxy allows CONNECT to port {settings.port}"
        )
    if proxy is not None and reason.startswith(_NETWORK_ERRORS):
        # Through a CONNECT tunnel the agent's own socket (and name lookup) is the proxy's.
        return (
            f"cannot reach the HTTP proxy {proxy} ({reason}): check https_proxy "
            f"({proxy.origin}), and that the proxy runs"
        )
    if "TLS" in reason:
        problem = clock_problem(settings, time.time() if now is None else now)
        if problem is not None:
            return f"{reason}: {problem}"
    return reason


def clock_problem(settings: AgentSettings, now: float) -> str | None:
    """Why the clock ``now`` makes TLS fail, if it is outside the device certificate's validity
    or that of every CA certificate in the ``root_ca`` file; else ``None``."""
    clock = _when(now)
    span = validity(settings.cert)
    if span is not None:
        start, end = span
        if now < start:
            return (
                f"the system clock ({clock}) is before the device certificate's start "
                f"({_when(start)}), so the broker's certificate is not yet valid either: "
                "check the system clock (NTP)"
            )
        if now > end:
            return (
                f"the device certificate expired on {_when(end)} (the system clock says "
                f"{clock}): renew it, or check the system clock (NTP)"
            )
    spans = _ca_validities(settings.root_ca)
    if spans and all(now < start for start, _ in spans):
        return (
            f"the system clock ({clock}) is before the start of every certificate in root_ca "
            f"(the earliest: {_when(min(s for s, _ in spans))}), so the broker's certificate is "
            "not yet valid: check the system clock (NTP)"
        )
    if spans and all(now > end for _, end in spans):
        return (
            f"every certificate in root_ca has expired (the system clock says {clock}): update "
            "root_ca, or check the system clock (NTP)"
        )
    return None


def validity(path: Path) -> tuple[float, float] | None:
    """``(notBefore, notAfter)`` of the first certificate in the PEM file ``path``, in seconds
    since the epoch; ``None`` when it cannot be read.

    The standard library has no public API to decode a certificate that is not a CA's: this
    uses the decoder behind :meth:`ssl.SSLSocket.getpeercert` (``_ssl._test_decode_cert``), and
    gives up quietly if a Python lacks it: the check is a diagnosis, not a safeguard.
    """
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return None
    try:
        decoded = decode(str(path))
        return (
            float(ssl.cert_time_to_seconds(decoded["notBefore"])),
            float(ssl.cert_time_to_seconds(decoded["notAfter"])),
        )
    except (OSError, ValueError, KeyError, TypeError, ssl.SSLError):
        return None


def _ca_validities(root_ca: Path | None) -> list[tuple[float, float]]:
    """``(notBefore, notAfter)`` of every CA certificate in the ``root_ca`` file (not a
    directory: its certificates are looked up by hash, one at a time)."""
    if root_ca is None or root_ca.is_dir():
        return []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    spans = []
    with contextlib.suppress(OSError, ValueError, ssl.SSLError):
        context.load_verify_locations(cafile=str(root_ca))
        for cert in context.get_ca_certs():
            with contextlib.suppress(KeyError, ValueError, TypeError):
                spans.append(
                    (
                        float(ssl.cert_time_to_seconds(str(cert["notBefore"]))),
                        float(ssl.cert_time_to_seconds(str(cert["notAfter"]))),
                    )
                )
    return spans


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
