"""The asyncio shell of the proxy: the only place that does I/O."""
