"""Which end of a tunnel: the proxy's ``-s``/``-d``, the protocol session's role, the service's
``local-proxy-mode`` and the notification's ``clientMode``. Pure."""

from __future__ import annotations

import enum

__all__ = ["Mode"]


class Mode(enum.StrEnum):
    """Which end of the tunnel a proxy (or a session, or a client of the service) is."""

    SOURCE = "source"  #: listens on local ports and opens streams; the operator's end
    DESTINATION = "destination"  #: connects to local services when streams open; the device's end

    @property
    def other(self) -> Mode:
        """The opposite end."""
        return Mode.DESTINATION if self is Mode.SOURCE else Mode.SOURCE
