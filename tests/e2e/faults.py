"""Helpers of the fault-injection test: a fast line client, the client model, the load.

``Conn`` is a blocking client like ``tests.e2e.daemon.LineClient`` but reads through a
buffered file object, so a QUERY answering tens of thousands of lines is read in linear
time; every socket operation has a timeout.

``ClientModel`` is what one load thread knows about its own ids (jobs and rules nobody
else touches).  Per id it keeps the value after the last request answered ``OK``
(``acked``; ``None`` is "absent") and the values of the requests sent but not answered
yet (``pending``, in order).  The daemon applies the requests of one connection in order,
so after a crash the id must hold ``acked`` or the value after one of the pending
requests: anything else lost an acknowledged write or made a removed id come back.

``run_load`` is one load thread: pipelined batches of SET (far-future jobs, and jobs due
within a moment that a shell rule runs), REMOVE of its own earlier jobs, RULE SET and
REMOVERULE of its own rules, until the connection dies (the kill) or it is told to stop.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.e2e.daemon import SOCKET_TIMEOUT, now_ns, quote

SECOND = 1_000_000_000
DAY = 86_400 * SECOND

#: An id's value: a job's execution time, a rule's LISTRULES rendering after its id
#: (``pattern runner args...``), or ``None`` when it does not exist.
Value = int | str | None


class Conn:
    """A blocking line client; every socket operation times out after ``timeout`` s."""

    def __init__(self, port: int, timeout: float = SOCKET_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")
        self._n = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_lines(self, lines: Iterable[str]) -> None:
        """Send ``lines`` (each gets a newline) in one ``sendall``: pipelined."""
        self.sock.sendall("".join(f"{line}\n" for line in lines).encode())

    def read_line(self) -> str:
        """The next line without its newline; ``ConnectionError`` on EOF."""
        raw = self.reader.readline()
        if not raw.endswith(b"\n"):
            raise ConnectionError(f"EOF from the daemon (unterminated data {raw!r})")
        return raw[:-1].decode()

    def read_answer(self, request_id: str) -> list[str]:
        """The lines answering ``request_id`` up to its ``OK``/``ERROR``, ids stripped.

        The §8-9 instructions answer ``ERROR <reason>``: that ends the answer too.
        """
        lines: list[str] = []
        prefix = request_id + " "
        while True:
            line = self.read_line()
            if not line.startswith(prefix):
                raise AssertionError(f"expected an answer to {request_id}, got {line!r}")
            rest = line[len(prefix) :]
            lines.append(rest)
            if rest in ("OK", "ERROR") or rest.startswith(("OK ", "ERROR ")):
                return lines

    def call(self, request: str) -> list[str]:
        """Send ``<fresh id> <request>``; the answer lines, ids stripped."""
        self._n += 1
        request_id = f"m{self._n}"
        self.send_lines([f"{request_id} {request}"])
        return self.read_answer(request_id)

    def query(self, prefix: str) -> dict[str, tuple[str, int]]:
        """``{job: (status, ns)}`` of the jobs whose id starts with ``prefix``."""
        answer = self.call(f"QUERY {quote(prefix)}")
        if answer[-1] != "OK":
            raise AssertionError(f"QUERY {prefix!r} answered {answer[-3:]!r}")
        jobs: dict[str, tuple[str, int]] = {}
        for line in answer[:-1]:
            job_id, status, ns = line.split(" ")
            jobs[job_id] = (status, int(ns))
        return jobs

    def rules(self) -> dict[str, str]:
        """``{rule id: "pattern runner args..."}`` from LISTRULES."""
        answer = self.call("LISTRULES")
        if answer[-1] != "OK":
            raise AssertionError(f"LISTRULES answered {answer[-3:]!r}")
        rules: dict[str, str] = {}
        for line in answer[:-1]:
            rule_id, _, rest = line.partition(" ")
            rules[rule_id] = rest
        return rules

    def stat(self) -> dict[str, str]:
        """STAT as a dict."""
        answer = self.call("STAT")
        if answer[-1] != "OK":
            raise AssertionError(f"STAT answered {answer!r}")
        return {k: v for k, _, v in (line.partition(" ") for line in answer[:-1])}

    def set_many(self, jobs: dict[str, int], batch: int = 2000) -> None:
        """SET every job, pipelined in batches; every answer must be ``OK``."""
        items = list(jobs.items())
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            self.send_lines(f"b{start + i} SET {job} {ns}" for i, (job, ns) in enumerate(chunk))
            for i, (job, _) in enumerate(chunk):
                answer = self.read_answer(f"b{start + i}")
                if answer != ["OK"]:
                    raise AssertionError(f"SET {job} answered {answer!r}")


# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Op:
    """One request of a load thread: SET, REMOVE, RULE (RULE SET) or REMOVERULE."""

    kind: str
    key: str
    value: Value = None  # the id's value once this request is applied

    def request(self) -> str:
        if self.kind == "SET":
            return f"SET {self.key} {self.value}"
        if self.kind == "RULE":
            assert isinstance(self.value, str)
            pattern, runner, args = self.value.split(" ", 2)
            if runner == "shell":
                return f"RULE SET {self.key} {pattern} shell {quote(args)}"
            return f"RULE SET {self.key} {pattern} {runner} {args}"
        return f"{self.kind} {self.key}"


@dataclass
class KeyState:
    """One id: its value after the last ``OK``, and the values of unanswered requests."""

    acked: Value = None
    pending: list[Value] = field(default_factory=list)

    def allowed(self) -> list[Value]:
        """The values a crash may leave: ``acked`` or the value after a pending request."""
        out = [self.acked]
        out.extend(v for v in self.pending if v not in out)
        return out


@dataclass
class ClientModel:
    """What load thread ``thread`` sent, and which of it the daemon acknowledged.

    Its ids: future jobs ``f.<t>.<i>``, due jobs ``d.<t>.<n>`` (each set once, never
    re-set, so a run of one is never legitimately repeated) and rules ``r.<t>.<i>``
    whose patterns ``x.<t>.<i>.`` match no job.
    """

    thread: int
    future_jobs: int = 12
    rule_ids: int = 4
    keys: dict[str, KeyState] = field(default_factory=dict)
    #: The value of every id after every request sent (what the daemon will hold once
    #: it has answered everything): the load chooses REMOVEs from it.
    expected: dict[str, Value] = field(default_factory=dict)
    due_made: int = 0
    ops_sent: int = 0
    ops_ok: int = 0
    #: Wrong answers and unexpected exceptions of the load thread.
    problems: list[str] = field(default_factory=list)
    #: How the last load session ended (the kill: EOF or reset), for the diagnosis.
    ended_by: str = ""

    def state(self, key: str) -> KeyState:
        if key not in self.keys:
            self.keys[key] = KeyState()
        return self.keys[key]

    def sent(self, op: Op) -> None:
        self.state(op.key).pending.append(op.value)
        self.expected[op.key] = op.value
        self.ops_sent += 1

    def answered(self, op: Op, answer: list[str]) -> None:
        """Record the daemon's answer to ``op`` (answers come in request order)."""
        state = self.state(op.key)
        value = state.pending.pop(0)
        if answer == ["OK"]:
            state.acked = value
            self.ops_ok += 1
        else:
            # Every request of the load deserves OK: REMOVE and REMOVERULE only name ids
            # that exist once the earlier requests are applied.
            self.problems.append(f"thread {self.thread}: {op.request()!r} answered {answer!r}")
            self.expected[op.key] = state.pending[-1] if state.pending else state.acked

    def rebase(self, actual: dict[str, Value]) -> None:
        """After a restart: the daemon's values are the truth; nothing is pending."""
        for key, state in self.keys.items():
            state.acked = actual.get(key)
            state.pending.clear()
            self.expected[key] = state.acked

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists once every request sent so far is applied."""
        return self.expected.get(key) is not None

    def job_prefixes(self) -> tuple[str, str]:
        return f"f.{self.thread}.", f"d.{self.thread}."

    def rule_prefix(self) -> str:
        return f"r.{self.thread}."

    # -- choosing requests ------------------------------------------------------------

    def next_op(self, rng: random.Random, due_now: bool, remove_due: bool = False) -> Op:
        """A random request.

        With ``due_now``, a new job due within half a second; with ``remove_due``, the
        REMOVE of one of the last due jobs made (queued, running or finished by then).
        """
        t = self.thread
        if due_now:
            job = f"d.{t}.{self.due_made}"
            self.due_made += 1
            return Op("SET", job, now_ns() + int(rng.uniform(0.0, 0.5) * SECOND))
        if remove_due:
            recent = range(max(0, self.due_made - 10), self.due_made)
            due = [k for k in (f"d.{t}.{n}" for n in recent) if self.exists(k)]
            if due:
                return Op("REMOVE", rng.choice(due))
        roll = rng.random()
        if roll < 0.30:
            future = [k for k in (f"f.{t}.{i}" for i in range(self.future_jobs)) if self.exists(k)]
            if future:
                return Op("REMOVE", rng.choice(future))
        if roll < 0.40:
            rules = [k for k in (f"r.{t}.{i}" for i in range(self.rule_ids)) if self.exists(k)]
            if rules:
                return Op("REMOVERULE", rng.choice(rules))
        if roll < 0.60:
            i = rng.randrange(self.rule_ids)
            n = rng.randrange(10**6)
            if rng.random() < 0.5:
                value = f"x.{t}.{i}. shell true v{n}"
            else:
                value = f"x.{t}.{i}. direct /bin/true v{n} w"
            return Op("RULE", f"r.{t}.{i}", value)
        job = f"f.{t}.{rng.randrange(self.future_jobs)}"
        return Op("SET", job, now_ns() + DAY + rng.randrange(DAY))


def run_load(
    port: int,
    model: ClientModel,
    rng: random.Random,
    stop: threading.Event,
    due_every: float = 0.1,
) -> None:
    """One load thread: pipelined batches until the connection dies or ``stop`` is set.

    Every request is recorded in ``model`` before it is sent and every answer as it
    arrives.  A job due now is made at most every ``due_every`` seconds (each one
    spawns a process in the daemon), and about one in four is removed again.  A socket
    error ends the session: that is the kill (a timeout is recorded as a problem: a
    daemon must answer).
    """
    next_due = next_removal = time.monotonic()
    try:
        with Conn(port) as conn:
            n = 0
            while not stop.is_set():
                batch: list[tuple[str, Op]] = []
                for _ in range(rng.randint(3, 12)):
                    now = time.monotonic()
                    due_now = now >= next_due
                    if due_now:
                        next_due = now + due_every
                    # About one due job in four is removed again.
                    remove_due = not due_now and now >= next_removal
                    if remove_due:
                        next_removal = now + 4 * due_every * rng.uniform(0.5, 1.5)
                    op = model.next_op(rng, due_now, remove_due)
                    n += 1
                    request_id = f"t{model.thread}.{n}"
                    model.sent(op)
                    batch.append((request_id, op))
                conn.send_lines(f"{rid} {op.request()}" for rid, op in batch)
                for rid, op in batch:
                    model.answered(op, conn.read_answer(rid))
                # A breath between batches, so the load leaves the daemon some room on
                # a small machine (the kill moments are random anyway).
                stop.wait(rng.uniform(0.0, 0.004))
        model.ended_by = "stopped"
    except TimeoutError as e:
        model.ended_by = repr(e)
        model.problems.append(f"thread {model.thread}: no answer within {SOCKET_TIMEOUT}s")
    except OSError as e:  # EOF, reset or broken pipe: the daemon was killed
        model.ended_by = repr(e)
    except Exception as e:  # a malformed answer: reported by the test
        model.ended_by = repr(e)
        model.problems.append(f"thread {model.thread}: {e!r}")
