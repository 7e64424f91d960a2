"""Paths and methods onto operations: each request is one call into ``Operations``.

One leaf resource routes on the path's segments (a job id may hold ``%2F``: segments are
split before they are unquoted).  A change is answered once it is durable
(``when_durable``); errors are ``{"error": "..."}`` with ``Invalid`` 400, ``Denied``
403, ``NotFound`` 404, ``Unavailable`` 503, and 401 for a missing or unknown Bearer token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from ztick_tw.auth import TokenStore
from ztick_tw.operations import (
    ANONYMOUS,
    Caller,
    Denied,
    Durable,
    Invalid,
    JobQuery,
    NotFound,
    OperationError,
    Operations,
    Unavailable,
    when_durable,
)
from ztick_tw.rest import bodies
from ztick_tw.rest.openapi import document_bytes
from ztick_tw.rest.request import HttpRequest as Request

log = Logger(namespace="ztick_tw.rest")

#: Jobs written per chunk of a ``GET /jobs`` answer.
PAGE = 1000

_STATUS = {Invalid: 400, Denied: 403, NotFound: 404, Unavailable: 503}


class Unauthorized(OperationError):
    """No valid ``Authorization: Bearer <secret>`` header (401)."""


class NoRoute(OperationError):
    """No such path (404)."""


class BadMethod(OperationError):
    """The path exists, the method does not (405)."""

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(f"method not allowed (allowed: {', '.join(allowed)})")
        self.allowed = allowed


def status_of(error: BaseException) -> int:
    """The HTTP status of an operation error."""
    if isinstance(error, Unauthorized):
        return 401
    if isinstance(error, NoRoute):
        return 404
    if isinstance(error, BadMethod):
        return 405
    for kind, code in _STATUS.items():
        if isinstance(error, kind):
            return code
    return 500


Answer = tuple[int, Any]  # (status, JSON value or None for no body)


class RestResource:
    """The whole REST API (SPEC §7): ``render`` answers any request of the listener."""

    def __init__(
        self,
        operations: Operations,
        reactor: IReactorTime,
        *,
        tokens: TokenStore | None = None,
        metrics: Any = None,
    ) -> None:
        self.ops = operations
        self.reactor = reactor
        self.tokens = tokens
        self.metrics = metrics

    # -- plumbing ----------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        """Route, authenticate, run the operation, answer (now or once durable)."""
        method = (request.method or b"").decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        try:
            path = [p.decode("utf-8") for p in request.postpath]
        except UnicodeDecodeError:
            return self._error(request, Invalid("the path is not UTF-8"))
        if path and path[-1] == "" and len(path) > 1:
            path = path[:-1]
        try:
            if path == ["health"]:
                self._allow(method, "GET")
                return self._json(request, 200, {"status": "ok"})
            if path == ["openapi.json"]:
                self._allow(method, "GET")
                return self._raw(request, 200, document_bytes())
            if path == ["metrics"] and self.metrics is not None:
                self._allow(method, "GET")
                self._caller(request)
                out: bytes = self.metrics.render(request)
                return out
            caller = self._caller(request)
            result = self._route(request, method, path, caller)
        except Exception as e:
            return self._error(request, e)
        if isinstance(result, JobQuery):
            _JobStream(request, result).start()
            return NOT_DONE_YET
        if isinstance(result, _Wait):
            self._when_durable(request, result)
            return NOT_DONE_YET
        if isinstance(result, Deferred):
            self._later(request, result)
            return NOT_DONE_YET
        status, value = result
        return self._json(request, status, value)

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise BadMethod(list(allowed))

    def _caller(self, request: Request) -> Caller:
        tokens = self.tokens
        if tokens is None:
            return ANONYMOUS
        header = request.getHeader(b"authorization")
        if not header:
            raise Unauthorized("an Authorization: Bearer <secret> header is required")
        scheme, _, secret = header.partition(b" ")
        token = None
        if scheme.lower() == b"bearer":
            token = tokens.authenticate(secret.strip().decode("utf-8", "replace"))
        if token is None:
            raise Unauthorized("unknown token")
        return Caller(token)

    def _json(self, request: Request, status: int, value: Any) -> bytes:
        request.setResponseCode(status)
        if value is None:
            return b""
        return self._raw(request, status, json.dumps(value).encode())

    @staticmethod
    def _raw(request: Request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body

    def _error(self, request: Request, error: BaseException) -> bytes:
        status = status_of(error)
        if status == 500:
            log.failure("REST request failed", Failure(error))  # type: ignore[no-untyped-call]
            why = "internal error"
        else:
            why = str(error)
            log.debug(
                "REST {method} {status}: {why}", method=request.method, status=status, why=why
            )
        if status == 401:
            request.setHeader(b"www-authenticate", b"Bearer")
        if isinstance(error, BadMethod):
            allow = ", ".join(error.allowed).encode()
            request.setHeader(b"allow", allow)
        return self._json(request, status, {"error": why})

    def _later(self, request: Request, d: Deferred[Answer]) -> None:
        d.addCallbacks(
            lambda answer: request.answer(self._json(request, *answer)),
            lambda failure: request.answer(self._error(request, failure.value or Exception())),
        )

    def _when_durable(self, request: Request, wait: _Wait) -> None:
        """Answer ``wait.answer`` once its change is on disk, 503 if it cannot get there.

        The store's handle is subscribed to directly: no ``Deferred`` on the SET path.
        """

        def resolved(handle: Durable) -> None:
            error = handle.error
            if error is None:
                request.answer(self._json(request, *wait.answer))
            else:
                failed = Unavailable(f"cannot persist: {error}")
                request.answer(self._error(request, failed))

        wait.handle.subscribe(resolved)

    # -- routes ------------------------------------------------------------------------

    def _route(
        self, request: Request, method: str, path: list[str], caller: Caller
    ) -> Answer | _Wait | Deferred[Answer] | JobQuery:
        ops = self.ops
        n = len(path)
        head = path[0] if path else ""
        if n == 1 and head == "stat":
            self._allow(method, "GET")
            return 200, dict(ops.stat(caller))
        if n == 1 and head == "jobs":
            self._allow(method, "GET")
            return ops.query(caller, _arg(request, "prefix") or "")
        if n == 1 and head == "rules":
            self._allow(method, "GET")
            prefix = _arg(request, "prefix") or ""
            rules = ops.list_rules(caller)
            return 200, [bodies.rule(r) for r in rules if r.id.startswith(prefix)]
        if n == 1 and head == "schedules":
            self._allow(method, "GET")
            views = ops.list_schedules(caller, _arg(request, "prefix") or "")
            return 200, [bodies.schedule(v) for v in views]
        if n == 1 and head == "preview":
            self._allow(method, "GET")
            return self._preview(request, caller)
        if head == "jobs" and n in (2, 3):
            return self._job(request, method, path[1], path[2] if n == 3 else None, caller)
        if head == "rules" and n == 2:
            return self._rule(request, method, path[1], caller)
        if head == "rules" and n == 3 and path[2] == "policy":
            self._allow(method, "GET", "PUT")
            words = bodies.policy_words(_body(request)) if method == "PUT" else []
            shown, commit = ops.rule_policy(caller, path[1], words)
            return _durable(commit, (200, bodies.key_values(shown)))
        raise NoRoute(f"no such path: /{'/'.join(path)}")

    def _job(
        self, request: Request, method: str, job_id: str, sub: str | None, caller: Caller
    ) -> Answer | _Wait | Deferred[Answer]:
        ops = self.ops
        if sub is None:
            self._allow(method, "GET", "PUT", "DELETE")
            if method == "GET":
                return 200, bodies.job(job_id, *ops.get_job(caller, job_id))
            if method == "DELETE":
                return _durable(ops.remove_job(caller, job_id), (204, None))
            execution = bodies.parse_time(bodies.load(_raw_body(request)).get("execution"))
            commit = ops.set_job(caller, job_id, execution)
            return _durable(commit, (200, bodies.job(job_id, "planned", execution)))
        if sub == "schedule":
            self._allow(method, "GET", "PUT", "DELETE")
            if method == "GET":
                return 200, bodies.schedule(ops.get_schedule(caller, job_id))
            if method == "DELETE":
                return _durable(ops.remove_schedule(caller, job_id), (204, None))
            text, options = bodies.schedule_args(_body(request))
            first, commit = ops.set_schedule(caller, job_id, text, options)

            def shown(_: object) -> Answer:
                out = bodies.schedule(ops.get_schedule(caller, job_id))
                out["first"] = first
                return 200, out

            return when_durable(commit).addCallback(shown)
        if sub in ("pause", "resume", "run"):
            self._allow(method, "POST")
            if sub == "run":
                started: Deferred[Any] = ops.run_now(caller, job_id)
            else:
                change = ops.pause if sub == "pause" else ops.resume
                started = when_durable(change(caller, job_id))

            def state(_: object) -> Answer:
                return 200, bodies.job(job_id, *ops.get_job(caller, job_id))

            return started.addCallback(state)
        if sub == "history":
            self._allow(method, "GET")
            limit = _int_arg(request, "limit", 10)
            records = ops.history_of(caller, job_id, limit)
            return records.addCallback(lambda found: (200, [bodies.history(r) for r in found]))
        raise NoRoute(f"no such path: /jobs/{{id}}/{sub}")

    def _rule(
        self, request: Request, method: str, rule_id: str, caller: Caller
    ) -> Answer | _Wait | Deferred[Answer]:
        ops = self.ops
        self._allow(method, "GET", "PUT", "DELETE")
        if method == "DELETE":
            return _durable(ops.remove_rule(caller, rule_id), (204, None))
        if method == "GET":
            for r in ops.list_rules(caller):
                if r.id == rule_id:
                    return 200, bodies.rule(r)
            caller.check(rule_id)
            raise NotFound(f"no rule {rule_id!r}")
        pattern, runner, args = bodies.rule_args(_body(request))
        commit = ops.set_rule(caller, rule_id, pattern, runner, args)
        rule = ops.scheduler.rules.get(rule_id)
        if rule is None:  # pragma: no cover - set_rule keeps it
            raise Unavailable(f"rule {rule_id!r} vanished")
        return _durable(commit, (200, bodies.rule(rule)))

    def _preview(self, request: Request, caller: Caller) -> Answer:
        text = _arg(request, "schedule")
        if text is None:
            raise Invalid("schedule is missing")
        count = _int_arg(request, "count", 5)
        options = []
        for raw_key, values in request.args.items():
            key = raw_key.decode("utf-8", "replace")
            if key in ("schedule", "count"):
                continue
            options.append(f"{key}={values[-1].decode('utf-8', 'replace')}")
        found = self.ops.preview(caller, text, count, options)
        return 200, [{"ns": ns, "time": iso} for ns, iso in found]


@dataclass(frozen=True, slots=True)
class _Wait:
    """An answer to send once ``handle`` is on disk."""

    handle: Durable
    answer: Answer


def _durable(handle: Durable | None, answer: Answer) -> Answer | _Wait:
    """``answer`` now when there is nothing to wait for, else once ``handle`` is on disk."""
    if handle is None or (handle.done and handle.error is None):
        return answer
    return _Wait(handle, answer)


def _raw_body(request: Request) -> bytes:
    return request.body


def _body(request: Request) -> dict[str, Any]:
    return bodies.load(_raw_body(request))


def _arg(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return str(values[-1].decode("utf-8"))
    except UnicodeDecodeError:
        raise Invalid(f"{name} is not UTF-8") from None


def _int_arg(request: Request, name: str, default: int) -> int:
    text = _arg(request, name)
    if text is None or text == "":
        return default
    if not text.lstrip("-").isdigit() or len(text) > 20:
        raise Invalid(f"{name} {text[:24]!r} is not a number")
    return int(text)


class _JobStream:
    """``GET /jobs``: the JSON array written a page at a time as the client reads.

    A pull producer: the next page is read from the scheduler only when the transport
    has sent the last one, so a listing of a million jobs never sits in memory.
    """

    def __init__(self, request: Request, query: JobQuery) -> None:
        self.request = request
        self.query = query
        self.after: str | None = None
        self.first = True
        self.done = False

    def start(self) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.done:
            return
        page = self.query.page(self.after, PAGE)
        parts = []
        for job_id, status, execution in page:
            parts.append(json.dumps(bodies.job(job_id, status, execution)))
        chunk = ",".join(parts)
        prefix = b"[" if self.first else (b"," if parts else b"")
        self.first = False
        if len(page) < PAGE:
            self.done = True
            self.request.write(prefix + chunk.encode() + b"]")
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.after = page[-1][0]
        self.request.write(prefix + chunk.encode())

    def stopProducing(self) -> None:
        self.done = True
