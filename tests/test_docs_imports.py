"""The Python the documentation shows imports what the package really has.

The guides show scripts (checking a config, converting a log, the clients) that users copy
as they are; a module split that moves a name must move the guide's import with it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
IMPORT = re.compile(r"^\s*from (ztick_tw[\w.]*) import ([\w, ]+?)\s*$", re.M)


def _imports() -> list[tuple[str, str, str]]:
    found = []
    for document in DOCUMENTS:
        for match in IMPORT.finditer(document.read_text()):
            for name in match.group(2).split(","):
                found.append((document.name, match.group(1), name.strip()))
    return found


def test_the_documents_show_imports() -> None:
    """The scan finds the guides' scripts (so the check below checks something)."""
    modules = {module for _, module, _ in _imports()}
    assert {"ztick_tw.config", "ztick_tw.tls", "ztick_tw.store.scanning"} <= modules


@pytest.mark.parametrize(("document", "module", "name"), _imports())
def test_every_name_a_document_imports_exists(document: str, module: str, name: str) -> None:
    """``from MODULE import NAME`` in a document works against the installed package."""
    assert hasattr(importlib.import_module(module), name), f"{document}: {module}.{name}"
