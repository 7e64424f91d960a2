"""Tests for ``ztick_tw.auth``: auth files, tokens, constant-time lookup, namespaces (SPEC §3)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import pytest

from ztick_tw.auth import AuthFileError, Token, TokenStore, load_tokens, parse_tokens

SOURCE = "/etc/ztick/auth.toml"

TWO_TOKENS = """\
[token.billing]
secret = "s3cr3t-billing-7f3a"
namespace = "billing."

[token.admin]
secret = "s3cr3t-admin-91c2"
namespace = "*"
"""


def write(tmp_path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    """Write an auth file with the given permission bits and return its path."""
    path = tmp_path / "auth.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    os.chmod(path, mode)
    return path


def refused(text: str) -> str:
    """The message of the ``AuthFileError`` that parsing ``text`` must raise."""
    with pytest.raises(AuthFileError) as info:
        parse_tokens(text, SOURCE)
    return str(info.value)


# -- parsing ----------------------------------------------------------------------------


def test_parse_valid_file_gives_every_token() -> None:
    """A valid file yields one token per table, each with its own name and namespace."""
    store = parse_tokens(TWO_TOKENS, SOURCE)
    assert len(store) == 2
    assert store.authenticate("s3cr3t-billing-7f3a") == Token("billing", "billing.")
    assert store.authenticate("s3cr3t-admin-91c2") == Token("admin", "*")


def test_parse_inline_tables_and_quoted_names() -> None:
    """Inline tables and quoted table names are ordinary TOML and are accepted."""
    text = 'token.a = { secret = "one", namespace = "a." }\n[token."team b"]\n'
    text += 'secret = "two"\nnamespace = "b."\n'
    store = parse_tokens(text, SOURCE)
    assert store.authenticate("one") == Token("a", "a.")
    assert store.authenticate("two") == Token("team b", "b.")


def test_parse_empty_document_has_no_tokens() -> None:
    """An empty file parses to an empty store (``load_tokens`` warns about it)."""
    store = parse_tokens("", SOURCE)
    assert len(store) == 0
    assert store.authenticate("anything") is None


@pytest.mark.parametrize(
    "table",
    [
        'namespace = "a."',
        'secret = ""\nnamespace = "a."',
        'secret = 42\nnamespace = "a."',
    ],
)
def test_missing_or_empty_secret_is_refused(table: str) -> None:
    """A token without a non-empty string secret is refused, naming file and token."""
    message = refused(f"[token.alpha]\n{table}\n")
    assert SOURCE in message
    assert "[token.alpha]" in message
    assert "secret" in message


@pytest.mark.parametrize(
    "table",
    [
        'secret = "x1"',
        'secret = "x1"\nnamespace = ""',
        'secret = "x1"\nnamespace = ["a."]',
    ],
)
def test_missing_or_empty_namespace_is_refused(table: str) -> None:
    """A token without a non-empty namespace is refused, naming file, token and key."""
    message = refused(f"[token.alpha]\n{table}\n")
    assert SOURCE in message
    assert "[token.alpha]" in message
    assert "namespace" in message


def test_duplicate_secret_names_both_tokens_and_not_the_secret() -> None:
    """Two tokens with one secret are refused; the message names both, never the secret."""
    text = (
        '[token.first]\nsecret = "shared-secret-55"\nnamespace = "a."\n'
        '[token.second]\nsecret = "other-secret"\nnamespace = "b."\n'
        '[token.third]\nsecret = "shared-secret-55"\nnamespace = "c."\n'
    )
    message = refused(text)
    assert SOURCE in message
    assert "[token.first]" in message
    assert "[token.third]" in message
    assert "second" not in message
    assert "shared-secret-55" not in message


def test_unknown_key_in_token_is_refused() -> None:
    """A key other than secret/namespace is refused (a typo must not go unnoticed)."""
    message = refused('[token.alpha]\nsecret = "x1"\nnamespace = "a."\nnamepsace = "b."\n')
    assert SOURCE in message
    assert "[token.alpha]" in message
    assert "namepsace" in message


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('[tokens.alpha]\nsecret = "x1"\nnamespace = "a."\n', "tokens"),
        ('[controller]\nlisten = "x"\n', "controller"),
        ('secret = "x1"\n', "secret"),
    ],
)
def test_other_top_level_entry_is_refused(text: str, name: str) -> None:
    """Anything at the top level other than ``token`` is refused, naming it."""
    message = refused(text)
    assert SOURCE in message
    assert name in message


@pytest.mark.parametrize(
    "text",
    [
        'token = "abc"\n',
        '[token]\nsecret = "x1"\nnamespace = "a."\n',
        "token = [1, 2]\n",
    ],
)
def test_token_that_is_not_a_table_of_tables_is_refused(text: str) -> None:
    """``token`` must hold ``[token.<name>]`` tables; other shapes are refused."""
    message = refused(text)
    assert SOURCE in message
    assert "token" in message


def test_invalid_toml_is_refused_without_echoing_the_secret() -> None:
    """Invalid TOML is refused, naming the file; the bad line's text is not repeated."""
    message = refused('[token.alpha]\nsecret = "never-echo-me\nnamespace = "a."\n')
    assert SOURCE in message
    assert "TOML" in message
    assert "never-echo-me" not in message


# -- loading files ----------------------------------------------------------------------


