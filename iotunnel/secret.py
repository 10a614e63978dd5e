"""A token that must not be shown: access tokens, client tokens."""

from __future__ import annotations

import hmac
from typing import NoReturn

__all__ = ["Secret"]


class Secret:
    """A token that must not be shown: ``repr()``, ``str()`` and formatting give ``[secure]``.

    Only :meth:`reveal` returns the value; call it where the WebSocket header is built.
    Equality compares the values in constant time; secrets are immutable and hashable.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """Return the secret value."""
        return self._value

    def __repr__(self) -> str:
        return "[secure]"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        # copy, deepcopy (and so dataclasses.asdict) and pickle rebuild through __init__.
        return Secret, (self._value,)
