"""The ``iotunnel-proxy`` command (also ``python -m proxy``).

Exit codes: 2 for a configuration error (one line on stderr), 130 after Ctrl-C, otherwise what the
runner returns (0 when the tunnel closed normally).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from iotunnel.cli import fail
from iotunnel.errors import ConfigError
from iotunnel.exits import ExitCode
from proxy.config import PROG, CliExit, load


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the configuration and run the proxy.

    Args:
        argv: The arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The process exit code.
    """
    try:
        loaded = load(sys.argv[1:] if argv is None else argv, os.environ, Path.cwd())
        if isinstance(loaded, CliExit):
            if loaded.output:
                stream = sys.stdout if loaded.code == 0 else sys.stderr
                stream.write(loaded.output)
            return loaded.code
        # Imported late: --help, --version and config errors never load the I/O stack.
        from proxy.runner import run

        return run(loaded)
    except ConfigError as exc:
        return fail(PROG, exc)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
