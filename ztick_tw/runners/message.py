"""What the network runners send, how webhooks are signed, and how URLs are shown in logs.

Shared by the ``http``, ``redis`` and ``amqp`` runners so that the three speak of a job
the same way:

* ``message_format = "ztick"`` (the default) sends exactly what ztick sends: the JSON
  body ``{"job_id":"<id>","execution":<ns>}`` for an http POST/PUT, and the bare job
  identifier for redis and amqp.
* ``message_format = "json"`` sends the richer JSON document of :func:`rich_body` to all
  three (and as the body of every http method that has one).

:func:`redact_url` is the only form in which a rule's URL or DSN may reach a log line or
a failure reason: it hides the password and any query string.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from ztick_tw.config import MessageFormatName
from ztick_tw.runners.base import Execution

__all__ = [
    "JOB_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "MessageFormat",
    "NetworkOptions",
    "http_body",
    "queue_message",
    "redact_url",
    "rich_body",
    "signature",
]

#: ``[runners] message_format``: one definition, shared with the config's validation.
MessageFormat = MessageFormatName

#: Webhook headers (sent when a signing secret is configured, the job id always).
SIGNATURE_HEADER = "X-Ztick-Signature"
TIMESTAMP_HEADER = "X-Ztick-Timestamp"
JOB_ID_HEADER = "X-Ztick-Job-Id"


@dataclass(frozen=True, slots=True)
class NetworkOptions:
    """How the ``http``, ``redis`` and ``amqp`` runners behave (``[runners]`` in the config).

    ``timeout``: seconds one delivery may take, connecting included (ztick: 30); the
    default of runs whose ``Execution.timeout`` is ``None``; 0 means no limit.
    ``message_format``: ``"ztick"`` (ztick's exact messages) or ``"json"`` (rich_body).
    ``http_ca_file``: PEM bundle that https certificates must chain to; ``None`` means
    the system's trust store.
    ``http_signing_secret``: key for the HMAC-SHA256 webhook signature; ``None`` = unsigned.
    ``http_max_response_bytes``: response body bytes read per request; a longer body is
    cut off (the job's outcome still comes from the status code).
    ``amqp_persistent``: publish with ``delivery_mode=2`` so a durable queue keeps the
    message across a broker restart.
    ``amqp_ca_file``: PEM bundle that ``amqps://`` brokers must chain to; ``None`` means
    the system's trust store.
    ``output_limit_bytes``: at most this many bytes of a response body's tail go into the
    outcome's ``output`` (http).
    """

    timeout: float = 30.0
    message_format: MessageFormat = "ztick"
    http_ca_file: str | None = None
    http_signing_secret: bytes | None = None
    http_max_response_bytes: int = 65536
    amqp_persistent: bool = True
    amqp_ca_file: str | None = None
    output_limit_bytes: int = 65536


def _json(document: dict[str, object]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def rich_body(execution: Execution) -> bytes:
    """The ``"json"`` message: job id, due time, fire time, attempt and rule id.

    ``execution`` and ``fired`` are nanoseconds since the Unix epoch (``execution`` is the
    time the job was set for, as in ztick's body); ``attempt`` counts from 1.
    """
    return _json(
        {
            "job_id": execution.job_id,
            "execution": execution.execution_ns,
            "fired": execution.fired_ns,
            "attempt": execution.attempt,
            "rule_id": execution.rule_id,
        }
    )


def http_body(execution: Execution, method: str, message_format: MessageFormat) -> bytes | None:
    """The request body for ``method``, or ``None`` for a request without one.

    ztick sends a body with POST and PUT only; the ``"json"`` format does the same.
    """
    if method not in ("POST", "PUT"):
        return None
    if message_format == "json":
        return rich_body(execution)
    return _json({"job_id": execution.job_id, "execution": execution.execution_ns})


def queue_message(execution: Execution, message_format: MessageFormat) -> bytes:
    """The redis value or AMQP message body: the job id (ztick), or ``rich_body``."""
    if message_format == "json":
        return rich_body(execution)
    return execution.job_id.encode("utf-8")


def signature(secret: bytes, timestamp: int, job_id: str, body: bytes | None) -> str:
    """The ``X-Ztick-Signature`` value: ``sha256=`` and a hex HMAC-SHA256.

    The signed bytes are ``"<timestamp>.<job id>.<body>"``, the body empty when the
    request has none, so a receiver can check both the sender and the job.
    """
    signed = b"%d." % timestamp + job_id.encode("utf-8") + b"." + (body or b"")
    return "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()


def redact_url(url: str) -> str:
    """``url`` fit for a log line: the password becomes ``***``, a query ``?***``.

    The user name, host, port and path stay, so an operator can still tell which
    endpoint failed.  An unparsable URL is shown as its scheme only.
    """
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError:
        return url.split(":", 1)[0] + "://<malformed>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        user = parts.username or ""
        if parts.password is not None:
            user += ":***"
        netloc = f"{user}@{netloc}"
    query = "?***" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"
