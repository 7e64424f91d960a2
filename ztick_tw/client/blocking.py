"""A blocking client: one socket, requests formatted and answers parsed by :mod:`.wire`.

``ZtickClient`` is a context manager; ``AUTH`` is sent on connect when a token is given,
TLS goes through :mod:`ssl` (a CA file, verification on by default).  Every instruction is
a method returning a typed result or raising :class:`~.wire.ZtickError`.  For throughput,
:meth:`ZtickClient.pipeline` queues requests and sends them in batches, each sent before
the previous batch's answers are read, so the daemon is never idle waiting for us.
"""

from __future__ import annotations

import itertools
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from ztick_tw.client import wire
from ztick_tw.client.wire import Call, Instant, Job, Policy, ProtocolError, Rule, Run, Schedule

T = TypeVar("T")

#: Requests sent per batch by a pipeline (one batch in flight while the last is read).
BATCH = 4096
_RECV = 1 << 20
_EMPTY = [""]
_none = wire.none


def tls_context(
    cafile: str | None = None,
    verify: bool = True,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> ssl.SSLContext:
    """A client TLS context: the system CAs or ``cafile``; a client certificate if given."""
    context = ssl.create_default_context(cafile=cafile)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context


class ZtickClient:
    """A blocking connection to a ztick-tw (or ztick) daemon."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5678,
        *,
        token: str | None = None,
        tls: bool | ssl.SSLContext = False,
        cafile: str | None = None,
        verify: bool = True,
        timeout: float | None = 30.0,
        unix: str | None = None,
    ) -> None:
        if unix is not None:  # a UNIX socket (listen = "unix:PATH") instead of host:port
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(unix)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not False:
            context = tls if isinstance(tls, ssl.SSLContext) else tls_context(cafile, verify)
            sock = context.wrap_socket(sock, server_hostname=host)
        self.sock: socket.socket = sock
        self._buffer = b""
        self._lines: deque[str] = deque()
        self._next_id = 1
        if token is not None:
            self.sock.sendall(wire.auth_line(token))
            answer = self._read_line()
            if answer != "OK":
                self.close()
                raise wire.ZtickError(("AUTH",), answer or "connection closed")

    # -- plumbing -------------------------------------------------------------------------

    def __enter__(self) -> ZtickClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(_RECV)
        if not data:
            raise ProtocolError("the server closed the connection")
        data = self._buffer + data
        cut = data.rfind(b"\n") + 1
        self._buffer = data[cut:]
        if cut:
            self._lines.extend(data[: cut - 1].decode("utf-8", "replace").split("\n"))

    def _read_line(self) -> str:
        while not self._lines:
            try:
                self._fill()
            except ProtocolError:
                return ""
        return self._lines.popleft()

    def _read_answer(self, rid: str, answer: wire.Answer[Any]) -> None:
        lines = self._lines
        while True:
            while not lines:
                self._fill()
            got, _, rest = lines.popleft().partition(" ")
            if got != rid:
                raise ProtocolError(f"answer for {got!r} while waiting for {rid!r}")
            if answer.feed(rest):
                return

    def _new_ids(self, count: int) -> int:
        first = self._next_id
        self._next_id += count
        return first

    def call(self, call: Call[T]) -> T:
        """Send one request and wait for its answer."""
        rid = f"c{self._new_ids(1)}"
        self.sock.sendall(wire.format_request(rid, call))
        answer = wire.Answer(call)
        self._read_answer(rid, answer)
        return answer.result()

    def request(self, *words: str) -> list[str]:
        """Any request; the answer's body lines as sent (``ZtickError`` on ``ERROR``)."""
        return self.call(wire.raw(*words))

    def pipeline(self, raise_on_error: bool = True) -> Pipeline:
        """A batch of requests sent together; see :class:`Pipeline`."""
        return Pipeline(self, raise_on_error)

    def send_many(self, calls: Iterable[Call[Any]]) -> list[Any]:
        """Send ``calls`` pipelined, reading answers as it goes; one result per call.

        Results come in order, a ``ZtickError`` object for an ``ERROR`` answer (nothing is
        raised).
        """
        results: list[Any] = []
        inflight: deque[tuple[int, list[Call[Any]]]] = deque()
        source = iter(calls)
        while True:
            batch = list(itertools.islice(source, BATCH))
            if batch:
                first = self._new_ids(len(batch))
                self.sock.sendall(wire.format_batch(first, batch))
                inflight.append((first, batch))
            while inflight and (len(inflight) > 1 or not batch):
                self._read_batch(*inflight.popleft(), results)
            if not batch:
                return results

    def _read_batch(self, first: int, batch: list[Call[Any]], results: list[Any]) -> None:
        lines = self._lines
        count = len(batch)
        if all(c.convert is _none for c in batch):  # one line each: check them in one go
            while len(lines) < count:
                self._fill()
            if list(itertools.islice(lines, count)) == [
                f"c{i} OK" for i in range(first, first + count)
            ]:
                for _ in range(count):
                    lines.popleft()
                results.extend([None] * count)
                return
        for i, call in enumerate(batch, first):
            rid = f"c{i}"
            while not lines:
                self._fill()
            line = lines.popleft()
            if not call.multi and line == rid + " OK":  # the common case, quickly
                results.append(call.convert(_EMPTY))
                continue
            answer = wire.Answer(call)
            got, _, rest = line.partition(" ")
            if got != rid:
                raise ProtocolError(f"answer for {got!r} while waiting for {rid!r}")
            if not answer.feed(rest):
                self._read_answer(rid, answer)
            try:
                results.append(answer.result())
            except wire.ZtickError as e:
                results.append(e)

    # -- instructions ---------------------------------------------------------------------

    def set(self, job: str, when: int | datetime) -> None:
        """SET: create or replace a one-shot job at ``when`` (ns, or an aware datetime)."""
        self.call(wire.set_job(job, when))

    def get(self, job: str) -> Job:
        """GET: the job (``ZtickError`` if unknown)."""
        return self.call(wire.get_job(job))

    def query(self, prefix: str = "") -> list[Job]:
        """QUERY: the jobs whose id starts with ``prefix``, in id order."""
        return self.call(wire.query(prefix))

    def remove(self, job: str) -> None:
        """REMOVE: delete the job."""
        self.call(wire.remove(job))

    def rule_set(self, rule: str, pattern: str, runner: str, *args: str) -> None:
        """RULE SET: map job ids starting with ``pattern`` to a runner."""
        self.call(wire.rule_set(rule, pattern, runner, *args))

    def remove_rule(self, rule: str) -> None:
        """REMOVERULE: delete the rule."""
        self.call(wire.remove_rule(rule))

    def list_rules(self) -> list[Rule]:
        """LISTRULES: every rule, in the order first set."""
        return self.call(wire.list_rules())

    def stat(self) -> dict[str, int | str]:
        """STAT: the daemon's figures (numbers as ints)."""
        return self.call(wire.stat())

    def schedule_set(self, job: str, schedule: str, options: dict[str, str] | None = None) -> int:
        """SCHEDULE SET; returns the first firing, in ns."""
        return self.call(wire.schedule_set(job, schedule, options))

    def schedule_get(self, job: str) -> Schedule:
        """SCHEDULE GET: the job's schedule, options, next run and run count."""
        return self.call(wire.schedule_get(job))

    def schedule_remove(self, job: str) -> None:
        """SCHEDULE REMOVE: the job stays, a one-shot at its current time."""
        self.call(wire.schedule_remove(job))

    def list_schedules(self, prefix: str = "") -> list[Schedule]:
        """LISTSCHEDULES: the scheduled jobs whose id starts with ``prefix``."""
        return self.call(wire.list_schedules(prefix))

    def preview(
        self, schedule: str, count: int | None = None, options: dict[str, str] | None = None
    ) -> list[Instant]:
        """PREVIEW: the schedule's next instants (5 unless ``count``)."""
        return self.call(wire.preview(schedule, count, options))

    def pause(self, job: str) -> None:
        """PAUSE: hold the job until RESUME."""
        self.call(wire.pause(job))

    def resume(self, job: str) -> None:
        """RESUME: let a paused job fire again."""
        self.call(wire.resume(job))

    def run(self, job: str) -> None:
        """RUN: one extra run now; returns once it has started."""
        self.call(wire.run_now(job))

    def history(self, job: str, count: int | None = None) -> list[Run]:
        """HISTORY: the job's last runs, newest first."""
        return self.call(wire.history(job, count))

    def rule_policy(self, rule: str, options: dict[str, str] | None = None) -> Policy:
        """RULE POLICY: change (or, without options, show) the rule's policy."""
        return self.call(wire.rule_policy(rule, options))


class Pipeline:
    """Requests queued, then sent in batches by :meth:`execute` (or on leaving ``with``).

    ``execute`` returns the results in order.  With ``raise_on_error`` (the default) the
    first ``ZtickError`` is raised once every answer has been read (the connection stays
    usable); without it, ``ZtickError`` objects stand in the list for failed requests.
    """

    def __init__(self, client: ZtickClient, raise_on_error: bool = True) -> None:
        self.client = client
        self.raise_on_error = raise_on_error
        self.calls: list[Call[Any]] = []
        self.results: list[Any] = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.execute()

    def call(self, call: Call[Any]) -> None:
        """Queue any request (build it with the functions of :mod:`ztick_tw.client.wire`)."""
        self.calls.append(call)

    def set(self, job: str, when: int | datetime) -> None:
        """SET: create or replace a one-shot job at ``when`` (ns, or an aware datetime)."""
        self.calls.append(wire.set_job(job, when))

    def get(self, job: str) -> None:
        """GET: the job (``ZtickError`` if unknown)."""
        self.calls.append(wire.get_job(job))

    def remove(self, job: str) -> None:
        """REMOVE: delete the job."""
        self.calls.append(wire.remove(job))

    def schedule_set(self, job: str, schedule: str, options: dict[str, str] | None = None) -> None:
        """SCHEDULE SET: make the job recurring; the first firing in ns."""
        self.calls.append(wire.schedule_set(job, schedule, options))

    def execute(self) -> list[Any]:
        """Send everything queued; the results in order."""
        calls, self.calls = self.calls, []
        self.results = self.client.send_many(calls)
        if self.raise_on_error:
            for result in self.results:
                if isinstance(result, wire.ZtickError):
                    raise result
        return self.results
