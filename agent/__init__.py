"""iotunnel-agent: the always-on device agent of AWS IoT Secure Tunneling.

It keeps one MQTT connection to AWS IoT Core (or any broker with client certificates), listens on
``$aws/things/<thing>/tunnels/notify``, and runs one destination-mode proxy process per tunnel.

The notification's topic and payload (parsed into a Notification, or a Rejection that says
why) are :mod:`iotunnel.notify`'s, shared with the service that builds them.

Modules, pure first::

    config       agent.ini + IOTUNNEL_* + flags -> AgentSettings (ConfigError -> exit 2)
    supervisor   pure policy: notifications and child exits in, start/stop/restart actions out
    logs         journald-style one-line records or native journal records, tags, redaction
    report       audit lines, the status file (status.json), the STATUS= line, ``status``
    systemd      sd_notify client: READY/STATUS/WATCHDOG/STOPPING; no-op off systemd
    mqtt         awsiotsdk MQTT5 adapter; CRT callbacks marshalled onto the event loop
    proxy_runner one child proxy process: spawn, read its status channel, stop
    daemon       the event loop: wires them together, carries out the supervisor's actions
    cli          ``iotunnel-agent`` / ``python -m agent``, ``iotunnel-agent status``
"""
