"""Clients for the ztick-tw line protocol (SPEC §11).

:class:`ZtickClient` is blocking (a context manager, pipelining with
:meth:`ZtickClient.pipeline`); :mod:`ztick_tw.client.tx` holds the Twisted client
(:func:`ztick_tw.client.tx.connect`).  Both send what :mod:`ztick_tw.client.wire` formats
and parse answers with it into :class:`Job`, :class:`Rule`, :class:`Schedule`,
:class:`Run`, :class:`Instant` and :class:`Policy`; an ``ERROR`` raises
:class:`ZtickError` (``reason`` holds the extension instructions' reason).
"""

from ztick_tw.client.blocking import Pipeline, ZtickClient, tls_context
from ztick_tw.client.wire import (
    Instant,
    Job,
    Policy,
    ProtocolError,
    Rule,
    Run,
    Schedule,
    ZtickError,
)

__all__ = [
    "Instant",
    "Job",
    "Pipeline",
    "Policy",
    "ProtocolError",
    "Rule",
    "Run",
    "Schedule",
    "ZtickClient",
    "ZtickError",
    "tls_context",
]
