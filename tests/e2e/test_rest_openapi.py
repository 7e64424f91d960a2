"""The OpenAPI document: valid OpenAPI 3.1, and the running daemon keeps to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.e2e.daemon import daemon
from tests.ports import free_port
from ztick_tw.rest.bodies import RUNNER_FIELDS
from ztick_tw.rest.openapi import DOCUMENT

schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_document_is_valid_openapi_31() -> None:
    """openapi-spec-validator accepts the document, and it names all six runner kinds."""
    validate(DOCUMENT)  # raises on an invalid document
    runners = DOCUMENT["components"]["schemas"]["Runner"]["discriminator"]["mapping"]
    assert sorted(runners) == sorted(RUNNER_FIELDS)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One daemon with its REST API for every generated case (auth off)."""
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("schemathesis")
    with daemon(workdir, {"http": {"listen": f"tcp:{port}:interface=127.0.0.1"}}) as d:
        d.start()
        yield f"http://127.0.0.1:{port}"


@schema.parametrize()
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_keeps_to_its_document(case: schemathesis.Case[Any], base_url: str) -> None:
    """Generated requests never get a 500 nor an answer the document does not describe."""
    # Schema-valid is not always valid (a schedule's grammar, a runner URL): a 400 for
    # such a body is right, so only "valid data must be accepted" is left out.
    case.call_and_validate(
        base_url=base_url, timeout=10, excluded_checks=[positive_data_acceptance]
    )
