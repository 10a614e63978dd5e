"""One JSON reader for everything that comes from outside: bounded in size and in depth.

``json.loads`` recurses once per nesting level, so a small document of nested brackets
(``"[" * 100_000``) raises ``RecursionError`` deep inside the parser, and a huge one costs
memory before any check runs. Every place that parses JSON it did not write itself (MQTT
notifications, ``--settings-json``, the service's ``--tunnels`` file, management API bodies)
reads it through :func:`loads`, which refuses both before parsing and fails with one
:class:`JSONInputError` whose text never quotes the input (it may hold a token).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_DEPTH", "JSONInputError", "loads"]

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_DEPTH = 32

# A JSON string (skipped whole, so brackets inside it do not count) or one bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JSONInputError(ValueError):
    """JSON from outside that is too large, too deep or not JSON; the text names no content."""


def _parse_int(digits: str) -> int:
    """``int``, but an integer over Python's digit limit is a JSONInputError (``int`` raises a
    plain ValueError, which ``json.loads`` lets through)."""
    limit = sys.get_int_max_str_digits()
    if limit and len(digits) - digits.startswith("-") > limit:
        raise JSONInputError(f"not valid JSON: a number of more than {limit} digits")
    return int(digits)


def loads(
    data: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """Parse ``data`` (UTF-8 bytes or text) with limits; raises :class:`JSONInputError`."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > max_bytes:
        raise JSONInputError(f"too large: {size} bytes, at most {max_bytes}")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"not UTF-8 (byte {exc.start})") from None
    else:
        text = data
    depth = deepest = 0
    for match in _TOKENS.finditer(text):
        piece = match.group()
        if piece in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    raise JSONInputError(f"nested more than {max_depth} levels deep")
        elif piece in "]}":
            depth -= 1
    try:
        return json.loads(
            text,
            object_pairs_hook=object_pairs_hook,
            parse_constant=parse_constant,
            parse_int=_parse_int,
        )
    except json.JSONDecodeError as exc:
        # exc.msg and the position only: never the document, which may hold a secret.
        raise JSONInputError(
            f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:  # pragma: no cover - the depth scan refuses these first
        raise JSONInputError(f"nested more than {max_depth} levels deep") from None
