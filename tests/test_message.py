"""What the network runners send, the webhook signature, and URLs as logs show them."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json

import pytest

from ztick_tw.model import HttpSpec
from ztick_tw.runners.base import Execution
from ztick_tw.runners.message import (
    http_body,
    queue_message,
    redact_url,
    rich_body,
    signature,
)

SPEC = HttpSpec("POST", "http://127.0.0.1/hook")
EXECUTION = Execution("backup.daily", 1_700_000_000_123_456_789, "backup.", 2, SPEC, 1_700_000_001)


def test_ztick_http_body_is_byte_exact() -> None:
    """POST and PUT carry ztick's body byte for byte: compact JSON, id then execution."""
    expected = b'{"job_id":"backup.daily","execution":1700000000123456789}'
    assert http_body(EXECUTION, "POST", "ztick") == expected
    assert http_body(EXECUTION, "PUT", "ztick") == expected


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("fmt", ["ztick", "json"])
def test_get_and_delete_have_no_body(method: str, fmt: str) -> None:
    """GET and DELETE requests are sent without a body in either format."""
    assert http_body(EXECUTION, method, fmt) is None  # type: ignore[arg-type]


def test_json_body_has_every_field() -> None:
    """The rich body names the job, its due and fire times, the attempt and the rule."""
    document = json.loads(rich_body(EXECUTION))
    assert document == {
        "job_id": "backup.daily",
        "execution": 1_700_000_000_123_456_789,
        "fired": 1_700_000_001,
        "attempt": 2,
        "rule_id": "backup.",
    }
    assert http_body(EXECUTION, "POST", "json") == rich_body(EXECUTION)
    assert queue_message(EXECUTION, "json") == rich_body(EXECUTION)


def test_json_body_carries_a_retry_attempt() -> None:
    """A third attempt says ``"attempt":3`` in every json message (http, redis, amqp)."""
    third = dataclasses.replace(EXECUTION, attempt=3, timeout=5.0)
    for body in (http_body(third, "PUT", "json"), queue_message(third, "json")):
        assert body is not None
        assert json.loads(body)["attempt"] == 3
    assert b'"attempt":3,' in rich_body(third)


def test_json_escapes_and_keeps_unicode() -> None:
    """Quotes and backslashes in an id are escaped; non-ASCII stays UTF-8 text."""
    execution = Execution('a"b\\c.é', 5, "r", 1, SPEC)
    body = http_body(execution, "POST", "ztick")
    assert body is not None
    assert json.loads(body)["job_id"] == 'a"b\\c.é'
    assert "é".encode() in body


def test_queue_message_is_the_job_id_in_ztick_format() -> None:
    """Redis and AMQP get the bare job id, as ztick sends it."""
    assert queue_message(EXECUTION, "ztick") == b"backup.daily"


def test_signature_is_hmac_of_timestamp_id_and_body() -> None:
    """The signature is sha256= and the HMAC of "<ts>.<job id>.<body>"."""
    body = b'{"x":1}'
    expected = hmac.new(b"k", b"1700000000.backup.daily." + body, hashlib.sha256).hexdigest()
    assert signature(b"k", 1_700_000_000, "backup.daily", body) == f"sha256={expected}"
    assert signature(b"k", 1_700_000_000, "backup.daily", None) != signature(
        b"other", 1_700_000_000, "backup.daily", None
    )
    assert signature(b"k", 1, "j", None) == signature(b"k", 1, "j", b"")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6379/3", "redis://:***@127.0.0.1:6379/3"),
        ("amqp://guest:guest@rabbit/%2f", "amqp://guest:***@rabbit/%2f"),
        ("amqp://alice@rabbit:5672/", "amqp://alice@rabbit:5672/"),
        ("https://hooks.example/path?token=abc", "https://hooks.example/path?***"),
        ("http://u:p@[::1]:8080/x", "http://u:***@[::1]:8080/x"),
        ("http://host/plain", "http://host/plain"),
    ],
)
def test_redact_url_hides_passwords_and_queries(url: str, shown: str) -> None:
    """Passwords become *** and query strings ?***; host, port, path and user stay."""
    assert redact_url(url) == shown


def test_redact_url_survives_a_malformed_url() -> None:
    """A URL that cannot be parsed is reduced to its scheme, not echoed."""
    assert redact_url("http://u:secret@host:notaport/") == "http://<malformed>"
