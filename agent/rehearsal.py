"""The zygote's rehearsal: one short destination tunnel on loopback before the first fork.

Why: a forked proxy shares the zygote's pages only until it writes to them, and CPython writes to
far more than its own data. The first calls of a function quicken its bytecode in place; the
first TLS connection imports ``encodings.idna`` and fills caches (``re``, ``functools``, enum
lookups, type attribute versions); asyncio, websockets and the tunnel create their lazily built
objects; the first name resolved loads the C library's NSS modules and reads
``/etc/nsswitch.conf`` and ``/etc/hosts`` (a real endpoint is a name, resolved on the event
loop's resolver thread: so is the rehearsal's, ``localhost``). Done in every child, each of
those writes copies a page per child; done once here, before :func:`gc.freeze`, they stay
shared. Measured with the bench's agent scenario (``python -m bench --agent-scale``): about
1 MiB less proportional memory per tunnel, 2.5 MiB when the tunnel endpoint is a name.

How: a forked *stage* process plays the tunnel service (``websockets`` server over TLS with a
throw-away self-signed certificate, or plain ``ws://`` when the ``openssl`` command is missing)
and an echo server; the zygote itself runs ``python -m proxy -m dst`` against it, in process, as
each child will: the service announces one service, opens a stream, sends data, reads it back
echoed, resets the stream and closes the tunnel. Nothing leaves loopback and nothing is logged
(the proxy's stderr goes to ``/dev/null`` meanwhile); the token is random and used once. A
rehearsal that fails or takes more than :data:`TIMEOUT` seconds is stopped and ignored: the
zygote works the same without it, only with more memory per child.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TIMEOUT", "rehearse"]

#: Seconds the rehearsal's proxy may take; it is stopped (SIGTERM) after that. Making the
#: certificate may take half as long again (the agent waits 30 s for the zygote in all).
TIMEOUT = 10.0
#: The one service of the rehearsal tunnel.
SERVICE = "REHEARSAL"
#: Bytes sent through the stream and echoed back: a few tunnel frames' worth.
PAYLOAD = 48 * 1024
#: Where the stage listens.
LOOPBACK = "127.0.0.1"
#: The proxy's ``-v`` for the agent's default log level, INFO (agent.proxy_runner).
VERBOSITY = "4"


def rehearse() -> int:
    """Run the rehearsal tunnel in this process; the proxy's exit code (0: as planned).

    The proxy trusts the stage's certificate through ``-c``: a context of its own, so the
    rehearsal never takes the one :func:`proxy.tls.prebuild` made for the first real child.
    """
    with tempfile.TemporaryDirectory(prefix="iotunnel-rehearsal-") as scratch:
        pair = _certificate(Path(scratch))
        ports_r, ports_w = os.pipe()
        stage = os.fork()
        if stage == 0:
            os.close(ports_r)
            _stage_main(ports_w, pair)
        os.close(ports_w)
        try:
            with os.fdopen(ports_r, "rb") as ports:
                line = ports.readline(100).split()
            if len(line) != 2:
                return 1
            code = _run_proxy(int(line[0]), int(line[1]), pair, Path(scratch))
            if code != 0:
                # A proxy stopped mid-tunnel can leave its connection in a reference cycle:
                # collect it, so that no child inherits its descriptor.
                gc.collect()
            return code
        finally:
            with contextlib.suppress(OSError):
                os.kill(stage, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(stage, 0)


def _certificate(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed P-256 certificate for localhost and 127.0.0.1 and its key; None without
    ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt"]
        command += ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj"]
        command += ["/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        command += ["-keyout", str(key), "-out", str(cert)]
        subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=TIMEOUT / 2,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key


def _run_proxy(port: int, echo_port: int, pair: tuple[Path, Path] | None, scratch: Path) -> int:
    """``python -m proxy -m dst`` against the stage, in this process, silenced and timed, as
    the agent starts a child: the mapping in a ``--config-dir``, journald's log format at the
    verbosity of the agent's default log level (INFO), a status channel."""
    from iotunnel.handshake import ENV_ACCESS_TOKEN
    from iotunnel.logs import ENV_LOG_FORMAT, ENV_LOG_TAG, Output
    from iotunnel.status import ENV_STATUS_FD
    from proxy.cli import main

    mappings = scratch / "destination.d"
    mappings.mkdir()
    (mappings / "rehearsal.ini").write_text(f"{SERVICE} = {LOOPBACK}:{echo_port}\n")
    scheme = "ws" if pair is None else "wss"
    endpoint = f"{scheme}://{_host()}:{port}"
    argv = ["-m", "dst", "--config-dir", str(mappings), "-e", endpoint]
    if pair is not None:
        argv += ["-c", str(pair[0])]
    argv += ["-v", VERBOSITY]
    status_r, status_w = os.pipe2(os.O_NONBLOCK)
    status_pipe = os.fstat(status_w).st_ino
    saved_env = dict(os.environ)
    os.environ[ENV_ACCESS_TOKEN] = secrets.token_urlsafe(32)
    os.environ[ENV_STATUS_FD] = str(status_w)
    os.environ[ENV_LOG_FORMAT] = Output.JOURNAL.value
    os.environ[ENV_LOG_TAG] = "t0"
    saved_stderr = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGALRM, _stop_proxy)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT, 1.0)
    try:
        return main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.environ.clear()
        os.environ.update(saved_env)
        _drain(status_r)
        os.close(status_r)
        # The proxy closes its status channel itself, unless it stopped before it opened it;
        # the number may be another descriptor's by now.
        with contextlib.suppress(OSError):
            if os.fstat(status_w).st_ino == status_pipe:
                os.close(status_w)
        _forget_proxy_state()


