"""The mapping policy (proxy/mapping.py): every rule, for both roles."""

from __future__ import annotations

import pytest

from proxy.config import Endpoint, ServiceMapping
from proxy.mapping import (
    FREE_PORT,
    MAX_SERVICES,
    Binding,
    Plan,
    destination_endpoint,
    names,
    plan_destination,
    plan_source,
)

E22, E80, E5555 = Endpoint(None, 22), Endpoint(None, 80), Endpoint(None, 5555)
SOCK = Endpoint(None, None, "/run/app.sock")


def m(service_id: str, endpoint: Endpoint) -> ServiceMapping:
    return ServiceMapping(service_id, endpoint)


def served(plan: Plan) -> dict[str, tuple[str | None, Endpoint]]:
    assert plan.error is None, plan.error
    return {b.service_id: (b.mapping_id, b.endpoint) for b in plan.bindings}


# ---------------------------------------------------------------------- the unnamed mapping


class TestUnnamed:
    @pytest.mark.parametrize("plan", [plan_source, plan_destination])
    def test_one_service_takes_its_name(self, plan) -> None:
        assert served(plan([m("", E5555)], ("SSH1",))) == {"SSH1": ("", E5555)}

    @pytest.mark.parametrize("plan", [plan_source, plan_destination])
    def test_empty_list_is_the_unnamed_v1_stream(self, plan) -> None:
        """Regression: an empty SERVICE_IDS list crashed the source with IndexError."""
        result = plan([m("", E5555)], ())
        assert served(result) == {"": ("", E5555)}
        assert result.unused == ()
        assert result.ignored == 0

    @pytest.mark.parametrize("plan", [plan_source, plan_destination])
    def test_v1_tunnel(self, plan) -> None:
        assert served(plan([m("", E22)], None)) == {"": ("", E22)}

    @pytest.mark.parametrize(("plan", "flag"), [(plan_source, "-s"), (plan_destination, "-d")])
    def test_two_services_need_names(self, plan, flag: str) -> None:
        result = plan([m("", E22)], ("SSH1", "HTTP1"))
        assert result.bindings == ()
        assert result.error == (
            f"{flag}: an unnamed mapping needs a tunnel with one service; this one has 2: "
            f"SSH1, HTTP1: name them, e.g. {flag} SSH1=PORT"
        )

    def test_a_storm_of_ids_gives_a_short_error(self) -> None:
        ids = tuple(f"S{i}" for i in range(5000))
        error = plan_source([m("", E22)], ids).error
        assert error is not None
        assert "has 5000: S0, S1, S2 and 4997 more" in error
        assert len(error) < 200

    def test_duplicates_count_once(self) -> None:
        assert served(plan_source([m("", E22)], ("SSH1", "SSH1"))) == {"SSH1": ("", E22)}


# ---------------------------------------------------------------------- named mappings


class TestNamedSource:
    def test_mapped_and_unmapped_services(self) -> None:
        result = plan_source([m("SSH1", E22), m("VNC1", SOCK)], ("HTTP1", "SSH1", "VNC1"))
        assert result.bindings == (
            Binding("HTTP1", None, FREE_PORT),  # unmapped: a free port
            Binding("SSH1", "SSH1", E22),
            Binding("VNC1", "VNC1", SOCK),
        )
        assert result.unused == ()
        assert result.ignored == 0

    def test_no_mappings_free_ports_for_all(self) -> None:
        assert served(plan_source([], ("SSH1", "HTTP1"))) == {
            "SSH1": (None, FREE_PORT),
            "HTTP1": (None, FREE_PORT),
        }

    def test_mapping_for_a_service_the_tunnel_lacks_is_unused(self) -> None:
        result = plan_source([m("SSH1", E22), m("RDP1", E80)], ("SSH1",))
        assert served(result) == {"SSH1": ("SSH1", E22)}
        assert result.unused == ("RDP1",)

    def test_empty_list_serves_nothing_and_reports_unused(self) -> None:
        result = plan_source([m("SSH1", E22)], ())
        assert result == Plan(unused=("SSH1",))

    def test_no_mapping_empty_list(self) -> None:
        assert plan_source([], ()) == Plan()

    def test_v1_tunnel_one_named_mapping_serves_the_unnamed_stream(self) -> None:
        assert served(plan_source([m("SSH1", E22)], None)) == {"": ("SSH1", E22)}

    def test_v1_tunnel_without_mapping_free_port(self) -> None:
        assert served(plan_source([], None)) == {"": (None, FREE_PORT)}

    def test_v1_tunnel_two_mappings_is_an_error(self) -> None:
        result = plan_source([m("SSH1", E22), m("HTTP1", E80)], None)
        assert result.error == (
            "-s: a V1 tunnel carries one service, and 2 are mapped (HTTP1, SSH1): give one mapping"
        )


