"""The TLS files to an OpenSSL context: read, checked, and the reasons when they cannot be used.

``load`` reads a PEM certificate chain (the server certificate first, then any
intermediates, in one file), its private key and, optionally, a file of client CAs, and
builds an OpenSSL server context for TLS 1.2 and 1.3 only, with forward-secret AEAD
ciphers (ECDHE with AES-GCM or ChaCha20-Poly1305 for TLS 1.2; OpenSSL's TLS 1.3 suites),
no compression, no renegotiation and no session resumption.  With client CAs, every
client must present a certificate signed by one of them.  A file that cannot be used
raises ``TLSSetupError`` naming it and the problem; a certificate out of its validity
period or a key readable by others are warnings.  ``ReloadableServerTLS`` (``tls.py``)
calls it at start and on every reload.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from ztick_tw.tls.transport import record_verify_error, ssl_reason

#: TLS 1.2 cipher suites: ECDHE key exchange (forward secrecy) with an AEAD cipher only.
#: TLS 1.3 suites are OpenSSL's defaults (all AEAD).
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

#: Context options: no TLS compression (CRIME), no renegotiation, the server's cipher
#: order, a fresh ECDH key per handshake, no session tickets.
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_ECDH_USE
    | SSL.OP_NO_TICKET
)

#: Private key types OpenSSL can sign a handshake with.
_SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"


class TLSSetupError(Exception):
    """A TLS file cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class CertificateInfo:
    """What the logs and STAT say about the server certificate in use."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    serial: int
    sha256: str
    chain_length: int

    def describe(self) -> str:
        """One line: subject, issuer, expiry and fingerprint."""
        return (
            f"{self.subject} (issuer {self.issuer}, valid until"
            f" {self.not_after:%Y-%m-%dT%H:%M:%SZ}, sha256 {self.sha256})"
        )


@dataclass(frozen=True)
class Loaded:
    """What ``load`` read: the context, and what the logs and STAT say about it."""

    context: SSL.Context
    certificate: CertificateInfo
    client_cas: tuple[str, ...]
    warnings: tuple[str, ...]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"{path}: cannot read the {what}: {e.strerror}") from None


def _load_certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    if _CERT_MARKER not in data:
        raise TLSSetupError(
            f"{path}: the {what} holds no PEM certificate (no {_CERT_MARKER.decode()} line)"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(
            f"{path}: the {what} holds a PEM certificate block that cannot be decoded"
        ) from None


def _load_key(path: str) -> _SigningKey:
    what = "TLS private key"
    data = _read(path, what)
    if b"PRIVATE KEY-----" not in data:
        raise TLSSetupError(
            f"{path}: the {what} file holds no PEM private key (no -----BEGIN ... PRIVATE"
            " KEY----- line)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSetupError(
            f"{path}: the {what} is encrypted with a passphrase; give ztick-tw an"
            " unencrypted key (readable by the daemon's user only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSSetupError(f"{path}: the {what} cannot be decoded") from None
    if not isinstance(key, _SigningKey):
        raise TLSSetupError(
            f"{path}: the {what} is a {type(key).__name__}, which cannot sign a handshake"
        )
    return key


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def load(cert_path: str, key_path: str, client_ca_path: str | None, now: datetime) -> Loaded:
    """Read and check the files and build the context; raise ``TLSSetupError`` if unusable."""
    chain = _load_certificates(cert_path, "TLS certificate")
    key = _load_key(key_path)
    key_der = _public_der(key.public_key())
    leaf = chain[0]
    if _public_der(leaf.public_key()) != key_der:
        others = [i for i, c in enumerate(chain[1:], 2) if _public_der(c.public_key()) == key_der]
        hint = (
            f" (it matches certificate #{others[0]} in that file: put the server"
            " certificate first, then its intermediates)"
            if others
            else ""
        )
        raise TLSSetupError(
            f"{key_path}: the TLS private key does not match the certificate in {cert_path}" + hint
        )
    cas: list[x509.Certificate] = []
    if client_ca_path is not None:
        cas = _load_certificates(client_ca_path, "TLS client CA file")
    warnings: list[str] = []
    if leaf.not_valid_after_utc <= now:
        warnings.append(
            f"{cert_path}: the TLS certificate expired on"
            f" {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; clients will refuse it"
        )
    elif leaf.not_valid_before_utc > now:
        warnings.append(
            f"{cert_path}: the TLS certificate is not valid before"
            f" {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}; clients will refuse it"
        )
    try:
        if os.stat(key_path).st_mode & stat.S_IROTH:
            warnings.append(
                f"{key_path}: the TLS private key is readable by other users; chmod o-r it"
            )
    except OSError:
        pass
    try:
        context = _build_context(chain, key, cas)
    except SSL.Error as e:
        raise TLSSetupError(
            f"{cert_path}: OpenSSL refused the certificate or key: {ssl_reason(e)}"
        ) from None
    info = CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        sha256=_fingerprint(leaf),
        chain_length=len(chain),
    )
    return Loaded(context, info, tuple(ca.subject.rfc4514_string() for ca in cas), tuple(warnings))


def _build_context(
    chain: list[x509.Certificate], key: _SigningKey, client_cas: list[x509.Certificate]
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.use_certificate(chain[0])
    ctx.use_privatekey(key)
    for intermediate in chain[1:]:
        ctx.add_extra_chain_cert(intermediate)
    ctx.check_privatekey()
    # Required for client certificates to work with a session cache; no resumption anyway.
    ctx.set_session_id(b"ztick-tw")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if client_cas:
        store = ctx.get_cert_store()
        assert store is not None
        for ca in client_cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
            ctx.add_client_ca(ca)  # named in the CertificateRequest, to help clients pick
        ctx.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
            record_verify_error,
        )
        ctx.set_verify_depth(9)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx
