"""TLS for the line-protocol and REST listeners: certificates, client CAs, reload on SIGHUP.

``server``: ``ReloadableServerTLS`` (the certificate files, reloaded on SIGHUP),
``tls_factory`` and ``TLSReloadService``; ``context``: reading and checking the PEM files
and building the OpenSSL context; ``transport``: the TLS transport (handshake failures
logged, ``close_notify`` as a half-close).  The names a program needs are here.
"""

from ztick_tw.tls.context import CertificateInfo, TLSSetupError
from ztick_tw.tls.server import (
    ReloadableServerTLS,
    TLSReloadService,
    install_reload_on_sighup,
    request_reload,
    tls_factory,
)
from ztick_tw.tls.transport import peer_certificate_subject

__all__ = [
    "CertificateInfo",
    "ReloadableServerTLS",
    "TLSReloadService",
    "TLSSetupError",
    "install_reload_on_sighup",
    "peer_certificate_subject",
    "request_reload",
    "tls_factory",
]
