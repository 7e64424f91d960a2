"""End-to-end crash tests: ``kill -9`` of the real daemon, torn and corrupt logfiles.

The daemon runs as a subprocess (``python -m ztick_tw -c FILE``) and is spoken to over
TCP on 127.0.0.1; the checks are what a user can observe after a restart: the answers of
QUERY/LISTRULES/GET, the lines jobs appended to a marker file, the daemon's stderr and
exit status, ``ztick-tw dump``.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import struct
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.daemon import (
    Daemon,
    LineClient,
    daemon,
    now_ns,
    quote,
    read_lines,
    wait_all_executed,
    wait_until,
)

SECOND = 1_000_000_000

#: Seed of the random choices of the kill test (requests, due times, kill moments).
SEED = int(os.environ.get("ZTICK_E2E_SEED", "20241122"))
ROUNDS = 4
CLIENT_THREADS = 3
JOBS_PER_THREAD = 8
RULES_PER_THREAD = 3
DUE_JOBS_PER_ROUND = 12


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon setup in a fresh directory; every process it started is killed afterwards."""
    with daemon(tmp_path / "d") as d:
        yield d


# ------------------------------------------------------------------- kill -9 under load

#: What a client thread believes about one key: a job's time or a rule's command;
#: ``None`` is "absent".
State = dict[str, int | str | None]


@dataclass(frozen=True)
class Op:
    """One request a client thread sent: ``SET job ns``, ``REMOVE job`` or ``RULE SET``."""

    kind: str  # "SET", "REMOVE" or "RULE"
    key: str
    value: int | str | None = None

    def line(self, request_id: str, thread: int) -> str:
        if self.kind == "SET":
            return f"{request_id} SET {self.key} {self.value}"
        if self.kind == "REMOVE":
            return f"{request_id} REMOVE {self.key}"
        assert isinstance(self.value, str)
        return f"{request_id} RULE SET {self.key} never{thread}. shell {quote(self.value)}"

    def apply(self, state: State) -> str:
        """Apply to ``state``; returns the answer the daemon must give (OK or ERROR)."""
        if self.kind == "REMOVE":
            if state.get(self.key) is None:
                return "ERROR"
            state[self.key] = None
            return "OK"
        state[self.key] = self.value
        return "OK"


@dataclass
class ClientLog:
    """Everything one client thread sent and which of it was answered, in order."""

    thread: int
    baseline: State
    ops: list[Op] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    error: Exception | None = None  # what ended the connection

    def states_allowed(self) -> list[State]:
        """The states the daemon may have kept after a crash.

        That is every answered op applied, plus any prefix of the unanswered ones (the
        daemon applies and logs the requests of one connection in order).
        """
        state = dict(self.baseline)
        for op in self.ops[: len(self.answers)]:
            op.apply(state)
        allowed = [dict(state)]
        for op in self.ops[len(self.answers) :]:
            op.apply(state)
            allowed.append(dict(state))
        return allowed


def client_thread(port: int, log: ClientLog, rng: random.Random, stop: threading.Event) -> None:
    """Pipeline batches of random SET/REMOVE/RULE SET requests until the connection dies.

    Records each request before sending it and each answer as it arrives; the model
    check that every answer is right is done by the test afterwards.
    """
    t = log.thread
    jobs = [f"c{t}.j{i}" for i in range(JOBS_PER_THREAD)]
    rules = [f"c{t}.r{i}" for i in range(RULES_PER_THREAD)]
    far = now_ns() + 3600 * SECOND
    try:
        with LineClient(port, timeout=10) as client:
            while not stop.is_set():
                batch: list[str] = []
                for _ in range(rng.randint(5, 30)):
                    roll = rng.random()
                    if roll < 0.55:
                        op = Op("SET", rng.choice(jobs), far + rng.randrange(10**12))
                    elif roll < 0.85:
                        op = Op("REMOVE", rng.choice(jobs))
                    else:
                        op = Op("RULE", rng.choice(rules), f"true v{rng.randrange(10**6)}")
                    batch.append(op.line(f"t{t}n{len(log.ops)}", t))
                    log.ops.append(op)
                client.send_lines(batch)
                for _ in batch:
                    request_id = f"t{t}n{len(log.answers)}"
                    answer = client.read_response(request_id)
                    log.answers.append(answer[0].split(" ", 1)[1])
    except Exception as e:  # the kill (EOF or reset), or a wrong answer: the test checks
        log.error = e


