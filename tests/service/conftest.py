"""Fixtures of the tunnel service tests."""

from __future__ import annotations

import pytest
from pki import PKI
from service_harness import Harness


@pytest.fixture
def harness(pki: PKI, ms: float) -> Harness:
    """A :class:`service_harness.Harness` on the session's test PKI."""
    return Harness(pki, ms)
