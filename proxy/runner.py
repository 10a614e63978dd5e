"""Run the proxy for validated settings: logging, signals, the event loop; returns the exit code.

Exit codes: 0 the service closed the tunnel; 1 an unexpected internal error; 2 a usage or
configuration error; 3 the service refused the handshake (bad, used or expired token: not
retried); 4 gave up reaching the service; 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from iotunnel.exits import ExitCode
from iotunnel.status import Exited, StatusWriter
from proxy.config import ProxySettings
from proxy.io.memory import tune_allocator
from proxy.io.tunnel import Tunnel
from proxy.logs import configure, register_secrets

log = logging.getLogger("proxy")

_SIGNAL_EXIT = {signal.SIGINT: ExitCode.INTERRUPTED, signal.SIGTERM: ExitCode.TERMINATED}


def run(settings: ProxySettings) -> int:
    """Run a proxy until its tunnel ends."""
    secrets = [settings.access_token.reveal()]
    if settings.client_token is not None:
        secrets.append(settings.client_token.reveal())
    register_secrets(secrets)
    log_problem = configure(settings.verbosity, environ=os.environ)
    if log_problem is not None:
        log.warning("%s", log_problem)
    if settings.access_token_from_argv:
        log.warning(
            "the access token was given with -t: other users can read a command line; "
            "prefer the AWSIOT_TUNNEL_ACCESS_TOKEN environment variable"
        )
    if settings.skipped_config_dir is not None:
        log.warning("%s", settings.skipped_config_dir)
    if not settings.verify_host:
        log.warning(
            "TLS certificate verification is OFF (-k): the tunnel service is not authenticated "
            "and anyone on the network path can read the access token and the traffic; "
            "use -k for development and testing only"
        )
    status, problem = StatusWriter.from_environ(os.environ)
    if problem is not None:
        log.warning("%s", problem)
    tune_allocator()
    why: list[str] = []
    try:
        code = _event_loop_runner()(_main(settings, status, why))
    except Exception:
        log.exception("internal error")
        code, why[:] = ExitCode.INTERNAL, ["internal error"]
    status.emit(Exited(code, why[0] if why else f"exit code {code}"))
    status.close()
    return code


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """asyncio's loop, or uvloop with ``IOTUNNEL_EVENT_LOOP=uvloop`` (the ``speed`` extra).

    uvloop moves more bytes per CPU second (bench/RESULTS.md) but connects destinations
    without Happy Eyeballs, so it is opt-in.
    """
    if os.environ.get("IOTUNNEL_EVENT_LOOP") == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("IOTUNNEL_EVENT_LOOP=uvloop, but uvloop is not installed")
        else:
            return uvloop.run
    return asyncio.run


async def _main(settings: ProxySettings, status: StatusWriter, why: list[str]) -> int:
    """Run the tunnel; appends to ``why`` the reason it ended."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if not received:
            log.info("received %s; closing the tunnel", sig.name)
            received.append(sig)
            task.cancel()

    for sig in _SIGNAL_EXIT:
        loop.add_signal_handler(sig, on_signal, sig)
    log.info(
        "starting in %s mode (event loop: %s)", settings.mode.value, type(loop).__module__
    )
    tunnel = Tunnel(settings, status)
    try:
        code = await tunnel.run()
        why.append(tunnel.exit_reason)
        return code
    except asyncio.CancelledError:
        if received:
            why.append(f"received {received[0].name}")
            return _SIGNAL_EXIT[received[0]]
        raise
    finally:
        for sig in _SIGNAL_EXIT:
            loop.remove_signal_handler(sig)
