"""The sans-IO core of the tunnel protocol: bytes in, messages and actions out.

Nothing in this package performs I/O, reads clocks or imports asyncio, sockets or websockets.
"""
