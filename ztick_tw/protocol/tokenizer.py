r"""Split one protocol line into tokens, exactly as ztick does.

Tokens are separated by one or more spaces (only the space character; a tab is part
of a token).  A token that starts with ``"`` runs to the next unescaped ``"``; inside
it ``\\x`` stands for ``x`` and spaces are kept.  A quote in the middle of a plain
token ends that token and starts a quoted one.
"""

from __future__ import annotations

SPACE = " "
QUOTE = '"'
BACKSLASH = "\\"


class TokenizeError(ValueError):
    """The line cannot be split; ``tokens`` holds what was read before the problem."""

    def __init__(self, reason: str, tokens: list[str]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tokens = tokens


def decode_line(line: bytes) -> str:
    r"""Decode a raw line (without its ``\n``), dropping one trailing ``\r``.

    Raises ``TokenizeError`` naming the byte offset of invalid UTF-8; its ``tokens``
    are the whole tokens before the bad byte (so a known instruction can be answered).
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        head = line[: e.start].decode("utf-8")
        try:
            tokens = tokenize(head)
        except TokenizeError as t:
            tokens = t.tokens
        else:
            if tokens and not head.endswith(SPACE):
                tokens.pop()  # the last token runs into the bad byte
        raise TokenizeError(f"invalid UTF-8 at byte {e.start}", tokens) from None


def tokenize(text: str) -> list[str]:
    """Split a decoded line into tokens (see the module docstring for the rules)."""
    if QUOTE not in text:
        # Fast path: the common case has no quotes at all.
        return [t for t in text.split(SPACE) if t]
    return _tokenize_quoted(text)


def _tokenize_quoted(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    end = len(text)
    while True:
        while pos < end and text[pos] == SPACE:
            pos += 1
        if pos >= end:
            return tokens
        if text[pos] == QUOTE:
            start = pos
            pos += 1
            chars: list[str] = []
            while True:
                if pos >= end:
                    raise TokenizeError(
                        f"unterminated quoted token starting at column {start}", tokens
                    )
                c = text[pos]
                if c == QUOTE:
                    pos += 1
                    break
                if c == BACKSLASH:
                    pos += 1
                    if pos >= end:
                        raise TokenizeError(
                            f"unterminated quoted token starting at column {start}", tokens
                        )
                    c = text[pos]
                chars.append(c)
                pos += 1
            tokens.append("".join(chars))
        else:
            start = pos
            while pos < end and text[pos] != SPACE and text[pos] != QUOTE:
                pos += 1
            tokens.append(text[start:pos])


def quote_token(token: str) -> str:
    """Render ``token`` so that ``tokenize`` reads it back as one token."""
    if token and SPACE not in token and QUOTE not in token and BACKSLASH not in token:
        return token
    escaped = token.replace(BACKSLASH, BACKSLASH * 2).replace(QUOTE, BACKSLASH + QUOTE)
    return QUOTE + escaped + QUOTE
