"""Checking AWS Signature Version 4 on management API requests, with botocore's own signer.

With configured credentials (``--credentials``, an AWS shared-credentials file), a request must
carry an ``Authorization: AWS4-HMAC-SHA256 Credential=<key id>/<date>/<region>/<service>/
aws4_request, SignedHeaders=..., Signature=...`` header and an ``X-Amz-Date`` within 15 minutes
of the service's clock. The signature is computed again by ``botocore.auth.SigV4Auth`` over the
request as received (method, path, query, the signed headers, the body's SHA-256) and compared
in constant time. The signature must cover ``host``, ``x-amz-date``, ``x-amz-target`` (so that
it authorizes one operation: a DescribeTunnel signature cannot be replayed as a CloseTunnel)
and every ``x-amz-*`` header sent; the canonical request always holds the body's real SHA-256
(an ``X-Amz-Content-SHA256`` header, signed or not, must be that hash: ``UNSIGNED-PAYLOAD`` is
refused). Failures carry the AWS error types (HTTP 403):

- ``MissingAuthenticationTokenException``: no Authorization header;
- ``IncompleteSignatureException``: a malformed one, no ``X-Amz-Date``, or a required header
  (see above) missing from ``SignedHeaders``;
- ``UnrecognizedClientException``: an access key id the service does not know;
- ``InvalidSignatureException``: a wrong signature, region, service or date, a request
  signed too long ago or too far in the future, or an ``X-Amz-Content-SHA256`` that is not
  the body's hash.

Without configured credentials the service does not check signatures at all (signed and
unsigned requests alike are accepted): fine on loopback and in tests, not on a network.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.clock import Clock
from service.control import ApiError

#: The signing name of the service in the credential scope (botocore's ``signingName``).
SIGNING_NAME = "IoTSecuredTunneling"
#: Headers every signature must cover: the host, the date (no replay outside the skew) and the
#: operation (no DescribeTunnel signature replayed as a CloseTunnel).
REQUIRED_SIGNED = ("host", "x-amz-date", "x-amz-target")
#: The header that states the body's SHA-256; when sent, it must be the body's.
CONTENT_SHA256 = "x-amz-content-sha256"
#: How far the request's X-Amz-Date may be from the service's clock, as AWS allows.
MAX_SKEW = 15 * 60.0

_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<headers>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})\s*"
)
_DATE_FORMAT = "%Y%m%dT%H%M%SZ"


class MissingAuthenticationToken(ApiError):
    code = "MissingAuthenticationTokenException"
    status = 403


class IncompleteSignature(ApiError):
    code = "IncompleteSignatureException"
    status = 403


class UnrecognizedClient(ApiError):
    code = "UnrecognizedClientException"
    status = 403


class InvalidSignature(ApiError):
    code = "InvalidSignatureException"
    status = 403


@dataclass(frozen=True, slots=True)
class SigV4Verifier:
    """Checks requests against ``keys`` (access key id -> secret access key)."""

    keys: Mapping[str, str] = field(repr=False)
    region: str
    clock: Clock

    def verify(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        scheme: str = "https",
    ) -> str:
        """Check one request; returns the access key id that signed it.

        Args:
            method: the HTTP method.
            target: the request target (path and query) as received.
            headers: every header (name, value) as received, names in any case.
            body: the request body.
            scheme: ``https`` or ``http``, as the request arrived.

        Raises:
            ApiError: a missing, malformed or wrong signature (see the module docstring).
        """
        values = _header_map(headers)
        authorization = values.get("authorization", [])
        if not authorization:
            raise MissingAuthenticationToken("Missing Authentication Token")
        match = _AUTH_RE.fullmatch(authorization[0].strip())
        if len(authorization) != 1 or match is None:
            raise IncompleteSignature(
                "Authorization header must be 'AWS4-HMAC-SHA256 Credential=..., "
                "SignedHeaders=..., Signature=...'"
            )
        parts = match["credential"].split("/")
        if len(parts) != 5 or parts[4] != "aws4_request":
            raise IncompleteSignature(
                "Credential must be <key id>/<date>/<region>/<service>/aws4_request"
            )
        key_id, scope_date, region, service, _ = parts
        secret = self.keys.get(key_id)
        if secret is None:
            raise UnrecognizedClient("The security token included in the request is invalid.")
        amz_date = values.get("x-amz-date", [])
        if len(amz_date) != 1:
            raise IncompleteSignature("X-Amz-Date header missing")
        try:
            signed_at = datetime.datetime.strptime(amz_date[0], _DATE_FORMAT).replace(
                tzinfo=datetime.UTC
            )
        except ValueError:
            raise IncompleteSignature(f"X-Amz-Date must be in the form {_DATE_FORMAT}") from None
        if scope_date != amz_date[0][:8]:
            raise InvalidSignature("Credential date does not match X-Amz-Date")
        if region != self.region:
            raise InvalidSignature(
                f"Credential should be scoped to a valid region: '{self.region}', not '{region}'"
            )
        if service != SIGNING_NAME:
            raise InvalidSignature(
                f"Credential should be scoped to correct service: '{SIGNING_NAME}'"
            )
        now = self.clock.now()
        if abs(signed_at.timestamp() - now) > MAX_SKEW:
            raise InvalidSignature(
                f"Signature expired: {amz_date[0]} is not within 15 minutes of the service time"
            )
        signed_names = match["headers"].split(";")
        for name in REQUIRED_SIGNED:
            if name not in signed_names:
                raise IncompleteSignature(
                    f"'{_display(name)}' must be a 'SignedHeader' in the AWS Authorization."
                )
        unsigned = sorted(n for n in values if n.startswith("x-amz-") and n not in signed_names)
        if unsigned:
            raise IncompleteSignature(
                f"every x-amz-* header must be signed; not in SignedHeaders: {', '.join(unsigned)}"
            )
        if any(name not in values for name in signed_names):
            raise InvalidSignature("SignedHeaders must name only headers that were sent")
        claimed = values.get(CONTENT_SHA256)
        if claimed is not None and (
            len(claimed) != 1 or claimed[0].strip() != hashlib.sha256(body).hexdigest()
        ):
            # botocore (like AWS) puts this header's value in the canonical request in place
            # of the body's hash: unchecked, a signed request could carry any other body.
            raise InvalidSignature(
                f"The provided {CONTENT_SHA256} header does not match what was computed."
            )
        expected = _signature(
            method,
            target,
            [(name, value) for name in signed_names for value in values[name]],
            body,
            scheme,
            key_id,
            secret,
            region,
            amz_date[0],
            signed_names,
        )
        if expected is None or not hmac.compare_digest(expected, match["signature"]):
            raise InvalidSignature(
                "The request signature we calculated does not match the signature you provided."
            )
        return key_id


def _display(name: str) -> str:
    """``x-amz-target`` -> ``X-Amz-Target``, as AWS names headers in its messages."""
    return "-".join(part.capitalize() for part in name.split("-"))


def _header_map(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    return values


def _signature(
    method: str,
    target: str,
    signed: list[tuple[str, str]],
    body: bytes,
    scheme: str,
    key_id: str,
    secret: str,
    region: str,
    amz_date: str,
    signed_names: list[str],
) -> str | None:
    """The signature botocore computes for this request, or None if botocore would sign a
    different set of headers (one it never signs, such as User-Agent)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    host = next(value for name, value in signed if name == "host")
    request = AWSRequest(method=method, url=f"{scheme}://{host}{target}", data=body)
    for name, value in signed:
        request.headers.add_header(name, value)
    request.context["timestamp"] = amz_date
    auth = SigV4Auth(Credentials(key_id, secret), SIGNING_NAME, region)
    try:
        if auth.signed_headers(auth.headers_to_sign(request)) != ";".join(sorted(signed_names)):
            return None
        canonical = auth.canonical_request(request)
    except ValueError:  # a Host (or target) that makes no URL, such as "[": not signable
        raise InvalidSignature("Host header and request target do not form a valid URL") from None
    return str(auth.signature(auth.string_to_sign(request, canonical), request))
