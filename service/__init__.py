"""iotunnel's self-hosted tunnel service: AWS IoT Secure Tunneling's ``/tunnel`` endpoint and
management API.

Layers: :mod:`service.registry` (tunnels and token digests), :mod:`service.handshake` (who may
connect), :mod:`service.pairing` (what is relayed), :mod:`service.bandwidth` (the token bucket)
and :mod:`service.control` (the operations, limits and lifetimes) hold the rules and do no I/O
of their own; :mod:`service.store` keeps the registry in SQLite; :mod:`service.server` is the
thin websockets layer (the data plane); :mod:`service.api` speaks AWS JSON 1.1 over
:mod:`service.http` (h11), with :mod:`service.sigv4` checking signatures;
:mod:`service.notify` publishes device notifications (:mod:`iotunnel.notify`) over MQTT;
:mod:`service.settings` (flags and the settings file -> a frozen ``ServiceSettings``),
:mod:`service.config` (the files it names) and :mod:`service.cli` (wiring, the serve loop) are
the command line.
"""
