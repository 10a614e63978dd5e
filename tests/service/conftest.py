"""Fixtures of the tunnel service tests."""

from __future__ import annotations

import pytest
from service_harness import Harness

from testbed.pki import PKI


@pytest.fixture
def harness(pki: PKI, ms: float) -> Harness:
    """A :class:`service_harness.Harness` on the session's test PKI."""
    return Harness(pki, ms)
