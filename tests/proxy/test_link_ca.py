"""Which CAs the proxy trusts without ``-c``, and how it loads them (proxy/io/link.py)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import pytest

from bench.pki import PKI
from proxy.io.link import ssl_context

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
