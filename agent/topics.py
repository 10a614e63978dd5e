"""MQTT topic names of Secure Tunneling, and the rules for the names that go into them."""

from __future__ import annotations

import re

__all__ = ["THING_NAME_RE", "notify_topic"]

#: An AWS IoT thing name (CreateThing's pattern): it never holds an MQTT wildcard or a ``/``.
THING_NAME_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")


def notify_topic(thing_name: str) -> str:
    """The topic AWS IoT publishes a thing's tunnel notifications on.

    Raises:
        ValueError: ``thing_name`` is not a valid thing name.
    """
    if not THING_NAME_RE.fullmatch(thing_name):
        raise ValueError(f"not a thing name: {thing_name!r}")
    return f"$aws/things/{thing_name}/tunnels/notify"
