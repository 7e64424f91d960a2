"""Token authentication and namespaces (SPEC §3).

An auth file is TOML with one ``[token.<name>]`` table per client::

    [token.billing]
    secret = "s3cr3t-billing"
    namespace = "billing."     # job and rule ids this token may touch; "*" for all

Secrets are compared in constant time (every token is compared, whatever matches) and
never logged: only the token's *name* appears in log lines.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

ALL_NAMESPACES = "*"


class AuthFileError(Exception):
    """The auth file cannot be used; the message names the file and the token."""


@dataclass(frozen=True, slots=True)
class Token:
    """An authenticated identity: its name (for logs) and its namespace."""

    name: str
    namespace: str

    def allows(self, identifier: str) -> bool:
        """Whether a job or rule id (or a rule pattern) lies inside this namespace."""
        return self.namespace == ALL_NAMESPACES or identifier.startswith(self.namespace)


def _digest(secret: str) -> bytes:
    # Hashing first makes every comparison the same length, so timing does not even
    # reveal a secret's length.
    return hashlib.sha256(secret.encode("utf-8")).digest()


class TokenStore:
    """The tokens of one auth file; answers "who has this secret?" in constant time."""

    def __init__(self, tokens: list[tuple[Token, str]]) -> None:
        self._tokens = [(token, _digest(secret)) for token, secret in tokens]

    def __len__(self) -> int:
        return len(self._tokens)

    def authenticate(self, secret: str) -> Token | None:
        """The token whose secret is ``secret``, or ``None``; constant time."""
        offered = _digest(secret)
        found: Token | None = None
        for token, digest in self._tokens:
            if hmac.compare_digest(offered, digest):
                found = token
        return found


def parse_tokens(text: str, source: str) -> TokenStore:
    """Parse and check an auth file's text; ``source`` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuthFileError(f"{source}: invalid TOML: {e}") from None
    for key in document:
        if key != "token":
            raise AuthFileError(
                f"{source}: unexpected [{key}]: an auth file holds only [token.<name>] tables"
            )
    tables = document.get("token", {})
    if not isinstance(tables, dict):
        raise AuthFileError(f"{source}: token must be tables: [token.<name>]")
    tokens: list[tuple[Token, str]] = []
    owner: dict[str, str] = {}
    for name, table in tables.items():
        where = f"{source}: [token.{name}]"
        if not isinstance(table, dict):
            raise AuthFileError(f"{where}: must be a table with secret and namespace")
        _check_keys(where, table)
        secret = table.get("secret")
        if not isinstance(secret, str) or not secret:
            raise AuthFileError(f"{where}: secret is missing (a non-empty string is required)")
        namespace = table.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise AuthFileError(
                f'{where}: namespace is missing or empty (an id prefix, or "*" for all)'
            )
        digest = _digest(secret).hex()
        if digest in owner:
            raise AuthFileError(
                f"{where}: same secret as [token.{owner[digest]}]; every token needs its own"
            )
        owner[digest] = name
        tokens.append((Token(name, namespace), secret))
    return TokenStore(tokens)


def _check_keys(where: str, table: dict[str, Any]) -> None:
    for key in table:
        if key not in ("secret", "namespace"):
            raise AuthFileError(f"{where}: unknown key {key} (a token has secret and namespace)")


def load_tokens(path: str) -> tuple[TokenStore, list[str]]:
    """Read the auth file at ``path``; returns the tokens and warnings for the log.

    Warns when other users can read the file (its secrets would be theirs too).
    """
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            raw = f.read()
    except OSError as e:
        raise AuthFileError(f"{path}: cannot read auth file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AuthFileError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    warnings = []
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(
            f"{path}: auth file is readable by other users (mode {stat.S_IMODE(info.st_mode):o});"
            f" chmod 600 {path}"
        )
    store = parse_tokens(text, path)
    if not len(store):
        warnings.append(f"{path}: auth file has no [token.<name>] tables: nobody can log in")
    return store, warnings