def _host() -> str:
    """``localhost`` when it resolves to 127.0.0.1 (where the stage listens), else the address."""
    import socket

    try:
        found = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    except OSError:
        return LOOPBACK
    return "localhost" if any(info[4][0] == LOOPBACK for info in found) else LOOPBACK


def _stop_proxy(signum: int, frame: Any) -> None:
    """SIGALRM: past :data:`TIMEOUT`, ask the proxy to stop as the agent would (SIGTERM), once
    its event loop handles SIGTERM (again each second: the loop may not have started yet)."""
    del signum, frame
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        os.kill(os.getpid(), signal.SIGTERM)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 65536):
            pass


def _forget_proxy_state() -> None:
    """Undo what the rehearsal's proxy left in process-wide state that a child would inherit:
    its log handler (pointing at the closed-over stderr) and its token among the secrets."""
    import logging

    from proxy.logs import RedactingFilter

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    RedactingFilter.secrets.clear()


def _stage_main(ports_w: int, pair: tuple[Path, Path] | None) -> None:
    """The stage process: serve the rehearsal, then exit (never returns)."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_WRONLY)  # the zygote's stderr is the agent's log
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        import asyncio

        code = asyncio.run(_stage(ports_w, pair))
    except BaseException:  # the zygote only sees the proxy's exit code
        code = 1
    finally:
        os._exit(code)


async def _stage(ports_w: int, pair: tuple[Path, Path] | None) -> int:
    import asyncio
    import ssl

    from websockets.asyncio.server import ServerConnection, serve
    from websockets.typing import Subprotocol

    from iotunnel.handshake import V3_SUBPROTOCOL
    from proxy.protocol.framing import Decoder, encode
    from proxy.protocol.messages import Message, MessageType

    done = asyncio.get_running_loop().create_future()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def tunnel(ws: ServerConnection) -> None:
        ids = (SERVICE,)
        await ws.send(encode(Message(MessageType.SERVICE_IDS, available_service_ids=ids)))
        stream = {"stream_id": 1, "service_id": SERVICE, "connection_id": 1}
        await ws.send(encode(Message(MessageType.STREAM_START, **stream)))  # type: ignore[arg-type]
        chunk = bytes(PAYLOAD // 4)
        for _ in range(4):
            message = Message(MessageType.DATA, payload=chunk, **stream)  # type: ignore[arg-type]
            await ws.send(encode(message))
        decoder, echoed = Decoder(), 0
        async for data in ws:
            for message in decoder.feed(data if isinstance(data, bytes) else data.encode()):
                if message.type == MessageType.DATA:
                    echoed += len(message.payload)
            if echoed >= PAYLOAD:
                break
        await ws.send(encode(Message(MessageType.STREAM_RESET, **stream)))  # type: ignore[arg-type]
        await ws.close(1000)
        if not done.done():
            done.set_result(echoed)

    context = None
    if pair is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair[0], pair[1])
    echo_server = await asyncio.start_server(echo, LOOPBACK, 0)
    async with serve(
        tunnel,
        LOOPBACK,
        0,
        ssl=context,
        subprotocols=[Subprotocol(V3_SUBPROTOCOL)],
        compression=None,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        echo_port = next(iter(echo_server.sockets)).getsockname()[1]
        os.write(ports_w, f"{port} {echo_port}\n".encode())
        os.close(ports_w)
        async with asyncio.timeout(TIMEOUT):
            echoed = await done
    echo_server.close()
    return 0 if echoed >= PAYLOAD else 1
