"""What the parts of iotunnel share: ``proxy``, ``agent`` and ``service`` all import from here.

Each contract is defined once:

- :mod:`iotunnel.mode` -- which end of a tunnel (source or destination);
- :mod:`iotunnel.exits` -- the proxy's exit codes, which the agent's restart policy reads;
- :mod:`iotunnel.notify` -- the MQTT tunnel notification: topic, payload, build and parse;
- :mod:`iotunnel.handshake` -- the names of the WebSocket handshake (subprotocols, headers);
- :mod:`iotunnel.secret` -- :class:`~iotunnel.secret.Secret`, a token that does not print;
- :mod:`iotunnel.errors` -- the exception root and the one ``ConfigError``;
- :mod:`iotunnel.rules` -- validation rules (service IDs, thing names, tokens, regions, hosts);
- :mod:`iotunnel.boundedjson` -- the JSON reader for anything from outside;
- :mod:`iotunnel.cli` -- the argument-parser base (one-line errors, exit 2);
- :mod:`iotunnel.logs` -- logging setup and secret redaction, the agent's and its proxies' forms;
- :mod:`iotunnel.journal` -- journald's native protocol (records with fields).

Everything here but ``cli`` and ``logs`` is pure (no I/O, no logging); the sans-IO protocol core
(:mod:`proxy.protocol`) imports ``errors``, ``mode`` and ``rules``.
"""

__version__ = "0.1.0"
