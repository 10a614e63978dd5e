"""Which CAs the proxy trusts (with and without ``-c``), ``-k``, and how TLS failures read."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from proxy.errors import ConnectFailed, HandshakeRefused
from proxy.io.link import map_exceptions, ssl_context
from proxy.tls import CAError
from testbed.pki import PKI

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl(1)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("pki"))


async def _handshake(pki: PKI, context: ssl.SSLContext) -> None:
    """A TLS handshake with a server holding ``pki``'s server certificate."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=pki.server_context())
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
        writer.close()


def test_a_hashed_ca_directory_is_looked_up_lazily(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(pki.hashed_ca_directory(tmp_path / "certs")))
    context = ssl_context(None, True)
    assert context.cert_store_stats()["x509_ca"] == 0  # nothing parsed up front
    asyncio.run(_handshake(pki, context))  # yet the server's CA is found and trusted
    assert context.cert_store_stats()["x509_ca"] == 1


def test_ssl_cert_file_keeps_its_meaning(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca.cert))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "empty"))
    context = ssl_context(None, True)
    assert context.cert_store_stats()["x509_ca"] == 1
    asyncio.run(_handshake(pki, context))


def test_a_directory_without_hashed_entries_is_not_trusted_alone(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without hash links OpenSSL could find no CA there: the system's bundle is loaded."""
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(pki.ca.cert, plain / "ca.pem")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(plain))
    if ssl.get_default_verify_paths().cafile is None:
        pytest.skip("this system has no CA bundle file")
    context = ssl_context(None, True)
    assert context.cert_store_stats()["x509_ca"] > 0  # parsed up front, as before
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_handshake(pki, context))  # the test CA is not a system CA


# --------------------------------------------------------------------------- -c and -k


def _serve_once(context: ssl.SSLContext, server: ssl.SSLContext, name: str = "localhost") -> None:
    """A TLS handshake with a server using ``server``, through map_exceptions."""

    async def handshake() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
        async with listener:
            port = listener.sockets[0].getsockname()[1]
            with map_exceptions():
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname=name
                )
            writer.close()

    asyncio.run(handshake())


@dataclass(frozen=True)
class _OtherCA:
    """A second CA, named unlike the PKI's (OpenSSL looks CAs up by name), and its server."""

    ca: Path
    server: ssl.SSLContext

    def server_context(self) -> ssl.SSLContext:
        return self.server

    def hashed_ca_directory(self, directory: Path) -> Path:
        directory.mkdir(parents=True)
        (directory / "other.pem").write_bytes(self.ca.read_bytes())
        digest = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(self.ca)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (directory / f"{digest}.0").symlink_to("other.pem")
        return directory


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> _OtherCA:
    directory = tmp_path_factory.mktemp("other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca_cert, ca_key = _write_pair(directory / "ca", cert, key)
    leaf, leaf_key = _leaf(ca_cert, ca_key, directory / "server", now, now + datetime.timedelta(1))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(leaf, leaf_key)
    return _OtherCA(ca_cert, server)


def test_capath_adds_to_the_system_cas(
    pki: PKI, other_pki: _OtherCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-c FILE trusts its CA and still the system's (here a hashed directory with another CA)."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(other_pki.hashed_ca_directory(tmp_path / "system")))
    context = ssl_context(str(pki.ca.cert), True)
    _serve_once(context, pki.server_context())  # the -c CA
    _serve_once(context, other_pki.server_context())  # a system CA, still trusted
    assert context.cert_store_stats()["x509_ca"] == 2  # -c's one, and the looked-up system one


def test_capath_directory_of_plain_pem_files(
    pki: PKI, other_pki: _OtherCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory of unhashed CA files, as a user copies them there, is loaded file by file."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "empty"))
    plain = tmp_path / "cas"
    plain.mkdir()
    shutil.copy(pki.ca.cert, plain / "one.pem")
    shutil.copy(other_pki.ca, plain / "two.crt")
    (plain / "README").write_text("not a certificate, and not read\n")
    context = ssl_context(str(plain), True)
    _serve_once(context, pki.server_context())
    _serve_once(context, other_pki.server_context())


def test_capath_hashed_directory_is_looked_up(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "empty"))
    system = ssl_context(None, True).cert_store_stats()["x509_ca"]
    context = ssl_context(str(pki.hashed_ca_directory(tmp_path / "hashed")), True)
    assert context.cert_store_stats()["x509_ca"] == system  # the -c CA not parsed up front
    _serve_once(context, pki.server_context())


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "missing.pem", "No such file or directory"),
        (lambda d: _write(d / "junk.pem", "hello\n"), "not a PEM CA certificate"),
        (lambda d: _write(d / "empty.pem", ""), "not a PEM CA certificate"),
        (lambda d: _mkdir(d / "empty-dir"), "no CA certificates in the directory"),
        (lambda d: _write(d / "dir" / "bad.pem", "x"), "bad.pem: not a PEM CA certificate"),
        (lambda d: Path("/dev/zero"), "not a regular file or directory"),
    ],
)
def test_unloadable_capath(tmp_path: Path, make: Any, problem: str) -> None:
    path = make(tmp_path)
    if path.name == "bad.pem":
        path = path.parent
    with pytest.raises(CAError, match=problem):
        ssl_context(str(path), True)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_no_verify_turns_all_verification_off(pki: PKI) -> None:
    """-k: an untrusted CA and a wrong host name both pass, as with the reference's -k."""
    context = ssl_context(None, False)
    assert context.verify_mode is ssl.CERT_NONE
    assert not context.check_hostname
    _serve_once(context, pki.server_context(), name="not-the-service.example")


