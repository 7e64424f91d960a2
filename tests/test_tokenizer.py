"""Tests for ``ztick_tw.protocol.tokenizer``: splitting protocol lines into tokens."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ztick_tw.protocol.tokenizer import (
    TokenizeError,
    _tokenize_quoted,
    decode_line,
    quote_token,
    tokenize,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("r1 SET job 123", ["r1", "SET", "job", "123"]),
        ("", []),
        ("     ", []),
        ("  r1   GET    job  ", ["r1", "GET", "job"]),
        ("single", ["single"]),
    ],
)
def test_plain_tokens_split_on_runs_of_spaces(text: str, expected: list[str]) -> None:
    """Tokens are separated by one or more spaces; leading/trailing spaces are ignored."""
    assert tokenize(text) == expected


def test_tab_is_part_of_a_token() -> None:
    """Only the space character separates tokens: a tab stays inside the token."""
    assert tokenize("a\tb c") == ["a\tb", "c"]
    assert tokenize('\t"x y"') == ["\t", "x y"]


def test_other_whitespace_is_part_of_a_token() -> None:
    """Carriage returns, vertical tabs and non-breaking spaces do not separate tokens."""
    assert tokenize("a\rb\x0bc\u00a0d e") == ["a\rb\x0bc\u00a0d", "e"]


def test_quoted_token_keeps_spaces() -> None:
    """A quoted token runs to the next quote and keeps the spaces inside it."""
    assert tokenize('r1 RULE SET r p shell "echo  hello world"') == [
        "r1",
        "RULE",
        "SET",
        "r",
        "p",
        "shell",
        "echo  hello world",
    ]


def test_empty_quoted_token_is_an_empty_token() -> None:
    """``""`` is a token of its own, the empty string."""
    assert tokenize('r1 QUERY ""') == ["r1", "QUERY", ""]
    assert tokenize('""') == [""]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r'"a\"b"', ['a"b']),
        (r'"a\\b"', ["a\\b"]),
        (r'"\n"', ["n"]),
        (r'"\x\y\ "', ["xy "]),
        (r'"\\"', ["\\"]),
        (r'"\""', ['"']),
    ],
)
def test_backslash_escapes_the_next_character(text: str, expected: list[str]) -> None:
    r"""Inside quotes, ``\x`` stands for ``x`` (so ``\"`` is ``"`` and ``\\`` is ``\``)."""
    assert tokenize(text) == expected


def test_backslash_outside_quotes_is_literal() -> None:
    """A backslash in a plain token is an ordinary character."""
    assert tokenize(r"a\b c\ d") == ["a\\b", "c\\", "d"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('ab"cd"', ["ab", "cd"]),
        ('"a"b', ["a", "b"]),
        ('ab"c d"e f', ["ab", "c d", "e", "f"]),
        ('"a""b"', ["a", "b"]),
        ('x "y"z', ["x", "y", "z"]),
    ],
)
def test_quote_in_plain_token_ends_it(text: str, expected: list[str]) -> None:
    """A quote in the middle of a plain token ends it and starts a quoted token."""
    assert tokenize(text) == expected


def test_unterminated_quote_raises_with_tokens_so_far() -> None:
    """An unterminated quote raises ``TokenizeError`` holding the tokens before it."""
    with pytest.raises(TokenizeError) as info:
        tokenize('r1 SET "job 123')
    assert info.value.tokens == ["r1", "SET"]
    assert "unterminated" in info.value.reason
    assert "column 7" in info.value.reason


def test_trailing_backslash_in_quote_is_unterminated() -> None:
    """A quoted token that ends in a lone backslash has no closing quote."""
    with pytest.raises(TokenizeError) as info:
        tokenize('a "b\\')
    assert info.value.tokens == ["a"]
    with pytest.raises(TokenizeError):
        tokenize('a "b\\"')


def test_unterminated_quote_as_first_token_has_no_tokens() -> None:
    """An unterminated quote at the start yields an error with an empty token list."""
    with pytest.raises(TokenizeError) as info:
        tokenize('  "abc')
    assert info.value.tokens == []


def test_tokenize_error_is_a_value_error() -> None:
    """``TokenizeError`` is a ``ValueError`` whose message is the reason."""
    err = TokenizeError("why", ["a"])
    assert isinstance(err, ValueError)
    assert str(err) == "why"


def test_decode_line_strips_one_trailing_cr() -> None:
    r"""``decode_line`` drops exactly one trailing ``\r`` and keeps inner ones."""
    assert decode_line(b"r1 STAT\r") == "r1 STAT"
    assert decode_line(b"r1 STAT\r\r") == "r1 STAT\r"
    assert decode_line(b"a\rb") == "a\rb"
    assert decode_line(b"") == ""
    assert decode_line(b"\r") == ""


def test_decode_line_is_utf8() -> None:
    """Lines are decoded as UTF-8."""
    assert decode_line("r1 SET jöb ✓ 1".encode()) == "r1 SET jöb ✓ 1"


@pytest.mark.parametrize(
    ("raw", "offset", "tokens"),
    [
        (b"\xff", 0, []),
        (b"r1 SET j\xc3 1", 8, ["r1", "SET"]),
        (b"r1 SET \xc3 1", 7, ["r1", "SET"]),
        (b"r1 GET\xff j", 6, ["r1"]),
        (b"abc\xe2\x82", 3, []),
        (b"ok \xed\xa0\x80", 3, ["ok"]),  # an encoded surrogate is not valid UTF-8
        (b'r1 SET "a b\xff"', 11, ["r1", "SET"]),
        (b"r1 GET j\r\xff\r", 9, ["r1", "GET"]),
    ],
)
def test_decode_line_reports_invalid_utf8_offset(
    raw: bytes, offset: int, tokens: list[str]
) -> None:
    """Invalid UTF-8 raises ``TokenizeError`` naming the byte offset.

    Its tokens are the whole tokens before the bad byte (a token cut by it is dropped).
    """
    with pytest.raises(TokenizeError) as info:
        decode_line(raw)
    assert info.value.reason == f"invalid UTF-8 at byte {offset}"
    assert info.value.tokens == tokens


@pytest.mark.parametrize(
    ("token", "rendered"),
    [
        ("plain", "plain"),
        ("", '""'),
        ("a b", '"a b"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("tab\there", "tab\there"),
    ],
)
def test_quote_token_renders(token: str, rendered: str) -> None:
    """``quote_token`` leaves plain tokens alone and quotes/escapes the others."""
    assert quote_token(token) == rendered


@given(st.text().filter(lambda s: "\n" not in s))
@example("")
@example(" ")
@example('"')
@example("\\")
@example('\\"')
@example('a" b\\ "c')
def test_quote_token_round_trip(text: str) -> None:
    """For any text without a newline, ``tokenize(quote_token(x)) == [x]``."""
    assert tokenize(quote_token(text)) == [text]


@given(st.lists(st.text().filter(lambda s: "\n" not in s), max_size=6))
def test_quoted_tokens_joined_by_spaces_round_trip(tokens: list[str]) -> None:
    """Several quoted tokens joined by spaces read back as the same list."""
    line = " ".join(quote_token(t) for t in tokens)
    assert tokenize(line) == tokens


@given(st.text(alphabet=st.sampled_from(' ab"\\\t')))
def test_tokenize_never_raises_anything_but_tokenize_error(text: str) -> None:
    """Arbitrary input either tokenizes or raises ``TokenizeError``; nothing else."""
    try:
        tokens = tokenize(text)
    except TokenizeError as e:
        assert all(isinstance(t, str) for t in e.tokens)
    else:
        assert all(isinstance(t, str) for t in tokens)
        if '"' not in text:
            assert all(t and " " not in t for t in tokens)


@given(st.text(alphabet=st.sampled_from(" ab\\\t\r")))
def test_fast_path_agrees_with_general_tokenizer(text: str) -> None:
    """For lines without quotes, the fast split and the general scanner agree."""
    assert tokenize(text) == _tokenize_quoted(text)
