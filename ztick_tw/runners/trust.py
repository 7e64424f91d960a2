"""Trust roots for the runners' outgoing TLS (https webhooks, amqps brokers)."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.ssl import Certificate, trustRootFromCertificates

__all__ = ["load_trust_root"]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def load_trust_root(ca_file: str, what: str = "CA") -> Any:
    """The trust root made of every certificate in the PEM file ``ca_file``.

    Raises ``ValueError`` naming the file (as ``"<what> file <path>"``) when it cannot
    be read or holds no usable PEM certificate, so a bad setting stops the daemon at
    start instead of failing every delivery.
    """
    try:
        with open(ca_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} file {ca_file}: {e.strerror or e}") from e
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ValueError(f"{what} file {ca_file} holds no PEM certificate")
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ValueError(f"{what} file {ca_file}: bad certificate: {e}") from e
    return trustRootFromCertificates(certificates)  # type: ignore[no-untyped-call]