# --------------------------------------------------------------------------- failure lines


def test_untrusted_ca_names_the_cause(pki: PKI, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "none.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "none"))
    with pytest.raises(ConnectFailed) as info:
        _serve_once(ssl_context(None, True), pki.server_context())
    text = str(info.value)
    assert text.startswith("TLS verification of the service failed: ")
    assert "give it with -c" in text
    assert "development and testing only" in text


def test_host_name_mismatch_mentions_k_only_for_testing(pki: PKI) -> None:
    with pytest.raises(ConnectFailed) as info:
        _serve_once(ssl_context(str(pki.ca.cert), True), pki.server_context(), "wrong.example")
    text = str(info.value)
    assert "Hostname mismatch" in text or "hostname" in text.lower()
    assert "check -e or -r" in text
    assert "(-k turns verification off, for development" in text


@pytest.mark.parametrize(
    ("days", "said"), [(-30, "has expired"), (30, "is not yet valid")], ids=["expired", "future"]
)
def test_clock_problems_point_at_the_clock(pki: PKI, tmp_path: Path, days: int, said: str) -> None:
    cert, key = _leaf_valid_around(pki, tmp_path, days)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    with pytest.raises(ConnectFailed) as info:
        _serve_once(ssl_context(str(pki.ca.cert), True), server)
    assert str(info.value) == (
        f"TLS verification of the service failed: its certificate {said} by this device's "
        "clock: check the system clock (NTP)"
    )


def _leaf_valid_around(pki: PKI, directory: Path, days: int) -> tuple[Path, Path]:
    """A localhost certificate of ``pki``'s CA valid for one day, ``days`` days from now."""
    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    end = start + datetime.timedelta(days=1)
    return _leaf(pki.ca.cert, pki.ca.key, directory / f"clock{days}", start, end)


def _leaf(
    ca_cert_path: Path,
    ca_key_path: Path,
    stem: Path,
    start: datetime.datetime,
    end: datetime.datetime,
) -> tuple[Path, Path]:
    """A localhost server certificate signed by the CA, valid from ``start`` to ``end``."""
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write_pair(stem, cert, key)


def _write_pair(
    stem: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _answer(status: int, headers: list[tuple[str, str]], body: bytes = b"") -> InvalidStatus:
    return InvalidStatus(Response(status, "Reason", Headers(headers), body))


@pytest.mark.parametrize(
    ("answer", "kind", "text"),
    [
        (_answer(302, [("Location", "http://[::1")]), HandshakeRefused, "a redirect (HTTP 302)"),
        (_answer(301, []), HandshakeRefused, "a redirect (HTTP 301); not following it"),
        (_answer(429, []), ConnectFailed, "the tunnel service answered HTTP 429 Reason"),
        (_answer(503, []), ConnectFailed, "the tunnel service answered HTTP 503 Reason"),
        (_answer(403, [], b"\xff\xfe"), HandshakeRefused, "HTTP 403 (Reason): the access token"),
    ],
)
def test_odd_answers_map_to_one_line(answer: InvalidStatus, kind: type, text: str) -> None:
    with pytest.raises(kind) as info, map_exceptions(("tok3n",)):
        raise answer
    assert text in str(info.value)
    assert "\n" not in str(info.value)
