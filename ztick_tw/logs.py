"""Log output for operators: readable text or one JSON object per line, filtered by level."""

from __future__ import annotations

import sys
from typing import TextIO

from constantly import NamedConstant  # type: ignore[import-untyped]
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer


@implementer(ILogFilterPredicate)
class _Nothing:
    """``[log] level = "off"``: let no event through."""

    def __call__(self, event: LogEvent) -> NamedConstant:
        return PredicateResult.no


def make_observer(
    threshold: LogLevel | None = LogLevel.info, fmt: str = "text", stream: TextIO | None = None
) -> ILogObserver:
    """An observer writing events at ``threshold`` or above to ``stream`` (stderr by default).

    ``threshold`` is ``Config.log.min_level``: ``None`` (``[log] level = "off"``) shows
    nothing.

    ``fmt`` is ``text`` (Twisted's classic ``timestamp [namespace] message`` lines) or
    ``json`` (one JSON object per line with every named field, for log shippers).
    """
    out = stream if stream is not None else sys.stderr
    base = (
        jsonFileLogObserver(out, recordSeparator="") if fmt == "json" else textFileLogObserver(out)
    )
    if threshold is None:
        return FilteringLogObserver(base, [_Nothing()])
    return FilteringLogObserver(base, [LogLevelFilterPredicate(defaultLogLevel=threshold)])


def json_observer() -> ILogObserver:
    """``twistd --logger=ztick_tw.logs.json_observer``: JSON lines on stdout under twistd."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
