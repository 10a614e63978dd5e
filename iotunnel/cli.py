"""The command-line parser base of the three commands: errors are one line, and exit 2."""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from iotunnel.errors import ConfigError
from iotunnel.exits import ExitCode

__all__ = ["Parser", "UsageError", "fail"]


class UsageError(ConfigError):
    """A bad command line: a :class:`~iotunnel.errors.ConfigError`, so exit 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line :class:`UsageError`\\ s that echo no value.

    argparse's own "ignored explicit argument 'VALUE'" (a value glued to a switch) becomes
    "takes no value": the value may be a token.
    """

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"ignored explicit argument .*", "takes no value", message)
        raise UsageError(" ".join(message.split()))


def fail(prog: str, problem: object) -> ExitCode:
    """Write ``PROG: error: PROBLEM`` (one line) to stderr; return :attr:`ExitCode.CONFIG`."""
    print(f"{prog}: error: {problem}", file=sys.stderr)
    return ExitCode.CONFIG
