"""Which service gets which local endpoint: the mapping policy, without I/O.

Given the configured mappings (``-s``/``-d`` and mapping files), the role and what the tunnel
announced (its service IDs, or ``None`` on a V1 tunnel, which announces none), a *plan* says
which service IDs get which local endpoint, which mappings go unused, how many announced IDs
are ignored, and which configuration error (if any) stops the proxy. ``proxy.io.tunnel``
carries the plan out.

Rules:

* The unnamed mapping (``-s 5555``, ``-d 22``; service ID ``""``) serves a tunnel with one
  service under that service's ID, and a tunnel that announces no service (an empty list, or
  none at all on V1) as the unnamed V1 stream. A tunnel with two or more services needs named
  mappings: a configuration error.
* A named mapping serves the announced service of that name; one naming a service the tunnel
  does not have is unused (a warning). On a V1 tunnel a single named mapping serves the
  unnamed stream; more than one is a configuration error (V1 carries one service).
* A source listens on a free port for each announced service without a mapping; a destination
  without a mapping for an announced service fails with a configuration error.
* At most :data:`MAX_SERVICES` announced services are used (AWS allows 3 per tunnel): the
  mapped ones, then the first unmapped ones in announced order. The rest are ignored with one
  warning, so that a hostile service announcing thousands of IDs makes a source open at most
  a few listeners and a destination fail (or warn) with one line, not thousands. Duplicate IDs
  count once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config import Endpoint, ServiceMapping

#: Announced services used per tunnel, beyond the configured mappings (AWS allows 3 services
#: per tunnel). A fixed limit, not a tuning value: no real tunnel needs more.
MAX_SERVICES = 3

#: Service IDs named in one message at most; the rest are counted.
_NAMED_IN_MESSAGES = 3

#: A source listener on a free port (``-b`` or localhost).
FREE_PORT = Endpoint(host=None, port=0)


@dataclass(frozen=True, slots=True)
class Binding:
    """One service and its local endpoint.

    Attributes:
        service_id: The service ID streams carry (``""``: the unnamed V1 stream).
        mapping_id: The configured mapping serving it (``""`` for the unnamed mapping), or
            ``None`` for a source's free-port listener.
        endpoint: Where to listen (source) or connect (destination).
    """

    service_id: str
    mapping_id: str | None
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with an announcement (see the module's rules).

    Attributes:
        bindings: The services to serve, in announced order.
        unused: Configured mapping IDs that serve nothing (one warning each).
        ignored: Announced service IDs left out by the :data:`MAX_SERVICES` cap.
        error: A configuration error that stops the proxy, or ``None``.
    """

    bindings: tuple[Binding, ...] = ()
    unused: tuple[str, ...] = ()
    ignored: int = 0
    error: str | None = None

    def endpoint_for(self, service_id: str) -> Endpoint | None:
        """The endpoint of ``service_id``, or ``None`` if the plan does not serve it.

        A V1 stream (no service ID) on a tunnel with one service is that service's.
        """
        for binding in self.bindings:
            if binding.service_id == service_id:
                return binding.endpoint
        if not service_id and len(self.bindings) == 1:
            return self.bindings[0].endpoint
        return None


def names(ids: Sequence[str]) -> str:
    """``ids`` for a message: the first few, then how many more."""
    shown = ", ".join(ids[:_NAMED_IN_MESSAGES])
    more = len(ids) - _NAMED_IN_MESSAGES
    return f"{shown} and {more} more" if more > 0 else shown


def plan_source(mappings: Sequence[ServiceMapping], ids: Sequence[str] | None) -> Plan:
    """A source's listeners for a tunnel announcing ``ids`` (``None``: a V1 tunnel)."""
    return _plan(mappings, ids, flag="-s", free_ports=True)


def plan_destination(mappings: Sequence[ServiceMapping], ids: Sequence[str] | None) -> Plan:
    """A destination's endpoints for a tunnel announcing ``ids`` (``None``: a V1 tunnel)."""
    return _plan(mappings, ids, flag="-d", free_ports=False)


def _plan(
    mappings: Sequence[ServiceMapping], ids: Sequence[str] | None, *, flag: str, free_ports: bool
) -> Plan:
    mapped = {m.service_id: m.endpoint for m in mappings}
    if ids is None:
        return _plan_v1(mapped, flag=flag, free_ports=free_ports)
    announced = list(dict.fromkeys(ids))
    if "" in mapped:
        if len(announced) > 1:
            return Plan(
                error=f"{flag}: an unnamed mapping needs a tunnel with one service; this one "
                f"has {len(announced)}: {names(announced)}: name them, e.g. "
                f"{flag} {announced[0]}=PORT"
            )
        service_id = announced[0] if announced else ""
        return Plan(bindings=(Binding(service_id, "", mapped[""]),))
    kept = [sid for sid in announced if sid in mapped]
    unmapped = [sid for sid in announced if sid not in mapped]
    room = max(0, MAX_SERVICES - len(kept))
    taken, ignored = unmapped[:room], len(unmapped) - min(room, len(unmapped))
    present = frozenset(announced)
    unused = tuple(sid for sid in mapped if sid not in present)
    if taken and not free_ports:
        return Plan(
            unused=unused,
            ignored=ignored,
            error=f"no destination mapping for service {names(taken)} announced by the "
            f"tunnel: add -d {taken[0]}=PORT or a line '{taken[0]} = PORT' to the config "
            f"directory",
        )
    chosen = set(kept) | set(taken)
    bindings = tuple(
        Binding(sid, sid, mapped[sid]) if sid in mapped else Binding(sid, None, FREE_PORT)
        for sid in announced
        if sid in chosen
    )
    return Plan(bindings=bindings, unused=unused, ignored=ignored)


def _plan_v1(mapped: dict[str, Endpoint], *, flag: str, free_ports: bool) -> Plan:
    """A V1 tunnel has one unnamed stream."""
    if len(mapped) > 1:
        return Plan(
            error=f"{flag}: a V1 tunnel carries one service, and {len(mapped)} are mapped "
            f"({names(sorted(mapped))}): give one mapping"
        )
    if mapped:
        ((mapping_id, endpoint),) = mapped.items()
        return Plan(bindings=(Binding("", mapping_id, endpoint),))
    if free_ports:
        return Plan(bindings=(Binding("", None, FREE_PORT),))
    return Plan()


def destination_endpoint(
    mappings: Sequence[ServiceMapping], plan: Plan | None, service_id: str
) -> Endpoint | None:
    """Where a destination connects a stream of ``service_id`` (``None``: refuse it).

    Before the tunnel announced its services (``plan`` is None) the mappings are used as
    they are: the one named ``service_id``, else a single mapping for an unnamed mapping or
    an unnamed (V1) stream.
    """
    if plan is not None:
        return plan.endpoint_for(service_id)
    mapped = {m.service_id: m.endpoint for m in mappings}
    if service_id in mapped:
        return mapped[service_id]
    if len(mapped) == 1 and ("" in mapped or not service_id):
        return next(iter(mapped.values()))
    return None
