"""ztick logfiles built by hand from SPEC §5, and a reader that loads them as ztick does.

Nothing here imports ztick_tw: the frames are packed with ``struct`` straight from the
SPEC table, and the reader decodes them the same way, so the interop tests compare
ztick-tw's codec, store, daemon and ``dump`` with an independent reading of the SPEC.

* Records (``SetJob``, ``SetRule``, ``RemoveJob``, ``RemoveRule``) say what a frame means;
  ``encode`` packs one as a frame; ``replay`` gives the state ztick would load (jobs and
  rules in separate tables, last write wins, removals delete); ``text_line``,
  ``json_line`` and ``listrules_line`` render one as SPEC §6 and §1 say.
* ``read_log`` mimics ztick's loader: a frame is a ``u32`` big-endian length and that
  many payload bytes; it stops at an incomplete frame (the bytes are kept in
  ``remaining``) and skips, with their offsets, frames it cannot decode.
* ``FIXTURES`` describes the byte fixtures in ``tests/fixtures/ztick/``;
  ``python -m tests.ztick_frames`` writes them again (a test checks they match).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "ztick"

#: Status names in status-byte order (SPEC §5: 0 planned, 1 triggered, 2 executed, 3 failed).
STATUSES = ("planned", "triggered", "executed", "failed")
#: Runner kinds in kind-byte order (0 shell, 1 amqp, 2 direct, 3 awf, 4 http, 5 redis).
KINDS = ("shell", "amqp", "direct", "awf", "http", "redis")

#: The fixed string fields of each runner kind, in frame order, with their dump JSON names.
FIELDS: dict[str, tuple[str, ...]] = {
    "shell": ("command",),
    "amqp": ("dsn", "exchange", "routing_key"),
    "direct": ("executable",),
    "awf": ("workflow",),
    "http": ("method", "url"),
    "redis": ("url", "command", "key"),
}
#: Kinds whose fixed fields are followed by a ``u16`` count and that many strings.
LISTS: dict[str, str] = {"direct": "args", "awf": "inputs"}

#: 2100-01-01T00:00:00Z: planned jobs at this time never come due during a test.
FAR = 4102444800 * 10**9
#: The SPEC worked example's time, 2020-11-15T16:30:00Z.
PAST = 1605457800000000000


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Runner:
    """A rule's runner: its kind, fixed string fields, and the list (direct, awf only)."""

    kind: str
    strings: tuple[str, ...]
    items: tuple[str, ...] | None = None

    def args(self) -> list[str]:
        """The words after the runner word, as RULE SET, LISTRULES and dump write them."""
        if self.kind == "awf":
            out = list(self.strings)
            for item in self.items or ():
                out += ["--input", item]
            return out
        return [*self.strings, *(self.items or ())]

    def json_object(self) -> dict[str, object]:
        """The runner object of dump's JSON output."""
        obj: dict[str, object] = {"type": self.kind}
        obj.update(zip(FIELDS[self.kind], self.strings, strict=True))
        if self.kind in LISTS:
            obj[LISTS[self.kind]] = list(self.items or ())
        return obj


def shell(command: str) -> Runner:
    """``shell <command>``."""
    return Runner("shell", (command,))


def amqp(dsn: str, exchange: str, routing_key: str) -> Runner:
    """``amqp <dsn> <exchange> <routing_key>``."""
    return Runner("amqp", (dsn, exchange, routing_key))


def direct(executable: str, *args: str) -> Runner:
    """``direct <executable> [args...]``."""
    return Runner("direct", (executable,), tuple(args))


def awf(workflow: str, *inputs: str) -> Runner:
    """``awf <workflow> [--input key=value ...]``."""
    return Runner("awf", (workflow,), tuple(inputs))


def http(method: str, url: str) -> Runner:
    """``http <method> <url>``."""
    return Runner("http", (method, url))


def redis(url: str, command: str, key: str) -> Runner:
    """``redis <url> <command> <key>``."""
    return Runner("redis", (url, command, key))


@dataclass(frozen=True)
class SetJob:
    """Type 0: a job with its execution time and status."""

    id: str
    ns: int
    status: str = "planned"


@dataclass(frozen=True)
class SetRule:
    """Type 1: a rule."""

    id: str
    pattern: str
    runner: Runner


@dataclass(frozen=True)
class RemoveJob:
    """Type 2: a job removal."""

    id: str


@dataclass(frozen=True)
class RemoveRule:
    """Type 3: a rule removal."""

    id: str


Record = SetJob | SetRule | RemoveJob | RemoveRule


# ----------------------------------------------------------------------------- encoding


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def frame(payload: bytes) -> bytes:
    """``u32`` big-endian payload length, then the payload."""
    return struct.pack(">I", len(payload)) + payload