def test_load_valid_file_with_mode_600_has_no_warning(tmp_path: Path) -> None:
    """A file only its owner can read loads with its tokens and no warning."""
    path = write(tmp_path, TWO_TOKENS, 0o600)
    store, warnings = load_tokens(str(path))
    assert warnings == []
    assert len(store) == 2
    assert store.authenticate("s3cr3t-billing-7f3a") == Token("billing", "billing.")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_file_readable_by_others_warns(tmp_path: Path, mode: int) -> None:
    """A file readable by group or others loads, with one warning naming file and mode."""
    path = write(tmp_path, TWO_TOKENS, mode)
    store, warnings = load_tokens(str(path))
    assert len(store) == 2
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert f"{mode:o}" in warnings[0]
    assert "s3cr3t" not in warnings[0]


def test_load_file_with_no_tokens_warns(tmp_path: Path) -> None:
    """A file with no tokens loads (nobody can log in) with a warning naming the file."""
    path = write(tmp_path, "# nobody yet\n", 0o600)
    store, warnings = load_tokens(str(path))
    assert len(store) == 0
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert "no [token" in warnings[0]


def test_load_missing_file_is_refused(tmp_path: Path) -> None:
    """A missing auth file is refused, naming the file and the reason."""
    path = tmp_path / "nope.toml"
    with pytest.raises(AuthFileError) as info:
        load_tokens(str(path))
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_load_unreadable_path_is_refused(tmp_path: Path) -> None:
    """A path that cannot be read as a file (a directory) is refused, naming it."""
    with pytest.raises(AuthFileError) as info:
        load_tokens(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "cannot read" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_load_file_without_read_permission_is_refused(tmp_path: Path) -> None:
    """A file the daemon may not read is refused, naming it."""
    path = write(tmp_path, TWO_TOKENS, 0o000)
    with pytest.raises(AuthFileError) as info:
        load_tokens(str(path))
    assert str(path) in str(info.value)


def test_load_non_utf8_file_is_refused_with_offset(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are refused, naming the file and the byte offset."""
    data = b'[token.alpha]\nsecret = "caf\xe9"\nnamespace = "a."\n'
    path = write(tmp_path, data)
    with pytest.raises(AuthFileError) as info:
        load_tokens(str(path))
    message = str(info.value)
    offset = data.index(b"\xe9")
    assert str(path) in message
    assert "UTF-8" in message
    assert f"byte offset {offset}" in message


def test_load_names_the_file_in_parse_errors(tmp_path: Path) -> None:
    """Errors found while parsing a loaded file name that file's path."""
    path = write(tmp_path, '[token.alpha]\nsecret = "x1"\n')
    with pytest.raises(AuthFileError) as info:
        load_tokens(str(path))
    assert str(info.value).startswith(f"{path}: [token.alpha]")


# -- authenticate -----------------------------------------------------------------------


def store_of(*tokens: tuple[str, str, str]) -> TokenStore:
    """A store from ``(name, namespace, secret)`` triples."""
    return TokenStore([(Token(name, namespace), secret) for name, namespace, secret in tokens])


THREE = store_of(
    ("alpha", "a.", "alpha-secret-1"),
    ("beta", "b.", "beta-secret-22"),
    ("root", "*", "root-secret-333"),
)


@pytest.mark.parametrize(
    ("secret", "name"),
    [("alpha-secret-1", "alpha"), ("beta-secret-22", "beta"), ("root-secret-333", "root")],
)
def test_authenticate_returns_the_token_of_the_secret(secret: str, name: str) -> None:
    """The right secret gives exactly its own token."""
    token = THREE.authenticate(secret)
    assert token is not None
    assert token.name == name


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "wrong",
        "alpha-secret",  # a prefix of a secret
        "alpha-secret-",
        "alpha-secret-11",  # a secret plus more
        "ALPHA-SECRET-1",
        " alpha-secret-1",
        "beta-secret-22\n",
    ],
)
def test_authenticate_refuses_other_secrets(secret: str) -> None:
    """Empty, wrong, prefix, longer and case-changed secrets match no token."""
    assert THREE.authenticate(secret) is None


@pytest.mark.parametrize(
    "secret", ["", "wrong", "alpha-secret-1", "beta-secret-22", "root-secret-333", "x" * 5000]
)
def test_authenticate_compares_against_every_token(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    """Whatever the secret (matching first, last or none), every token is compared.

    Each comparison is ``hmac.compare_digest`` on equal-length digests, so the time
    taken does not tell which token matched, nor the length of any secret.
    """
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    THREE.authenticate(secret)
    assert len(calls) == len(THREE) == 3
    assert {lengths for lengths in calls} == {(32, 32)}


def test_authenticate_on_empty_store_finds_nothing() -> None:
    """A store without tokens authenticates nobody."""
    assert TokenStore([]).authenticate("") is None
    assert TokenStore([]).authenticate("x") is None


# -- namespaces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("namespace", "identifier", "allowed"),
    [
        ("*", "anything", True),
        ("*", "", True),
        ("*", "billing.1", True),
        ("billing.", "billing.1", True),
        ("billing.", "billing.", True),
        ("billing.", "billing.a.b", True),
        ("billing.", "billing", False),
        ("billing.", "billingx.1", False),
        ("billing.", "Billing.1", False),
        ("billing.", "", False),
        ("billing.", "x.billing.1", False),
        ("a", "ab", True),
        ("*x", "*x1", True),
        ("*x", "yx", False),
    ],
)
def test_token_allows_only_its_prefix(namespace: str, identifier: str, allowed: bool) -> None:
    """``*`` allows every id; any other namespace allows ids that start with it."""
    assert Token("t", namespace).allows(identifier) is allowed
