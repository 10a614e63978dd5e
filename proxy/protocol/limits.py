"""Limits of the tunnel protocol that code without protobuf needs (the configuration checks).

:mod:`proxy.protocol.messages` imports the generated protobuf code: the agent, which reads the
proxy's configuration but never a tunnel message, does not load it (about 5 MiB).
"""

#: Largest DATA payload (63 KiB), as the AWS service and the reference proxy enforce it.
MAX_PAYLOAD = 64512