def encode(record: Record) -> bytes:
    """The frame of ``record``, packed from the SPEC §5 table."""
    if isinstance(record, SetJob):
        payload = (
            b"\x00"
            + _string(record.id)
            + struct.pack(">qB", record.ns, STATUSES.index(record.status))
        )
    elif isinstance(record, SetRule):
        runner = record.runner
        parts = [b"\x01", _string(record.id), _string(record.pattern)]
        parts.append(struct.pack(">B", KINDS.index(runner.kind)))
        parts += [_string(s) for s in runner.strings]
        if runner.kind in LISTS:
            items = runner.items or ()
            parts.append(struct.pack(">H", len(items)))
            parts += [_string(item) for item in items]
        payload = b"".join(parts)
    elif isinstance(record, RemoveJob):
        payload = b"\x02" + _string(record.id)
    else:
        payload = b"\x03" + _string(record.id)
    return frame(payload)


def encode_all(records: Iterable[Record]) -> bytes:
    """The frames of ``records``, one after the other."""
    return b"".join(encode(r) for r in records)


# ----------------------------------------------------------------------------- reading


class _Undecodable(Exception):
    pass


class _Payload:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise _Undecodable(f"needs {count} bytes at payload offset {self.pos}")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u8(self) -> int:
        value: int = struct.unpack(">B", self.take(1))[0]
        return value

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def i64(self) -> int:
        value: int = struct.unpack(">q", self.take(8))[0]
        return value

    def string(self) -> str:
        raw = self.take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Undecodable(f"invalid UTF-8: {exc}") from None

    def done(self) -> None:
        if self.pos != len(self.data):
            raise _Undecodable(f"{len(self.data) - self.pos} trailing bytes")


def decode(payload: bytes) -> Record:
    """One payload (type byte first) as a record; ValueError if it does not decode."""
    try:
        p = _Payload(payload)
        kind = p.u8()
        record: Record
        if kind == 0:
            job_id, ns, status = p.string(), p.i64(), p.u8()
            if status >= len(STATUSES):
                raise _Undecodable(f"status byte {status}")
            record = SetJob(job_id, ns, STATUSES[status])
        elif kind == 1:
            rule_id, pattern, runner_kind = p.string(), p.string(), p.u8()
            if runner_kind >= len(KINDS):
                raise _Undecodable(f"runner kind {runner_kind}")
            name = KINDS[runner_kind]
            strings = tuple(p.string() for _ in FIELDS[name])
            items = tuple(p.string() for _ in range(p.u16())) if name in LISTS else None
            record = SetRule(rule_id, pattern, Runner(name, strings, items))
        elif kind == 2:
            record = RemoveJob(p.string())
        elif kind == 3:
            record = RemoveRule(p.string())
        else:
            raise _Undecodable(f"entry type {kind}")
        p.done()
    except _Undecodable as exc:
        raise ValueError(str(exc)) from None
    return record


@dataclass
class ZtickLog:
    """What ztick's loader makes of a logfile."""

    records: list[Record] = field(default_factory=list)
    #: Byte offsets of complete frames that did not decode (ztick warns and skips them).
    skipped: list[int] = field(default_factory=list)
    #: The incomplete last frame, which ztick's reader stops at.
    remaining: bytes = b""
    #: Offset of ``remaining`` (the end of the last complete frame).
    end: int = 0


def read_log(data: bytes) -> ZtickLog:
    """Read ``data`` as ztick's loader does (length-prefixed frames, stop when incomplete)."""
    log = ZtickLog()
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            break
        (size,) = struct.unpack_from(">I", data, pos)
        if pos + 4 + size > len(data):
            break
        try:
            log.records.append(decode(data[pos + 4 : pos + 4 + size]))
        except ValueError:
            log.skipped.append(pos)
        pos += 4 + size
    log.remaining = data[pos:]
    log.end = pos
    return log


# ----------------------------------------------------------------------------- state


@dataclass
class State:
    """Live jobs (``id -> (ns, status)``) and rules (``id -> SetRule``), in first-set order."""

    jobs: dict[str, tuple[int, str]] = field(default_factory=dict)
    rules: dict[str, SetRule] = field(default_factory=dict)


def replay(records: Iterable[Record]) -> State:
    """The state after ``records``: last write wins, removals delete; jobs and rules apart."""
    state = State()
    for r in records:
        if isinstance(r, SetJob):
            state.jobs[r.id] = (r.ns, r.status)
        elif isinstance(r, SetRule):
            state.rules[r.id] = r
        elif isinstance(r, RemoveJob):
            state.jobs.pop(r.id, None)
        else:
            state.rules.pop(r.id, None)
    return state