def daemon_state(client: LineClient, thread: int) -> State:
    """The jobs and rules of one client thread as the daemon has them now."""
    state: State = {}
    for job_id, (status, ns) in client.query(f"c{thread}.").items():
        assert status == "planned", f"{job_id} is {status}, it is due in an hour"
        state[job_id] = ns
    for line in client.rules():
        rule_id, _pattern, runner, command = line.split(" ", 3)
        if rule_id.startswith(f"c{thread}."):
            assert runner == "shell"
            state[rule_id] = command
    return state


def normalized(state: State) -> State:
    """``state`` without the absent keys."""
    return {k: v for k, v in state.items() if v is not None}


def logged_jobs(d: Daemon) -> dict[str, tuple[str, int]]:
    """Per job in the logfile: its last status and its ``triggered`` frames since set.

    Read with ``ztick-tw dump --format json``; the count is of the ``triggered`` frames
    after the job's last ``planned`` one.
    """
    result = d.dump("--format", "json")
    jobs: dict[str, tuple[str, int]] = {}
    for line in result.stdout.splitlines():
        frame = json.loads(line)
        if frame["type"] == "set":
            job_id, status = frame["identifier"], frame["status"]
            triggered = jobs[job_id][1] if job_id in jobs else 0
            if status == "planned":
                triggered = 0
            elif status == "triggered":
                triggered += 1
            jobs[job_id] = (status, triggered)
        elif frame["type"] == "remove":
            jobs.pop(frame["identifier"], None)
    return jobs


def marker_lines(path: Path) -> list[tuple[str, int]]:
    """``(job, attempt)`` per line the due jobs appended."""
    out: list[tuple[str, int]] = []
    for line in read_lines(path):
        job_id, attempt = line.split(" ")
        out.append((job_id, int(attempt)))
    return out


def test_kill_9_under_load_loses_no_acknowledged_write(ztick: Daemon) -> None:
    """SIGKILL at random moments under pipelined load, then restart, several times.

    With ``fsync_on_persist = true``, for every client connection the restarted daemon
    holds exactly the state after every request it answered OK plus some prefix of the
    requests it had not answered yet (it applies and logs them in order): so every job
    whose last acknowledged request was SET is there with that time, and every one
    whose last acknowledged request was REMOVE is gone unless a later unanswered SET
    made it.  Every answer was right (REMOVE of an absent job is ERROR, everything
    else OK).  Jobs due meanwhile run a shell rule appending ``id attempt`` to a marker
    file: a job logged ``executed`` before the kill never runs again; a job logged
    ``triggered`` (it was running) runs once more, as attempt n+1 where n is the number
    of ``triggered`` frames logged since it was set; every due job ends ``executed``.
    """
    rng = random.Random(SEED)
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    command = f"echo $ZTICK_JOB_ID $ZTICK_ATTEMPT >> {marker}; sleep 0.5"
    c.ok(f"RULE SET due due. shell {quote(command)}")
    baselines: list[State] = [{} for _ in range(CLIENT_THREADS)]
    due_jobs: list[str] = []
    seen_at_kill: Counter[str] = Counter()  # statuses of due jobs at the kills

    for round_no in range(ROUNDS):
        c = ztick.client()
        for i in range(DUE_JOBS_PER_ROUND):
            job_id = f"due.r{round_no}.{i:02d}"
            c.ok(f"SET {job_id} {now_ns() + int(rng.uniform(0.1, 1.5) * SECOND)}")
            due_jobs.append(job_id)
        stop = threading.Event()
        logs = [ClientLog(t, dict(baselines[t])) for t in range(CLIENT_THREADS)]
        threads = [
            threading.Thread(
                target=client_thread,
                args=(ztick.port, log, random.Random(rng.random()), stop),
                daemon=True,
            )
            for log in logs
        ]
        for thread in threads:
            thread.start()
        # The random kill moment: not a timed assertion, just when the crash happens.
        stop.wait(rng.uniform(0.2, 1.6))
        ztick.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a client thread is stuck"
        # Jobs started by the dead daemon run on (their own sessions); let them end so
        # that every marker line written from here on comes from the restarted daemon.
        ztick.wait_no_children()
        at_kill = logged_jobs(ztick)
        before = marker_lines(marker)

        ztick.start()
        c = ztick.client()
        for log in logs:
            # The kill ended the connection (EOF or reset), not a timeout or a bad answer;
            # or the thread saw the stop flag right after a fully answered batch.
            if log.error is None:
                assert len(log.answers) == len(log.ops)
            else:
                assert isinstance(log.error, OSError), repr(log.error)
                assert not isinstance(log.error, TimeoutError), repr(log.error)
            # The answers must be what the requests deserved, in order.
            model = dict(log.baseline)
            for op, answer in zip(log.ops, log.answers, strict=False):
                assert answer == op.apply(model), f"thread {log.thread}: {op} got {answer}"
            actual = daemon_state(c, log.thread)
            allowed = [normalized(s) for s in log.states_allowed()]
            assert actual in allowed, (
                f"round {round_no}, thread {log.thread}: after the restart the daemon holds"
                f" {actual}, which is not the state after the {len(log.answers)} answered"
                f" requests (of {len(log.ops)} sent) plus some prefix of the others"
            )
            baselines[log.thread] = actual
        assert sum(len(log.answers) for log in logs) > 0, "no request was answered"

        # Every due job (of every round) ends executed after the restart.
        wait_all_executed(c, "due.", len(due_jobs))
        after = marker_lines(marker)
        assert after[: len(before)] == before
        new: defaultdict[str, list[int]] = defaultdict(list)
        for job_id, attempt in after[len(before) :]:
            new[job_id].append(attempt)
        ran_before = Counter(job_id for job_id, _ in before)
        for job_id in due_jobs:
            status, triggered = at_kill[job_id]
            seen_at_kill[status] += 1
            if status in ("executed", "failed"):
                assert status == "executed"
                assert ran_before[job_id] >= 1
                assert new[job_id] == [], f"{job_id} was executed before the kill and ran again"
            elif status == "triggered":
                assert new[job_id] == [triggered + 1], (
                    f"{job_id} was running at the kill ({triggered} triggered frames): it"
                    f" must run once more as attempt {triggered + 1}, ran {new[job_id]}"
                )
            else:
                assert status == "planned"
                # The triggered frame is written before a runner starts, so a job still
                # planned at the kill had not started: it runs now, as attempt 1.
                assert ran_before[job_id] == 0, f"{job_id} ran before the kill but was planned"
                assert new[job_id] == [1], f"{job_id} was planned at the kill, ran {new[job_id]}"
    # The kills did hit jobs in each state (else this test checked less than it says).
    assert seen_at_kill["executed"] > 0, seen_at_kill
    assert seen_at_kill["triggered"] > 0, seen_at_kill
    assert ztick.stop() == 0


