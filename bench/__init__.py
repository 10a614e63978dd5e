"""Benchmarks for iotunnel (``python -m bench``, ``make bench``) and their results (RESULTS.md).

Built on :mod:`testbed`; used from the checkout, not installed.
"""