def compact(records: Sequence[Record]) -> list[Record]:
    """ztick-tw ``dump --compact``: survivors of each (kind, id), in order of last write."""
    live: dict[tuple[bool, str], Record] = {}
    for r in records:
        key = (isinstance(r, SetRule | RemoveRule), r.id)
        live.pop(key, None)
        if isinstance(r, SetJob | SetRule):
            live[key] = r
    return list(live.values())


def ztick_compress(records: Sequence[Record]) -> list[Record]:
    """What ztick's background compaction writes to ``logfile.compressed``.

    The last frame of every id (jobs and rules share one id space there), in file
    order, except ids whose last frame is a removal.
    """
    last = {r.id: i for i, r in enumerate(records)}
    return [
        r
        for i, r in enumerate(records)
        if last[r.id] == i and not isinstance(r, RemoveJob | RemoveRule)
    ]


# ----------------------------------------------------------------------------- rendering


def text_line(record: Record) -> str:
    """SPEC §6 text dump line."""
    if isinstance(record, SetJob):
        return f"SET {record.id} {record.ns} {record.status}"
    if isinstance(record, SetRule):
        return f"RULE SET {listrules_line(record)}"
    if isinstance(record, RemoveJob):
        return f"REMOVE {record.id}"
    return f"REMOVERULE {record.id}"


def json_object(record: Record) -> dict[str, object]:
    """SPEC §6 JSON dump object (keys in ztick's order)."""
    if isinstance(record, SetJob):
        return {
            "type": "set",
            "identifier": record.id,
            "execution": record.ns,
            "status": record.status,
        }
    if isinstance(record, SetRule):
        return {
            "type": "rule_set",
            "identifier": record.id,
            "pattern": record.pattern,
            "runner": record.runner.json_object(),
        }
    if isinstance(record, RemoveJob):
        return {"type": "remove", "identifier": record.id}
    return {"type": "remove_rule", "identifier": record.id}


def json_line(record: Record) -> str:
    """``json_object`` written compactly, non-ASCII text as it is (as ztick writes it)."""
    return json.dumps(json_object(record), ensure_ascii=False, separators=(",", ":"))


def listrules_line(rule: SetRule) -> str:
    """The LISTRULES line of a rule, without the request id."""
    return " ".join([rule.id, rule.pattern, rule.runner.kind, *rule.runner.args()])


def query_lines(state: State) -> dict[str, tuple[str, int]]:
    """``{job: (status, ns)}`` as ``LineClient.query`` returns it."""
    return {job_id: (status, ns) for job_id, (ns, status) in state.jobs.items()}


# ----------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Fixture:
    """One fixture file: its frames, then raw ``tail`` bytes (a torn frame)."""

    name: str
    about: str
    records: tuple[Record, ...]
    tail: bytes = b""

    @property
    def path(self) -> Path:
        return FIXTURE_DIR / f"{self.name}.bin"

    def data(self) -> bytes:
        """The file's bytes."""
        return encode_all(self.records) + self.tail

    @property
    def good_end(self) -> int:
        """Where the whole frames end (the torn tail starts)."""
        return len(encode_all(self.records))

    def state(self) -> State:
        """The state ztick (and ztick-tw) load from it."""
        return replay(self.records)


EVERY_RUNNER_RULES: tuple[SetRule, ...] = (
    SetRule("rule.shell", "shell.", shell("echo hello; exit 0")),
    SetRule(
        "rule.amqp", "amqp.", amqp("amqp://guest:guest@127.0.0.1:5672/", "events", "job.done")
    ),
    SetRule("rule.amqp-default", "amqp.default.", amqp("amqp://u@127.0.0.1", "", "jobs")),
    SetRule("rule.direct", "direct.", direct("/usr/bin/curl", "-s", "http://example.com/", ";")),
    SetRule("rule.direct-bare", "direct.bare.", direct("/bin/true")),
    SetRule("rule.awf", "awf.", awf("generate-report", "format=pdf", "target=main")),
    SetRule("rule.awf-bare", "awf.bare.", awf("cleanup")),
    SetRule("rule.http", "http.", http("POST", "https://hooks.example.com/x?y=1")),
    SetRule("rule.redis", "redis.", redis("redis://127.0.0.1:6379/0", "RPUSH", "backup:tasks")),
)

UNICODE_ID = "café.☕.任务"

_ZTICK_WRITTEN: tuple[Record, ...] = (
    *EVERY_RUNNER_RULES,
    SetJob("shell.daily", PAST),
    SetJob("direct.ping", FAR),
    SetJob(UNICODE_ID, FAR + 1),
    SetJob("awf.report", PAST + 10**9),
    SetJob("awf.report", FAR + 2),  # set again: the later time wins
    SetJob("http.gone", FAR),
    RemoveJob("http.gone"),
    SetRule("rule.gone", "gone.", shell("true")),
    RemoveRule("rule.gone"),
    SetRule("rule.shell", "shell.", shell("echo replaced")),  # set again
)