def test_a_job_started_before_a_crash_reruns_as_a_later_attempt(ztick: Daemon) -> None:
    """A job already started at a crash reruns as a later attempt, never as attempt 1.

    After the restart the job runs again with ZTICK_ATTEMPT >= 2, which needs the daemon
    to log ``triggered`` before it starts the run.

    100 jobs are due together (more than the 64 concurrent runs, so the daemon spends a
    while starting children in one go); the daemon is killed as soon as the first job
    has written its marker line.
    """
    marker = ztick.workdir / "marker"
    ztick.start()
    c = ztick.client()
    c.ok(f"RULE SET r w. shell {quote(f'echo $ZTICK_JOB_ID $ZTICK_ATTEMPT >> {marker}')}")
    due = now_ns() + 500_000_000
    jobs = [f"w.{i:03d}" for i in range(100)]
    c.send_lines([f"s{i} SET {job} {due}" for i, job in enumerate(jobs)])
    for i in range(len(jobs)):
        assert c.read_response(f"s{i}") == [f"s{i} OK"]
    wait_until(lambda: read_lines(marker) or None, "a first job to run", interval=0.001)
    ztick.kill()
    ztick.wait_no_children()
    before = marker_lines(marker)
    assert before
    ztick.start()
    c = ztick.client()
    wait_all_executed(c, "w.", len(jobs))
    rerun = marker_lines(marker)[len(before) :]
    started_before = {job_id for job_id, _ in before}
    wrong = [(job_id, a) for job_id, a in rerun if job_id in started_before and a < 2]
    assert wrong == [], f"jobs that had started before the kill ran again as attempt 1: {wrong}"


# ------------------------------------------------------------------- damaged logfiles


def utc_ns(year: int) -> int:
    """``<year>-01-06 03:00:00`` UTC in nanoseconds."""
    moment = datetime.datetime(year, 1, 6, 3, tzinfo=datetime.UTC)
    return int(moment.timestamp()) * SECOND


