"""iotunnel's self-hosted tunnel service: the AWS IoT Secure Tunneling ``/tunnel`` endpoint.

Layers: :mod:`service.registry` (tunnels and tokens), :mod:`service.handshake` (who may
connect) and :mod:`service.pairing` (what is relayed) are pure; :mod:`service.server` is the
thin websockets layer; :mod:`service.config` and :mod:`service.cli` are the command line.
"""
