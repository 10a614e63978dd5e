"""Validation rules the parts share: names, tokens, regions, hosts. Pure (regexes and strings).

The character set of service IDs and thing names is AWS's (``[a-zA-Z0-9:_-]``, at most 128).
"""

from __future__ import annotations

import re

__all__ = [
    "AWS_DOMAINS",
    "AWS_REGION_RE",
    "CLIENT_TOKEN_RE",
    "HEADER_SAFE_RE",
    "HOST_RE",
    "NAME_CHARS",
    "NAME_MAX",
    "NAME_RE",
    "REGION_RE",
    "SERVICE_ID_RE",
    "THING_NAME_RE",
    "is_aws_host",
    "tunnel_host",
]

#: The characters of a service ID or a thing name, as the AWS APIs accept them.
NAME_CHARS = r"[a-zA-Z0-9:_-]"
#: The longest service ID or thing name.
NAME_MAX = 128
#: A service ID or thing name of any length (for a message per problem: check NAME_MAX apart).
NAME_RE = re.compile(rf"{NAME_CHARS}+")
#: A service identifier (``SERVICE_IDS``, ``-s``/``-d`` mappings, OpenTunnel's ``services``).
SERVICE_ID_RE = re.compile(rf"{NAME_CHARS}{{1,{NAME_MAX}}}")
#: An AWS IoT thing name (CreateThing's pattern): it never holds an MQTT wildcard or a ``/``.
THING_NAME_RE = re.compile(rf"{NAME_CHARS}{{1,{NAME_MAX}}}")

#: A client token (``AWSIOT_TUNNEL_CLIENT_TOKEN``), as the reference localproxy accepts it.
CLIENT_TOKEN_RE = re.compile(r"[a-zA-Z0-9-]{32,128}")
#: What an HTTP header value (an access token) can carry: printable ASCII, no spaces.
HEADER_SAFE_RE = re.compile(r"[\x21-\x7e]+")

#: The shape of a region name in a tunnel URL or a notification (``us-east-1``, ``cn-north-1``).
REGION_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
#: The stricter shape of a real AWS region (the service's ``--region``).
AWS_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")

#: A host name (or an IPv4 address) as a flag or setting may give it.
HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")

#: The domains of AWS endpoints: the global partition, and China's.
AWS_DOMAINS = (".amazonaws.com", ".amazonaws.com.cn")


def tunnel_host(region: str) -> str:
    """The AWS Secure Tunneling data-plane host of ``region`` (China's regions: ``.com.cn``)."""
    suffix = AWS_DOMAINS[1] if region.startswith("cn-") else AWS_DOMAINS[0]
    return f"data.tunneling.iot.{region}{suffix}"


def is_aws_host(host: str) -> bool:
    """Whether ``host`` is an AWS endpoint (rather than a self-hosted broker or service)."""
    return host.lower().endswith(AWS_DOMAINS)
