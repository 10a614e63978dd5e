"""Tests of the sans-IO protocol core, :mod:`proxy.protocol`."""
