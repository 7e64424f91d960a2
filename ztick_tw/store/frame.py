"""The binary logfile format (SPEC §5): frames, entry types and their payload layouts.

A logfile is a sequence of frames with no header.  A frame is a ``u32`` big-endian
payload length followed by the payload; the first payload byte is the entry type:

==== ============ ==================================================================
type entry        payload after the type byte
==== ============ ==================================================================
0    job          string id, ``i64`` execution ns (BE), ``u8`` status
1    rule         string id, string pattern, ``u8`` runner kind, runner fields
2    job removal  string id
3    rule removal string id
16   schedule set string job id, string schedule text, string options, ``i64`` start ns
17   schedule rm  string job id
18   run state    string job id, ``u32`` runs, ``i64`` occurrence ns, ``u16`` attempt,
                  ``i64`` due ns
19   pause        string job id, ``u8`` 1 paused / 0 resumed, ``i64`` since ns
20   rule policy  string rule id, ``i64`` timeout ns, ``u32`` retries, ``i64`` backoff min
                  ns, ``i64`` backoff max ns
==== ============ ==================================================================

Types 16-20 are ztick-tw's extension (SPEC §8-9, ``docs/logfile.md``).  In them "none"
is ``I64_MIN`` for a time or duration and ``0xFFFFFFFF`` for the retry count (a policy
key left to the ``[runners]`` default, an ended schedule's occurrence).  A type from 21
up is a frame of a newer ztick-tw: ``Scan`` skips it and counts it (``skipped``), as
ztick skips the types it does not know, so a newer log still loads.  Types 4-15 stay
damage (``corrupt``), as does any malformed frame of a known type.

Strings are a ``u16`` big-endian byte count followed by that many UTF-8 bytes.  Runner
fields: 0 shell (command); 1 amqp (dsn, exchange, routing_key); 2 direct (executable,
``u16`` count, strings); 3 awf (workflow, ``u16`` count, ``key=value`` strings); 4 http
(method, url); 5 redis (url, command, key).

This module holds what the encoder (``codec``), the decoder (``decoding``) and the scan
(``scanning``) share: the limits, the type bytes, the fixed-size layouts and the errors.
"""

from __future__ import annotations

import struct
from typing import Final

from ztick_tw.model import JobStatus, RunnerKind

__all__ = [
    "FIRST_UNKNOWN_TYPE",
    "FRAME_HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "NONE_U32",
    "TYPE_JOB",
    "TYPE_JOB_REMOVAL",
    "TYPE_PAUSE",
    "TYPE_RULE",
    "TYPE_RULE_POLICY",
    "TYPE_RULE_REMOVAL",
    "TYPE_RUN_STATE",
    "TYPE_SCHEDULE_REMOVAL",
    "TYPE_SCHEDULE_SET",
    "CodecError",
    "UnknownEntryType",
]

#: The largest payload a frame may declare.  No writer produces more (the encoder
#: refuses), so a larger declared length can only be damage: "impossible length".
MAX_FRAME_BYTES: Final = 1 << 20

#: Size of the length prefix in front of every payload.
FRAME_HEADER_BYTES: Final = 4

TYPE_JOB: Final = 0
TYPE_RULE: Final = 1
TYPE_JOB_REMOVAL: Final = 2
TYPE_RULE_REMOVAL: Final = 3
TYPE_SCHEDULE_SET: Final = 16
TYPE_SCHEDULE_REMOVAL: Final = 17
TYPE_RUN_STATE: Final = 18
TYPE_PAUSE: Final = 19
TYPE_RULE_POLICY: Final = 20
#: The first entry type this version does not know: frames of this type and above are
#: skipped by a scan (a newer ztick-tw wrote them).  Types 4-15 are damage.
FIRST_UNKNOWN_TYPE: Final = 21
#: "No value" for a ``u32`` count (a policy's retries left to the default).
NONE_U32: Final = 0xFFFFFFFF

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_POLICY_TAIL = struct.Struct(">qIqq")  # timeout ns, retries, backoff min ns, backoff max ns
_PAUSE_TAIL = struct.Struct(">Bq")  # paused flag, since ns
_I64 = struct.Struct(">q")
RUN_STATE_TAIL: Final = struct.Struct(">IqHq")  # runs, occurrence ns, attempt, due ns
_FRAME_HEAD = struct.Struct(">IBH")  # frame length, type byte, length of the first string

_STATUS_BY_BYTE: Final = tuple(JobStatus)  # index = status byte
_VALID_STATUS: Final = frozenset(JobStatus)
_KIND_BY_BYTE: Final = tuple(RunnerKind)


class CodecError(ValueError):
    """An entry cannot be encoded, or bytes are not a valid payload; says what and where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownEntryType(CodecError):
    """The payload's entry type is 21 or more: a newer version's frame (``Scan`` skips it)."""

    def __init__(self, entry_type: int) -> None:
        super().__init__(
            f"unknown entry type byte {entry_type} (a frame type of a newer ztick-tw; "
            f"this version knows 0-3 and 16-{FIRST_UNKNOWN_TYPE - 1})"
        )
        self.entry_type = entry_type


def _preview(text: str) -> str:
    """A short printable form of a possibly huge string, for error messages."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."
