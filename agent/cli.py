"""The ``iotunnel-agent`` command (also ``python -m agent``).

Exit codes: 0 after SIGTERM/SIGINT (every proxy child stopped first), 1 for an internal error,
2 for a bad setting (one line on stderr naming the key, never a traceback).

``iotunnel-agent status [--json] [--config FILE ...]`` shows the running agent's tunnels from
the status file in its ``state_dir`` (:mod:`agent.report`): exit 0 when it runs, 3 when it does
not, 4 when its status file cannot be read, 2 for a bad setting.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.config import (
    PROG,
    CheckOnly,
    CliExit,
    check_tls_files,
    load,
    load_status,
    state_dir_problem,
    summary,
)
from agent.launcher import fork_zygote
from agent.logs import choose_output, configure
from agent.report import status_command
from agent.systemd import Notifier
from iotunnel.cli import fail
from iotunnel.errors import ConfigError
from iotunnel.exits import ExitCode
from iotunnel.journal import ENV_SOCKET

#: A proxy password shorter than this is not redacted from log lines: it would garble them.
_MIN_REDACTED = 8

log = logging.getLogger("agent")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the settings and run the agent.

    Args:
        argv: The arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The process exit code.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["status"]:
        return status(args[1:])
    # systemd's variables leave the environment here, before anything could start a child.
    notifier = Notifier.from_environ(os.environ)
    environ = dict(os.environ)
    try:
        loaded = load(args, environ, Path.cwd())
        if not isinstance(loaded, CliExit):
            check_tls_files(loaded.settings if isinstance(loaded, CheckOnly) else loaded)
    except ConfigError as exc:
        notifier.close()
        return fail(PROG, exc)
    if isinstance(loaded, CliExit):
        sys.stdout.write(loaded.output)
        notifier.close()
        return loaded.code
    settings = loaded.settings if isinstance(loaded, CheckOnly) else loaded
    zygote = None
    if not isinstance(loaded, CheckOnly) and settings.launcher == "fork":
        # Here, before awscrt: see fork_zygote.
        zygote = fork_zygote(environ, settings.tunnel_ca, close=(notifier,))
    # Imported late: --help, --version and bad settings never load awscrt.
    from agent.daemon import run
    from agent.mqtt import tls_problem

    problem = tls_problem(settings)
    if problem is None and isinstance(loaded, CheckOnly):
        problem = state_dir_problem(settings.state_dir)
    if problem is not None:
        if zygote is not None:
            zygote.discard()
        notifier.close()
        return fail(PROG, problem)
    if isinstance(loaded, CheckOnly):
        sys.stdout.write(summary(settings))
        notifier.close()
        return 0
    output = choose_output(environ, sys.stderr)
    redactor = configure(
        settings.log_level, sys.stderr, output, socket_path=environ.get(ENV_SOCKET) or None
    )
    password = settings.https_proxy and settings.https_proxy.password
    if password and len(password.reveal()) >= _MIN_REDACTED:
        redactor.add(password.reveal())  # the last line of defence: nothing logs it
    if password and settings.https_proxy and settings.https_proxy.origin == "--https-proxy":
        log.warning(
            "--https-proxy holds a password, and any user can read a command line: "
            "use https_proxy in agent.ini or HTTPS_PROXY instead"
        )
    log.info(
        "%s starting: thing %s, mappings in %s", PROG, settings.thing_name, settings.mapping_dir
    )
    try:
        return run(settings, notifier, environ, redactor, output, zygote)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over SIGINT
        return ExitCode.INTERRUPTED
    except Exception:
        log.exception("internal error")
        return ExitCode.INTERNAL
    finally:
        if zygote is not None:  # the launcher stopped it, unless the agent never started it
            zygote.discard()


def status(argv: Sequence[str]) -> int:
    """``iotunnel-agent status``; see the module docstring."""
    try:
        loaded = load_status(argv, os.environ, Path.cwd())
    except ConfigError as exc:
        return fail(f"{PROG} status", exc)
    if isinstance(loaded, CliExit):
        sys.stdout.write(loaded.output)
        return loaded.code
    return status_command(loaded.state_dir, as_json=loaded.json, out=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
