"""A throw-away test PKI: one CA, a server certificate for loopback, client certificates.

Built with ``cryptography`` (EC P-256 keys, fast to make). Files are PEM, keys unencrypted::

    pki = PKI.create(tmp_path)
    pki.server_context()            # ssl.SSLContext for a TLS server on localhost
    pki.client_context()            # ssl.SSLContext that trusts the CA
    pki.issue_client("thing-1")     # CertPair signed by the CA, for mutual TLS (MQTT)
    self_signed(tmp_path)           # a server certificate no CA issued (for -k)

From a shell, ``python -m testbed.pki DIR [--client NAME ...]`` makes one and says what is in it.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names the server certificate is valid for.
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iotunnel tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class PKI:
    """A CA in ``directory`` and the certificates it issued."""

    directory: Path
    ca: CertPair
    server: CertPair
    client: CertPair

    @classmethod
    def create(cls, directory: Path, *, starts_in: datetime.timedelta | None = None) -> PKI:
        """Make a CA, a server and a client certificate (``client``) in ``directory``
        (created mode 0700 when missing: it holds private keys).

        ``starts_in``: every certificate (the CA's too, and any :meth:`issue_client` makes
        later) becomes valid only that long from now, as a device whose clock is behind sees
        them. Default: valid from five minutes ago.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = _start(starts_in)
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("iotunnel test CA")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ca = CertPair(directory / "ca.pem", directory / "ca.key")
        _write_cert(cert, ca.cert)
        _write_key(key, ca.key)
        server = _issue(
            ca,
            directory,
            "server",
            "localhost",
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.DNSName(n) for n in SERVER_NAMES]
            + [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES],
        )
        client = _issue(ca, directory, "client", "client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
        return cls(directory, ca, server, client)

    def issue_client(self, common_name: str) -> CertPair:
        """A new client certificate (``<common_name>.pem``/``.key``) signed by the CA."""
        return _issue(
            self.ca,
            self.directory,
            common_name,
            common_name,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [],
        )

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """A TLS 1.2+ server context with the server certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.server.cert, self.server.key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca.cert)
        return context

    def hashed_ca_directory(self, directory: Path) -> Path:
        """The CA in an OpenSSL CA directory (``<subject hash>.0``), as ``c_rehash`` makes it."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "ca.pem"
        target.write_bytes(self.ca.cert.read_bytes())
        digest = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(target)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        link = directory / f"{digest}.0"
        if not link.exists():
            link.symlink_to("ca.pem")
        return directory

    def client_context(self, client: CertPair | None = None) -> ssl.SSLContext:
        """A client context that trusts the CA (and presents ``client``, if given)."""
        context = ssl.create_default_context(cafile=self.ca.cert)
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context


def _start(starts_in: datetime.timedelta | None) -> datetime.datetime:
    """When certificates start: ``starts_in`` from now, or five minutes ago."""
    offset = -datetime.timedelta(minutes=5) if starts_in is None else starts_in
    return datetime.datetime.now(datetime.UTC) + offset


def _issue(
    ca: CertPair,
    directory: Path,
    stem: str,
    common_name: str,
    usage: x509.ObjectIdentifier,
    alt_names: list[x509.GeneralName],
) -> CertPair:
    """Sign a new leaf certificate with the CA and write it as ``<stem>.pem``/``<stem>.key``."""
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    # A leaf starts when its CA does (the CA's own start is the one chosen at create()).
    now = max(ca_cert.not_valid_before_utc, _start(None))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    pair = CertPair(directory / f"{stem}.pem", directory / f"{stem}.key")
    _write_cert(builder.sign(ca_key, hashes.SHA256()), pair.cert)
    _write_key(key, pair.key)
    return pair


def self_signed(directory: Path, stem: str = "self-signed") -> CertPair:
    """A self-signed server certificate for loopback (``<stem>.pem``/``.key``), issued by no CA:
    valid for the host names, trusted by nobody (what ``-k`` is for)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name("iotunnel self-signed server")
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = CertPair(directory / f"{stem}.pem", directory / f"{stem}.key")
    _write_cert(cert, pair.cert)
    _write_key(key, pair.key)
    return pair


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed.pki DIR``: make a throw-away PKI and list what it made."""
    parser = argparse.ArgumentParser(
        prog="python -m testbed.pki",
        description="Make a throw-away CA, a server certificate for localhost, 127.0.0.1 and "
        f"::1, and client certificates, valid for {_VALIDITY.days} days (for trying iotunnel "
        "out on one machine, never for production).",
    )
    parser.add_argument("directory", type=Path, help="where to write them (created mode 0700)")
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="also a client certificate with this common name (NAME.pem, NAME.key); repeatable",
    )
    args = parser.parse_args(argv)
    directory: Path = args.directory
    for name in args.client:
        if not name or name in {"ca", "server", "client"} or not name.replace("-", "").isalnum():
            parser.error(f"--client: {name!r}: use letters, digits and '-' (not ca/server/client)")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        parser.error(f"{directory}: exists and is not an empty directory")
    pki = PKI.create(directory)
    extra = [pki.issue_client(name) for name in args.client]
    until = datetime.datetime.now(datetime.UTC) + _VALIDITY
    names = ", ".join([*SERVER_NAMES, *SERVER_ADDRESSES])
    rows = [
        (pki.ca.cert, "the CA certificate: what clients trust (-c, --mqtt-ca, AWS_CA_BUNDLE)"),
        (pki.ca.key, "the CA's private key"),
        (pki.server.cert, f"server certificate for {names} (--cert)"),
        (pki.server.key, "its private key (--key)"),
        (pki.client.cert, "client certificate, common name 'client' (mutual TLS)"),
        (pki.client.key, "its private key"),
    ]
    for pair in extra:
        rows += [(pair.cert, f"client certificate, common name {pair.cert.stem!r}")]
        rows += [(pair.key, "its private key")]
    print(f"a throw-away PKI in {directory} (EC P-256, valid until {until:%Y-%m-%d %H:%M} UTC):")
    width = max(len(path.name) for path, _ in rows)
    for path, what in rows:
        print(f"  {path.name:<{width}}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