def frame_offsets(data: bytes) -> list[int]:
    """Byte offsets of the frames of a well-formed logfile (u32 BE length + payload)."""
    offsets: list[int] = []
    pos = 0
    while pos < len(data):
        offsets.append(pos)
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4 + length
    assert pos == len(data), "the logfile does not end on a frame boundary"
    return offsets


def test_torn_tail_is_cut_off_and_new_writes_survive(ztick: Daemon) -> None:
    """A torn last frame is reported with its offset and cut off; later writes survive.

    Bytes that look like the start of a frame at the end of the log (a write cut by a
    crash) are reported at startup and cut off: the earlier data is intact, and writes
    made after that survive another restart (they are not glued onto the torn bytes,
    where a replay would not find them).
    """
    ztick.start()
    c = ztick.client()
    c.ok('RULE SET keep k. shell "true"')
    c.ok("SET k.one 2030-01-06 03:00:00")
    c.ok("SET k.two 2031-01-06 03:00:00")
    before = c.query()
    assert ztick.stop() == 0
    size = ztick.logfile.stat().st_size
    with open(ztick.logfile, "ab") as f:
        f.write(b"\x00\x00\x00\x20abc")

    ztick.start()
    stderr = ztick.runs[-1].stderr()
    warnings = [line for line in stderr.splitlines() if "torn" in line]
    assert len(warnings) == 1, stderr
    assert f"offset {size}" in warnings[0]
    assert "ztick.log" in warnings[0]
    c = ztick.client()
    assert c.query() == before
    assert c.rules() == ["keep k. shell true"]
    c.ok("SET k.three 2032-01-06 03:00:00")
    c.ok("REMOVE k.one")
    after = c.query()
    assert set(after) == {"k.two", "k.three"}
    assert ztick.stop() == 0
    dumped = ztick.dump()
    assert dumped.returncode == 0
    assert dumped.stderr == ""
    assert dumped.stdout.splitlines()[-2:] == [
        f"SET k.three {utc_ns(2032)} planned",
        "REMOVE k.one",
    ]

    ztick.start()
    assert "torn" not in ztick.runs[-1].stderr()
    c = ztick.client()
    assert c.query() == after
    assert ztick.stop() == 0


def test_corrupt_frame_in_the_middle_refuses_start_unless_recovering(tmp_path: Path) -> None:
    """A corrupt frame mid-log refuses startup, unless ``--recover-corrupt-log`` is given.

    A damaged frame before the end of the log (type byte 0x09) stops startup with a
    non-zero exit and a stderr line naming the logfile and the byte offset.  With
    ``--recover-corrupt-log`` the daemon starts with the frames before the damage, keeps
    the cut bytes in ``<logfile>.corrupt-<offset>``, and later starts normally.
    """
    workdir = tmp_path / "d"
    logfile = workdir / "ztick.log"
    with daemon(workdir, {"database": {"logfile_path": str(logfile)}}) as d:
        d.start()
        c = d.client()
        for i, year in enumerate((2030, 2031, 2032, 2033)):
            c.ok(f"SET x.{i} {year}-01-06 03:00:00")
        jobs = c.query()
        assert d.stop() == 0
        data = logfile.read_bytes()
        offsets = frame_offsets(data)
        assert len(offsets) == 4
        bad = offsets[2]
        damaged = bytearray(data)
        damaged[bad + 4] = 0x09
        logfile.write_bytes(bytes(damaged))

        run = d.run_to_exit()
        assert run.process.returncode != 0
        lines = [
            line
            for line in run.stderr().splitlines()
            if str(logfile) in line and f"byte offset {bad}" in line
        ]
        assert len(lines) == 1, run.output()
        assert logfile.read_bytes() == bytes(damaged), "a refused start changed the log"

        run = d.start(extra=["--recover-corrupt-log"])
        assert f"byte offset {bad}" in run.stderr()
        c = d.client()
        assert c.query() == {k: jobs[k] for k in ("x.0", "x.1")}
        assert (workdir / f"ztick.log.corrupt-{bad}").read_bytes() == bytes(damaged[bad:])
        c.ok("SET x.new 2034-01-06 03:00:00")
        after = c.query()
        assert d.stop() == 0

        d.start()
        c = d.client()
        assert c.query() == after
        assert d.stop() == 0
