"""``listen`` values: ztick's ``host:port`` form or a Twisted server endpoint string.

Both are checked (ports, addresses, endpoint syntax) and turned into an endpoint string.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from ztick_tw.config.sections import _ENDPOINT_PREFIXES, _U16_MAX, ConfigError, _Invalid, _quote

# --------------------------------------------------------------------------- listen


def _escape_endpoint_value(text: str) -> str:
    r"""Escape ``\``, ``:`` and ``=`` for a Twisted endpoint string argument."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _split_endpoint_args(text: str) -> list[str]:
    """Split an endpoint description on unescaped colons, keeping escapes (for checks only)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _is_hostname(text: str) -> bool:
    if not text or len(text) > 253:
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in text.rstrip(".").split("."))


def _parse_port(text: str, value: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _Invalid(f"port must be a number from 1 to 65535, got {_quote(value)}")
    port = int(text)
    if not 1 <= port <= _U16_MAX:
        raise _Invalid(f"port must be from 1 to 65535, got {port} in {_quote(value)}")
    return port


def _ipv6_host(text: str) -> str | None:
    """Return ``text`` if it is an IPv6 address (optionally with a ``%zone``), else None."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return text


def _check_systemd(value: str) -> None:
    args = _split_endpoint_args(value)[1:]
    options: dict[str, str] = {}
    for arg in args:
        name, sep, val = arg.partition("=")
        if not sep or name not in ("domain", "index", "name"):
            raise _Invalid(
                f"systemd endpoint takes domain=, index= or name= arguments, got {_quote(arg)} "
                f"in {_quote(value)}"
            )
        options[name] = val
    domain = options.get("domain")
    if domain is None or not hasattr(socket, "AF_" + domain):
        raise _Invalid(f"systemd endpoint needs domain=INET, INET6 or UNIX in {_quote(value)}")
    if ("index" in options) == ("name" in options):
        raise _Invalid(f"systemd endpoint needs exactly one of index= or name= in {_quote(value)}")
    index = options.get("index")
    if index is not None and not (index.isascii() and index.isdigit()):
        raise _Invalid(
            f"systemd endpoint index must be a number, got {_quote(index)} in {_quote(value)}"
        )


def _passthrough(value: str) -> str:
    if value.startswith("systemd:"):
        # The systemd parser looks up inherited descriptors as it parses, which only
        # works under systemd; check the syntax here and leave the rest to startup.
        _check_systemd(value)
        return value
    try:
        # Parsing only: the endpoint is built against a fake reactor and never listens.
        reactor = MemoryReactor()  # type: ignore[no-untyped-call]
        serverFromString(reactor, value)  # type: ignore[no-untyped-call]
    except Exception as exc:  # the parsers raise ValueError, TypeError, KeyError...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise _Invalid(f"invalid Twisted endpoint string {_quote(value)}: {detail}") from exc
    if value.startswith("unix:"):
        args = _split_endpoint_args(value)[1:]
        address = next((a for a in args if "=" not in a), None)
        if address is None:
            address = next((a[8:] for a in args if a.startswith("address=")), "")
        if not address:
            raise _Invalid(f"unix endpoint needs a socket path, got {_quote(value)}")
    return value


def _listen_endpoint(value: str) -> str:
    if not value:
        raise _Invalid("must not be empty; use host:port (e.g. 127.0.0.1:5678)")
    if value.startswith(_ENDPOINT_PREFIXES):
        return _passthrough(value)
    if any(char.isspace() for char in value):
        raise _Invalid(f"must not contain spaces, got {_quote(value)}")
    if value.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", value)
        if match is None:
            raise _Invalid(f"expected [IPv6-address]:port, got {_quote(value)}")
        host = _ipv6_host(match.group(1))
        if host is None:
            raise _Invalid(f"{_quote(match.group(1))} is not an IPv6 address in {_quote(value)}")
        port = _parse_port(match.group(2), value)
        return f"tcp6:{port}:interface={_escape_endpoint_value(host)}"
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise _Invalid(
            f"expected host:port (e.g. 127.0.0.1:5678) or a Twisted endpoint string "
            f"(tcp:, tcp6:, unix:, ssl:, systemd:), got {_quote(value)}"
        )
    port = _parse_port(port_text, value)
    if not host:
        raise _Invalid(f"host is empty in {_quote(value)}; use 0.0.0.0:{port} for all interfaces")
    if ":" in host:
        # ztick splits at the last colon, so an unbracketed IPv6 address works there too.
        ipv6 = _ipv6_host(host)
        if ipv6 is None:
            raise _Invalid(f"{_quote(host)} is not an IPv6 address in {_quote(value)}")
        return f"tcp6:{port}:interface={_escape_endpoint_value(ipv6)}"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _is_hostname(host) or host.replace(".", "").isdigit():
            raise _Invalid(
                f"{_quote(host)} is not an IPv4 address or host name in {_quote(value)}"
            ) from None
    return f"tcp:{port}:interface={host}"


def listen_endpoint(value: str, *, section: str = "controller") -> str:
    """Turn a ``listen`` value into a Twisted server endpoint string.

    ztick's ``host:port`` becomes ``tcp:PORT:interface=HOST`` (``tcp6:`` for an IPv6
    host, written ``[::1]:5678``, or unbracketed ``::1:5678`` as ztick accepts, with
    colons escaped as Twisted requires; ``localhost`` becomes 127.0.0.1).  A value that
    already is a ``tcp:``, ``tcp6:``, ``unix:``, ``ssl:`` or ``systemd:`` endpoint string
    is checked with Twisted's parser and returned unchanged (port 0 is allowed there).

    Raises :class:`ConfigError` naming ``[section] listen`` (without a file) on garbage.
    """
    try:
        return _listen_endpoint(value)
    except _Invalid as exc:
        raise ConfigError(str(exc), section=section, key="listen") from None
