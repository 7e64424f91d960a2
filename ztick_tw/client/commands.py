"""The CLI's instructions: words in (human times allowed), typed call, text or JSON out.

:func:`execute` runs one instruction, given as words (``["SET", "backup.daily", "in",
"5m"]``), on a :class:`~ztick_tw.client.ZtickClient` and returns what to print.  Times
are shown as local ISO 8601 with every nanosecond; ``--json`` output gives both the
nanoseconds and UTC ISO text.  A usage problem raises :class:`Usage` (exit status 2), an
``ERROR`` answer :class:`~ztick_tw.client.ZtickError` (exit status 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from ztick_tw.client.blocking import ZtickClient
from ztick_tw.client.times import TimeError, iso_local, iso_utc, parse_when
from ztick_tw.client.wire import Job, Rule, Run, Schedule, quote

#: Instruction words, with the second word of the two-word ones.
SUBWORDS = {"RULE": ("SET", "POLICY"), "SCHEDULE": ("SET", "GET", "REMOVE")}
HELP = """\
instructions (times: in 5m, +90s, now, today 18:00, tomorrow 02:00, 2030-01-01 02:00,
2030-01-01 02:00 UTC, or nanoseconds; local time unless a zone is given):
  SET <job> <time>                      GET <job>            REMOVE <job>
  QUERY [<prefix>]                      STAT                 LISTRULES
  RULE SET <rule> <pattern> <runner> <args...>               REMOVERULE <rule>
  RULE POLICY <rule> [timeout=30s] [retries=2] [backoff=1s..5m]
  SCHEDULE SET <job> "<schedule>" [key=value ...]            SCHEDULE GET <job>
  SCHEDULE REMOVE <job>                 LISTSCHEDULES [<prefix>]
  PREVIEW "<schedule>" [<count>] [key=value ...]
  PAUSE <job>   RESUME <job>   RUN <job>   HISTORY <job> [<n>]
  HELP   QUIT"""


class Usage(ValueError):
    """The words are not a valid instruction (exit status 2)."""


def _need(words: Sequence[str], count: int, shape: str) -> None:
    if len(words) < count:
        raise Usage(f"usage: {shape}")


def _options(words: Sequence[str]) -> dict[str, str]:
    out = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise Usage(f"{word!r} is not an option (key=value)")
        out[key] = value
    return out


def _when(words: Sequence[str], now: datetime) -> int:
    try:
        return parse_when(words, now)
    except TimeError as e:
        raise Usage(str(e)) from None


def _ns_text(ns: int | None) -> str:
    return "-" if ns is None else iso_local(ns)


def _ns_json(ns: int | None) -> dict[str, Any] | None:
    return None if ns is None else {"ns": ns, "utc": iso_utc(ns)}


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "execution_ns": job.execution_ns,
        "execution": iso_utc(job.execution_ns),
    }


def _job_text(job: Job, with_id: bool) -> str:
    head = f"{job.id} " if with_id else ""
    return f"{head}{job.status} {iso_local(job.execution_ns)}"


def _rule_json(rule: Rule) -> dict[str, Any]:
    return {"id": rule.id, "pattern": rule.pattern, "runner": rule.runner, "args": rule.args}


def _schedule_text(s: Schedule, with_id: bool) -> str:
    opts = " ".join(f"{k}={quote(v) if ' ' in v else v}" for k, v in s.options.items())
    head = f"{s.job_id} " if with_id else ""
    return (
        f"{head}{quote(s.text)} {opts} next={_ns_text(s.next_ns)} runs={s.runs}"
        f" paused={int(s.paused)}"
    )


def _schedule_json(s: Schedule) -> dict[str, Any]:
    return {
        "job": s.job_id,
        "schedule": s.text,
        "options": s.options,
        "next": _ns_json(s.next_ns),
        "runs": s.runs,
        "paused": s.paused,
    }


def _run_text(r: Run) -> str:
    exit_text = "-" if r.exit is None else str(r.exit)
    return (
        f"run={r.run} due={iso_local(r.due_ns)} started={_ns_text(r.started_ns)}"
        f" ended={_ns_text(r.ended_ns)} outcome={r.outcome} attempt={r.attempt}"
        f" exit={exit_text} detail={json.dumps(r.detail)} output={json.dumps(r.output)}"
    )


def _run_json(r: Run) -> dict[str, Any]:
    return {
        "run": r.run,
        "due": _ns_json(r.due_ns),
        "started": _ns_json(r.started_ns),
        "ended": _ns_json(r.ended_ns),
        "outcome": r.outcome,
        "attempt": r.attempt,
        "exit": r.exit,
        "detail": r.detail,
        "output": r.output,
    }


class Result:
    """What an instruction gives: data for ``--json`` and lines for people."""

    def __init__(self, data: Any, lines: list[str]) -> None:
        self.data = data
        self.lines = lines

    def render(self, as_json: bool) -> str:
        """The text to print (no trailing newline)."""
        if as_json:
            return json.dumps(self.data, ensure_ascii=False)
        return "\n".join(self.lines)


OK = Result({"ok": True}, ["OK"])


def normalize(words: Sequence[str]) -> list[str]:
    """Instruction words upper-cased (``get`` is ``GET``, ``rule set`` is ``RULE SET``)."""
    out = list(words)
    if out:
        out[0] = out[0].upper()
        if out[0] in SUBWORDS and len(out) > 1:
            out[1] = out[1].upper()
    return out


def execute(client: ZtickClient, words: Sequence[str], now: datetime) -> Result:
    """Run one instruction (words already split, instruction words normalized)."""
    if not words:
        raise Usage("an instruction is needed (HELP lists them)")
    head = words[0]
    handler = _HANDLERS.get(head)
    if handler is None:
        raise Usage(f"unknown instruction {head!r} (HELP lists them)")
    return handler(client, list(words[1:]), now)


def _set(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 2, "SET <job> <time>")
    ns = _when(w[1:], now)
    c.set(w[0], ns)
    return Result({"ok": True, "execution": _ns_json(ns)}, [f"OK {iso_local(ns)}"])


def _get(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 1, "GET <job>")
    job = c.get(w[0])
    return Result(_job_json(job), [_job_text(job, False)])


def _query(c: ZtickClient, w: list[str], now: datetime) -> Result:
    jobs = c.query(w[0] if w else "")
    return Result([_job_json(j) for j in jobs], [_job_text(j, True) for j in jobs])


def _remove(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 1, "REMOVE <job>")
    c.remove(w[0])
    return OK


def _rule(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 2, "RULE SET <rule> <pattern> <runner> <args...> | RULE POLICY <rule> [k=v]")
    if w[0] == "SET":
        _need(w, 4, "RULE SET <rule> <pattern> <runner> <args...>")
        c.rule_set(w[1], w[2], w[3], *w[4:])
        return OK
    if w[0] == "POLICY":
        p = c.rule_policy(w[1], _options(w[2:]))
        data = {"timeout": p.timeout, "retries": p.retries, "backoff": p.backoff}
        return Result(
            data, [f"timeout={p.timeout or '-'} retries={p.retries} backoff={p.backoff}"]
        )
    raise Usage("RULE is followed by SET or POLICY")


def _removerule(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 1, "REMOVERULE <rule>")
    c.remove_rule(w[0])
    return OK


def _listrules(c: ZtickClient, w: list[str], now: datetime) -> Result:
    rules = c.list_rules()
    lines = [" ".join([r.id, quote(r.pattern), r.runner, *r.args]) for r in rules]
    return Result([_rule_json(r) for r in rules], lines)


def _stat(c: ZtickClient, w: list[str], now: datetime) -> Result:
    stats = c.stat()
    return Result(stats, [f"{k} {v}" for k, v in stats.items()])


def _schedule(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 2, "SCHEDULE SET|GET|REMOVE <job> ...")
    if w[0] == "SET":
        _need(w, 3, 'SCHEDULE SET <job> "<schedule>" [key=value ...]')
        first = c.schedule_set(w[1], w[2], _options(w[3:]))
        return Result({"first": _ns_json(first)}, [f"OK first run {iso_local(first)}"])
    if w[0] == "GET":
        s = c.schedule_get(w[1])
        return Result(_schedule_json(s), [_schedule_text(s, False)])
    if w[0] == "REMOVE":
        c.schedule_remove(w[1])
        return OK
    raise Usage("SCHEDULE is followed by SET, GET or REMOVE")


def _listschedules(c: ZtickClient, w: list[str], now: datetime) -> Result:
    found = c.list_schedules(w[0] if w else "")
    return Result([_schedule_json(s) for s in found], [_schedule_text(s, True) for s in found])


def _preview(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 1, 'PREVIEW "<schedule>" [<count>] [key=value ...]')
    count = int(w[1]) if len(w) > 1 and w[1].isdigit() else None
    found = c.preview(w[0], count, _options(w[2 if count is not None else 1 :]))
    data = [{"ns": i.ns, "utc": iso_utc(i.ns), "iso": i.iso} for i in found]
    return Result(data, [iso_local(i.ns) for i in found])


def _simple(method: Callable[[ZtickClient, str], None], shape: str) -> Any:
    def handler(c: ZtickClient, w: list[str], now: datetime) -> Result:
        _need(w, 1, shape)
        method(c, w[0])
        return OK

    return handler


def _history(c: ZtickClient, w: list[str], now: datetime) -> Result:
    _need(w, 1, "HISTORY <job> [<n>]")
    if len(w) > 1 and not w[1].isdigit():
        raise Usage(f"HISTORY count {w[1]!r} is not a number")
    runs = c.history(w[0], int(w[1]) if len(w) > 1 else None)
    return Result([_run_json(r) for r in runs], [_run_text(r) for r in runs])


_HANDLERS: dict[str, Callable[[ZtickClient, list[str], datetime], Result]] = {
    "SET": _set,
    "GET": _get,
    "QUERY": _query,
    "REMOVE": _remove,
    "RULE": _rule,
    "REMOVERULE": _removerule,
    "LISTRULES": _listrules,
    "STAT": _stat,
    "SCHEDULE": _schedule,
    "LISTSCHEDULES": _listschedules,
    "PREVIEW": _preview,
    "PAUSE": _simple(ZtickClient.pause, "PAUSE <job>"),
    "RESUME": _simple(ZtickClient.resume, "RESUME <job>"),
    "RUN": _simple(ZtickClient.run, "RUN <job>"),
    "HISTORY": _history,
}
