"""The TLS context for the link to the tunnel service, and the checks of ``-c``.

Pure :mod:`ssl`: :mod:`proxy.config` checks ``-c`` with :func:`load_ca` before anything
connects, without loading the I/O stack.
"""

from __future__ import annotations

import os
import re
import ssl

__all__ = ["CAError", "load_ca", "prebuild", "ssl_context"]

#: How OpenSSL names the entries of a CA directory: subject hash, dot, sequence number.
_HASHED = re.compile(r"[0-9a-f]{8}\.[0-9]+")
#: The files of a CA directory without hash links that are read as PEM CA certificates.
CA_SUFFIXES = (".pem", ".crt", ".cer")


#: Contexts built ahead of time (:func:`prebuild`), each handed out once.
_prebuilt: dict[tuple[str | None, bool, str | None, str | None], ssl.SSLContext] = {}


def _prebuilt_key(
    ca_path: str | None, verify: bool
) -> tuple[str | None, bool, str | None, str | None]:
    return ca_path, verify, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


def prebuild(ca_path: str | None, verify: bool) -> None:
    """Build the context of ``ssl_context(ca_path, verify)`` now, for its first call (the
    agent's launcher does it once before it forks the proxies: each child then skips loading
    the CAs on its way to the tunnel). The environment's CA variables must not change between.

    Raises:
        CAError: ``ca_path`` cannot be loaded.
    """
    _prebuilt[_prebuilt_key(ca_path, verify)] = ssl_context(ca_path, verify)


class CAError(ValueError):
    """A ``-c`` file or directory that gives no usable CA certificate; the text says why."""


def ssl_context(ca_path: str | None, verify: bool) -> ssl.SSLContext:
    """TLS 1.2+ with certificate verification, or with none at all when ``verify`` is False.

    The system's CAs are always trusted; ``ca_path`` (``-c``) adds a CA file or directory to
    them (see :func:`load_ca`). Where the system has a hashed CA directory (Debian's
    /etc/ssl/certs), OpenSSL looks CAs up there as it needs them, rather than parsing the whole
    bundle file into memory (about 140 certificates, 1.3 MiB of every proxy's resident
    memory); the two hold the same CAs. ``SSL_CERT_FILE`` keeps its meaning.

    ``verify=False`` (``-k``) is the reference proxy's meaning of ``-k``: neither the
    certificate chain nor the host name is checked.

    Raises:
        CAError: ``ca_path`` cannot be loaded.
    """
    ready = _prebuilt.pop(_prebuilt_key(ca_path, verify), None)
    if ready is not None:
        return ready
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(capath=_hashed_ca_directory())  # None: the defaults
        if ca_path is not None:
            load_ca(ctx, ca_path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def load_ca(ctx: ssl.SSLContext, path: str) -> None:
    """Add the CA file or directory ``path`` to what ``ctx`` trusts.

    A file holds one or more PEM certificates. A directory prepared with ``openssl rehash``
    (``<hash>.0`` entries) is looked up by OpenSSL as it needs a CA, as the reference proxy
    does; a directory without such entries has its ``*.pem``, ``*.crt`` and ``*.cer`` files
    loaded, as a user who copied CA files there expects.

    Raises:
        CAError: The path is missing or unreadable, a file is not PEM, or a directory has
            neither hash entries nor CA files. The text names the path and never quotes it.
    """
    if os.path.isdir(path):
        try:
            with os.scandir(path) as entries:
                names = sorted(entry.name for entry in entries if _regular(entry))
        except OSError as exc:
            raise CAError(f"cannot read the directory: {exc.strerror or exc}") from None
        if any(_HASHED.fullmatch(name) for name in names):
            ctx.load_verify_locations(capath=path)
            return
        files = [n for n in names if n.lower().endswith(CA_SUFFIXES)]
        if not files:
            raise CAError(
                "no CA certificates in the directory (*.pem, *.crt or *.cer files, "
                "or the hash links of 'openssl rehash')"
            )
        for name in files:
            _load_file(ctx, os.path.join(path, name), name)
        return
    if os.path.exists(path) and not os.path.isfile(path):
        raise CAError("not a regular file or directory")  # a FIFO or device could block
    _load_file(ctx, path, None)


def _regular(entry: os.DirEntry[str]) -> bool:
    """A regular file, or a link to one (the hash links of ``openssl rehash``)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _load_file(ctx: ssl.SSLContext, path: str, name: str | None) -> None:
    where = f"{name}: " if name else ""
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise CAError(f"{where}not a PEM CA certificate") from None
    except OSError as exc:
        raise CAError(f"{where}{exc.strerror or exc}") from None


def _hashed_ca_directory() -> str | None:
    """OpenSSL's CA directory if it holds hashed entries and no CA file is forced, else None."""
    if os.environ.get("SSL_CERT_FILE"):
        return None
    directory = ssl.get_default_verify_paths().capath
    if not directory:
        return None
    try:
        with os.scandir(directory) as entries:
            if any(_HASHED.fullmatch(entry.name) for entry in entries):
                return directory
    except OSError:
        pass
    return None