class TestNamedDestination:
    def test_every_announced_service_mapped(self) -> None:
        result = plan_destination([m("SSH1", E22), m("HTTP1", E80)], ("SSH1", "HTTP1"))
        assert served(result) == {"SSH1": ("SSH1", E22), "HTTP1": ("HTTP1", E80)}

    def test_missing_mapping_is_a_config_error(self) -> None:
        result = plan_destination([m("HTTP1", E80)], ("HTTP1", "SSH1"))
        assert result.bindings == ()
        assert result.error == (
            "no destination mapping for service SSH1 announced by the tunnel: add -d SSH1=PORT "
            "or a line 'SSH1 = PORT' to the config directory"
        )

    def test_unused_mapping_is_a_warning(self) -> None:
        result = plan_destination([m("SSH1", E22), m("RDP1", E80)], ("SSH1",))
        assert served(result) == {"SSH1": ("SSH1", E22)}
        assert result.unused == ("RDP1",)

    def test_empty_list(self) -> None:
        assert plan_destination([m("SSH1", E22)], ()) == Plan(unused=("SSH1",))

    def test_v1_tunnel(self) -> None:
        assert served(plan_destination([m("SSH1", E22)], None)) == {"": ("SSH1", E22)}
        assert plan_destination([m("SSH1", E22), m("HTTP1", E80)], None).error == (
            "-d: a V1 tunnel carries one service, and 2 are mapped (HTTP1, SSH1): give one mapping"
        )
        assert plan_destination([], None) == Plan()


# ---------------------------------------------------------------------- the cap


class TestCap:
    def test_cap_is_three_like_aws(self) -> None:
        assert MAX_SERVICES == 3

    def test_source_takes_the_first_unmapped_ids(self) -> None:
        ids = tuple(f"S{i}" for i in range(5000))
        result = plan_source([], ids)
        assert [b.service_id for b in result.bindings] == ["S0", "S1", "S2"]
        assert result.ignored == 4997

    def test_mapped_ids_always_served_then_the_first_unmapped(self) -> None:
        ids = tuple(f"S{i}" for i in range(5000))
        result = plan_source([m("S4000", E22), m("S10", E80)], ids)
        assert served(result) == {
            "S0": (None, FREE_PORT),
            "S10": ("S10", E80),
            "S4000": ("S4000", E22),
        }
        assert result.ignored == 4997

    def test_more_mappings_than_the_cap_are_all_served(self) -> None:
        mappings = [m(f"S{i}", Endpoint(None, 1000 + i)) for i in range(5)]
        result = plan_source(mappings, tuple(f"S{i}" for i in range(7)))
        assert [b.service_id for b in result.bindings] == [f"S{i}" for i in range(5)]
        assert result.ignored == 2

    def test_destination_fully_mapped_ignores_the_rest(self) -> None:
        ids = ("SSH1", *(f"X{i}" for i in range(5000)))
        mappings = [m("SSH1", E22), m("X0", E80), m("X1", E5555)]
        result = plan_destination(mappings, ids)
        assert served(result).keys() == {"SSH1", "X0", "X1"}
        assert result.ignored == 4998

    def test_destination_storm_fails_with_one_short_line(self) -> None:
        ids = tuple(f"X{i}" for i in range(5000))
        result = plan_destination([m("SSH1", E22)], ids)
        assert result.error is not None
        assert "service X0, X1, X2 announced" in result.error
        assert result.unused == ("SSH1",)
        assert result.ignored == 4997


# ---------------------------------------------------------------------- endpoints of streams


class TestDestinationEndpoint:
    def test_from_the_plan(self) -> None:
        plan = plan_destination([m("SSH1", E22), m("HTTP1", E80)], ("SSH1", "HTTP1"))
        assert destination_endpoint([], plan, "HTTP1") == E80
        assert destination_endpoint([], plan, "VNC1") is None
        assert destination_endpoint([], plan, "") is None  # V1 stream, two services

    def test_v1_stream_on_a_one_service_tunnel(self) -> None:
        """A V1 source (``-y V1``) sends no service ID on a tunnel announcing SSH1."""
        plan = plan_destination([m("SSH1", E22)], ("SSH1",))
        assert destination_endpoint([], plan, "") == E22

    def test_unnamed_mapping_on_an_empty_tunnel(self) -> None:
        plan = plan_destination([m("", E22)], ())
        assert destination_endpoint([], plan, "") == E22
        assert destination_endpoint([], plan, "SSH1") is None

    def test_before_the_announcement(self) -> None:
        named = [m("SSH1", E22), m("HTTP1", E80)]
        assert destination_endpoint(named, None, "HTTP1") == E80
        assert destination_endpoint(named, None, "") is None
        assert destination_endpoint(named, None, "VNC1") is None
        assert destination_endpoint([m("SSH1", E22)], None, "") == E22
        assert destination_endpoint([m("SSH1", E22)], None, "VNC1") is None
        assert destination_endpoint([m("", E22)], None, "VNC1") == E22


def test_names() -> None:
    assert names([]) == ""
    assert names(["A", "B", "C"]) == "A, B, C"
    assert names(["A", "B", "C", "D"]) == "A, B, C and 1 more"