_EVERY_FRAME: tuple[Record, ...] = (
    *EVERY_RUNNER_RULES,
    SetRule("rule.gone", "gone.", shell("true")),
    SetRule("rule.shell", "shell.", shell("echo replaced")),
    SetJob("shell.planned", FAR),
    SetJob("shell.triggered", PAST, "triggered"),
    SetJob("shell.executed", PAST, "executed"),
    SetJob("direct.failed", PAST + 1, "failed"),
    SetJob("http.moved", PAST),
    SetJob("http.moved", FAR + 3),
    SetJob("removed.job", FAR),
    RemoveJob("removed.job"),
    SetJob(UNICODE_ID, FAR + 4),
    SetJob("before-1970", -(10**9), "executed"),
    RemoveRule("rule.gone"),
    RemoveJob("never.set"),  # removals of unknown ids are harmless
    RemoveRule("rule.never-set"),
    SetJob("redis.back", FAR),
    RemoveJob("redis.back"),
    SetJob("redis.back", FAR + 5),  # removed, then set again
    SetJob("amqp.planned-then-done", PAST),
    SetJob("amqp.planned-then-done", PAST, "triggered"),
    SetJob("amqp.planned-then-done", PAST, "executed"),  # the status frames ztick-tw adds
)

#: ztick's logfile when its compaction renamed it to ``logfile.to_compress``.
_LEFTOVER_TO_COMPRESS: tuple[Record, ...] = (
    SetRule("rule.old", "old.", shell("echo old")),
    SetRule("rule.kept", "kept.", direct("/bin/echo", "kept")),
    SetRule("rule.later-removed", "lr.", http("GET", "http://127.0.0.1:9/x")),
    SetJob("old.1", FAR),
    SetJob("old.2", FAR),
    SetJob("old.2", FAR + 5),
    SetJob("kept.1", FAR + 6),
    SetJob("gone.1", FAR),
    RemoveJob("gone.1"),
    SetJob("later-removed", FAR),
    SetJob(UNICODE_ID, FAR + 8),
)

#: ztick's fresh logfile after that rename.
_LEFTOVER_LOGFILE: tuple[Record, ...] = (
    SetJob("new.1", FAR + 9),
    RemoveJob("later-removed"),
    SetJob("old.1", FAR + 7),
    RemoveRule("rule.later-removed"),
    SetRule("rule.new", "new.", redis("redis://127.0.0.1:6379/1", "PUBLISH", "events")),
    SetRule("rule.old", "old.", awf("old-flow", "a=1")),
)

FIXTURES: dict[str, Fixture] = {
    f.name: f
    for f in (
        Fixture(
            "ztick-written",
            "what ztick writes: rules of every runner kind, planned SETs, removals",
            _ZTICK_WRITTEN,
        ),
        Fixture(
            "every-frame",
            "every frame type, runner kind and job status, a unicode id, re-sets",
            _EVERY_FRAME,
        ),
        Fixture(
            "torn-tail",
            "every-frame, then a job frame cut 3 bytes short (crash mid-write)",
            _EVERY_FRAME,
            encode(SetJob("torn.job", FAR))[:-3],
        ),
        Fixture(
            "torn-header",
            "ztick-written, then 2 bytes of a length header",
            _ZTICK_WRITTEN,
            encode(SetJob("torn.job", FAR))[:2],
        ),
        Fixture(
            "leftover-to-compress",
            "a ztick logfile.to_compress: the log when compaction renamed it",
            _LEFTOVER_TO_COMPRESS,
        ),
        Fixture(
            "leftover-compressed",
            "the logfile.compressed ztick's compaction makes of leftover-to-compress",
            tuple(ztick_compress(_LEFTOVER_TO_COMPRESS)),
        ),
        Fixture(
            "leftover-logfile",
            "ztick's fresh logfile after the rename to logfile.to_compress",
            _LEFTOVER_LOGFILE,
        ),
    )
}


def write_fixtures(directory: Path = FIXTURE_DIR) -> list[Path]:
    """(Re)write every fixture file; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fixture in FIXTURES.values():
        path = directory / f"{fixture.name}.bin"
        path.write_bytes(fixture.data())
        written.append(path)
    return written


def main(argv: Sequence[str]) -> int:
    """``python -m tests.ztick_frames``: regenerate the fixture files."""
    if argv:
        print("usage: python -m tests.ztick_frames", file=sys.stderr)
        return 2
    for path in write_fixtures():
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
