"""Loopback harness, demo and benchmarks for iotunnel (not installed on devices)."""
