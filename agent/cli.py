"""The ``iotunnel-agent`` command (also ``python -m agent``).

Exit codes: 0 after SIGTERM/SIGINT (every proxy child stopped first), 1 for an internal error,
2 for a bad setting (one line on stderr naming the key, never a traceback).
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
    state_dir_problem,
    summary,
)
from agent.logs import configure
from agent.systemd import Notifier
from iotunnel.cli import fail
from iotunnel.errors import ConfigError
from iotunnel.exits import ExitCode

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
    # systemd's variables leave the environment here, before anything could start a child.
    notifier = Notifier.from_environ(os.environ)
    environ = dict(os.environ)
    try:
        loaded = load(sys.argv[1:] if argv is None else argv, environ, Path.cwd())
        if not isinstance(loaded, CliExit):
            check_tls_files(loaded.settings if isinstance(loaded, CheckOnly) else loaded)
    except ConfigError as exc:
        notifier.close()
        return fail(PROG, exc)
    if isinstance(loaded, CliExit):
        sys.stdout.write(loaded.output)
        notifier.close()
        return loaded.code
    # Imported late: --help, --version and bad settings never load awscrt.
    from agent.daemon import run
    from agent.mqtt import tls_problem

    settings = loaded.settings if isinstance(loaded, CheckOnly) else loaded
    problem = tls_problem(settings)
    if problem is None and isinstance(loaded, CheckOnly):
        problem = state_dir_problem(settings.state_dir)
    if problem is not None:
        notifier.close()
        return fail(PROG, problem)
    if isinstance(loaded, CheckOnly):
        sys.stdout.write(summary(settings))
        notifier.close()
        return 0
    redactor = configure(settings.log_level, sys.stderr, journal=not sys.stderr.isatty())
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
        return run(settings, notifier, environ, redactor)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over SIGINT
        return ExitCode.INTERRUPTED
    except Exception:
        log.exception("internal error")
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
